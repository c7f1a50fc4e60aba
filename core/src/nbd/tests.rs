//! The client against an in-process fake server over a tokio duplex pipe: honest replies in
//! any order, and lying servers that must get an error, never a panic or garbage.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;

use super::*;
use crate::nbd::proto::*;

const BASE: &str = "base:allocation";
const B0: &str = "qemu:dirty-bitmap:b0";

/// Replies to one request: the messages to send (written separately, so that with `delay`
/// the chunks of different replies interleave).
type Handler = Box<dyn FnMut(Request, &[(String, u32)]) -> Vec<Vec<u8>> + Send>;

#[derive(Clone)]
struct Config {
    export: String,
    size: u64,
    structured: bool,
    /// Contexts the server knows, with the ids it gives them.
    contexts: Vec<(String, u32)>,
    block_sizes: Option<(u32, u32, u32)>,
    /// Reply to everything but `NBD_OPT_ABORT` with `NBD_REP_ERR_TLS_REQD`.
    tls_required: bool,
    /// Reply `NBD_REP_ERR_UNSUP` to `NBD_OPT_GO`.
    no_go: bool,
    /// Reply to requests concurrently, with small delays between messages.
    delay: bool,
    /// Close the connection right after the first reply.
    hang_up: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            export: "disk".to_owned(),
            size: 1 << 20,
            structured: true,
            contexts: vec![(BASE.to_owned(), 7), (B0.to_owned(), 9)],
            block_sizes: Some((512, 4096, 64 * 1024)),
            tls_required: false,
            no_go: false,
            delay: false,
            hang_up: false,
        }
    }
}

fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn take_string(data: &mut &[u8]) -> String {
    let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
    let s = String::from_utf8(data[4..4 + len].to_vec()).unwrap();
    *data = &data[4 + len..];
    s
}

/// What the fake server saw.
#[derive(Debug, Default)]
struct Seen {
    options: Vec<u32>,
    disconnected: bool,
    requests: usize,
}

