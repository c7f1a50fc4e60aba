//! The guest's disks as the helper sees them: partition tables (GPT with `gptman`, MBR with
//! `mbrman`) and what `blkid` finds on each partition.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Error;
use super::sys;

/// The EFI system partition type GUID.
pub const ESP_GUID: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// The BIOS boot partition type GUID (where GRUB i386-pc puts its core image on GPT).
pub const BIOS_BOOT_GUID: &str = "21686148-6449-6E6F-744E-656564454649";

/// A GUID in the mixed-endian layout GPT stores on disk.
pub fn guid_bytes(guid: &str) -> Option<[u8; 16]> {
    let hex: String = guid.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut b = [0u8; 16];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    Some(b)
}

/// The kind of partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// GUID partition table.
    Gpt,
    /// DOS/MBR partition table.
    Mbr,
    /// None: a file system on the whole disk, or nothing.
    None,
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// 1-based number, as the kernel numbers it.
    pub number: u32,
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub sectors: u64,
    /// GPT type GUID (upper case, canonical text form).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpt_type: Option<String>,
    /// MBR type byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mbr_type: Option<u8>,
}

impl Partition {
    /// An EFI system partition.
    pub fn is_esp(&self) -> bool {
        self.gpt_type.as_deref() == Some(ESP_GUID) || self.mbr_type == Some(0xef)
    }

    /// A BIOS boot partition.
    pub fn is_bios_boot(&self) -> bool {
        self.gpt_type.as_deref() == Some(BIOS_BOOT_GUID)
    }
}

/// A disk's layout.
#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    /// The table.
    pub table: TableKind,
    /// Logical sector size.
    pub sector_size: u64,
    /// Disk size in bytes.
    pub size: u64,
    /// The partitions, by number.
    pub partitions: Vec<Partition>,
    /// GPT: the first usable sector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_usable: Option<u64>,
    /// Whether the MBR's boot code area (its first 440 bytes) holds anything: a BIOS can only
    /// boot the disk when it does.
    pub mbr_boot_code: bool,
}

fn guid_text(b: &[u8; 16]) -> String {
    let mut b = *b;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    let h: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Reads the partition table of a disk (device or image file).
pub fn read_layout(device: &Path) -> Result<Layout, Error> {
    let mut f = std::fs::File::open(device).map_err(|e| Error::Io {
        what: format!("opening {}", device.display()),
        source: e,
    })?;
    let size = f.seek(SeekFrom::End(0)).map_err(|e| Error::Io {
        what: format!("sizing {}", device.display()),
        source: e,
    })?;
    let mut mbr = [0u8; 512];
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.read_exact(&mut mbr))
        .map_err(|e| Error::Io {
            what: format!("reading the first sector of {}", device.display()),
            source: e,
        })?;
    let mbr_boot_code = mbr[..440].iter().any(|b| *b != 0);
    if let Ok(gpt) = gptman::GPT::find_from(&mut f) {
        let partitions = gpt
            .iter()
            .filter(|(_, p)| p.is_used())
            .map(|(n, p)| Partition {
                number: n,
                start: p.starting_lba,
                sectors: p.ending_lba.saturating_sub(p.starting_lba) + 1,
                gpt_type: Some(guid_text(&p.partition_type_guid)),
                mbr_type: None,
            })
            .collect();
        return Ok(Layout {
            table: TableKind::Gpt,
            sector_size: gpt.sector_size,
            size,
            partitions,
            first_usable: Some(gpt.header.first_usable_lba),
            mbr_boot_code,
        });
    }
    if mbr[510] == 0x55 && mbr[511] == 0xaa {
        f.seek(SeekFrom::Start(0)).map_err(|e| Error::Io {
            what: format!("reading {}", device.display()),
            source: e,
        })?;
        if let Ok(m) = mbrman::MBR::read_from(&mut f, 512) {
            let partitions = m
                .iter()
                .filter(|(_, p)| p.is_used() && !p.is_extended())
                .map(|(n, p)| Partition {
                    number: n as u32,
                    start: u64::from(p.starting_lba),
                    sectors: u64::from(p.sectors),
                    gpt_type: None,
                    mbr_type: Some(p.sys),
                })
                .collect();
            return Ok(Layout {
                table: TableKind::Mbr,
                sector_size: 512,
                size,
                partitions,
                first_usable: None,
                mbr_boot_code,
            });
        }
    }
    Ok(Layout {
        table: TableKind::None,
        sector_size: 512,
        size,
        partitions: Vec::new(),
        first_usable: None,
        mbr_boot_code,
    })
}

/// What `blkid` finds on a block device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// `TYPE` (ext4, xfs, btrfs, vfat, swap, LVM2_member, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    /// `UUID`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// `LABEL`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `PARTUUID`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
}

