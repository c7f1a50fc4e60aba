//! End-to-end syncs into a directory target: full, incremental, no-change, lost state, resume
//! after an interruption (with the source changing in between), a disk that grew. After every
//! sync the point's images equal the sources, and earlier points are unchanged.

#![allow(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use bytes::Bytes;
use tern_agent::engine::{DiskSpec, SyncOptions, SyncSummary, sync_host};
use tern_agent::target::dir::DirTarget;
use tern_agent::target::{ErrorKind, PointEntry, Target, TargetError};
use tern_core::protocol::{HostState, LandedExtent, SyncPlan};
use tern_core::{Digest, DiskId, HostId, Manifest, PointId};

const CHUNK: u32 = 256 << 10;
const BLOCK: u32 = 16 << 10;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    target: Arc<DirTarget>,
    opts: SyncOptions,
    host: HostId,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.img");
    let b = tmp.path().join("b.img");
    let mut rng = Rng(0x1234_5678_9abc_def1);
    // a: 3 chunks + 12.5 KiB (the last chunk is short and ends off a 4 KiB boundary), data in
    // places, a hole in the middle.
    let a_size = 3 * u64::from(CHUNK) + 12_800;
    let f = std::fs::File::create(&a).unwrap();
    f.set_len(a_size).unwrap();
    f.write_all_at(&rng.bytes(100_000), 0).unwrap();
    f.write_all_at(&rng.bytes(40_000), 2 * u64::from(CHUNK) + 5000)
        .unwrap();
    f.write_all_at(&rng.bytes(12_800), 3 * u64::from(CHUNK)).unwrap();
    // b: 8 chunks, mostly sparse.
    let f = std::fs::File::create(&b).unwrap();
    f.set_len(8 * u64::from(CHUNK)).unwrap();
    f.write_all_at(&rng.bytes(300_000), u64::from(CHUNK) / 2).unwrap();
    f.write_all_at(&rng.bytes(4096), 7 * u64::from(CHUNK) + 4096)
        .unwrap();

    let host = HostId::new("web-01").unwrap();
    let target = Arc::new(DirTarget::new(tmp.path().join("target"), host.clone()));
    let opts = SyncOptions {
        host: host.clone(),
        disks: vec![
            DiskSpec::path(DiskId::new("sda").unwrap(), &a),
            DiskSpec::path(DiskId::new("sdb").unwrap(), &b),
        ],
        state_dir: tmp.path().join("state"),
        chunk_size: CHUNK,
        block_size: BLOCK,
        window: 4,
        bwlimit: None,
        sources: Default::default(),
    };
    Fixture {
        _tmp: tmp,
        a,
        b,
        target,
        opts,
        host,
    }
}

impl Fixture {
    fn snapshot(&self) -> (Vec<u8>, Vec<u8>) {
        (std::fs::read(&self.a).unwrap(), std::fs::read(&self.b).unwrap())
    }

    fn point_images(&self, point: &str) -> (Vec<u8>, Vec<u8>) {
        let p = PointId::new(point).unwrap();
        let img =
            |d: &str| std::fs::read(self.target.point_image_path(&p, &DiskId::new(d).unwrap())).unwrap();
        (img("sda"), img("sdb"))
    }

    async fn sync(&self) -> SyncSummary {
        sync_host(&self.target, &self.opts).await.unwrap()
    }

    /// Syncs and checks the point against the sources.
    async fn sync_and_check(&self) -> (SyncSummary, (Vec<u8>, Vec<u8>)) {
        let s = self.sync().await;
        let src = self.snapshot();
        assert!(
            self.point_images(&s.point_id) == src,
            "point {} differs from the sources",
            s.point_id
        );
        let m = self
            .target
            .get_point(&PointId::new(&s.point_id).unwrap())
            .await
            .unwrap();
        assert_eq!(m.host_id, self.host);
        for (d, data) in m.disks.iter().zip([&src.0, &src.1]) {
            assert_eq!(d.geometry.size(), data.len() as u64);
            for (i, c) in d.chunks.iter().enumerate() {
                let r = d.geometry.chunk_range(i as u64);
                let bytes = &data[r.start as usize..r.end as usize];
                match c {
                    tern_core::ChunkRef::Zero => assert!(tern_core::digest::is_zero(bytes)),
                    tern_core::ChunkRef::Data(dg) => assert_eq!(*dg, Digest::of(bytes)),
                }
            }
        }
        // Sizes add up on every disk.
        for d in &s.disks {
            let c = &d.counters;
            assert_eq!(
                c.bytes_sent + c.bytes_skipped_zero + c.bytes_skipped_unchanged,
                d.size,
                "{d:?}"
            );
        }
        (s, src)
    }
}