async fn serve(
    s: DuplexStream,
    cfg: Config,
    mut handler: Handler,
    seen: Arc<Mutex<Seen>>,
) -> std::io::Result<()> {
    let (mut rd, wr) = tokio::io::split(s);
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    {
        let mut w = wr.lock().await;
        w.write_all(&NBDMAGIC.to_be_bytes()).await?;
        w.write_all(&IHAVEOPT.to_be_bytes()).await?;
        w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
            .await?;
    }
    let mut client_flags = [0u8; 4];
    rd.read_exact(&mut client_flags).await?;
    assert_eq!(
        u32::from_be_bytes(client_flags),
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    );
    let mut negotiated = Vec::new();
    loop {
        let mut h = [0u8; 16];
        rd.read_exact(&mut h).await?;
        assert_eq!(&h[..8], &IHAVEOPT.to_be_bytes());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        rd.read_exact(&mut data).await?;
        seen.lock().unwrap().options.push(option);
        let mut out = Vec::new();
        if cfg.tls_required && option != OPT_ABORT {
            out.extend(option_reply(option, REP_ERR_TLS_REQD, b"TLS please"));
            wr.lock().await.write_all(&out).await?;
            continue;
        }
        match option {
            OPT_STRUCTURED_REPLY if cfg.structured => out.extend(option_reply(option, REP_ACK, &[])),
            OPT_SET_META_CONTEXT => {
                let mut d = &data[..];
                let export = take_string(&mut d);
                if export != cfg.export {
                    out.extend(option_reply(option, REP_ERR_UNKNOWN, b"no such export"));
                    wr.lock().await.write_all(&out).await?;
                    continue;
                }
                let n = u32::from_be_bytes(d[..4].try_into().unwrap());
                d = &d[4..];
                for _ in 0..n {
                    let q = take_string(&mut d);
                    if let Some((name, id)) = cfg.contexts.iter().find(|(c, _)| *c == q) {
                        let mut p = id.to_be_bytes().to_vec();
                        p.extend_from_slice(name.as_bytes());
                        out.extend(option_reply(option, REP_META_CONTEXT, &p));
                        negotiated.push((name.clone(), *id));
                    }
                }
                out.extend(option_reply(option, REP_ACK, &[]));
            }
            OPT_GO if !cfg.no_go => {
                let mut d = &data[..];
                let export = take_string(&mut d);
                if export != cfg.export {
                    out.extend(option_reply(option, REP_ERR_UNKNOWN, b"no such export"));
                } else {
                    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                    p.extend_from_slice(&cfg.size.to_be_bytes());
                    p.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
                    out.extend(option_reply(option, REP_INFO, &p));
                    if let Some((min, pref, max)) = cfg.block_sizes {
                        let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        for v in [min, pref, max] {
                            p.extend_from_slice(&v.to_be_bytes());
                        }
                        out.extend(option_reply(option, REP_INFO, &p));
                    }
                    out.extend(option_reply(option, REP_ACK, &[]));
                    wr.lock().await.write_all(&out).await?;
                    break;
                }
            }
            OPT_EXPORT_NAME => {
                if String::from_utf8_lossy(&data) != cfg.export {
                    return Ok(());
                }
                out.extend_from_slice(&cfg.size.to_be_bytes());
                out.extend_from_slice(&TFLAG_HAS_FLAGS.to_be_bytes());
                wr.lock().await.write_all(&out).await?;
                break;
            }
            OPT_ABORT => {
                // The client may be gone already.
                let _ = wr
                    .lock()
                    .await
                    .write_all(&option_reply(option, REP_ACK, &[]))
                    .await;
                return Ok(());
            }
            _ => out.extend(option_reply(option, REP_ERR_UNSUP, &[])),
        }
        wr.lock().await.write_all(&out).await?;
    }
    let mut tasks = Vec::new();
    loop {
        let mut r = [0u8; REQUEST_LEN];
        if rd.read_exact(&mut r).await.is_err() {
            break;
        }
        let req = Request::parse(&r).expect("client sent a bad request");
        if req.command == CMD_DISC {
            assert_eq!((req.offset, req.len), (0, 0));
            seen.lock().unwrap().disconnected = true;
            break;
        }
        seen.lock().unwrap().requests += 1;
        let messages = handler(req, &negotiated);
        if cfg.delay {
            let wr = wr.clone();
            tasks.push(tokio::spawn(async move {
                for m in messages {
                    tokio::time::sleep(Duration::from_millis(req.cookie % 4)).await;
                    let _ = wr.lock().await.write_all(&m).await;
                }
            }));
        } else {
            let mut w = wr.lock().await;
            for m in messages {
                w.write_all(&m).await?;
            }
            if cfg.hang_up {
                return Ok(());
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = wr.lock().await.shutdown().await;
    Ok(())
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = ChunkHeader {
        flags,
        kind,
        cookie,
        len: payload.len() as u32,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(payload);
    b
}

fn data_chunk(cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    chunk(0, REPLY_TYPE_OFFSET_DATA, cookie, &p)
}

fn hole_chunk(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&len.to_be_bytes());
    chunk(0, REPLY_TYPE_OFFSET_HOLE, cookie, &p)
}

fn done(cookie: u64) -> Vec<u8> {
    chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, &[])
}

fn status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut p = context.to_be_bytes().to_vec();
    for (l, f) in extents {
        p.extend_from_slice(&l.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    chunk(0, REPLY_TYPE_BLOCK_STATUS, cookie, &p)
}

fn error_chunk(flags: u16, cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let mut p = error.to_be_bytes().to_vec();
    p.extend_from_slice(&(message.len() as u16).to_be_bytes());
    p.extend_from_slice(message.as_bytes());
    chunk(flags, REPLY_TYPE_ERROR, cookie, &p)
}

fn simple(cookie: u64, error: u32, data: &[u8]) -> Vec<u8> {
    let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A disk for the honest server: its bytes and the maps it reports.
struct Disk {
    data: Vec<u8>,
    alloc: Vec<(Range<u64>, u32)>,
    dirty: Vec<(Range<u64>, u32)>,
    /// Most extents per block status chunk (to make the client loop).
    max_extents: usize,
}

fn test_disk() -> Arc<Disk> {
    let size = 1u64 << 20;
    let mut data = vec![0u8; size as usize];
    for (i, b) in data.iter_mut().enumerate().take(300 * 1024).skip(64 * 1024) {
        *b = (i % 251) as u8 + 1;
    }
    data[700 * 1024..704 * 1024].fill(0xab);
    let alloc = vec![
        (0..64 * 1024, STATE_HOLE | STATE_ZERO),
        (64 * 1024..300 * 1024, 0),
        (300 * 1024..512 * 1024, STATE_ZERO),
        (512 * 1024..700 * 1024, STATE_HOLE | STATE_ZERO),
        (700 * 1024..704 * 1024, 0),
        (704 * 1024..size, STATE_HOLE),
    ];
    let dirty = vec![
        (0..4096, 0),
        (4096..100 * 1024, 1),
        (100 * 1024..600 * 1024, 0),
        (600 * 1024..704 * 1024, 1),
        (704 * 1024..size, 0),
    ];
    Arc::new(Disk {
        data,
        alloc,
        dirty,
        max_extents: 2,
    })
}

/// Extents from `offset`: at most `limit`, stopping once `offset + len` is reached (the last
/// one may go past it, as the protocol allows).
fn extents_at(map: &[(Range<u64>, u32)], offset: u64, len: u64, limit: usize) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut pos = offset;
    for (r, f) in map {
        if r.end <= pos {
            continue;
        }
        out.push(((r.end - pos) as u32, *f));
        pos = r.end;
        if pos >= offset + len || out.len() == limit {
            break;
        }
    }
    out
}

/// Replies like a correct server: reads as 4 KiB data or hole chunks in reverse order, block
/// status for every negotiated context.
fn honest(disk: Arc<Disk>, structured: bool) -> Handler {
    Box::new(move |req, negotiated| {
        let c = req.cookie;
        match req.command {
            CMD_READ if !structured => {
                let r = req.offset as usize..req.offset as usize + req.len as usize;
                vec![simple(c, 0, &disk.data[r])]
            }
            CMD_READ => {
                let mut msgs = Vec::new();
                let mut pos = req.offset;
                let end = req.offset + u64::from(req.len);
                while pos < end {
                    let next = ((pos / 4096 + 1) * 4096).min(end);
                    let bytes = &disk.data[pos as usize..next as usize];
                    if bytes.iter().all(|b| *b == 0) {
                        msgs.push(hole_chunk(c, pos, (next - pos) as u32));
                    } else {
                        msgs.push(data_chunk(c, pos, bytes));
                    }
                    pos = next;
                }
                msgs.reverse();
                msgs.push(done(c));
                msgs
            }
            CMD_BLOCK_STATUS => {
                let mut msgs = Vec::new();
                for (name, id) in negotiated {
                    let map = if name == BASE { &disk.alloc } else { &disk.dirty };
                    let e = extents_at(map, req.offset, u64::from(req.len), disk.max_extents);
                    msgs.push(status_chunk(c, *id, &e));
                }
                msgs.push(done(c));
                msgs
            }
            _ => vec![error_chunk(REPLY_FLAG_DONE, c, 22, "unknown command")],
        }
    })
}

struct Fake {
    server: JoinHandle<std::io::Result<()>>,
    seen: Arc<Mutex<Seen>>,
}

async fn start(cfg: Config, handler: Handler, opts: &ConnectOptions) -> (Result<NbdClient, NbdError>, Fake) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let server = tokio::spawn(serve(b, cfg, handler, seen.clone()));
    let client = NbdClient::connect_stream(a, opts).await;
    (client, Fake { server, seen })
}

fn opts() -> ConnectOptions {
    let mut o = ConnectOptions::new("disk");
    o.bitmaps = vec!["b0".to_owned()];
    o.request_timeout = Duration::from_secs(10);
    o
}

async fn honest_client(cfg: Config) -> (NbdClient, Fake, Arc<Disk>) {
    let disk = test_disk();
    let (c, fake) = start(cfg.clone(), honest(disk.clone(), cfg.structured), &opts()).await;
    (c.expect("connect"), fake, disk)
}

#[tokio::test]
async fn negotiates_and_reports_the_export() {
    let (c, fake, _) = honest_client(Config::default()).await;
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(
        c.block_sizes(),
        BlockSizes {
            min: 512,
            preferred: 4096,
            max: 65536
        }
    );
    assert_eq!(c.export_name(), "disk");
    assert!(c.is_read_only());
    assert!(!c.is_tls());
    assert!(c.has_structured_replies());
    assert!(c.has_context(BASE) && c.has_context(B0));
    assert_eq!(
        fake.seen.lock().unwrap().options,
        [OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT, OPT_GO]
    );
    c.close().await.unwrap();
    fake.server.await.unwrap().unwrap();
    assert!(fake.seen.lock().unwrap().disconnected);
}

#[tokio::test]
async fn reads_reassemble_out_of_order_chunks_and_holes() {
    let (c, _fake, disk) = honest_client(Config::default()).await;
    // 1 MiB with a 64 KiB maximum block size: 16 requests, 4 in flight.
    let mut buf = vec![0xeeu8; 1 << 20];
    c.read(0, &mut buf).await.unwrap();
    assert!(buf == disk.data);
    let mut buf = vec![0xeeu8; 12 * 1024];
    c.read(62 * 1024, &mut buf).await.unwrap();
    assert!(buf[..] == disk.data[62 * 1024..74 * 1024]);
    // Empty reads need no request.
    c.read(1 << 20, &mut []).await.unwrap();
}

#[tokio::test]
async fn simple_replies_when_structured_replies_are_refused() {
    let cfg = Config {
        structured: false,
        ..Config::default()
    };
    let disk = test_disk();
    let mut o = opts();
    o.bitmaps.clear();
    let (c, _fake) = start(cfg.clone(), honest(disk.clone(), false), &o).await;
    let c = c.unwrap();
    assert!(!c.has_structured_replies());
    let mut buf = vec![0u8; 1 << 20];
    c.read(0, &mut buf).await.unwrap();
    assert!(buf == disk.data);
    let e = c.holes(0..4096).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the NBD server did not agree to report metadata context \"base:allocation\""
    );
    // And bitmaps cannot be had at all.
    let (c, _fake) = start(cfg, honest(disk, false), &opts()).await;
    assert_eq!(
        c.unwrap_err().to_string(),
        "the NBD server does not export dirty bitmap 'b0'"
    );
}

#[tokio::test]
async fn falls_back_to_export_name_without_go() {
    let cfg = Config {
        no_go: true,
        ..Config::default()
    };
    let disk = test_disk();
    let (c, _fake) = start(cfg, honest(disk.clone(), true), &opts()).await;
    let c = c.unwrap();
    assert_eq!(c.size(), 1 << 20);
    assert_eq!(c.block_sizes(), BlockSizes::default());
    let mut buf = vec![0u8; 1 << 20];
    c.read(0, &mut buf).await.unwrap();
    assert!(buf == disk.data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_from_tasks_and_blocking_threads() {
    let cfg = Config {
        delay: true,
        ..Config::default()
    };
    let (c, _fake, disk) = honest_client(cfg).await;
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let c = c.clone();
        let disk = disk.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..4u64 {
                let off = ((i * 7 + round * 13) % 240) * 4096;
                let mut buf = vec![0u8; 16 * 1024];
                c.read(off, &mut buf).await.unwrap();
                assert!(buf[..] == disk.data[off as usize..off as usize + 16 * 1024]);
                let holes = c.holes(0..1 << 20).await.unwrap();
                assert_eq!(holes.len(), 3);
            }
        }));
    }
    for i in 0..2u64 {
        let c = c.clone();
        let disk = disk.clone();
        let handle = tokio::runtime::Handle::current();
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; 128 * 1024];
            handle.block_on(c.read(i * 128 * 1024, &mut buf)).unwrap();
            assert!(buf[..] == disk.data[(i * 128 * 1024) as usize..((i + 1) * 128 * 1024) as usize]);
            let dirty = handle.block_on(c.dirty("b0", 0..1 << 20)).unwrap();
            assert_eq!(dirty, [4096..100 * 1024, 600 * 1024..704 * 1024]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn block_status_loops_clips_and_merges() {
    let (c, fake, disk) = honest_client(Config::default()).await;
    let size = 1u64 << 20;
    let alloc = c.allocation(0..size).await.unwrap();
    assert_eq!(alloc, disk.alloc);
    // Two extents per reply: the client had to loop.
    assert!(fake.seen.lock().unwrap().requests >= 3);
    assert_eq!(
        c.holes(0..size).await.unwrap(),
        [0..64 * 1024, 300 * 1024..700 * 1024, 704 * 1024..size]
    );
    assert_eq!(
        c.dirty("b0", 0..size).await.unwrap(),
        [4096..100 * 1024, 600 * 1024..704 * 1024]
    );
    // An unaligned range is asked aligned and clipped back.
    assert_eq!(
        c.block_status(B0, 5000..4096 * 30 + 7).await.unwrap(),
        [(5000..100 * 1024, 1), (100 * 1024..4096 * 30 + 7, 0)]
    );
    assert_eq!(
        c.holes(100..200).await.unwrap(),
        vec![Range { start: 100, end: 200 }]
    );
    assert!(c.holes(10..10).await.unwrap().is_empty());
    let e = c.dirty("b1", 0..size).await.unwrap_err();
    assert!(matches!(e, NbdError::BitmapNotRequested(_)), "{e}");
    let e = c.holes(0..size + 1).await.unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    let e = c.holes(Range { start: 10, end: 5 }).await.unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
}

#[tokio::test]
async fn refuses_bad_requests_locally() {
    let (c, fake, _) = honest_client(Config::default()).await;
    let mut buf = vec![0u8; 4096];
    let e = c.read(100, &mut buf).await.unwrap_err();
    assert!(matches!(e, NbdError::Unaligned { .. }), "{e}");
    let e = c.read(0, &mut buf[..100]).await.unwrap_err();
    assert!(matches!(e, NbdError::Unaligned { .. }), "{e}");
    let e = c.read((1 << 20) - 512, &mut buf).await.unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    let e = c.read(u64::MAX - 511, &mut buf[..512]).await.unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    assert_eq!(fake.seen.lock().unwrap().requests, 0);
}

#[tokio::test]
async fn negotiation_failures_are_clear() {
    let disk = test_disk();
    let mut o = opts();
    o.export = "nope".to_owned();
    let (c, _f) = start(Config::default(), honest(disk.clone(), true), &o).await;
    let e = c.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the NBD server has no export named \"nope\" (no such export)"
    );

    let cfg = Config {
        contexts: vec![(BASE.to_owned(), 1)],
        ..Config::default()
    };
    let (c, f) = start(cfg, honest(disk.clone(), true), &opts()).await;
    assert_eq!(
        c.unwrap_err().to_string(),
        "the NBD server does not export dirty bitmap 'b0'"
    );
    // The client aborted the negotiation politely.
    f.server.await.unwrap().unwrap();
    assert_eq!(f.seen.lock().unwrap().options.last(), Some(&OPT_ABORT));

    let cfg = Config {
        tls_required: true,
        ..Config::default()
    };
    let (c, _f) = start(cfg, honest(disk.clone(), true), &opts()).await;
    assert!(matches!(c.unwrap_err(), NbdError::TlsRequired));

    // TLS required by the client, refused by the server.
    let mut o = opts();
    o.require_tls = true;
    let e = NbdClient::connect_stream(tokio::io::duplex(64).0, &o)
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::Options(_)), "{e}");
    o.tls = Some(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    ));
    let (c, _f) = start(Config::default(), honest(disk, true), &o).await;
    let e = c.unwrap_err();
    assert!(matches!(e, NbdError::TlsNotOffered { .. }), "{e}");
}