/// Parses `blkid -o export` output.
pub fn parse_blkid(text: &str) -> Probe {
    let kv: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| kv.get(k).map(|v| v.to_string()).filter(|v| !v.is_empty());
    Probe {
        fstype: get("TYPE"),
        uuid: get("UUID"),
        label: get("LABEL"),
        partuuid: get("PART_ENTRY_UUID").or_else(|| get("PARTUUID")),
    }
}

/// Probes a device with `blkid -p` (low-level, no cache).
pub fn probe(device: &Path) -> Result<Probe, Error> {
    let out = sys::run_status(
        "blkid",
        [
            std::ffi::OsStr::new("-p"),
            std::ffi::OsStr::new("-o"),
            std::ffi::OsStr::new("export"),
            device.as_os_str(),
        ],
    )?;
    match out.status.code() {
        Some(0) => Ok(parse_blkid(&String::from_utf8_lossy(&out.stdout))),
        // 2: nothing recognised.
        Some(2) => Ok(Probe::default()),
        _ => Err(Error::Command {
            command: format!("blkid -p {}", device.display()),
            status: out.status.code(),
            stderr: sys::tail(&out.stderr),
        }),
    }
}

/// A file system (or other content) found on a disk or partition.
#[derive(Debug, Clone, Serialize)]
pub struct Volume {
    /// Index of the disk in the order given.
    pub disk: usize,
    /// The partition, `None` for a whole disk.
    pub partition: Option<Partition>,
    /// Its block device on the helper.
    pub device: PathBuf,
    /// What is on it.
    #[serde(flatten)]
    pub probe: Probe,
}

impl Volume {
    /// Whether it holds a Linux file system the repair can mount.
    pub fn is_linux_fs(&self) -> bool {
        matches!(
            self.probe.fstype.as_deref(),
            Some("ext2" | "ext3" | "ext4" | "xfs" | "btrfs")
        )
    }

    /// Whether it is an EFI system partition with a FAT file system.
    pub fn is_esp(&self) -> bool {
        self.partition.as_ref().is_some_and(Partition::is_esp) && self.probe.fstype.as_deref() == Some("vfat")
    }
}

/// Writes a 64 MiB image file with a protective MBR and a GPT holding `parts` (type GUID,
/// first and last sector), numbered from 1.
#[cfg(test)]
pub(crate) fn gpt_test_image(path: &Path, parts: &[(&str, u64, u64)]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    f.set_len(64 << 20).unwrap();
    let mut gpt = gptman::GPT::new_from(&mut f, 512, [7; 16]).unwrap();
    for (i, (guid, start, end)) in parts.iter().enumerate() {
        let n = u32::try_from(i).unwrap() + 1;
        gpt[n] = gptman::GPTPartitionEntry {
            partition_type_guid: guid_bytes(guid).unwrap(),
            unique_partition_guid: [u8::try_from(n).unwrap(); 16],
            starting_lba: *start,
            ending_lba: *end,
            attribute_bits: 0,
            partition_name: format!("part{n}").as_str().into(),
        };
    }
    gpt.write_into(&mut f).unwrap();
    gptman::GPT::write_protective_mbr_into(&mut f, 512).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_round_trip() {
        let b = guid_bytes(ESP_GUID).unwrap();
        assert_eq!(b[0..4], [0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(guid_text(&b), ESP_GUID);
        assert_eq!(guid_bytes("xyz"), None);
    }

    #[test]
    fn blkid_export() {
        let p =
            parse_blkid("DEVNAME=/dev/loop0p2\nUUID=1234-ABCD\nTYPE=vfat\nPART_ENTRY_UUID=aa-bb\nLABEL=\n");
        assert_eq!(p.fstype.as_deref(), Some("vfat"));
        assert_eq!(p.uuid.as_deref(), Some("1234-ABCD"));
        assert_eq!(p.label, None);
        assert_eq!(p.partuuid.as_deref(), Some("aa-bb"));
    }

    #[test]
    fn layouts_of_images() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.img");
        std::fs::File::create(&empty).unwrap().set_len(64 << 20).unwrap();
        assert_eq!(read_layout(&empty).unwrap().table, TableKind::None);
        let img = dir.path().join("d.img");
        gpt_test_image(&img, &[(ESP_GUID, 2048, 4095)]);
        let l = read_layout(&img).unwrap();
        assert_eq!(l.table, TableKind::Gpt);
        assert_eq!(l.partitions.len(), 1);
        assert!(l.partitions[0].is_esp());
        assert_eq!(l.partitions[0].sectors, 2048);
        assert_eq!(l.first_usable, Some(34));
        assert!(!l.mbr_boot_code);
    }
}
