//! Tern's shared formats and block I/O.
//!
//! - [`geometry`]: how a disk is cut into chunks (4 MiB by default) and compare blocks.
//! - [`digest`]: BLAKE3 chunk digests, zero detection, per-block chaining values that merge
//!   into the chunk digest without hashing twice.
//! - [`manifest`]: the recovery-point manifest, the one file that describes a point
//!   (byte layout in `docs/formats.md`).
//! - [`ids`]: validated host, disk and point identifiers.
//! - `object` (feature `object`): object mode (chunk store in S3, sessions, retention, GC).
//! - `io` (feature `io`): the block I/O engines (io_uring and portable) used by the gateway to
//!   write volumes and by the restore engine.

pub mod digest;
pub mod geometry;
pub mod ids;
#[cfg(feature = "io")]
pub mod io;
pub mod manifest;
#[cfg(feature = "blob")]
pub mod object;
pub mod protocol;
#[cfg(feature = "tls")]
pub mod tls;

pub use digest::Digest;

/// Displays an error and its sources, `: `-separated, for one-line logs and messages.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// [`ErrorChain`] as a string.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    ErrorChain(e).to_string()
}
pub use geometry::{ChunkGeometry, GeometryError};
pub use ids::{DiskId, HostId, IdError, PointId};
pub use manifest::{ChunkRef, DiskManifest, Manifest, ManifestError};
