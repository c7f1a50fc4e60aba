//! `rbd export-diff` streams from a real Ceph cluster (16.2, `scripts/ceph-rgw start`), parsed by
//! `tern_core::rbd_diff` straight from the `rbd` pipe, spooled and applied to a replica file: after
//! every step the replica equals `rbd export` of the snapshot. Also checks the Ceph behaviour
//! `docs/rbd.md` relies on (new objects reported from their start, zero data as `z`, discards as
//! `z` clipped to the old object size, resizes), the v2 diffs inside `rbd export --export-format
//! 2`, and that a truncated stream or one about the wrong snapshot is refused.
//!
//! Finds the cluster through `TERN_CEPH_RGW_JSON` (the `rgw.json` that `scripts/ceph-rgw start`
//! writes); without it the test prints "skipped" and passes, unless `TERN_REQUIRE_CEPH=1`.

#![allow(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tern_core::changes::{Change, ChangeKind, ChangeMap};
use tern_core::rbd_diff::{self, Expect, MemExtents, RbdDiffError, SpooledDiff, Version};

const M: u64 = 1 << 20;
const K: u64 = 1 << 10;
const POOL: &str = "rbd";
/// The python with the distribution's `rados` and `rbd` modules (python3-rbd).
const PYTHON: &str = "/usr/bin/python3";

struct Cluster {
    conf: String,
    keyring: String,
}

fn cluster() -> Option<Cluster> {
    let required = std::env::var("TERN_REQUIRE_CEPH").is_ok_and(|v| v == "1");
    let Some(path) = std::env::var_os("TERN_CEPH_RGW_JSON") else {
        assert!(
            !required,
            "TERN_REQUIRE_CEPH=1 but TERN_CEPH_RGW_JSON is not set (scripts/ceph-rgw start)"
        );
        println!("skipped: no Ceph (set TERN_CEPH_RGW_JSON; scripts/ceph-rgw start)");
        return None;
    };
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("TERN_CEPH_RGW_JSON={}: {e}", Path::new(&path).display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let field = |k: &str| {
        json[k]
            .as_str()
            .unwrap_or_else(|| panic!("{} has no {k:?}", Path::new(&path).display()))
            .to_owned()
    };
    Some(Cluster {
        conf: field("ceph_conf"),
        keyring: field("keyring"),
    })
}

/// A test image, removed (snapshots first) when dropped.
struct Image<'c> {
    cluster: &'c Cluster,
    name: String,
}

