//! Ceph `rbd export-diff` streams, parsed as untrusted input into a [`ChangeMap`] plus the
//! changed data, copied to a spool file at the image offsets it belongs to.
//!
//! The stream (byte layout and Ceph's behaviour in `docs/rbd.md`) is a 12-byte header,
//! `"rbd diff v1\n"` (what `rbd export-diff` writes) or `"rbd diff v2\n"` (the diffs embedded in
//! `rbd export --export-format 2`), then tagged little-endian records: metadata (`f` from-snapshot
//! name, `t` to-snapshot name, `s` image size at the "to" snapshot, v2 only `p` protection
//! status), then data (`w` offset, length, bytes; `z` offset, length of zeros), then `e`. In v2
//! every record but `e` carries a u64 length of what follows it.
//!
//! The parser is strict: it refuses, with the byte offset in the stream, a bad header, an unknown
//! tag (Ceph skips unknown v2 tags; we don't guess what they meant), a v2 record length that does
//! not match its record, a duplicated or late metadata record, a missing, unexpected or wrong
//! snapshot name, a missing size or one over the caller's limit, an empty extent, an extent past
//! the image size, extents out of order or overlapping (real Ceph output is in increasing offset
//! order), a stream that ends before `e`, and anything after `e`. Nothing is allocated from a
//! length field: names are capped at [`MAX_SNAP_NAME`] bytes and data is copied through a buffer
//! of at most [`COPY_BUF`] bytes. On error the caller must discard the spool: part of the data may
//! have been written.

use std::io::{self, Read};

use crate::changes::{Change, ChangeError, ChangeKind, ChangeMap};

/// Header of a v1 stream (what `rbd export-diff` writes).
pub const HEADER_V1: &[u8; 12] = b"rbd diff v1\n";
/// Header of a v2 stream (each diff inside `rbd export --export-format 2`).
pub const HEADER_V2: &[u8; 12] = b"rbd diff v2\n";
/// Longest snapshot name accepted, in bytes (Ceph's `import-diff` has the same limit).
pub const MAX_SNAP_NAME: u32 = 4096;
/// Largest buffer used to copy the data of a `w` record.
pub const COPY_BUF: usize = 1 << 20;
/// Most changed ranges in one diff (after merging touching ranges of the same kind). Bounds the
/// memory a hostile stream can make the map take (24 bytes a range).
pub const MAX_CHANGES: usize = 1 << 24;

/// What the caller asked Ceph for: a stream about anything else is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The snapshot the diff starts from (`--from-snap`), `None` for a full export (then the
    /// stream must have no `f` record).
    pub from_snap: Option<String>,
    /// The snapshot the diff goes to (`rbd export-diff pool/image@to_snap`).
    pub to_snap: String,
    /// Largest image size accepted (the `s` record), if any.
    pub max_size: Option<u64>,
}

impl Expect {
    /// A full export of snapshot `to`.
    pub fn full(to: impl Into<String>) -> Self {
        Self {
            from_snap: None,
            to_snap: to.into(),
            max_size: None,
        }
    }

    /// A diff from snapshot `from` to snapshot `to`.
    pub fn incremental(from: impl Into<String>, to: impl Into<String>) -> Self {
        Self {
            from_snap: Some(from.into()),
            to_snap: to.into(),
            max_size: None,
        }
    }

    /// The same, refusing an image larger than `max` bytes.
    pub fn with_max_size(mut self, max: u64) -> Self {
        self.max_size = Some(max);
        self
    }
}

/// Stream format version (from the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// `"rbd diff v1\n"`: records without a length field.
    V1,
    /// `"rbd diff v2\n"`: every record but `e` has a u64 length after its tag.
    V2,
}

/// A validated diff: its metadata and changed ranges (the data is in the spool).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledDiff {
    /// Stream format.
    pub version: Version,
    /// The `f` record: the snapshot the diff starts from (`None`: from the beginning of time).
    pub from_snap: Option<String>,
    /// The `t` record: the snapshot the diff goes to.
    pub to_snap: String,
    /// The `s` record: the image size at `to_snap` (may differ from the size at `from_snap`; see
    /// [`SpooledDiff::changes_from_base`]).
    pub size: u64,
    /// The v2 `p` record: whether `to_snap` is protected (`None` in v1).
    pub protected: Option<bool>,
    /// `w` records as [`ChangeKind::Data`] (their bytes are in the spool at the same offsets),
    /// `z` records as [`ChangeKind::Zero`] (nothing written to the spool). Disk size: `size`.
    pub changes: ChangeMap,
    /// Bytes of stream consumed, header and `e` included.
    pub stream_len: u64,
}

impl SpooledDiff {
    /// The changes to apply to a copy of the base image, `base_size` bytes long, once it is
    /// resized to [`SpooledDiff::size`]: when the image grew, the new tail not covered by a record
    /// is added as [`ChangeKind::Zero`] (Ceph reports nothing there because no object exists, but
    /// the base has no bytes there either). When the image shrank, the map already ends at the
    /// new size and the caller truncates. For a full export, pass 0: every range the stream does
    /// not cover becomes zero.
    pub fn changes_from_base(&self, base_size: u64) -> ChangeMap {
        if base_size >= self.size {
            return self.changes.clone();
        }
        let mut out = ChangeMap::empty(self.size);
        let mut add = |c: Change| {
            // Sorted, disjoint, non-empty and inside the disk by construction.
            let r = out.push(c);
            debug_assert!(r.is_ok(), "{r:?}");
        };
        let mut gap_from = base_size;
        for c in self.changes.changes() {
            if c.range.start > gap_from {
                add(Change::new(gap_from..c.range.start, ChangeKind::Zero));
            }
            add(c.clone());
            gap_from = gap_from.max(c.range.end);
        }
        if gap_from < self.size {
            add(Change::new(gap_from..self.size, ChangeKind::Zero));
        }
        out
    }
}

