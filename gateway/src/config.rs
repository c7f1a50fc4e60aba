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
    /// Boot-in-Cloud: recoveries into instances of the provider (`docs/boot-in-cloud.md`).
    /// Absent: the recovery API answers 404.
    pub recovery: Option<RecoveryFile>,
}

/// Boot-in-Cloud settings as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RecoveryFile {
    /// The recovery-helper disk image (raw): the boot disk of block-mode helper instances and
    /// the first disk of object-mode recoveries. Required.
    pub helper_image: Option<PathBuf>,
    /// The QEMU binary of the local provider. Default `qemu-system-x86_64`.
    pub qemu: Option<PathBuf>,
    /// `auto` (KVM when a probe VM runs on it, else TCG), `kvm` or `tcg`. Default `auto`.
    pub accel: Option<crate::provider::qemu::Accel>,
    /// OVMF code for UEFI instances. Default `/usr/share/OVMF/OVMF_CODE.fd`.
    pub ovmf_code: Option<PathBuf>,
    /// OVMF's empty variable store. Default `/usr/share/OVMF/OVMF_VARS.fd`.
    pub ovmf_vars: Option<PathBuf>,
    /// The flavor of recovered instances when a request names none. Default 1 vCPU, 1024 MiB.
    pub default_flavor: Option<crate::provider::Flavor>,
    /// The flavor of block-mode helper instances. Default 1 vCPU, 1024 MiB.
    pub helper_flavor: Option<crate::provider::Flavor>,
    /// The object store's endpoint as an instance reaches it, e.g. `http://10.0.2.2:7480` (a
    /// local instance reaches the gateway's host at 10.0.2.2). Default: `object_store.endpoint`.
    pub store_endpoint_for_instances: Option<String>,
    /// Let helpers use plain HTTP to that endpoint. Default false.
    pub allow_http: Option<bool>,
    /// The SHA-256 of the store's certificate (`sha256:HEX` or bare hex) for helpers to pin
    /// instead of trusting `object_store.ca_file`, where the certificate's name does not match
    /// the address instances use (e.g. a self-signed store reached at 10.0.2.2).
    pub store_fingerprint: Option<String>,
    /// Drills (isolated network): the address inside the instance's network that is forwarded
    /// to the object store (the endpoint's port is kept). Default `10.0.2.100`.
    pub drill_store_address: Option<std::net::Ipv4Addr>,
    /// The access key id helpers read the bucket with. Default: `object_store.access_key_id`.
    pub store_access_key_id: Option<String>,
    /// A file holding its secret (mode 0600). Default: `object_store.secret_file`.
    pub store_secret_file: Option<PathBuf>,
    /// The helper's watchdog: it gives up when nothing progresses this long. Default 600.
    pub helper_stall_s: Option<u64>,
    /// A recovery whose helper has not reported within this many minutes fails. Default 720.
    pub timeout_minutes: Option<u64>,
    /// How long a stopping instance may take to power down before it is stopped hard, in
    /// seconds. Default 60.
    pub stop_grace_s: Option<u64>,
}

/// Where a helper instance finds the object store (the secret is kept only in memory).
#[derive(Debug, Clone)]
pub struct HelperStore {
    /// `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// The endpoint as an instance reaches it.
    pub endpoint: String,
    /// `host:port` the gateway reaches the store at (where a drill's forward leads).
    pub gateway_target: String,
    /// Region.
    pub region: String,
    /// Plain HTTP allowed.
    pub allow_http: bool,
    /// CA certificates (PEM) to trust, from `object_store.ca_file`.
    pub ca_pem: Option<String>,
    /// Certificate fingerprint to pin.
    pub fingerprint: Option<String>,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: tern_core::object::s3::Secret,
}

/// Validated Boot-in-Cloud settings.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    /// Helper image.
    pub helper_image: PathBuf,
    /// QEMU.
    pub qemu: crate::provider::qemu::QemuSettings,
    /// Default flavor of recovered instances.
    pub default_flavor: crate::provider::Flavor,
    /// Flavor of helper instances.
    pub helper_flavor: crate::provider::Flavor,
    /// The object store for helpers (object mode), when `[object_store]` is configured.
    pub store: Option<HelperStore>,
    /// Address forwarded to the store in drills.
    pub drill_store_address: std::net::Ipv4Addr,
    /// Helper watchdog, seconds.
    pub helper_stall_s: u64,
    /// Recovery timeout.
    pub timeout: std::time::Duration,
    /// Power-down grace.
    pub stop_grace: std::time::Duration,
}