#[tokio::test]
async fn bad_greetings_and_silent_servers() {
    for (bytes, want) in [
        (
            b"NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53\x00\x00".to_vec(),
            "oldstyle",
        ),
        (b"NBDMAGIXIHAVEOPT\x00\x03".to_vec(), "magic"),
        (b"NBDMAGICIHAVEOPT\x00\x02".to_vec(), "fixed newstyle"),
    ] {
        let (a, mut b) = tokio::io::duplex(1024);
        b.write_all(&bytes).await.unwrap();
        let e = NbdClient::connect_stream(a, &opts()).await.unwrap_err();
        assert!(matches!(e, NbdError::Protocol(_)), "{e}");
        assert!(
            crate::error_chain(&e).contains(want),
            "{}",
            crate::error_chain(&e)
        );
    }
    let (a, _b) = tokio::io::duplex(1024);
    let mut o = opts();
    o.connect_timeout = Duration::from_millis(50);
    let e = NbdClient::connect_stream(a, &o).await.unwrap_err();
    assert!(matches!(e, NbdError::ConnectTimeout { .. }), "{e}");
    let (a, b) = tokio::io::duplex(1024);
    drop(b);
    let e = NbdClient::connect_stream(a, &opts()).await.unwrap_err();
    assert!(matches!(e, NbdError::ServerClosed), "{e}");
}

