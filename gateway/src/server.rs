//! Starting the gateway: data directory, TLS identity, credentials, DB, provider, both
//! listeners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use hyper_util::service::TowerToHyperService;
use s3s::service::S3ServiceBuilder;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::blockstore::{BlockStore, LandedBatching};
use crate::config::Config;
use crate::control::{ControlState, router};
use crate::db::MetaDb;
use crate::fsutil::{write_atomic, write_secret_atomic};
use crate::metrics::Metrics;
use crate::provider::local::LocalProvider;
use crate::s3::{DataPlane, HostAccess, KeyAuth};
use crate::secrets::{MasterKey, new_admin_token, token_hash};
use crate::tls::TlsIdentity;

/// Where a running gateway can be reached; written to `<data_dir>/endpoint.json` at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    /// Data-plane address.
    pub data: SocketAddr,
    /// Control-plane address.
    pub control: SocketAddr,
    /// Certificate fingerprint.
    pub fingerprint: String,
}

/// Files of the data directory.
pub fn endpoint_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("endpoint.json")
}

/// The admin token file (mode 0600), written once at first start.
pub fn admin_token_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    let tls = TlsIdentity::load_or_create(&dir.join("tls")).context("loading the TLS identity")?;
    if tls.created {
        info!(fingerprint = %tls.fingerprint, "TLS certificate created");
    }
    let master =
        Arc::new(MasterKey::load_or_create(&dir.join("master.key")).context("loading the master key")?);
    let db = MetaDb::open(&dir.join("meta.redb")).context("opening the metadata DB")?;
    let admin_hash = match db.meta(crate::provision::ADMIN_TOKEN_META)? {
        Some(h) if h.len() == 32 => {
            let mut a = [0u8; 32];
            a.copy_from_slice(&h);
            a
        }
        _ => {
            let token = new_admin_token();
            let path = admin_token_path(dir);
            write_secret_atomic(&path, format!("{token}\n").as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            let h = token_hash(&token);
            db.set_meta(crate::provision::ADMIN_TOKEN_META, &h)?;
            info!(path = %path.display(), "admin credential created (shown only in that file)");
            h
        }
    };
    let metrics = Arc::new(Metrics::default());
    let mut local = LocalProvider::new(dir, config.preallocate).context("starting the local provider")?;
    if let Some(r) = &config.recovery {
        let mut qemu = r.qemu.clone();
        // Guest forwards (a drill's way to the object store) run `tern-gateway relay`.
        qemu.relay = std::env::current_exe().ok();
        local = local.with_qemu(qemu);
    }
    let provider: Arc<dyn crate::provider::CloudProvider> = Arc::new(local);
    let store = BlockStore::new(
        db.clone(),
        provider.clone(),
        config.io.clone(),
        LandedBatching {
            interval: Duration::from_millis(config.landed_batch_ms),
            max: config.landed_batch_max,
        },
        metrics.clone(),
    );
    let removed = store
        .remove_orphan_snapshots()
        .await
        .context("removing orphan snapshots")?;
    if removed > 0 {
        info!(removed, "orphan snapshots removed");
    }
    let mut s3 = S3ServiceBuilder::new(DataPlane::new(store.clone(), metrics.clone()));
    s3.set_auth(KeyAuth::new(db.clone(), master.clone()));
    s3.set_access(HostAccess::new(db.clone()));
    let s3 = s3.build();
    let objects = match config.object_store.clone() {
        Some(c) => {
            let o =
                crate::objects::ObjectStores::new(c, db.clone()).context("setting up the object store")?;
            tokio::spawn(o.clone().run());
            Some(o)
        }
        None => None,
    };
    let recoveries = match config.recovery.clone() {
        Some(c) => {
            let r = crate::recovery::Recoveries::new(db.clone(), provider.clone(), c, metrics.clone());
            let resumed = r.resume().context("resuming recoveries")?;
            if resumed > 0 {
                info!(resumed, "recoveries resumed");
            }
            Some(r)
        }
        None => None,
    };
    let control = router(ControlState {
        store,
        master,
        metrics,
        admin_token_hash: admin_hash,
        objects,
        recoveries,
    });

    // The data plane speaks HTTP/1.1 only: extent bodies are large and travel on parallel
    // connections (the agent's client offers only HTTP/1.1), without HTTP/2's per-stream flow
    // control. The control plane also offers HTTP/2.
    let data_acceptor = TlsAcceptor::from(tls.server_config(&[b"http/1.1"])?);
    let control_acceptor = TlsAcceptor::from(tls.server_config(&[b"h2", b"http/1.1"])?);
    let data_l = TcpListener::bind(config.data_listen)
        .await
        .with_context(|| format!("binding {}", config.data_listen))?;
    let control_l = TcpListener::bind(config.control_listen)
        .await
        .with_context(|| format!("binding {}", config.control_listen))?;
    let endpoint = Endpoint {
        data: data_l.local_addr()?,
        control: control_l.local_addr()?,
        fingerprint: tls.fingerprint.clone(),
    };
    write_atomic(&endpoint_path(dir), &serde_json::to_vec_pretty(&endpoint)?)?;
    info!(data = %endpoint.data, control = %endpoint.control, fingerprint = %endpoint.fingerprint, engine = ?tern_core::io::engine_in_use(), version = env!("CARGO_PKG_VERSION"), "tern-gateway serving");
    println!(
        "tern-gateway {} serving S3 on https://{} and control on https://{}\ncertificate fingerprint {}",
        env!("CARGO_PKG_VERSION"),
        endpoint.data,
        endpoint.control,
        endpoint.fingerprint
    );
    let data = tokio::spawn(serve_tls(data_l, data_acceptor, s3));
    let ctl = tokio::spawn(serve_tls(
        control_l,
        control_acceptor,
        TowerToHyperService::new(control),
    ));
    shutdown.await;
    info!("shutting down");
    data.abort();
    ctl.abort();
    Ok(())
}

/// Read buffer under each connection's TLS layer. rustls asks the socket for 4 KiB at a time;
/// reading through this buffer turns a 4 GiB upload's ~270 000 `recvfrom` calls into ~17 000
/// (measured with `perf stat` during `scripts/bench-ingest`'s full sync).
const READ_BUFFER: usize = 256 << 10;

async fn serve_tls<S, B>(listener: TcpListener, acceptor: TlsAcceptor, service: S)
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let tcp = tokio::io::BufReader::with_capacity(READ_BUFFER, tcp);
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => return debug!(%peer, "TLS handshake timed out"),
            };
            let builder = ConnBuilder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
