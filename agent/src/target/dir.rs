//! A local directory as a target (`--target dir:/path`): quick local copies and tests.
//!
//! ```text
//! {dir}/{host}/volumes/{disk}.img          the volumes: sparse files written at offsets
//! {dir}/{host}/landed/{disk}               landed records since the last point (48 bytes each,
//!                                          the gateway's `GET landed/{disk}` format)
//! {dir}/{host}/open-sync                   JSON {"sync": id, "plan": SyncPlan}
//! {dir}/{host}/latest                      the latest point's id
//! {dir}/{host}/points/{point}/{disk}.img   each point's disks (reflink or sparse copy)
//! {dir}/{host}/points/{point}/manifest     the point's manifest; the point exists once it does
//! ```
//!
//! Like the gateway, writes are recorded in batches: the volumes are fdatasync'ed before their
//! records are appended (and the record file fdatasync'ed), so a record never names data that is
//! not durable. Before each write, a write-ahead record whose digest matches nothing is
//! appended (durably) at the extent's offset; the real record replaces it (records are read
//! back one per offset, the last one). A crash between the write and its real record thus
//! leaves a record that makes the agent send the extent again, even if the source went back to
//! what the last point held. Commit: flush, fdatasync the volumes, clone each volume into the point's
//! directory, write the manifest atomically, then `latest`, then clear the landed records and
//! the open sync.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use rustix::fs::{FallocateFlags, fallocate};
use serde::{Deserialize, Serialize};
use tern_core::protocol::{DiskState, HostState, LandedExtent, LandedKind, PointSummary, SyncPlan};
use tern_core::{Digest, DiskId, HostId, Manifest, PointId};

use super::{ErrorKind, PointEntry, Target, TargetError};
use crate::state::{sync_parent, write_atomic};

/// The digest of a write-ahead record: matches no data (a BLAKE3 output of all ones is not
/// expected to ever occur), so the agent resends what such a record covers.
const WRITING: Digest = tern_core::protocol::UNKNOWN_DIGEST;

/// Landed records are flushed after this many, or when this much time has passed.
const BATCH_MAX: usize = 256;
const BATCH_AGE: Duration = Duration::from_millis(500);

/// A local directory holding one host's volumes and points.
#[derive(Debug, Clone)]
pub struct DirTarget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    host: HostId,
    root: PathBuf,
    locked: Mutex<Locked>,
}

#[derive(Debug, Default)]
struct Locked {
    open: Option<OpenSync>,
    open_loaded: bool,
    volumes: HashMap<DiskId, Arc<File>>,
    pending: Vec<(DiskId, LandedExtent)>,
    oldest_pending: Option<Instant>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenSync {
    /// The open sync.
    sync: PointId,
    /// Its plan.
    plan: SyncPlan,
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> TargetError {
    let op = op.into();
    move |e| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Permanent
        };
        TargetError::new(op, kind, e)
    }
}

fn refused(op: impl Into<String>, why: impl Into<String>) -> TargetError {
    TargetError::new(op, ErrorKind::Permanent, why.into())
}

impl DirTarget {
    /// The target directory `root` for `host` (created on first use).
    pub fn new(root: impl Into<PathBuf>, host: HostId) -> Self {
        let root = root.into().join(host.as_str());
        Self {
            inner: Arc::new(Inner {
                host,
                root,
                locked: Mutex::new(Locked::default()),
            }),
        }
    }

    /// `{dir}/{host}`.
    pub fn host_dir(&self) -> &Path {
        &self.inner.root
    }

    /// The volume file of `disk`.
    pub fn volume_path(&self, disk: &DiskId) -> PathBuf {
        self.inner.volume_path(disk)
    }

    /// The image of `disk` in `point`.
    pub fn point_image_path(&self, point: &PointId, disk: &DiskId) -> PathBuf {
        self.inner.point_dir(point).join(format!("{disk}.img"))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, TargetError> + Send + 'static,
    ) -> Result<T, TargetError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| TargetError::new("run a directory-target task", ErrorKind::Permanent, e))?
    }
}

