//! Object mode end to end: real `tern-agent` and `tern-recovery-helper` processes against a
//! real S3 server (Ceph RGW under `scripts/test`; the in-process s3s-fs server otherwise).

#![allow(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use tern_tests::{Bucket, e2e, make_disk, random_writes, rng, run_ok, sha256_file, write_at};

fn agent(
    bins: &Path,
    bucket: &Bucket,
    prefix: &str,
    host: &str,
    state: &Path,
    disks: &[(&str, &Path)],
) -> Command {
    bucket.sync_cmd(bins, prefix, host, state, disks)
}

fn restore(
    bins: &Path,
    bucket: &Bucket,
    prefix: &str,
    host: &str,
    point: &str,
    disks: &[(&str, &Path)],
) -> Command {
    bucket.restore_cmd(bins, prefix, host, point, disks)
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn two_disks_full_and_three_incrementals_restore_byte_identical() -> Result<()> {
    let Some(bins) = e2e("two_disks_full_and_three_incrementals_restore_byte_identical") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let bucket = Bucket::new("object-roundtrip", dir.path())?;
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let mut r = rng(31);
    make_disk(&a, 48 << 20, &mut r)?;
    make_disk(&b, (24 << 20) + 12288, &mut r)?;
    // Disk b starts with a copy of 8 MiB of disk a (4 MiB of data, then 4 MiB of zeros in
    // make_disk's pattern): its 4 data chunks of 1 MiB are stored once.
    let shared = std::fs::read(&a)?[4 << 20..12 << 20].to_vec();
    write_at(&b, 0, &shared)?;
    let state = dir.path().join("state");
    let disks = [("a", a.as_path()), ("b", b.as_path())];

    let mut points: Vec<(String, String, String)> = Vec::new();
    for round in 0..4 {
        if round > 0 {
            random_writes(&a, &mut r, 4)?;
            random_writes(&b, &mut r, 2)?;
        }
        let want = (sha256_file(&a)?, sha256_file(&b)?);
        let out = run_ok(&mut agent(&bins, &bucket, "dr", "web-01", &state, &disks))?;
        let s = json(&out);
        let point = s["point_id"].as_str().unwrap().to_owned();
        if round == 0 {
            let stored = s["store"]["chunks_stored"].as_u64().unwrap();
            let known = s["store"]["chunks_known"].as_u64().unwrap();
            assert!(known >= 4, "the shared data is stored once: {s}");
            let plain = s["store"]["bytes_plain"].as_u64().unwrap();
            assert_eq!(plain + (known << 20), s["bytes_sent"].as_u64().unwrap(), "{s}");
            assert!(stored > 0);
        } else {
            // An incremental sends only changed chunks.
            assert!(s["bytes_sent"].as_u64().unwrap() < 40 << 20, "{s}");
        }
        points.push((point, want.0, want.1));
    }
    for (point, wa, wb) in &points {
        let (ra, rb) = (dir.path().join("ra.img"), dir.path().join("rb.img"));
        let _ = std::fs::remove_file(&ra);
        let _ = std::fs::remove_file(&rb);
        let out = run_ok(&mut restore(
            &bins,
            &bucket,
            "dr",
            "web-01",
            point,
            &[("a", &ra), ("b", &rb)],
        ))?;
        let s = json(&out);
        assert_eq!(s.as_array().unwrap().len(), 2);
        assert_eq!(&sha256_file(&ra)?, wa, "disk a at point {point}");
        assert_eq!(&sha256_file(&rb)?, wb, "disk b at point {point}");
    }
    eprintln!("restored {} points from {}", points.len(), bucket.kind);
    Ok(())
}

/// Flips a bit in the object of the chunk holding `plain` (keyed id under `key_file`); returns
/// its id and (path, original bytes).
fn corrupt_chunk(root: &Path, key_file: &Path, plain: &[u8]) -> Result<(String, (PathBuf, Vec<u8>))> {
    use tern_core::object::{Cipher, StoreKey, blob};
    let key = StoreKey::load(key_file, Cipher::Aes256Gcm)?;
    let id = blob::chunk_id(plain, Some(&key)).to_hex();
    let victim = root.join("enc/chunks").join(&id[..4]).join(&id);
    let original = std::fs::read(&victim)?;
    let mut bytes = original.clone();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x10;
    std::fs::write(&victim, bytes)?;
    Ok((id, (victim, original)))
}

#[test]
fn encrypted_points_hide_plaintext_refuse_a_wrong_key_and_name_a_corrupt_chunk() -> Result<()> {
    let Some(bins) = e2e("encrypted_points_hide_plaintext_refuse_a_wrong_key_and_name_a_corrupt_chunk")
    else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    // This test edits objects behind the server's back: it needs the file-backed server.
    let server = tern_tests::s3server::start(&dir.path().join("s3"), Default::default())?;
    server.create_bucket("secret-test")?;
    let bucket = Bucket {
        endpoint: server.endpoint.clone(),
        access_key_id: server.access_key_id.clone(),
        secret_access_key: server.secret_access_key.clone(),
        ca_file: server.ca_file.clone(),
        region: "us-east-1".into(),
        name: "secret-test".into(),
        kind: "s3s-fs",
        server: Some(server),
    };
    let disk = dir.path().join("d.img");
    // 41 bytes: 1 MiB chunks all differ (2^20 mod 41 = 1).
    let pattern = b"TERN-KNOWN-PLAINTEXT-PATTERN-0123456789! ";
    let data: Vec<u8> = pattern.iter().copied().cycle().take(6 << 20).collect();
    std::fs::write(&disk, &data)?;
    let key = dir.path().join("key");
    run_ok(
        Command::new(bins.join("tern-agent"))
            .args(["keygen", "--out"])
            .arg(&key),
    )?;
    let state = dir.path().join("state");
    let mut cmd = agent(&bins, &bucket, "enc", "db-01", &state, &[("d", &disk)]);
    cmd.arg("--encryption-key-file").arg(&key);
    let out = run_ok(&mut cmd)?;
    let point = json(&out)["point_id"].as_str().unwrap().to_owned();

    // No object holds the pattern.
    let root = bucket.fs_root().unwrap();
    let mut stack = vec![root.clone()];
    let mut objects = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                objects += 1;
                let b = std::fs::read(&p)?;
                assert!(
                    !b.windows(pattern.len()).any(|w| w == pattern),
                    "plaintext in {}",
                    p.display()
                );
            }
        }
    }
    assert!(objects >= 3);

    // A wrong key: a clear error, no output file.
    let other = dir.path().join("other-key");
    run_ok(
        Command::new(bins.join("tern-agent"))
            .args(["keygen", "--out"])
            .arg(&other),
    )?;
    let out_path = dir.path().join("restored.img");
    let mut cmd = restore(&bins, &bucket, "enc", "db-01", &point, &[("d", &out_path)]);
    cmd.arg("--encryption-key-file").arg(&other);
    let out = cmd.output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("encrypted with key"), "{err}");
    assert!(!out_path.exists(), "nothing written with a wrong key");
    // No key at all.
    let out = restore(&bins, &bucket, "enc", "db-01", &point, &[("d", &out_path)]).output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("give the key file"));

    // The right key restores it.
    let mut cmd = restore(&bins, &bucket, "enc", "db-01", &point, &[("d", &out_path)]);
    cmd.arg("--encryption-key-file").arg(&key);
    run_ok(&mut cmd)?;
    assert_eq!(std::fs::read(&out_path)?, data);

    // One flipped bit in the bucket: the restore names the chunk, the disk and the offset.
    // The last chunk (1 MiB chunks: the sixth).
    let (victim, original) = corrupt_chunk(&root, &key, &data[5 << 20..])?;
    std::fs::remove_file(&out_path)?;
    let mut cmd = restore(&bins, &bucket, "enc", "db-01", &point, &[("d", &out_path)]);
    // One chunk at a time, in order: everything before the bad chunk is restored and journaled.
    cmd.arg("--encryption-key-file").arg(&key).args(["--window", "1"]);
    let out = cmd.output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("chunk {victim} of disk d at offset")),
        "{err}"
    );
    assert!(err.contains("authentication"), "{err}");
    assert!(err.contains(&format!("at offset {}", 5 << 20)), "{err}");

    // Repaired (the object put back), the re-run resumes after what was restored.
    std::fs::write(&original.0, &original.1)?;
    let mut cmd = restore(&bins, &bucket, "enc", "db-01", &point, &[("d", &out_path)]);
    cmd.arg("--encryption-key-file").arg(&key);
    let s = json(&run_ok(&mut cmd)?);
    assert_eq!(s[0]["chunks_resumed"].as_u64().unwrap(), 5, "{s}");
    assert_eq!(s[0]["chunks_restored"].as_u64().unwrap(), 1, "{s}");
    assert_eq!(std::fs::read(&out_path)?, data);
    Ok(())
}

