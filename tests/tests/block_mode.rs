//! Block mode end to end: real gateway and agent processes over TLS, two disks, a full sync and
//! three incrementals; every recovery point byte-identical to the source at its moment.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use tern_tests::{Gateway, Key, agent_sync_cmd, e2e, make_disk, random_writes, rng, run_ok, sha256_file};

const HOST: &str = "web-01";

/// Runs one `tern-agent sync` and returns its JSON summary.
fn agent_sync(
    bins: &Path,
    gw: &Gateway,
    key: &Key,
    state: &Path,
    disks: &[(&str, &Path)],
    extra: &[&str],
) -> Result<serde_json::Value> {
    let mut cmd = agent_sync_cmd(bins, gw, key, HOST, state);
    for (id, path) in disks {
        cmd.arg("--disk").arg(format!("{id}={}", path.display()));
    }
    cmd.args(extra);
    let out = run_ok(&mut cmd)?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v.get(k)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("summary has no {k}: {v}"))
}

#[test]
fn two_disks_full_then_three_incrementals_are_byte_identical() -> Result<()> {
    let Some(bins) = e2e("two_disks_full_then_three_incrementals_are_byte_identical") else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let gw = Gateway::start(&bins, &tmp.path().join("gw"), &[])?;
    let key = gw.key(HOST)?;
    let state = tmp.path().join("agent");
    let sda = tmp.path().join("sda.img");
    let sdb = tmp.path().join("sdb.img");
    let mut r = rng(1);
    make_disk(&sda, 1 << 30, &mut r)?;
    // Not a multiple of the chunk size (nor of 4 KiB).
    make_disk(&sdb, (100 << 20) + 12 * 1024 + 512, &mut r)?;
    let disks: [(&str, &Path); 2] = [("sda", &sda), ("sdb", &sdb)];

    // (point id, sha256 per disk) of every point so far.
    let mut points: Vec<(String, Vec<String>)> = Vec::new();
    for round in 0..4 {
        if round > 0 {
            random_writes(&sda, &mut r, 12)?;
            random_writes(&sdb, &mut r, 4)?;
        }
        let expected: Vec<String> = disks.iter().map(|(_, p)| sha256_file(p)).collect::<Result<_>>()?;
        let summary = agent_sync(&bins, &gw, &key, &state, &disks, &[])?;
        let point = summary["point_id"].as_str().expect("point_id").to_owned();
        if round > 0 {
            // Incrementals send what changed, not the disk: well under a tenth of it here.
            assert!(
                num(&summary, "bytes_sent") < (1u64 << 30) / 10,
                "round {round} sent too much: {summary}"
            );
            assert!(num(&summary, "bytes_skipped_unchanged") > 0, "{summary}");
        } else {
            assert!(num(&summary, "bytes_skipped_zero") > 0, "{summary}");
        }
        points.push((point, expected));
        for (p, sums) in &points {
            for ((disk, _), want) in disks.iter().zip(sums) {
                let got = sha256_file(&gw.snapshot_path(HOST, disk, p))?;
                assert_eq!(
                    &got, want,
                    "point {p} disk {disk} differs from the source at its sync (after round {round})"
                );
            }
        }
    }
    let listed = gw.control_get("/api/v1/hosts")?;
    for (p, _) in &points {
        assert!(listed.contains(p.as_str()), "point {p} not listed: {listed}");
    }
    Ok(())
}

#[test]
fn portable_engine_round_trip() -> Result<()> {
    let Some(bins) = e2e("portable_engine_round_trip") else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let gw = Gateway::start(&bins, &tmp.path().join("gw"), &["--engine", "portable"])?;
    let key = gw.key(HOST)?;
    let state = tmp.path().join("agent");
    let sda = tmp.path().join("sda.img");
    let mut r = rng(2);
    make_disk(&sda, 64 << 20, &mut r)?;
    for round in 0..2 {
        if round > 0 {
            random_writes(&sda, &mut r, 5)?;
        }
        let want = sha256_file(&sda)?;
        let summary = agent_sync(&bins, &gw, &key, &state, &[("sda", &sda)], &[])?;
        let point = summary["point_id"].as_str().expect("point_id");
        assert_eq!(sha256_file(&gw.snapshot_path(HOST, "sda", point))?, want);
    }
    assert!(gw.control_get("/metrics")?.contains("engine=\"portable\""));
    Ok(())
}

/// Lost agent state is rebuilt from the gateway's latest point.
#[test]
fn lost_agent_state_is_rebuilt_from_the_gateway() -> Result<()> {
    let Some(bins) = e2e("lost_agent_state_is_rebuilt_from_the_gateway") else {
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    let gw = Gateway::start(&bins, &tmp.path().join("gw"), &[])?;
    let key = gw.key(HOST)?;
    let state = tmp.path().join("agent");
    let sda = tmp.path().join("sda.img");
    let mut r = rng(3);
    let data = make_disk(&sda, 128 << 20, &mut r)?;
    agent_sync(&bins, &gw, &key, &state, &[("sda", &sda)], &[])?;
    std::fs::remove_dir_all(&state)?;
    tern_tests::write_random(&sda, 5 << 20, 4096, &mut r)?;
    let want = sha256_file(&sda)?;
    let summary = agent_sync(&bins, &gw, &key, &state, &[("sda", &sda)], &[])?;
    let point = summary["point_id"].as_str().expect("point_id");
    assert_eq!(sha256_file(&gw.snapshot_path(HOST, "sda", point))?, want);
    // Chunk-level comparison against the manifest: one changed chunk is resent, not the disk.
    assert!(num(&summary, "bytes_sent") <= 4 << 20, "{summary}");
    assert!(data > 4 << 20);
    Ok(())
}

/// The source can be a block device (a loop device when running as root).
#[test]
fn loop_device_source() -> Result<()> {
    let Some(bins) = e2e("loop_device_source") else {
        return Ok(());
    };
    if !tern_tests::is_root() {
        eprintln!("skipped loop_device_source: needs root for losetup");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let img = tmp.path().join("disk.img");
    let mut r = rng(4);
    make_disk(&img, 48 << 20, &mut r)?;
    let out = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(&img))?;
    let dev = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let result = (|| -> Result<()> {
        let gw = Gateway::start(&bins, &tmp.path().join("gw"), &[])?;
        let key = gw.key(HOST)?;
        let want = sha256_file(&img)?;
        let summary = agent_sync(&bins, &gw, &key, &tmp.path().join("agent"), &[("sda", &dev)], &[])?;
        let point = summary["point_id"].as_str().expect("point_id");
        assert_eq!(sha256_file(&gw.snapshot_path(HOST, "sda", point))?, want);
        Ok(())
    })();
    let _ = Command::new("losetup").arg("-d").arg(&dev).status();
    result
}
