//! The portable engine: positional `pread`/`pwrite`/`fdatasync`/`fallocate` on tokio's blocking
//! threads, at most `queue_depth` at a time per volume. Needs a tokio runtime.
//!
//! Dropping the engine waits for the operations already running (like the io_uring engine).

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use rustix::fs::FallocateFlags;
use tokio::sync::Semaphore;

use super::arena;
use super::engine::{Done, Files, Op};
use super::error::engine_stopped;

#[derive(Debug)]
pub(crate) struct PortableEngine {
    files: Arc<Files>,
    permits: Arc<Semaphore>,
    running: Arc<Running>,
}

/// Count of operations handed to blocking threads and not yet finished (or dropped).
#[derive(Debug, Default)]
struct Running {
    count: Mutex<usize>,
    idle: Condvar,
}

struct RunningGuard(Arc<Running>);

impl Running {
    fn enter(self: &Arc<Self>) -> RunningGuard {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        RunningGuard(Arc::clone(self))
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let mut n = self.0.count.lock().unwrap_or_else(PoisonError::into_inner);
        *n -= 1;
        if *n == 0 {
            self.0.idle.notify_all();
        }
    }
}

impl PortableEngine {
    pub(crate) fn new(files: Arc<Files>, queue_depth: u32) -> PortableEngine {
        PortableEngine {
            files,
            permits: Arc::new(Semaphore::new(queue_depth as usize)),
            running: Arc::default(),
        }
    }

    pub(crate) async fn exec(&self, op: Op) -> Done {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Done {
                buf: op.into_buf(),
                res: Err(io::Error::other(
                    "the portable I/O engine must be used from a tokio runtime",
                )),
            };
        };
        let Ok(permit) = Arc::clone(&self.permits).acquire_owned().await else {
            return Done {
                buf: op.into_buf(),
                res: Err(engine_stopped()),
            };
        };
        let guard = self.running.enter();
        let files = Arc::clone(&self.files);
        // If this future is dropped, the blocking operation still runs to completion and its
        // buffer returns to the arena when it finishes.
        let task = handle.spawn_blocking(move || {
            let _permit = permit;
            let _guard = guard;
            run(&files, op)
        });
        task.await.unwrap_or_else(|_| Done {
            buf: None,
            res: Err(engine_stopped()),
        })
    }
}

impl Drop for PortableEngine {
    fn drop(&mut self) {
        let n = self.running.count.lock().unwrap_or_else(PoisonError::into_inner);
        let _idle = self
            .running
            .idle
            .wait_while(n, |n| *n > 0)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

fn bad_range() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "range outside the I/O buffer")
}

/// Runs one operation synchronously.
fn run(files: &Files, op: Op) -> Done {
    match op {
        Op::Write {
            fd,
            buf,
            at,
            len,
            offset,
        } => {
            let res = match at.checked_add(len).and_then(|end| buf.get(at..end)) {
                Some(data) => files.get(fd).write_at(data, offset),
                None => Err(bad_range()),
            };
            Done { buf: Some(buf), res }
        }
        Op::Read {
            fd,
            mut buf,
            at,
            len,
            offset,
        } => {
            let res = match at.checked_add(len).and_then(|end| buf.get_mut(at..end)) {
                Some(data) => files.get(fd).read_at(data, offset),
                None => Err(bad_range()),
            };
            Done { buf: Some(buf), res }
        }
        Op::WriteZeroes { fd, len, offset } => {
            let res = arena::zeroes().and_then(|z| files.get(fd).write_at(&z[..len.min(z.len())], offset));
            Done { buf: None, res }
        }
        Op::Fallocate { mode, offset, len } => {
            let res = rustix::fs::fallocate(
                files.get(super::engine::FdSel::Direct),
                FallocateFlags::from_bits_retain(mode as u32),
                offset,
                len,
            )
            .map(|()| 0)
            .map_err(io::Error::from);
            Done { buf: None, res }
        }
        Op::Fdatasync => {
            let res = rustix::fs::fdatasync(files.get(super::engine::FdSel::Direct))
                .map(|()| 0)
                .map_err(io::Error::from);
            Done { buf: None, res }
        }
    }
}
