//! kill -9 of the agent and of the gateway in the middle of a full sync, and in the middle of
//! an incremental of scattered small changes (sent in batches of many extents, each batch under
//! one durable write intent): the sync resumes, sends at most what was missing plus the
//! in-flight window, no point exists for the interrupted sync until it ends, the point committed
//! before stays byte-identical to what it was, and the final point is byte-identical to the
//! source.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use rand::Rng;
use tern_tests::{Gateway, Key, agent_sync_cmd, e2e, rng, run_ok, sha256_file, write_random};

const HOST: &str = "web-01";
const DISK_SIZE: u64 = 512 << 20;
const CHUNK: u64 = 4 << 20;
const WINDOW: u64 = 8;
/// What the gateway may lose when killed: extents written during one landed batch interval
/// (500 ms at the agent's 100 MB/s limit), rounded up.
const BATCH_LOSS: u64 = 64 << 20;

fn agent_cmd(bins: &Path, gw: &Gateway, key: &Key, state: &Path, disk: &Path) -> Command {
    let mut cmd = agent_sync_cmd(bins, gw, key, HOST, state);
    cmd.args(["--window", &WINDOW.to_string(), "--disk"])
        .arg(format!("sda={}", disk.display()));
    cmd
}

/// Starts a rate-limited sync and returns it once the gateway has received about half.
fn start_and_wait_half(
    bins: &Path,
    gw: &Gateway,
    key: &Key,
    state: &Path,
    disk: &Path,
) -> Result<(Child, u64)> {
    let mut child = agent_cmd(bins, gw, key, state, disk)
        .args(["--bwlimit", "100M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = gw.metric("tern_gateway_bytes_in_total")?;
        if got >= DISK_SIZE / 2 {
            return Ok((child, got));
        }
        if let Some(s) = child.try_wait()? {
            bail!("agent ended ({s}) before half of the sync");
        }
        if Instant::now() > deadline {
            bail!("sync did not reach half in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn points(gw: &Gateway) -> Result<usize> {
    let hosts: serde_json::Value = serde_json::from_str(&gw.control_get("/api/v1/hosts")?)?;
    Ok(hosts
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| h["points"].as_array().map_or(0, Vec::len))
        .sum())
}

fn finish(bins: &Path, gw: &Gateway, key: &Key, state: &Path, disk: &Path) -> Result<serde_json::Value> {
    let out = run_ok(&mut agent_cmd(bins, gw, key, state, disk))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn setup(seed: u64) -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let tmp = tempfile::tempdir()?;
    let disk = tmp.path().join("sda.img");
    std::fs::File::create(&disk)?.set_len(DISK_SIZE)?;
    let mut r = rng(seed);
    let mut off = 0;
    while off < DISK_SIZE {
        write_random(&disk, off, 64 << 20, &mut r)?;
        off += 64 << 20;
    }
    Ok((tmp, disk))
}

#[test]
fn agent_killed_mid_sync_resumes_and_sends_only_what_is_missing() -> Result<()> {
    let Some(bins) = e2e("agent_killed_mid_sync_resumes_and_sends_only_what_is_missing") else {
        return Ok(());
    };
    let (tmp, disk) = setup(11)?;
    let gw = Gateway::start(&bins, &tmp.path().join("gw"), &[])?;
    let key = gw.key(HOST)?;
    let state = tmp.path().join("agent");
    let (mut agent, _) = start_and_wait_half(&bins, &gw, &key, &state, &disk)?;
    kill9(&mut agent);
    std::thread::sleep(Duration::from_millis(700));
    let landed = gw.metric("tern_gateway_bytes_in_total")?;
    assert_eq!(points(&gw)?, 0, "a point exists for an interrupted sync");
    let want = sha256_file(&disk)?;
    let summary = finish(&bins, &gw, &key, &state, &disk)?;
    let sent = summary["bytes_sent"].as_u64().expect("bytes_sent");
    let bound = DISK_SIZE - landed + WINDOW * CHUNK;
    assert!(
        sent <= bound,
        "resumed sync sent {sent} bytes; missing {} + window {}",
        DISK_SIZE - landed,
        WINDOW * CHUNK
    );
    assert!(sent < DISK_SIZE, "resume sent the whole disk again");
    let point = summary["point_id"].as_str().expect("point_id");
    assert_eq!(sha256_file(&gw.snapshot_path(HOST, "sda", point))?, want);
    assert_eq!(points(&gw)?, 1);
    Ok(())
}

#[test]
fn gateway_killed_mid_sync_resumes_and_sends_only_what_is_missing() -> Result<()> {
    let Some(bins) = e2e("gateway_killed_mid_sync_resumes_and_sends_only_what_is_missing") else {
        return Ok(());
    };
    let (tmp, disk) = setup(12)?;
    let mut gw = Gateway::start(&bins, &tmp.path().join("gw"), &[])?;
    let key = gw.key(HOST)?;
    let state = tmp.path().join("agent");
    let (mut agent, received) = start_and_wait_half(&bins, &gw, &key, &state, &disk)?;
    gw.kill9();
    kill9(&mut agent);
    gw.restart()?;
    assert_eq!(points(&gw)?, 0, "a point exists for an interrupted sync");
    let want = sha256_file(&disk)?;
    let summary = finish(&bins, &gw, &key, &state, &disk)?;
    let sent = summary["bytes_sent"].as_u64().expect("bytes_sent");
    let bound = DISK_SIZE - received + WINDOW * CHUNK + BATCH_LOSS;
    assert!(
        sent <= bound,
        "resumed sync sent {sent} bytes; missing at most {} + window {} + one batch {}",
        DISK_SIZE - received,
        WINDOW * CHUNK,
        BATCH_LOSS
    );
    // What the restarted gateway received is what the agent sent after the restart.
    assert_eq!(gw.metric("tern_gateway_bytes_in_total")?, sent);
    let point = summary["point_id"].as_str().expect("point_id");
    assert_eq!(sha256_file(&gw.snapshot_path(HOST, "sda", point))?, want);
    assert_eq!(points(&gw)?, 1);
    Ok(())
}

/// Scattered changes of the incremental: this many 64 KiB writes at distinct 64 KiB-aligned
/// offsets (64 MiB), so that the agent sends them as batches of many extents.
const SCATTERED: u64 = 1024;
const BLOCK: u64 = 64 << 10;

/// Full sync, then scattered writes, then an incremental interrupted by kill -9 of the agent or
/// of both the gateway and the agent once the gateway received about half of the changes.
fn incremental_killed(bins: &Path, seed: u64, kill_gateway: bool) -> Result<()> {
    let (tmp, disk) = setup(seed)?;
    let mut gw = Gateway::start(bins, &tmp.path().join("gw"), &[])?;
    let key = gw.key(HOST)?;
    let state = tmp.path().join("agent");
    let first = finish(bins, &gw, &key, &state, &disk)?;
    let first_point = first["point_id"].as_str().expect("point_id").to_owned();
    let first_hash = sha256_file(&disk)?;

    let mut r = rng(seed + 100);
    let mut offsets = BTreeSet::new();
    while (offsets.len() as u64) < SCATTERED {
        offsets.insert(r.random_range(0..DISK_SIZE / BLOCK) * BLOCK);
    }
    for &off in &offsets {
        write_random(&disk, off, BLOCK as usize, &mut r)?;
    }
    let changed = SCATTERED * BLOCK;
    let want = sha256_file(&disk)?;

    let before = gw.metric("tern_gateway_bytes_in_total")?;
    let batches_before = gw.metric("tern_gateway_extent_batches_total")?;
    let mut agent = agent_cmd(bins, &gw, &key, &state, &disk)
        .args(["--bwlimit", "20M"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let received = loop {
        let got = gw.metric("tern_gateway_bytes_in_total")? - before;
        if got >= changed / 2 {
            break got;
        }
        if let Some(s) = agent.try_wait()? {
            bail!("agent ended ({s}) before half of the incremental");
        }
        if Instant::now() > deadline {
            bail!("incremental did not reach half in 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let batches = gw.metric("tern_gateway_extent_batches_total")? - batches_before;
    // 64 KiB extents in batches of up to 1 MiB: far fewer requests than extents.
    assert!(
        batches > 0 && batches * 4 <= received / BLOCK,
        "{batches} batches for {} extents: the incremental was not batched",
        received / BLOCK
    );
    let bound = if kill_gateway {
        gw.kill9();
        kill9(&mut agent);
        gw.restart()?;
        changed.saturating_sub(received) + WINDOW * CHUNK + BATCH_LOSS
    } else {
        kill9(&mut agent);
        std::thread::sleep(Duration::from_millis(700));
        changed.saturating_sub(gw.metric("tern_gateway_bytes_in_total")? - before) + WINDOW * CHUNK
    };
    assert_eq!(points(&gw)?, 1, "a point exists for the interrupted incremental");
    assert_eq!(
        sha256_file(&gw.snapshot_path(HOST, "sda", &first_point))?,
        first_hash,
        "the interrupted incremental changed the committed point"
    );

    let summary = finish(bins, &gw, &key, &state, &disk)?;
    let sent = summary["bytes_sent"].as_u64().expect("bytes_sent");
    eprintln!(
        "incremental killed (gateway too: {kill_gateway}): {received} of {changed} bytes received in {batches} batches, resumed sync sent {sent} (bound {bound})"
    );
    // The resumed sync sends changed blocks only (never the unchanged rest of the disk), and of
    // those that reached the gateway before the kill only what was in flight (the window) or,
    // when the gateway was killed, landed but not yet recorded (one landed batch).
    assert!(
        sent <= changed.min(bound),
        "resumed incremental sent {sent} bytes; changed {changed}, bound {bound}"
    );
    let point = summary["point_id"].as_str().expect("point_id");
    assert_ne!(point, first_point);
    assert_eq!(sha256_file(&gw.snapshot_path(HOST, "sda", point))?, want);
    assert_eq!(
        sha256_file(&gw.snapshot_path(HOST, "sda", &first_point))?,
        first_hash
    );
    assert_eq!(points(&gw)?, 2);
    Ok(())
}

#[test]
fn agent_killed_mid_incremental_resumes_and_keeps_the_last_point() -> Result<()> {
    let Some(bins) = e2e("agent_killed_mid_incremental_resumes_and_keeps_the_last_point") else {
        return Ok(());
    };
    incremental_killed(&bins, 21, false)
}

#[test]
fn gateway_killed_mid_incremental_resumes_and_keeps_the_last_point() -> Result<()> {
    let Some(bins) = e2e("gateway_killed_mid_incremental_resumes_and_keeps_the_last_point") else {
        return Ok(());
    };
    incremental_killed(&bins, 22, true)
}
