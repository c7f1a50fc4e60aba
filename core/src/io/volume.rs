//! [`Volume`]: one open file or block device and the engine that does its I/O.

use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::FallocateFlags;

use super::arena::{Arena, IoBuf, ZERO_LEN};
use super::engine::{Done, Engine, FdSel, Files, Op};
use super::error::engine_stopped;
use super::{EngineKind, IoError};

/// O_DIRECT constraints reported by `statx(STATX_DIOALIGN)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DioAlign {
    /// File offsets and lengths must be multiples of this.
    pub(crate) offset: u64,
    /// Buffer addresses must be multiples of this.
    pub(crate) mem: usize,
}

/// An open volume (regular file or block device) with its I/O engine and buffer arena.
///
/// `Send + Sync`: share it with an `Arc`. All I/O goes through owned [`IoBuf`]s from
/// [`Volume::alloc`], moved into the engine and handed back with the completion. Dropping the
/// volume waits for the operations still running (cancelled futures included).
///
/// Ranges aligned to the file system's O_DIRECT alignment go through the O_DIRECT descriptor;
/// the unaligned head or tail of a range (e.g. the last 512 bytes of a disk) goes through a
/// second, buffered descriptor. Callers must not write ranges that share a page concurrently
/// when one of them is unaligned (the usual rule for mixing direct and buffered I/O).
#[derive(Debug)]
pub struct Volume {
    /// Dropped first: waits for in-flight operations before the descriptors close.
    pub(crate) engine: Engine,
    pub(crate) path: PathBuf,
    pub(crate) size: u64,
    pub(crate) writable: bool,
    pub(crate) block_device: bool,
    pub(crate) dio: Option<DioAlign>,
    pub(crate) arena: Arc<Arena>,
    pub(crate) files: Arc<Files>,
    /// Whether an O_DIRECT operation was refused with EINVAL and retried buffered (logged once).
    pub(crate) dio_refused: AtomicBool,
}

/// Errors that mean "this way of zeroing is not supported here, try the next one".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

impl Volume {
    /// The engine doing this volume's I/O.
    pub fn kind(&self) -> EngineKind {
        self.engine.kind()
    }

    /// Size in bytes (file length or block device size, read at open).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// Whether aligned I/O uses O_DIRECT.
    pub fn direct(&self) -> bool {
        self.dio.is_some()
    }

    /// The path the volume was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Largest buffer [`Volume::alloc`] hands out (16 MiB, or less with a small arena).
    pub fn max_buf_len(&self) -> usize {
        self.arena.max_len()
    }

    /// A buffer of `len` bytes from this volume's arena, waiting (FIFO) while the arena is full:
    /// this is the backpressure of whoever fills the buffers. Its contents are unspecified
    /// (whatever the memory last held). Errors if `len` exceeds [`Volume::max_buf_len`].
    pub async fn alloc(&self, len: usize) -> Result<IoBuf, IoError> {
        Ok(self.arena.alloc(len)?.await)
    }

