//! Wire types of the block-mode protocol between the agent and the gateway, shared by both
//! sides (the request layout is in `docs/protocol.md`).

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::geometry::{BlockLayout, ChunkGeometry, GeometryError};
use crate::ids::{DiskId, HostId, PointId};

/// S3 user-metadata header carrying the BLAKE3 digest (64 hex digits) of an extent's body.
pub const DIGEST_HEADER: &str = "x-amz-meta-tern-digest";
/// S3 user-metadata header of a zero extent: its length in bytes (decimal); the body is empty.
pub const ZERO_HEADER: &str = "x-amz-meta-tern-zero";
/// The metadata keys as S3 clients name them (without the `x-amz-meta-` prefix).
pub const DIGEST_META: &str = "tern-digest";
/// See [`DIGEST_META`].
pub const ZERO_META: &str = "tern-zero";

/// One disk of a sync plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedDisk {
    /// The disk's id inside the host.
    pub id: DiskId,
    /// Size and chunk size of the source disk.
    pub geometry: ChunkGeometry,
}

/// The body of `PUT /{host}/syncs/{sync}/begin`: the disks the sync will cover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncPlan {
    /// The disks, in the order of the manifest.
    pub disks: Vec<PlannedDisk>,
}

/// The latest committed recovery point of a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointSummary {
    /// The point id.
    pub id: PointId,
    /// Creation time, Unix milliseconds.
    pub created_unix_ms: u64,
}

/// A disk as the gateway knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    /// The disk id.
    pub id: DiskId,
    /// Geometry of the disk's volume.
    pub geometry: ChunkGeometry,
    /// The provider's volume id.
    pub volume: String,
}

/// The body of `GET /{host}/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostState {
    /// The host.
    pub host: HostId,
    /// The sync that is open (begun, not committed), if any.
    pub open_sync: Option<PointId>,
    /// The latest committed point, if any.
    pub latest_point: Option<PointSummary>,
    /// The host's disks.
    pub disks: Vec<DiskState>,
}

/// What a landed extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandedKind {
    /// Data whose BLAKE3 digest is recorded.
    Data(Digest),
    /// Zeros.
    Zero,
}

/// An extent written to a volume since the host's last committed point, durably recorded by
/// the gateway. `GET /{host}/landed/{disk}` returns a sequence of these, 48 bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LandedExtent {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes (at most one chunk).
    pub len: u32,
    /// What was written.
    pub kind: LandedKind,
}

/// The digest of a landed record whose content is not known: written as an intent before the
/// data, so that a crash between the write and its real record leaves a record that matches no
/// source content (the agent resends the range) instead of no record at all.
pub const UNKNOWN_DIGEST: Digest = Digest([0xff; 32]);

/// Size of one encoded [`LandedExtent`].
pub const LANDED_RECORD_LEN: usize = 48;

/// Why a landed list could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum LandedError {
    #[error("landed list length {0} is not a multiple of 48")]
    Length(usize),
    #[error("landed record {0} has an unknown kind or non-zero padding")]
    Record(usize),
}

impl LandedExtent {
    /// Encodes to the 48-byte record: offset u64 LE, len u32 LE, kind u8 (0 data, 1 zero),
    /// 3 zero bytes, digest (32 zero bytes for a zero extent).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        let (kind, digest) = match self.kind {
            LandedKind::Data(d) => (0u8, d.0),
            LandedKind::Zero => (1u8, [0u8; 32]),
        };
        out.extend_from_slice(&[kind, 0, 0, 0]);
        out.extend_from_slice(&digest);
    }

    /// Decodes a sequence of records.
    pub fn decode_all(bytes: &[u8]) -> Result<Vec<Self>, LandedError> {
        if !bytes.len().is_multiple_of(LANDED_RECORD_LEN) {
            return Err(LandedError::Length(bytes.len()));
        }
        bytes
            .chunks_exact(LANDED_RECORD_LEN)
            .enumerate()
            .map(|(i, r)| {
                let mut o = [0u8; 8];
                o.copy_from_slice(&r[..8]);
                let mut l = [0u8; 4];
                l.copy_from_slice(&r[8..12]);
                let mut d = [0u8; 32];
                d.copy_from_slice(&r[16..48]);
                if r[13..16] != [0, 0, 0] {
                    return Err(LandedError::Record(i));
                }
                let kind = match r[12] {
                    0 => LandedKind::Data(Digest(d)),
                    1 if d == [0; 32] => LandedKind::Zero,
                    _ => return Err(LandedError::Record(i)),
                };
                Ok(LandedExtent {
                    offset: u64::from_le_bytes(o),
                    len: u32::from_le_bytes(l),
                    kind,
                })
            })
            .collect()
    }
}

