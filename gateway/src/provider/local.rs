//! The local provider, the embedded default: volumes are sparse (or preallocated) files under
//! `<data_dir>/volumes/`, snapshots are reflinks where the file system has them (xfs, btrfs)
//! and sparse-aware copies otherwise, under `<data_dir>/snapshots/`. "Attach" hands the file
//! to the gateway. Instances are QEMU processes ([`super::qemu`]) defined under
//! `<data_dir>/instances/<name>/`; they outlive the gateway, which finds them again at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern_core::io::clone_file;
use tokio::sync::OnceCell;

use super::qemu::{self, Accel, InstanceFiles, QemuSettings};
use super::{
    CloudProvider, Firmware, InstanceInfo, InstanceSpec, InstanceState, ProviderError, SnapshotInfo,
    VolumeInfo,
};

/// Files under a directory.
#[derive(Debug)]
pub struct LocalProvider {
    volumes: PathBuf,
    snapshots: PathBuf,
    instances: PathBuf,
    preallocate: bool,
    qemu: QemuSettings,
    /// `kvm` or `tcg`, chosen at the first start of an instance.
    accel: OnceCell<&'static str>,
    /// One operation at a time per instance (create, start, stop, delete); operations on
    /// different instances run at once (a stop's grace period holds up no other instance).
    locks: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// `instance.json`: an instance's definition (never its config drive's content).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceRecord {
    version: u32,
    spec: InstanceSpec,
    config_drive: bool,
}

fn check_name(kind: &'static str, name: &str) -> Result<(), ProviderError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ProviderError::Name {
            kind,
            id: name.to_owned(),
        })
    }
}

fn io<'a>(op: &'static str, id: &'a str) -> impl FnOnce(std::io::Error) -> ProviderError + 'a {
    move |source| ProviderError::Io {
        op,
        id: id.to_owned(),
        source,
    }
}

impl LocalProvider {
    /// A provider keeping its files under `root`.
    pub fn new(root: &Path, preallocate: bool) -> Result<Self, ProviderError> {
        // Absolute: an instance's QEMU is recognised by its directory in its command line.
        let root = std::path::absolute(root).map_err(io("resolve directory", "local provider"))?;
        let volumes = root.join("volumes");
        let snapshots = root.join("snapshots");
        let instances = root.join("instances");
        for d in [&volumes, &snapshots, &instances] {
            std::fs::create_dir_all(d).map_err(io("create directory", "local provider"))?;
        }
        Ok(Self {
            volumes,
            snapshots,
            instances,
            preallocate,
            qemu: QemuSettings::default(),
            accel: OnceCell::new(),
            locks: std::sync::Mutex::default(),
        })
    }

    /// Runs instances with these QEMU settings.
    #[must_use]
    pub fn with_qemu(mut self, qemu: QemuSettings) -> Self {
        self.qemu = qemu;
        self
    }

    /// The directory of an instance.
    pub fn instance_dir(&self, name: &str) -> PathBuf {
        self.instances.join(name)
    }

    fn files(&self, name: &str) -> Result<InstanceFiles, ProviderError> {
        check_name("instance", name)?;
        // A QMP socket path must fit in sun_path (108 bytes).
        if name.len() > 64 {
            return Err(ProviderError::Name {
                kind: "instance",
                id: name.to_owned(),
            });
        }
        Ok(InstanceFiles {
            dir: self.instance_dir(name),
        })
    }

