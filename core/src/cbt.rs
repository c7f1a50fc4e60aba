//! VMware changed-block tracking (CBT) for the VMware source (design: `docs/vmware-cbt.md`).
//!
//! Three pieces, none of which talks to vCenter (the caller does that):
//!
//! - [`ChangeId`]: the `changeId` string of a virtual disk's backing (`"*"`, or
//!   `"<epoch>/<sequence>"` such as `"52 de c0 d9 98 ae 8e 4b-26 cb 22 d6 1b 55 f6 34/12"`), and
//!   [`decide`]: whether a sync may ask `QueryChangedDiskAreas` for the changes since the
//!   baseline point's change id, or must be a full sync, and why ([`FullSyncReason`]).
//! - [`ChangedAreasBuilder`]: the replies of `QueryChangedDiskAreas` ([`DiskChangeInfo`], called
//!   in a loop from `startOffset` 0 until the disk is covered) checked and turned into a
//!   [`ChangeMap`]. A reply is untrusted input: windows must be contiguous from 0 without gaps
//!   or overlaps, areas sorted, disjoint, inside their window and inside the disk; anything else
//!   is refused, never repaired.
//!
//! The change id of the snapshot behind each committed point is kept as that point's *change
//! token* in the agent's block-values file (`docs/formats.md`, "Agent state"), written before
//! the commit and installed after it, like the NBD source's bitmap names; [`decide`] compares
//! it with the new snapshot's change id.
//!
//! CBT only says "these bytes may have been written"; it never says "these bytes are zeros".
//! An incremental query ([`AreasKind::Changed`]) therefore yields only
//! [`ChangeKind::Data`] ranges. A query with change id `"*"` ([`AreasKind::Allocated`]) lists
//! the allocated areas of the disk: everything else reads as zeros and becomes
//! [`ChangeKind::Zero`], so a full sync neither reads nor sends the holes of a thin disk yet still
//! clears whatever a previous point held there.

use std::fmt;
use std::str::FromStr;

use crate::changes::{Change, ChangeError, ChangeKind, ChangeMap};

/// The longest change id accepted (VMware's are about 55 characters); it also fits the agent's
/// change-token slot of 255 bytes in the block-values file.
pub const MAX_CHANGE_ID_LEN: usize = 255;
/// The longest epoch (the part before `/`) accepted.
pub const MAX_EPOCH_LEN: usize = 128;

// ---------------------------------------------------------------------------------------------
// Change ids
// ---------------------------------------------------------------------------------------------

/// Why a change id string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeIdError {
    /// The string is empty.
    #[error("change id is empty")]
    Empty,
    /// The string is longer than [`MAX_CHANGE_ID_LEN`].
    #[error("change id is {len} bytes long, more than the {max} accepted")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Neither `"*"` nor of the form `<epoch>/<sequence>`.
    #[error("change id {value:?} is neither \"*\" nor \"<epoch>/<sequence>\"")]
    NoSequence {
        /// The refused string.
        value: String,
    },
    /// The part before `/` is not a VMware tracking epoch.
    #[error("change id {value:?}: the epoch before '/' {reason}")]
    BadEpoch {
        /// The refused string.
        value: String,
        /// What is wrong with the epoch.
        reason: &'static str,
    },
    /// The part after `/` is not a decimal number that fits in 64 bits.
    #[error("change id {value:?}: the sequence after '/' must be a decimal number below 2^64")]
    BadSequence {
        /// The refused string.
        value: String,
    },
}

/// A VMware CBT change id: `"*"` (no point in time: "everything allocated") or
/// `"<epoch>/<sequence>"`.
///
/// The epoch identifies one tracking session of one disk (it changes when CBT is reset: disabled
/// and enabled again, or its `.ctk` file recreated); the sequence grows with every snapshot taken
/// within that epoch. Change ids are compared only through [`ChangeId::same_epoch`] and the
/// sequence; the exact original string is kept and is what is sent back to vCenter.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChangeId {
    text: String,
    /// For `<epoch>/<sequence>`: the byte index of the '/' and the sequence.
    tracked: Option<(usize, u64)>,
}

fn check_epoch(epoch: &str) -> Result<(), &'static str> {
    if epoch.is_empty() {
        return Err("is empty");
    }
    if epoch.len() > MAX_EPOCH_LEN {
        return Err("is longer than 128 characters");
    }
    if !epoch
        .bytes()
        .all(|b| b.is_ascii_hexdigit() || b == b' ' || b == b'-')
    {
        return Err("may only hold hex digits, spaces and '-'");
    }
    if !epoch.bytes().any(|b| b.is_ascii_hexdigit()) {
        return Err("holds no hex digit");
    }
    if epoch.starts_with(' ') || epoch.ends_with(' ') {
        return Err("starts or ends with a space");
    }
    Ok(())
}

impl ChangeId {
    /// The text of the wildcard change id.
    pub const ALL: &'static str = "*";

    /// The wildcard `"*"`: with `QueryChangedDiskAreas` it asks for every allocated area.
    pub fn all() -> Self {
        Self {
            text: Self::ALL.to_owned(),
            tracked: None,
        }
    }

