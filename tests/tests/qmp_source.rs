//! A running QEMU (`qemu-system-x86_64`, TCG, paused: no guest OS needed) with a virtio disk,
//! synced through QMP: a point-in-time fleecing export with dirty bitmaps switched in one
//! transaction. Writes reach the disk through the device's own block backend (HMP `qemu-io`), as
//! a guest's would. Every point equals the disk; incrementals read only what the bitmap lists;
//! after a failed sync the previous bitmap again covers everything since the last point.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tern_tests::qemu;
use tern_tests::{Gateway, agent_sync_cmd, e2e, run_ok, sha256_file};

const HOST: &str = "kvm-live-01";
const BACKEND: &str = "/machine/peripheral/vda/virtio-backend";

/// A paused QEMU with one qcow2 disk (node `disk0`), killed on drop.
struct Vm {
    child: Child,
    qmp: PathBuf,
}

impl Vm {
    /// `qmp` is the test's own monitor; the agent gets `agent_qmp` (QEMU serves one client per
    /// QMP socket, so a management stack and the agent each need their own).
    fn start(image: &Path, qmp: &Path, agent_qmp: &Path) -> Result<Self> {
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-machine",
                "q35",
                "-nodefaults",
                "-display",
                "none",
                "-S",
                "-qmp",
            ])
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", agent_qmp.display()))
            .arg("-blockdev")
            .arg(format!(
                "driver=file,filename={},node-name=file0",
                image.display()
            ))
            .args(["-blockdev", "driver=qcow2,node-name=disk0,file=file0"])
            .args(["-device", "virtio-blk-pci,drive=disk0,id=vda"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !qmp.exists() {
            if Instant::now() > deadline {
                bail!("QEMU made no QMP socket within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child,
            qmp: qmp.to_owned(),
        })
    }

    /// Runs QMP commands on a fresh connection; their `return` values.
    fn qmp(&self, commands: &[(&str, Value)]) -> Result<Vec<Value>> {
        let s = UnixStream::connect(&self.qmp)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let mut out = Vec::new();
        for (cmd, args) in std::iter::once(&("qmp_capabilities", json!({}))).chain(commands) {
            writeln!(w, "{}", json!({ "execute": cmd, "arguments": args }))?;
            loop {
                line.clear();
                r.read_line(&mut line)?;
                let v: Value = serde_json::from_str(&line)?;
                if v.get("event").is_some() {
                    continue;
                }
                if let Some(e) = v.get("error") {
                    bail!("{cmd}: {e}");
                }
                out.push(v["return"].clone());
                break;
            }
        }
        Ok(out.split_off(1))
    }

    /// Writes through the virtio device's block backend (`qemu-io` commands), then flushes.
    fn write(&self, commands: &[String]) -> Result<()> {
        let mut cmds: Vec<(&str, Value)> = commands
            .iter()
            .map(|c| {
                (
                    "human-monitor-command",
                    json!({ "command-line": format!("qemu-io -d {BACKEND} \"{c}\"") }),
                )
            })
            .collect();
        cmds.push((
            "human-monitor-command",
            json!({ "command-line": format!("qemu-io -d {BACKEND} \"flush\"") }),
        ));
        for r in self.qmp(&cmds)? {
            let text = r.as_str().unwrap_or_default();
            if !text.trim().is_empty() {
                bail!("qemu-io: {text}");
            }
        }
        Ok(())
    }

    /// The dirty bitmaps of `disk0`: (name, recording).
    fn bitmaps(&self) -> Result<Vec<(String, bool)>> {
        let r = self.qmp(&[("query-named-block-nodes", json!({ "flat": true }))])?;
        let nodes = r[0].as_array().cloned().unwrap_or_default();
        let node = nodes
            .iter()
            .find(|n| n["node-name"] == "disk0")
            .context("no node disk0")?;
        Ok(node["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|b| {
                (
                    b["name"].as_str().unwrap_or("").to_owned(),
                    b["recording"].as_bool().unwrap_or(false),
                )
            })
            .collect())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn live_qemu_guest_through_qmp() -> Result<()> {
    let test = "live_qemu_guest_through_qmp";
    let Some(bins) = e2e(test) else { return Ok(()) };
    if let Some(t) = qemu::missing(&["qemu-system-x86_64", "qemu-img", "qemu-io"]) {
        bail!("{test}: {t} is missing (scripts/install-deps installs qemu-system-x86 and qemu-utils)");
    }
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("vda.qcow2");
    let raw = tmp.path().join("vda.raw");
    qemu::create_qcow2(&img, 64 << 20)?;
    qemu::qemu_io(
        &img,
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 10M 192k".into(),
            "write -P 0x23 40M 4M".into(),
        ],
    )?;
    let agent_qmp = tmp.path().join("agent.qmp");
    let vm = Vm::start(&img, &tmp.path().join("qmp.sock"), &agent_qmp)?;
    let gw = Gateway::start(&bins, &tmp.path().join("gw"), &[])?;
    let key = gw.key(HOST)?;
    let state = tmp.path().join("state");
    let disk = format!("vda=qmp:{}?node=disk0", agent_qmp.display());
    let sync = |extra: &[&str]| -> Result<std::process::Output> {
        let mut cmd = agent_sync_cmd(&bins, &gw, &key, HOST, &state);
        cmd.arg("--disk").arg(&disk).args(extra);
        Ok(cmd.output()?)
    };
    let ok = |out: std::process::Output| -> Result<Value> {
        if !out.status.success() {
            bail!("sync failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    // The disk's bytes now (flushed by `write`; read while QEMU runs, with -U).
    let disk_sha = || -> Result<String> {
        run_ok(
            Command::new("qemu-img")
                .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
                .arg(&img)
                .arg(&raw),
        )?;
        sha256_file(&raw)
    };
    // The point equals the disk.
    let check = |s: &Value| -> Result<String> {
        let point = s["point_id"].as_str().unwrap_or_default().to_owned();
        assert_eq!(
            sha256_file(&gw.snapshot_path(HOST, "vda", &point))?,
            disk_sha()?,
            "point {point} differs from the disk: {s}"
        );
        Ok(point)
    };

    let full = ok(sync(&[])?)?;
    let p1 = check(&full)?;
    assert_eq!(full["disks"][0]["changes"], "read", "{full}");
    assert!(
        full["bytes_read"].as_u64() <= Some((5 << 20) + (256 << 10)),
        "{full}"
    );
    // The point's bitmap now records every write.
    assert_eq!(vm.bitmaps()?, vec![(format!("tern-{p1}"), true)]);

    vm.write(&[
        "write -P 0x33 20M 64k".into(),
        "write -P 0x44 4096 8k".into(),
        "write -z 40M 4M".into(),
    ])?;
    let inc = ok(sync(&[])?)?;
    let p2 = check(&inc)?;
    let d = &inc["disks"][0];
    assert_eq!(d["changes"], format!("dirty-bitmap:tern-{p1}"), "{inc}");
    // Two 64 KiB granules of data are read; the zeroed 4 MiB is not sent as data.
    assert_eq!(d["bytes_read"].as_u64(), Some(2 << 16), "{inc}");
    assert_eq!(d["bytes_sent"].as_u64(), Some(2 << 16), "{inc}");
    assert_eq!(
        vm.bitmaps()?,
        vec![(format!("tern-{p2}"), true)],
        "the previous bitmap is removed after the commit"
    );

    // A sync that fails after the export was set up (its second disk is missing): the new
    // bitmap's writes go back into the previous one, which records again; the next sync still
    // sees the writes made before and after the failed attempt.
    vm.write(&["write -P 0x55 30M 64k".into()])?;
    let failed = sync(&["--disk", "vdb=/nonexistent/tern-disk"])?;
    assert!(!failed.status.success());
    assert_eq!(vm.bitmaps()?, vec![(format!("tern-{p2}"), true)]);
    vm.write(&["write -P 0x66 50M 64k".into()])?;
    let inc = ok(sync(&[])?)?;
    let p3 = check(&inc)?;
    assert_eq!(
        inc["disks"][0]["changes"],
        format!("dirty-bitmap:tern-{p2}"),
        "{inc}"
    );
    assert_eq!(inc["disks"][0]["bytes_read"].as_u64(), Some(2 << 16), "{inc}");
    assert_eq!(vm.bitmaps()?, vec![(format!("tern-{p3}"), true)]);

    // Point in time: the guest keeps writing while the sync reads. A region written after the
    // sync froze the disk (its backup job exists) but before the agent read it (one chunk in
    // flight, sends throttled) must be in the point with its old content.
    vm.write(&["write -P 0x88 0 4M".into(), "write -P 0x89 12M 4M".into()])?;
    let frozen = disk_sha()?;
    let mut cmd = agent_sync_cmd(&bins, &gw, &key, HOST, &state);
    let child = cmd
        .arg("--disk")
        .arg(&disk)
        .args(["--window", "1", "--bwlimit", "2M"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The backup job exists only once the transaction froze the disk (the fleecing node is
        // added before it).
        let jobs = vm.qmp(&[("query-block-jobs", json!({}))])?;
        if jobs[0].to_string().contains("tern-backup-vda") {
            break;
        }
        assert!(Instant::now() < deadline, "the sync never froze the disk");
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.write(&["write -P 0x99 12M 4M".into()])?;
    let live = ok(child.wait_with_output()?)?;
    let p4 = live["point_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        sha256_file(&gw.snapshot_path(HOST, "vda", &p4))?,
        frozen,
        "the point is not the disk as it was when the sync froze it: {live}"
    );
    // The write made during the sync is in the next point (the new bitmap recorded it).
    let next = ok(sync(&[])?)?;
    check(&next)?;
    assert_eq!(next["disks"][0]["bytes_read"].as_u64(), Some(4 << 20), "{next}");

    // Nothing of the fleecing is left in QEMU.
    let nodes = vm.qmp(&[("query-named-block-nodes", json!({ "flat": true }))])?;
    assert!(
        !nodes[0].to_string().contains("tern-fleece"),
        "a fleecing node was left: {}",
        nodes[0]
    );
    Ok(())
}
