//! Boot-in-Cloud repair against real guests booted by QEMU (TCG).
//!
//! For every fixture shape of `scripts/guest-fixture` (Debian 12 installed like a VMware VM:
//! UEFI-only GRUB, no virtio in the initramfs, a static address on `ens192`, open-vm-tools
//! enabled):
//! 1. the unrepaired copy does not boot on SeaBIOS + virtio-blk (the test can fail);
//! 2. `tern-recovery-helper repair` changes what it must; a second run changes nothing;
//! 3. the repaired copy boots on SeaBIOS + virtio-blk + virtio-net, gets a DHCP address, and
//!    open-vm-tools is off; it still boots by UEFI (OVMF with an empty variable store).
//!
//! Root (loop devices, mounts); the fixtures are built once and cached
//! (`TERN_CACHE_DIR`, default /var/cache/tern).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tern_tests::vm::{self, BootMode, Firmware, Nic, Vm, VmConfig};
use tern_tests::{is_root, run_ok};

/// A marker well within this under TCG, even with two VMs per core.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// The binaries, or `None` (with the reason printed) where this test cannot run; under
/// `TERN_E2E=1` and root a missing capability is a failure, not a skip.
fn setup(test: &str, shape: &str) -> Option<PathBuf> {
    let bins = tern_tests::e2e(test)?;
    let helper = bins.join("tern-recovery-helper");
    assert!(
        helper.exists(),
        "{} missing: build with `cargo build --release --bins`",
        helper.display()
    );
    if !is_root() {
        eprintln!("skipped {test}: the repair needs root (loop devices and mounts)");
        return None;
    }
    if let Some(why) = vm::unavailable(&[shape]) {
        panic!("{test}: {why}");
    }
    Some(helper)
}

fn repair(helper: &Path, disk: &Path, report: &Path) -> Result<serde_json::Value> {
    run_ok(
        Command::new(helper)
            .args(["repair", "--disposable-host", "--report"])
            .arg(report)
            .arg(disk),
    )?;
    let text = std::fs::read_to_string(report)?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", report.display()))
}

fn step<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in the report: {report:#}"))
}

fn actions(report: &serde_json::Value, name: &str) -> Vec<String> {
    step(report, name)["actions"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// A qcow2 overlay over `disk`, so that several VMs can boot the same repaired disk at once
/// without changing it.
fn overlay(disk: &Path, name: &str) -> Result<PathBuf> {
    let o = disk.with_file_name(name);
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(disk)
            .arg(&o),
    )?;
    Ok(o)
}

fn boot(config: VmConfig, overlay: &Path, dir: &Path) -> Result<Vm> {
    let p = overlay.display().to_string().replace(',', ",,");
    let config = config.args(["-drive".to_owned(), format!("file={p},format=qcow2,if=virtio")]);
    Vm::start(&config, dir)
}

fn repair_and_boot(test: &str, shape: &str) -> Result<()> {
    let Some(helper) = setup(test, shape) else {
        return Ok(());
    };
    let fixture = vm::fixture_image(shape)?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("tern-{shape}-"))
        .tempdir_in("/var/tmp")?;
    let disk = dir.path().join("sda.raw");
    vm::sparse_copy(&fixture, &disk)?;

    // 1. Unrepaired: SeaBIOS finds no boot code (the disk boots only by UEFI), and even GRUB
    //    would find no virtio driver for the root in the initramfs.
    let o = overlay(&disk, "unrepaired.qcow2")?;
    let unrepaired = boot(
        VmConfig::new(Firmware::Bios).nic(Nic::VirtioNet),
        &o,
        &dir.path().join("unrepaired"),
    )?;
    let kernel = unrepaired.wait_for("Linux version", Duration::from_secs(90));
    assert!(
        kernel.is_err(),
        "{shape}: the unrepaired fixture booted a kernel on SeaBIOS; the test could not fail: {}",
        unrepaired.serial_log()
    );
    assert!(
        unrepaired.firmware_log().contains("Booting from Hard Disk"),
        "{shape}: SeaBIOS never tried the disk, so the failure proves nothing: {}",
        unrepaired.firmware_log()
    );
    drop(unrepaired);
    std::fs::remove_file(&o)?;

    // 2. Repair, then again: the second run changes nothing.
    let first = repair(&helper, &disk, &dir.path().join("repair-1.json"))?;
    eprintln!("{shape}: first repair: {first:#}");
    assert_eq!(first["changed"], true);
    assert!(
        actions(&first, "virtio-initramfs")
            .iter()
            .any(|a| a.contains("rebuilt")),
        "{first:#}"
    );
    assert!(
        actions(&first, "uefi-to-bios")
            .iter()
            .any(|a| a.contains("BIOS boot partition")),
        "{first:#}"
    );
    assert!(
        actions(&first, "uefi-to-bios")
            .iter()
            .any(|a| a.contains("GRUB i386-pc installed")),
        "{first:#}"
    );
    assert!(
        actions(&first, "uefi-to-bios")
            .iter()
            .any(|a| a.contains("BOOTX64.EFI")),
        "{first:#}"
    );
    assert!(!actions(&first, "network").is_empty(), "{first:#}");
    assert!(
        actions(&first, "hypervisor-tools")
            .iter()
            .any(|a| a.contains("open-vm-tools")),
        "{first:#}"
    );
    assert!(
        first["backups"].as_array().is_some_and(|b| !b.is_empty()),
        "{first:#}"
    );
    let second = repair(&helper, &disk, &dir.path().join("repair-2.json"))?;
    for s in second["steps"].as_array().into_iter().flatten() {
        assert_eq!(
            s["changed"], false,
            "{shape}: the second repair changed something: {s:#}"
        );
    }
    assert_eq!(second["changed"], false);
    assert!(second["backups"].as_array().is_some_and(Vec::is_empty));

    // 3. Boot by BIOS and by UEFI at once, each on its own overlay.
    let bios_o = overlay(&disk, "bios.qcow2")?;
    let uefi_o = overlay(&disk, "uefi.qcow2")?;
    let bios = boot(
        VmConfig::new(Firmware::Bios).nic(Nic::VirtioNet),
        &bios_o,
        &dir.path().join("bios"),
    )?;
    let uefi = boot(
        VmConfig::new(Firmware::Uefi).nic(Nic::VirtioNet),
        &uefi_o,
        &dir.path().join("uefi"),
    )?;
    let m = bios.wait_for_marker(BOOT_TIMEOUT)?;
    eprintln!("{shape}: SeaBIOS + virtio after {:.0?}: {m:?}", bios.elapsed());
    m.check_repaired_bios(shape, &bios.serial_log())?;
    let u = uefi.wait_for_marker(BOOT_TIMEOUT)?;
    eprintln!("{shape}: OVMF + virtio after {:.0?}: {u:?}", uefi.elapsed());
    assert_eq!(u.boot, BootMode::Uefi);
    assert!(
        u.ip4.iter().any(|a| a.starts_with("10.0.2.")),
        "no DHCP address under UEFI: {u:?}"
    );
    Ok(())
}

