//! Planning: which extents of a chunk must be sent so that the target volume equals the source.
//!
//! Inputs, per chunk:
//! - the current source bytes and their block values ([`ChunkHashes`]);
//! - the *baseline*: what the volume held at the last committed point, as far as the agent
//!   knows ([`ChunkBaseline`]: block values from the agent's state file, the chunk digest from
//!   the point's manifest, zeros, or nothing);
//! - the *landed* extents: what was written to the volume since that point (by an interrupted
//!   sync), as the target durably recorded it.
//!
//! A compare block is in sync when
//! - no landed extent touches it and the baseline says it equals the source, or
//! - landed extents cover it entirely and every landed extent that touches it holds exactly the
//!   current source bytes of its own range (recorded digest, or zero).
//!
//! Every other block is sent. Consecutive blocks to send that are all zero, or all not zero,
//! form one extent; an all-zero extent is sent as a zero extent (no body).
//!
//! The rule is conservative where the volume's content is uncertain (overlapping landed extents,
//! a landed extent that only partly covers a block): it may send a block that was already
//! there, never skip one that was not.

use std::ops::Range;

use tern_core::Digest;
use tern_core::digest::{ChunkHashes, is_zero};
use tern_core::geometry::{BlockLayout, EXTENT_ALIGN};
use tern_core::protocol::{LandedExtent, LandedKind};

/// What the volume held in one chunk at the last committed point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkBaseline {
    /// Nothing is known: every block is sent (zero blocks as zero extents).
    Unknown,
    /// The chunk is all zeros.
    Zero,
    /// The chunk's digest from the point's manifest: compared at chunk level, so a chunk that
    /// differs is sent whole.
    Digest(Digest),
    /// The block values the agent recorded at the point (its state file).
    Blocks(Vec<[u8; 32]>),
}

/// What an extent to send holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Data with this BLAKE3 digest of the extent's bytes.
    Data(Digest),
    /// Zeros: sent without a body.
    Zero,
}

/// One extent to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedExtent {
    /// Byte range inside the chunk.
    pub range: Range<usize>,
    /// What it holds.
    pub kind: ExtentKind,
}

impl PlannedExtent {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        (self.range.end - self.range.start) as u64
    }

    /// Never true: planned extents hold at least one block.
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// The plan for one chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Extents to send, in offset order.
    pub extents: Vec<PlannedExtent>,
    /// Bytes of zero blocks (sent as zero extents or skipped because the volume has them).
    pub bytes_zero: u64,
    /// Bytes of non-zero blocks not sent because the volume already holds them.
    pub bytes_unchanged: u64,
    /// Bytes of data extents (the bodies to send).
    pub bytes_data: u64,
}

/// Plans one chunk for a target that stores whole chunks by id (object mode): a non-zero chunk
/// that differs from its baseline is sent whole, under its digest; zero chunks are never sent
/// (the manifest records them).
pub fn plan_whole_chunk(chunk_len: usize, hashes: &ChunkHashes, baseline: &ChunkBaseline) -> ChunkPlan {
    let len = chunk_len as u64;
    let mut plan = ChunkPlan::default();
    let Some(digest) = hashes.digest else {
        plan.bytes_zero = len;
        return plan;
    };
    let unchanged = match baseline {
        ChunkBaseline::Unknown | ChunkBaseline::Zero => false,
        ChunkBaseline::Digest(d) => *d == digest,
        ChunkBaseline::Blocks(values) => *values == hashes.blocks,
    };
    if unchanged {
        plan.bytes_unchanged = len;
    } else {
        plan.extents.push(PlannedExtent {
            range: 0..chunk_len,
            kind: ExtentKind::Data(digest),
        });
        plan.bytes_data = len;
    }
    plan
}

