//! Block mode: the gateway's volumes, the open sync of each host, landed extents and commits.
//!
//! This is the part that decides what a request means; `s3.rs` only translates the S3 API to
//! these calls. Concurrency per host: extent writes hold the host's lock shared, `begin` and
//! `commit` hold it exclusively, so no extent lands while a commit snapshots the volumes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tern_core::io::{EngineConfig, IoBuf, Volume};
use tern_core::manifest::{ChunkRef, Manifest};
use tern_core::protocol::{
    DiskState, HostState, LandedExtent, LandedKind, PlannedDisk, PointSummary, SyncPlan, UNKNOWN_DIGEST,
};
use tern_core::{Digest, DiskId, GeometryError, HostId, PointId};
use tokio::sync::{RwLock, mpsc, oneshot};
use tracing::{info, warn};

use crate::db::{DbError, HostRecord, LandedRecord, MetaDb, OpenSync, PointRecord, SnapshotRef};
use crate::metrics::{EngineLabel, Metrics};
use crate::provider::{CloudProvider, ProviderError};

/// What went wrong, classified for the S3 error code (see `docs/protocol.md`).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("host {0} is not known to this gateway")]
    NoSuchHost(HostId),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("extent refused")]
    Geometry(#[from] GeometryError),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("body does not match its digest {expected} (got {actual})")]
    BadDigest { expected: Digest, actual: Digest },
    #[error("body is longer than the {0} bytes announced")]
    TooLarge(u64),
    #[error("body ended after {got} of {expected} bytes")]
    Incomplete { got: u64, expected: u64 },
    #[error("no such {0}")]
    NotFound(String),
    #[error("metadata DB")]
    Db(#[from] DbError),
    #[error("cloud provider")]
    Provider(#[from] ProviderError),
    #[error("volume I/O")]
    Io(#[from] tern_core::io::IoError),
    #[error("receiving the body")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("recording landed extents failed: {0}")]
    Landed(String),
    #[error("gateway is shutting down")]
    ShuttingDown,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug)]
struct HostInner {
    rec: HostRecord,
    volumes: HashMap<DiskId, Arc<Volume>>,
}

#[derive(Debug)]
struct HostRuntime {
    id: HostId,
    inner: RwLock<HostInner>,
}

enum LandedMsg {
    /// A write completed: record it once its volume is fdatasynced (batched).
    Record(LandedRecord, Arc<Volume>),
    /// Writes are about to start: record them as unknown content, durably, before they start.
    Intent(Vec<LandedRecord>, oneshot::Sender<Result<(), String>>),
    /// Make everything queued so far durable and recorded.
    Flush(oneshot::Sender<Result<(), String>>),
}

/// Landed batching settings.
#[derive(Debug, Clone, Copy)]
pub struct LandedBatching {
    /// Longest a record waits.
    pub interval: Duration,
    /// Most records per batch.
    pub max: usize,
}

/// The block store of a gateway.
#[derive(Debug)]
pub struct BlockStore {
    db: MetaDb,
    provider: Arc<dyn CloudProvider>,
    io: EngineConfig,
    hosts: std::sync::Mutex<HashMap<HostId, Arc<HostRuntime>>>,
    landed_tx: mpsc::UnboundedSender<LandedMsgBox>,
    metrics: Arc<Metrics>,
}

/// Boxed so the Debug derive of [`BlockStore`] needs nothing from the message type.
struct LandedMsgBox(LandedMsg);

impl std::fmt::Debug for LandedMsgBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LandedMsg")
    }
}

/// An extent body being received: the caller fills it from the network.
#[derive(Debug)]
pub struct ExtentTarget {
    host: Arc<HostRuntime>,
    sync: PointId,
    disk: DiskId,
    offset: u64,
    volume: Arc<Volume>,
    /// The buffer to fill, exactly the extent's length.
    pub buf: IoBuf,
}

/// A batch of extents of one disk being received: the caller fills the buffers of its data
/// extents from the network and checks their digests before [`BlockStore::write_batch`].
#[derive(Debug)]
pub struct BatchTarget {
    host: Arc<HostRuntime>,
    sync: PointId,
    disk: DiskId,
    volume: Arc<Volume>,
    /// The extents, in offset order.
    extents: Vec<LandedExtent>,
    /// One buffer per data extent, in the order of `extents`, each exactly its length.
    pub bufs: Vec<IoBuf>,
}

