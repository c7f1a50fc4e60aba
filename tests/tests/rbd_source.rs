//! The agent as a sync proxy for Ceph RBD: an image written through librbd, synced with a
//! snapshot per sync and `rbd export-diff` to the gateway (block mode) and to S3 (object mode).
//! Every point is byte-identical to `rbd export` of its snapshot; incrementals carry only the
//! diff; the previous snapshot is removed only after the commit; a failed sync keeps it.

use std::path::Path;

use anyhow::Result;
use tern_tests::ceph::{Cluster, Image};
use tern_tests::{Bucket, Gateway, agent_sync_cmd, e2e, run_ok, sha256_file};

const HOST: &str = "ceph-vm-01";
const SIZE: u64 = 128 << 20;

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("summary has no {k}: {v}"))
}

/// Data in a few objects, a run of zeros, data at the end.
const FIRST: &str = "for i in range(12):\n    im.write(rnd.randbytes(192 * K), i * 5 * M + 4096 * i)\n\
im.write(bytes(256 * K), 40 * M)\n\
im.write(rnd.randbytes(4 * M), 60 * M)";
/// 64 KiB rewrites, a zero write over data, a discard of a whole data object.
const SECOND: &str = "for i in range(16):\n    im.write(rnd.randbytes(64 * K), rnd.randrange(0, (64 * M - 64 * K) // 65536) * 65536)\n\
im.write(bytes(64 * K), 5 * M + 4096)\n\
im.discard(60 * M, 4 * M)";

#[test]
fn rbd_snapshot_diffs_to_the_gateway() -> Result<()> {
    let test = "rbd_snapshot_diffs_to_the_gateway";
    let Some(bins) = e2e(test) else { return Ok(()) };
    let Some(cluster) = Cluster::from_env(test)? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let image = Image::create(&cluster, "tern-e2e-gw", SIZE)?;
    let gw = Gateway::start(&bins, &tmp.path().join("gw"), &[])?;
    let key = gw.key(HOST)?;
    let state = tmp.path().join("state");
    let export = tmp.path().join("export.raw");
    let sync = || -> Result<serde_json::Value> {
        let mut cmd = agent_sync_cmd(&bins, &gw, &key, HOST, &state);
        cmd.arg("--disk")
            .arg(format!("vda=rbd:{}", image.spec()))
            .args(cluster.agent_args());
        Ok(serde_json::from_slice(&run_ok(&mut cmd)?.stdout)?)
    };
    // The point equals its snapshot, which is the only tern snapshot left.
    let check = |s: &serde_json::Value| -> Result<String> {
        let point = s["point_id"].as_str().unwrap_or_default().to_owned();
        let snap = format!("tern-{point}");
        assert_eq!(image.snapshots()?, vec![snap.clone()], "{s}");
        image.export(&snap, &export)?;
        assert_eq!(
            sha256_file(&gw.snapshot_path(HOST, "vda", &point))?,
            sha256_file(&export)?,
            "point {point} differs from rbd export of {snap}: {s}"
        );
        Ok(point)
    };

    image.python(1, FIRST)?;
    let full = sync()?;
    check(&full)?;
    assert_eq!(full["disks"][0]["changes"], "read", "{full}");
    // Only allocated RBD objects (4 MiB) are read: the 14 that were written, not the other 18,
    // and only the data is sent: 12 x 192 KiB + 4 MiB (in 64 KiB blocks).
    assert!(num(&full, "bytes_read") <= 14 * (4 << 20), "{full}");
    assert!(
        num(&full, "bytes_sent") <= 12 * (192 << 10) + (4 << 20) + (64 << 10) * 12,
        "{full}"
    );

    let mut point = full["point_id"].as_str().unwrap_or_default().to_owned();
    for round in 0..2 {
        image.python(10 + round, SECOND)?;
        // What changed since the last point's snapshot, as Ceph lists it (data in 64 KiB blocks).
        let (data, _) = image.diff_since(&format!("tern-{point}"), 64 << 10)?;
        let inc = sync()?;
        point = check(&inc)?;
        let disk = &inc["disks"][0];
        assert_eq!(disk["changes"], format!("rbd-diff:{}", image.spec()), "{inc}");
        // Only the changed blocks are read and at most those sent (the discarded object is
        // zeroed without reading).
        assert!(data > 0 && data < 16 << 20, "{data}");
        assert!(
            num(disk, "bytes_read") <= data,
            "read more than the diff's {data} bytes: {inc}"
        );
        assert!(num(disk, "bytes_sent") <= data, "{inc}");
        if round == 0 {
            assert!(
                num(disk, "zero_extents_sent") > 0,
                "the discard is a zero extent: {inc}"
            );
        }
    }

    // A sync that fails after the snapshot was made (its second disk is missing) keeps the
    // previous point's snapshot; the next run resumes the same sync from the same snapshot and
    // makes an exact incremental from the previous one.
    image.python(20, SECOND)?;
    let before = image.snapshots()?;
    let mut cmd = agent_sync_cmd(&bins, &gw, &key, HOST, &state);
    cmd.arg("--disk")
        .arg(format!("vda=rbd:{}", image.spec()))
        .args(["--disk", "vdb=/nonexistent/tern-disk"])
        .args(cluster.agent_args());
    assert!(!cmd.output()?.status.success());
    let after = image.snapshots()?;
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(after[0], before[0], "{before:?} then {after:?}");
    let inc = sync()?;
    assert_eq!(inc["resumed"], true, "{inc}");
    assert_eq!(
        format!("tern-{}", inc["point_id"].as_str().unwrap_or_default()),
        after[1]
    );
    check(&inc)?;
    assert_eq!(
        inc["disks"][0]["changes"],
        format!("rbd-diff:{}", image.spec()),
        "{inc}"
    );
    Ok(())
}

#[test]
fn rbd_to_object_storage() -> Result<()> {
    let test = "rbd_to_object_storage";
    let Some(bins) = e2e(test) else { return Ok(()) };
    let Some(cluster) = Cluster::from_env(test)? else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let image = Image::create(&cluster, "tern-e2e-obj", SIZE)?;
    let bucket = Bucket::new("rbd-object", tmp.path())?;
    let state = tmp.path().join("state");
    let export = tmp.path().join("export.raw");
    let restored = tmp.path().join("restored.raw");
    let uri = format!("rbd:{}", image.spec());
    for seed in [1, 2] {
        image.python(seed, if seed == 1 { FIRST } else { SECOND })?;
        let mut cmd = bucket.sync_cmd(&bins, "p", HOST, &state, &[("vda", Path::new(&uri))]);
        cmd.args(cluster.agent_args());
        let s: serde_json::Value = serde_json::from_slice(&run_ok(&mut cmd)?.stdout)?;
        let point = s["point_id"].as_str().unwrap_or_default().to_owned();
        image.export(&format!("tern-{point}"), &export)?;
        let _ = std::fs::remove_file(&restored);
        run_ok(&mut bucket.restore_cmd(&bins, "p", HOST, &point, &[("vda", &restored)]))?;
        assert_eq!(sha256_file(&restored)?, sha256_file(&export)?, "point {point}");
        assert_eq!(image.snapshots()?, vec![format!("tern-{point}")]);
    }
    Ok(())
}
