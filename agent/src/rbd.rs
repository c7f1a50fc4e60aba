//! The Ceph RBD source (OpenStack on Ceph): the agent as a sync proxy reading an RBD image's
//! snapshots (the `rbd` CLI of `ceph-common`, and `qemu-nbd` with QEMU's librbd driver; the
//! protocol in `docs/rbd.md`).
//!
//! Per sync:
//! 1. the snapshot `tern-{SYNC}` is created (a resumed sync finds it and reuses it, so what an
//!    interrupted attempt landed and what the retry reads are the same point in time); its size
//!    is the disk's size;
//! 2. the snapshot is served read-only by a private `qemu-nbd` on a unix socket in the agent's
//!    state directory and read with the NBD source ([`crate::nbd`]): random access, and holes
//!    (`base:allocation`) are not read;
//! 3. with a usable change token (the previous point's snapshot, still there), `rbd export-diff
//!    --from-snap PREV IMAGE@tern-{SYNC}` is read from its pipe and validated
//!    ([`tern_core::rbd_diff`]): its `w` and `z` records are the change map. The whole stream and
//!    `rbd`'s exit status are checked before anything is sent: a truncated or lying stream fails
//!    the sync and commits nothing. Its data is not kept: the diff says *where*, and block mode
//!    needs the whole 64 KiB compare blocks around a write (Ceph reports writes at byte
//!    granularity), which the snapshot gives;
//! 4. only after the point is committed are the older `tern-*` snapshots of the image removed
//!    (never the user's own snapshots, never before the commit).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tern_core::PointId;
use tern_core::changes::ChangeMap;
use tern_core::rbd_diff::{self, Expect, ExtentWriter, SpooledDiff};
use tracing::{info, warn};

use crate::nbd::{NbdDisk, NbdOptions, NbdSpec};
use crate::source::SourceError;

/// Prefix of the snapshots the agent makes (and may remove).
pub const SNAP_PREFIX: &str = "tern-";

/// An RBD image as given on the command line (`rbd:POOL/IMAGE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdSpec {
    /// Pool (RBD namespaces are not supported).
    pub pool: String,
    /// Image name.
    pub image: String,
}

impl RbdSpec {
    /// Parses `rbd:POOL/IMAGE`; `None` when `s` does not start with `rbd:`.
    pub fn parse(s: &str) -> Option<Result<Self, String>> {
        let rest = s.strip_prefix("rbd:")?;
        let ok = |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        Some(match rest.split_once('/') {
            Some((pool, image)) if ok(pool) && ok(image) => Ok(Self {
                pool: pool.to_owned(),
                image: image.to_owned(),
            }),
            _ => Err(format!(
                "{s:?} is not rbd:POOL/IMAGE (letters, digits, '.', '_', '-')"
            )),
        })
    }

    /// `POOL/IMAGE`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }
}