    /// The accelerator instances use: `kvm` or `tcg`.
    pub async fn accel(&self) -> &'static str {
        *self
            .accel
            .get_or_init(|| async {
                let chosen = match self.qemu.accel {
                    Accel::Kvm => "kvm",
                    Accel::Tcg => "tcg",
                    Accel::Auto => {
                        let bin = self.qemu.binary.clone();
                        let scratch = self.instances.clone();
                        let works = tokio::task::spawn_blocking(move || qemu::kvm_works(&bin, &scratch))
                            .await
                            .unwrap_or(false);
                        if works { "kvm" } else { "tcg" }
                    }
                };
                tracing::info!(accel = chosen, configured = ?self.qemu.accel, "instance accelerator chosen");
                chosen
            })
            .await
    }

    fn read_record(&self, files: &InstanceFiles) -> Result<Option<InstanceRecord>, ProviderError> {
        let id = files.dir.display().to_string();
        match std::fs::read(files.record()) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ProviderError::Spec {
                    id,
                    reason: format!("instance.json is corrupt: {e}"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ProviderError::Io {
                op: "read instance",
                id,
                source: e,
            }),
        }
    }

    fn info(&self, files: &InstanceFiles, rec: InstanceRecord) -> InstanceInfo {
        InstanceInfo {
            name: rec.spec.name.clone(),
            state: if qemu::running_pid(files).is_some() {
                InstanceState::Running
            } else {
                InstanceState::Stopped
            },
            serial_log: files.serial(),
            spec: rec.spec,
        }
    }

    fn existing_instance(&self, name: &str) -> Result<(InstanceFiles, InstanceRecord), ProviderError> {
        let files = self.files(name)?;
        let rec = self.read_record(&files)?.ok_or_else(|| ProviderError::NotFound {
            kind: "instance",
            id: name.to_owned(),
        })?;
        Ok((files, rec))
    }

    /// The lock of one instance's operations.
    fn instance_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(name.to_owned()).or_default().clone()
    }

    /// The file of a volume.
    pub fn volume_path(&self, id: &str) -> PathBuf {
        self.volumes.join(format!("{id}.img"))
    }

    /// The file of a snapshot.
    pub fn snapshot_path(&self, id: &str) -> PathBuf {
        self.snapshots.join(format!("{id}.img"))
    }

    fn existing(&self, kind: &'static str, path: PathBuf, id: &str) -> Result<PathBuf, ProviderError> {
        check_name(kind, id)?;
        if path.exists() {
            Ok(path)
        } else {
            Err(ProviderError::NotFound {
                kind,
                id: id.to_owned(),
            })
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ProviderError::Io {
            op: "run",
            id: "blocking task".into(),
            source: std::io::Error::other(e),
        })
    })
}

