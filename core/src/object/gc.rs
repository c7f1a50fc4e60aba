//! Pruning (retention) and garbage collection of a store, safe while syncs run.
//!
//! The argument is written out in `docs/object-mode.md`; in short:
//! - a sync reuses chunks only from the newest point of its host, listed after it took its
//!   lease, and prune never deletes a host's newest point;
//! - GC reads the server clock, then the leases, then the manifests, then the chunks, and
//!   deletes a chunk only when no manifest it read names it and the chunk is older than the
//!   oldest live lease and than the GC's own start, minus a grace period.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::{info, warn};

use crate::{Digest, HostId, PointId};

use super::repo::{GcRun, Repo, RepoError};
use super::retention::{Candidate, Retention, select};

/// Why pruning or GC stopped.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("GC could not renew its run marker for minutes and stopped deleting; try again later")]
    LostContact,
    #[error("the points of host {host} kept changing while GC read them; try again later")]
    Busy { host: HostId },
    #[error(
        "manifest of host {host} point {point} is unreadable: GC cannot know what it needs and refuses to run"
    )]
    Unreadable {
        host: HostId,
        point: PointId,
        #[source]
        source: RepoError,
    },
}

/// What a prune did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// The host.
    pub host: String,
    /// Points kept.
    pub kept: Vec<String>,
    /// Points deleted (or that would be, in a dry run).
    pub removed: Vec<String>,
    /// True when nothing was deleted on purpose.
    pub dry_run: bool,
}

/// Applies `policy` to `host`'s points: deletes the manifests it does not keep.
pub async fn prune(
    repo: &Repo,
    host: &HostId,
    policy: &Retention,
    dry_run: bool,
) -> Result<PruneReport, GcError> {
    let points = repo.list_points(host).await?;
    let mut report = PruneReport {
        host: host.to_string(),
        dry_run,
        ..Default::default()
    };
    if points.is_empty() {
        return Ok(report);
    }
    let mut candidates = Vec::with_capacity(points.len());
    for p in &points {
        // The manifest's own creation time; an unreadable manifest is kept (never pruned by
        // a time we cannot know), and reported.
        let created = match repo.get_manifest(host, &p.id).await {
            Ok(m) => m.created_unix_ms,
            Err(e) => {
                warn!(host = %host, point = %p.id, error = %crate::error_chain(&e), "unreadable manifest kept");
                u64::MAX
            }
        };
        candidates.push(Candidate {
            created_unix_ms: created,
        });
    }
    let mut keep = select(&candidates, policy);
    // The newest point by listing order (what a sync uses as its base) is never pruned, even if
    // its manifest claims an older creation time.
    if let Some(k) = keep.last_mut() {
        *k = true;
    }
    for (p, k) in points.iter().zip(keep) {
        if k {
            report.kept.push(p.id.to_string());
        } else {
            if !dry_run {
                repo.delete_manifest(host, &p.id).await?;
            }
            report.removed.push(p.id.to_string());
        }
    }
    info!(host = %host, kept = report.kept.len(), removed = report.removed.len(), dry_run, "pruned");
    Ok(report)
}

/// Adds the chunks of every point of `host` to `referenced`; returns the manifests read.
///
/// A manifest listed but gone when read was pruned; the point that made it prunable (a newer
/// one, possibly committed after the listing) must then be read too, so the host is listed
/// again until a pass finds every listed manifest.
async fn mark_host(repo: &Repo, host: &HostId, referenced: &mut HashSet<Digest>) -> Result<usize, GcError> {
    const PASSES: usize = 16;
    let mut read: HashSet<PointId> = HashSet::new();
    for _ in 0..PASSES {
        let mut vanished = false;
        for p in repo.list_points(host).await? {
            if read.contains(&p.id) {
                continue;
            }
            match repo.get_manifest(host, &p.id).await {
                Ok(m) => {
                    referenced.extend(m.data_chunks());
                    read.insert(p.id);
                }
                Err(e) if e.is_not_found() => vanished = true,
                Err(source) => {
                    return Err(GcError::Unreadable {
                        host: host.clone(),
                        point: p.id,
                        source,
                    });
                }
            }
        }
        if !vanished {
            return Ok(read.len());
        }
    }
    Err(GcError::Busy { host: host.clone() })
}

/// GC settings.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Chunks younger than this (before the oldest live lease or the GC start) are kept:
    /// covers clock granularity and in-flight uploads whose lease the listing missed.
    pub grace: Duration,
    /// A lease not renewed for this long is dead (its sync was abandoned).
    pub lease_ttl: Duration,
    /// Report only.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(3600),
            lease_ttl: Duration::from_secs(48 * 3600),
            dry_run: false,
        }
    }
}

