//! End-to-end test support: real `tern-gateway` and `tern-agent` processes, real TLS, real
//! volume files.
//!
//! These tests run when `TERN_E2E=1` (set by `scripts/test`) and take the binaries from
//! `TERN_BIN_DIR` (default `target/release`); otherwise they print why they skip.
//!
//! Two test servers live here too, each a library usable in process and a binary:
//! [`s3server`] (`tern-test-s3`, a real S3 over HTTPS backed by `s3s-fs`) and [`faultproxy`]
//! (`tern-fault-proxy`, an HTTPS reverse proxy that injects S3 faults); [`fixture`] holds what
//! they share. Their own tests (`tests/fixtures.rs`) run under plain `cargo test`.

pub mod ceph;
pub mod faultproxy;
pub mod fixture;
pub mod qemu;
pub mod s3server;
pub mod vm;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{Rng, RngCore, SeedableRng};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Where the binaries are, or `None` (with a printed reason) when end-to-end tests are off.
pub fn e2e(test: &str) -> Option<PathBuf> {
    if std::env::var("TERN_E2E").ok().as_deref() != Some("1") {
        eprintln!("skipped {test}: end-to-end test; set TERN_E2E=1 (scripts/test does) to run it");
        return None;
    }
    let dir = std::env::var_os("TERN_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
    for b in ["tern-gateway", "tern-agent"] {
        assert!(
            dir.join(b).exists(),
            "{} missing: build with `cargo build --release --bins`",
            dir.join(b).display()
        );
    }
    Some(dir)
}

/// Whether this process runs as root (loop devices).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The endpoint file a gateway writes at start.
#[derive(Debug, Clone, Deserialize)]
pub struct Endpoint {
    /// Data plane.
    pub data: std::net::SocketAddr,
    /// Control plane.
    pub control: std::net::SocketAddr,
    /// Certificate fingerprint.
    pub fingerprint: String,
}

/// An issued access key.
#[derive(Debug, Clone, Deserialize)]
pub struct Key {
    /// Id.
    pub access_key_id: String,
    /// Secret.
    pub secret_access_key: String,
}

/// A running gateway process.
#[derive(Debug)]
pub struct Gateway {
    bin: PathBuf,
    /// Data directory.
    pub dir: PathBuf,
    child: Option<Child>,
    /// Where it listens.
    pub endpoint: Endpoint,
    extra: Vec<String>,
}

impl Gateway {
    /// Starts a gateway on free loopback ports with `extra` arguments to `serve`.
    pub fn start(bins: &Path, dir: &Path, extra: &[&str]) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        let (child, endpoint) = Self::spawn(bins, dir, "127.0.0.1:0", "127.0.0.1:0", &extra)?;
        Ok(Self {
            bin: bins.join("tern-gateway"),
            dir: dir.to_owned(),
            child: Some(child),
            endpoint,
            extra,
        })
    }

    fn spawn(
        bins: &Path,
        dir: &Path,
        data: &str,
        control: &str,
        extra: &[String],
    ) -> Result<(Child, Endpoint)> {
        let ep_path = dir.join("endpoint.json");
        let _ = std::fs::remove_file(&ep_path);
        std::fs::create_dir_all(dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("gateway.log"))?;
        let mut child = Command::new(bins.join("tern-gateway"))
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", data, "--control-listen", control])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting tern-gateway")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(b) = std::fs::read(&ep_path)
                && let Ok(ep) = serde_json::from_slice::<Endpoint>(&b)
            {
                return Ok((child, ep));
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "tern-gateway exited with {status}: {}",
                    std::fs::read_to_string(dir.join("gateway.log"))?
                );
            }
            if Instant::now() > deadline {
                bail!("tern-gateway did not start within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The data-plane URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.endpoint.data)
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let bins = self.bin.parent().context("bin dir")?.to_owned();
        let (d, c) = (self.endpoint.data.to_string(), self.endpoint.control.to_string());
        let (child, ep) = Self::spawn(&bins, &self.dir, &d, &c, &self.extra)?;
        self.child = Some(child);
        self.endpoint = ep;
        Ok(())
    }

    /// Issues an access key for `host`.
    pub fn key(&self, host: &str) -> Result<Key> {
        let out = run_ok(
            Command::new(&self.bin)
                .args(["key", "create", "--host", host, "--data-dir"])
                .arg(&self.dir),
        )?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The file of a point's snapshot of `disk` (local provider).
    pub fn snapshot_path(&self, host: &str, disk: &str, point: &str) -> PathBuf {
        self.dir
            .join("snapshots")
            .join(format!("{host}.{disk}.{point}.img"))
    }

    /// The file of a disk's volume (local provider).
    pub fn volume_path(&self, host: &str, disk: &str) -> PathBuf {
        self.dir.join("volumes").join(format!("{host}.{disk}.img"))
    }

    /// A control-plane GET with the admin token.
    pub fn control_get(&self, path: &str) -> Result<String> {
        self.control(reqwest::Method::GET, path, None)
    }

    /// A control-plane request with the admin token and an optional JSON body (e.g.
    /// `POST /api/v1/recoveries`); the body of a 2xx answer, else an error with the status.
    pub fn control(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<String> {
        let token = std::fs::read_to_string(self.dir.join("admin.token"))?
            .trim()
            .to_owned();
        let tls = tern_core::tls::pinned_client_config(&self.endpoint.fingerprint)?;
        let url = format!("https://{}{path}", self.endpoint.control);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let c = reqwest::Client::builder().use_preconfigured_tls(tls).build()?;
            let mut req = c.request(method, url).bearer_auth(token);
            if let Some(b) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&b)?);
            }
            let r = req.send().await?;
            let status = r.status();
            let text = r.text().await?;
            if !status.is_success() {
                bail!("{status}: {text}");
            }
            Ok(text)
        })
    }

    /// The value of a counter in `/metrics` (0 when absent).
    pub fn metric(&self, name: &str) -> Result<u64> {
        let text = self.control_get("/metrics")?;
        Ok(text
            .lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|r| r.strip_prefix(' '))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .map(|v| v as u64)
            .unwrap_or(0))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `tern-agent sync` of `host` against `gw` with `key`, its state in `state`, without the
