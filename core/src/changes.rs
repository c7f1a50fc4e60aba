//! Changed areas of a disk since a recovery point, from any change tracker (QEMU dirty bitmaps
//! over NBD, Ceph RBD snapshot diffs, VMware CBT).
//!
//! A [`ChangeMap`] lists, in offset order, the ranges of a disk that may differ from what the
//! disk held at the base point, each marked [`ChangeKind::Data`] (read it) or
//! [`ChangeKind::Zero`] (it now reads as zeros: a hole, a discard, a `z` record; don't read it).
//! Everything outside the listed ranges is unchanged since the base point. The ranges are
//! sorted, do not overlap, are not empty, lie inside the disk, and two touching ranges of the
//! same kind are merged, so two maps of the same changes compare equal.
//!
//! The map is built from untrusted input (an NBD server's replies, an `rbd export-diff` stream):
//! [`ChangeMap::from_sorted`] rejects ranges out of order, overlapping or past the disk's end
//! instead of guessing.

use std::ops::Range;

use crate::geometry::ChunkGeometry;

/// What a changed range holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Data: must be read.
    Data,
    /// Zeros: known without reading.
    Zero,
}

/// One changed range.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Change {
    /// Byte range on the disk.
    pub range: Range<u64>,
    /// What it holds now.
    pub kind: ChangeKind,
}

impl Change {
    /// A changed range of `kind`.
    pub fn new(range: Range<u64>, kind: ChangeKind) -> Self {
        Self { range, kind }
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.range.end - self.range.start
    }

    /// True when the range is empty (never the case inside a [`ChangeMap`]).
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// Why a list of changes was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    #[error("changed range {start}..{end} is empty or reversed")]
    Empty { start: u64, end: u64 },
    #[error("changed range {start}..{end} lies past the end of the disk ({size} bytes)")]
    PastEnd { start: u64, end: u64, size: u64 },
    #[error(
        "changed range {start}..{end} starts before the end of the previous one ({prev_end}): out of order or overlapping"
    )]
    Order { start: u64, end: u64, prev_end: u64 },
}

/// The changed ranges of one disk (see the module docs for the invariants).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeMap {
    size: u64,
    changes: Vec<Change>,
}

impl ChangeMap {
    /// No change on a disk of `size` bytes.
    pub fn empty(size: u64) -> Self {
        Self {
            size,
            changes: Vec::new(),
        }
    }

    /// Everything changed: the whole disk is [`ChangeKind::Data`].
    pub fn full(size: u64) -> Self {
        let mut m = Self::empty(size);
        if size > 0 {
            m.changes.push(Change::new(0..size, ChangeKind::Data));
        }
        m
    }

    /// Builds a map from ranges that must already be in increasing order, not overlapping, not
    /// empty and inside `0..size` (touching ranges are fine; they are merged when of the same
    /// kind).
    pub fn from_sorted(size: u64, changes: impl IntoIterator<Item = Change>) -> Result<Self, ChangeError> {
        let mut m = Self::empty(size);
        for c in changes {
            m.push(c)?;
        }
        Ok(m)
    }

    /// Appends one range after the last one, with the checks of [`ChangeMap::from_sorted`].
    pub fn push(&mut self, c: Change) -> Result<(), ChangeError> {
        let (start, end) = (c.range.start, c.range.end);
        if start >= end {
            return Err(ChangeError::Empty { start, end });
        }
        if end > self.size {
            return Err(ChangeError::PastEnd {
                start,
                end,
                size: self.size,
            });
        }
        match self.changes.last_mut() {
            Some(last) if start < last.range.end => Err(ChangeError::Order {
                start,
                end,
                prev_end: last.range.end,
            }),
            Some(last) if start == last.range.end && last.kind == c.kind => {
                last.range.end = end;
                Ok(())
            }
            _ => {
                self.changes.push(c);
                Ok(())
            }
        }
    }