impl Inner {
    fn volume_path(&self, disk: &DiskId) -> PathBuf {
        self.root.join("volumes").join(format!("{disk}.img"))
    }
    fn landed_path(&self, disk: &DiskId) -> PathBuf {
        self.root.join("landed").join(disk.as_str())
    }
    fn open_sync_path(&self) -> PathBuf {
        self.root.join("open-sync")
    }
    fn latest_path(&self) -> PathBuf {
        self.root.join("latest")
    }
    fn points_dir(&self) -> PathBuf {
        self.root.join("points")
    }
    fn point_dir(&self, point: &PointId) -> PathBuf {
        self.points_dir().join(point.as_str())
    }

    fn lock(&self) -> Result<MutexGuard<'_, Locked>, TargetError> {
        let mut l = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        if !l.open_loaded {
            let path = self.open_sync_path();
            l.open = match std::fs::read(&path) {
                Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
                    TargetError::new(format!("parse {}", path.display()), ErrorKind::Permanent, e)
                })?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(io(format!("read {}", path.display()))(e)),
            };
            l.open_loaded = true;
        }
        Ok(l)
    }

    fn volume(&self, l: &mut Locked, disk: &DiskId) -> Result<Arc<File>, TargetError> {
        if let Some(f) = l.volumes.get(disk) {
            return Ok(f.clone());
        }
        let path = self.volume_path(disk);
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io(format!("open {}", path.display())))?,
        );
        l.volumes.insert(disk.clone(), f.clone());
        Ok(f)
    }

    /// Makes every pending write durable, then records it.
    fn flush(&self, l: &mut Locked) -> Result<(), TargetError> {
        if l.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut l.pending);
        l.oldest_pending = None;
        let mut by_disk: HashMap<DiskId, Vec<u8>> = HashMap::new();
        for (disk, rec) in &pending {
            rec.encode(by_disk.entry(disk.clone()).or_default());
        }
        for (disk, records) in by_disk {
            let vol = self.volume(l, &disk)?;
            vol.sync_data()
                .map_err(io(format!("fdatasync the volume of {disk}")))?;
            self.append_landed(&disk, &records)?;
        }
        Ok(())
    }

    /// Appends encoded records to `disk`'s landed file, durably.
    fn append_landed(&self, disk: &DiskId, records: &[u8]) -> Result<(), TargetError> {
        let path = self.landed_path(disk);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(format!("open {}", path.display())))?;
        f.write_all(records)
            .map_err(io(format!("append to {}", path.display())))?;
        f.sync_data().map_err(io(format!("fdatasync {}", path.display())))
    }

    /// Before an extent is written: durably records it as *being written* (a record whose
    /// digest matches no data), so that a crash between the write and its real record leaves a
    /// record that makes the agent send the extent again. A pending record at the same offset
    /// is dropped: its data is being overwritten.
    fn write_ahead(&self, l: &mut Locked, disk: &DiskId, offset: u64, len: u64) -> Result<(), TargetError> {
        l.pending.retain(|(d, r)| !(d == disk && r.offset == offset));
        let mut rec = Vec::with_capacity(48);
        // Extents lie inside one chunk (checked before), so the length fits.
        LandedExtent {
            offset,
            len: len as u32,
            kind: LandedKind::Data(WRITING),
        }
        .encode(&mut rec);
        self.append_landed(disk, &rec)
    }

    fn record(&self, l: &mut Locked, disk: &DiskId, rec: LandedExtent) -> Result<(), TargetError> {
        l.pending.push((disk.clone(), rec));
        let oldest = *l.oldest_pending.get_or_insert_with(Instant::now);
        if l.pending.len() >= BATCH_MAX || oldest.elapsed() >= BATCH_AGE {
            self.flush(l)?;
        }
        Ok(())
    }

    /// Checks that `sync` is open and the extent is valid for `disk`.
    fn check_put(
        &self,
        l: &Locked,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        len: u64,
    ) -> Result<(), TargetError> {
        let op = || format!("write {len} bytes at {offset} of disk {disk}");
        let open = l
            .open
            .as_ref()
            .filter(|o| &o.sync == sync)
            .ok_or_else(|| refused(op(), format!("sync {sync} is not open")))?;
        let planned = open
            .plan
            .disks
            .iter()
            .find(|d| &d.id == disk)
            .ok_or_else(|| refused(op(), format!("disk {disk} is not in the plan of sync {sync}")))?;
        planned
            .geometry
            .check_extent(offset, len)
            .map_err(|e| TargetError::new(op(), ErrorKind::Permanent, e))?;
        Ok(())
    }

    fn put_extent(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        body: &[u8],
        digest: Digest,
    ) -> Result<(), TargetError> {
        let mut l = self.lock()?;
        self.check_put(&l, sync, disk, offset, body.len() as u64)?;
        if Digest::of(body) != digest {
            return Err(refused(
                format!("write {} bytes at {offset} of disk {disk}", body.len()),
                "the body does not match its digest",
            ));
        }
        let vol = self.volume(&mut l, disk)?;
        self.write_ahead(&mut l, disk, offset, body.len() as u64)?;
        // Written without the lock (writes run in parallel); recorded after, so the next flush's
        // fdatasync covers it.
        drop(l);
        vol.write_all_at(body, offset)
            .map_err(io(format!("write at {offset} of the volume of {disk}")))?;
        let rec = LandedExtent {
            offset,
            len: body.len() as u32,
            kind: LandedKind::Data(digest),
        };
        let mut l = self.lock()?;
        self.record(&mut l, disk, rec)
    }

    fn put_zero(&self, sync: &PointId, disk: &DiskId, offset: u64, len: u64) -> Result<(), TargetError> {
        let mut l = self.lock()?;
        self.check_put(&l, sync, disk, offset, len)?;
        let vol = self.volume(&mut l, disk)?;
        self.write_ahead(&mut l, disk, offset, len)?;
        let op = || format!("zero {len} bytes at {offset} of the volume of {disk}");
        match fallocate(
            &*vol,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => {}
            Err(rustix::io::Errno::OPNOTSUPP) => {
                let zeros = vec![0u8; len as usize];
                vol.write_all_at(&zeros, offset).map_err(io(op()))?;
            }
            Err(e) => return Err(io(op())(e.into())),
        }
        // Extents lie inside one chunk (checked above), so the length fits.
        let rec = LandedExtent {
            offset,
            len: len as u32,
            kind: LandedKind::Zero,
        };
        self.record(&mut l, disk, rec)
    }

    fn begin(&self, sync: &PointId, plan: &SyncPlan) -> Result<(), TargetError> {
        let op = format!("begin sync {sync}");
        if plan.disks.is_empty() {
            return Err(refused(op, "the plan has no disks"));
        }
        let mut l = self.lock()?;
        self.flush(&mut l)?;
        let vols = self.root.join("volumes");
        std::fs::create_dir_all(&vols).map_err(io(format!("create {}", vols.display())))?;
        for d in &plan.disks {
            if plan.disks.iter().filter(|x| x.id == d.id).count() > 1 {
                return Err(refused(op, format!("the plan names disk {} twice", d.id)));
            }
            let path = self.volume_path(&d.id);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io(format!("create {}", path.display())))?;
            let len = f
                .metadata()
                .map_err(io(format!("stat {}", path.display())))?
                .len();
            let size = d.geometry.size();
            if len > size {
                return Err(refused(
                    op,
                    format!("disk {} shrank from {len} to {size} bytes", d.id),
                ));
            }
            if len < size {
                f.set_len(size).map_err(io(format!("grow {}", path.display())))?;
                f.sync_all().map_err(io(format!("fsync {}", path.display())))?;
            }
            l.volumes.insert(d.id.clone(), Arc::new(f));
        }
        sync_parent(&self.volume_path(&plan.disks[0].id)).map_err(io(format!("fsync {}", vols.display())))?;
        let open = OpenSync {
            sync: sync.clone(),
            plan: plan.clone(),
        };
        let json = serde_json::to_vec_pretty(&open)
            .map_err(|e| TargetError::new(op.clone(), ErrorKind::Permanent, e))?;
        write_atomic(&self.open_sync_path(), &json).map_err(io(op))?;
        l.open = Some(open);
        Ok(())
    }

    fn landed(&self, disk: &DiskId) -> Result<Vec<LandedExtent>, TargetError> {
        let mut l = self.lock()?;
        self.flush(&mut l)?;
        let path = self.landed_path(disk);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("read {}", path.display()))(e)),
        };
        let records = LandedExtent::decode_all(&bytes)
            .map_err(|e| TargetError::new(format!("read {}", path.display()), ErrorKind::Permanent, e))?;
        // Like the gateway: one record per offset, the last one recorded.
        let by_offset: std::collections::BTreeMap<u64, LandedExtent> =
            records.into_iter().map(|r| (r.offset, r)).collect();
        Ok(by_offset.into_values().collect())
    }

    fn read_manifest(&self, point: &PointId) -> Result<Option<Vec<u8>>, TargetError> {
        let path = self.point_dir(point).join("manifest");
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(format!("read {}", path.display()))(e)),
        }
    }

    fn commit(&self, sync: &PointId, manifest: &Manifest) -> Result<(), TargetError> {
        let op = format!("commit sync {sync}");
        let bytes = manifest
            .encode()
            .map_err(|e| TargetError::new(op.clone(), ErrorKind::Permanent, e))?;
        let mut l = self.lock()?;
        match self.read_manifest(sync)? {
            Some(existing) if existing == bytes => {}
            Some(_) => {
                return Err(refused(op, format!("point {sync} exists with another manifest")));
            }
            None => {
                let open = l
                    .open
                    .clone()
                    .filter(|o| &o.sync == sync)
                    .ok_or_else(|| refused(op.clone(), format!("sync {sync} is not open")))?;
                if manifest.host_id != self.host || &manifest.point_id != sync {
                    return Err(refused(op, "the manifest names another host or point"));
                }
                let same = manifest.disks.len() == open.plan.disks.len()
                    && manifest
                        .disks
                        .iter()
                        .zip(&open.plan.disks)
                        .all(|(m, p)| m.disk_id == p.id && m.geometry == p.geometry);
                if !same {
                    return Err(refused(op, "the manifest's disks are not the sync plan's"));
                }
                self.flush(&mut l)?;
                let dir = self.point_dir(sync);
                std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
                for d in &open.plan.disks {
                    let vol = self.volume(&mut l, &d.id)?;
                    vol.sync_data()
                        .map_err(io(format!("fdatasync the volume of {}", d.id)))?;
                    let dst = dir.join(format!("{}.img", d.id));
                    if dst.exists() {
                        std::fs::remove_file(&dst).map_err(io(format!("remove {}", dst.display())))?;
                    }
                    let method = tern_core::io::clone_file(&self.volume_path(&d.id), &dst).map_err(|e| {
                        TargetError::new(
                            format!("copy the volume of {} into point {sync}", d.id),
                            ErrorKind::Permanent,
                            e,
                        )
                    })?;
                    tracing::debug!(disk = %d.id, ?method, "volume copied into the point");
                }
                write_atomic(&dir.join("manifest"), &bytes)
                    .map_err(io(format!("write the manifest of {sync}")))?;
                sync_parent(&dir).map_err(io(format!("fsync {}", self.points_dir().display())))?;
            }
        }
        // The point exists. Finish what an interrupted commit may have left undone.
        if l.open.as_ref().is_some_and(|o| &o.sync == sync) {
            write_atomic(&self.latest_path(), format!("{sync}\n").as_bytes())
                .map_err(io("record the latest point"))?;
            l.pending.clear();
            for d in &manifest.disks {
                let path = self.landed_path(&d.disk_id);
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(format!("remove {}", path.display()))(e)),
                }
            }
            let landed_dir = self.root.join("landed");
            if landed_dir.exists() {
                File::open(&landed_dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io(format!("fsync {}", landed_dir.display())))?;
            }
            crate::state::remove_durably(&self.open_sync_path()).map_err(io("close the sync"))?;
            l.open = None;
        }
        Ok(())
    }

    fn latest(&self) -> Result<Option<PointId>, TargetError> {
        match std::fs::read_to_string(self.latest_path()) {
            Ok(t) => PointId::new(t.trim())
                .map(Some)
                .map_err(|e| TargetError::new("read the latest point", ErrorKind::Permanent, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read the latest point")(e)),
        }
    }

    fn get_point(&self, point: &PointId) -> Result<Manifest, TargetError> {
        let op = format!("read point {point}");
        let bytes = self
            .read_manifest(point)?
            .ok_or_else(|| TargetError::new(op.clone(), ErrorKind::NotFound, format!("no point {point}")))?;
        Manifest::decode(&bytes).map_err(|e| TargetError::new(op, ErrorKind::Permanent, e))
    }

    fn state(&self) -> Result<HostState, TargetError> {
        let open = self.lock()?.open.clone();
        let latest = match self.latest()? {
            Some(id) => Some(self.get_point(&id)?),
            None => None,
        };
        let mut disks: Vec<DiskState> = Vec::new();
        let known = open
            .iter()
            .flat_map(|o| o.plan.disks.iter().map(|d| (d.id.clone(), d.geometry)))
            .chain(
                latest
                    .iter()
                    .flat_map(|m| m.disks.iter().map(|d| (d.disk_id.clone(), d.geometry))),
            );
        for (id, geometry) in known {
            if disks.iter().any(|d| d.id == id) || !self.volume_path(&id).exists() {
                continue;
            }
            disks.push(DiskState {
                volume: self.volume_path(&id).display().to_string(),
                id,
                geometry,
            });
        }
        Ok(HostState {
            host: self.host.clone(),
            open_sync: open.map(|o| o.sync),
            latest_point: latest.map(|m| PointSummary {
                id: m.point_id,
                created_unix_ms: m.created_unix_ms,
            }),
            disks,
        })
    }

    fn list_points(&self) -> Result<Vec<PointEntry>, TargetError> {
        let dir = self.points_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("list {}", dir.display()))(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(format!("list {}", dir.display())))?;
            let Some(id) = entry.file_name().to_str().and_then(|n| PointId::new(n).ok()) else {
                continue;
            };
            let Ok(meta) = std::fs::metadata(entry.path().join("manifest")) else {
                continue;
            };
            let modified_unix_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            out.push(PointEntry {
                id,
                manifest_len: meta.len(),
                modified_unix_ms,
            });
        }
        out.sort_by(|a, b| (a.modified_unix_ms, &a.id).cmp(&(b.modified_unix_ms, &b.id)));
        Ok(out)
    }
}