impl BatchTarget {
    /// The digests the data extents must have, in the order of `bufs`.
    pub fn digests(&self) -> impl Iterator<Item = Digest> + '_ {
        self.extents.iter().filter_map(|e| match e.kind {
            LandedKind::Data(d) => Some(d),
            LandedKind::Zero => None,
        })
    }
}

impl BlockStore {
    /// A block store over `db` and `provider`; spawns the landed-batch task.
    pub fn new(
        db: MetaDb,
        provider: Arc<dyn CloudProvider>,
        io: EngineConfig,
        batching: LandedBatching,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let store = Arc::new(Self {
            db: db.clone(),
            provider,
            io,
            hosts: std::sync::Mutex::new(HashMap::new()),
            landed_tx: tx,
            metrics: metrics.clone(),
        });
        tokio::spawn(landed_task(db, rx, batching, metrics));
        store
    }

    /// The metadata DB.
    pub fn db(&self) -> &MetaDb {
        &self.db
    }

    fn host(&self, id: &HostId) -> Result<Arc<HostRuntime>, BlockError> {
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = hosts.get(id) {
            return Ok(h.clone());
        }
        let rec = self
            .db
            .host(id)?
            .ok_or_else(|| BlockError::NoSuchHost(id.clone()))?;
        let h = Arc::new(HostRuntime {
            id: id.clone(),
            inner: RwLock::new(HostInner {
                rec,
                volumes: HashMap::new(),
            }),
        });
        hosts.insert(id.clone(), h.clone());
        Ok(h)
    }

    async fn volume(&self, inner: &mut HostInner, disk: &DiskId) -> Result<Arc<Volume>, BlockError> {
        if let Some(v) = inner.volumes.get(disk) {
            return Ok(v.clone());
        }
        let state = inner
            .rec
            .disks
            .iter()
            .find(|d| &d.id == disk)
            .ok_or_else(|| BlockError::NotFound(format!("disk {disk}")))?;
        let path = self.provider.attach_volume(&state.volume).await?;
        let io = self.io.clone();
        let v = tokio::task::spawn_blocking(move || Volume::open(&path, true, &io))
            .await
            .map_err(|e| BlockError::Body(Box::new(e)))??;
        self.metrics
            .io_engine
            .get_or_create(&EngineLabel {
                engine: v.kind().to_string(),
            })
            .set(1);
        let v = Arc::new(v);
        inner.volumes.insert(disk.clone(), v.clone());
        Ok(v)
    }

    /// `GET state`.
    pub async fn state(&self, host: &HostId) -> Result<HostState, BlockError> {
        let h = self.host(host)?;
        let inner = h.inner.read().await;
        Ok(HostState {
            host: host.clone(),
            open_sync: inner.rec.open_sync.as_ref().map(|s| s.id.clone()),
            latest_point: inner.rec.latest_point.clone(),
            disks: inner.rec.disks.clone(),
        })
    }

