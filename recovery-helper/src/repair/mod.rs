//! Boot-in-Cloud repair: make a guest copied from another hypervisor (VMware, Hyper-V, Xen)
//! boot on KVM — virtio drivers in the initramfs, stable device names, BIOS boot next to UEFI,
//! DHCP networking, the old hypervisor's agents off.
//!
//! It is done after the fact, on the copied disks, with nothing installed on the source. See
//! `docs/repair.md` for the steps, what each changes and why.
//!
//! **It mounts untrusted guest file systems and runs the guest's own tools in a chroot**, so it
//! runs only on a disposable helper host: one that says so with the marker file
//! [`DISPOSABLE_MARKER`], or when the operator passes an explicit flag.
//!
//! The run, in order:
//! 1. attach the disks (loop devices for image files), read their partition tables, probe
//!    their file systems ([`disks`]);
//! 2. check every file system ([`fsck`]), refusing damaged ones;
//! 3. find the root (the one Linux file system with os-release and fstab), identify the OS
//!    ([`guest`]), mount root and the guest's other local file systems as its fstab says; the
//!    ESP is never mounted, it is edited with mtools ([`esp`]);
//! 4. the steps: [`devnames`], [`network`], [`services`] (hypervisor tools, cloud-init, device
//!    caches), [`initramfs`], [`boot`] (UEFI → BIOS, grub.cfg, EFI fallback loader);
//! 5. unmount, check every file system again.
//!
//! Every step reports what it changed and is idempotent: a second run changes nothing. Every
//! file rewritten or removed is backed up inside the guest first ([`guestfs`]).

pub mod boot;
pub mod devnames;
pub mod disks;
pub mod esp;
pub mod fsck;
pub mod guest;
pub mod guestfs;
pub mod initramfs;
pub mod network;
pub mod services;
pub mod sys;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use serde::Serialize;
use tracing::{info, warn};

use disks::{Layout, Volume};
use guest::{FstabEntry, OsInfo};
use guestfs::GuestFs;
use sys::{AttachedDisk, Mount};

/// The marker file that declares a host disposable (a recovery helper VM).
pub const DISPOSABLE_MARKER: &str = "/etc/tern/disposable-helper";

/// Why a repair failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The repair will not proceed; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    /// A check after a change failed.
    #[error("{0}")]
    Check(String),
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A tool could not be started.
    #[error("failed to run {command}")]
    Spawn {
        /// The tool.
        command: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{command} failed (exit {}): {stderr}", status.map_or("by a signal".to_owned(), |s| s.to_string()))]
    Command {
        /// The tool.
        command: String,
        /// Its exit status.
        status: Option<i32>,
        /// The end of its error output.
        stderr: String,
    },
}

/// What to do with static network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkMode {
    /// Static addresses become DHCP, matched by NIC pattern rather than name (the default).
    Dhcp,
    /// Keep static addresses; pin NIC names by MAC address with udev rules.
    KeepStatic {
        /// (old NIC name, new MAC address).
        pins: Vec<(String, String)>,
    },
}

/// How to run a repair.
#[derive(Debug, Clone)]
pub struct RepairOptions {
    /// The guest's disks (block devices or raw image files), in the guest's disk order.
    pub disks: Vec<PathBuf>,
    /// The operator declares this host disposable (instead of the marker file).
    pub disposable_host: bool,
    /// Network handling.
    pub network: NetworkMode,
    /// Use this device as the root file system (when several are found).
    pub root: Option<PathBuf>,
    /// Where the helper's own GRUB i386-pc modules are.
    pub grub_pc_dir: PathBuf,
    /// A private work directory (mount points).
    pub work_dir: PathBuf,
}

