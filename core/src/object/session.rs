//! One sync of a host into a store: the writer's side of the protocol in `docs/object-mode.md`.
//!
//! 1. [`SyncSession::open`] checks the host's config (chunk size, encryption, key id) and takes
//!    a lease, *then* lists the points: the newest one is the base, and its chunks are known
//!    (never sent again). A journal of the chunks this sync already stored (kept by the agent)
//!    adds to the known set when the sync resumes under a lease that never lapsed.
//! 2. [`SyncSession::put_chunk`] stores a chunk unless it is known.
//! 3. [`SyncSession::commit`] writes the manifest (after every chunk was acknowledged: the
//!    caller awaits them all), then releases the lease.
//!
//! While open, a task renews the lease so that GC keeps this sync's chunks however long it runs.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::{Digest, HostId, Manifest, PointId};

use super::blob::{self, BlobError};
use super::crypto::StoreKey;
use super::repo::{Encryption, HostConfig, PointObject, Repo, RepoError};

/// How a session behaves.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Chunk size of the host's disks.
    pub chunk_size: u32,
    /// zstd level (`None`: never compress).
    pub compression: Option<i32>,
    /// How long a lease lives without renewal (must match the GC's setting).
    pub lease_ttl: Duration,
    /// The agent's journal of chunks stored by this sync.
    pub journal: Option<PathBuf>,
}

/// Why a session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("host {host} stores {theirs}-byte chunks; this sync uses {ours}")]
    ChunkSize { host: HostId, theirs: u32, ours: u32 },
    #[error("host {host}'s points are encrypted ({cipher}, key id {key_id}); give the key file")]
    NeedKey {
        host: HostId,
        cipher: &'static str,
        key_id: String,
    },
    #[error("host {host}'s points are encrypted with key {theirs}; the given key file is key {ours}")]
    WrongKey {
        host: HostId,
        theirs: String,
        ours: String,
    },
    #[error(
        "host {host}'s points are not encrypted; refusing to mix in encrypted chunks (use a new host id)"
    )]
    NotEncrypted { host: HostId },
    #[error("host {host}'s points use {theirs}; the key was loaded for {ours}")]
    Cipher {
        host: HostId,
        theirs: &'static str,
        ours: &'static str,
    },
    #[error("failed to encode chunk {id}")]
    Blob {
        id: Digest,
        #[source]
        source: BlobError,
    },
    #[error("failed to use the journal {path}")]
    Journal {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the manifest is for host {host} point {point}, not this session's")]
    WrongManifest { host: HostId, point: PointId },
    #[error(
        "a garbage collection that overlapped this sync removed {missing} of its chunks; run the sync again (it stores them again)"
    )]
    ChunksLost { missing: usize },
    #[error("a garbage collection has been running for longer than the commit waits; retry later")]
    GcRunning,
    #[error("an encoding task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl SessionError {
    /// True when retrying later may help.
    pub fn is_transient(&self) -> bool {
        match self {
            SessionError::Repo(e) => e.is_transient(),
            SessionError::GcRunning => true,
            _ => false,
        }
    }
}

/// Checks `key` (or its absence) against a host's config, or makes the config of a new host.
pub async fn check_host_config(
    repo: &Repo,
    host: &HostId,
    key: Option<&StoreKey>,
    chunk_size: u32,
    create: bool,
) -> Result<Option<HostConfig>, SessionError> {
    let ours = key.map(|k| Encryption {
        cipher: k.cipher(),
        key_id: k.key_id(),
    });
    let config = match repo.host_config(host).await? {
        Some(c) => c,
        None if create => {
            let c = HostConfig {
                format: 1,
                chunk_size,
                encryption: ours,
            };
            repo.put_host_config(host, &c).await?;
            info!(host = %host, encrypted = ours.is_some(), "new host in the store");
            return Ok(Some(c));
        }
        None => return Ok(None),
    };
    if create && config.chunk_size != chunk_size {
        return Err(SessionError::ChunkSize {
            host: host.clone(),
            theirs: config.chunk_size,
            ours: chunk_size,
        });
    }
    match (config.encryption, ours) {
        (None, None) => {}
        (Some(t), None) => {
            return Err(SessionError::NeedKey {
                host: host.clone(),
                cipher: t.cipher.name(),
                key_id: t.key_id.to_string(),
            });
        }
        (None, Some(_)) => return Err(SessionError::NotEncrypted { host: host.clone() }),
        (Some(t), Some(o)) if t.key_id != o.key_id => {
            return Err(SessionError::WrongKey {
                host: host.clone(),
                theirs: t.key_id.to_string(),
                ours: o.key_id.to_string(),
            });
        }
        (Some(t), Some(o)) if t.cipher != o.cipher => {
            return Err(SessionError::Cipher {
                host: host.clone(),
                theirs: t.cipher.name(),
                ours: o.cipher.name(),
            });
        }
        (Some(_), Some(_)) => {}
    }
    Ok(Some(config))
}

