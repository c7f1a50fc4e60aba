//! The recovery-point manifest: one file that describes a recovery point of a host.
//!
//! Byte layout (all integers little-endian), documented in `docs/formats.md`:
//!
//! ```text
//! magic        8  "TERNMFST"                 (frozen: DO NOT MODIFY)
//! version      2  1
//! flags        2  0 (reserved, must be 0)
//! created_ms   8  creation time, Unix milliseconds
//! host_id      2+n  length-prefixed UTF-8
//! point_id     2+n  length-prefixed UTF-8
//! disk_count   4
//! per disk:
//!   disk_id    2+n  length-prefixed UTF-8
//!   size       8  bytes
//!   chunk_size 4
//!   chunk_count 8 (must equal ceil(size / chunk_size))
//!   chunks     chunk_count x 33: tag (0 = zero chunk, 1 = data) + 32-byte BLAKE3 digest
//!              (32 zero bytes after tag 0)
//! checksum     32 BLAKE3 of every byte before it
//! ```

use crate::digest::Digest;
use crate::geometry::{ChunkGeometry, GeometryError};
use crate::ids::{DiskId, HostId, IdError, PointId};

/// Manifest magic. DO NOT MODIFY: it identifies every manifest ever written.
pub const MANIFEST_MAGIC: [u8; 8] = *b"TERNMFST";
/// The manifest version this code writes.
pub const MANIFEST_VERSION: u16 = 1;
/// The most disks a host may have in one point.
pub const MAX_DISKS: u32 = 256;
const ENTRY_LEN: usize = 33;
const CHECKSUM_LEN: usize = 32;

/// One chunk of a disk in a recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkRef {
    /// Every byte of the chunk is zero; nothing is stored for it.
    Zero,
    /// The chunk's BLAKE3 digest.
    Data(Digest),
}

/// One disk of a recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskManifest {
    /// The disk's id inside the host.
    pub disk_id: DiskId,
    /// Size and chunk size.
    pub geometry: ChunkGeometry,
    /// One entry per chunk, `geometry.chunk_count()` of them.
    pub chunks: Vec<ChunkRef>,
}

/// A recovery point: all disks of a host at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The protected host.
    pub host_id: HostId,
    /// The point (equal to the id of the sync that produced it).
    pub point_id: PointId,
    /// Creation time, Unix milliseconds.
    pub created_unix_ms: u64,
    /// The host's disks, in the order the agent lists them; ids are unique.
    pub disks: Vec<DiskManifest>,
}

/// Why bytes are not a valid manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a Tern manifest (bad magic)")]
    Magic,
    #[error("manifest version {0} is not supported (this build reads version 1)")]
    Version(u16),
    #[error("manifest flags {0:#x} are not supported")]
    Flags(u16),
    #[error("manifest is truncated at byte {0}")]
    Truncated(usize),
    #[error("manifest checksum does not match its contents")]
    Checksum,
    #[error("manifest has {0} trailing bytes")]
    Trailing(usize),
    #[error("manifest text field is not UTF-8")]
    Utf8,
    #[error("manifest has an invalid id")]
    Id(#[from] IdError),
    #[error("manifest disk {disk} has an invalid geometry")]
    Geometry {
        disk: String,
        #[source]
        source: GeometryError,
    },
    #[error("manifest disk {disk} declares {declared} chunks, its geometry has {expected}")]
    ChunkCount {
        disk: String,
        declared: u64,
        expected: u64,
    },
    #[error("manifest disk {disk} chunk {index} has an invalid entry")]
    Entry { disk: String, index: u64 },
    #[error("manifest has {0} disks (1 to 256 allowed)")]
    DiskCount(u32),
    #[error("manifest names disk {0} twice")]
    DuplicateDisk(String),
}

