//! QEMU for the local provider's instances: the command line, the config drive, the pid check,
//! QMP and the KVM probe. An instance's files live in its directory (`docs/boot-in-cloud.md` §2):
//! `instance.json`, `qemu.pid`, `qmp.sock`, `serial.log`, `config-drive.img`, `qemu.log`
//! (QEMU's own messages), `OVMF_VARS.fd` (UEFI only).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{Firmware, InstanceSpec, Network, ProviderError};

/// The config drive's label (OpenStack's).
pub const CONFIG_DRIVE_LABEL: &str = "config-2";

/// Which accelerator instances use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` exists and a probe VM runs on it with every CPU feature QEMU asks
    /// for, else TCG.
    #[default]
    Auto,
    /// KVM, always.
    Kvm,
    /// TCG (software emulation), always.
    Tcg,
}

/// How the local provider runs instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSettings {
    /// `qemu-system-x86_64`.
    pub binary: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// OVMF code (UEFI instances).
    pub ovmf_code: PathBuf,
    /// OVMF's empty variable store, copied per instance (UEFI instances).
    pub ovmf_vars: PathBuf,
    /// The program that carries a guest forward's connections: QEMU runs `PROGRAM relay
    /// HOST:PORT` per connection, the connection on its stdin and stdout (`tern-gateway relay`;
    /// the gateway sets its own binary). Without it, guest forwards are refused.
    pub relay: Option<PathBuf>,
}

impl Default for QemuSettings {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            ovmf_code: PathBuf::from("/usr/share/OVMF/OVMF_CODE.fd"),
            ovmf_vars: PathBuf::from("/usr/share/OVMF/OVMF_VARS.fd"),
            relay: None,
        }
    }
}

/// The files of an instance directory.
#[derive(Debug, Clone)]
pub struct InstanceFiles {
    /// The directory.
    pub dir: PathBuf,
}

impl InstanceFiles {
    /// `instance.json`.
    pub fn record(&self) -> PathBuf {
        self.dir.join("instance.json")
    }
    /// `qemu.pid`.
    pub fn pid(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// `qmp.sock`.
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// `serial.log`.
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// `config-drive.img`.
    pub fn config_drive(&self) -> PathBuf {
        self.dir.join("config-drive.img")
    }
    /// `qemu.log`.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    /// `OVMF_VARS.fd`.
    pub fn ovmf_vars(&self) -> PathBuf {
        self.dir.join("OVMF_VARS.fd")
    }
}

/// QEMU option values escape commas by doubling them.
fn opt_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The `-netdev` value of an instance. A guest forward runs `relay` per connection (`cmd:`):
/// QEMU's `tcp:` form would connect once, at start, and carry a single connection.
pub fn netdev(spec: &InstanceSpec, relay: Option<&Path>) -> Result<String, String> {
    let mut n = String::from("user,id=net0");
    if spec.network == Network::Isolated {
        n.push_str(",restrict=on");
    }
    for f in &spec.guest_forwards {
        let relay = relay.ok_or("guest forwards need a relay program (tern-gateway relay)")?;
        let program = relay.display().to_string();
        if program.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            return Err(format!("relay program path {program:?} has blanks or quotes"));
        }
        if f.target
            .contains(|c: char| c.is_whitespace() || c == ',' || c == '\'' || c == '"')
        {
            return Err(format!("bad forward target {:?}", f.target));
        }
        n.push_str(&format!(
            ",guestfwd=tcp:{}:{}-cmd:{} relay {}",
            f.guest.ip(),
            f.guest.port(),
            program.replace(',', ",,"),
            f.target
        ));
    }
    for f in &spec.host_forwards {
        n.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{}-:{}",
            f.host_port, f.guest_port
        ));
    }
    Ok(n)
}

