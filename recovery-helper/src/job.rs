//! The recovery helper VM's one job (`tern-recovery-helper job`; contract in
//! `docs/boot-in-cloud.md`): find the job, restore every disk of a point from object storage
//! and/or repair the guest, say what happens on the console, then reboot or power off.
//!
//! - [`Job`]: the JSON document (version 1, unknown fields rejected), validated by
//!   [`Job::parse`]. Secrets in it never show in `Debug` output or on the console.
//! - Where it is found: the kernel command line ([`job_from_cmdline`]), a config drive
//!   ([`read_config_drive`]), the metadata service ([`fetch_metadata`]).
//! - Target disks by virtio serial ([`find_by_serial`], sysfs root injectable for tests).
//! - [`check_helper_vm`]: refuses to run anywhere but in a helper VM (marker file and a RAM
//!   root file system).
//! - [`Status`]: the `status.json` written to the bucket in `restore-repair` jobs.
//! - [`console_line`], [`result_line`]: the console protocol (`TERN-HELPER <time> <message>`,
//!   one final `TERN-HELPER-RESULT`).
//!
//! The driver that runs a job lives in the binary (`main.rs`); everything here is free of side
//! effects on the machine except the explicitly named probes (`blkid`, `mount`).

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::repair::NetworkMode;

/// The only job format version.
pub const VERSION: u32 = 1;
/// Where a config drive's file system is mounted while the job is read.
pub const CONFIG_MOUNT: &str = "/run/tern-config-drive";
/// The metadata service's user data (OpenStack layout).
pub const METADATA_URL: &str = "http://169.254.169.254/openstack/latest/user_data";
/// The largest job accepted, in bytes (a job is a few hundred bytes plus a CA bundle).
pub const MAX_JOB_BYTES: usize = 1 << 20;
/// Labels of config drives, in the order they are tried (FAT labels may be upper case).
pub const CONFIG_LABELS: &[&str] = &["config-2", "CONFIG-2", "cidata", "CIDATA"];
/// Files on a config drive that may hold the job, first found wins.
pub const CONFIG_FILES: &[&str] = &["tern/job.json", "openstack/latest/user_data", "user-data"];

/// Why a job could not be found, read or run.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The document is not a valid job; the message says what is wrong.
    #[error("invalid job: {0}")]
    Invalid(String),
    /// No job anywhere.
    #[error("no job found: {0}")]
    NotFound(String),
    /// This is not a helper VM.
    #[error("{0}")]
    NotHelper(String),
    /// A target disk is missing.
    #[error("{0}")]
    NoDevice(String),
    /// A file or device operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A string that never shows in `Debug` output (credentials, keys).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Redacted(String);

impl Redacted {
    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// What the job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Object mode: restore every disk of the point from the store, then repair.
    RestoreRepair,
    /// Block mode: the disks already hold the point; repair only.
    Repair,
}

/// What the helper does when the job is done (either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum After {
    /// Reboot: the same instance boots the recovered system.
    Reboot,
    /// Power off: the orchestrator takes the volumes.
    Poweroff,
}

/// Where a `restore-repair` job's point is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// The store, `s3://BUCKET[/PREFIX]`.
    pub url: String,
    /// The S3 endpoint, `https://HOST[:PORT]` (`http://` only with `allow_http`).
    pub endpoint: String,
    /// The S3 region.
    #[serde(default = "default_region")]
    pub region: String,
    /// Allow a plain-HTTP endpoint.
    #[serde(default)]
    pub allow_http: bool,
    /// Trust the CA certificates in this PEM text (instead of the system's roots).
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// Trust exactly the certificate with this fingerprint (`sha256:...`).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: Redacted,
    /// The key file's content, for encrypted points.
    #[serde(default)]
    pub encryption_key: Option<Redacted>,
    /// The AEAD the points were made with.
    #[serde(default = "default_cipher")]
    pub cipher: String,
    /// The host.
    pub host: String,
    /// The point id, or `latest`.
    #[serde(default = "default_point")]
    pub point: String,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_cipher() -> String {
    "aes-256-gcm".into()
}
fn default_point() -> String {
    "latest".into()
}
fn default_stall() -> u64 {
    600
}