#[test]
fn sync_and_restore_complete_through_injected_faults() -> Result<()> {
    use std::time::Duration;
    use tern_tests::faultproxy::{FaultConfig, FaultKind, FaultProxy, FaultRule};
    let Some(bins) = e2e("sync_and_restore_complete_through_injected_faults") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let real = Bucket::new("object-faults", dir.path())?;
    let ca = std::fs::read(&real.ca_file)?;
    let faults = FaultConfig {
        seed: 11,
        max_faults: 60,
        slowdown: FaultRule::new(0.12),
        reset: FaultRule::new(0.08),
        stall: FaultRule::new(0.04),
        // Only GETs: a retried multipart completion is not idempotent on every server, and a
        // truncated PUT answer is just a reset.
        truncate: FaultRule::only(0.12, &[http::Method::GET]),
        stall_for: Duration::from_secs(3),
        stall_then_forward: false,
    };
    let proxy = FaultProxy::start(&real.endpoint, Some(&ca), faults)?;
    // The same bucket, reached through the proxy.
    let bucket = Bucket {
        endpoint: proxy.endpoint.clone(),
        ca_file: proxy.ca_file.clone(),
        access_key_id: real.access_key_id.clone(),
        secret_access_key: real.secret_access_key.clone(),
        region: real.region.clone(),
        name: real.name.clone(),
        kind: real.kind,
        server: None,
    };
    let disk = dir.path().join("d.img");
    let mut r = rng(5);
    make_disk(&disk, 40 << 20, &mut r)?;
    let state = dir.path().join("state");
    let mut points = Vec::new();
    for round in 0..2 {
        if round > 0 {
            random_writes(&disk, &mut r, 3)?;
        }
        let want = sha256_file(&disk)?;
        let out = run_ok(&mut agent(&bins, &bucket, "f", "app-01", &state, &[("d", &disk)]))?;
        points.push((json(&out)["point_id"].as_str().unwrap().to_owned(), want));
    }
    for (point, want) in &points {
        let out_path = dir.path().join("r.img");
        let _ = std::fs::remove_file(&out_path);
        run_ok(&mut restore(
            &bins,
            &bucket,
            "f",
            "app-01",
            point,
            &[("d", &out_path)],
        ))?;
        assert_eq!(&sha256_file(&out_path)?, want, "point {point}");
    }
    let counts = proxy.counts();
    eprintln!("faults injected against {}: {counts:?}", real.kind);
    for kind in FaultKind::ALL {
        assert!(
            counts.get(kind) > 0,
            "no {} fault was injected: {counts:?}",
            kind.name()
        );
    }
    drop(real);
    Ok(())
}