/// What happened to one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The store already holds it (base point or this sync): nothing sent.
    Known,
    /// Sent: the blob's size and whether it was compressed.
    Stored { bytes: u64, compressed: bool },
}

/// Counts of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SessionStats {
    /// Chunks stored.
    pub chunks_stored: u64,
    /// Bytes stored (blob sizes).
    pub bytes_stored: u64,
    /// Plaintext bytes of the chunks stored.
    pub bytes_plain: u64,
    /// Chunks compressed.
    pub chunks_compressed: u64,
    /// Chunks not sent because the store held them.
    pub chunks_known: u64,
}

/// An open sync of one host.
#[derive(Debug)]
pub struct SyncSession {
    repo: Repo,
    host: HostId,
    sync: PointId,
    key: Option<Arc<StoreKey>>,
    compression: Option<i32>,
    base: Option<PointObject>,
    /// When the sync first took its lease (server clock).
    first: DateTime<Utc>,
    known: Mutex<HashSet<Digest>>,
    /// The chunks this sync stored (including those of earlier runs, from the journal).
    stored_ids: Mutex<HashSet<Digest>>,
    journal: Option<(PathBuf, Mutex<std::fs::File>)>,
    heartbeat: tokio::task::JoinHandle<()>,
    stored: AtomicU64,
    bytes_stored: AtomicU64,
    bytes_plain: AtomicU64,
    compressed: AtomicU64,
    known_hits: AtomicU64,
}