    /// Parses and validates `text` (kept verbatim).
    pub fn parse(text: impl Into<String>) -> Result<Self, ChangeIdError> {
        let text = text.into();
        if text == Self::ALL {
            return Ok(Self::all());
        }
        if text.is_empty() {
            return Err(ChangeIdError::Empty);
        }
        if text.len() > MAX_CHANGE_ID_LEN {
            return Err(ChangeIdError::TooLong {
                len: text.len(),
                max: MAX_CHANGE_ID_LEN,
            });
        }
        let Some((epoch, seq)) = text.split_once('/') else {
            return Err(ChangeIdError::NoSequence { value: text });
        };
        if let Err(reason) = check_epoch(epoch) {
            return Err(ChangeIdError::BadEpoch {
                value: text.clone(),
                reason,
            });
        }
        let seq = if !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()) {
            seq.parse::<u64>().ok()
        } else {
            None
        };
        let Some(seq) = seq else {
            return Err(ChangeIdError::BadSequence { value: text });
        };
        let slash = epoch.len();
        Ok(Self {
            text,
            tracked: Some((slash, seq)),
        })
    }

    /// The change id as vCenter wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True for the wildcard `"*"`.
    pub fn is_all(&self) -> bool {
        self.tracked.is_none()
    }

    /// The tracking epoch (the part before `/`); `None` for `"*"`.
    pub fn epoch(&self) -> Option<&str> {
        self.tracked.map(|(slash, _)| &self.text[..slash])
    }

    /// The sequence number (the part after `/`); `None` for `"*"`.
    pub fn seq(&self) -> Option<u64> {
        self.tracked.map(|(_, seq)| seq)
    }

    /// True when both are `<epoch>/<sequence>` ids of the same tracking epoch (exact
    /// comparison: a mismatch only costs a full sync, a false match could miss changes).
    pub fn same_epoch(&self, other: &ChangeId) -> bool {
        match (self.epoch(), other.epoch()) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }
}

impl TryFrom<String> for ChangeId {
    type Error = ChangeIdError;
    fn try_from(v: String) -> Result<Self, ChangeIdError> {
        Self::parse(v)
    }
}

impl From<ChangeId> for String {
    fn from(v: ChangeId) -> String {
        v.text
    }
}

impl FromStr for ChangeId {
    type Err = ChangeIdError;
    fn from_str(s: &str) -> Result<Self, ChangeIdError> {
        Self::parse(s)
    }
}

impl fmt::Display for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for ChangeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)
    }
}

// ---------------------------------------------------------------------------------------------
// Incremental or full
// ---------------------------------------------------------------------------------------------

/// Why a disk must be synced in full instead of from its CBT changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullSyncReason {
    /// The target holds no point of this disk yet (first sync).
    NoBaseline,
    /// The change id on record is `"*"`, which names no moment in time.
    BaselineUntracked,
    /// The new snapshot's disk reports `"*"` (or no change id): CBT is not active on it.
    NewUntracked,
    /// CBT was reset: the tracking epoch changed, changes since the old id are unknowable.
    Reset {
        /// The epoch on record.
        old_epoch: String,
        /// The epoch of the new snapshot.
        new_epoch: String,
    },
    /// Same epoch but the sequence went down: the VM went back in time (reverted to a snapshot,
    /// restored from a backup), so the baseline is not an ancestor of the new snapshot.
    WentBackwards {
        /// The common epoch.
        epoch: String,
        /// The sequence on record.
        old_seq: u64,
        /// The sequence of the new snapshot.
        new_seq: u64,
    },
}

impl FullSyncReason {
    /// A short stable code for metrics labels and JSON (`no_baseline`, `reset`, …).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoBaseline => "no_baseline",
            Self::BaselineUntracked => "baseline_untracked",
            Self::NewUntracked => "new_untracked",
            Self::Reset { .. } => "reset",
            Self::WentBackwards { .. } => "went_backwards",
        }
    }
}

impl fmt::Display for FullSyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoBaseline => f.write_str("the target holds no point of this disk yet"),
            Self::BaselineUntracked => f.write_str("the recorded CBT change id is \"*\""),
            Self::NewUntracked => {
                f.write_str("CBT is not active on the snapshot's disk (change id \"*\" or none)")
            }
            Self::Reset { old_epoch, new_epoch } => write!(
                f,
                "CBT was reset: tracking epoch {old_epoch:?} is now {new_epoch:?}"
            ),
            Self::WentBackwards {
                epoch,
                old_seq,
                new_seq,
            } => write!(
                f,
                "CBT went backwards in epoch {epoch:?}: sequence {old_seq} on record, {new_seq} now (VM reverted or restored?)"
            ),
        }
    }
}

/// How to find a disk's changes for one sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Ask `QueryChangedDiskAreas` for the changes since `since` (the baseline's change id);
    /// only those areas are read ([`AreasKind::Changed`]).
    Incremental {
        /// The baseline point's change id.
        since: ChangeId,
    },
    /// Sync the whole disk: ask with `"*"` for the allocated areas ([`AreasKind::Allocated`]),
    /// or read everything if that query fails.
    Full {
        /// Why.
        reason: FullSyncReason,
    },
}

impl Decision {
    /// The `changeId` argument to pass to `QueryChangedDiskAreas`.
    pub fn query_change_id(&self) -> ChangeId {
        match self {
            Self::Incremental { since } => since.clone(),
            Self::Full { .. } => ChangeId::all(),
        }
    }

    /// How to read the replies of that query.
    pub fn areas_kind(&self) -> AreasKind {
        match self {
            Self::Incremental { .. } => AreasKind::Changed,
            Self::Full { .. } => AreasKind::Allocated,
        }
    }

    /// True for a full sync.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full { .. })
    }

    /// The reason of a full sync.
    pub fn full_reason(&self) -> Option<&FullSyncReason> {
        match self {
            Self::Full { reason } => Some(reason),
            Self::Incremental { .. } => None,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Incremental { since } => write!(f, "incremental: CBT changes since {since:?}"),
            Self::Full { reason } => write!(f, "full sync: {reason}"),
        }
    }
}

fn full(reason: FullSyncReason) -> Decision {
    Decision::Full { reason }
}