/// The arguments of `qemu-system-x86_64` for an instance whose disks are the files `volumes`
/// (in `spec.disks` order), with `accel` (`kvm` or `tcg`).
pub fn qemu_args(
    spec: &InstanceSpec,
    files: &InstanceFiles,
    volumes: &[PathBuf],
    accel: &str,
    settings: &QemuSettings,
    config_drive: bool,
) -> Result<Vec<String>, String> {
    let netdev = netdev(spec, settings.relay.as_deref())?;
    let mut a: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| (*s).to_owned()));
    push(&["-name", &format!("tern-{}", spec.name)]);
    push(&["-accel", accel, "-machine", "q35"]);
    push(&["-m", &spec.flavor.ram_mib.to_string()]);
    push(&["-smp", &spec.flavor.vcpus.to_string()]);
    push(&[
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-monitor",
        "none",
    ]);
    push(&["-daemonize", "-pidfile", &opt_path(&files.pid())]);
    push(&[
        "-chardev",
        &format!("file,id=serial0,path={},append=on", opt_path(&files.serial())),
    ]);
    push(&["-serial", "chardev:serial0"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", opt_path(&files.qmp())),
    ]);
    if spec.firmware == Firmware::Uefi {
        push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                opt_path(&settings.ovmf_code)
            ),
        ]);
        push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=1,file={}",
                opt_path(&files.ovmf_vars())
            ),
        ]);
    }
    for (i, (d, path)) in spec.disks.iter().zip(volumes).enumerate() {
        push(&[
            "-drive",
            &format!(
                "if=none,id=disk{i},format=raw,discard=unmap,file={}",
                opt_path(path)
            ),
        ]);
        push(&[
            "-device",
            &format!(
                "virtio-blk-pci,drive=disk{i},serial=tern-{},bootindex={i}",
                d.disk
            ),
        ]);
    }
    push(&["-netdev", &netdev]);
    push(&["-device", "virtio-net-pci,netdev=net0,romfile="]);
    // After the NIC: the NIC's PCI address (and so its name in the guest) does not depend on
    // whether a config drive is attached.
    if config_drive {
        push(&[
            "-drive",
            &format!(
                "if=none,id=configdrive,format=raw,readonly=on,file={}",
                opt_path(&files.config_drive())
            ),
        ]);
        push(&["-device", "virtio-blk-pci,drive=configdrive,serial=config-drive"]);
    }
    Ok(a)
}

/// Why a config-drive path is refused, if it is: `/`-separated names of `[A-Za-z0-9._-]`, none
/// starting with a dot.
pub fn check_drive_path(path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && path.len() <= 200
        && path.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(format!("config drive path {path:?} is not a plain relative path"))
    }
}

fn run_tool(op: &'static str, id: &str, cmd: &mut Command) -> Result<(), ProviderError> {
    let out = cmd
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ProviderError::Io {
            op,
            id: id.to_owned(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ProviderError::Command {
            op,
            id: id.to_owned(),
            reason: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}

/// Writes a FAT config drive labelled `config-2` holding `files` to `image` (replaced
/// atomically, mode 0600): `mkfs.vfat -C` and `mtools`, no mount.
pub fn make_config_drive(
    image: &Path,
    files: &[super::ConfigDriveFile],
    id: &str,
) -> Result<(), ProviderError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |op: &'static str| {
        let id = id.to_owned();
        move |source| ProviderError::Io { op, id, source }
    };
    let size: u64 = files.iter().map(|f| f.content.len() as u64).sum();
    // KiB; room for FAT overhead.
    let kib = (size / 1024 + 1024).max(2048);
    let tmp = image.with_extension("img.tmp");
    let _ = std::fs::remove_file(&tmp);
    run_tool(
        "make config drive",
        id,
        Command::new("mkfs.vfat")
            .args(["-C", "-n", CONFIG_DRIVE_LABEL])
            .arg(&tmp)
            .arg(kib.to_string()),
    )?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io("protect config drive"))?;
    let mut dirs: Vec<&str> = Vec::new();
    for f in files {
        check_drive_path(&f.path).map_err(|reason| ProviderError::Spec {
            id: id.to_owned(),
            reason,
        })?;
        let mut end = 0;
        while let Some(i) = f.path[end..].find('/') {
            end += i;
            if !dirs.contains(&&f.path[..end]) {
                dirs.push(&f.path[..end]);
            }
            end += 1;
        }
    }
    for d in dirs {
        run_tool(
            "make config drive directory",
            id,
            Command::new("mmd").arg("-i").arg(&tmp).arg(format!("::{d}")),
        )?;
    }
    let staging = image.with_extension("file.tmp");
    for f in files {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&staging)
            .map_err(io("stage config drive file"))?;
        out.write_all(&f.content).map_err(io("stage config drive file"))?;
        drop(out);
        let r = run_tool(
            "copy onto config drive",
            id,
            Command::new("mcopy")
                .args(["-o", "-i"])
                .arg(&tmp)
                .arg(&staging)
                .arg(format!("::{}", f.path)),
        );
        let _ = std::fs::remove_file(&staging);
        r?;
    }
    std::fs::rename(&tmp, image).map_err(io("install config drive"))
}

