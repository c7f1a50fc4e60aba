//! `tern_core::nbd::NbdClient` against real NBD servers: `qemu-nbd` exporting a qcow2 image
//! with a persistent dirty bitmap (over a unix socket, and over TCP with TLS), and `nbdkit`
//! (file plugin, no bitmaps). The allocation and dirty maps must equal what `nbdinfo --map`
//! reports, and reads must equal `qemu-img convert -O raw`.
//!
//! Needs `qemu-img`, `qemu-io`, `qemu-nbd`, `nbdinfo` and (for one test) `nbdkit`. A missing
//! tool makes a test print "skipped: TOOL missing" on stderr and pass, unless
//! `TERN_REQUIRE_NBD_TOOLS=1`, which makes it fail (CI sets it).
//!
//! Run with `cargo test -p tern-core --features nbd --test nbd_qemu`.

#![cfg(feature = "nbd")]
#![allow(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_core::nbd::{
    ConnectOptions, NbdAddr, NbdClient, NbdError, NbdUri, STATE_DIRTY, STATE_HOLE, STATE_ZERO,
};

const M: u64 = 1 << 20;
const K: u64 = 1 << 10;
const SIZE: u64 = 64 * M;

/// True when every tool runs; otherwise prints the skip line (straight to stderr, which the
/// test harness does not capture) or fails under `TERN_REQUIRE_NBD_TOOLS=1`.
fn have(tools: &[&str]) -> bool {
    for t in tools {
        let ok = Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let required = std::env::var("TERN_REQUIRE_NBD_TOOLS").is_ok_and(|v| v == "1");
            assert!(!required, "{t} missing and TERN_REQUIRE_NBD_TOOLS=1");
            let _ = writeln!(std::io::stderr(), "skipped: {t} missing");
            return false;
        }
    }
    true
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `cmd` and waits until `ready` (at most 10 s).
    fn start(cmd: &mut Command, log: PathBuf, ready: impl Fn() -> bool) -> Server {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let mut server = Server { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{cmd:?} exited ({status}): {}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "{cmd:?} not ready after 10 s: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A 64 MiB qcow2 image: data, zeroed and discarded areas before bitmap `b0` is added, more
/// writes, discards and zero writes after (those are what `b0` marks dirty). Returns the image
/// and its raw content.
fn make_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let img = dir.join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(SIZE.to_string()));
    let io = |cmds: &[&str]| {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "qcow2"]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        run(c.arg(&img));
    };
    io(&[
        "write -P 0xab 1M 64k",
        "write -P 0xcd 8M 1M",
        "write -z 12M 256k",
        "discard 8M 256k",
        "write -P 0x5a 40M 3M",
    ]);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("b0"));
    io(&[
        "write -P 0x11 2M 128k",
        "discard 1M 64k",
        "write -z 20M 64k",
        "write -P 0x33 30M 4k",
        "write -P 0x44 9M 512",
        "write -z 41M 64k",
        "write -P 0x66 63M 1M",
    ]);
    let raw = dir.join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(&raw));
    (img, std::fs::read(&raw).unwrap())
}

/// `qemu-nbd` exporting `img` read-only as `disk` with bitmap `b0` on a unix socket.
fn qemu_nbd_unix(dir: &Path, img: &Path) -> (Server, PathBuf) {
    let sock = dir.join("nbd.sock");
    let server = Server::start(
        Command::new("qemu-nbd")
            .args([
                "-r", "-t", "-e", "16", "-f", "qcow2", "-B", "b0", "-x", "disk", "-k",
            ])
            .arg(&sock)
            .arg(img),
        dir.join("qemu-nbd.log"),
        || sock.exists(),
    );
    (server, sock)
}

