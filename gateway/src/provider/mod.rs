//! Cloud providers: where volumes and snapshots live.
//!
//! One trait for every cloud. The gateway writes to volumes attached to itself and asks the
//! provider to snapshot them at each commit. For Boot-in-Cloud it also makes volumes from images
//! and runs instances (`docs/boot-in-cloud.md` §2).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod local;
pub mod qemu;

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
    #[error("invalid instance {id}: {reason}")]
    Spec { id: String, reason: String },
    #[error("{op} {id}: {reason}")]
    Command {
        op: &'static str,
        id: String,
        reason: String,
    },
    #[error("instance {id} is running")]
    Running { id: String },
}

/// An instance's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flavor {
    /// Virtual CPUs (1..=64).
    pub vcpus: u32,
    /// Memory in MiB (128..=1048576).
    pub ram_mib: u32,
}

impl Default for Flavor {
    fn default() -> Self {
        Self {
            vcpus: 1,
            ram_mib: 1024,
        }
    }
}

impl Flavor {
    /// Why this flavor is refused, if it is.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=64).contains(&self.vcpus) {
            return Err(format!("vcpus {} is not in 1..=64", self.vcpus));
        }
        if !(128..=1 << 20).contains(&self.ram_mib) {
            return Err(format!("ram_mib {} is not in 128..=1048576", self.ram_mib));
        }
        Ok(())
    }
}

/// An instance's firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// Legacy BIOS (what a repaired disk boots with).
    #[default]
    Bios,
    /// UEFI.
    Uefi,
}

/// An instance's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// NAT to the outside; the host is reachable.
    #[default]
    User,
    /// No way out except the instance's explicit guest forwards (drills, helpers).
    Isolated,
}

/// One disk of an instance, in boot order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceDisk {
    /// The volume.
    pub volume: String,
    /// The disk id the guest sees as the virtio serial `tern-<disk>`.
    pub disk: String,
}

/// A TCP address inside the instance's network that leads to an address outside it (the only
/// way out of an isolated network).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestForward {
    /// Address the guest connects to (in 10.0.2.0/24 on the local provider).
    pub guest: std::net::SocketAddrV4,
    /// Where the connection goes (`host:port` as the gateway reaches it).
    pub target: String,
}

/// A host port leading to a guest port (the local provider binds it to 127.0.0.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostForward {
    /// Port on the host.
    pub host_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
}

/// A file of an instance's config drive.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfigDriveFile {
    /// Path in the drive, `/`-separated (e.g. `tern/job.json`).
    pub path: String,
    /// Content (may hold secrets: never logged, never in `instance.json`).
    pub content: Vec<u8>,
}

impl std::fmt::Debug for ConfigDriveFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigDriveFile")
            .field("path", &self.path)
            .field("len", &self.content.len())
            .finish()
    }
}

/// What an instance is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Instance name (the provider's id).
    pub name: String,
    /// Size.
    pub flavor: Flavor,
    /// Disks, boot disk first.
    pub disks: Vec<InstanceDisk>,
    /// Firmware.
    pub firmware: Firmware,
    /// Network.
    pub network: Network,
    /// Ways out of the network to given addresses.
    #[serde(default)]
    pub guest_forwards: Vec<GuestForward>,
    /// Host ports forwarded into the guest.
    #[serde(default)]
    pub host_forwards: Vec<HostForward>,
    /// Files of the config drive (label `config-2`); none: no config drive. Not stored.
    #[serde(skip)]
    pub config_drive: Vec<ConfigDriveFile>,
}

/// Whether an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Its process runs.
    Running,
    /// Defined, not running (never started, powered off, or stopped).
    Stopped,
}

/// An instance as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// Name.
    pub name: String,
    /// Running or not.
    pub state: InstanceState,
    /// Where its serial console is written.
    pub serial_log: PathBuf,
    /// Its definition.
    pub spec: InstanceSpec,
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
    /// A volume, if it exists.
    async fn volume(&self, id: &str) -> Result<Option<VolumeInfo>, ProviderError>;
    /// A new volume holding a disk image (raw), grown to `size` when that is larger.
    async fn volume_from_image(
        &self,
        image: &Path,
        name: &str,
        size: u64,
    ) -> Result<VolumeInfo, ProviderError>;

    /// Defines an instance (not started). Defining an existing one returns it unchanged.
    async fn create_instance(&self, spec: &InstanceSpec) -> Result<InstanceInfo, ProviderError>;
    /// Starts an instance (nothing if it runs).
    async fn start_instance(&self, name: &str) -> Result<InstanceInfo, ProviderError>;
    /// Stops an instance: an ACPI power-down, then a hard stop after `grace`.
    async fn stop_instance(&self, name: &str, grace: Duration) -> Result<(), ProviderError>;
    /// An instance, if it exists.
    async fn instance(&self, name: &str) -> Result<Option<InstanceInfo>, ProviderError>;
    /// Every instance of this gateway.
    async fn list_instances(&self) -> Result<Vec<InstanceInfo>, ProviderError>;
    /// Stops (hard) and deletes an instance and its config drive; not its volumes.
    async fn delete_instance(&self, name: &str) -> Result<(), ProviderError>;
    /// The end of an instance's serial console output (at most `max_bytes`), lossy UTF-8.
    async fn console_log(&self, name: &str, max_bytes: u64) -> Result<String, ProviderError>;
}
