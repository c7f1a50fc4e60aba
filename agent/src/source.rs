//! A source disk: a block device or a raw image file, read without filling the host's page
//! cache.
//!
//! Reads use `O_DIRECT` into 4 KiB-aligned buffers at 4 KiB-aligned offsets (valid for every
//! device with a logical block of at most 4 KiB). When the file system refuses `O_DIRECT`
//! (at open or at the first read), the source falls back to buffered reads, says so once in a
//! log line, and drops what it read from the page cache after each read.
//!
//! Holes: where the file reports them (`SEEK_DATA`/`SEEK_HOLE`), only the data segments of a
//! chunk are read; a chunk that is all hole is not read at all.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Advice, SeekFrom, fadvise, seek};
use rustix::io::Errno;
use rustix::ioctl::{Getter, Opcode, ioctl, opcode};

/// Alignment of direct reads (offsets, lengths and buffers).
pub const READ_ALIGN: u64 = 4096;

/// `BLKGETSIZE64`: the size of a block device in bytes.
const BLKGETSIZE64: Opcode = opcode::read::<u64>(0x12, 114);

/// A source operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is neither a block device nor a regular file")]
    Kind { path: PathBuf },
    #[error("{path} ended at byte {at}, before its size {size} (did it shrink?)")]
    Short { path: PathBuf, at: u64, size: u64 },
    #[error("failed to {op} NBD export {uri}")]
    Nbd {
        uri: String,
        op: &'static str,
        #[source]
        source: Box<tern_core::nbd::NbdError>,
    },
    #[error("NBD export {uri}: {reason}")]
    NbdSetup { uri: String, reason: String },
    #[error("RBD image {image}: {reason}")]
    Rbd { image: String, reason: String },
    #[error("QEMU at {socket}: {reason}")]
    Qmp { socket: PathBuf, reason: String },
}

/// An open source disk.
#[derive(Debug)]
pub struct Source {
    path: PathBuf,
    size: u64,
    /// Opened with `O_DIRECT`, if the file system allowed it.
    direct: Option<File>,
    /// Opened without `O_DIRECT`: hole queries, and reads after a fallback.
    buffered: File,
    use_buffered: AtomicBool,
    holes: AtomicBool,
}