impl Target for DirTarget {
    fn describe(&self) -> String {
        format!("dir:{}", self.inner.root.display())
    }

    async fn state(&self) -> Result<HostState, TargetError> {
        self.blocking(|i| i.state()).await
    }

    async fn begin(&self, sync: &PointId, plan: &SyncPlan) -> Result<(), TargetError> {
        let (sync, plan) = (sync.clone(), plan.clone());
        self.blocking(move |i| i.begin(&sync, &plan)).await
    }

    async fn landed(&self, disk: &DiskId) -> Result<Vec<LandedExtent>, TargetError> {
        let disk = disk.clone();
        self.blocking(move |i| i.landed(&disk)).await
    }

    async fn put_extent(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        body: Bytes,
        digest: Digest,
    ) -> Result<(), TargetError> {
        let (sync, disk) = (sync.clone(), disk.clone());
        self.blocking(move |i| i.put_extent(&sync, &disk, offset, &body, digest))
            .await
    }

    async fn put_zero(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        len: u64,
    ) -> Result<(), TargetError> {
        let (sync, disk) = (sync.clone(), disk.clone());
        self.blocking(move |i| i.put_zero(&sync, &disk, offset, len))
            .await
    }

    async fn commit(&self, sync: &PointId, manifest: &Manifest) -> Result<(), TargetError> {
        let (sync, manifest) = (sync.clone(), manifest.clone());
        self.blocking(move |i| i.commit(&sync, &manifest)).await
    }

    async fn get_point(&self, point: &PointId) -> Result<Manifest, TargetError> {
        let point = point.clone();
        self.blocking(move |i| i.get_point(&point)).await
    }

    async fn list_points(&self) -> Result<Vec<PointEntry>, TargetError> {
        self.blocking(|i| i.list_points()).await
    }
}
