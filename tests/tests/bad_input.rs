//! Bad input end to end: against a real gateway process, every unauthenticated, malformed or
//! lying request gets a clear S3 error (HTTP status, S3 code and a message that names the
//! problem), writes nothing (the volume's bytes, the landed records, the points, the snapshots
//! and the write counters stay as they were) and leaves the gateway serving: afterwards a
//! normal `tern-agent sync` of the same host succeeds and its snapshot equals the source.
//!
//! Requests an S3 client can express go through the agent's own client ([`GatewayTarget`]:
//! `object_store` with the gateway's certificate pinned), so they also show what the agent
//! would see (a permanent error, not one to retry). Requests no S3 client sends (no signature,
//! a missing header, a `Content-Length` that lies) are written by hand as HTTP/1.1 over a
//! pinned TLS connection, authorised by a presigned URL from `object_store`'s [`Signer`].

use std::cell::RefCell;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::signer::Signer;
use rand::RngCore;
use tern_agent::target::gateway::{GatewayConfig, GatewayTarget, Secret};
use tern_agent::target::{BatchBody, BatchExtent, ErrorKind, Target, TargetError};
use tern_core::protocol::{
    DIGEST_HEADER, LandedExtent, LandedKind, PlannedDisk, SyncPlan, batch_key, commit_key,
    encode_batch_table, extent_key,
};
use tern_core::{ChunkGeometry, ChunkRef, Digest, DiskId, HostId, PointId};
use tern_tests::{Gateway, Key, e2e, make_disk, rng, run_ok, sha256_file, write_random};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;

const HOST: &str = "web-01";
/// A host the test's second key is issued for.
const OTHER_HOST: &str = "db-01";
const DISK: &str = "sda";
const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;
const SIZE: u64 = 16 * MIB;
/// The sync the bad requests aim at, opened by the test.
const SYNC: &str = "bad-input-sync";
/// How long a refusal may take.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

const COUNTERS: [&str; 4] = [
    "tern_gateway_bytes_in_total",
    "tern_gateway_extents_total",
    "tern_gateway_zero_extents_total",
    "tern_gateway_commits_total",
];

/// An S3 error answer.
#[derive(Debug)]
struct S3Reply {
    status: u16,
    code: String,
    message: String,
}

impl S3Reply {
    /// From an HTTP status and an S3 error body (`<Error><Code>…</Code><Message>…</Message>`).
    fn parse(status: u16, body: &str) -> Self {
        let tag = |name: &str| -> String {
            let (open, close) = (format!("<{name}>"), format!("</{name}>"));
            body.find(&open)
                .and_then(|at| {
                    let rest = &body[at + open.len()..];
                    rest.find(&close).map(|end| unescape(&rest[..end]))
                })
                .unwrap_or_default()
        };
        Self {
            status,
            code: tag("Code"),
            message: tag("Message"),
        }
    }

    /// Checks the status, the code (one of `codes`) and that the message says each of `says`.
    fn expect(&self, status: u16, codes: &[&str], says: &[&str]) -> Result<()> {
        eprintln!("      answered {} {}: {}", self.status, self.code, self.message);
        ensure!(
            self.status == status && codes.contains(&self.code.as_str()),
            "answered {self:?}, expected HTTP {status} with {codes:?}"
        );
        let message = self.message.to_lowercase();
        for s in says {
            ensure!(
                message.contains(&s.to_lowercase()),
                "the message {:?} ({}) does not say {s:?}",
                self.message,
                self.code
            );
        }
        Ok(())
    }
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The S3 error behind a refused call of the agent's client, which must not be one the agent
/// retries.
fn refusal(result: Result<(), TargetError>) -> Result<S3Reply> {
    let e = match result {
        Ok(()) => bail!("the gateway accepted it"),
        Err(e) => e,
    };
    let text = tern_agent::error_chain(&e);
    ensure!(
        e.kind == ErrorKind::Permanent,
        "the agent would treat it as {:?}: {text}",
        e.kind
    );
    // object_store: "... Server returned non-2xx status code: 400 Bad Request: <?xml ...".
    const MARK: &str = "status code: ";
    let at = text
        .find(MARK)
        .with_context(|| format!("no HTTP status in {text:?}"))?
        + MARK.len();
    let status = text
        .get(at..at + 3)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    Ok(S3Reply::parse(status, &text[at..]))
}

/// How a hand-written request ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Everything sent; wait for the answer.
    Complete,
    /// Close the write side (TLS close_notify, TCP FIN), then read the answer.
    CloseWrite,
    /// Drop the connection without reading anything.
    Drop,
}