/// The pid of the instance's QEMU if it runs: its pid file names a live (not zombie) process
/// whose command line mentions the instance directory.
pub fn running_pid(files: &InstanceFiles) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(files.pid()).ok()?.trim().parse().ok()?;
    if pid <= 1 {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let dir = files.dir.as_os_str().as_encoded_bytes();
    let ours = cmdline
        .split(|b| *b == 0)
        .any(|arg| arg.windows(dir.len()).any(|w| w == dir));
    if !ours {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
    (state != 'Z' && state != 'X').then_some(pid)
}

/// Waits until the instance's QEMU no longer runs; whether it stopped within `limit`.
pub async fn wait_stopped(files: &InstanceFiles, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if running_pid(files).is_none() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends one QMP command (after the capabilities handshake); the reply line.
pub async fn qmp(sock: &Path, command: &str) -> std::io::Result<String> {
    let f = async {
        let s = tokio::net::UnixStream::connect(sock).await?;
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        let greeting = lines.next_line().await?.unwrap_or_default();
        if !greeting.contains("QMP") {
            return Err(std::io::Error::other("no QMP greeting"));
        }
        w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").await?;
        lines.next_line().await?;
        w.write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
            .await?;
        // Events may come before the reply.
        while let Some(l) = lines.next_line().await? {
            if l.contains("\"return\"") || l.contains("\"error\"") {
                return Ok(l);
            }
        }
        Ok(String::new())
    };
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("QMP timed out")))
}

