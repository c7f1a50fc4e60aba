//! Guest VMs for the Boot-in-Cloud repair tests: the fixture disks of `scripts/guest-fixture`
//! (Debian 12 shaped like VMs installed on VMware; `docs/guest-fixtures.md`) booted by a real
//! `qemu-system-x86_64` (TCG) with the firmware, disk bus and NIC of the target cloud, and their
//! serial console read back.
//!
//! Each fixture prints one [`Marker`] line on its serial console once it is up (after
//! `network-online.target`): its shape, the boot mode, the state of `open-vm-tools`, the root
//! device, the NICs and the IPv4 addresses. A boot under TCG takes about a minute (more when the
//! guest waits for a network that does not come up), so give [`Vm::wait_for`] minutes.
//!
//! ```no_run
//! use std::time::Duration;
//! use tern_tests::vm::{self, BootMode, Bus, Firmware, Nic, Vm, VmConfig};
//!
//! # fn main() -> anyhow::Result<()> {
//! if let Some(why) = vm::unavailable(&["debian12-vmware"]) {
//!     eprintln!("skipped: {why}");
//!     return Ok(());
//! }
//! let fixture = vm::fixture_image("debian12-vmware")?; // built once, then cached
//! let dir = tempfile::tempdir()?;
//! let disk = dir.path().join("sda.raw");
//! vm::sparse_copy(&fixture, &disk)?; // never boot the cached image itself
//! // ... repair `disk` for KVM here ...
//! let config = VmConfig::new(Firmware::Uefi)
//!     .disk(&disk, Bus::Virtio)
//!     .nic(Nic::VirtioNet);
//! let vm = Vm::start(&config, &dir.path().join("vm"))?;
//! let marker = vm.wait_for_marker(Duration::from_secs(600))?;
//! assert_eq!(marker.boot, BootMode::Uefi);
//! assert_eq!(marker.root.as_deref(), Some("/dev/vda2"));
//! assert!(!marker.ip4.is_empty(), "no address: {}", vm.serial_log());
//! # Ok(())
//! # }
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{is_root, qemu};

/// The fixture shapes `scripts/guest-fixture list` prints.
pub const SHAPES: &[&str] = &["debian12-vmware", "debian12-dracut-xfs"];

/// OVMF's code (read-only pflash); `TERN_OVMF_CODE` overrides it.
pub fn ovmf_code() -> PathBuf {
    std::env::var_os("TERN_OVMF_CODE")
        .map_or_else(|| PathBuf::from("/usr/share/OVMF/OVMF_CODE.fd"), PathBuf::from)
}

/// OVMF's empty variable store, copied for each VM; `TERN_OVMF_VARS` overrides it.
pub fn ovmf_vars() -> PathBuf {
    std::env::var_os("TERN_OVMF_VARS")
        .map_or_else(|| PathBuf::from("/usr/share/OVMF/OVMF_VARS.fd"), PathBuf::from)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest-fixture")
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Why guest VMs of `shapes` can't run here, or `None`: QEMU or OVMF missing, or a fixture that
/// is not built yet and no root to build it.
pub fn unavailable(shapes: &[&str]) -> Option<String> {
    if let Some(t) = qemu::missing(&["qemu-system-x86_64", "mcopy"]) {
        return Some(format!(
            "{t} is missing (scripts/install-deps installs qemu-system-x86 and mtools)"
        ));
    }
    for f in [ovmf_code(), ovmf_vars()] {
        if !f.exists() {
            return Some(format!(
                "{} is missing (scripts/install-deps installs ovmf)",
                f.display()
            ));
        }
    }
    if !is_root()
        && let Some(s) = shapes.iter().find(|s| cached_fixture(s).is_none())
    {
        return Some(format!(
            "guest fixture {s} is not built and building it needs root (scripts/guest-fixture build {s})"
        ));
    }
    None
}

/// The cached image of `shape` if it is built (no root needed).
pub fn cached_fixture(shape: &str) -> Option<PathBuf> {
    let out = Command::new(script())
        .args(["path", shape])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last()?);
    (out.status.success() && path.is_file()).then_some(path)
}

