//! `tern-agent`: syncs a host's disks to a Tern gateway (or a local directory).
//!
//! Exit codes: 0 success, 1 the sync (or listing) failed, 2 usage error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tern_agent::disk::{SourceOptions, SourceSpec};
use tern_agent::engine::{DiskSpec, SyncError, SyncOptions, sync_host};
use tern_agent::nbd::NbdOptions;
use tern_agent::progress;
use tern_agent::rbd::RbdOptions;
use tern_agent::schedule::{RunOutcome, run_every};
use tern_agent::state::KnownGateways;
use tern_agent::target::dir::DirTarget;
use tern_agent::target::gateway::{
    GatewayConfig, GatewayError, GatewayTarget, Secret, check_endpoint, probe_fingerprint,
};
use tern_agent::target::object::ObjectTarget;
use tern_agent::target::{AnyTarget, Target};
use tern_agent::tls::{Fingerprint, parse_fingerprint};
use tern_agent::units::{format_size, parse_size};
use tern_core::geometry::{BlockLayout, check_chunk_size};
use tern_core::{ChunkRef, DiskId, HostId};
use tracing::{error, info, warn};

/// Environment variable holding the secret access key (alternative: `--secret-file`).
const SECRET_ENV: &str = "TERN_SECRET_ACCESS_KEY";

