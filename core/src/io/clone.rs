//! Cloning a volume file (the local provider's snapshots): reflink where the file system has
//! it, else a sparse-aware copy. Blocking: call from `spawn_blocking`.
//!
//! Both write `dst` + ".tmp", fsync it, rename it to `dst` (refusing to replace an existing
//! `dst`) and fsync the parent directory, so a crash leaves either no `dst` or a complete one.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, RenameFlags, SeekFrom};
use rustix::io::Errno;

use super::IoError;

/// How [`clone_file`] made the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloneMethod {
    /// `FICLONE`: the copy shares the source's extents (copy-on-write), instantly.
    Reflink,
    /// Data segments copied with `copy_file_range`; holes stay holes.
    SparseCopy,
}

impl fmt::Display for CloneMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloneMethod::Reflink => "reflink",
            CloneMethod::SparseCopy => "sparse copy",
        })
    }
}

/// Creates `dst` (which must not exist) as a copy of the regular file `src`: `FICLONE` first,
/// and a sparse copy where the file system cannot reflink (`EOPNOTSUPP`, `EXDEV`, `EINVAL`,
/// `ENOTTY`).
pub fn clone_file(src: &Path, dst: &Path) -> Result<CloneMethod, IoError> {
    copy_via_tmp(src, dst, true)
}

/// Like [`clone_file`] but never reflinks: always the sparse copy.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<(), IoError> {
    copy_via_tmp(src, dst, false).map(|_| ())
}

pub(crate) fn tmp_path(dst: &Path) -> PathBuf {
    let mut s = OsString::from(dst.as_os_str());
    s.push(".tmp");
    PathBuf::from(s)
}

fn copy_via_tmp(src: &Path, dst: &Path, reflink: bool) -> Result<CloneMethod, IoError> {
    let exists = || IoError::CloneExists {
        src: src.to_owned(),
        dst: dst.to_owned(),
    };
    match fs::symlink_metadata(dst) {
        Ok(_) => return Err(exists()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(IoError::CloneCreate {
                path: dst.to_owned(),
                source,
            });
        }
    }
    let src_err = |source: io::Error| IoError::CloneSource {
        path: src.to_owned(),
        source,
    };
    let src_file = File::open(src).map_err(src_err)?;
    let meta = src_file.metadata().map_err(src_err)?;
    if !meta.is_file() {
        return Err(src_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let tmp = tmp_path(dst);
    // A leftover temporary file from an interrupted clone is ours to overwrite.
    let tmp_file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|source| IoError::CloneCreate {
            path: tmp.clone(),
            source,
        })?;
    let result = fill_and_commit(src, &src_file, &meta, &tmp, &tmp_file, dst, reflink);
    if result.is_err() {
        // Best effort: the error being returned matters more than a leftover temporary file.
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn fill_and_commit(
    src: &Path,
    src_file: &File,
    meta: &fs::Metadata,
    tmp: &Path,
    tmp_file: &File,
    dst: &Path,
    reflink: bool,
) -> Result<CloneMethod, IoError> {
    let method = if reflink {
        match rustix::fs::ioctl_ficlone(tmp_file, src_file) {
            Ok(()) => CloneMethod::Reflink,
            Err(Errno::OPNOTSUPP | Errno::XDEV | Errno::INVAL | Errno::NOTTY) => {
                copy_sparse(src, src_file, meta.len(), tmp, tmp_file)?;
                CloneMethod::SparseCopy
            }
            Err(e) => {
                return Err(IoError::CloneCopy {
                    src: src.to_owned(),
                    dst: tmp.to_owned(),
                    offset: 0,
                    len: meta.len(),
                    source: e.into(),
                });
            }
        }
    } else {
        copy_sparse(src, src_file, meta.len(), tmp, tmp_file)?;
        CloneMethod::SparseCopy
    };
    let finish = |source: io::Error| IoError::CloneFinish {
        path: dst.to_owned(),
        source,
    };
    // Same permissions as the source (best effort would hide a real problem: report it).
    tmp_file.set_permissions(meta.permissions()).map_err(finish)?;
    tmp_file.sync_all().map_err(finish)?;
    match rustix::fs::renameat_with(CWD, tmp, CWD, dst, RenameFlags::NOREPLACE) {
        Ok(()) => {}
        Err(Errno::EXIST) => {
            return Err(IoError::CloneExists {
                src: src.to_owned(),
                dst: dst.to_owned(),
            });
        }
        // File systems without RENAME_NOREPLACE: check, then rename.
        Err(Errno::INVAL | Errno::NOSYS) => {
            if fs::symlink_metadata(dst).is_ok() {
                return Err(IoError::CloneExists {
                    src: src.to_owned(),
                    dst: dst.to_owned(),
                });
            }
            fs::rename(tmp, dst).map_err(finish)?;
        }
        Err(e) => return Err(finish(e.into())),
    }
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent).and_then(|d| d.sync_all()).map_err(finish)?;
    Ok(method)
}

/// Copies the data segments of `src` (found with `SEEK_DATA`/`SEEK_HOLE`) into the empty
/// `dst`, then sets `dst`'s length to `size`, so holes stay holes.
fn copy_sparse(src: &Path, src_file: &File, size: u64, dst: &Path, dst_file: &File) -> Result<(), IoError> {
    let copy_err = |offset: u64, len: u64, source: io::Error| IoError::CloneCopy {
        src: src.to_owned(),
        dst: dst.to_owned(),
        offset,
        len,
        source,
    };
    let mut pos = 0;
    let mut use_cfr = true;
    while pos < size {
        let data = match rustix::fs::seek(src_file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // No data after `pos`.
            Err(Errno::NXIO) => break,
            // SEEK_DATA unsupported: treat the rest as data.
            Err(Errno::INVAL | Errno::OPNOTSUPP) => pos,
            Err(e) => return Err(copy_err(pos, size - pos, e.into())),
        };
        if data >= size {
            break;
        }
        let hole = match rustix::fs::seek(src_file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(size),
            Err(Errno::NXIO | Errno::INVAL | Errno::OPNOTSUPP) => size,
            Err(e) => return Err(copy_err(data, size - data, e.into())),
        };
        copy_range(src_file, dst_file, data, hole - data, &mut use_cfr)
            .map_err(|e| copy_err(data, hole - data, e))?;
        pos = hole;
    }
    dst_file.set_len(size).map_err(|e| copy_err(0, size, e))
}

/// Copies `len` bytes at `offset` of `src` to the same offset of `dst`: `copy_file_range`, or
/// `pread`/`pwrite` where that is not supported (`*use_cfr` remembers it).
fn copy_range(src: &File, dst: &File, offset: u64, len: u64, use_cfr: &mut bool) -> io::Result<()> {
    let end = offset + len;
    let mut pos = offset;
    while *use_cfr && pos < end {
        let mut off_in = pos;
        let mut off_out = pos;
        let chunk = usize::try_from(end - pos).unwrap_or(usize::MAX).min(1 << 30);
        match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => pos += n as u64,
            Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) => *use_cfr = false,
            Err(e) => return Err(e.into()),
        }
    }
    if pos == end {
        return Ok(());
    }
    let mut buf = vec![0u8; (1 << 20).min(usize::try_from(end - pos).unwrap_or(usize::MAX))];
    while pos < end {
        let n = usize::try_from(end - pos).unwrap_or(usize::MAX).min(buf.len());
        let got = src.read_at(&mut buf[..n], pos)?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        dst.write_all_at(&buf[..got], pos)?;
        pos += got as u64;
    }
    Ok(())
}
