//! Tern agent: reads a host's disks, finds what changed since the last recovery point and
//! streams it to a target (the Cloud Sync Gateway's S3 API, or a local directory), then commits
//! one recovery point for all the host's disks.
//!
//! - [`source`]: block devices and image files, read with `O_DIRECT`, holes skipped;
//!   [`nbd`]: NBD exports (the agent as a sync proxy) with QEMU dirty bitmaps; [`rbd`]: Ceph RBD
//!   images through snapshot diffs; [`qmp`]: live QEMU guests (point-in-time exports through
//!   QMP); [`disk`]: the sources behind one interface, and their change trackers.
//! - [`plan`]: which extents of a chunk to send, from the baseline (what the volume held at the
//!   last point), the landed extents (written since) and the current bytes.
//! - [`blockstate`]: the per-disk block-values file kept between syncs; [`state`]: the rest of
//!   the state directory (sync in progress, lock, trusted gateways).
//! - [`target`]: the [`target::Target`] trait, the gateway and directory implementations;
//!   [`tls`]: certificate pinning.
//! - [`engine`]: one sync, end to end; [`schedule`]: `run --every`.
//!
//! Formats are documented in `docs/formats.md` ("Agent state"), the protocol in
//! `docs/protocol.md`.

pub mod bandwidth;
pub mod blockstate;
pub mod bufpool;
pub mod disk;
pub mod engine;
pub mod nbd;
pub mod plan;
pub mod progress;
pub mod qmp;
pub mod rbd;
pub mod schedule;
pub mod source;
pub mod state;
pub mod target;
pub mod units;

/// Certificate pinning (shared with the gateway CLI and tests).
pub use tern_core::tls;

/// Displays an error and its sources on one line (shared with the gateway).
pub use tern_core::error_chain;