/// Why a stream was refused. Every variant but [`RbdDiffError::Spool`] names the byte offset in
/// the stream (of the offending record's tag, or where the stream ended).
#[derive(Debug, thiserror::Error)]
pub enum RbdDiffError {
    /// The first 12 bytes are not a known header.
    #[error(
        "rbd diff: bad header at byte 0: \"{found}\" is neither \"rbd diff v1\\n\" nor \"rbd diff v2\\n\""
    )]
    BadHeader {
        /// The bytes found, escaped.
        found: String,
    },
    /// The stream ended before the `e` record.
    #[error("rbd diff: stream truncated at byte {offset} (in {what}, before the end record)")]
    Truncated {
        /// Stream length.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A tag byte this parser does not know.
    #[error("rbd diff: unknown record tag {tag:#04x} at byte {offset}")]
    UnknownTag {
        /// Offset of the tag.
        offset: u64,
        /// The tag byte.
        tag: u8,
    },
    /// A v2 record's length field does not match what the record holds.
    #[error("rbd diff: '{tag}' record at byte {offset} declares {declared} bytes, its fields take {actual}")]
    RecordLength {
        /// Offset of the tag.
        offset: u64,
        /// The record's tag.
        tag: char,
        /// The length field.
        declared: u64,
        /// What the record's own fields say (saturated on overflow).
        actual: u64,
    },
    /// A snapshot name longer than [`MAX_SNAP_NAME`].
    #[error(
        "rbd diff: '{tag}' record at byte {offset} has a {len}-byte snapshot name (at most {MAX_SNAP_NAME})"
    )]
    NameTooLong {
        /// Offset of the tag.
        offset: u64,
        /// `f` or `t`.
        tag: char,
        /// The declared length.
        len: u32,
    },
    /// A metadata record seen twice.
    #[error("rbd diff: second '{tag}' record at byte {offset}")]
    Duplicate {
        /// Offset of the tag.
        offset: u64,
        /// The record's tag.
        tag: char,
    },
    /// A metadata record after the first data record.
    #[error("rbd diff: metadata record '{tag}' at byte {offset} comes after data records")]
    MetadataAfterData {
        /// Offset of the tag.
        offset: u64,
        /// The record's tag.
        tag: char,
    },
    /// The from-snapshot is not the expected one (or is missing, or present in a full export).
    #[error("rbd diff: from-snapshot {found:?} at byte {offset}, expected {expected:?}")]
    FromSnap {
        /// Offset of the `f` record, or of the record that ended the metadata without one.
        offset: u64,
        /// The name in the stream (lossy UTF-8).
        found: Option<String>,
        /// The name asked for.
        expected: Option<String>,
    },
    /// The to-snapshot is not the expected one, or is missing.
    #[error("rbd diff: to-snapshot {found:?} at byte {offset}, expected {expected:?}")]
    ToSnap {
        /// Offset of the `t` record, or of the record that ended the metadata without one.
        offset: u64,
        /// The name in the stream (lossy UTF-8).
        found: Option<String>,
        /// The name asked for.
        expected: String,
    },
    /// No `s` record before the first data record or the end.
    #[error("rbd diff: no image size record before byte {offset}")]
    MissingSize {
        /// Offset of the record that needed the size.
        offset: u64,
    },
    /// The image size is over [`Expect::max_size`].
    #[error("rbd diff: image size {size} at byte {offset} is over the limit of {max} bytes")]
    SizeTooLarge {
        /// Offset of the `s` record.
        offset: u64,
        /// The size in the stream.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The v2 protection status byte is neither 0 nor 1.
    #[error("rbd diff: protection status {value} at byte {offset} is neither 0 nor 1")]
    BadProtection {
        /// Offset of the `p` record.
        offset: u64,
        /// The byte found.
        value: u8,
    },
    /// A `w` or `z` record of length 0.
    #[error("rbd diff: empty '{tag}' record at byte {offset} (image offset {start})")]
    EmptyExtent {
        /// Offset of the tag.
        offset: u64,
        /// `w` or `z`.
        tag: char,
        /// The image offset it names.
        start: u64,
    },
    /// An extent that ends past the image size (or past 2^64).
    #[error(
        "rbd diff: '{tag}' record at byte {offset} covers {len} bytes from image offset {start}, past the image size {size}"
    )]
    PastEnd {
        /// Offset of the tag.
        offset: u64,
        /// `w` or `z`.
        tag: char,
        /// Image offset.
        start: u64,
        /// Length.
        len: u64,
        /// Image size (the `s` record).
        size: u64,
    },
    /// An extent that starts before the end of the previous one.
    #[error(
        "rbd diff: '{tag}' record at byte {offset} starts at image offset {start}, before the end of the previous extent ({prev_end}): out of order or overlapping"
    )]
    Order {
        /// Offset of the tag.
        offset: u64,
        /// `w` or `z`.
        tag: char,
        /// Image offset.
        start: u64,
        /// End of the previous extent.
        prev_end: u64,
    },
    /// More than [`MAX_CHANGES`] changed ranges.
    #[error("rbd diff: more than {MAX_CHANGES} changed ranges at byte {offset}")]
    TooManyChanges {
        /// Offset of the record that went over.
        offset: u64,
    },
    /// Bytes after the `e` record.
    #[error("rbd diff: data after the end record, at byte {offset}")]
    TrailingData {
        /// Offset of the first extra byte.
        offset: u64,
    },
    /// Reading the stream failed.
    #[error("rbd diff: reading the stream at byte {offset}")]
    Read {
        /// Bytes read so far.
        offset: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing data to the spool failed.
    #[error(
        "rbd diff: writing {len} bytes to the spool at image offset {image_offset} (stream byte {offset})"
    )]
    Spool {
        /// Stream offset of the data.
        offset: u64,
        /// Image (and spool) offset.
        image_offset: u64,
        /// Bytes in the failed write.
        len: usize,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

impl RbdDiffError {
    /// The byte offset in the stream the error is about.
    pub fn offset(&self) -> u64 {
        match self {
            Self::BadHeader { .. } => 0,
            Self::Truncated { offset, .. }
            | Self::UnknownTag { offset, .. }
            | Self::RecordLength { offset, .. }
            | Self::NameTooLong { offset, .. }
            | Self::Duplicate { offset, .. }
            | Self::MetadataAfterData { offset, .. }
            | Self::FromSnap { offset, .. }
            | Self::ToSnap { offset, .. }
            | Self::MissingSize { offset }
            | Self::SizeTooLarge { offset, .. }
            | Self::BadProtection { offset, .. }
            | Self::EmptyExtent { offset, .. }
            | Self::PastEnd { offset, .. }
            | Self::Order { offset, .. }
            | Self::TooManyChanges { offset }
            | Self::TrailingData { offset }
            | Self::Read { offset, .. }
            | Self::Spool { offset, .. } => *offset,
        }
    }
}

/// Where the data of `w` records goes: positioned writes at image offsets.
pub trait ExtentWriter {
    /// Writes all of `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
}

#[cfg(unix)]
impl ExtentWriter for &std::fs::File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(*self, data, offset)
    }
}

#[cfg(unix)]
impl ExtentWriter for std::fs::File {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(self, data, offset)
    }
}

/// Data extents kept in memory, in the order written, touching writes merged (for tests, fuzzing
/// and small diffs: memory grows with the data).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemExtents {
    extents: Vec<(u64, Vec<u8>)>,
}