/// A server that lies in its reply to the first request, then answers honestly.
async fn lying(
    first: impl FnOnce(Request) -> Vec<Vec<u8>> + Send + 'static,
    read: bool,
) -> (NbdError, NbdError) {
    let disk = test_disk();
    let mut honest = honest(disk, true);
    let mut first = Some(first);
    let handler: Handler = Box::new(move |req, n| match first.take() {
        Some(f) => f(req),
        None => honest(req, n),
    });
    let (c, _f) = start(Config::default(), handler, &opts()).await;
    let c = c.unwrap();
    let mut buf = vec![0u8; 8192];
    let e = if read {
        c.read(4096, &mut buf).await.unwrap_err()
    } else {
        c.allocation(0..8192).await.unwrap_err()
    };
    // The connection is dead after a protocol violation.
    let again = c.read(0, &mut buf).await.unwrap_err();
    (e, again)
}

fn assert_protocol(e: &NbdError, want: impl Fn(&ProtoError) -> bool) {
    let NbdError::Connection(inner) = e else {
        panic!("not a connection failure: {e:?}");
    };
    match &**inner {
        NbdError::Protocol(p) if want(p) => {}
        other => panic!("unexpected cause: {other:?}"),
    }
    assert!(e.is_connection_lost());
}

#[tokio::test]
async fn lying_servers_get_errors() {
    type Case = (
        &'static str,
        bool,
        Box<dyn FnOnce(Request) -> Vec<Vec<u8>> + Send>,
        fn(&ProtoError) -> bool,
    );
    let cases: Vec<Case> = vec![
        (
            "chunk outside the request",
            true,
            Box::new(|r| vec![data_chunk(r.cookie, 4096 + 8192 - 10, &[1; 20]), done(r.cookie)]),
            |p| matches!(p, ProtoError::OutsideRequest { .. }),
        ),
        (
            "overlapping chunks",
            true,
            Box::new(|r| {
                vec![
                    data_chunk(r.cookie, 4096, &[1; 4096]),
                    hole_chunk(r.cookie, 8000, 4288),
                    done(r.cookie),
                ]
            }),
            |p| matches!(p, ProtoError::Overlap { .. }),
        ),
        (
            "missing coverage",
            true,
            Box::new(|r| vec![data_chunk(r.cookie, 4096, &[1; 4096]), done(r.cookie)]),
            |p| {
                matches!(
                    p,
                    ProtoError::Incomplete {
                        gap_start: 8192,
                        gap_end: 12288,
                        ..
                    }
                )
            },
        ),
        (
            "bad magic",
            true,
            Box::new(|r| {
                let mut m = done(r.cookie);
                m[0] ^= 0x10;
                vec![m]
            }),
            |p| matches!(p, ProtoError::BadMagic { .. }),
        ),
        (
            "wrong cookie",
            true,
            Box::new(|r| vec![done(r.cookie + 1000)]),
            |p| matches!(p, ProtoError::UnknownCookie(_)),
        ),
        (
            "data chunk larger than the request",
            true,
            Box::new(|r| vec![data_chunk(r.cookie, 4096, &[1; 8193])]),
            |p| matches!(p, ProtoError::TooLong { .. }),
        ),
        (
            "huge length field",
            true,
            Box::new(|r| {
                vec![
                    ChunkHeader {
                        flags: 0,
                        kind: REPLY_TYPE_OFFSET_DATA,
                        cookie: r.cookie,
                        len: u32::MAX,
                    }
                    .encode()
                    .to_vec(),
                ]
            }),
            |p| matches!(p, ProtoError::TooLong { .. }),
        ),
        (
            "simple reply to a structured read",
            true,
            Box::new(|r| vec![simple(r.cookie, 0, &[0; 8192])]),
            |p| matches!(p, ProtoError::UnexpectedSimple { .. }),
        ),
        (
            "block status chunk answering a read",
            true,
            Box::new(|r| vec![status_chunk(r.cookie, 7, &[(8192, 0)]), done(r.cookie)]),
            |p| matches!(p, ProtoError::UnexpectedChunk { .. }),
        ),
        (
            "zero-length extent",
            false,
            Box::new(|r| vec![status_chunk(r.cookie, 7, &[(4096, 0), (0, 1)]), done(r.cookie)]),
            |p| matches!(p, ProtoError::Empty { .. }),
        ),
        (
            "extents for an unknown context",
            false,
            Box::new(|r| vec![status_chunk(r.cookie, 8, &[(8192, 0)]), done(r.cookie)]),
            |p| matches!(p, ProtoError::UnknownContext(8)),
        ),
        (
            "a negotiated context left out",
            false,
            Box::new(|r| vec![status_chunk(r.cookie, 7, &[(8192, 0)]), done(r.cookie)]),
            |p| matches!(p, ProtoError::MissingContext(9)),
        ),
        (
            "the same context twice",
            false,
            Box::new(|r| {
                vec![
                    status_chunk(r.cookie, 7, &[(8192, 0)]),
                    status_chunk(r.cookie, 7, &[(8192, 0)]),
                    done(r.cookie),
                ]
            }),
            |p| matches!(p, ProtoError::DuplicateContext(7)),
        ),
        (
            "extents after the end of the request",
            false,
            Box::new(|r| {
                vec![
                    status_chunk(r.cookie, 7, &[(8192, 0), (512, 1)]),
                    status_chunk(r.cookie, 9, &[(8192, 0)]),
                    done(r.cookie),
                ]
            }),
            |p| matches!(p, ProtoError::ExtentsPastRequest { .. }),
        ),
    ];
    for (name, read, first, want) in cases {
        let (e, again) = lying(first, read).await;
        eprintln!("{name}: {}", crate::error_chain(&e));
        assert_protocol(&e, want);
        assert_protocol(&again, want);
    }
}