/// `host:port` of an `http(s)://host[:port][/]` URL.
fn authority(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host_port = rest.split('/').next()?;
    if host_port.is_empty() || host_port.contains('@') {
        return None;
    }
    // `[v6]:port`, `[v6]`, `host:port`, `host`.
    let (host, port) = match host_port.rsplit_once(':') {
        Some((h, p)) if !h.starts_with('[') || h.ends_with(']') => (h, p.parse().ok()?),
        _ => (host_port, default_port),
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

impl RecoveryFile {
    fn validate(self, store: Option<&ObjectStoreFile>) -> Result<RecoveryConfig, ConfigError> {
        let helper_image = self
            .helper_image
            .ok_or_else(|| invalid("recovery.helper_image", "is required"))?;
        if !helper_image.is_file() {
            return Err(invalid(
                "recovery.helper_image",
                format!("{} is not a file", helper_image.display()),
            ));
        }
        let mut qemu = crate::provider::qemu::QemuSettings::default();
        if let Some(q) = self.qemu {
            qemu.binary = q;
        }
        qemu.accel = self.accel.unwrap_or_default();
        if let Some(c) = self.ovmf_code {
            qemu.ovmf_code = c;
        }
        if let Some(v) = self.ovmf_vars {
            qemu.ovmf_vars = v;
        }
        let default_flavor = self.default_flavor.unwrap_or_default();
        default_flavor
            .check()
            .map_err(|e| invalid("recovery.default_flavor", e))?;
        let helper_flavor = self.helper_flavor.unwrap_or_default();
        helper_flavor
            .check()
            .map_err(|e| invalid("recovery.helper_flavor", e))?;
        let allow_http = self.allow_http.unwrap_or(false);
        let store = match store {
            None => {
                if self.store_endpoint_for_instances.is_some() {
                    return Err(invalid(
                        "recovery.store_endpoint_for_instances",
                        "needs an [object_store] section",
                    ));
                }
                None
            }
            Some(o) => {
                let endpoint = self
                    .store_endpoint_for_instances
                    .unwrap_or_else(|| o.endpoint.clone());
                let Some(_) = authority(&endpoint) else {
                    return Err(invalid(
                        "recovery.store_endpoint_for_instances",
                        format!("{endpoint:?} is not http(s)://HOST[:PORT]"),
                    ));
                };
                if endpoint.starts_with("http://") && !allow_http {
                    return Err(invalid(
                        "recovery.store_endpoint_for_instances",
                        "is plain HTTP: set recovery.allow_http = true to allow it",
                    ));
                }
                let (h, p) = authority(&o.endpoint).ok_or_else(|| {
                    invalid(
                        "object_store.endpoint",
                        format!("{:?} is not http(s)://HOST[:PORT]", o.endpoint),
                    )
                })?;
                let secret_file = self.store_secret_file.unwrap_or_else(|| o.secret_file.clone());
                let secret = std::fs::read_to_string(&secret_file).map_err(|e| {
                    invalid(
                        "recovery.store_secret_file",
                        format!("{}: {e}", secret_file.display()),
                    )
                })?;
                let secret = secret.trim();
                if secret.is_empty() {
                    return Err(invalid("recovery.store_secret_file", "is empty"));
                }
                // A pinned fingerprint replaces the CA (the helper takes one or the other).
                let fingerprint = match self.store_fingerprint {
                    Some(f) => {
                        let text = if f.starts_with("sha256:") {
                            f
                        } else {
                            format!("sha256:{f}")
                        };
                        let fp = tern_core::tls::parse_fingerprint(&text).map_err(|_| {
                            invalid(
                                "recovery.store_fingerprint",
                                "is not a SHA-256 in hex (sha256:... or 64 hex digits)",
                            )
                        })?;
                        Some(fp.to_string())
                    }
                    None => None,
                };
                let ca_pem = match (&o.ca_file, &fingerprint) {
                    (Some(f), None) => Some(
                        std::fs::read_to_string(f)
                            .map_err(|e| invalid("object_store.ca_file", format!("{}: {e}", f.display())))?,
                    ),
                    _ => None,
                };
                Some(HelperStore {
                    fingerprint,
                    url: o.url.clone(),
                    endpoint: endpoint.trim_end_matches('/').to_owned(),
                    gateway_target: format!("{h}:{p}"),
                    region: o.region.clone().unwrap_or_else(|| "us-east-1".into()),
                    allow_http,
                    ca_pem,
                    access_key_id: self
                        .store_access_key_id
                        .unwrap_or_else(|| o.access_key_id.clone()),
                    secret_access_key: tern_core::object::s3::Secret::new(secret.to_owned()),
                })
            }
        };
        let helper_stall_s = self.helper_stall_s.unwrap_or(600);
        if !(30..=86_400).contains(&helper_stall_s) {
            return Err(invalid(
                "recovery.helper_stall_s",
                format!("{helper_stall_s} is not in 30..=86400"),
            ));
        }
        let timeout_minutes = self.timeout_minutes.unwrap_or(720);
        if timeout_minutes == 0 {
            return Err(invalid("recovery.timeout_minutes", "must be at least 1"));
        }
        let stop_grace_s = self.stop_grace_s.unwrap_or(60);
        if stop_grace_s > 3600 {
            return Err(invalid("recovery.stop_grace_s", "must be at most 3600"));
        }
        Ok(RecoveryConfig {
            helper_image,
            qemu,
            default_flavor,
            helper_flavor,
            store,
            drill_store_address: self
                .drill_store_address
                .unwrap_or(std::net::Ipv4Addr::new(10, 0, 2, 100)),
            helper_stall_s,
            timeout: std::time::Duration::from_secs(timeout_minutes * 60),
            stop_grace: std::time::Duration::from_secs(stop_grace_s),
        })
    }
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
    /// Boot-in-Cloud, when configured.
    pub recovery: Option<RecoveryConfig>,
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
            recovery: self
                .recovery
                .map(|r| r.validate(self.object_store.as_ref()))
                .transpose()?,
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

    #[test]
    fn recovery_section_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("helper.img");
        std::fs::write(&img, b"x").unwrap();
        let secret = dir.path().join("s3.secret");
        std::fs::write(&secret, "sekrit\n").unwrap();
        let store = format!(
            "[object_store]\nurl = 's3://tern-dr/site-a'\nendpoint = 'http://127.0.0.1:9000'\naccess_key_id = 'AK'\nsecret_file = '{}'\n",
            secret.display()
        );
        let parse = |text: &str| toml::from_str::<ConfigFile>(text).unwrap().validate();

        // Defaults: TCG or KVM chosen at run time, the store as the gateway sees it.
        let c = parse(&format!(
            "[recovery]\nhelper_image = '{}'\nstore_endpoint_for_instances = 'http://10.0.2.2:9000'\nallow_http = true\n{store}",
            img.display()
        ))
        .unwrap();
        let r = c.recovery.unwrap();
        assert_eq!(r.qemu.accel, crate::provider::qemu::Accel::Auto);
        assert_eq!(r.default_flavor, crate::provider::Flavor::default());
        let s = r.store.unwrap();
        assert_eq!(s.endpoint, "http://10.0.2.2:9000");
        assert_eq!(s.gateway_target, "127.0.0.1:9000");
        assert_eq!(s.access_key_id, "AK");
        assert_eq!(s.secret_access_key.expose(), "sekrit");

        let refused = |text: String, field: &str| match parse(&text) {
            Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{text}"),
            other => panic!("{text}: {other:?}"),
        };
        refused("[recovery]\naccel = 'tcg'".into(), "recovery.helper_image");
        refused(
            "[recovery]\nhelper_image = '/nonexistent/helper.img'".into(),
            "recovery.helper_image",
        );
        refused(
            format!(
                "[recovery]\nhelper_image = '{}'\nstore_endpoint_for_instances = 'http://10.0.2.2:9000'\n{store}",
                img.display()
            ),
            "recovery.store_endpoint_for_instances",
        );
        refused(
            format!(
                "[recovery]\nhelper_image = '{}'\ndefault_flavor = {{ vcpus = 0, ram_mib = 512 }}",
                img.display()
            ),
            "recovery.default_flavor",
        );
        refused(
            format!(
                "[recovery]\nhelper_image = '{}'\nstore_endpoint_for_instances = 'http://x'",
                img.display()
            ),
            "recovery.store_endpoint_for_instances",
        );
        assert!(toml::from_str::<ConfigFile>("[recovery]\nhelper = '/x'").is_err());
        assert!(toml::from_str::<ConfigFile>("[recovery]\naccel = 'hvf'").is_err());
    }
}
