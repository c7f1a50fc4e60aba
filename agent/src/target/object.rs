//! Object mode: the host's disks as content-addressed chunks in an S3 bucket, no gateway on the
//! data path (`docs/object-mode.md`). The session logic (lease, known chunks, commit after
//! every chunk is acknowledged) lives in `tern_core::object`; this adapts it to [`Target`].
//!
//! The engine sends whole chunks to this target ([`Target::whole_chunks`]) and names them by
//! their chunk id (keyed BLAKE3 when the store is encrypted, [`Target::id_key`]). There are no
//! landed records: a resumed sync knows the chunks it already stored from its journal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tern_core::object::repo::RepoError;
use tern_core::object::session::{SessionError, check_host_config};
use tern_core::object::{Repo, SessionOptions, StoreKey, SyncSession};
use tern_core::protocol::{DiskState, HostState, LandedExtent, PointSummary, SyncPlan};
use tern_core::{Digest, DiskId, HostId, Manifest, PointId};
use tokio::sync::Mutex;

use super::{ErrorKind, PointEntry, Target, TargetError};

/// An object-mode target.
#[derive(Debug, Clone)]
pub struct ObjectTarget {
    repo: Repo,
    url: String,
    host: HostId,
    key: Option<Arc<StoreKey>>,
    chunk_size: u32,
    compression: Option<i32>,
    lease_ttl: Duration,
    journal: PathBuf,
    session: Arc<Mutex<Option<Arc<SyncSession>>>>,
    /// The last manifest read: a sync asks for the latest point's state, then its manifest
    /// (several MiB for a large host), more than once.
    manifest: Arc<Mutex<Option<Arc<Manifest>>>>,
}

impl ObjectTarget {
    /// A target for `host` in `repo` (described as `url`); `journal` is where the agent keeps
    /// the chunks a running sync stored.
    #[allow(clippy::too_many_arguments, reason = "plain settings, set once")]
    pub fn new(
        repo: Repo,
        url: String,
        host: HostId,
        key: Option<Arc<StoreKey>>,
        chunk_size: u32,
        compression: Option<i32>,
        lease_ttl: Duration,
        journal: PathBuf,
    ) -> Self {
        Self {
            repo,
            url,
            host,
            key,
            chunk_size,
            compression,
            lease_ttl,
            journal,
            session: Arc::new(Mutex::new(None)),
            manifest: Arc::new(Mutex::new(None)),
        }
    }

    async fn session(&self, sync: &PointId) -> Result<Arc<SyncSession>, TargetError> {
        let guard = self.session.lock().await;
        match guard.as_ref() {
            Some(s) => Ok(s.clone()),
            None => Err(TargetError::new(
                format!("use sync {sync}"),
                ErrorKind::Permanent,
                "the sync was not begun",
            )),
        }
    }

    /// A point's manifest, from the cache when it was the last one read (manifests never
    /// change once written).
    async fn manifest(&self, point: &PointId) -> Result<Arc<Manifest>, TargetError> {
        let mut cache = self.manifest.lock().await;
        if let Some(m) = cache.as_ref().filter(|m| &m.point_id == point) {
            return Ok(m.clone());
        }
        let m = Arc::new(
            self.repo
                .get_manifest(&self.host, point)
                .await
                .map_err(|e| repo_err(format!("read point {point}"), e))?,
        );
        *cache = Some(m.clone());
        Ok(m)
    }

    /// Counts of the current session (zero before `begin`).
    pub async fn stats(&self) -> tern_core::object::session::SessionStats {
        match self.session.lock().await.as_ref() {
            Some(s) => s.stats(),
            None => Default::default(),
        }
    }
}

fn repo_err(op: impl Into<String>, e: RepoError) -> TargetError {
    let kind = if e.is_not_found() {
        ErrorKind::NotFound
    } else if e.is_transient() {
        ErrorKind::Transient
    } else {
        ErrorKind::Permanent
    };
    TargetError::new(op, kind, e)
}

