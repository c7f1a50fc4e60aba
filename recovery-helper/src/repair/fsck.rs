//! File system checks before and after a repair.
//!
//! Before: each file system gets a full read-only check (`e2fsck -f -n`, `xfs_repair -n`,
//! `btrfs check --readonly`, `fsck.fat -n`). The only writes allowed first are what a boot of a
//! crash-consistent copy does anyway: replaying an ext journal (`e2fsck -E journal_only`) or an
//! XFS log (one mount), clearing a FAT dirty bit. Anything else broken, or a file system of
//! unknown type where one is needed, is refused before anything is written: the repair does not
//! write into a damaged file system.
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
            let check = || sys::run_status("e2fsck", [OsStr::new("-f"), OsStr::new("-n"), dev]);
            let out = check()?;
            if out.status.success() {
                return Ok(Before::Clean);
            }
            // A crash-consistent copy has a journal to replay: replay only that (what a boot
            // does), then the read-only check must pass.
            if !needs_recovery(dev)? {
                return Err(refuse(v, "e2fsck -f -n found errors", &out));
            }
            let replay = sys::run_status(
                "e2fsck",
                [
                    OsStr::new("-p"),
                    OsStr::new("-E"),
                    OsStr::new("journal_only"),
                    dev,
                ],
            )?;
            if !matches!(replay.status.code(), Some(0..=2)) {
                return Err(refuse(v, "replaying its journal failed", &replay));
            }
            let again = check()?;
            if again.status.success() {
                Ok(Before::Fixed("replayed the ext journal".to_owned()))
            } else {
                Err(refuse(
                    v,
                    "e2fsck -f -n found errors after the journal replay",
                    &again,
                ))
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
            // The dirty bit of an ESP that was mounted when the copy was taken is cleared (what
            // a boot does); anything else is refused.
            if !only_fat_dirty_bit(&String::from_utf8_lossy(
                &[out.stdout.as_slice(), out.stderr.as_slice()].concat(),
            )) {
                return Err(refuse(v, "fsck.fat -n found errors", &out));
            }
            let fix = sys::run_status("fsck.fat", [OsStr::new("-a"), dev])?;
            let again = sys::run_status("fsck.fat", [OsStr::new("-n"), dev])?;
            if fix.status.code().is_some_and(|c| c <= 1) && again.status.success() {
                Ok(Before::Fixed("cleared the FAT dirty bit".to_owned()))
            } else {
                Err(refuse(
                    v,
                    "fsck.fat -n still finds errors after clearing the dirty bit",
                    &again,
                ))
            }
        }
        _ => Ok(Before::NotChecked),
    }
}

/// Whether an ext file system has a journal to replay (`needs_recovery`).
fn needs_recovery(dev: &OsStr) -> Result<bool, Error> {
    let out = sys::run_status("dumpe2fs", [OsStr::new("-h"), dev])?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        l.starts_with("Filesystem features:") && l.split_whitespace().any(|f| f == "needs_recovery")
    }))
}

/// Whether `fsck.fat -n` complained only about the dirty bit (and the harmless difference it
/// makes between the boot sector and its backup).
pub fn only_fat_dirty_bit(output: &str) -> bool {
    let mut dirty = false;
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let benign = line.starts_with("fsck.fat ")
            || line.starts_with("There are differences between boot sector and its backup")
            || line.starts_with("This is mostly harmless")
            || line.starts_with("Differences: (offset:original/backup)")
            || line
                .split(':')
                .all(|p| p.split('/').all(|x| x.chars().all(|c| c.is_ascii_hexdigit())))
            || line.starts_with("Not automatically fixing this")
            || line.starts_with("Leaving filesystem unchanged")
            || line.contains(" files, ") && line.contains(" clusters")
            || line.starts_with("Automatically removing dirty bit")
            || line.starts_with("1) Remove dirty bit")
            || line.starts_with("2) No action")
            || line.starts_with("Fs was not properly unmounted");
        if line.starts_with("Dirty bit is set") {
            dirty = true;
        } else if !benign {
            return false;
        }
    }
    dirty
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fat_dirty_bit_only() {
        let dirty = "fsck.fat 4.2 (2021-01-31)\nThere are differences between boot sector and its backup.\nThis is mostly harmless. Differences: (offset:original/backup)\n  65:01/00\n  Not automatically fixing this.\nDirty bit is set. Fs was not properly unmounted and some data may be corrupt.\n Automatically removing dirty bit.\nLeaving filesystem unchanged.\n/dev/loop0p1: 12 files, 23875/516188 clusters\n";
        assert!(only_fat_dirty_bit(dirty));
        let broken = "fsck.fat 4.2 (2021-01-31)\nDirty bit is set.\n/EFI/debian/grubx64.efi\n  File size is 4096 bytes, cluster chain length is 0 bytes.\n  Truncating file to 0 bytes.\n";
        assert!(!only_fat_dirty_bit(broken));
        assert!(!only_fat_dirty_bit(
            "fsck.fat 4.2\n/dev/x: 1 files, 1/2 clusters\n"
        ));
    }
}