/// Plans one chunk.
///
/// `data` is the chunk's current bytes (the last chunk of a disk may be short), `hashes` their
/// block values for `layout`, `chunk_start` the chunk's offset on the disk, and `landed` the
/// landed extents that intersect the chunk, in the order the target recorded them.
pub fn plan_chunk(
    layout: BlockLayout,
    chunk_start: u64,
    data: &[u8],
    hashes: &ChunkHashes,
    baseline: &ChunkBaseline,
    landed: &[LandedExtent],
) -> ChunkPlan {
    let chunk_len = data.len();
    let n = layout.blocks_in(chunk_len as u32);
    let all_zero = hashes.digest.is_none();
    let zero: Vec<bool> = (0..n)
        .map(|b| all_zero || is_zero(&data[layout.block_range(chunk_len as u32, b)]))
        .collect();
    plan_chunk_with_zero(layout, chunk_start, data, hashes, &zero, baseline, landed)
}

/// [`plan_chunk`] with the zero flags of the blocks given: `zero[b]` is true when block `b` is
/// all zeros. A caller that read only some blocks of `data` (the others are unchanged since the
/// baseline, which must then be [`ChunkBaseline::Blocks`], and no landed extent touches the
/// chunk) knows the others' flags from their values: only the blocks to send are looked at.
pub fn plan_chunk_with_zero(
    layout: BlockLayout,
    chunk_start: u64,
    data: &[u8],
    hashes: &ChunkHashes,
    zero: &[bool],
    baseline: &ChunkBaseline,
    landed: &[LandedExtent],
) -> ChunkPlan {
    let chunk_len = data.len();
    let n = layout.blocks_in(chunk_len as u32);
    let block = |b: usize| layout.block_range(chunk_len as u32, b);

    let mut in_sync: Vec<bool> = (0..n)
        .map(|b| match baseline {
            ChunkBaseline::Unknown => false,
            ChunkBaseline::Zero => zero[b],
            ChunkBaseline::Digest(d) => hashes.digest == Some(*d),
            ChunkBaseline::Blocks(values) => values.len() == n && values[b] == hashes.blocks[b],
        })
        .collect();

    // `join[b]`: block b must be sent in the same extent as block b - 1.
    let mut join = vec![false; n];
    if !landed.is_empty() {
        apply_landed(layout, chunk_start, data, hashes, landed, &mut in_sync);
        keep_records_whole(
            layout,
            chunk_start,
            chunk_len,
            landed,
            zero,
            &mut in_sync,
            &mut join,
        );
    }

    let mut plan = ChunkPlan::default();
    let mut b = 0;
    while b < n {
        let len = block(b).len() as u64;
        if in_sync[b] {
            if zero[b] {
                plan.bytes_zero += len;
            } else {
                plan.bytes_unchanged += len;
            }
            b += 1;
            continue;
        }
        let start = b;
        b += 1;
        while b < n && !in_sync[b] && (join[b] || zero[b] == zero[b - 1]) {
            b += 1;
        }
        let range = block(start).start..block(b - 1).end;
        let kind = if zero[start..b].iter().all(|z| *z) {
            plan.bytes_zero += range.len() as u64;
            ExtentKind::Zero
        } else {
            plan.bytes_data += range.len() as u64;
            match hashes.digest {
                // The whole chunk: its digest is already known, don't hash twice.
                Some(d) if range.len() == chunk_len => ExtentKind::Data(d),
                _ => ExtentKind::Data(Digest::of(&data[range.clone()])),
            }
        };
        plan.extents.push(PlannedExtent { range, kind });
    }
    plan
}

