//! `tern-recovery-helper`: runs inside the recovery helper VM (and on any Linux host).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use tern_core::object::s3::{S3Config, Secret, Trust};
use tern_core::object::{Repo, StoreKey};
use tern_core::tls::parse_fingerprint;
use tern_core::{DiskId, HostId, PointId};
use tern_recovery_helper::restore::{RestoreOptions, restore_disk};

mod run_job;

#[derive(Parser, Debug)]
#[command(name = "tern-recovery-helper", version, about = "Tern recovery helper")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a recovery-point manifest file and print what it describes.
    InspectManifest {
        /// The manifest file.
        path: PathBuf,
    },
    /// Restores a recovery point's disks from object storage to block devices or files.
    Restore(Box<RestoreArgs>),
    /// Repairs a guest's disks so it boots on KVM: virtio drivers in the initramfs, stable
    /// device names, BIOS boot next to UEFI, DHCP, hypervisor tools off. Prints a JSON report.
    ///
    /// It mounts the guest's file systems and runs the guest's tools: run it only on a
    /// disposable helper host (one with /etc/tern/disposable-helper, or pass --disposable-host).
    Repair(RepairArgs),
    /// Runs the recovery helper VM's job (docs/boot-in-cloud.md): finds it (kernel command
    /// line, config drive, metadata service), restores and/or repairs the disks, prints one
    /// TERN-HELPER-RESULT line, then reboots or powers off. Refuses outside a helper VM.
    Job(run_job::JobArgs),
}

