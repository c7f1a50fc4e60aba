//! The local provider's instances with a real guest (QEMU, TCG here): the cached Debian fixture,
//! repaired natively by `tern-recovery-helper repair --disposable-host`, imported as a volume,
//! run as an instance (SeaBIOS, virtio-blk with serial `tern-sda`, user network, a config
//! drive); it comes up with a DHCP address; a new provider on the same directory (a restarted
//! gateway) finds it running, stops it and deletes it; the same volume then runs on an isolated
//! network with a guest forward, as a drill would, and still gets its address.
//!
//! Root (the repair uses loop devices and mounts), QEMU, mtools and `TERN_E2E=1`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tern_gateway::provider::local::LocalProvider;
use tern_gateway::provider::qemu::QemuSettings;
use tern_gateway::provider::{
    CloudProvider, ConfigDriveFile, Firmware, Flavor, InstanceDisk, InstanceSpec, InstanceState, Network,
};
use tern_tests::vm::{self, BootMode, Marker};
use tern_tests::{is_root, run_ok};

const SHAPE: &str = "debian12-vmware";
/// A marker well within this under TCG, even with other VMs and builds on the machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

fn setup(test: &str) -> Option<PathBuf> {
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
    if let Some(why) = vm::unavailable(&[SHAPE]) {
        panic!("{test}: {why}");
    }
    if tern_tests::qemu::missing(&["mkfs.vfat"]).is_some() {
        panic!("{test}: mkfs.vfat is missing (scripts/install-deps installs dosfstools)");
    }
    Some(helper)
}

