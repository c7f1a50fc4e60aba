"""Shared helpers of the benchmark scripts (bench-ingest, bench-cbt): processes, timing, page
cache, an XFS work directory, a gateway with one host key."""
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BIN = os.path.join(TARGET, "release")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def timed(cmd, **kw):
    """Runs cmd; returns (seconds, child CPU seconds, completed process)."""
    before = os.times()
    t = time.monotonic()
    p = run(cmd, **kw)
    el = time.monotonic() - t
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return el, cpu, p


def drop_caches():
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def need_tools(script, tools):
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"{script}: {tool} is missing (scripts/install-deps installs it)")


def mount_xfs(script, work, size=24 << 30):
    """Mounts a fresh XFS (reflink on) at work; returns a cleanup function, or None without
    root (the plain directory is used: the gateway's snapshots are then full copies)."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        print(f"{script}: not root or no mkfs.xfs: running on the plain directory (snapshots are copies)", file=sys.stderr)
        return None
    img = work.rstrip("/") + ".xfs"
    subprocess.run(["umount", work], stderr=subprocess.DEVNULL)
    os.makedirs(work, exist_ok=True)
    with open(img, "wb") as f:
        f.truncate(size)
    run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", img])
    dev = run(["losetup", "--find", "--show", "--direct-io=on", img], capture_output=True, text=True).stdout.strip()
    run(["mount", dev, work])

    def cleanup():
        # A process that just exited may still hold the mount for a moment.
        for _ in range(50):
            if subprocess.run(["umount", work], stderr=subprocess.DEVNULL).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", work])
        subprocess.run(["losetup", "-d", dev])
        os.unlink(img)

    return cleanup


class Gateway:
    """A tern-gateway with preallocated local volumes under work/gw and a key for host."""

    def __init__(self, work, host):
        self.dir = os.path.join(work, "gw")
        os.makedirs(self.dir)
        conf = os.path.join(work, "gateway.toml")
        with open(conf, "w") as f:
            f.write(
                f'data_dir = "{self.dir}"\n[data_plane]\nlisten = "127.0.0.1:0"\n'
                '[control_plane]\nlisten = "127.0.0.1:0"\n[provider]\npreallocate = true\n'
            )
        self.log_path = os.path.join(work, "gateway.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([os.path.join(BIN, "tern-gateway"), "serve", "--config", conf], stdout=subprocess.DEVNULL, stderr=self.log)
        ep_path = os.path.join(self.dir, "endpoint.json")
        for _ in range(600):
            if os.path.exists(ep_path):
                break
            time.sleep(0.05)
        self.endpoint = json.load(open(ep_path))
        key = json.loads(run([os.path.join(BIN, "tern-gateway"), "key", "create", "--data-dir", self.dir, "--host", host], capture_output=True).stdout)
        self.env = dict(os.environ, TERN_SECRET_ACCESS_KEY=key["secret_access_key"], RUST_LOG="warn")
        self.agent = [
            os.path.join(BIN, "tern-agent"), "sync", "--host", host, "--target", f"https://{self.endpoint['data']}",
            "--fingerprint", self.endpoint["fingerprint"], "--access-key-id", key["access_key_id"],
            "--state-dir", os.path.join(work, "agent"), "--no-progress",
        ] + os.environ.get("TERN_BENCH_AGENT_ARGS", "").split()

    def cpu(self):
        return cpu_of(self.proc.pid)

    def peak_rss_mib(self):
        return peak_rss_mib(self.proc.pid)

    def snapshot_methods(self):
        return sorted({l.split("method=")[1].split()[0] for l in open(self.log_path, errors="replace") if "method=" in l})

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        self.log.close()