#[test]
fn debian12_vmware_boots_on_kvm_after_repair() -> Result<()> {
    repair_and_boot("debian12_vmware_boots_on_kvm_after_repair", "debian12-vmware")
}

#[test]
fn debian12_dracut_xfs_boots_on_kvm_after_repair() -> Result<()> {
    repair_and_boot(
        "debian12_dracut_xfs_boots_on_kvm_after_repair",
        "debian12-dracut-xfs",
    )
}

/// A damaged root file system is refused before anything is written, and so is a disk with no
/// Linux on it: both images stay byte-identical.
#[test]
fn refuses_damaged_or_unknown_disks_and_changes_nothing() -> Result<()> {
    let test = "refuses_damaged_or_unknown_disks_and_changes_nothing";
    let Some(helper) = setup(test, "debian12-vmware") else {
        return Ok(());
    };
    let fixture = vm::fixture_image("debian12-vmware")?;
    let dir = tempfile::Builder::new()
        .prefix("tern-refuse-")
        .tempdir_in("/var/tmp")?;

    // A corrupt extent header in the root file system (what e2fsck's preen mode cannot fix).
    let bad = dir.path().join("bad.raw");
    vm::sparse_copy(&fixture, &bad)?;
    let out = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(&bad))?;
    let lo = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let corrupt = run_ok(Command::new("partx").args(["-a", &lo])).and_then(|_| {
        run_ok(Command::new("debugfs").args([
            "-w",
            "-R",
            "set_inode_field /etc/hostname block[0] 0",
            &format!("{lo}p2"),
        ]))
    });
    let _ = Command::new("partx").args(["-d", &lo]).status();
    let _ = Command::new("losetup").args(["-d", &lo]).status();
    corrupt?;
    let unknown = dir.path().join("unknown.raw");
    std::fs::File::create(&unknown)?.set_len(64 << 20)?;
    tern_tests::write_at(&unknown, 1 << 20, b"not a file system")?;

    for (img, expect) in [
        (&bad, "e2fsck -f -n found errors"),
        (&unknown, "no Linux root file system"),
    ] {
        let before = tern_tests::sha256_file(img)?;
        let out = Command::new(&helper)
            .args(["repair", "--disposable-host"])
            .arg(img)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{}: the repair did not refuse: {err}",
            img.display()
        );
        assert!(
            err.contains(expect),
            "{}: expected {expect:?} in: {err}",
            img.display()
        );
        assert_eq!(
            tern_tests::sha256_file(img)?,
            before,
            "{}: a refused repair changed the disk",
            img.display()
        );
    }
    Ok(())
}

#[test]
fn refuses_without_a_disposable_host() -> Result<()> {
    let Some(bins) = tern_tests::e2e("refuses_without_a_disposable_host") else {
        return Ok(());
    };
    if std::path::Path::new("/etc/tern/disposable-helper").exists() {
        eprintln!("skipped refuses_without_a_disposable_host: this host declares itself disposable");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("d.raw");
    std::fs::write(&img, vec![0u8; 1 << 20])?;
    let before = std::fs::read(&img)?;
    let out = Command::new(bins.join("tern-recovery-helper"))
        .arg("repair")
        .arg(&img)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("disposable") || err.contains("must run as root"),
        "unexpected error: {err}"
    );
    assert_eq!(std::fs::read(&img)?, before, "a refused repair changed the disk");
    Ok(())
}