async fn wait_for_marker(p: &LocalProvider, name: &str, timeout: Duration) -> Result<Marker> {
    let start = Instant::now();
    loop {
        let log = p.console_log(name, 1 << 20).await?;
        if let Some(m) = log.lines().find_map(Marker::parse) {
            return Ok(m);
        }
        let info = p.instance(name).await?.context("the instance vanished")?;
        if info.state != InstanceState::Running {
            bail!("the instance stopped before its marker; serial log:\n{log}");
        }
        if start.elapsed() > timeout {
            bail!("no marker after {timeout:?}; serial log:\n{log}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[test]
fn repaired_fixture_runs_as_a_local_instance_across_a_provider_restart() -> Result<()> {
    let test = "repaired_fixture_runs_as_a_local_instance_across_a_provider_restart";
    let Some(helper) = setup(test) else {
        return Ok(());
    };
    let bins = helper.parent().context("bin dir")?.to_owned();
    let fixture = vm::fixture_image(SHAPE)?;
    let dir = tempfile::Builder::new()
        .prefix("tern-instances-")
        .tempdir_in("/var/tmp")?;
    let disk = dir.path().join("sda.raw");
    vm::sparse_copy(&fixture, &disk)?;
    run_ok(
        std::process::Command::new(&helper)
            .args(["repair", "--disposable-host"])
            .arg(&disk),
    )?;
    let data = dir.path().join("gateway");
    // The default: auto picks KVM only where a probe VM runs on it (TCG on the CI machine).
    let settings = QemuSettings {
        relay: Some(bins.join("tern-gateway")),
        ..QemuSettings::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let p = LocalProvider::new(&data, false)?.with_qemu(settings.clone());
        eprintln!("{test}: accelerator {}", p.accel().await);
        let size = std::fs::metadata(&disk)?.len();
        let v = p
            .volume_from_image(&disk, "web-01.sda", size + (64 << 20))
            .await?;
        assert_eq!(v.size, size + (64 << 20));
        assert_eq!(std::fs::metadata(p.volume_path("web-01.sda"))?.len(), v.size);
        std::fs::remove_file(&disk)?;

        let spec = InstanceSpec {
            name: "web-01".into(),
            flavor: Flavor {
                vcpus: 1,
                ram_mib: 1024,
            },
            disks: vec![InstanceDisk {
                volume: "web-01.sda".into(),
                disk: "sda".into(),
            }],
            firmware: Firmware::Bios,
            network: Network::User,
            guest_forwards: vec![],
            host_forwards: vec![],
            config_drive: vec![ConfigDriveFile {
                path: "tern/job.json".into(),
                content: b"{\"version\":1}".to_vec(),
            }],
        };
        let created = p.create_instance(&spec).await?;
        assert_eq!(created.state, InstanceState::Stopped);
        // Defining it again changes nothing.
        assert_eq!(p.create_instance(&spec).await?, created);
        let instance_dir = p.instance_dir("web-01");
        assert!(instance_dir.join("config-drive.img").is_file());
        let started = p.start_instance("web-01").await?;
        assert_eq!(started.state, InstanceState::Running);
        assert_eq!(started.serial_log, instance_dir.join("serial.log"));

        let m = wait_for_marker(&p, "web-01", BOOT_TIMEOUT).await?;
        eprintln!("{test}: marker {m:?}");
        assert_eq!(m.shape, SHAPE);
        assert_eq!(m.boot, BootMode::Bios);
        assert!(
            m.root.as_deref().is_some_and(|r| r.starts_with("/dev/vda")),
            "{m:?}"
        );
        assert!(
            m.ip4.iter().any(|a| a.starts_with("10.0.2.")),
            "no DHCP address on the user network: {m:?}"
        );

        // A restarted gateway: a new provider on the same directory finds the instance running.
        drop(p);
        let p = LocalProvider::new(&data, false)?.with_qemu(settings);
        let all = p.list_instances().await?;
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(all[0].name, "web-01");
        assert_eq!(all[0].state, InstanceState::Running);
        // The definition as stored: the config drive's files are not kept.
        let mut stored = spec.clone();
        stored.config_drive.clear();
        assert_eq!(all[0].spec, stored);
        // Starting a running instance does nothing.
        assert_eq!(p.start_instance("web-01").await?.state, InstanceState::Running);

        // QEMU answers QMP on the instance's socket.
        let status =
            tern_gateway::provider::qemu::qmp(&instance_dir.join("qmp.sock"), "query-status").await?;
        assert!(status.contains("\"running\""), "{status}");

        // An ACPI power-down, then QMP quit after the grace.
        let t = Instant::now();
        p.stop_instance("web-01", Duration::from_secs(30)).await?;
        eprintln!("{test}: stopped in {:.0?}", t.elapsed());
        assert_eq!(
            p.instance("web-01").await?.map(|i| i.state),
            Some(InstanceState::Stopped)
        );
        p.delete_instance("web-01").await?;
        assert_eq!(p.instance("web-01").await?, None);
        assert!(!instance_dir.exists());

        // The same volume as a drill would run it: an isolated network (DHCP still answers)
        // whose only way out is a guest forward carried by `tern-gateway relay`.
        let drill = InstanceSpec {
            name: "web-01-drill".into(),
            network: Network::Isolated,
            guest_forwards: vec![tern_gateway::provider::GuestForward {
                guest: "10.0.2.100:7480".parse()?,
                target: "127.0.0.1:9".into(),
            }],
            config_drive: vec![],
            ..spec.clone()
        };
        p.create_instance(&drill).await?;
        p.start_instance("web-01-drill").await?;
        let md = wait_for_marker(&p, "web-01-drill", BOOT_TIMEOUT).await?;
        eprintln!("{test}: isolated marker {md:?}");
        assert!(
            md.ip4.iter().any(|a| a.starts_with("10.0.2.")),
            "no DHCP address on the isolated network: {md:?}"
        );
        // The config drive (attached to the first, not here) did not move the NIC.
        assert_eq!(md.ifaces, m.ifaces);
        p.delete_instance("web-01-drill").await?;
        assert_eq!(p.list_instances().await?, vec![]);
        // The volume outlives its instance.
        assert!(p.volume("web-01.sda").await?.is_some());
        p.delete_volume("web-01.sda").await?;
        Ok(())
    })
}

/// The recovery API of a real gateway process, block mode, with a "helper image" that never
/// reports (an empty disk: SeaBIOS finds nothing to boot): volumes from the point's snapshots
/// and a running helper instance; the state survives a gateway restart (the helper keeps
/// running and is not started twice); the recovery fails at `recovery.timeout_minutes` with
/// its reason; DELETE removes the instance and volumes it created and leaves the point alone.
#[test]
fn recovery_api_block_mode_times_out_resumes_and_deletes_everything() -> Result<()> {
    let test = "recovery_api_block_mode_times_out_resumes_and_deletes_everything";
    let Some(bins) = tern_tests::e2e(test) else {
        return Ok(());
    };
    if let Some(t) = tern_tests::qemu::missing(&["qemu-system-x86_64", "mkfs.vfat", "mcopy"]) {
        panic!("{test}: {t} is missing (scripts/install-deps installs it)");
    }
    let tmp = tempfile::Builder::new()
        .prefix("tern-recovery-api-")
        .tempdir_in("/var/tmp")?;
    let helper_image = tmp.path().join("no-helper.raw");
    std::fs::File::create(&helper_image)?.set_len(1 << 20)?;
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[recovery]\nhelper_image = '{}'\naccel = 'tcg'\ntimeout_minutes = 1\nhelper_flavor = {{ vcpus = 1, ram_mib = 256 }}\n",
            helper_image.display()
        ),
    )?;
    let mut gw = tern_tests::Gateway::start(
        &bins,
        &tmp.path().join("gw"),
        &["--config", config.to_str().context("path")?],
    )?;
    let key = gw.key("web-01")?;
    let sda = tmp.path().join("sda.img");
    tern_tests::make_disk(&sda, 32 << 20, &mut tern_tests::rng(7))?;
    let out = run_ok(
        tern_tests::agent_sync_cmd(&bins, &gw, &key, "web-01", &tmp.path().join("agent"))
            .arg("--disk")
            .arg(format!("sda={}", sda.display())),
    )?;
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let point = summary["point_id"].as_str().context("point_id")?.to_owned();
    let snapshot = gw.snapshot_path("web-01", "sda", &point);
    let snapshot_sum = tern_tests::sha256_file(&snapshot)?;

    let post = |body: serde_json::Value| gw.control(reqwest::Method::POST, "/api/v1/recoveries", Some(body));
    let e = post(serde_json::json!({"host": "web-01", "mode": "sideways"})).unwrap_err();
    assert!(e.to_string().contains("400"), "{e}");
    let e = post(serde_json::json!({"host": "db-09", "mode": "block"})).unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    let created: serde_json::Value =
        serde_json::from_str(&post(serde_json::json!({"host": "web-01", "mode": "block"}))?)?;
    let id = created["id"].as_str().context("id")?.to_owned();
    let get = |gw: &tern_tests::Gateway| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &gw.control_get(&format!("/api/v1/recoveries/{id}"))?,
        )?)
    };
    let wait = |gw: &tern_tests::Gateway, state: &str| -> Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let r = get(gw)?;
            if r["state"] == state {
                return Ok(r);
            }
            if start.elapsed() > Duration::from_secs(300) {
                bail!("not {state} after 5 minutes: {r:#}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let r = wait(&gw, "waiting_for_helper")?;
    assert_eq!(r["point"], point.as_str());
    assert_eq!(r["disks"][0]["volume"], format!("{id}.sda"));
    let helper_dir = gw.dir.join("instances").join(format!("{id}-helper"));
    let pid = std::fs::read_to_string(helper_dir.join("qemu.pid"))?;
    assert!(std::path::Path::new(&format!("/proc/{}", pid.trim())).exists());
    assert_eq!(
        r["serial_log"],
        helper_dir.join("serial.log").to_str().context("path")?
    );
    assert_eq!(
        tern_tests::sha256_file(&gw.dir.join("volumes").join(format!("{id}.sda.img")))?,
        snapshot_sum,
        "the recovered volume is not the point's snapshot"
    );
    let job = run_ok(
        std::process::Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(helper_dir.join("config-drive.img"))
            .arg("::tern/job.json"),
    )?;
    let job: serde_json::Value = serde_json::from_slice(&job.stdout)?;
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["action"], "repair");
    assert_eq!(job["after"], "poweroff");
    assert_eq!(job["disks"][0]["serial"], "tern-sda");

    // A restarted gateway resumes the wait; the helper was not started again.
    gw.restart()?;
    let r = get(&gw)?;
    assert_eq!(r["state"], "waiting_for_helper", "{r:#}");
    assert_eq!(std::fs::read_to_string(helper_dir.join("qemu.pid"))?, pid);

    let r = wait(&gw, "failed")?;
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("no result from the helper")),
        "{r:#}"
    );
    assert!(gw.metric("tern_gateway_recoveries_total{mode=\"block\",event=\"failed\"}")? >= 1);

    let deleted = gw.control(reqwest::Method::DELETE, &format!("/api/v1/recoveries/{id}"), None)?;
    assert!(deleted.contains("deleting"), "{deleted}");
    let start = Instant::now();
    while get(&gw).is_ok() {
        assert!(start.elapsed() < Duration::from_secs(60), "DELETE did not finish");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(!helper_dir.exists());
    for v in [format!("{id}.sda.img"), format!("{id}.helper.img")] {
        assert!(!gw.dir.join("volumes").join(&v).exists(), "{v} left behind");
    }
    assert_eq!(tern_tests::sha256_file(&snapshot)?, snapshot_sum);
    assert_eq!(gw.control_get("/api/v1/recoveries")?.trim(), "[]");
    Ok(())
}

