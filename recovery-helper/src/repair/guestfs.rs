//! Safe access to a mounted guest's files.
//!
//! The guest is untrusted: its `/etc/fstab` may be a symbolic link to `/etc/shadow`, its `/boot`
//! a link to `/`. Every path is therefore resolved with `openat2(RESOLVE_IN_ROOT)` against the
//! guest's root, so that absolute links and `..` stay inside the guest, and files are replaced by
//! rename in their (resolved) parent directory, which never writes through a link.
//!
//! Every file the repair rewrites or removes is first copied to a per-run backup directory inside
//! the guest (`/var/backups/tern-repair/RUN/PATH`), created only when something changes, so a run
//! that changes nothing leaves no trace.

use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};

use super::Error;

/// A guest's file system tree, mounted at `root` on the helper.
#[derive(Debug)]
pub struct GuestFs {
    root: PathBuf,
    run_id: String,
    backups: Vec<String>,
    backup_dir_made: bool,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// A guest path (absolute or not) made relative, refusing anything odd.
fn relative(path: &str) -> Result<PathBuf, Error> {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::Refused(format!("guest path {path:?} is not a plain path")));
            }
        }
    }
    Ok(out)
}

impl GuestFs {
    /// The guest mounted at `root`; `run_id` names this run's backup directory.
    pub fn new(root: &Path, run_id: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            run_id: run_id.to_owned(),
            backups: Vec::new(),
            backup_dir_made: false,
        }
    }

    /// Where the guest is mounted on the helper.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The files backed up so far (guest paths).
    pub fn backups(&self) -> &[String] {
        &self.backups
    }

    /// The backup directory of this run, as a guest path.
    pub fn backup_dir(&self) -> String {
        format!("/var/backups/tern-repair/{}", self.run_id)
    }

    /// Resolves a guest path inside the guest (following links as the guest would see them) to
    /// the path of the same object on the helper. `None` when it does not exist.
    pub fn resolve(&self, path: &str) -> Result<Option<PathBuf>, Error> {
        let rel = relative(path)?;
        let root =
            std::fs::File::open(&self.root).map_err(io_err(format!("opening {}", self.root.display())))?;
        let rel = if rel.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            rel
        };
        let fd = match rustix::fs::openat2(
            &root,
            &rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::NOTDIR) => return Ok(None),
            Err(e) => return Err(io_err(format!("resolving {path} in the guest"))(e.into())),
        };
        let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(io_err(format!("resolving {path} in the guest")))?;
        if !real.starts_with(&self.root) {
            return Err(Error::Refused(format!(
                "guest path {path} resolves outside the guest ({})",
                real.display()
            )));
        }
        Ok(Some(real))
    }

    /// The helper path of the directory that holds `path` (resolved in the guest) and the file
    /// name, without following a link in the last component.
    fn parent_and_name(&self, path: &str) -> Result<(PathBuf, std::ffi::OsString), Error> {
        let rel = relative(path)?;
        let name = rel
            .file_name()
            .ok_or_else(|| Error::Refused(format!("guest path {path:?} names no file")))?
            .to_owned();
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = self
            .resolve(&parent.to_string_lossy())?
            .ok_or_else(|| Error::Refused(format!("the directory of {path} does not exist in the guest")))?;
        Ok((dir, name))
    }

    /// Whether a guest path exists (following links inside the guest).
    pub fn exists(&self, path: &str) -> Result<bool, Error> {
        Ok(self.resolve(path)?.is_some())
    }

    /// Whether a guest path is itself a symbolic link (not followed).
    pub fn is_symlink(&self, path: &str) -> Result<bool, Error> {
        let Ok((dir, name)) = self.parent_and_name(path) else {
            return Ok(false);
        };
        Ok(std::fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.file_type().is_symlink()))
    }

    /// The target of a symbolic link, if `path` is one.
    pub fn read_link(&self, path: &str) -> Result<Option<PathBuf>, Error> {
        let Ok((dir, name)) = self.parent_and_name(path) else {
            return Ok(None);
        };
        Ok(std::fs::read_link(dir.join(name)).ok())
    }

    /// Reads a guest file as text, `None` when it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<String>, Error> {
        match self.read_bytes(path)? {
            Some(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
            None => Ok(None),
        }
    }

    /// Reads a guest file, `None` when it does not exist.
    pub fn read_bytes(&self, path: &str) -> Result<Option<Vec<u8>>, Error> {
        match self.resolve(path)? {
            Some(p) if p.is_file() => std::fs::read(&p)
                .map(Some)
                .map_err(io_err(format!("reading {path} in the guest"))),
            _ => Ok(None),
        }
    }

    /// The names in a guest directory, sorted; empty when it does not exist.
    pub fn list(&self, path: &str) -> Result<Vec<String>, Error> {
        let Some(dir) = self.resolve(path)? else {
            return Ok(Vec::new());
        };
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(io_err(format!("listing {path} in the guest")))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Creates a guest directory and its parents.
    pub fn mkdir_all(&self, path: &str) -> Result<(), Error> {
        let rel = relative(path)?;
        let mut cur = PathBuf::new();
        for c in rel.components() {
            cur.push(c);
            let s = cur.to_string_lossy().into_owned();
            if self.resolve(&s)?.is_some() {
                continue;
            }
            let (dir, name) = self.parent_and_name(&s)?;
            std::fs::create_dir(dir.join(&name)).map_err(io_err(format!("creating {s} in the guest")))?;
        }
        Ok(())
    }

    /// Copies the current content of `path` (if any) into this run's backup directory.
    fn backup(&mut self, path: &str) -> Result<(), Error> {
        let rel = relative(path)?;
        // A link is backed up as a file holding its target; a file by its content.
        let (dest, content, mode) = if let Some(target) = self.read_link(path)? {
            (
                format!("{}/{}.symlink", self.backup_dir(), rel.display()),
                target.to_string_lossy().into_owned().into_bytes(),
                0o644,
            )
        } else if let Some(current) = self.read_bytes(path)? {
            let mode = self.mode(path)?.unwrap_or(0o644);
            (format!("{}/{}", self.backup_dir(), rel.display()), current, mode)
        } else {
            return Ok(());
        };
        if !self.backup_dir_made {
            self.mkdir_all(&self.backup_dir())?;
            self.backup_dir_made = true;
        }
        if self.exists(&dest)? || self.is_symlink(&dest)? {
            return Ok(()); // backed up earlier in this run: keep the original
        }
        self.write_raw(&dest, &content, mode)?;
        self.backups.push(path.to_owned());
        Ok(())
    }

    fn mode(&self, path: &str) -> Result<Option<u32>, Error> {
        Ok(self
            .resolve(path)?
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.permissions().mode() & 0o7777))
    }

    fn write_raw(&self, path: &str, content: &[u8], mode: u32) -> Result<(), Error> {
        if let Some(parent) = relative(path)?.parent() {
            self.mkdir_all(&parent.to_string_lossy())?;
        }
        let (dir, name) = self.parent_and_name(path)?;
        let owner = std::fs::metadata(dir.join(&name))
            .ok()
            .map(|m| (m.uid(), m.gid()));
        let tmp = dir.join(format!(".{}.tern-tmp", name.to_string_lossy()));
        let _ = std::fs::remove_file(&tmp);
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(OFlags::NOFOLLOW.bits() as i32)
                .open(&tmp)
                .map_err(io_err(format!("writing {path} in the guest")))?;
            f.write_all(content)
                .map_err(io_err(format!("writing {path} in the guest")))?;
            f.set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io_err(format!("setting the mode of {path} in the guest")))?;
            f.sync_all()
                .map_err(io_err(format!("syncing {path} in the guest")))?;
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid))
                .map_err(io_err(format!("setting the owner of {path} in the guest")))?;
        }
        std::fs::rename(&tmp, dir.join(&name)).map_err(io_err(format!("replacing {path} in the guest")))
    }

    /// Writes `content` to `path` when it differs from what is there, keeping a backup of the
    /// old file. Returns whether anything changed. New files get `mode`; existing ones keep
    /// theirs.
    pub fn write(&mut self, path: &str, content: &str, mode: u32) -> Result<bool, Error> {
        if self.read_bytes(path)?.as_deref() == Some(content.as_bytes()) && !self.is_symlink(path)? {
            return Ok(false);
        }
        self.backup(path)?;
        let mode = self.mode(path)?.unwrap_or(mode);
        self.write_raw(path, content.as_bytes(), mode)?;
        Ok(true)
    }

    /// Removes a guest file or link (after backing it up). Returns whether it existed.
    pub fn remove(&mut self, path: &str) -> Result<bool, Error> {
        let Some(parent) = relative(path)?.parent().map(|p| p.to_string_lossy().into_owned()) else {
            return Ok(false);
        };
        if self.resolve(&parent)?.is_none() {
            return Ok(false);
        }
        let (dir, name) = self.parent_and_name(path)?;
        let full = dir.join(&name);
        if std::fs::symlink_metadata(&full).is_err() {
            return Ok(false);
        }
        self.backup(path)?;
        std::fs::remove_file(&full).map_err(io_err(format!("removing {path} in the guest")))?;
        Ok(true)
    }

    /// Removes a file the repair itself created (no backup).
    pub fn remove_untracked(&self, path: &str) -> Result<(), Error> {
        let (dir, name) = self.parent_and_name(path)?;
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(format!("removing {path} in the guest"))(e)),
        }
    }

    /// Makes `path` a symbolic link to `target` (replacing a file or link, backed up). Returns
    /// whether anything changed.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<bool, Error> {
        if self.read_link(path)?.as_deref() == Some(Path::new(target)) {
            return Ok(false);
        }
        if let Some(parent) = relative(path)?.parent() {
            self.mkdir_all(&parent.to_string_lossy())?;
        }
        let (dir, name) = self.parent_and_name(path)?;
        let full = dir.join(&name);
        if std::fs::symlink_metadata(&full).is_ok() {
            self.backup(path)?;
            std::fs::remove_file(&full).map_err(io_err(format!("replacing {path} in the guest")))?;
        }
        std::os::unix::fs::symlink(target, &full).map_err(io_err(format!("linking {path} in the guest")))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_stay_inside_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        // An absolute link that would point at the helper's own file.
        std::os::unix::fs::symlink("/etc/hostname", root.join("etc/evil")).unwrap();
        std::fs::write(root.join("etc/hostname"), "guest\n").unwrap();
        let mut g = GuestFs::new(&root, "t1");
        assert_eq!(g.read("/etc/evil").unwrap().as_deref(), Some("guest\n"));
        // Writing replaces the link itself, inside the guest.
        assert!(g.write("/etc/evil", "new\n", 0o644).unwrap());
        assert!(
            !std::fs::symlink_metadata(root.join("etc/evil"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "guest\n"
        );
        // The old link was recorded in the backup.
        assert_eq!(
            std::fs::read_to_string(root.join("var/backups/tern-repair/t1/etc/evil.symlink")).unwrap(),
            "/etc/hostname"
        );
        assert!(relative("/etc/../../x").is_err());
    }

    #[test]
    fn writes_are_idempotent_and_backed_up_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/fstab"), "old\n").unwrap();
        std::fs::set_permissions(root.join("etc/fstab"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut g = GuestFs::new(root, "r");
        assert!(g.write("/etc/fstab", "new\n", 0o644).unwrap());
        assert!(!g.write("/etc/fstab", "new\n", 0o644).unwrap());
        assert!(g.write("/etc/fstab", "newer\n", 0o644).unwrap());
        let backup = root.join("var/backups/tern-repair/r/etc/fstab");
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), "old\n");
        let mode = std::fs::metadata(root.join("etc/fstab"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(g.backups(), ["/etc/fstab"]);
        assert!(g.remove("/etc/fstab").unwrap());
        assert!(!g.remove("/etc/fstab").unwrap());
        assert!(!g.remove("/etc/lvm/devices/system.devices").unwrap());
        assert!(g.symlink("/etc/systemd/system/x.service", "/dev/null").unwrap());
        assert!(!g.symlink("/etc/systemd/system/x.service", "/dev/null").unwrap());
    }
}