/// Decides from the change id recorded for the baseline point (`None`: no baseline) and the
/// change id of the new snapshot's disk. Incremental only when both are of the same epoch and the
/// sequence did not go down; an equal sequence is incremental too (the query then reports the
/// changes between two snapshots that CBT considers the same moment, usually none).
pub fn decide(baseline: Option<&ChangeId>, new: &ChangeId) -> Decision {
    let (Some(new_epoch), Some(new_seq)) = (new.epoch(), new.seq()) else {
        return full(FullSyncReason::NewUntracked);
    };
    let Some(old) = baseline else {
        return full(FullSyncReason::NoBaseline);
    };
    let (Some(old_epoch), Some(old_seq)) = (old.epoch(), old.seq()) else {
        return full(FullSyncReason::BaselineUntracked);
    };
    if !old.same_epoch(new) {
        return full(FullSyncReason::Reset {
            old_epoch: old_epoch.to_owned(),
            new_epoch: new_epoch.to_owned(),
        });
    }
    if new_seq < old_seq {
        return full(FullSyncReason::WentBackwards {
            epoch: old_epoch.to_owned(),
            old_seq,
            new_seq,
        });
    }
    Decision::Incremental { since: old.clone() }
}

// ---------------------------------------------------------------------------------------------
// QueryChangedDiskAreas replies → ChangeMap
// ---------------------------------------------------------------------------------------------

/// One changed (or, for `"*"`, allocated) area: vSphere's `DiskChangeExtent`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskChangeExtent {
    /// Start offset in bytes.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
}

/// One reply of `QueryChangedDiskAreas`: vSphere's `DiskChangeInfo`, which describes the window
/// `startOffset .. startOffset + length` of the disk and lists the areas changed inside it.
/// The serde form is the vSphere JSON API's (`startOffset`, `length`, `changedArea`; other
/// fields such as `_typeName` are ignored; negative numbers are refused).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskChangeInfo {
    /// Start of the window in bytes.
    pub start_offset: u64,
    /// Length of the window in bytes.
    pub length: u64,
    /// The areas inside the window (absent or empty: nothing changed there).
    #[serde(default)]
    pub changed_area: Vec<DiskChangeExtent>,
}

impl DiskChangeInfo {
    /// A reply for the window `start_offset .. start_offset + length` with `(start, length)`
    /// areas.
    pub fn new(start_offset: u64, length: u64, areas: impl IntoIterator<Item = (u64, u64)>) -> Self {
        Self {
            start_offset,
            length,
            changed_area: areas
                .into_iter()
                .map(|(start, length)| DiskChangeExtent { start, length })
                .collect(),
        }
    }
}

/// What the areas of a `QueryChangedDiskAreas` answer mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AreasKind {
    /// Asked with a real change id: the areas may have changed since it, the rest did not.
    Changed,
    /// Asked with `"*"`: the areas are allocated, the rest reads as zeros.
    Allocated,
}

impl AreasKind {
    /// The kind of answer a query with `change_id` gets.
    pub fn of_query(change_id: &ChangeId) -> Self {
        if change_id.is_all() {
            Self::Allocated
        } else {
            Self::Changed
        }
    }
}

/// Why the replies of `QueryChangedDiskAreas` were refused. `reply` is the 0-based index of the
/// reply in the loop, `area` the index of the area inside it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CbtMapError {
    /// A reply came after the replies already covered the whole disk.
    #[error("reply {reply} (startOffset {start_offset}) comes after the disk ({size} bytes) was covered")]
    ExtraReply {
        /// Reply index.
        reply: usize,
        /// Its startOffset.
        start_offset: u64,
        /// Disk size.
        size: u64,
    },
    /// A reply starts after the end of the previous one.
    #[error("reply {reply} starts at {start_offset}, leaving a gap after {expected}")]
    Gap {
        /// Reply index.
        reply: usize,
        /// Its startOffset.
        start_offset: u64,
        /// Where it had to start.
        expected: u64,
    },
    /// A reply starts before the end of the previous one.
    #[error(
        "reply {reply} starts at {start_offset}, overlapping the previous window that ends at {expected}"
    )]
    Overlap {
        /// Reply index.
        reply: usize,
        /// Its startOffset.
        start_offset: u64,
        /// Where it had to start.
        expected: u64,
    },
    /// A reply covers nothing (the query loop would never end).
    #[error("reply {reply} (startOffset {start_offset}) has length 0")]
    EmptyWindow {
        /// Reply index.
        reply: usize,
        /// Its startOffset.
        start_offset: u64,
    },
    /// startOffset + length does not fit in 64 bits.
    #[error("reply {reply}: startOffset {start_offset} + length {length} overflows")]
    WindowOverflow {
        /// Reply index.
        reply: usize,
        /// Its startOffset.
        start_offset: u64,
        /// Its length.
        length: u64,
    },
    /// An area has length 0.
    #[error("reply {reply} area {area} at {start} has length 0")]
    EmptyArea {
        /// Reply index.
        reply: usize,
        /// Area index.
        area: usize,
        /// Its start.
        start: u64,
    },
    /// start + length of an area does not fit in 64 bits.
    #[error("reply {reply} area {area}: start {start} + length {length} overflows")]
    AreaOverflow {
        /// Reply index.
        reply: usize,
        /// Area index.
        area: usize,
        /// Its start.
        start: u64,
        /// Its length.
        length: u64,
    },
    /// An area lies (partly) outside its reply's window.
    #[error(
        "reply {reply} area {area} {start}..{end} lies outside the reply's window {window_start}..{window_end}"
    )]
    AreaOutsideWindow {
        /// Reply index.
        reply: usize,
        /// Area index.
        area: usize,
        /// Area start.
        start: u64,
        /// Area end.
        end: u64,
        /// Window start.
        window_start: u64,
        /// Window end.
        window_end: u64,
    },
    /// An area ends past the end of the disk.
    #[error("reply {reply} area {area} {start}..{end} lies past the end of the disk ({size} bytes)")]
    AreaPastEnd {
        /// Reply index.
        reply: usize,
        /// Area index.
        area: usize,
        /// Area start.
        start: u64,
        /// Area end.
        end: u64,
        /// Disk size.
        size: u64,
    },
    /// An area starts before the end of the previous one (unsorted or overlapping).
    #[error(
        "reply {reply} area {area} {start}..{end} starts before the previous area's end {prev_end}: unsorted or overlapping"
    )]
    AreaOrder {
        /// Reply index.
        reply: usize,
        /// Area index.
        area: usize,
        /// Area start.
        start: u64,
        /// Area end.
        end: u64,
        /// End of the previous area.
        prev_end: u64,
    },
    /// The replies stop before the end of the disk.
    #[error("the replies cover only {covered} of the disk's {size} bytes")]
    Incomplete {
        /// Bytes covered from offset 0.
        covered: u64,
        /// Disk size.
        size: u64,
    },
    /// The change map refused a range (cannot happen after the checks above; kept as an error
    /// rather than a panic).
    #[error("change map refused a CBT range")]
    Map(#[from] ChangeError),
}

