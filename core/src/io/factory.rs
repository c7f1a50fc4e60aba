//! The single entry point: choosing the engine ([`resolve`]) and opening a [`Volume`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Once, OnceLock};

use rustix::fs::{AtFlags, StatxFlags};

use super::arena::Arena;
use super::engine::{Engine, Files};
use super::portable::PortableEngine;
use super::uring::UringEngine;
use super::volume::{DioAlign, Volume};
use super::{EngineChoice, EngineConfig, EngineKind, IoError, probe_io_uring};

/// Environment variable that overrides the configured engine for the whole process
/// (`io_uring` or `portable`; `auto` or empty means no override).
pub const ENGINE_ENV: &str = "TERN_IO_ENGINE";

/// 0: nothing resolved yet; 1: io_uring; 2: portable.
static ENGINE_IN_USE: AtomicU8 = AtomicU8::new(0);

/// The `TERN_IO_ENGINE` override, read once.
fn env_override() -> Result<Option<EngineChoice>, IoError> {
    static ENV: OnceLock<Result<Option<EngineChoice>, String>> = OnceLock::new();
    let r = ENV.get_or_init(|| match std::env::var_os(ENGINE_ENV) {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Some("" | "auto") => Ok(None),
            Some("io_uring") => Ok(Some(EngineChoice::IoUring)),
            Some("portable") => Ok(Some(EngineChoice::Portable)),
            _ => Err(v.to_string_lossy().into_owned()),
        },
    });
    r.clone().map_err(|value| IoError::EngineEnv { value })
}

/// Turns a configured choice into the engine to use. `TERN_IO_ENGINE` overrides `choice`.
/// `Auto` takes io_uring when [`probe_io_uring`] succeeds, else the portable engine, with one
/// warning per process saying why; an explicit `IoUring` that does not work is an error (never a
/// silent fallback).
pub fn resolve(choice: EngineChoice) -> Result<EngineKind, IoError> {
    let choice = env_override()?.unwrap_or(choice);
    let kind = match choice {
        EngineChoice::Auto => match probe_io_uring() {
            Ok(()) => EngineKind::IoUring,
            Err(e) => {
                static WARNED: Once = Once::new();
                WARNED.call_once(|| {
                    tracing::warn!(
                        reason = %crate::ErrorChain(&e),
                        "io_uring is unavailable; using the portable I/O engine"
                    );
                });
                EngineKind::Portable
            }
        },
        EngineChoice::IoUring => {
            probe_io_uring()?;
            EngineKind::IoUring
        }
        EngineChoice::Portable => EngineKind::Portable,
    };
    let code = match kind {
        EngineKind::IoUring => 1,
        EngineKind::Portable => 2,
    };
    ENGINE_IN_USE.store(code, Ordering::Relaxed);
    Ok(kind)
}

/// The engine chosen by the last [`resolve`] (for the `/metrics` gauge); `None` before any.
pub fn engine_in_use() -> Option<EngineKind> {
    match ENGINE_IN_USE.load(Ordering::Relaxed) {
        1 => Some(EngineKind::IoUring),
        2 => Some(EngineKind::Portable),
        _ => None,
    }
}

/// O_DIRECT alignment from `statx(STATX_DIOALIGN)`, if the file supports O_DIRECT.
fn dio_align(file: &File) -> Option<DioAlign> {
    let stx = rustix::fs::statx(file.as_fd(), "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN).ok()?;
    if stx.stx_mask & StatxFlags::DIOALIGN.bits() == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(DioAlign {
        offset: u64::from(stx.stx_dio_offset_align),
        mem: (stx.stx_dio_mem_align as usize).max(1),
    })
}

/// `BLKGETSIZE64`: a block device's size in bytes.
fn block_device_size(file: &File) -> io::Result<u64> {
    const BLKGETSIZE64: rustix::ioctl::Opcode = rustix::ioctl::opcode::read::<u64>(0x12, 114);
    // SAFETY: BLKGETSIZE64 writes one u64, the getter's output type.
    let getter = unsafe { rustix::ioctl::Getter::<BLKGETSIZE64, u64>::new() };
    // SAFETY: `file` is an open block device and `getter` matches BLKGETSIZE64.
    unsafe { rustix::ioctl::ioctl(file.as_fd(), getter) }.map_err(io::Error::from)
}

impl Volume {
    /// Opens a regular file or block device as a volume, with the engine [`resolve`] picks for
    /// `cfg.engine`. O_DIRECT is used when `cfg.direct` and `statx(STATX_DIOALIGN)` reports
    /// support; a second, buffered descriptor serves unaligned ranges. Logs one info line
    /// saying which engine and whether O_DIRECT is on.
    pub fn open(path: &Path, writable: bool, cfg: &EngineConfig) -> Result<Volume, IoError> {
        cfg.validate()?;
        let kind = resolve(cfg.engine)?;
        let open_err = |source: io::Error| IoError::Open {
            path: path.to_owned(),
            source,
        };
        let mut opts = OpenOptions::new();
        opts.read(true).write(writable);
        let buffered = opts.open(path).map_err(open_err)?;
        let stat_err = |source: io::Error| IoError::Stat {
            path: path.to_owned(),
            source,
        };
        let meta = buffered.metadata().map_err(stat_err)?;
        let (size, block_device) = if meta.file_type().is_file() {
            (meta.len(), false)
        } else if meta.file_type().is_block_device() {
            (block_device_size(&buffered).map_err(stat_err)?, true)
        } else {
            return Err(IoError::NotAVolume {
                path: path.to_owned(),
            });
        };
        let mut dio = if cfg.direct { dio_align(&buffered) } else { None };
        let direct = match dio {
            Some(_) => match opts.custom_flags(libc::O_DIRECT).open(path) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "statx reports O_DIRECT support but opening with O_DIRECT failed; using buffered I/O"
                    );
                    dio = None;
                    None
                }
            },
            None => None,
        };
        let files = Arc::new(Files { direct, buffered });
        let arena = Arena::new(cfg.buffer_bytes)?;
        let engine = match kind {
            EngineKind::IoUring => Engine::Uring(UringEngine::start(
                path,
                Arc::clone(&files),
                Arc::clone(&arena),
                cfg.queue_depth,
            )?),
            EngineKind::Portable => {
                Engine::Portable(PortableEngine::new(Arc::clone(&files), cfg.queue_depth))
            }
        };
        tracing::info!(
            path = %path.display(),
            engine = %kind,
            direct = dio.is_some(),
            dio_align = dio.map_or(0, |d| d.offset),
            size,
            writable,
            queue_depth = cfg.queue_depth,
            buffer_bytes = cfg.buffer_bytes,
            "opened volume"
        );
        Ok(Volume {
            engine,
            path: path.to_owned(),
            size,
            writable,
            block_device,
            dio,
            arena,
            files,
            dio_refused: AtomicBool::new(false),
        })
    }
}
