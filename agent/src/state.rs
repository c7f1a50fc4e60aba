//! The agent's state directory (layout in `docs/formats.md`, "Agent state"):
//!
//! ```text
//! {state_dir}/known_gateways            trust-on-first-use fingerprints, "endpoint sha256:<hex>"
//! {state_dir}/{host}/lock               flock: one agent per host at a time
//! {state_dir}/{host}/sync               the id of the sync in progress (written before `begin`)
//! {state_dir}/{host}/disks/{disk}.blocks      block values at the last committed point
//! {state_dir}/{host}/disks/{disk}.blocks.new  the same for the sync in progress
//! ```
//!
//! Every file is replaced atomically (temp file, fsync, rename, fsync of the directory).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, flock};
use tern_core::{DiskId, HostId, PointId};

/// A state-directory operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another tern-agent is working on host {host} (it holds {path})")]
    Locked { host: HostId, path: PathBuf },
    #[error("{path} holds an invalid sync id")]
    BadSyncId {
        path: PathBuf,
        #[source]
        source: tern_core::IdError,
    },
    #[error("{path} line {line} is not \"<endpoint> sha256:<64 hex digits>\"")]
    BadKnownGateway { path: PathBuf, line: usize },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// fsyncs the directory that holds `path`.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// Writes `data` to `path` atomically and durably, mode 0600.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Removes `path` if it exists and fsyncs its directory.
pub fn remove_durably(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// One host's state directory, locked for the lifetime of this value.
#[derive(Debug)]
pub struct HostState {
    root: PathBuf,
    _lock: File,
}

impl HostState {
    /// Creates `{state_dir}/{host}` if needed and takes its lock (fails at once if another
    /// agent holds it).
    pub fn open(state_dir: &Path, host: &HostId) -> Result<Self, StateError> {
        let root = state_dir.join(host.as_str());
        let disks = root.join("disks");
        std::fs::create_dir_all(&disks).map_err(io_err("create", &disks))?;
        let lock_path = root.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match flock(&lock, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StateError::Locked {
                    host: host.clone(),
                    path: lock_path,
                });
            }
            Err(e) => return Err(io_err("lock", &lock_path)(e.into())),
        }
        Ok(Self { root, _lock: lock })
    }

    /// The host's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sync_path(&self) -> PathBuf {
        self.root.join("sync")
    }

    /// The sync in progress, if one was started and not finished.
    pub fn pending_sync(&self) -> Result<Option<PointId>, StateError> {
        let path = self.sync_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => PointId::new(text.trim())
                .map(Some)
                .map_err(|source| StateError::BadSyncId { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// Records the sync in progress (durably, before the target hears of it).
    pub fn set_pending_sync(&self, sync: &PointId) -> Result<(), StateError> {
        let path = self.sync_path();
        write_atomic(&path, format!("{sync}\n").as_bytes()).map_err(io_err("write", &path))
    }

    /// Forgets the sync in progress (after its commit and state files are in place).
    pub fn clear_pending_sync(&self) -> Result<(), StateError> {
        let path = self.sync_path();
        remove_durably(&path).map_err(io_err("remove", &path))
    }

    /// The block-values file of `disk` at the last committed point.
    pub fn blocks_path(&self, disk: &DiskId) -> PathBuf {
        self.root.join("disks").join(format!("{disk}.blocks"))
    }

    /// The block-values file `disk` gets when the sync in progress commits.
    pub fn new_blocks_path(&self, disk: &DiskId) -> PathBuf {
        self.root.join("disks").join(format!("{disk}.blocks.new"))
    }
}

/// Trust-on-first-use fingerprints: `{state_dir}/known_gateways`, one `<endpoint> <fingerprint>`
/// per line.
#[derive(Debug)]
pub struct KnownGateways {
    path: PathBuf,
    entries: Vec<(String, String)>,
}

impl KnownGateways {
    /// Loads the file (empty if missing).
    pub fn load(state_dir: &Path) -> Result<Self, StateError> {
        let path = state_dir.join("known_gateways");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(ep), Some(fp), None) if crate::tls::parse_fingerprint(fp).is_ok() => {
                    entries.push((ep.to_owned(), fp.to_owned()));
                }
                _ => return Err(StateError::BadKnownGateway { path, line: i + 1 }),
            }
        }
        Ok(Self { path, entries })
    }

    /// The recorded fingerprint of `endpoint`.
    pub fn get(&self, endpoint: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(e, _)| e == endpoint)
            .map(|(_, f)| f.as_str())
    }

    /// Records the fingerprint of a new endpoint.
    pub fn add(&mut self, endpoint: &str, fingerprint: &str) -> Result<(), StateError> {
        self.entries.push((endpoint.to_owned(), fingerprint.to_owned()));
        let mut text =
            String::from("# Gateways trusted on first use: <endpoint> <certificate fingerprint>\n");
        for (e, f) in &self.entries {
            text.push_str(&format!("{e} {f}\n"));
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        write_atomic(&self.path, text.as_bytes()).map_err(io_err("write", &self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_pending_sync_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostId::new("web-01").unwrap();
        let s = HostState::open(dir.path(), &host).unwrap();
        assert!(matches!(
            HostState::open(dir.path(), &host),
            Err(StateError::Locked { .. })
        ));
        assert_eq!(s.pending_sync().unwrap(), None);
        let id = PointId::new("20260101T000000Z-00000001").unwrap();
        s.set_pending_sync(&id).unwrap();
        assert_eq!(s.pending_sync().unwrap(), Some(id));
        s.clear_pending_sync().unwrap();
        s.clear_pending_sync().unwrap();
        assert_eq!(s.pending_sync().unwrap(), None);
        drop(s);
        assert!(HostState::open(dir.path(), &host).is_ok());
    }

    #[test]
    fn known_gateways() {
        let dir = tempfile::tempdir().unwrap();
        let fp = format!("sha256:{}", "ab".repeat(32));
        let mut k = KnownGateways::load(dir.path()).unwrap();
        assert_eq!(k.get("https://gw:8443"), None);
        k.add("https://gw:8443", &fp).unwrap();
        let k = KnownGateways::load(dir.path()).unwrap();
        assert_eq!(k.get("https://gw:8443"), Some(fp.as_str()));
        std::fs::write(dir.path().join("known_gateways"), "https://gw:8443 md5:00\n").unwrap();
        assert!(matches!(
            KnownGateways::load(dir.path()),
            Err(StateError::BadKnownGateway { line: 1, .. })
        ));
    }
}