/// Builds a [`ChangeMap`] from the replies of the `QueryChangedDiskAreas` loop of one disk.
///
/// ```text
/// let mut b = ChangedAreasBuilder::new(capacity_in_bytes, decision.areas_kind());
/// while let Some(offset) = b.next_offset() {
///     let reply = vcenter.query_changed_disk_areas(snapshot, device_key, offset, &change_id)?;
///     b.push(&reply)?;
/// }
/// let map = b.finish()?;
/// ```
///
/// A refused reply leaves the builder unchanged.
#[derive(Debug, Clone)]
pub struct ChangedAreasBuilder {
    size: u64,
    kind: AreasKind,
    covered: u64,
    replies: usize,
    last_end: u64,
    map: ChangeMap,
}

impl ChangedAreasBuilder {
    /// A builder for a disk of `size` bytes (the disk's `capacityInBytes` in the snapshot).
    pub fn new(size: u64, kind: AreasKind) -> Self {
        Self {
            size,
            kind,
            covered: 0,
            replies: 0,
            last_end: 0,
            map: ChangeMap::empty(size),
        }
    }

    /// The `startOffset` of the next query, or `None` once the disk is covered.
    pub fn next_offset(&self) -> Option<u64> {
        (!self.is_complete()).then_some(self.covered)
    }

    /// True when the replies cover the whole disk.
    pub fn is_complete(&self) -> bool {
        self.covered >= self.size
    }

    /// The number of replies accepted so far.
    pub fn replies(&self) -> usize {
        self.replies
    }

    /// Checks one reply and adds its areas.
    pub fn push(&mut self, info: &DiskChangeInfo) -> Result<(), CbtMapError> {
        let reply = self.replies;
        let start_offset = info.start_offset;
        if self.is_complete() {
            return Err(CbtMapError::ExtraReply {
                reply,
                start_offset,
                size: self.size,
            });
        }
        if start_offset > self.covered {
            return Err(CbtMapError::Gap {
                reply,
                start_offset,
                expected: self.covered,
            });
        }
        if start_offset < self.covered {
            return Err(CbtMapError::Overlap {
                reply,
                start_offset,
                expected: self.covered,
            });
        }
        if info.length == 0 {
            return Err(CbtMapError::EmptyWindow { reply, start_offset });
        }
        let window_end = start_offset
            .checked_add(info.length)
            .ok_or(CbtMapError::WindowOverflow {
                reply,
                start_offset,
                length: info.length,
            })?;
        // Check everything before changing anything.
        let mut prev_end = start_offset;
        let mut areas = Vec::with_capacity(info.changed_area.len());
        for (area, a) in info.changed_area.iter().enumerate() {
            let start = a.start;
            if a.length == 0 {
                return Err(CbtMapError::EmptyArea { reply, area, start });
            }
            let end = start.checked_add(a.length).ok_or(CbtMapError::AreaOverflow {
                reply,
                area,
                start,
                length: a.length,
            })?;
            if start < start_offset || end > window_end {
                return Err(CbtMapError::AreaOutsideWindow {
                    reply,
                    area,
                    start,
                    end,
                    window_start: start_offset,
                    window_end,
                });
            }
            if end > self.size {
                return Err(CbtMapError::AreaPastEnd {
                    reply,
                    area,
                    start,
                    end,
                    size: self.size,
                });
            }
            if start < prev_end {
                return Err(CbtMapError::AreaOrder {
                    reply,
                    area,
                    start,
                    end,
                    prev_end,
                });
            }
            prev_end = end;
            areas.push(start..end);
        }
        let mut map = self.map.clone();
        let mut last_end = self.last_end;
        for r in areas {
            if self.kind == AreasKind::Allocated && r.start > last_end {
                map.push(Change::new(last_end..r.start, ChangeKind::Zero))?;
            }
            last_end = r.end;
            map.push(Change::new(r, ChangeKind::Data))?;
        }
        self.map = map;
        self.last_end = last_end;
        self.covered = window_end;
        self.replies += 1;
        Ok(())
    }

    /// The change map, once the replies cover the disk.
    pub fn finish(mut self) -> Result<ChangeMap, CbtMapError> {
        if !self.is_complete() {
            return Err(CbtMapError::Incomplete {
                covered: self.covered,
                size: self.size,
            });
        }
        if self.kind == AreasKind::Allocated && self.last_end < self.size {
            self.map
                .push(Change::new(self.last_end..self.size, ChangeKind::Zero))?;
        }
        Ok(self.map)
    }
}

/// [`ChangedAreasBuilder`] over a complete list of replies.
pub fn change_map_from_replies<'a>(
    size: u64,
    kind: AreasKind,
    replies: impl IntoIterator<Item = &'a DiskChangeInfo>,
) -> Result<ChangeMap, CbtMapError> {
    let mut b = ChangedAreasBuilder::new(size, kind);
    for r in replies {
        b.push(r)?;
    }
    b.finish()
}