    /// Combines a dirty list (ranges written since the base point, in any order, possibly
    /// overlapping, clipped to the disk) with the disk's current holes (ranges that read as
    /// zeros, in any order): dirty ranges inside a hole become [`ChangeKind::Zero`], the rest
    /// [`ChangeKind::Data`]. Holes outside the dirty ranges are ignored (unchanged).
    pub fn from_dirty(size: u64, dirty: &[Range<u64>], holes: &[Range<u64>]) -> Self {
        let dirty = normalize(size, dirty);
        let holes = normalize(size, holes);
        let mut m = Self::empty(size);
        let mut h = 0;
        for d in dirty {
            let mut pos = d.start;
            while pos < d.end {
                while h < holes.len() && holes[h].end <= pos {
                    h += 1;
                }
                let (end, kind) = match holes.get(h) {
                    Some(hole) if hole.start <= pos => (hole.end.min(d.end), ChangeKind::Zero),
                    Some(hole) => (hole.start.min(d.end), ChangeKind::Data),
                    None => (d.end, ChangeKind::Data),
                };
                // Ranges come out sorted, disjoint, non-empty and inside the disk.
                let _ = m.push(Change::new(pos..end, kind));
                pos = end;
            }
        }
        m
    }

    /// The disk size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The changed ranges, in offset order.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }

    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Bytes of data ranges and of zero ranges.
    pub fn bytes(&self) -> (u64, u64) {
        self.changes.iter().fold((0, 0), |(d, z), c| match c.kind {
            ChangeKind::Data => (d + c.len(), z),
            ChangeKind::Zero => (d, z + c.len()),
        })
    }

    /// The same map in whole blocks of `align` bytes (the last block may be short): every block
    /// a change touches is changed; it is [`ChangeKind::Zero`] only when zero changes cover it
    /// entirely, else [`ChangeKind::Data`]. A block that is partly zero and partly unchanged (or
    /// data) must be read: the rest of it is not known to be zero.
    pub fn align_out(&self, align: u64) -> Self {
        let align = align.max(1);
        let touched: Vec<Range<u64>> = self
            .changes
            .iter()
            .map(|c| c.range.start / align * align..c.range.end.next_multiple_of(align).min(self.size))
            .collect();
        // The blocks that zero ranges cover entirely: each zero range shrunk to block boundaries
        // (the disk's end is one).
        let zero_blocks: Vec<Range<u64>> = self
            .changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Zero)
            .map(|c| {
                let end = if c.range.end == self.size {
                    self.size
                } else {
                    c.range.end / align * align
                };
                c.range.start.next_multiple_of(align)..end
            })
            .filter(|r| r.start < r.end)
            .collect();
        Self::from_dirty(self.size, &touched, &zero_blocks)
    }

    /// The changes cut at chunk boundaries: for each chunk that any change touches, in order,
    /// its index and the changes inside it (absolute offsets).
    pub fn by_chunk(&self, geometry: &ChunkGeometry) -> Vec<(u64, Vec<Change>)> {
        let mut out: Vec<(u64, Vec<Change>)> = Vec::new();
        for c in &self.changes {
            for (chunk, r) in geometry.split(c.range.start, c.len()) {
                let piece = Change::new(r, c.kind);
                match out.last_mut() {
                    Some((last, v)) if *last == chunk => v.push(piece),
                    _ => out.push((chunk, vec![piece])),
                }
            }
        }
        out
    }
}

