//! The NBD source: the agent as a sync proxy, reading a disk exported over NBD (`qemu-nbd`,
//! QEMU's built-in NBD server, `nbdkit`) with [`tern_core::nbd::NbdClient`].
//!
//! - The allocation map (`base:allocation`) is read once when the disk is opened: a full sync
//!   reads only the allocated extents; holes and known-zero extents read as zeros.
//! - With `--dirty-bitmap ID=NAME`, the export's `qemu:dirty-bitmap:NAME` lists the ranges
//!   written since the bitmap was created (or last cleared). It is used when the latest point's
//!   change token is `NAME` (see [`crate::disk`]): the dirty ranges, combined with the
//!   allocation map (a dirty range that is now a hole is zeros, not read), are all that is read.
//! - The point this sync makes records the token `--next-bitmap ID=NAME` (default: the dirty
//!   bitmap's own name). The caller creates that bitmap before the sync reads anything — the
//!   live-guest flow in `docs/agentless.md` adds it in the same QMP transaction that freezes the
//!   point in time — and removes the old one once the point is committed.
//! - Reads may go through several connections when the server advertises
//!   `NBD_FLAG_CAN_MULTI_CONN` (every connection sees the same data: QEMU's read-only exports,
//!   `qemu-nbd -e N`), up to [`NbdOptions::connections`] (`--nbd-connections`). A server
//!   serves a bounded number of requests per connection (QEMU: 16), so over a link with a real
//!   round-trip time one connection bounds the reads in flight. An extra connection that cannot
//!   be made in [`EXTRA_CONNECT_TIMEOUT`] (a server that limits its clients) is left out; the
//!   first one is enough.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use tern_core::changes::ChangeMap;
use tern_core::nbd::proto::TFLAG_CAN_MULTI_CONN;
use tern_core::nbd::{ConnectOptions, NbdClient, NbdError, NbdUri};
use tracing::{debug, info, warn};

use crate::source::{READ_ALIGN, SourceError};

/// An NBD disk as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdSpec {
    /// The URI (`nbd+unix:///EXPORT?socket=PATH`, `nbds://HOST:PORT/EXPORT`, ...).
    pub uri: String,
    /// The dirty bitmap to read changes from.
    pub bitmap: Option<String>,
    /// The change token recorded with the new point (default: `bitmap`).
    pub next_bitmap: Option<String>,
}

impl NbdSpec {
    /// True when `s` looks like an NBD URI.
    pub fn is_uri(s: &str) -> bool {
        ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
            .iter()
            .any(|p| s.starts_with(p))
    }

    /// Checks the URI (no connection is made).
    pub fn parse(uri: &str) -> Result<Self, String> {
        NbdUri::parse(uri).map_err(|e| e.to_string())?;
        Ok(Self {
            uri: uri.to_owned(),
            bitmap: None,
            next_bitmap: None,
        })
    }
}

/// Connection settings shared by the NBD disks of a sync.
#[derive(Debug, Clone, Default)]
pub struct NbdOptions {
    /// CA certificate(s) (PEM) that sign the server's certificate, for `nbds` URIs.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that verify their clients (QEMU's default
    /// for x509 credentials).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Per-request timeout (default: the client's).
    pub request_timeout: Option<Duration>,
    /// Most connections to read one disk through, when the server allows several
    /// (`NBD_FLAG_CAN_MULTI_CONN`); 0 counts as 1.
    pub connections: usize,
}

/// Default [`NbdOptions::connections`]: one. Over a local unix socket (`scripts/bench-cbt`),
/// 4 connections showed no gain on an incremental and a full sync no faster; several pay off
/// where each round trip costs (an export read over a network link).
pub const DEFAULT_CONNECTIONS: usize = 1;

/// Limit for making each extra connection of a multi-conn export.
pub const EXTRA_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn nbd_err(uri: &str, op: &'static str, e: NbdError) -> SourceError {
    SourceError::Nbd {
        uri: uri.to_owned(),
        op,
        source: Box::new(e),
    }
}

