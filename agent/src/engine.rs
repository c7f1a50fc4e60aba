//! One sync of a host: every disk read, compared and sent, then one recovery point committed.
//!
//! 1. Lock the host's state directory; open the sources (size via `BLKGETSIZE64` for block
//!    devices).
//! 2. `GET state`. If the sync this agent had in progress was committed (a crash between the
//!    commit and the state files), install its block values now.
//! 3. Choose the sync id: the one in progress (local file), else the gateway's open sync, else
//!    a new one. Persist it, then `begin` (idempotent).
//! 4. `GET state` again; per disk choose the baseline (what the volume holds): the local block
//!    values if they describe the latest point, else that point's manifest (chunk level), else
//!    zeros when the host has no point. Then `GET landed/{disk}`.
//! 5. All disks at once, each a pipeline with at most `window` chunks' worth of data in memory
//!    (a chunk counts for the bytes it reads, see [`DiskWork::window_units`]): read (O_DIRECT, holes
//!    skipped) and hash on the blocking pool, plan ([`crate::plan`]) in order, send the planned
//!    extents concurrently, small ones gathered into batches of one request each (see
//!    [`Batch`]); the new block values stream to a temporary state file.
//! 6. Build the manifest, `commit` (retried on transient errors: commit is idempotent), and only
//!    after it succeeded install the new block values and forget the sync id.
//!
//! Interrupted anywhere, the next run resumes the same sync and sends only what the landed
//! records don't show as already there.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use tern_core::changes::{Change, ChangeKind, ChangeMap};
use tern_core::digest::BlockHasher;
use tern_core::geometry::{BlockLayout, ChunkGeometry, GeometryError};
use tern_core::manifest::ManifestError;
use tern_core::protocol::{LandedExtent, PlannedDisk, SyncPlan};
use tern_core::{ChunkRef, DiskId, DiskManifest, HostId, Manifest, PointId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, trace, warn};

use crate::bandwidth::Bandwidth;
use crate::blockstate::{BlockStateError, BlockStateHeader, BlockStateReader, BlockStateWriter, install};
use crate::disk::{DiskReader, OpenContext, OpenedDisk, SourceOptions, SourceSpec, Tracker};
use crate::plan::{ChunkBaseline, ChunkPlan, ExtentKind, plan_chunk, plan_chunk_with_zero, plan_whole_chunk};
use crate::source::{READ_ALIGN, SourceError};
use crate::state::{HostState, StateError};
use crate::target::{BatchBody, BatchExtent, Target, TargetError};

/// One disk to sync.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Its id inside the host.
    pub id: DiskId,
    /// Where it is read from.
    pub source: SourceSpec,
}

impl DiskSpec {
    /// A disk read from a block device or image file.
    pub fn path(id: DiskId, path: impl Into<PathBuf>) -> Self {
        Self {
            id,
            source: SourceSpec::Path(path.into()),
        }
    }
}

/// What to sync and how.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The host.
    pub host: HostId,
    /// Its disks, in manifest order.
    pub disks: Vec<DiskSpec>,
    /// The agent's state directory.
    pub state_dir: PathBuf,
    /// Chunk size (a power of two, 64 KiB to 16 MiB).
    pub chunk_size: u32,
    /// Compare block size (a power of two, 4 KiB to the chunk size).
    pub block_size: u32,
    /// Chunks' worth of data in flight (read, hashed or being sent) per disk: bounds memory.
    pub window: usize,
    /// Bandwidth limit in bytes per second.
    pub bwlimit: Option<u64>,
    /// Settings for the sources (NBD TLS and timeouts).
    pub sources: SourceOptions,
}

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("failed to use the state directory")]
    State(#[from] StateError),
    #[error("invalid chunk or block size")]
    Layout(#[source] GeometryError),
    #[error("disk id {0} is given twice")]
    DuplicateDisk(DiskId),
    #[error("failed to read disk {disk}")]
    Source {
        disk: DiskId,
        #[source]
        source: SourceError,
    },
    #[error("disk {disk} cannot be synced")]
    Geometry {
        disk: DiskId,
        #[source]
        source: GeometryError,
    },
    #[error("the target answered for host {got}, not {expected}")]
    WrongHost { expected: HostId, got: HostId },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("failed to keep the block values of disk {disk}")]
    BlockState {
        disk: DiskId,
        #[source]
        source: BlockStateError,
    },
    #[error("failed to build the manifest")]
    Manifest(#[source] ManifestError),
    #[error("a sync task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl SyncError {
    /// True when the sync may succeed if simply retried later (network trouble).
    pub fn is_transient(&self) -> bool {
        matches!(self, SyncError::Target(e) if e.is_transient())
    }
}

/// Byte and extent counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    /// Bytes read from the source (holes are not read).
    pub bytes_read: u64,
    /// Bytes of extent bodies sent.
    pub bytes_sent: u64,
    /// Bytes not sent because they are zero (skipped, or zeroed by zero extents).
    pub bytes_skipped_zero: u64,
    /// Non-zero bytes not sent because the volume already holds them.
    pub bytes_skipped_unchanged: u64,
    /// Bytes zeroed on the volume by zero extents (part of `bytes_skipped_zero`).
    pub bytes_zeroed: u64,
    /// Data extents sent.
    pub extents_sent: u64,
    /// Zero extents sent.
    pub zero_extents_sent: u64,
    /// Bytes a change tracker listed as changed (data and zero ranges, rounded out to compare
    /// blocks); 0 when the disk was read whole.
    pub bytes_changed: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.bytes_read += o.bytes_read;
        self.bytes_sent += o.bytes_sent;
        self.bytes_skipped_zero += o.bytes_skipped_zero;
        self.bytes_skipped_unchanged += o.bytes_skipped_unchanged;
        self.bytes_zeroed += o.bytes_zeroed;
        self.extents_sent += o.extents_sent;
        self.zero_extents_sent += o.zero_extents_sent;
        self.bytes_changed += o.bytes_changed;
    }

    fn add_plan(&mut self, plan: &ChunkPlan) {
        self.bytes_sent += plan.bytes_data;
        self.bytes_skipped_zero += plan.bytes_zero;
        self.bytes_skipped_unchanged += plan.bytes_unchanged;
        for x in &plan.extents {
            match x.kind {
                ExtentKind::Data(_) => self.extents_sent += 1,
                ExtentKind::Zero => {
                    self.zero_extents_sent += 1;
                    self.bytes_zeroed += x.len();
                }
            }
        }
    }
}