#[tokio::test]
async fn server_closing_mid_reply_fails_requests() {
    let disk = test_disk();
    let handler: Handler = Box::new(move |r, _| {
        // Half a chunk, then the server hangs up.
        let m = data_chunk(r.cookie, r.offset, &disk.data[..r.len as usize]);
        vec![m[..30].to_vec()]
    });
    let cfg = Config {
        hang_up: true,
        ..Config::default()
    };
    let (c, _f) = start(cfg, handler, &opts()).await;
    let c = c.unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).await.unwrap_err();
    let NbdError::Connection(inner) = &e else {
        panic!("{e:?}");
    };
    assert!(matches!(**inner, NbdError::ServerClosed), "{e:?}");
    assert_eq!(e.to_string(), "the NBD connection failed");
    assert_eq!(
        crate::error_chain(&e),
        "the NBD connection failed: the NBD server closed the connection"
    );
}

#[tokio::test]
async fn server_errors_fail_one_request_only() {
    let disk = test_disk();
    let mut honest = honest(disk.clone(), true);
    let mut n = 0;
    let handler: Handler = Box::new(move |r, ctx| {
        n += 1;
        match n {
            1 => vec![
                data_chunk(r.cookie, r.offset, &[1; 512]),
                error_chunk(REPLY_FLAG_DONE, r.cookie, 5, "bad sector"),
            ],
            2 => vec![simple(r.cookie, 22, &[])],
            _ => honest(r, ctx),
        }
    });
    let (c, _f) = start(Config::default(), handler, &opts()).await;
    let c = c.unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the NBD server failed NBD_CMD_READ of 4096 bytes at 0: EIO (input/output error) (bad sector)"
    );
    assert!(!e.is_connection_lost());
    // A simple error reply to a block status request (allowed by the protocol).
    let e = c.holes(0..4096).await.unwrap_err();
    assert!(matches!(e, NbdError::Server { errno: Errno(22), .. }), "{e}");
    c.read(64 * 1024, &mut buf).await.unwrap();
    assert!(buf[..] == disk.data[64 * 1024..68 * 1024]);
}

