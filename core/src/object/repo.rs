//! The object layout of a store in a bucket, and typed access to it.
//!
//! ```text
//! {prefix}/chunks/{first 4 hex digits}/{64 hex digits}   chunk blobs (blob.rs), content-addressed
//! {prefix}/hosts/{host}/config.json                       chunk size, encryption, key id
//! {prefix}/hosts/{host}/points/{point}.manifest           one per recovery point (TERNMFST)
//! {prefix}/hosts/{host}/leases/{sync}/{ms}-{rand}         a running sync's lease (see gc.rs)
//! {prefix}/gc/runs/{ms}-{rand}[.alive|.done]              GC runs: started, alive, finished (gc.rs)
//! ```
//!
//! Nothing here needs the customer's key: the gateway lists, validates and garbage-collects a
//! store it cannot read.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::manifest::ManifestError;
use crate::{Digest, HostId, Manifest, PointId};

use super::crypto::{Cipher, KeyId};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("failed to {op} {key}")]
    Store {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("object {key} is not a valid recovery-point manifest")]
    Manifest {
        key: String,
        #[source]
        source: ManifestError,
    },
    #[error("object {key} describes host {host} point {point}, not what its name says")]
    Misplaced {
        key: String,
        host: HostId,
        point: PointId,
    },
    #[error("object {key} is not a valid host config")]
    Config {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

impl RepoError {
    /// True when the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            RepoError::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }

    /// True when retrying later may help (network or server trouble outlasting the client's
    /// own retries).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RepoError::Store {
                source: object_store::Error::Generic { .. } | object_store::Error::JoinError { .. },
                ..
            }
        )
    }
}

/// How a host's chunks are encrypted, as its config records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// The AEAD.
    pub cipher: Cipher,
    /// The key's id (not the key).
    #[serde(with = "key_id_hex")]
    pub key_id: KeyId,
}

mod key_id_hex {
    use super::KeyId;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(k: &KeyId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&k.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeyId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A host's store settings, fixed by its first sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Format version (1).
    pub format: u32,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// Encryption, or `None` for plaintext chunks.
    pub encryption: Option<Encryption>,
}

/// A point found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointObject {
    /// The point.
    pub id: PointId,
    /// When the manifest was written (server clock).
    pub last_modified: DateTime<Utc>,
    /// Manifest size in bytes.
    pub size: u64,
}

/// The leases of one running sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The host.
    pub host: HostId,
    /// The sync.
    pub sync: PointId,
    /// When the sync first took its lease (server clock).
    pub first: DateTime<Utc>,
    /// Its latest heartbeat (server clock).
    pub last: DateTime<Utc>,
    /// The lease objects.
    pub keys: Vec<Path>,
}

/// A chunk object found by a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkObject {
    /// Its id.
    pub id: Digest,
    /// Its key.
    pub key: Path,
    /// Last written (server clock).
    pub last_modified: DateTime<Utc>,
    /// Stored size.
    pub size: u64,
}

