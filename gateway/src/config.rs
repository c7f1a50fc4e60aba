//! The gateway's configuration file (TOML). Every field is documented; unknown fields are
//! refused; the whole file is validated once at start into [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use tern_core::io::{EngineChoice, EngineConfig};

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// The configuration file as written by the operator.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Directory for the metadata DB, TLS material, keys and (local provider) volumes.
    /// Default: `/var/lib/tern-gateway`.
    pub data_dir: Option<PathBuf>,
    /// The S3 data plane.
    #[serde(default)]
    pub data_plane: ListenerFile,
    /// The control plane (REST API, `/healthz`, `/metrics`).
    #[serde(default)]
    pub control_plane: ListenerFile,
    /// Block I/O engine settings for volume writes.
    #[serde(default)]
    pub io: IoFile,
    /// The cloud provider that holds volumes and snapshots.
    #[serde(default)]
    pub provider: ProviderFile,
    /// Batching of the durable record of landed extents.
    #[serde(default)]
    pub landed: LandedFile,
    /// Object mode: the bucket agents write to, which the gateway indexes, prunes and
    /// garbage-collects (it never needs, nor gets, the customers' encryption keys).
    pub object_store: Option<ObjectStoreFile>,
}

/// The object store the gateway looks after (`docs/object-mode.md`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ObjectStoreFile {
    /// `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// `https://HOST[:PORT]`.
    pub endpoint: String,
    /// Region. Default `us-east-1`.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: String,
    /// A file holding the secret access key (mode 0600).
    pub secret_file: PathBuf,
    /// Trust the certificates in this PEM file (default: the system's roots).
    pub ca_file: Option<PathBuf>,
    /// Minutes between two scans of the bucket (and prunes). Default 5.
    pub scan_minutes: Option<u64>,
    /// Hours between two garbage collections (0: only on request). Default 24.
    pub gc_hours: Option<u64>,
    /// GC grace period in seconds. Default 3600.
    pub gc_grace_s: Option<u64>,
    /// A sync lease not renewed for this many hours is abandoned. Default 48 (agents use the
    /// same default).
    pub lease_ttl_hours: Option<u64>,
    /// Retention for every host (all zero or absent: keep every point).
    #[serde(default)]
    pub retention: tern_core::object::retention::Retention,
    /// Per-host retention, replacing the default for that host.
    #[serde(default)]
    pub host_retention: std::collections::BTreeMap<String, tern_core::object::retention::Retention>,
}

/// Validated object-store settings.
#[derive(Debug, Clone)]
pub struct ObjectStoreConfig {
    /// Bucket.
    pub bucket: String,
    /// Prefix in it.
    pub prefix: String,
    /// Connection.
    pub s3: tern_core::object::s3::S3Config,
    /// Scan interval.
    pub scan_every: std::time::Duration,
    /// GC interval (`None`: on request only).
    pub gc_every: Option<std::time::Duration>,
    /// GC settings.
    pub gc: tern_core::object::gc::GcOptions,
    /// Default retention.
    pub retention: tern_core::object::retention::Retention,
    /// Per-host retention.
    pub host_retention:
        std::collections::BTreeMap<tern_core::HostId, tern_core::object::retention::Retention>,
}

impl ObjectStoreFile {
    fn validate(self) -> Result<ObjectStoreConfig, ConfigError> {
        use std::time::Duration;
        let (bucket, prefix) = tern_core::object::s3::parse_url(&self.url)
            .map_err(|e| invalid("object_store.url", e.to_string()))?;
        let secret = std::fs::read_to_string(&self.secret_file).map_err(|e| {
            invalid(
                "object_store.secret_file",
                format!("{}: {e}", self.secret_file.display()),
            )
        })?;
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(invalid("object_store.secret_file", "is empty"));
        }
        let mut host_retention = std::collections::BTreeMap::new();
        for (h, r) in self.host_retention {
            let host = tern_core::HostId::new(h.as_str())
                .map_err(|e| invalid("object_store.host_retention", e.to_string()))?;
            host_retention.insert(host, r);
        }
        let scan = self.scan_minutes.unwrap_or(5);
        if scan == 0 {
            return Err(invalid("object_store.scan_minutes", "must be at least 1"));
        }
        let gc_hours = self.gc_hours.unwrap_or(24);
        let ttl = self.lease_ttl_hours.unwrap_or(48);
        if ttl == 0 {
            return Err(invalid("object_store.lease_ttl_hours", "must be at least 1"));
        }
        Ok(ObjectStoreConfig {
            bucket: bucket.clone(),
            prefix,
            s3: tern_core::object::s3::S3Config {
                endpoint: self.endpoint,
                bucket,
                region: self.region.unwrap_or_else(|| "us-east-1".into()),
                access_key_id: self.access_key_id,
                secret_access_key: tern_core::object::s3::Secret::new(secret.to_owned()),
                trust: match self.ca_file {
                    Some(ca) => tern_core::object::s3::Trust::CaFile(ca),
                    None => tern_core::object::s3::Trust::System,
                },
                allow_http: false,
                max_retries: 10,
            },
            scan_every: Duration::from_secs(scan * 60),
            gc_every: (gc_hours > 0).then(|| Duration::from_secs(gc_hours * 3600)),
            gc: tern_core::object::gc::GcOptions {
                grace: Duration::from_secs(self.gc_grace_s.unwrap_or(3600)),
                lease_ttl: Duration::from_secs(ttl * 3600),
                dry_run: false,
            },
            retention: self.retention,
            host_retention,
        })
    }
}

/// A listener.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListenerFile {
    /// Address to listen on, e.g. `0.0.0.0:8443`. Port 0 picks a free port (tests).
    pub listen: Option<SocketAddr>,
}