impl Manifest {
    /// Checks the invariants the encoder relies on (the decoder checks them too).
    pub fn validate(&self) -> Result<(), ManifestError> {
        let n = self.disks.len() as u32;
        if n == 0 || n > MAX_DISKS {
            return Err(ManifestError::DiskCount(n));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.disks {
            if !seen.insert(d.disk_id.as_str()) {
                return Err(ManifestError::DuplicateDisk(d.disk_id.to_string()));
            }
            let expected = d.geometry.chunk_count();
            if d.chunks.len() as u64 != expected {
                return Err(ManifestError::ChunkCount {
                    disk: d.disk_id.to_string(),
                    declared: d.chunks.len() as u64,
                    expected,
                });
            }
        }
        Ok(())
    }

    /// The digests of every data chunk of every disk (with repeats).
    pub fn data_chunks(&self) -> impl Iterator<Item = Digest> + '_ {
        self.disks
            .iter()
            .flat_map(|d| d.chunks.iter())
            .filter_map(|c| match c {
                ChunkRef::Data(d) => Some(*d),
                ChunkRef::Zero => None,
            })
    }

    /// The disk named `id`.
    pub fn disk(&self, id: &DiskId) -> Option<&DiskManifest> {
        self.disks.iter().find(|d| &d.disk_id == id)
    }

    /// Encodes the manifest. Fails only if [`Manifest::validate`] fails.
    pub fn encode(&self) -> Result<Vec<u8>, ManifestError> {
        self.validate()?;
        let entries: usize = self.disks.iter().map(|d| d.chunks.len() * ENTRY_LEN + 96).sum();
        let mut out = Vec::with_capacity(128 + entries);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        put_str(&mut out, self.host_id.as_str());
        put_str(&mut out, self.point_id.as_str());
        out.extend_from_slice(&(self.disks.len() as u32).to_le_bytes());
        for d in &self.disks {
            put_str(&mut out, d.disk_id.as_str());
            out.extend_from_slice(&d.geometry.size().to_le_bytes());
            out.extend_from_slice(&d.geometry.chunk_size().to_le_bytes());
            out.extend_from_slice(&(d.chunks.len() as u64).to_le_bytes());
            for c in &d.chunks {
                match c {
                    ChunkRef::Zero => {
                        out.push(0);
                        out.extend_from_slice(&[0; 32]);
                    }
                    ChunkRef::Data(digest) => {
                        out.push(1);
                        out.extend_from_slice(&digest.0);
                    }
                }
            }
        }
        let checksum = blake3::hash(&out);
        out.extend_from_slice(checksum.as_bytes());
        Ok(out)
    }