fn tls_config(opts: &NbdOptions) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca_file {
        Some(path) => {
            for cert in read_pem_certs(path)? {
                roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("{} holds no certificate", path.display()));
            }
        }
        None => {
            return Err(
                "an nbds:// URI needs --nbd-ca-file (the CA that signs the server's certificate)".into(),
            );
        }
    }
    let provider = Arc::new(tern_core::tls::provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match &opts.client_cert {
        Some((cert, key)) => {
            let certs = read_pem_certs(cert)?;
            let key_pem = std::fs::read(key).map_err(|e| format!("failed to read {}: {e}", key.display()))?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_pem_certs(path: &std::path::Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("failed to read {}: {e}", path.display()))?;
    rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// An open NBD disk.
#[derive(Debug)]
pub struct NbdDisk {
    uri: String,
    /// One or more connections to the export (several only with `NBD_FLAG_CAN_MULTI_CONN`),
    /// used in turn.
    clients: Vec<NbdClient>,
    next: AtomicUsize,
    size: u64,
    /// Ranges that read as zeros (holes and known-zero extents), sorted and disjoint.
    holes: Vec<Range<u64>>,
    /// The runtime the client runs on: reads come from the blocking pool.
    runtime: tokio::runtime::Handle,
}

impl NbdDisk {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many connections reads are spread over.
    pub fn connections(&self) -> usize {
        self.clients.len()
    }

    /// The parts of `range` that are not holes, rounded out to 4 KiB (clipped to the aligned
    /// end of `range`) and merged.
    pub fn data_segments(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let aligned_end = range.end.next_multiple_of(READ_ALIGN);
        let first = self.holes.partition_point(|h| h.end <= range.start);
        let mut out: Vec<Range<u64>> = Vec::new();
        let mut pos = range.start;
        let mut push = |r: Range<u64>| {
            let r = r.start / READ_ALIGN * READ_ALIGN..r.end.next_multiple_of(READ_ALIGN).min(aligned_end);
            match out.last_mut() {
                Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        };
        for h in &self.holes[first..] {
            if h.start >= range.end {
                break;
            }
            if h.start > pos {
                push(pos..h.start);
            }
            pos = pos.max(h.end);
        }
        if pos < range.end {
            push(pos..range.end);
        }
        out
    }

    /// Reads `buf.len()` bytes at `offset`, or up to the end of the disk; returns the count.
    /// Blocks the calling thread (a blocking-pool thread) until the reply is in.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize, SourceError> {
        let want = buf.len().min(self.size.saturating_sub(offset) as usize);
        if want == 0 {
            return Ok(0);
        }
        let client = &self.clients[self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len()];
        self.runtime
            .block_on(client.read(offset, &mut buf[..want]))
            .map_err(|e| nbd_err(&self.uri, "read", e))?;
        Ok(want)
    }
}

/// A dirty bitmap of an NBD export.
#[derive(Debug)]
pub struct BitmapTracker {
    uri: String,
    client: NbdClient,
    size: u64,
    /// The bitmap to read (`None`: the disk is read whole, and `next` is recorded).
    bitmap: Option<String>,
    next: String,
    holes: Vec<Range<u64>>,
}

impl BitmapTracker {
    /// The token of the point this sync makes.
    pub fn next_token(&self) -> &str {
        &self.next
    }

    /// `dirty-bitmap:NAME` (or `next-bitmap:NAME` without a bitmap to read).
    pub fn describe(&self) -> String {
        match &self.bitmap {
            Some(b) => format!("dirty-bitmap:{b}"),
            None => format!("next-bitmap:{}", self.next),
        }
    }

    /// Disconnects from the export (before the export is removed, so that its removal is not
    /// reported as a lost connection).
    pub async fn close(&self) {
        if let Err(e) = self.client.clone().close().await {
            debug!(uri = %self.uri, error = %tern_core::ErrorChain(&e), "NBD disconnect");
        }
    }

    /// The dirty ranges combined with the allocation map, when `token` names this bitmap.
    pub async fn changes_since(&self, token: &str) -> Result<Option<ChangeMap>, SourceError> {
        let Some(bitmap) = self.bitmap.as_deref() else {
            return Ok(None);
        };
        if token != bitmap {
            info!(
                uri = %self.uri,
                bitmap,
                token,
                "the dirty bitmap does not track changes since the latest point (its change token differs); reading the whole disk"
            );
            return Ok(None);
        }
        let dirty = self
            .client
            .dirty(bitmap, 0..self.size)
            .await
            .map_err(|e| nbd_err(&self.uri, "read the dirty bitmap of", e))?;
        let map = ChangeMap::from_dirty(self.size, &dirty, &self.holes);
        let (data, zero) = map.bytes();
        debug!(uri = %self.uri, ranges = map.changes().len(), data, zero, "dirty bitmap read");
        Ok(Some(map))
    }
}

/// Connects to `spec`, reads its allocation map, and sets up its dirty bitmap if one is named.
pub async fn open(
    spec: &NbdSpec,
    opts: &NbdOptions,
) -> Result<(NbdDisk, Option<BitmapTracker>), SourceError> {
    let uri = spec.uri.as_str();
    let parsed = NbdUri::parse(uri).map_err(|e| nbd_err(uri, "parse", e))?;
    let mut copts = ConnectOptions::for_uri(&parsed);
    if parsed.tls {
        let config = tls_config(opts).map_err(|e| SourceError::NbdSetup {
            uri: uri.to_owned(),
            reason: e,
        })?;
        copts.tls = Some(config);
    }
    if let Some(t) = opts.request_timeout {
        copts.request_timeout = t;
    }
    copts.bitmaps = spec.bitmap.iter().cloned().collect();
    let client = NbdClient::connect(&parsed.addr, &copts)
        .await
        .map_err(|e| nbd_err(uri, "connect to", e))?;
    let size = client.size();
    let extra = if client.transmission_flags() & TFLAG_CAN_MULTI_CONN != 0 {
        opts.connections.saturating_sub(1)
    } else {
        0
    };
    // Only reads go through the extra connections: no dirty bitmap.
    let mut extra_opts = copts.clone();
    extra_opts.bitmaps.clear();
    extra_opts.connect_timeout = extra_opts.connect_timeout.min(EXTRA_CONNECT_TIMEOUT);
    let (holes, extra) = tokio::join!(
        async {
            // A server without an allocation map (rare) is read whole.
            if client.has_context("base:allocation") {
                client
                    .holes(0..size)
                    .await
                    .map_err(|e| nbd_err(uri, "read the allocation map of", e))
            } else {
                info!(
                    uri,
                    "the NBD server reports no allocation map; reading the whole disk"
                );
                Ok(Vec::new())
            }
        },
        futures::future::join_all((0..extra).map(|_| NbdClient::connect(&parsed.addr, &extra_opts)))
    );
    let mut holes = holes?;
    let mut clients = vec![client.clone()];
    for r in extra {
        match r {
            Ok(c) if c.size() == size => clients.push(c),
            Ok(c) => warn!(
                uri,
                size,
                other = c.size(),
                "an extra NBD connection reports another size; not using it"
            ),
            Err(e) => info!(
                uri,
                error = %tern_core::ErrorChain(&e),
                "an extra NBD connection failed (the server may limit its clients); reading through fewer"
            ),
        }
    }
    holes.sort_by_key(|h| h.start);
    holes.dedup_by(|next, prev| {
        // Merge touching or overlapping holes into the earlier one.
        if next.start <= prev.end {
            prev.end = prev.end.max(next.end);
            true
        } else {
            false
        }
    });
    let hole_bytes: u64 = holes.iter().map(|h| h.end - h.start).sum();
    info!(
        uri,
        size,
        hole_bytes,
        connections = clients.len(),
        "NBD export opened"
    );
    let next = spec.next_bitmap.clone().or_else(|| spec.bitmap.clone());
    let tracker = next.map(|next| BitmapTracker {
        uri: uri.to_owned(),
        client: client.clone(),
        size,
        bitmap: spec.bitmap.clone(),
        next,
        holes: holes.clone(),
    });
    Ok((
        NbdDisk {
            uri: uri.to_owned(),
            clients,
            next: AtomicUsize::new(0),
            size,
            holes,
            runtime: tokio::runtime::Handle::current(),
        },
        tracker,
    ))
}