#[derive(Debug, Parser)]
#[command(
    name = "tern-agent",
    version,
    about = "Syncs a host's disks to a Tern Cloud Sync Gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Syncs every disk once and commits one recovery point.
    Sync(SyncArgs),
    /// Syncs on a schedule (a sync never overlaps the previous one; network failures are
    /// retried with backoff). Stops on SIGINT or SIGTERM.
    Run(RunArgs),
    /// Lists the host's recovery points.
    Points(PointsArgs),
    /// Writes a new random encryption key file for object mode (mode 0600; never overwrites).
    Keygen {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
struct TargetArgs {
    /// The protected host's id (the gateway bucket): 3-63 of a-z, 0-9, '-'.
    #[arg(long)]
    host: HostId,
    /// The gateway's data plane (https://HOST:PORT) or a local directory (dir:/PATH).
    #[arg(long, value_parser = parse_target)]
    target: TargetSpec,
    /// The agent's state directory.
    #[arg(long, env = "TERN_STATE_DIR", default_value = "/var/lib/tern-agent")]
    state_dir: PathBuf,
    /// The gateway certificate's fingerprint, sha256:<64 hex digits> (printed by the gateway).
    #[arg(long, env = "TERN_FINGERPRINT", value_parser = parse_fp, conflicts_with = "trust_on_first_use")]
    fingerprint: Option<Fingerprint>,
    /// Trust the certificate the gateway presents the first time and require it afterwards
    /// (recorded in STATE_DIR/known_gateways).
    #[arg(long)]
    trust_on_first_use: bool,
    /// The access key id the gateway admin issued for this host.
    #[arg(long, env = "TERN_ACCESS_KEY_ID")]
    access_key_id: Option<String>,
    /// A file holding the secret access key (default: the TERN_SECRET_ACCESS_KEY variable).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    #[command(flatten)]
    object: ObjectArgs,
}

/// Object mode (`--target s3://BUCKET[/PREFIX]`).
#[derive(Debug, Args)]
struct ObjectArgs {
    /// The S3 endpoint, https://HOST[:PORT].
    #[arg(long, env = "TERN_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// The S3 region.
    #[arg(long, env = "TERN_S3_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// Trust the CA certificates in this PEM file for the S3 endpoint (default: the system's).
    #[arg(long, env = "TERN_S3_CA_FILE", conflicts_with = "s3_fingerprint")]
    s3_ca_file: Option<PathBuf>,
    /// Trust exactly the S3 endpoint's certificate with this fingerprint (sha256:...).
    #[arg(long, value_parser = parse_fp)]
    s3_fingerprint: Option<Fingerprint>,
    /// Allow an http:// endpoint (a local test server only: data travels in the clear).
    #[arg(long)]
    s3_allow_http: bool,
    /// Encrypt chunks with the key in this file (made by `tern-agent keygen`); it never leaves
    /// this side. Restores need the same file.
    #[arg(long, env = "TERN_ENCRYPTION_KEY_FILE")]
    encryption_key_file: Option<PathBuf>,
    /// The AEAD for encrypted chunks.
    #[arg(long, default_value = "aes-256-gcm", value_parser = ["aes-256-gcm", "chacha20-poly1305"])]
    cipher: String,
    /// zstd level for chunks that compress (0: never compress).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(0..=19))]
    compress_level: i32,
    /// A lease not renewed for this long counts as abandoned by GC (must match the GC's).
    #[arg(long, default_value = "48h", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
}

#[derive(Debug, Args)]
struct SyncArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// A disk to sync, ID=SOURCE; repeat for each disk. SOURCE is a block device or raw image
    /// file, an NBD export (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, and
    /// nbds:// / nbds+unix:// for TLS), a Ceph RBD image (rbd:POOL/IMAGE: a snapshot per sync,
    /// incrementals from snapshot diffs), or a disk of a running QEMU
    /// (qmp:/PATH/TO/QMP.SOCK?node=NODE: a point-in-time export with dirty bitmaps; give the agent
    /// its own QMP socket).
    #[arg(long = "disk", value_name = "ID=SOURCE", value_parser = parse_disk, required = true)]
    disks: Vec<DiskSpec>,
    /// For an NBD disk, ID=NAME: the QEMU dirty bitmap that lists what changed since the latest
    /// point. Used only when that point recorded NAME as its change token; otherwise the disk is
    /// read whole (allocated extents only).
    #[arg(long = "dirty-bitmap", value_name = "ID=NAME", value_parser = parse_named)]
    dirty_bitmaps: Vec<(DiskId, String)>,
    /// For an NBD disk, ID=NAME: the change token the new point records, i.e. the bitmap that
    /// tracks writes from this sync's point in time on (created by the caller before the sync
    /// reads anything; default: the --dirty-bitmap name, for a bitmap cleared after each sync).
    /// Alone (no --dirty-bitmap), for the first sync: the disk is read whole.
    #[arg(long = "next-bitmap", value_name = "ID=NAME", value_parser = parse_named)]
    next_bitmaps: Vec<(DiskId, String)>,
    /// CA certificate(s) (PEM) for nbds:// disks.
    #[arg(long)]
    nbd_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for NBD servers that verify clients (with --nbd-client-key).
    #[arg(long, requires = "nbd_client_key")]
    nbd_client_cert: Option<PathBuf>,
    /// Client key (PEM), with --nbd-client-cert.
    #[arg(long, requires = "nbd_client_cert")]
    nbd_client_key: Option<PathBuf>,
    /// Ceph configuration file for rbd: disks (default: the rbd CLI's, CEPH_CONF or
    /// /etc/ceph/ceph.conf).
    #[arg(long)]
    ceph_conf: Option<PathBuf>,
    /// Ceph keyring for rbd: disks.
    #[arg(long)]
    ceph_keyring: Option<PathBuf>,
    /// Ceph client id for rbd: disks (without "client.").
    #[arg(long)]
    ceph_id: Option<String>,
    /// Most connections to read one NBD disk through, when its server allows several
    /// (NBD_FLAG_CAN_MULTI_CONN, e.g. `qemu-nbd -e N` or QEMU's read-only exports): more
    /// reads in flight for an export read over a network link.
    #[arg(long, default_value_t = tern_agent::nbd::DEFAULT_CONNECTIONS, value_parser = clap::builder::RangedI64ValueParser::<usize>::new().range(1..=64))]
    nbd_connections: usize,
    /// Longest wait for one NBD reply before the sync fails.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    nbd_timeout: Duration,
    /// Chunk size: a power of two from 64K to 16M.
    #[arg(long, default_value = "4M", value_parser = parse_chunk_size)]
    chunk_size: u32,
    /// Compare block size: a power of two from 4K to the chunk size.
    #[arg(long, default_value = "64K", value_parser = parse_block_size)]
    block_size: u32,
    /// Chunks' worth of data in flight per disk (read, hashed or being sent): bounds memory to
    /// about WINDOW chunks per disk (a host's disks are synced at once). A chunk counts for the
    /// bytes it reads, so an incremental keeps more small reads in flight.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    window: u32,
    /// Bandwidth limit in bytes per second (K, M, G suffixes), at least 1K.
    #[arg(long, value_parser = parse_bwlimit)]
    bwlimit: Option<u64>,
    /// Don't show progress bars (they are hidden anyway when stderr is not a terminal).
    #[arg(long)]
    no_progress: bool,
    /// Also write the JSON summary to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    sync: SyncArgs,
    /// Time between the starts of two syncs (e.g. 5m, 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    every: Duration,
    /// The longest wait between retries after network failures.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    max_backoff: Duration,
}