impl MemExtents {
    /// The extents: image offset and bytes.
    pub fn extents(&self) -> &[(u64, Vec<u8>)] {
        &self.extents
    }

    /// Total bytes held.
    pub fn bytes(&self) -> u64 {
        self.extents.iter().map(|(_, d)| d.len() as u64).sum()
    }
}

impl ExtentWriter for MemExtents {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        match self.extents.last_mut() {
            Some((o, d)) if o.checked_add(d.len() as u64) == Some(offset) => d.extend_from_slice(data),
            _ => self.extents.push((offset, data.to_vec())),
        }
        Ok(())
    }
}

/// Validates a whole stream from a reader (a pipe from `rbd export-diff ... -` or a file),
/// copies each `w` record's data into `file` at its image offset (positioned writes; the spool
/// is a sparse file the caller created and later reads like a disk image), and returns the diff.
/// `z` ranges are not written. The reader is buffered here. On error the spool holds partial
/// data: discard it.
#[cfg(unix)]
pub fn spool<R: Read>(reader: R, expect: &Expect, file: &std::fs::File) -> Result<SpooledDiff, RbdDiffError> {
    let mut reader = io::BufReader::with_capacity(256 << 10, reader);
    let mut out = file;
    decode(&mut reader, expect, &mut out)
}

/// Parses a stream held in memory; the data comes back as [`MemExtents`]. Touches no file (the
/// entry point of the fuzz target).
pub fn parse(bytes: &[u8], expect: &Expect) -> Result<(SpooledDiff, MemExtents), RbdDiffError> {
    let mut out = MemExtents::default();
    let diff = decode(bytes, expect, &mut out)?;
    Ok((diff, out))
}

/// Validates a whole stream (the end record then end of input) and hands the data to `out`.
/// Reads are exact-sized: give it a buffered reader.
pub fn decode<R: Read, W: ExtentWriter>(
    mut reader: R,
    expect: &Expect,
    out: &mut W,
) -> Result<SpooledDiff, RbdDiffError> {
    let diff = decode_section(&mut reader, expect, out)?;
    let mut input = Input {
        inner: &mut reader,
        pos: diff.stream_len,
    };
    let mut byte = [0u8; 1];
    if input.read_full(&mut byte)? != 0 {
        return Err(RbdDiffError::TrailingData {
            offset: diff.stream_len,
        });
    }
    Ok(diff)
}

/// Validates one stream up to and including its `e` record and leaves `reader` just after it,
/// without looking further: for the diffs that follow each other inside
/// `rbd export --export-format 2`. Never reads past the `e` record. Offsets in errors count from
/// where the reader was.
pub fn decode_section<R: Read, W: ExtentWriter>(
    reader: &mut R,
    expect: &Expect,
    out: &mut W,
) -> Result<SpooledDiff, RbdDiffError> {
    let mut input = Input {
        inner: reader,
        pos: 0,
    };
    let mut header = [0u8; 12];
    input.exact(&mut header, "the header")?;
    let version = if &header == HEADER_V1 {
        Version::V1
    } else if &header == HEADER_V2 {
        Version::V2
    } else {
        return Err(RbdDiffError::BadHeader {
            found: header.escape_ascii().to_string(),
        });
    };
    let mut st = State {
        expect,
        from: None,
        to: None,
        size: None,
        protected: None,
        data_started: false,
        changes: ChangeMap::empty(0),
        buf: Vec::new(),
    };
    loop {
        let at = input.pos;
        let mut tag = [0u8; 1];
        input.exact(&mut tag, "a record tag")?;
        let tag = tag[0];
        if tag == b'e' {
            st.end_metadata(at)?;
            break;
        }
        // v2: the length of what follows the tag (checked against the fields per record).
        let declared = match version {
            Version::V1 => None,
            Version::V2 => Some(input.u64("a record length")?),
        };
        match tag {
            b'f' | b't' => st.snap_name(&mut input, at, tag, declared)?,
            b's' => {
                check_len(at, tag, declared, 8)?;
                st.metadata(at, tag)?;
                if st.size.is_some() {
                    return Err(RbdDiffError::Duplicate { offset: at, tag: 's' });
                }
                let size = input.u64("the 's' record")?;
                if let Some(max) = expect.max_size
                    && size > max
                {
                    return Err(RbdDiffError::SizeTooLarge {
                        offset: at,
                        size,
                        max,
                    });
                }
                st.size = Some(size);
            }
            b'p' if version == Version::V2 => {
                // One status byte. Ceph 16.2 declares 8 bytes but writes (and its importer reads)
                // only 1: accept both lengths, read 1.
                if declared != Some(8) {
                    check_len(at, tag, declared, 1)?;
                }
                st.metadata(at, tag)?;
                if st.protected.is_some() {
                    return Err(RbdDiffError::Duplicate { offset: at, tag: 'p' });
                }
                let mut v = [0u8; 1];
                input.exact(&mut v, "the 'p' record")?;
                st.protected = Some(match v[0] {
                    0 => false,
                    1 => true,
                    value => return Err(RbdDiffError::BadProtection { offset: at, value }),
                });
            }
            b'w' | b'z' => st.extent(&mut input, at, tag, declared, out)?,
            _ => return Err(RbdDiffError::UnknownTag { offset: at, tag }),
        }
    }
    let State {
        from,
        to,
        size,
        protected,
        changes,
        ..
    } = st;
    Ok(SpooledDiff {
        version,
        from_snap: from,
        to_snap: to.unwrap_or_default(),
        size: size.unwrap_or_default(),
        protected,
        changes,
        stream_len: input.pos,
    })
}

/// Refuses a v2 record whose length field is not `actual`.
fn check_len(offset: u64, tag: u8, declared: Option<u64>, actual: u64) -> Result<(), RbdDiffError> {
    match declared {
        Some(declared) if declared != actual => Err(RbdDiffError::RecordLength {
            offset,
            tag: char::from(tag),
            declared,
            actual,
        }),
        _ => Ok(()),
    }
}

/// The parser's state between records.
struct State<'e> {
    expect: &'e Expect,
    from: Option<String>,
    to: Option<String>,
    size: Option<u64>,
    protected: Option<bool>,
    /// A `w` or `z` record was seen (the metadata section is over).
    data_started: bool,
    changes: ChangeMap,
    /// Copy buffer for `w` data, grown on demand up to [`COPY_BUF`].
    buf: Vec<u8>,
}