/// One target disk: the point's disk id and how to find its device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDisk {
    /// The disk's id in the point (`sda`).
    pub disk: String,
    /// The device's virtio serial (`/sys/block/*/serial`).
    #[serde(default)]
    pub serial: Option<String>,
    /// The device path, where a cloud offers no serials.
    #[serde(default)]
    pub device: Option<PathBuf>,
}

/// How to repair.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RepairSpec {
    /// Keep static addresses instead of switching to DHCP.
    #[serde(default)]
    pub keep_static_ip: bool,
    /// `NAME=MAC` pins (with `keep_static_ip`).
    #[serde(default)]
    pub pin_nic: Vec<String>,
    /// The root file system's device, when the disks hold several.
    #[serde(default)]
    pub root: Option<PathBuf>,
}

/// A job (see the module docs and `docs/boot-in-cloud.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// Format version, [`VERSION`].
    pub version: u32,
    /// The recovery id (`[A-Za-z0-9._-]`, at most 64).
    pub id: String,
    /// What to do.
    pub action: Action,
    /// What to do afterwards.
    pub after: After,
    /// Seconds without progress before the watchdog gives up.
    #[serde(default = "default_stall")]
    pub stall_s: u64,
    /// The store (`restore-repair` only).
    #[serde(default)]
    pub source: Option<Source>,
    /// The disks, in the guest's order.
    pub disks: Vec<JobDisk>,
    /// Repair options.
    #[serde(default)]
    pub repair: RepairSpec,
}

fn valid_word(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl Job {
    /// Parses and validates a job document.
    pub fn parse(bytes: &[u8]) -> Result<Self, JobError> {
        if bytes.len() > MAX_JOB_BYTES {
            return Err(JobError::Invalid(format!(
                "{} bytes; at most {MAX_JOB_BYTES}",
                bytes.len()
            )));
        }
        // The version first, so that a future format gets a clear message rather than a
        // complaint about one of its fields.
        #[derive(Deserialize)]
        struct Version {
            version: Option<serde_json::Value>,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(|e| JobError::Invalid(e.to_string()))?;
        match v.version {
            Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => {}
            Some(other) => {
                return Err(JobError::Invalid(format!(
                    "version {other} is not supported (this helper reads version {VERSION})"
                )));
            }
            None => return Err(JobError::Invalid("missing field `version`".into())),
        }
        let job: Job = serde_json::from_slice(bytes).map_err(|e| JobError::Invalid(e.to_string()))?;
        job.validate()?;
        Ok(job)
    }

    fn validate(&self) -> Result<(), JobError> {
        let bad = |m: String| Err(JobError::Invalid(m));
        if !valid_word(&self.id, 64) {
            return bad(format!("id {:?} must be 1 to 64 of A-Z a-z 0-9 . _ -", self.id));
        }
        if self.stall_s == 0 || self.stall_s > 7 * 24 * 3600 {
            return bad(format!("stall_s {} must be 1 to 604800", self.stall_s));
        }
        match (self.action, &self.source) {
            (Action::RestoreRepair, None) => return bad("a restore-repair job needs a source".into()),
            (Action::Repair, Some(_)) => {
                return bad("a repair job takes no source (the disks already hold the point)".into());
            }
            _ => {}
        }
        if self.disks.is_empty() {
            return bad("no disks".into());
        }
        for (i, d) in self.disks.iter().enumerate() {
            if !valid_word(&d.disk, 64) {
                return bad(format!("disks[{i}]: disk {:?} is not a disk id", d.disk));
            }
            if self.disks[..i].iter().any(|o| o.disk == d.disk) {
                return bad(format!("disks[{i}]: disk {} is listed twice", d.disk));
            }
            match (&d.serial, &d.device) {
                (Some(s), None) if valid_word(s, 64) => {}
                (Some(s), None) => {
                    return bad(format!(
                        "disks[{i}]: serial {s:?} must be 1 to 64 of A-Z a-z 0-9 . _ -"
                    ));
                }
                (None, Some(p))
                    if p.starts_with("/dev/")
                        && !p.components().any(|c| c == std::path::Component::ParentDir) => {}
                (None, Some(p)) => {
                    return bad(format!("disks[{i}]: device {} is not under /dev", p.display()));
                }
                _ => return bad(format!("disks[{i}]: give exactly one of serial and device")),
            }
        }
        if let Some(s) = &self.source {
            if s.ca_pem.is_some() && s.fingerprint.is_some() {
                return bad("source: give ca_pem or fingerprint, not both".into());
            }
            if s.cipher.parse::<tern_core::object::Cipher>().is_err() {
                return bad(format!("source: unknown cipher {:?}", s.cipher));
            }
            if tern_core::HostId::new(s.host.as_str()).is_err() {
                return bad(format!("source: host {:?} is not a host id", s.host));
            }
            if s.point != "latest" && tern_core::PointId::new(s.point.as_str()).is_err() {
                return bad(format!("source: point {:?} is not a point id", s.point));
            }
            if tern_core::object::s3::parse_url(&s.url).is_err() {
                return bad(format!("source: url {:?} is not s3://BUCKET[/PREFIX]", s.url));
            }
        }
        self.network_mode()?;
        Ok(())
    }

    /// The repair's network handling.
    pub fn network_mode(&self) -> Result<NetworkMode, JobError> {
        if !self.repair.keep_static_ip {
            if !self.repair.pin_nic.is_empty() {
                return Err(JobError::Invalid("repair: pin_nic needs keep_static_ip".into()));
            }
            return Ok(NetworkMode::Dhcp);
        }
        let pins = self
            .repair
            .pin_nic
            .iter()
            .map(|p| parse_pin_nic(p).map_err(JobError::Invalid))
            .collect::<Result<_, _>>()?;
        Ok(NetworkMode::KeepStatic { pins })
    }
}

/// Parses a `NAME=MAC` NIC pin (`ens192=52:54:00:12:34:56`).
pub fn parse_pin_nic(p: &str) -> Result<(String, String), String> {
    let bad = || format!("pin {p:?}: expected NAME=aa:bb:cc:dd:ee:ff");
    let (name, mac) = p.split_once('=').ok_or_else(bad)?;
    let valid_mac = mac.split(':').count() == 6
        && mac
            .split(':')
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()));
    let valid_name = !name.is_empty()
        && name.len() < 16
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if !valid_mac || !valid_name {
        return Err(bad());
    }
    Ok((name.to_owned(), mac.to_owned()))
}