/// What `nbdinfo --map[=CONTEXT] --json` reports: `(range, type)`, adjacent equal types merged.
fn nbdinfo_map(uri: &str, context: Option<&str>) -> Vec<(Range<u64>, u32)> {
    let map_arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_owned(),
    };
    let out = run(Command::new("nbdinfo").args([map_arg.as_str(), "--json", uri]));
    let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let mut map: Vec<(Range<u64>, u32)> = Vec::new();
    for e in json.as_array().unwrap() {
        let start = e["offset"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        let kind = u32::try_from(e["type"].as_u64().unwrap()).unwrap();
        match map.last_mut() {
            Some((r, k)) if r.end == start && *k == kind => r.end = end,
            _ => map.push((start..end, kind)),
        }
    }
    map
}

fn ranges_where(map: &[(Range<u64>, u32)], keep: impl Fn(u32) -> bool) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (r, f) in map {
        if !keep(*f) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r.clone()),
        }
    }
    out
}

fn clip(ranges: &[Range<u64>], to: Range<u64>) -> Vec<Range<u64>> {
    ranges
        .iter()
        .map(|r| r.start.max(to.start)..r.end.min(to.end))
        .filter(|r| !r.is_empty())
        .collect()
}

fn unix_opts(bitmaps: &[&str]) -> ConnectOptions {
    let mut o = ConnectOptions::new("disk");
    o.bitmaps = bitmaps.iter().map(|b| (*b).to_owned()).collect();
    o.connect_timeout = Duration::from_secs(10);
    o.request_timeout = Duration::from_secs(30);
    o
}