#[async_trait::async_trait]
impl CloudProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, ProviderError> {
        check_name("volume", name)?;
        let path = self.volume_path(name);
        let prealloc = self.preallocate;
        let id = name.to_owned();
        blocking(move || {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io("create volume", &id))?;
            if prealloc {
                rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size).map_err(|e| {
                    ProviderError::Io {
                        op: "preallocate volume",
                        id: id.clone(),
                        source: e.into(),
                    }
                })?;
            }
            f.set_len(size).map_err(io("size volume", &id))?;
            f.sync_all().map_err(io("sync volume", &id))?;
            Ok(VolumeInfo { id, size })
        })
        .await
    }

    async fn resize_volume(&self, id: &str, size: u64) -> Result<(), ProviderError> {
        let path = self.existing("volume", self.volume_path(id), id)?;
        let id = id.to_owned();
        blocking(move || {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io("open volume", &id))?;
            let cur = f.metadata().map_err(io("stat volume", &id))?.len();
            if size < cur {
                return Err(ProviderError::Shrink {
                    id,
                    from: cur,
                    to: size,
                });
            }
            f.set_len(size).map_err(io("grow volume", &id))?;
            f.sync_all().map_err(io("sync volume", &id))
        })
        .await
    }

    async fn attach_volume(&self, id: &str) -> Result<PathBuf, ProviderError> {
        self.existing("volume", self.volume_path(id), id)
    }

    async fn detach_volume(&self, id: &str) -> Result<(), ProviderError> {
        self.existing("volume", self.volume_path(id), id).map(|_| ())
    }

    async fn snapshot_volume(&self, volume_id: &str, name: &str) -> Result<SnapshotInfo, ProviderError> {
        let src = self.existing("volume", self.volume_path(volume_id), volume_id)?;
        check_name("snapshot", name)?;
        let dst = self.snapshot_path(name);
        let id = name.to_owned();
        blocking(move || {
            match std::fs::remove_file(&dst) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ProviderError::Io {
                        op: "replace snapshot",
                        id,
                        source: e,
                    });
                }
            }
            let method = clone_file(&src, &dst).map_err(|source| ProviderError::Clone {
                op: "snapshot volume",
                id: id.clone(),
                source,
            })?;
            Ok(SnapshotInfo {
                id,
                method: method.to_string(),
            })
        })
        .await
    }

    async fn volume_from_snapshot(&self, snapshot_id: &str, name: &str) -> Result<VolumeInfo, ProviderError> {
        let src = self.existing("snapshot", self.snapshot_path(snapshot_id), snapshot_id)?;
        check_name("volume", name)?;
        let dst = self.volume_path(name);
        let id = name.to_owned();
        blocking(move || {
            clone_file(&src, &dst).map_err(|source| ProviderError::Clone {
                op: "volume from snapshot",
                id: id.clone(),
                source,
            })?;
            let size = std::fs::metadata(&dst).map_err(io("stat volume", &id))?.len();
            Ok(VolumeInfo { id, size })
        })
        .await
    }

    async fn delete_volume(&self, id: &str) -> Result<(), ProviderError> {
        let path = self.existing("volume", self.volume_path(id), id)?;
        std::fs::remove_file(path).map_err(io("delete volume", id))
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), ProviderError> {
        let path = self.existing("snapshot", self.snapshot_path(id), id)?;
        std::fs::remove_file(path).map_err(io("delete snapshot", id))
    }

    async fn volume(&self, id: &str) -> Result<Option<VolumeInfo>, ProviderError> {
        check_name("volume", id)?;
        match std::fs::metadata(self.volume_path(id)) {
            Ok(m) => Ok(Some(VolumeInfo {
                id: id.to_owned(),
                size: m.len(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ProviderError::Io {
                op: "stat volume",
                id: id.to_owned(),
                source: e,
            }),
        }
    }

    async fn volume_from_image(
        &self,
        image: &Path,
        name: &str,
        size: u64,
    ) -> Result<VolumeInfo, ProviderError> {
        check_name("volume", name)?;
        let src = image.to_owned();
        let dst = self.volume_path(name);
        let id = name.to_owned();
        blocking(move || {
            clone_file(&src, &dst).map_err(|source| ProviderError::Clone {
                op: "volume from image",
                id: id.clone(),
                source,
            })?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&dst)
                .map_err(io("open volume", &id))?;
            let cur = f.metadata().map_err(io("stat volume", &id))?.len();
            if size > cur {
                f.set_len(size).map_err(io("grow volume", &id))?;
                f.sync_all().map_err(io("sync volume", &id))?;
            }
            Ok(VolumeInfo {
                id,
                size: size.max(cur),
            })
        })
        .await
    }

    async fn create_instance(&self, spec: &InstanceSpec) -> Result<InstanceInfo, ProviderError> {
        let files = self.files(&spec.name)?;
        let lock = self.instance_lock(&spec.name);
        let _g = lock.lock().await;
        if let Some(rec) = self.read_record(&files)? {
            return Ok(self.info(&files, rec));
        }
        let bad = |reason: String| ProviderError::Spec {
            id: spec.name.clone(),
            reason,
        };
        spec.flavor.check().map_err(bad)?;
        if spec.disks.is_empty() {
            return Err(bad("no disks".into()));
        }
        for d in &spec.disks {
            self.existing("volume", self.volume_path(&d.volume), &d.volume)?;
            check_name("disk", &d.disk)?;
        }
        // The command line must be buildable (forward targets, relay program).
        qemu::netdev(spec, self.qemu.relay.as_deref()).map_err(bad)?;
        if spec.firmware == Firmware::Uefi && !self.qemu.ovmf_code.exists() {
            return Err(bad(format!("no OVMF code at {}", self.qemu.ovmf_code.display())));
        }
        std::fs::create_dir_all(&files.dir).map_err(io("create instance", &spec.name))?;
        let mut stored = spec.clone();
        stored.config_drive.clear();
        let rec = InstanceRecord {
            version: 1,
            spec: stored,
            config_drive: !spec.config_drive.is_empty(),
        };
        let (f2, drive, vars_src) = (
            files.clone(),
            spec.config_drive.clone(),
            self.qemu.ovmf_vars.clone(),
        );
        let (name, uefi) = (spec.name.clone(), spec.firmware == Firmware::Uefi);
        let bytes = serde_json::to_vec_pretty(&rec).map_err(|e| bad(e.to_string()))?;
        blocking(move || {
            if !drive.is_empty() {
                qemu::make_config_drive(&f2.config_drive(), &drive, &name)?;
            }
            if uefi && !f2.ovmf_vars().exists() {
                std::fs::copy(&vars_src, f2.ovmf_vars()).map_err(io("copy OVMF variables", &name))?;
            }
            // Last: an instance.json means a complete instance.
            crate::fsutil::write_atomic(&f2.record(), &bytes).map_err(io("write instance", &name))
        })
        .await?;
        tracing::info!(instance = %spec.name, disks = spec.disks.len(), network = ?spec.network, "instance defined");
        Ok(self.info(&files, rec))
    }

    async fn start_instance(&self, name: &str) -> Result<InstanceInfo, ProviderError> {
        let (files, rec) = self.existing_instance(name)?;
        let lock = self.instance_lock(name);
        let _g = lock.lock().await;
        if qemu::running_pid(&files).is_some() {
            return Ok(self.info(&files, rec));
        }
        let volumes = rec
            .spec
            .disks
            .iter()
            .map(|d| self.existing("volume", self.volume_path(&d.volume), &d.volume))
            .collect::<Result<Vec<_>, _>>()?;
        let accel = self.accel().await;
        let args = qemu::qemu_args(&rec.spec, &files, &volumes, accel, &self.qemu, rec.config_drive)
            .map_err(|reason| ProviderError::Spec {
                id: name.to_owned(),
                reason,
            })?;
        let (f2, bin, id) = (files.clone(), self.qemu.binary.clone(), name.to_owned());
        blocking(move || {
            for stale in [f2.pid(), f2.qmp()] {
                let _ = std::fs::remove_file(stale);
            }
            let log = std::fs::File::create(f2.qemu_log()).map_err(io("create qemu.log", &id))?;
            let log2 = log.try_clone().map_err(io("create qemu.log", &id))?;
            // With -daemonize the command returns once the VM is set up (or failed).
            let status = std::process::Command::new(&bin)
                .args(&args)
                .stdin(std::process::Stdio::null())
                .stdout(log)
                .stderr(log2)
                .status()
                .map_err(|e| ProviderError::Command {
                    op: "start instance",
                    id: id.clone(),
                    reason: format!("cannot run {}: {e}", bin.display()),
                })?;
            if !status.success() {
                let msg = std::fs::read_to_string(f2.qemu_log()).unwrap_or_default();
                return Err(ProviderError::Command {
                    op: "start instance",
                    id,
                    reason: format!("QEMU exited with {status}: {}", msg.trim()),
                });
            }
            Ok(())
        })
        .await?;
        let info = self.info(&files, rec);
        tracing::info!(instance = %name, accel, state = ?info.state, "instance started");
        Ok(info)
    }

    async fn stop_instance(&self, name: &str, grace: Duration) -> Result<(), ProviderError> {
        let (files, _) = self.existing_instance(name)?;
        let lock = self.instance_lock(name);
        let _g = lock.lock().await;
        qemu::stop(&files, grace).await?;
        tracing::info!(instance = %name, "instance stopped");
        Ok(())
    }

    async fn instance(&self, name: &str) -> Result<Option<InstanceInfo>, ProviderError> {
        let files = self.files(name)?;
        Ok(self.read_record(&files)?.map(|rec| self.info(&files, rec)))
    }

    async fn list_instances(&self) -> Result<Vec<InstanceInfo>, ProviderError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.instances).map_err(io("list instances", "local provider"))? {
            let entry = entry.map_err(io("list instances", "local provider"))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(files) = self.files(&name) else {
                continue;
            };
            if let Some(rec) = self.read_record(&files)? {
                out.push(self.info(&files, rec));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn delete_instance(&self, name: &str) -> Result<(), ProviderError> {
        let (files, _) = self.existing_instance(name)?;
        let lock = self.instance_lock(name);
        let _g = lock.lock().await;
        qemu::stop(&files, Duration::ZERO).await?;
        std::fs::remove_dir_all(&files.dir).map_err(io("delete instance", name))?;
        tracing::info!(instance = %name, "instance deleted");
        Ok(())
    }

    async fn console_log(&self, name: &str, max_bytes: u64) -> Result<String, ProviderError> {
        use std::io::{Read as _, Seek as _};
        let (files, _) = self.existing_instance(name)?;
        let id = name.to_owned();
        blocking(move || {
            let mut f = match std::fs::File::open(files.serial()) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
                Err(e) => return Err(io("read serial log", &id)(e)),
            };
            let len = f.metadata().map_err(io("read serial log", &id))?.len();
            f.seek(std::io::SeekFrom::Start(len.saturating_sub(max_bytes)))
                .map_err(io("read serial log", &id))?;
            let mut buf = Vec::new();
            f.take(max_bytes)
                .read_to_end(&mut buf)
                .map_err(io("read serial log", &id))?;
            Ok(String::from_utf8_lossy(&buf).into_owned())
        })
        .await
    }

    async fn list_snapshots(&self) -> Result<Vec<String>, ProviderError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.snapshots).map_err(io("list snapshots", "local provider"))? {
            let entry = entry.map_err(io("list snapshots", "local provider"))?;
            if let Some(name) = entry.file_name().to_str().and_then(|n| n.strip_suffix(".img")) {
                out.push(name.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn volumes_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let p = LocalProvider::new(dir.path(), false).unwrap();
        let v = p.create_volume("h.sda", 1 << 20).await.unwrap();
        assert_eq!(v.size, 1 << 20);
        let path = p.attach_volume("h.sda").await.unwrap();
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let s = p.snapshot_volume("h.sda", "h.sda.p1").await.unwrap();
        std::fs::write(&path, vec![8u8; 1 << 20]).unwrap();
        assert_eq!(std::fs::read(p.snapshot_path(&s.id)).unwrap(), vec![7u8; 1 << 20]);
        p.resize_volume("h.sda", 2 << 20).await.unwrap();
        assert!(matches!(
            p.resize_volume("h.sda", 1 << 10).await,
            Err(ProviderError::Shrink { .. })
        ));
        let v2 = p
            .volume_from_snapshot("h.sda.p1", "h.sda.restored")
            .await
            .unwrap();
        assert_eq!(v2.size, 1 << 20);
        assert_eq!(p.list_snapshots().await.unwrap(), vec!["h.sda.p1".to_owned()]);
        p.delete_snapshot("h.sda.p1").await.unwrap();
        assert!(p.list_snapshots().await.unwrap().is_empty());
        assert!(matches!(
            p.attach_volume("../etc").await,
            Err(ProviderError::Name { .. })
        ));
        assert!(matches!(
            p.attach_volume("nope").await,
            Err(ProviderError::NotFound { .. })
        ));
    }
}