#[derive(Debug, Args)]
struct PointsArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone)]
enum TargetSpec {
    Gateway(String),
    Dir(PathBuf),
    Object { bucket: String, prefix: String },
}

fn parse_target(s: &str) -> Result<TargetSpec, String> {
    if let Some(path) = s.strip_prefix("dir:") {
        if path.is_empty() {
            return Err("dir: needs a path (dir:/backups)".into());
        }
        return Ok(TargetSpec::Dir(PathBuf::from(path)));
    }
    if s.starts_with("s3://") {
        let (bucket, prefix) = tern_core::object::s3::parse_url(s).map_err(|e| e.to_string())?;
        return Ok(TargetSpec::Object { bucket, prefix });
    }
    check_endpoint(s)
        .map(TargetSpec::Gateway)
        .map_err(|_| format!("{s:?} is neither https://HOST:PORT, s3://BUCKET[/PREFIX] nor dir:/PATH"))
}

fn parse_fp(s: &str) -> Result<Fingerprint, String> {
    parse_fingerprint(s).map_err(|e| e.to_string())
}

fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let (id, source) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ID=SOURCE"))?;
    let id = DiskId::new(id).map_err(|e| e.to_string())?;
    if source.is_empty() {
        return Err(format!("disk {id} has no source"));
    }
    let source = SourceSpec::parse(source).map_err(|e| format!("disk {id}: {e}"))?;
    Ok(DiskSpec { id, source })
}

fn parse_named(s: &str) -> Result<(DiskId, String), String> {
    let (id, name) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ID=NAME"))?;
    let id = DiskId::new(id).map_err(|e| e.to_string())?;
    if name.is_empty()
        || name.len() > tern_agent::blockstate::MAX_CHANGE_TOKEN
        || name.chars().any(char::is_control)
    {
        return Err(format!(
            "disk {id}: {name:?} must be 1 to {} printable bytes",
            tern_agent::blockstate::MAX_CHANGE_TOKEN
        ));
    }
    Ok((id, name.to_owned()))
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    check_chunk_size(v).map_err(|e| e.to_string())
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    let v = parse_size(s).map_err(|e| e.to_string())?;
    match u32::try_from(v) {
        Ok(b) if b.is_power_of_two() && (4096..=16 << 20).contains(&b) => Ok(b),
        _ => Err(format!("block size {v} is not a power of two from 4K to 16M")),
    }
}

fn parse_bwlimit(s: &str) -> Result<u64, String> {
    match parse_size(s).map_err(|e| e.to_string())? {
        v if v >= 1024 => Ok(v),
        v => Err(format!("bandwidth limit {v} B/s is below 1K")),
    }
}