/// Sorts and merges ranges, clipped to `0..size`, dropping empty ones.
fn normalize(size: u64, ranges: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut v: Vec<Range<u64>> = ranges
        .iter()
        .map(|r| r.start.min(size)..r.end.min(size))
        .filter(|r| r.start < r.end)
        .collect();
    v.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(r: Range<u64>) -> Change {
        Change::new(r, ChangeKind::Data)
    }
    fn z(r: Range<u64>) -> Change {
        Change::new(r, ChangeKind::Zero)
    }

    #[test]
    fn sorted_input_is_checked_and_merged() {
        let m = ChangeMap::from_sorted(100, [d(0..10), d(10..20), z(20..30), d(40..50)]).unwrap();
        assert_eq!(m.changes(), &[d(0..20), z(20..30), d(40..50)]);
        assert_eq!(m.bytes(), (30, 10));
        assert_eq!(
            ChangeMap::from_sorted(100, [d(0..10), d(5..20)]),
            Err(ChangeError::Order {
                start: 5,
                end: 20,
                prev_end: 10
            })
        );
        assert_eq!(
            ChangeMap::from_sorted(100, [d(90..101)]),
            Err(ChangeError::PastEnd {
                start: 90,
                end: 101,
                size: 100
            })
        );
        assert_eq!(
            ChangeMap::from_sorted(100, [d(5..5)]),
            Err(ChangeError::Empty { start: 5, end: 5 })
        );
    }

    #[test]
    fn dirty_ranges_inside_holes_become_zero() {
        let m = ChangeMap::from_dirty(100, &[50..70, 0..20, 10..30], &[15..25, 60..100, 80..90]);
        assert_eq!(
            m.changes(),
            &[d(0..15), z(15..25), d(25..30), d(50..60), z(60..70)]
        );
    }

    #[test]
    fn chunks_split_changes() {
        let g = ChunkGeometry::new(3 << 16, 1 << 16).unwrap();
        let m =
            ChangeMap::from_sorted(3 << 16, [d(100..(1 << 16) + 10), z((2 << 16) + 1..(3 << 16))]).unwrap();
        let c = m.by_chunk(&g);
        assert_eq!(
            c,
            vec![
                (0, vec![d(100..1 << 16)]),
                (1, vec![d(1 << 16..(1 << 16) + 10)]),
                (2, vec![z((2 << 16) + 1..3 << 16)]),
            ]
        );
    }

    #[test]
    fn aligning_keeps_zero_only_for_whole_blocks() {
        let m = ChangeMap::from_sorted(100, [d(5..12), z(12..35), d(41..42)]).unwrap();
        let a = m.align_out(10);
        assert_eq!(a.changes(), &[d(0..20), z(20..30), d(30..50)]);
        // A zero range inside one block: the block is read (its rest is unchanged data).
        let m = ChangeMap::from_sorted(100, [z(12..18)]).unwrap();
        assert_eq!(m.align_out(10).changes(), &[d(10..20)]);
        // The disk's short last block counts as whole.
        let m = ChangeMap::from_sorted(95, [z(90..95)]).unwrap();
        assert_eq!(m.align_out(10).changes(), &[z(90..95)]);
    }

    proptest! {
        /// Whatever the input, a map from dirty ranges keeps the invariants and covers exactly
        /// the dirty bytes, zero exactly where a hole is.
        #[test]
        fn from_dirty_is_exact(
            size in 0u64..300,
            dirty in proptest::collection::vec((0u64..320, 0u64..40), 0..8),
            holes in proptest::collection::vec((0u64..320, 0u64..40), 0..8),
            align in 1u64..17,
        ) {
            let dirty: Vec<Range<u64>> = dirty.into_iter().map(|(s, l)| s..s + l).collect();
            let holes: Vec<Range<u64>> = holes.into_iter().map(|(s, l)| s..s + l).collect();
            let m = ChangeMap::from_dirty(size, &dirty, &holes);
            // Invariants: re-building from the output accepts it unchanged.
            prop_assert_eq!(&ChangeMap::from_sorted(size, m.changes().iter().cloned()).unwrap(), &m);
            for b in 0..size {
                let is_dirty = dirty.iter().any(|r| r.contains(&b));
                let is_hole = holes.iter().any(|r| r.contains(&b));
                let got = m.changes().iter().find(|c| c.range.contains(&b)).map(|c| c.kind);
                let want = is_dirty.then_some(if is_hole { ChangeKind::Zero } else { ChangeKind::Data });
                prop_assert_eq!(got, want, "byte {}", b);
            }
            // Aligned out: whole blocks; covers at least the same bytes; zero only where the
            // original said zero; nothing outside the touched blocks.
            let a = m.align_out(align);
            prop_assert_eq!(&ChangeMap::from_sorted(size, a.changes().iter().cloned()).unwrap(), &a);
            for c in a.changes() {
                prop_assert!(c.range.start % align == 0 && (c.range.end % align == 0 || c.range.end == size));
            }
            for b in 0..size {
                let orig = m.changes().iter().find(|c| c.range.contains(&b)).map(|c| c.kind);
                let got = a.changes().iter().find(|c| c.range.contains(&b)).map(|c| c.kind);
                if orig.is_some() {
                    prop_assert!(got.is_some());
                }
                if got == Some(ChangeKind::Zero) {
                    prop_assert_eq!(orig, Some(ChangeKind::Zero), "byte {} zeroed but not known zero", b);
                }
                if got.is_some() {
                    let blk = b / align * align..(b / align * align + align).min(size);
                    prop_assert!(m.changes().iter().any(|c| c.range.start < blk.end && blk.start < c.range.end));
                }
            }
        }
    }
}