impl RepairOptions {
    /// Options with the defaults for `disks`.
    pub fn new(disks: Vec<PathBuf>) -> Self {
        Self {
            disks,
            disposable_host: false,
            network: NetworkMode::Dhcp,
            root: None,
            grub_pc_dir: PathBuf::from("/usr/lib/grub/i386-pc"),
            work_dir: PathBuf::from("/run/tern-repair"),
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// The step.
    pub name: &'static str,
    /// Whether it changed anything.
    pub changed: bool,
    /// What it changed.
    pub actions: Vec<String>,
    /// What it found or left alone, and why.
    pub notes: Vec<String>,
}

impl StepReport {
    /// An empty report for step `name`.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            changed: false,
            actions: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Records a change.
    pub fn act(&mut self, what: String) {
        info!(step = self.name, "{what}");
        self.changed = true;
        self.actions.push(what);
    }

    /// Records an observation.
    pub fn note(&mut self, what: String) {
        self.notes.push(what);
    }
}

/// One disk in the report.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// As given.
    pub source: PathBuf,
    /// Its partition table.
    pub layout: Layout,
    /// What is on it.
    pub volumes: Vec<Volume>,
}

/// The JSON report of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Report format version.
    pub format: u32,
    /// Whether anything changed.
    pub changed: bool,
    /// The guest.
    pub os: OsInfo,
    /// The root file system's device.
    pub root: PathBuf,
    /// The disks.
    pub disks: Vec<DiskReport>,
    /// The steps, in order.
    pub steps: Vec<StepReport>,
    /// Where the backups are inside the guest (when anything was backed up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_dir: Option<String>,
    /// The guest files backed up.
    pub backups: Vec<String>,
    /// Wall time.
    pub elapsed_ms: u64,
}

/// What the steps work on.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The guest's files.
    pub fs: GuestFs,
    /// The guest's OS.
    pub os: OsInfo,
    /// Every volume on every disk.
    pub volumes: Vec<Volume>,
    /// The attached disks.
    pub disks: &'a [AttachedDisk],
    /// The disk that holds /boot (or root).
    pub boot_disk: usize,
    /// The volume that holds /boot (or root).
    pub boot_volume: usize,
    /// The ESP, if any.
    pub esp: Option<usize>,
    /// The options.
    pub opts: &'a RepairOptions,
    /// A private scratch directory on the helper.
    pub scratch: PathBuf,
}

impl Ctx<'_> {
    /// Runs a guest command in a chroot, with a clean environment; failure is an error.
    pub fn chroot(&self, args: &[&str]) -> Result<Output, Error> {
        let mut all: Vec<&std::ffi::OsStr> = vec![
            self.fs.root().as_os_str(),
            "/usr/bin/env".as_ref(),
            "-i".as_ref(),
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".as_ref(),
            "LC_ALL=C".as_ref(),
            "HOME=/root".as_ref(),
            "TMPDIR=/tmp".as_ref(),
            "DEBIAN_FRONTEND=noninteractive".as_ref(),
        ];
        all.extend(args.iter().map(std::ffi::OsStr::new));
        sys::run("chroot", all).map_err(|e| match e {
            Error::Command { status, stderr, .. } => Error::Command {
                command: format!("{} (in the guest)", args.join(" ")),
                status,
                stderr,
            },
            e => e,
        })
    }

    /// The stable name (`UUID=…`, else `LABEL=…`) of what a hypervisor device name pointed at.
    pub fn stable_name_for(&self, name: &str) -> Option<String> {
        let (disk, part) = guest::parse_device_name(name)?;
        let v = self
            .volumes
            .iter()
            .find(|v| v.disk == disk && v.partition.as_ref().map(|p| p.number) == part)?;
        v.probe
            .uuid
            .as_ref()
            .map(|u| format!("UUID={u}"))
            .or_else(|| v.probe.label.as_ref().map(|l| format!("LABEL={l}")))
    }

    /// The partition number of the boot volume on the boot disk.
    pub fn boot_partition(&self) -> Option<u32> {
        self.volumes[self.boot_volume]
            .partition
            .as_ref()
            .map(|p| p.number)
    }
}

