//! `tern-fault-proxy`: an HTTPS reverse proxy that injects S3-style faults, in process
//! ([`FaultProxy::start`]) or as the binary
//! `tern-fault-proxy --upstream URL [--upstream-ca PEM] --info FILE [--port N] [--ca-file PEM]
//! [--seed N] [--max-faults N] [--slowdown P[:METHODS]] [--reset P[:METHODS]]
//! [--stall P[:METHODS]] [--truncate P[:METHODS]] [--stall-for DURATION] [--stall-then-forward]`
//! (`METHODS` like `GET,PUT`; `DURATION` like `40s`), which writes its info file (JSON,
//! atomically) once it listens:
//!
//! ```json
//! {"endpoint": "https://127.0.0.1:PORT", "upstream": "https://127.0.0.1:UPSTREAM",
//!  "ca_file": "/path/NAME.ca.pem", "fingerprint": "sha256:<hex of the certificate's DER>"}
//! ```
//!
//! and logs every fault it injects until SIGINT/SIGTERM.
//!
//! It terminates TLS on 127.0.0.1 with its own self-signed certificate (HTTP/1.1) and forwards
//! every request unchanged (method, path and query, headers, body) to the upstream (`https://`
//! trusting the given CA PEM, or `http://`) with hyper-util's client. The `Host` header goes
//! through verbatim: a SigV4 client signs `host: 127.0.0.1:PROXYPORT`, and the upstream checks
//! the signature against the `Host` it receives, so a rewritten `Host` would break every
//! signature. Hop-by-hop headers (`Connection`, `Transfer-Encoding`, ...) are not forwarded.
//!
//! Per request, one draw of a seeded RNG picks at most one fault, each kind with its own
//! probability (their sum at most 1) and, optionally, only for some methods:
//! - `slowdown`: answers 503 with an S3 `SlowDown` XML error, forwarding nothing;
//! - `reset`: forwards nothing and closes the connection without an answer;
//! - `stall`: holds the request for `stall_for` (make it longer than the client's timeout),
//!   then closes the connection without forwarding (or, with `stall_then_forward`, forwards it
//!   late: a delayed duplicate of a request the client has since retried);
//! - `truncate`: forwards, then answers the upstream's status and headers (`Content-Length`
//!   included) with only the first half of the body and cuts the connection. Only answers with
//!   a body of 2 bytes or more can be truncated; others pass unharmed and are not counted.
//!
//! After `max_faults` faults, or while [`FaultProxy::set_enabled`] is off, requests pass
//! unharmed. Faults are counted per kind ([`FaultProxy::counts`]) so tests can check they
//! happened. Mind that `truncate` and `stall_then_forward` let the upstream carry out a request
//! whose answer the client never sees: on a non-idempotent request (s3s-fs's
//! CompleteMultipartUpload, whose retry then fails) restrict them to `GET`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::fixture::{Background, BoxError, TestCert, bind_loopback, serve_tls, write_atomic};

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// 503 `SlowDown`, nothing forwarded.
    SlowDown,
    /// Connection closed without an answer, nothing forwarded.
    Reset,
    /// Request held for `stall_for`, then dropped (or forwarded late).
    Stall,
    /// Forwarded; the answer's body cut in half, then the connection.
    Truncate,
}

impl FaultKind {
    /// Every kind, in the order a draw tests them.
    pub const ALL: [FaultKind; 4] = [Self::SlowDown, Self::Reset, Self::Stall, Self::Truncate];

    /// Its name in flags and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::SlowDown => "slowdown",
            Self::Reset => "reset",
            Self::Stall => "stall",
            Self::Truncate => "truncate",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// When one kind of fault strikes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultRule {
    /// Chance per request, 0.0 to 1.0; 0 disables the kind.
    pub probability: f64,
    /// The methods it strikes; empty: every method.
    pub methods: Vec<Method>,
}

impl FaultRule {
    /// Strikes any method with `probability`.
    pub fn new(probability: f64) -> Self {
        Self {
            probability,
            methods: Vec::new(),
        }
    }

    /// Strikes only `methods`, with `probability`.
    pub fn only(probability: f64, methods: &[Method]) -> Self {
        Self {
            probability,
            methods: methods.to_vec(),
        }
    }

    fn applies(&self, method: &Method) -> bool {
        self.methods.is_empty() || self.methods.contains(method)
    }
}

