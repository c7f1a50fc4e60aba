//! Boot-in-Cloud orchestration (`docs/boot-in-cloud.md` §3): one state machine per recovery,
//! persisted in redb after every transition and resumed at start. Every step is idempotent:
//! the resources of a recovery are named after its id (volumes `<id>.<disk>` and
//! `<id>.helper`, instances `<id>` and `<id>-helper`) and reused when present.
//!
//! Block mode: volumes from the point's snapshots, a helper instance (the helper image + those
//! volumes, job `repair`, `after: poweroff`), its result line and power-off, the helper removed,
//! the instance started from the volumes. Object mode: one instance whose first disk is made
//! from the helper image (grown to the source disk's size) and whose other disks are empty, job
//! `restore-repair`, `after: reboot`; its result line `status=ok` means the same instance has
//! rebooted into the recovered system.
//!
//! Secrets (the store's secret key, a point's encryption key) go only into the job on the
//! instance's config drive; the encryption key comes with the request and is held in memory
//! until then, never in the DB.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern_core::HostId;
use tern_core::object::s3::Secret;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::blockstore::now_ms;
use crate::config::RecoveryConfig;
use crate::db::{DbError, MetaDb};
use crate::metrics::Metrics;
use crate::provider::{
    CloudProvider, ConfigDriveFile, Firmware, Flavor, GuestForward, InstanceDisk, InstanceSpec,
    InstanceState, Network, ProviderError,
};

/// Bytes of the serial log read back to look for the helper's result line.
const LOG_TAIL: u64 = 1 << 20;
/// How often a waiting step looks at its instance.
const POLL: Duration = Duration::from_secs(2);
/// The path of the job on the config drive.
pub const JOB_PATH: &str = "tern/job.json";

/// Why a recovery request or step failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("recovery record {0} is corrupt")]
    Corrupt(String),
}

/// Where a recovery's disks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The gateway's snapshots.
    Block,
    /// The object store.
    Object,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Block => "block",
            Mode::Object => "object",
        }
    }
}

/// The states of a recovery; every one but `running`, `failed` and `deleting` is a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Volumes from snapshots (block) or from the helper image and empty (object).
    CreatingVolumes,
    /// Block: the helper instance is defined and started.
    StartingHelper,
    /// Block: waiting for the helper's result line and its power-off.
    WaitingForHelper,
    /// Block: the helper instance and its boot volume are deleted.
    RemovingHelper,
    /// The recovered instance is defined and started.
    StartingInstance,
    /// Object: waiting for the helper's result line (restore, repair, reboot).
    Restoring,
    /// The recovered instance runs.
    Running,
    /// Stopped with an error; the resources stay until DELETE.
    Failed,
    /// DELETE: removing everything the recovery created.
    Deleting,
}

impl Phase {
    /// The phase after `self` succeeded.
    pub fn next(self, mode: Mode) -> Phase {
        match (mode, self) {
            (Mode::Block, Phase::CreatingVolumes) => Phase::StartingHelper,
            (Mode::Object, Phase::CreatingVolumes) => Phase::StartingInstance,
            (Mode::Block, Phase::StartingHelper) => Phase::WaitingForHelper,
            (Mode::Block, Phase::WaitingForHelper) => Phase::RemovingHelper,
            (Mode::Block, Phase::RemovingHelper) => Phase::StartingInstance,
            (Mode::Block, Phase::StartingInstance) => Phase::Running,
            (Mode::Object, Phase::StartingInstance) => Phase::Restoring,
            (Mode::Object, Phase::Restoring) => Phase::Running,
            // Block-only steps in object mode cannot happen; terminal states stay.
            (_, p) => p,
        }
    }

    /// Whether nothing more happens by itself.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Running | Phase::Failed)
    }

    fn name(self) -> &'static str {
        match self {
            Phase::CreatingVolumes => "creating_volumes",
            Phase::StartingHelper => "starting_helper",
            Phase::WaitingForHelper => "waiting_for_helper",
            Phase::RemovingHelper => "removing_helper",
            Phase::StartingInstance => "starting_instance",
            Phase::Restoring => "restoring",
            Phase::Running => "running",
            Phase::Failed => "failed",
            Phase::Deleting => "deleting",
        }
    }
}

/// What the helper said last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelperResult {
    /// `status=ok`.
    Ok,
    /// `status=failed reason=...`.
    Failed(String),
}

/// The helper's result line for job `id` in a serial log (the last one wins):
/// `TERN-HELPER-RESULT id=<id> status=ok|failed[ reason=<one line>]`. Control characters and
/// anything before the marker on its line are ignored.
pub fn parse_result(log: &str, id: &str) -> Option<HelperResult> {
    const MARK: &str = "TERN-HELPER-RESULT ";
    let mut found = None;
    for line in log.lines() {
        let Some(at) = line.find(MARK) else {
            continue;
        };
        let rest: String = line[at + MARK.len()..]
            .chars()
            .filter(|c| !c.is_control())
            .collect();
        let mut words = rest.splitn(3, ' ');
        if words.next() != Some(&format!("id={id}")) {
            continue;
        }
        match words.next() {
            Some("status=ok") => found = Some(HelperResult::Ok),
            Some("status=failed") => {
                let reason = words
                    .next()
                    .and_then(|r| r.strip_prefix("reason="))
                    .unwrap_or("no reason given")
                    .trim();
                found = Some(HelperResult::Failed(reason.to_owned()));
            }
            _ => {}
        }
    }
    found
}

/// What a waiting step decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Look again later.
    Wait,
    /// The step is done.
    Done,
    /// The recovery failed.
    Failed(String),
}

/// A waiting step's decision from the helper's result and whether its instance still runs.
/// Block mode needs the result and the power-off; object mode only the result (the instance
/// reboots into the recovered system).
pub fn judge(phase: Phase, result: Option<&HelperResult>, running: bool) -> Verdict {
    match (phase, result, running) {
        (_, Some(HelperResult::Failed(r)), _) => Verdict::Failed(format!("the helper failed: {r}")),
        (Phase::WaitingForHelper, Some(HelperResult::Ok), false) => Verdict::Done,
        (Phase::Restoring, Some(HelperResult::Ok), _) => Verdict::Done,
        (_, None, false) => Verdict::Failed("the helper instance stopped without a result line".into()),
        _ => Verdict::Wait,
    }
}

