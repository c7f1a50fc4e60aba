//! The block-values file: what the agent knows about one disk's volume at the last committed
//! point, so that an incremental sync compares blocks without asking the target.
//!
//! One file per disk, `{state_dir}/{host}/disks/{disk}.blocks` (layout in `docs/formats.md`,
//! section "Agent state"). All integers little-endian.
//!
//! ```text
//! magic        8  "TERNBLKV"        (frozen: DO NOT MODIFY)
//! version      2  1
//! flags        2  bit 0: a change token follows the disk id; other bits 0
//! size         8  disk size in bytes
//! chunk_size   4
//! block_size   4
//! point_id     2+n length-prefixed UTF-8: the point these values describe
//! disk_id      2+n length-prefixed UTF-8
//! change_token 2+n length-prefixed UTF-8, only with flag bit 0: the change tracker's name for
//!                  the state of the disk at this point (a dirty bitmap, an RBD snapshot, a
//!                  VMware change id), so the next sync may read only what changed since
//! header_sum   32 BLAKE3 of every header byte before it
//! records      one per chunk, in chunk order; chunk i starts at header_len + i * full_record_len
//!   values     blocks_in(chunk_len(i)) x 32: the BLAKE3 block values (tern_core::digest)
//!   record_sum 32 BLAKE3(header_sum || i as u64 || values)
//! ```
//!
//! Records have a fixed position, so a chunk's values are read with one `pread` when the chunk
//! is planned: the file is streamed, never loaded whole (a 2 TiB disk at 64 KiB blocks has 32 M
//! values, 1 GiB). Each record carries its own checksum, bound to its file and position: a
//! damaged record makes its chunk "unknown" (sent whole), never skipped.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tern_core::geometry::{BlockLayout, ChunkGeometry};
use tern_core::{DiskId, PointId};

/// Magic of a block-values file. DO NOT MODIFY.
pub const BLOCKS_MAGIC: [u8; 8] = *b"TERNBLKV";
/// The version this code writes and reads.
pub const BLOCKS_VERSION: u16 = 1;
/// Header flag: a change token follows the disk id.
const FLAG_CHANGE_TOKEN: u16 = 1;
/// Longest change token, in bytes.
pub const MAX_CHANGE_TOKEN: usize = 255;
/// The longest header: 8+2+2+8+4+4 + 2×(2+64) + (2+255) + 32 bytes.
const MAX_HEADER_LEN: usize = 449;
const VALUE_LEN: usize = 32;
const SUM_LEN: usize = 32;

/// Why a block-values file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BlockStateError {
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid block-values file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("block values for chunk {index} pushed out of order (expected {expected})")]
    Order { index: u64, expected: u64 },
    #[error("block values for chunk {index}: {got} values, expected {expected}")]
    Count { index: u64, got: usize, expected: usize },
}

/// What a block-values file describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStateHeader {
    /// The committed point whose volume content the values describe.
    pub point: PointId,
    /// The disk.
    pub disk: DiskId,
    /// The disk's geometry at that point.
    pub geometry: ChunkGeometry,
    /// The compare blocks.
    pub layout: BlockLayout,
    /// The change tracker's name for the disk's state at this point (see
    /// [`crate::source::ChangeTracker`]): at most [`MAX_CHANGE_TOKEN`] bytes.
    pub change_token: Option<String>,
}