impl Source {
    /// Opens `path` for reading and finds its size (`BLKGETSIZE64` for a block device).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let io = |op, source| SourceError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let buffered = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|e| io("open", e))?;
        let meta = buffered.metadata().map_err(|e| io("stat", e))?;
        let size = if meta.file_type().is_block_device() {
            block_device_size(&buffered).map_err(|e| io("read the size (BLKGETSIZE64) of", e))?
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(SourceError::Kind {
                path: path.to_owned(),
            });
        };
        let direct = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => None,
            Err(e) => return Err(io("open (O_DIRECT)", e)),
        };
        let source = Self {
            path: path.to_owned(),
            size,
            use_buffered: AtomicBool::new(direct.is_none()),
            direct,
            buffered,
            holes: AtomicBool::new(true),
        };
        if source.use_buffered.load(Ordering::Relaxed) {
            source.announce_fallback("opening it");
        }
        // Sequential reads, used once: don't let them push other pages out of the cache.
        let _ = fadvise(&source.buffered, 0, None, Advice::Sequential);
        Ok(source)
    }

    fn announce_fallback(&self, when: &str) {
        tracing::warn!(
            path = %self.path.display(),
            "the file system refused O_DIRECT when {when}; reading through the page cache (pages are dropped after each read)"
        );
    }

    /// The source's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The parts of `range` that may hold data, rounded out to [`READ_ALIGN`] (and clipped to
    /// the aligned end of `range`). Empty when `range` is entirely a hole. The whole range
    /// when the file cannot report holes.
    pub fn data_segments(&self, range: Range<u64>) -> Result<Vec<Range<u64>>, SourceError> {
        let aligned_end = range.end.next_multiple_of(READ_ALIGN);
        let mut raw = Vec::new();
        let mut pos = range.start;
        while pos < range.end && self.holes.load(Ordering::Relaxed) {
            let data = match seek(&self.buffered, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(Errno::NXIO) => break,
                Err(Errno::INVAL | Errno::OPNOTSUPP) => {
                    self.holes.store(false, Ordering::Relaxed);
                    break;
                }
                Err(e) => return Err(self.io("find data in", e.into())),
            };
            if data >= range.end {
                break;
            }
            let hole = match seek(&self.buffered, SeekFrom::Hole(data)) {
                Ok(h) => h,
                Err(Errno::NXIO) => range.end,
                Err(e) => return Err(self.io("find holes in", e.into())),
            };
            let end = hole.clamp(data + 1, range.end);
            raw.push(data..end);
            pos = end;
        }
        if !self.holes.load(Ordering::Relaxed) {
            return Ok(std::iter::once(range.start..aligned_end).collect());
        }
        let mut out: Vec<Range<u64>> = Vec::with_capacity(raw.len());
        for r in raw {
            let r = r.start / READ_ALIGN * READ_ALIGN..r.end.next_multiple_of(READ_ALIGN).min(aligned_end);
            match out.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        Ok(out)
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> SourceError {
        SourceError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Reads `buf.len()` bytes at `offset` (both aligned to [`READ_ALIGN`], `buf` in aligned
    /// memory), or up to the source's end. Returns the number of bytes read.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, SourceError> {
        let want = buf.len().min(self.size.saturating_sub(offset) as usize);
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let r = match (&self.direct, self.use_buffered.load(Ordering::Relaxed)) {
                (Some(f), false) => match f.read_at(&mut buf[done..], pos) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        if !self.use_buffered.swap(true, Ordering::Relaxed) {
                            self.announce_fallback("reading");
                        }
                        continue;
                    }
                    r => r,
                },
                _ => {
                    let r = self.buffered.read_at(&mut buf[done..], pos);
                    if let Ok(n) = r {
                        let _ = fadvise(
                            &self.buffered,
                            pos,
                            std::num::NonZeroU64::new(n as u64),
                            Advice::DontNeed,
                        );
                    }
                    r
                }
            };
            match r {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io("read", e)),
            }
        }
        if done < want {
            return Err(SourceError::Short {
                path: self.path.clone(),
                at: offset + done as u64,
                size: self.size,
            });
        }
        Ok(done.min(want))
    }
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    // SAFETY: BLKGETSIZE64 is a read ioctl whose argument is a pointer to one u64 that the
    // kernel fills with the device size; `Getter<_, u64>` passes exactly such a pointer.
    let getter = unsafe { Getter::<BLKGETSIZE64, u64>::new() };
    // SAFETY: `file` is an open file descriptor and the getter matches the ioctl's ABI (above).
    let size = unsafe { ioctl(file, getter) }?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn holes_are_reported_and_data_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let size = 1u64 << 20;
        {
            let mut f = File::create(&path).unwrap();
            f.set_len(size).unwrap();
            f.write_all_at(&[1u8; 4096], 256 << 10).unwrap();
            f.flush().unwrap();
        }
        let s = Source::open(&path).unwrap();
        assert_eq!(s.size(), size);
        // A range that is all hole (if the file system reports holes) or the whole range.
        let segs = s.data_segments(0..128 << 10).unwrap();
        assert!(
            segs.is_empty() || (segs.len() == 1 && segs[0] == (0..128 << 10)),
            "{segs:?}"
        );
        let segs = s.data_segments(0..size).unwrap();
        assert!(segs.iter().any(|r| r.contains(&(256 << 10))), "{segs:?}");
        for r in &segs {
            assert_eq!(r.start % READ_ALIGN, 0);
            assert_eq!(r.end % READ_ALIGN, 0);
        }
    }

    #[test]
    fn short_sources_are_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 8192 + 512]).unwrap();
        let s = Source::open(&path).unwrap();
        assert_eq!(s.size(), 8704);
        let mut buf = tern_core::io::AlignedBuf::zeroed(3 * 4096);
        assert_eq!(s.read_at(&mut buf, 0).unwrap(), 8704);
        assert!(buf[..8704].iter().all(|b| *b == 7));
        assert!(!s.data_segments(0..8704).unwrap().is_empty());
    }
}
