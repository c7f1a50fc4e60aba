//! The recovery-helper image (`image/recovery-helper/build`) booted by QEMU (TCG), running a
//! job from a config drive (docs/boot-in-cloud.md):
//! 1. SeaBIOS: a `repair` job on a copy of the `debian12-vmware` fixture (a second virtio disk
//!    with serial `tern-sda`) ends with `status=ok` and a power-off; the repaired copy then boots
//!    alone on SeaBIOS + virtio and gets a DHCP address;
//! 2. OVMF: a job naming a serial no disk has ends with `status=failed` naming that serial, and
//!    a power-off although it asked for a reboot.
//!
//! Root (loop devices to build the image); the image and the fixture are built once and cached
//! (`TERN_CACHE_DIR`, default /var/cache/tern).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tern_tests::vm::{self, Bus, Firmware, Nic, Vm, VmConfig};
use tern_tests::{is_root, run_ok};

/// A repair under TCG takes 1.5-2 minutes; boots of the fixture about one.
const JOB_TIMEOUT: Duration = Duration::from_secs(900);
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// Whether this test can run (the reason printed when not); under `TERN_E2E=1` and root a
/// missing capability is a failure.
fn setup(test: &str) -> bool {
    // Like tern_tests::e2e, without its release binaries (the image builds its own helper).
    if std::env::var("TERN_E2E").ok().as_deref() != Some("1") {
        eprintln!("skipped {test}: end-to-end test; set TERN_E2E=1 (scripts/test does) to run it");
        return false;
    }
    if !is_root() {
        eprintln!("skipped {test}: building the helper image needs root (loop devices, mounts)");
        return false;
    }
    if let Some(why) = vm::unavailable(&["debian12-vmware"]) {
        panic!("{test}: {why}");
    }
    true
}

/// Builds (or reuses) the image; its raw disk's path.
fn helper_image() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/recovery-helper/build");
    let started = Instant::now();
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{} failed with {}:\n{stderr}", script.display(), out.status);
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(PathBuf::from)
        .with_context(|| format!("the build printed no path:\n{stderr}"))?;
    assert!(path.is_file(), "{} is no file", path.display());
    let dir = path.parent().context("the image has no directory")?;
    for f in ["recovery-helper.qcow2", "recovery-helper.vmdk", "SHA256SUMS"] {
        assert!(dir.join(f).is_file(), "{} missing", dir.join(f).display());
    }
    eprintln!(
        "helper image {} ready after {:.0?}",
        path.display(),
        started.elapsed()
    );
    Ok(path)
}

/// A FAT config drive labelled `config-2` holding `tern/job.json` (mkfs.vfat and mtools: no
/// mount).
fn config_drive(path: &Path, job: &serde_json::Value) -> Result<()> {
    let json = path.with_extension("json");
    std::fs::write(&json, serde_json::to_vec(job)?)?;
    let mkfs = if Path::new("/usr/sbin/mkfs.vfat").exists() {
        "/usr/sbin/mkfs.vfat"
    } else {
        "mkfs.vfat"
    };
    run_ok(
        Command::new(mkfs)
            .args(["-C", "-n", "config-2"])
            .arg(path)
            .arg("4096"),
    )?;
    let img = path.display().to_string();
    run_ok(
        Command::new("mmd")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &img, "::/tern"]),
    )?;
    run_ok(
        Command::new("mcopy")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &img])
            .arg(&json)
            .arg("::/tern/job.json"),
    )?;
    Ok(())
}

/// A qcow2 overlay over the cached image: the cached file is never written.
fn overlay(base: &Path, path: &Path) -> Result<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(path),
    )?;
    Ok(())
}

/// `-drive`/`-device` arguments for a virtio-blk disk (not bootable) with `serial`, if any.
fn virtio_disk(id: &str, path: &Path, serial: Option<&str>) -> Vec<String> {
    let p = path.display().to_string().replace(',', ",,");
    let serial = serial.map(|s| format!(",serial={s}")).unwrap_or_default();
    vec![
        "-drive".into(),
        format!("if=none,id={id},format=raw,file={p}"),
        "-device".into(),
        format!("virtio-blk-pci,drive={id}{serial}"),
    ]
}