/// Parses `P` or `P:METHOD,METHOD` (as the binary's flags take it).
impl FromStr for FaultRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (p, methods) = match s.split_once(':') {
            Some((p, m)) => (p, Some(m)),
            None => (s, None),
        };
        let probability: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("{p:?} is not a probability"))?;
        if !(0.0..=1.0).contains(&probability) {
            return Err(format!("probability {probability} is not between 0 and 1"));
        }
        let methods = methods
            .into_iter()
            .flat_map(|m| m.split(','))
            .map(|m| {
                Method::from_bytes(m.trim().to_ascii_uppercase().as_bytes())
                    .map_err(|_| format!("{m:?} is not an HTTP method"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { probability, methods })
    }
}

/// Which faults the proxy injects. The default injects none.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Seed of the RNG that draws the faults (one draw per request, in arrival order).
    pub seed: u64,
    /// No fault after this many (all kinds together).
    pub max_faults: u64,
    /// 503 `SlowDown`.
    pub slowdown: FaultRule,
    /// Connection closed without an answer.
    pub reset: FaultRule,
    /// Request held for [`Self::stall_for`].
    pub stall: FaultRule,
    /// Body cut in half.
    pub truncate: FaultRule,
    /// How long a stall holds a request.
    pub stall_for: Duration,
    /// Whether a stalled request is forwarded afterwards instead of dropped.
    pub stall_then_forward: bool,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            max_faults: u64::MAX,
            slowdown: FaultRule::default(),
            reset: FaultRule::default(),
            stall: FaultRule::default(),
            truncate: FaultRule::default(),
            stall_for: Duration::from_secs(40),
            stall_then_forward: false,
        }
    }
}

impl FaultConfig {
    /// The rule of `kind`.
    pub fn rule(&self, kind: FaultKind) -> &FaultRule {
        match kind {
            FaultKind::SlowDown => &self.slowdown,
            FaultKind::Reset => &self.reset,
            FaultKind::Stall => &self.stall,
            FaultKind::Truncate => &self.truncate,
        }
    }

    fn validate(&self) -> Result<()> {
        let mut sum = 0.0;
        for kind in FaultKind::ALL {
            let p = self.rule(kind).probability;
            if !(0.0..=1.0).contains(&p) {
                bail!("the {kind} probability {p} is not between 0 and 1");
            }
            sum += p;
        }
        if sum > 1.0 + 1e-9 {
            bail!("the fault probabilities add up to {sum}, more than 1");
        }
        Ok(())
    }
}

/// Requests seen and faults injected so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultCounts {
    /// Requests received (faulted or not).
    pub requests: u64,
    /// 503 `SlowDown` answers.
    pub slowdown: u64,
    /// Connections closed without an answer.
    pub reset: u64,
    /// Requests stalled.
    pub stall: u64,
    /// Answers truncated.
    pub truncate: u64,
}

impl FaultCounts {
    /// The count of `kind`.
    pub fn get(&self, kind: FaultKind) -> u64 {
        match kind {
            FaultKind::SlowDown => self.slowdown,
            FaultKind::Reset => self.reset,
            FaultKind::Stall => self.stall,
            FaultKind::Truncate => self.truncate,
        }
    }

    /// Faults of every kind.
    pub fn faults(&self) -> u64 {
        FaultKind::ALL.iter().map(|k| self.get(*k)).sum()
    }
}

/// The info file of `tern-fault-proxy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyInfo {
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Where requests go.
    pub upstream: String,
    /// The proxy's self-signed certificate, PEM: the CA to trust.
    pub ca_file: PathBuf,
    /// `sha256:<hex>` of the certificate's DER.
    pub fingerprint: String,
}

/// Where the proxy listens and writes its certificate.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Where to write the certificate (PEM); `None`: a temporary file the proxy removes when
    /// dropped.
    pub ca_file: Option<PathBuf>,
}

/// A running proxy; dropping it stops it (stalled requests included).
#[derive(Debug)]
pub struct FaultProxy {
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where requests go.
    pub upstream: String,
    /// Its certificate, PEM (the CA to trust).
    pub ca_pem: String,
    /// Where the certificate was written.
    pub ca_file: PathBuf,
    /// `sha256:<hex>` of the certificate's DER.
    pub fingerprint: String,
    shared: Arc<Shared>,
    _server: Background,
    _ca_dir: Option<tempfile::TempDir>,
}

impl FaultProxy {
    /// Starts a proxy on a free port of 127.0.0.1 in front of `upstream` (`https://host:port`,
    /// trusting `upstream_ca_pem`, or `http://host:port`). Needs no Tokio runtime.
    pub fn start(upstream: &str, upstream_ca_pem: Option<&[u8]>, faults: FaultConfig) -> Result<Self> {
        Self::start_with(upstream, upstream_ca_pem, faults, ProxyOptions::default())
    }

