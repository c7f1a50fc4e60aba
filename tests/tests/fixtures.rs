//! The test fixtures themselves, under plain `cargo test` (loopback only, no root): the S3
//! server (`tern_tests::s3server`) answers `object_store`'s S3 client over HTTPS (path-style,
//! SigV4), big single PUTs and multipart uploads round-trip; through the fault proxy
//! (`tern_tests::faultproxy`) with every kind of fault likely, the same data still round-trips
//! byte for byte thanks to the client's retries, and every kind was injected. The binaries
//! `tern-test-s3` and `tern-fault-proxy` write their info files and serve the same way.

#![allow(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use http::Method;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    UpdateVersion,
};
use rand::RngCore;
use tern_tests::faultproxy::{FaultConfig, FaultKind, FaultProxy, FaultRule, ProxyInfo};
use tern_tests::fixture::{client_config_trusting, wait_for_info};
use tern_tests::rng;
use tern_tests::s3server::{self, S3Info, S3Options};

const MIB: usize = 1 << 20;
const BUCKET: &str = "tern-test";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// Hands a `reqwest::Client` that trusts the test CA to `object_store`.
#[derive(Debug)]
struct TrustingConnector(reqwest::Client);

impl HttpConnector for TrustingConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.0.clone()))
    }
}

/// `object_store`'s S3 client for bucket [`BUCKET`] at `endpoint`, trusting `ca_pem`,
/// path-style, with `retry` and a per-request `timeout`.
fn store(
    endpoint: &str,
    ca_pem: &[u8],
    key_id: &str,
    secret: &str,
    retry: RetryConfig,
    timeout: Duration,
) -> AmazonS3 {
    store_in(BUCKET, endpoint, ca_pem, key_id, secret, retry, timeout)
}

/// [`store`] for `bucket`.
fn store_in(
    bucket: &str,
    endpoint: &str,
    ca_pem: &[u8],
    key_id: &str,
    secret: &str,
    retry: RetryConfig,
    timeout: Duration,
) -> AmazonS3 {
    let mut tls = client_config_trusting(ca_pem).unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .http1_only()
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .build()
        .unwrap();
    AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_access_key_id(key_id)
        .with_secret_access_key(secret)
        .with_allow_http(false)
        .with_virtual_hosted_style_request(false)
        .with_retry(retry)
        .with_http_connector(TrustingConnector(client))
        .build()
        .unwrap()
}

fn no_retry() -> RetryConfig {
    RetryConfig {
        max_retries: 0,
        ..RetryConfig::default()
    }
}

fn quick_retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            base: 2.0,
        },
        max_retries: 15,
        retry_timeout: Duration::from_secs(120),
    }
}

fn random_bytes(seed: u64, len: usize) -> Bytes {
    let mut buf = vec![0u8; len];
    rng(seed).fill_bytes(&mut buf);
    Bytes::from(buf)
}

/// A 5 MiB single PUT and an 11 MiB multipart upload (5 + 5 + 1 MiB and a bit), each read
/// back and compared.
async fn round_trip(s: &AmazonS3, prefix: &str) {
    let big = random_bytes(1, 5 * MIB);
    let path = ObjectPath::from(format!("{prefix}/big"));
    s.put(&path, PutPayload::from(big.clone())).await.unwrap();
    let got = s.get(&path).await.unwrap().bytes().await.unwrap();
    assert!(got == big, "5 MiB object differs after the round trip");

    let parts = [
        random_bytes(2, 5 * MIB),
        random_bytes(3, 5 * MIB),
        random_bytes(4, MIB + 123),
    ];
    let path = ObjectPath::from(format!("{prefix}/multipart"));
    let mut upload = s.put_multipart(&path).await.unwrap();
    for p in &parts {
        upload.put_part(PutPayload::from(p.clone())).await.unwrap();
    }
    upload.complete().await.unwrap();
    let got = s.get(&path).await.unwrap().bytes().await.unwrap();
    assert!(
        got == parts.concat(),
        "multipart object differs after the round trip"
    );
    let head = s.head(&path).await.unwrap();
    assert_eq!(head.size, parts.iter().map(|p| p.len() as u64).sum::<u64>());
}