/// An invalid combination of options (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(msg.into()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return report(&anyhow!(e).context("failed to start the async runtime")),
    };
    match runtime.block_on(run_command(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(progress::LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Prints the error chain once and picks the exit code.
fn report(e: &anyhow::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {e:#}");
    if e.downcast_ref::<UsageError>().is_some() {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}

async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Sync(args) => {
            let opts = sync_options(&args)?;
            progress::enable(!args.no_progress);
            let target = Arc::new(open_target(&args.target, args.chunk_size).await?);
            let summary = sync_host(&target, &opts).await.context("sync failed")?;
            emit_sync_summary(&target, summary, args.summary_json.as_deref()).await
        }
        Command::Keygen { out } => {
            tern_core::object::StoreKey::generate(&out)
                .with_context(|| format!("failed to make a key file at {}", out.display()))?;
            let _ = writeln!(
                std::io::stderr(),
                "tern-agent: wrote a new encryption key to {}. Keep a copy somewhere safe: without it no encrypted point can be restored.",
                out.display()
            );
            Ok(())
        }
        Command::Run(args) => run_scheduled(args).await,
        Command::Points(args) => list_points(args).await,
    }
}

fn sync_options(args: &SyncArgs) -> anyhow::Result<SyncOptions> {
    BlockLayout::new(args.chunk_size, args.block_size).map_err(|e| usage(e.to_string()))?;
    for (i, d) in args.disks.iter().enumerate() {
        if args.disks[..i].iter().any(|x| x.id == d.id) {
            return Err(usage(format!("disk id {} is given twice", d.id)));
        }
    }
    let mut disks = args.disks.clone();
    for (flag, list) in [
        ("--dirty-bitmap", &args.dirty_bitmaps),
        ("--next-bitmap", &args.next_bitmaps),
    ] {
        for (i, (id, name)) in list.iter().enumerate() {
            if list[..i].iter().any(|(x, _)| x == id) {
                return Err(usage(format!("{flag} names disk {id} twice")));
            }
            let Some(disk) = disks.iter_mut().find(|d| &d.id == id) else {
                return Err(usage(format!("{flag} {id}={name}: there is no --disk {id}")));
            };
            let SourceSpec::Nbd(nbd) = &mut disk.source else {
                return Err(usage(format!(
                    "{flag} {id}={name}: disk {id} is not an NBD export"
                )));
            };
            if flag == "--dirty-bitmap" {
                nbd.bitmap = Some(name.clone());
            } else {
                nbd.next_bitmap = Some(name.clone());
            }
        }
    }
    let sources = SourceOptions {
        nbd: NbdOptions {
            ca_file: args.nbd_ca_file.clone(),
            client_cert: args.nbd_client_cert.clone().zip(args.nbd_client_key.clone()),
            request_timeout: Some(args.nbd_timeout),
            connections: args.nbd_connections,
        },
        rbd: RbdOptions {
            conf: args.ceph_conf.clone(),
            keyring: args.ceph_keyring.clone(),
            id: args.ceph_id.clone(),
        },
    };
    Ok(SyncOptions {
        host: args.target.host.clone(),
        disks,
        state_dir: args.target.state_dir.clone(),
        chunk_size: args.chunk_size,
        block_size: args.block_size,
        window: args.window as usize,
        bwlimit: args.bwlimit,
        sources,
    })
}

fn emit_summary(summary: &impl Serialize, file: Option<&Path>) -> anyhow::Result<()> {
    let json = serde_json::to_string(summary).context("failed to encode the summary")?;
    println!("{json}");
    if let Some(path) = file {
        tern_agent::state::write_atomic(path, format!("{json}\n").as_bytes())
            .with_context(|| format!("failed to write the summary to {}", path.display()))?;
    }
    Ok(())
}

fn read_secret(args: &TargetArgs) -> anyhow::Result<Secret> {
    if let Some(path) = &args.secret_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                warn!(path = %path.display(), "the secret file is readable by other users; chmod 600 it");
            }
        }
        let secret = text.trim();
        if secret.is_empty() {
            return Err(usage(format!("{} is empty", path.display())));
        }
        return Ok(Secret::new(secret.to_owned()));
    }
    match std::env::var(SECRET_ENV) {
        Ok(s) if !s.trim().is_empty() => Ok(Secret::new(s.trim().to_owned())),
        _ => Err(usage(format!(
            "a gateway target needs the secret access key: set {SECRET_ENV} or give --secret-file"
        ))),
    }
}