/// Block I/O settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IoFile {
    /// `auto` (io_uring, else portable with a log line), `io_uring` or `portable`.
    pub engine: Option<EngineChoice>,
    /// Operations in flight per volume (1..=1024). Default 32.
    pub queue_depth: Option<u32>,
    /// Registered I/O buffer memory per volume in MiB (16..=1024). Default 32.
    pub buffer_mib: Option<usize>,
    /// Use O_DIRECT where the volume's alignment allows. Default true.
    pub direct: Option<bool>,
}

/// Provider settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    /// Provider kind. Only `local` (volumes are sparse files under `data_dir/volumes`) exists.
    pub kind: Option<String>,
    /// Local provider: preallocate volume files (fallocate) instead of leaving them sparse.
    pub preallocate: Option<bool>,
    /// Most volumes one gateway instance may have attached (used by `plan`). Default 20.
    pub max_volumes_per_instance: Option<u32>,
}

/// Landed-record batching.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LandedFile {
    /// Longest a landed extent waits before it is made durable and recorded, in ms
    /// (10..=10000). Default 500.
    pub batch_ms: Option<u64>,
    /// Most records in one batch (1..=100000). Default 1024.
    pub batch_max: Option<usize>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Data-plane listen address.
    pub data_listen: SocketAddr,
    /// Control-plane listen address.
    pub control_listen: SocketAddr,
    /// I/O engine configuration.
    pub io: EngineConfig,
    /// Preallocate local volumes.
    pub preallocate: bool,
    /// Most volumes per gateway instance.
    pub max_volumes_per_instance: u32,
    /// Landed batch interval.
    pub landed_batch_ms: u64,
    /// Landed batch size.
    pub landed_batch_max: usize,
    /// Object mode, when configured.
    pub object_store: Option<ObjectStoreConfig>,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

impl ConfigFile {
    /// Reads and parses a config file.
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Validates the file into a runtime [`Config`].
    pub fn validate(self) -> Result<Config, ConfigError> {
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/tern-gateway"));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        let data_listen = self
            .data_plane
            .listen
            .unwrap_or_else(|| ([0, 0, 0, 0], 8443).into());
        let control_listen = self
            .control_plane
            .listen
            .unwrap_or_else(|| ([0, 0, 0, 0], 8444).into());
        if data_listen == control_listen && data_listen.port() != 0 {
            return Err(invalid(
                "control_plane.listen",
                "must differ from data_plane.listen",
            ));
        }
        let defaults = EngineConfig::default();
        let queue_depth = self.io.queue_depth.unwrap_or(defaults.queue_depth);
        if !(1..=1024).contains(&queue_depth) {
            return Err(invalid(
                "io.queue_depth",
                format!("{queue_depth} is not in 1..=1024"),
            ));
        }
        let buffer_mib = self.io.buffer_mib.unwrap_or(defaults.buffer_bytes >> 20);
        if !(16..=1024).contains(&buffer_mib) {
            return Err(invalid(
                "io.buffer_mib",
                format!("{buffer_mib} is not in 16..=1024"),
            ));
        }
        match self.provider.kind.as_deref() {
            None | Some("local") => {}
            Some(other) => {
                return Err(invalid(
                    "provider.kind",
                    format!("unknown provider {other:?} (known: local)"),
                ));
            }
        }
        let max_volumes_per_instance = self.provider.max_volumes_per_instance.unwrap_or(20);
        if max_volumes_per_instance == 0 {
            return Err(invalid("provider.max_volumes_per_instance", "must be at least 1"));
        }
        let landed_batch_ms = self.landed.batch_ms.unwrap_or(500);
        if !(10..=10_000).contains(&landed_batch_ms) {
            return Err(invalid(
                "landed.batch_ms",
                format!("{landed_batch_ms} is not in 10..=10000"),
            ));
        }
        let landed_batch_max = self.landed.batch_max.unwrap_or(1024);
        if !(1..=100_000).contains(&landed_batch_max) {
            return Err(invalid(
                "landed.batch_max",
                format!("{landed_batch_max} is not in 1..=100000"),
            ));
        }
        Ok(Config {
            data_dir,
            data_listen,
            control_listen,
            io: EngineConfig {
                engine: self.io.engine.unwrap_or(EngineChoice::Auto),
                queue_depth,
                buffer_bytes: buffer_mib << 20,
                direct: self.io.direct.unwrap_or(true),
            },
            preallocate: self.provider.preallocate.unwrap_or(false),
            max_volumes_per_instance,
            landed_batch_ms,
            landed_batch_max,
            object_store: self.object_store.map(ObjectStoreFile::validate).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        let c = ConfigFile::default().validate().unwrap();
        assert_eq!(c.data_listen.port(), 8443);
        assert_eq!(c.io.queue_depth, 32);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        assert!(toml::from_str::<ConfigFile>("datadir = '/x'").is_err());
        assert!(toml::from_str::<ConfigFile>("[io]\nqd = 3").is_err());
        let f: ConfigFile = toml::from_str("[io]\nqueue_depth = 0").unwrap();
        assert!(matches!(
            f.validate(),
            Err(ConfigError::Invalid {
                field: "io.queue_depth",
                ..
            })
        ));
        let f: ConfigFile = toml::from_str("[provider]\nkind = 'aws'").unwrap();
        assert!(f.validate().is_err());
        let f: ConfigFile = toml::from_str(
            "data_dir = '/tmp/x'\n[data_plane]\nlisten = '127.0.0.1:0'\n[io]\nengine = 'portable'",
        )
        .unwrap();
        assert_eq!(f.validate().unwrap().io.engine, EngineChoice::Portable);
    }
}