#[derive(Args, Debug)]
struct RepairArgs {
    /// The guest's disks (block devices or raw image files), in the guest's disk order.
    #[arg(required = true)]
    disks: Vec<PathBuf>,
    /// Declare this host disposable (instead of the marker file /etc/tern/disposable-helper).
    #[arg(long)]
    disposable_host: bool,
    /// Keep static IP addresses instead of switching to DHCP.
    #[arg(long)]
    keep_static_ip: bool,
    /// NAME=MAC: with --keep-static-ip, give the NIC with this MAC address the old name NAME
    /// (udev rule); repeat per NIC.
    #[arg(long = "pin-nic", value_name = "NAME=MAC", requires = "keep_static_ip")]
    pin_nic: Vec<String>,
    /// The root file system's device, when the disks hold several.
    #[arg(long)]
    root: Option<PathBuf>,
    /// The helper's GRUB i386-pc modules (used when the guest has none of its own).
    #[arg(long, default_value = "/usr/lib/grub/i386-pc")]
    grub_pc_dir: PathBuf,
    /// Also write the JSON report to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct RestoreArgs {
    /// The store: s3://BUCKET[/PREFIX].
    #[arg(long)]
    source: String,
    /// The host.
    #[arg(long)]
    host: HostId,
    /// The point, or `latest`.
    #[arg(long, default_value = "latest")]
    point: String,
    /// DISK=PATH: restore disk DISK to PATH (a block device, or a file created or resized);
    /// repeat for each disk.
    #[arg(long = "disk", value_name = "DISK=PATH", required = true)]
    disks: Vec<String>,
    /// The S3 endpoint, https://HOST[:PORT].
    #[arg(long, env = "TERN_S3_ENDPOINT")]
    s3_endpoint: String,
    /// The S3 region.
    #[arg(long, env = "TERN_S3_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// Trust the CA certificates in this PEM file (default: the system's).
    #[arg(long, env = "TERN_S3_CA_FILE", conflicts_with = "s3_fingerprint")]
    s3_ca_file: Option<PathBuf>,
    /// Trust exactly the certificate with this fingerprint (sha256:...).
    #[arg(long)]
    s3_fingerprint: Option<String>,
    /// Allow an http:// endpoint (a local test server only).
    #[arg(long)]
    s3_allow_http: bool,
    /// Access key id.
    #[arg(long, env = "TERN_ACCESS_KEY_ID")]
    access_key_id: String,
    /// The encryption key file the points were made with.
    #[arg(long, env = "TERN_ENCRYPTION_KEY_FILE")]
    encryption_key_file: Option<PathBuf>,
    /// The AEAD the points were made with.
    #[arg(long, default_value = "aes-256-gcm", value_parser = ["aes-256-gcm", "chacha20-poly1305"])]
    cipher: String,
    /// Chunks fetched in parallel (and held in memory).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=256))]
    window: u32,
    /// The resume journal (default: PATH.tern-restore for files,
    /// /var/lib/tern-recovery-helper/HOST.POINT.DISK.tern-restore for block devices).
    #[arg(long)]
    journal: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if matches!(cli.command, Command::Job(_)) {
        // Every console line of a job is `TERN-HELPER <time> ...`.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(run_job::ConsoleLog::default)
            .with_ansi(false)
            .with_target(false)
            .without_time()
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .init();
    }
    let result = match cli.command {
        Command::InspectManifest { path } => std::fs::read(&path)
            .with_context(|| format!("reading {}", path.display()))
            .and_then(|b| {
                tern_core::Manifest::decode(&b).with_context(|| format!("decoding {}", path.display()))
            })
            .map(|m| print!("{}", tern_recovery_helper::describe(&m))),
        Command::Restore(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("failed to start the async runtime")
            .and_then(|rt| rt.block_on(restore(*args))),
        Command::Repair(args) => repair(args),
        Command::Job(args) => run_job::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "tern-recovery-helper: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn repair(args: RepairArgs) -> anyhow::Result<()> {
    use tern_recovery_helper::repair::{self, NetworkMode, RepairOptions};
    let network = if args.keep_static_ip {
        let pins = args
            .pin_nic
            .iter()
            .map(|p| tern_recovery_helper::job::parse_pin_nic(p).map_err(|e| anyhow!("--pin-nic: {e}")))
            .collect::<anyhow::Result<_>>()?;
        NetworkMode::KeepStatic { pins }
    } else {
        NetworkMode::Dhcp
    };
    let mut opts = RepairOptions::new(args.disks);
    opts.disposable_host = args.disposable_host;
    opts.network = network;
    opts.root = args.root;
    opts.grub_pc_dir = args.grub_pc_dir;
    let report = repair::repair(&opts)?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.report {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{json}");
    Ok(())
}

async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let (bucket, prefix) = tern_core::object::s3::parse_url(&args.source)?;
    let secret = std::env::var("TERN_SECRET_ACCESS_KEY")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| anyhow!("set TERN_SECRET_ACCESS_KEY to the store's secret access key"))?;
    let trust = match (&args.s3_ca_file, &args.s3_fingerprint) {
        (Some(ca), _) => Trust::CaFile(ca.clone()),
        (None, Some(fp)) => {
            Trust::Pinned(parse_fingerprint(fp).map_err(|e| anyhow!("--s3-fingerprint: {e}"))?)
        }
        (None, None) => Trust::System,
    };
    let store = tern_core::object::s3::connect(&S3Config {
        endpoint: args.s3_endpoint.clone(),
        bucket,
        region: args.s3_region.clone(),
        access_key_id: args.access_key_id.clone(),
        secret_access_key: Secret::new(secret.trim().to_owned()),
        trust,
        allow_http: args.s3_allow_http,
        max_retries: 10,
    })?;
    let repo = Repo::new(store, &prefix);
    let key = match &args.encryption_key_file {
        Some(path) => Some(Arc::new(StoreKey::load(path, args.cipher.parse()?)?)),
        None => None,
    };
    let point = if args.point == "latest" {
        repo.list_points(&args.host)
            .await?
            .pop()
            .map(|p| p.id)
            .ok_or_else(|| anyhow!("host {} has no recovery point in {}", args.host, args.source))?
    } else {
        PointId::new(args.point.as_str())?
    };
    let manifest = repo
        .get_manifest(&args.host, &point)
        .await
        .with_context(|| format!("failed to read point {point} of host {}", args.host))?;
    let mut targets = Vec::new();
    for spec in &args.disks {
        let (id, path) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--disk {spec:?} is not DISK=PATH"))?;
        let id = DiskId::new(id)?;
        if manifest.disk(&id).is_none() {
            let have: Vec<_> = manifest.disks.iter().map(|d| d.disk_id.to_string()).collect();
            return Err(anyhow!(
                "point {point} has no disk {id} (it has {})",
                have.join(", ")
            ));
        }
        targets.push((id, PathBuf::from(path)));
    }
    if targets.len() > 1 && args.journal.is_some() {
        return Err(anyhow!(
            "--journal names one journal: restore one disk per run to use it"
        ));
    }
    let opts = RestoreOptions {
        window: args.window as usize,
        engine: Default::default(),
        journal: args.journal.clone(),
        progress: !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        counter: None,
    };
    let mut summaries = Vec::new();
    for (id, path) in targets {
        let s = restore_disk(&repo, key.clone(), &manifest, &id, &path, &opts)
            .await
            .with_context(|| format!("failed to restore disk {id} to {}", path.display()))?;
        summaries.push(s);
    }
    println!("{}", serde_json::to_string(&summaries)?);
    Ok(())
}