/// The pinned fingerprint of a trust-on-first-use gateway: the recorded one, or the one it
/// presents now (recorded and shown to the operator).
async fn trust_on_first_use(state_dir: &Path, endpoint: &str) -> anyhow::Result<Fingerprint> {
    let mut known = KnownGateways::load(state_dir)?;
    if let Some(fp) = known.get(endpoint) {
        return parse_fingerprint(fp).map_err(Into::into);
    }
    let fp = probe_fingerprint(endpoint).await?;
    known.add(endpoint, &fp.to_string())?;
    warn!(endpoint, fingerprint = %fp, "trusting the gateway's certificate on first use");
    let _ = writeln!(
        std::io::stderr(),
        "tern-agent: trusting the gateway at {endpoint} on first use.\n  Its certificate fingerprint is {fp}\n  \
         Compare it with the one the gateway printed at start (or its console); it is now required for this gateway."
    );
    Ok(fp)
}

/// Prints the summary; in object mode with what the store actually received.
async fn emit_sync_summary(
    target: &AnyTarget,
    summary: tern_agent::engine::SyncSummary,
    file: Option<&Path>,
) -> anyhow::Result<()> {
    match target {
        AnyTarget::Object(t) => {
            #[derive(Serialize)]
            struct WithStore {
                #[serde(flatten)]
                summary: tern_agent::engine::SyncSummary,
                store: tern_core::object::session::SessionStats,
            }
            let store = t.stats().await;
            emit_summary(&WithStore { summary, store }, file)
        }
        _ => emit_summary(&summary, file),
    }
}

fn open_object_target(
    args: &TargetArgs,
    bucket: &str,
    prefix: &str,
    chunk_size: u32,
) -> anyhow::Result<AnyTarget> {
    use tern_core::object::s3::{S3Config, Trust};
    let o = &args.object;
    let endpoint = o
        .s3_endpoint
        .clone()
        .ok_or_else(|| usage("an s3:// target needs --s3-endpoint (or TERN_S3_ENDPOINT)"))?;
    let access_key_id = args
        .access_key_id
        .clone()
        .ok_or_else(|| usage("an s3:// target needs --access-key-id (or TERN_ACCESS_KEY_ID)"))?;
    let secret = read_secret(args)?;
    let trust = match (&o.s3_ca_file, o.s3_fingerprint) {
        (Some(ca), _) => Trust::CaFile(ca.clone()),
        (None, Some(fp)) => Trust::Pinned(fp),
        (None, None) => Trust::System,
    };
    let config = S3Config {
        endpoint: endpoint.clone(),
        bucket: bucket.to_owned(),
        region: o.s3_region.clone(),
        access_key_id,
        secret_access_key: secret,
        trust,
        allow_http: o.s3_allow_http,
        max_retries: 10,
    };
    let store = tern_core::object::s3::connect(&config).map_err(|e| usage(tern_agent::error_chain(&e)))?;
    let key = match &o.encryption_key_file {
        Some(path) => {
            let cipher = o
                .cipher
                .parse()
                .map_err(|e: tern_core::object::crypto::KeyError| usage(e.to_string()))?;
            Some(Arc::new(
                tern_core::object::StoreKey::load(path, cipher)
                    .map_err(|e| usage(tern_agent::error_chain(&e)))?,
            ))
        }
        None => None,
    };
    let repo = tern_core::object::Repo::new(store, prefix);
    let url = if prefix.is_empty() {
        format!("s3://{bucket} ({endpoint})")
    } else {
        format!("s3://{bucket}/{prefix} ({endpoint})")
    };
    let journal = args.state_dir.join(args.host.as_str()).join("object-journal");
    Ok(AnyTarget::Object(ObjectTarget::new(
        repo,
        url,
        args.host.clone(),
        key,
        chunk_size,
        (o.compress_level > 0).then_some(o.compress_level),
        o.lease_ttl,
        journal,
    )))
}