/// Decodes base64url (RFC 4648 §5; `=` padding optional; the standard alphabet's `+` and `/`
/// are accepted too).
pub fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // One leftover sextet cannot encode a byte.
    (bits < 6).then_some(out)
}

/// The job on a kernel command line (`tern.job=<base64url JSON>`): `None` when there is none,
/// an error when it is there but not base64url.
pub fn job_from_cmdline(cmdline: &str) -> Option<Result<Vec<u8>, JobError>> {
    let value = cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("tern.job="))?;
    Some(
        base64url_decode(value)
            .ok_or_else(|| JobError::Invalid("tern.job= on the kernel command line is not base64url".into())),
    )
}

/// The block device whose virtio serial is `serial`: the first `<sys_block>/NAME/serial`
/// (trimmed) equal to it gives `/dev/NAME`.
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Result<PathBuf, JobError> {
    let entries = std::fs::read_dir(sys_block).map_err(|source| JobError::Io {
        what: format!("listing {}", sys_block.display()),
        source,
    })?;
    let mut seen = Vec::new();
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let Ok(s) = std::fs::read_to_string(sys_block.join(&name).join("serial")) else {
            continue;
        };
        let s = s.trim();
        if s == serial {
            return Ok(Path::new("/dev").join(&name));
        }
        seen.push(format!("{name}={s}"));
    }
    Err(JobError::NoDevice(format!(
        "no disk has serial {serial} (serials: {})",
        if seen.is_empty() {
            "none".to_owned()
        } else {
            seen.join(" ")
        }
    )))
}