impl Image<'_> {
    fn spec(&self) -> String {
        format!("{POOL}/{}", self.name)
    }

    fn snap(&self, snap: &str) -> String {
        format!("{POOL}/{}@{snap}", self.name)
    }

    fn rbd_cmd(&self) -> Command {
        let mut c = Command::new("rbd");
        c.args(["-c", &self.cluster.conf, "--keyring", &self.cluster.keyring]);
        c
    }

    /// Runs `rbd ARGS`, returns stdout; panics with stderr on failure.
    fn rbd(&self, args: &[&str]) -> Vec<u8> {
        let out = self.rbd_cmd().args(args).stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "rbd {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Runs python code with `im` (the open image), `M`, `K` and `rnd` (seeded) defined.
    fn python(&self, seed: u64, code: &str) {
        let script = format!(
            "import os, random, rados, rbd\n\
             c = rados.Rados(conffile=os.environ['TERN_CONF'], conf={{'keyring': os.environ['TERN_KEYRING']}})\n\
             c.connect()\n\
             io = c.open_ioctx(os.environ['TERN_POOL'])\n\
             im = rbd.Image(io, os.environ['TERN_IMAGE'])\n\
             M = 1 << 20\n\
             K = 1 << 10\n\
             rnd = random.Random({seed})\n\
             {code}\n\
             im.close()\n\
             io.close()\n\
             c.shutdown()\n"
        );
        let out = Command::new(PYTHON)
            .arg("-c")
            .arg(&script)
            .env("TERN_CONF", &self.cluster.conf)
            .env("TERN_KEYRING", &self.cluster.keyring)
            .env("TERN_POOL", POOL)
            .env("TERN_IMAGE", &self.name)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{PYTHON}: {e} (apt-get install -y python3-rbd)"));
        assert!(
            out.status.success(),
            "python failed ({}): {}\n{script}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `rbd export-diff [--from-snap FROM] IMAGE@TO -`, spooled straight from the pipe.
    fn spool_diff(&self, from: Option<&str>, to: &str, spool: &File) -> SpooledDiff {
        let mut cmd = self.rbd_cmd();
        cmd.args(["export-diff", "--no-progress"]);
        if let Some(from) = from {
            cmd.args(["--from-snap", from]);
        }
        let mut child = cmd
            .args([&self.snap(to), "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let expect = Expect {
            from_snap: from.map(str::to_owned),
            to_snap: to.to_owned(),
            max_size: Some(1 << 30),
        };
        let stdout = child.stdout.take().unwrap();
        let diff = rbd_diff::spool(stdout, &expect, spool);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "rbd export-diff: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        diff.unwrap_or_else(|e| panic!("{}", tern_core::error_chain(&e)))
    }

    /// The raw stream of `rbd export-diff`.
    fn diff_bytes(&self, from: Option<&str>, to: &str) -> Vec<u8> {
        let to = self.snap(to);
        let mut args = vec!["export-diff", "--no-progress"];
        if let Some(from) = from {
            args.extend(["--from-snap", from]);
        }
        args.extend([to.as_str(), "-"]);
        self.rbd(&args)
    }

    /// `rbd export IMAGE@SNAP -`: the snapshot's bytes.
    fn export(&self, snap: &str) -> Vec<u8> {
        self.rbd(&["export", "--no-progress", &self.snap(snap), "-"])
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        let spec = self.spec();
        for args in [
            &["snap", "purge", "--no-progress", spec.as_str()][..],
            &["rm", "--no-progress", spec.as_str()],
        ] {
            match self.rbd_cmd().args(args).stdin(Stdio::null()).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!("cleanup: rbd {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => eprintln!("cleanup: rbd {args:?}: {e}"),
            }
        }
    }
}

fn new_spool(dir: &Path, name: &str) -> (File, PathBuf) {
    let path = dir.join(name);
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    (file, path)
}

/// Applies `changes` (a diff's map, possibly extended by `changes_from_base`) to `replica`:
/// resized to the diff's size first, data read from the spool at the same offsets, zero ranges
/// zeroed. A grown tail is first filled with garbage, to prove the changes cover it.
fn apply(replica: &File, diff: &SpooledDiff, changes: &ChangeMap, spool: &File) {
    let old = replica.metadata().unwrap().len();
    replica.set_len(diff.size).unwrap();
    if diff.size > old {
        let garbage = vec![0xeeu8; (diff.size - old) as usize];
        replica.write_all_at(&garbage, old).unwrap();
    }
    let mut buf = Vec::new();
    for c in changes.changes() {
        buf.resize(c.len() as usize, 0);
        if c.kind == ChangeKind::Data {
            spool.read_exact_at(&mut buf, c.range.start).unwrap();
        } else {
            buf.fill(0);
        }
        replica.write_all_at(&buf, c.range.start).unwrap();
    }
}

fn assert_same(replica: &Path, want: &[u8], what: &str) {
    let got = std::fs::read(replica).unwrap();
    assert_eq!(got.len(), want.len(), "{what}: size");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: replica {:#04x}, ceph {:#04x}",
            got[i], want[i]
        );
    }
}

fn has(diff: &SpooledDiff, c: Change) -> bool {
    diff.changes.changes().contains(&c)
}

fn d(r: std::ops::Range<u64>) -> Change {
    Change::new(r, ChangeKind::Data)
}

fn z(r: std::ops::Range<u64>) -> Change {
    Change::new(r, ChangeKind::Zero)
}

/// Parses the header of `rbd export --export-format 2` and returns the offset of its first diff.
fn skip_export_v2_header(bytes: &[u8]) -> (usize, u64) {
    let banner = b"rbd image v2\n";
    assert_eq!(&bytes[..banner.len()], banner);
    let mut at = banner.len();
    loop {
        let tag = bytes[at];
        at += 1;
        if tag == b'E' {
            break;
        }
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        at += 8 + len;
    }
    let banner = b"rbd image diffs v2\n";
    assert_eq!(&bytes[at..at + banner.len()], banner);
    at += banner.len();
    let count = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    (at + 8, count)
}

#[test]
fn export_diff_from_real_ceph() {
    let Some(cluster) = cluster() else {
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let img = Image {
        cluster: &cluster,
        name: format!("tern-rbd-diff-{}-{nanos}", std::process::id()),
    };
    img.rbd(&["create", "--size", "64M", &img.spec()]);
    let dir = tempfile::tempdir().unwrap();

    // s1: random data in objects 0-5 (0..24 MiB), the last 4 KiB of object 0, data in the middle
    // of new objects 7, 10 and 11, 64 KiB of zeros in the middle of new object 9.
    img.python(
        1,
        "for _ in range(48):\n    \
             n = rnd.randrange(1, 129) * 512\n    \
             im.write(rnd.randbytes(n), rnd.randrange(0, 24 * M - n))\n\
         im.write(rnd.randbytes(4 * K), 4 * M - 4 * K)\n\
         im.write(rnd.randbytes(8 * K), 30 * M + 4 * K)\n\
         im.write(bytes(64 * K), 37 * M)\n\
         im.write(rnd.randbytes(M), 40 * M + 512 * K)\n\
         im.write(rnd.randbytes(256 * K), 44 * M)",
    );
    img.rbd(&["snap", "create", &img.snap("s1")]);

    // Full diff of s1, spooled from the pipe, applied to a zeroed file.
    let (spool1, _) = new_spool(dir.path(), "spool1");
    let full = img.spool_diff(None, "s1", &spool1);
    assert_eq!(full.version, Version::V1);
    assert_eq!((full.from_snap.as_deref(), full.to_snap.as_str()), (None, "s1"));
    assert_eq!(full.size, 64 * M);
    assert_eq!(full.protected, None);
    let (replica, replica_path) = new_spool(dir.path(), "replica");
    replica.set_len(64 * M).unwrap();
    apply(&replica, &full, &full.changes, &spool1);
    let s1 = img.export("s1");
    assert_same(&replica_path, &s1, "full diff of s1 applied to zeros");
    // The same through `changes_from_base(0)` on garbage: what the stream leaves out is zero.
    let (other, other_path) = new_spool(dir.path(), "other");
    apply(&other, &full, &full.changes_from_base(0), &spool1);
    assert_same(
        &other_path,
        &s1,
        "full diff of s1 applied with changes_from_base(0)",
    );
    // Ceph facts: a new object is reported from its start (zero-filled) to the end of the write;
    // all-zero data is a `z` record.
    assert!(has(&full, d(28 * M..30 * M + 12 * K)), "{:?}", full.changes);
    let mut lead = vec![1u8; (2 * M + 4 * K) as usize];
    spool1.read_exact_at(&mut lead, 28 * M).unwrap();
    assert!(lead.iter().all(|&b| b == 0));
    assert!(has(&full, z(36 * M..37 * M + 64 * K)), "{:?}", full.changes);
    assert!(has(&full, d(40 * M..41 * M + 512 * K)), "{:?}", full.changes);

    // s2: more random data in objects 1-5, 64 KiB of zeros over data in object 0 and in new
    // object 12, new data in object 13, a discard of all of object 10 (1.5 MiB long), an aligned
    // 64 KiB discard inside object 11 and an unaligned 1000-byte one (below the 64 KiB discard
    // granularity: ignored by librbd).
    img.python(
        2,
        "for _ in range(32):\n    \
             n = rnd.randrange(1, 129) * 512\n    \
             im.write(rnd.randbytes(n), rnd.randrange(4 * M, 24 * M - n))\n\
         im.write(bytes(64 * K), 3 * M)\n\
         im.write(bytes(64 * K), 49 * M)\n\
         im.write(rnd.randbytes(4 * K), 54 * M)\n\
         im.discard(40 * M, 4 * M)\n\
         im.discard(44 * M + 64 * K, 64 * K)\n\
         im.discard(44 * M + 200000, 1000)",
    );
    img.rbd(&["snap", "create", &img.snap("s2")]);

    let (spool2, _) = new_spool(dir.path(), "spool2");
    let inc = img.spool_diff(Some("s1"), "s2", &spool2);
    assert_eq!(
        (inc.from_snap.as_deref(), inc.to_snap.as_str()),
        (Some("s1"), "s2")
    );
    assert_eq!(inc.size, 64 * M);
    apply(&replica, &inc, &inc.changes, &spool2);
    let s2 = img.export("s2");
    assert_same(&replica_path, &s2, "s1 + diff s1..s2");
    // Ceph facts: zeros written over data are `z`; a new all-zero object is `z` from its start; a
    // new data object is `w` from its start; a discard is `z` clipped to the object's old size;
    // a discard below the granularity is not there at all.
    assert!(has(&inc, z(3 * M..3 * M + 64 * K)), "{:?}", inc.changes);
    assert!(has(&inc, z(48 * M..49 * M + 64 * K)), "{:?}", inc.changes);
    assert!(has(&inc, d(52 * M..54 * M + 4 * K)), "{:?}", inc.changes);
    assert!(has(&inc, z(40 * M..41 * M + 512 * K)), "{:?}", inc.changes);
    assert!(
        has(&inc, z(44 * M + 64 * K..44 * M + 128 * K)),
        "{:?}",
        inc.changes
    );
    assert!(
        !inc.changes
            .changes()
            .iter()
            .any(|c| c.range.start < 48 * M && c.range.end > 44 * M + 128 * K),
        "{:?}",
        inc.changes
    );
    assert!(
        !inc.changes
            .changes()
            .iter()
            .any(|c| c.range.start < 4 * M && c.range.end > 3 * M + 64 * K)
    );

    // The v2 diffs inside `rbd export --export-format 2` (none..s1, s1..s2, s2..head): the same
    // changes and data as the v1 streams, with a protection status.
    let v2 = img.rbd(&[
        "export",
        "--no-progress",
        "--export-format",
        "2",
        &img.snap("s2"),
        "-",
    ]);
    let (first, count) = skip_export_v2_header(&v2);
    assert_eq!(count, 3);
    let mut rest = &v2[first..];
    for (expect, v1) in [
        (Expect::full("s1"), img.diff_bytes(None, "s1")),
        (Expect::incremental("s1", "s2"), img.diff_bytes(Some("s1"), "s2")),
    ] {
        let mut data = MemExtents::default();
        let got = rbd_diff::decode_section(&mut rest, &expect, &mut data).unwrap();
        let (want, want_data) = rbd_diff::parse(&v1, &expect).unwrap();
        assert_eq!(got.version, Version::V2);
        assert_eq!(got.protected, Some(false));
        assert_eq!(
            (&got.changes, got.size, &got.to_snap),
            (&want.changes, want.size, &want.to_snap)
        );
        assert_eq!(data, want_data);
    }

    // Refused: a real stream cut anywhere (EOF before `e`), with a byte after `e`, about another
    // "to" or "from" snapshot.
    let bytes = img.diff_bytes(Some("s1"), "s2");
    let expect = Expect::incremental("s1", "s2");
    for cut in [0, 11, 12, 40, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        let (spool, _) = new_spool(dir.path(), &format!("cut{cut}"));
        match rbd_diff::spool(&bytes[..cut], &expect, &spool) {
            Err(RbdDiffError::Truncated { offset, .. }) => assert_eq!(offset, cut as u64),
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    let mut extra = bytes.clone();
    extra.push(b'e');
    let (spool, _) = new_spool(dir.path(), "extra");
    let e = rbd_diff::spool(&extra[..], &expect, &spool).unwrap_err();
    assert!(
        matches!(e, RbdDiffError::TrailingData { offset } if offset == bytes.len() as u64),
        "{e}"
    );
    let (spool, _) = new_spool(dir.path(), "wrong-to");
    let e = rbd_diff::spool(&bytes[..], &Expect::incremental("s1", "s3"), &spool).unwrap_err();
    assert!(
        matches!(&e, RbdDiffError::ToSnap { found: Some(f), .. } if f == "s2"),
        "{e}"
    );
    println!("refused as expected: {e}");
    let (spool, _) = new_spool(dir.path(), "wrong-from");
    let e = rbd_diff::spool(&bytes[..], &Expect::full("s2"), &spool).unwrap_err();
    assert!(
        matches!(&e, RbdDiffError::FromSnap { found: Some(f), expected: None, .. } if f == "s1"),
        "{e}"
    );
    let e = rbd_diff::spool(&bytes[..], &expect.clone().with_max_size(32 * M), &spool).unwrap_err();
    assert!(matches!(e, RbdDiffError::SizeTooLarge { .. }), "{e}");

    // s3: the image shrinks to 22 MiB + 8 KiB (through object 5), then a write.
    let s2_replica = dir.path().join("replica-s2");
    std::fs::copy(&replica_path, &s2_replica).unwrap();
    img.python(
        3,
        "im.resize(22 * M + 8 * K)\nim.write(rnd.randbytes(4 * K), 10 * M)",
    );
    img.rbd(&["snap", "create", &img.snap("s3")]);
    let (spool3, _) = new_spool(dir.path(), "spool3");
    let shrink = img.spool_diff(Some("s2"), "s3", &spool3);
    assert_eq!(shrink.size, 22 * M + 8 * K);
    assert_eq!(shrink.changes_from_base(64 * M), shrink.changes);
    apply(&replica, &shrink, &shrink.changes, &spool3);
    assert_same(&replica_path, &img.export("s3"), "s2 + diff s2..s3 (shrink)");

    // s4: it grows to 56 MiB, with a write at 50 MiB. Ceph reports nothing for the new tail
    // but the write: `changes_from_base` zeroes the rest.
    img.python(4, "im.resize(56 * M)\nim.write(rnd.randbytes(4 * K), 50 * M)");
    img.rbd(&["snap", "create", &img.snap("s4")]);
    let (spool4, _) = new_spool(dir.path(), "spool4");
    let grow = img.spool_diff(Some("s3"), "s4", &spool4);
    assert_eq!(grow.size, 56 * M);
    assert!(
        grow.changes.changes().iter().all(|c| c.range.start >= 48 * M),
        "{:?}",
        grow.changes
    );
    let grown = grow.changes_from_base(22 * M + 8 * K);
    assert!(grown.changes().contains(&z(22 * M + 8 * K..48 * M)), "{grown:?}");
    apply(&replica, &grow, &grown, &spool4);
    let s4 = img.export("s4");
    assert_same(&replica_path, &s4, "s3 + diff s3..s4 (growth)");

    // s2..s4 in one diff (shrunk then grown): Ceph reports the data the shrink deleted inside
    // the re-grown range (objects 12 and 13) as `z`.
    let (spool24, _) = new_spool(dir.path(), "spool24");
    let both = img.spool_diff(Some("s2"), "s4", &spool24);
    assert_eq!(both.size, 56 * M);
    assert!(has(&both, z(52 * M..54 * M + 4 * K)), "{:?}", both.changes);
    let replica2 = File::options().read(true).write(true).open(&s2_replica).unwrap();
    apply(&replica2, &both, &both.changes_from_base(64 * M), &spool24);
    assert_same(&s2_replica, &s4, "s2 + diff s2..s4 (shrink then growth)");

    // A pipe that dies mid-stream: `head -c` cuts the real stream; refused as truncated.
    let mut child = img
        .rbd_cmd()
        .args([
            "export-diff",
            "--no-progress",
            "--from-snap",
            "s1",
            &img.snap("s2"),
            "-",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut head = Command::new("head")
        .args(["-c", "100000"])
        .stdin(child.stdout.take().unwrap())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (spool, _) = new_spool(dir.path(), "head");
    let mut pipe = head.stdout.take().unwrap();
    let e = rbd_diff::spool(&mut pipe, &expect, &spool).unwrap_err();
    assert!(matches!(e, RbdDiffError::Truncated { offset: 100000, .. }), "{e}");
    let mut sink = Vec::new();
    pipe.read_to_end(&mut sink).unwrap();
    head.wait().unwrap();
    let _ = child.wait();
}
