//! Engine kinds, the operator's choice and the per-volume configuration.

use std::fmt;
use std::str::FromStr;

use super::IoError;

/// The engine a volume actually uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// One io_uring per volume, driven by a dedicated I/O thread.
    IoUring,
    /// Positional `pread`/`pwrite` on tokio's blocking threads.
    Portable,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Portable => "portable",
        })
    }
}

/// Which engine to use, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EngineChoice {
    /// io_uring when it works here, else the portable engine (with one warning saying why).
    #[default]
    Auto,
    /// io_uring or an error: never falls back.
    IoUring,
    /// The portable engine.
    Portable,
}

impl fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineChoice::Auto => "auto",
            EngineChoice::IoUring => "io_uring",
            EngineChoice::Portable => "portable",
        })
    }
}

impl FromStr for EngineChoice {
    type Err = IoError;
    fn from_str(s: &str) -> Result<Self, IoError> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "io_uring" => Ok(EngineChoice::IoUring),
            "portable" => Ok(EngineChoice::Portable),
            other => Err(IoError::Config {
                reason: format!("unknown engine {other:?} (expected auto, io_uring or portable)"),
            }),
        }
    }
}

/// Default number of operations in flight per volume.
pub const DEFAULT_QUEUE_DEPTH: u32 = 32;
/// Default size of a volume's buffer arena (32 MiB).
pub const DEFAULT_BUFFER_BYTES: usize = 32 << 20;
/// Largest buffer [`Volume::alloc`](super::Volume::alloc) hands out (16 MiB).
pub const MAX_IO_BUF: usize = 16 << 20;
/// Largest arena accepted (1 GiB, io_uring's limit for one registered buffer).
pub const MAX_BUFFER_BYTES: usize = 1 << 30;
/// Largest queue depth accepted.
pub const MAX_QUEUE_DEPTH: u32 = 4096;

/// How volumes are opened.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Which engine to use (`auto`, `io_uring` or `portable`). The environment variable
    /// `TERN_IO_ENGINE` overrides it process-wide.
    pub engine: EngineChoice,
    /// Operations in flight per volume (1 to 4096; default 32).
    pub queue_depth: u32,
    /// Size of each volume's buffer arena in bytes, a multiple of 4096 (default 32 MiB). Buffers
    /// are carved from it in power-of-two runs of 4 KiB pages, so a power of two wastes least.
    pub buffer_bytes: usize,
    /// Use O_DIRECT where the file system supports it (default true).
    pub direct: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            engine: EngineChoice::Auto,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            direct: true,
        }
    }
}

impl EngineConfig {
    pub(crate) fn validate(&self) -> Result<(), IoError> {
        if self.queue_depth == 0 || self.queue_depth > MAX_QUEUE_DEPTH {
            return Err(IoError::Config {
                reason: format!(
                    "queue_depth {} is not between 1 and {MAX_QUEUE_DEPTH}",
                    self.queue_depth
                ),
            });
        }
        if self.buffer_bytes < super::arena::FRAME
            || !self.buffer_bytes.is_multiple_of(super::arena::FRAME)
            || self.buffer_bytes > MAX_BUFFER_BYTES
        {
            return Err(IoError::Config {
                reason: format!(
                    "buffer_bytes {} is not a multiple of 4096 between 4096 and 1 GiB",
                    self.buffer_bytes
                ),
            });
        }
        Ok(())
    }
}
