//! `tern-fault-proxy`: an HTTPS reverse proxy that injects S3 faults (see
//! `tern_tests::faultproxy`). Writes its info file once it listens, logs every fault, and
//! serves until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tern_tests::faultproxy::{FaultConfig, FaultProxy, FaultRule, ProxyOptions};
use tern_tests::fixture::{default_ca_file, init_logging, wait_for_termination, write_json_atomic};
use tracing::info;

/// An HTTPS reverse proxy on 127.0.0.1 that injects S3 faults (SlowDown, reset, stall,
/// truncated body), each with a probability per request (`P`, or `P:METHOD,METHOD` to strike
/// only those methods).
#[derive(Debug, Parser)]
struct Args {
    /// Where requests go: `https://HOST:PORT` (with --upstream-ca) or `http://HOST:PORT`.
    #[arg(long)]
    upstream: String,
    /// The CA (PEM) to trust for an https upstream.
    #[arg(long, value_name = "PEM")]
    upstream_ca: Option<PathBuf>,
    /// Where to write the info file (JSON: endpoint, upstream, ca_file, fingerprint) once
    /// listening.
    #[arg(long)]
    info: PathBuf,
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write the proxy's certificate (PEM); default beside the info file,
    /// `NAME.ca.pem` for `NAME.json`.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Seed of the RNG that draws faults.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No fault after this many.
    #[arg(long, value_name = "N")]
    max_faults: Option<u64>,
    /// Answer 503 SlowDown without forwarding.
    #[arg(long, value_name = "P[:METHODS]", default_value = "0")]
    slowdown: FaultRule,
    /// Close the connection without forwarding or answering.
    #[arg(long, value_name = "P[:METHODS]", default_value = "0")]
    reset: FaultRule,
    /// Hold the request for --stall-for, then close the connection.
    #[arg(long, value_name = "P[:METHODS]", default_value = "0")]
    stall: FaultRule,
    /// Forward, then answer half of the body and cut the connection.
    #[arg(long, value_name = "P[:METHODS]", default_value = "0")]
    truncate: FaultRule,
    /// How long a stall holds a request (e.g. `40s`, `500ms`).
    #[arg(long, value_name = "DURATION", default_value = "40s", value_parser = humantime::parse_duration)]
    stall_for: Duration,
    /// Forward a stalled request afterwards instead of dropping it.
    #[arg(long)]
    stall_then_forward: bool,
}

fn main() -> Result<()> {
    init_logging();
    let args = Args::parse();
    let upstream_ca = args
        .upstream_ca
        .as_ref()
        .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let faults = FaultConfig {
        seed: args.seed,
        max_faults: args.max_faults.unwrap_or(u64::MAX),
        slowdown: args.slowdown,
        reset: args.reset,
        stall: args.stall,
        truncate: args.truncate,
        stall_for: args.stall_for,
        stall_then_forward: args.stall_then_forward,
    };
    let ca_file = std::path::absolute(args.ca_file.unwrap_or_else(|| default_ca_file(&args.info)))?;
    let proxy = FaultProxy::start_with(
        &args.upstream,
        upstream_ca.as_deref(),
        faults.clone(),
        ProxyOptions {
            port: args.port,
            ca_file: Some(ca_file),
        },
    )?;
    write_json_atomic(&args.info, &proxy.info())?;
    info!(endpoint = %proxy.endpoint, upstream = %proxy.upstream, fingerprint = %proxy.fingerprint, ?faults, "tern-fault-proxy serving");
    wait_for_termination()?;
    info!(counts = ?proxy.counts(), "tern-fault-proxy stopping");
    drop(proxy);
    Ok(())
}
