//! QEMU disk tools for the agentless-source tests: qcow2 images with persistent dirty bitmaps
//! (`qemu-img`), guest-like writes (`qemu-io`) and NBD exports (`qemu-nbd` on a unix socket).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::run_ok;

/// True when `tool` is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The first of `tools` that is missing, if any.
pub fn missing(tools: &[&'static str]) -> Option<&'static str> {
    tools.iter().copied().find(|t| !have(t))
}

/// `qemu-img create -f qcow2 PATH SIZE`.
pub fn create_qcow2(path: &Path, size: u64) -> Result<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path)
            .arg(size.to_string()),
    )?;
    Ok(())
}

/// Runs `qemu-io` commands (`write -P 0xab 1M 64k`, `discard 0 1M`, `write -z 2M 64k`) on a
/// qcow2 image, in one process.
pub fn qemu_io(path: &Path, commands: &[String]) -> Result<()> {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(path);
    let out = run_ok(&mut cmd)?;
    // qemu-io reports failed commands on stdout and still exits 0.
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("failed") || text.contains("error") {
        bail!("qemu-io on {}: {text}", path.display());
    }
    Ok(())
}

/// `qemu-img bitmap --OP IMG NAME` (`add`, `remove`, `clear`).
pub fn bitmap(path: &Path, op: &str, name: &str) -> Result<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["bitmap", &format!("--{op}"), "-f", "qcow2"])
            .arg(path)
            .arg(name),
    )?;
    Ok(())
}

/// The image's guest-visible bytes as a raw file (`qemu-img convert -O raw`).
pub fn to_raw(path: &Path, raw: &Path) -> Result<()> {
    run_ok(
        Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(path)
            .arg(raw),
    )?;
    Ok(())
}

/// A `qemu-nbd` serving one image read-only on a unix socket, killed on drop.
#[derive(Debug)]
pub struct QemuNbd {
    child: Child,
    /// The socket.
    pub socket: PathBuf,
    /// The export name.
    pub export: String,
}

impl QemuNbd {
    /// Serves `image` (qcow2) as `export` on `socket`, with dirty bitmap `bitmap` if given
    /// (`-B`), to one client at a time, any number of times (`-t`).
    pub fn start(image: &Path, socket: &Path, export: &str, bitmap: Option<&str>) -> Result<Self> {
        Self::start_shared(image, socket, export, bitmap, 1)
    }

    /// As [`QemuNbd::start`], to `clients` connections at once (`-e`; more than one makes
    /// `qemu-nbd` advertise multi-conn).
    pub fn start_shared(
        image: &Path,
        socket: &Path,
        export: &str,
        bitmap: Option<&str>,
        clients: u32,
    ) -> Result<Self> {
        let _ = std::fs::remove_file(socket);
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-r", "-t", "-f", "qcow2", "-x", export, "-e"])
            .arg(clients.to_string())
            .arg("-k")
            .arg(socket);
        if let Some(b) = bitmap {
            cmd.args(["-B", b]);
        }
        cmd.arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting qemu-nbd")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("qemu-nbd exited with {status}: {err}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("qemu-nbd did not create {} within 20 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            child,
            socket: socket.to_owned(),
            export: export.to_owned(),
        })
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.export, self.socket.display())
    }

    /// Stops the server (the image can then be changed by `qemu-io` and `qemu-img`).
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Dirty bytes of `bitmap` in `image`, counted at the bitmap's granularity, as `nbdinfo --map`
/// reports them (an independent reading of the bitmap).
pub fn nbdinfo_dirty_bytes(image: &Path, bitmap: &str, dir: &Path) -> Result<u64> {
    let nbd = QemuNbd::start(image, &dir.join("nbdinfo.sock"), "x", Some(bitmap))?;
    let out = run_ok(
        Command::new("nbdinfo")
            .arg(format!("--map=qemu:dirty-bitmap:{bitmap}"))
            .arg("--json")
            .arg(nbd.uri()),
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("nbdinfo --map --json")?;
    let Some(list) = v.as_array() else {
        bail!("nbdinfo --map --json printed no list: {v}");
    };
    Ok(list
        .iter()
        .filter(|e| e["type"].as_u64().unwrap_or(0) & 1 == 1)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum())
}
