//! Tern's shared formats and block I/O.
//!
//! - [`geometry`]: how a disk is cut into chunks (4 MiB by default) and compare blocks.
//! - [`digest`]: BLAKE3 chunk digests, zero detection, per-block chaining values that merge
//!   into the chunk digest without hashing twice.
//! - [`manifest`]: the recovery-point manifest, the one file that describes a point
//!   (byte layout in `docs/formats.md`).
//! - [`changes`]: changed areas of a disk since a point (dirty bitmaps, RBD diffs, CBT).
//! - [`cbt`]: VMware CBT change ids, `QueryChangedDiskAreas` replies onto a change map, the
//!   per-disk change-id book (`docs/vmware-cbt.md`).
//! - [`ids`]: validated host, disk and point identifiers.
//! - [`nbd`]: the NBD wire format (always) and the async NBD client (feature `nbd`) that reads
//!   disks, allocation maps and dirty bitmaps from `qemu-nbd`, QEMU and `nbdkit`.
//! - [`rbd_diff`]: Ceph `rbd export-diff` streams, validated into a change map plus a spool file
//!   (byte layout and Ceph's behaviour in `docs/rbd.md`).
//! - `object` (feature `object`): object mode (chunk store in S3, sessions, retention, GC).
//! - `io` (feature `io`): the block I/O engines (io_uring and portable) used by the gateway to
//!   write volumes and by the restore engine.

pub mod cbt;
pub mod changes;
pub mod digest;
pub mod geometry;
pub mod ids;
#[cfg(feature = "io")]
pub mod io;
pub mod manifest;
pub mod nbd;
#[cfg(feature = "blob")]
pub mod object;
pub mod protocol;
pub mod rbd_diff;
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
