//! `tern-test-s3`: a real S3 server over HTTPS for tests, backed by `s3s-fs` (see
//! `tern_tests::s3server`). Writes its info file once it listens, then serves until SIGINT or
//! SIGTERM.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use tern_tests::fixture::{default_ca_file, init_logging, wait_for_termination, write_json_atomic};
use tern_tests::s3server::{self, S3Options};
use tracing::info;

/// A real S3 server over HTTPS on 127.0.0.1 for tests (s3s-fs, path-style, SigV4).
#[derive(Debug, Parser)]
struct Args {
    /// Data directory (one subdirectory per bucket), created if missing.
    #[arg(long)]
    root: PathBuf,
    /// Where to write the info file (JSON: endpoint, access_key_id, secret_access_key, ca_file,
    /// fingerprint) once listening.
    #[arg(long)]
    info: PathBuf,
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// A bucket to create before serving (repeatable).
    #[arg(long = "bucket", value_name = "NAME")]
    buckets: Vec<String>,
    /// Where to write the certificate (PEM); default beside the info file, `NAME.ca.pem` for
    /// `NAME.json`.
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
}

fn main() -> Result<()> {
    init_logging();
    let args = Args::parse();
    let ca_file = std::path::absolute(args.ca_file.unwrap_or_else(|| default_ca_file(&args.info)))?;
    let server = s3server::start(
        &args.root,
        S3Options {
            port: args.port,
            buckets: args.buckets,
            ca_file: Some(ca_file),
        },
    )?;
    write_json_atomic(&args.info, &server.info())?;
    info!(endpoint = %server.endpoint, root = %server.root.display(), fingerprint = %server.fingerprint, "tern-test-s3 serving");
    wait_for_termination()?;
    info!("tern-test-s3 stopping");
    drop(server);
    Ok(())
}