#[test]
fn s3_server_round_trips_big_and_multipart_objects() {
    let dir = tempfile::tempdir().unwrap();
    let server = s3server::start(
        &dir.path().join("data"),
        S3Options {
            buckets: vec![BUCKET.to_owned()],
            ..S3Options::default()
        },
    )
    .unwrap();
    assert!(server.endpoint.starts_with("https://127.0.0.1:"));
    assert_eq!(std::fs::read_to_string(&server.ca_file).unwrap(), server.ca_pem);
    let s = store(
        &server.endpoint,
        server.ca_pem.as_bytes(),
        &server.access_key_id,
        &server.secret_access_key,
        no_retry(),
        Duration::from_secs(30),
    );
    block_on(round_trip(&s, "direct"));
    // The data is where s3s-fs keeps it: a file per object under the bucket's directory.
    assert_eq!(
        std::fs::metadata(server.root.join(BUCKET).join("direct/big"))
            .unwrap()
            .len(),
        5 * MIB as u64
    );
}

#[test]
fn s3_server_refuses_a_wrong_secret_and_an_untrusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server = s3server::start(
        dir.path(),
        S3Options {
            buckets: vec![BUCKET.to_owned()],
            ..S3Options::default()
        },
    )
    .unwrap();
    let path = ObjectPath::from("x");
    let wrong = store(
        &server.endpoint,
        server.ca_pem.as_bytes(),
        &server.access_key_id,
        "not-the-secret",
        no_retry(),
        Duration::from_secs(10),
    );
    let err = block_on(wrong.put(&path, PutPayload::from_static(b"x"))).unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");

    let other = s3server::start(&dir.path().join("other"), S3Options::default()).unwrap();
    let untrusting = store(
        &server.endpoint,
        other.ca_pem.as_bytes(),
        &server.access_key_id,
        &server.secret_access_key,
        no_retry(),
        Duration::from_secs(10),
    );
    assert!(block_on(untrusting.put(&path, PutPayload::from_static(b"x"))).is_err());
}