async fn open_target(args: &TargetArgs, chunk_size: u32) -> anyhow::Result<AnyTarget> {
    match &args.target {
        TargetSpec::Object { bucket, prefix } => open_object_target(args, bucket, prefix, chunk_size),
        TargetSpec::Dir(path) => Ok(AnyTarget::Dir(DirTarget::new(path, args.host.clone()))),
        TargetSpec::Gateway(endpoint) => {
            let access_key_id = args
                .access_key_id
                .clone()
                .ok_or_else(|| usage("a gateway target needs --access-key-id (or TERN_ACCESS_KEY_ID)"))?;
            let secret_access_key = read_secret(args)?;
            let fingerprint = match (args.fingerprint, args.trust_on_first_use) {
                (Some(fp), _) => fp,
                (None, true) => trust_on_first_use(&args.state_dir, endpoint).await?,
                (None, false) => {
                    return Err(usage(
                        "give the gateway's certificate fingerprint with --fingerprint sha256:... (the gateway prints it) or use --trust-on-first-use",
                    ));
                }
            };
            let config = GatewayConfig {
                endpoint: endpoint.clone(),
                host: args.host.clone(),
                access_key_id,
                secret_access_key,
                fingerprint,
            };
            let target = GatewayTarget::connect(config).await;
            if let Err(GatewayError::Mismatch { .. }) = &target
                && args.trust_on_first_use
            {
                let path = args.state_dir.join("known_gateways");
                return target.map(AnyTarget::Gateway).with_context(|| {
                    format!(
                        "if the gateway's certificate was replaced on purpose, remove its line from {}",
                        path.display()
                    )
                });
            }
            Ok(AnyTarget::Gateway(target?))
        }
    }
}

fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<SyncError>().is_some_and(SyncError::is_transient)
            || matches!(
                c.downcast_ref::<GatewayError>(),
                Some(GatewayError::Connect { .. })
            )
    })
}