/// The object key of an extent inside the host's bucket:
/// `syncs/{sync}/disks/{disk}/{offset as 16 lower-case hex digits}`.
pub fn extent_key(sync: &PointId, disk: &DiskId, offset: u64) -> String {
    format!("syncs/{sync}/disks/{disk}/{offset:016x}")
}

/// The object key of a batch of extents of one disk: `syncs/{sync}/disks/{disk}/batch`. Its
/// body is a batch table ([`encode_batch_table`]) followed by the bodies of its data extents.
pub fn batch_key(sync: &PointId, disk: &DiskId) -> String {
    format!("syncs/{sync}/disks/{disk}/batch")
}

/// First bytes of a batch body.
pub const BATCH_MAGIC: [u8; 4] = *b"TBT1";
/// Length of a batch header: the magic and the extent count (u32 LE).
pub const BATCH_HEADER_LEN: usize = 8;
/// Most extents in one batch.
pub const MAX_BATCH_EXTENTS: usize = 256;
/// Most data bytes in one batch (the bodies of its data extents together).
pub const MAX_BATCH_DATA: u64 = 4 << 20;

/// Why a batch table was refused.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("batch body does not start with the batch magic")]
    Magic,
    #[error("a batch holds 1 to {MAX_BATCH_EXTENTS} extents, not {0}")]
    Count(u32),
    #[error("batch table")]
    Record(#[from] LandedError),
    #[error("batch extent {0} is empty, overlaps the one before it or is out of order")]
    Order(usize),
    #[error("batch extent {0} carries the reserved unknown-content digest")]
    Reserved(usize),
    #[error("batch data is {0} bytes, more than {MAX_BATCH_DATA}")]
    TooMuchData(u64),
}

