//! What a sync reads a disk from, and what tells it which ranges changed.
//!
//! - [`SourceSpec::Path`]: a block device or raw image file on this host (the agent on the
//!   protected host itself).
//! - [`SourceSpec::Nbd`]: an NBD export (the agent as a *sync proxy* reading a host from outside:
//!   a QEMU/KVM guest's disk exported by `qemu-nbd` or QEMU's NBD server, with an optional
//!   persistent dirty bitmap).
//! - [`SourceSpec::Rbd`]: a Ceph RBD image: a snapshot per sync, read over NBD (a private
//!   `qemu-nbd` with QEMU's librbd driver), changes from `rbd export-diff`.
//! - [`SourceSpec::Qmp`]: a disk of a running QEMU guest: a point-in-time export set up through
//!   QMP (fleecing), with dirty bitmaps switched at that instant ([`crate::qmp`]).
//!
//! A source may come with a [`Tracker`], which names the disk's current state with a *change
//! token* (recorded with the point this sync makes, in the block-values file) and, given the
//! token of the previous point, lists the ranges changed since ([`ChangeMap`]). The engine uses
//! the list only when its block values describe the latest point *and* carry that token;
//! otherwise it reads the whole disk (allocated extents only where the source reports holes).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use tern_core::changes::ChangeMap;
use tern_core::{DiskId, PointId};

use crate::nbd::{BitmapTracker, NbdDisk, NbdOptions, NbdSpec};
use crate::qmp::{LiveExport, QmpSpec};
use crate::rbd::{RbdOptions, RbdSpec, RbdTracker};
use crate::source::{Source, SourceError};

/// Where a disk is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A block device or raw image file.
    Path(PathBuf),
    /// An NBD export.
    Nbd(NbdSpec),
    /// A Ceph RBD image.
    Rbd(RbdSpec),
    /// A disk of a running QEMU, through its QMP socket.
    Qmp(QmpSpec),
}

impl SourceSpec {
    /// Parses the source part of `--disk ID=SOURCE`: an `nbd://`, `nbds://`, `nbd+unix://` or
    /// `nbds+unix://` URI, `rbd:POOL/IMAGE`, else a path.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty source".into());
        }
        if let Some(r) = RbdSpec::parse(s) {
            return r.map(SourceSpec::Rbd);
        }
        if let Some(q) = QmpSpec::parse(s) {
            return q.map(SourceSpec::Qmp);
        }
        if NbdSpec::is_uri(s) {
            return NbdSpec::parse(s).map(SourceSpec::Nbd);
        }
        Ok(SourceSpec::Path(PathBuf::from(s)))
    }

    /// For logs and summaries: the path or the URI.
    pub fn describe(&self) -> String {
        match self {
            SourceSpec::Path(p) => p.display().to_string(),
            SourceSpec::Nbd(n) => n.uri.clone(),
            SourceSpec::Rbd(r) => format!("rbd:{}", r.name()),
            SourceSpec::Qmp(q) => format!("qmp:{}?node={}", q.socket.display(), q.node),
        }
    }
}

/// An open disk.
#[derive(Debug)]
pub enum DiskReader {
    /// A local block device or file.
    File(Source),
    /// An NBD export (also an RBD snapshot served by `qemu-nbd`).
    Nbd(NbdDisk),
}

impl DiskReader {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            DiskReader::File(s) => s.size(),
            DiskReader::Nbd(n) => n.size(),
        }
    }

    /// For an NBD disk: the connections reads are spread over.
    pub fn nbd_connections(&self) -> Option<usize> {
        match self {
            DiskReader::File(_) => None,
            DiskReader::Nbd(n) => Some(n.connections()),
        }
    }

    /// The parts of `range` that may hold data, rounded out to 4 KiB: the rest reads as zeros
    /// and is not read (see [`Source::data_segments`]).
    pub fn data_segments(&self, range: Range<u64>) -> Result<Vec<Range<u64>>, SourceError> {
        match self {
            DiskReader::File(s) => s.data_segments(range),
            DiskReader::Nbd(n) => Ok(n.data_segments(range)),
        }
    }

    /// Reads `buf.len()` bytes at `offset` (4 KiB-aligned offset, length and memory), or up to
    /// the end of the disk; returns the count read. Called on the blocking pool.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, SourceError> {
        match self {
            DiskReader::File(s) => s.read_at(buf, offset),
            DiskReader::Nbd(n) => n.read_at(buf, offset),
        }
    }
}

/// Tells which ranges of a disk changed since an earlier state.
#[derive(Debug)]
pub enum Tracker {
    /// A QEMU dirty bitmap read over NBD (`qemu:dirty-bitmap:NAME`).
    Bitmap(BitmapTracker),
    /// RBD snapshot diffs.
    Rbd(RbdTracker),
    /// A live QEMU guest's dirty bitmap, on its point-in-time export.
    Live {
        /// The exported bitmap.
        bitmap: BitmapTracker,
        /// The export, to tear down and to settle the bitmaps after the sync.
        export: Arc<tokio::sync::Mutex<LiveExport>>,
    },
}

