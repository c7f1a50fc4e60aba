//! Object mode on the gateway: the bucket agents write to is the source of truth; the gateway
//! indexes the points it finds there (so its DB can be rebuilt from the bucket alone), applies
//! retention and collects garbage (`docs/object-mode.md`). It never holds an encryption key:
//! manifests and chunk ids are all it reads.

use std::collections::HashSet;
use std::sync::Arc;

use serde::Serialize;
use tern_core::object::Repo;
use tern_core::object::gc::{GcOptions, GcReport, PruneReport, collect_garbage, prune};
use tern_core::{ChunkRef, HostId, PointId};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::ObjectStoreConfig;
use crate::db::{MetaDb, ObjectDiskRecord, ObjectPointRecord};

/// Why an object-store task failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    #[error("failed to connect to the object store")]
    Connect(#[from] tern_core::object::s3::S3Error),
    #[error(transparent)]
    Repo(Box<tern_core::object::repo::RepoError>),
    #[error(transparent)]
    Gc(Box<tern_core::object::gc::GcError>),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}

impl From<tern_core::object::repo::RepoError> for ObjectsError {
    fn from(e: tern_core::object::repo::RepoError) -> Self {
        ObjectsError::Repo(Box::new(e))
    }
}

impl From<tern_core::object::gc::GcError> for ObjectsError {
    fn from(e: tern_core::object::gc::GcError) -> Self {
        ObjectsError::Gc(Box::new(e))
    }
}

/// What a scan found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanReport {
    /// Hosts in the bucket.
    pub hosts: usize,
    /// Points in the bucket (valid ones).
    pub points: usize,
    /// Points newly indexed.
    pub added: usize,
    /// Points forgotten (no longer in the bucket).
    pub removed: usize,
    /// Manifests that failed validation: `host/point: reason`.
    pub invalid: Vec<String>,
}

/// The gateway's view of one object store.
#[derive(Debug)]
pub struct ObjectStores {
    repo: Repo,
    config: ObjectStoreConfig,
    db: MetaDb,
    /// One maintenance task at a time (scan, prune, GC).
    busy: Mutex<()>,
}

impl ObjectStores {
    /// Connects (no request yet).
    pub fn new(config: ObjectStoreConfig, db: MetaDb) -> Result<Arc<Self>, ObjectsError> {
        let store = tern_core::object::s3::connect(&config.s3)?;
        let repo = Repo::new(store, &config.prefix);
        Ok(Arc::new(Self {
            repo,
            config,
            db,
            busy: Mutex::new(()),
        }))
    }

    /// Lists the bucket's points, validates new manifests and brings the index up to date.
    pub async fn scan(&self) -> Result<ScanReport, ObjectsError> {
        let _g = self.busy.lock().await;
        self.scan_locked().await
    }

    async fn scan_locked(&self) -> Result<ScanReport, ObjectsError> {
        let mut report = ScanReport::default();
        let indexed: HashSet<(HostId, PointId)> = self
            .db
            .object_points()?
            .into_iter()
            .map(|(h, p, _)| (h, p))
            .collect();
        let mut seen = HashSet::new();
        for host in self.repo.list_hosts().await? {
            report.hosts += 1;
            for p in self.repo.list_points(&host).await? {
                let key = (host.clone(), p.id.clone());
                if indexed.contains(&key) {
                    seen.insert(key);
                    report.points += 1;
                    continue;
                }
                let m = match self.repo.get_manifest(&host, &p.id).await {
                    Ok(m) => m,
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => {
                        let why = tern_core::error_chain(&e);
                        warn!(host = %host, point = %p.id, error = %why, "invalid manifest in the bucket; not indexed");
                        report.invalid.push(format!("{host}/{}: {why}", p.id));
                        continue;
                    }
                };
                let rec = ObjectPointRecord {
                    created_unix_ms: m.created_unix_ms,
                    stored_unix_ms: p.last_modified.timestamp_millis().max(0) as u64,
                    disks: m
                        .disks
                        .iter()
                        .map(|d| ObjectDiskRecord {
                            id: d.disk_id.to_string(),
                            size: d.geometry.size(),
                            chunks: d.chunks.len() as u64,
                            data_chunks: d.chunks.iter().filter(|c| **c != ChunkRef::Zero).count() as u64,
                        })
                        .collect(),
                };
                let bytes = m.encode().unwrap_or_default();
                self.db.put_object_point(&host, &p.id, &rec, &bytes)?;
                report.added += 1;
                report.points += 1;
                seen.insert(key);
            }
        }
        for (h, p) in indexed.difference(&seen) {
            self.db.delete_object_point(h, p)?;
            report.removed += 1;
        }
        info!(
            hosts = report.hosts,
            points = report.points,
            added = report.added,
            removed = report.removed,
            invalid = report.invalid.len(),
            "object store scanned"
        );
        Ok(report)
    }

    /// Applies each host's retention policy, then rescans.
    pub async fn prune(&self, dry_run: bool) -> Result<Vec<PruneReport>, ObjectsError> {
        let _g = self.busy.lock().await;
        let mut out = Vec::new();
        for host in self.repo.list_hosts().await? {
            let policy = self
                .config
                .host_retention
                .get(&host)
                .unwrap_or(&self.config.retention);
            if policy.keeps_everything() {
                continue;
            }
            out.push(prune(&self.repo, &host, policy, dry_run).await?);
        }
        self.scan_locked().await?;
        Ok(out)
    }

    /// Collects garbage (`grace` overrides the configured grace period).
    pub async fn gc(
        &self,
        dry_run: bool,
        grace: Option<std::time::Duration>,
    ) -> Result<GcReport, ObjectsError> {
        let _g = self.busy.lock().await;
        let opts = GcOptions {
            grace: grace.unwrap_or(self.config.gc.grace),
            dry_run,
            ..self.config.gc
        };
        Ok(collect_garbage(&self.repo, &opts).await?)
    }

    /// Scans at once, then scans and prunes every `scan_every` and collects garbage every
    /// `gc_every`, until the process stops. Failures are logged and retried next round.
    pub async fn run(self: Arc<Self>) {
        let mut last_gc = tokio::time::Instant::now();
        loop {
            if let Err(e) = self.prune(false).await {
                warn!(error = %tern_core::error_chain(&e), "object store maintenance failed; retrying next round");
            }
            if let Some(every) = self.config.gc_every
                && last_gc.elapsed() >= every
            {
                match self.gc(false, None).await {
                    Ok(_) => last_gc = tokio::time::Instant::now(),
                    Err(e) => warn!(error = %tern_core::error_chain(&e), "garbage collection failed"),
                }
            }
            tokio::time::sleep(self.config.scan_every).await;
        }
    }
}