/// progress bar; the caller adds the disks and any other option.
pub fn agent_sync_cmd(bins: &Path, gw: &Gateway, key: &Key, host: &str, state: &Path) -> Command {
    let mut cmd = Command::new(bins.join("tern-agent"));
    cmd.args([
        "sync",
        "--host",
        host,
        "--target",
        &gw.url(),
        "--fingerprint",
        &gw.endpoint.fingerprint,
    ])
    .args([
        "--access-key-id",
        &key.access_key_id,
        "--no-progress",
        "--state-dir",
    ])
    .arg(state)
    .env("TERN_SECRET_ACCESS_KEY", &key.secret_access_key)
    .env("RUST_LOG", "warn");
    cmd
}

/// Runs a command and fails with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// A deterministic RNG for a test.
pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Writes `len` random bytes at `offset`.
pub fn write_random(path: &Path, offset: u64, len: usize, rng: &mut impl RngCore) -> Result<()> {
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    write_at(path, offset, &buf)
}

/// Writes `data` at `offset`.
pub fn write_at(path: &Path, offset: u64, data: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// A sparse disk image of `size` bytes with, per 4 MiB chunk in turn: a hole, random data,
/// written zeros, half random half hole. Returns the bytes of non-zero data.
pub fn make_disk(path: &Path, size: u64, rng: &mut impl RngCore) -> Result<u64> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    drop(f);
    let chunk = 4u64 << 20;
    let mut data = 0;
    let mut i = 0;
    while i * chunk < size {
        let off = i * chunk;
        let len = chunk.min(size - off);
        match i % 4 {
            1 => {
                write_random(path, off, len as usize, rng)?;
                data += len;
            }
            2 => write_at(path, off, &vec![0u8; len as usize])?,
            3 => {
                let half = (len / 2).div_ceil(4096) * 4096;
                write_random(path, off, half.min(len) as usize, rng)?;
                data += half.min(len);
            }
            _ => {}
        }
        i += 1;
    }
    Ok(data)
}

/// One round of changes: random writes of 4 KiB to 8 MiB at 512-byte aligned offsets (some
/// across chunk boundaries), one that zeroes a whole chunk, one in the last partial chunk.
pub fn random_writes(path: &Path, rng: &mut rand::rngs::StdRng, writes: usize) -> Result<()> {
    let size = std::fs::metadata(path)?.len();
    let chunk = 4u64 << 20;
    for _ in 0..writes {
        let len = rng.random_range(4096..=(8u64 << 20)).min(size) as usize;
        let off = rng.random_range(0..=(size - len as u64) / 512) * 512;
        write_random(path, off, len, rng)?;
    }
    // Straddle a chunk boundary explicitly.
    let boundary = (rng.random_range(1..size.div_ceil(chunk).max(2)) * chunk).min(size - 4096);
    write_random(path, boundary.saturating_sub(2048), 4096, rng)?;
    // Zero a whole chunk.
    let full_chunks = size / chunk;
    if full_chunks > 0 {
        let c = rng.random_range(0..full_chunks);
        write_at(path, c * chunk, &vec![0u8; chunk as usize])?;
    }
    // Touch the last (possibly partial) chunk.
    let last = (size - 1) / chunk * chunk;
    let tail = (size - last).min(8192) as usize;
    write_random(path, size - tail as u64, tail, rng)?;
    let _ = last;
    Ok(())
}

/// An S3 bucket for object-mode tests: the real Ceph RGW when `TERN_CEPH_RGW_JSON` names its
/// info file (`scripts/test` starts it with `scripts/ceph-rgw`), else the in-process `s3s-fs`
/// server (the test says which).
#[derive(Debug)]
pub struct Bucket {
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret.
    pub secret_access_key: String,
    /// The server's certificate (PEM).
    pub ca_file: PathBuf,
    /// Region.
    pub region: String,
    /// Bucket name.
    pub name: String,
    /// `ceph-rgw` or `s3s-fs`.
    pub kind: &'static str,
    /// The in-process server (s3s-fs), kept alive with the bucket.
    pub server: Option<s3server::S3Server>,
}