impl Tracker {
    /// The token recorded with the point this sync makes.
    pub fn next_token(&self) -> &str {
        match self {
            Tracker::Bitmap(b) => b.next_token(),
            Tracker::Rbd(r) => r.next_token(),
            Tracker::Live { bitmap, .. } => bitmap.next_token(),
        }
    }

    /// For logs and summaries (`dirty-bitmap:b0`).
    pub fn describe(&self) -> String {
        match self {
            Tracker::Bitmap(b) => b.describe(),
            Tracker::Rbd(r) => r.describe(),
            Tracker::Live { bitmap, .. } => bitmap.describe(),
        }
    }

    /// After the point is committed (and the token installed): drops what the previous point
    /// needed (older RBD snapshots). Failures are only logged.
    pub async fn after_commit(&self) {
        match self {
            Tracker::Rbd(r) => r.after_commit().await,
            Tracker::Live { bitmap, export } => {
                bitmap.close().await;
                export.lock().await.after_commit().await
            }
            Tracker::Bitmap(_) => {}
        }
    }

    /// The ranges changed since the state named `token`, or `None` when this tracker does not
    /// know that state (the disk must then be read whole).
    pub async fn changes_since(&self, token: &str) -> Result<Option<ChangeMap>, SourceError> {
        match self {
            Tracker::Bitmap(b) => b.changes_since(token).await,
            Tracker::Rbd(t) => t.changes_since(token).await,
            Tracker::Live { bitmap, .. } => bitmap.changes_since(token).await,
        }
    }
}

/// An open disk and its change tracker, if any.
#[derive(Debug)]
pub struct OpenedDisk {
    /// Reads the disk.
    pub reader: DiskReader,
    /// Lists changes, when the source has a tracker.
    pub tracker: Option<Tracker>,
}

/// Options shared by the sources of one sync.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// NBD connection settings (TLS trust, timeouts).
    pub nbd: NbdOptions,
    /// Ceph cluster settings for RBD images.
    pub rbd: RbdOptions,
}

/// What a source may need to know about the sync that opens it.
#[derive(Debug, Clone)]
pub struct OpenContext {
    /// The sync (an RBD snapshot is named after it).
    pub sync: PointId,
    /// The disk.
    pub disk: DiskId,
    /// A directory for the source's sockets and fleecing images (the host's state directory).
    pub run_dir: PathBuf,
    /// The latest point's change token for this disk, when the agent's block values describe
    /// that point (a live export freezes the bitmap it names).
    pub token: Option<String>,
    /// Live exports opened for this sync: the engine settles their bitmaps if the sync fails.
    pub live: Arc<std::sync::Mutex<Vec<Arc<tokio::sync::Mutex<LiveExport>>>>>,
}

/// Opens `spec` for the sync of `ctx`.
pub async fn open(
    spec: &SourceSpec,
    opts: &SourceOptions,
    ctx: &OpenContext,
) -> Result<OpenedDisk, SourceError> {
    match spec {
        SourceSpec::Path(p) => {
            let path = p.clone();
            let source = tokio::task::spawn_blocking(move || Source::open(&path))
                .await
                .map_err(|e| SourceError::Io {
                    op: "open",
                    path: p.clone(),
                    source: std::io::Error::other(e),
                })??;
            Ok(OpenedDisk {
                reader: DiskReader::File(source),
                tracker: None,
            })
        }
        SourceSpec::Nbd(n) => {
            let (disk, tracker) = crate::nbd::open(n, &opts.nbd).await?;
            Ok(OpenedDisk {
                reader: DiskReader::Nbd(disk),
                tracker: tracker.map(Tracker::Bitmap),
            })
        }
        SourceSpec::Qmp(q) => {
            let export = LiveExport::start(
                q,
                ctx.disk.as_str(),
                ctx.sync.as_str(),
                ctx.token.as_deref(),
                &ctx.run_dir,
            )
            .await?;
            let spec = NbdSpec {
                uri: export.uri.clone(),
                bitmap: export.bitmap().map(str::to_owned),
                next_bitmap: Some(export.next_token().to_owned()),
            };
            let export = Arc::new(tokio::sync::Mutex::new(export));
            ctx.live
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(export.clone());
            let (disk, tracker) = match crate::nbd::open(&spec, &opts.nbd).await {
                Ok(x) => x,
                Err(e) => {
                    export.lock().await.after_failure().await;
                    return Err(e);
                }
            };
            let Some(bitmap) = tracker else {
                return Err(SourceError::NbdSetup {
                    uri: spec.uri,
                    reason: "no change tracker for a live export (a bug)".into(),
                });
            };
            Ok(OpenedDisk {
                reader: DiskReader::Nbd(disk),
                tracker: Some(Tracker::Live { bitmap, export }),
            })
        }
        SourceSpec::Rbd(r) => {
            let socket = ctx.run_dir.join(format!("{}.rbd.sock", ctx.disk));
            let (disk, tracker) = crate::rbd::open(r, &opts.rbd, &opts.nbd, &ctx.sync, socket).await?;
            Ok(OpenedDisk {
                reader: DiskReader::Nbd(disk),
                tracker: Some(Tracker::Rbd(tracker)),
            })
        }
    }
}
