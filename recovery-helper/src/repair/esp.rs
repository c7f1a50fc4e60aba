//! The EFI system partition, edited with mtools: helper kernels may have no vfat driver, and
//! FUSE FAT drivers lose appended writes, so the ESP is never mounted.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::Error;
use super::sys;

/// An ESP on a block device.
#[derive(Debug)]
pub struct Esp {
    device: PathBuf,
    scratch: PathBuf,
}

fn target(path: &str) -> String {
    format!("::{path}")
}

impl Esp {
    /// The ESP on `device`; `scratch` is a private directory for file transfers.
    pub fn new(device: &Path, scratch: &Path) -> Self {
        Self {
            device: device.to_path_buf(),
            scratch: scratch.to_path_buf(),
        }
    }

    /// Every path under `dir` (recursively; directories end with `/`), as `/EFI/...`. Empty when
    /// `dir` does not exist.
    pub fn list(&self, dir: &str) -> Result<Vec<String>, Error> {
        let out = sys::run_status(
            "mdir",
            [
                OsStr::new("-i"),
                self.device.as_os_str(),
                OsStr::new("-b"),
                OsStr::new("-/"),
                OsStr::new(&target(dir)),
            ],
        )?;
        if !out.status.success() {
            return Ok(Vec::new());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("::").map(str::to_owned))
            .collect())
    }

    /// Finds `path` case-insensitively (FAT is), returning its stored spelling.
    pub fn find(listing: &[String], path: &str) -> Option<String> {
        listing.iter().find(|p| p.eq_ignore_ascii_case(path)).cloned()
    }

    /// Reads a file.
    pub fn read(&self, path: &str) -> Result<Vec<u8>, Error> {
        let tmp = self.scratch.join("esp-read");
        let _ = std::fs::remove_file(&tmp);
        sys::run(
            "mcopy",
            [
                OsStr::new("-n"),
                OsStr::new("-i"),
                self.device.as_os_str(),
                OsStr::new(&target(path)),
                tmp.as_os_str(),
            ],
        )?;
        let data = std::fs::read(&tmp).map_err(|e| Error::Io {
            what: format!("reading {path} copied from the ESP"),
            source: e,
        })?;
        let _ = std::fs::remove_file(&tmp);
        Ok(data)
    }

    /// Creates a directory (and its parents) when missing.
    pub fn mkdir(&self, dir: &str) -> Result<(), Error> {
        let mut cur = String::new();
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            cur.push('/');
            cur.push_str(part);
            if self.list(&cur)?.is_empty() && !self.exists_dir(&cur)? {
                sys::run(
                    "mmd",
                    [
                        OsStr::new("-i"),
                        self.device.as_os_str(),
                        OsStr::new(&target(&cur)),
                    ],
                )?;
            }
        }
        Ok(())
    }

    fn exists_dir(&self, dir: &str) -> Result<bool, Error> {
        let out = sys::run_status(
            "mdir",
            [
                OsStr::new("-i"),
                self.device.as_os_str(),
                OsStr::new("-b"),
                OsStr::new(&target(dir)),
            ],
        )?;
        Ok(out.status.success())
    }

    /// Writes a file (replacing it).
    pub fn write(&self, path: &str, data: &[u8]) -> Result<(), Error> {
        let tmp = self.scratch.join("esp-write");
        std::fs::write(&tmp, data).map_err(|e| Error::Io {
            what: format!("staging {path} for the ESP"),
            source: e,
        })?;
        sys::run(
            "mcopy",
            [
                OsStr::new("-o"),
                OsStr::new("-i"),
                self.device.as_os_str(),
                tmp.as_os_str(),
                OsStr::new(&target(path)),
            ],
        )?;
        let _ = std::fs::remove_file(&tmp);
        Ok(())
    }
}
