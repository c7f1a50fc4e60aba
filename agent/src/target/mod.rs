//! Where a host's disks are synced to: one trait, two implementations.
//!
//! - [`gateway::GatewayTarget`]: the Cloud Sync Gateway's S3 API (`docs/protocol.md`), over
//!   HTTPS with the gateway's certificate pinned.
//! - [`dir::DirTarget`]: a local directory (`dir:/path`), for quick local copies and tests. It
//!   follows the same rules as the gateway: landed records name only durable data, and a point
//!   exists once its manifest does.
//!
//! A target serves one host. Every method is safe to retry: `begin` and `commit` are
//! idempotent, extents are written at fixed offsets.

pub mod dir;
pub mod gateway;
pub mod object;

use std::future::Future;

use bytes::Bytes;
use tern_core::protocol::{HostState, LandedExtent, SyncPlan};
use tern_core::{DiskId, Manifest, PointId};

/// A committed point as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointEntry {
    /// The point.
    pub id: PointId,
    /// Size of its manifest in bytes.
    pub manifest_len: u64,
    /// When the target recorded it, Unix milliseconds.
    pub modified_unix_ms: u64,
}

/// One extent of a batch ([`Target::put_batch`]).
#[derive(Debug, Clone)]
pub struct BatchExtent {
    /// Byte offset on the disk.
    pub offset: u64,
    /// What to write there.
    pub body: BatchBody,
}

/// What a batch extent writes.
#[derive(Debug, Clone)]
pub enum BatchBody {
    /// These bytes, whose BLAKE3 digest is given.
    Data(Bytes, tern_core::Digest),
    /// This many zero bytes.
    Zero(u64),
}

impl BatchExtent {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match &self.body {
            BatchBody::Data(b, _) => b.len() as u64,
            BatchBody::Zero(n) => *n,
        }
    }

    /// Whether the extent is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What kind of failure a target reported: it decides whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Network trouble, a timeout or a server-side (5xx) error: retry later.
    Transient,
    /// The object does not exist.
    NotFound,
    /// Refused (bad credentials, access denied, invalid request): retrying will not help.
    Permanent,
}

/// A target operation that failed.
#[derive(Debug, thiserror::Error)]
#[error("failed to {op}")]
pub struct TargetError {
    /// What was being done (a verb phrase).
    pub op: String,
    /// The kind of failure.
    pub kind: ErrorKind,
    /// The cause.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl TargetError {
    /// A new error.
    pub fn new(
        op: impl Into<String>,
        kind: ErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            op: op.into(),
            kind,
            source: source.into(),
        }
    }

    /// True when retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

/// A storage a host's disks are synced to.
pub trait Target: Send + Sync + 'static {
    /// A short description for logs (`https://gw:8443/web-01`, `dir:/backups/web-01`).
    fn describe(&self) -> String;

    /// True when the target stores whole chunks by id (object mode) rather than extents at
    /// offsets: the engine then sends every changed non-zero chunk whole, and no zero extents.
    fn whole_chunks(&self) -> bool {
        false
    }

    /// The key of keyed BLAKE3 when chunk ids must be keyed (an encrypted object store).
    fn id_key(&self) -> Option<[u8; 32]> {
        None
    }

    /// The host's state: open sync, latest point, known disks.
    fn state(&self) -> impl Future<Output = Result<HostState, TargetError>> + Send;

    /// Opens (or re-opens) sync `sync` for the disks of `plan`.
    fn begin(&self, sync: &PointId, plan: &SyncPlan) -> impl Future<Output = Result<(), TargetError>> + Send;

    /// The extents durably written to `disk`'s volume since the last committed point, in the
    /// order they were recorded. Empty for a disk the target does not know.
    fn landed(&self, disk: &DiskId) -> impl Future<Output = Result<Vec<LandedExtent>, TargetError>> + Send;

    /// Writes `body` at `offset` of `disk`'s volume; `digest` is the BLAKE3 of `body`.
    fn put_extent(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        body: Bytes,
        digest: tern_core::Digest,
    ) -> impl Future<Output = Result<(), TargetError>> + Send;

    /// Zeroes `len` bytes at `offset` of `disk`'s volume.
    fn put_zero(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<(), TargetError>> + Send;

    /// Writes several extents of `disk`, in increasing offset order without overlap, as
    /// [`Target::put_extent`] and [`Target::put_zero`] would. A target that can take them in one
    /// request (the gateway) does: this saves the per-request cost of small extents.
    fn put_batch(
        &self,
        sync: &PointId,
        disk: &DiskId,
        extents: Vec<BatchExtent>,
    ) -> impl Future<Output = Result<(), TargetError>> + Send {
        async move {
            for x in extents {
                put_one(self, sync, disk, x).await?;
            }
            Ok(())
        }
    }

    /// Commits the sync: answers once the point described by `manifest` exists.
    fn commit(
        &self,
        sync: &PointId,
        manifest: &Manifest,
    ) -> impl Future<Output = Result<(), TargetError>> + Send;

    /// The manifest of a committed point.
    fn get_point(&self, point: &PointId) -> impl Future<Output = Result<Manifest, TargetError>> + Send;

    /// The committed points, oldest first.
    fn list_points(&self) -> impl Future<Output = Result<Vec<PointEntry>, TargetError>> + Send;
}

