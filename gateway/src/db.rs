//! The gateway's metadata DB (redb): access keys, hosts, recovery points, manifests and the
//! durable record of landed extents. Every write is one transaction, durable on commit.
//!
//! Tables (values are JSON unless noted):
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | raw bytes (admin token hash) |
//! | `keys` | access key id | [`KeyRecord`] |
//! | `hosts` | host id | [`HostRecord`] |
//! | `points` | (host, point) | [`PointRecord`] |
//! | `manifests` | (host, point) | manifest bytes (`docs/formats.md`) |
//! | `landed` | (host, disk, offset) | 37 bytes: len u32 LE, kind u8 (0 data, 1 zero), digest |
//! | `object_points`, `object_manifests` | (host, point) | object-mode index (`objects.rs`) |
//! | `recoveries` | recovery id | `recovery::RecoveryRecord` (never a secret) |

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tern_core::protocol::{DiskState, LandedExtent, LandedKind, PointSummary, SyncPlan, UNKNOWN_DIGEST};
use tern_core::{Digest, DiskId, HostId, PointId};

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const KEYS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("keys");
const HOSTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("hosts");
const POINTS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("points");
const MANIFESTS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("manifests");
const LANDED: TableDefinition<'_, (&str, &str, u64), &[u8]> = TableDefinition::new("landed");
/// Object mode: (host, point) → JSON [`ObjectPointRecord`], rebuilt from the bucket at will.
const OBJECT_POINTS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("object_points");
/// Object mode: (host, point) → the manifest as found in the bucket.
const OBJECT_MANIFESTS: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("object_manifests");
/// Boot-in-Cloud: recovery id → JSON `recovery::RecoveryRecord`, written after every transition.
const RECOVERIES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("recoveries");

/// An object-mode point the gateway found in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectPointRecord {
    /// Creation time from the manifest, Unix ms.
    pub created_unix_ms: u64,
    /// When the manifest object was written (server clock), Unix ms.
    pub stored_unix_ms: u64,
    /// Per disk: id, size, chunks, data chunks.
    pub disks: Vec<ObjectDiskRecord>,
}

/// A disk of an object-mode point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectDiskRecord {
    /// Disk id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
    /// Chunks.
    pub chunks: u64,
    /// Non-zero chunks.
    pub data_chunks: u64,
}

/// A metadata DB failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("metadata DB")]
    Redb(#[from] redb::Error),
    #[error("metadata DB record {0} is corrupted")]
    Corrupt(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self {
                DbError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// An access key as stored: the secret only sealed (see `secrets.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// Hosts this key may touch.
    pub hosts: Vec<HostId>,
    /// Nonce + AES-256-GCM ciphertext of the secret, hex.
    pub sealed_secret: String,
    /// Creation time, Unix ms.
    pub created_unix_ms: u64,
}

/// The sync a host has open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenSync {
    /// Sync (future point) id.
    pub id: PointId,
    /// The disks it covers.
    pub plan: SyncPlan,
    /// When it was (last) begun, Unix ms.
    pub begun_unix_ms: u64,
}

/// A protected host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    /// Disks and their volumes.
    pub disks: Vec<DiskState>,
    /// The open sync, if any.
    pub open_sync: Option<OpenSync>,
    /// The latest committed point.
    pub latest_point: Option<PointSummary>,
}

/// A committed recovery point.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointRecord {
    /// Creation time from the manifest, Unix ms.
    pub created_unix_ms: u64,
    /// When the gateway committed it, Unix ms.
    pub committed_unix_ms: u64,
    /// One provider snapshot per disk.
    pub snapshots: Vec<SnapshotRef>,
    /// Manifest length in bytes.
    pub manifest_len: u64,
}

/// The snapshot of one disk in a point.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    /// The disk.
    pub disk: DiskId,
    /// The provider's snapshot id.
    pub snapshot: String,
}

/// A landed extent to record, with its host and disk.
#[derive(Debug, Clone)]
pub struct LandedRecord {
    /// Host.
    pub host: HostId,
    /// Disk.
    pub disk: DiskId,
    /// The extent.
    pub extent: LandedExtent,
}

fn encode_landed(e: &LandedExtent) -> [u8; 37] {
    let mut v = [0u8; 37];
    v[..4].copy_from_slice(&e.len.to_le_bytes());
    if let LandedKind::Data(d) = e.kind {
        v[5..].copy_from_slice(&d.0);
    } else {
        v[4] = 1;
    }
    v
}