/// Finds the volume an fstab spec names.
pub fn volume_for_spec(volumes: &[Volume], spec: &str) -> Option<usize> {
    let eq = |a: &Option<String>, b: &str| a.as_deref().is_some_and(|a| a.eq_ignore_ascii_case(b));
    let by = |key: &str| -> Option<String> {
        spec.strip_prefix(&format!("{key}="))
            .map(|v| v.trim_matches('"').to_owned())
            .or_else(|| {
                let dir = match key {
                    "UUID" => "/dev/disk/by-uuid/",
                    "LABEL" => "/dev/disk/by-label/",
                    "PARTUUID" => "/dev/disk/by-partuuid/",
                    _ => return None,
                };
                spec.strip_prefix(dir).map(str::to_owned)
            })
    };
    if let Some(u) = by("UUID") {
        return volumes.iter().position(|v| eq(&v.probe.uuid, &u));
    }
    if let Some(l) = by("LABEL") {
        return volumes
            .iter()
            .position(|v| v.probe.label.as_deref() == Some(l.as_str()));
    }
    if let Some(p) = by("PARTUUID") {
        return volumes.iter().position(|v| eq(&v.probe.partuuid, &p));
    }
    let (disk, part) = guest::parse_device_name(spec)?;
    volumes
        .iter()
        .position(|v| v.disk == disk && v.partition.as_ref().map(|p| p.number) == part)
}

/// Mounts in a stack, unmounted in reverse order when dropped.
#[derive(Default)]
struct MountStack(Vec<Mount>);

impl MountStack {
    fn unmount_all(&mut self) -> Result<(), Error> {
        while let Some(m) = self.0.pop() {
            m.unmount()?;
        }
        Ok(())
    }
}

impl Drop for MountStack {
    fn drop(&mut self) {
        while let Some(m) = self.0.pop() {
            drop(m);
        }
    }
}

/// /dev/disk/by-uuid (and by-partuuid) links udev would make, for the guest's tools
/// (grub-mkconfig writes root=UUID= only when it finds them). Removed on drop.
struct DiskLinks(Vec<PathBuf>);

impl DiskLinks {
    fn create(volumes: &[Volume]) -> Result<Self, Error> {
        let mut made = Vec::new();
        for v in volumes {
            for (dir, id) in [
                ("/dev/disk/by-uuid", &v.probe.uuid),
                ("/dev/disk/by-partuuid", &v.probe.partuuid),
            ] {
                let Some(id) = id else { continue };
                if id.contains('/') {
                    continue;
                }
                let link = Path::new(dir).join(id);
                if std::fs::symlink_metadata(&link).is_ok() {
                    continue;
                }
                std::fs::create_dir_all(dir)
                    .and_then(|_| std::os::unix::fs::symlink(&v.device, &link))
                    .map_err(|e| Error::Io {
                        what: format!("creating {}", link.display()),
                        source: e,
                    })?;
                made.push(link);
            }
        }
        Ok(Self(made))
    }
}

impl Drop for DiskLinks {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = std::fs::remove_file(l);
        }
    }
}

fn preflight(opts: &RepairOptions) -> Result<(), Error> {
    if !rustix::process::geteuid().is_root() {
        return Err(Error::Refused("the repair must run as root".to_owned()));
    }
    if !opts.disposable_host && !Path::new(DISPOSABLE_MARKER).exists() {
        return Err(Error::Refused(format!(
            "the repair mounts untrusted guest file systems and runs guest programs; run it only on a disposable helper host: create {DISPOSABLE_MARKER} there, or pass --disposable-host"
        )));
    }
    if opts.disks.is_empty() {
        return Err(Error::Refused("no disk given".to_owned()));
    }
    for tool in ["losetup", "partx", "blkid", "mount", "umount", "chroot"] {
        if !sys::have(tool) {
            return Err(Error::Refused(format!("{tool} is not installed on this helper")));
        }
    }
    Ok(())
}

fn mount_volume(v: &Volume, target: &Path, read_only: bool, subvol: Option<&str>) -> Result<Mount, Error> {
    let fstype = v.probe.fstype.as_deref();
    let mut o: Vec<String> = Vec::new();
    if read_only {
        o.push("ro".into());
    }
    if fstype == Some("xfs") {
        o.push("nouuid".into());
    }
    if let Some(s) = subvol {
        o.push(format!("subvol={s}"));
    }
    let options = (!o.is_empty()).then(|| o.join(","));
    Mount::new(&v.device, target, fstype, options.as_deref())
}