/// What the report on s3s-fs claims: listing with prefix and delimiter, `LastModified`,
/// DeleteObjects, conditional create and update.
#[test]
fn s3_server_lists_deletes_and_honours_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let server = s3server::start(
        dir.path(),
        S3Options {
            buckets: vec![BUCKET.to_owned()],
            ..S3Options::default()
        },
    )
    .unwrap();
    let s = store(
        &server.endpoint,
        server.ca_pem.as_bytes(),
        &server.access_key_id,
        &server.secret_access_key,
        no_retry(),
        Duration::from_secs(10),
    );
    block_on(async {
        for key in ["a/1", "a/2", "a/b/3", "c"] {
            s.put(&ObjectPath::from(key), PutPayload::from_static(b"data"))
                .await
                .unwrap();
        }
        let prefix = ObjectPath::from("a");
        let mut all = s.list(Some(&prefix)).try_collect::<Vec<_>>().await.unwrap();
        all.sort_by(|x, y| x.location.cmp(&y.location));
        let keys: Vec<String> = all.iter().map(|m| m.location.to_string()).collect();
        assert_eq!(keys, ["a/1", "a/2", "a/b/3"]);
        let age = age_seconds(all[0].last_modified.timestamp());
        assert!(age < 600, "LastModified {} is not recent", all[0].last_modified);

        let listed = s.list_with_delimiter(Some(&prefix)).await.unwrap();
        let objects: Vec<String> = listed.objects.iter().map(|m| m.location.to_string()).collect();
        let dirs: Vec<String> = listed.common_prefixes.iter().map(ToString::to_string).collect();
        assert_eq!(
            (objects, dirs),
            (vec!["a/1".to_owned(), "a/2".to_owned()], vec!["a/b".to_owned()])
        );

        // Conditional create: If-None-Match: *.
        let create = PutOptions::from(PutMode::Create);
        let err = s
            .put_opts(
                &ObjectPath::from("c"),
                PutPayload::from_static(b"new"),
                create.clone(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, object_store::Error::AlreadyExists { .. }), "{err}");
        let fresh = s
            .put_opts(&ObjectPath::from("d"), PutPayload::from_static(b"new"), create)
            .await
            .unwrap();
        // Conditional update: If-Match: <etag>.
        let update =
            |e_tag: Option<String>| PutOptions::from(PutMode::Update(UpdateVersion { e_tag, version: None }));
        let stale = update(Some("\"00000000000000000000000000000000\"".to_owned()));
        let err = s
            .put_opts(&ObjectPath::from("d"), PutPayload::from_static(b"x"), stale)
            .await
            .unwrap_err();
        assert!(matches!(err, object_store::Error::Precondition { .. }), "{err}");
        s.put_opts(
            &ObjectPath::from("d"),
            PutPayload::from_static(b"x"),
            update(fresh.e_tag),
        )
        .await
        .unwrap();

        // A PUT into a bucket that does not exist makes it (no NoSuchBucket).
        let elsewhere = store_in(
            "not-created",
            &server.endpoint,
            server.ca_pem.as_bytes(),
            &server.access_key_id,
            &server.secret_access_key,
            no_retry(),
            Duration::from_secs(10),
        );
        elsewhere
            .put(&ObjectPath::from("k"), PutPayload::from_static(b"x"))
            .await
            .unwrap();
        assert!(server.root.join("not-created/k").is_file());

        // DeleteObjects (object_store's bulk delete), then nothing is left under the prefix.
        let doomed = futures::stream::iter(all.into_iter().map(|m| Ok(m.location))).boxed();
        let deleted: Vec<ObjectPath> = s.delete_stream(doomed).try_collect().await.unwrap();
        assert_eq!(deleted.len(), 3);
        assert!(
            s.list(Some(&prefix))
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
                .is_empty()
        );
    });
}

/// Seconds since `unix_seconds`.
fn age_seconds(unix_seconds: i64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    now - unix_seconds
}

#[test]
fn data_round_trips_through_the_fault_proxy_and_every_fault_happens() {
    let dir = tempfile::tempdir().unwrap();
    let server = s3server::start(
        dir.path(),
        S3Options {
            buckets: vec![BUCKET.to_owned()],
            ..S3Options::default()
        },
    )
    .unwrap();
    let faults = FaultConfig {
        seed: 7,
        max_faults: 80,
        slowdown: FaultRule::new(0.15),
        reset: FaultRule::new(0.15),
        stall: FaultRule::new(0.07),
        // A truncated CompleteMultipartUpload would complete upstream and fail on retry:
        // truncate reads only.
        truncate: FaultRule::only(0.3, &[Method::GET]),
        // Longer than the client's timeout below.
        stall_for: Duration::from_secs(30),
        stall_then_forward: false,
    };
    let proxy = FaultProxy::start(&server.endpoint, Some(server.ca_pem.as_bytes()), faults).unwrap();
    assert_ne!(proxy.fingerprint, server.fingerprint);
    let s = store(
        &proxy.endpoint,
        proxy.ca_pem.as_bytes(),
        &server.access_key_id,
        &server.secret_access_key,
        quick_retry(),
        Duration::from_secs(3),
    );
    let started = Instant::now();
    block_on(async {
        round_trip(&s, "proxied").await;
        // Read until every kind has struck at least once (a bounded number of times).
        let path = ObjectPath::from("proxied/big");
        let want = random_bytes(1, 5 * MIB);
        for _ in 0..60 {
            let c = proxy.counts();
            if FaultKind::ALL.iter().all(|k| c.get(*k) > 0) {
                break;
            }
            let got = s.get(&path).await.unwrap().bytes().await.unwrap();
            assert!(got == want, "object differs after a faulty read");
        }
    });
    let c = proxy.counts();
    eprintln!("fault proxy: {c:?} in {:?}", started.elapsed());
    for kind in FaultKind::ALL {
        assert!(c.get(kind) > 0, "no {kind} fault injected: {c:?}");
    }
    assert!(c.requests > c.faults());

    // Switched off, requests pass unharmed.
    proxy.set_enabled(false);
    let before = proxy.counts();
    block_on(async {
        let path = ObjectPath::from("proxied/small");
        s.put(&path, PutPayload::from_static(b"calm")).await.unwrap();
        assert_eq!(&s.get(&path).await.unwrap().bytes().await.unwrap()[..], b"calm");
    });
    assert_eq!(proxy.counts().faults(), before.faults());
}

