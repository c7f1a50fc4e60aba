//! Live QEMU guests through QMP: a point-in-time NBD export of a running guest's disk, with the
//! dirty bitmaps switched atomically at that point (the production path of the NBD source;
//! design and failure rules in `docs/agentless.md`, "Live guests through QMP").
//!
//! `--disk vda=qmp:/run/qemu/vm.qmp?node=NODE` (NODE: the disk's block node name, see
//! `query-named-block-nodes`). Per sync:
//!
//! 1. a fleecing image (`qemu-img create -f qcow2`, in the agent's state directory) is added as
//!    node `tern-fleece-DISK` backed by the disk's node;
//! 2. one `transaction`: `block-dirty-bitmap-add` of `tern-SYNC` (persistent), the previous
//!    point's bitmap disabled (frozen at this instant), and `blockdev-backup sync=none` from the
//!    disk to the fleecing node: from now on QEMU copies old data there before the guest
//!    overwrites it, so reading the fleecing node gives the disk as it was at the transaction;
//! 3. QEMU's NBD server on a unix socket exports the fleecing node (read-only) with the previous
//!    bitmap, and the agent reads it with its NBD client;
//! 4. after the sync, the export, job and nodes are removed whatever happened; after a commit
//!    the previous bitmap is removed; after a failure the new bitmap is merged back into the
//!    previous one, which is enabled again (it then still covers every write since the last
//!    committed point) and the new one removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::source::SourceError;

/// Prefix of the bitmaps, nodes, jobs and exports the agent makes.
pub const PREFIX: &str = "tern-";
/// Longest QMP reply line accepted (`query-block` of a large VM is a few KiB).
const MAX_LINE: usize = 16 << 20;
/// Longest wait for one QMP command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A disk of a running QEMU, as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpSpec {
    /// The QMP socket.
    pub socket: PathBuf,
    /// The disk's block node name.
    pub node: String,
}

impl QmpSpec {
    /// Parses `qmp:SOCKET?node=NODE`; `None` when `s` does not start with `qmp:`.
    pub fn parse(s: &str) -> Option<Result<Self, String>> {
        let rest = s.strip_prefix("qmp:")?;
        let usage = || format!("{s:?} is not qmp:/PATH/TO/QMP.SOCK?node=NODE");
        let Some((socket, query)) = rest.split_once('?') else {
            return Some(Err(usage()));
        };
        let node = query.strip_prefix("node=").unwrap_or_default();
        let ok_node = !node.is_empty()
            && node.len() <= 31
            && node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        Some(if socket.starts_with('/') && ok_node {
            Ok(Self {
                socket: PathBuf::from(socket),
                node: node.to_owned(),
            })
        } else {
            Err(usage())
        })
    }
}

/// A QMP connection (one command at a time; events are skipped).
#[derive(Debug)]
pub struct Qmp {
    socket: PathBuf,
    reader: Mutex<BufReader<OwnedReadHalf>>,
    writer: Mutex<OwnedWriteHalf>,
    next_id: AtomicU64,
}

impl Qmp {
    fn err(&self, reason: impl Into<String>) -> SourceError {
        SourceError::Qmp {
            socket: self.socket.clone(),
            reason: reason.into(),
        }
    }

