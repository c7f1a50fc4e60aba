//! The io_uring engine: one ring and one dedicated I/O thread per volume.
//!
//! Requests come from any task over a std `mpsc` channel; after each send the sender bumps an
//! eventfd. The thread keeps a `READ` of that eventfd in the ring, so a single
//! `io_uring_enter(min_complete = 1)` sleeps until either an operation completes or a request
//! arrives: no spinning, and new requests enter the ring as soon as there is room (up to
//! `queue_depth` in flight). Completions resolve `tokio::sync::oneshot` senders, handing the
//! buffer back.
//!
//! Setup follows Firecracker: the ring is created disabled (`IORING_SETUP_R_DISABLED`), the
//! files (O_DIRECT fd, buffered fd, eventfd) and the arena (one fixed buffer) are registered,
//! restrictions are registered (only the opcodes we use, every SQE must use a fixed file, no
//! further `io_uring_register` calls), and then the ring is enabled. Kernels without
//! `R_DISABLED` (< 5.10) get an unrestricted ring.
//!
//! The thread exits when the volume is dropped, after every queued and in-flight operation has
//! completed; the drop waits for it.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;
use std::{fmt, io};

use io_uring::register::{Probe, Restriction};
use io_uring::types::{Fixed, FsyncFlags};
use io_uring::{IoUring, opcode, squeue};
use rustix::event::{EventfdFlags, eventfd};
use tokio::sync::oneshot;

use super::IoError;
use super::arena::{self, Arena};
use super::engine::{Done, FdSel, Files, Op};
use super::error::engine_stopped;

/// Fixed-file index of the eventfd (0 and 1 are the volume's descriptors, see [`FdSel`]).
const WAKE_FD: u32 = 2;
/// User data of the eventfd read.
const WAKE_TOKEN: u64 = u64::MAX;

/// Opcodes the engine submits; the probe checks them and the restrictions allow only them.
const OPCODES: [(u8, &str); 6] = [
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::ReadFixed::CODE, "READ_FIXED"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Read::CODE, "READ"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
];

/// Why the probe failed, kept so every caller gets the same answer.
#[derive(Debug)]
struct ProbeFailure {
    kind: io::ErrorKind,
    message: String,
}

impl ProbeFailure {
    fn new(step: &str, e: &io::Error) -> ProbeFailure {
        ProbeFailure {
            kind: e.kind(),
            message: format!("{step}: {e}"),
        }
    }
}

/// Checks once per process that io_uring works here: a ring can be set up (not forbidden by
/// `kernel.io_uring_disabled`, seccomp or a sandbox), the opcodes the engine uses are supported,
/// and a no-op makes the round trip. The answer is cached.
pub fn probe_io_uring() -> Result<(), IoError> {
    static PROBE: OnceLock<Result<(), ProbeFailure>> = OnceLock::new();
    match PROBE.get_or_init(probe_now) {
        Ok(()) => Ok(()),
        Err(f) => Err(IoError::UringUnavailable {
            source: io::Error::new(f.kind, f.message.clone()),
        }),
    }
}