    /// `PUT syncs/{sync}/begin`.
    pub async fn begin(&self, host: &HostId, sync: &PointId, plan: SyncPlan) -> Result<(), BlockError> {
        if plan.disks.is_empty() || plan.disks.len() > tern_core::manifest::MAX_DISKS as usize {
            return Err(BlockError::InvalidArgument(
                "a sync plan names 1 to 256 disks".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if !plan.disks.iter().all(|d| seen.insert(d.id.clone())) {
            return Err(BlockError::InvalidArgument(
                "a sync plan names a disk twice".into(),
            ));
        }
        let h = self.host(host)?;
        let mut inner = h.inner.write().await;
        if self.db.point(host, sync)?.is_some() {
            return Err(BlockError::InvalidRequest(format!(
                "point {sync} is already committed"
            )));
        }
        if let Some(open) = &inner.rec.open_sync
            && open.id == *sync
            && open.plan == plan
        {
            return Ok(());
        }
        let mut rec = inner.rec.clone();
        for PlannedDisk { id, geometry } in &plan.disks {
            match rec.disks.iter_mut().find(|d| &d.id == id) {
                Some(d) if d.geometry.chunk_size() != geometry.chunk_size() => {
                    return Err(BlockError::InvalidArgument(format!(
                        "disk {id} is protected with chunk size {}, not {}",
                        d.geometry.chunk_size(),
                        geometry.chunk_size()
                    )));
                }
                Some(d) if d.geometry.size() > geometry.size() => {
                    return Err(BlockError::InvalidArgument(format!(
                        "disk {id} shrank from {} to {} bytes; protect it as a new disk",
                        d.geometry.size(),
                        geometry.size()
                    )));
                }
                Some(d) => {
                    if d.geometry.size() < geometry.size() {
                        self.provider.resize_volume(&d.volume, geometry.size()).await?;
                        inner.volumes.remove(id);
                        info!(host = %host, disk = %id, size = geometry.size(), "volume grown");
                    }
                    d.geometry = *geometry;
                }
                None => {
                    let v = self
                        .provider
                        .create_volume(&format!("{host}.{id}"), geometry.size())
                        .await?;
                    info!(host = %host, disk = %id, volume = %v.id, size = v.size, "volume created");
                    rec.disks.push(DiskState {
                        id: id.clone(),
                        geometry: *geometry,
                        volume: v.id,
                    });
                }
            }
        }
        if let Some(old) = &rec.open_sync
            && old.id != *sync
        {
            info!(host = %host, old = %old.id, new = %sync, "open sync replaced; landed extents carried over");
        }
        rec.open_sync = Some(OpenSync {
            id: sync.clone(),
            plan,
            begun_unix_ms: now_ms(),
        });
        self.db.put_host(host, &rec)?;
        inner.rec = rec;
        self.metrics.syncs_begun.inc();
        info!(host = %host, sync = %sync, "sync begun");
        Ok(())
    }

    fn planned<'a>(
        rec: &'a HostRecord,
        sync: &PointId,
        disk: &DiskId,
    ) -> Result<&'a PlannedDisk, BlockError> {
        let open =
            rec.open_sync.as_ref().filter(|o| o.id == *sync).ok_or_else(|| {
                BlockError::InvalidRequest(format!("sync {sync} is not open; begin it first"))
            })?;
        open.plan
            .disks
            .iter()
            .find(|d| &d.id == disk)
            .ok_or_else(|| BlockError::InvalidArgument(format!("disk {disk} is not in sync {sync}")))
    }

    /// Checks extents (`(offset, len)`) against the open sync and returns their disk's volume.
    /// Takes the host's lock exclusively only the first time a volume is opened.
    async fn extent_volume(
        &self,
        h: &HostRuntime,
        sync: &PointId,
        disk: &DiskId,
        extents: &[(u64, u64)],
    ) -> Result<Arc<Volume>, BlockError> {
        let check = |rec: &HostRecord| -> Result<(), BlockError> {
            let g = Self::planned(rec, sync, disk)?.geometry;
            for &(offset, len) in extents {
                g.check_extent(offset, len)?;
            }
            Ok(())
        };
        {
            let inner = h.inner.read().await;
            check(&inner.rec)?;
            if let Some(v) = inner.volumes.get(disk) {
                return Ok(v.clone());
            }
        }
        let mut inner = h.inner.write().await;
        check(&inner.rec)?;
        self.volume(&mut inner, disk).await
    }

    /// Checks an extent PUT and returns a buffer to receive its body into. `len` is the
    /// announced Content-Length. Waits for buffer memory (backpressure).
    pub async fn prepare_extent(
        &self,
        host: &HostId,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        len: u64,
    ) -> Result<ExtentTarget, BlockError> {
        let h = self.host(host)?;
        let volume = self.extent_volume(&h, sync, disk, &[(offset, len)]).await?;
        let buf = volume.alloc(len as usize).await?;
        Ok(ExtentTarget {
            host: h,
            sync: sync.clone(),
            disk: disk.clone(),
            offset,
            volume,
            buf,
        })
    }

    /// Writes a received, digest-checked extent and queues its landed record.
    pub async fn write_extent(&self, t: ExtentTarget, digest: Digest) -> Result<(), BlockError> {
        let inner = t.host.inner.read().await;
        // The sync may have been replaced while the body was received.
        Self::planned(&inner.rec, &t.sync, &t.disk)?;
        let len = t.buf.len() as u32;
        self.intent(&t.host.id, &t.disk, &[(t.offset, len)]).await?;
        t.volume.write_at(t.buf, t.offset).await?;
        self.metrics.bytes_in.inc_by(u64::from(len));
        self.metrics.extents.inc();
        self.queue_landed(
            &t.host.id,
            &t.disk,
            LandedExtent {
                offset: t.offset,
                len,
                kind: LandedKind::Data(digest),
            },
            t.volume,
        )
    }

    /// Checks a batch (extents decoded by `tern_core::protocol::decode_batch_table`: ordered,
    /// not overlapping) and returns buffers for its data extents, taken together so that a
    /// batch never holds buffer memory while it waits for more. Waits for buffer memory
    /// (backpressure).
    pub async fn prepare_batch(
        &self,
        host: &HostId,
        sync: &PointId,
        disk: &DiskId,
        extents: Vec<LandedExtent>,
    ) -> Result<BatchTarget, BlockError> {
        let h = self.host(host)?;
        let ranges: Vec<(u64, u64)> = extents.iter().map(|e| (e.offset, u64::from(e.len))).collect();
        let volume = self.extent_volume(&h, sync, disk, &ranges).await?;
        let lens: Vec<usize> = extents
            .iter()
            .filter(|e| matches!(e.kind, LandedKind::Data(_)))
            .map(|e| e.len as usize)
            .collect();
        let bufs = volume.alloc_many(&lens).await?;
        Ok(BatchTarget {
            host: h,
            sync: sync.clone(),
            disk: disk.clone(),
            volume,
            extents,
            bufs,
        })
    }

    /// Writes a received batch whose data extents were all digest-checked: one durable intent
    /// for all its extents, then its writes at once, then their landed records.
    pub async fn write_batch(&self, t: BatchTarget) -> Result<(), BlockError> {
        let inner = t.host.inner.read().await;
        // The sync may have been replaced while the body was received.
        Self::planned(&inner.rec, &t.sync, &t.disk)?;
        let ranges: Vec<(u64, u32)> = t.extents.iter().map(|e| (e.offset, e.len)).collect();
        self.intent(&t.host.id, &t.disk, &ranges).await?;
        let mut bufs = t.bufs.into_iter();
        let mut writes = Vec::with_capacity(t.extents.len());
        for e in &t.extents {
            let volume = &t.volume;
            // `prepare_batch` took exactly one buffer per data extent, in order.
            let buf = match e.kind {
                LandedKind::Data(_) => Some(bufs.next().ok_or_else(|| {
                    BlockError::Landed(format!("no buffer for the extent at {}", e.offset))
                })?),
                LandedKind::Zero => None,
            };
            writes.push(async move {
                match buf {
                    Some(buf) => volume.write_at(buf, e.offset).await.map(drop),
                    None => volume.write_zeroes(e.offset, u64::from(e.len)).await,
                }
            });
        }
        futures::future::try_join_all(writes).await?;
        for e in &t.extents {
            match e.kind {
                LandedKind::Data(_) => {
                    self.metrics.bytes_in.inc_by(u64::from(e.len));
                    self.metrics.extents.inc();
                }
                LandedKind::Zero => {
                    self.metrics.zero_extents.inc();
                }
            }
            self.queue_landed(&t.host.id, &t.disk, *e, t.volume.clone())?;
        }
        self.metrics.extent_batches.inc();
        Ok(())
    }

    /// Applies a zero extent.
    pub async fn zero_extent(
        &self,
        host: &HostId,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let h = self.host(host)?;
        let volume = self.extent_volume(&h, sync, disk, &[(offset, len)]).await?;
        let inner = h.inner.read().await;
        Self::planned(&inner.rec, sync, disk)?;
        self.intent(host, disk, &[(offset, len as u32)]).await?;
        volume.write_zeroes(offset, len).await?;
        self.metrics.zero_extents.inc();
        self.queue_landed(
            host,
            disk,
            LandedExtent {
                offset,
                len: len as u32,
                kind: LandedKind::Zero,
            },
            volume,
        )
    }

    fn queue_landed(
        &self,
        host: &HostId,
        disk: &DiskId,
        extent: LandedExtent,
        volume: Arc<Volume>,
    ) -> Result<(), BlockError> {
        let rec = LandedRecord {
            host: host.clone(),
            disk: disk.clone(),
            extent,
        };
        self.landed_tx
            .send(LandedMsgBox(LandedMsg::Record(rec, volume)))
            .map_err(|_| BlockError::ShuttingDown)
    }

    /// Durably records each `(offset, len)` as written with unknown content before the writes
    /// start (group-committed with other intents), so that a crash between a write and its
    /// batched record cannot leave the range unrecorded.
    async fn intent(&self, host: &HostId, disk: &DiskId, ranges: &[(u64, u32)]) -> Result<(), BlockError> {
        let recs = ranges
            .iter()
            .map(|&(offset, len)| LandedRecord {
                host: host.clone(),
                disk: disk.clone(),
                extent: LandedExtent {
                    offset,
                    len,
                    kind: LandedKind::Data(UNKNOWN_DIGEST),
                },
            })
            .collect();
        let (tx, rx) = oneshot::channel();
        self.landed_tx
            .send(LandedMsgBox(LandedMsg::Intent(recs, tx)))
            .map_err(|_| BlockError::ShuttingDown)?;
        rx.await
            .map_err(|_| BlockError::ShuttingDown)?
            .map_err(BlockError::Landed)
    }

    /// Makes every landed extent queued so far durable and recorded.
    pub async fn flush_landed(&self) -> Result<(), BlockError> {
        let (tx, rx) = oneshot::channel();
        self.landed_tx
            .send(LandedMsgBox(LandedMsg::Flush(tx)))
            .map_err(|_| BlockError::ShuttingDown)?;
        rx.await
            .map_err(|_| BlockError::ShuttingDown)?
            .map_err(BlockError::Landed)
    }

    /// `GET landed/{disk}`: the durable landed records, encoded.
    pub async fn landed(&self, host: &HostId, disk: &DiskId) -> Result<Vec<u8>, BlockError> {
        let h = self.host(host)?;
        if !h.inner.read().await.rec.disks.iter().any(|d| &d.id == disk) {
            return Err(BlockError::NotFound(format!("disk {disk}")));
        }
        self.flush_landed().await?;
        let mut out = Vec::new();
        for e in self.db.landed(host, disk)? {
            e.encode(&mut out);
        }
        Ok(out)
    }

    /// The largest manifest the open sync of `host` can have, for bounding the commit body.
    pub async fn max_manifest_len(&self, host: &HostId) -> Result<usize, BlockError> {
        let h = self.host(host)?;
        let inner = h.inner.read().await;
        let Some(open) = &inner.rec.open_sync else {
            // An idempotent retry of a committed point: bounded by the stored manifests.
            return Ok(64 << 20);
        };
        Ok(open
            .plan
            .disks
            .iter()
            .map(|d| d.geometry.chunk_count() as usize * 33 + 128)
            .sum::<usize>()
            + 4096)
    }

    /// `PUT syncs/{sync}/commit`: see `docs/protocol.md` "Commit".
    pub async fn commit(
        &self,
        host: &HostId,
        sync: &PointId,
        bytes: &[u8],
    ) -> Result<PointSummary, BlockError> {
        let manifest = Manifest::decode(bytes)
            .map_err(|e| BlockError::InvalidArgument(format!("manifest refused: {e}")))?;
        if manifest.host_id != *host || manifest.point_id != *sync {
            return Err(BlockError::InvalidArgument(format!(
                "manifest is for {}/{}, not {host}/{sync}",
                manifest.host_id, manifest.point_id
            )));
        }
        let h = self.host(host)?;
        let mut inner = h.inner.write().await;
        if let Some(existing) = self.db.manifest(host, sync)? {
            return if existing == bytes {
                Ok(PointSummary {
                    id: sync.clone(),
                    created_unix_ms: manifest.created_unix_ms,
                })
            } else {
                Err(BlockError::InvalidRequest(format!(
                    "point {sync} is already committed with another manifest"
                )))
            };
        }
        let open = inner
            .rec
            .open_sync
            .clone()
            .filter(|o| o.id == *sync)
            .ok_or_else(|| BlockError::InvalidRequest(format!("sync {sync} is not open")))?;
        let plan_matches = open.plan.disks.len() == manifest.disks.len()
            && open
                .plan
                .disks
                .iter()
                .zip(&manifest.disks)
                .all(|(p, m)| p.id == m.disk_id && p.geometry == m.geometry);
        if !plan_matches {
            return Err(BlockError::InvalidRequest(
                "manifest disks do not match the sync plan".into(),
            ));
        }
        self.flush_landed().await?;
        let previous = match &inner.rec.latest_point {
            Some(p) => match self.db.manifest(host, &p.id)? {
                Some(b) => Some(
                    Manifest::decode(&b)
                        .map_err(|e| DbError::Corrupt(format!("manifest {host}/{}: {e}", p.id)))?,
                ),
                None => None,
            },
            None => None,
        };
        for disk in &manifest.disks {
            let g = disk.geometry;
            let mut has_any = vec![false; g.chunk_count() as usize];
            let mut has_data = vec![false; g.chunk_count() as usize];
            for e in self.db.landed(host, &disk.disk_id)? {
                if e.offset >= g.size() {
                    continue;
                }
                if e.kind == LandedKind::Data(UNKNOWN_DIGEST) {
                    return Err(BlockError::InvalidRequest(format!(
                        "the write at {} of disk {} was interrupted by a gateway restart; resend it before committing",
                        e.offset, disk.disk_id
                    )));
                }
                let c = g.chunk_of(e.offset) as usize;
                has_any[c] = true;
                has_data[c] |= matches!(e.kind, LandedKind::Data(_));
            }
            let prev = previous
                .as_ref()
                .and_then(|p| p.disk(&disk.disk_id))
                .filter(|p| p.geometry.chunk_size() == g.chunk_size());
            for (i, entry) in disk.chunks.iter().enumerate() {
                let before = prev
                    .and_then(|p| p.chunks.get(i))
                    .copied()
                    .unwrap_or(ChunkRef::Zero);
                let same_len = prev.is_none_or(|p| {
                    i < p.chunks.len() && p.geometry.chunk_len(i as u64) == g.chunk_len(i as u64)
                });
                let changed = *entry != before || !same_len;
                if changed && !has_any[i] && *entry != ChunkRef::Zero {
                    return Err(BlockError::InvalidRequest(format!(
                        "manifest names chunk {i} of disk {} that was never uploaded",
                        disk.disk_id
                    )));
                }
                if *entry == ChunkRef::Zero && has_data[i] {
                    return Err(BlockError::InvalidRequest(format!(
                        "manifest says chunk {i} of disk {} is zero but data landed there",
                        disk.disk_id
                    )));
                }
            }
        }
        let mut snapshots = Vec::new();
        for disk in &manifest.disks {
            let volume = self.volume(&mut inner, &disk.disk_id).await?;
            volume.sync_data().await?;
            let state = inner
                .rec
                .disks
                .iter()
                .find(|d| d.id == disk.disk_id)
                .ok_or_else(|| BlockError::NotFound(format!("disk {}", disk.disk_id)))?;
            let snap = self
                .provider
                .snapshot_volume(&state.volume, &format!("{host}.{}.{sync}", disk.disk_id))
                .await?;
            info!(host = %host, disk = %disk.disk_id, snapshot = %snap.id, method = %snap.method, "volume snapshotted");
            snapshots.push(SnapshotRef {
                disk: disk.disk_id.clone(),
                snapshot: snap.id,
            });
        }
        let summary = PointSummary {
            id: sync.clone(),
            created_unix_ms: manifest.created_unix_ms,
        };
        let mut rec = inner.rec.clone();
        rec.open_sync = None;
        rec.latest_point = Some(summary.clone());
        let point = PointRecord {
            created_unix_ms: manifest.created_unix_ms,
            committed_unix_ms: now_ms(),
            snapshots,
            manifest_len: bytes.len() as u64,
        };
        let db = self.db.clone();
        let (host2, sync2, rec2, bytes2) = (host.clone(), sync.clone(), rec.clone(), bytes.to_vec());
        tokio::task::spawn_blocking(move || db.commit_point(&host2, &sync2, &point, &bytes2, &rec2))
            .await
            .map_err(|e| BlockError::Body(Box::new(e)))??;
        inner.rec = rec;
        self.metrics.commits.inc();
        info!(host = %host, point = %sync, "recovery point committed");
        Ok(summary)
    }

    /// The manifest bytes of a committed point.
    pub fn manifest(&self, host: &HostId, point: &PointId) -> Result<Vec<u8>, BlockError> {
        self.db
            .manifest(host, point)?
            .ok_or_else(|| BlockError::NotFound(format!("point {point}")))
    }

    /// The committed points of a host, oldest first.
    pub fn points(&self, host: &HostId) -> Result<Vec<(PointId, PointRecord)>, BlockError> {
        self.host(host)?;
        Ok(self.db.points(host)?)
    }

    /// Deletes provider snapshots that no point references (left by interrupted commits).
    pub async fn remove_orphan_snapshots(&self) -> Result<usize, BlockError> {
        let referenced = self.db.referenced_snapshots()?;
        let mut removed = 0;
        for s in self.provider.list_snapshots().await? {
            if !referenced.contains(&s) {
                warn!(snapshot = %s, "removing snapshot of an interrupted commit");
                self.provider.delete_snapshot(&s).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// What the landed task holds between flushes.
#[derive(Default)]
struct LandedQueue {
    /// Real records (and intents that must follow them), in arrival order.
    pending: Vec<LandedRecord>,
    /// Volumes the pending records were written to.
    volumes: Vec<Arc<Volume>>,
    /// Answered after the next flush.
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
    /// Intents that can be recorded at once, on their own.
    intents: Vec<LandedRecord>,
    /// Answered after the next intent commit.
    intent_waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

impl LandedQueue {
    /// Queues a message; returns whether a flush is due now.
    fn take(&mut self, m: LandedMsg, max: usize) -> bool {
        match m {
            LandedMsg::Record(r, v) => {
                if !self.volumes.iter().any(|x| Arc::ptr_eq(x, &v)) {
                    self.volumes.push(v);
                }
                self.pending.push(r);
                self.pending.len() >= max
            }
            LandedMsg::Intent(rs, w) => {
                // Intents are recorded on their own, without waiting for the data of pending
                // records, unless a pending record of an overlapping range would then be
                // recorded after one and hide it: then everything is flushed in order.
                let overlaps = rs.iter().any(|r| {
                    self.pending.iter().any(|p| {
                        p.host == r.host
                            && p.disk == r.disk
                            && p.extent.offset < r.extent.offset + u64::from(r.extent.len)
                            && r.extent.offset < p.extent.offset + u64::from(p.extent.len)
                    })
                });
                if overlaps {
                    self.pending.extend(rs);
                    self.waiters.push(w);
                    true
                } else {
                    self.intents.extend(rs);
                    self.intent_waiters.push(w);
                    false
                }
            }
            LandedMsg::Flush(w) => {
                self.waiters.push(w);
                true
            }
        }
    }
}

async fn landed_task(
    db: MetaDb,
    mut rx: mpsc::UnboundedReceiver<LandedMsgBox>,
    batching: LandedBatching,
    metrics: Arc<Metrics>,
) {
    let mut q = LandedQueue::default();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        // `Some(None)` is the batch timer firing; `None` the channel closing.
        let msg = match deadline {
            Some(d) => tokio::select! {
                m = rx.recv() => m.map(Some),
                () = tokio::time::sleep_until(d) => Some(None),
            },
            None => rx.recv().await.map(Some),
        };
        let closing = msg.is_none();
        let mut flush_now = closing || matches!(msg, Some(None));
        if let Some(Some(LandedMsgBox(m))) = msg {
            flush_now |= q.take(m, batching.max);
        }
        // Group commit: whatever else is queued now joins this round.
        while let Ok(LandedMsgBox(m)) = rx.try_recv() {
            flush_now |= q.take(m, batching.max);
        }
        if !q.intents.is_empty() {
            let batch = std::mem::take(&mut q.intents);
            let db2 = db.clone();
            let result = tokio::task::spawn_blocking(move || db2.record_landed(&batch))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| format!("{e}")));
            if let Err(e) = &result {
                metrics.error("landed");
                warn!(error = %e, "recording write intents failed");
            }
            for w in q.intent_waiters.drain(..) {
                let _ = w.send(result.clone());
            }
        }
        if !flush_now {
            if !q.pending.is_empty() {
                deadline.get_or_insert_with(|| tokio::time::Instant::now() + batching.interval);
            }
            continue;
        }
        let result = flush(
            &db,
            std::mem::take(&mut q.pending),
            std::mem::take(&mut q.volumes),
        )
        .await;
        match &result {
            Ok(()) => {
                metrics.landed_batches.inc();
            }
            Err(e) => {
                metrics.error("landed");
                warn!(error = %e, "recording landed extents failed; the agent will resend them");
            }
        }
        for w in q.waiters.drain(..) {
            let _ = w.send(result.clone());
        }
        deadline = None;
        if closing {
            break;
        }
    }
}

async fn flush(db: &MetaDb, batch: Vec<LandedRecord>, volumes: Vec<Arc<Volume>>) -> Result<(), String> {
    if batch.is_empty() {
        return Ok(());
    }
    // Data first, then the record that names it.
    for v in &volumes {
        v.sync_data().await.map_err(|e| format!("{e}"))?;
    }
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.record_landed(&batch))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e}"))
}