    /// Connects, reads the greeting and leaves negotiation mode.
    pub async fn connect(socket: &Path) -> Result<Self, SourceError> {
        let fail = |reason: String| SourceError::Qmp {
            socket: socket.to_owned(),
            reason,
        };
        let stream = tokio::time::timeout(COMMAND_TIMEOUT, UnixStream::connect(socket))
            .await
            .map_err(|_| fail("timed out connecting".into()))?
            .map_err(|e| fail(format!("failed to connect: {e}")))?;
        let (r, w) = stream.into_split();
        let qmp = Self {
            socket: socket.to_owned(),
            reader: Mutex::new(BufReader::new(r)),
            writer: Mutex::new(w),
            next_id: AtomicU64::new(1),
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.err(format!("expected the QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&self) -> Result<Value, SourceError> {
        let mut reader = self.reader.lock().await;
        let mut line = String::new();
        let read = tokio::time::timeout(COMMAND_TIMEOUT, async {
            loop {
                line.clear();
                // Bounded: a line longer than MAX_LINE is refused.
                let n = (&mut *reader).take(MAX_LINE as u64).read_line(&mut line).await?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "QEMU closed QMP",
                    ));
                }
                if !line.trim().is_empty() {
                    return Ok(());
                }
            }
        })
        .await;
        match read {
            Err(_) => return Err(self.err("timed out waiting for QEMU")),
            Ok(Err(e)) => return Err(self.err(format!("failed to read: {e}"))),
            Ok(Ok(())) => {}
        }
        if !line.ends_with('\n') {
            return Err(self.err("a reply line is too long"));
        }
        serde_json::from_str(&line).map_err(|e| self.err(format!("invalid JSON from QEMU: {e}")))
    }