#[tokio::test]
async fn eshutdown_makes_the_client_disconnect() {
    let handler: Handler = Box::new(|r, _| vec![error_chunk(REPLY_FLAG_DONE, r.cookie, ESHUTDOWN, "")]);
    let (c, f) = start(Config::default(), handler, &opts()).await;
    let c = c.unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).await.unwrap_err();
    assert!(matches!(e, NbdError::Server { .. }), "{e}");
    f.server.await.unwrap().unwrap();
    assert!(f.seen.lock().unwrap().disconnected);
    let e = c.read(0, &mut buf).await.unwrap_err();
    assert!(e.is_connection_lost(), "{e}");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let handler: Handler = Box::new(|_, _| Vec::new());
    let mut o = opts();
    o.request_timeout = Duration::from_millis(100);
    let (c, _f) = start(Config::default(), handler, &o).await;
    let c = c.unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read(0, &mut buf).await.unwrap_err();
    assert!(matches!(e, NbdError::Timeout { .. }), "{e}");
    assert!(e.to_string().contains("timed out"), "{e}");
    let e = c.holes(0..4096).await.unwrap_err();
    assert!(e.is_connection_lost(), "{e}");
    assert!(
        crate::error_chain(&e).contains("timed out"),
        "{}",
        crate::error_chain(&e)
    );
}