/// Stops the instance's QEMU: QMP `system_powerdown`, then `quit` after `grace`, then SIGKILL
/// after 5 s more.
pub async fn stop(files: &InstanceFiles, grace: Duration) -> Result<(), ProviderError> {
    let id = files.dir.display().to_string();
    if running_pid(files).is_none() {
        return Ok(());
    }
    if !grace.is_zero() {
        if let Err(e) = qmp(&files.qmp(), "system_powerdown").await {
            tracing::debug!(instance = %id, error = %e, "QMP system_powerdown failed");
        }
        if wait_stopped(files, grace).await {
            return Ok(());
        }
    }
    if let Err(e) = qmp(&files.qmp(), "quit").await {
        tracing::debug!(instance = %id, error = %e, "QMP quit failed");
    }
    if wait_stopped(files, Duration::from_secs(5)).await {
        return Ok(());
    }
    if let Some(pid) = running_pid(files)
        && let Some(pid) = rustix::process::Pid::from_raw(pid)
    {
        tracing::warn!(instance = %id, "QEMU ignored quit; killing it");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
    if wait_stopped(files, Duration::from_secs(10)).await {
        Ok(())
    } else {
        Err(ProviderError::Command {
            op: "stop instance",
            id,
            reason: "QEMU still runs after SIGKILL".into(),
        })
    }
}

/// Whether KVM runs a VM here: a probe VM must print SeaBIOS's banner on the debug port within
/// 10 s, and QEMU must not warn that the host's KVM lacks features of its default CPU model.
/// (Nested KVM that hides CPU features runs firmware but may hang a guest kernel later; such
/// a host gets TCG unless `accel = "kvm"` forces it.)
pub fn kvm_works(binary: &Path, scratch: &Path) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let log = scratch.join("kvm-probe.log");
    let err = scratch.join("kvm-probe.err");
    let _ = std::fs::remove_file(&log);
    let Ok(err_file) = std::fs::File::create(&err) else {
        return false;
    };
    let child = Command::new(binary)
        .args([
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-m",
            "64",
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-chardev",
        ])
        .arg(format!("file,id=fw,path={}", opt_path(&log)))
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=fw"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_file)
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let start = Instant::now();
    let mut banner = false;
    while start.elapsed() < Duration::from_secs(10) {
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("SeaBIOS")) {
            banner = true;
            break;
        }
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    // A VM stuck in KVM may take its time to die: reap it in the background.
    std::thread::spawn(move || child.wait());
    let warnings = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&err);
    let complete = !warnings.contains("doesn't support requested feature");
    if banner && !complete {
        tracing::info!("KVM runs but lacks CPU features of QEMU's default model (nested KVM?); using TCG");
    }
    banner && complete
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{Flavor, GuestForward, HostForward, InstanceDisk};

    fn spec() -> InstanceSpec {
        InstanceSpec {
            name: "r-1".into(),
            flavor: Flavor {
                vcpus: 2,
                ram_mib: 2048,
            },
            disks: vec![
                InstanceDisk {
                    volume: "r-1.sda".into(),
                    disk: "sda".into(),
                },
                InstanceDisk {
                    volume: "r-1.sdb".into(),
                    disk: "sdb".into(),
                },
            ],
            firmware: Firmware::Bios,
            network: Network::User,
            guest_forwards: vec![],
            host_forwards: vec![],
            config_drive: vec![],
        }
    }

    fn pos(a: &[String], s: &str) -> usize {
        a.iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("{s} not in {a:?}"))
    }

    #[test]
    fn arguments_of_a_bios_instance_with_a_config_drive() {
        let files = InstanceFiles {
            dir: PathBuf::from("/d/instances/r-1"),
        };
        let vols = [
            PathBuf::from("/d/volumes/r-1.sda.img"),
            PathBuf::from("/d/v,x.img"),
        ];
        let a = qemu_args(&spec(), &files, &vols, "tcg", &QemuSettings::default(), true).unwrap();
        assert_eq!(a[pos(&a, "-accel") + 1], "tcg");
        assert_eq!(a[pos(&a, "-m") + 1], "2048");
        assert_eq!(a[pos(&a, "-smp") + 1], "2");
        assert_eq!(a[pos(&a, "-pidfile") + 1], "/d/instances/r-1/qemu.pid");
        assert!(a.contains(&"-daemonize".to_owned()));
        assert!(a.contains(&"unix:/d/instances/r-1/qmp.sock,server=on,wait=off".to_owned()));
        assert!(a.contains(&"file,id=serial0,path=/d/instances/r-1/serial.log,append=on".to_owned()));
        assert!(a.contains(&"if=none,id=disk1,format=raw,discard=unmap,file=/d/v,,x.img".to_owned()));
        // The boot disk first, each with its serial.
        let d0 = pos(&a, "virtio-blk-pci,drive=disk0,serial=tern-sda,bootindex=0");
        let d1 = pos(&a, "virtio-blk-pci,drive=disk1,serial=tern-sdb,bootindex=1");
        assert!(d0 < d1);
        assert!(
            a.iter()
                .any(|x| x.contains("config-drive.img") && x.contains("readonly=on"))
        );
        let nic = pos(&a, "virtio-net-pci,netdev=net0,romfile=");
        let drive = pos(&a, "virtio-blk-pci,drive=configdrive,serial=config-drive");
        assert!(
            d1 < nic && nic < drive,
            "the NIC's slot must not depend on the config drive"
        );
        assert!(!a.iter().any(|x| x.contains("pflash")));
        assert_eq!(a[pos(&a, "-netdev") + 1], "user,id=net0");
    }

    #[test]
    fn isolated_network_only_has_its_forwards() {
        let mut s = spec();
        s.network = Network::Isolated;
        s.firmware = Firmware::Uefi;
        s.guest_forwards.push(GuestForward {
            guest: "10.0.2.100:7480".parse().unwrap(),
            target: "127.0.0.1:9000".into(),
        });
        s.host_forwards.push(HostForward {
            host_port: 2222,
            guest_port: 22,
        });
        // One relay process per connection, not QEMU's single-connection `tcp:` chardev.
        assert_eq!(
            netdev(&s, Some(Path::new("/usr/bin/tern-gateway"))).unwrap(),
            "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:7480-cmd:/usr/bin/tern-gateway relay 127.0.0.1:9000,hostfwd=tcp:127.0.0.1:2222-:22"
        );
        assert!(netdev(&s, None).is_err());
        assert!(netdev(&s, Some(Path::new("/my dir/gw"))).is_err());
        let files = InstanceFiles {
            dir: PathBuf::from("/i"),
        };
        let settings = QemuSettings {
            relay: Some("/gw".into()),
            ..QemuSettings::default()
        };
        let a = qemu_args(&s, &files, &[], "kvm", &settings, false).unwrap();
        assert!(a.iter().any(|x| x.contains("pflash") && x.contains("OVMF_CODE")));
        assert!(a.contains(&"if=pflash,format=raw,unit=1,file=/i/OVMF_VARS.fd".to_owned()));
        assert!(!a.iter().any(|x| x.contains("config-drive")));
    }

    #[test]
    fn drive_paths_are_plain() {
        assert!(check_drive_path("tern/job.json").is_ok());
        assert!(check_drive_path("openstack/latest/user_data").is_ok());
        for bad in ["", "/etc", "a//b", "../x", "a/.b", "a b", "a/"] {
            assert!(check_drive_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pid_is_trusted_only_for_its_own_directory() {
        let dir = tempfile::tempdir().unwrap();
        let files = InstanceFiles {
            dir: dir.path().to_owned(),
        };
        assert_eq!(running_pid(&files), None);
        // Our own pid: alive, but its command line does not name the directory.
        std::fs::write(files.pid(), std::process::id().to_string()).unwrap();
        assert_eq!(running_pid(&files), None);
        // A process whose command line names it.
        let mut child2 = Command::new("sh")
            .arg("-c")
            .arg("sleep 30; : \"$0\"")
            .arg(dir.path())
            .spawn()
            .unwrap();
        std::fs::write(files.pid(), child2.id().to_string()).unwrap();
        // Until the child has exec'd, its command line is its parent's.
        let start = Instant::now();
        while running_pid(&files).is_none() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(running_pid(&files), Some(child2.id() as i32));
        child2.kill().unwrap();
        // Killed but not reaped: a zombie is not running.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(running_pid(&files), None);
        let _ = child2.wait();
    }

    #[test]
    fn config_drive_is_fat_labelled_config_2() {
        if Command::new("mkfs.vfat").arg("--help").output().is_err()
            || Command::new("mdir").arg("--version").output().is_err()
        {
            eprintln!("skipped: mkfs.vfat or mtools missing (scripts/install-deps installs them)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("config-drive.img");
        let files = [
            super::super::ConfigDriveFile {
                path: "tern/job.json".into(),
                content: b"{\"version\":1}".to_vec(),
            },
            super::super::ConfigDriveFile {
                path: "openstack/latest/user_data".into(),
                content: b"x".to_vec(),
            },
        ];
        make_config_drive(&img, &files, "t").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&img).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let out = Command::new("mtype")
            .env("MTOOLS_SKIP_CHECK", "1")
            .arg("-i")
            .arg(&img)
            .arg("::tern/job.json")
            .output()
            .unwrap();
        assert_eq!(out.stdout, b"{\"version\":1}");
        let label = Command::new("mlabel")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-s", "-i"])
            .arg(&img)
            .arg("::")
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&label.stdout)
                .to_ascii_lowercase()
                .contains("config-2"),
            "{label:?}"
        );
        assert!(matches!(
            make_config_drive(
                &img,
                &[super::super::ConfigDriveFile {
                    path: "../x".into(),
                    content: vec![]
                }],
                "t"
            ),
            Err(ProviderError::Spec { .. })
        ));
    }
}