/// One step as it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepRecord {
    /// The phase.
    pub name: Phase,
    /// Start, Unix ms.
    pub started_unix_ms: u64,
    /// End, Unix ms (absent while it runs).
    pub finished_unix_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A disk of a recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryDisk {
    /// The source disk id.
    pub disk: String,
    /// Its size in bytes (object mode; block mode: known once the volume exists).
    pub size: u64,
    /// Block mode: the snapshot it comes from.
    pub snapshot: Option<String>,
    /// The volume made for it.
    pub volume: String,
}

/// A recovery as stored in the DB and shown by the API. No secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryRecord {
    /// Recovery id (also the job id).
    pub id: String,
    /// Source host.
    pub host: HostId,
    /// The point recovered (resolved from `latest`).
    pub point: String,
    /// Block or object.
    pub mode: Mode,
    /// A drill: isolated network.
    pub drill: bool,
    /// The recovered instance's size.
    pub flavor: Flavor,
    /// An encryption key came with the request (the key itself is never stored).
    pub encrypted: bool,
    /// Where it is.
    pub state: Phase,
    /// Steps so far.
    pub steps: Vec<StepRecord>,
    /// Disks, boot disk first.
    pub disks: Vec<RecoveryDisk>,
    /// The recovered instance.
    pub instance: String,
    /// Block mode: the helper instance and its boot volume.
    pub helper_instance: Option<String>,
    /// Block mode: the helper's boot volume.
    pub helper_volume: Option<String>,
    /// The serial log to read now (the helper's while it works, then the instance's).
    pub serial_log: Option<PathBuf>,
    /// Why it failed.
    pub error: Option<String>,
    /// Creation time, Unix ms.
    pub created_unix_ms: u64,
    /// Last change, Unix ms.
    pub updated_unix_ms: u64,
}

impl RecoveryRecord {
    /// Enters `phase` (recording a step unless terminal).
    pub fn enter(&mut self, phase: Phase, now: u64) {
        if let Some(s) = self.steps.last_mut()
            && s.finished_unix_ms.is_none()
        {
            s.finished_unix_ms = Some(now);
        }
        self.state = phase;
        self.updated_unix_ms = now;
        if !phase.is_terminal() {
            self.steps.push(StepRecord {
                name: phase,
                started_unix_ms: now,
                finished_unix_ms: None,
                error: None,
            });
        }
    }

    /// Fails the current step.
    pub fn fail(&mut self, error: String, now: u64) {
        if let Some(s) = self.steps.last_mut()
            && s.finished_unix_ms.is_none()
        {
            s.finished_unix_ms = Some(now);
            s.error = Some(error.clone());
        }
        self.state = Phase::Failed;
        self.error = Some(error);
        self.updated_unix_ms = now;
    }

    fn step_started(&self) -> u64 {
        self.steps
            .last()
            .map_or(self.updated_unix_ms, |s| s.started_unix_ms)
    }
}

/// `POST /api/v1/recoveries`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryRequest {
    /// Source host.
    pub host: HostId,
    /// Point id or `latest`.
    #[serde(default = "latest")]
    pub point: String,
    /// Block or object.
    pub mode: Mode,
    /// Into an isolated network, replication untouched.
    #[serde(default)]
    pub drill: bool,
    /// The instance's size (default: `recovery.default_flavor`).
    pub flavor: Option<Flavor>,
    /// Object mode: the key file's content for encrypted points. Never stored.
    pub encryption_key: Option<String>,
}

impl std::fmt::Debug for RecoveryRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryRequest")
            .field("host", &self.host)
            .field("point", &self.point)
            .field("mode", &self.mode)
            .field("drill", &self.drill)
            .field("flavor", &self.flavor)
            .field(
                "encryption_key",
                &self.encryption_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

fn latest() -> String {
    "latest".into()
}

/// The job (`docs/boot-in-cloud.md` §1). Holds secrets: serialised onto the config drive only.
#[derive(Serialize)]
struct Job<'a> {
    version: u32,
    id: &'a str,
    action: &'a str,
    after: &'a str,
    stall_s: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<JobSource<'a>>,
    disks: Vec<JobDisk<'a>>,
    repair: JobRepair,
}

#[derive(Serialize)]
struct JobSource<'a> {
    url: &'a str,
    endpoint: String,
    region: &'a str,
    allow_http: bool,
    ca_pem: Option<&'a str>,
    fingerprint: Option<&'a str>,
    access_key_id: &'a str,
    secret_access_key: &'a str,
    encryption_key: Option<&'a str>,
    cipher: &'a str,
    host: &'a str,
    point: &'a str,
}

#[derive(Serialize)]
struct JobDisk<'a> {
    disk: &'a str,
    serial: String,
}

#[derive(Serialize)]
struct JobRepair {
    keep_static_ip: bool,
    pin_nic: Vec<String>,
    root: Option<String>,
}

/// The store endpoint a drill's instance uses: the configured one with its host replaced by
/// the drill address (forwarded to the store), and that forward.
fn drill_endpoint(endpoint: &str, addr: std::net::Ipv4Addr) -> Option<(String, std::net::SocketAddrV4)> {
    let (scheme, rest) = endpoint.split_once("://")?;
    let authority = rest.split('/').next()?;
    let port = match authority.rsplit_once(':') {
        Some((h, p)) if !h.starts_with('[') || h.ends_with(']') => p.parse().ok()?,
        _ if scheme == "https" => 443,
        _ => 80,
    };
    Some((
        format!("{scheme}://{addr}:{port}"),
        std::net::SocketAddrV4::new(addr, port),
    ))
}

