//! The gateway appliance end to end (`image/gateway/build`, docs/boot-in-cloud.md "Gateway
//! appliance"): the image is built (or taken from its cache), its exports checked, a throwaway
//! qcow2 overlay of it booted under QEMU (TCG, SeaBIOS, virtio) with a FAT config drive
//! (`config-2`: `tern/gateway.toml`, `tern/keys.json` with a data-plane key for `web-01` and the
//! admin token); once the console shows the `TERN-GATEWAY` line, the agent on this host syncs a
//! sample disk twice through QEMU's forwarded ports, pinning the fingerprint printed there.
//!
//! A second boot, with OVMF (UEFI) and no config drive, shows the image's defaults.
//!
//! Needs `TERN_E2E=1`, root (the image build uses loop devices and chroot), qemu-system-x86_64,
//! qemu-img, mkfs.vfat and mtools. The first build takes minutes (debootstrap, the musl build of
//! tern-gateway); the boot about a minute under TCG.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tern_tests::vm::{Bus, Firmware, Vm, VmConfig};
use tern_tests::{e2e, is_root, make_disk, qemu, random_writes, rng, run_ok};

const HOST: &str = "web-01";
const KEY_ID: &str = "TKAPPLIANCETEST01";
/// The control plane's port inside the guest: not the image's default (8444), so the line on the
/// console proves that the config drive's gateway.toml was applied.
const GUEST_CONTROL_PORT: u16 = 9443;
const GUEST_DATA_PORT: u16 = 8443;

/// The two tests boot one VM at a time (TCG on a small machine).
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Why the appliance tests can't run here (printed as "skipped TEST: WHY"), or `None`.
fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("building the appliance needs root (loop devices, chroot)".into());
    }
    if let Some(t) = qemu::missing(&["qemu-system-x86_64", "qemu-img", "mcopy", "mmd"]) {
        return Some(format!("{t} is missing (scripts/install-deps installs it)"));
    }
    if !Path::new("/usr/sbin/mkfs.vfat").exists() && !qemu::have("mkfs.vfat") {
        return Some("mkfs.vfat is missing (scripts/install-deps installs dosfstools)".into());
    }
    None
}

/// A qcow2 overlay on the cached raw image: the cache is never booted.
fn overlay(raw: &Path, path: &Path) -> Result<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(raw)
            .arg(path),
    )?;
    Ok(())
}

fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/gateway/build")
}