/// `statfs` type of ramfs.
const RAMFS_MAGIC: i64 = 0x8584_58f6;
/// `statfs` type of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Refuses unless this is a helper VM: `marker` exists and the root file system is a RAM file
/// system (ramfs or tmpfs: the helper runs from its initramfs).
pub fn check_helper_vm(marker: &Path, root: &Path) -> Result<(), JobError> {
    if !marker.exists() {
        return Err(JobError::NotHelper(format!(
            "refusing to run a job outside a recovery helper VM: {} is missing",
            marker.display()
        )));
    }
    let st = rustix::fs::statfs(root).map_err(|e| JobError::Io {
        what: format!("statfs {}", root.display()),
        source: e.into(),
    })?;
    let kind = st.f_type;
    if kind != RAMFS_MAGIC && kind != TMPFS_MAGIC {
        return Err(JobError::NotHelper(format!(
            "refusing to run a job outside a recovery helper VM: {} is not a RAM file system (type {kind:#x})",
            root.display()
        )));
    }
    Ok(())
}

/// Reads at most [`MAX_JOB_BYTES`] + 1 bytes of `path` (so that an oversized job is refused,
/// not truncated).
fn read_limited(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_JOB_BYTES as u64 + 1)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

/// The job in a mounted config drive at `dir`: the first of [`CONFIG_FILES`] present.
pub fn job_in_dir(dir: &Path) -> Option<(PathBuf, std::io::Result<Vec<u8>>)> {
    CONFIG_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .map(|p| {
            let r = read_limited(&p);
            (p, r)
        })
}

/// Finds a config drive (by label, [`CONFIG_LABELS`], with `blkid -t`), mounts it read-only at
/// [`CONFIG_MOUNT`] (FAT or ISO 9660), reads the job and unmounts it. `Ok(None)` when there is
/// no config drive or none holds a job.
pub fn read_config_drive() -> Result<Option<(String, Vec<u8>)>, JobError> {
    use crate::repair::sys;
    for label in CONFIG_LABELS {
        let Ok(out) = sys::run_status(
            "blkid",
            ["-c", "/dev/null", "-o", "device", "-t", &format!("LABEL={label}")],
        ) else {
            continue;
        };
        for dev in sys::stdout(&out).lines().map(str::trim).filter(|l| !l.is_empty()) {
            std::fs::create_dir_all(CONFIG_MOUNT).map_err(|source| JobError::Io {
                what: format!("creating {CONFIG_MOUNT}"),
                source,
            })?;
            let mounted = ["vfat", "iso9660"].iter().any(|fs| {
                sys::run_status(
                    "mount",
                    ["-t", fs, "-o", "ro,nodev,nosuid,noexec", dev, CONFIG_MOUNT],
                )
                .is_ok_and(|o| o.status.success())
            });
            if !mounted {
                tracing::warn!(
                    device = dev,
                    label,
                    "the config drive could not be mounted (vfat or iso9660)"
                );
                continue;
            }
            let found = job_in_dir(Path::new(CONFIG_MOUNT));
            let _ = sys::run_status("umount", [CONFIG_MOUNT]);
            match found {
                Some((path, Ok(bytes))) => {
                    let rel = path
                        .strip_prefix(CONFIG_MOUNT)
                        .unwrap_or(&path)
                        .display()
                        .to_string();
                    return Ok(Some((format!("config drive {dev} ({label}) {rel}"), bytes)));
                }
                Some((path, Err(source))) => {
                    return Err(JobError::Io {
                        what: format!("reading {} on config drive {dev}", path.display()),
                        source,
                    });
                }
                None => tracing::warn!(device = dev, label, "the config drive holds no job"),
            }
        }
    }
    Ok(None)
}

/// GETs the job from the metadata service ([`METADATA_URL`], plain HTTP/1.0) with `timeout`
/// for connecting and for each read. `Ok(None)` when the service does not answer or has no
/// user data.
pub fn fetch_metadata(addr: std::net::SocketAddr, timeout: Duration) -> Result<Option<Vec<u8>>, JobError> {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
        return Ok(None);
    };
    let io = |source| JobError::Io {
        what: format!("reading {METADATA_URL}"),
        source,
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        s,
        "GET /openstack/latest/user_data HTTP/1.0\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut resp = Vec::new();
    s.take((MAX_JOB_BYTES + 16 * 1024) as u64)
        .read_to_end(&mut resp)
        .map_err(io)?;
    parse_http_response(&resp)
}