/// How one disk went.
#[derive(Debug, Clone, Serialize)]
pub struct DiskSummary {
    /// The disk id.
    pub id: String,
    /// The source: a path or an NBD URI.
    pub path: String,
    /// How the changed data was found: `read` (the whole disk was read and compared) or the
    /// change tracker used (`dirty-bitmap:NAME`).
    pub changes: String,
    /// Size in bytes.
    pub size: u64,
    /// What the volume was compared with: `state`, `manifest`, `zero` or `unknown`.
    pub baseline: &'static str,
    /// Landed extents found (written by an interrupted sync).
    pub landed_extents: usize,
    /// For an NBD disk: how many connections its data was read through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd_connections: Option<usize>,
    /// Counts.
    #[serde(flatten)]
    pub counters: Counters,
}

/// How a sync went: printed as JSON at the end.
#[derive(Debug, Clone, Serialize)]
pub struct SyncSummary {
    /// The host.
    pub host: String,
    /// Where it was synced to.
    pub target: String,
    /// The recovery point made.
    pub point_id: String,
    /// True when this run continued an interrupted sync.
    pub resumed: bool,
    /// Start time, Unix milliseconds (the point's creation time).
    pub started_unix_ms: u64,
    /// Wall time in seconds.
    pub duration_s: f64,
    /// Totals over all disks.
    #[serde(flatten)]
    pub totals: Counters,
    /// Per disk.
    pub disks: Vec<DiskSummary>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the volume of one disk held at the latest point.
#[derive(Debug)]
enum Baseline {
    /// The agent's block values (their point is the latest point).
    State(BlockStateReader),
    /// The latest point's manifest entries for the disk.
    Manifest {
        geometry: ChunkGeometry,
        chunks: Vec<ChunkRef>,
    },
    /// The volume is new: zeros.
    Zero,
    /// Nothing known.
    Unknown,
}

impl Baseline {
    fn name(&self) -> &'static str {
        match self {
            Baseline::State(_) => "state",
            Baseline::Manifest { .. } => "manifest",
            Baseline::Zero => "zero",
            Baseline::Unknown => "unknown",
        }
    }

    /// The baseline of chunk `index` of a disk whose geometry is now `current`. `Ok(None)`
    /// when the state file's record is damaged.
    fn for_chunk(
        &self,
        index: u64,
        current: &ChunkGeometry,
    ) -> Result<Option<ChunkBaseline>, BlockStateError> {
        let old = match self {
            Baseline::Zero => return Ok(Some(ChunkBaseline::Zero)),
            Baseline::Unknown => return Ok(Some(ChunkBaseline::Unknown)),
            Baseline::State(r) => r.header().geometry,
            Baseline::Manifest { geometry, .. } => *geometry,
        };
        if index >= old.chunk_count() {
            // The disk grew: the volume was grown with zeros.
            return Ok(Some(ChunkBaseline::Zero));
        }
        if old.chunk_len(index) != current.chunk_len(index) {
            // The old last chunk, now longer: what lies past its old end is not described.
            return Ok(Some(ChunkBaseline::Unknown));
        }
        Ok(match self {
            Baseline::State(r) => r.read_chunk(index)?.map(ChunkBaseline::Blocks),
            Baseline::Manifest { chunks, .. } => Some(match chunks.get(index as usize) {
                Some(ChunkRef::Data(d)) => ChunkBaseline::Digest(*d),
                Some(ChunkRef::Zero) => ChunkBaseline::Zero,
                None => ChunkBaseline::Unknown,
            }),
            Baseline::Zero | Baseline::Unknown => None,
        })
    }
}

/// Everything the blocking pool needs to process the chunks of one disk.
#[derive(Debug)]
struct DiskWork {
    disk: DiskId,
    source: DiskReader,
    /// From a change tracker: the changes by chunk (rounded out to compare blocks). Chunks not
    /// listed are unchanged since the baseline, which is then [`Baseline::State`].
    changes: Option<HashMap<u64, Vec<Change>>>,
    /// The block values of a full all-zero chunk.
    zero_values: Vec<[u8; 32]>,
    geometry: ChunkGeometry,
    hasher: BlockHasher,
    /// Send changed chunks whole (object mode).
    whole_chunks: bool,
    baseline: Baseline,
    /// Landed extents by the chunks they intersect.
    landed: HashMap<u64, Vec<LandedExtent>>,
    /// One chunk of zeros: the content of chunks that are all hole.
    zeros: Vec<u8>,
    /// Read buffers, one chunk (rounded up to 4 KiB) each.
    buffers: Arc<crate::bufpool::BufPool>,
    damaged_warned: AtomicBool,
}

/// A read, hashed and planned chunk.
#[derive(Debug)]
struct ChunkDone {
    index: u64,
    chunk_ref: ChunkRef,
    blocks: Vec<[u8; 32]>,
    plan: ChunkPlan,
    /// The chunk's bytes (None: all hole, hence zeros; or nothing to send).
    data: Option<Bytes>,
    bytes_read: u64,
    /// Bytes of the chunk a change tracker listed.
    bytes_changed: u64,
}