/// The fixture disk image of `shape` (`scripts/guest-fixture build SHAPE`): built the first time
/// (root, network access to deb.debian.org, about a minute or two), then the cached file. The
/// cached image is shared by all tests: boot a [`sparse_copy`] of it.
pub fn fixture_image(shape: &str) -> Result<PathBuf> {
    let started = Instant::now();
    let out = Command::new(script())
        .args(["build", shape])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script().display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "scripts/guest-fixture build {shape} failed with {}; its last output:\n{}",
            out.status,
            tail(&stderr, 60)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let Some(path) = stdout.lines().last().map(PathBuf::from) else {
        bail!(
            "scripts/guest-fixture build {shape} printed no path; stderr:\n{}",
            tail(&stderr, 60)
        );
    };
    if !path.is_file() {
        bail!(
            "scripts/guest-fixture build {shape} printed {}, which is no file",
            path.display()
        );
    }
    if started.elapsed() > Duration::from_secs(5) {
        eprintln!(
            "guest fixture {shape}: built {} in {:.0?}",
            path.display(),
            started.elapsed()
        );
    }
    Ok(path)
}

/// `cp --sparse=always SRC DST`: a private copy of a fixture to repair and boot.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<()> {
    crate::run_ok(Command::new("cp").arg("--sparse=always").arg(src).arg(dst))?;
    Ok(())
}

/// Adds the removable-media boot path to the ESP of `image` (a copy!): `EFI/BOOT/BOOTX64.EFI`
/// (shim) with `grubx64.efi` and `grub.cfg` from `EFI/debian/`. A fresh OVMF variable store has no
/// boot entry for `EFI/debian/shimx64.efi` (the VMware VM's NVRAM had one), so without this an
/// unrepaired fixture does not boot under OVMF. No root needed (mtools at the ESP's offset).
pub fn add_uefi_fallback(image: &Path) -> Result<()> {
    crate::run_ok(Command::new(script()).arg("uefi-fallback").arg(image))?;
    Ok(())
}

/// The VM's firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (QEMU's default): legacy BIOS boot from the MBR.
    Bios,
    /// OVMF with a fresh copy of its variable store (no boot entries: the firmware boots the
    /// removable path `EFI/BOOT/BOOTX64.EFI` of the first disk's ESP).
    Uefi,
}

/// How a disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// `virtio-blk-pci` (the guest sees `/dev/vdX`): what KVM clouds give.
    Virtio,
    /// A SATA disk on an AHCI controller (`/dev/sdX`, driver `ahci`): the fixtures' native disk.
    Ahci,
    /// `virtio-scsi-pci` (`/dev/sdX`, driver `virtio_scsi`).
    VirtioScsi,
    /// VMware's paravirtual SCSI (`pvscsi`; `/dev/sdX`, driver `vmw_pvscsi`). SeaBIOS can boot
    /// from it; Debian 12's OVMF has no driver for it (no boot entry).
    Pvscsi,
}

/// A NIC on QEMU's user-mode network (10.0.2.0/24, DHCP from 10.0.2.2, DNS 10.0.2.3). Its
/// option ROM is off: firmware does not try to boot from the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nic {
    /// `virtio-net-pci` (driver `virtio_net`).
    VirtioNet,
    /// Intel 82540EM (driver `e1000`).
    E1000,
    /// VMware's `vmxnet3`.
    Vmxnet3,
}

/// One disk of a VM, in boot order.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The image.
    pub path: PathBuf,
    /// How it is attached.
    pub bus: Bus,
    /// Its format: `raw` (default), or e.g. `qcow2` for an overlay on a raw fixture copy.
    pub format: String,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Firmware.
    pub firmware: Firmware,
    /// QEMU machine type, default `q35`.
    pub machine: String,
    /// Memory in MiB, default 1024.
    pub memory_mib: u32,
    /// vCPUs, default 1 (TCG runs one host thread per vCPU).
    pub cpus: u32,
    /// Disks, in boot order (QEMU locks them while it runs).
    pub disks: Vec<Disk>,
    /// The NIC, if any.
    pub nic: Option<Nic>,
    /// `-no-reboot`: QEMU exits when the guest reboots (and [`Vm::wait_for`] fails at once).
    pub no_reboot: bool,
    /// More arguments for `qemu-system-x86_64`, appended last.
    pub extra_args: Vec<String>,
}