impl State<'_> {
    /// Refuses a metadata record after the data records began.
    fn metadata(&self, offset: u64, tag: u8) -> Result<(), RbdDiffError> {
        if self.data_started {
            return Err(RbdDiffError::MetadataAfterData {
                offset,
                tag: char::from(tag),
            });
        }
        Ok(())
    }

    /// At the first data record or the end: the metadata must be complete.
    fn end_metadata(&mut self, offset: u64) -> Result<(), RbdDiffError> {
        if self.data_started {
            return Ok(());
        }
        if self.from.is_none() && self.expect.from_snap.is_some() {
            return Err(RbdDiffError::FromSnap {
                offset,
                found: None,
                expected: self.expect.from_snap.clone(),
            });
        }
        if self.to.is_none() {
            return Err(RbdDiffError::ToSnap {
                offset,
                found: None,
                expected: self.expect.to_snap.clone(),
            });
        }
        let Some(size) = self.size else {
            return Err(RbdDiffError::MissingSize { offset });
        };
        self.changes = ChangeMap::empty(size);
        self.data_started = true;
        Ok(())
    }

    /// An `f` or `t` record, checked against [`Expect`].
    fn snap_name<R: Read>(
        &mut self,
        input: &mut Input<'_, R>,
        offset: u64,
        tag: u8,
        declared: Option<u64>,
    ) -> Result<(), RbdDiffError> {
        self.metadata(offset, tag)?;
        let seen = if tag == b'f' { &self.from } else { &self.to };
        if seen.is_some() {
            return Err(RbdDiffError::Duplicate {
                offset,
                tag: char::from(tag),
            });
        }
        let len = input.u32("a snapshot name length")?;
        if len > MAX_SNAP_NAME {
            return Err(RbdDiffError::NameTooLong {
                offset,
                tag: char::from(tag),
                len,
            });
        }
        check_len(offset, tag, declared, 4 + u64::from(len))?;
        // At most MAX_SNAP_NAME bytes.
        let mut name = vec![0u8; len as usize];
        input.exact(&mut name, "a snapshot name")?;
        let found = String::from_utf8_lossy(&name).into_owned();
        if tag == b'f' {
            if self.expect.from_snap.as_deref().map(str::as_bytes) != Some(&name[..]) {
                return Err(RbdDiffError::FromSnap {
                    offset,
                    found: Some(found),
                    expected: self.expect.from_snap.clone(),
                });
            }
            self.from = Some(found);
        } else {
            if self.expect.to_snap.as_bytes() != &name[..] {
                return Err(RbdDiffError::ToSnap {
                    offset,
                    found: Some(found),
                    expected: self.expect.to_snap.clone(),
                });
            }
            self.to = Some(found);
        }
        Ok(())
    }

    /// A `w` or `z` record: checked, added to the map, and for `w` its data copied to `out`.
    fn extent<R: Read, W: ExtentWriter>(
        &mut self,
        input: &mut Input<'_, R>,
        offset: u64,
        tag: u8,
        declared: Option<u64>,
        out: &mut W,
    ) -> Result<(), RbdDiffError> {
        self.end_metadata(offset)?;
        let what = if tag == b'w' {
            "a 'w' record header"
        } else {
            "a 'z' record"
        };
        let start = input.u64(what)?;
        let len = input.u64(what)?;
        let ctag = char::from(tag);
        let kind = if tag == b'w' {
            check_len(offset, tag, declared, len.saturating_add(16))?;
            ChangeKind::Data
        } else {
            check_len(offset, tag, declared, 16)?;
            ChangeKind::Zero
        };
        let size = self.changes.size();
        let Some(end) = start.checked_add(len) else {
            return Err(RbdDiffError::PastEnd {
                offset,
                tag: ctag,
                start,
                len,
                size,
            });
        };
        self.changes
            .push(Change::new(start..end, kind))
            .map_err(|e| match e {
                ChangeError::Empty { .. } => RbdDiffError::EmptyExtent {
                    offset,
                    tag: ctag,
                    start,
                },
                ChangeError::PastEnd { .. } => RbdDiffError::PastEnd {
                    offset,
                    tag: ctag,
                    start,
                    len,
                    size,
                },
                ChangeError::Order { prev_end, .. } => RbdDiffError::Order {
                    offset,
                    tag: ctag,
                    start,
                    prev_end,
                },
            })?;
        if self.changes.changes().len() > MAX_CHANGES {
            return Err(RbdDiffError::TooManyChanges { offset });
        }
        if kind == ChangeKind::Zero {
            return Ok(());
        }
        // Copy the data through a bounded buffer: `len` is at most the image size, not a size
        // to allocate.
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(COPY_BUF, |r| r.min(COPY_BUF));
            if self.buf.len() < n {
                self.buf.resize(n, 0);
            }
            let at = input.pos;
            let chunk = &mut self.buf[..n];
            input.exact(chunk, "the data of a 'w' record")?;
            let image_offset = start + done;
            out.write_at(image_offset, chunk)
                .map_err(|source| RbdDiffError::Spool {
                    offset: at,
                    image_offset,
                    len: n,
                    source,
                })?;
            done += n as u64;
        }
        Ok(())
    }
}

/// The stream with its position.
struct Input<'r, R> {
    inner: &'r mut R,
    pos: u64,
}