fn probe_now() -> Result<(), ProbeFailure> {
    let (mut ring, disabled) = build_ring(4).map_err(|e| ProbeFailure::new("io_uring_setup", &e))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| ProbeFailure::new("IORING_REGISTER_PROBE", &e))?;
    if let Some((_, name)) = OPCODES.iter().find(|(code, _)| !probe.is_supported(*code)) {
        return Err(ProbeFailure {
            kind: io::ErrorKind::Unsupported,
            message: format!("the kernel does not support IORING_OP_{name}"),
        });
    }
    if disabled {
        let mut res = [Restriction::sqe_op(opcode::Nop::CODE)];
        ring.submitter()
            .register_restrictions(&mut res)
            .map_err(|e| ProbeFailure::new("IORING_REGISTER_RESTRICTIONS", &e))?;
        ring.submitter()
            .register_enable_rings()
            .map_err(|e| ProbeFailure::new("IORING_REGISTER_ENABLE_RINGS", &e))?;
    }
    let nop = opcode::Nop::new().build().user_data(7);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| ProbeFailure {
        kind: io::ErrorKind::Other,
        message: "the submission queue of a new ring is full".to_owned(),
    })?;
    ring.submit_and_wait(1)
        .map_err(|e| ProbeFailure::new("io_uring_enter", &e))?;
    match ring.completion().next() {
        Some(c) if c.user_data() == 7 && c.result() >= 0 => Ok(()),
        Some(c) => Err(ProbeFailure::new(
            "IORING_OP_NOP",
            &io::Error::from_raw_os_error(-c.result()),
        )),
        None => Err(ProbeFailure {
            kind: io::ErrorKind::Other,
            message: "IORING_OP_NOP did not complete".to_owned(),
        }),
    }
}

