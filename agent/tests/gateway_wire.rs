//! The gateway target on the wire: a small HTTPS server on 127.0.0.1 records what the agent's
//! S3 client sends (path-style keys, SigV4 with region `tern`, `UNSIGNED-PAYLOAD`, the Tern
//! metadata headers, Content-Length) and answers like the gateway would. Checks certificate
//! pinning, trust on first use and error classification end to end.

#![allow(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tern_agent::target::gateway::{GatewayConfig, GatewayError, GatewayTarget, Secret, probe_fingerprint};
use tern_agent::target::{ErrorKind, Target};
use tern_agent::tls::Fingerprint;
use tern_core::protocol::{HostState, LandedExtent, LandedKind, PlannedDisk, PointSummary, SyncPlan};
use tern_core::{ChunkGeometry, ChunkRef, Digest, DiskId, DiskManifest, HostId, Manifest, PointId};

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    query: String,
    headers: HashMap<String, String>,
    body: Bytes,
}

#[derive(Default)]
struct Server {
    requests: Mutex<Vec<Recorded>>,
    commit_failures_left: Mutex<u32>,
    manifest: Mutex<Vec<u8>>,
    landed: Vec<u8>,
}

fn xml_error(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(Full::new(body.into()))
        .unwrap()
}

fn ok(body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let body = body.into();
    Response::builder()
        .header("etag", format!("\"{}\"", &Digest::of(&body).to_hex()[..16]))
        .header("last-modified", "Thu, 01 Jan 2026 00:00:00 GMT")
        .body(Full::new(body))
        .unwrap()
}

async fn handle(server: Arc<Server>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let rec = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect(),
        body: body.clone(),
    };
    server.requests.lock().unwrap().push(rec.clone());
    let resp = match (rec.method.as_str(), rec.path.as_str()) {
        ("GET", "/") => xml_error(StatusCode::FORBIDDEN, "AccessDenied"),
        ("GET", "/web-01/state") => {
            let st = HostState {
                host: HostId::new("web-01").unwrap(),
                open_sync: None,
                latest_point: Some(PointSummary {
                    id: PointId::new("p1").unwrap(),
                    created_unix_ms: 5,
                }),
                disks: vec![],
            };
            ok(serde_json::to_vec(&st).unwrap())
        }
        ("GET", "/web-01/landed/sda") => ok(server.landed.clone()),
        ("GET", "/web-01/landed/sdb") => xml_error(StatusCode::NOT_FOUND, "NoSuchKey"),
        ("GET", "/web-01/points/p1") => ok(server.manifest.lock().unwrap().clone()),
        ("GET", "/web-01") if rec.query.contains("list-type=2") => {
            let len = server.manifest.lock().unwrap().len();
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>web-01</Name><Prefix>points/</Prefix>\
                 <KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>\
                 <Contents><Key>points/p1</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>\
                 <ETag>\"x\"</ETag><Size>{len}</Size><StorageClass>STANDARD</StorageClass></Contents></ListBucketResult>"
            );
            ok(xml)
        }
        ("PUT", p) if p.ends_with("/commit") => {
            let mut left = server.commit_failures_left.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                xml_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown")
            } else {
                ok(Bytes::new())
            }
        }
        ("PUT", p) if p.ends_with("/0000000000bad000") => xml_error(StatusCode::BAD_REQUEST, "BadDigest"),
        ("PUT", _) => ok(Bytes::new()),
        _ => xml_error(StatusCode::NOT_FOUND, "NoSuchKey"),
    };
    Ok(resp)
}