impl Drop for SyncSession {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

const JOURNAL_MAGIC: &str = "tern-object-journal 1";

impl SyncSession {
    /// Opens sync `sync` of `host`.
    pub async fn open(
        repo: Repo,
        host: HostId,
        sync: PointId,
        key: Option<Arc<StoreKey>>,
        opts: &SessionOptions,
    ) -> Result<Self, SessionError> {
        check_host_config(&repo, &host, key.as_deref(), opts.chunk_size, true).await?;

        // The lease comes before the listing of points (docs/object-mode.md, "GC").
        let before = repo.list_leases(Some(&host)).await?;
        let previous = before.iter().find(|l| l.sync == sync);
        let now = repo.put_lease(&host, &sync).await?;
        let ttl = chrono::Duration::from_std(opts.lease_ttl).unwrap_or(chrono::Duration::MAX);
        // The journal's chunks are safe only if the lease never lapsed: GC may have taken them
        // otherwise. Half the TTL leaves room for clocks and slow listings.
        let journal_trusted = previous.is_some_and(|p| now - p.last < ttl / 2);
        let first = match previous {
            Some(p) if journal_trusted => p.first.min(now),
            _ => now,
        };

        let points = repo.list_points(&host).await?;
        let base = points.last().cloned();
        let mut known = HashSet::new();
        if let Some(b) = &base {
            let m = repo.get_manifest(&host, &b.id).await?;
            known.extend(m.data_chunks());
        }
        let from_base = known.len();
        let mut stored_ids = HashSet::new();
        let journal = match &opts.journal {
            Some(path) => Some((
                path.clone(),
                Mutex::new(open_journal(path, &sync, journal_trusted, &mut stored_ids)?),
            )),
            None => None,
        };
        known.extend(stored_ids.iter().copied());
        info!(
            host = %host,
            sync = %sync,
            base = base.as_ref().map(|b| b.id.to_string()),
            known_from_base = from_base,
            known_from_journal = known.len() - from_base,
            "object sync opened"
        );

        let heartbeat = {
            let (repo, host, sync) = (repo.clone(), host.clone(), sync.clone());
            let every = (opts.lease_ttl / 4).max(Duration::from_secs(1));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match repo.put_lease(&host, &sync).await {
                        Ok(_) => debug!(host = %host, sync = %sync, "lease renewed"),
                        Err(e) => warn!(error = %crate::error_chain(&e), "failed to renew the lease"),
                    }
                }
            })
        };
        Ok(Self {
            repo,
            host,
            sync,
            key,
            compression: opts.compression,
            base,
            first,
            known: Mutex::new(known),
            stored_ids: Mutex::new(stored_ids),
            journal,
            heartbeat,
            stored: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            bytes_plain: AtomicU64::new(0),
            compressed: AtomicU64::new(0),
            known_hits: AtomicU64::new(0),
        })
    }

    /// The base point: the newest point when the session opened.
    pub fn base(&self) -> Option<&PointObject> {
        self.base.as_ref()
    }

    /// The chunk id of `data` in this store (keyed when encrypted).
    pub fn chunk_id(&self, data: &[u8]) -> Digest {
        blob::chunk_id(data, self.key.as_deref())
    }

    /// The key, when the store is encrypted.
    pub fn key(&self) -> Option<&Arc<StoreKey>> {
        self.key.as_ref()
    }

    /// Stores chunk `id` (plaintext `data`) unless the store holds it or this sync is storing
    /// it right now.
    pub async fn put_chunk(&self, id: Digest, data: Bytes) -> Result<PutOutcome, SessionError> {
        // Claimed before the PUT, so that an identical chunk in flight at the same time is not
        // sent twice. If the PUT fails the claim is dropped; the failure fails the sync, so no
        // manifest can name a chunk that was only claimed.
        if !self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id)
        {
            self.known_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(PutOutcome::Known);
        }
        let result = self.store_chunk(id, data).await;
        if result.is_err() {
            self.known
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        }
        result
    }

    async fn store_chunk(&self, id: Digest, data: Bytes) -> Result<PutOutcome, SessionError> {
        let key = self.key.clone();
        let level = self.compression;
        let plain_len = data.len() as u64;
        let (blob, enc) =
            tokio::task::spawn_blocking(move || blob::encode(&id, &data, key.as_deref(), level))
                .await
                .map_err(SessionError::Task)?
                .map_err(|source| SessionError::Blob { id, source })?;
        let bytes = blob.len() as u64;
        self.repo.put_chunk(&id, Bytes::from(blob)).await?;
        self.stored_ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id);
        if let Some((path, f)) = &self.journal {
            let mut f = f.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            writeln!(f, "{}", id.to_hex()).map_err(|source| SessionError::Journal {
                path: path.display().to_string(),
                source,
            })?;
        }
        self.stored.fetch_add(1, Ordering::Relaxed);
        self.bytes_stored.fetch_add(bytes, Ordering::Relaxed);
        self.bytes_plain.fetch_add(plain_len, Ordering::Relaxed);
        if enc.compressed {
            self.compressed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(PutOutcome::Stored {
            bytes,
            compressed: enc.compressed,
        })
    }

    /// Writes the manifest (every chunk it names must have been stored or known) and releases
    /// the lease. Idempotent.
    pub async fn commit(&self, manifest: &Manifest) -> Result<(), SessionError> {
        if manifest.host_id != self.host || manifest.point_id != self.sync {
            return Err(SessionError::WrongManifest {
                host: manifest.host_id.clone(),
                point: manifest.point_id.clone(),
            });
        }
        self.check_gc_overlap().await?;
        self.repo.put_manifest(manifest).await?;
        self.heartbeat.abort();
        if let Err(e) = self.repo.delete_leases(&self.host, &self.sync).await {
            // A stale lease only delays GC until it expires.
            warn!(error = %crate::error_chain(&e), "failed to release the lease");
        }
        if let Some((path, _)) = &self.journal {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    /// Counts so far.
    pub fn stats(&self) -> SessionStats {
        SessionStats {
            chunks_stored: self.stored.load(Ordering::Relaxed),
            bytes_stored: self.bytes_stored.load(Ordering::Relaxed),
            bytes_plain: self.bytes_plain.load(Ordering::Relaxed),
            chunks_compressed: self.compressed.load(Ordering::Relaxed),
            chunks_known: self.known_hits.load(Ordering::Relaxed),
        }
    }

    /// Before the manifest is written: a GC run that overlapped this sync may have listed a
    /// chunk before this sync stored it again and deleted it after (content addressing makes
    /// that the same key). Wait for the GCs that started before now (every chunk PUT of this
    /// sync has been acknowledged), then check that every chunk this sync stored still exists.
    /// A GC that starts after now lists chunks after all of them were stored, and sees the
    /// lease: it keeps them (docs/object-mode.md). Not waiting for those also means a GC run
    /// after run cannot starve the commit.
    async fn check_gc_overlap(&self) -> Result<(), SessionError> {
        use futures::StreamExt;
        /// A run silent for this long has crashed (it says it is alive every minute).
        const GC_SILENT: chrono::Duration = chrono::Duration::minutes(5);
        let wait_until = tokio::time::Instant::now() + Duration::from_secs(600);
        let mut pause = Duration::from_millis(20);
        // The server's clock now (renewing the lease on the way).
        let checked_at = self.repo.put_lease(&self.host, &self.sync).await?;
        loop {
            let runs = self.repo.list_gc_runs().await?;
            let relevant: Vec<_> = runs
                .iter()
                .filter(|r| r.started <= checked_at && r.done.is_none_or(|d| d >= self.first))
                .collect();
            if relevant.is_empty() {
                return Ok(());
            }
            if relevant.iter().any(|r| r.done.is_none()) {
                // The server's clock now (renewing the lease on the way).
                let now = self.repo.put_lease(&self.host, &self.sync).await?;
                let running = relevant
                    .iter()
                    .any(|r| r.done.is_none() && now - r.alive < GC_SILENT);
                if running {
                    if tokio::time::Instant::now() > wait_until {
                        return Err(SessionError::GcRunning);
                    }
                    info!("a garbage collection is running; the commit waits for it");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            let ids: Vec<Digest> = self
                .stored_ids
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .copied()
                .collect();
            info!(
                chunks = ids.len(),
                "a garbage collection overlapped this sync: checking its chunks"
            );
            let results: Vec<_> = futures::stream::iter(ids)
                .map(|id| async move { self.repo.has_chunk(&id).await.map(|ok| (id, ok)) })
                .buffer_unordered(16)
                .collect()
                .await;
            let mut missing = 0;
            for r in results {
                let (id, ok) = r?;
                if !ok {
                    missing += 1;
                    self.known
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&id);
                }
            }
            if missing > 0 {
                // The journal would vouch for them on the next run: forget it.
                if let Some((path, _)) = &self.journal {
                    let _ = std::fs::remove_file(path);
                }
                warn!(missing, "chunks of this sync were garbage collected");
                return Err(SessionError::ChunksLost { missing });
            }
            return Ok(());
        }
    }
}

/// Opens the journal of `sync`: its entries join `stored` when `trusted`, else it starts over.
fn open_journal(
    path: &Path,
    sync: &PointId,
    trusted: bool,
    stored: &mut HashSet<Digest>,
) -> Result<std::fs::File, SessionError> {
    let err = |source| SessionError::Journal {
        path: path.display().to_string(),
        source,
    };
    let header = format!("{JOURNAL_MAGIC} {sync}");
    if trusted && let Ok(f) = std::fs::File::open(path) {
        let mut lines = std::io::BufReader::new(f).lines();
        if lines.next().and_then(Result::ok).as_deref() == Some(header.as_str()) {
            // A torn last line (crash mid-write) is simply not a digest.
            stored.extend(
                lines
                    .map_while(Result::ok)
                    .filter_map(|l| Digest::from_hex(l.trim())),
            );
            return std::fs::OpenOptions::new().append(true).open(path).map_err(err);
        }
    }
    let mut f = std::fs::File::create(path).map_err(err)?;
    writeln!(f, "{header}").map_err(err)?;
    Ok(f)
}