/// An object-mode drill through the recovery API of a real gateway with `[object_store]`: one
/// instance whose first disk is the helper image grown to the source disk's size, on an isolated
/// network whose only way out is a guest forward (run by `tern-gateway relay`) to the store; the
/// job on its config drive carries the store's settings as the instance sees them and the
/// request's key, which neither the API nor the DB shows. DELETE during the restore removes
/// everything.
#[test]
fn recovery_api_object_drill_builds_an_isolated_instance_and_keeps_secrets_off_the_db() -> Result<()> {
    let test = "recovery_api_object_drill_builds_an_isolated_instance_and_keeps_secrets_off_the_db";
    let Some(bins) = tern_tests::e2e(test) else {
        return Ok(());
    };
    if let Some(t) = tern_tests::qemu::missing(&["qemu-system-x86_64", "mkfs.vfat", "mcopy"]) {
        panic!("{test}: {t} is missing (scripts/install-deps installs it)");
    }
    let tmp = tempfile::Builder::new()
        .prefix("tern-recovery-drill-")
        .tempdir_in("/var/tmp")?;
    let bucket = tern_tests::Bucket::new("recovery-drill", tmp.path())?;
    let disk = tmp.path().join("web.img");
    tern_tests::make_disk(&disk, 24 << 20, &mut tern_tests::rng(9))?;
    let out = run_ok(&mut bucket.sync_cmd(
        &bins,
        "gw",
        "web-01",
        &tmp.path().join("state"),
        &[("sda", &disk)],
    ))?;
    let point = serde_json::from_slice::<serde_json::Value>(&out.stdout)?["point_id"]
        .as_str()
        .context("point_id")?
        .to_owned();

    let helper_image = tmp.path().join("no-helper.raw");
    std::fs::File::create(&helper_image)?.set_len(1 << 20)?;
    let secret = tmp.path().join("s3.secret");
    std::fs::write(&secret, &bucket.secret_access_key)?;
    let port = bucket
        .endpoint
        .rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse::<u16>().ok())
        .context("store port")?;
    let config = tmp.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[object_store]\nurl = {url:?}\nendpoint = {ep:?}\nregion = {region:?}\naccess_key_id = {ak:?}\n\
             secret_file = {secret:?}\nca_file = {ca:?}\nscan_minutes = 60\ngc_hours = 0\n\
             [recovery]\nhelper_image = {img:?}\naccel = 'tcg'\n\
             store_endpoint_for_instances = 'https://10.0.2.2:{port}'\n",
            url = bucket.url("gw"),
            ep = bucket.endpoint,
            region = bucket.region,
            ak = bucket.access_key_id,
            secret = secret.display().to_string(),
            ca = bucket.ca_file.display().to_string(),
            img = helper_image.display().to_string(),
        ),
    )?;
    let gw = tern_tests::Gateway::start(
        &bins,
        &tmp.path().join("gw"),
        &["--config", config.to_str().context("path")?],
    )?;
    gw.control(reqwest::Method::POST, "/api/v1/object/scan", None)?;
    let created: serde_json::Value = serde_json::from_str(&gw.control(
        reqwest::Method::POST,
        "/api/v1/recoveries",
        Some(serde_json::json!({
            "host": "web-01", "point": "latest", "mode": "object", "drill": true,
            "flavor": {"vcpus": 1, "ram_mib": 256}, "encryption_key": "THE-KEY-FILE"
        })),
    )?)?;
    let id = created["id"].as_str().context("id")?.to_owned();
    let start = Instant::now();
    let r = loop {
        let r: serde_json::Value =
            serde_json::from_str(&gw.control_get(&format!("/api/v1/recoveries/{id}"))?)?;
        if r["state"] == "restoring" {
            break r;
        }
        assert_ne!(r["state"], "failed", "{r:#}");
        assert!(start.elapsed() < Duration::from_secs(120), "not restoring: {r:#}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(r["point"], point.as_str());
    assert_eq!(r["encrypted"], true);
    assert_eq!(r["helper_instance"], serde_json::Value::Null);
    let listed = gw.control_get("/api/v1/recoveries")?;
    assert!(!listed.contains("THE-KEY-FILE") && !listed.contains(&bucket.secret_access_key));
    let db = std::fs::read(gw.dir.join("meta.redb"))?;
    for s in ["THE-KEY-FILE", bucket.secret_access_key.as_str()] {
        assert!(
            !db.windows(s.len()).any(|w| w == s.as_bytes()),
            "a secret is in the DB"
        );
    }

    // The instance: helper image grown to the source size first, isolated, forward to the store.
    let inst = gw.dir.join("instances").join(&id);
    let vol = std::fs::metadata(gw.dir.join("volumes").join(format!("{id}.sda.img")))?;
    assert_eq!(vol.len(), 24 << 20);
    let pid = std::fs::read_to_string(inst.join("qemu.pid"))?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim()))?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("restrict=on"), "{cmdline}");
    assert!(
        cmdline.contains(&format!(
            "guestfwd=tcp:10.0.2.100:{port}-cmd:{} relay 127.0.0.1:{port}",
            bins.join("tern-gateway").display()
        )),
        "{cmdline}"
    );
    let job = run_ok(
        std::process::Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(inst.join("config-drive.img"))
            .arg("::tern/job.json"),
    )?;
    let job: serde_json::Value = serde_json::from_slice(&job.stdout)?;
    assert_eq!(job["action"], "restore-repair");
    assert_eq!(job["after"], "reboot");
    let src = &job["source"];
    assert_eq!(src["endpoint"], format!("https://10.0.2.100:{port}"));
    assert_eq!(src["url"], bucket.url("gw"));
    assert_eq!(src["encryption_key"], "THE-KEY-FILE");
    assert_eq!(src["secret_access_key"], bucket.secret_access_key.as_str());
    assert_eq!(src["point"], point.as_str());
    assert!(
        src["ca_pem"]
            .as_str()
            .is_some_and(|p| p.contains("BEGIN CERTIFICATE"))
    );
    // The relay QEMU runs per guest connection carries bytes both ways and ends with the
    // target's side. Checked against a plain TCP peer: a TLS store (RGW) may close a connection
    // that does not speak TLS without a byte, which would prove nothing about the relay.
    let peer = std::net::TcpListener::bind("127.0.0.1:0")?;
    let peer_addr = peer.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
        use std::io::{Read as _, Write as _};
        let (mut s, _) = peer.accept()?;
        let mut got = Vec::new();
        s.read_to_end(&mut got)?;
        s.write_all(b"pong:")?;
        s.write_all(&got)?;
        Ok(got)
    });
    let mut relay = std::process::Command::new(bins.join("tern-gateway"))
        .args(["relay", &peer_addr.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    {
        use std::io::Write as _;
        let mut stdin = relay.stdin.take().context("stdin")?;
        stdin.write_all(b"ping")?;
    }
    let out = relay.wait_with_output()?;
    let got = server
        .join()
        .map_err(|_| anyhow::anyhow!("peer thread panicked"))??;
    assert_eq!(got, b"ping", "the relay did not carry the guest's bytes");
    assert_eq!(
        out.stdout, b"pong:ping",
        "the relay did not carry the answer back"
    );
    assert!(out.status.success(), "relay: {}", out.status);

    gw.control(reqwest::Method::DELETE, &format!("/api/v1/recoveries/{id}"), None)?;
    let start = Instant::now();
    while gw.control_get(&format!("/api/v1/recoveries/{id}")).is_ok() {
        assert!(start.elapsed() < Duration::from_secs(60), "DELETE did not finish");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(!inst.exists());
    assert!(!gw.dir.join("volumes").join(format!("{id}.sda.img")).exists());
    Ok(())
}