impl<R: Read> Input<'_, R> {
    /// Reads until `buf` is full or the stream ends; returns the bytes read.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize, RbdDiffError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => {
                    got += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(RbdDiffError::Read {
                        offset: self.pos,
                        source,
                    });
                }
            }
        }
        Ok(got)
    }

    /// Fills `buf` or fails with [`RbdDiffError::Truncated`].
    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), RbdDiffError> {
        if self.read_full(buf)? < buf.len() {
            return Err(RbdDiffError::Truncated {
                offset: self.pos,
                what,
            });
        }
        Ok(())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, RbdDiffError> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, RbdDiffError> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A record to encode (the test's own encoder, written from the spec).
    #[derive(Debug, Clone)]
    enum Rec {
        From(Vec<u8>),
        To(Vec<u8>),
        Size(u64),
        /// `p` as Ceph 16.2 writes it: length field 8, one byte.
        Protected(u8),
        /// `p` with the length field the spec gives: 1.
        ProtectedSpec(u8),
        Write(u64, Vec<u8>),
        Zero(u64, u64),
        End,
        /// Raw bytes, for broken streams.
        Raw(Vec<u8>),
    }

    fn encode(version: Version, recs: &[Rec]) -> Vec<u8> {
        let mut out = match version {
            Version::V1 => HEADER_V1.to_vec(),
            Version::V2 => HEADER_V2.to_vec(),
        };
        for r in recs {
            let (tag, body): (u8, Vec<u8>) = match r {
                Rec::From(n) | Rec::To(n) => {
                    let mut b = (n.len() as u32).to_le_bytes().to_vec();
                    b.extend_from_slice(n);
                    (if matches!(r, Rec::From(_)) { b'f' } else { b't' }, b)
                }
                Rec::Size(s) => (b's', s.to_le_bytes().to_vec()),
                Rec::Protected(p) if version == Version::V2 => {
                    out.push(b'p');
                    out.extend_from_slice(&8u64.to_le_bytes());
                    out.push(*p);
                    continue;
                }
                Rec::Protected(p) | Rec::ProtectedSpec(p) => (b'p', vec![*p]),
                Rec::Write(o, d) => {
                    let mut b = o.to_le_bytes().to_vec();
                    b.extend_from_slice(&(d.len() as u64).to_le_bytes());
                    b.extend_from_slice(d);
                    (b'w', b)
                }
                Rec::Zero(o, l) => {
                    let mut b = o.to_le_bytes().to_vec();
                    b.extend_from_slice(&l.to_le_bytes());
                    (b'z', b)
                }
                Rec::End => {
                    out.push(b'e');
                    continue;
                }
                Rec::Raw(b) => {
                    out.extend_from_slice(b);
                    continue;
                }
            };
            out.push(tag);
            if version == Version::V2 {
                out.extend_from_slice(&(body.len() as u64).to_le_bytes());
            }
            out.extend_from_slice(&body);
        }
        out
    }

    fn name(s: &str) -> Vec<u8> {
        s.as_bytes().to_vec()
    }

    fn d(r: std::ops::Range<u64>) -> Change {
        Change::new(r, ChangeKind::Data)
    }
    fn z(r: std::ops::Range<u64>) -> Change {
        Change::new(r, ChangeKind::Zero)
    }

    /// A typical incremental diff.
    fn sample() -> Vec<Rec> {
        vec![
            Rec::From(name("s1")),
            Rec::To(name("s2")),
            Rec::Size(1 << 20),
            Rec::Write(0, vec![1; 100]),
            Rec::Zero(100, 50),
            Rec::Write(150, vec![2; 10]),
            Rec::Zero(4096, 4096),
            Rec::Write((1 << 20) - 1, vec![3]),
            Rec::End,
        ]
    }

    fn expect() -> Expect {
        Expect::incremental("s1", "s2")
    }

    fn err(bytes: &[u8], e: &Expect) -> RbdDiffError {
        match parse(bytes, e) {
            Ok(ok) => panic!("accepted: {ok:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn round_trip_v1_and_v2() {
        for v in [Version::V1, Version::V2] {
            let bytes = encode(v, &sample());
            let (diff, data) = parse(&bytes, &expect()).unwrap();
            assert_eq!(diff.version, v);
            assert_eq!(diff.from_snap.as_deref(), Some("s1"));
            assert_eq!(diff.to_snap, "s2");
            assert_eq!(diff.size, 1 << 20);
            assert_eq!(diff.protected, None);
            assert_eq!(diff.stream_len, bytes.len() as u64);
            assert_eq!(
                diff.changes.changes(),
                &[
                    d(0..100),
                    z(100..150),
                    d(150..160),
                    z(4096..8192),
                    d((1 << 20) - 1..1 << 20)
                ]
            );
            assert_eq!(
                data.extents(),
                &[(0, vec![1; 100]), (150, vec![2; 10]), ((1 << 20) - 1, vec![3])]
            );
        }
    }

    #[test]
    fn full_export_and_v2_protection() {
        let recs = [
            Rec::To(name("s1")),
            Rec::Protected(1),
            Rec::Size(8192),
            Rec::Write(4096, vec![7; 4096]),
            Rec::End,
        ];
        let (diff, _) = parse(&encode(Version::V2, &recs), &Expect::full("s1")).unwrap();
        assert_eq!(diff.protected, Some(true));
        assert_eq!(diff.from_snap, None);
        assert_eq!(diff.changes.changes(), &[d(4096..8192)]);
        // The length the spec gives (1) works too; any other is refused.
        let mut spec = recs.clone();
        spec[1] = Rec::ProtectedSpec(0);
        let (diff, _) = parse(&encode(Version::V2, &spec), &Expect::full("s1")).unwrap();
        assert_eq!(diff.protected, Some(false));
        let mut bad = encode(Version::V2, &spec);
        bad[27 + 1] = 2;
        let e = err(&bad, &Expect::full("s1"));
        assert!(
            matches!(
                e,
                RbdDiffError::RecordLength {
                    offset: 27,
                    tag: 'p',
                    declared: 2,
                    actual: 1
                }
            ),
            "{e}"
        );
        // `p` exists only in v2.
        let e = err(&encode(Version::V1, &recs), &Expect::full("s1"));
        assert!(
            matches!(
                e,
                RbdDiffError::UnknownTag {
                    offset: 19,
                    tag: b'p'
                }
            ),
            "{e}"
        );
        // No change at all is a valid diff.
        let (diff, data) = parse(
            &encode(Version::V1, &[Rec::Size(0), Rec::To(name("s1")), Rec::End]),
            &Expect::full("s1"),
        )
        .unwrap();
        assert!(diff.changes.is_empty());
        assert_eq!(data.bytes(), 0);
    }

    #[test]
    fn data_is_spooled_at_image_offsets() {
        let big: Vec<u8> = (0..(COPY_BUF * 2 + 123)).map(|i| (i % 251) as u8).collect();
        let recs = [
            Rec::To(name("s2")),
            Rec::From(name("s1")),
            Rec::Size(64 << 20),
            Rec::Write(4096, vec![9; 512]),
            Rec::Zero(8192, 1 << 20),
            Rec::Write(10 << 20, big.clone()),
            Rec::End,
        ];
        let bytes = encode(Version::V1, &recs);
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("spool"))
            .unwrap();
        // A reader that hands out odd-sized pieces and is sometimes interrupted.
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 += 1;
                if self.1.is_multiple_of(7) {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let n = buf.len().min(self.0.len()).min(1 + self.1 % 5000);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let diff = spool(Dribble(&bytes, 0), &expect(), &file).unwrap();
        assert_eq!(
            diff.changes.changes(),
            &[
                d(4096..4096 + 512),
                z(8192..8192 + (1 << 20)),
                d((10 << 20)..(10 << 20) + big.len() as u64)
            ]
        );
        let img = std::fs::read(dir.path().join("spool")).unwrap();
        assert_eq!(img.len() as u64, (10 << 20) + big.len() as u64);
        assert!(img[..4096].iter().all(|&b| b == 0));
        assert!(img[4096..4096 + 512].iter().all(|&b| b == 9));
        assert_eq!(&img[10 << 20..], &big[..]);
        // The same through the in-memory parser.
        let (again, data) = parse(&bytes, &expect()).unwrap();
        assert_eq!(again, diff);
        assert_eq!(data.extents()[1], (10 << 20, big));
    }

    #[test]
    fn resize_fills_the_grown_tail_with_zeros() {
        let bytes = encode(
            Version::V1,
            &[
                Rec::From(name("s1")),
                Rec::To(name("s2")),
                Rec::Size(100),
                Rec::Write(10, vec![1; 10]),
                Rec::Write(60, vec![1; 10]),
                Rec::Zero(80, 5),
                Rec::End,
            ],
        );
        let (diff, _) = parse(&bytes, &expect()).unwrap();
        assert_eq!(
            diff.changes_from_base(50).changes(),
            &[d(10..20), z(50..60), d(60..70), z(70..100)]
        );
        assert_eq!(
            diff.changes_from_base(65).changes(),
            &[d(10..20), d(60..70), z(70..100)]
        );
        assert_eq!(diff.changes_from_base(100), diff.changes);
        assert_eq!(diff.changes_from_base(200), diff.changes);
        assert_eq!(
            diff.changes_from_base(0).changes(),
            &[z(0..10), d(10..20), z(20..60), d(60..70), z(70..100)]
        );
    }

    #[test]
    fn decode_section_stops_after_the_end_record() {
        let mut two = encode(Version::V2, &sample());
        let first = two.len() as u64;
        two.extend(encode(
            Version::V2,
            &[Rec::To(name("s3")), Rec::Size(1), Rec::End],
        ));
        let mut r = &two[..];
        let a = decode_section(&mut r, &expect(), &mut MemExtents::default()).unwrap();
        assert_eq!(a.stream_len, first);
        let b = decode_section(&mut r, &Expect::full("s3"), &mut MemExtents::default()).unwrap();
        assert_eq!(b.size, 1);
        assert!(r.is_empty());
        // The whole-stream entry points refuse the second diff as trailing data.
        assert!(matches!(
            err(&two, &expect()),
            RbdDiffError::TrailingData { offset } if offset == first
        ));
    }

    #[test]
    fn bad_headers() {
        for bytes in [
            &b"rbd diff v3\n"[..],
            b"RBD DIFF V1\n",
            b"rbd image v2\n",
            b"rbd diff v1\r",
        ] {
            let e = err(bytes, &expect());
            assert!(matches!(e, RbdDiffError::BadHeader { .. }), "{e}");
            assert_eq!(e.offset(), 0);
        }
        assert!(err(b"", &expect()).to_string().contains("truncated at byte 0"));
        assert!(matches!(
            err(b"rbd diff", &expect()),
            RbdDiffError::Truncated { offset: 8, .. }
        ));
        assert!(
            err(b"\x00\xffrbd diff v1", &expect())
                .to_string()
                .contains(r#""\x00\xffrbd diff v" is neither"#)
        );
    }

    #[test]
    fn unknown_tags() {
        for v in [Version::V1, Version::V2] {
            let mut recs = sample();
            recs.insert(3, Rec::Raw(vec![b'x']));
            let bytes = encode(v, &recs);
            let at = encode(v, &sample()[..3]).len() as u64;
            let e = err(&bytes, &expect());
            assert!(
                matches!(e, RbdDiffError::UnknownTag { tag: b'x', offset } if offset == at),
                "{e}"
            );
            assert!(e.to_string().contains(&format!("0x78 at byte {at}")), "{e}");
        }
    }

    #[test]
    fn truncation_anywhere_is_refused() {
        for v in [Version::V1, Version::V2] {
            let bytes = encode(v, &sample());
            for cut in 0..bytes.len() {
                let e = err(&bytes[..cut], &expect());
                assert!(
                    matches!(e, RbdDiffError::Truncated { offset, .. } if offset == cut as u64),
                    "{v:?} cut at {cut}: {e}"
                );
            }
        }
    }

    #[test]
    fn trailing_data_is_refused() {
        let mut bytes = encode(Version::V1, &sample());
        let len = bytes.len() as u64;
        bytes.push(0);
        assert!(matches!(err(&bytes, &expect()), RbdDiffError::TrailingData { offset } if offset == len));
        bytes.pop();
        bytes.push(b'e');
        assert!(matches!(
            err(&bytes, &expect()),
            RbdDiffError::TrailingData { .. }
        ));
    }

    #[test]
    fn snapshot_names_are_checked() {
        let with = |recs: &[Rec], e: &Expect| err(&encode(Version::V1, recs), e);
        // Wrong to-snapshot: refused at the `t` record.
        let e = with(
            &[
                Rec::From(name("s1")),
                Rec::To(name("s3")),
                Rec::Size(10),
                Rec::End,
            ],
            &expect(),
        );
        assert!(
            matches!(&e, RbdDiffError::ToSnap { offset: 19, found: Some(f), .. } if f == "s3"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains(r#"to-snapshot Some("s3") at byte 19, expected "s2""#),
            "{e}"
        );
        // Missing to-snapshot: refused at the record that ends the metadata.
        let e = with(&[Rec::From(name("s1")), Rec::Size(10), Rec::End], &expect());
        assert!(
            matches!(
                e,
                RbdDiffError::ToSnap {
                    offset: 28,
                    found: None,
                    ..
                }
            ),
            "{e}"
        );
        // Wrong, missing or unexpected from-snapshot.
        let e = with(&[Rec::From(name("s0")), Rec::To(name("s2")), Rec::End], &expect());
        assert!(matches!(e, RbdDiffError::FromSnap { offset: 12, .. }), "{e}");
        let e = with(
            &[
                Rec::To(name("s2")),
                Rec::Size(1),
                Rec::Write(0, vec![1]),
                Rec::End,
            ],
            &expect(),
        );
        assert!(
            matches!(
                e,
                RbdDiffError::FromSnap {
                    offset: 28,
                    found: None,
                    ..
                }
            ),
            "{e}"
        );
        let e = with(
            &[Rec::From(name("s1")), Rec::To(name("s2")), Rec::Size(1), Rec::End],
            &Expect::full("s2"),
        );
        assert!(
            matches!(
                e,
                RbdDiffError::FromSnap {
                    offset: 12,
                    expected: None,
                    ..
                }
            ),
            "{e}"
        );
        // A name that is a prefix, or not UTF-8, does not match.
        let e = with(&[Rec::From(name("s1")), Rec::To(name("s")), Rec::End], &expect());
        assert!(matches!(e, RbdDiffError::ToSnap { .. }), "{e}");
        let e = with(
            &[Rec::From(name("s1")), Rec::To(b"s2\xff".to_vec()), Rec::End],
            &expect(),
        );
        assert!(matches!(e, RbdDiffError::ToSnap { .. }), "{e}");
        // Duplicates.
        let e = with(
            &[Rec::From(name("s1")), Rec::From(name("s1")), Rec::End],
            &expect(),
        );
        assert!(
            matches!(e, RbdDiffError::Duplicate { tag: 'f', offset: 19 }),
            "{e}"
        );
        let e = with(
            &[Rec::To(name("s2")), Rec::To(name("s2")), Rec::End],
            &Expect::full("s2"),
        );
        assert!(matches!(e, RbdDiffError::Duplicate { tag: 't', .. }), "{e}");
        // Absurd name length: refused before allocating.
        let mut huge = vec![b't'];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = with(&[Rec::Raw(huge)], &expect());
        assert!(
            matches!(e, RbdDiffError::NameTooLong { len: u32::MAX, .. }),
            "{e}"
        );
        let long = "n".repeat(MAX_SNAP_NAME as usize);
        let (ok, _) = parse(
            &encode(Version::V1, &[Rec::To(name(&long)), Rec::Size(0), Rec::End]),
            &Expect::full(long.clone()),
        )
        .unwrap();
        assert_eq!(ok.to_snap, long);
    }

    #[test]
    fn size_is_required_and_capped() {
        let e = err(
            &encode(
                Version::V1,
                &[
                    Rec::From(name("s1")),
                    Rec::To(name("s2")),
                    Rec::Zero(0, 1),
                    Rec::End,
                ],
            ),
            &expect(),
        );
        assert!(matches!(e, RbdDiffError::MissingSize { offset: 26 }), "{e}");
        let e = err(
            &encode(
                Version::V1,
                &[Rec::From(name("s1")), Rec::To(name("s2")), Rec::End],
            ),
            &expect(),
        );
        assert!(matches!(e, RbdDiffError::MissingSize { offset: 26 }), "{e}");
        let e = err(
            &encode(Version::V1, &sample()),
            &expect().with_max_size((1 << 20) - 1),
        );
        assert!(
            matches!(
                e,
                RbdDiffError::SizeTooLarge {
                    offset: 26,
                    size: 1048576,
                    max: 1048575
                }
            ),
            "{e}"
        );
        parse(&encode(Version::V1, &sample()), &expect().with_max_size(1 << 20)).unwrap();
        let mut recs = sample();
        recs.insert(3, Rec::Size(1 << 20));
        assert!(matches!(
            err(&encode(Version::V1, &recs), &expect()),
            RbdDiffError::Duplicate { tag: 's', .. }
        ));
    }

    #[test]
    fn metadata_after_data_is_refused() {
        for late in [
            Rec::Size(1 << 20),
            Rec::To(name("s2")),
            Rec::From(name("s1")),
            Rec::Protected(0),
        ] {
            let mut recs = sample();
            recs.insert(4, late.clone());
            let at = encode(Version::V2, &recs[..4]).len() as u64;
            let e = err(&encode(Version::V2, &recs), &expect());
            assert!(
                matches!(e, RbdDiffError::MetadataAfterData { offset, .. } if offset == at),
                "{late:?}: {e}"
            );
        }
    }

    #[test]
    fn extents_are_checked() {
        let head = || vec![Rec::From(name("s1")), Rec::To(name("s2")), Rec::Size(1000)];
        let run = |tail: Vec<Rec>| {
            let mut recs = head();
            recs.extend(tail);
            recs.push(Rec::End);
            parse(&encode(Version::V1, &recs), &expect()).map(|(d, _)| d)
        };
        // Beyond the image size, or wrapping past 2^64.
        let e = run(vec![Rec::Write(999, vec![1, 2])]).unwrap_err();
        assert!(
            matches!(
                e,
                RbdDiffError::PastEnd {
                    offset: 35,
                    tag: 'w',
                    start: 999,
                    len: 2,
                    size: 1000
                }
            ),
            "{e}"
        );
        let e = run(vec![Rec::Zero(1000, 1)]).unwrap_err();
        assert!(matches!(e, RbdDiffError::PastEnd { tag: 'z', .. }), "{e}");
        let e = run(vec![Rec::Zero(u64::MAX, 2)]).unwrap_err();
        assert!(matches!(e, RbdDiffError::PastEnd { .. }), "{e}");
        // Out of order, overlapping (touching is fine).
        run(vec![
            Rec::Zero(0, 10),
            Rec::Write(10, vec![1]),
            Rec::Zero(11, 989),
        ])
        .unwrap();
        let e = run(vec![Rec::Zero(10, 10), Rec::Write(5, vec![1])]).unwrap_err();
        assert!(
            matches!(
                e,
                RbdDiffError::Order {
                    offset: 52,
                    tag: 'w',
                    start: 5,
                    prev_end: 20
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("out of order or overlapping"));
        let e = run(vec![Rec::Write(10, vec![1; 10]), Rec::Zero(19, 1)]).unwrap_err();
        assert!(matches!(e, RbdDiffError::Order { .. }), "{e}");
        // Zero-length records.
        let e = run(vec![Rec::Write(10, vec![])]).unwrap_err();
        assert!(
            matches!(
                e,
                RbdDiffError::EmptyExtent {
                    tag: 'w',
                    start: 10,
                    ..
                }
            ),
            "{e}"
        );
        let e = run(vec![Rec::Zero(0, 0)]).unwrap_err();
        assert!(matches!(e, RbdDiffError::EmptyExtent { tag: 'z', .. }), "{e}");
        // An absurd data length is refused by the size check, before anything is read.
        let mut w = vec![b'w'];
        w.extend_from_slice(&0u64.to_le_bytes());
        w.extend_from_slice(&u64::MAX.to_le_bytes());
        let e = run(vec![Rec::Raw(w)]).unwrap_err();
        assert!(matches!(e, RbdDiffError::PastEnd { len: u64::MAX, .. }), "{e}");
    }

    #[test]
    fn huge_declared_data_is_copied_in_bounded_pieces() {
        // A data length the size allows but the stream does not hold: truncated, no allocation
        // beyond COPY_BUF.
        let mut recs = vec![Rec::To(name("s")), Rec::Size(u64::MAX)];
        let mut w = vec![b'w'];
        w.extend_from_slice(&0u64.to_le_bytes());
        w.extend_from_slice(&(u64::MAX - 1).to_le_bytes());
        w.extend_from_slice(&[5; 10]);
        recs.push(Rec::Raw(w));
        let mut out = MemExtents::default();
        let bytes = encode(Version::V1, &recs);
        let e = decode(&bytes[..], &Expect::full("s"), &mut out).unwrap_err();
        assert!(
            matches!(e, RbdDiffError::Truncated { offset, .. } if offset == bytes.len() as u64),
            "{e}"
        );
    }

    #[test]
    fn v2_record_lengths_are_checked() {
        let bytes = encode(Version::V2, &sample());
        // Offsets of each record's length field: tag + 1.
        let mut at = 12usize;
        let mut lens = Vec::new();
        while bytes[at] != b'e' {
            let len = u64::from_le_bytes(bytes[at + 1..at + 9].try_into().unwrap());
            lens.push((at, bytes[at]));
            at += 9 + len as usize;
        }
        assert_eq!(lens.len(), 8);
        for (at, tag) in lens {
            for delta in [1u64, u64::MAX] {
                let mut bad = bytes.clone();
                let len = u64::from_le_bytes(bad[at + 1..at + 9].try_into().unwrap());
                bad[at + 1..at + 9].copy_from_slice(&len.wrapping_add(delta).to_le_bytes());
                let e = err(&bad, &expect());
                assert!(
                    matches!(e, RbdDiffError::RecordLength { offset, tag: t, .. } if offset == at as u64 && t == char::from(tag)),
                    "{}: {e}",
                    char::from(tag)
                );
            }
        }
        // v2 `p` must be 0 or 1.
        let e = err(
            &encode(
                Version::V2,
                &[Rec::To(name("s2")), Rec::Protected(2), Rec::Size(0), Rec::End],
            ),
            &Expect::full("s2"),
        );
        assert!(
            matches!(e, RbdDiffError::BadProtection { value: 2, offset: 27 }),
            "{e}"
        );
    }

    #[test]
    fn read_and_spool_errors_carry_offsets() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("pipe broke"));
                }
                let n = buf.len().min(self.0);
                buf[..n].copy_from_slice(&HEADER_V1[..n]);
                self.0 -= n;
                Ok(n)
            }
        }
        let e = decode(Failing(5), &expect(), &mut MemExtents::default()).unwrap_err();
        assert!(matches!(e, RbdDiffError::Read { offset: 5, .. }), "{e}");
        assert_eq!(
            crate::error_chain(&e),
            "rbd diff: reading the stream at byte 5: pipe broke"
        );

        struct Full;
        impl ExtentWriter for Full {
            fn write_at(&mut self, _: u64, _: &[u8]) -> io::Result<()> {
                Err(io::Error::other("disk full"))
            }
        }
        let bytes = encode(Version::V1, &sample());
        let e = decode(&bytes[..], &expect(), &mut Full).unwrap_err();
        assert!(
            matches!(
                e,
                RbdDiffError::Spool {
                    offset: 52,
                    image_offset: 0,
                    len: 100,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Valid streams: extents in order with gaps, random kinds and sizes.
    fn valid_stream() -> impl Strategy<Value = (Version, Vec<Rec>, u64)> {
        (
            any::<bool>(),
            proptest::collection::vec((0u64..300, 1u64..300, any::<bool>(), any::<u8>()), 0..20),
            0u64..100,
            any::<bool>(),
        )
            .prop_map(|(v2, ext, tail, from)| {
                let mut recs = Vec::new();
                let mut pos = 0;
                let mut data = Vec::new();
                for (gap, len, w, fill) in ext {
                    let start = pos + gap;
                    data.push(if w {
                        Rec::Write(start, vec![fill; len as usize])
                    } else {
                        Rec::Zero(start, len)
                    });
                    pos = start + len;
                }
                let size = pos + tail;
                if from {
                    recs.push(Rec::From(name("s1")));
                }
                recs.push(Rec::Size(size));
                recs.push(Rec::To(name("s2")));
                recs.extend(data);
                recs.push(Rec::End);
                (if v2 { Version::V2 } else { Version::V1 }, recs, size)
            })
    }

    /// The invariants of an accepted stream.
    fn check_accepted(diff: &SpooledDiff, data: &MemExtents, len: usize, e: &Expect) {
        assert_eq!(
            &ChangeMap::from_sorted(diff.size, diff.changes.changes().iter().cloned()).unwrap(),
            &diff.changes
        );
        assert_eq!(diff.changes.size(), diff.size);
        assert_eq!(diff.stream_len, len as u64);
        assert_eq!(diff.to_snap, e.to_snap);
        assert_eq!(diff.from_snap, e.from_snap);
        assert!(e.max_size.is_none_or(|m| diff.size <= m));
        // Every data byte lies in a data range, and data ranges are exactly the bytes received.
        assert_eq!(data.bytes(), diff.changes.bytes().0);
        for (off, bytes) in data.extents() {
            let end = off + bytes.len() as u64;
            assert!(
                diff.changes
                    .changes()
                    .iter()
                    .any(|c| c.kind == ChangeKind::Data && c.range.start <= *off && end <= c.range.end)
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), v2: bool, from: bool) {
            let mut input = if v2 { HEADER_V2.to_vec() } else { HEADER_V1.to_vec() };
            input.extend(bytes);
            let e = if from { expect() } else { Expect::full("s2") };
            if let Ok((diff, data)) = parse(&input, &e) {
                check_accepted(&diff, &data, input.len(), &e);
            }
            let _ = parse(&input[12..], &e);
        }

        #[test]
        fn valid_streams_round_trip((version, recs, size) in valid_stream()) {
            let bytes = encode(version, &recs);
            let e = if matches!(recs[0], Rec::From(_)) { expect() } else { Expect::full("s2") };
            let (diff, data) = parse(&bytes, &e).unwrap();
            check_accepted(&diff, &data, bytes.len(), &e);
            prop_assert_eq!(diff.size, size);
            // Rebuild the image from the records and from the parse: same bytes.
            let mut want = vec![0xeeu8; size as usize];
            for r in &recs {
                match r {
                    Rec::Write(o, d) => want[*o as usize..*o as usize + d.len()].copy_from_slice(d),
                    Rec::Zero(o, l) => want[*o as usize..(*o + *l) as usize].fill(0),
                    _ => {}
                }
            }
            let mut got = vec![0xeeu8; size as usize];
            for c in diff.changes.changes() {
                if c.kind == ChangeKind::Zero {
                    got[c.range.start as usize..c.range.end as usize].fill(0);
                }
            }
            for (o, d) in data.extents() {
                got[*o as usize..*o as usize + d.len()].copy_from_slice(d);
            }
            prop_assert_eq!(got, want);
        }

        #[test]
        fn mutated_streams_never_panic(
            (version, recs, _size) in valid_stream(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
            do_cut: bool,
        ) {
            let mut bytes = encode(version, &recs);
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            if do_cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            let e = if matches!(recs[0], Rec::From(_)) { expect() } else { Expect::full("s2") };
            if let Ok((diff, data)) = parse(&bytes, &e) {
                check_accepted(&diff, &data, bytes.len(), &e);
            }
        }
    }
}