/// What a GC run did.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    /// Server time at the start.
    pub started: DateTime<Utc>,
    /// Chunks older than this could be deleted.
    pub cutoff: DateTime<Utc>,
    /// Live leases found (running syncs).
    pub live_leases: usize,
    /// Manifests read.
    pub manifests: usize,
    /// Distinct chunks they reference.
    pub referenced: usize,
    /// Chunks listed.
    pub chunks: usize,
    /// Unreferenced chunks kept because they are recent.
    pub kept_recent: usize,
    /// Chunks deleted (or that would be).
    pub deleted: usize,
    /// Their stored bytes.
    pub bytes_deleted: u64,
    /// Referenced chunks missing from the store (should be 0: a damaged store).
    pub missing: usize,
    /// True when nothing was deleted on purpose.
    pub dry_run: bool,
}

/// How often a running GC says it is alive.
pub const GC_ALIVE_EVERY: Duration = Duration::from_secs(60);

/// Deletes the chunks no point needs and no running sync may need.
pub async fn collect_garbage(repo: &Repo, opts: &GcOptions) -> Result<GcReport, GcError> {
    // 1. The announcement (and clock), 2. the leases, 3. the manifests, 4. the chunks: this
    // order is the proof.
    let run = repo.start_gc_run().await?;
    let last_alive = Arc::new(Mutex::new(Instant::now()));
    let alive = {
        let (repo, run, last_alive) = (repo.clone(), run.clone(), last_alive.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(GC_ALIVE_EVERY).await;
                match repo.gc_run_alive(&run).await {
                    Ok(()) => *last_alive.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now(),
                    Err(e) => warn!(error = %crate::error_chain(&e), "failed to renew the GC run marker"),
                }
            }
        })
    };
    let result = collect(repo, opts, &run, &last_alive).await;
    alive.abort();
    // Finished, also when it failed: syncs waiting for it may go on.
    let finished = repo.finish_gc_run(&run).await;
    let report = result?;
    finished?;
    Ok(report)
}

async fn collect(
    repo: &Repo,
    opts: &GcOptions,
    run: &GcRun,
    last_alive: &Mutex<Instant>,
) -> Result<GcReport, GcError> {
    let started = run.started;
    let ttl = chrono::Duration::from_std(opts.lease_ttl).unwrap_or(chrono::Duration::MAX);
    let grace = chrono::Duration::from_std(opts.grace).unwrap_or(chrono::Duration::MAX);
    let leases = repo.list_leases(None).await?;
    let live: Vec<_> = leases.iter().filter(|l| started - l.last < ttl).collect();
    for l in leases.iter().filter(|l| started - l.last >= ttl) {
        warn!(host = %l.host, sync = %l.sync, last = %l.last, "ignoring an expired lease (abandoned sync)");
    }
    let oldest = live.iter().map(|l| l.first).min().unwrap_or(started).min(started);
    let cutoff = oldest
        .checked_sub_signed(grace)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);

    let mut referenced: HashSet<Digest> = HashSet::new();
    let mut manifests = 0;
    for host in repo.list_hosts().await? {
        manifests += mark_host(repo, &host, &mut referenced).await?;
    }

    let chunks = repo.list_chunks().await?;
    let present: HashSet<Digest> = chunks.iter().map(|c| c.id).collect();
    let missing = referenced.iter().filter(|d| !present.contains(d)).count();
    if missing > 0 {
        warn!(missing, "points reference chunks the store does not hold");
    }
    let mut doomed = Vec::new();
    let mut kept_recent = 0;
    let mut bytes_deleted = 0;
    for c in chunks.iter().filter(|c| !referenced.contains(&c.id)) {
        if c.last_modified < cutoff {
            bytes_deleted += c.size;
            doomed.push(c.key.clone());
        } else {
            kept_recent += 1;
        }
    }
    let deleted = doomed.len();
    if !opts.dry_run {
        for batch in doomed.chunks(1000) {
            // Syncs take a run silent for 5 minutes for crashed and stop waiting for it: a run
            // that could not say it is alive for half of that stops deleting.
            if last_alive
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .elapsed()
                > GC_ALIVE_EVERY * 5 / 2
            {
                return Err(GcError::LostContact);
            }
            repo.delete_keys(batch.to_vec()).await?;
        }
    }
    // Markers of finished runs are kept for two lease TTLs: a sync that overlapped a run must
    // still see it when it commits.
    let keep_for = ttl.checked_mul(2).unwrap_or(chrono::Duration::MAX);
    for old in repo
        .list_gc_runs()
        .await?
        .iter()
        .filter(|r| r.done.is_some() && started - r.started > keep_for)
    {
        repo.delete_gc_run(old).await?;
    }
    let report = GcReport {
        started,
        cutoff,
        live_leases: live.len(),
        manifests,
        referenced: referenced.len(),
        chunks: chunks.len(),
        kept_recent,
        deleted,
        bytes_deleted,
        missing,
        dry_run: opts.dry_run,
    };
    info!(
        manifests,
        chunks = report.chunks,
        deleted,
        bytes_deleted,
        kept_recent,
        live_leases = report.live_leases,
        dry_run = opts.dry_run,
        "garbage collected"
    );
    Ok(report)
}