#[derive(Debug, Deserialize)]
struct RgwInfo {
    endpoint: String,
    access_key_id: String,
    secret_access_key: String,
    ca_file: PathBuf,
    region: String,
}

impl Bucket {
    /// A new, empty bucket named after `test`.
    pub fn new(test: &str, dir: &Path) -> Result<Self> {
        let name = format!("{}-{:08x}", test.replace('_', "-"), rand::random::<u32>())
            .chars()
            .take(63)
            .collect::<String>();
        if let Some(info) = std::env::var_os("TERN_CEPH_RGW_JSON") {
            let info: RgwInfo =
                serde_json::from_slice(&std::fs::read(&info)?).context("reading the RGW info file")?;
            // curl signs with SigV4 itself (7.75+); RGW wants the payload hash header, which
            // curl 7.88 signs but does not add. The hash is that of the empty body.
            run_ok(
                Command::new("curl")
                    .args(["-sS", "--fail-with-body", "-X", "PUT", "-H"])
                    .arg("x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
                    .arg("--aws-sigv4")
                    .arg(format!("aws:amz:{}:s3", info.region))
                    .arg("--user")
                    .arg(format!("{}:{}", info.access_key_id, info.secret_access_key))
                    .arg("--cacert")
                    .arg(&info.ca_file)
                    .arg(format!("{}/{name}", info.endpoint)),
            )?;
            eprintln!("{test}: S3 = Ceph RGW at {}", info.endpoint);
            return Ok(Self {
                endpoint: info.endpoint,
                access_key_id: info.access_key_id,
                secret_access_key: info.secret_access_key,
                ca_file: info.ca_file,
                region: info.region,
                name,
                kind: "ceph-rgw",
                server: None,
            });
        }
        if std::env::var("TERN_REQUIRE_CEPH").ok().as_deref() == Some("1") {
            bail!("TERN_REQUIRE_CEPH=1 but TERN_CEPH_RGW_JSON is not set (scripts/ceph-rgw start writes it)");
        }
        let server = s3server::start(&dir.join("s3"), s3server::S3Options::default())?;
        server.create_bucket(&name)?;
        eprintln!(
            "{test}: S3 = in-process s3s-fs (set TERN_CEPH_RGW_JSON to run against Ceph RGW, as scripts/test does)"
        );
        Ok(Self {
            endpoint: server.endpoint.clone(),
            access_key_id: server.access_key_id.clone(),
            secret_access_key: server.secret_access_key.clone(),
            ca_file: server.ca_file.clone(),
            region: "us-east-1".into(),
            name,
            kind: "s3s-fs",
            server: Some(server),
        })
    }

    /// `s3://NAME/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.name)
    }

    /// Adds the endpoint, trust and credentials options (and the secret's variable) to an
    /// agent or helper command.
    pub fn args(&self, cmd: &mut Command) {
        cmd.arg("--s3-endpoint")
            .arg(&self.endpoint)
            .arg("--s3-ca-file")
            .arg(&self.ca_file)
            .arg("--s3-region")
            .arg(&self.region)
            .arg("--access-key-id")
            .arg(&self.access_key_id)
            .env("TERN_SECRET_ACCESS_KEY", &self.secret_access_key);
    }

    /// `tern-agent sync` of `disks` (ID, PATH) of `host` to this bucket under `prefix`, 1 MiB
    /// chunks.
    pub fn sync_cmd(
        &self,
        bins: &Path,
        prefix: &str,
        host: &str,
        state: &Path,
        disks: &[(&str, &Path)],
    ) -> Command {
        let mut cmd = Command::new(bins.join("tern-agent"));
        cmd.args([
            "sync",
            "--host",
            host,
            "--target",
            &self.url(prefix),
            "--no-progress",
            "--chunk-size",
            "1M",
        ])
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "warn");
        for (id, p) in disks {
            cmd.arg("--disk").arg(format!("{id}={}", p.display()));
        }
        self.args(&mut cmd);
        cmd
    }

    /// `tern-recovery-helper restore` of `point` of `host` from this bucket under `prefix`.
    pub fn restore_cmd(
        &self,
        bins: &Path,
        prefix: &str,
        host: &str,
        point: &str,
        disks: &[(&str, &Path)],
    ) -> Command {
        let mut cmd = Command::new(bins.join("tern-recovery-helper"));
        cmd.args([
            "restore",
            "--source",
            &self.url(prefix),
            "--host",
            host,
            "--point",
            point,
            "--no-progress",
        ])
        .env("RUST_LOG", "warn");
        for (id, p) in disks {
            cmd.arg("--disk").arg(format!("{id}={}", p.display()));
        }
        self.args(&mut cmd);
        cmd
    }

    /// The directory holding the bucket's objects (s3s-fs only: tests that corrupt objects).
    pub fn fs_root(&self) -> Option<PathBuf> {
        self.server.as_ref().map(|s| s.root.join(&self.name))
    }
}
