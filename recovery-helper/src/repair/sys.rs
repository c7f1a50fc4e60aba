//! The host side of a repair: running tools, loop devices, partitions and mounts.
//!
//! Everything here shells out to the standard tools of a Linux helper (util-linux `losetup`,
//! `partx`, `mount`, `blkid`; the guest's own tools through `chroot`). They are the reference
//! implementations of what they do, they exist on every helper image, and their behaviour on
//! damaged input is far better tested than anything we could write again.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tracing::{debug, warn};

use super::Error;

/// Runs a command and returns its output; a non-zero exit is an error that carries stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<Output, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = run_status(program, args)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(Error::Command {
            command: program.to_owned(),
            status: out.status.code(),
            stderr: tail(&out.stderr),
        })
    }
}

/// Runs a command and returns its output whatever its exit status.
pub fn run_status<I, S>(program: &str, args: I) -> Result<Output, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args).env("LC_ALL", "C").env("MTOOLS_SKIP_CHECK", "1");
    debug!(command = ?cmd, "running");
    cmd.output().map_err(|e| Error::Spawn {
        command: program.to_owned(),
        source: e,
    })
}

/// Standard output as text, trimmed.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The last lines of a tool's error output, for an error message.
pub fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(8);
    lines[start..].join("\n")
}

/// Whether a program can be found on `PATH`.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// A disk given to the repair, made a block device: image files are attached to a loop device
/// (detached on drop); block devices are used as they are. Partitions are made visible with
/// `partx` (helper kernels may lack partition parsers, and udev may be absent).
#[derive(Debug)]
pub struct AttachedDisk {
    /// What the operator named.
    pub source: PathBuf,
    /// The whole-disk block device.
    pub device: PathBuf,
    loop_device: bool,
}

impl AttachedDisk {
    /// Attaches `source` (an image file or a block device).
    pub fn attach(source: &Path) -> Result<Self, Error> {
        let meta = std::fs::metadata(source).map_err(|e| Error::Io {
            what: format!("inspecting {}", source.display()),
            source: e,
        })?;
        use std::os::unix::fs::FileTypeExt as _;
        let (device, loop_device) = if meta.file_type().is_block_device() {
            (source.to_path_buf(), false)
        } else if meta.is_file() {
            let out = run(
                "losetup",
                [OsStr::new("--find"), OsStr::new("--show"), source.as_os_str()],
            )?;
            (PathBuf::from(stdout(&out)), true)
        } else {
            return Err(Error::Refused(format!(
                "{} is neither a block device nor an image file",
                source.display()
            )));
        };
        let disk = Self {
            source: source.to_path_buf(),
            device,
            loop_device,
        };
        disk.rescan()?;
        Ok(disk)
    }

    /// Makes the kernel's view of the partitions match the table on disk.
    ///
    /// A whole disk first gets `BLKRRPART`: its table may have been rewritten since the kernel
    /// read it (a helper restores a guest over the disk it booted from, whose partitions differ),
    /// and `partx -u` cannot move a partition's start. Where that fails (a loop device without
    /// partition scanning, a kernel without parsers, a partition in use) `partx` does the work.
    pub fn rescan(&self) -> Result<(), Error> {
        if !self.loop_device
            && let Ok(f) = std::fs::File::open(&self.device)
        {
            use std::os::fd::AsRawFd as _;
            // <linux/fs.h>: _IO(0x12, 95), not in the libc crate. The request's C type differs
            // between glibc and musl, hence the cast.
            const BLKRRPART: u32 = 0x125f;
            // SAFETY: BLKRRPART takes no argument; the descriptor is open for the whole call.
            let rc = unsafe { libc::ioctl(f.as_raw_fd(), BLKRRPART as _) };
            if rc != 0 {
                debug!(device = %self.device.display(), error = %std::io::Error::last_os_error(), "BLKRRPART failed; partx only");
            }
        }
        // `partx -u` updates what exists and adds what is new; it fails on a disk without any
        // partition table, which is not an error here.
        let out = run_status("partx", [OsStr::new("-u"), self.device.as_os_str()])?;
        if !out.status.success() {
            let add = run_status("partx", [OsStr::new("-a"), self.device.as_os_str()])?;
            if !add.status.success() {
                debug!(device = %self.device.display(), stderr = %tail(&add.stderr), "partx found no partitions");
            }
        }
        Ok(())
    }

    /// The block device of partition `number` (1-based), as the kernel names it.
    pub fn partition_device(&self, number: u32) -> PathBuf {
        let base = self.device.to_string_lossy();
        if base.ends_with(|c: char| c.is_ascii_digit()) {
            PathBuf::from(format!("{base}p{number}"))
        } else {
            PathBuf::from(format!("{base}{number}"))
        }
    }
}

impl Drop for AttachedDisk {
    fn drop(&mut self) {
        if self.loop_device {
            let _ = run_status("partx", [OsStr::new("-d"), self.device.as_os_str()]);
            if let Err(e) = run("losetup", [OsStr::new("-d"), self.device.as_os_str()]) {
                warn!(device = %self.device.display(), error = %e, "failed to detach the loop device");
            }
        }
    }
}

/// A mount, unmounted on drop (or explicitly, to see the error).
#[derive(Debug)]
pub struct Mount {
    target: PathBuf,
    mounted: bool,
}

impl Mount {
    /// `mount [-t FSTYPE] [-o OPTIONS] SOURCE TARGET`.
    pub fn new(
        source: &Path,
        target: &Path,
        fstype: Option<&str>,
        options: Option<&str>,
    ) -> Result<Self, Error> {
        let mut args: Vec<&OsStr> = Vec::new();
        if let Some(t) = fstype {
            args.extend([OsStr::new("-t"), OsStr::new(t)]);
        }
        if let Some(o) = options {
            args.extend([OsStr::new("-o"), OsStr::new(o)]);
        }
        args.extend([source.as_os_str(), target.as_os_str()]);
        run("mount", args)?;
        Ok(Self {
            target: target.to_path_buf(),
            mounted: true,
        })
    }

    /// Where it is mounted.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts, reporting failure.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.mounted = false;
        run("umount", [self.target.as_os_str()]).map(|_| ())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted
            && let Err(e) = run("umount", [self.target.as_os_str()])
        {
            warn!(target = %self.target.display(), error = %e, "unmount failed; trying a lazy unmount");
            let _ = run_status("umount", [OsStr::new("-l"), self.target.as_os_str()]);
        }
    }
}

/// The devices mounted on this host (from /proc/self/mountinfo), to refuse repairing a disk the
/// helper itself is using.
pub fn mounted_sources() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| {
            text.lines()
                .filter_map(|l| {
                    let (_, post) = l.split_once(" - ")?;
                    post.split_whitespace().nth(1).map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_non_empty_lines() {
        let text = (1..=20).map(|i| format!("line {i}\n\n")).collect::<String>();
        let t = tail(text.as_bytes());
        assert!(t.starts_with("line 13"));
        assert!(t.ends_with("line 20"));
    }
}