/// Encodes a batch header and table: [`BATCH_MAGIC`], the count (u32 LE), then one 48-byte
/// landed record per extent, in offset order. The data bodies follow, in table order.
pub fn encode_batch_table(extents: &[LandedExtent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(BATCH_HEADER_LEN + extents.len() * LANDED_RECORD_LEN);
    out.extend_from_slice(&BATCH_MAGIC);
    out.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    for e in extents {
        e.encode(&mut out);
    }
    out
}

/// The extent count of a batch header.
pub fn decode_batch_header(header: &[u8; BATCH_HEADER_LEN]) -> Result<usize, BatchError> {
    if header[..4] != BATCH_MAGIC {
        return Err(BatchError::Magic);
    }
    let count = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    match usize::try_from(count) {
        Ok(n) if (1..=MAX_BATCH_EXTENTS).contains(&n) => Ok(n),
        _ => Err(BatchError::Count(count)),
    }
}

/// Decodes and checks a batch table (the records after the header): extents non-empty, in
/// increasing offset order without overlap, no reserved digest, data within
/// [`MAX_BATCH_DATA`]. Returns the extents and their total data length.
pub fn decode_batch_table(bytes: &[u8]) -> Result<(Vec<LandedExtent>, u64), BatchError> {
    let extents = LandedExtent::decode_all(bytes)?;
    if extents.is_empty() || extents.len() > MAX_BATCH_EXTENTS {
        return Err(BatchError::Count(extents.len() as u32));
    }
    let mut end = 0u64;
    let mut data = 0u64;
    for (i, e) in extents.iter().enumerate() {
        if e.len == 0 || (i > 0 && e.offset < end) {
            return Err(BatchError::Order(i));
        }
        end = e
            .offset
            .checked_add(u64::from(e.len))
            .ok_or(BatchError::Order(i))?;
        if let LandedKind::Data(d) = e.kind {
            if d == UNKNOWN_DIGEST {
                return Err(BatchError::Reserved(i));
            }
            data += u64::from(e.len);
            if data > MAX_BATCH_DATA {
                return Err(BatchError::TooMuchData(data));
            }
        }
    }
    Ok((extents, data))
}

/// The object key that begins a sync.
pub fn begin_key(sync: &PointId) -> String {
    format!("syncs/{sync}/begin")
}

/// The object key that commits a sync (its body is the manifest).
pub fn commit_key(sync: &PointId) -> String {
    format!("syncs/{sync}/commit")
}

/// The object key of a recovery point's manifest.
pub fn point_key(point: &PointId) -> String {
    format!("points/{point}")
}

/// The object key of the landed list of a disk.
pub fn landed_key(disk: &DiskId) -> String {
    format!("landed/{disk}")
}

/// The object key of the host's state.
pub const STATE_KEY: &str = "state";

/// Checks a compare block size against a geometry.
pub fn block_layout(geometry: &ChunkGeometry, block_size: u32) -> Result<BlockLayout, GeometryError> {
    BlockLayout::new(geometry.chunk_size(), block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landed_records_round_trip() {
        let v = vec![
            LandedExtent {
                offset: 1 << 40,
                len: 4096,
                kind: LandedKind::Data(Digest::of(b"x")),
            },
            LandedExtent {
                offset: 0,
                len: 4 << 20,
                kind: LandedKind::Zero,
            },
        ];
        let mut b = Vec::new();
        for e in &v {
            e.encode(&mut b);
        }
        assert_eq!(b.len(), 96);
        assert_eq!(LandedExtent::decode_all(&b).unwrap(), v);
        assert!(LandedExtent::decode_all(&b[..47]).is_err());
        b[12] = 7;
        assert!(LandedExtent::decode_all(&b).is_err());
    }

    #[test]
    fn plan_json_is_strict() {
        let plan: SyncPlan = serde_json::from_str(
            r#"{"disks":[{"id":"sda","geometry":{"size":1048576,"chunk_size":4194304}}]}"#,
        )
        .unwrap();
        assert_eq!(plan.disks[0].geometry.size(), 1 << 20);
        assert!(serde_json::from_str::<SyncPlan>(r#"{"disks":[],"x":1}"#).is_err());
        assert!(
            serde_json::from_str::<SyncPlan>(
                r#"{"disks":[{"id":"sda","geometry":{"size":100,"chunk_size":4194304}}]}"#
            )
            .is_err()
        );
    }

    fn data(offset: u64, len: u32) -> LandedExtent {
        LandedExtent {
            offset,
            len,
            kind: LandedKind::Data(Digest::of(&offset.to_le_bytes())),
        }
    }

    #[test]
    fn batch_tables() {
        let zero = LandedExtent {
            offset: 1 << 20,
            len: 8192,
            kind: LandedKind::Zero,
        };
        let v = vec![data(0, 4096), data(4096, 65536), zero, data(4 << 20, 4096)];
        let b = encode_batch_table(&v);
        let header: [u8; BATCH_HEADER_LEN] = b[..BATCH_HEADER_LEN].try_into().unwrap();
        assert_eq!(decode_batch_header(&header).unwrap(), 4);
        assert_eq!(
            decode_batch_table(&b[BATCH_HEADER_LEN..]).unwrap(),
            (v.clone(), 4096 + 65536 + 4096)
        );
        // Refusals: wrong magic, no or too many extents, overlap, disorder, empty, reserved
        // digest, too much data.
        let mut bad = header;
        bad[0] = b'X';
        assert!(matches!(decode_batch_header(&bad), Err(BatchError::Magic)));
        for n in [0u32, 257, u32::MAX] {
            let mut h = header;
            h[4..].copy_from_slice(&n.to_le_bytes());
            assert!(matches!(decode_batch_header(&h), Err(BatchError::Count(_))));
        }
        let table = |v: &[LandedExtent]| encode_batch_table(v)[BATCH_HEADER_LEN..].to_vec();
        assert!(matches!(decode_batch_table(&[]), Err(BatchError::Count(0))));
        let overlap = [data(0, 8192), data(4096, 4096)];
        assert!(matches!(
            decode_batch_table(&table(&overlap)),
            Err(BatchError::Order(1))
        ));
        let disorder = [data(8192, 4096), data(0, 4096)];
        assert!(matches!(
            decode_batch_table(&table(&disorder)),
            Err(BatchError::Order(1))
        ));
        assert!(matches!(
            decode_batch_table(&table(&[data(0, 0)])),
            Err(BatchError::Order(0))
        ));
        let wrap = [data(u64::MAX - 4095, 8192)];
        assert!(matches!(
            decode_batch_table(&table(&wrap)),
            Err(BatchError::Order(0))
        ));
        let reserved = [LandedExtent {
            offset: 0,
            len: 4096,
            kind: LandedKind::Data(UNKNOWN_DIGEST),
        }];
        assert!(matches!(
            decode_batch_table(&table(&reserved)),
            Err(BatchError::Reserved(0))
        ));
        let big = [data(0, 4 << 20), data(4 << 20, 4096)];
        assert!(matches!(
            decode_batch_table(&table(&big)),
            Err(BatchError::TooMuchData(_))
        ));
        assert!(matches!(
            decode_batch_table(&table(&v)[..47]),
            Err(BatchError::Record(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn batch_tables_decode_only_what_encodes_back(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            if let Ok((extents, _)) = decode_batch_table(&bytes) {
                proptest::prop_assert_eq!(&encode_batch_table(&extents)[BATCH_HEADER_LEN..], &bytes[..]);
            }
            if let Ok(h) = <[u8; BATCH_HEADER_LEN]>::try_from(bytes.get(..BATCH_HEADER_LEN).unwrap_or(&[])) {
                let _ = decode_batch_header(&h);
            }
        }
    }

    #[test]
    fn keys() {
        let s = PointId::new("p1").unwrap();
        let d = DiskId::new("sda").unwrap();
        assert_eq!(extent_key(&s, &d, 4096), "syncs/p1/disks/sda/0000000000001000");
        assert_eq!(batch_key(&s, &d), "syncs/p1/disks/sda/batch");
    }
}