/// The job JSON of a recovery (with the store's secret and the encryption key).
fn job_json(
    rec: &RecoveryRecord,
    config: &RecoveryConfig,
    key: Option<&Secret>,
) -> Result<(Vec<u8>, Vec<GuestForward>), String> {
    let mut forwards = Vec::new();
    let source = match rec.mode {
        Mode::Block => None,
        Mode::Object => {
            let s = config
                .store
                .as_ref()
                .ok_or("object mode needs an [object_store] section")?;
            let endpoint = if rec.drill {
                let (e, guest) = drill_endpoint(&s.endpoint, config.drill_store_address)
                    .ok_or_else(|| format!("cannot forward to endpoint {}", s.endpoint))?;
                forwards.push(GuestForward {
                    guest,
                    target: s.gateway_target.clone(),
                });
                e
            } else {
                s.endpoint.clone()
            };
            Some(JobSource {
                url: &s.url,
                endpoint,
                region: &s.region,
                allow_http: s.allow_http,
                ca_pem: s.ca_pem.as_deref(),
                fingerprint: s.fingerprint.as_deref(),
                access_key_id: &s.access_key_id,
                secret_access_key: s.secret_access_key.expose(),
                encryption_key: key.map(Secret::expose),
                cipher: "aes-256-gcm",
                host: rec.host.as_str(),
                point: &rec.point,
            })
        }
    };
    let job = Job {
        version: 1,
        id: &rec.id,
        action: match rec.mode {
            Mode::Block => "repair",
            Mode::Object => "restore-repair",
        },
        after: match rec.mode {
            Mode::Block => "poweroff",
            Mode::Object => "reboot",
        },
        stall_s: config.helper_stall_s,
        source,
        disks: rec
            .disks
            .iter()
            .map(|d| JobDisk {
                disk: &d.disk,
                serial: format!("tern-{}", d.disk),
            })
            .collect(),
        repair: JobRepair {
            keep_static_ip: false,
            pin_nic: Vec::new(),
            root: None,
        },
    };
    let bytes = serde_json::to_vec_pretty(&job).map_err(|e| e.to_string())?;
    Ok((bytes, forwards))
}

fn new_id() -> String {
    let t = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let digits: String = t.chars().filter(char::is_ascii_digit).collect();
    let (date, time) = digits.split_at(digits.len().min(8));
    format!("r-{date}-{time}-{:04x}", rand::random::<u16>())
}

fn ignore_missing(r: Result<(), ProviderError>) -> Result<(), ProviderError> {
    match r {
        Err(ProviderError::NotFound { .. }) => Ok(()),
        other => other,
    }
}