/// Looks for the guest's root: the Linux file systems with os-release and fstab. Returns the
/// volume and, on btrfs, the subvolume.
fn find_root(
    volumes: &[Volume],
    opts: &RepairOptions,
    work: &Path,
) -> Result<(usize, Option<String>), Error> {
    let probe_dir = work.join("probe");
    std::fs::create_dir_all(&probe_dir).map_err(|e| Error::Io {
        what: format!("creating {}", probe_dir.display()),
        source: e,
    })?;
    let mut found = Vec::new();
    for (i, v) in volumes.iter().enumerate() {
        if !v.is_linux_fs() {
            continue;
        }
        if opts.root.as_ref().is_some_and(|r| r != &v.device) {
            continue;
        }
        let m = match mount_volume(v, &probe_dir, true, None) {
            Ok(m) => m,
            Err(e) => {
                warn!(device = %v.device.display(), error = %e, "could not mount to look for a root");
                continue;
            }
        };
        let g = GuestFs::new(m.target(), "probe");
        let is_root = |prefix: &str| -> bool {
            (g.exists(&format!("{prefix}/etc/os-release")).unwrap_or(false)
                || g.exists(&format!("{prefix}/usr/lib/os-release")).unwrap_or(false))
                && g.exists(&format!("{prefix}/etc/fstab")).unwrap_or(false)
        };
        if is_root("") {
            found.push((i, None));
        } else if v.probe.fstype.as_deref() == Some("btrfs")
            && let Some(sub) = ["@", "@root", "root"]
                .into_iter()
                .find(|s| is_root(&format!("/{s}")))
        {
            found.push((i, Some(sub.to_owned())));
        }
        m.unmount()?;
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => {
            let lvm = volumes
                .iter()
                .any(|v| v.probe.fstype.as_deref() == Some("LVM2_member"));
            Err(Error::Refused(
                if lvm && !Path::new("/dev/mapper/control").exists() {
                    "no Linux root file system on the given disks; it may be inside LVM, and this helper has no device-mapper to activate it".to_owned()
                } else {
                    "no Linux root file system (with /etc/os-release and /etc/fstab) on the given disks"
                        .to_owned()
                },
            ))
        }
        _ => Err(Error::Refused(format!(
            "several Linux root file systems ({}); choose one with --root",
            found
                .iter()
                .map(|(i, _)| volumes[*i].device.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Runs a repair. See the module documentation.
pub fn repair(opts: &RepairOptions) -> Result<Report, Error> {
    let started = Instant::now();
    preflight(opts)?;
    let work = opts.work_dir.join(std::process::id().to_string());
    std::fs::create_dir_all(&work).map_err(|e| Error::Io {
        what: format!("creating {}", work.display()),
        source: e,
    })?;
    let result = repair_in(opts, &work, started);
    let _ = std::fs::remove_dir_all(work.join("probe"));
    let _ = std::fs::remove_dir(work.join("root"));
    let _ = std::fs::remove_dir_all(work.join("scratch"));
    let _ = std::fs::remove_dir(&work);
    result
}

fn repair_in(opts: &RepairOptions, work: &Path, started: Instant) -> Result<Report, Error> {
    let mut attached = Vec::new();
    for d in &opts.disks {
        attached.push(AttachedDisk::attach(d)?);
    }
    let mounted = sys::mounted_sources();
    let mut volumes = Vec::new();
    let mut layouts = Vec::new();
    for (i, d) in attached.iter().enumerate() {
        let layout = disks::read_layout(&d.device)?;
        let devs: Vec<(Option<disks::Partition>, PathBuf)> = if layout.partitions.is_empty() {
            vec![(None, d.device.clone())]
        } else {
            layout
                .partitions
                .iter()
                .map(|p| (Some(p.clone()), d.partition_device(p.number)))
                .collect()
        };
        for (partition, device) in devs {
            // devtmpfs makes the nodes of a re-read table as the kernel adds the partitions.
            let appear = Instant::now() + std::time::Duration::from_secs(5);
            while !device.exists() && Instant::now() < appear {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            if !device.exists() {
                return Err(Error::Check(format!(
                    "{} is missing after partx read the partition table",
                    device.display()
                )));
            }
            let dev_text = device.to_string_lossy().into_owned();
            if mounted.contains(&dev_text) {
                return Err(Error::Refused(format!(
                    "{dev_text} is mounted on this helper; it must not be in use"
                )));
            }
            let probe = disks::probe(&device)?;
            volumes.push(Volume {
                disk: i,
                partition,
                device,
                probe,
            });
        }
        layouts.push(layout);
    }
    let mut fsck_before = StepReport::new("fsck-before");
    for v in &volumes {
        match fsck::before(v, work)? {
            fsck::Before::Clean => fsck_before.note(format!(
                "{} ({}): clean",
                v.device.display(),
                v.probe.fstype.as_deref().unwrap_or("?")
            )),
            fsck::Before::Fixed(what) => fsck_before.act(format!("{}: {what}", v.device.display())),
            fsck::Before::NotChecked => {}
        }
    }
    let (root_index, subvol) = find_root(&volumes, opts, work)?;
    let root_dir = work.join("root");
    std::fs::create_dir_all(&root_dir).map_err(|e| Error::Io {
        what: format!("creating {}", root_dir.display()),
        source: e,
    })?;
    let mut mounts = MountStack::default();
    mounts.0.push(mount_volume(
        &volumes[root_index],
        &root_dir,
        false,
        subvol.as_deref(),
    )?);
    let run_id = chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let fs = GuestFs::new(&root_dir, &run_id);
    let os_text = match fs.read("/etc/os-release")? {
        Some(t) => t,
        None => fs.read("/usr/lib/os-release")?.unwrap_or_default(),
    };
    let os = OsInfo::parse(&os_text);
    info!(os = %os.pretty_name, root = %volumes[root_index].device.display(), "found the guest");
    let fstab = guest::parse_fstab(&fs.read("/etc/fstab")?.unwrap_or_default());
    let mut mount_notes = Vec::new();
    let mut entries: Vec<&FstabEntry> = fstab
        .iter()
        .filter(|e| e.file.starts_with('/') && e.file != "/" && !e.noauto())
        .filter(|e| {
            matches!(
                e.vfstype.as_str(),
                "ext2" | "ext3" | "ext4" | "xfs" | "btrfs" | "auto"
            )
        })
        .collect();
    entries.sort_by_key(|e| Path::new(&e.file).components().count());
    let mut boot_volume = root_index;
    for e in entries {
        let Some(vi) = volume_for_spec(&volumes, &e.spec) else {
            mount_notes.push(format!(
                "fstab: {} ({}) is not on the given disks; not mounted",
                e.file, e.spec
            ));
            continue;
        };
        if !volumes[vi].is_linux_fs() || vi == root_index {
            continue;
        }
        let Some(target) = fs.resolve(&e.file)? else {
            mount_notes.push(format!(
                "fstab: the mount point {} does not exist in the guest; not mounted",
                e.file
            ));
            continue;
        };
        let sub = e
            .options
            .split(',')
            .find_map(|o| o.strip_prefix("subvol="))
            .map(str::to_owned);
        mounts
            .0
            .push(mount_volume(&volumes[vi], &target, false, sub.as_deref())?);
        if e.file == "/boot" {
            boot_volume = vi;
        }
    }
    let esp = fstab
        .iter()
        .filter(|e| matches!(e.file.as_str(), "/boot/efi" | "/efi" | "/boot"))
        .find_map(|e| volume_for_spec(&volumes, &e.spec).filter(|i| volumes[*i].is_esp()))
        .or_else(|| volumes.iter().position(Volume::is_esp));
    for (src, rel, fstype, options) in [
        ("/dev", "/dev", None, Some("bind")),
        ("proc", "/proc", Some("proc"), None),
        ("sysfs", "/sys", Some("sysfs"), None),
        ("tmpfs", "/run", Some("tmpfs"), Some("mode=0755")),
    ] {
        if fs.resolve(rel)?.is_none() {
            fs.mkdir_all(rel)?;
        }
        let target = fs.resolve(rel)?.unwrap_or_else(|| root_dir.join(&rel[1..]));
        mounts
            .0
            .push(Mount::new(Path::new(src), &target, fstype, options)?);
    }
    let links = DiskLinks::create(&volumes)?;
    let scratch = work.join("scratch");
    std::fs::create_dir_all(&scratch).map_err(|e| Error::Io {
        what: format!("creating {}", scratch.display()),
        source: e,
    })?;
    let boot_disk = volumes[boot_volume].disk;
    let mut ctx = Ctx {
        fs,
        os: os.clone(),
        volumes: volumes.clone(),
        disks: &attached,
        boot_disk,
        boot_volume,
        esp,
        opts,
        scratch,
    };
    let mut steps = vec![fsck_before];
    if !mount_notes.is_empty() {
        let mut m = StepReport::new("mount");
        m.notes = mount_notes;
        steps.push(m);
    }
    steps.push(devnames::run(&mut ctx)?);
    steps.push(network::run(&mut ctx)?);
    steps.push(services::hypervisor_tools(&mut ctx)?);
    steps.push(services::cloud_init(&mut ctx)?);
    steps.push(services::caches(&mut ctx)?);
    steps.push(initramfs::run(&mut ctx)?);
    steps.push(boot::run(&mut ctx)?);
    let backups = ctx.fs.backups().to_vec();
    let backup_dir = (!backups.is_empty()).then(|| ctx.fs.backup_dir());
    drop(ctx);
    drop(links);
    mounts.unmount_all()?;
    let _ = sys::run_status("sync", [] as [&str; 0]);
    // The partition table may have changed (BIOS boot partition, GPT → MBR).
    for d in &attached {
        d.rescan()?;
    }
    let mut fsck_after = StepReport::new("fsck-after");
    for v in &volumes {
        if fsck::after(v)? {
            fsck_after.note(format!(
                "{} ({}): clean",
                v.device.display(),
                v.probe.fstype.as_deref().unwrap_or("?")
            ));
        }
    }
    steps.push(fsck_after);
    let mut disk_reports = Vec::new();
    for (i, d) in attached.iter().enumerate() {
        disk_reports.push(DiskReport {
            source: d.source.clone(),
            layout: disks::read_layout(&d.device).unwrap_or_else(|_| layouts[i].clone()),
            volumes: volumes.iter().filter(|v| v.disk == i).cloned().collect(),
        });
    }
    Ok(Report {
        format: 1,
        changed: steps.iter().any(|s| s.changed),
        os,
        root: volumes[root_index].device.clone(),
        disks: disk_reports,
        steps,
        backup_dir,
        backups,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use disks::Probe;

    fn vol(disk: usize, number: u32, uuid: &str, label: Option<&str>) -> Volume {
        Volume {
            disk,
            partition: Some(disks::Partition {
                number,
                start: 2048,
                sectors: 10,
                gpt_type: None,
                mbr_type: Some(0x83),
            }),
            device: PathBuf::from(format!("/dev/loop{disk}p{number}")),
            probe: Probe {
                fstype: Some("ext4".into()),
                uuid: Some(uuid.into()),
                label: label.map(str::to_owned),
                partuuid: Some(format!("p-{uuid}")),
            },
        }
    }

    #[test]
    fn specs() {
        let v = vec![
            vol(0, 1, "aaaa-1111", Some("root")),
            vol(0, 2, "bbbb", None),
            vol(1, 1, "cccc", None),
        ];
        assert_eq!(volume_for_spec(&v, "UUID=AAAA-1111"), Some(0));
        assert_eq!(volume_for_spec(&v, "UUID=\"bbbb\""), Some(1));
        assert_eq!(volume_for_spec(&v, "/dev/disk/by-uuid/cccc"), Some(2));
        assert_eq!(volume_for_spec(&v, "LABEL=root"), Some(0));
        assert_eq!(volume_for_spec(&v, "PARTUUID=p-bbbb"), Some(1));
        assert_eq!(volume_for_spec(&v, "/dev/sdb1"), Some(2));
        assert_eq!(volume_for_spec(&v, "/dev/sda2"), Some(1));
        assert_eq!(volume_for_spec(&v, "/dev/sdc1"), None);
        assert_eq!(volume_for_spec(&v, "UUID=nope"), None);
        assert_eq!(volume_for_spec(&v, "tmpfs"), None);
    }
}