/// A chunk of a work item.
#[derive(Debug)]
enum Processed {
    Done(ChunkDone),
    /// An unchanged chunk whose baseline record is damaged: it is read whole, one at a time,
    /// by the in-order consumer (so a run of damaged records never reads more than one chunk
    /// beyond the window).
    Damaged(u64),
}

impl DiskWork {
    fn source_err(&self, source: SourceError) -> SyncError {
        SyncError::Source {
            disk: self.disk.clone(),
            source,
        }
    }

    /// True when a change tracker says chunk `index` did not change since the baseline (and no
    /// interrupted sync wrote there): its values come from the baseline, nothing is read.
    fn is_unchanged(&self, index: u64) -> bool {
        matches!(&self.changes, Some(c) if !c.contains_key(&index)) && !self.landed.contains_key(&index)
    }

    /// The work item starting at chunk `start`: a run of up to [`UNCHANGED_RUN`] unchanged
    /// chunks, or the one chunk that must be read.
    fn item_at(&self, start: u64) -> Range<u64> {
        let count = self.geometry.chunk_count();
        let mut end = start + 1;
        if self.is_unchanged(start) {
            while end < count && end - start < UNCHANGED_RUN && self.is_unchanged(end) {
                end += 1;
            }
        }
        start..end
    }

    /// Processes a work item (see [`DiskWork::item_at`]).
    fn process_item(&self, item: Range<u64>) -> Result<Vec<Processed>, SyncError> {
        if self.is_unchanged(item.start) {
            return self.process_unchanged(item);
        }
        let index = item.start;
        if let Some(changes) = &self.changes
            && !self.landed.contains_key(&index)
            && !self.whole_chunks
            && let Some(c) = changes.get(&index)
            && let Some(done) = self.process_changed(index, c)?
        {
            return Ok(vec![Processed::Done(done)]);
        }
        // Read whole: without a tracker; a chunk with landed extents (an interrupted sync wrote
        // there: the planner must see its current bytes to judge the landed records); a partly
        // changed chunk in object mode (it stores whole chunks); a damaged baseline record.
        Ok(vec![Processed::Done(self.process_read(index)?)])
    }

    /// The window units chunk `index` holds while in flight: the bytes it will read (the changed
    /// ranges when a change tracker lists them, else the whole chunk), in [`WINDOW_UNIT`]s, at
    /// least one. A chunk whose baseline record turns out damaged is then read whole under its
    /// smaller share (rare: the state file is checksummed per chunk).
    fn window_units(&self, index: u64) -> u32 {
        let len = u64::from(self.geometry.chunk_len(index));
        let bytes = match &self.changes {
            Some(changes) if !self.landed.contains_key(&index) => match changes.get(&index) {
                None => 0,
                Some(c) if !self.whole_chunks => c.iter().map(Change::len).sum::<u64>().min(len),
                Some(_) => len,
            },
            _ => len,
        };
        bytes.div_ceil(WINDOW_UNIT).max(1) as u32
    }

    /// The block values of the baseline (the latest point's block-values file) for chunk
    /// `index`; `None` when its record is damaged.
    fn baseline_values(&self, index: u64) -> Result<Option<Vec<[u8; 32]>>, SyncError> {
        match self.baseline.for_chunk(index, &self.geometry) {
            Ok(Some(ChunkBaseline::Blocks(v))) => Ok(Some(v)),
            Ok(_) => Ok(None),
            Err(source) => Err(SyncError::BlockState {
                disk: self.disk.clone(),
                source,
            }),
        }
    }

