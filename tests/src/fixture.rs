//! What the test servers ([`crate::s3server`], [`crate::faultproxy`]) share: a self-signed
//! certificate for 127.0.0.1 and localhost, an HTTPS accept loop (HTTP/1.1) on a thread with its
//! own Tokio runtime that stops when its handle is dropped, and the helpers of their binaries
//! (info files, logging, waiting for a signal).

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

/// The error type of the bodies and services the fixtures serve.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A self-signed certificate (and its key) for `127.0.0.1`, `::1` and `localhost`. Being
/// self-signed, its PEM is also the CA a client trusts.
pub struct TestCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// `sha256:<hex>` of the DER, as `tern_core::tls` pins it.
    pub fingerprint: String,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TestCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCert")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl TestCert {
    /// Makes a new certificate and key (rcgen, ECDSA P-256).
    pub fn generate() -> Result<Self> {
        let names = ["127.0.0.1", "::1", "localhost"].map(str::to_owned).to_vec();
        let ck = rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
        let cert_der = ck.cert.der().clone();
        Ok(Self {
            cert_pem: ck.cert.pem(),
            fingerprint: tern_core::tls::Fingerprint::of(&cert_der).to_string(),
            cert_der,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der())),
        })
    }

    /// A rustls server configuration (aws-lc-rs) offering HTTP/1.1.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone()], self.key.clone_key())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// A rustls client configuration (aws-lc-rs) that trusts the certificates in `ca_pem` and
/// nothing else, without ALPN (callers that need one set it).
pub fn client_config_trusting(ca_pem: &[u8]) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots
            .add(cert.context("reading a CA certificate")?)
            .context("adding a CA certificate")?;
    }
    if roots.is_empty() {
        bail!("the CA PEM holds no certificate");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Binds `127.0.0.1:port` (0: a free port).
pub(crate) fn bind_loopback(port: u16) -> Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// A server running on its own thread and Tokio runtime; dropping it stops the server (open
/// connections are cut) and joins the thread.
#[derive(Debug)]
pub(crate) struct Background {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Runs `serve(listener)` on a new thread named `name` until the handle is dropped.
    pub(crate) fn spawn<F, Fut>(name: &str, listener: std::net::TcpListener, serve: F) -> Result<Self>
    where
        F: FnOnce(TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let addr = listener.local_addr()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .context("building a Tokio runtime")?;
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(listener)?
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        () = serve(listener) => {}
                        _ = rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(5));
            })
            .context("starting a server thread")?;
        Ok(Self {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts TLS connections on `listener` and serves each with `service` over HTTP/1.1.
pub(crate) async fn serve_tls<S, B>(listener: TcpListener, acceptor: TlsAcceptor, service: S)
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Writes `value` as pretty JSON to `path` atomically (a reader never sees half a file).
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    write_atomic(path, &serde_json::to_vec_pretty(value)?)
}

/// Writes `data` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Waits until the fixture binary `child` has written its info file `path` and returns it;
/// fails if the process exits first or nothing comes `within`.
pub fn wait_for_info<T: DeserializeOwned>(path: &Path, child: &mut Child, within: Duration) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(b) = std::fs::read(path)
            && let Ok(info) = serde_json::from_slice::<T>(&b)
        {
            return Ok(info);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the process exited with {status} before writing {}",
                path.display()
            );
        }
        if Instant::now() > deadline {
            bail!("{} not written within {within:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where a binary writes the certificate when not told: beside its info file, `NAME.ca.pem`
/// for `NAME.json`.
pub fn default_ca_file(info: &Path) -> std::path::PathBuf {
    info.with_extension("ca.pem")
}

/// Logging of the fixture binaries: to stderr, `RUST_LOG` or `info`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Blocks until SIGINT or SIGTERM.
pub fn wait_for_termination() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        Ok(())
    })
}