    /// One buffer per entry of `lens`, in order, taken together: waits (FIFO) until all of them
    /// fit at once, so a caller never holds some while waiting for the others. Errors if they
    /// could not fit together even in an empty arena.
    pub async fn alloc_many(&self, lens: &[usize]) -> Result<Vec<IoBuf>, IoError> {
        Ok(self.arena.alloc_many(lens)?.await)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(IoError::OutOfBounds {
                path: self.path.clone(),
                offset,
                len,
                size: self.size,
            }),
        }
    }

    fn check_writable(&self) -> Result<(), IoError> {
        if self.writable {
            Ok(())
        } else {
            Err(IoError::ReadOnly {
                path: self.path.clone(),
            })
        }
    }

    /// Which descriptor, and how many bytes, for the next piece of a transfer of `remaining`
    /// bytes at `offset` from memory at arena-relative address `mem` (page-aligned arena).
    fn plan(&self, offset: u64, mem: usize, remaining: usize) -> (FdSel, usize) {
        let Some(dio) = self.dio else {
            return (FdSel::Buffered, remaining);
        };
        let head = offset % dio.offset;
        if head != 0 {
            // Unaligned head: buffered up to the next aligned offset.
            let to_boundary = usize::try_from(dio.offset - head).unwrap_or(usize::MAX);
            return (FdSel::Buffered, remaining.min(to_boundary));
        }
        let aligned = remaining - (remaining as u64 % dio.offset) as usize;
        if aligned > 0 && mem.is_multiple_of(dio.mem) {
            (FdSel::Direct, aligned)
        } else {
            (FdSel::Buffered, remaining)
        }
    }

    /// Runs `op`; if O_DIRECT refuses it with EINVAL, logs once and retries it buffered.
    async fn exec_rw(&self, op: Op) -> Done {
        let direct = matches!(
            op,
            Op::Write {
                fd: FdSel::Direct,
                ..
            } | Op::Read {
                fd: FdSel::Direct,
                ..
            } | Op::WriteZeroes {
                fd: FdSel::Direct,
                ..
            }
        );
        let retry = match &op {
            Op::Write { at, len, offset, .. } | Op::Read { at, len, offset, .. } if direct => {
                Some((*at, *len, *offset))
            }
            Op::WriteZeroes { len, offset, .. } if direct => Some((0, *len, *offset)),
            _ => None,
        };
        let is_read = matches!(op, Op::Read { .. });
        let is_zeroes = matches!(op, Op::WriteZeroes { .. });
        let done = self.engine.exec(op).await;
        let Some((at, len, offset)) = retry else {
            return done;
        };
        if !matches!(&done.res, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
            return done;
        }
        if !self.dio_refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                path = %self.path.display(),
                offset,
                len,
                "O_DIRECT refused an aligned operation (EINVAL); retrying it buffered"
            );
        }
        let fd = FdSel::Buffered;
        let op = if is_zeroes {
            Op::WriteZeroes { fd, len, offset }
        } else {
            let Some(buf) = done.buf else {
                return Done {
                    buf: None,
                    res: Err(engine_stopped()),
                };
            };
            if is_read {
                Op::Read {
                    fd,
                    buf,
                    at,
                    len,
                    offset,
                }
            } else {
                Op::Write {
                    fd,
                    buf,
                    at,
                    len,
                    offset,
                }
            }
        };
        self.engine.exec(op).await
    }

    /// Writes all of `buf` at `offset` (short writes are continued) and hands the buffer back.
    /// A range past [`Volume::size`] is refused without touching the volume.
    pub async fn write_at(&self, buf: IoBuf, offset: u64) -> Result<IoBuf, IoError> {
        self.check_writable()?;
        let total = buf.len();
        self.check_range(offset, total as u64)?;
        let err = |source: io::Error| IoError::Write {
            path: self.path.clone(),
            offset,
            len: total as u64,
            source,
        };
        let mut buf = buf;
        let mut done = 0;
        while done < total {
            let pos = offset + done as u64;
            let (fd, len) = self.plan(pos, buf.arena_offset() + done, total - done);
            let d = self
                .exec_rw(Op::Write {
                    fd,
                    buf,
                    at: done,
                    len,
                    offset: pos,
                })
                .await;
            buf = d.buf.ok_or_else(|| err(engine_stopped()))?;
            match d.res {
                Ok(0) => return Err(err(io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n.min(len),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(buf)
    }

    /// Fills all of `buf` from `offset` and hands it back. A range past [`Volume::size`] is
    /// refused; data ending early (the file shrank) is [`IoError::ShortRead`].
    pub async fn read_at(&self, buf: IoBuf, offset: u64) -> Result<IoBuf, IoError> {
        let total = buf.len();
        self.check_range(offset, total as u64)?;
        let err = |source: io::Error| IoError::Read {
            path: self.path.clone(),
            offset,
            len: total as u64,
            source,
        };
        let mut buf = buf;
        let mut done = 0;
        while done < total {
            let pos = offset + done as u64;
            let (fd, len) = self.plan(pos, buf.arena_offset() + done, total - done);
            let d = self
                .exec_rw(Op::Read {
                    fd,
                    buf,
                    at: done,
                    len,
                    offset: pos,
                })
                .await;
            buf = d.buf.ok_or_else(|| err(engine_stopped()))?;
            match d.res {
                Ok(0) => {
                    return Err(IoError::ShortRead {
                        path: self.path.clone(),
                        offset,
                        len: total as u64,
                        got: done as u64,
                    });
                }
                Ok(n) => done += n.min(len),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(err(e)),
            }
        }
        Ok(buf)
    }

    /// Makes `len` bytes at `offset` read as zeros: a hole punched in a file
    /// (`PUNCH_HOLE | KEEP_SIZE`), `ZERO_RANGE` then `BLKZEROOUT` on a block device; where
    /// those are not supported (or the range is not aligned for them), zeros are written.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), IoError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let err = |source: io::Error| IoError::Zero {
            path: self.path.clone(),
            offset,
            len,
            source,
        };
        let mode = if self.block_device {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        };
        let d = self
            .engine
            .exec(Op::Fallocate {
                mode: mode.bits() as i32,
                offset,
                len,
            })
            .await;
        match d.res {
            Ok(_) => return Ok(()),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(err(e)),
        }
        if self.block_device {
            match self.blkzeroout(offset, len).await {
                Ok(()) => return Ok(()),
                Err(e) if unsupported(&e) => {}
                Err(e) => return Err(err(e)),
            }
        }
        self.zero_by_writing(offset, len).await.map_err(err)
    }

    async fn blkzeroout(&self, offset: u64, len: u64) -> io::Result<()> {
        let files = Arc::clone(&self.files);
        super::run_blocking(move || {
            const BLKZEROOUT: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0x12, 127);
            // SAFETY: BLKZEROOUT takes a pointer to two u64 (offset, length), which is what
            // this setter passes.
            let ioctl = unsafe { rustix::ioctl::Setter::<BLKZEROOUT, [u64; 2]>::new([offset, len]) };
            // SAFETY: the descriptor is an open block device and `ioctl` matches BLKZEROOUT.
            unsafe { rustix::ioctl::ioctl(files.get(FdSel::Buffered).as_fd(), ioctl) }
                .map_err(io::Error::from)
        })
        .await
    }

    /// Writes zeros from the shared zero region, O_DIRECT where aligned.
    pub(crate) async fn zero_by_writing(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let remaining = usize::try_from(end - pos).unwrap_or(usize::MAX).min(ZERO_LEN);
            // The zero region is page-aligned: memory alignment never limits O_DIRECT here.
            let (fd, piece) = self.plan(pos, 0, remaining);
            let d = self
                .exec_rw(Op::WriteZeroes {
                    fd,
                    len: piece,
                    offset: pos,
                })
                .await;
            match d.res {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => pos += n.min(piece) as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `fdatasync`: everything written before the call (through either descriptor: they share
    /// one inode) is on stable storage when it returns.
    pub async fn sync_data(&self) -> Result<(), IoError> {
        let d = self.engine.exec(Op::Fdatasync).await;
        d.res.map(|_| ()).map_err(|source| IoError::Sync {
            path: self.path.clone(),
            source,
        })
    }
}
