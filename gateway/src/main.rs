//! `tern-gateway`: the Cloud Sync Gateway daemon and its admin commands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tern_core::HostId;
use tern_gateway::config::{Config, ConfigFile};
use tern_gateway::plan::{FleetHost, plan};
use tern_gateway::provision::{KeyImport, KeysDoc, Provisioner};
use tern_gateway::server::{Endpoint, admin_token_path, endpoint_path, run};

#[derive(Parser, Debug)]
#[command(name = "tern-gateway", version, about = "Tern Cloud Sync Gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file (TOML, see docs/gateway.md).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides the file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Data-plane (S3) listen address (overrides the file).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Control-plane listen address (overrides the file).
        #[arg(long)]
        control_listen: Option<SocketAddr>,
        /// I/O engine: auto, io_uring or portable (overrides the file).
        #[arg(long)]
        engine: Option<tern_core::io::EngineChoice>,
    },
    /// Manage data-plane access keys of a running gateway.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
        /// The gateway's data directory (for its endpoint, certificate and admin token).
        #[arg(long, global = true, default_value = "/var/lib/tern-gateway")]
        data_dir: PathBuf,
    },
    /// List protected hosts, their disks and recovery points.
    Hosts {
        /// The gateway's data directory.
        #[arg(long, default_value = "/var/lib/tern-gateway")]
        data_dir: PathBuf,
    },
    /// Object mode: the points indexed from the bucket, and maintenance (a running gateway
    /// configured with [object_store] does the work).
    Object {
        #[command(subcommand)]
        command: ObjectCommand,
        /// The gateway's data directory.
        #[arg(long, global = true, default_value = "/var/lib/tern-gateway")]
        data_dir: PathBuf,
    },
    /// Provision a stopped gateway's data directory from a keys document (JSON: version, an
    /// optional admin_token, data-plane keys with their secrets and hosts; the appliance's first
    /// boot). Prints the imported key ids, never a secret.
    Provision {
        /// The keys document (`tern/keys.json` on the appliance's config drive).
        #[arg(long)]
        keys: PathBuf,
        /// The gateway's data directory.
        #[arg(long, default_value = "/var/lib/tern-gateway")]
        data_dir: PathBuf,
        /// Where to write the document's `gateway_toml`, if it has one (mode 0600).
        #[arg(long, default_value = "/etc/tern/gateway.toml")]
        config_out: PathBuf,
    },
    /// Boot-in-Cloud recoveries on a running gateway configured with [recovery].
    Recovery {
        #[command(subcommand)]
        command: RecoveryCommand,
        /// The gateway's data directory.
        #[arg(long, global = true, default_value = "/var/lib/tern-gateway")]
        data_dir: PathBuf,
    },
    /// Carries one connection between stdin/stdout and HOST:PORT (QEMU runs it for each
    /// connection to an instance's guest forward).
    #[command(hide = true)]
    Relay {
        /// Where to connect.
        target: String,
    },
    /// How many gateways a fleet needs and which disks go to which.
    Plan {
        /// A host and its disk count, e.g. `web01=2` (repeat).
        #[arg(long = "host", value_name = "NAME=DISKS", required = true)]
        hosts: Vec<String>,
        /// The cloud's maximum volumes attached to one instance.
        #[arg(long, default_value_t = 20)]
        max_volumes: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ObjectCommand {
    /// The points found in the bucket (JSON).
    Points,
    /// Scan the bucket now and update the index.
    Scan,
    /// Apply the retention policies now.
    Prune {
        /// Report only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Collect garbage now.
    Gc {
        /// Report only.
        #[arg(long)]
        dry_run: bool,
        /// Grace period override (e.g. 0s, 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
    },
}

#[derive(Subcommand, Debug)]
enum RecoveryCommand {
    /// Recover a host's point into an instance; prints the recovery id.
    Start {
        /// Host.
        #[arg(long)]
        host: String,
        /// Point id.
        #[arg(long, default_value = "latest")]
        point: String,
        /// `block` or `object`.
        #[arg(long)]
        mode: String,
        /// A drill: isolated network.
        #[arg(long)]
        drill: bool,
        /// The point's key file (object mode, encrypted points); sent, never stored.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Every recovery (JSON).
    List,
    /// One recovery (JSON).
    Show {
        /// Recovery id.
        id: String,
    },
    /// Remove a recovery's instances and volumes.
    Delete {
        /// Recovery id.
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Issue a key for one or more hosts; prints its id and secret once.
    Create {
        /// Host the key may sync (repeat).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
    /// Import a key with a given id and secret (read from stdin, one line) into a stopped
    /// gateway's data directory.
    Import {
        /// Access key id (3-128 of A-Z, a-z, 0-9).
        #[arg(long)]
        access_key_id: String,
        /// Host the key may sync (repeat).
        #[arg(long = "host", required = true)]
        hosts: Vec<HostId>,
    },
    /// List keys (no secrets).
    List,
    /// Revoke a key.
    Revoke {
        /// Access key id.
        id: String,
    },
}

fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,s3s=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

struct ControlClient {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl ControlClient {
    fn from_data_dir(dir: &Path) -> anyhow::Result<Self> {
        let ep_path = endpoint_path(dir);
        let ep: Endpoint = serde_json::from_slice(
            &std::fs::read(&ep_path)
                .with_context(|| format!("reading {} (is the gateway running?)", ep_path.display()))?,
        )?;
        let token_path = admin_token_path(dir);
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("reading the admin token {}", token_path.display()))?
            .trim()
            .to_owned();
        let tls = tern_core::tls::pinned_client_config(&ep.fingerprint)?;
        let client = reqwest::Client::builder().use_preconfigured_tls(tls).build()?;
        let host = if ep.control.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], ep.control.port()))
        } else {
            ep.control
        };
        Ok(Self {
            client,
            base: format!("https://{host}"),
            token,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<String> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(serde_json::to_vec(&b)?);
        }
        let resp = req.send().await.context("calling the gateway's control plane")?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("gateway answered {status}: {text}");
        }
        Ok(text)
    }
}

/// `key import`: the secret is one line on stdin (never an argument: it would show in `ps`).
fn import_key(data_dir: &Path, access_key_id: String, hosts: Vec<HostId>) -> anyhow::Result<()> {
    let mut secret = String::new();
    std::io::stdin()
        .read_line(&mut secret)
        .context("reading the secret access key from stdin")?;
    let key = KeyImport {
        access_key_id,
        secret_access_key: secret.trim_end_matches(['\r', '\n']).to_owned(),
        hosts,
    };
    let how = Provisioner::open(data_dir)?.import_key(&key, now_unix_ms())?;
    println!(
        "{}",
        serde_json::json!({
            "access_key_id": key.access_key_id,
            "hosts": key.hosts,
            "imported": format!("{how:?}").to_lowercase(),
        })
    );
    Ok(())
}

/// Writes a configuration file atomically (mode 0600: the gateway runs as root).
fn write_config(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    tern_gateway::fsutil::write_secret_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn parse_fleet(hosts: &[String]) -> anyhow::Result<Vec<FleetHost>> {
    hosts
        .iter()
        .map(|h| {
            let (name, disks) = h
                .split_once('=')
                .with_context(|| format!("{h:?} is not NAME=DISKS"))?;
            Ok(FleetHost {
                name: name.to_owned(),
                disks: disks.parse().with_context(|| format!("{h:?}: disk count"))?,
            })
        })
        .collect()
}

async fn main_inner(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            data_dir,
            listen,
            control_listen,
            engine,
        } => {
            let mut file = match &config {
                Some(p) => ConfigFile::load(p)?,
                None => ConfigFile::default(),
            };
            if data_dir.is_some() {
                file.data_dir = data_dir;
            }
            if listen.is_some() {
                file.data_plane.listen = listen;
            }
            if control_listen.is_some() {
                file.control_plane.listen = control_listen;
            }
            if engine.is_some() {
                file.io.engine = engine;
            }
            let config: Config = file.validate()?;
            run(config, async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                }
            })
            .await
        }
        Command::Provision {
            keys,
            data_dir,
            config_out,
        } => {
            let doc = KeysDoc::load(&keys)?;
            if let Some(text) = &doc.gateway_toml {
                write_config(&config_out, text)?;
            }
            let done = Provisioner::open(&data_dir)?.apply(&doc, now_unix_ms())?;
            let keys: Vec<serde_json::Value> = done
                .iter()
                .map(|(id, how)| serde_json::json!({ "access_key_id": id, "imported": format!("{how:?}").to_lowercase() }))
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "config_written": doc.gateway_toml.is_some(),
                    "admin_token_set": doc.admin_token.is_some(),
                    "keys": keys,
                })
            );
            Ok(())
        }
        Command::Key { command, data_dir } => {
            let (method, path, body) = match command {
                KeyCommand::Import { access_key_id, hosts } => {
                    return import_key(&data_dir, access_key_id, hosts);
                }
                KeyCommand::Create { hosts } => (
                    reqwest::Method::POST,
                    "/api/v1/keys".to_owned(),
                    Some(serde_json::json!({ "hosts": hosts })),
                ),
                KeyCommand::List => (reqwest::Method::GET, "/api/v1/keys".to_owned(), None),
                KeyCommand::Revoke { id } => (reqwest::Method::DELETE, format!("/api/v1/keys/{id}"), None),
            };
            let out = ControlClient::from_data_dir(&data_dir)?
                .call(method, &path, body)
                .await?;
            if !out.is_empty() {
                println!("{out}");
            }
            Ok(())
        }
        Command::Object { command, data_dir } => {
            let c = ControlClient::from_data_dir(&data_dir)?;
            let out = match command {
                ObjectCommand::Points => {
                    c.call(reqwest::Method::GET, "/api/v1/object/points", None)
                        .await?
                }
                ObjectCommand::Scan => c.call(reqwest::Method::POST, "/api/v1/object/scan", None).await?,
                ObjectCommand::Prune { dry_run } => {
                    c.call(
                        reqwest::Method::POST,
                        "/api/v1/object/prune",
                        Some(serde_json::json!({ "dry_run": dry_run })),
                    )
                    .await?
                }
                ObjectCommand::Gc { dry_run, grace } => {
                    c.call(
                        reqwest::Method::POST,
                        "/api/v1/object/gc",
                        Some(
                            serde_json::json!({ "dry_run": dry_run, "grace_s": grace.map(|g| g.as_secs()) }),
                        ),
                    )
                    .await?
                }
            };
            println!("{out}");
            Ok(())
        }
        Command::Recovery { command, data_dir } => {
            let c = ControlClient::from_data_dir(&data_dir)?;
            let out = match command {
                RecoveryCommand::Start {
                    host,
                    point,
                    mode,
                    drill,
                    key_file,
                } => {
                    let key = match key_file {
                        Some(p) => Some(
                            std::fs::read_to_string(&p)
                                .with_context(|| format!("reading {}", p.display()))?,
                        ),
                        None => None,
                    };
                    let body = serde_json::json!({ "host": host, "point": point, "mode": mode, "drill": drill, "encryption_key": key });
                    c.call(reqwest::Method::POST, "/api/v1/recoveries", Some(body))
                        .await?
                }
                RecoveryCommand::List => c.call(reqwest::Method::GET, "/api/v1/recoveries", None).await?,
                RecoveryCommand::Show { id } => {
                    c.call(reqwest::Method::GET, &format!("/api/v1/recoveries/{id}"), None)
                        .await?
                }
                RecoveryCommand::Delete { id } => {
                    c.call(reqwest::Method::DELETE, &format!("/api/v1/recoveries/{id}"), None)
                        .await?
                }
            };
            println!("{out}");
            Ok(())
        }
        Command::Relay { target } => relay(&target),
        Command::Hosts { data_dir } => {
            let c = ControlClient::from_data_dir(&data_dir)?;
            let out = c.call(reqwest::Method::GET, "/api/v1/hosts", None).await?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Command::Plan {
            hosts,
            max_volumes,
            json,
        } => {
            let fleet = parse_fleet(&hosts)?;
            let p = plan(&fleet, max_volumes)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                let disks: u32 = fleet.iter().map(|h| h.disks).sum();
                println!(
                    "{} hosts, {disks} disks, {max_volumes} volumes per gateway -> {} gateway(s)",
                    fleet.len(),
                    p.len()
                );
                for (i, g) in p.iter().enumerate() {
                    let list: Vec<String> = g.hosts.iter().map(|(h, d)| format!("{h}({d})")).collect();
                    println!("gateway {}: {} volumes: {}", i + 1, g.volumes, list.join(" "));
                }
            }
            Ok(())
        }
    }
}

/// stdin → `target` → stdout until both directions end.
fn relay(target: &str) -> anyhow::Result<()> {
    let tcp = std::net::TcpStream::connect(target).with_context(|| format!("connecting to {target}"))?;
    let mut up = tcp.try_clone()?;
    let to_target = std::thread::spawn(move || {
        let r = std::io::copy(&mut std::io::stdin().lock(), &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
        r
    });
    std::io::copy(&mut &tcp, &mut std::io::stdout().lock())?;
    // The target closed: the guest's side ends with it.
    drop(to_target);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_inner(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}