/// The body of a complete HTTP/1.x response if its status is 200; `None` for any other status
/// (no user data, or something else answering at that address: QEMU's user network passes
/// 169.254.169.254 through to the host's own metadata service).
pub fn parse_http_response(resp: &[u8]) -> Result<Option<Vec<u8>>, JobError> {
    let bad = |m: &str| JobError::Invalid(format!("metadata service: {m}"));
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no complete HTTP header"))?;
    let head = String::from_utf8_lossy(&resp[..end]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| bad("no status line"))?;
    if status == "200" {
        Ok(Some(resp[end + 4..].to_vec()))
    } else {
        tracing::debug!(status, "the metadata service has no job");
        Ok(None)
    }
}

/// A step of a job, as written to `status.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// The job was read and the helper starts.
    Starting,
    /// Disks are being restored.
    Restoring,
    /// The guest is being repaired.
    Repairing,
    /// Done; the instance reboots into the recovered system.
    Rebooting,
    /// Done; the helper powers off.
    PoweringOff,
    /// The job failed (`message` says why); the helper powers off.
    Failed,
}

/// `<prefix>/recoveries/<id>/status.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// The job id.
    pub id: String,
    /// The step.
    pub state: State,
    /// What happens, or why it failed (one line, no secrets).
    pub message: String,
    /// RFC 3339 UTC.
    pub time: String,
}

impl Status {
    /// The object key under the store's `prefix` (may be empty).
    pub fn key(prefix: &str, id: &str) -> String {
        let prefix = prefix.trim_matches('/');
        if prefix.is_empty() {
            format!("recoveries/{id}/status.json")
        } else {
            format!("{prefix}/recoveries/{id}/status.json")
        }
    }
}

/// Now, RFC 3339 UTC with seconds (`2026-11-24T10:15:00Z`).
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `text` on one line: control characters (newlines included) become spaces, runs of spaces
/// one, at most `max` characters.
pub fn one_line(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out.trim_end().to_owned()
}

/// A console line: `TERN-HELPER <time> <message>` (message made one line).
pub fn console_line(time: &str, message: &str) -> String {
    format!("TERN-HELPER {time} {}", one_line(message, 2000))
}