/// A store: a bucket (any `ObjectStore`) and a prefix inside it.
#[derive(Debug, Clone)]
pub struct Repo {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

const MANIFEST_SUFFIX: &str = ".manifest";

impl Repo {
    /// A store at `prefix` (may be empty) of `store`.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        Self {
            store,
            prefix: Path::from(prefix.trim_matches('/')),
        }
    }

    /// The underlying object store.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn join(&self, parts: &[&str]) -> Path {
        let mut p = self.prefix.clone();
        for part in parts {
            p = p.join(*part);
        }
        p
    }

    /// The key of chunk `id`.
    pub fn chunk_key(&self, id: &Digest) -> Path {
        let hex = id.to_hex();
        self.join(&["chunks", &hex[..4], &hex])
    }

    /// The key of `host`'s config.
    pub fn config_key(&self, host: &HostId) -> Path {
        self.join(&["hosts", host.as_str(), "config.json"])
    }

    /// The key of a point's manifest.
    pub fn manifest_key(&self, host: &HostId, point: &PointId) -> Path {
        self.join(&[
            "hosts",
            host.as_str(),
            "points",
            &format!("{point}{MANIFEST_SUFFIX}"),
        ])
    }

    fn leases_dir(&self, host: &HostId) -> Path {
        self.join(&["hosts", host.as_str(), "leases"])
    }

    async fn put(&self, op: &'static str, key: &Path, body: Bytes) -> Result<(), RepoError> {
        self.retrying(op, key, || {
            self.store.put(key, PutPayload::from_bytes(body.clone()))
        })
        .await
        .map(drop)
    }

    /// Runs `f` until it succeeds, fails for good, or transient failures persist. object_store
    /// retries failed requests itself; what surfaces after the response started (a body cut
    /// off by a reset connection or a proxy) is retried here. Every operation of this module is
    /// idempotent.
    async fn retrying<T, F, Fut>(&self, op: &'static str, key: &Path, mut f: F) -> Result<T, RepoError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        const ATTEMPTS: u32 = 6;
        let mut delay = std::time::Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match f().await.map_err(|source| store_err(op, key, source)) {
                Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                    tracing::debug!(key = %key, attempt, error = %crate::error_chain(&e), "{op} failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn list_all(&self, dir: &Path) -> Result<Vec<object_store::ObjectMeta>, RepoError> {
        self.retrying("list", dir, || self.store.list(Some(dir)).try_collect())
            .await
    }

    async fn get(&self, op: &'static str, key: &Path) -> Result<Bytes, RepoError> {
        self.retrying(op, key, || async { self.store.get(key).await?.bytes().await })
            .await
    }

    /// Stores a chunk blob.
    pub async fn put_chunk(&self, id: &Digest, blob: Bytes) -> Result<(), RepoError> {
        self.put("store chunk", &self.chunk_key(id), blob).await
    }

    /// Reads a chunk blob.
    pub async fn get_chunk(&self, id: &Digest) -> Result<Bytes, RepoError> {
        self.get("read chunk", &self.chunk_key(id)).await
    }

    /// `host`'s config, `None` before its first sync.
    pub async fn host_config(&self, host: &HostId) -> Result<Option<HostConfig>, RepoError> {
        let key = self.config_key(host);
        match self.get("read host config", &key).await {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|source| RepoError::Config {
                    key: key.to_string(),
                    source,
                }),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes `host`'s config.
    pub async fn put_host_config(&self, host: &HostId, config: &HostConfig) -> Result<(), RepoError> {
        let body = serde_json::to_vec_pretty(config).unwrap_or_default();
        self.put("write host config", &self.config_key(host), body.into())
            .await
    }

    /// Writes a point's manifest (the point exists from then on).
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<(), RepoError> {
        let key = self.manifest_key(&manifest.host_id, &manifest.point_id);
        let body = manifest.encode().map_err(|source| RepoError::Manifest {
            key: key.to_string(),
            source,
        })?;
        self.put("write manifest", &key, body.into()).await
    }

    /// Reads and checks a point's manifest.
    pub async fn get_manifest(&self, host: &HostId, point: &PointId) -> Result<Manifest, RepoError> {
        let key = self.manifest_key(host, point);
        let body = self.get("read manifest", &key).await?;
        let m = Manifest::decode(&body).map_err(|source| RepoError::Manifest {
            key: key.to_string(),
            source,
        })?;
        if &m.host_id != host || &m.point_id != point {
            return Err(RepoError::Misplaced {
                key: key.to_string(),
                host: m.host_id,
                point: m.point_id,
            });
        }
        Ok(m)
    }

    /// Deletes a point's manifest.
    pub async fn delete_manifest(&self, host: &HostId, point: &PointId) -> Result<(), RepoError> {
        let key = self.manifest_key(host, point);
        match self
            .retrying("delete manifest", &key, || self.store.delete(&key))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The hosts that have anything in the store.
    pub async fn list_hosts(&self) -> Result<Vec<HostId>, RepoError> {
        let dir = self.join(&["hosts"]);
        let r = self
            .retrying("list", &dir, || self.store.list_with_delimiter(Some(&dir)))
            .await?;
        let mut out: Vec<HostId> = r
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(|n| HostId::new(n).ok()))
            .collect();
        out.sort();
        Ok(out)
    }

    /// `host`'s points, oldest first (by the time their manifests were written, then id).
    /// Objects under `points/` that are not named like manifests are skipped.
    pub async fn list_points(&self, host: &HostId) -> Result<Vec<PointObject>, RepoError> {
        let dir = self.join(&["hosts", host.as_str(), "points"]);
        let metas = self.list_all(&dir).await?;
        let mut out: Vec<PointObject> = metas
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                let id = PointId::new(name.strip_suffix(MANIFEST_SUFFIX)?).ok()?;
                Some(PointObject {
                    id,
                    last_modified: m.last_modified,
                    size: m.size,
                })
            })
            .collect();
        out.sort_by(|a, b| (a.last_modified, &a.id).cmp(&(b.last_modified, &b.id)));
        Ok(out)
    }

    /// Takes (or renews) a lease for sync `sync` of `host` and returns its server time.
    pub async fn put_lease(&self, host: &HostId, sync: &PointId) -> Result<DateTime<Utc>, RepoError> {
        let name = format!(
            "{:016}-{:08x}",
            Utc::now().timestamp_millis().max(0),
            rand::random::<u32>()
        );
        let key = self.leases_dir(host).join(sync.as_str()).join(name);
        let body = serde_json::json!({ "host": host.as_str(), "sync": sync.as_str() }).to_string();
        self.put("write lease", &key, body.into()).await?;
        let meta = self
            .retrying("read lease", &key, || self.store.head(&key))
            .await?;
        Ok(meta.last_modified)
    }

    /// The leases of `host` (every host when `None`), grouped by sync.
    pub async fn list_leases(&self, host: Option<&HostId>) -> Result<Vec<Lease>, RepoError> {
        let dir = match host {
            Some(h) => self.leases_dir(h),
            None => self.join(&["hosts"]),
        };
        let metas = self.list_all(&dir).await?;
        let mut out: Vec<Lease> = Vec::new();
        let base = self.join(&["hosts"]);
        for m in metas {
            // hosts/{host}/leases/{sync}/{name}
            let Some(rel) = m.location.prefix_match(&base) else {
                continue;
            };
            let parts: Vec<_> = rel.map(|p| p.as_ref().to_owned()).collect();
            let [h, kind, sync, _name] = parts.as_slice() else {
                continue;
            };
            let (Ok(h), Ok(sync)) = (HostId::new(h.as_str()), PointId::new(sync.as_str())) else {
                continue;
            };
            if kind != "leases" {
                continue;
            }
            match out.iter_mut().find(|l| l.host == h && l.sync == sync) {
                Some(l) => {
                    l.first = l.first.min(m.last_modified);
                    l.last = l.last.max(m.last_modified);
                    l.keys.push(m.location);
                }
                None => out.push(Lease {
                    host: h,
                    sync,
                    first: m.last_modified,
                    last: m.last_modified,
                    keys: vec![m.location],
                }),
            }
        }
        Ok(out)
    }

    /// Releases the leases of sync `sync` of `host`.
    pub async fn delete_leases(&self, host: &HostId, sync: &PointId) -> Result<(), RepoError> {
        let dir = self.leases_dir(host).join(sync.as_str());
        let keys: Vec<_> = self
            .list_all(&dir)
            .await?
            .into_iter()
            .map(|m| m.location)
            .collect();
        self.delete_keys(keys).await
    }

    /// Deletes objects (missing ones are fine).
    pub async fn delete_keys(&self, keys: Vec<Path>) -> Result<(), RepoError> {
        let mut results = self
            .store
            .delete_stream(futures::stream::iter(keys.into_iter().map(Ok)).boxed());
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => return Err(store_err("delete", &self.prefix, source)),
            }
        }
        Ok(())
    }

    /// Every chunk in the store.
    pub async fn list_chunks(&self) -> Result<Vec<ChunkObject>, RepoError> {
        let dir = self.join(&["chunks"]);
        let metas = self.list_all(&dir).await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let id = Digest::from_hex(m.location.filename()?)?;
                Some(ChunkObject {
                    id,
                    key: m.location,
                    last_modified: m.last_modified,
                    size: m.size,
                })
            })
            .collect())
    }

    fn gc_runs_dir(&self) -> Path {
        self.join(&["gc", "runs"])
    }

    /// Announces a GC run; returns it with its start on the server's clock.
    pub async fn start_gc_run(&self) -> Result<GcRun, RepoError> {
        let name = format!(
            "{:016}-{:08x}",
            Utc::now().timestamp_millis().max(0),
            rand::random::<u32>()
        );
        let key = self.gc_runs_dir().join(name);
        self.put("announce GC run", &key, Bytes::from_static(b"tern gc run\n"))
            .await?;
        let meta = self.retrying("read", &key, || self.store.head(&key)).await?;
        Ok(GcRun {
            key,
            started: meta.last_modified,
            alive: meta.last_modified,
            done: None,
        })
    }

    /// Says a GC run is still going (sessions treat a run silent for long as crashed).
    pub async fn gc_run_alive(&self, run: &GcRun) -> Result<(), RepoError> {
        let key = Path::from(format!("{}{ALIVE_SUFFIX}", run.key));
        self.put("renew GC run", &key, Bytes::from_static(b"alive\n"))
            .await
    }

    /// Marks a GC run finished.
    pub async fn finish_gc_run(&self, run: &GcRun) -> Result<(), RepoError> {
        let key = Path::from(format!("{}{DONE_SUFFIX}", run.key));
        self.put("finish GC run", &key, Bytes::from_static(b"done\n"))
            .await
    }

    /// The GC runs announced and not yet cleaned up.
    pub async fn list_gc_runs(&self) -> Result<Vec<GcRun>, RepoError> {
        let dir = self.gc_runs_dir();
        let metas = self.list_all(&dir).await?;
        let suffixed = |m: &object_store::ObjectMeta| {
            let k = m.location.as_ref();
            k.ends_with(DONE_SUFFIX) || k.ends_with(ALIVE_SUFFIX)
        };
        let mut runs: Vec<GcRun> = metas
            .iter()
            .filter(|m| !suffixed(m))
            .map(|m| GcRun {
                key: m.location.clone(),
                started: m.last_modified,
                alive: m.last_modified,
                done: None,
            })
            .collect();
        for m in metas.iter().filter(|m| suffixed(m)) {
            let k = m.location.as_ref();
            let (run, done) = match k.strip_suffix(DONE_SUFFIX) {
                Some(run) => (run, true),
                None => (k.trim_end_matches(ALIVE_SUFFIX), false),
            };
            if let Some(r) = runs.iter_mut().find(|r| r.key.as_ref() == run) {
                if done {
                    r.done = Some(m.last_modified);
                } else {
                    r.alive = r.alive.max(m.last_modified);
                }
            }
        }
        Ok(runs)
    }

    /// Deletes the markers of a GC run.
    pub async fn delete_gc_run(&self, run: &GcRun) -> Result<(), RepoError> {
        let keys = [DONE_SUFFIX, ALIVE_SUFFIX]
            .iter()
            .map(|s| Path::from(format!("{}{s}", run.key)))
            .chain([run.key.clone()])
            .collect();
        self.delete_keys(keys).await
    }

    /// Whether chunk `id` exists.
    pub async fn has_chunk(&self, id: &Digest) -> Result<bool, RepoError> {
        let key = self.chunk_key(id);
        match self.retrying("check chunk", &key, || self.store.head(&key)).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

const DONE_SUFFIX: &str = ".done";
const ALIVE_SUFFIX: &str = ".alive";

/// A GC run as announced in the store (`gc/runs/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcRun {
    /// Its marker object.
    pub key: Path,
    /// When it started (server clock).
    pub started: DateTime<Utc>,
    /// Its latest sign of life (server clock).
    pub alive: DateTime<Utc>,
    /// When it finished, if it did.
    pub done: Option<DateTime<Utc>>,
}

fn store_err(op: &'static str, key: &Path, source: object_store::Error) -> RepoError {
    RepoError::Store {
        op,
        key: key.to_string(),
        source,
    }
}