async fn start(server: Arc<Server>) -> (SocketAddr, Fingerprint) {
    let ck = rcgen::generate_simple_self_signed(vec!["tern-gateway".to_owned()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let fp = Fingerprint::of(&cert);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(tern_agent::tls::provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, server) = (acceptor.clone(), server.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| handle(server.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, fp)
}

fn config(addr: SocketAddr, fingerprint: Fingerprint) -> GatewayConfig {
    GatewayConfig {
        endpoint: format!("https://{addr}"),
        host: HostId::new("web-01").unwrap(),
        access_key_id: "AKIDTERN".into(),
        secret_access_key: Secret::new("s3cr3t".into()),
        fingerprint,
    }
}

fn manifest() -> Manifest {
    Manifest {
        host_id: HostId::new("web-01").unwrap(),
        point_id: PointId::new("p1").unwrap(),
        created_unix_ms: 5,
        disks: vec![DiskManifest {
            disk_id: DiskId::new("sda").unwrap(),
            geometry: ChunkGeometry::new(1 << 20, 1 << 20).unwrap(),
            chunks: vec![ChunkRef::Zero],
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_follow_the_protocol() {
    let landed = LandedExtent {
        offset: 8192,
        len: 4096,
        kind: LandedKind::Zero,
    };
    let mut landed_bytes = Vec::new();
    landed.encode(&mut landed_bytes);
    let server = Arc::new(Server {
        landed: landed_bytes,
        ..Server::default()
    });
    *server.manifest.lock().unwrap() = manifest().encode().unwrap();
    *server.commit_failures_left.lock().unwrap() = 2;
    let (addr, fp) = start(server.clone()).await;

    // Trust on first use sees the server's certificate.
    assert_eq!(probe_fingerprint(&format!("https://{addr}")).await.unwrap(), fp);

    let t = GatewayTarget::connect(config(addr, fp)).await.unwrap();
    let sync = PointId::new("s2").unwrap();
    let sda = DiskId::new("sda").unwrap();
    let plan = SyncPlan {
        disks: vec![PlannedDisk {
            id: sda.clone(),
            geometry: ChunkGeometry::new(1 << 20, 1 << 20).unwrap(),
        }],
    };

    let st = t.state().await.unwrap();
    assert_eq!(st.latest_point.unwrap().id.as_str(), "p1");
    t.begin(&sync, &plan).await.unwrap();
    assert_eq!(t.landed(&sda).await.unwrap(), vec![landed]);
    assert!(t.landed(&DiskId::new("sdb").unwrap()).await.unwrap().is_empty());
    let body = Bytes::from(vec![7u8; 8192]);
    t.put_extent(&sync, &sda, 4096, body.clone(), Digest::of(&body))
        .await
        .unwrap();
    t.put_zero(&sync, &sda, 65536, 12288).await.unwrap();
    // A 503 is retried by the client; the commit then succeeds.
    t.commit(&sync, &manifest()).await.unwrap();
    assert_eq!(
        t.get_point(&PointId::new("p1").unwrap()).await.unwrap(),
        manifest()
    );
    let points = t.list_points().await.unwrap();
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].id.as_str(), "p1");
    // A 400 is permanent, a missing point is NotFound.
    let e = t
        .put_extent(&sync, &sda, 0xbad000, body.clone(), Digest::of(&body))
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{e:?}");
    let e = t.get_point(&PointId::new("nope").unwrap()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound, "{e:?}");

    let reqs = server.requests.lock().unwrap().clone();
    let find = |method: &str, path: &str| -> Recorded {
        reqs.iter()
            .find(|r| r.method == method && r.path == path)
            .cloned()
            .unwrap_or_else(|| panic!("no {method} {path}"))
    };
    let begin = find("PUT", "/web-01/syncs/s2/begin");
    assert_eq!(serde_json::from_slice::<SyncPlan>(&begin.body).unwrap(), plan);
    let put = find("PUT", "/web-01/syncs/s2/disks/sda/0000000000001000");
    assert_eq!(put.body, body);
    assert_eq!(put.headers["content-length"], "8192");
    assert_eq!(put.headers["x-amz-meta-tern-digest"], Digest::of(&body).to_hex());
    assert_eq!(put.headers["x-amz-content-sha256"], "UNSIGNED-PAYLOAD");
    let auth = &put.headers["authorization"];
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTERN/"),
        "{auth}"
    );
    assert!(auth.contains("/tern/s3/aws4_request"), "{auth}");
    assert!(
        !reqs
            .iter()
            .any(|r| r.headers.values().any(|v| v.contains("s3cr3t")))
    );
    let zero = find("PUT", "/web-01/syncs/s2/disks/sda/0000000000010000");
    assert!(zero.body.is_empty());
    assert_eq!(zero.headers["x-amz-meta-tern-zero"], "12288");
    assert_eq!(zero.headers["content-length"], "0");
    assert!(!zero.headers.contains_key("x-amz-meta-tern-digest"));
    let commits: Vec<_> = reqs
        .iter()
        .filter(|r| r.path == "/web-01/syncs/s2/commit")
        .collect();
    assert_eq!(commits.len(), 3);
    assert_eq!(commits[2].body, manifest().encode().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_certificate_is_refused_at_once() {
    let server = Arc::new(Server::default());
    let (addr, fp) = start(server.clone()).await;
    let wrong = Fingerprint([0x11; 32]);
    let started = std::time::Instant::now();
    match GatewayTarget::connect(config(addr, wrong)).await {
        Err(GatewayError::Mismatch { seen, pinned, .. }) => {
            assert_eq!(seen, fp);
            assert_eq!(pinned, wrong);
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Nothing reached the HTTP layer.
    assert!(server.requests.lock().unwrap().is_empty());
}