/// The final line: `TERN-HELPER-RESULT id=<id> status=ok` or `... status=failed reason=<one line>`.
pub fn result_line(id: &str, result: Result<(), &str>) -> String {
    match result {
        Ok(()) => format!("TERN-HELPER-RESULT id={id} status=ok"),
        Err(reason) => format!(
            "TERN-HELPER-RESULT id={id} status=failed reason={}",
            one_line(reason, 400)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repair_job() -> String {
        r#"{"version":1,"id":"r-1","action":"repair","after":"poweroff","disks":[{"disk":"sda","serial":"tern-sda"}]}"#.into()
    }

    fn restore_job() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "id": "r-20261124-0001",
            "action": "restore-repair",
            "after": "reboot",
            "stall_s": 600,
            "source": {
                "url": "s3://tern-dr/site-a",
                "endpoint": "http://10.0.2.2:7480",
                "region": "us-east-1",
                "allow_http": true,
                "ca_pem": null,
                "fingerprint": null,
                "access_key_id": "AKEXAMPLE",
                "secret_access_key": "very-secret-value",
                "encryption_key": "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "cipher": "aes-256-gcm",
                "host": "web-01",
                "point": "latest"
            },
            "disks": [
                { "disk": "sda", "serial": "tern-sda" },
                { "disk": "sdb", "device": "/dev/vdc" }
            ],
            "repair": { "keep_static_ip": false, "pin_nic": [], "root": null }
        })
    }

    fn parse(v: &serde_json::Value) -> Result<Job, JobError> {
        Job::parse(v.to_string().as_bytes())
    }

    fn invalid(v: &serde_json::Value) -> String {
        match parse(v) {
            Err(JobError::Invalid(m)) => m,
            other => panic!("expected an invalid job, got {other:?}"),
        }
    }

    #[test]
    fn the_contract_example_parses() {
        let job = parse(&restore_job()).unwrap();
        assert_eq!(job.action, Action::RestoreRepair);
        assert_eq!(job.after, After::Reboot);
        assert_eq!(job.stall_s, 600);
        let s = job.source.as_ref().unwrap();
        assert_eq!(s.secret_access_key.expose(), "very-secret-value");
        assert!(s.allow_http);
        assert_eq!(job.disks[1].device.as_deref(), Some(Path::new("/dev/vdc")));
        assert_eq!(job.network_mode().unwrap(), NetworkMode::Dhcp);

        let job = Job::parse(repair_job().as_bytes()).unwrap();
        assert_eq!(
            (job.action, job.after, job.stall_s),
            (Action::Repair, After::Poweroff, 600)
        );
        assert_eq!(job.repair, RepairSpec::default());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let job = parse(&restore_job()).unwrap();
        let text = format!("{job:?}");
        assert!(!text.contains("very-secret-value"), "{text}");
        assert!(!text.contains("0123456789abcdef"), "{text}");
        assert!(text.contains("AKEXAMPLE"));
    }

    #[test]
    fn invalid_jobs_are_refused_with_a_reason() {
        let mut v = restore_job();
        v["extra"] = 1.into();
        assert!(invalid(&v).contains("unknown field `extra`"));
        let mut v = restore_job();
        v["source"]["bogus"] = true.into();
        assert!(invalid(&v).contains("unknown field `bogus`"));
        let mut v = restore_job();
        v["version"] = 2.into();
        assert!(invalid(&v).contains("version 2 is not supported"));
        let mut v = restore_job();
        v["version"] = "1".into();
        assert!(invalid(&v).contains("not supported"));
        let mut v = restore_job();
        v.as_object_mut().unwrap().remove("version");
        assert!(invalid(&v).contains("missing field `version`"));
        let mut v = restore_job();
        v["action"] = "format".into();
        assert!(invalid(&v).contains("unknown variant `format`"));
        let mut v = restore_job();
        v["id"] = "../x".into();
        assert!(invalid(&v).contains("id"));
        let mut v = restore_job();
        v["source"] = serde_json::Value::Null;
        assert!(invalid(&v).contains("needs a source"));
        let mut v = restore_job();
        v["action"] = "repair".into();
        assert!(invalid(&v).contains("takes no source"));
        let mut v = restore_job();
        v["disks"] = serde_json::json!([]);
        assert!(invalid(&v).contains("no disks"));
        let mut v = restore_job();
        v["disks"][0]["device"] = "/dev/vda".into();
        assert!(invalid(&v).contains("exactly one of serial and device"));
        let mut v = restore_job();
        v["disks"][1]["device"] = "/etc/passwd".into();
        assert!(invalid(&v).contains("not under /dev"));
        let mut v = restore_job();
        v["disks"][1]["device"] = "/dev/../etc/passwd".into();
        assert!(invalid(&v).contains("not under /dev"));
        let mut v = restore_job();
        v["disks"][1]["disk"] = "sda".into();
        assert!(invalid(&v).contains("listed twice"));
        let mut v = restore_job();
        v["disks"][0]["serial"] = "a b".into();
        assert!(invalid(&v).contains("serial"));
        let mut v = restore_job();
        v["stall_s"] = 0.into();
        assert!(invalid(&v).contains("stall_s"));
        let mut v = restore_job();
        v["source"]["fingerprint"] = "sha256:00".into();
        v["source"]["ca_pem"] = "x".into();
        assert!(invalid(&v).contains("not both"));
        let mut v = restore_job();
        v["source"]["cipher"] = "rot13".into();
        assert!(invalid(&v).contains("cipher"));
        let mut v = restore_job();
        v["source"]["url"] = "https://x".into();
        assert!(invalid(&v).contains("url"));
        let mut v = restore_job();
        v["repair"]["pin_nic"] = serde_json::json!(["ens192=52:54:00:12:34:56"]);
        assert!(invalid(&v).contains("needs keep_static_ip"));
        v["repair"]["keep_static_ip"] = true.into();
        assert_eq!(
            parse(&v).unwrap().network_mode().unwrap(),
            NetworkMode::KeepStatic {
                pins: vec![("ens192".into(), "52:54:00:12:34:56".into())]
            }
        );
        v["repair"]["pin_nic"] = serde_json::json!(["ens192=52:54:00"]);
        assert!(invalid(&v).contains("pin"));
        // Not JSON, too big, and a secret never echoed in an error.
        assert!(matches!(Job::parse(b"\xff{"), Err(JobError::Invalid(_))));
        assert!(matches!(
            Job::parse(&vec![b' '; MAX_JOB_BYTES + 1]),
            Err(JobError::Invalid(_))
        ));
        let mut v = restore_job();
        v["source"]["secret_access_key"] = 5.into();
        assert!(!invalid(&v).contains("very-secret-value"));
    }

    #[test]
    fn base64url_decodes() {
        assert_eq!(base64url_decode("").unwrap(), b"");
        assert_eq!(base64url_decode("Zg").unwrap(), b"f");
        assert_eq!(base64url_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64url_decode("Zm9vYmFy").unwrap(), b"foobar");
        assert_eq!(base64url_decode("Zm9vYg").unwrap(), b"foob");
        assert_eq!(base64url_decode("-_-_").unwrap(), [0xfb, 0xff, 0xbf]);
        assert_eq!(base64url_decode("+/+/").unwrap(), [0xfb, 0xff, 0xbf]);
        assert_eq!(base64url_decode("Z"), None);
        assert_eq!(base64url_decode("Zm9v!"), None);
        assert_eq!(base64url_decode("Zm 9v"), None);
    }

    #[test]
    fn the_job_is_found_on_the_kernel_command_line() {
        // {"a":1} in base64url without padding.
        let cmdline = "BOOT_IMAGE=/vmlinuz console=ttyS0,115200 tern.job=eyJhIjoxfQ quiet\n";
        assert_eq!(job_from_cmdline(cmdline).unwrap().unwrap(), br#"{"a":1}"#);
        assert!(job_from_cmdline("console=ttyS0 xtern.job=eyJhIjoxfQ").is_none());
        assert!(job_from_cmdline("console=ttyS0").is_none());
        assert!(matches!(
            job_from_cmdline("tern.job=%%%"),
            Some(Err(JobError::Invalid(_)))
        ));
        // A whole job round trip.
        let job = repair_job();
        let b64 = {
            const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut s = String::new();
            for c in job.as_bytes().chunks(3) {
                let n = c
                    .iter()
                    .enumerate()
                    .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
                for i in 0..=c.len() {
                    s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                }
            }
            s
        };
        let bytes = job_from_cmdline(&format!("ro tern.job={b64}")).unwrap().unwrap();
        assert_eq!(Job::parse(&bytes).unwrap().id, "r-1");
    }

    #[test]
    fn disks_are_found_by_serial() {
        let dir = tempfile::tempdir().unwrap();
        for (name, serial) in [
            ("vda", Some("tern-helper")),
            ("vdb", Some("tern-sda\n")),
            ("loop0", None),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            if let Some(s) = serial {
                std::fs::write(dir.path().join(name).join("serial"), s).unwrap();
            }
        }
        assert_eq!(
            find_by_serial(dir.path(), "tern-sda").unwrap(),
            Path::new("/dev/vdb")
        );
        assert_eq!(
            find_by_serial(dir.path(), "tern-helper").unwrap(),
            Path::new("/dev/vda")
        );
        let e = find_by_serial(dir.path(), "tern-sdz").unwrap_err().to_string();
        assert!(e.contains("no disk has serial tern-sdz"), "{e}");
        assert!(e.contains("vda=tern-helper vdb=tern-sda"), "{e}");
        assert!(find_by_serial(&dir.path().join("none"), "x").is_err());
    }

    #[test]
    fn a_config_drive_directory_is_read_in_order() {
        let dir = tempfile::tempdir().unwrap();
        assert!(job_in_dir(dir.path()).is_none());
        std::fs::write(dir.path().join("user-data"), "3").unwrap();
        assert_eq!(job_in_dir(dir.path()).unwrap().1.unwrap(), b"3");
        std::fs::create_dir_all(dir.path().join("openstack/latest")).unwrap();
        std::fs::write(dir.path().join("openstack/latest/user_data"), "2").unwrap();
        assert_eq!(job_in_dir(dir.path()).unwrap().1.unwrap(), b"2");
        std::fs::create_dir(dir.path().join("tern")).unwrap();
        std::fs::write(dir.path().join("tern/job.json"), "1").unwrap();
        let (p, r) = job_in_dir(dir.path()).unwrap();
        assert_eq!((p.ends_with("tern/job.json"), r.unwrap()), (true, b"1".to_vec()));
        std::fs::write(dir.path().join("tern/job.json"), vec![b' '; MAX_JOB_BYTES + 10]).unwrap();
        assert_eq!(
            job_in_dir(dir.path()).unwrap().1.unwrap().len(),
            MAX_JOB_BYTES + 1
        );
    }

    #[test]
    fn metadata_responses() {
        assert_eq!(
            parse_http_response(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap(),
            Some(b"{}".to_vec())
        );
        assert_eq!(
            parse_http_response(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap(),
            None
        );
        assert_eq!(
            parse_http_response(b"HTTP/1.1 426 Upgrade Required\r\n\r\n").unwrap(),
            None
        );
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_http_response(b"").is_err());
        // Nothing listens on this port (bound, then closed): no job, no error.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert_eq!(fetch_metadata(addr, Duration::from_millis(200)).unwrap(), None);
        // A server that answers.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = [0u8; 512];
            let n = s.read(&mut req).unwrap();
            assert!(req[..n].starts_with(b"GET /openstack/latest/user_data HTTP/1.0\r\n"));
            s.write_all(b"HTTP/1.0 200 OK\r\n\r\n{\"version\":1}").unwrap();
        });
        assert_eq!(
            fetch_metadata(addr, Duration::from_secs(5)).unwrap(),
            Some(b"{\"version\":1}".to_vec())
        );
        t.join().unwrap();
    }

    #[test]
    fn the_helper_vm_check_refuses_a_normal_host() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("disposable-helper");
        let e = check_helper_vm(&marker, Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("is missing"), "{e}");
        std::fs::write(&marker, "").unwrap();
        // /proc is procfs: never a RAM file system.
        let e = check_helper_vm(&marker, Path::new("/proc"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a RAM file system"), "{e}");
        // /dev/shm is tmpfs where it exists.
        if rustix::fs::statfs("/dev/shm").is_ok_and(|s| s.f_type == TMPFS_MAGIC) {
            check_helper_vm(&marker, Path::new("/dev/shm")).unwrap();
        }
    }

    #[test]
    fn status_json_and_console_lines() {
        let s = Status {
            id: "r-1".into(),
            state: State::PoweringOff,
            message: "done".into(),
            time: "2026-11-24T10:15:00Z".into(),
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"id":"r-1","state":"powering-off","message":"done","time":"2026-11-24T10:15:00Z"}"#
        );
        assert_eq!(
            serde_json::to_value(State::Restoring).unwrap(),
            serde_json::json!("restoring")
        );
        assert_eq!(Status::key("site-a/", "r-1"), "site-a/recoveries/r-1/status.json");
        assert_eq!(Status::key("", "r-1"), "recoveries/r-1/status.json");
        assert_eq!(result_line("r-1", Ok(())), "TERN-HELPER-RESULT id=r-1 status=ok");
        assert_eq!(
            result_line("r-1", Err("restore failed:\n  disk sda\r\n\tgone")),
            "TERN-HELPER-RESULT id=r-1 status=failed reason=restore failed: disk sda gone"
        );
        assert_eq!(
            result_line("r", Err(&"x".repeat(1000))).len(),
            "TERN-HELPER-RESULT id=r status=failed reason=".len() + 400
        );
        assert_eq!(
            console_line("2026-11-24T10:15:00Z", "a\nb"),
            "TERN-HELPER 2026-11-24T10:15:00Z a b"
        );
        let t = now();
        assert!(
            chrono::DateTime::parse_from_rfc3339(&t).is_ok() && t.ends_with('Z'),
            "{t}"
        );
        assert_eq!(one_line("é".repeat(3).as_str(), 5), "éé");
    }
}