/// Kills the child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &str, args: &[&str], log: &Path) -> Killed {
    let log = std::fs::File::create(log).unwrap();
    Killed(
        Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

#[test]
fn binaries_write_their_info_files_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s3_info = d.join("s3.json");
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    let mut s3 = spawn(
        env!("CARGO_BIN_EXE_tern-test-s3"),
        &[
            "--root",
            &p(&d.join("data")),
            "--info",
            &p(&s3_info),
            "--bucket",
            BUCKET,
        ],
        &d.join("s3.log"),
    );
    let s3i: S3Info = wait_for_info(&s3_info, &mut s3.0, Duration::from_secs(30)).unwrap();
    assert_eq!(s3i.ca_file, d.join("s3.ca.pem"));
    let ca = std::fs::read(&s3i.ca_file).unwrap();
    let der = rustls_pemfile::certs(&mut &ca[..]).next().unwrap().unwrap();
    assert_eq!(tern_core::tls::Fingerprint::of(&der).to_string(), s3i.fingerprint);

    // Every request is slowed down until two faults have been injected.
    let proxy_info = d.join("proxy.json");
    let mut proxy = spawn(
        env!("CARGO_BIN_EXE_tern-fault-proxy"),
        &[
            "--upstream",
            &s3i.endpoint,
            "--upstream-ca",
            &p(&s3i.ca_file),
            "--info",
            &p(&proxy_info),
            "--slowdown",
            "1",
            "--max-faults",
            "2",
            "--seed",
            "3",
        ],
        &d.join("proxy.log"),
    );
    let pi: ProxyInfo = wait_for_info(&proxy_info, &mut proxy.0, Duration::from_secs(30)).unwrap();
    assert_eq!(pi.upstream, s3i.endpoint);
    let s = store(
        &pi.endpoint,
        &std::fs::read(&pi.ca_file).unwrap(),
        &s3i.access_key_id,
        &s3i.secret_access_key,
        quick_retry(),
        Duration::from_secs(10),
    );
    let data = random_bytes(9, 4 * MIB + 1);
    block_on(async {
        let path = ObjectPath::from("via/binaries");
        s.put(&path, PutPayload::from(data.clone())).await.unwrap();
        assert!(s.get(&path).await.unwrap().bytes().await.unwrap() == data);
    });
    drop(proxy);
    let log = std::fs::read_to_string(d.join("proxy.log")).unwrap();
    assert_eq!(log.matches("fault injected").count(), 2, "{log}");
    assert!(
        log.contains("kind=\"slowdown\"") || log.contains("kind=slowdown"),
        "{log}"
    );
}

