//! The restore engine: a recovery point's disk from object storage to a block device or file.
//!
//! - Chunks are fetched with a bounded window of parallel GETs, decrypted, decompressed and
//!   verified against their id (`tern_core::object::blob::decode`) before a byte is written;
//!   writes go through the same I/O engine as the gateway (io_uring where available).
//! - Zero chunks are not fetched: the range is punched or zeroed (`Volume::write_zeroes`).
//! - Resumable: every few seconds the volume is synced and then the indices of the chunks
//!   written since are appended to a journal; a re-run skips them. The journal names the host,
//!   point and disk, so a journal of another restore is never trusted.
//! - A missing or corrupted chunk stops the restore with an error naming the chunk, the disk
//!   and the offset; the summary counts only verified, written and synced chunks.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tern_core::io::{EngineConfig, IoError, Volume};
use tern_core::object::blob::{self, BlobError};
use tern_core::object::repo::RepoError;
use tern_core::object::session::{SessionError, check_host_config};
use tern_core::object::{Repo, StoreKey};
use tern_core::{ChunkRef, Digest, DiskId, Manifest};
use tracing::{info, warn};

/// Why a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("point {point} has no disk {disk}")]
    NoDisk { point: String, disk: DiskId },
    #[error("the key does not fit the host's store")]
    Key(#[source] SessionError),
    #[error("failed to prepare {path}")]
    Output {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {size} bytes; disk {disk} needs {needed}")]
    TooSmall {
        path: String,
        disk: DiskId,
        size: u64,
        needed: u64,
    },
    #[error("failed to write {path}")]
    Io {
        path: String,
        #[source]
        source: IoError,
    },
    #[error("chunk {id} of disk {disk} at offset {offset} could not be read from the store")]
    Fetch {
        id: Digest,
        disk: DiskId,
        offset: u64,
        #[source]
        source: Box<RepoError>,
    },
    #[error("chunk {id} of disk {disk} at offset {offset} is invalid")]
    Invalid {
        id: Digest,
        disk: DiskId,
        offset: u64,
        #[source]
        source: BlobError,
    },
    #[error("chunk {id} of disk {disk} at offset {offset} holds {got} bytes, the manifest says {expected}")]
    Length {
        id: Digest,
        disk: DiskId,
        offset: u64,
        got: usize,
        expected: u64,
    },
    #[error("failed to keep the restore journal {path}")]
    Journal {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("a restore task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Chunks fetched (and held in memory) at once.
    pub window: usize,
    /// The I/O engine.
    pub engine: EngineConfig,
    /// The resume journal (default: OUTPUT.tern-restore next to a file, and
    /// [`BLOCK_JOURNAL_DIR`]/HOST.POINT.DISK.tern-restore for a block device).
    pub journal: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
    /// Counts the bytes written or zeroed as they land (a watchdog's sign of progress).
    pub counter: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// How a disk's restore went (printed as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct RestoreSummary {
    /// Host.
    pub host: String,
    /// Point.
    pub point: String,
    /// Disk.
    pub disk: String,
    /// Where it was written.
    pub output: String,
    /// Disk size in bytes.
    pub size: u64,
    /// Chunks in the disk.
    pub chunks: u64,
    /// Data chunks fetched, verified and written by this run.
    pub chunks_restored: u64,
    /// Zero chunks punched or zeroed by this run.
    pub chunks_zero: u64,
    /// Chunks a previous, interrupted run had already restored.
    pub chunks_resumed: u64,
    /// Blob bytes fetched.
    pub bytes_fetched: u64,
    /// Plaintext bytes written.
    pub bytes_written: u64,
    /// The I/O engine used.
    pub engine: String,
    /// Wall time, seconds.
    pub duration_s: f64,
}

const JOURNAL_MAGIC: &str = "tern-restore-journal 1";
/// Where the journals of restores to block devices go unless `--journal` says otherwise.
pub const BLOCK_JOURNAL_DIR: &str = "/var/lib/tern-recovery-helper";
/// How often written chunks are synced and journaled.
const JOURNAL_EVERY: Duration = Duration::from_secs(2);

/// Opens (creating a file if needed) the output and checks its size.
fn prepare_output(path: &Path, size: u64) -> Result<(), RestoreError> {
    let err = |source| RestoreError::Output {
        path: path.display().to_string(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_file() => {
            if m.len() != size {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| f.set_len(size))
                    .map_err(err)?;
            }
            Ok(())
        }
        Ok(_) => Ok(()), // a block device: its size is checked once opened
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = std::fs::File::create_new(path).map_err(err)?;
            f.set_len(size).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Reads the journal's done chunks (when it belongs to this restore) and opens it for
/// appending.
fn open_journal(path: &Path, header: &str) -> Result<(std::fs::File, HashSet<u64>), RestoreError> {
    let err = |source| RestoreError::Journal {
        path: path.display().to_string(),
        source,
    };
    if let Ok(f) = std::fs::File::open(path) {
        let mut lines = std::io::BufReader::new(f).lines();
        if lines.next().and_then(Result::ok).as_deref() == Some(header) {
            let done = lines
                .map_while(Result::ok)
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            let f = std::fs::OpenOptions::new().append(true).open(path).map_err(err)?;
            return Ok((f, done));
        }
        warn!(journal = %path.display(), "the journal belongs to another restore; starting over");
    }
    let mut f = std::fs::File::create(path).map_err(err)?;
    writeln!(f, "{header}").map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok((f, HashSet::new()))
}

enum Done {
    Data { index: u64, fetched: u64, written: u64 },
    Zero { index: u64 },
}

/// Restores disk `disk` of `manifest` from `repo` to `output`.
pub async fn restore_disk(
    repo: &Repo,
    key: Option<Arc<StoreKey>>,
    manifest: &Manifest,
    disk: &DiskId,
    output: &Path,
    opts: &RestoreOptions,
) -> Result<RestoreSummary, RestoreError> {
    let started = Instant::now();
    let d = manifest.disk(disk).ok_or_else(|| RestoreError::NoDisk {
        point: manifest.point_id.to_string(),
        disk: disk.clone(),
    })?;
    // A wrong or missing key is refused before anything is written.
    check_host_config(
        repo,
        &manifest.host_id,
        key.as_deref(),
        d.geometry.chunk_size(),
        false,
    )
    .await
    .map_err(RestoreError::Key)?;
    let geometry = d.geometry;
    prepare_output(output, geometry.size())?;
    let mut engine = opts.engine.clone();
    let window = opts.window.max(1);
    let chunk = geometry.chunk_size() as usize;
    engine.buffer_bytes = engine.buffer_bytes.max((window * chunk).next_multiple_of(4096));
    let volume = Arc::new(
        Volume::open(output, true, &engine).map_err(|source| RestoreError::Io {
            path: output.display().to_string(),
            source,
        })?,
    );
    if volume.size() < geometry.size() {
        return Err(RestoreError::TooSmall {
            path: output.display().to_string(),
            disk: disk.clone(),
            size: volume.size(),
            needed: geometry.size(),
        });
    }
    let journal_path = match &opts.journal {
        Some(p) => p.clone(),
        // Not next to a block device (its directory is /dev).
        None if volume.is_block_device() => {
            let dir = Path::new(BLOCK_JOURNAL_DIR);
            std::fs::create_dir_all(dir).map_err(|source| RestoreError::Journal {
                path: dir.display().to_string(),
                source,
            })?;
            dir.join(format!(
                "{}.{}.{}.tern-restore",
                manifest.host_id, manifest.point_id, disk
            ))
        }
        None => {
            let mut p = output.as_os_str().to_owned();
            p.push(".tern-restore");
            PathBuf::from(p)
        }
    };
    let header = format!(
        "{JOURNAL_MAGIC} {} {} {} {}",
        manifest.host_id,
        manifest.point_id,
        disk,
        geometry.chunk_count()
    );
    let (mut journal, done_before) = open_journal(&journal_path, &header)?;
    let jerr = |source| RestoreError::Journal {
        path: journal_path.display().to_string(),
        source,
    };
    let resumed = done_before.len() as u64;
    if resumed > 0 {
        info!(disk = %disk, chunks = resumed, "resuming: chunks restored by an earlier run are skipped");
    }
    let bar = if opts.progress {
        indicatif::ProgressBar::new(geometry.size())
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_prefix(disk.to_string());

    let work = d
        .chunks
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u64, *c))
        .filter(|(i, _)| !done_before.contains(i))
        .collect::<Vec<_>>();
    bar.inc(
        done_before
            .iter()
            .filter(|&&i| i < geometry.chunk_count())
            .map(|&i| u64::from(geometry.chunk_len(i)))
            .sum(),
    );

    let tasks = futures::stream::iter(work.into_iter().map(|(index, c)| {
        let volume = volume.clone();
        let key = key.clone();
        let disk = disk.clone();
        let repo = repo.clone();
        async move {
            let range = geometry.chunk_range(index);
            let offset = range.start;
            let len = range.end - range.start;
            let ioerr = |source| RestoreError::Io {
                path: volume.path().display().to_string(),
                source,
            };
            match c {
                ChunkRef::Zero => {
                    volume.write_zeroes(offset, len).await.map_err(ioerr)?;
                    Ok(Done::Zero { index })
                }
                ChunkRef::Data(id) => {
                    let blob = repo.get_chunk(&id).await.map_err(|source| RestoreError::Fetch {
                        id,
                        disk: disk.clone(),
                        offset,
                        source: Box::new(source),
                    })?;
                    let fetched = blob.len() as u64;
                    let plain = tokio::task::spawn_blocking(move || blob::decode(&id, &blob, key.as_deref()))
                        .await
                        .map_err(RestoreError::Task)?
                        .map_err(|source| RestoreError::Invalid {
                            id,
                            disk: disk.clone(),
                            offset,
                            source,
                        })?;
                    if plain.len() as u64 != len {
                        return Err(RestoreError::Length {
                            id,
                            disk,
                            offset,
                            got: plain.len(),
                            expected: len,
                        });
                    }
                    let mut buf = volume.alloc(plain.len()).await.map_err(ioerr)?;
                    buf.copy_from_slice(&plain);
                    drop(plain);
                    volume.write_at(buf, offset).await.map_err(ioerr)?;
                    Ok(Done::Data {
                        index,
                        fetched,
                        written: len,
                    })
                }
            }
        }
    }))
    .buffer_unordered(window);
    let mut tasks = Box::pin(tasks);

    let mut summary = RestoreSummary {
        host: manifest.host_id.to_string(),
        point: manifest.point_id.to_string(),
        disk: disk.to_string(),
        output: output.display().to_string(),
        size: geometry.size(),
        chunks: geometry.chunk_count(),
        chunks_restored: 0,
        chunks_zero: 0,
        chunks_resumed: resumed,
        bytes_fetched: 0,
        bytes_written: 0,
        engine: volume.kind().to_string(),
        duration_s: 0.0,
    };
    let mut unsynced: Vec<u64> = Vec::new();
    let mut last_sync = Instant::now();
    let ioerr = |source| RestoreError::Io {
        path: output.display().to_string(),
        source,
    };
    let count = |n: u64| {
        if let Some(c) = &opts.counter {
            c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let mut failure = None;
    while let Some(r) = tasks.next().await {
        match r {
            Ok(Done::Data {
                index,
                fetched,
                written,
            }) => {
                summary.chunks_restored += 1;
                summary.bytes_fetched += fetched;
                summary.bytes_written += written;
                bar.inc(written);
                count(written);
                unsynced.push(index);
            }
            Ok(Done::Zero { index }) => {
                summary.chunks_zero += 1;
                bar.inc(u64::from(geometry.chunk_len(index)));
                count(u64::from(geometry.chunk_len(index)));
                unsynced.push(index);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
        if last_sync.elapsed() >= JOURNAL_EVERY {
            volume.sync_data().await.map_err(ioerr)?;
            for i in unsynced.drain(..) {
                writeln!(journal, "{i}").map_err(jerr)?;
            }
            journal.flush().map_err(jerr)?;
            last_sync = Instant::now();
        }
    }
    drop(tasks);
    // What was written is kept for the next run even when a chunk failed.
    volume.sync_data().await.map_err(ioerr)?;
    for i in unsynced.drain(..) {
        writeln!(journal, "{i}").map_err(jerr)?;
    }
    journal.sync_all().map_err(jerr)?;
    bar.finish_and_clear();
    if let Some(e) = failure {
        return Err(e);
    }
    drop(journal);
    std::fs::remove_file(&journal_path).map_err(jerr)?;
    summary.duration_s = started.elapsed().as_secs_f64();
    info!(
        disk = %disk,
        restored = summary.chunks_restored,
        zero = summary.chunks_zero,
        resumed = summary.chunks_resumed,
        duration_s = format!("{:.1}", summary.duration_s),
        "disk restored"
    );
    Ok(summary)
}