fn session_err(op: impl Into<String>, e: SessionError) -> TargetError {
    match e {
        SessionError::Repo(r) => repo_err(op, r),
        other => {
            let kind = if other.is_transient() {
                ErrorKind::Transient
            } else {
                ErrorKind::Permanent
            };
            TargetError::new(op, kind, other)
        }
    }
}

impl Target for ObjectTarget {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn whole_chunks(&self) -> bool {
        true
    }

    fn id_key(&self) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| *k.id_key())
    }

    async fn state(&self) -> Result<HostState, TargetError> {
        // A wrong or missing key is reported before anything is read or sent.
        check_host_config(
            &self.repo,
            &self.host,
            self.key.as_deref(),
            self.chunk_size,
            false,
        )
        .await
        .map_err(|e| session_err("check the host's store config", e))?;
        let points = self
            .repo
            .list_points(&self.host)
            .await
            .map_err(|e| repo_err("list points", e))?;
        let Some(latest) = points.last() else {
            return Ok(HostState {
                host: self.host.clone(),
                open_sync: None,
                latest_point: None,
                disks: Vec::new(),
            });
        };
        let m = self.manifest(&latest.id).await?;
        Ok(HostState {
            host: self.host.clone(),
            open_sync: None,
            latest_point: Some(PointSummary {
                id: latest.id.clone(),
                created_unix_ms: m.created_unix_ms,
            }),
            disks: m
                .disks
                .iter()
                .map(|d| DiskState {
                    id: d.disk_id.clone(),
                    geometry: d.geometry,
                    volume: String::new(),
                })
                .collect(),
        })
    }

    async fn begin(&self, sync: &PointId, _plan: &SyncPlan) -> Result<(), TargetError> {
        let mut guard = self.session.lock().await;
        if guard.is_some() {
            return Ok(());
        }
        if let Some(dir) = self.journal.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| TargetError::new("create the journal directory", ErrorKind::Permanent, e))?;
        }
        let opts = SessionOptions {
            chunk_size: self.chunk_size,
            compression: self.compression,
            lease_ttl: self.lease_ttl,
            journal: Some(self.journal.clone()),
        };
        let s = SyncSession::open(
            self.repo.clone(),
            self.host.clone(),
            sync.clone(),
            self.key.clone(),
            &opts,
        )
        .await
        .map_err(|e| session_err(format!("open sync {sync}"), e))?;
        *guard = Some(Arc::new(s));
        Ok(())
    }

    async fn landed(&self, _disk: &DiskId) -> Result<Vec<LandedExtent>, TargetError> {
        Ok(Vec::new())
    }

    async fn put_extent(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        body: Bytes,
        digest: Digest,
    ) -> Result<(), TargetError> {
        let s = self.session(sync).await?;
        s.put_chunk(digest, body)
            .await
            .map_err(|e| session_err(format!("store the chunk of {disk} at {offset}"), e))?;
        Ok(())
    }

    async fn put_zero(
        &self,
        _sync: &PointId,
        _disk: &DiskId,
        _offset: u64,
        _len: u64,
    ) -> Result<(), TargetError> {
        // Zero chunks are recorded in the manifest only.
        Ok(())
    }

    async fn commit(&self, sync: &PointId, manifest: &Manifest) -> Result<(), TargetError> {
        let s = self.session(sync).await?;
        s.commit(manifest)
            .await
            .map_err(|e| session_err(format!("commit point {sync}"), e))
    }

    async fn get_point(&self, point: &PointId) -> Result<Manifest, TargetError> {
        Ok(Manifest::clone(&*self.manifest(point).await?))
    }

    async fn list_points(&self) -> Result<Vec<PointEntry>, TargetError> {
        let points = self
            .repo
            .list_points(&self.host)
            .await
            .map_err(|e| repo_err("list points", e))?;
        Ok(points
            .into_iter()
            .map(|p| PointEntry {
                id: p.id,
                manifest_len: p.size,
                modified_unix_ms: p.last_modified.timestamp_millis().max(0) as u64,
            })
            .collect())
    }
}