/// A free TCP port on 127.0.0.1 (free when this returns; QEMU binds it right after).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Builds (or reuses) the appliance; returns the raw image's path (the script's last line).
fn build_image() -> Result<PathBuf> {
    let started = Instant::now();
    let out = Command::new(build_script())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", build_script().display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let lines: Vec<&str> = stderr.lines().collect();
        bail!(
            "image/gateway/build failed with {}; its last output:\n{}",
            out.status,
            lines[lines.len().saturating_sub(60)..].join("\n")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(
        stdout
            .lines()
            .last()
            .context("image/gateway/build printed nothing")?,
    );
    eprintln!(
        "gateway appliance: {} ({:.0?})",
        path.display(),
        started.elapsed()
    );
    Ok(path)
}

/// The config drive: FAT labelled `config-2`, made without mounting (mkfs.vfat -C, mtools).
fn config_drive(path: &Path, dir: &Path, gateway_toml: &str, keys_json: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    run_ok(
        Command::new("mkfs.vfat")
            .args(["-C", "-n", "config-2"])
            .arg(path)
            .arg("8192"),
    )?;
    let toml = dir.join("gateway.toml");
    let keys = dir.join("keys.json");
    std::fs::write(&toml, gateway_toml)?;
    std::fs::write(&keys, keys_json)?;
    let img = path.display().to_string();
    run_ok(
        Command::new("mmd")
            .args(["-i", &img, "::/tern"])
            .env("MTOOLS_SKIP_CHECK", "1"),
    )?;
    for f in [&toml, &keys] {
        run_ok(
            Command::new("mcopy")
                .args(["-i", &img])
                .arg(f)
                .arg(format!(
                    "::/tern/{}",
                    f.file_name().and_then(|n| n.to_str()).unwrap_or("x")
                ))
                .env("MTOOLS_SKIP_CHECK", "1"),
        )?;
    }
    Ok(())
}

/// The fields of the console line `TERN-GATEWAY version=V fingerprint=F data=:P control=:P`.
fn console_fields(line: &str) -> Result<std::collections::HashMap<String, String>> {
    let rest = &line[line.find("TERN-GATEWAY ").context("no TERN-GATEWAY")? + "TERN-GATEWAY ".len()..];
    Ok(rest
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// `tern-agent CMD` against the appliance through the forwarded data-plane port.
fn agent(bins: &Path, cmd: &str, port: u16, fp: &str, secret: &str, state: &Path) -> Command {
    let mut c = Command::new(bins.join("tern-agent"));
    c.args([
        cmd,
        "--host",
        HOST,
        "--target",
        &format!("https://127.0.0.1:{port}"),
    ])
    .args(["--fingerprint", fp, "--access-key-id", KEY_ID, "--state-dir"])
    .arg(state)
    .env("TERN_SECRET_ACCESS_KEY", secret)
    .env("RUST_LOG", "warn");
    c
}

fn control_get(port: u16, fp: &str, token: &str, path: &str) -> Result<String> {
    let tls = tern_core::tls::pinned_client_config(fp)?;
    let url = format!("https://127.0.0.1:{port}{path}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let c = reqwest::Client::builder().use_preconfigured_tls(tls).build()?;
        let r = c.get(url).bearer_auth(token).send().await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("{status}: {text}");
        }
        Ok(text)
    })
}

fn random_hex(bytes: usize) -> String {
    use rand::RngCore as _;
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

#[test]
fn appliance_boots_from_its_config_drive_and_takes_two_syncs() -> Result<()> {
    let test = "appliance_boots_from_its_config_drive_and_takes_two_syncs";
    let Some(bins) = e2e(test) else {
        return Ok(());
    };
    if let Some(why) = unavailable() {
        eprintln!("skipped {test}: {why}");
        return Ok(());
    }
    let _one = ONE_VM.lock().unwrap_or_else(std::sync::PoisonError::into_inner);

    // The image and its exports.
    let raw = build_image()?;
    let dir = raw.parent().context("image directory")?;
    for f in ["gateway.raw", "gateway.qcow2", "gateway.vmdk", "SHA256SUMS"] {
        assert!(dir.join(f).is_file(), "{} is missing", dir.join(f).display());
    }
    let sums = std::fs::read_to_string(dir.join("SHA256SUMS"))?;
    assert_eq!(sums.lines().count(), 3, "SHA256SUMS: {sums}");
    run_ok(
        Command::new("sha256sum")
            .args(["--check", "--strict", "SHA256SUMS"])
            .current_dir(dir),
    )?;
    let info = run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(dir.join("gateway.vmdk")),
    )?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    assert_eq!(info["format"], "vmdk", "{info}");
    assert_eq!(
        info["format-specific"]["data"]["create-type"], "streamOptimized",
        "{info}"
    );
    let info = run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(dir.join("gateway.qcow2")),
    )?;
    let info: serde_json::Value = serde_json::from_slice(&info.stdout)?;
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], std::fs::metadata(&raw)?.len(), "{info}");

    // A throwaway overlay and the config drive.
    let tmp = tempfile::tempdir()?;
    let overlay_path = tmp.path().join("gateway.qcow2");
    overlay(&raw, &overlay_path)?;
    let secret = random_hex(20);
    let admin_token = random_hex(32);
    let gateway_toml = format!(
        "data_dir = \"/var/lib/tern-gateway\"\n\n[data_plane]\nlisten = \"0.0.0.0:{GUEST_DATA_PORT}\"\n\n\
         [control_plane]\nlisten = \"0.0.0.0:{GUEST_CONTROL_PORT}\"\n"
    );
    let keys_json = serde_json::json!({
        "version": 1,
        "admin_token": admin_token,
        "keys": [{ "access_key_id": KEY_ID, "secret_access_key": secret, "hosts": [HOST] }],
    })
    .to_string();
    let drive = tmp.path().join("config-drive.img");
    config_drive(&drive, tmp.path(), &gateway_toml, &keys_json)?;

    // Boot: SeaBIOS, virtio disks, user networking with both planes forwarded to free ports.
    let (data_port, control_port) = (free_port()?, free_port()?);
    let config = VmConfig::new(Firmware::Bios)
        .disk_as(&overlay_path, Bus::Virtio, "qcow2")
        .disk(&drive, Bus::Virtio)
        .args([
            "-netdev".to_owned(),
            format!(
                "user,id=net0,hostfwd=tcp:127.0.0.1:{data_port}-:{GUEST_DATA_PORT},\
                 hostfwd=tcp:127.0.0.1:{control_port}-:{GUEST_CONTROL_PORT}"
            ),
            "-device".to_owned(),
            "virtio-net-pci,netdev=net0,romfile=".to_owned(),
        ]);
    let vm = Vm::start(&config, &tmp.path().join("vm"))?;
    let line = vm.wait_for("TERN-GATEWAY version=", Duration::from_secs(900))?;
    eprintln!("gateway appliance up after {:.0?}: {line}", vm.elapsed());
    let fields = console_fields(&line)?;
    let fp = fields.get("fingerprint").context("no fingerprint")?.clone();
    assert!(fp.starts_with("sha256:") && fp.len() == 7 + 64, "{line}");
    assert_eq!(
        fields.get("version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION")),
        "{line}"
    );
    assert_eq!(fields.get("data").map(String::as_str), Some(":8443"), "{line}");
    assert_eq!(fields.get("boot").map(String::as_str), Some("BIOS"), "{line}");
    assert_eq!(
        fields.get("control").map(String::as_str),
        Some(":9443"),
        "the config drive's gateway.toml was not applied: {line}"
    );
    let console = vm.serial_log();
    assert!(
        console.contains("TERN-GATEWAY-FIRSTBOOT status=ok"),
        "no first-boot result on the console"
    );
    assert!(
        !console.contains(&secret),
        "the access key's secret is on the console"
    );
    assert!(
        !console.contains(&admin_token),
        "the admin token is on the console"
    );

    // Two syncs from this host through the forwarded data plane, pinning the console's
    // fingerprint.
    let state = tmp.path().join("agent");
    let sda = tmp.path().join("sda.img");
    let mut r = rng(7);
    let size = 32u64 << 20;
    make_disk(&sda, size, &mut r)?;
    let disk = format!("sda={}", sda.display());
    let mut points = Vec::new();
    for round in 0..2 {
        if round > 0 {
            random_writes(&sda, &mut r, 2)?;
        }
        let out = run_ok(agent(&bins, "sync", data_port, &fp, &secret, &state).args([
            "--no-progress",
            "--disk",
            &disk,
        ]))?;
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        eprintln!("sync {round}: {summary}");
        points.push(summary["point_id"].as_str().context("point_id")?.to_owned());
        if round > 0 {
            assert!(summary["bytes_skipped_unchanged"].as_u64() > Some(0), "{summary}");
            assert!(summary["bytes_sent"].as_u64() < Some(size), "{summary}");
        }
    }
    let out = run_ok(agent(&bins, "points", data_port, &fp, &secret, &state).arg("--json"))?;
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let ids: Vec<&str> = listed
        .as_array()
        .context("points is no array")?
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");
    for p in &points {
        assert!(ids.contains(&p.as_str()), "point {p} not listed: {listed}");
    }

    // The control plane answers the admin token from keys.json (and only it).
    let hosts = control_get(control_port, &fp, &admin_token, "/api/v1/hosts")?;
    for p in &points {
        assert!(
            hosts.contains(p.as_str()),
            "point {p} not in /api/v1/hosts: {hosts}"
        );
    }
    assert!(control_get(control_port, &fp, &random_hex(32), "/api/v1/hosts").is_err());
    vm.kill();
    Ok(())
}

