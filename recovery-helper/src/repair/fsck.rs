//! File system checks before and after a repair.
//!
//! Before: each file system is checked the way its boot would check it (ext: `e2fsck -p`, which
//! replays the journal of a crash-consistent copy and fixes only what is safe; XFS: a log replay
//! by mount then `xfs_repair -n`; btrfs: `btrfs check --readonly`; FAT: `fsck.fat -n`, then `-a`
//! for the dirty bit). Anything left broken, or a file system of unknown type where one is
//! needed, is refused: the repair does not write into a damaged file system.
//!
//! After: a read-only forced check (`e2fsck -f -n`, `xfs_repair -n`, …) must pass.

use std::ffi::OsStr;
use std::path::Path;

use super::Error;
use super::disks::Volume;
use super::sys;

/// What the check before the repair did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Before {
    /// Clean as found.
    Clean,
    /// Made clean by a safe, automatic fix (journal replay, dirty bit), described.
    Fixed(String),
    /// Not a file system the repair checks (swap, LVM, empty).
    NotChecked,
}

fn need(tool: &str, v: &Volume) -> Result<(), Error> {
    if sys::have(tool) {
        Ok(())
    } else {
        Err(Error::Refused(format!(
            "{} holds {}, but {tool} is not installed on this helper",
            v.device.display(),
            v.probe.fstype.as_deref().unwrap_or("?")
        )))
    }
}

fn refuse(v: &Volume, what: &str, out: &std::process::Output) -> Error {
    Error::Refused(format!(
        "the {} file system on {} is damaged ({what}, exit {}); repair it first: {}",
        v.probe.fstype.as_deref().unwrap_or("?"),
        v.device.display(),
        out.status.code().map_or("signal".to_owned(), |c| c.to_string()),
        sys::tail(&[out.stdout.as_slice(), out.stderr.as_slice()].concat())
    ))
}

/// Checks a volume before the repair touches it.
pub fn before(v: &Volume, scratch: &Path) -> Result<Before, Error> {
    let dev = v.device.as_os_str();
    match v.probe.fstype.as_deref() {
        Some("ext2" | "ext3" | "ext4") => {
            need("e2fsck", v)?;
            let out = sys::run_status("e2fsck", [OsStr::new("-p"), dev])?;
            match out.status.code() {
                Some(0) => Ok(Before::Clean),
                Some(1 | 2) => Ok(Before::Fixed(format!(
                    "e2fsck -p fixed it: {}",
                    sys::tail(&out.stdout).replace('\n', "; ")
                ))),
                _ => Err(refuse(v, "e2fsck -p could not fix it", &out)),
            }
        }
        Some("xfs") => {
            need("xfs_repair", v)?;
            let out = sys::run_status("xfs_repair", [OsStr::new("-n"), dev])?;
            if out.status.success() {
                return Ok(Before::Clean);
            }
            // A dirty log (a crash-consistent copy) is replayed by mounting once.
            let text = String::from_utf8_lossy(&[out.stdout.as_slice(), out.stderr.as_slice()].concat())
                .to_lowercase();
            if !text.contains("log") {
                return Err(refuse(v, "xfs_repair -n found errors", &out));
            }
            let dir = scratch.join("xfs-log-replay");
            std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
                what: format!("creating {}", dir.display()),
                source: e,
            })?;
            sys::Mount::new(&v.device, &dir, Some("xfs"), Some("nouuid"))?.unmount()?;
            let again = sys::run_status("xfs_repair", [OsStr::new("-n"), dev])?;
            if again.status.success() {
                Ok(Before::Fixed("replayed the XFS log by mounting".to_owned()))
            } else {
                Err(refuse(v, "xfs_repair -n found errors after a log replay", &again))
            }
        }
        Some("btrfs") => {
            need("btrfs", v)?;
            let out = sys::run_status("btrfs", [OsStr::new("check"), OsStr::new("--readonly"), dev])?;
            if out.status.success() {
                Ok(Before::Clean)
            } else {
                Err(refuse(v, "btrfs check --readonly found errors", &out))
            }
        }
        Some("vfat") => {
            need("fsck.fat", v)?;
            let out = sys::run_status("fsck.fat", [OsStr::new("-n"), dev])?;
            if out.status.success() {
                return Ok(Before::Clean);
            }
            let fix = sys::run_status("fsck.fat", [OsStr::new("-a"), OsStr::new("-w"), dev])?;
            let again = sys::run_status("fsck.fat", [OsStr::new("-n"), dev])?;
            if again.status.success() {
                Ok(Before::Fixed(format!(
                    "fsck.fat -a fixed it: {}",
                    sys::tail(&fix.stdout).replace('\n', "; ")
                )))
            } else {
                Err(refuse(v, "fsck.fat -a could not fix it", &again))
            }
        }
        _ => Ok(Before::NotChecked),
    }
}

/// Checks a volume after the repair (read-only, forced); anything but clean is an error.
pub fn after(v: &Volume) -> Result<bool, Error> {
    let dev = v.device.as_os_str();
    let out = match v.probe.fstype.as_deref() {
        Some("ext2" | "ext3" | "ext4") => {
            sys::run_status("e2fsck", [OsStr::new("-f"), OsStr::new("-n"), dev])?
        }
        Some("xfs") => sys::run_status("xfs_repair", [OsStr::new("-n"), dev])?,
        Some("btrfs") => sys::run_status("btrfs", [OsStr::new("check"), OsStr::new("--readonly"), dev])?,
        Some("vfat") => sys::run_status("fsck.fat", [OsStr::new("-n"), dev])?,
        _ => return Ok(false),
    };
    if out.status.success() {
        Ok(true)
    } else {
        Err(Error::Check(format!(
            "the {} file system on {} is not clean after the repair (exit {}): {}",
            v.probe.fstype.as_deref().unwrap_or("?"),
            v.device.display(),
            out.status.code().map_or("signal".to_owned(), |c| c.to_string()),
            sys::tail(&[out.stdout.as_slice(), out.stderr.as_slice()].concat())
        )))
    }
}