    /// [`Self::start`] with a port and a certificate path.
    pub fn start_with(
        upstream: &str,
        upstream_ca_pem: Option<&[u8]>,
        faults: FaultConfig,
        options: ProxyOptions,
    ) -> Result<Self> {
        faults.validate()?;
        let upstream_uri = parse_upstream(upstream)?;
        let tls = match (upstream_uri.scheme_str(), upstream_ca_pem) {
            (_, Some(pem)) => crate::fixture::client_config_trusting(pem)?,
            (Some("https"), None) => bail!("an https upstream needs its CA PEM"),
            // Plain HTTP: the TLS configuration is never used.
            _ => rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);

        let cert = TestCert::generate()?;
        let (ca_file, ca_dir) = match options.ca_file {
            Some(p) => (p, None),
            None => {
                let dir = tempfile::tempdir()?;
                (dir.path().join("proxy-ca.pem"), Some(dir))
            }
        };
        write_atomic(&ca_file, cert.cert_pem.as_bytes())?;

        let shared = Arc::new(Shared {
            upstream: upstream_uri,
            client,
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(faults.seed)),
            config: faults,
            enabled: AtomicBool::new(true),
            injected: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            counts: Default::default(),
        });
        let acceptor = TlsAcceptor::from(cert.server_config()?);
        let service_shared = shared.clone();
        let service = hyper::service::service_fn(move |req| handle(service_shared.clone(), req));
        let listener = bind_loopback(options.port)?;
        let server = Background::spawn("tern-fault-proxy", listener, move |l| {
            serve_tls(l, acceptor, service)
        })?;
        let addr = server.addr();
        Ok(Self {
            endpoint: format!("https://{addr}"),
            addr,
            upstream: upstream.trim_end_matches('/').to_owned(),
            ca_pem: cert.cert_pem,
            ca_file,
            fingerprint: cert.fingerprint,
            shared,
            _server: server,
            _ca_dir: ca_dir,
        })
    }

    /// Requests seen and faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        self.shared.counts()
    }

    /// Turns fault injection on (the start state) or off.
    pub fn set_enabled(&self, enabled: bool) {
        self.shared.enabled.store(enabled, Ordering::SeqCst);
    }

    /// The info file's contents.
    pub fn info(&self) -> ProxyInfo {
        ProxyInfo {
            endpoint: self.endpoint.clone(),
            upstream: self.upstream.clone(),
            ca_file: self.ca_file.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// `scheme://authority` of an upstream URL (no path, query or user info).
fn parse_upstream(url: &str) -> Result<Uri> {
    let uri: Uri = url
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("upstream {url:?} is not a URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        bail!("upstream {url:?} is not http://HOST:PORT or https://HOST:PORT");
    };
    if !matches!(scheme.as_str(), "http" | "https")
        || authority.as_str().contains('@')
        || !matches!(uri.path(), "" | "/")
        || uri.query().is_some()
    {
        bail!("upstream {url:?} is not http://HOST:PORT or https://HOST:PORT");
    }
    Ok(Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()?)
}

type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

struct Shared {
    upstream: Uri,
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    config: FaultConfig,
    rng: Mutex<rand::rngs::StdRng>,
    enabled: AtomicBool,
    /// Faults injected or reserved, against `max_faults`.
    injected: AtomicU64,
    requests: AtomicU64,
    counts: [AtomicU64; 4],
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("upstream", &self.upstream)
            .field("config", &self.config)
            .field("counts", &self.counts())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Draws the fault for a request, reserving it against `max_faults`.
    fn decide(&self, method: &Method) -> Option<FaultKind> {
        if !self.enabled.load(Ordering::SeqCst) {
            return None;
        }
        let r: f64 = self.rng.lock().unwrap_or_else(|p| p.into_inner()).random();
        let mut bound = 0.0;
        for kind in FaultKind::ALL {
            let rule = self.config.rule(kind);
            bound += rule.probability;
            if r < bound {
                let reserved = rule.applies(method)
                    && self
                        .injected
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                            (n < self.config.max_faults).then_some(n + 1)
                        })
                        .is_ok();
                return reserved.then_some(kind);
            }
        }
        None
    }

    /// Gives back a reservation that did not become a fault.
    fn release(&self) {
        self.injected.fetch_sub(1, Ordering::SeqCst);
    }

    fn record(&self, kind: FaultKind, method: &Method, target: &str) {
        let n = self.counts[kind.index()].fetch_add(1, Ordering::SeqCst) + 1;
        let c = self.counts();
        info!(
            kind = kind.name(),
            %method,
            target,
            n,
            slowdown = c.slowdown,
            reset = c.reset,
            stall = c.stall,
            truncate = c.truncate,
            requests = c.requests,
            "fault injected"
        );
    }

    fn counts(&self) -> FaultCounts {
        let get = |k: FaultKind| self.counts[k.index()].load(Ordering::SeqCst);
        FaultCounts {
            requests: self.requests.load(Ordering::SeqCst),
            slowdown: get(FaultKind::SlowDown),
            reset: get(FaultKind::Reset),
            stall: get(FaultKind::Stall),
            truncate: get(FaultKind::Truncate),
        }
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Incoming>, BoxError> {
        let (parts, body) = req.into_parts();
        let mut uri = http::uri::Parts::from(self.upstream.clone());
        uri.path_and_query = parts.uri.path_and_query().cloned();
        let mut out = Request::new(body);
        *out.method_mut() = parts.method;
        *out.uri_mut() = Uri::from_parts(uri)?;
        *out.headers_mut() = parts.headers;
        strip_hop_by_hop(out.headers_mut());
        Ok(self.client.request(out).await?)
    }
}

/// The error a service returns to make hyper close the connection without an answer.
#[derive(Debug)]
struct Injected(FaultKind);

impl std::fmt::Display for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "injected fault: {}", self.0)
    }
}