    fn zero_values(&self, chunk_len: u32) -> std::borrow::Cow<'_, [[u8; 32]]> {
        if chunk_len == self.geometry.chunk_size() {
            std::borrow::Cow::Borrowed(&self.zero_values)
        } else {
            std::borrow::Cow::Owned(self.hasher.zero_values(chunk_len))
        }
    }

    /// Chunks no change touches: their values and digests come from the baseline (read at
    /// once), nothing is read from the disk. A chunk whose baseline record is damaged is left
    /// to be read ([`Processed::Damaged`]).
    fn process_unchanged(&self, run: Range<u64>) -> Result<Vec<Processed>, SyncError> {
        let records = match &self.baseline {
            Baseline::State(r) if r.header().geometry == self.geometry => r
                .read_chunks(run.clone())
                .map_err(|source| SyncError::BlockState {
                    disk: self.disk.clone(),
                    source,
                })?,
            _ => run
                .clone()
                .map(|i| self.baseline_values(i))
                .collect::<Result<_, _>>()?,
        };
        Ok(run
            .zip(records)
            .map(|(index, blocks)| {
                let Some(blocks) = blocks else {
                    return Processed::Damaged(index);
                };
                let len = self.geometry.chunk_len(index);
                let mut plan = ChunkPlan::default();
                let chunk_ref = if *blocks == *self.zero_values(len) {
                    plan.bytes_zero = u64::from(len);
                    ChunkRef::Zero
                } else {
                    plan.bytes_unchanged = u64::from(len);
                    ChunkRef::Data(self.hasher.digest_from_blocks(&blocks, len))
                };
                Processed::Done(ChunkDone {
                    index,
                    chunk_ref,
                    blocks,
                    plan,
                    data: None,
                    bytes_read: 0,
                    bytes_changed: 0,
                })
            })
            .collect())
    }

    /// A chunk some changes touch (block mode): only the changed blocks are read (data) or
    /// known (zero) and hashed; the other blocks keep their baseline values, and only blocks
    /// whose value changed are sent. `None` when the baseline's record is damaged.
    fn process_changed(&self, index: u64, changes: &[Change]) -> Result<Option<ChunkDone>, SyncError> {
        let Some(mut blocks) = self.baseline_values(index)? else {
            return Ok(None);
        };
        let old = ChunkBaseline::Blocks(blocks.clone());
        let range = self.geometry.chunk_range(index);
        let len = (range.end - range.start) as usize;
        let layout = self.hasher.layout();
        let bs = u64::from(layout.block_size());
        let mut buf = self.buffers.get();
        let mut touched = vec![false; blocks.len()];
        let mut bytes_read = 0;
        let mut bytes_changed = 0;
        for c in changes {
            let rel = (c.range.start - range.start) as usize..(c.range.end - range.start) as usize;
            bytes_changed += c.len();
            for t in &mut touched[(rel.start as u64 / bs) as usize..(rel.end as u64).div_ceil(bs) as usize] {
                *t = true;
            }
            match c.kind {
                ChangeKind::Zero => buf[rel].fill(0),
                ChangeKind::Data => {
                    // Rounded up to 4 KiB for O_DIRECT (the pooled buffer has room): only the
                    // disk's end is not aligned.
                    let end = rel.end.next_multiple_of(READ_ALIGN as usize);
                    let n = self
                        .source
                        .read_at(&mut buf[rel.start..end], c.range.start)
                        .map_err(|e| self.source_err(e))?;
                    buf[rel.start + n..end].fill(0);
                    bytes_read += n as u64;
                }
            }
        }
        let chunk_len = len as u32;
        let zero_values = self.zero_values(chunk_len);
        let mut zero = Vec::with_capacity(blocks.len());
        for (b, value) in blocks.iter_mut().enumerate() {
            if touched[b] {
                let data = &buf[layout.block_range(chunk_len, b)];
                *value = self.hasher.block_value(&buf[..len], chunk_len, b);
                zero.push(tern_core::digest::is_zero(data));
            } else {
                zero.push(*value == zero_values[b]);
            }
        }
        let all_zero = zero.iter().all(|z| *z);
        let hashes = tern_core::digest::ChunkHashes {
            digest: (!all_zero).then(|| self.hasher.digest_from_blocks(&blocks, chunk_len)),
            blocks,
        };
        buf.truncate(len);
        let plan = plan_chunk_with_zero(layout, range.start, &buf, &hashes, &zero, &old, &[]);
        trace!(
            chunk = index,
            extents = plan.extents.len(),
            "changed chunk planned"
        );
        Ok(Some(ChunkDone {
            index,
            chunk_ref: hashes.digest.map_or(ChunkRef::Zero, ChunkRef::Data),
            blocks: hashes.blocks,
            plan,
            data: Some(Bytes::from_owner(buf)),
            bytes_read,
            bytes_changed,
        }))
    }

    /// Reads, hashes and plans a whole chunk.
    fn process_read(&self, index: u64) -> Result<ChunkDone, SyncError> {
        let range = self.geometry.chunk_range(index);
        let len = (range.end - range.start) as usize;
        let segments = self
            .source
            .data_segments(range.clone())
            .map_err(|e| self.source_err(e))?;
        let mut bytes_read = 0;
        let buf = if segments.is_empty() {
            None
        } else {
            let mut buf = self.buffers.get();
            // Holes between the data segments read as zeros; the pooled buffer is not zeroed.
            let mut pos = 0;
            for seg in &segments {
                let rel = (seg.start - range.start) as usize..(seg.end - range.start) as usize;
                buf[pos..rel.start].fill(0);
                pos = rel.end;
                let n = self
                    .source
                    .read_at(&mut buf[rel.clone()], seg.start)
                    .map_err(|e| self.source_err(e))?;
                // A read that ended early (at the end of the file) leaves zeros, not old bytes.
                buf[rel.start + n..rel.end].fill(0);
                bytes_read += n as u64;
            }
            // Segments may end past the chunk (rounded up to 4 KiB for O_DIRECT).
            if pos < len {
                buf[pos..len].fill(0);
            }
            buf.truncate(len);
            Some(buf)
        };
        let data: &[u8] = buf.as_deref().unwrap_or(&self.zeros[..len]);
        let hashes = self.hasher.hash_chunk(data);
        let baseline = match self.baseline.for_chunk(index, &self.geometry) {
            Ok(Some(b)) => b,
            Ok(None) => {
                if !self.damaged_warned.swap(true, Ordering::Relaxed) {
                    warn!(
                        chunk = index,
                        "damaged record in the block-values file: sending such chunks whole"
                    );
                }
                ChunkBaseline::Unknown
            }
            Err(source) => {
                return Err(SyncError::BlockState {
                    disk: self.disk.clone(),
                    source,
                });
            }
        };
        let landed = self.landed.get(&index).map_or(&[][..], Vec::as_slice);
        let plan = if self.whole_chunks {
            plan_whole_chunk(data.len(), &hashes, &baseline)
        } else {
            plan_chunk(
                self.hasher.layout(),
                range.start,
                data,
                &hashes,
                &baseline,
                landed,
            )
        };
        trace!(chunk = index, extents = plan.extents.len(), "chunk planned");
        Ok(ChunkDone {
            index,
            chunk_ref: hashes.digest.map_or(ChunkRef::Zero, ChunkRef::Data),
            blocks: hashes.blocks,
            plan,
            data: buf.map(Bytes::from_owner),
            bytes_read,
            bytes_changed: 0,
        })
    }
}

/// Groups landed extents by the chunks they intersect (ignoring any past the disk's end).
fn group_landed(geometry: &ChunkGeometry, landed: &[LandedExtent]) -> HashMap<u64, Vec<LandedExtent>> {
    let mut out: HashMap<u64, Vec<LandedExtent>> = HashMap::new();
    for e in landed {
        for (chunk, _) in geometry.split(e.offset, u64::from(e.len)) {
            out.entry(chunk).or_default().push(*e);
        }
    }
    out
}