/// A target may keep one landed record per offset: a new extent's record replaces the record
/// that starts at the same offset. If an extent sent now started where a landed extent starts
/// but did not cover all of it, the record of the old extent's rest would be lost while its
/// bytes stay on the volume (and the sync may be interrupted before anything else lands). So
/// when an extent may start at a landed extent's offset, every block of that landed extent is
/// sent too, in that one extent (`join`).
fn keep_records_whole(
    layout: BlockLayout,
    chunk_start: u64,
    chunk_len: usize,
    landed: &[LandedExtent],
    zero: &[bool],
    in_sync: &mut [bool],
    join: &mut [bool],
) {
    let bs = layout.block_size() as usize;
    let chunk_end = chunk_start + chunk_len as u64;
    loop {
        let mut changed = false;
        for e in landed {
            let e_end = e.offset.saturating_add(u64::from(e.len));
            if e.len == 0 || e.offset < chunk_start || e_end > chunk_end {
                continue;
            }
            let lo = (e.offset - chunk_start) as usize;
            if !lo.is_multiple_of(bs) {
                // Planned extents start on block boundaries: none starts here.
                continue;
            }
            let b0 = lo / bs;
            let extent_starts_here = !in_sync[b0] && (b0 == 0 || in_sync[b0 - 1] || zero[b0 - 1] != zero[b0]);
            if extent_starts_here {
                let hi = (e_end - chunk_start) as usize;
                let blocks = b0..hi.div_ceil(bs);
                for s in &mut in_sync[blocks.clone()] {
                    changed |= *s;
                    *s = false;
                }
                for j in &mut join[blocks.start + 1..blocks.end] {
                    changed |= !*j;
                    *j = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
}

/// Overrides `in_sync` for the blocks that landed extents touch.
fn apply_landed(
    layout: BlockLayout,
    chunk_start: u64,
    data: &[u8],
    hashes: &ChunkHashes,
    landed: &[LandedExtent],
    in_sync: &mut [bool],
) {
    let chunk_len = data.len();
    let chunk_end = chunk_start + chunk_len as u64;
    let unit = EXTENT_ALIGN as usize;
    let n = in_sync.len();
    let mut covered = vec![false; chunk_len.div_ceil(unit)];
    let mut touched = vec![false; n];
    let mut bad = vec![false; n];
    let bs = layout.block_size() as usize;

    for e in landed {
        let e_start = e.offset;
        let e_end = e.offset.saturating_add(u64::from(e.len));
        if e.len == 0 || e_end <= chunk_start || e_start >= chunk_end {
            continue;
        }
        // Valid records lie inside one chunk; one that does not cannot be trusted.
        let inside = e_start >= chunk_start && e_end <= chunk_end;
        let lo = (e_start.max(chunk_start) - chunk_start) as usize;
        let hi = (e_end.min(chunk_end) - chunk_start) as usize;
        let matches = inside
            && match e.kind {
                LandedKind::Zero => hashes.digest.is_none() || is_zero(&data[lo..hi]),
                LandedKind::Data(d) if lo == 0 && hi == chunk_len && hashes.digest.is_some() => {
                    hashes.digest == Some(d)
                }
                LandedKind::Data(d) => Digest::of(&data[lo..hi]) == d,
            };
        for b in lo / bs..hi.div_ceil(bs) {
            touched[b] = true;
            bad[b] |= !matches;
        }
        // Coverage in 4 KiB units; a partial unit counts only at the chunk's end.
        let first = lo.div_ceil(unit);
        let last = if hi == chunk_len {
            hi.div_ceil(unit)
        } else {
            hi / unit
        };
        for c in covered.iter_mut().take(last).skip(first) {
            *c = true;
        }
    }

    for b in 0..n {
        if touched[b] {
            let r = layout.block_range(chunk_len as u32, b);
            let all_covered = covered[r.start / unit..r.end.div_ceil(unit)].iter().all(|c| *c);
            in_sync[b] = all_covered && !bad[b];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tern_core::digest::BlockHasher;
    use tern_core::geometry::ChunkGeometry;

    const CHUNK: u32 = 64 << 10;

    /// Deterministic pseudo-random bytes.
    fn fill(buf: &mut [u8], seed: u64) {
        let mut x = seed | 1;
        for b in buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum BaselineKind {
        Blocks,
        Digest,
        Zero,
        Unknown,
    }

    #[derive(Debug, Clone)]
    enum LandedContent {
        /// The current source bytes of the range.
        Source,
        /// Zeros, recorded as a zero extent.
        Zero,
        /// Other bytes (the source changed since they were sent).
        Stale(u64),
    }

    #[derive(Debug, Clone)]
    struct Case {
        sectors: u64,
        block_shift: u32,
        /// Per 4 KiB unit of the source: 0 = zero, 1 = same as the baseline, 2 = new bytes.
        source_units: Vec<u8>,
        baseline_kind: BaselineKind,
        baseline_seed: u64,
        landed: Vec<(u64, u64, LandedContent)>,
    }

    fn case() -> impl Strategy<Value = Case> {
        let landed = (
            any::<u64>(),
            1u64..20,
            prop_oneof![
                Just(LandedContent::Source),
                Just(LandedContent::Zero),
                any::<u64>().prop_map(LandedContent::Stale)
            ],
        );
        (
            1u64..(4 * u64::from(CHUNK) / 512),
            12u32..=16,
            proptest::collection::vec(0u8..3, 64),
            prop_oneof![
                Just(BaselineKind::Blocks),
                Just(BaselineKind::Digest),
                Just(BaselineKind::Zero),
                Just(BaselineKind::Unknown)
            ],
            any::<u64>(),
            proptest::collection::vec(landed, 0..12),
        )
            .prop_map(
                |(sectors, block_shift, source_units, baseline_kind, baseline_seed, landed)| Case {
                    sectors,
                    block_shift,
                    source_units,
                    baseline_kind,
                    baseline_seed,
                    landed,
                },
            )
    }

    /// Builds baseline volume, source and landed list; plans every chunk; applies the plan to
    /// the volume model. Returns (volume after, source, plans).
    fn run(case: &Case) -> (Vec<u8>, Vec<u8>, Vec<ChunkPlan>) {
        let g = ChunkGeometry::new(case.sectors * 512, CHUNK).unwrap();
        let size = g.size() as usize;
        let layout = BlockLayout::new(CHUNK, 1 << case.block_shift).unwrap();
        let hasher = BlockHasher::new(layout);

        // The volume at the last point.
        let mut base = vec![0u8; size];
        if !matches!(case.baseline_kind, BaselineKind::Zero) {
            fill(&mut base, case.baseline_seed);
            // Some zero regions in the baseline too.
            for (i, unit) in base.chunks_mut(4096).enumerate() {
                if case.baseline_seed >> (i % 64) & 1 == 1 {
                    unit.fill(0);
                }
            }
        }
        // The source now.
        let mut source = base.clone();
        let mut fresh = vec![0u8; size];
        fill(&mut fresh, case.baseline_seed ^ 0x5555);
        for (i, unit) in source.chunks_mut(4096).enumerate() {
            match case.source_units[i % case.source_units.len()] {
                0 => unit.fill(0),
                1 => {}
                _ => unit.copy_from_slice(&fresh[i * 4096..i * 4096 + unit.len()]),
            }
        }
        // Landed extents: written to the volume after the point, recorded with their digest.
        let mut volume = base.clone();
        let mut landed = Vec::new();
        for (pos, units, content) in &case.landed {
            let chunk = (pos & 0xffff_ffff) % g.chunk_count();
            let r = g.chunk_range(chunk);
            let chunk_units = (r.end - r.start).div_ceil(4096);
            let first = (pos >> 32) % chunk_units;
            let start = r.start + first * 4096;
            let end = (start + units * 4096).min(r.end);
            let (s, e) = (start as usize, end as usize);
            let bytes: Vec<u8> = match content {
                LandedContent::Source => source[s..e].to_vec(),
                LandedContent::Zero => vec![0; e - s],
                LandedContent::Stale(seed) => {
                    let mut v = vec![0u8; e - s];
                    fill(&mut v, *seed);
                    v
                }
            };
            volume[s..e].copy_from_slice(&bytes);
            let kind = if matches!(content, LandedContent::Zero) {
                LandedKind::Zero
            } else {
                LandedKind::Data(Digest::of(&bytes))
            };
            landed.push(LandedExtent {
                offset: start,
                len: (end - start) as u32,
                kind,
            });
        }

        let mut plans = Vec::new();
        for i in 0..g.chunk_count() {
            let r = g.chunk_range(i);
            let (s, e) = (r.start as usize, r.end as usize);
            let baseline = match case.baseline_kind {
                BaselineKind::Blocks => ChunkBaseline::Blocks(hasher.hash_chunk(&base[s..e]).blocks),
                BaselineKind::Digest => match hasher.hash_chunk(&base[s..e]).digest {
                    Some(d) => ChunkBaseline::Digest(d),
                    None => ChunkBaseline::Zero,
                },
                BaselineKind::Zero => ChunkBaseline::Zero,
                BaselineKind::Unknown => ChunkBaseline::Unknown,
            };
            let in_chunk: Vec<LandedExtent> = landed
                .iter()
                .filter(|l| l.offset < r.end && l.offset + u64::from(l.len) > r.start)
                .copied()
                .collect();
            let data = &source[s..e];
            let hashes = hasher.hash_chunk(data);
            let plan = plan_chunk(layout, r.start, data, &hashes, &baseline, &in_chunk);
            for x in &plan.extents {
                let abs = s + x.range.start..s + x.range.end;
                // Every extent is valid on the wire.
                g.check_extent(abs.start as u64, abs.len() as u64).unwrap();
                match x.kind {
                    ExtentKind::Data(d) => {
                        assert_eq!(d, Digest::of(&source[abs.clone()]));
                        assert!(!is_zero(&source[abs.clone()]));
                        volume[abs.clone()].copy_from_slice(&source[abs]);
                    }
                    ExtentKind::Zero => {
                        assert!(is_zero(&source[abs.clone()]));
                        volume[abs].fill(0);
                    }
                }
            }
            assert_eq!(
                plan.bytes_zero + plan.bytes_unchanged + plan.bytes_data,
                (e - s) as u64
            );
            plans.push(plan);
        }
        (volume, source, plans)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// After applying the planned extents, the volume equals the source.
        #[test]
        fn planned_extents_make_the_volume_equal_the_source(case in case()) {
            let (volume, source, _) = run(&case);
            prop_assert!(volume == source, "volume differs from the source");
        }

        /// When the source equals the volume (nothing changed, no landed extents) and the
        /// baseline is known, nothing is sent.
        #[test]
        fn nothing_is_sent_when_source_equals_volume(mut case in case()) {
            case.source_units = vec![1];
            case.landed.clear();
            let (_, _, plans) = run(&case);
            if !matches!(case.baseline_kind, BaselineKind::Unknown) {
                for p in &plans {
                    prop_assert!(p.extents.is_empty(), "sent {:?}", p.extents);
                }
            }
        }

        /// Landed extents that hold the current source and cover it make re-sending
        /// unnecessary, whatever the baseline and however they are cut.
        #[test]
        fn covering_matching_landed_extents_send_nothing(mut case in case(), cuts in proptest::collection::vec(any::<u64>(), 1..64)) {
            let g = ChunkGeometry::new(case.sectors * 512, CHUNK).unwrap();
            case.landed.clear();
            for i in 0..g.chunk_count() {
                let r = g.chunk_range(i);
                let units = (r.end - r.start).div_ceil(4096);
                let cut = cuts[i as usize % cuts.len()] % units;
                // Two extents, [start, cut) (if not empty) and [cut, end).
                if cut > 0 {
                    case.landed.push((i, cut, LandedContent::Source));
                }
                case.landed.push((i | (cut << 32), units, LandedContent::Source));
            }
            let (volume, source, plans) = run(&case);
            prop_assert!(volume == source);
            for p in &plans {
                prop_assert!(p.extents.is_empty(), "sent {:?}", p.extents);
            }
        }
    }

    /// Several interrupted syncs against the same baseline, with a landed store that keeps
    /// one record per offset (a new record replaces the one at its offset) and a source that
    /// keeps changing, partly back to the baseline's bytes; the last sync completes.
    #[derive(Debug, Clone)]
    struct Rounds {
        sectors: u64,
        block_shift: u32,
        seed: u64,
        /// Per round: per 4 KiB unit mutation (0 keep, 1 zero, 2 new bytes, 3 back to the
        /// baseline) and how many planned extents land before the interruption.
        rounds: Vec<(Vec<u8>, usize)>,
    }

    fn rounds() -> impl Strategy<Value = Rounds> {
        (
            1u64..(3 * u64::from(CHUNK) / 512),
            12u32..=15,
            any::<u64>(),
            proptest::collection::vec((proptest::collection::vec(0u8..4, 1..48), 0usize..12), 1..5),
        )
            .prop_map(|(sectors, block_shift, seed, rounds)| Rounds {
                sectors,
                block_shift,
                seed,
                rounds,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn interrupted_syncs_with_an_offset_keyed_landed_store_converge(r in rounds()) {
            let g = ChunkGeometry::new(r.sectors * 512, CHUNK).unwrap();
            let size = g.size() as usize;
            let layout = BlockLayout::new(CHUNK, 1 << r.block_shift).unwrap();
            let hasher = BlockHasher::new(layout);
            let mut base = vec![0u8; size];
            fill(&mut base, r.seed);
            for (i, unit) in base.chunks_mut(4096).enumerate() {
                if r.seed >> (i % 61) & 1 == 1 {
                    unit.fill(0);
                }
            }
            let baselines: Vec<ChunkBaseline> = (0..g.chunk_count())
                .map(|i| {
                    let cr = g.chunk_range(i);
                    ChunkBaseline::Blocks(hasher.hash_chunk(&base[cr.start as usize..cr.end as usize]).blocks)
                })
                .collect();
            let mut volume = base.clone();
            let mut source = base.clone();
            let mut store: std::collections::BTreeMap<u64, LandedExtent> = Default::default();
            let last = r.rounds.len() - 1;
            for (round, (mutation, landing)) in r.rounds.iter().enumerate() {
                let mut fresh = vec![0u8; size];
                fill(&mut fresh, r.seed ^ ((round as u64 + 1) * 0x9e37_79b9));
                for (i, unit) in source.chunks_mut(4096).enumerate() {
                    let at = i * 4096..i * 4096 + unit.len();
                    match mutation[i % mutation.len()] {
                        1 => unit.fill(0),
                        2 => unit.copy_from_slice(&fresh[at]),
                        3 => unit.copy_from_slice(&base[at]),
                        _ => {}
                    }
                }
                let landed: Vec<LandedExtent> = store.values().copied().collect();
                let mut planned = Vec::new();
                for i in 0..g.chunk_count() {
                    let cr = g.chunk_range(i);
                    let data = &source[cr.start as usize..cr.end as usize];
                    let in_chunk: Vec<LandedExtent> =
                        landed.iter().filter(|l| g.chunk_of(l.offset) == i).copied().collect();
                    let plan = plan_chunk(layout, cr.start, data, &hasher.hash_chunk(data), &baselines[i as usize], &in_chunk);
                    for x in plan.extents {
                        planned.push((cr.start + x.range.start as u64, x));
                    }
                }
                let n = if round == last { planned.len() } else { (*landing).min(planned.len()) };
                for (offset, x) in planned.into_iter().take(n) {
                    let abs = offset as usize..offset as usize + x.range.len();
                    volume[abs.clone()].copy_from_slice(&source[abs.clone()]);
                    let kind = match x.kind {
                        ExtentKind::Data(d) => LandedKind::Data(d),
                        ExtentKind::Zero => LandedKind::Zero,
                    };
                    store.insert(offset, LandedExtent { offset, len: abs.len() as u32, kind });
                }
            }
            prop_assert!(volume == source, "volume differs from the source");
        }
    }

    #[test]
    fn whole_changed_chunk_uses_the_chunk_digest() {
        let layout = BlockLayout::new(CHUNK, 4096).unwrap();
        let hasher = BlockHasher::new(layout);
        let mut data = vec![0u8; CHUNK as usize];
        fill(&mut data, 7);
        let h = hasher.hash_chunk(&data);
        let plan = plan_chunk(layout, 0, &data, &h, &ChunkBaseline::Zero, &[]);
        assert_eq!(plan.extents.len(), 1);
        assert_eq!(plan.extents[0].range, 0..CHUNK as usize);
        assert_eq!(plan.extents[0].kind, ExtentKind::Data(Digest::of(&data)));
    }

    #[test]
    fn one_changed_block_is_one_small_extent() {
        let layout = BlockLayout::new(CHUNK, 4096).unwrap();
        let hasher = BlockHasher::new(layout);
        let mut data = vec![0u8; CHUNK as usize];
        fill(&mut data, 7);
        let before = hasher.hash_chunk(&data);
        data[5 * 4096 + 3] ^= 0xff;
        let now = hasher.hash_chunk(&data);
        let plan = plan_chunk(
            layout,
            1 << 20,
            &data,
            &now,
            &ChunkBaseline::Blocks(before.blocks),
            &[],
        );
        assert_eq!(plan.extents.len(), 1);
        assert_eq!(plan.extents[0].range, 5 * 4096..6 * 4096);
        assert_eq!(plan.bytes_data, 4096);
        assert_eq!(plan.bytes_unchanged, u64::from(CHUNK) - 4096);
    }

    #[test]
    fn zeroed_blocks_become_a_zero_extent() {
        let layout = BlockLayout::new(CHUNK, 4096).unwrap();
        let hasher = BlockHasher::new(layout);
        let mut data = vec![0u8; CHUNK as usize];
        fill(&mut data, 9);
        let before = hasher.hash_chunk(&data);
        data[4096..3 * 4096].fill(0);
        let now = hasher.hash_chunk(&data);
        let plan = plan_chunk(layout, 0, &data, &now, &ChunkBaseline::Blocks(before.blocks), &[]);
        assert_eq!(
            plan.extents,
            vec![PlannedExtent {
                range: 4096..3 * 4096,
                kind: ExtentKind::Zero
            }]
        );
        assert_eq!(plan.bytes_data, 0);
    }

    #[test]
    fn chunk_covered_by_matching_landed_extents_sends_nothing() {
        let layout = BlockLayout::new(CHUNK, 16384).unwrap();
        let hasher = BlockHasher::new(layout);
        let mut data = vec![0u8; CHUNK as usize];
        fill(&mut data, 5);
        data[..8192].fill(0);
        let h = hasher.hash_chunk(&data);
        let start = 3 * u64::from(CHUNK);
        let landed = [
            LandedExtent {
                offset: start,
                len: 8192,
                kind: LandedKind::Zero,
            },
            LandedExtent {
                offset: start + 8192,
                len: 8192,
                kind: LandedKind::Data(Digest::of(&data[8192..16384])),
            },
            LandedExtent {
                offset: start + 16384,
                len: CHUNK - 16384,
                kind: LandedKind::Data(Digest::of(&data[16384..])),
            },
        ];
        let plan = plan_chunk(layout, start, &data, &h, &ChunkBaseline::Unknown, &landed);
        assert!(plan.extents.is_empty(), "{:?}", plan.extents);
        // The same extents after the source changed in the middle: that block is sent again.
        data[20000] ^= 1;
        let h = hasher.hash_chunk(&data);
        let plan = plan_chunk(layout, start, &data, &h, &ChunkBaseline::Unknown, &landed);
        let ranges: Vec<_> = plan.extents.iter().map(|x| x.range.clone()).collect();
        assert_eq!(ranges, vec![16384..CHUNK as usize]);
    }

    #[test]
    fn partially_covering_landed_extent_sends_the_block() {
        let layout = BlockLayout::new(CHUNK, 16384).unwrap();
        let hasher = BlockHasher::new(layout);
        let mut data = vec![0u8; CHUNK as usize];
        fill(&mut data, 3);
        let h = hasher.hash_chunk(&data);
        // Matches the source, but covers only a quarter of block 0.
        let landed = [LandedExtent {
            offset: 0,
            len: 4096,
            kind: LandedKind::Data(Digest::of(&data[..4096])),
        }];
        let plan = plan_chunk(
            layout,
            0,
            &data,
            &h,
            &ChunkBaseline::Digest(h.digest.unwrap()),
            &landed,
        );
        assert_eq!(plan.extents.len(), 1);
        assert_eq!(plan.extents[0].range, 0..16384);
    }
}