#[tokio::test]
async fn close_disconnects_every_clone() {
    let (c, f, _) = honest_client(Config::default()).await;
    let other = c.clone();
    c.close().await.unwrap();
    let mut buf = vec![0u8; 4096];
    let e = other.read(0, &mut buf).await.unwrap_err();
    assert!(matches!(e, NbdError::Closed), "{e}");
    f.server.await.unwrap().unwrap();
    assert!(f.seen.lock().unwrap().disconnected);
    // Closing twice is fine.
    other.close().await.unwrap();
}

#[tokio::test]
async fn dropping_the_last_clone_disconnects() {
    let (c, f, _) = honest_client(Config::default()).await;
    let mut buf = vec![0u8; 4096];
    c.read(0, &mut buf).await.unwrap();
    drop(c);
    tokio::time::timeout(Duration::from_secs(5), f.server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(f.seen.lock().unwrap().disconnected);
}

#[tokio::test]
async fn options_are_validated() {
    for o in [
        ConnectOptions {
            export: "a\0b".to_owned(),
            ..ConnectOptions::default()
        },
        ConnectOptions {
            bitmaps: vec![String::new()],
            ..ConnectOptions::default()
        },
        ConnectOptions {
            max_in_flight: 0,
            ..ConnectOptions::default()
        },
        ConnectOptions {
            request_timeout: Duration::ZERO,
            ..ConnectOptions::default()
        },
    ] {
        let e = NbdClient::connect_stream(tokio::io::duplex(64).0, &o)
            .await
            .unwrap_err();
        assert!(matches!(e, NbdError::Options(_)), "{e}");
    }
    let uri = NbdUri::parse("nbds+unix:///x?socket=/s").unwrap();
    let o = ConnectOptions::for_uri(&uri);
    assert!(o.require_tls);
    assert_eq!(o.export, "x");
    let e = NbdClient::connect(&uri.addr, &o).await.unwrap_err();
    assert!(matches!(e, NbdError::Options(_)), "{e}");
    let e = NbdClient::connect_uri("nbd+unix:///x?socket=/nonexistent/sock", None, &[])
        .await
        .unwrap_err();
    assert!(matches!(e, NbdError::Connect { .. }), "{e}");
}

#[test]
fn client_and_errors_can_be_shared_across_threads() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    fn sendable<T: Send + Sync + 'static>() {}
    shareable::<NbdClient>();
    shareable::<ConnectOptions>();
    sendable::<NbdError>();
}
