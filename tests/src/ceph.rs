//! RBD images on the test Ceph cluster (`scripts/ceph-rgw start`, found through
//! `TERN_CEPH_RGW_JSON`), written through librbd (python3-rbd) like a guest would.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::run_ok;

/// The python with the distribution's `rados` and `rbd` modules (python3-rbd).
const PYTHON: &str = "/usr/bin/python3";

/// How to reach the cluster.
#[derive(Debug, Clone, Deserialize)]
pub struct Cluster {
    /// `ceph.conf`.
    pub ceph_conf: PathBuf,
    /// The admin keyring.
    pub keyring: PathBuf,
}

impl Cluster {
    /// The cluster of `TERN_CEPH_RGW_JSON`; `None` (after saying why) when it is not set, an
    /// error when `TERN_REQUIRE_CEPH=1` and it is not set.
    pub fn from_env(test: &str) -> Result<Option<Self>> {
        let Some(path) = std::env::var_os("TERN_CEPH_RGW_JSON") else {
            if std::env::var("TERN_REQUIRE_CEPH").ok().as_deref() == Some("1") {
                bail!(
                    "TERN_REQUIRE_CEPH=1 but TERN_CEPH_RGW_JSON is not set (scripts/ceph-rgw start writes it)"
                );
            }
            eprintln!(
                "skipped {test}: no Ceph (set TERN_CEPH_RGW_JSON; scripts/ceph-rgw start; scripts/test does both)"
            );
            return Ok(None);
        };
        let text = std::fs::read(Path::new(&path)).context("reading TERN_CEPH_RGW_JSON")?;
        Ok(Some(
            serde_json::from_slice(&text).context("parsing TERN_CEPH_RGW_JSON")?,
        ))
    }

    /// `rbd -c CONF --keyring KEYRING`.
    pub fn rbd(&self) -> Command {
        let mut c = Command::new("rbd");
        c.arg("-c")
            .arg(&self.ceph_conf)
            .arg("--keyring")
            .arg(&self.keyring)
            .stdin(Stdio::null());
        c
    }

    /// The agent options that reach this cluster.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--ceph-conf".into(),
            self.ceph_conf.display().to_string(),
            "--ceph-keyring".into(),
            self.keyring.display().to_string(),
        ]
    }
}

/// A test image in pool `rbd`, removed (snapshots first) when dropped.
#[derive(Debug)]
pub struct Image {
    cluster: Cluster,
    /// The image name.
    pub name: String,
}

impl Image {
    /// Creates a new image of `size` bytes named after `test`.
    pub fn create(cluster: &Cluster, test: &str, size: u64) -> Result<Self> {
        let name = format!("{test}-{:08x}", rand::random::<u32>());
        run_ok(cluster.rbd().args([
            "create",
            "--size",
            &format!("{}K", size >> 10),
            &format!("rbd/{name}"),
        ]))?;
        Ok(Self {
            cluster: cluster.clone(),
            name,
        })
    }

    /// `rbd/NAME`.
    pub fn spec(&self) -> String {
        format!("rbd/{}", self.name)
    }

    /// The snapshot names, oldest first.
    pub fn snapshots(&self) -> Result<Vec<String>> {
        let out = run_ok(
            self.cluster
                .rbd()
                .args(["snap", "ls", "--format", "json", &self.spec()]),
        )?;
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        Ok(v.iter()
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect())
    }

    /// What `rbd diff --from-snap FROM IMAGE` (metadata only, an independent reading of what
    /// changed since snapshot `from`) lists: bytes that exist (data), rounded out to `block`
    /// boundaries, and bytes that no longer exist (zeros).
    pub fn diff_since(&self, from: &str, block: u64) -> Result<(u64, u64)> {
        let out =
            run_ok(
                self.cluster
                    .rbd()
                    .args(["diff", "--format", "json", "--from-snap", from, &self.spec()]),
            )?;
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        let mut blocks = std::collections::BTreeSet::new();
        let mut zero = 0;
        for e in &v {
            let (off, len) = (
                e["offset"].as_u64().unwrap_or(0),
                e["length"].as_u64().unwrap_or(0),
            );
            if e["exists"].as_str() == Some("true") || e["exists"].as_bool() == Some(true) {
                blocks.extend(off / block..(off + len).div_ceil(block));
            } else {
                zero += len;
            }
        }
        Ok((blocks.len() as u64 * block, zero))
    }

    /// `rbd export IMAGE@SNAP FILE`.
    pub fn export(&self, snap: &str, file: &Path) -> Result<()> {
        let _ = std::fs::remove_file(file);
        run_ok(
            self.cluster
                .rbd()
                .args(["export", "--no-progress", &format!("{}@{snap}", self.spec())])
                .arg(file),
        )?;
        Ok(())
    }

    /// Runs python code with `im` (the open image), `M`, `K` and `rnd` (seeded) defined.
    pub fn python(&self, seed: u64, code: &str) -> Result<()> {
        let script = format!(
            "import os, random, rados, rbd\n\
             c = rados.Rados(conffile=os.environ['TERN_CONF'], conf={{'keyring': os.environ['TERN_KEYRING']}})\n\
             c.connect()\n\
             io = c.open_ioctx('rbd')\n\
             im = rbd.Image(io, os.environ['TERN_IMAGE'])\n\
             M = 1 << 20\n\
             K = 1 << 10\n\
             rnd = random.Random({seed})\n\
             {code}\n\
             im.close()\n\
             io.close()\n\
             c.shutdown()\n"
        );
        run_ok(
            Command::new(PYTHON)
                .arg("-c")
                .arg(&script)
                .env("TERN_CONF", &self.cluster.ceph_conf)
                .env("TERN_KEYRING", &self.cluster.keyring)
                .env("TERN_IMAGE", &self.name)
                .stdin(Stdio::null()),
        )
        .context("python3-rbd (scripts/ceph-rgw installs it)")?;
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = self
            .cluster
            .rbd()
            .args(["snap", "purge", "--no-progress", &self.spec()])
            .output();
        let _ = self
            .cluster
            .rbd()
            .args(["rm", "--no-progress", &self.spec()])
            .output();
    }
}