impl std::error::Error for Injected {}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<ProxyBody>, BoxError> {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
    let fault = shared.decide(&method);
    match fault {
        Some(kind @ FaultKind::SlowDown) => {
            shared.record(kind, &method, &target);
            return Ok(s3_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "SlowDown",
                "Please reduce your request rate (injected by tern-fault-proxy).",
            ));
        }
        Some(kind @ FaultKind::Reset) => {
            shared.record(kind, &method, &target);
            return Err(Box::new(Injected(kind)));
        }
        Some(kind @ FaultKind::Stall) => {
            shared.record(kind, &method, &target);
            tokio::time::sleep(shared.config.stall_for).await;
            if !shared.config.stall_then_forward {
                return Err(Box::new(Injected(kind)));
            }
        }
        Some(FaultKind::Truncate) | None => {}
    }
    let response = match shared.forward(req).await {
        Ok(r) => r,
        Err(e) => {
            if fault == Some(FaultKind::Truncate) {
                shared.release();
            }
            warn!(%method, target, error = %e, "forwarding failed");
            return Ok(s3_error(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                &format!("tern-fault-proxy could not forward the request: {e}"),
            ));
        }
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if fault != Some(FaultKind::Truncate) {
        return Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed_unsync(),
        ));
    }
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            shared.release();
            return Err(e.into());
        }
    };
    if bytes.len() < 2 {
        shared.release();
        return Ok(Response::from_parts(parts, full(bytes)));
    }
    shared.record(FaultKind::Truncate, &method, &target);
    let half = bytes.slice(..bytes.len() / 2);
    Ok(Response::from_parts(
        parts,
        Truncated {
            data: Some(half),
            pause: None,
        }
        .boxed_unsync(),
    ))
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed_unsync()
}

/// An S3 error answer.
fn s3_error(status: StatusCode, code: &str, message: &str) -> Response<ProxyBody> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message>\
         <RequestId>tern-fault-proxy</RequestId></Error>"
    );
    let mut r = Response::new(full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    r
}

/// Headers of one connection, not of the message (RFC 9110 section 7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for name in listed {
        headers.remove(name.as_str());
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// A body that yields its data, pauses so hyper flushes it, then fails (hyper then closes the
/// connection short of the announced `Content-Length`).
struct Truncated {
    data: Option<Bytes>,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for Truncated {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        let pause = this
            .pause
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(50))));
        match pause.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(Injected(FaultKind::Truncate))))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse() {
        assert_eq!("0.25".parse::<FaultRule>().unwrap(), FaultRule::new(0.25));
        assert_eq!(
            "0.5:get, put".parse::<FaultRule>().unwrap(),
            FaultRule::only(0.5, &[Method::GET, Method::PUT])
        );
        assert!("1.5".parse::<FaultRule>().is_err());
        assert!("x".parse::<FaultRule>().is_err());
        assert!("0.1:GE T".parse::<FaultRule>().is_err());
    }

    #[test]
    fn probabilities_must_add_up_to_at_most_one() {
        let mut c = FaultConfig {
            slowdown: FaultRule::new(0.6),
            reset: FaultRule::new(0.4),
            ..FaultConfig::default()
        };
        c.validate().unwrap();
        c.stall = FaultRule::new(0.1);
        assert!(c.validate().is_err());
    }

    #[test]
    fn upstreams() {
        assert_eq!(
            parse_upstream("https://127.0.0.1:9000/").unwrap().to_string(),
            "https://127.0.0.1:9000/"
        );
        assert!(parse_upstream("http://127.0.0.1:9000").is_ok());
        for bad in [
            "127.0.0.1:9000",
            "ftp://h:1",
            "https://h:1/bucket",
            "https://u@h:1",
            "https://h:1/?x",
        ] {
            assert!(parse_upstream(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:1"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert("x-amz-date", HeaderValue::from_static("20260101T000000Z"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-amz-date"]);
    }
}
