//! `tern-recovery-helper`: runs inside the recovery helper VM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::InspectManifest { path } => std::fs::read(&path)
            .with_context(|| format!("reading {}", path.display()))
            .and_then(|b| {
                tern_core::Manifest::decode(&b).with_context(|| format!("decoding {}", path.display()))
            })
            .map(|m| print!("{}", tern_recovery_helper::describe(&m))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tern-recovery-helper: {e:#}");
            ExitCode::FAILURE
        }
    }
}