fn decode_landed(offset: u64, v: &[u8]) -> Result<LandedExtent, DbError> {
    if v.len() != 37 {
        return Err(DbError::Corrupt(format!("landed extent at {offset}")));
    }
    let mut l = [0u8; 4];
    l.copy_from_slice(&v[..4]);
    let mut d = [0u8; 32];
    d.copy_from_slice(&v[5..]);
    let kind = match v[4] {
        0 => LandedKind::Data(Digest(d)),
        1 => LandedKind::Zero,
        _ => return Err(DbError::Corrupt(format!("landed extent at {offset}"))),
    };
    Ok(LandedExtent {
        offset,
        len: u32::from_le_bytes(l),
        kind,
    })
}

fn json<T: for<'de> Deserialize<'de>>(what: &str, v: &[u8]) -> Result<T, DbError> {
    serde_json::from_slice(v).map_err(|_| DbError::Corrupt(what.to_owned()))
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs to a Vec cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// The metadata DB. Cheap to clone.
#[derive(Debug, Clone)]
pub struct MetaDb {
    db: Arc<Database>,
}

impl MetaDb {
    /// Opens (or creates) the DB at `path` and makes sure every table exists.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(META)?;
        tx.open_table(KEYS)?;
        tx.open_table(HOSTS)?;
        tx.open_table(POINTS)?;
        tx.open_table(MANIFESTS)?;
        tx.open_table(LANDED)?;
        tx.open_table(OBJECT_POINTS)?;
        tx.open_table(OBJECT_MANIFESTS)?;
        tx.open_table(RECOVERIES)?;
        tx.commit()?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Stores a recovery's record (JSON, no secrets).
    pub fn put_recovery(&self, id: &str, record: &[u8]) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        tx.open_table(RECOVERIES)?.insert(id, record)?;
        tx.commit()?;
        Ok(())
    }

    /// A recovery's record.
    pub fn recovery(&self, id: &str) -> Result<Option<Vec<u8>>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RECOVERIES)?;
        Ok(t.get(id)?.map(|v| v.value().to_vec()))
    }

    /// Every recovery's record, by id.
    pub fn recoveries(&self) -> Result<Vec<(String, Vec<u8>)>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(RECOVERIES)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((k.value().to_owned(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Forgets a recovery.
    pub fn delete_recovery(&self, id: &str) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        tx.open_table(RECOVERIES)?.remove(id)?;
        tx.commit()?;
        Ok(())
    }

    /// Records an object-mode point and its manifest.
    pub fn put_object_point(
        &self,
        host: &HostId,
        point: &PointId,
        rec: &ObjectPointRecord,
        manifest: &[u8],
    ) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        {
            let key = (host.as_str(), point.as_str());
            tx.open_table(OBJECT_POINTS)?
                .insert(key, to_json(rec).as_slice())?;
            tx.open_table(OBJECT_MANIFESTS)?.insert(key, manifest)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets an object-mode point (pruned from the bucket).
    pub fn delete_object_point(&self, host: &HostId, point: &PointId) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        {
            let key = (host.as_str(), point.as_str());
            tx.open_table(OBJECT_POINTS)?.remove(key)?;
            tx.open_table(OBJECT_MANIFESTS)?.remove(key)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every object-mode point, by host then point.
    pub fn object_points(&self) -> Result<Vec<(HostId, PointId, ObjectPointRecord)>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OBJECT_POINTS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let (h, p) = k.value();
            let host = HostId::new(h).map_err(|_| DbError::Corrupt(format!("object point host {h:?}")))?;
            let point = PointId::new(p).map_err(|_| DbError::Corrupt(format!("object point id {p:?}")))?;
            out.push((host, point, json("object point", v.value())?));
        }
        Ok(out)
    }

    /// A raw value of the `meta` table.
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(META)?;
        Ok(t.get(name)?.map(|v| v.value().to_vec()))
    }

    /// Sets a raw value of the `meta` table.
    pub fn set_meta(&self, name: &str, value: &[u8]) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        tx.open_table(META)?.insert(name, value)?;
        tx.commit()?;
        Ok(())
    }

    /// Stores an access key and registers its hosts.
    pub fn insert_key(&self, id: &str, rec: &KeyRecord) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        {
            tx.open_table(KEYS)?.insert(id, to_json(rec).as_slice())?;
            let mut hosts = tx.open_table(HOSTS)?;
            for h in &rec.hosts {
                if hosts.get(h.as_str())?.is_none() {
                    hosts.insert(h.as_str(), to_json(&HostRecord::default()).as_slice())?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// An access key.
    pub fn key(&self, id: &str) -> Result<Option<KeyRecord>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(KEYS)?;
        t.get(id)?
            .map(|v| json(&format!("key {id}"), v.value()))
            .transpose()
    }

    /// All access keys.
    pub fn keys(&self) -> Result<Vec<(String, KeyRecord)>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(KEYS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            out.push((
                k.value().to_owned(),
                json(&format!("key {}", k.value()), v.value())?,
            ));
        }
        Ok(out)
    }

    /// Deletes an access key; returns whether it existed.
    pub fn delete_key(&self, id: &str) -> Result<bool, DbError> {
        let tx = self.db.begin_write()?;
        let existed = tx.open_table(KEYS)?.remove(id)?.is_some();
        tx.commit()?;
        Ok(existed)
    }

    /// A host.
    pub fn host(&self, host: &HostId) -> Result<Option<HostRecord>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HOSTS)?;
        t.get(host.as_str())?
            .map(|v| json(&format!("host {host}"), v.value()))
            .transpose()
    }

    /// All hosts.
    pub fn hosts(&self) -> Result<Vec<(HostId, HostRecord)>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HOSTS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let id =
                HostId::new(k.value()).map_err(|_| DbError::Corrupt(format!("host id {}", k.value())))?;
            out.push((id, json(&format!("host {}", k.value()), v.value())?));
        }
        Ok(out)
    }

    /// Replaces a host record.
    pub fn put_host(&self, host: &HostId, rec: &HostRecord) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        tx.open_table(HOSTS)?
            .insert(host.as_str(), to_json(rec).as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Records a batch of landed extents in one transaction. A new extent replaces the
    /// records it fully covers.
    pub fn record_landed(&self, batch: &[LandedRecord]) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(LANDED)?;
            for r in batch {
                let (h, d) = (r.host.as_str(), r.disk.as_str());
                let start = r.extent.offset;
                let end = start + u64::from(r.extent.len);
                let mut covered = Vec::new();
                let mut tail = None;
                for item in t.range((h, d, start)..(h, d, end))? {
                    let (k, v) = item?;
                    let off = k.value().2;
                    let old = decode_landed(off, v.value())?;
                    let old_end = off + u64::from(old.len);
                    if old_end <= end {
                        covered.push(off);
                    } else if off == start {
                        // Same key, longer old extent: the new record replaces it, so the rest of
                        // the old extent keeps a record, of unknown content.
                        tail = Some(LandedExtent {
                            offset: end,
                            len: (old_end - end) as u32,
                            kind: LandedKind::Data(UNKNOWN_DIGEST),
                        });
                    }
                }
                for off in covered {
                    t.remove((h, d, off))?;
                }
                if let Some(tail) = tail {
                    t.insert((h, d, tail.offset), encode_landed(&tail).as_slice())?;
                }
                t.insert((h, d, start), encode_landed(&r.extent).as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The landed extents of a disk, by offset.
    pub fn landed(&self, host: &HostId, disk: &DiskId) -> Result<Vec<LandedExtent>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(LANDED)?;
        let (h, d) = (host.as_str(), disk.as_str());
        let mut out = Vec::new();
        for item in t.range((h, d, 0)..=(h, d, u64::MAX))? {
            let (k, v) = item?;
            out.push(decode_landed(k.value().2, v.value())?);
        }
        Ok(out)
    }

    /// Commits a recovery point: stores its record and manifest, updates the host and clears
    /// the host's landed extents, all in one transaction.
    pub fn commit_point(
        &self,
        host: &HostId,
        point: &PointId,
        rec: &PointRecord,
        manifest: &[u8],
        host_rec: &HostRecord,
    ) -> Result<(), DbError> {
        let tx = self.db.begin_write()?;
        {
            let key = (host.as_str(), point.as_str());
            tx.open_table(POINTS)?.insert(key, to_json(rec).as_slice())?;
            tx.open_table(MANIFESTS)?.insert(key, manifest)?;
            tx.open_table(HOSTS)?
                .insert(host.as_str(), to_json(host_rec).as_slice())?;
            let mut landed = tx.open_table(LANDED)?;
            let h = host.as_str();
            let keys: Vec<(String, u64)> = landed
                .range((h, "", 0)..=(h, "\u{10ffff}", u64::MAX))?
                .map(|item| item.map(|(k, _)| (k.value().1.to_owned(), k.value().2)))
                .collect::<Result<_, _>>()?;
            for (d, off) in keys {
                landed.remove((h, d.as_str(), off))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The points of a host, oldest first.
    pub fn points(&self, host: &HostId) -> Result<Vec<(PointId, PointRecord)>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(POINTS)?;
        let h = host.as_str();
        let mut out = Vec::new();
        for item in t.range((h, "")..=(h, "\u{10ffff}"))? {
            let (k, v) = item?;
            let id = PointId::new(k.value().1)
                .map_err(|_| DbError::Corrupt(format!("point id {}", k.value().1)))?;
            out.push((
                id,
                json::<PointRecord>(&format!("point {h}/{}", k.value().1), v.value())?,
            ));
        }
        out.sort_by_key(|(id, r)| (r.created_unix_ms, id.clone()));
        Ok(out)
    }

    /// A point record.
    pub fn point(&self, host: &HostId, point: &PointId) -> Result<Option<PointRecord>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(POINTS)?;
        t.get((host.as_str(), point.as_str()))?
            .map(|v| json(&format!("point {host}/{point}"), v.value()))
            .transpose()
    }

    /// A point's manifest bytes.
    pub fn manifest(&self, host: &HostId, point: &PointId) -> Result<Option<Vec<u8>>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(MANIFESTS)?;
        Ok(t.get((host.as_str(), point.as_str()))?
            .map(|v| v.value().to_vec()))
    }

    /// Every snapshot id referenced by a point.
    pub fn referenced_snapshots(&self) -> Result<std::collections::HashSet<String>, DbError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(POINTS)?;
        let mut out = std::collections::HashSet::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let rec: PointRecord = json(&format!("point {}/{}", k.value().0, k.value().1), v.value())?;
            out.extend(rec.snapshots.into_iter().map(|s| s.snapshot));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u32, b: u8) -> LandedExtent {
        LandedExtent {
            offset,
            len,
            kind: LandedKind::Data(Digest([b; 32])),
        }
    }

    #[test]
    fn landed_records_replace_covered_ones_and_clear_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::open(&dir.path().join("meta.redb")).unwrap();
        let h = HostId::new("web-01").unwrap();
        let d = DiskId::new("sda").unwrap();
        let rec = |e| LandedRecord {
            host: h.clone(),
            disk: d.clone(),
            extent: e,
        };
        db.record_landed(&[
            rec(ext(0, 4096, 1)),
            rec(ext(4096, 4096, 2)),
            rec(ext(65536, 4096, 3)),
        ])
        .unwrap();
        // Covers the first two, not the third.
        db.record_landed(&[rec(LandedExtent {
            offset: 0,
            len: 8192,
            kind: LandedKind::Zero,
        })])
        .unwrap();
        let got = db.landed(&h, &d).unwrap();
        assert_eq!(
            got,
            vec![
                LandedExtent {
                    offset: 0,
                    len: 8192,
                    kind: LandedKind::Zero
                },
                ext(65536, 4096, 3)
            ]
        );
        // A shorter extent at the same offset keeps the old tail recorded as unknown.
        db.record_landed(&[rec(ext(1 << 20, 16384, 4))]).unwrap();
        db.record_landed(&[rec(ext(1 << 20, 4096, 5))]).unwrap();
        let got = db.landed(&h, &d).unwrap();
        assert_eq!(
            got[2..],
            [
                ext(1 << 20, 4096, 5),
                LandedExtent {
                    offset: (1 << 20) + 4096,
                    len: 12288,
                    kind: LandedKind::Data(UNKNOWN_DIGEST)
                }
            ]
        );
        let p = PointId::new("p1").unwrap();
        let pr = PointRecord {
            created_unix_ms: 1,
            committed_unix_ms: 2,
            snapshots: vec![],
            manifest_len: 3,
        };
        db.commit_point(&h, &p, &pr, b"abc", &HostRecord::default())
            .unwrap();
        assert!(db.landed(&h, &d).unwrap().is_empty());
        assert_eq!(db.manifest(&h, &p).unwrap().as_deref(), Some(&b"abc"[..]));
        assert_eq!(db.points(&h).unwrap().len(), 1);
    }
}