/// How to reach the Ceph cluster (the `rbd` CLI's own defaults when unset: `CEPH_CONF`,
/// `/etc/ceph/ceph.conf`, `client.admin`).
#[derive(Debug, Clone, Default)]
pub struct RbdOptions {
    /// `--conf`.
    pub conf: Option<PathBuf>,
    /// `--keyring`.
    pub keyring: Option<PathBuf>,
    /// `--id` (client name without `client.`).
    pub id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SnapInfo {
    name: String,
}

#[derive(Debug, Deserialize)]
struct ImageInfo {
    size: u64,
}

/// The `rbd` CLI for one image.
#[derive(Debug, Clone)]
struct Rbd {
    spec: RbdSpec,
    opts: RbdOptions,
}

impl Rbd {
    fn err(&self, reason: String) -> SourceError {
        SourceError::Rbd {
            image: self.spec.name(),
            reason,
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("rbd");
        if let Some(c) = &self.opts.conf {
            cmd.arg("--conf").arg(c);
        }
        if let Some(k) = &self.opts.keyring {
            cmd.arg("--keyring").arg(k);
        }
        if let Some(id) = &self.opts.id {
            cmd.arg("--id").arg(id);
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs `rbd ARGS`; its stdout, or an error with its stderr.
    fn run(&self, args: &[&str]) -> Result<Vec<u8>, SourceError> {
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|e| self.err(format!("failed to run rbd (is ceph-common installed?): {e}")))?;
        if !out.status.success() {
            return Err(self.err(format!(
                "rbd {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(out.stdout)
    }

    fn snapshots(&self) -> Result<Vec<String>, SourceError> {
        let out = self.run(&["snap", "ls", "--format", "json", &self.spec.name()])?;
        let list: Vec<SnapInfo> = serde_json::from_slice(&out)
            .map_err(|e| self.err(format!("unexpected `rbd snap ls` output: {e}")))?;
        Ok(list.into_iter().map(|s| s.name).collect())
    }

    fn size(&self, snap: &str) -> Result<u64, SourceError> {
        let out = self.run(&[
            "info",
            "--format",
            "json",
            &format!("{}@{snap}", self.spec.name()),
        ])?;
        let info: ImageInfo = serde_json::from_slice(&out)
            .map_err(|e| self.err(format!("unexpected `rbd info` output: {e}")))?;
        Ok(info.size)
    }

    /// Runs `rbd export-diff --from-snap FROM IMAGE@TO -` and validates the whole stream.
    fn export_diff(&self, from: &str, to: &str, size: u64) -> Result<SpooledDiff, SourceError> {
        let mut cmd = self.command();
        cmd.args(["export-diff", "--no-progress", "--from-snap", from]);
        cmd.arg(format!("{}@{to}", self.spec.name()))
            .arg("-")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| self.err(format!("failed to run rbd export-diff: {e}")))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(self.err("rbd export-diff has no stdout".into()));
        };
        let expect = Expect::incremental(from, to).with_max_size(size);
        let parsed = rbd_diff::decode(stdout, &expect, &mut Discard);
        if parsed.is_err() {
            let _ = child.kill();
        }
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = child
            .wait()
            .map_err(|e| self.err(format!("failed to wait for rbd export-diff: {e}")))?;
        let what = format!("the diff {from}..{to}");
        let diff = parsed.map_err(|e| self.err(format!("{what} was refused: {e}")))?;
        if !status.success() {
            return Err(self.err(format!("rbd export-diff failed ({status}): {}", stderr.trim())));
        }
        if diff.size != size {
            return Err(self.err(format!(
                "{what} says the image has {} bytes, `rbd info` said {size}",
                diff.size
            )));
        }
        Ok(diff)
    }
}

/// Drops the data of a diff (the snapshot itself is read over NBD).
struct Discard;

impl ExtentWriter for Discard {
    fn write_at(&mut self, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
}

/// A private `qemu-nbd` serving one snapshot read-only through librbd; killed when dropped.
#[derive(Debug)]
pub struct SnapshotServer {
    child: Child,
    socket: PathBuf,
}

impl SnapshotServer {
    /// Serves `snap` to up to `clients` connections at once (more than one makes `qemu-nbd`
    /// advertise multi-conn, so the NBD source reads through that many).
    fn start(rbd: &Rbd, snap: &str, socket: &Path, clients: usize) -> Result<Self, SourceError> {
        let mut name = format!("rbd:{}@{snap}", rbd.spec.name());
        for (key, value) in [
            ("conf", rbd.opts.conf.as_ref().map(|p| p.display().to_string())),
            (
                "keyring",
                rbd.opts.keyring.as_ref().map(|p| p.display().to_string()),
            ),
            ("id", rbd.opts.id.clone()),
        ] {
            if let Some(v) = value {
                if v.contains([':', '@', '\\']) {
                    return Err(rbd.err(format!(
                        "{key} {v:?}: ':', '@' and '\\' cannot be passed to qemu-nbd"
                    )));
                }
                name.push_str(&format!(":{key}={v}"));
            }
        }
        let _ = std::fs::remove_file(socket);
        let mut child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--format", "raw"])
            .arg(format!("--shared={}", clients.max(1)))
            .arg("--socket")
            .arg(socket)
            .arg(&name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                rbd.err(format!(
                    "failed to run qemu-nbd (qemu-utils and qemu-block-extra): {e}"
                ))
            })?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            let exited = child
                .try_wait()
                .map_err(|e| rbd.err(format!("failed to wait for qemu-nbd: {e}")))?;
            if let Some(status) = exited {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                return Err(rbd.err(format!("qemu-nbd exited ({status}): {}", err.trim())));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(rbd.err("qemu-nbd did not serve the snapshot within 60 s".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child,
            socket: socket.to_owned(),
        })
    }
}

impl Drop for SnapshotServer {
    /// Stops `qemu-nbd` with SIGTERM so that librbd closes the image: a killed client leaves
    /// its watch on the image header until the OSD times it out (30 s), and the next `rbd snap
    /// create` waits for it. SIGKILL after 10 s.
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_)) | Err(_)) {
                    let _ = std::fs::remove_file(&self.socket);
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The snapshot-diff tracker of an RBD image.
#[derive(Debug)]
pub struct RbdTracker {
    rbd: Rbd,
    snap: String,
    size: u64,
    /// Keeps the snapshot's NBD server alive as long as the sync reads it.
    _server: SnapshotServer,
}

impl RbdTracker {
    /// The token of the point this sync makes: its snapshot's name.
    pub fn next_token(&self) -> &str {
        &self.snap
    }

    /// `rbd-diff:POOL/IMAGE`.
    pub fn describe(&self) -> String {
        format!("rbd-diff:{}", self.rbd.spec.name())
    }

    /// The changes since snapshot `token` (from `rbd export-diff`), when that snapshot still
    /// exists; `None` (the snapshot is then read whole) when it does not.
    pub async fn changes_since(&self, token: &str) -> Result<Option<ChangeMap>, SourceError> {
        if token == self.snap || !token.starts_with(SNAP_PREFIX) {
            return Ok(None);
        }
        let (rbd, from, to, size) = (self.rbd.clone(), token.to_owned(), self.snap.clone(), self.size);
        let diff = tokio::task::spawn_blocking(move || -> Result<Option<SpooledDiff>, SourceError> {
            if !rbd.snapshots()?.contains(&from) {
                warn!(image = %rbd.spec.name(), snap = from, "the previous point's snapshot is gone; reading the whole snapshot");
                return Ok(None);
            }
            rbd.export_diff(&from, &to, size).map(Some)
        })
        .await
        .map_err(|e| self.rbd.err(format!("the diff task failed: {e}")))??;
        Ok(diff.map(|d| d.changes))
    }

    /// After the commit: removes the image's other `tern-*` snapshots. Failures are logged (the
    /// next commit retries).
    pub async fn after_commit(&self) {
        let rbd = self.rbd.clone();
        let keep = self.snap.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<Vec<String>, SourceError> {
            let mut removed = Vec::new();
            for s in rbd.snapshots()? {
                if s != keep && s.starts_with(SNAP_PREFIX) {
                    rbd.run(&["snap", "rm", &format!("{}@{s}", rbd.spec.name())])?;
                    removed.push(s);
                }
            }
            Ok(removed)
        })
        .await;
        match r {
            Ok(Ok(removed)) if !removed.is_empty() => {
                info!(image = %self.rbd.spec.name(), ?removed, "older snapshots removed")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(error = %crate::error_chain(&e), "failed to remove older snapshots; the next sync retries")
            }
            Err(e) => warn!(error = %e, "failed to remove older snapshots; the next sync retries"),
        }
    }
}

/// Creates (or finds, for a resumed sync) the snapshot `tern-{sync}` of `spec`, serves it with
/// a private `qemu-nbd` on `socket` and opens it with the NBD source.
pub async fn open(
    spec: &RbdSpec,
    opts: &RbdOptions,
    nbd: &NbdOptions,
    sync: &PointId,
    socket: PathBuf,
) -> Result<(NbdDisk, RbdTracker), SourceError> {
    let rbd = Rbd {
        spec: spec.clone(),
        opts: opts.clone(),
    };
    let snap = format!("{SNAP_PREFIX}{sync}");
    let (r, s, sock, clients) = (rbd.clone(), snap.clone(), socket.clone(), nbd.connections);
    let (size, server) =
        tokio::task::spawn_blocking(move || -> Result<(u64, SnapshotServer), SourceError> {
            if !r.snapshots()?.contains(&s) {
                r.run(&["snap", "create", &format!("{}@{s}", r.spec.name())])?;
                info!(image = %r.spec.name(), snap = s, "snapshot created");
            }
            let size = r.size(&s)?;
            Ok((size, SnapshotServer::start(&r, &s, &sock, clients)?))
        })
        .await
        .map_err(|e| rbd.err(format!("the snapshot task failed: {e}")))??;
    let uri = format!("nbd+unix:///?socket={}", socket.display());
    let nbd_spec = NbdSpec::parse(&uri).map_err(|reason| rbd.err(reason))?;
    let (disk, _) = crate::nbd::open(&nbd_spec, nbd).await?;
    if disk.size() != size {
        return Err(rbd.err(format!(
            "qemu-nbd serves {} bytes, `rbd info` said {size}",
            disk.size()
        )));
    }
    Ok((
        disk,
        RbdTracker {
            rbd,
            snap,
            size,
            _server: server,
        },
    ))
}