fn write(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_incremental_unchanged_and_rebuilt_state() {
    let fx = fixture();

    // Full sync: only non-zero blocks are sent; holes are not read.
    let (s1, src1) = fx.sync_and_check().await;
    assert!(!s1.resumed);
    assert!(s1.disks.iter().all(|d| d.baseline == "zero"));
    let nonzero_blocks = |data: &[u8]| -> u64 {
        data.chunks(BLOCK as usize)
            .filter(|b| !tern_core::digest::is_zero(b))
            .map(|b| b.len() as u64)
            .sum()
    };
    assert_eq!(s1.disks[0].counters.bytes_sent, nonzero_blocks(&src1.0));
    assert_eq!(s1.disks[1].counters.bytes_sent, nonzero_blocks(&src1.1));
    assert_eq!(s1.totals.zero_extents_sent, 0);
    assert!(
        s1.disks[1].counters.bytes_read < s1.disks[1].size,
        "holes were read: {:?}",
        s1.disks[1]
    );

    // Random writes of 4 KiB, and a zeroed range on b.
    let mut rng = Rng(42);
    let a_size = src1.0.len() as u64;
    let mut changed_blocks = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let off = rng.next() % (a_size / 4096) * 4096;
        let len = 4096.min(a_size - off) as usize;
        write(&fx.a, off, &rng.bytes(len));
        changed_blocks.insert(off / u64::from(BLOCK));
    }
    write(&fx.b, u64::from(CHUNK) / 2, &vec![0u8; 2 * BLOCK as usize]);

    let (s2, src2) = fx.sync_and_check().await;
    assert!(s2.disks.iter().all(|d| d.baseline == "state"), "{:?}", s2.disks);
    let a2 = &s2.disks[0].counters;
    let expected: u64 = changed_blocks
        .iter()
        .map(|b| u64::from(BLOCK).min(a_size - b * u64::from(BLOCK)))
        .sum();
    assert_eq!(a2.bytes_sent, expected, "{a2:?}");
    assert!(a2.extents_sent <= changed_blocks.len() as u64);
    let b2 = &s2.disks[1].counters;
    assert_eq!(
        (b2.bytes_sent, b2.zero_extents_sent, b2.bytes_zeroed),
        (0, 1, 2 * u64::from(BLOCK))
    );
    // The first point is unchanged.
    assert!(fx.point_images(&s1.point_id) == src1);

    // Nothing changed: nothing sent.
    let (s3, _) = fx.sync_and_check().await;
    assert_eq!(
        (
            s3.totals.bytes_sent,
            s3.totals.extents_sent,
            s3.totals.zero_extents_sent
        ),
        (0, 0, 0)
    );

    // The agent lost its state: rebuilt from the latest manifest (chunk level).
    std::fs::remove_dir_all(fx.opts.state_dir.join("web-01").join("disks")).unwrap();
    write(&fx.a, 4096, &rng.bytes(4096));
    let (s4, _) = fx.sync_and_check().await;
    assert!(
        s4.disks.iter().all(|d| d.baseline == "manifest"),
        "{:?}",
        s4.disks
    );
    assert_eq!(
        s4.disks[0].counters.bytes_sent,
        nonzero_blocks(&fx.snapshot().0[..CHUNK as usize])
    );
    assert_eq!(s4.disks[1].counters.bytes_sent, 0);
    // ...and the next incremental uses block values again.
    let (s5, _) = fx.sync_and_check().await;
    assert!(s5.disks.iter().all(|d| d.baseline == "state"));

    // Every earlier point is intact.
    assert!(fx.point_images(&s1.point_id) == src1);
    assert!(fx.point_images(&s2.point_id) == src2);
    let points = fx.target.list_points().await.unwrap();
    assert_eq!(points.len(), 5);
}

/// Fails every `put_extent` after the first `budget` ones.
struct Flaky {
    inner: Arc<DirTarget>,
    budget: AtomicI64,
}