impl VmConfig {
    /// `firmware`, q35, 1024 MiB, one vCPU, no disk, no NIC.
    pub fn new(firmware: Firmware) -> Self {
        Self {
            firmware,
            machine: "q35".into(),
            memory_mib: 1024,
            cpus: 1,
            disks: Vec::new(),
            nic: None,
            no_reboot: false,
            extra_args: Vec::new(),
        }
    }

    /// Adds a raw disk (boot order is the order of the calls).
    #[must_use]
    pub fn disk(self, path: &Path, bus: Bus) -> Self {
        self.disk_as(path, bus, "raw")
    }

    /// Adds a disk of `format` (`raw`, `qcow2`, ...).
    #[must_use]
    pub fn disk_as(mut self, path: &Path, bus: Bus, format: &str) -> Self {
        self.disks.push(Disk {
            path: path.to_owned(),
            bus,
            format: format.to_owned(),
        });
        self
    }

    /// Sets the NIC.
    #[must_use]
    pub fn nic(mut self, nic: Nic) -> Self {
        self.nic = Some(nic);
        self
    }

    /// Appends arguments for `qemu-system-x86_64`.
    #[must_use]
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The `qemu-system-x86_64` arguments for a VM whose files are in `dir`.
    pub fn qemu_args(&self, dir: &Path) -> Vec<String> {
        // QEMU option values escape commas by doubling them.
        let p = |p: &Path| p.display().to_string().replace(',', ",,");
        let mut a: Vec<String> = [
            "-accel",
            "tcg",
            "-machine",
            &self.machine,
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.cpus.to_string(),
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-monitor",
            "none",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        a.push("-chardev".into());
        a.push(format!("file,id=serial0,path={}", p(&dir.join("serial.log"))));
        a.extend(["-serial".into(), "chardev:serial0".into()]);
        // SeaBIOS writes its log to I/O port 0x402.
        a.push("-chardev".into());
        a.push(format!("file,id=fwlog,path={}", p(&dir.join("firmware.log"))));
        a.extend(["-device".into(), "isa-debugcon,iobase=0x402,chardev=fwlog".into()]);
        if self.firmware == Firmware::Uefi {
            a.push("-drive".into());
            a.push(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                p(&ovmf_code())
            ));
            a.push("-drive".into());
            a.push(format!(
                "if=pflash,format=raw,unit=1,file={}",
                p(&dir.join("OVMF_VARS.fd"))
            ));
        }
        let mut controllers = Vec::new();
        let mut ahci_port = 0;
        for (i, d) in self.disks.iter().enumerate() {
            a.push("-drive".into());
            a.push(format!(
                "if=none,id=disk{i},format={},file={}",
                d.format,
                p(&d.path)
            ));
            let dev = match d.bus {
                Bus::Virtio => format!("virtio-blk-pci,drive=disk{i}"),
                Bus::Ahci => {
                    ahci_port += 1;
                    format!("ide-hd,drive=disk{i},bus=ahci0.{}", ahci_port - 1)
                }
                Bus::VirtioScsi => format!("scsi-hd,drive=disk{i},bus=vscsi0.0"),
                Bus::Pvscsi => format!("scsi-hd,drive=disk{i},bus=pvscsi0.0"),
            };
            let controller = match d.bus {
                Bus::Virtio => None,
                Bus::Ahci => Some("ahci,id=ahci0"),
                Bus::VirtioScsi => Some("virtio-scsi-pci,id=vscsi0"),
                Bus::Pvscsi => Some("pvscsi,id=pvscsi0"),
            };
            if let Some(c) = controller
                && !controllers.contains(&c)
            {
                controllers.push(c);
                a.extend(["-device".into(), c.into()]);
            }
            a.extend(["-device".into(), format!("{dev},bootindex={i}")]);
        }
        if let Some(nic) = self.nic {
            let model = match nic {
                Nic::VirtioNet => "virtio-net-pci",
                Nic::E1000 => "e1000",
                Nic::Vmxnet3 => "vmxnet3",
            };
            a.extend(["-netdev".into(), "user,id=net0".into()]);
            a.extend(["-device".into(), format!("{model},netdev=net0,romfile=")]);
        }
        if self.no_reboot {
            a.push("-no-reboot".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A running `qemu-system-x86_64`, killed (and reaped) on drop. Its files are in its directory:
/// `serial.log` (the guest's ttyS0), `firmware.log` (SeaBIOS's debug console), `qemu.log`
/// (QEMU's own output), `OVMF_VARS.fd` (UEFI).
#[derive(Debug)]
pub struct Vm {
    child: Mutex<Child>,
    dir: PathBuf,
    started: Instant,
}

impl Vm {
    /// Starts a VM with its files in `dir` (created; a previous serial log there is removed),
    /// which is also QEMU's working directory (relative paths are made absolute first).
    pub fn start(config: &VmConfig, dir: &Path) -> Result<Self> {
        if let Some(t) = qemu::missing(&["qemu-system-x86_64"]) {
            bail!("{t} is missing (scripts/install-deps installs qemu-system-x86)");
        }
        let dir = &std::path::absolute(dir)?;
        let mut config = config.clone();
        for d in &mut config.disks {
            d.path = std::path::absolute(&d.path)?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in ["serial.log", "firmware.log"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        if config.firmware == Firmware::Uefi {
            let vars = ovmf_vars();
            std::fs::copy(&vars, dir.join("OVMF_VARS.fd"))
                .with_context(|| format!("copying {} (package ovmf)", vars.display()))?;
        }
        for d in &config.disks {
            if !d.path.is_file() {
                bail!("disk {} does not exist", d.path.display());
            }
        }
        let log = std::fs::File::create(dir.join("qemu.log"))?;
        let args = config.qemu_args(dir);
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        Ok(Self {
            child: Mutex::new(child),
            dir: dir.to_owned(),
            started: Instant::now(),
        })
    }

    /// The VM's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Everything the guest wrote to its serial console so far (raw: with `\r` and terminal
    /// escape sequences; invalid UTF-8 replaced).
    pub fn serial_log(&self) -> String {
        std::fs::read(self.dir.join("serial.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// SeaBIOS's debug log so far (OVMF's release build writes little or nothing there).
    pub fn firmware_log(&self) -> String {
        std::fs::read(self.dir.join("firmware.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// QEMU's exit status once it has exited.
    pub fn try_exit_status(&self) -> Result<Option<ExitStatus>> {
        let mut c = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(c.try_wait()?)
    }

    /// Waits until a complete line of the serial console (terminal escape sequences removed)
    /// contains `needle`, and returns that line (the first such). Fails after `timeout`, or as
    /// soon as QEMU exits, with the last 40 lines of the console.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the log before checking QEMU, so that a line written just before an exit
            // counts.
            let exited = self.try_exit_status()?;
            let text = clean(&self.serial_log());
            if let Some(line) = complete_lines(&text).find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            if let Some(status) = exited {
                let qemu_log = std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
                bail!(
                    "QEMU exited ({status}) after {:.0?} before {needle:?} appeared on the serial \
                     console; QEMU said: {}\n{}",
                    self.elapsed(),
                    qemu_log.trim(),
                    self.console_tail(&text)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{needle:?} did not appear on the serial console within {timeout:.0?}; {}",
                    self.console_tail(&text)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The last 40 lines of the (cleaned) serial console `text` for an error message, or, when
    /// the guest wrote nothing there, the end of the firmware's log.
    fn console_tail(&self, text: &str) -> String {
        if text.trim().is_empty() {
            format!(
                "the serial console ({}) is empty; the end of the firmware log ({}):\n{}",
                self.dir.join("serial.log").display(),
                self.dir.join("firmware.log").display(),
                tail(&clean(&self.firmware_log()), 15)
            )
        } else {
            format!(
                "the last 40 lines of the serial console ({}):\n{}",
                self.dir.join("serial.log").display(),
                tail(text, 40)
            )
        }
    }

    /// Waits for the fixture's [`Marker`] line (see [`Vm::wait_for`]) and parses it.
    pub fn wait_for_marker(&self, timeout: Duration) -> Result<Marker> {
        let line = self.wait_for(Marker::PREFIX, timeout)?;
        Marker::parse(&line).with_context(|| format!("malformed marker line {line:?}"))
    }

    /// Kills QEMU (also done on drop).
    pub fn kill(&self) {
        let mut c = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `text` without terminal escape sequences (CSI `ESC [ ... final`, and other `ESC x` pairs)
/// and carriage returns.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.next() == Some('[') {
                    // Parameters and intermediates, then one final byte in @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// The lines of `text` that end with a newline (the last, unfinished one may still grow).
fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let end = text.rfind('\n').map_or(0, |i| i + 1);
    text[..end].lines()
}

/// How the guest booted (`/sys/firmware/efi` exists or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootMode {
    /// UEFI.
    Uefi,
    /// Legacy BIOS.
    Bios,
}

/// The line a fixture prints on ttyS0 once it is up (`tern-fixture-marker.service`, after
/// `network-online.target`; docs/guest-fixtures.md):
///
/// ```text
/// TERN-FIXTURE-MARKER shape=S boot=UEFI|BIOS vmtools=STATE root=DEV ifaces=A,B|none dhcp=yes|no waited=N ip4=CIDR[ CIDR...]|none
/// ```
///
/// `ip4` comes last and takes the rest of the line; the other fields are `key=value` words, in
/// any order, unknown ones ignored; `shape`, `boot`, `vmtools` and `ip4` are required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The fixture shape (from `/etc/tern-fixture`).
    pub shape: String,
    /// The boot mode.
    pub boot: BootMode,
    /// `systemctl is-enabled open-vm-tools` (`enabled`, `disabled`, `masked`, ...), or
    /// `not-found`.
    pub vmtools: String,
    /// The source of `/` (`/dev/sda2`, `/dev/vda3`, ...).
    pub root: Option<String>,
    /// Network interfaces other than `lo`, by name.
    pub ifaces: Vec<String>,
    /// Whether some DHCP client is configured (ifupdown, systemd-networkd, netplan,
    /// NetworkManager): the guest then waits up to 60 s for an address, else 10 s.
    pub dhcp: Option<bool>,
    /// Seconds the guest waited for a global IPv4 address.
    pub waited_secs: Option<u32>,
    /// Global IPv4 addresses, as `a.b.c.d/len`.
    pub ip4: Vec<String>,
}

impl Marker {
    /// The word that starts the line.
    pub const PREFIX: &'static str = "TERN-FIXTURE-MARKER";
    /// Fails unless this is what a repaired fixture of `shape` shows on SeaBIOS + virtio
    /// (KVM-style hardware): booted by BIOS, root on `/dev/vda*`, VMware tools not enabled, a
    /// DHCP address from QEMU's user network. `log` (the serial log) goes into the message.
    pub fn check_repaired_bios(&self, shape: &str, log: &str) -> Result<()> {
        anyhow::ensure!(
            self.shape == shape,
            "shape {} is not {shape}: {self:?}",
            self.shape
        );
        anyhow::ensure!(self.boot == BootMode::Bios, "not booted by SeaBIOS: {self:?}");
        anyhow::ensure!(
            self.root.as_deref().is_some_and(|r| r.starts_with("/dev/vda")),
            "root not on the virtio disk: {self:?}"
        );
        anyhow::ensure!(self.vmtools != "enabled", "VMware tools still enabled: {self:?}");
        anyhow::ensure!(
            self.ip4.iter().any(|a| a.starts_with("10.0.2.")),
            "no DHCP address: {self:?}\n{log}"
        );
        Ok(())
    }

    /// Parses a marker line (anything before [`Marker::PREFIX`] is ignored: a login prompt may
    /// precede it); `None` unless it is a complete, well-formed one.
    pub fn parse(line: &str) -> Option<Self> {
        let line = clean(line);
        let rest = &line[line.find(Self::PREFIX)? + Self::PREFIX.len()..];
        let (fields, ip4) = match rest.find(" ip4=") {
            Some(i) => (&rest[..i], rest[i + " ip4=".len()..].trim()),
            None => return None,
        };
        let (mut shape, mut boot, mut vmtools) = (None, None, None);
        let (mut root, mut ifaces, mut dhcp, mut waited) = (None, Vec::new(), None, None);
        for word in fields.split_whitespace() {
            let (k, v) = word.split_once('=')?;
            match k {
                "shape" => shape = Some(v.to_owned()),
                "boot" => {
                    boot = Some(match v {
                        "UEFI" => BootMode::Uefi,
                        "BIOS" => BootMode::Bios,
                        _ => return None,
                    });
                }
                "vmtools" => vmtools = Some(v.to_owned()),
                "root" => root = Some(v.to_owned()),
                "ifaces" if v != "none" => ifaces = v.split(',').map(str::to_owned).collect(),
                "dhcp" => dhcp = Some(v == "yes"),
                "waited" => waited = v.parse().ok(),
                _ => {}
            }
        }
        let ip4 = if ip4 == "none" {
            Vec::new()
        } else {
            let v: Vec<String> = ip4.split_whitespace().map(str::to_owned).collect();
            // Each a.b.c.d/len: anything else means the line was garbled.
            let ok = |c: &str| {
                c.split_once('/').is_some_and(|(a, l)| {
                    a.parse::<std::net::Ipv4Addr>().is_ok() && l.parse::<u8>().is_ok_and(|l| l <= 32)
                })
            };
            if v.is_empty() || !v.iter().all(|c| ok(c)) {
                return None;
            }
            v
        };
        Some(Self {
            shape: shape?,
            boot: boot?,
            vmtools: vmtools?,
            root,
            ifaces,
            dhcp,
            waited_secs: waited,
            ip4,
        })
    }
}

impl std::fmt::Display for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = format!(
            "{} shape={} boot={} vmtools={}",
            Self::PREFIX,
            self.shape,
            match self.boot {
                BootMode::Uefi => "UEFI",
                BootMode::Bios => "BIOS",
            },
            self.vmtools
        );
        if let Some(r) = &self.root {
            let _ = write!(s, " root={r}");
        }
        let ifaces = if self.ifaces.is_empty() {
            "none".to_owned()
        } else {
            self.ifaces.join(",")
        };
        let _ = write!(s, " ifaces={ifaces}");
        if let Some(d) = self.dhcp {
            let _ = write!(s, " dhcp={}", if d { "yes" } else { "no" });
        }
        if let Some(w) = self.waited_secs {
            let _ = write!(s, " waited={w}");
        }
        let ip4 = if self.ip4.is_empty() {
            "none".to_owned()
        } else {
            self.ip4.join(" ")
        };
        write!(f, "{s} ip4={ip4}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_lines_parse() {
        // As printed by the debian12-vmware fixture on OVMF with an AHCI disk and an e1000 NIC
        // (no ens192, so no address), after the serial login prompt.
        let line = "tern-debian12-vmware login: TERN-FIXTURE-MARKER shape=debian12-vmware boot=UEFI \
                    vmtools=enabled root=/dev/sda2 ifaces=enp0s2 dhcp=no waited=10 ip4=none\r";
        let m = Marker::parse(line).unwrap();
        assert_eq!(
            m,
            Marker {
                shape: "debian12-vmware".into(),
                boot: BootMode::Uefi,
                vmtools: "enabled".into(),
                root: Some("/dev/sda2".into()),
                ifaces: vec!["enp0s2".into()],
                dhcp: Some(false),
                waited_secs: Some(10),
                ip4: vec![],
            }
        );
        assert_eq!(Marker::parse(&m.to_string()), Some(m));

        let m = Marker::parse(
            "\u{1b}[0mTERN-FIXTURE-MARKER shape=debian12-dracut-xfs boot=BIOS vmtools=not-found \
             root=/dev/vda3 ifaces=ens3,ens4 dhcp=yes waited=4 future=1 ip4=10.0.2.15/24 192.168.7.2/32",
        )
        .unwrap();
        assert_eq!(m.boot, BootMode::Bios);
        assert_eq!(m.vmtools, "not-found");
        assert_eq!(m.ifaces, ["ens3", "ens4"]);
        assert_eq!(m.ip4, ["10.0.2.15/24", "192.168.7.2/32"]);
        assert_eq!(m.dhcp, Some(true));

        // The minimum: shape, boot, vmtools, ip4.
        let m = Marker::parse("TERN-FIXTURE-MARKER shape=x boot=UEFI vmtools=disabled ip4=none").unwrap();
        assert_eq!((m.root, m.ifaces.len(), m.dhcp), (None, 0, None));
    }

    #[test]
    fn malformed_markers_are_rejected() {
        for bad in [
            "",
            "TERN-FIXTURE-DETAIL 1: lo    inet 127.0.0.1/8 scope host lo",
            "TERN-FIXTURE-MARKER shape=x boot=UEFI vmtools=enabled",
            "TERN-FIXTURE-MARKER shape=x boot=EFI vmtools=enabled ip4=none",
            "TERN-FIXTURE-MARKER boot=UEFI vmtools=enabled ip4=none",
            "TERN-FIXTURE-MARKER shape=x boot=UEFI ip4=none",
            "TERN-FIXTURE-MARKER shape=x boot=UEFI vmtools=enabled ip4=",
            // A kernel message glued to the end.
            "TERN-FIXTURE-MARKER shape=x boot=UEFI vmtools=enabled ip4=10.0.2.15/24[   56.3] clocksource",
            "TERN-FIXTURE-MARKER shape=x boot=UEFI vmtools=enabled ip4=10.0.2.15/33",
            "TERN-FIXTURE-MARKER shape=x boot=UEFI vmtools ip4=none",
        ] {
            assert_eq!(Marker::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn escapes_are_removed_and_only_complete_lines_count() {
        let raw = "\u{1b}[2J\u{1b}[01;01H\u{1b}[=3hBdsDxe: loading\r\n\u{1b}[0m\u{1b}[30m\u{1b}[47mWelcome to GRUB!\r\n[  OK  ] Started\r\npartial";
        let text = clean(raw);
        assert_eq!(
            text,
            "BdsDxe: loading\nWelcome to GRUB!\n[  OK  ] Started\npartial"
        );
        let lines: Vec<&str> = complete_lines(&text).collect();
        assert_eq!(lines, ["BdsDxe: loading", "Welcome to GRUB!", "[  OK  ] Started"]);
        assert_eq!(complete_lines("no newline yet").count(), 0);
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
    }

    #[test]
    fn qemu_arguments() {
        let dir = Path::new("/tmp/vm,1");
        let c = VmConfig::new(Firmware::Uefi)
            .disk(Path::new("/d/a.raw"), Bus::Ahci)
            .disk(Path::new("/d/b.raw"), Bus::Ahci)
            .disk_as(Path::new("/d/c.qcow2"), Bus::Virtio, "qcow2")
            .nic(Nic::Vmxnet3)
            .args(["-cpu", "max"]);
        let a = c.qemu_args(dir).join(" ");
        assert!(
            a.contains("-chardev file,id=serial0,path=/tmp/vm,,1/serial.log -serial chardev:serial0"),
            "{a}"
        );
        assert!(
            a.contains("if=pflash,format=raw,unit=1,file=/tmp/vm,,1/OVMF_VARS.fd"),
            "{a}"
        );
        assert_eq!(a.matches("-device ahci,id=ahci0").count(), 1, "{a}");
        assert!(a.contains("ide-hd,drive=disk0,bus=ahci0.0,bootindex=0"), "{a}");
        assert!(a.contains("ide-hd,drive=disk1,bus=ahci0.1,bootindex=1"), "{a}");
        assert!(a.contains("if=none,id=disk2,format=qcow2,file=/d/c.qcow2"), "{a}");
        assert!(a.contains("virtio-blk-pci,drive=disk2,bootindex=2"), "{a}");
        assert!(a.contains("-device vmxnet3,netdev=net0,romfile="), "{a}");
        assert!(a.ends_with("-cpu max"), "{a}");
        let a = VmConfig::new(Firmware::Bios).qemu_args(dir).join(" ");
        assert!(!a.contains("pflash") && !a.contains("-netdev"), "{a}");
    }
}