/// Rounds every range out to multiples of `granularity`, data winning over zeros
/// ([`ChangeMap::align_out`]): the compare block size in block mode (exact extents), the chunk
/// size (4 MiB) in object mode (whole chunks).
pub fn align_changes(map: &ChangeMap, granularity: u64) -> ChangeMap {
    map.align_out(granularity)
}

// ---------------------------------------------------------------------------------------------
// The book of change ids
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::ops::Range;

    const EX: &str = "52 de c0 d9 98 ae 8e 4b-26 cb 22 d6 1b 55 f6 34/12";
    const EPOCH: &str = "52 de c0 d9 98 ae 8e 4b-26 cb 22 d6 1b 55 f6 34";
    const OTHER_EPOCH: &str = "52 8e 2b 0c 11 22 33 44-55 66 77 88 99 aa bb cc";

    fn cid(s: &str) -> ChangeId {
        ChangeId::parse(s).unwrap()
    }
    fn at(epoch: &str, seq: u64) -> ChangeId {
        cid(&format!("{epoch}/{seq}"))
    }
    fn d(r: Range<u64>) -> Change {
        Change::new(r, ChangeKind::Data)
    }
    fn z(r: Range<u64>) -> Change {
        Change::new(r, ChangeKind::Zero)
    }

    #[test]
    fn change_ids_parse() {
        let c = cid(EX);
        assert_eq!(c.as_str(), EX);
        assert_eq!(c.epoch(), Some(EPOCH));
        assert_eq!(c.seq(), Some(12));
        assert!(!c.is_all());
        assert_eq!(c.to_string(), EX);
        assert_eq!(format!("{c:?}"), format!("{EX:?}"));
        assert_eq!(EX.parse::<ChangeId>().unwrap(), c);

        let all = cid("*");
        assert!(all.is_all());
        assert_eq!(all, ChangeId::all());
        assert_eq!((all.epoch(), all.seq()), (None, None));
        assert!(!all.same_epoch(&all));
        assert!(!all.same_epoch(&c));

        assert!(c.same_epoch(&at(EPOCH, 99)));
        assert!(!c.same_epoch(&at(OTHER_EPOCH, 12)));
        assert_eq!(cid("ab/007").seq(), Some(7));
        assert_eq!(cid(&format!("{EPOCH}/{}", u64::MAX)).seq(), Some(u64::MAX));
    }

    #[test]
    fn bad_change_ids_are_refused() {
        use ChangeIdError::*;
        assert_eq!(ChangeId::parse(""), Err(Empty));
        assert!(matches!(
            ChangeId::parse("x".repeat(300)),
            Err(TooLong { len: 300, max: 255 })
        ));
        assert!(matches!(ChangeId::parse("52 de c0"), Err(NoSequence { .. })));
        assert!(matches!(ChangeId::parse("**"), Err(NoSequence { .. })));
        for bad_epoch in [
            "/12", "  /1", "-- /3", "zz/1", " 52/1", "52 /1", "52\t1/1", "5/2/1",
        ] {
            let r = ChangeId::parse(bad_epoch);
            // "5/2/1": the sequence holds a '/'.
            assert!(
                matches!(r, Err(BadEpoch { .. }) | Err(BadSequence { .. })),
                "{bad_epoch}: {r:?}"
            );
        }
        assert!(matches!(
            ChangeId::parse(format!("{}/1", "a".repeat(129))),
            Err(BadEpoch { .. })
        ));
        for bad_seq in [
            "52/",
            "52/-1",
            "52/+1",
            "52/1x",
            "52/ 1",
            "52/18446744073709551616",
            "52/1/2",
        ] {
            assert!(
                matches!(ChangeId::parse(bad_seq), Err(BadSequence { .. })),
                "{bad_seq}"
            );
        }
        let e = ChangeId::parse("zz/1").unwrap_err().to_string();
        assert!(e.contains("zz/1") && e.contains("hex digits"), "{e}");
    }

    #[test]
    fn change_ids_serde_as_strings() {
        let c = cid(EX);
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, format!("{EX:?}"));
        assert_eq!(serde_json::from_str::<ChangeId>(&j).unwrap(), c);
        assert!(serde_json::from_str::<ChangeId>("\"nope\"").is_err());
    }

    #[test]
    fn decision_table() {
        use FullSyncReason as R;
        let old = at(EPOCH, 12);
        let cases: Vec<(Option<ChangeId>, ChangeId, Decision)> = vec![
            (None, at(EPOCH, 1), full(R::NoBaseline)),
            (
                Some(old.clone()),
                at(EPOCH, 13),
                Decision::Incremental { since: old.clone() },
            ),
            (
                Some(old.clone()),
                at(EPOCH, 500),
                Decision::Incremental { since: old.clone() },
            ),
            (
                Some(old.clone()),
                at(EPOCH, 12),
                Decision::Incremental { since: old.clone() },
            ),
            (
                Some(old.clone()),
                at(EPOCH, 11),
                full(R::WentBackwards {
                    epoch: EPOCH.into(),
                    old_seq: 12,
                    new_seq: 11,
                }),
            ),
            (
                Some(old.clone()),
                at(OTHER_EPOCH, 13),
                full(R::Reset {
                    old_epoch: EPOCH.into(),
                    new_epoch: OTHER_EPOCH.into(),
                }),
            ),
            (
                Some(old.clone()),
                at(OTHER_EPOCH, 1),
                full(R::Reset {
                    old_epoch: EPOCH.into(),
                    new_epoch: OTHER_EPOCH.into(),
                }),
            ),
            (Some(ChangeId::all()), at(EPOCH, 13), full(R::BaselineUntracked)),
            (Some(old.clone()), ChangeId::all(), full(R::NewUntracked)),
            (None, ChangeId::all(), full(R::NewUntracked)),
        ];
        for (baseline, new, want) in cases {
            let got = decide(baseline.as_ref(), &new);
            assert_eq!(got, want, "baseline {baseline:?}, new {new:?}");
            assert_eq!(got.is_full(), got.full_reason().is_some());
            if got.is_full() {
                assert!(got.query_change_id().is_all());
                assert_eq!(got.areas_kind(), AreasKind::Allocated);
            } else {
                assert_eq!(got.query_change_id(), old);
                assert_eq!(got.areas_kind(), AreasKind::Changed);
            }
            assert!(!got.to_string().is_empty());
        }
        let reset = decide(Some(&old), &at(OTHER_EPOCH, 2));
        assert_eq!(reset.full_reason().map(|r| r.code()), Some("reset"));
        assert!(reset.to_string().contains("CBT was reset"), "{reset}");
    }

    fn info(start: u64, len: u64, areas: &[(u64, u64)]) -> DiskChangeInfo {
        DiskChangeInfo::new(start, len, areas.iter().copied())
    }

    #[test]
    fn replies_map_onto_changes() {
        let replies = [
            info(0, 40, &[(0, 5), (5, 5), (20, 4)]),
            info(40, 60, &[(40, 1), (90, 10)]),
        ];
        let m = change_map_from_replies(100, AreasKind::Changed, &replies).unwrap();
        assert_eq!(m.changes(), &[d(0..10), d(20..24), d(40..41), d(90..100)]);
        let m = change_map_from_replies(100, AreasKind::Allocated, &replies).unwrap();
        assert_eq!(
            m.changes(),
            &[
                d(0..10),
                z(10..20),
                d(20..24),
                z(24..40),
                d(40..41),
                z(41..90),
                d(90..100)
            ]
        );
        // Nothing allocated: all zeros; nothing changed: empty.
        let none = [info(0, 100, &[])];
        assert_eq!(
            change_map_from_replies(100, AreasKind::Allocated, &none)
                .unwrap()
                .changes(),
            &[z(0..100)]
        );
        assert!(
            change_map_from_replies(100, AreasKind::Changed, &none)
                .unwrap()
                .is_empty()
        );
        // An empty disk needs no reply.
        assert!(
            change_map_from_replies(0, AreasKind::Allocated, &[])
                .unwrap()
                .is_empty()
        );
        // The last window may run past the end of the disk as long as its areas do not.
        let m = change_map_from_replies(100, AreasKind::Changed, &[info(0, 128, &[(96, 4)])]).unwrap();
        assert_eq!(m.changes(), &[d(96..100)]);
        // Alignment to the compare block (block mode) or chunk (object mode).
        let a = align_changes(
            &change_map_from_replies(100, AreasKind::Allocated, &replies).unwrap(),
            16,
        );
        assert_eq!(a.changes(), &[d(0..48), z(48..80), d(80..100)]);
        assert_eq!(AreasKind::of_query(&ChangeId::all()), AreasKind::Allocated);
        assert_eq!(AreasKind::of_query(&cid(EX)), AreasKind::Changed);
    }

    #[test]
    fn builder_drives_the_query_loop() {
        let mut b = ChangedAreasBuilder::new(100, AreasKind::Changed);
        assert_eq!(b.next_offset(), Some(0));
        b.push(&info(0, 30, &[(10, 5)])).unwrap();
        assert_eq!(
            (b.next_offset(), b.replies(), b.is_complete()),
            (Some(30), 1, false)
        );
        // A refused reply changes nothing.
        assert!(b.push(&info(30, 10, &[(35, 10)])).is_err());
        assert_eq!((b.next_offset(), b.replies()), (Some(30), 1));
        assert_eq!(
            b.clone().finish(),
            Err(CbtMapError::Incomplete {
                covered: 30,
                size: 100
            })
        );
        b.push(&info(30, 70, &[(99, 1)])).unwrap();
        assert_eq!(b.next_offset(), None);
        assert!(b.is_complete());
        assert_eq!(b.finish().unwrap().changes(), &[d(10..15), d(99..100)]);
    }

    #[test]
    fn every_bad_reply_is_refused() {
        use CbtMapError::*;
        let size = 100;
        let run = |replies: &[DiskChangeInfo]| change_map_from_replies(size, AreasKind::Changed, replies);
        let ok = info(0, 50, &[]);
        assert_eq!(
            run(&[info(0, 100, &[]), info(100, 10, &[])]),
            Err(ExtraReply {
                reply: 1,
                start_offset: 100,
                size
            })
        );
        assert_eq!(
            run(&[info(10, 90, &[])]),
            Err(Gap {
                reply: 0,
                start_offset: 10,
                expected: 0
            })
        );
        assert_eq!(
            run(&[ok.clone(), info(60, 40, &[])]),
            Err(Gap {
                reply: 1,
                start_offset: 60,
                expected: 50
            })
        );
        assert_eq!(
            run(&[ok.clone(), info(40, 60, &[])]),
            Err(Overlap {
                reply: 1,
                start_offset: 40,
                expected: 50
            })
        );
        assert_eq!(
            run(&[ok.clone(), info(50, 0, &[])]),
            Err(EmptyWindow {
                reply: 1,
                start_offset: 50
            })
        );
        assert_eq!(
            run(&[ok.clone(), info(50, u64::MAX, &[])]),
            Err(WindowOverflow {
                reply: 1,
                start_offset: 50,
                length: u64::MAX
            })
        );
        assert_eq!(
            run(&[info(0, 100, &[(5, 0)])]),
            Err(EmptyArea {
                reply: 0,
                area: 0,
                start: 5
            })
        );
        assert_eq!(
            run(&[info(0, 100, &[(5, u64::MAX)])]),
            Err(AreaOverflow {
                reply: 0,
                area: 0,
                start: 5,
                length: u64::MAX
            })
        );
        assert_eq!(
            run(&[ok.clone(), info(50, 50, &[(45, 10)])]),
            Err(AreaOutsideWindow {
                reply: 1,
                area: 0,
                start: 45,
                end: 55,
                window_start: 50,
                window_end: 100
            })
        );
        assert_eq!(
            run(&[info(0, 50, &[(40, 11)])]),
            Err(AreaOutsideWindow {
                reply: 0,
                area: 0,
                start: 40,
                end: 51,
                window_start: 0,
                window_end: 50
            })
        );
        assert_eq!(
            run(&[ok.clone(), info(50, 60, &[(95, 10)])]),
            Err(AreaPastEnd {
                reply: 1,
                area: 0,
                start: 95,
                end: 105,
                size
            })
        );
        assert_eq!(
            run(&[info(0, 100, &[(20, 5), (10, 5)])]),
            Err(AreaOrder {
                reply: 0,
                area: 1,
                start: 10,
                end: 15,
                prev_end: 25
            })
        );
        assert_eq!(
            run(&[info(0, 100, &[(20, 5), (24, 5)])]),
            Err(AreaOrder {
                reply: 0,
                area: 1,
                start: 24,
                end: 29,
                prev_end: 25
            })
        );
        assert_eq!(
            run(std::slice::from_ref(&ok)),
            Err(Incomplete { covered: 50, size })
        );
        assert_eq!(run(&[]), Err(Incomplete { covered: 0, size }));
        for e in [run(&[info(0, 100, &[(20, 5), (10, 5)])]), run(&[ok])] {
            assert!(!e.unwrap_err().to_string().is_empty());
        }
    }

    #[test]
    fn replies_parse_from_the_vsphere_json_form() {
        let j = r#"{"_typeName":"DiskChangeInfo","startOffset":0,"length":1048576,
                    "changedArea":[{"_typeName":"DiskChangeExtent","start":65536,"length":131072}]}"#;
        let r: DiskChangeInfo = serde_json::from_str(j).unwrap();
        assert_eq!(r, info(0, 1 << 20, &[(65536, 131072)]));
        let r: DiskChangeInfo = serde_json::from_str(r#"{"startOffset":0,"length":5}"#).unwrap();
        assert!(r.changed_area.is_empty());
        assert!(serde_json::from_str::<DiskChangeInfo>(r#"{"startOffset":-1,"length":5}"#).is_err());
    }

    /// The byte-level meaning of a list of replies, checked the slow way: `None` when the list is
    /// not acceptable, else per byte of the disk `Some(kind)` (changed/allocated) or `None`.
    fn brute_force(
        size: u64,
        kind: AreasKind,
        replies: &[DiskChangeInfo],
    ) -> Option<Vec<Option<ChangeKind>>> {
        let mut pos = 0u64;
        for r in replies {
            if pos >= size || r.start_offset != pos || r.length == 0 {
                return None;
            }
            let end = r.start_offset.checked_add(r.length)?;
            let mut prev = r.start_offset;
            for a in &r.changed_area {
                let a_end = a.start.checked_add(a.length)?;
                let fine = a.length > 0
                    && a.start >= prev
                    && a.start >= r.start_offset
                    && a_end <= end
                    && a_end <= size;
                if !fine {
                    return None;
                }
                prev = a_end;
            }
            pos = end;
        }
        if pos < size {
            return None;
        }
        let outside = match kind {
            AreasKind::Changed => None,
            AreasKind::Allocated => Some(ChangeKind::Zero),
        };
        let mut bytes = vec![outside; size as usize];
        for a in replies.iter().flat_map(|r| &r.changed_area) {
            for b in a.start..a.start + a.length {
                bytes[b as usize] = Some(ChangeKind::Data);
            }
        }
        Some(bytes)
    }

    /// Replies for a disk of `size` bytes: windows of the given lengths (the last one stretched to
    /// cover the disk), and areas from runs of the `dirty` bits, split at window boundaries and
    /// at the `split` positions.
    fn valid_replies(size: u64, windows: &[u64], dirty: &[bool], split: &[bool]) -> Vec<DiskChangeInfo> {
        let mut out = Vec::new();
        let mut pos = 0;
        let mut w = windows.iter().copied().cycle();
        while pos < size {
            let len = w.next().unwrap_or(size).max(1);
            let end = pos + len;
            let mut areas: Vec<(u64, u64)> = Vec::new();
            for b in pos..end.min(size) {
                let i = b as usize;
                if !dirty[i % dirty.len()] {
                    continue;
                }
                match areas.last_mut() {
                    Some((s, l)) if *s + *l == b && !split[i % split.len()] => *l += 1,
                    _ => areas.push((b, 1)),
                }
            }
            out.push(DiskChangeInfo::new(pos, len, areas));
            pos = end;
        }
        out
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        None,
        DropReply(usize),
        ShiftReply(usize, i64),
        ZeroWindow(usize),
        ShiftArea(usize, usize, i64),
        GrowArea(usize, usize, u64),
        ZeroArea(usize, usize),
        SwapAreas(usize, usize),
        DuplicateArea(usize, usize),
        AppendReply(u64),
        AreaPastEnd(usize, u64),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let i = 0usize..12;
        prop_oneof![
            4 => Just(Mutation::None),
            1 => i.clone().prop_map(Mutation::DropReply),
            1 => (i.clone(), -5i64..6).prop_map(|(r, d)| Mutation::ShiftReply(r, d)),
            1 => i.clone().prop_map(Mutation::ZeroWindow),
            1 => (i.clone(), i.clone(), -5i64..6).prop_map(|(r, a, d)| Mutation::ShiftArea(r, a, d)),
            1 => (i.clone(), i.clone(), 1u64..20).prop_map(|(r, a, d)| Mutation::GrowArea(r, a, d)),
            1 => (i.clone(), i.clone()).prop_map(|(r, a)| Mutation::ZeroArea(r, a)),
            1 => (i.clone(), i.clone()).prop_map(|(r, a)| Mutation::SwapAreas(r, a)),
            1 => (i.clone(), i.clone()).prop_map(|(r, a)| Mutation::DuplicateArea(r, a)),
            1 => (1u64..20).prop_map(Mutation::AppendReply),
            1 => (i, 0u64..10).prop_map(|(r, d)| Mutation::AreaPastEnd(r, d)),
        ]
    }

    fn apply(m: &Mutation, size: u64, replies: &mut Vec<DiskChangeInfo>) {
        let n = replies.len();
        if n == 0 {
            if let Mutation::AppendReply(len) = m {
                replies.push(info(0, *len, &[]));
            }
            return;
        }
        let shift = |v: u64, d: i64| v.saturating_add_signed(d);
        match *m {
            Mutation::None => {}
            Mutation::DropReply(r) => {
                replies.remove(r % n);
            }
            Mutation::ShiftReply(r, dl) => {
                let r = &mut replies[r % n];
                r.start_offset = shift(r.start_offset, dl);
            }
            Mutation::ZeroWindow(r) => replies[r % n].length = 0,
            Mutation::AppendReply(len) => {
                let last = &replies[n - 1];
                let start = last.start_offset + last.length;
                replies.push(info(start, len, &[]));
            }
            Mutation::AreaPastEnd(r, dl) => {
                let r = &mut replies[r % n];
                r.changed_area.push(DiskChangeExtent {
                    start: size.saturating_sub(1),
                    length: 2 + dl,
                });
            }
            _ => {
                let (r, a) = match *m {
                    Mutation::ShiftArea(r, a, _)
                    | Mutation::GrowArea(r, a, _)
                    | Mutation::ZeroArea(r, a)
                    | Mutation::SwapAreas(r, a)
                    | Mutation::DuplicateArea(r, a) => (r, a),
                    _ => return,
                };
                let areas = &mut replies[r % n].changed_area;
                if areas.is_empty() {
                    return;
                }
                let a = a % areas.len();
                match *m {
                    Mutation::ShiftArea(_, _, dl) => areas[a].start = shift(areas[a].start, dl),
                    Mutation::GrowArea(_, _, dl) => areas[a].length += dl,
                    Mutation::ZeroArea(..) => areas[a].length = 0,
                    Mutation::SwapAreas(..) => {
                        let b = (a + 1) % areas.len();
                        areas.swap(a, b);
                    }
                    Mutation::DuplicateArea(..) => {
                        let x = areas[a];
                        areas.insert(a, x);
                    }
                    _ => {}
                }
            }
        }
    }

    proptest! {
        /// Whatever the replies (valid, or valid then damaged once), they are accepted exactly
        /// when the slow check accepts them, and then the map holds exactly the slow byte set,
        /// keeps the change-map invariants, and aligns out to a superset with data kept.
        #[test]
        fn replies_map_exactly_or_are_refused(
            size in 0u64..200,
            windows in proptest::collection::vec(1u64..80, 1..6),
            dirty in proptest::collection::vec(any::<bool>(), 1..40),
            split in proptest::collection::vec(prop::bool::weighted(0.2), 1..17),
            allocated in any::<bool>(),
            m in mutation(),
            align in 1u64..20,
        ) {
            let kind = if allocated { AreasKind::Allocated } else { AreasKind::Changed };
            let mut replies = valid_replies(size, &windows, &dirty, &split);
            if matches!(m, Mutation::None) {
                prop_assert!(brute_force(size, kind, &replies).is_some());
            }
            apply(&m, size, &mut replies);
            let want = brute_force(size, kind, &replies);
            let got = change_map_from_replies(size, kind, &replies);
            match (want, got) {
                (None, Err(_)) => {}
                (None, Ok(map)) => prop_assert!(false, "accepted {:?} as {:?}", replies, map),
                (Some(_), Err(e)) => prop_assert!(false, "refused {:?}: {}", replies, e),
                (Some(bytes), Ok(map)) => {
                    prop_assert_eq!(map.size(), size);
                    prop_assert_eq!(&ChangeMap::from_sorted(size, map.changes().iter().cloned()).unwrap(), &map);
                    for b in 0..size {
                        let got = map.changes().iter().find(|c| c.range.contains(&b)).map(|c| c.kind);
                        prop_assert_eq!(got, bytes[b as usize], "byte {}", b);
                    }
                    let a = align_changes(&map, align);
                    for b in 0..size {
                        let got = a.changes().iter().find(|c| c.range.contains(&b)).map(|c| c.kind);
                        match bytes[b as usize] {
                            Some(ChangeKind::Data) => prop_assert_eq!(got, Some(ChangeKind::Data)),
                            Some(ChangeKind::Zero) => prop_assert!(got.is_some()),
                            None => {}
                        }
                    }
                }
            }
        }

        /// Parsing is total (never panics) and round-trips what it accepts.
        #[test]
        fn change_id_parse_round_trips(s in "[0-9a-fA-F \\-/*x]{0,40}") {
            if let Ok(c) = ChangeId::parse(s.clone()) {
                prop_assert_eq!(c.as_str(), s.as_str());
                if !c.is_all() {
                    let (e, q) = s.split_once('/').unwrap();
                    prop_assert_eq!(c.epoch(), Some(e));
                    prop_assert_eq!(c.seq(), Some(q.parse::<u64>().unwrap()));
                    prop_assert!(c.same_epoch(&c));
                }
            }
        }

        /// Incremental exactly when both ids share an epoch and the sequence did not go down.
        #[test]
        fn decision_is_incremental_only_when_safe(e1 in 0u8..3, s1 in 0u64..5, e2 in 0u8..3, s2 in 0u64..5) {
            let epochs = [EPOCH, OTHER_EPOCH, "ab"];
            let old = at(epochs[e1 as usize], s1);
            let new = at(epochs[e2 as usize], s2);
            let inc = matches!(decide(Some(&old), &new), Decision::Incremental { .. });
            prop_assert_eq!(inc, e1 == e2 && s2 >= s1);
        }
    }
}