/// What came back for a hand-written request.
#[derive(Debug)]
enum Answer {
    Reply(S3Reply),
    /// The connection ended without an HTTP answer.
    Closed(String),
    /// We dropped the connection ([`Ending::Drop`]).
    Dropped,
}

/// HTTP/1.1 by hand over TLS with the gateway's certificate pinned.
struct RawClient {
    addr: SocketAddr,
    tls: TlsConnector,
}

impl RawClient {
    fn new(gw: &Gateway) -> Result<Self> {
        let mut config = tern_core::tls::pinned_client_config(&gw.endpoint.fingerprint)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            addr: gw.endpoint.data,
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    /// A PUT request head (`target` is path and query) with `Connection: close`.
    fn put_head(&self, target: &str, headers: &[(&str, String)]) -> String {
        let mut h = format!(
            "PUT {target} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n",
            self.addr
        );
        for (name, value) in headers {
            let _ = write!(h, "{name}: {value}\r\n");
        }
        h.push_str("\r\n");
        h
    }

    async fn connect(&self) -> Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        Ok(self.tls.connect(ServerName::from(self.addr.ip()), tcp).await?)
    }

    /// Sends `head` and `body`, ends as told and reads the answer.
    async fn exchange(&self, head: &str, body: &[u8], ending: Ending) -> Result<Answer> {
        let mut s = self.connect().await?;
        s.write_all(head.as_bytes()).await?;
        // The gateway may refuse (and stop reading) before the body: not a failure here.
        let sent = async {
            s.write_all(body).await?;
            s.flush().await
        }
        .await;
        match ending {
            Ending::Drop => {
                drop(s);
                return Ok(Answer::Dropped);
            }
            Ending::CloseWrite => {
                let _ = s.shutdown().await;
            }
            Ending::Complete => {}
        }
        let mut buf = Vec::new();
        let read = tokio::time::timeout(ANSWER_WITHIN, async {
            let mut piece = [0u8; 16 << 10];
            loop {
                match s.read(&mut piece).await {
                    Ok(0) => return None,
                    Ok(n) => buf.extend_from_slice(&piece[..n]),
                    Err(e) => return Some(e),
                }
                if response_complete(&buf) {
                    return None;
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {ANSWER_WITHIN:?} (got {} bytes)", buf.len()))?;
        match parse_response(&buf) {
            Some(reply) => Ok(Answer::Reply(reply)),
            None => Ok(Answer::Closed(format!(
                "{} bytes, read error {read:?}, body write {sent:?}",
                buf.len()
            ))),
        }
    }

    /// Like [`RawClient::exchange`] but requires an HTTP answer.
    async fn reply(&self, head: &str, body: &[u8]) -> Result<S3Reply> {
        match self.exchange(head, body, Ending::Complete).await? {
            Answer::Reply(r) => Ok(r),
            other => bail!("no HTTP answer: {other:?}"),
        }
    }
}

/// Splits a response into head and body at the blank line.
fn split_response(buf: &[u8]) -> Option<(&str, &[u8])> {
    let at = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((std::str::from_utf8(&buf[..at]).ok()?, &buf[at + 4..]))
}

fn response_complete(buf: &[u8]) -> bool {
    let Some((head, body)) = split_response(buf) else {
        return false;
    };
    let head = head.to_ascii_lowercase();
    if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return body.len() >= len;
    }
    head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n")
}

fn parse_response(buf: &[u8]) -> Option<S3Reply> {
    let (head, body) = split_response(buf)?;
    let status = head.lines().next()?.split(' ').nth(1)?.parse().ok()?;
    Some(S3Reply::parse(status, &String::from_utf8_lossy(body)))
}

/// Random bytes: never what the volume holds, so writing them anywhere would show.
fn fresh(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rng().fill_bytes(&mut v);
    v
}

/// What good requests are allowed to have changed so far.
#[derive(Debug, Default)]
struct Allowed {
    landed: Vec<LandedExtent>,
    /// Added to [`COUNTERS`], in order.
    counters: [u64; 4],
}

/// One gateway with a host, a committed point and a sync opened by the test.
struct Bench {
    rt: tokio::runtime::Runtime,
    bins: PathBuf,
    tmp: tempfile::TempDir,
    gw: Gateway,
    key: Key,
    other_key: Key,
    source: PathBuf,
    /// The agent's client with the host's own key.
    target: GatewayTarget,
    presigner: AmazonS3,
    raw: RawClient,
    sync: PointId,
    disk: DiskId,
    /// The point of the first sync.
    point: PointId,
    /// SHA-256 of the source (and the volume) at the first sync.
    source_sha: String,
    /// SHA-256 the volume must keep: `source_sha` unless a failed case changed it.
    volume_sha: RefCell<String>,
    /// Counter values after the sync was opened (or after the last failed case).
    counters: RefCell<[u64; 4]>,
    allowed: RefCell<Allowed>,
}

impl Bench {
    fn set_up(bins: PathBuf) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let tmp = tempfile::tempdir()?;
        let gw = Gateway::start(&bins, &tmp.path().join("gw"), &[])?;
        let key = gw.key(HOST)?;
        let other_key = gw.key(OTHER_HOST)?;
        let source = tmp.path().join("sda.img");
        make_disk(&source, SIZE, &mut rng(11))?;
        let source_sha = sha256_file(&source)?;
        let summary = agent_sync(&bins, &gw, &key, &tmp.path().join("agent"), &source)?;
        let point = PointId::new(summary["point_id"].as_str().context("point_id")?)?;
        ensure!(sha256_file(&gw.snapshot_path(HOST, DISK, point.as_str()))? == source_sha);
        ensure!(sha256_file(&gw.volume_path(HOST, DISK))? == source_sha);

        let target = rt.block_on(connect(&gw, &key.access_key_id, &key.secret_access_key))?;
        let sync = PointId::new(SYNC)?;
        let disk = DiskId::new(DISK)?;
        let plan = SyncPlan {
            disks: vec![PlannedDisk {
                id: disk.clone(),
                geometry: ChunkGeometry::new(SIZE, CHUNK as u32)?,
            }],
        };
        rt.block_on(target.begin(&sync, &plan))?;
        let presigner = AmazonS3Builder::new()
            .with_endpoint(gw.url())
            .with_bucket_name(HOST)
            .with_region("tern")
            .with_access_key_id(&key.access_key_id)
            .with_secret_access_key(&key.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .build()?;
        let raw = RawClient::new(&gw)?;
        let mut counters = [0; 4];
        for (c, name) in counters.iter_mut().zip(COUNTERS) {
            *c = gw.metric(name)?;
        }
        Ok(Self {
            rt,
            bins,
            tmp,
            gw,
            key,
            other_key,
            source,
            target,
            presigner,
            raw,
            sync,
            disk,
            point,
            volume_sha: RefCell::new(source_sha.clone()),
            source_sha,
            counters: RefCell::new(counters),
            allowed: RefCell::default(),
        })
    }

    /// `path?query` of a presigned PUT of `key` in the host's bucket.
    async fn presigned_put(&self, key: &str) -> Result<String> {
        let url = self
            .presigner
            .signed_url(
                http::Method::PUT,
                &object_store::path::Path::from(key),
                Duration::from_secs(600),
            )
            .await?;
        Ok(format!("{}?{}", url.path(), url.query().unwrap_or_default()))
    }

    fn extent_key(&self, offset: u64) -> String {
        extent_key(&self.sync, &self.disk, offset)
    }

    /// Checks that nothing but the allowed good requests left a trace, and that the gateway
    /// still answers.
    async fn nothing_written(&self) -> Result<()> {
        let volume = self.gw.volume_path(HOST, DISK);
        ensure!(
            sha256_file(&volume)? == *self.volume_sha.borrow(),
            "the volume {} changed",
            volume.display()
        );
        let landed = self.target.landed(&self.disk).await?;
        let allowed = self.allowed.borrow().landed.clone();
        ensure!(
            landed == allowed,
            "landed records {landed:?}, expected {allowed:?}"
        );
        let state = self.target.state().await?;
        ensure!(
            state.open_sync.as_ref() == Some(&self.sync),
            "open sync is {:?}",
            state.open_sync
        );
        ensure!(
            state.latest_point.as_ref().map(|p| &p.id) == Some(&self.point),
            "latest point is {:?}",
            state.latest_point
        );
        let points: Vec<PointId> = self
            .target
            .list_points()
            .await?
            .into_iter()
            .map(|p| p.id)
            .collect();
        ensure!(points == [self.point.clone()], "points are {points:?}");
        let snap = self.gw.snapshot_path(HOST, DISK, SYNC);
        ensure!(!snap.exists(), "snapshot {} was made", snap.display());
        Ok(())
    }

    /// The write counters moved only by what good requests account for.
    fn counters_unchanged(&self) -> Result<()> {
        let (allowed, base) = (self.allowed.borrow(), self.counters.borrow());
        for (i, name) in COUNTERS.iter().enumerate() {
            let (now, want) = (self.gw.metric(name)?, base[i] + allowed.counters[i]);
            ensure!(now == want, "{name} is {now}, expected {want}");
        }
        Ok(())
    }

    /// Runs one case, then checks that it wrote nothing; records a failure instead of stopping.
    fn case(&self, failures: &mut Vec<String>, name: &str, case: impl Future<Output = Result<()>>) {
        let result = self
            .rt
            .block_on(case)
            .and_then(|()| self.rt.block_on(self.nothing_written()))
            .and_then(|()| self.counters_unchanged());
        match result {
            Ok(()) => eprintln!("ok    {name}"),
            Err(e) => {
                eprintln!("FAIL  {name}: {e:#}");
                failures.push(format!("{name}: {e:#}"));
                // Judge the next cases by what they change, not by what this one did.
                if let Err(e) = self.rebaseline() {
                    failures.push(format!("after {name}: cannot take a new baseline: {e:#}"));
                }
            }
        }
    }

    /// Takes the current volume, landed records and counters as the new baseline.
    fn rebaseline(&self) -> Result<()> {
        *self.volume_sha.borrow_mut() = sha256_file(&self.gw.volume_path(HOST, DISK))?;
        let landed = self.rt.block_on(self.target.landed(&self.disk))?;
        let mut counters = [0; 4];
        for (c, name) in counters.iter_mut().zip(COUNTERS) {
            *c = self.gw.metric(name)?;
        }
        *self.counters.borrow_mut() = counters;
        *self.allowed.borrow_mut() = Allowed {
            landed,
            counters: [0; 4],
        };
        Ok(())
    }
}

async fn connect(gw: &Gateway, access_key_id: &str, secret: &str) -> Result<GatewayTarget> {
    Ok(GatewayTarget::connect(GatewayConfig {
        endpoint: gw.url(),
        host: HostId::new(HOST)?,
        access_key_id: access_key_id.to_owned(),
        secret_access_key: Secret::new(secret.to_owned()),
        fingerprint: tern_agent::tls::parse_fingerprint(&gw.endpoint.fingerprint)?,
    })
    .await?)
}

/// Runs one `tern-agent sync` of the host's one disk and returns its JSON summary.
fn agent_sync(bins: &Path, gw: &Gateway, key: &Key, state: &Path, disk: &Path) -> Result<serde_json::Value> {
    let out = run_ok(
        Command::new(bins.join("tern-agent"))
            .args(["sync", "--host", HOST, "--target", &gw.url()])
            .args(["--fingerprint", &gw.endpoint.fingerprint])
            .args(["--access-key-id", &key.access_key_id, "--no-progress"])
            .arg("--state-dir")
            .arg(state)
            .arg("--disk")
            .arg(format!("{DISK}={}", disk.display()))
            .env("TERN_SECRET_ACCESS_KEY", &key.secret_access_key)
            .env("RUST_LOG", "warn"),
    )?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A 4 KiB extent of fresh data and its digest (sent at the start of chunk 1, which holds data).
fn probe() -> (Bytes, Digest) {
    let body = fresh(4096);
    let digest = Digest::of(&body);
    (Bytes::from(body), digest)
}

// ---- authentication and authorisation ----

async fn unsigned_put(b: &Bench) -> Result<()> {
    let (body, digest) = probe();
    let path = format!("/{HOST}/{}", b.extent_key(CHUNK));
    let head = b.raw.put_head(
        &path,
        &[
            ("content-length", body.len().to_string()),
            (DIGEST_HEADER, digest.to_hex()),
        ],
    );
    b.raw
        .reply(&head, &body)
        .await?
        .expect(403, &["AccessDenied"], &["signed"])
}

async fn with_key(b: &Bench, access_key_id: &str, secret: &str) -> Result<S3Reply> {
    let target = connect(&b.gw, access_key_id, secret).await?;
    let (body, digest) = probe();
    refusal(target.put_extent(&b.sync, &b.disk, CHUNK, body, digest).await)
}

// The gateway answers these two with the code alone (an empty `Message`); the code is S3's name
// for exactly this problem, so the message is not checked.
async fn wrong_secret(b: &Bench) -> Result<()> {
    let wrong: String = b.key.secret_access_key.chars().rev().collect();
    ensure!(wrong != b.key.secret_access_key);
    with_key(b, &b.key.access_key_id, &wrong)
        .await?
        .expect(403, &["SignatureDoesNotMatch"], &[])
}

async fn unknown_key_id(b: &Bench) -> Result<()> {
    with_key(b, "TERNNOSUCHKEY0000000", &b.key.secret_access_key)
        .await?
        .expect(403, &["InvalidAccessKeyId"], &[])
}

async fn key_of_another_host(b: &Bench) -> Result<()> {
    with_key(b, &b.other_key.access_key_id, &b.other_key.secret_access_key)
        .await?
        .expect(403, &["AccessDenied"], &[HOST])
}

// ---- extents ----

async fn wrong_digest(b: &Bench) -> Result<()> {
    let (body, _) = probe();
    let digest = Digest::of(b"something else");
    refusal(b.target.put_extent(&b.sync, &b.disk, CHUNK, body, digest).await)?.expect(
        400,
        &["BadDigest"],
        &["digest", &digest.to_hex()],
    )
}

/// A presigned extent PUT at `offset` with `headers` (plus `Content-Length`) and `body`.
async fn raw_extent(b: &Bench, offset: u64, headers: &[(&str, String)], body: &[u8]) -> Result<S3Reply> {
    raw_put(b, &b.extent_key(offset), headers, body).await
}

/// A presigned PUT of `key` with `headers` (plus `Content-Length`) and `body`.
async fn raw_put(b: &Bench, key: &str, headers: &[(&str, String)], body: &[u8]) -> Result<S3Reply> {
    let url = b.presigned_put(key).await?;
    let mut all = vec![("content-length", body.len().to_string())];
    all.extend_from_slice(headers);
    b.raw.reply(&b.raw.put_head(&url, &all), body).await
}

/// `docs/protocol.md` names `InvalidDigest` for a missing or malformed digest header; the
/// gateway answers `InvalidArgument`. Either is a clear refusal.
const DIGEST_CODES: &[&str] = &["InvalidArgument", "InvalidDigest"];

async fn missing_digest(b: &Bench) -> Result<()> {
    let (body, _) = probe();
    raw_extent(b, CHUNK, &[], &body)
        .await?
        .expect(400, DIGEST_CODES, &[DIGEST_HEADER])
}

async fn malformed_digest(b: &Bench) -> Result<()> {
    let (body, _) = probe();
    raw_extent(b, CHUNK, &[(DIGEST_HEADER, "not-a-digest".into())], &body)
        .await?
        .expect(400, DIGEST_CODES, &[DIGEST_HEADER])
}

async fn put_at(b: &Bench, sync: &PointId, disk: &DiskId, offset: u64, len: usize) -> Result<S3Reply> {
    let body = fresh(len);
    let digest = Digest::of(&body);
    refusal(b.target.put_extent(sync, disk, offset, body.into(), digest).await)
}

async fn past_the_end(b: &Bench) -> Result<()> {
    put_at(b, &b.sync, &b.disk, SIZE, 4096)
        .await?
        .expect(400, &["InvalidArgument"], &["past the disk's end"])
}

async fn across_the_end(b: &Bench) -> Result<()> {
    put_at(b, &b.sync, &b.disk, SIZE - 4096, 8192).await?.expect(
        400,
        &["InvalidArgument"],
        &["past the disk's end"],
    )
}

async fn misaligned_offset(b: &Bench) -> Result<()> {
    put_at(b, &b.sync, &b.disk, CHUNK + 512, 4096)
        .await?
        .expect(400, &["InvalidArgument"], &["aligned"])
}

async fn across_a_chunk(b: &Bench) -> Result<()> {
    put_at(b, &b.sync, &b.disk, 2 * CHUNK - 4096, 8192).await?.expect(
        400,
        &["InvalidArgument"],
        &["crosses a chunk"],
    )
}

async fn zero_across_a_chunk(b: &Bench) -> Result<()> {
    refusal(b.target.put_zero(&b.sync, &b.disk, 2 * CHUNK - 4096, 8192).await)?.expect(
        400,
        &["InvalidArgument"],
        &["crosses a chunk"],
    )
}

async fn disk_not_in_the_sync(b: &Bench) -> Result<()> {
    let sdz = DiskId::new("sdz")?;
    put_at(b, &b.sync, &sdz, CHUNK, 4096).await?.expect(
        400,
        &["InvalidArgument"],
        &["disk sdz is not in sync"],
    )
}

async fn sync_not_open(b: &Bench) -> Result<()> {
    let other = PointId::new("never-begun")?;
    put_at(b, &other, &b.disk, CHUNK, 4096).await?.expect(
        400,
        &["InvalidRequest"],
        &["never-begun", "not open"],
    )
}

async fn zero_sync_not_open(b: &Bench) -> Result<()> {
    let other = PointId::new("never-begun")?;
    refusal(b.target.put_zero(&other, &b.disk, CHUNK, 4096).await)?.expect(
        400,
        &["InvalidRequest"],
        &["never-begun", "not open"],
    )
}

// ---- batches ----

/// A data extent of fresh bytes at `offset`, with its digest.
fn batch_data(offset: u64, len: usize) -> BatchExtent {
    let body = Bytes::from(fresh(len));
    let digest = Digest::of(&body);
    BatchExtent {
        offset,
        body: BatchBody::Data(body, digest),
    }
}

async fn put_batch(b: &Bench, extents: Vec<BatchExtent>) -> Result<S3Reply> {
    refusal(b.target.put_batch(&b.sync, &b.disk, extents).await)
}

/// Two good extents and a zero extent, then one whose body does not match its digest: the
/// whole batch is refused, the good ones included.
async fn batch_wrong_digest(b: &Bench) -> Result<()> {
    let digest = Digest::of(b"something else");
    let bad = BatchExtent {
        offset: 2 * CHUNK + 65536,
        body: BatchBody::Data(Bytes::from(fresh(4096)), digest),
    };
    let zero = BatchExtent {
        offset: CHUNK + 65536,
        body: BatchBody::Zero(8192),
    };
    put_batch(
        b,
        vec![
            batch_data(CHUNK + 8192, 8192),
            zero,
            batch_data(2 * CHUNK, 65536),
            bad,
        ],
    )
    .await?
    .expect(400, &["BadDigest"], &["digest", &digest.to_hex()])
}

async fn batch_overlapping(b: &Bench) -> Result<()> {
    put_batch(b, vec![batch_data(CHUNK, 8192), batch_data(CHUNK + 4096, 4096)])
        .await?
        .expect(400, &["InvalidArgument"], &["batch refused", "overlaps"])
}

async fn batch_past_the_end(b: &Bench) -> Result<()> {
    put_batch(b, vec![batch_data(CHUNK, 4096), batch_data(SIZE, 4096)])
        .await?
        .expect(400, &["InvalidArgument"], &["past the disk's end"])
}

/// A table of two 4 KiB data extents followed by one body only, with a `Content-Length` that
/// matches what is sent.
async fn batch_table_lies(b: &Bench) -> Result<()> {
    let one = fresh(4096);
    let table = encode_batch_table(&[
        LandedExtent {
            offset: CHUNK,
            len: 4096,
            kind: LandedKind::Data(Digest::of(&one)),
        },
        LandedExtent {
            offset: CHUNK + 4096,
            len: 4096,
            kind: LandedKind::Data(Digest::of(&one)),
        },
    ]);
    let mut body = table;
    body.extend_from_slice(&one);
    raw_put(b, &batch_key(&b.sync, &b.disk), &[], &body)
        .await?
        .expect(400, &["InvalidArgument"], &["Content-Length", "does not match"])
}

async fn batch_bad_magic(b: &Bench) -> Result<()> {
    raw_put(b, &batch_key(&b.sync, &b.disk), &[], &fresh(4096 + 56))
        .await?
        .expect(400, &["InvalidArgument"], &["batch refused", "magic"])
}

// ---- body length ----

async fn huge_content_length(b: &Bench) -> Result<()> {
    const TIB: u64 = 1 << 40;
    let url = b.presigned_put(&b.extent_key(0)).await?;
    let head = b.raw.put_head(
        &url,
        &[
            ("content-length", TIB.to_string()),
            (DIGEST_HEADER, Digest::of(b"x").to_hex()),
        ],
    );
    // No body at all: the answer must come without it.
    let reply = b
        .raw
        .reply(&head, &[])
        .await
        .context("not answered without the body")?;
    reply.expect(400, &["EntityTooLarge", "InvalidArgument"], &[])?;
    let m = reply.message.to_lowercase();
    ensure!(
        m.contains(&TIB.to_string()) || m.contains("large") || m.contains("past the disk's end"),
        "the message {:?} does not name the length",
        reply.message
    );
    Ok(())
}

/// Declares a whole chunk, sends 1000 bytes, then ends as told.
async fn lying_content_length(b: &Bench, ending: Ending) -> Result<Answer> {
    let body = fresh(CHUNK as usize);
    let url = b.presigned_put(&b.extent_key(CHUNK)).await?;
    let head = b.raw.put_head(
        &url,
        &[
            ("content-length", CHUNK.to_string()),
            (DIGEST_HEADER, Digest::of(&body).to_hex()),
        ],
    );
    b.raw.exchange(&head, &body[..1000], ending).await
}

async fn short_body_then_eof(b: &Bench) -> Result<()> {
    match lying_content_length(b, Ending::CloseWrite).await? {
        Answer::Reply(r) => r.expect(400, &["IncompleteBody"], &["body"]),
        Answer::Closed(why) => {
            eprintln!("      (connection closed without an answer: {why})");
            Ok(())
        }
        Answer::Dropped => bail!("unreachable"),
    }
}

async fn short_body_then_drop(b: &Bench) -> Result<()> {
    ensure!(matches!(
        lying_content_length(b, Ending::Drop).await?,
        Answer::Dropped
    ));
    // Let the gateway notice before checking that it wrote nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(())
}

/// `docs/protocol.md` names `MissingContentLength`; the gateway answers `InvalidArgument`.
async fn no_content_length(b: &Bench) -> Result<()> {
    let (body, digest) = probe();
    let url = b.presigned_put(&b.extent_key(CHUNK)).await?;
    let head = b.raw.put_head(
        &url,
        &[
            ("transfer-encoding", "chunked".into()),
            (DIGEST_HEADER, digest.to_hex()),
        ],
    );
    let mut chunked = format!("{:x}\r\n", body.len()).into_bytes();
    chunked.extend_from_slice(&body);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    b.raw.reply(&head, &chunked).await?.expect(
        400,
        &["MissingContentLength", "InvalidArgument"],
        &["content-length"],
    )
}

// ---- a good request in between ----

/// The bytes the volume already holds at the start of chunk 1, sent again: accepted, recorded
/// as landed, and the volume's bytes stay the same.
async fn good_extent(b: &Bench) -> Result<()> {
    let mut body = vec![0u8; 4096];
    let mut f = std::fs::File::open(&b.source)?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(CHUNK))?;
    std::io::Read::read_exact(&mut f, &mut body)?;
    let digest = Digest::of(&body);
    b.target
        .put_extent(&b.sync, &b.disk, CHUNK, body.into(), digest)
        .await
        .context("a good extent was refused")?;
    let mut allowed = b.allowed.borrow_mut();
    allowed.landed.push(LandedExtent {
        offset: CHUNK,
        len: 4096,
        kind: LandedKind::Data(digest),
    });
    allowed.counters[0] += 4096;
    allowed.counters[1] += 1;
    Ok(())
}

// ---- commits ----

async fn raw_commit(b: &Bench, manifest: &[u8]) -> Result<S3Reply> {
    let url = b.presigned_put(&commit_key(&b.sync)).await?;
    let head = b
        .raw
        .put_head(&url, &[("content-length", manifest.len().to_string())]);
    b.raw.reply(&head, manifest).await
}

async fn random_manifest(b: &Bench) -> Result<()> {
    raw_commit(b, &fresh(4096))
        .await?
        .expect(400, &["InvalidArgument"], &["manifest"])
}

/// The first point's manifest, re-addressed to the test's sync.
async fn manifest_for_sync(b: &Bench) -> Result<tern_core::Manifest> {
    let mut m = b.target.get_point(&b.point).await?;
    m.point_id = b.sync.clone();
    m.created_unix_ms += 1;
    Ok(m)
}

async fn corrupt_manifest_checksum(b: &Bench) -> Result<()> {
    let mut bytes = manifest_for_sync(b).await?.encode()?;
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    raw_commit(b, &bytes)
        .await?
        .expect(400, &["InvalidArgument"], &["manifest", "checksum"])
}

/// A valid manifest (correct checksum, the plan's disks) whose chunk 3 has a digest that no
/// extent of this sync landed in. Chunk 1 does hold a landed extent ([`good_extent`]).
async fn manifest_names_data_never_uploaded(b: &Bench) -> Result<()> {
    let mut m = manifest_for_sync(b).await?;
    let chunks = &mut m.disks[0].chunks;
    ensure!(chunks.len() == 4, "{} chunks", chunks.len());
    chunks[3] = ChunkRef::Data(Digest::of(b"never uploaded"));
    refusal(b.target.commit(&b.sync, &m).await)?.expect(
        400,
        &["InvalidRequest"],
        &["chunk 3 of disk sda", "never uploaded"],
    )
}

#[test]
fn bad_requests_are_refused_write_nothing_and_the_gateway_keeps_serving() -> Result<()> {
    let Some(bins) = e2e("bad_requests_are_refused_write_nothing_and_the_gateway_keeps_serving") else {
        return Ok(());
    };
    let b = Bench::set_up(bins)?;
    b.rt.block_on(b.nothing_written()).context("the set-up itself")?;

    let mut failures = Vec::new();
    let f = &mut failures;
    b.case(f, "no signature (plain unsigned PUT)", unsigned_put(&b));
    b.case(f, "wrong secret key", wrong_secret(&b));
    b.case(f, "unknown access key id", unknown_key_id(&b));
    b.case(f, "key issued for another host", key_of_another_host(&b));
    b.case(f, "wrong digest", wrong_digest(&b));
    b.case(f, "missing digest header", missing_digest(&b));
    b.case(f, "malformed digest header", malformed_digest(&b));
    b.case(f, "extent past the end of the disk", past_the_end(&b));
    b.case(f, "extent across the end of the disk", across_the_end(&b));
    b.case(f, "misaligned offset", misaligned_offset(&b));
    b.case(f, "extent crossing a chunk", across_a_chunk(&b));
    b.case(f, "zero extent crossing a chunk", zero_across_a_chunk(&b));
    b.case(f, "disk not in the sync", disk_not_in_the_sync(&b));
    b.case(f, "extent for a sync that is not open", sync_not_open(&b));
    b.case(
        f,
        "zero extent for a sync that is not open",
        zero_sync_not_open(&b),
    );
    b.case(
        f,
        "batch with one wrong digest among good extents",
        batch_wrong_digest(&b),
    );
    b.case(f, "batch with overlapping extents", batch_overlapping(&b));
    b.case(f, "batch with an extent past the end", batch_past_the_end(&b));
    b.case(
        f,
        "batch whose table names more data than it carries",
        batch_table_lies(&b),
    );
    b.case(f, "batch without the batch magic", batch_bad_magic(&b));
    b.case(f, "1 TiB Content-Length, no body", huge_content_length(&b));
    b.case(f, "lying Content-Length, then EOF", short_body_then_eof(&b));
    b.case(
        f,
        "lying Content-Length, then connection dropped",
        short_body_then_drop(&b),
    );
    b.case(f, "no Content-Length (chunked body)", no_content_length(&b));
    b.case(f, "a good extent in between is accepted", good_extent(&b));
    b.case(f, "malformed manifest (random bytes)", random_manifest(&b));
    b.case(f, "manifest with a bad checksum", corrupt_manifest_checksum(&b));
    b.case(
        f,
        "manifest naming a chunk never uploaded",
        manifest_names_data_never_uploaded(&b),
    );

    // No new point on the control plane either.
    let hosts: serde_json::Value = serde_json::from_str(&b.gw.control_get("/api/v1/hosts")?)?;
    let listed_points = |hosts: &serde_json::Value| -> Vec<String> {
        hosts
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h["host"] == HOST)
            .flat_map(|h| h["points"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["id"].as_str().map(str::to_owned))
            .collect()
    };
    if listed_points(&hosts) != [b.point.to_string()] {
        failures.push(format!("GET /api/v1/hosts lists other points: {hosts}"));
    }

    // The gateway keeps serving: a normal sync of the same host, after a change at the source.
    write_random(&b.source, 2 * CHUNK + 8192, 64 << 10, &mut rng(12))?;
    let want = sha256_file(&b.source)?;
    let summary = agent_sync(&b.bins, &b.gw, &b.key, &b.tmp.path().join("agent"), &b.source)
        .context("the sync after the bad requests")?;
    let point = summary["point_id"].as_str().context("point_id")?;
    assert_eq!(
        sha256_file(&b.gw.snapshot_path(HOST, DISK, point))?,
        want,
        "the snapshot of the sync after the bad requests differs from the source"
    );
    assert_eq!(
        sha256_file(&b.gw.snapshot_path(HOST, DISK, b.point.as_str()))?,
        b.source_sha,
        "the first point's snapshot changed"
    );
    let hosts: serde_json::Value = serde_json::from_str(&b.gw.control_get("/api/v1/hosts")?)?;
    assert_eq!(
        listed_points(&hosts),
        [b.point.to_string(), point.to_owned()],
        "{hosts}"
    );
    let log = std::fs::read_to_string(b.gw.dir.join("gateway.log"))?;
    assert!(!log.contains("panicked"), "the gateway panicked:\n{log}");

    assert!(
        failures.is_empty(),
        "{} bad-input case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