/// A recovery's task.
#[derive(Debug)]
struct Task {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

/// Every recovery of this gateway.
#[derive(Debug)]
pub struct Recoveries {
    db: MetaDb,
    provider: Arc<dyn CloudProvider>,
    config: RecoveryConfig,
    metrics: Arc<Metrics>,
    tasks: Mutex<HashMap<String, Task>>,
    /// Encryption keys until they are on a config drive (memory only).
    keys: Mutex<HashMap<String, Secret>>,
}

impl Recoveries {
    /// The orchestrator over `provider`.
    pub fn new(
        db: MetaDb,
        provider: Arc<dyn CloudProvider>,
        config: RecoveryConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            db,
            provider,
            config,
            metrics,
            tasks: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
        })
    }

    fn load(&self, id: &str) -> Result<Option<RecoveryRecord>, RecoveryError> {
        self.db
            .recovery(id)?
            .map(|b| serde_json::from_slice(&b).map_err(|_| RecoveryError::Corrupt(id.to_owned())))
            .transpose()
    }

    fn save(&self, rec: &RecoveryRecord) -> Result<(), RecoveryError> {
        let bytes = serde_json::to_vec(rec).map_err(|_| RecoveryError::Corrupt(rec.id.clone()))?;
        self.db.put_recovery(&rec.id, &bytes)?;
        Ok(())
    }

    /// A recovery.
    pub fn get(&self, id: &str) -> Result<Option<RecoveryRecord>, RecoveryError> {
        self.load(id)
    }

    /// Every recovery, oldest first.
    pub fn list(&self) -> Result<Vec<RecoveryRecord>, RecoveryError> {
        let mut out = Vec::new();
        for (id, b) in self.db.recoveries()? {
            out.push(serde_json::from_slice::<RecoveryRecord>(&b).map_err(|_| RecoveryError::Corrupt(id))?);
        }
        out.sort_by_key(|r| (r.created_unix_ms, r.id.clone()));
        Ok(out)
    }

    /// Resumes every unfinished recovery (at start).
    pub fn resume(self: &Arc<Self>) -> Result<usize, RecoveryError> {
        let mut n = 0;
        for rec in self.list()? {
            if rec.state == Phase::Deleting {
                self.spawn_delete(rec.id.clone());
                n += 1;
            } else if !rec.state.is_terminal() {
                info!(recovery = %rec.id, state = rec.state.name(), "resuming recovery");
                self.metrics.recoveries_active.inc();
                self.spawn(rec.id.clone());
                n += 1;
            }
        }
        Ok(n)
    }

    /// Starts a recovery; its record (state `creating_volumes`).
    pub async fn start(self: &Arc<Self>, req: RecoveryRequest) -> Result<RecoveryRecord, RecoveryError> {
        let flavor = req.flavor.unwrap_or(self.config.default_flavor);
        flavor.check().map_err(RecoveryError::BadRequest)?;
        if req.encryption_key.is_some() && req.mode == Mode::Block {
            return Err(RecoveryError::BadRequest(
                "an encryption key is for object mode only".into(),
            ));
        }
        let id = new_id();
        let (point, disks) = match req.mode {
            Mode::Block => {
                let points = self.db.points(&req.host)?;
                let (pid, prec) = if req.point == "latest" {
                    points.last()
                } else {
                    points.iter().find(|(p, _)| p.as_str() == req.point)
                }
                .ok_or_else(|| {
                    RecoveryError::NotFound(format!("host {} has no point {}", req.host, req.point))
                })?;
                let disks = prec
                    .snapshots
                    .iter()
                    .map(|s| RecoveryDisk {
                        disk: s.disk.to_string(),
                        size: 0,
                        snapshot: Some(s.snapshot.clone()),
                        volume: format!("{id}.{}", s.disk),
                    })
                    .collect();
                (pid.to_string(), disks)
            }
            Mode::Object => {
                if self.config.store.is_none() {
                    return Err(RecoveryError::BadRequest(
                        "object mode needs an [object_store] section in the gateway's config".into(),
                    ));
                }
                let mut points: Vec<_> = self
                    .db
                    .object_points()?
                    .into_iter()
                    .filter(|(h, _, _)| *h == req.host)
                    .collect();
                points.sort_by_key(|(_, p, r)| (r.stored_unix_ms, p.clone()));
                let (_, pid, prec) = if req.point == "latest" {
                    points.last()
                } else {
                    points.iter().find(|(_, p, _)| p.as_str() == req.point)
                }
                .ok_or_else(|| {
                    RecoveryError::NotFound(format!(
                        "the object store index has no point {} of host {} (POST /api/v1/object/scan first?)",
                        req.point, req.host
                    ))
                })?;
                let disks = prec
                    .disks
                    .iter()
                    .map(|d| RecoveryDisk {
                        disk: d.id.clone(),
                        size: d.size,
                        snapshot: None,
                        volume: format!("{id}.{}", d.id),
                    })
                    .collect();
                (pid.to_string(), disks)
            }
        };
        let now = now_ms();
        let mut rec = RecoveryRecord {
            id: id.clone(),
            host: req.host,
            point,
            mode: req.mode,
            drill: req.drill,
            flavor,
            encrypted: req.encryption_key.is_some(),
            state: Phase::CreatingVolumes,
            steps: Vec::new(),
            disks,
            instance: id.clone(),
            helper_instance: (req.mode == Mode::Block).then(|| format!("{id}-helper")),
            helper_volume: (req.mode == Mode::Block).then(|| format!("{id}.helper")),
            serial_log: None,
            error: None,
            created_unix_ms: now,
            updated_unix_ms: now,
        };
        if rec.disks.is_empty() {
            return Err(RecoveryError::NotFound(format!(
                "point {} has no disks",
                rec.point
            )));
        }
        rec.enter(Phase::CreatingVolumes, now);
        self.save(&rec)?;
        if let Some(k) = req.encryption_key {
            self.keys
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id.clone(), Secret::new(k));
        }
        info!(recovery = %id, host = %rec.host, point = %rec.point, mode = rec.mode.as_str(), drill = rec.drill, "recovery requested");
        self.metrics.recovery(rec.mode.as_str(), "started");
        self.metrics.recoveries_active.inc();
        self.spawn(id);
        Ok(rec)
    }

    fn spawn(self: &Arc<Self>, id: String) {
        let cancel = CancellationToken::new();
        let me = self.clone();
        let (c2, id2) = (cancel.clone(), id.clone());
        let handle = tokio::spawn(async move { me.drive(&id2, c2).await });
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Task { cancel, handle });
    }

    /// Runs a recovery's steps until it is running, failed or cancelled.
    async fn drive(self: Arc<Self>, id: &str, cancel: CancellationToken) {
        loop {
            let mut rec = match self.load(id) {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    warn!(recovery = %id, error = %tern_core::error_chain(&e), "cannot read the recovery record");
                    return;
                }
            };
            if rec.state.is_terminal() || rec.state == Phase::Deleting || cancel.is_cancelled() {
                return;
            }
            // Not abandoned midway (a volume copy or an instance definition would finish in
            // the background after DELETE cleaned up): waiting steps watch `cancel` themselves.
            let outcome = self.step(&mut rec, &cancel).await;
            if cancel.is_cancelled() {
                return;
            }
            let now = now_ms();
            match outcome {
                Ok(()) => {
                    let next = rec.state.next(rec.mode);
                    info!(recovery = %id, from = rec.state.name(), to = next.name(), "recovery step done");
                    rec.enter(next, now);
                }
                Err(e) => {
                    warn!(recovery = %id, step = rec.state.name(), error = %e, "recovery failed");
                    rec.fail(e, now);
                }
            }
            if let Err(e) = self.save(&rec) {
                warn!(recovery = %id, error = %tern_core::error_chain(&e), "cannot record the recovery's state; stopping it");
                return;
            }
            if rec.state.is_terminal() {
                self.keys
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(id);
                self.metrics.recoveries_active.dec();
                let event = if rec.state == Phase::Running {
                    "running"
                } else {
                    "failed"
                };
                self.metrics.recovery(rec.mode.as_str(), event);
                if rec.state == Phase::Running {
                    info!(recovery = %id, instance = %rec.instance, "recovered instance running");
                }
                return;
            }
        }
    }

    /// Runs the step of `rec.state` (idempotent). Updates `rec` fields it learns.
    async fn step(&self, rec: &mut RecoveryRecord, cancel: &CancellationToken) -> Result<(), String> {
        let p = &self.provider;
        let err = |e: ProviderError| tern_core::error_chain(&e);
        match rec.state {
            Phase::CreatingVolumes => {
                if let Some(hv) = &rec.helper_volume
                    && p.volume(hv).await.map_err(err)?.is_none()
                {
                    p.volume_from_image(&self.config.helper_image, hv, 0)
                        .await
                        .map_err(err)?;
                }
                for (i, d) in rec.disks.iter_mut().enumerate() {
                    if let Some(v) = p.volume(&d.volume).await.map_err(err)? {
                        // Made before a restart; perhaps not grown yet.
                        if v.size < d.size {
                            p.resize_volume(&d.volume, d.size).await.map_err(err)?;
                        }
                        d.size = d.size.max(v.size);
                        continue;
                    }
                    let v = match (rec.mode, &d.snapshot) {
                        (Mode::Block, Some(s)) => p.volume_from_snapshot(s, &d.volume).await,
                        (Mode::Block, None) => return Err(format!("disk {} has no snapshot", d.disk)),
                        (Mode::Object, _) if i == 0 => {
                            p.volume_from_image(&self.config.helper_image, &d.volume, d.size)
                                .await
                        }
                        (Mode::Object, _) => p.create_volume(&d.volume, d.size).await,
                    }
                    .map_err(err)?;
                    d.size = d.size.max(v.size);
                }
                Ok(())
            }
            Phase::StartingHelper => {
                let name = rec.helper_instance.clone().ok_or("no helper instance")?;
                let hv = rec.helper_volume.clone().ok_or("no helper volume")?;
                let info = match p.instance(&name).await.map_err(err)? {
                    Some(i) => i,
                    None => {
                        let (job, _) = job_json(rec, &self.config, None)?;
                        let mut disks = vec![InstanceDisk {
                            volume: hv,
                            disk: "helper".into(),
                        }];
                        disks.extend(rec.disks.iter().map(|d| InstanceDisk {
                            volume: d.volume.clone(),
                            disk: d.disk.clone(),
                        }));
                        p.create_instance(&InstanceSpec {
                            name: name.clone(),
                            flavor: self.config.helper_flavor,
                            disks,
                            firmware: Firmware::Bios,
                            network: Network::Isolated,
                            guest_forwards: vec![],
                            host_forwards: vec![],
                            config_drive: vec![ConfigDriveFile {
                                path: JOB_PATH.into(),
                                content: job,
                            }],
                        })
                        .await
                        .map_err(err)?
                    }
                };
                rec.serial_log = Some(info.serial_log.clone());
                // A helper that already reported (gateway restarted meanwhile) is not rerun.
                let log = p.console_log(&name, LOG_TAIL).await.map_err(err)?;
                if parse_result(&log, &rec.id).is_none() {
                    p.start_instance(&name).await.map_err(err)?;
                }
                Ok(())
            }
            Phase::WaitingForHelper | Phase::Restoring => {
                let name = match rec.state {
                    Phase::WaitingForHelper => rec.helper_instance.clone().ok_or("no helper instance")?,
                    _ => rec.instance.clone(),
                };
                loop {
                    let log = p.console_log(&name, LOG_TAIL).await.map_err(err)?;
                    let result = parse_result(&log, &rec.id);
                    let running = p
                        .instance(&name)
                        .await
                        .map_err(err)?
                        .is_some_and(|i| i.state == InstanceState::Running);
                    match judge(rec.state, result.as_ref(), running) {
                        Verdict::Done => return Ok(()),
                        Verdict::Failed(why) => return Err(why),
                        Verdict::Wait => {}
                    }
                    let waited = now_ms().saturating_sub(rec.step_started());
                    if Duration::from_millis(waited) > self.config.timeout {
                        return Err(format!(
                            "no result from the helper after {} minutes (recovery.timeout_minutes)",
                            self.config.timeout.as_secs() / 60
                        ));
                    }
                    tokio::select! {
                        () = tokio::time::sleep(POLL) => {}
                        () = cancel.cancelled() => return Err("cancelled".into()),
                    }
                }
            }
            Phase::RemovingHelper => {
                if let Some(h) = &rec.helper_instance {
                    ignore_missing(p.delete_instance(h).await).map_err(err)?;
                }
                if let Some(v) = &rec.helper_volume {
                    ignore_missing(p.delete_volume(v).await).map_err(err)?;
                }
                rec.serial_log = None;
                Ok(())
            }
            Phase::StartingInstance => {
                let name = rec.instance.clone();
                let info = match p.instance(&name).await.map_err(err)? {
                    Some(i) => i,
                    None => {
                        let key = self
                            .keys
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get(&rec.id)
                            .cloned();
                        if rec.encrypted && key.is_none() {
                            return Err("the gateway restarted before the encryption key reached the \
                                        instance's config drive (keys are never stored): delete this \
                                        recovery and request it again with the key"
                                .into());
                        }
                        let (config_drive, guest_forwards) = match rec.mode {
                            Mode::Block => (vec![], vec![]),
                            Mode::Object => {
                                let (job, fwd) = job_json(rec, &self.config, key.as_ref())?;
                                (
                                    vec![ConfigDriveFile {
                                        path: JOB_PATH.into(),
                                        content: job,
                                    }],
                                    fwd,
                                )
                            }
                        };
                        let i = p
                            .create_instance(&InstanceSpec {
                                name: name.clone(),
                                flavor: rec.flavor,
                                disks: rec
                                    .disks
                                    .iter()
                                    .map(|d| InstanceDisk {
                                        volume: d.volume.clone(),
                                        disk: d.disk.clone(),
                                    })
                                    .collect(),
                                firmware: Firmware::Bios,
                                network: if rec.drill {
                                    Network::Isolated
                                } else {
                                    Network::User
                                },
                                guest_forwards,
                                host_forwards: vec![],
                                config_drive,
                            })
                            .await
                            .map_err(err)?;
                        self.keys
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&rec.id);
                        i
                    }
                };
                rec.serial_log = Some(info.serial_log.clone());
                p.start_instance(&name).await.map_err(err)?;
                Ok(())
            }
            Phase::Running | Phase::Failed | Phase::Deleting => Ok(()),
        }
    }

    /// Stops a recovery's task and removes every instance and volume it created, then its
    /// record (in the background; the record shows `deleting` meanwhile).
    pub fn delete(self: &Arc<Self>, id: &str) -> Result<RecoveryRecord, RecoveryError> {
        let rec = self
            .load(id)?
            .ok_or_else(|| RecoveryError::NotFound(format!("no recovery {id}")))?;
        // Also when already `deleting`: a cleanup that failed is retried (each removal is
        // idempotent).
        self.spawn_delete(id.to_owned());
        Ok(rec)
    }

    fn spawn_delete(self: &Arc<Self>, id: String) {
        let task = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(t) = task {
                t.cancel.cancel();
                let _ = t.handle.await;
            }
            if let Err(e) = me.remove_all(&id).await {
                warn!(recovery = %id, error = %e, "deleting the recovery failed; DELETE again to retry");
            }
        });
    }

    async fn remove_all(&self, id: &str) -> Result<(), String> {
        let Some(mut rec) = self.load(id).map_err(|e| tern_core::error_chain(&e))? else {
            return Ok(());
        };
        let was = rec.state;
        if was != Phase::Deleting {
            rec.enter(Phase::Deleting, now_ms());
            self.save(&rec).map_err(|e| tern_core::error_chain(&e))?;
        }
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        let p = &self.provider;
        let err = |e: ProviderError| tern_core::error_chain(&e);
        // A recovered system (not a drill's) may power down cleanly first.
        let grace = if was == Phase::Running && !rec.drill {
            self.config.stop_grace
        } else {
            Duration::ZERO
        };
        for name in std::iter::once(&rec.instance).chain(rec.helper_instance.as_ref()) {
            ignore_missing(p.stop_instance(name, grace).await).map_err(err)?;
            ignore_missing(p.delete_instance(name).await).map_err(err)?;
        }
        for v in rec
            .disks
            .iter()
            .map(|d| &d.volume)
            .chain(rec.helper_volume.as_ref())
        {
            ignore_missing(p.delete_volume(v).await).map_err(err)?;
        }
        self.db
            .delete_recovery(id)
            .map_err(|e| tern_core::error_chain(&e))?;
        if !was.is_terminal() && was != Phase::Deleting {
            self.metrics.recoveries_active.dec();
        }
        self.metrics.recovery(rec.mode.as_str(), "deleted");
        info!(recovery = %id, "recovery deleted with its instances and volumes");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_of_each_mode() {
        let walk = |mode| {
            let mut p = Phase::CreatingVolumes;
            let mut seen = vec![p];
            while !p.is_terminal() {
                p = p.next(mode);
                seen.push(p);
            }
            seen
        };
        assert_eq!(
            walk(Mode::Block),
            [
                Phase::CreatingVolumes,
                Phase::StartingHelper,
                Phase::WaitingForHelper,
                Phase::RemovingHelper,
                Phase::StartingInstance,
                Phase::Running
            ]
        );
        assert_eq!(
            walk(Mode::Object),
            [
                Phase::CreatingVolumes,
                Phase::StartingInstance,
                Phase::Restoring,
                Phase::Running
            ]
        );
        assert_eq!(Phase::Failed.next(Mode::Block), Phase::Failed);
        assert_eq!(Phase::Running.next(Mode::Object), Phase::Running);
    }

    #[test]
    fn waiting_steps_judge_result_and_power_off() {
        use HelperResult as R;
        let w = Phase::WaitingForHelper;
        assert_eq!(judge(w, None, true), Verdict::Wait);
        // Block: ok but still running (powering off) → wait for the power-off.
        assert_eq!(judge(w, Some(&R::Ok), true), Verdict::Wait);
        assert_eq!(judge(w, Some(&R::Ok), false), Verdict::Done);
        assert!(matches!(judge(w, None, false), Verdict::Failed(m) if m.contains("without a result")));
        assert!(
            matches!(judge(w, Some(&R::Failed("no root".into())), true), Verdict::Failed(m) if m.contains("no root"))
        );
        let r = Phase::Restoring;
        // Object: the instance reboots into the recovered system; the line is enough.
        assert_eq!(judge(r, Some(&R::Ok), true), Verdict::Done);
        assert_eq!(judge(r, None, true), Verdict::Wait);
        assert!(matches!(judge(r, None, false), Verdict::Failed(_)));
    }

    #[test]
    fn result_lines_are_found_for_the_right_job() {
        let log = "SeaBIOS\r\nTERN-HELPER 2026-11-24T10:15:00Z restoring sda\r\n\
                   TERN-HELPER-RESULT id=r-2 status=ok\n\
                   [  12.3] random kernel line\n";
        assert_eq!(parse_result(log, "r-1"), None);
        assert_eq!(parse_result(log, "r-2"), Some(HelperResult::Ok));
        // Prefixed by noise on the same line, with a carriage return.
        let log = "\x1b[0mlogin: TERN-HELPER-RESULT id=r-1 status=failed reason=chunk 12ab missing (sda @ 4096)\r\n";
        assert_eq!(
            parse_result(log, "r-1"),
            Some(HelperResult::Failed("chunk 12ab missing (sda @ 4096)".into()))
        );
        // The last line wins; a prefix of the id is not the id.
        let log = "TERN-HELPER-RESULT id=r-1 status=failed reason=x\nTERN-HELPER-RESULT id=r-1 status=ok\n";
        assert_eq!(parse_result(log, "r-1"), Some(HelperResult::Ok));
        assert_eq!(parse_result("TERN-HELPER-RESULT id=r-10 status=ok", "r-1"), None);
        assert_eq!(
            parse_result("TERN-HELPER-RESULT id=r-1 status=maybe", "r-1"),
            None
        );
        assert_eq!(
            parse_result("TERN-HELPER-RESULT id=r-1 status=failed", "r-1"),
            Some(HelperResult::Failed("no reason given".into()))
        );
        // A truncated line (the log read from the middle) is no result.
        assert_eq!(parse_result("SULT id=r-1 status=ok", "r-1"), None);
    }

    fn record(mode: Mode) -> RecoveryRecord {
        RecoveryRecord {
            id: "r-20261124-101500-abcd".into(),
            host: HostId::new("web-01").unwrap(),
            point: "p1".into(),
            mode,
            drill: false,
            flavor: Flavor::default(),
            encrypted: false,
            state: Phase::CreatingVolumes,
            steps: vec![],
            disks: vec![
                RecoveryDisk {
                    disk: "sda".into(),
                    size: 1 << 30,
                    snapshot: None,
                    volume: "r.sda".into(),
                },
                RecoveryDisk {
                    disk: "sdb".into(),
                    size: 1 << 20,
                    snapshot: None,
                    volume: "r.sdb".into(),
                },
            ],
            instance: "r".into(),
            helper_instance: None,
            helper_volume: None,
            serial_log: None,
            error: None,
            created_unix_ms: 1,
            updated_unix_ms: 1,
        }
    }

    fn config() -> RecoveryConfig {
        RecoveryConfig {
            helper_image: "/helper.img".into(),
            qemu: Default::default(),
            default_flavor: Flavor::default(),
            helper_flavor: Flavor::default(),
            store: Some(crate::config::HelperStore {
                url: "s3://tern-dr/site-a".into(),
                endpoint: "http://10.0.2.2:7480".into(),
                gateway_target: "127.0.0.1:7480".into(),
                region: "us-east-1".into(),
                allow_http: true,
                ca_pem: None,
                fingerprint: None,
                access_key_id: "AK".into(),
                secret_access_key: Secret::new("SK".into()),
            }),
            drill_store_address: std::net::Ipv4Addr::new(10, 0, 2, 100),
            helper_stall_s: 600,
            timeout: Duration::from_secs(3600),
            stop_grace: Duration::from_secs(60),
        }
    }

    #[test]
    fn jobs_follow_the_contract() {
        let (b, fwd) = job_json(&record(Mode::Block), &config(), None).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(j["version"], 1);
        assert_eq!(j["id"], "r-20261124-101500-abcd");
        assert_eq!(j["action"], "repair");
        assert_eq!(j["after"], "poweroff");
        assert!(j.get("source").is_none());
        assert_eq!(j["disks"][1]["serial"], "tern-sdb");
        assert_eq!(j["repair"]["keep_static_ip"], false);
        assert!(fwd.is_empty());

        let key = Secret::new("KEYFILE".into());
        let (b, fwd) = job_json(&record(Mode::Object), &config(), Some(&key)).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(j["action"], "restore-repair");
        assert_eq!(j["after"], "reboot");
        assert_eq!(j["stall_s"], 600);
        let s = &j["source"];
        assert_eq!(s["url"], "s3://tern-dr/site-a");
        assert_eq!(s["endpoint"], "http://10.0.2.2:7480");
        assert_eq!(s["secret_access_key"], "SK");
        assert_eq!(s["encryption_key"], "KEYFILE");
        assert_eq!(s["host"], "web-01");
        assert_eq!(s["point"], "p1");
        assert!(fwd.is_empty());
        let keys: Vec<&String> = s.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 12, "{keys:?}");

        // A drill reaches only the store, through a forward.
        let mut drill = record(Mode::Object);
        drill.drill = true;
        let (b, fwd) = job_json(&drill, &config(), None).unwrap();
        let j: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(j["source"]["endpoint"], "http://10.0.2.100:7480");
        assert_eq!(j["source"]["encryption_key"], serde_json::Value::Null);
        assert_eq!(
            fwd,
            vec![GuestForward {
                guest: "10.0.2.100:7480".parse().unwrap(),
                target: "127.0.0.1:7480".into()
            }]
        );
    }

    #[test]
    fn steps_record_their_times_and_the_failure() {
        let mut r = record(Mode::Block);
        r.enter(Phase::CreatingVolumes, 10);
        r.enter(Phase::StartingHelper, 20);
        r.fail("boom".into(), 30);
        assert_eq!(r.state, Phase::Failed);
        assert_eq!(r.error.as_deref(), Some("boom"));
        assert_eq!(r.steps.len(), 2);
        assert_eq!(r.steps[0].finished_unix_ms, Some(20));
        assert_eq!(r.steps[1].started_unix_ms, 20);
        assert_eq!(r.steps[1].finished_unix_ms, Some(30));
        assert_eq!(r.steps[1].error.as_deref(), Some("boom"));
        // What the DB holds and the API shows has no secret in it.
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"state\":\"failed\""), "{text}");
        let back: RecoveryRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert!(new_id().starts_with("r-"));
    }

    /// A stand-in for `qemu-system-x86_64` for the orchestration tests (the real one runs in
    /// `tests/tests/local_instances.rs`): it writes its pid file, reads the job from the config
    /// drive with mtools, prints the helper's result line on the serial log and, for
    /// `after: poweroff`, exits; otherwise it runs until killed. It speaks no QMP, so stopping
    /// it takes the SIGKILL path.
    const FAKE_QEMU: &str = r#"#!/bin/bash
