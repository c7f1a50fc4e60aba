//! Errors of the block I/O engines.

use std::io;
use std::path::PathBuf;

/// What went wrong, coarsely: the gateway maps this to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoErrorKind {
    /// The range lies (partly) past the end of the volume.
    OutOfBounds,
    /// A bad argument: a buffer too large, a bad configuration, a write to a read-only volume,
    /// a path that is neither a regular file nor a block device.
    InvalidInput,
    /// The engine or operation is not available here (io_uring missing or disabled).
    Unsupported,
    /// The destination already exists.
    AlreadyExists,
    /// The kernel reported an I/O error, or the data ended early.
    Io,
}

/// An error of the block I/O layer. Messages name the path, offset and length; the OS error is
/// the [`source`](std::error::Error::source), not repeated in the message.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("io_uring is unavailable")]
    UringUnavailable {
        #[source]
        source: io::Error,
    },
    #[error("TERN_IO_ENGINE={value:?} is neither \"io_uring\" nor \"portable\"")]
    EngineEnv { value: String },
    #[error("invalid I/O engine configuration: {reason}")]
    Config { reason: String },
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the size and type of {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotAVolume { path: PathBuf },
    #[error("setting up the io_uring engine for {path}")]
    RingSetup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("allocating the I/O buffer arena of {bytes} bytes")]
    Arena {
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("an I/O buffer of {len} bytes is larger than this volume's arena can provide ({max} bytes)")]
    BufferTooLarge { len: usize, max: usize },
    #[error("{path} is open read-only")]
    ReadOnly { path: PathBuf },
    #[error("range at {offset} of {len} bytes ends past the end of {path} ({size} bytes)")]
    OutOfBounds {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("writing {len} bytes at offset {offset} of {path}")]
    Write {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("reading {len} bytes at offset {offset} of {path}")]
    Read {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("reading {len} bytes at offset {offset} of {path}: the data ends after {got} bytes")]
    ShortRead {
        path: PathBuf,
        offset: u64,
        len: u64,
        got: u64,
    },
    #[error("zeroing {len} bytes at offset {offset} of {path}")]
    Zero {
        path: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("flushing {path} to stable storage")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cloning {src}: {dst} already exists")]
    CloneExists { src: PathBuf, dst: PathBuf },
    #[error("opening the clone source {path}")]
    CloneSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the clone {path}")]
    CloneCreate {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("copying {len} bytes at offset {offset} of {src} to {dst}")]
    CloneCopy {
        src: PathBuf,
        dst: PathBuf,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("finishing the clone {path}")]
    CloneFinish {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl IoError {
    /// The coarse kind of this error.
    pub fn kind(&self) -> IoErrorKind {
        match self {
            IoError::UringUnavailable { .. } => IoErrorKind::Unsupported,
            IoError::EngineEnv { .. }
            | IoError::Config { .. }
            | IoError::NotAVolume { .. }
            | IoError::BufferTooLarge { .. }
            | IoError::ReadOnly { .. } => IoErrorKind::InvalidInput,
            IoError::OutOfBounds { .. } => IoErrorKind::OutOfBounds,
            IoError::CloneExists { .. } => IoErrorKind::AlreadyExists,
            IoError::Open { .. }
            | IoError::Stat { .. }
            | IoError::RingSetup { .. }
            | IoError::Arena { .. }
            | IoError::Write { .. }
            | IoError::Read { .. }
            | IoError::ShortRead { .. }
            | IoError::Zero { .. }
            | IoError::Sync { .. }
            | IoError::CloneSource { .. }
            | IoError::CloneCreate { .. }
            | IoError::CloneCopy { .. }
            | IoError::CloneFinish { .. } => IoErrorKind::Io,
        }
    }
}

/// The error a request gets when the engine stopped before answering it (the I/O thread died).
pub(crate) fn engine_stopped() -> io::Error {
    io::Error::other("the I/O engine stopped before completing the operation")
}