/// A ring of at least `entries` entries, created disabled when the kernel supports it
/// (returns whether it is disabled, i.e. restrictions can and must be registered).
fn build_ring(entries: u32) -> io::Result<(IoUring, bool)> {
    match IoUring::builder().setup_r_disabled().build(entries) {
        Ok(r) => Ok((r, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok((IoUring::new(entries)?, false)),
        Err(e) => Err(e),
    }
}

struct Request {
    op: Op,
    reply: oneshot::Sender<Done>,
}

/// Handle to a volume's ring thread.
pub(crate) struct UringEngine {
    tx: Option<mpsc::Sender<Request>>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringEngine")
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

impl UringEngine {
    /// Sets up the ring for `files` and `arena` and starts the I/O thread.
    pub(crate) fn start(
        path: &Path,
        files: Arc<Files>,
        arena: Arc<Arena>,
        queue_depth: u32,
    ) -> Result<UringEngine, IoError> {
        let setup = |source: io::Error| IoError::RingSetup {
            path: path.to_owned(),
            source,
        };
        let wake = Arc::new(eventfd(0, EventfdFlags::CLOEXEC).map_err(|e| setup(io::Error::from(e)))?);
        // One extra entry for the eventfd read.
        let (ring, disabled) = build_ring(queue_depth + 1).map_err(setup)?;
        let fds = [
            files.get(FdSel::Direct).as_raw_fd(),
            files.get(FdSel::Buffered).as_raw_fd(),
            wake.as_raw_fd(),
        ];
        ring.submitter().register_files(&fds).map_err(setup)?;
        let iov = libc::iovec {
            iov_base: arena.base().cast(),
            iov_len: arena.bytes(),
        };
        // SAFETY: the iovec is the whole arena mapping, which stays mapped while the ring
        // exists: the I/O thread owns both the ring and an `Arc<Arena>` and drops the ring first.
        let fixed_bufs = match unsafe { ring.submitter().register_buffers(&[iov]) } {
            Ok(()) => true,
            Err(e) => {
                // Typically RLIMIT_MEMLOCK for an unprivileged user: plain READ/WRITE still work
                // (the kernel maps the pages per operation).
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot register the I/O arena with io_uring; using non-fixed buffers"
                );
                false
            }
        };
        if disabled {
            let mut res: Vec<Restriction> = OPCODES
                .iter()
                .map(|(code, _)| Restriction::sqe_op(*code))
                .collect();
            res.push(Restriction::sqe_flags_required(squeue::Flags::FIXED_FILE.bits()));
            ring.submitter().register_restrictions(&mut res).map_err(setup)?;
            ring.submitter().register_enable_rings().map_err(setup)?;
        }
        let (tx, rx) = mpsc::channel();
        let qd = queue_depth as usize;
        let worker = Worker {
            ring,
            wake_buf: Box::new([0; 8]),
            rx,
            arena,
            _files: files,
            _wake: Arc::clone(&wake),
            fixed_bufs,
            queue_depth: qd,
            slots: (0..qd).map(|_| None).collect(),
            free: (0..qd).rev().collect(),
            in_flight: 0,
            pending: VecDeque::new(),
            path: path.to_owned(),
            enter_error_logged: false,
        };
        let thread = std::thread::Builder::new()
            .name("tern-io-uring".to_owned())
            .spawn(move || worker.run())
            .map_err(setup)?;
        Ok(UringEngine {
            tx: Some(tx),
            wake,
            thread: Some(thread),
        })
    }

    fn signal(&self) {
        // Errors are impossible in practice (EAGAIN would need 2^64 - 1 pending wake-ups).
        let _ = rustix::io::write(self.wake.as_fd(), &1u64.to_ne_bytes());
    }

    pub(crate) async fn exec(&self, op: Op) -> Done {
        let (reply, rx) = oneshot::channel();
        let Some(tx) = &self.tx else {
            return Done {
                buf: op.into_buf(),
                res: Err(engine_stopped()),
            };
        };
        if let Err(mpsc::SendError(req)) = tx.send(Request { op, reply }) {
            return Done {
                buf: req.op.into_buf(),
                res: Err(engine_stopped()),
            };
        }
        self.signal();
        rx.await.unwrap_or_else(|_| Done {
            buf: None,
            res: Err(engine_stopped()),
        })
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Closing the channel and waking the thread makes it finish what it has and exit.
        drop(self.tx.take());
        self.signal();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the io_uring I/O thread panicked");
        }
    }
}

struct Slot {
    buf: Option<arena::IoBuf>,
    reply: oneshot::Sender<Done>,
}

/// State owned by the I/O thread. Field order matters: the ring is dropped first, before the
/// memory and descriptors it refers to.
struct Worker {
    ring: IoUring,
    /// Target of the eventfd read.
    wake_buf: Box<[u8; 8]>,
    rx: mpsc::Receiver<Request>,
    arena: Arc<Arena>,
    _files: Arc<Files>,
    _wake: Arc<OwnedFd>,
    fixed_bufs: bool,
    queue_depth: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    pending: VecDeque<Request>,
    path: PathBuf,
    enter_error_logged: bool,
}

impl Worker {
    fn run(mut self) {
        let mut drain = true;
        let mut closing = false;
        let mut wake_armed = false;
        loop {
            if drain {
                drain = false;
                loop {
                    match self.rx.try_recv() {
                        Ok(r) => self.pending.push_back(r),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            closing = true;
                            break;
                        }
                    }
                }
            }
            if !closing && !wake_armed {
                wake_armed = self.arm_wake();
            }
            while self.in_flight < self.queue_depth && !self.ring.submission().is_full() {
                let Some(req) = self.pending.pop_front() else {
                    break;
                };
                self.start(req);
            }
            if self.in_flight == 0 && !wake_armed {
                if closing && self.pending.is_empty() {
                    break;
                }
                // Unreachable in practice (the wake read always fits in the ring); never block
                // in the kernel with nothing that could complete.
                std::thread::sleep(Duration::from_millis(1));
                drain = true;
                continue;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                    _ => {
                        if !self.enter_error_logged {
                            self.enter_error_logged = true;
                            tracing::error!(path = %self.path.display(), error = %e, "io_uring_enter failed");
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            let done: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (token, result) in done {
                if token == WAKE_TOKEN {
                    wake_armed = false;
                    drain = true;
                } else {
                    self.complete(token, result);
                }
            }
        }
    }

    /// Queues the eventfd read; false if the submission queue is full (cannot happen: it has
    /// room for `queue_depth` operations plus this one).
    fn arm_wake(&mut self) -> bool {
        let ptr = self.wake_buf.as_mut_ptr();
        let entry = opcode::Read::new(Fixed(WAKE_FD), ptr, 8)
            .build()
            .user_data(WAKE_TOKEN);
        // SAFETY: `wake_buf` is owned by this worker, never touched while the read is in
        // flight, and outlives the ring (which is dropped first); the eventfd is registered.
        unsafe { self.ring.submission().push(&entry) }.is_ok()
    }

    fn start(&mut self, req: Request) {
        let Some(idx) = self.free.pop() else {
            // in_flight < queue_depth guarantees a free slot.
            let _ = req.reply.send(Done {
                buf: req.op.into_buf(),
                res: Err(io::Error::other("no free I/O slot")),
            });
            return;
        };
        let (entry, buf) = match self.entry_for(req.op) {
            Ok(x) => x,
            Err(done) => {
                self.free.push(idx);
                let _ = req.reply.send(done);
                return;
            }
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: every pointer in `entry` is either into the arena range owned by `buf` (kept
        // in the slot, untouched, until the completion; the arena outlives the ring) or into the
        // static zero region; every fd is a registered fixed file.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.free.push(idx);
            let _ = req.reply.send(Done {
                buf,
                res: Err(io::Error::other("io_uring submission queue full")),
            });
            return;
        }
        self.slots[idx] = Some(Slot {
            buf,
            reply: req.reply,
        });
        self.in_flight += 1;
    }

    /// The SQE for `op`, and the buffer to keep until it completes.
    fn entry_for(&self, op: Op) -> Result<(squeue::Entry, Option<arena::IoBuf>), Done> {
        // Lengths are at most 16 MiB (checked by the volume layer); clamp anyway, a short
        // transfer is continued by the caller.
        let len32 = |len: usize| u32::try_from(len).unwrap_or(1 << 30);
        Ok(match op {
            Op::Write {
                fd,
                mut buf,
                at,
                len,
                offset,
            } => {
                let ptr = buf.raw_at(at).cast_const();
                let e = if self.fixed_bufs && buf.is_from(&self.arena) {
                    opcode::WriteFixed::new(Fixed(fd.index()), ptr, len32(len), 0)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Write::new(Fixed(fd.index()), ptr, len32(len))
                        .offset(offset)
                        .build()
                };
                (e, Some(buf))
            }
            Op::Read {
                fd,
                mut buf,
                at,
                len,
                offset,
            } => {
                let ptr = buf.raw_at(at);
                let e = if self.fixed_bufs && buf.is_from(&self.arena) {
                    opcode::ReadFixed::new(Fixed(fd.index()), ptr, len32(len), 0)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Read::new(Fixed(fd.index()), ptr, len32(len))
                        .offset(offset)
                        .build()
                };
                (e, Some(buf))
            }
            Op::WriteZeroes { fd, len, offset } => {
                let zeroes = arena::zeroes().map_err(|e| Done {
                    buf: None,
                    res: Err(e),
                })?;
                let len = len.min(zeroes.len());
                let e = opcode::Write::new(Fixed(fd.index()), zeroes.as_ptr(), len32(len))
                    .offset(offset)
                    .build();
                (e, None)
            }
            Op::Fallocate { mode, offset, len } => (
                opcode::Fallocate::new(Fixed(FdSel::Direct.index()), len)
                    .offset(offset)
                    .mode(mode)
                    .build(),
                None,
            ),
            Op::Fdatasync => (
                opcode::Fsync::new(Fixed(FdSel::Direct.index()))
                    .flags(FsyncFlags::DATASYNC)
                    .build(),
                None,
            ),
        })
    }

    fn complete(&mut self, token: u64, result: i32) {
        let Some(slot) = usize::try_from(token)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
            .and_then(Option::take)
        else {
            return;
        };
        self.free.push(token as usize);
        self.in_flight -= 1;
        let res = if result >= 0 {
            Ok(result as usize)
        } else {
            Err(io::Error::from_raw_os_error(-result))
        };
        // The requester may have gone (cancelled): the buffer then returns to the arena here.
        let _ = slot.reply.send(Done { buf: slot.buf, res });
    }
}
