//! `tern-recovery-helper job`: the driver of the helper VM's one job (part of the binary; the
//! job format, lookup and console protocol are in the library's `job` module).
//!
//! Order: refuse outside a helper VM → find and validate the job → start the watchdog → find
//! the target disks → (`restore-repair`) restore every disk, writing `status.json` at each
//! step → repair → exactly one `TERN-HELPER-RESULT` line → `sync` → reboot or power off (a
//! failed job always powers off). Secrets of the job are never printed: messages are built
//! from ids, paths and error chains only.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use object_store::ObjectStoreExt as _;
use tern_core::object::s3::{S3Config, Secret, Trust};
use tern_core::object::{Repo, StoreKey};
use tern_core::tls::parse_fingerprint;
use tern_core::{DiskId, HostId, PointId};
use tern_recovery_helper::job::{
    self, Action, After, Job, JobError, State, Status, console_line, result_line,
};
use tern_recovery_helper::repair::{self, DISPOSABLE_MARKER, RepairOptions};
use tern_recovery_helper::restore::{RestoreOptions, restore_disk};

#[derive(Args, Debug)]
pub struct JobArgs {
    /// Read the job from this file instead of looking for it (kernel command line, config
    /// drive, metadata service).
    #[arg(long)]
    job_file: Option<PathBuf>,
    /// Where block devices are listed (their virtio serials).
    #[arg(long, default_value = "/sys/block", hide = true)]
    sys_block: PathBuf,
    /// How long to wait for a target disk, a config drive or the metadata service to appear.
    #[arg(long, default_value_t = 30)]
    wait_s: u64,
}

/// Serializes console output (the driver's lines, the log's and the result line).
static CONSOLE: Mutex<()> = Mutex::new(());
/// Set once the result line is printed: there is exactly one.
static RESULT_PRINTED: AtomicBool = AtomicBool::new(false);

/// Prints a `TERN-HELPER <time> <message>` line on stdout (the init script points stdout and
/// stderr at the console).
pub fn say(message: &str) {
    let _g = CONSOLE.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", console_line(&job::now(), message));
    let _ = out.flush();
}

/// Prints the result line unless one was printed already; true if this call printed it.
fn print_result(id: &str, result: Result<(), &str>) -> bool {
    if RESULT_PRINTED.swap(true, Ordering::SeqCst) {
        return false;
    }
    let _g = CONSOLE.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", result_line(id, result));
    let _ = out.flush();
    true
}

/// A `tracing` writer that prefixes every line of a log event with `TERN-HELPER <time>`.
#[derive(Debug, Default)]
pub struct ConsoleLog(Vec<u8>);

impl std::io::Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleLog {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            say(line);
        }
    }
}

/// Powers off or reboots after syncing; returns only if the kernel refused.
fn power(after: After) -> anyhow::Error {
    rustix::fs::sync();
    let cmd = match after {
        After::Reboot => rustix::system::RebootCommand::Restart,
        After::Poweroff => rustix::system::RebootCommand::PowerOff,
    };
    match rustix::system::reboot(cmd) {
        Ok(()) => anyhow!("the kernel returned from reboot({cmd:?})"),
        Err(e) => anyhow!("reboot({cmd:?}) failed: {e}"),
    }
}

/// Writes `status.json` of a `restore-repair` job.
struct StatusWriter {
    rt: Arc<tokio::runtime::Runtime>,
    store: Arc<dyn object_store::ObjectStore>,
    key: object_store::path::Path,
    id: String,
}

impl StatusWriter {
    /// Writes the state; a failure is printed, never fatal (the console line is the truth).
    /// Not from inside the runtime: use [`Self::put_async`] there.
    fn put(&self, state: State, message: &str) {
        self.rt.block_on(self.put_async(state, message));
    }

    /// [`Self::put`] from async code.
    async fn put_async(&self, state: State, message: &str) {
        let status = Status {
            id: self.id.clone(),
            state,
            message: job::one_line(message, 1000),
            time: job::now(),
        };
        let body = match serde_json::to_vec(&status) {
            Ok(b) => b,
            Err(e) => return say(&format!("failed to encode the status: {e}")),
        };
        let put = self.store.put(&self.key, object_store::PutPayload::from(body));
        match tokio::time::timeout(Duration::from_secs(60), put).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => say(&format!(
                "failed to write {}: {}",
                self.key,
                tern_core::error_chain(&e)
            )),
            Err(_) => say(&format!("failed to write {}: timed out", self.key)),
        }
    }
}

/// What the watchdog watches and what it needs to fail the job.
struct Watchdog {
    progress: Arc<AtomicU64>,
    status: Mutex<Option<Arc<StatusWriter>>>,
}

