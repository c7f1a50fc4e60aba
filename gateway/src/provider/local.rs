//! The local provider, the embedded default: volumes are sparse (or preallocated) files under
//! `<data_dir>/volumes/`, snapshots are reflinks where the file system has them (xfs, btrfs)
//! and sparse-aware copies otherwise, under `<data_dir>/snapshots/`. "Attach" hands the file
//! to the gateway.

use std::path::{Path, PathBuf};

use tern_core::io::clone_file;

use super::{CloudProvider, ProviderError, SnapshotInfo, VolumeInfo};

/// Files under a directory.
#[derive(Debug)]
pub struct LocalProvider {
    volumes: PathBuf,
    snapshots: PathBuf,
    preallocate: bool,
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
        let volumes = root.join("volumes");
        let snapshots = root.join("snapshots");
        for d in [&volumes, &snapshots] {
            std::fs::create_dir_all(d).map_err(io("create directory", "local provider"))?;
        }
        Ok(Self {
            volumes,
            snapshots,
            preallocate,
        })
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