/// Sends one batch extent as a single [`Target::put_extent`] or [`Target::put_zero`].
async fn put_one<T: Target + ?Sized>(
    target: &T,
    sync: &PointId,
    disk: &DiskId,
    x: BatchExtent,
) -> Result<(), TargetError> {
    match x.body {
        BatchBody::Data(body, digest) => target.put_extent(sync, disk, x.offset, body, digest).await,
        BatchBody::Zero(len) => target.put_zero(sync, disk, x.offset, len).await,
    }
}

/// One of the target implementations, chosen at run time (`--target`).
#[derive(Debug, Clone)]
pub enum AnyTarget {
    /// A gateway's S3 API.
    Gateway(gateway::GatewayTarget),
    /// A local directory.
    Dir(dir::DirTarget),
    /// An S3 bucket in object mode.
    Object(object::ObjectTarget),
}

macro_rules! delegate {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            AnyTarget::Gateway($t) => $e,
            AnyTarget::Dir($t) => $e,
            AnyTarget::Object($t) => $e,
        }
    };
}

impl Target for AnyTarget {
    fn describe(&self) -> String {
        delegate!(self, t => t.describe())
    }
    fn whole_chunks(&self) -> bool {
        delegate!(self, t => t.whole_chunks())
    }
    fn id_key(&self) -> Option<[u8; 32]> {
        delegate!(self, t => t.id_key())
    }
    async fn state(&self) -> Result<HostState, TargetError> {
        delegate!(self, t => t.state().await)
    }
    async fn begin(&self, sync: &PointId, plan: &SyncPlan) -> Result<(), TargetError> {
        delegate!(self, t => t.begin(sync, plan).await)
    }
    async fn landed(&self, disk: &DiskId) -> Result<Vec<LandedExtent>, TargetError> {
        delegate!(self, t => t.landed(disk).await)
    }
    async fn put_extent(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        body: Bytes,
        digest: tern_core::Digest,
    ) -> Result<(), TargetError> {
        delegate!(self, t => t.put_extent(sync, disk, offset, body, digest).await)
    }
    async fn put_zero(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        len: u64,
    ) -> Result<(), TargetError> {
        delegate!(self, t => t.put_zero(sync, disk, offset, len).await)
    }
    async fn put_batch(
        &self,
        sync: &PointId,
        disk: &DiskId,
        extents: Vec<BatchExtent>,
    ) -> Result<(), TargetError> {
        delegate!(self, t => t.put_batch(sync, disk, extents).await)
    }
    async fn commit(&self, sync: &PointId, manifest: &Manifest) -> Result<(), TargetError> {
        delegate!(self, t => t.commit(sync, manifest).await)
    }
    async fn get_point(&self, point: &PointId) -> Result<Manifest, TargetError> {
        delegate!(self, t => t.get_point(point).await)
    }
    async fn list_points(&self) -> Result<Vec<PointEntry>, TargetError> {
        delegate!(self, t => t.list_points().await)
    }
}