impl Watchdog {
    fn tick(&self) {
        self.progress.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts the thread: no change of the progress counter for `stall` → the failure line,
    /// the failed status, sync, power off.
    fn start(self: &Arc<Self>, id: String, stall: Duration) {
        let w = self.clone();
        let spawned = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut last = w.progress.load(Ordering::Relaxed);
                let mut since = Instant::now();
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = w.progress.load(Ordering::Relaxed);
                    if now != last {
                        last = now;
                        since = Instant::now();
                        continue;
                    }
                    if since.elapsed() < stall {
                        continue;
                    }
                    let reason = format!("watchdog: no progress for {} s", stall.as_secs());
                    if print_result(&id, Err(&reason)) {
                        let status = w.status.lock().unwrap_or_else(PoisonError::into_inner).clone();
                        if let Some(s) = status {
                            s.put(State::Failed, &reason);
                        }
                    }
                    let e = power(After::Poweroff);
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            });
        if let Err(e) = spawned {
            say(&format!("failed to start the watchdog: {e}"));
        }
    }
}

/// Finds the job: the file given, else the kernel command line, else a config drive, else the
/// metadata service; the config drive and the metadata service are tried until `wait`.
fn find_job(args: &JobArgs, wait: Duration) -> anyhow::Result<(String, Vec<u8>)> {
    if let Some(f) = &args.job_file {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok((f.display().to_string(), bytes));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    if let Some(r) = job::job_from_cmdline(&cmdline) {
        return Ok(("the kernel command line".into(), r?));
    }
    let addr = std::net::SocketAddr::from(([169, 254, 169, 254], 80));
    let deadline = Instant::now() + wait;
    loop {
        if let Some(found) = job::read_config_drive()? {
            return Ok(found);
        }
        if let Some(bytes) = job::fetch_metadata(addr, Duration::from_secs(3))? {
            return Ok((job::METADATA_URL.into(), bytes));
        }
        if Instant::now() >= deadline {
            return Err(JobError::NotFound(format!(
                "no tern.job= on the kernel command line, no config drive labelled {} holding {}, no answer from {}",
                job::CONFIG_LABELS.join("/"),
                job::CONFIG_FILES.join(" or "),
                job::METADATA_URL
            ))
            .into());
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The id for the result line of a job that could not be parsed: its `id` if that is a plain
/// word, else `unknown`.
fn lenient_id(bytes: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
        .filter(|id| {
            !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Runs the job subcommand. Inside a helper VM it does not return: it reboots or powers off.
pub fn run(args: JobArgs) -> anyhow::Result<()> {
    say(&format!(
        "tern-recovery-helper {} job starting",
        env!("CARGO_PKG_VERSION")
    ));
    if let Err(e) = job::check_helper_vm(Path::new(DISPOSABLE_MARKER), Path::new("/")) {
        print_result("unknown", Err(&e.to_string()));
        // Not a helper VM: never power this machine off.
        return Err(e.into());
    }
    let wait = Duration::from_secs(args.wait_s);
    let (from, bytes) = match find_job(&args, wait) {
        Ok(f) => f,
        Err(e) => {
            print_result("unknown", Err(&format!("{e:#}")));
            return Err(power(After::Poweroff));
        }
    };
    let job = match Job::parse(&bytes) {
        Ok(j) => j,
        Err(e) => {
            print_result(&lenient_id(&bytes), Err(&format!("{e} (from {from})")));
            return Err(power(After::Poweroff));
        }
    };
    drop(bytes);
    say(&format!(
        "job {} from {from}: {:?}, {} disk(s), then {:?}, watchdog {} s",
        job.id,
        job.action,
        job.disks.len(),
        job.after,
        job.stall_s
    ));
    let watchdog = Arc::new(Watchdog {
        progress: Arc::new(AtomicU64::new(0)),
        status: Mutex::new(None),
    });
    watchdog.start(job.id.clone(), Duration::from_secs(job.stall_s));
    let result = run_job(&job, &args, &watchdog, wait);
    let status = watchdog
        .status
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let after = match &result {
        Ok(()) => {
            let (state, what) = match job.after {
                After::Reboot => (State::Rebooting, "rebooting into the recovered system"),
                After::Poweroff => (State::PoweringOff, "powering off"),
            };
            say(&format!("job {} done; {what}", job.id));
            if let Some(s) = &status {
                s.put(state, what);
            }
            print_result(&job.id, Ok(()));
            job.after
        }
        Err(e) => {
            let reason = format!("{e:#}");
            if let Some(s) = &status {
                s.put(State::Failed, &reason);
            }
            print_result(&job.id, Err(&reason));
            After::Poweroff
        }
    };
    Err(power(after))
}

fn run_job(job: &Job, args: &JobArgs, watchdog: &Arc<Watchdog>, wait: Duration) -> anyhow::Result<()> {
    let devices = find_devices(job, &args.sys_block, wait)?;
    for (d, dev) in job.disks.iter().zip(&devices) {
        say(&format!("disk {} is {}", d.disk, dev.display()));
    }
    watchdog.tick();
    if let (Action::RestoreRepair, Some(source)) = (job.action, &job.source) {
        let rt = Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?,
        );
        let (bucket, prefix) = tern_core::object::s3::parse_url(&source.url)?;
        // The CA bundle goes to a file in the RAM root file system (it is no secret).
        let trust = match (&source.ca_pem, &source.fingerprint) {
            (Some(pem), _) => {
                let path = std::env::temp_dir().join("tern-job-ca.pem");
                std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
                Trust::CaFile(path)
            }
            (None, Some(fp)) => Trust::Pinned(parse_fingerprint(fp).context("source.fingerprint")?),
            (None, None) => Trust::System,
        };
        let store = tern_core::object::s3::connect(&S3Config {
            endpoint: source.endpoint.clone(),
            bucket,
            region: source.region.clone(),
            access_key_id: source.access_key_id.clone(),
            secret_access_key: Secret::new(source.secret_access_key.expose().trim().to_owned()),
            trust,
            allow_http: source.allow_http,
            max_retries: 10,
        })
        .context("connecting to the store")?;
        let status = Arc::new(StatusWriter {
            rt: rt.clone(),
            store: store.clone(),
            key: object_store::path::Path::from(Status::key(&prefix, &job.id)),
            id: job.id.clone(),
        });
        *watchdog.status.lock().unwrap_or_else(PoisonError::into_inner) = Some(status.clone());
        status.put(
            State::Starting,
            &format!("helper started; {} disk(s)", devices.len()),
        );
        let cipher = source.cipher.parse()?;
        let key = match &source.encryption_key {
            Some(k) => Some(Arc::new(
                StoreKey::parse(k.expose().as_bytes(), cipher, "source.encryption_key")
                    .context("reading the job's encryption key")?,
            )),
            None => None,
        };
        let repo = Repo::new(store, &prefix);
        let host = HostId::new(source.host.as_str())?;
        let counter = watchdog.progress.clone();
        let summaries = rt.block_on(async {
            let point = if source.point == "latest" {
                repo.list_points(&host)
                    .await
                    .context("listing the host's points")?
                    .pop()
                    .map(|p| p.id)
                    .ok_or_else(|| anyhow!("host {host} has no recovery point in {}", source.url))?
            } else {
                PointId::new(source.point.as_str())?
            };
            let manifest = repo
                .get_manifest(&host, &point)
                .await
                .with_context(|| format!("reading point {point} of host {host}"))?;
            let opts = RestoreOptions {
                window: 16,
                engine: Default::default(),
                journal: None,
                progress: false,
                counter: Some(counter),
            };
            let mut summaries = Vec::new();
            for (d, dev) in job.disks.iter().zip(&devices) {
                let id = DiskId::new(d.disk.as_str())?;
                let msg = format!("restoring disk {id} of point {point} to {}", dev.display());
                say(&msg);
                status.put_async(State::Restoring, &msg).await;
                let s = restore_disk(&repo, key.clone(), &manifest, &id, dev, &opts)
                    .await
                    .with_context(|| format!("restoring disk {id} to {}", dev.display()))?;
                say(&format!(
                    "disk {id} restored: {} bytes written, {} chunks, {} zero, {:.0} s",
                    s.bytes_written, s.chunks_restored, s.chunks_zero, s.duration_s
                ));
                summaries.push(s);
            }
            anyhow::Ok(summaries)
        })?;
        watchdog.tick();
        let msg = format!("{} disk(s) restored; repairing", summaries.len());
        status.put(State::Repairing, &msg);
    }
    say("repairing the guest for KVM (virtio, BIOS and UEFI boot, DHCP, hypervisor tools off)");
    let mut opts = RepairOptions::new(devices);
    opts.disposable_host = true;
    opts.network = job.network_mode()?;
    opts.root = job.repair.root.clone();
    let report = repair::repair(&opts).context("repairing the guest")?;
    watchdog.tick();
    say(&format!(
        "repair done: {}, root {}, changed {}",
        report.os.pretty_name,
        report.root.display(),
        report.changed
    ));
    Ok(())
}

/// The target devices in the job's disk order, waiting up to `wait` for them to appear.
fn find_devices(job: &Job, sys_block: &Path, wait: Duration) -> anyhow::Result<Vec<PathBuf>> {
    let deadline = Instant::now() + wait;
    loop {
        let found: Result<Vec<PathBuf>, JobError> = job
            .disks
            .iter()
            .map(|d| match (&d.serial, &d.device) {
                (Some(s), _) => job::find_by_serial(sys_block, s)
                    .map_err(|e| JobError::NoDevice(format!("disk {}: {e}", d.disk))),
                (None, Some(p)) if p.exists() => Ok(p.clone()),
                (None, Some(p)) => Err(JobError::NoDevice(format!(
                    "disk {}: {} does not exist",
                    d.disk,
                    p.display()
                ))),
                (None, None) => Err(JobError::Invalid(format!(
                    "disk {} has no serial or device",
                    d.disk
                ))),
            })
            .collect();
        match found {
            Ok(devs) => return Ok(devs),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lenient_id_for_invalid_jobs() {
        assert_eq!(lenient_id(br#"{"id":"r-1","version":9}"#), "r-1");
        assert_eq!(lenient_id(br#"{"id":"a b"}"#), "unknown");
        assert_eq!(lenient_id(b"not json"), "unknown");
        assert_eq!(lenient_id(br#"{"id":7}"#), "unknown");
    }
}
