//! The gateway's side of object mode against a real S3 server (Ceph RGW under
//! `scripts/test`): indexing the bucket, rebuilding the index from the bucket alone,
//! retention, and garbage collection while a sync runs.

#![allow(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tern_tests::{Bucket, Gateway, e2e, make_disk, random_writes, rng, run_ok, sha256_file};

fn agent(bins: &Path, bucket: &Bucket, host: &str, state: &Path, disk: &Path) -> Command {
    bucket.sync_cmd(bins, "gw", host, state, &[("d", disk)])
}

fn point_of(out: &std::process::Output) -> String {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["point_id"].as_str().unwrap().to_owned()
}

fn gateway_cli(bins: &Path, gw: &Gateway, args: &[&str]) -> Result<serde_json::Value> {
    let out = run_ok(
        Command::new(bins.join("tern-gateway"))
            .arg("object")
            .args(args)
            .arg("--data-dir")
            .arg(&gw.dir),
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Waits until the index holds `n` points (the gateway scans at start).
fn wait_points(bins: &Path, gw: &Gateway, n: usize) -> Result<Vec<serde_json::Value>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = gateway_cli(bins, gw, &["points"])?;
        let list = v.as_array().cloned().unwrap_or_default();
        if list.len() == n {
            return Ok(list);
        }
        if Instant::now() > deadline {
            bail!("expected {n} indexed points, have {}: {v}", list.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn restore_ok(bins: &Path, bucket: &Bucket, host: &str, point: &str, out: &Path, want: &str) -> Result<()> {
    let _ = std::fs::remove_file(out);
    run_ok(&mut bucket.restore_cmd(bins, "gw", host, point, &[("d", out)]))?;
    assert_eq!(sha256_file(out)?, want, "{host} point {point}");
    Ok(())
}

#[test]
fn index_rebuilds_from_the_bucket_and_gc_keeps_what_points_need() -> Result<()> {
    let Some(bins) = e2e("index_rebuilds_from_the_bucket_and_gc_keeps_what_points_need") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let bucket = Bucket::new("object-gateway", dir.path())?;
    let disk = dir.path().join("web.img");
    let mut r = rng(77);
    make_disk(&disk, 24 << 20, &mut r)?;
    let state = dir.path().join("state");
    // Three points of web-01, each with changes.
    let mut web = Vec::new();
    for round in 0..3 {
        if round > 0 {
            random_writes(&disk, &mut r, 3)?;
        }
        let want = sha256_file(&disk)?;
        web.push((
            point_of(&run_ok(&mut agent(&bins, &bucket, "web-01", &state, &disk))?),
            want,
        ));
    }
    let db_disk = dir.path().join("db.img");
    make_disk(&db_disk, 8 << 20, &mut r)?;
    let db_want = sha256_file(&db_disk)?;
    let db_point = point_of(&run_ok(&mut agent(
        &bins,
        &bucket,
        "db-01",
        &dir.path().join("state-db"),
        &db_disk,
    ))?);

    // The gateway keeps the 2 newest points of web-01 and everything of db-01.
    let secret = dir.path().join("s3.secret");
    std::fs::write(&secret, &bucket.secret_access_key)?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[object_store]\nurl = {url:?}\nendpoint = {ep:?}\nregion = {region:?}\naccess_key_id = {ak:?}\n\
             secret_file = {secret:?}\nca_file = {ca:?}\nscan_minutes = 60\ngc_hours = 0\n\
             [object_store.host_retention.web-01]\nkeep_last = 2\n",
            url = bucket.url("gw"),
            ep = bucket.endpoint,
            region = bucket.region,
            ak = bucket.access_key_id,
            secret = secret.display().to_string(),
            ca = bucket.ca_file.display().to_string(),
        ),
    )?;
    let gw_dir = dir.path().join("gw");
    let config_s = config.display().to_string();
    let mut gw = Gateway::start(&bins, &gw_dir, &["--config", &config_s])?;
    let points = wait_points(&bins, &gw, 3)?;
    let names: Vec<String> = points
        .iter()
        .map(|p| p["point"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !names.contains(&web[0].0),
        "the oldest web-01 point was pruned: {names:?}"
    );
    assert!(names.contains(&web[1].0) && names.contains(&web[2].0) && names.contains(&db_point));

    // Lose the gateway's DB: the index comes back from the bucket alone.
    gw.kill9();
    std::fs::remove_file(gw_dir.join("meta.redb"))?;
    gw.restart()?;
    let again = wait_points(&bins, &gw, 3)?;
    let mut a: Vec<_> = again
        .iter()
        .map(|p| p["point"].as_str().unwrap().to_owned())
        .collect();
    let mut b = names.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "the rebuilt index holds the same points");

    // GC (no grace): the chunks only the pruned point needed go; every surviving point restores.
    let report = gateway_cli(&bins, &gw, &["gc", "--grace", "0s"])?;
    assert!(report["deleted"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["missing"].as_u64().unwrap(), 0, "{report}");
    let out = dir.path().join("restored.img");
    for (p, want) in &web[1..] {
        restore_ok(&bins, &bucket, "web-01", p, &out, want)?;
    }
    restore_ok(&bins, &bucket, "db-01", &db_point, &out, &db_want)?;

    // GC again and again while a sync runs: the new point is whole.
    random_writes(&disk, &mut r, 4)?;
    let want = sha256_file(&disk)?;
    let mut sync = agent(&bins, &bucket, "web-01", &state, &disk)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut gcs = 0;
    while sync.try_wait()?.is_none() {
        let r = gateway_cli(&bins, &gw, &["gc", "--grace", "0s"])?;
        assert_eq!(r["missing"].as_u64().unwrap(), 0, "{r}");
        gcs += 1;
    }
    let out_sync = sync.wait_with_output()?;
    assert!(
        out_sync.status.success(),
        "{}",
        String::from_utf8_lossy(&out_sync.stderr)
    );
    let p = point_of(&out_sync);
    restore_ok(&bins, &bucket, "web-01", &p, &out, &want)?;
    eprintln!("{gcs} GC runs during the sync against {}", bucket.kind);
    Ok(())
}
