//! The local provider's instances with a real guest (QEMU, TCG here): the cached Debian fixture,
//! repaired natively by `tern-recovery-helper repair --disposable-host`, imported as a volume,
//! run as an instance (SeaBIOS, virtio-blk with serial `tern-sda`, user network, a config
//! drive); it comes up with a DHCP address; a new provider on the same directory (a restarted
//! gateway) finds it running, stops it and deletes it.
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
    let settings = QemuSettings::default();
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
        // The volume outlives its instance.
        assert!(p.volume("web-01.sda").await?.is_some());
        p.delete_volume("web-01.sda").await?;
        Ok(())
    })
}