#[test]
fn appliance_boots_with_uefi_and_without_config_drive_on_its_defaults() -> Result<()> {
    let test = "appliance_boots_with_uefi_and_without_config_drive_on_its_defaults";
    if e2e(test).is_none() {
        return Ok(());
    }
    if let Some(why) = unavailable().or_else(|| tern_tests::vm::unavailable(&[])) {
        eprintln!("skipped {test}: {why}");
        return Ok(());
    }
    let _one = ONE_VM.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let raw = build_image()?;
    let tmp = tempfile::tempdir()?;
    let overlay_path = tmp.path().join("gateway.qcow2");
    overlay(&raw, &overlay_path)?;
    let config = VmConfig::new(Firmware::Uefi)
        .disk_as(&overlay_path, Bus::Virtio, "qcow2")
        .nic(tern_tests::vm::Nic::VirtioNet);
    let vm = Vm::start(&config, &tmp.path().join("vm"))?;
    let line = vm.wait_for("TERN-GATEWAY version=", Duration::from_secs(900))?;
    eprintln!("gateway appliance (UEFI) up after {:.0?}: {line}", vm.elapsed());
    let fields = console_fields(&line)?;
    assert_eq!(fields.get("data").map(String::as_str), Some(":8443"), "{line}");
    assert_eq!(fields.get("control").map(String::as_str), Some(":8444"), "{line}");
    assert_eq!(fields.get("boot").map(String::as_str), Some("UEFI"), "{line}");
    assert!(
        fields
            .get("fingerprint")
            .is_some_and(|f| f.starts_with("sha256:")),
        "{line}"
    );
    let console = tern_tests::vm::clean(&vm.serial_log());
    assert!(
        console.contains("TERN-GATEWAY-FIRSTBOOT no config drive"),
        "{console}"
    );
    assert!(
        console.contains("Booting `Tern gateway"),
        "GRUB did not boot the entry: {console}"
    );
    vm.kill();
    Ok(())
}