/// Waits for QEMU to exit (the guest powered off).
fn wait_exit(vm: &Vm, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = vm.try_exit_status()? {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            bail!(
                "QEMU still runs {timeout:?} after the result line: the helper did not power off; console:\n{}",
                vm.serial_log()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Checks the console protocol: every `TERN-HELPER ` line has an RFC 3339 UTC time, and there is
/// exactly one result line, the last `TERN-HELPER` line of all; returns it.
fn result_line(console: &str) -> String {
    let text = vm::clean(console);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TERN-HELPER")).collect();
    for l in &lines {
        if let Some(rest) = l.strip_prefix("TERN-HELPER ") {
            let time = rest.split(' ').next().unwrap_or_default();
            // 2026-11-24T10:15:00Z
            let shape_ok = time.len() == 20
                && time.bytes().enumerate().all(|(i, b)| match i {
                    4 | 7 => b == b'-',
                    10 => b == b'T',
                    13 | 16 => b == b':',
                    19 => b == b'Z',
                    _ => b.is_ascii_digit(),
                });
            assert!(shape_ok, "no RFC 3339 UTC time in {l:?}");
        }
    }
    let results: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("TERN-HELPER-RESULT "))
        .collect();
    assert_eq!(results.len(), 1, "not exactly one result line:\n{text}");
    assert_eq!(
        lines.last(),
        results.first().copied(),
        "the result line is not the last:\n{text}"
    );
    (*results[0]).to_owned()
}

#[test]
fn helper_image_repairs_a_guest_then_it_boots_on_kvm() -> Result<()> {
    let test = "helper_image_repairs_a_guest_then_it_boots_on_kvm";
    if !setup(test) {
        return Ok(());
    }
    let image = helper_image()?;
    let fixture = vm::fixture_image("debian12-vmware")?;
    let dir = tempfile::Builder::new()
        .prefix("tern-helper-image-")
        .tempdir_in("/var/tmp")?;
    let d = dir.path();
    let sda = d.join("sda.raw");
    vm::sparse_copy(&fixture, &sda)?;
    let helper = d.join("helper.qcow2");
    overlay(&image, &helper)?;
    let cfg = d.join("config-2.img");
    config_drive(
        &cfg,
        &serde_json::json!({
            "version": 1,
            "id": "t-repair",
            "action": "repair",
            "after": "poweroff",
            "stall_s": 900,
            "disks": [{ "disk": "sda", "serial": "tern-sda" }]
        }),
    )?;

    let config = VmConfig::new(Firmware::Bios)
        .disk_as(&helper, Bus::Virtio, "qcow2")
        .nic(Nic::VirtioNet)
        .args(virtio_disk("tsda", &sda, Some("tern-sda")))
        .args(virtio_disk("cfg", &cfg, None));
    let vm = Vm::start(&config, &d.join("helper"))?;
    let line = vm.wait_for("TERN-HELPER-RESULT", JOB_TIMEOUT)?;
    eprintln!("helper on SeaBIOS after {:.0?}: {line}", vm.elapsed());
    assert!(
        line.contains("TERN-HELPER-RESULT id=t-repair status=ok"),
        "{line}\n{}",
        vm.serial_log()
    );
    let status = wait_exit(&vm, Duration::from_secs(120))?;
    eprintln!("helper powered off after {:.0?} ({status})", vm.elapsed());
    assert!(status.success(), "QEMU exited with {status}");
    let console = vm.serial_log();
    assert_eq!(result_line(&console), "TERN-HELPER-RESULT id=t-repair status=ok");
    assert!(
        console.contains("from config drive") && console.contains("disk sda is /dev/vd"),
        "{console}"
    );
    drop(vm);

    // The repaired fixture alone on what a KVM cloud gives.
    let guest = Vm::start(
        &VmConfig::new(Firmware::Bios)
            .disk(&sda, Bus::Virtio)
            .nic(Nic::VirtioNet),
        &d.join("repaired"),
    )?;
    let m = guest.wait_for_marker(BOOT_TIMEOUT)?;
    eprintln!(
        "repaired fixture on SeaBIOS + virtio after {:.0?}: {m:?}",
        guest.elapsed()
    );
    m.check_repaired_bios("debian12-vmware", &guest.serial_log())?;
    Ok(())
}

#[test]
fn helper_image_fails_cleanly_on_uefi() -> Result<()> {
    let test = "helper_image_fails_cleanly_on_uefi";
    if !setup(test) {
        return Ok(());
    }
    let image = helper_image()?;
    let dir = tempfile::Builder::new()
        .prefix("tern-helper-uefi-")
        .tempdir_in("/var/tmp")?;
    let d = dir.path();
    let helper = d.join("helper.qcow2");
    overlay(&image, &helper)?;
    let cfg = d.join("config-2.img");
    config_drive(
        &cfg,
        &serde_json::json!({
            "version": 1,
            "id": "t-missing",
            "action": "repair",
            "after": "reboot",
            "disks": [{ "disk": "sda", "serial": "tern-nosuchdisk" }]
        }),
    )?;
    let config = VmConfig::new(Firmware::Uefi)
        .disk_as(&helper, Bus::Virtio, "qcow2")
        .nic(Nic::VirtioNet)
        .args(virtio_disk("cfg", &cfg, None));
    let vm = Vm::start(&config, &d.join("helper"))?;
    let line = vm.wait_for("TERN-HELPER-RESULT", JOB_TIMEOUT)?;
    eprintln!("helper on OVMF after {:.0?}: {line}", vm.elapsed());
    assert!(
        line.starts_with("TERN-HELPER-RESULT id=t-missing status=failed reason=")
            && line.contains("tern-nosuchdisk"),
        "{line}\n{}",
        vm.serial_log()
    );
    // A failed job powers off, even when it asked for a reboot.
    let status = wait_exit(&vm, Duration::from_secs(120))?;
    assert!(status.success(), "QEMU exited with {status}");
    assert_eq!(result_line(&vm.serial_log()), line);
    Ok(())
}