set -u
pidfile= serial= drive=
while [ $# -gt 0 ]; do
  case "$1" in
    -pidfile) pidfile=$2; shift ;;
    -chardev) serial=$(sed -n 's/.*path=\([^,]*\),append=on.*/\1/p' <<<"$2") ;;
    -drive) case "$2" in *id=configdrive*) drive=${2##*file=} ;; esac ;;
  esac
  shift
done
(
  echo $BASHPID >"$pidfile"
  if [ -n "$drive" ]; then
    job=$(MTOOLS_SKIP_CHECK=1 mtype -i "$drive" ::tern/job.json)
    id=$(sed -n 's/^  "id": "\(.*\)",$/\1/p' <<<"$job")
    echo "TERN-HELPER 2026-11-24T10:15:00Z job $id" >>"$serial"
    echo "TERN-HELPER-RESULT id=$id status=ok" >>"$serial"
    grep -q '"after": "poweroff"' <<<"$job" && exit 0
  fi
  while :; do sleep 1; done
) </dev/null >/dev/null 2>&1 &
sleep 0.3
"#;

    struct Bench {
        _dir: tempfile::TempDir,
        db: MetaDb,
        provider: Arc<crate::provider::local::LocalProvider>,
        config: RecoveryConfig,
    }

    fn bench() -> Option<Bench> {
        use std::os::unix::fs::PermissionsExt as _;
        if std::process::Command::new("mkfs.vfat")
            .arg("--help")
            .output()
            .is_err()
            || std::process::Command::new("mtype")
                .arg("--version")
                .output()
                .is_err()
        {
            eprintln!("skipped: mkfs.vfat or mtools missing (scripts/install-deps installs them)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let qemu = dir.path().join("fake-qemu");
        std::fs::write(&qemu, FAKE_QEMU).unwrap();
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        let helper_image = dir.path().join("helper.img");
        std::fs::write(&helper_image, vec![1u8; 1 << 20]).unwrap();
        let mut config = config();
        config.helper_image = helper_image;
        config.qemu.binary = qemu;
        config.qemu.accel = crate::provider::qemu::Accel::Tcg;
        config.qemu.relay = Some("/usr/bin/true".into());
        config.stop_grace = Duration::from_secs(1);
        let provider = Arc::new(
            crate::provider::local::LocalProvider::new(&dir.path().join("gw"), false)
                .unwrap()
                .with_qemu(config.qemu.clone()),
        );
        let db = MetaDb::open(&dir.path().join("meta.redb")).unwrap();
        Some(Bench {
            _dir: dir,
            db,
            provider,
            config,
        })
    }

    async fn wait_state(
        r: &Recoveries,
        id: &str,
        until: impl Fn(Option<&RecoveryRecord>) -> bool,
    ) -> Option<RecoveryRecord> {
        let start = std::time::Instant::now();
        loop {
            let rec = r.get(id).unwrap();
            if until(rec.as_ref()) {
                return rec;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "stuck: {rec:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn block_recovery_runs_helper_then_instance_and_delete_removes_everything() {
        let Some(b) = bench() else { return };
        let p = b.provider.clone();
        // A committed point of two disks.
        let host = HostId::new("web-01").unwrap();
        let mut snaps = Vec::new();
        for (disk, size) in [("sda", 4u64 << 20), ("sdb", 1 << 20)] {
            p.create_volume(&format!("web-01.{disk}"), size).await.unwrap();
            let s = p
                .snapshot_volume(&format!("web-01.{disk}"), &format!("web-01.{disk}.p1"))
                .await
                .unwrap();
            snaps.push(crate::db::SnapshotRef {
                disk: tern_core::DiskId::new(disk).unwrap(),
                snapshot: s.id,
            });
        }
        let prec = crate::db::PointRecord {
            created_unix_ms: 1,
            committed_unix_ms: 2,
            snapshots: snaps,
            manifest_len: 0,
        };
        b.db.commit_point(
            &host,
            &tern_core::PointId::new("p1").unwrap(),
            &prec,
            b"",
            &Default::default(),
        )
        .unwrap();
        let metrics = Arc::new(Metrics::default());
        let r = Recoveries::new(b.db.clone(), p.clone(), b.config.clone(), metrics.clone());
        let req = |point: &str| RecoveryRequest {
            host: host.clone(),
            point: point.into(),
            mode: Mode::Block,
            drill: false,
            flavor: None,
            encryption_key: None,
        };
        assert!(matches!(
            r.start(req("nope")).await,
            Err(RecoveryError::NotFound(_))
        ));
        let rec = r.start(req("latest")).await.unwrap();
        assert_eq!(rec.point, "p1");
        let done = wait_state(&r, &rec.id, |x| x.is_some_and(|x| x.state.is_terminal()))
            .await
            .unwrap();
        assert_eq!(done.state, Phase::Running, "{done:#?}");
        let names: Vec<Phase> = done.steps.iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            [
                Phase::CreatingVolumes,
                Phase::StartingHelper,
                Phase::WaitingForHelper,
                Phase::RemovingHelper,
                Phase::StartingInstance
            ]
        );
        assert!(
            done.steps
                .iter()
                .all(|s| s.finished_unix_ms.is_some() && s.error.is_none())
        );
        // The helper and its boot volume are gone; the instance runs from the recovered volumes.
        assert_eq!(p.instance(&format!("{}-helper", rec.id)).await.unwrap(), None);
        assert_eq!(p.volume(&format!("{}.helper", rec.id)).await.unwrap(), None);
        let inst = p.instance(&rec.id).await.unwrap().unwrap();
        assert_eq!(inst.state, InstanceState::Running);
        let vols: Vec<&str> = inst.spec.disks.iter().map(|d| d.volume.as_str()).collect();
        assert_eq!(vols, [format!("{}.sda", rec.id), format!("{}.sdb", rec.id)]);
        assert_eq!(inst.spec.network, Network::User);
        assert_eq!(done.serial_log, Some(inst.serial_log));
        assert_eq!(done.disks[0].size, 4 << 20);
        let text = metrics.encode();
        assert!(
            text.contains("tern_gateway_recoveries_total{mode=\"block\",event=\"running\"} 1"),
            "{text}"
        );

        r.delete(&rec.id).unwrap();
        wait_state(&r, &rec.id, |x| x.is_none()).await;
        assert_eq!(p.instance(&rec.id).await.unwrap(), None);
        assert_eq!(p.volume(&format!("{}.sda", rec.id)).await.unwrap(), None);
        // The point's snapshots are untouched.
        assert_eq!(p.list_snapshots().await.unwrap().len(), 2);
        assert!(matches!(r.delete(&rec.id), Err(RecoveryError::NotFound(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn object_drill_boots_one_instance_and_a_restart_without_the_key_fails_clearly() {
        let Some(b) = bench() else { return };
        let p = b.provider.clone();
        let host = HostId::new("db-01").unwrap();
        let orec = crate::db::ObjectPointRecord {
            created_unix_ms: 1,
            stored_unix_ms: 2,
            disks: vec![
                crate::db::ObjectDiskRecord {
                    id: "vda".into(),
                    size: 8 << 20,
                    chunks: 2,
                    data_chunks: 1,
                },
                crate::db::ObjectDiskRecord {
                    id: "vdb".into(),
                    size: 2 << 20,
                    chunks: 1,
                    data_chunks: 0,
                },
            ],
        };
        b.db.put_object_point(&host, &tern_core::PointId::new("o1").unwrap(), &orec, b"")
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let r = Recoveries::new(b.db.clone(), p.clone(), b.config.clone(), metrics.clone());
        let rec = r
            .start(RecoveryRequest {
                host: host.clone(),
                point: "latest".into(),
                mode: Mode::Object,
                drill: true,
                flavor: Some(Flavor {
                    vcpus: 2,
                    ram_mib: 512,
                }),
                encryption_key: Some("KEY".into()),
            })
            .await
            .unwrap();
        let done = wait_state(&r, &rec.id, |x| x.is_some_and(|x| x.state.is_terminal()))
            .await
            .unwrap();
        assert_eq!(done.state, Phase::Running, "{done:#?}");
        assert!(done.encrypted);
        let stored = String::from_utf8(b.db.recovery(&rec.id).unwrap().unwrap()).unwrap();
        assert!(!stored.contains("KEY") && !stored.contains("\"SK\""), "{stored}");
        let inst = p.instance(&rec.id).await.unwrap().unwrap();
        assert_eq!(inst.spec.network, Network::Isolated);
        assert_eq!(inst.spec.flavor.vcpus, 2);
        assert_eq!(inst.spec.guest_forwards.len(), 1);
        // The first disk is the helper image grown to the source's size; the second is empty.
        assert_eq!(
            p.volume(&format!("{}.vda", rec.id)).await.unwrap().unwrap().size,
            8 << 20
        );
        assert_eq!(
            p.volume(&format!("{}.vdb", rec.id)).await.unwrap().unwrap().size,
            2 << 20
        );
        r.delete(&rec.id).unwrap();
        wait_state(&r, &rec.id, |x| x.is_none()).await;

        // A gateway restart between the request and the config drive loses the key: the
        // resumed recovery fails and says so.
        let mut stuck = done.clone();
        stuck.id = "r-stuck".into();
        stuck.instance = "r-stuck".into();
        stuck.steps.clear();
        stuck.error = None;
        stuck.enter(Phase::StartingInstance, 5);
        b.db.put_recovery(&stuck.id, &serde_json::to_vec(&stuck).unwrap())
            .unwrap();
        let r2 = Recoveries::new(b.db.clone(), p.clone(), b.config.clone(), metrics);
        assert_eq!(r2.resume().unwrap(), 1);
        let failed = wait_state(&r2, "r-stuck", |x| x.is_some_and(|x| x.state.is_terminal()))
            .await
            .unwrap();
        assert_eq!(failed.state, Phase::Failed);
        assert!(failed.error.unwrap().contains("request it again with the key"));
        assert_eq!(p.instance("r-stuck").await.unwrap(), None);
    }
}