/// Syncs every disk of `opts.host` to `target` and commits one recovery point.
pub async fn sync_host<T: Target>(target: &Arc<T>, opts: &SyncOptions) -> Result<SyncSummary, SyncError> {
    let started = Instant::now();
    let started_unix_ms = unix_ms();
    let layout = BlockLayout::new(opts.chunk_size, opts.block_size).map_err(SyncError::Layout)?;
    for (i, d) in opts.disks.iter().enumerate() {
        if opts.disks[..i].iter().any(|x| x.id == d.id) {
            return Err(SyncError::DuplicateDisk(d.id.clone()));
        }
    }
    let state = HostState::open(&opts.state_dir, &opts.host)?;

    let before = target.state().await?;
    if before.host != opts.host {
        return Err(SyncError::WrongHost {
            expected: opts.host.clone(),
            got: before.host,
        });
    }
    let latest_before = before.latest_point.as_ref().map(|p| p.id.clone());
    let mut pending = state.pending_sync()?;
    if let Some(p) = pending.as_ref().filter(|p| Some(*p) == latest_before.as_ref()) {
        info!(point = %p, "the previous sync was committed; installing its block values");
        for d in &opts.disks {
            finalize_blocks(&state, &d.id, p).await?;
        }
        state.clear_pending_sync()?;
        pending = None;
    }
    if let Some(p) = pending.as_ref() {
        // Committed, but no longer the latest point (another sync committed since): it cannot
        // be reopened.
        match target.get_point(p).await {
            Ok(_) => {
                warn!(point = %p, "the sync in progress was committed and is no longer the latest point; starting a new sync");
                state.clear_pending_sync()?;
                pending = None;
            }
            Err(e) if e.kind == crate::target::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    let resumed = pending.is_some() || before.open_sync.is_some();
    let sync = match (pending, before.open_sync.clone()) {
        (Some(p), _) => p,
        (None, Some(open)) => open,
        (None, None) => PointId::generate(started_unix_ms, rand::random()),
    };
    state.set_pending_sync(&sync)?;

    let span = info_span!("sync", host = %opts.host, sync = %sync);
    let live: Arc<std::sync::Mutex<Vec<_>>> = Arc::default();
    let result = async {
        info!(target = %target.describe(), disks = opts.disks.len(), resumed, "sync started");
        let mut sources = Vec::new();
        for d in &opts.disks {
            // The latest point's change token, when the local block values describe that point.
            let token = match BlockStateReader::open(&state.blocks_path(&d.id)) {
                Ok(Some(r))
                    if Some(&r.header().point) == latest_before.as_ref() && r.header().disk == d.id =>
                {
                    r.header().change_token.clone()
                }
                _ => None,
            };
            let ctx = OpenContext {
                sync: sync.clone(),
                disk: d.id.clone(),
                run_dir: state.root().to_owned(),
                token,
                live: live.clone(),
            };
            let opened = crate::disk::open(&d.source, &opts.sources, &ctx)
                .await
                .map_err(|source| SyncError::Source {
                    disk: d.id.clone(),
                    source,
                })?;
            let geometry = ChunkGeometry::new(opened.reader.size(), opts.chunk_size).map_err(|source| {
                SyncError::Geometry {
                    disk: d.id.clone(),
                    source,
                }
            })?;
            sources.push((d, opened, geometry));
        }
        let plan = SyncPlan {
            disks: sources
                .iter()
                .map(|(d, _, g)| PlannedDisk {
                    id: d.id.clone(),
                    geometry: *g,
                })
                .collect(),
        };
        target.begin(&sync, &plan).await?;
        let now = target.state().await?;
        let latest = now.latest_point.as_ref().map(|p| p.id.clone());
        let mut latest_manifest: Option<Manifest> = None;
        let bandwidth = opts.bwlimit.map(|b| Arc::new(Bandwidth::new(b)));

        // Plan every disk (baselines, landed extents, tracked changes), then scan and send all
        // of them at once: a host's disks are independent until the commit, and one disk's
        // reads overlap another's hashing and sending.
        let mut prepared = Vec::new();
        for (spec, source, geometry) in sources {
            let baseline = choose_baseline(
                target.as_ref(),
                &state,
                spec,
                &geometry,
                layout,
                latest.as_ref(),
                &mut latest_manifest,
                before.disks.iter().any(|d| d.id == spec.id),
            )
            .await?;
            let landed = target.landed(&spec.id).await?;
            let landed_count = landed.len();
            debug!(disk = %spec.id, baseline = baseline.name(), landed = landed_count, "disk planned");
            let OpenedDisk { reader, tracker } = source;
            let changes = match &tracker {
                Some(t) => tracked_changes(t, &spec.id, &baseline, &geometry, layout).await?,
                None => None,
            };
            let changes_name = match (&tracker, &changes) {
                (Some(t), Some(_)) => t.describe(),
                _ => "read".to_owned(),
            };
            let hasher = BlockHasher::with_key(layout, target.id_key());
            let work = Arc::new(DiskWork {
                disk: spec.id.clone(),
                source: reader,
                changes: changes.map(|m| m.by_chunk(&geometry).into_iter().collect()),
                zero_values: hasher.zero_values(opts.chunk_size),
                geometry,
                hasher,
                whole_chunks: target.whole_chunks(),
                landed: group_landed(&geometry, &landed),
                baseline,
                zeros: vec![0; opts.chunk_size as usize],
                buffers: crate::bufpool::BufPool::new(
                    u64::from(opts.chunk_size).next_multiple_of(READ_ALIGN) as usize,
                    opts.window.max(1),
                ),
                damaged_warned: AtomicBool::new(false),
            });
            let token = tracker.as_ref().map(|t| t.next_token().to_owned());
            prepared.push((spec, geometry, work, tracker, changes_name, landed_count, token));
        }
        let outcomes =
            futures::future::try_join_all(prepared.iter().map(|(spec, _, work, _, _, _, token)| {
                sync_disk(
                    target,
                    &sync,
                    work.clone(),
                    state.new_blocks_path(&spec.id),
                    token.clone(),
                    opts.window.max(1),
                    bandwidth.clone(),
                )
                .instrument(info_span!("disk", disk = %spec.id))
            }))
            .await?;

        let mut disks = Vec::new();
        let mut summaries = Vec::new();
        let mut new_states = Vec::new();
        let mut trackers = Vec::new();
        for ((spec, geometry, work, tracker, changes_name, landed_count, _), out) in
            prepared.into_iter().zip(outcomes)
        {
            let baseline_name = work.baseline.name();
            trackers.extend(tracker);
            info!(
                disk = %spec.id,
                baseline = baseline_name,
                sent = out.counters.bytes_sent,
                extents = out.counters.extents_sent,
                zero_extents = out.counters.zero_extents_sent,
                "disk scanned"
            );
            summaries.push(DiskSummary {
                id: spec.id.to_string(),
                path: spec.source.describe(),
                changes: changes_name,
                size: geometry.size(),
                baseline: baseline_name,
                landed_extents: landed_count,
                nbd_connections: work.source.nbd_connections(),
                counters: out.counters,
            });
            disks.push(DiskManifest {
                disk_id: spec.id.clone(),
                geometry,
                chunks: out.chunks,
            });
            new_states.push((spec.id.clone(), out.new_state));
        }

        let manifest = Manifest {
            host_id: opts.host.clone(),
            point_id: sync.clone(),
            created_unix_ms: started_unix_ms,
            disks,
        };
        manifest.validate().map_err(SyncError::Manifest)?;
        commit_with_retry(target.as_ref(), &sync, &manifest).await?;

        for (disk, tmp) in new_states {
            let dst = state.blocks_path(&disk);
            tokio::task::spawn_blocking(move || install(&tmp, &dst))
                .await
                .map_err(SyncError::Task)?
                .map_err(|source| SyncError::BlockState { disk, source })?;
        }
        state.clear_pending_sync()?;
        for t in &trackers {
            t.after_commit().await;
        }

        let mut totals = Counters::default();
        for d in &summaries {
            totals.add(&d.counters);
        }
        let duration_s = started.elapsed().as_secs_f64();
        info!(
            point = %sync,
            sent = totals.bytes_sent,
            read = totals.bytes_read,
            duration_s = format!("{duration_s:.1}"),
            "recovery point committed"
        );
        Ok(SyncSummary {
            host: opts.host.to_string(),
            target: target.describe(),
            point_id: sync.to_string(),
            resumed,
            started_unix_ms,
            duration_s,
            totals,
            disks: summaries,
        })
    }
    .instrument(span.clone())
    .await;
    if result.is_err() {
        // Live exports: tear down, and give the previous bitmap back every write since the
        // last committed point.
        let exports: Vec<_> = live.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
        for e in exports {
            e.lock().await.after_failure().instrument(span.clone()).await;
        }
    }
    result
}

/// Installs the block values a committed sync left at their temporary path.
async fn finalize_blocks(state: &HostState, disk: &DiskId, point: &PointId) -> Result<(), SyncError> {
    let tmp = state.new_blocks_path(disk);
    let dst = state.blocks_path(disk);
    let point = point.clone();
    let d = disk.clone();
    tokio::task::spawn_blocking(move || -> Result<(), BlockStateError> {
        match BlockStateReader::open(&tmp) {
            Ok(Some(r)) if r.header().point == point => install(&tmp, &dst),
            Ok(_) => Ok(()),
            Err(e) => {
                warn!(disk = %d, error = %crate::error_chain(&e), "ignoring unusable block values");
                Ok(())
            }
        }
    })
    .await
    .map_err(SyncError::Task)?
    .map_err(|source| SyncError::BlockState {
        disk: disk.clone(),
        source,
    })
}

/// Chooses what the volume of `spec` is compared with.
#[allow(clippy::too_many_arguments, reason = "the inputs of one decision, used once")]
async fn choose_baseline<T: Target>(
    target: &T,
    state: &HostState,
    spec: &DiskSpec,
    geometry: &ChunkGeometry,
    layout: BlockLayout,
    latest: Option<&PointId>,
    latest_manifest: &mut Option<Manifest>,
    volume_existed: bool,
) -> Result<Baseline, SyncError> {
    let Some(latest) = latest else {
        // No point yet: the volume holds zeros, plus what the landed records say.
        return Ok(Baseline::Zero);
    };
    match BlockStateReader::open(&state.blocks_path(&spec.id)) {
        Ok(Some(r)) => {
            let h = r.header();
            if &h.point == latest && h.disk == spec.id && h.layout == layout {
                return Ok(Baseline::State(r));
            }
            info!(
                disk = %spec.id,
                state_point = %h.point,
                latest_point = %latest,
                "the local block values do not describe the latest point; comparing with its manifest"
            );
        }
        Ok(None) => {
            info!(disk = %spec.id, "no local block values; comparing with the latest point's manifest")
        }
        Err(e) => warn!(
            disk = %spec.id,
            error = %crate::error_chain(&e),
            "ignoring unusable block values; comparing with the latest point's manifest"
        ),
    }
    if latest_manifest.as_ref().is_none_or(|m| &m.point_id != latest) {
        *latest_manifest = Some(target.get_point(latest).await?);
    }
    let Some(m) = latest_manifest.as_ref() else {
        return Ok(Baseline::Unknown);
    };
    Ok(match m.disk(&spec.id) {
        Some(d) if d.geometry.chunk_size() == geometry.chunk_size() => Baseline::Manifest {
            geometry: d.geometry,
            chunks: d.chunks.clone(),
        },
        Some(_) => Baseline::Unknown,
        // A disk new since the latest point: its volume is new (zeros), unless it was there
        // before this sync began, with content the agent cannot know.
        None if volume_existed => Baseline::Unknown,
        None => Baseline::Zero,
    })
}

/// The changes a tracker lists since the baseline, rounded out to compare blocks; `None` when
/// the disk must be read whole: the baseline is not the block values of the latest point, the
/// disk changed size, or the tracker does not know the baseline's change token.
async fn tracked_changes(
    tracker: &Tracker,
    disk: &DiskId,
    baseline: &Baseline,
    geometry: &ChunkGeometry,
    layout: BlockLayout,
) -> Result<Option<ChangeMap>, SyncError> {
    let Baseline::State(r) = baseline else {
        info!(disk = %disk, tracker = %tracker.describe(), "no block values of the latest point here; reading the whole disk");
        return Ok(None);
    };
    let h = r.header();
    if h.geometry != *geometry {
        info!(disk = %disk, old_size = h.geometry.size(), size = geometry.size(), "the disk changed size; reading it whole");
        return Ok(None);
    }
    let Some(token) = h.change_token.as_deref() else {
        info!(disk = %disk, tracker = %tracker.describe(), "the latest point has no change token; reading the whole disk");
        return Ok(None);
    };
    let Some(map) = tracker
        .changes_since(token)
        .await
        .map_err(|source| SyncError::Source {
            disk: disk.clone(),
            source,
        })?
    else {
        return Ok(None);
    };
    if map.size() != geometry.size() {
        info!(disk = %disk, "the change list describes another disk size; reading the whole disk");
        return Ok(None);
    }
    let map = map.align_out(u64::from(layout.block_size()));
    let (data, zero) = map.bytes();
    info!(disk = %disk, tracker = %tracker.describe(), since = token, ranges = map.changes().len(), data, zero, "reading only the changed ranges");
    Ok(Some(map))
}

/// What one disk's pipeline produced.
#[derive(Debug)]
struct DiskOutcome {
    chunks: Vec<ChunkRef>,
    counters: Counters,
    /// The new block-values file (complete and fsynced, at its temporary path).
    new_state: PathBuf,
}

async fn sync_disk<T: Target>(
    target: &Arc<T>,
    sync: &PointId,
    work: Arc<DiskWork>,
    new_state: PathBuf,
    change_token: Option<String>,
    window: usize,
    bandwidth: Option<Arc<Bandwidth>>,
) -> Result<DiskOutcome, SyncError> {
    let geometry = work.geometry;
    let disk = work.disk.clone();
    let header = BlockStateHeader {
        point: sync.clone(),
        disk: disk.clone(),
        geometry,
        layout: work.hasher.layout(),
        change_token,
    };

    // The new block values are written in chunk order by a blocking thread, a work item's
    // chunks at a time.
    let (values_tx, mut values_rx) = tokio::sync::mpsc::channel::<Vec<(u64, Vec<[u8; 32]>)>>(window * 2);
    let writer = tokio::task::spawn_blocking(move || -> Result<PathBuf, BlockStateError> {
        let mut w = BlockStateWriter::create(&new_state, header)?;
        while let Some(item) = values_rx.blocking_recv() {
            for (index, values) in item {
                w.push(index, &values)?;
            }
        }
        w.finish()
    });

    let bar = crate::progress::disk_bar(disk.as_str(), geometry.size());
    // The window in units of WINDOW_UNIT bytes. Permits are taken one chunk after the other, in
    // chunk order, before the chunk is processed: the chunks ahead in the in-order stream always
    // hold theirs, so the stream cannot stall on later chunks holding the window.
    let units_per_chunk = u64::from(geometry.chunk_size()).div_ceil(WINDOW_UNIT) as usize;
    let permits = Arc::new(Semaphore::new(window * units_per_chunk));
    let in_flight = (window * units_per_chunk).clamp(window, MAX_ITEMS_IN_FLIGHT.max(window));
    let items = futures::stream::unfold(0u64, {
        let work = work.clone();
        move |start| {
            let item = (start < geometry.chunk_count()).then(|| work.item_at(start));
            async move { item.map(|item| (item.clone(), item.end)) }
        }
    });
    let mut chunks_done = items
        .then({
            let work = work.clone();
            let permits = permits.clone();
            move |item| {
                let units = work.window_units(item.start);
                let permits = permits.clone();
                async move {
                    let permit = permits
                        .acquire_many_owned(units)
                        .await
                        .expect("the window semaphore is never closed");
                    (item, permit)
                }
            }
        })
        .map(|(item, permit)| {
            let work = work.clone();
            async move {
                let done = tokio::task::spawn_blocking(move || work.process_item(item))
                    .await
                    .map_err(SyncError::Task)??;
                Ok::<_, SyncError>((done, permit))
            }
        })
        .buffered(in_flight)
        .boxed();

    let mut sends: JoinSet<Result<(), SyncError>> = JoinSet::new();
    let mut chunks = Vec::with_capacity(geometry.chunk_count() as usize);
    let mut counters = Counters::default();
    let max_extents = if target.whole_chunks() { 1 } else { BATCH_EXTENTS };
    let mut batch = Batch::default();
    let spawn_batch = |sends: &mut JoinSet<Result<(), SyncError>>, batch: Batch| {
        let send = send_batch(
            target.clone(),
            sync.clone(),
            disk.clone(),
            batch,
            bandwidth.clone(),
        );
        sends.spawn(send.in_current_span());
    };
    loop {
        // A batch that is not full waits for more ready chunks only while other sends keep the
        // connection busy (and will free window permits); otherwise it goes now.
        let item = if batch.extents.is_empty() {
            chunks_done.next().await
        } else if let Some(item) = chunks_done.next().now_or_never() {
            item
        } else if sends.len() >= BATCH_WAIT_IN_FLIGHT {
            tokio::select! {
                item = chunks_done.next() => item,
                Some(r) = sends.join_next() => {
                    r.map_err(SyncError::Task)??;
                    continue;
                }
            }
        } else {
            spawn_batch(&mut sends, std::mem::take(&mut batch));
            continue;
        };
        let Some(item) = item else { break };
        let (processed, permit) = item?;
        while let Some(r) = sends.try_join_next() {
            r.map_err(SyncError::Task)??;
        }
        // The item's window permit is held until every batch with its extents was sent.
        let permit = Arc::new(permit);
        let mut values = Vec::with_capacity(processed.len());
        for p in processed {
            let done = match p {
                Processed::Done(done) => done,
                Processed::Damaged(index) => {
                    let work = work.clone();
                    tokio::task::spawn_blocking(move || work.process_read(index))
                        .await
                        .map_err(SyncError::Task)??
                }
            };
            let range = geometry.chunk_range(done.index);
            counters.bytes_read += done.bytes_read;
            counters.bytes_changed += done.bytes_changed;
            counters.add_plan(&done.plan);
            chunks.push(done.chunk_ref);
            values.push((done.index, done.blocks));
            for x in done.plan.extents {
                let offset = range.start + x.range.start as u64;
                let body = match x.kind {
                    ExtentKind::Zero => BatchBody::Zero(x.len()),
                    // A chunk without data (all hole) plans only zero extents.
                    ExtentKind::Data(digest) => BatchBody::Data(
                        match &done.data {
                            Some(b) => b.slice(x.range.clone()),
                            None => Bytes::from(vec![0u8; x.range.len()]),
                        },
                        digest,
                    ),
                };
                let x = BatchExtent { offset, body };
                // A batch of several extents stays within BATCH_DATA; a larger extent goes alone.
                if let BatchBody::Data(b, _) = &x.body
                    && !batch.extents.is_empty()
                    && batch.data + b.len() as u64 > BATCH_DATA
                {
                    spawn_batch(&mut sends, std::mem::take(&mut batch));
                }
                batch.push(x, &permit);
                if batch.extents.len() >= max_extents || batch.data >= BATCH_DATA {
                    spawn_batch(&mut sends, std::mem::take(&mut batch));
                }
            }
            bar.inc(range.end - range.start);
        }
        bar.set_message(format!("sent {}", crate::units::format_size(counters.bytes_sent)));
        if values_tx.send(values).await.is_err() {
            // The writer stopped: its error says why.
            break;
        }
    }
    if !batch.extents.is_empty() {
        spawn_batch(&mut sends, batch);
    }
    drop(values_tx);
    while let Some(r) = sends.join_next().await {
        r.map_err(SyncError::Task)??;
    }
    let new_state = writer
        .await
        .map_err(SyncError::Task)?
        .map_err(|source| SyncError::BlockState {
            disk: disk.clone(),
            source,
        })?;
    bar.finish_and_clear();
    Ok(DiskOutcome {
        chunks,
        counters,
        new_state,
    })
}

/// Unit of window accounting: 64 KiB of chunk data (a chunk is at least 64 KiB).
const WINDOW_UNIT: u64 = 64 << 10;
/// Most work items (a chunk to read, or a run of unchanged chunks) in flight per disk, however
/// little data each holds.
const MAX_ITEMS_IN_FLIGHT: usize = 256;
/// Most unchanged chunks in one work item: their baseline records are read with one `pread`
/// and planned by one blocking task (1 GiB of a disk at 4 MiB chunks, 520 KiB of records), so
/// an incremental of a large disk does not pay a task per unchanged chunk.
const UNCHANGED_RUN: u64 = 256;

/// Most extents in one batch request.
const BATCH_EXTENTS: usize = 64;
/// Most data bytes in a batch of several extents (within the protocol's `MAX_BATCH_DATA`): a
/// batch is sent once it holds this much, and an extent that would take it past this goes in
/// the next one. Larger extents gain nothing from sharing a request (a full chunk goes alone).
const BATCH_DATA: u64 = 1 << 20;
const _: () = assert!(BATCH_DATA <= tern_core::protocol::MAX_BATCH_DATA);
/// A batch that is not full waits for more ready chunks only while this many sends are in
/// flight.
const BATCH_WAIT_IN_FLIGHT: usize = 2;

/// Extents of one disk to be sent in one request, in offset order (chunks are planned in order
/// and a chunk's extents are ordered and disjoint).
#[derive(Debug, Default)]
struct Batch {
    extents: Vec<BatchExtent>,
    /// Data bytes in `extents`.
    data: u64,
    /// The window permits of the chunks the extents come from.
    permits: Vec<Arc<OwnedSemaphorePermit>>,
}

impl Batch {
    fn push(&mut self, x: BatchExtent, permit: &Arc<OwnedSemaphorePermit>) {
        if let BatchBody::Data(b, _) = &x.body {
            self.data += b.len() as u64;
        }
        self.extents.push(x);
        if !self.permits.last().is_some_and(|p| Arc::ptr_eq(p, permit)) {
            self.permits.push(permit.clone());
        }
    }
}

async fn send_batch<T: Target>(
    target: Arc<T>,
    sync: PointId,
    disk: DiskId,
    batch: Batch,
    bandwidth: Option<Arc<Bandwidth>>,
) -> Result<(), SyncError> {
    if let Some(b) = &bandwidth
        && batch.data > 0
    {
        b.wait(batch.data).await;
    }
    trace!(
        offset = batch.extents.first().map_or(0, |x| x.offset),
        extents = batch.extents.len(),
        data = batch.data,
        "batch"
    );
    target.put_batch(&sync, &disk, batch.extents).await?;
    drop(batch.permits);
    Ok(())
}

/// Commits, retrying transient failures (commit is idempotent) with capped backoff.
async fn commit_with_retry<T: Target>(
    target: &T,
    sync: &PointId,
    manifest: &Manifest,
) -> Result<(), SyncError> {
    const ATTEMPTS: u32 = 8;
    let mut backoff = crate::schedule::Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut attempt = 1;
    loop {
        match target.commit(sync, manifest).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_transient() && attempt < ATTEMPTS => {
                let delay = backoff.next_delay();
                warn!(attempt, error = %crate::error_chain(&e), retry_in_ms = delay.as_millis() as u64, "commit failed; retrying");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