    /// Decodes and validates a manifest. Never panics, whatever the bytes; never allocates
    /// more than the input's size justifies.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() < MANIFEST_MAGIC.len() || bytes[..8] != MANIFEST_MAGIC {
            return Err(ManifestError::Magic);
        }
        let mut r = Reader { bytes, pos: 8 };
        let version = r.u16()?;
        if version != MANIFEST_VERSION {
            return Err(ManifestError::Version(version));
        }
        let flags = r.u16()?;
        if flags != 0 {
            return Err(ManifestError::Flags(flags));
        }
        if bytes.len() < CHECKSUM_LEN + 12 {
            return Err(ManifestError::Truncated(bytes.len()));
        }
        let body_len = bytes.len() - CHECKSUM_LEN;
        if blake3::hash(&bytes[..body_len]).as_bytes() != &bytes[body_len..] {
            return Err(ManifestError::Checksum);
        }
        let mut r = Reader {
            bytes: &bytes[..body_len],
            pos: r.pos,
        };
        let created_unix_ms = r.u64()?;
        let host_id = HostId::new(r.str()?)?;
        let point_id = PointId::new(r.str()?)?;
        let disk_count = r.u32()?;
        if disk_count == 0 || disk_count > MAX_DISKS {
            return Err(ManifestError::DiskCount(disk_count));
        }
        let mut disks = Vec::with_capacity(disk_count as usize);
        for _ in 0..disk_count {
            let disk_id = DiskId::new(r.str()?)?;
            let size = r.u64()?;
            let chunk_size = r.u32()?;
            let geometry =
                ChunkGeometry::new(size, chunk_size).map_err(|source| ManifestError::Geometry {
                    disk: disk_id.to_string(),
                    source,
                })?;
            let declared = r.u64()?;
            if declared != geometry.chunk_count() {
                return Err(ManifestError::ChunkCount {
                    disk: disk_id.to_string(),
                    declared,
                    expected: geometry.chunk_count(),
                });
            }
            // Checked before allocating: a lying count cannot make us allocate.
            let need = (declared as usize).checked_mul(ENTRY_LEN);
            if need.is_none_or(|n| n > r.remaining()) {
                return Err(ManifestError::Truncated(bytes.len()));
            }
            let mut chunks = Vec::with_capacity(declared as usize);
            for index in 0..declared {
                let entry = r.take(ENTRY_LEN)?;
                let mut digest = [0u8; 32];
                digest.copy_from_slice(&entry[1..]);
                chunks.push(match entry[0] {
                    0 if digest == [0; 32] => ChunkRef::Zero,
                    1 => ChunkRef::Data(Digest(digest)),
                    _ => {
                        return Err(ManifestError::Entry {
                            disk: disk_id.to_string(),
                            index,
                        });
                    }
                });
            }
            disks.push(DiskManifest {
                disk_id,
                geometry,
                chunks,
            });
        }
        if r.remaining() != 0 {
            return Err(ManifestError::Trailing(r.remaining()));
        }
        let m = Manifest {
            host_id,
            point_id,
            created_unix_ms,
            disks,
        };
        m.validate()?;
        Ok(m)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Ids are at most 64 bytes (validated by their types), so the length fits a u16.
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ManifestError> {
        if self.remaining() < n {
            return Err(ManifestError::Truncated(self.pos));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ManifestError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ManifestError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, ManifestError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ManifestError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn str(&mut self) -> Result<&'a str, ManifestError> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| ManifestError::Utf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Manifest {
        Manifest {
            host_id: HostId::new("web-01").unwrap(),
            point_id: PointId::new("20260101T000000Z-00000001").unwrap(),
            created_unix_ms: 1_767_225_600_000,
            disks: vec![
                DiskManifest {
                    disk_id: DiskId::new("sda").unwrap(),
                    geometry: ChunkGeometry::new(9 << 20, 4 << 20).unwrap(),
                    chunks: vec![
                        ChunkRef::Data(Digest::of(b"a")),
                        ChunkRef::Zero,
                        ChunkRef::Data(Digest::of(b"c")),
                    ],
                },
                DiskManifest {
                    disk_id: DiskId::new("sdb").unwrap(),
                    geometry: ChunkGeometry::new(512, 64 << 10).unwrap(),
                    chunks: vec![ChunkRef::Zero],
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.encode().unwrap();
        assert_eq!(&bytes[..8], b"TERNMFST");
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Manifest::decode(&b).is_err(), "bit {i} flip accepted");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = sample().encode().unwrap();
        for n in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..n]).is_err());
        }
    }

    #[test]
    fn encoder_refuses_inconsistent_manifests() {
        let mut m = sample();
        m.disks[0].chunks.pop();
        assert!(matches!(m.encode(), Err(ManifestError::ChunkCount { .. })));
        let mut m = sample();
        m.disks[1].disk_id = m.disks[0].disk_id.clone();
        assert!(matches!(m.encode(), Err(ManifestError::DuplicateDisk(_))));
    }

    #[test]
    fn lying_chunk_count_with_valid_checksum_is_refused() {
        // A forged manifest with a correct checksum but a huge chunk count.
        let mut body = Vec::new();
        body.extend_from_slice(b"TERNMFST");
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        put_str(&mut body, "web-01");
        put_str(&mut body, "p1");
        body.extend_from_slice(&1u32.to_le_bytes());
        put_str(&mut body, "sda");
        body.extend_from_slice(&(1u64 << 50).to_le_bytes());
        body.extend_from_slice(&(64u32 << 10).to_le_bytes());
        body.extend_from_slice(&(1u64 << 34).to_le_bytes());
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        assert!(matches!(
            Manifest::decode(&body),
            Err(ManifestError::Truncated(_))
        ));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn decoding_arbitrary_bytes_after_magic_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = MANIFEST_MAGIC.to_vec();
            b.extend_from_slice(&1u16.to_le_bytes());
            b.extend_from_slice(&0u16.to_le_bytes());
            b.extend_from_slice(&bytes);
            // Re-seal so the checksum passes and the structure parser is exercised.
            let sum = blake3::hash(&b);
            b.extend_from_slice(sum.as_bytes());
            let _ = Manifest::decode(&b);
        }
    }
}
