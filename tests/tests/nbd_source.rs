//! The agent as a sync proxy: a qcow2 image with persistent dirty bitmaps, exported by a real
//! `qemu-nbd`, synced over NBD to the gateway (block mode) and to S3 (object mode). Full syncs
//! read only allocated extents; incrementals read only the dirty bitmap's ranges (a dirty range
//! that is now a hole is not read); every point is byte-identical to `qemu-img convert -O raw`
//! of the image at that moment.

use std::path::Path;
use std::process::Command;

use anyhow::Result;
use tern_tests::qemu::{self, QemuNbd};
use tern_tests::{Bucket, Gateway, agent_sync_cmd, e2e, run_ok, sha256_file};

const HOST: &str = "kvm-01";
const SIZE: u64 = 64 << 20;

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("summary has no {k}: {v}"))
}

/// Tools needed, or `None` after saying which one is missing.
fn tools(test: &str) -> Option<()> {
    if let Some(t) = qemu::missing(&["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) {
        if std::env::var("TERN_E2E").ok().as_deref() == Some("1") {
            panic!("{test}: {t} is missing (scripts/install-deps installs qemu-utils and libnbd-bin)");
        }
        eprintln!("skipped {test}: {t} is missing (scripts/install-deps installs it)");
        return None;
    }
    Some(())
}

/// Writes that look like a guest's: data of several patterns, a zero write, a discard.
fn first_writes(img: &Path) -> Result<()> {
    let mut c = Vec::new();
    for i in 0..24u64 {
        // 24 writes of 192 KiB spread over the disk, each its own pattern.
        c.push(format!("write -P {} {} 192k", 0x10 + i, i * (2 << 20) + 4096 * i));
    }
    c.push("write -P 0x77 60M 4M".into());
    qemu::qemu_io(img, &c)
}

/// 1 % of the disk rewritten as 64 KiB writes, plus a zero write and a discard of data.
fn second_writes(img: &Path, round: u64) -> Result<()> {
    let mut c = Vec::new();
    for i in 0..10u64 {
        let off = (i * 6_389_760 + round * 1_048_576) % (SIZE - (64 << 10));
        let off = off / 65536 * 65536;
        c.push(format!("write -P {} {off} 64k", 0xa0 + i + round));
    }
    c.push(format!("write -z {} 64k", (2 << 20) * (round + 1) + 4096));
    c.push("discard 60M 1M".into());
    qemu::qemu_io(img, &c)
}

#[test]
fn nbd_bitmaps_to_the_gateway_full_then_incrementals() -> Result<()> {
    let test = "nbd_bitmaps_to_the_gateway_full_then_incrementals";
    let Some(bins) = e2e(test) else { return Ok(()) };
    if tools(test).is_none() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let gw = Gateway::start(&bins, &tmp.path().join("gw"), &[])?;
    let key = gw.key(HOST)?;
    let state = tmp.path().join("state");
    let img = tmp.path().join("vda.qcow2");
    let raw = tmp.path().join("vda.raw");
    let sock = tmp.path().join("vda.sock");
    qemu::create_qcow2(&img, SIZE)?;
    first_writes(&img)?;
    // The bitmap that tracks writes after the full sync's point in time.
    qemu::bitmap(&img, "add", "b0")?;

    let sync = |extra: &[&str], uri: &str| -> Result<serde_json::Value> {
        let mut cmd = agent_sync_cmd(&bins, &gw, &key, HOST, &state);
        cmd.arg("--disk").arg(format!("vda={uri}")).args(extra);
        Ok(serde_json::from_slice(&run_ok(&mut cmd)?.stdout)?)
    };
    let check = |summary: &serde_json::Value| -> Result<()> {
        qemu::to_raw(&img, &raw)?;
        let point = summary["point_id"].as_str().unwrap_or_default();
        assert_eq!(
            sha256_file(&gw.snapshot_path(HOST, "vda", point))?,
            sha256_file(&raw)?,
            "point {point} differs from the image"
        );
        Ok(())
    };

    // Full: only allocated extents are read (24 x 192 KiB + 4 MiB, in 64 KiB qcow2 clusters:
    // each unaligned 192 KiB write allocates 4 clusters).
    let nbd = QemuNbd::start(&img, &sock, "vda", None)?;
    let full = sync(&["--next-bitmap", "vda=b0"], &nbd.uri())?;
    nbd.stop();
    check(&full)?;
    let disk = &full["disks"][0];
    assert_eq!(disk["changes"], "read", "{full}");
    assert!(num(disk, "bytes_read") <= 24 * (256 << 10) + (4 << 20), "{full}");
    // `qemu-nbd -e 1` does not advertise multi-conn: one connection.
    assert_eq!(num(disk, "nbd_connections"), 1, "{full}");

    // Incrementals: b0 lists the writes since the full sync; b1 starts now. The exports allow
    // several clients, so qemu-nbd advertises multi-conn and the agent reads through up to
    // `--nbd-connections 4`: all 4 in round 1; in round 2 the server takes only 2, the extra
    // connections time out and the sync reads through the 2 it has.
    let mut dirty_bitmap = "b0".to_owned();
    for (round, clients) in [(1u64, 4u32), (2, 2)] {
        second_writes(&img, round)?;
        let next = format!("b{round}");
        qemu::bitmap(&img, "add", &next)?;
        let dirty = qemu::nbdinfo_dirty_bytes(&img, &dirty_bitmap, tmp.path())?;
        let nbd = QemuNbd::start_shared(&img, &sock, "vda", Some(&dirty_bitmap), clients)?;
        let inc = sync(
            &[
                "--dirty-bitmap",
                &format!("vda={dirty_bitmap}"),
                "--next-bitmap",
                &format!("vda={next}"),
                "--nbd-connections",
                "4",
            ],
            &nbd.uri(),
        )?;
        nbd.stop();
        check(&inc)?;
        let disk = &inc["disks"][0];
        assert_eq!(disk["changes"], format!("dirty-bitmap:{dirty_bitmap}"), "{inc}");
        assert_eq!(num(disk, "nbd_connections"), u64::from(clients), "{inc}");
        // Only dirty data is read (the discarded MiB is dirty but a hole now: not read), and
        // no more is sent than is dirty.
        assert!(dirty > 0);
        assert!(
            num(disk, "bytes_read") <= dirty - (1 << 20),
            "read more than the dirty data: {inc}"
        );
        assert!(
            num(disk, "bytes_sent") <= dirty,
            "sent more than is dirty ({dirty}): {inc}"
        );
        assert!(num(disk, "bytes_changed") <= dirty, "{inc}");
        qemu::bitmap(&img, "remove", &dirty_bitmap)?;
        dirty_bitmap = next;
    }

    // Damaged block-values records (one flipped byte in each of the 16 records: the file ends
    // with them, 2080 bytes each): every chunk, unchanged ones included, is read whole instead
    // of trusting its record, and the point is still exact.
    let blocks = state.join(HOST).join("disks").join("vda.blocks");
    let mut bytes = std::fs::read(&blocks)?;
    let len = bytes.len();
    for k in 0..16 {
        bytes[len - 1 - 2080 * k] ^= 0x40;
    }
    std::fs::write(&blocks, &bytes)?;
    second_writes(&img, 3)?;
    qemu::bitmap(&img, "add", "b3")?;
    let dirty = qemu::nbdinfo_dirty_bytes(&img, &dirty_bitmap, tmp.path())?;
    let nbd = QemuNbd::start(&img, &sock, "vda", Some(&dirty_bitmap))?;
    let damaged = sync(
        &[
            "--dirty-bitmap",
            &format!("vda={dirty_bitmap}"),
            "--next-bitmap",
            "vda=b3",
        ],
        &nbd.uri(),
    )?;
    nbd.stop();
    check(&damaged)?;
    let disk = &damaged["disks"][0];
    assert!(
        num(disk, "bytes_read") > dirty,
        "damaged records were trusted: {damaged}"
    );

    // A bitmap that does not match the latest point's token: the disk is read whole, and the
    // point is still exact.
    second_writes(&img, 7)?;
    qemu::bitmap(&img, "add", "stray")?;
    let nbd = QemuNbd::start(&img, &sock, "vda", Some("stray"))?;
    let stray = sync(&["--dirty-bitmap", "vda=stray"], &nbd.uri())?;
    nbd.stop();
    check(&stray)?;
    assert_eq!(stray["disks"][0]["changes"], "read", "{stray}");

    // Asking for a bitmap the export does not have fails clearly and commits nothing.
    let nbd = QemuNbd::start(&img, &sock, "vda", None)?;
    let mut cmd = agent_sync_cmd(&bins, &gw, &key, HOST, &state);
    cmd.arg("--disk")
        .arg(format!("vda={}", nbd.uri()))
        .args(["--dirty-bitmap", "vda=stray"]);
    let out = cmd.output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stray"), "{err}");
    Ok(())
}

#[test]
fn nbd_bitmaps_to_object_storage() -> Result<()> {
    let test = "nbd_bitmaps_to_object_storage";
    let Some(bins) = e2e(test) else { return Ok(()) };
    if tools(test).is_none() {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let bucket = Bucket::new("nbd-object", tmp.path())?;
    let state = tmp.path().join("state");
    let img = tmp.path().join("vda.qcow2");
    let raw = tmp.path().join("vda.raw");
    let out = tmp.path().join("restored.raw");
    let sock = tmp.path().join("vda.sock");
    qemu::create_qcow2(&img, SIZE)?;
    first_writes(&img)?;
    qemu::bitmap(&img, "add", "b0")?;

    // Exports the image (with `bitmap`), syncs with `extra`, restores the point and compares.
    let run = |bitmap: Option<&str>, extra: &[&str]| -> Result<serde_json::Value> {
        let nbd = QemuNbd::start(&img, &sock, "vda", bitmap)?;
        let uri = nbd.uri();
        let mut cmd = bucket.sync_cmd(&bins, "p", HOST, &state, &[("vda", Path::new(&uri))]);
        cmd.args(extra);
        let s: serde_json::Value = serde_json::from_slice(&run_ok(&mut cmd)?.stdout)?;
        nbd.stop();
        qemu::to_raw(&img, &raw)?;
        let point = s["point_id"].as_str().unwrap_or_default().to_owned();
        let _ = std::fs::remove_file(&out);
        run_ok(&mut bucket.restore_cmd(&bins, "p", HOST, &point, &[("vda", &out)]))?;
        assert_eq!(
            sha256_file(&out)?,
            sha256_file(&raw)?,
            "restored point {point} differs"
        );
        Ok(s)
    };
    let full = run(None, &["--next-bitmap", "vda=b0"])?;
    assert_eq!(full["disks"][0]["changes"], "read", "{full}");

    second_writes(&img, 1)?;
    qemu::bitmap(&img, "add", "b1")?;
    let inc = run(
        Some("b0"),
        &["--dirty-bitmap", "vda=b0", "--next-bitmap", "vda=b1"],
    )?;
    let disk = &inc["disks"][0];
    assert_eq!(disk["changes"], "dirty-bitmap:b0", "{inc}");
    // Object mode reads each partly dirty 1 MiB chunk whole: at most one chunk per dirty range.
    assert!(num(disk, "bytes_read") <= 12 << 20, "{inc}");
    Ok(())
}

#[test]
fn nbd_sources_need_a_known_disk_and_bitmap_names() -> Result<()> {
    let Some(bins) = e2e("nbd_sources_need_a_known_disk_and_bitmap_names") else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("plain.img");
    std::fs::write(&img, vec![0u8; 1 << 20])?;
    for (args, want) in [
        (
            vec![
                "--disk".to_owned(),
                format!("sda={}", img.display()),
                "--dirty-bitmap".into(),
                "sda=b0".into(),
            ],
            "is not an NBD export",
        ),
        (
            vec![
                "--disk".to_owned(),
                format!("sda={}", img.display()),
                "--next-bitmap".into(),
                "sdb=b0".into(),
            ],
            "there is no --disk sdb",
        ),
        (vec!["--disk".to_owned(), "sda=nbd+unix:///x".into()], "socket"),
    ] {
        let out = Command::new(bins.join("tern-agent"))
            .args([
                "sync",
                "--host",
                HOST,
                "--target",
                &format!("dir:{}", tmp.path().join("t").display()),
            ])
            .arg("--state-dir")
            .arg(tmp.path().join("state"))
            .args(&args)
            .output()?;
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    Ok(())
}