impl Target for Flaky {
    fn describe(&self) -> String {
        format!("flaky {}", self.inner.describe())
    }
    async fn state(&self) -> Result<HostState, TargetError> {
        self.inner.state().await
    }
    async fn begin(&self, sync: &PointId, plan: &SyncPlan) -> Result<(), TargetError> {
        self.inner.begin(sync, plan).await
    }
    async fn landed(&self, disk: &DiskId) -> Result<Vec<LandedExtent>, TargetError> {
        self.inner.landed(disk).await
    }
    async fn put_extent(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        body: Bytes,
        digest: Digest,
    ) -> Result<(), TargetError> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(TargetError::new(
                "send an extent",
                ErrorKind::Transient,
                "injected network failure",
            ));
        }
        self.inner.put_extent(sync, disk, offset, body, digest).await
    }
    async fn put_zero(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        len: u64,
    ) -> Result<(), TargetError> {
        self.inner.put_zero(sync, disk, offset, len).await
    }
    async fn commit(&self, sync: &PointId, manifest: &Manifest) -> Result<(), TargetError> {
        self.inner.commit(sync, manifest).await
    }
    async fn get_point(&self, point: &PointId) -> Result<Manifest, TargetError> {
        self.inner.get_point(point).await
    }
    async fn list_points(&self) -> Result<Vec<PointEntry>, TargetError> {
        self.inner.list_points().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_sync_resumes_and_sends_only_what_is_missing() {
    let fx = fixture();
    let flaky = Arc::new(Flaky {
        inner: fx.target.clone(),
        budget: AtomicI64::new(3),
    });
    let err = sync_host(&flaky, &fx.opts).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let pending = std::fs::read_to_string(fx.opts.state_dir.join("web-01").join("sync")).unwrap();

    // The source changes while the agent is down: one landed chunk no longer matches.
    let mut rng = Rng(7);
    write(&fx.a, 8192, &rng.bytes(4096));

    let (s, _) = fx.sync_and_check().await;
    assert!(s.resumed);
    assert_eq!(s.point_id, pending.trim());
    let landed: usize = s.disks.iter().map(|d| d.landed_extents).sum();
    assert!(landed >= 3, "{:?}", s.disks);
    // A clean full sync of the same data for comparison.
    let fresh = fixture();
    write(&fresh.a, 8192, &Rng(7).bytes(4096));
    let (full, _) = fresh.sync_and_check().await;
    assert!(
        s.totals.bytes_sent < full.totals.bytes_sent,
        "resumed {} vs full {}",
        s.totals.bytes_sent,
        full.totals.bytes_sent
    );
    // The sync id file is gone after the commit.
    assert!(!fx.opts.state_dir.join("web-01").join("sync").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_grew_is_synced_correctly() {
    let fx = fixture();
    let (s1, src1) = fx.sync_and_check().await;
    // b grows by 1.5 chunks, with data past its old end.
    let old = std::fs::metadata(&fx.b).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&fx.b).unwrap();
    f.set_len(old + u64::from(CHUNK) * 3 / 2).unwrap();
    f.write_all_at(&Rng(9).bytes(5000), old + 100).unwrap();
    let (s2, _) = fx.sync_and_check().await;
    assert!(s2.disks[1].counters.bytes_sent <= 2 * u64::from(BLOCK));
    assert!(fx.point_images(&s1.point_id) == src1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_sync_whose_state_was_not_installed_is_finished() {
    let fx = fixture();
    let (s1, _) = fx.sync_and_check().await;
    // Simulate a crash between the commit and installing the block values: the pending sync
    // id is still there and the new block values are still at their temporary path.
    let host_dir = fx.opts.state_dir.join("web-01");
    std::fs::write(host_dir.join("sync"), format!("{}\n", s1.point_id)).unwrap();
    for d in ["sda", "sdb"] {
        let final_path = host_dir.join("disks").join(format!("{d}.blocks"));
        std::fs::rename(
            &final_path,
            host_dir.join("disks").join(format!("{d}.blocks.new")),
        )
        .unwrap();
    }
    write(&fx.a, 0, &Rng(3).bytes(4096));
    let (s2, _) = fx.sync_and_check().await;
    assert_ne!(s2.point_id, s1.point_id);
    assert!(s2.disks.iter().all(|d| d.baseline == "state"), "{:?}", s2.disks);
    assert_eq!(s2.totals.bytes_sent, u64::from(BLOCK));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_record_was_lost_is_resent_even_if_the_source_reverted() {
    let mut fx = fixture();
    let (_, src1) = fx.sync_and_check().await;
    // Change two blocks (in two chunks) and start a sync that dies after one extent: that
    // write reached the volume, its real record was still in the target's memory batch.
    let offsets = [0usize, 2 * CHUNK as usize + 8192];
    for &o in &offsets {
        let mut changed = src1.0[o..o + 4096].to_vec();
        changed[0] ^= 0xff;
        write(&fx.a, o as u64, &changed);
    }
    let flaky = Arc::new(Flaky {
        inner: fx.target.clone(),
        budget: AtomicI64::new(1),
    });
    assert!(sync_host(&flaky, &fx.opts).await.is_err());
    // Writes already handed to the blocking pool finish on their own.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let vol = std::fs::read(fx.target.volume_path(&DiskId::new("sda").unwrap())).unwrap();
    assert_eq!(
        offsets.iter().filter(|&&o| vol[o] != src1.0[o]).count(),
        1,
        "one write reached the volume"
    );
    // The process dies (the batch is lost) and the source goes back to the point's bytes.
    drop(flaky);
    fx.target = Arc::new(DirTarget::new(fx._tmp.path().join("target"), fx.host.clone()));
    for &o in &offsets {
        write(&fx.a, o as u64, &src1.0[o..o + 4096]);
    }
    let (s, _) = fx.sync_and_check().await;
    assert!(s.resumed);
    assert_eq!(
        s.disks[0].counters.bytes_sent,
        u64::from(BLOCK),
        "{:?}",
        s.disks[0]
    );
}