/// Reads the whole export in one call (split into maximum-size requests) and compares.
async fn assert_reads_equal(c: &NbdClient, raw: &[u8]) {
    let mut buf = vec![0xeeu8; raw.len()];
    c.read(0, &mut buf).await.unwrap();
    assert!(buf == raw, "the export's content differs from qemu-img convert's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_maps_and_reads_match_the_reference_tools() {
    if !have(&["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"]) {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = make_image(dir.path());
    let (_server, sock) = qemu_nbd_unix(dir.path(), &img);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());

    let c = NbdClient::connect(&NbdAddr::Unix(sock.clone()), &unix_opts(&["b0"]))
        .await
        .unwrap();
    assert_eq!(c.size(), SIZE);
    assert_eq!(c.export_name(), "disk");
    assert!(c.is_read_only() && c.has_structured_replies() && !c.is_tls());
    let bs = c.block_sizes();
    assert!(bs.min.is_power_of_two() && bs.max >= bs.min, "{bs:?}");

    // Both contexts, extent for extent, as nbdinfo (libnbd) sees them.
    let alloc_ref = nbdinfo_map(&uri, None);
    let dirty_ref = nbdinfo_map(&uri, Some("qemu:dirty-bitmap:b0"));
    assert_eq!(c.allocation(0..SIZE).await.unwrap(), alloc_ref);
    assert_eq!(
        c.block_status("qemu:dirty-bitmap:b0", 0..SIZE).await.unwrap(),
        dirty_ref
    );
    let holes = ranges_where(&alloc_ref, |t| t & (STATE_HOLE | STATE_ZERO) != 0);
    let dirty = ranges_where(&dirty_ref, |t| t & STATE_DIRTY != 0);
    assert_eq!(c.holes(0..SIZE).await.unwrap(), holes);
    assert_eq!(c.dirty("b0", 0..SIZE).await.unwrap(), dirty);
    // The image was built so that both maps have something to say.
    assert!(holes.len() >= 3 && dirty.len() >= 5, "{holes:?} {dirty:?}");
    // Dirty since b0: the writes after it (the discard at 1M and zero write at 20M included).
    for r in [
        M..M + 64 * K,
        2 * M..2 * M + 128 * K,
        20 * M..20 * M + 64 * K,
        63 * M..64 * M,
    ] {
        assert!(
            dirty.iter().any(|d| d.start <= r.start && r.end <= d.end),
            "{r:?} not in {dirty:?}"
        );
    }
    // Not dirty: what was written or discarded before b0 and not touched since.
    assert!(clip(&dirty, 8 * M..9 * M).is_empty() && clip(&dirty, 40 * M..41 * M).is_empty());
    // Sub-ranges, unaligned: the same maps clipped.
    for range in [M + 100..9 * M + 7, 41 * M..41 * M + 1, 0..1, SIZE - 4097..SIZE] {
        assert_eq!(
            c.holes(range.clone()).await.unwrap(),
            clip(&holes, range.clone()),
            "{range:?}"
        );
        assert_eq!(
            c.dirty("b0", range.clone()).await.unwrap(),
            clip(&dirty, range.clone()),
            "{range:?}"
        );
    }

    // Reads: the whole disk at once, then many concurrent reads from tasks and threads.
    assert_reads_equal(&c, &raw).await;
    let raw = Arc::new(raw);
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let (c, raw) = (c.clone(), raw.clone());
        tasks.push(tokio::spawn(async move {
            let mut x = i * 0x9e37_79b9 + 1;
            for _ in 0..16 {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let len = [4 * K, 64 * K, M, 3 * M][(x >> 60) as usize % 4];
                let off = (x >> 20) % (SIZE - len) / 4096 * 4096;
                let mut buf = vec![0u8; len as usize];
                c.read(off, &mut buf).await.unwrap();
                assert!(
                    buf[..] == raw[off as usize..(off + len) as usize],
                    "read {off}+{len}"
                );
            }
        }));
    }
    for i in 0..2u64 {
        let (c, raw) = (c.clone(), raw.clone());
        let handle = tokio::runtime::Handle::current();
        tasks.push(tokio::task::spawn_blocking(move || {
            for j in 0..8u64 {
                let off = (i * 8 + j) * 4 * M;
                let mut buf = vec![0u8; 4 * M as usize];
                handle.block_on(c.read(off, &mut buf)).unwrap();
                assert!(buf[..] == raw[off as usize..(off + 4 * M) as usize]);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.close().await.unwrap();
    let _ = writeln!(std::io::stderr(), "qemu-nbd maps and reads: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_refusals_are_clear() {
    if !have(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = make_image(dir.path());
    let (_server, sock) = qemu_nbd_unix(dir.path(), &img);
    let addr = NbdAddr::Unix(sock.clone());

    let e = NbdClient::connect(&addr, &unix_opts(&["b0", "nope"]))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the NBD server does not export dirty bitmap 'nope'"
    );
    assert!(!e.is_connection_lost());

    let mut o = unix_opts(&[]);
    o.export = "other".to_owned();
    let e = NbdClient::connect(&addr, &o).await.unwrap_err();
    assert!(matches!(e, NbdError::UnknownExport { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("the NBD server has no export named \"other\""),
        "{e}"
    );

    // Without the bitmap asked for, dirty() says so; the other calls work.
    let c = NbdClient::connect_uri(&format!("nbd+unix:///disk?socket={}", sock.display()), None, &[])
        .await
        .unwrap();
    let e = c.dirty("b0", 0..SIZE).await.unwrap_err();
    assert!(matches!(e, NbdError::BitmapNotRequested(_)), "{e}");
    assert!(!c.holes(0..SIZE).await.unwrap().is_empty());
    let mut buf = vec![0u8; 4096];
    let e = c.read(SIZE, &mut buf).await.unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    c.close().await.unwrap();
}

struct Pki {
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

/// A CA and a server certificate for `localhost` / 127.0.0.1 in the file names QEMU expects.
fn make_pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "tern test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    server
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = server.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
    Pki {
        ca_der: ca_cert.der().clone(),
    }
}

fn client_tls(ca: &rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_over_tls() {
    if !have(&["qemu-img", "qemu-io", "qemu-nbd"]) {
        return;
    }
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = make_image(dir.path());
    let pki_dir = dir.path().join("pki");
    std::fs::create_dir(&pki_dir).unwrap();
    let pki = make_pki(&pki_dir);
    let port = free_port();
    let _server = Server::start(
        Command::new("qemu-nbd")
            .arg("--object")
            .arg(format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
                pki_dir.display()
            ))
            .args(["--tls-creds", "tls0", "-b", "127.0.0.1", "-p", &port.to_string()])
            .args(["-r", "-t", "-e", "16", "-f", "qcow2", "-B", "b0", "-x", "disk"])
            .arg(&img),
        dir.path().join("qemu-nbd-tls.log"),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );

    let uri = NbdUri::parse(&format!("nbds://localhost:{port}/disk")).unwrap();
    assert!(uri.tls);
    let mut o = ConnectOptions::for_uri(&uri);
    o.tls = Some(client_tls(&pki.ca_der));
    o.bitmaps = vec!["b0".to_owned()];
    let c = NbdClient::connect(&uri.addr, &o).await.unwrap();
    assert!(c.is_tls());
    assert_eq!(c.size(), SIZE);
    assert!(!c.dirty("b0", 0..SIZE).await.unwrap().is_empty());
    assert_reads_equal(&c, &raw).await;
    c.close().await.unwrap();

    // By IP address (the certificate names 127.0.0.1 too), through connect_uri.
    let c = NbdClient::connect_uri(
        &format!("nbds://127.0.0.1:{port}/disk"),
        Some(client_tls(&pki.ca_der)),
        &["b0".to_owned()],
    )
    .await
    .unwrap();
    assert!(c.is_tls());
    drop(c);

    // Plain text: the server insists on TLS.
    let plain = NbdAddr::Tcp {
        host: "127.0.0.1".to_owned(),
        port,
    };
    let e = NbdClient::connect(&plain, &ConnectOptions::new("disk"))
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::TlsRequired), "{e}");

    // A CA that did not sign the server's certificate.
    let other_dir = dir.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = make_pki(&other_dir);
    let mut o = ConnectOptions::for_uri(&uri);
    o.tls = Some(client_tls(&other.ca_der));
    let e = NbdClient::connect(&uri.addr, &o).await.unwrap_err();
    assert!(matches!(e, NbdError::TlsHandshake(_)), "{e}");
    // A name the certificate does not carry.
    let mut o = ConnectOptions::for_uri(&uri);
    o.tls = Some(client_tls(&pki.ca_der));
    o.tls_server_name = Some("nbd.example.com".to_owned());
    let e = NbdClient::connect(&uri.addr, &o).await.unwrap_err();
    assert!(matches!(e, NbdError::TlsHandshake(_)), "{e}");
    let _ = writeln!(std::io::stderr(), "qemu-nbd over TLS: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_without_bitmaps() {
    if !have(&["qemu-img", "qemu-io", "nbdkit", "nbdinfo"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, raw) = make_image(dir.path());
    let sock = dir.path().join("nbdkit.sock");
    let _server = Server::start(
        Command::new("nbdkit")
            .args(["-f", "-r", "-U"])
            .arg(&sock)
            .arg("file")
            .arg(dir.path().join("disk.raw")),
        dir.path().join("nbdkit.log"),
        || sock.exists(),
    );
    let addr = NbdAddr::Unix(sock.clone());
    let mut o = unix_opts(&["b0"]);
    o.export = String::new();
    let e = NbdClient::connect(&addr, &o).await.unwrap_err();
    assert_eq!(e.to_string(), "the NBD server does not export dirty bitmap 'b0'");

    o.bitmaps.clear();
    let c = NbdClient::connect(&addr, &o).await.unwrap();
    assert!(c.has_context("base:allocation"));
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let alloc_ref = nbdinfo_map(&uri, None);
    assert_eq!(c.allocation(0..SIZE).await.unwrap(), alloc_ref);
    let holes = c.holes(0..SIZE).await.unwrap();
    assert_eq!(
        holes,
        ranges_where(&alloc_ref, |t| t & (STATE_HOLE | STATE_ZERO) != 0)
    );
    // The raw file is sparse: most of it is holes.
    assert!(
        holes.iter().map(|h| h.end - h.start).sum::<u64>() > SIZE / 2,
        "{holes:?}"
    );
    assert_reads_equal(&c, &raw).await;
    c.close().await.unwrap();
}
