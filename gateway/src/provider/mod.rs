//! Cloud providers: where volumes and snapshots live.
//!
//! One trait for every cloud. The gateway writes to volumes attached to itself and asks the
//! provider to snapshot them at each commit. Instances (for Boot-in-Cloud) come later.

use std::path::PathBuf;

pub mod local;

/// A provider failure.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{op} {id}")]
    Io {
        op: &'static str,
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {id}")]
    Clone {
        op: &'static str,
        id: String,
        #[source]
        source: tern_core::io::IoError,
    },
    #[error("no {kind} named {id}")]
    NotFound { kind: &'static str, id: String },
    #[error("volume {id} cannot shrink from {from} to {to} bytes")]
    Shrink { id: String, from: u64, to: u64 },
    #[error("invalid {kind} name {id:?}")]
    Name { kind: &'static str, id: String },
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Provider id.
    pub id: String,
    /// Size in bytes.
    pub size: u64,
}

/// A snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Provider id.
    pub id: String,
    /// How the provider made it (e.g. `reflink`, `sparse copy`), for the log.
    pub method: String,
}

/// What a cloud must offer the gateway.
#[async_trait::async_trait]
pub trait CloudProvider: Send + Sync + std::fmt::Debug {
    /// Provider name for logs and metrics.
    fn name(&self) -> &'static str;
    /// Creates an empty (zero) volume.
    async fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, ProviderError>;
    /// Grows a volume.
    async fn resize_volume(&self, id: &str, size: u64) -> Result<(), ProviderError>;
    /// Attaches a volume to this gateway; returns the block device (or file) to open.
    async fn attach_volume(&self, id: &str) -> Result<PathBuf, ProviderError>;
    /// Detaches a volume from this gateway.
    async fn detach_volume(&self, id: &str) -> Result<(), ProviderError>;
    /// Snapshots a volume (its content as durable at the call). Replaces a snapshot of the
    /// same name left by an interrupted commit.
    async fn snapshot_volume(&self, volume_id: &str, name: &str) -> Result<SnapshotInfo, ProviderError>;
    /// A new volume holding a snapshot's content.
    async fn volume_from_snapshot(&self, snapshot_id: &str, name: &str) -> Result<VolumeInfo, ProviderError>;
    /// Deletes a volume.
    async fn delete_volume(&self, id: &str) -> Result<(), ProviderError>;
    /// Deletes a snapshot.
    async fn delete_snapshot(&self, id: &str) -> Result<(), ProviderError>;
    /// Every snapshot the provider holds for this gateway.
    async fn list_snapshots(&self) -> Result<Vec<String>, ProviderError>;
}