/// Each kind of fault as a plain HTTP client sees it (unsigned requests: the upstream answers
/// them with a 403 `AccessDenied` XML body, which is enough to forward and truncate).
#[test]
fn each_fault_looks_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let server = s3server::start(dir.path(), S3Options::default()).unwrap();
    let only = |kind: FaultKind| {
        let mut f = FaultConfig {
            stall_for: Duration::from_millis(300),
            ..FaultConfig::default()
        };
        let rule = FaultRule::new(1.0);
        match kind {
            FaultKind::SlowDown => f.slowdown = rule,
            FaultKind::Reset => f.reset = rule,
            FaultKind::Stall => f.stall = rule,
            FaultKind::Truncate => f.truncate = rule,
        }
        f
    };
    let client = |proxy: &FaultProxy| {
        let mut tls = client_config_trusting(proxy.ca_pem.as_bytes()).unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .http1_only()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    };
    let upstream = Some(server.ca_pem.as_bytes());
    block_on(async {
        // Without faults: the upstream's own answer.
        let calm = FaultProxy::start(&server.endpoint, upstream, FaultConfig::default()).unwrap();
        let r = client(&calm)
            .get(format!("{}/tern-test/k", calm.endpoint))
            .send()
            .await
            .unwrap();
        let refused = r.status();
        assert_eq!(refused, 403);
        let full = r.bytes().await.unwrap();
        assert!(String::from_utf8_lossy(&full).contains("<Code>AccessDenied</Code>"));

        let p = FaultProxy::start(&server.endpoint, upstream, only(FaultKind::SlowDown)).unwrap();
        let r = client(&p)
            .get(format!("{}/tern-test/k", p.endpoint))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.text().await.unwrap().contains("<Code>SlowDown</Code>"));

        let p = FaultProxy::start(&server.endpoint, upstream, only(FaultKind::Reset)).unwrap();
        let err = client(&p)
            .get(format!("{}/tern-test/k", p.endpoint))
            .send()
            .await
            .unwrap_err();
        assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
        assert_eq!(p.counts().reset, 1);

        // A stall shorter than the client's timeout: dropped after it, or forwarded late.
        let p = FaultProxy::start(&server.endpoint, upstream, only(FaultKind::Stall)).unwrap();
        let t = Instant::now();
        assert!(
            client(&p)
                .get(format!("{}/tern-test/k", p.endpoint))
                .send()
                .await
                .is_err()
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
        let mut late = only(FaultKind::Stall);
        late.stall_then_forward = true;
        let p = FaultProxy::start(&server.endpoint, upstream, late).unwrap();
        let t = Instant::now();
        let r = client(&p)
            .get(format!("{}/tern-test/k", p.endpoint))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), refused);
        assert!(t.elapsed() >= Duration::from_millis(300));

        // Truncated: the upstream's status and length, half the bytes, then the cut.
        let p = FaultProxy::start(&server.endpoint, upstream, only(FaultKind::Truncate)).unwrap();
        let mut r = client(&p)
            .get(format!("{}/tern-test/k", p.endpoint))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), refused);
        assert_eq!(r.content_length(), Some(full.len() as u64));
        let mut got = 0;
        let err = loop {
            match r.chunk().await {
                Ok(Some(c)) => got += c.len(),
                Ok(None) => panic!("the truncated body ended cleanly after {got} bytes"),
                Err(e) => break e,
            }
        };
        assert_eq!(got, full.len() / 2, "{err:?}");
        assert_eq!(p.counts().truncate, 1);

        // max_faults: only the first request is faulted.
        let mut capped = only(FaultKind::SlowDown);
        capped.max_faults = 1;
        let p = FaultProxy::start(&server.endpoint, upstream, capped).unwrap();
        let c = client(&p);
        assert_eq!(
            c.get(format!("{}/tern-test/k", p.endpoint))
                .send()
                .await
                .unwrap()
                .status(),
            503
        );
        assert_eq!(
            c.get(format!("{}/tern-test/k", p.endpoint))
                .send()
                .await
                .unwrap()
                .status(),
            refused
        );
        assert_eq!((p.counts().requests, p.counts().slowdown), (2, 1));
    });
}