impl BlockStateHeader {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(200);
        out.extend_from_slice(&BLOCKS_MAGIC);
        out.extend_from_slice(&BLOCKS_VERSION.to_le_bytes());
        let flags = if self.change_token.is_some() {
            FLAG_CHANGE_TOKEN
        } else {
            0
        };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.geometry.size().to_le_bytes());
        out.extend_from_slice(&self.geometry.chunk_size().to_le_bytes());
        out.extend_from_slice(&self.layout.block_size().to_le_bytes());
        let token = self.change_token.as_deref();
        for s in [Some(self.point.as_str()), Some(self.disk.as_str()), token]
            .into_iter()
            .flatten()
        {
            // Ids are at most 64 bytes (validated by their types), tokens at most
            // MAX_CHANGE_TOKEN (checked by the writer).
            out.extend_from_slice(&(s.len() as u16).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Number of values in chunk `index`'s record.
    fn values_in(&self, index: u64) -> usize {
        self.layout.blocks_in(self.geometry.chunk_len(index))
    }

    fn full_record_len(&self) -> u64 {
        (self.layout.blocks_per_chunk() * VALUE_LEN + SUM_LEN) as u64
    }

    /// Total file length for this header.
    fn file_len(&self, header_len: u64) -> u64 {
        let count = self.geometry.chunk_count();
        let last = count - 1;
        header_len + last * self.full_record_len() + (self.values_in(last) * VALUE_LEN + SUM_LEN) as u64
    }
}

fn record_sum(header_sum: &[u8; 32], index: u64, values: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(header_sum);
    h.update(&index.to_le_bytes());
    h.update(values);
    *h.finalize().as_bytes()
}

fn invalid(path: &Path, reason: impl Into<String>) -> BlockStateError {
    BlockStateError::Invalid {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads chunk records of a block-values file by position.
#[derive(Debug)]
pub struct BlockStateReader {
    file: File,
    path: PathBuf,
    header: BlockStateHeader,
    header_len: u64,
    header_sum: [u8; 32],
}

impl BlockStateReader {
    /// Opens and checks the header and the file's length. `Ok(None)` when there is no file.
    pub fn open(path: &Path) -> Result<Option<Self>, BlockStateError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(BlockStateError::Io {
                    op: "open",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let io = |op, source| BlockStateError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        let mut head = vec![0u8; MAX_HEADER_LEN.min(len as usize)];
        file.read_exact_at(&mut head, 0).map_err(|e| io("read", e))?;
        let (header, header_len, header_sum) = decode_header(&head).map_err(|r| invalid(path, r))?;
        let expected = header.file_len(header_len as u64);
        if len != expected {
            return Err(invalid(path, format!("length {len}, expected {expected}")));
        }
        Ok(Some(Self {
            file,
            path: path.to_owned(),
            header,
            header_len: header_len as u64,
            header_sum,
        }))
    }

    /// What the file describes.
    pub fn header(&self) -> &BlockStateHeader {
        &self.header
    }

    /// The block values of chunk `index`; `Ok(None)` when the record is damaged or the chunk
    /// is past the file's disk size.
    pub fn read_chunk(&self, index: u64) -> Result<Option<Vec<[u8; 32]>>, BlockStateError> {
        Ok(self.read_chunks(index..index + 1)?.pop().flatten())
    }

    /// The block values of the chunks of `range`, in order, read with one `pread`: `None` for
    /// a damaged record or a chunk past the file's disk size.
    pub fn read_chunks(
        &self,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<Option<Vec<[u8; 32]>>>, BlockStateError> {
        let count = self.header.geometry.chunk_count();
        let stored = range.start.min(count)..range.end.min(count);
        let total = range.end.saturating_sub(range.start) as usize;
        let mut out = Vec::with_capacity(total);
        if !stored.is_empty() {
            let full = self.header.full_record_len();
            let last = stored.end - 1;
            let len =
                (last - stored.start) * full + (self.header.values_in(last) * VALUE_LEN + SUM_LEN) as u64;
            let mut buf = vec![0u8; len as usize];
            self.file
                .read_exact_at(&mut buf, self.header_len + stored.start * full)
                .map_err(|source| BlockStateError::Io {
                    op: "read",
                    path: self.path.clone(),
                    source,
                })?;
            for (i, index) in stored.clone().enumerate() {
                let n = self.header.values_in(index);
                let at = i * full as usize;
                let (values, sum) = buf[at..at + n * VALUE_LEN + SUM_LEN].split_at(n * VALUE_LEN);
                out.push((record_sum(&self.header_sum, index, values) == sum).then(|| {
                    values
                        .chunks_exact(VALUE_LEN)
                        .map(|v| {
                            let mut a = [0u8; 32];
                            a.copy_from_slice(v);
                            a
                        })
                        .collect()
                }));
            }
        }
        // Chunks past the file's disk size.
        out.resize(total, None);
        Ok(out)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.pos..self.pos + n)
            .ok_or_else(|| "truncated header".to_owned())?;
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, String> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self, what: &str) -> Result<String, String> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

fn decode_header(b: &[u8]) -> Result<(BlockStateHeader, usize, [u8; 32]), String> {
    let mut c = Cursor { b, pos: 0 };
    if c.take(8)? != BLOCKS_MAGIC {
        return Err("bad magic".into());
    }
    let version = c.u16()?;
    if version != BLOCKS_VERSION {
        return Err(format!("version {version} is not supported"));
    }
    let flags = c.u16()?;
    if flags & !FLAG_CHANGE_TOKEN != 0 {
        return Err(format!("flags {flags:#x} are not supported"));
    }
    let size = c.u64()?;
    let chunk_size = c.u32()?;
    let block_size = c.u32()?;
    let point = c.str("point id")?;
    let disk = c.str("disk id")?;
    let change_token = if flags & FLAG_CHANGE_TOKEN != 0 {
        let t = c.str("change token")?;
        if t.is_empty() || t.len() > MAX_CHANGE_TOKEN {
            return Err(format!("change token of {} bytes", t.len()));
        }
        Some(t.to_owned())
    } else {
        None
    };
    let body_len = c.pos;
    let mut sum = [0u8; 32];
    sum.copy_from_slice(c.take(SUM_LEN)?);
    if blake3::hash(&b[..body_len]).as_bytes() != &sum {
        return Err("header checksum does not match".into());
    }
    let header = BlockStateHeader {
        point: PointId::new(point).map_err(|e| e.to_string())?,
        disk: DiskId::new(disk).map_err(|e| e.to_string())?,
        geometry: ChunkGeometry::new(size, chunk_size).map_err(|e| e.to_string())?,
        layout: BlockLayout::new(chunk_size, block_size).map_err(|e| e.to_string())?,
        change_token,
    };
    Ok((header, body_len + SUM_LEN, sum))
}

/// Writes a block-values file chunk by chunk, in order, to a temporary path.
#[derive(Debug)]
pub struct BlockStateWriter {
    out: BufWriter<File>,
    path: PathBuf,
    header: BlockStateHeader,
    header_sum: [u8; 32],
    next: u64,
}

impl BlockStateWriter {
    /// Creates (or truncates) `path` and writes the header.
    pub fn create(path: &Path, header: BlockStateHeader) -> Result<Self, BlockStateError> {
        let io = |op, source| BlockStateError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        if let Some(t) = &header.change_token
            && (t.is_empty() || t.len() > MAX_CHANGE_TOKEN)
        {
            return Err(invalid(
                path,
                format!("change token of {} bytes (1 to {MAX_CHANGE_TOKEN})", t.len()),
            ));
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io("create", e))?;
        let head = header.encode();
        let mut header_sum = [0u8; 32];
        header_sum.copy_from_slice(&head[head.len() - SUM_LEN..]);
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&head).map_err(|e| io("write", e))?;
        Ok(Self {
            out,
            path: path.to_owned(),
            header,
            header_sum,
            next: 0,
        })
    }

    /// Appends the values of chunk `index` (which must be the next chunk).
    pub fn push(&mut self, index: u64, values: &[[u8; 32]]) -> Result<(), BlockStateError> {
        if index != self.next {
            return Err(BlockStateError::Order {
                index,
                expected: self.next,
            });
        }
        let expected = self.header.values_in(index);
        if values.len() != expected {
            return Err(BlockStateError::Count {
                index,
                got: values.len(),
                expected,
            });
        }
        let flat: Vec<u8> = values.iter().flatten().copied().collect();
        let sum = record_sum(&self.header_sum, index, &flat);
        let io = |source| BlockStateError::Io {
            op: "write",
            path: self.path.clone(),
            source,
        };
        self.out.write_all(&flat).map_err(io)?;
        self.out.write_all(&sum).map_err(io)?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every chunk was written, flushes and fsyncs. The file is complete but still
    /// at its temporary path; [`install`] moves it into place.
    pub fn finish(self) -> Result<PathBuf, BlockStateError> {
        let count = self.header.geometry.chunk_count();
        if self.next != count {
            return Err(invalid(
                &self.path,
                format!("{} of {count} chunks written", self.next),
            ));
        }
        let path = self.path;
        let io = |op, source| BlockStateError::Io {
            op,
            path: path.clone(),
            source,
        };
        let file = self.out.into_inner().map_err(|e| io("write", e.into_error()))?;
        file.sync_all().map_err(|e| io("fsync", e))?;
        Ok(path)
    }
}

/// Atomically replaces `dst` by the finished file `tmp` (rename, then fsync the directory).
pub fn install(tmp: &Path, dst: &Path) -> Result<(), BlockStateError> {
    std::fs::rename(tmp, dst).map_err(|source| BlockStateError::Io {
        op: "rename",
        path: tmp.to_owned(),
        source,
    })?;
    crate::state::sync_parent(dst).map_err(|source| BlockStateError::Io {
        op: "fsync the directory of",
        path: dst.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(size: u64) -> BlockStateHeader {
        BlockStateHeader {
            point: PointId::new("20260101T000000Z-00000001").unwrap(),
            disk: DiskId::new("sda").unwrap(),
            geometry: ChunkGeometry::new(size, 64 << 10).unwrap(),
            layout: BlockLayout::new(64 << 10, 16 << 10).unwrap(),
            change_token: None,
        }
    }

    fn values(index: u64, n: usize) -> Vec<[u8; 32]> {
        (0..n)
            .map(|b| *blake3::hash(&[index as u8, b as u8]).as_bytes())
            .collect()
    }

    fn write(path: &Path, h: &BlockStateHeader) {
        let mut w = BlockStateWriter::create(path, h.clone()).unwrap();
        for i in 0..h.geometry.chunk_count() {
            w.push(i, &values(i, h.values_in(i))).unwrap();
        }
        let tmp = w.finish().unwrap();
        assert_eq!(tmp, path);
    }

    #[test]
    fn round_trip_with_short_last_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sda.blocks");
        // 3 full chunks and a last chunk of 5 KiB (2 blocks, the last one short).
        let h = header(3 * (64 << 10) + 5120);
        write(&path, &h);
        let r = BlockStateReader::open(&path).unwrap().unwrap();
        assert_eq!(r.header(), &h);
        for i in 0..4 {
            assert_eq!(r.read_chunk(i).unwrap(), Some(values(i, h.values_in(i))));
        }
        assert_eq!(r.read_chunk(4).unwrap(), None);
        // A run read at once equals the records read one by one, past the end included.
        for range in [0..4, 1..3, 3..6, 4..6, 2..2] {
            let one_by_one: Vec<_> = range.clone().map(|i| r.read_chunk(i).unwrap()).collect();
            assert_eq!(r.read_chunks(range.clone()).unwrap(), one_by_one, "{range:?}");
        }
        assert!(
            BlockStateReader::open(&dir.path().join("missing"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn change_tokens_round_trip_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sda.blocks");
        let mut h = header(2 * (64 << 10));
        h.change_token = Some("tern-20260101T000000Z-00000001".into());
        write(&path, &h);
        let r = BlockStateReader::open(&path).unwrap().unwrap();
        assert_eq!(r.header(), &h);
        // The longest token fits in what `open` reads of the header.
        h.change_token = Some("t".repeat(MAX_CHANGE_TOKEN));
        write(&path, &h);
        assert_eq!(BlockStateReader::open(&path).unwrap().unwrap().header(), &h);
        for bad in [String::new(), "t".repeat(MAX_CHANGE_TOKEN + 1)] {
            h.change_token = Some(bad);
            assert!(matches!(
                BlockStateWriter::create(&path, h.clone()),
                Err(BlockStateError::Invalid { .. })
            ));
        }
    }

    #[test]
    fn damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sda.blocks");
        let h = header(2 * (64 << 10));
        write(&path, &h);
        let good = std::fs::read(&path).unwrap();
        let header_len = h.encode().len();
        // A flipped bit in a record makes only that record unusable.
        let mut bytes = good.clone();
        bytes[header_len + 5] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let r = BlockStateReader::open(&path).unwrap().unwrap();
        assert_eq!(r.read_chunk(0).unwrap(), None);
        assert!(r.read_chunk(1).unwrap().is_some());
        let run = r.read_chunks(0..2).unwrap();
        assert!(run[0].is_none() && run[1].is_some());
        // Swapped records are detected (the checksum binds the position).
        let rec = (h.full_record_len()) as usize;
        let mut bytes = good.clone();
        let (a, b) = bytes[header_len..].split_at_mut(rec);
        a.swap_with_slice(&mut b[..rec]);
        std::fs::write(&path, &bytes).unwrap();
        let r = BlockStateReader::open(&path).unwrap().unwrap();
        assert_eq!(r.read_chunk(0).unwrap(), None);
        assert_eq!(r.read_chunk(1).unwrap(), None);
        // A flipped header bit or a truncation refuses the whole file.
        for i in 0..header_len {
            let mut bytes = good.clone();
            bytes[i] ^= 0x10;
            std::fs::write(&path, &bytes).unwrap();
            assert!(BlockStateReader::open(&path).is_err(), "header byte {i}");
        }
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(BlockStateReader::open(&path).is_err());
        std::fs::write(&path, b"").unwrap();
        assert!(BlockStateReader::open(&path).is_err());
    }

    #[test]
    fn writer_refuses_gaps_and_wrong_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let h = header(2 * (64 << 10));
        let mut w = BlockStateWriter::create(&path, h.clone()).unwrap();
        assert!(matches!(
            w.push(1, &values(1, 4)),
            Err(BlockStateError::Order { .. })
        ));
        assert!(matches!(
            w.push(0, &values(0, 3)),
            Err(BlockStateError::Count { .. })
        ));
        w.push(0, &values(0, 4)).unwrap();
        assert!(w.finish().is_err());
    }
}