async fn run_scheduled(args: RunArgs) -> anyhow::Result<()> {
    if args.every.is_zero() {
        return Err(usage("--every must be longer than zero"));
    }
    let opts = Arc::new(sync_options(&args.sync)?);
    progress::enable(!args.sync.no_progress);
    let args = Arc::new(args);
    let target: Arc<tokio::sync::Mutex<Option<Arc<AnyTarget>>>> = Arc::default();
    info!(host = %opts.host, every = %humantime::format_duration(args.every), "scheduled syncs started");
    let run = || {
        let (args, opts, target) = (args.clone(), opts.clone(), target.clone());
        async move {
            let result = async {
                let t = {
                    let mut slot = target.lock().await;
                    match slot.as_ref() {
                        Some(t) => t.clone(),
                        None => {
                            let t = Arc::new(open_target(&args.sync.target, args.sync.chunk_size).await?);
                            *slot = Some(t.clone());
                            t
                        }
                    }
                };
                let summary = sync_host(&t, &opts).await.context("sync failed")?;
                emit_summary(&summary, args.sync.summary_json.as_deref())
            }
            .await;
            match result {
                Ok(()) => RunOutcome::Ok,
                Err(e) => {
                    error!(error = format!("{e:#}"), "sync failed");
                    if is_transient(&e) {
                        RunOutcome::Transient
                    } else {
                        RunOutcome::Failed
                    }
                }
            }
        }
    };
    run_every(args.every, args.max_backoff, run, shutdown_signal()).await;
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

#[derive(Debug, Serialize)]
struct PointDisk {
    id: String,
    size: u64,
    chunk_size: u32,
    data_chunks: u64,
    zero_chunks: u64,
}

#[derive(Debug, Serialize)]
struct PointRow {
    id: String,
    created_unix_ms: u64,
    created: String,
    manifest_len: u64,
    disks: Vec<PointDisk>,
}

async fn list_points(args: PointsArgs) -> anyhow::Result<()> {
    let target = open_target(&args.target, tern_core::geometry::DEFAULT_CHUNK_SIZE).await?;
    let entries = target.list_points().await?;
    let mut rows = Vec::new();
    for e in entries {
        let m = target.get_point(&e.id).await?;
        let created = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + Duration::from_millis(m.created_unix_ms),
        )
        .to_string();
        rows.push(PointRow {
            id: e.id.to_string(),
            created_unix_ms: m.created_unix_ms,
            created,
            manifest_len: e.manifest_len,
            disks: m
                .disks
                .iter()
                .map(|d| {
                    let zero = d.chunks.iter().filter(|c| matches!(c, ChunkRef::Zero)).count() as u64;
                    PointDisk {
                        id: d.disk_id.to_string(),
                        size: d.geometry.size(),
                        chunk_size: d.geometry.chunk_size(),
                        data_chunks: d.chunks.len() as u64 - zero,
                        zero_chunks: zero,
                    }
                })
                .collect(),
        });
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("failed to encode the points")?
        );
        return Ok(());
    }
    if rows.is_empty() {
        println!("no recovery points for host {}", args.target.host);
        return Ok(());
    }
    println!("{:<28} {:<21} DISKS", "POINT", "CREATED (UTC)");
    for r in rows {
        let disks: Vec<String> = r
            .disks
            .iter()
            .map(|d| {
                let data = d.data_chunks * u64::from(d.chunk_size);
                format!(
                    "{} {} ({} data)",
                    d.id,
                    format_size(d.size),
                    format_size(data.min(d.size))
                )
            })
            .collect();
        println!("{:<28} {:<21} {}", r.id, r.created, disks.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_a_sync_command() {
        let cli = Cli::try_parse_from([
            "tern-agent",
            "sync",
            "--host",
            "web-01",
            "--disk",
            "sda=/dev/sda",
            "--disk",
            "sdb=/tmp/b.img",
            "--target",
            "dir:/tmp/t",
            "--state-dir",
            "/tmp/s",
            "--chunk-size",
            "1M",
            "--block-size",
            "16K",
            "--bwlimit",
            "100M",
        ])
        .unwrap();
        let Command::Sync(a) = cli.command else {
            panic!("not sync")
        };
        assert_eq!(a.disks.len(), 2);
        assert_eq!(a.chunk_size, 1 << 20);
        assert_eq!(a.block_size, 16 << 10);
        assert_eq!(a.bwlimit, Some(100 << 20));
        assert_eq!(a.window, 16);
        assert!(matches!(a.target.target, TargetSpec::Dir(_)));
    }

    #[test]
    fn refuses_bad_values() {
        let base = ["tern-agent", "sync", "--host", "web-01", "--target", "dir:/t"];
        for extra in [
            &["--disk", "sda"][..],
            &["--disk", "a/b=/x"],
            &["--disk", "sda=/x", "--chunk-size", "3M"],
            &["--disk", "sda=/x", "--block-size", "1K"],
            &["--disk", "sda=/x", "--bwlimit", "10"],
            &["--disk", "sda=/x", "--fingerprint", "md5:00"],
        ] {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            assert!(Cli::try_parse_from(&args).is_err(), "{extra:?}");
        }
        assert!(
            Cli::try_parse_from([
                "tern-agent",
                "points",
                "--host",
                "web-01",
                "--target",
                "http://x:1"
            ])
            .is_err()
        );
        assert!(
            Cli::try_parse_from([
                "tern-agent",
                "points",
                "--host",
                "web-01",
                "--target",
                "https://x:1"
            ])
            .is_ok()
        );
    }
}