    /// Runs `command` with `arguments`; its `return` value, or an error with QEMU's class and
    /// description.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, SourceError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        debug!(command, "QMP");
        self.writer
            .lock()
            .await
            .write_all(line.as_bytes())
            .await
            .map_err(|e| self.err(format!("failed to send {command}: {e}")))?;
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if reply.get("id").and_then(Value::as_u64) != Some(id) {
                return Err(self.err(format!("a reply to another command: {reply}")));
            }
            if let Some(e) = reply.get("error") {
                return Err(QmpCommandError {
                    class: e["class"].as_str().unwrap_or("?").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("?").to_owned(),
                }
                .into_source(&self.socket, command));
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

/// An error QEMU returned for a command.
#[derive(Debug)]
struct QmpCommandError {
    class: String,
    desc: String,
}

impl QmpCommandError {
    fn into_source(self, socket: &Path, command: &str) -> SourceError {
        SourceError::Qmp {
            socket: socket.to_owned(),
            reason: format!("{command} failed: {} ({})", self.desc, self.class),
        }
    }
}

/// What QEMU says about one dirty bitmap of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BitmapInfo {
    name: String,
    recording: bool,
    inconsistent: bool,
}

/// The disk's size and dirty bitmaps (`query-named-block-nodes`).
async fn node_info(qmp: &Qmp, node: &str) -> Result<(u64, Vec<BitmapInfo>), SourceError> {
    let nodes = qmp
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .await?;
    let Some(n) = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"].as_str() == Some(node)))
    else {
        return Err(qmp.err(format!(
            "QEMU has no block node {node:?} (see query-named-block-nodes)"
        )));
    };
    let size = n["image"]["virtual-size"]
        .as_u64()
        .ok_or_else(|| qmp.err(format!("block node {node:?} reports no size")))?;
    let bitmaps = n["dirty-bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|b| {
                    Some(BitmapInfo {
                        name: b["name"].as_str()?.to_owned(),
                        recording: b["recording"].as_bool().unwrap_or(false),
                        inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((size, bitmaps))
}

/// A point-in-time export of one disk of a running QEMU, set up for one sync.
#[derive(Debug)]
pub struct LiveExport {
    /// The QMP socket: connected for each step only, so that the monitor is free while the
    /// disk is read (QEMU serves one client per QMP socket).
    socket: PathBuf,
    node: String,
    disk: String,
    fleece_node: String,
    fleece_file: PathBuf,
    job: String,
    export_id: String,
    /// The bitmap this sync's point starts (the new point's change token).
    next: String,
    /// The previous point's bitmap, frozen at this sync's instant and exported; `None` for a
    /// full read.
    prev: Option<String>,
    /// The NBD URI of the export.
    pub uri: String,
    torn_down: bool,
}

impl LiveExport {
    /// The new point's change token.
    pub fn next_token(&self) -> &str {
        &self.next
    }

    /// The exported bitmap, if any.
    pub fn bitmap(&self) -> Option<&str> {
        self.prev.as_deref()
    }

    /// Freezes the disk `spec.node` at this instant and exports it on `nbd_socket`. `token` is
    /// the latest point's change token (the bitmap to read changes from, if it is still a valid
    /// `tern-` bitmap of the node); `sync` names the new bitmap.
    pub async fn start(
        spec: &QmpSpec,
        disk: &str,
        sync: &str,
        token: Option<&str>,
        work_dir: &Path,
    ) -> Result<Self, SourceError> {
        let qmp = Qmp::connect(&spec.socket).await?;
        let node = spec.node.clone();
        let (size, bitmaps) = node_info(&qmp, &node).await?;
        let next = format!("{PREFIX}{sync}");
        let fleece_node = format!("{PREFIX}fleece-{disk}");
        let job = format!("{PREFIX}backup-{disk}");
        let export_id = format!("{PREFIX}export-{disk}");
        let fleece_file = work_dir.join(format!("{disk}.fleece.qcow2"));
        let nbd_socket = work_dir.join(format!("{disk}.qmp-nbd.sock"));

        // What an earlier attempt may have left: its export, job and fleecing node.
        cleanup_stale(&qmp, &export_id, &job, &fleece_node).await;

        let prev = token.filter(|t| t.starts_with(PREFIX) && *t != next).and_then(|t| {
            match bitmaps.iter().find(|b| b.name == t) {
                Some(b) if b.inconsistent => {
                    warn!(node, bitmap = t, "the previous point's bitmap is inconsistent (QEMU stopped uncleanly?); reading the whole disk");
                    None
                }
                Some(_) => Some(t.to_owned()),
                None => {
                    info!(node, bitmap = t, "the previous point's bitmap is gone (QEMU restarted without it?); reading the whole disk");
                    None
                }
            }
        });
        // A resumed sync finds its own bitmap: keep it (it started at the first attempt).
        let next_exists = bitmaps.iter().any(|b| b.name == next);

        let out = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&fleece_file)
            .arg(size.to_string())
            .output()
            .await
            .map_err(|e| qmp.err(format!("failed to run qemu-img: {e}")))?;
        if !out.status.success() {
            return Err(qmp.err(format!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut export = Self {
            socket: spec.socket.clone(),
            node: node.clone(),
            disk: disk.to_owned(),
            fleece_node: fleece_node.clone(),
            fleece_file: fleece_file.clone(),
            job: job.clone(),
            export_id: export_id.clone(),
            next: next.clone(),
            prev: prev.clone(),
            uri: format!("nbd+unix:///{disk}?socket={}", nbd_socket.display()),
            torn_down: false,
        };
        let r = export.setup(&qmp, next_exists, &nbd_socket).await;
        drop(qmp);
        if let Err(e) = r {
            export.teardown().await;
            return Err(e);
        }
        Ok(export)
    }

    async fn setup(&self, q: &Qmp, next_exists: bool, nbd_socket: &Path) -> Result<(), SourceError> {
        q.execute(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": self.fleece_node,
                "file": { "driver": "file", "filename": self.fleece_file },
                "backing": self.node,
            }),
        )
        .await?;
        let mut actions = Vec::new();
        if !next_exists {
            actions.push(json!({ "type": "block-dirty-bitmap-add",
                "data": { "node": self.node, "name": self.next, "persistent": true } }));
        }
        if let Some(prev) = &self.prev {
            actions.push(json!({ "type": "block-dirty-bitmap-disable",
                "data": { "node": self.node, "name": prev } }));
        }
        actions.push(json!({ "type": "blockdev-backup",
            "data": { "device": self.node, "target": self.fleece_node, "sync": "none", "job-id": self.job,
                      "auto-finalize": true, "auto-dismiss": true } }));
        q.execute("transaction", json!({ "actions": actions })).await?;
        info!(node = %self.node, bitmap = %self.next, previous = ?self.prev, "point in time frozen (fleecing)");

        let _ = std::fs::remove_file(nbd_socket);
        match q
            .execute(
                "nbd-server-start",
                json!({ "addr": { "type": "unix", "data": { "path": nbd_socket } } }),
            )
            .await
        {
            Ok(_) => {}
            Err(e) => {
                // QEMU runs one NBD server: an earlier attempt's may still run.
                debug!(error = %crate::error_chain(&e), "nbd-server-start refused; restarting it");
                let _ = q.execute("nbd-server-stop", json!({})).await;
                q.execute(
                    "nbd-server-start",
                    json!({ "addr": { "type": "unix", "data": { "path": nbd_socket } } }),
                )
                .await?;
            }
        }
        let mut args = json!({
            "type": "nbd", "id": self.export_id, "node-name": self.fleece_node,
            "name": self.disk, "writable": false,
        });
        if let Some(prev) = &self.prev {
            args["bitmaps"] = json!([prev]);
        }
        q.execute("block-export-add", args).await?;
        Ok(())
    }

    /// Removes the export, the backup job, the fleecing node and file (always, success or
    /// not). Errors are logged.
    pub async fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        match Qmp::connect(&self.socket).await {
            Ok(q) => {
                cleanup_stale(&q, &self.export_id, &self.job, &self.fleece_node).await;
                let _ = q.execute("nbd-server-stop", json!({})).await;
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "cannot reach QEMU to remove the export; the next sync removes it")
            }
        }
        let _ = tokio::fs::remove_file(&self.fleece_file).await;
    }

    /// Runs QMP commands in order on one connection, stopping at the first failure.
    async fn run(&self, steps: &[(&str, Value)]) -> Result<(), SourceError> {
        let q = Qmp::connect(&self.socket).await?;
        for (cmd, args) in steps {
            q.execute(cmd, args.clone()).await?;
        }
        Ok(())
    }

    /// After the point committed: the previous bitmap is no longer needed.
    pub async fn after_commit(&mut self) {
        self.teardown().await;
        if let Some(prev) = &self.prev
            && let Err(e) = self
                .run(&[(
                    "block-dirty-bitmap-remove",
                    json!({ "node": self.node, "name": prev }),
                )])
                .await
        {
            warn!(error = %crate::error_chain(&e), "failed to remove the previous point's bitmap");
        }
    }

    /// After a failed sync: the previous bitmap covers everything since the last committed point
    /// again (the new one's writes merged in, recording again); the new one is removed.
    pub async fn after_failure(&mut self) {
        self.teardown().await;
        let Some(prev) = self.prev.clone() else {
            // A full read: the new bitmap may stay (the next attempt reads whole anyway, and a
            // resumed sync keeps it).
            return;
        };
        let steps = [
            (
                "block-dirty-bitmap-merge",
                json!({ "node": self.node, "target": prev, "bitmaps": [self.next] }),
            ),
            (
                "block-dirty-bitmap-enable",
                json!({ "node": self.node, "name": prev }),
            ),
            (
                "block-dirty-bitmap-remove",
                json!({ "node": self.node, "name": self.next }),
            ),
        ];
        if let Err(e) = self.run(&steps).await {
            warn!(error = %crate::error_chain(&e), "failed to restore the previous point's bitmap; the next sync of this disk may read it whole");
        }
    }
}

/// Removes an export, job and node of an earlier attempt, if any (errors ignored: most mean
/// "not there").
async fn cleanup_stale(qmp: &Qmp, export_id: &str, job: &str, node: &str) {
    let _ = qmp
        .execute("block-export-del", json!({ "id": export_id, "mode": "hard" }))
        .await;
    let _ = qmp
        .execute("block-job-cancel", json!({ "device": job, "force": true }))
        .await;
    // The job goes away asynchronously; the node can be removed once it has.
    for _ in 0..100 {
        let jobs = qmp.execute("query-block-jobs", json!({})).await;
        let busy = jobs
            .ok()
            .and_then(|j| j.as_array().cloned())
            .is_some_and(|a| a.iter().any(|j| j["device"].as_str() == Some(job)));
        if !busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = qmp.execute("blockdev-del", json!({ "node-name": node })).await;
}
