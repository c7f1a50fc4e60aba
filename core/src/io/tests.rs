//! The engine conformance suite (written once, run on every engine) and the tests of the
//! pieces around it (arena, configuration, clone, aligned buffers).
//!
//! `TERN_IO_ENGINE` overrides the engine of every test, as it does in production.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use super::*;

/// Small deterministic PRNG (splitmix64): no dependency, reproducible failures.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A temporary directory with one sparse file of `size` bytes.
struct Fixture {
    dir: TempDir,
    path: PathBuf,
}

fn fixture(size: u64) -> Fixture {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let path = dir.path().join("volume.img");
    File::create(&path)
        .and_then(|f| f.set_len(size))
        .expect("create the volume file");
    Fixture { dir, path }
}

fn config(choice: EngineChoice) -> EngineConfig {
    EngineConfig {
        engine: choice,
        queue_depth: 8,
        buffer_bytes: 16 << 20,
        direct: true,
    }
}

/// Whether `choice` can run here; says why not on stderr.
fn available(choice: EngineChoice) -> bool {
    if choice == EngineChoice::IoUring
        && let Err(e) = probe_io_uring()
    {
        eprintln!("skipped: io_uring unavailable: {}", crate::ErrorChain(&e));
        return false;
    }
    true
}

/// Opens `path` with `cfg`, or `None` (after saying so) when the engine is unavailable here.
fn open_with(path: &Path, writable: bool, cfg: &EngineConfig) -> Option<Volume> {
    if !available(cfg.engine) {
        return None;
    }
    let vol = Volume::open(path, writable, cfg).expect("open the volume");
    if std::env::var_os(ENGINE_ENV).is_none() {
        let expected = match cfg.engine {
            EngineChoice::IoUring => Some(EngineKind::IoUring),
            EngineChoice::Portable => Some(EngineKind::Portable),
            EngineChoice::Auto => None,
        };
        if let Some(k) = expected {
            assert_eq!(vol.kind(), k, "the volume runs on the engine asked for");
        }
    }
    Some(vol)
}

async fn filled(vol: &Volume, data: &[u8]) -> IoBuf {
    let mut buf = vol.alloc(data.len()).await.expect("alloc");
    buf.copy_from_slice(data);
    buf
}

async fn read_back(vol: &Volume, offset: u64, len: usize) -> Vec<u8> {
    let buf = vol.alloc(len).await.expect("alloc");
    vol.read_at(buf, offset).await.expect("read").to_vec()
}

/// Writes non-overlapping random extents concurrently, batch after batch, then reads the whole
/// volume back (concurrently, through the engine and through std) and compares with the model.
async fn concurrent_random_writes(choice: EngineChoice) {
    const SIZE: u64 = 48 << 20;
    let fx = fixture(SIZE);
    let Some(vol) = open_with(&fx.path, true, &config(choice)) else {
        return;
    };
    let vol = Arc::new(vol);
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(0x7e12_0001);
    for _batch in 0..3 {
        let mut ranges: Vec<(u64, usize)> = Vec::new();
        while ranges.len() < 10 {
            let len = (1 + rng.below(1024)) as usize * 4096; // 4 KiB to 4 MiB
            let offset = rng.below((SIZE - len as u64) / 4096 + 1) * 4096;
            let end = offset + len as u64;
            if ranges.iter().all(|&(o, l)| end <= o || offset >= o + l as u64) {
                ranges.push((offset, len));
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for &(offset, len) in &ranges {
            let mut data = vec![0u8; len];
            rng.fill(&mut data);
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            let vol = Arc::clone(&vol);
            tasks.spawn(async move {
                // alloc waits while the 16 MiB arena is full: the batch exercises backpressure.
                let buf = filled(&vol, &data).await;
                let buf = vol.write_at(buf, offset).await.expect("write");
                assert_eq!(buf.len(), len, "the buffer comes back whole");
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("write task");
        }
    }
    vol.sync_data().await.expect("sync");

    // Read back through the engine, concurrently, in 4 MiB pieces.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SIZE / (4 << 20) {
        let vol = Arc::clone(&vol);
        tasks.spawn(async move {
            let offset = i * (4 << 20);
            (offset, read_back(&vol, offset, 4 << 20).await)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (offset, data) = r.expect("read task");
        let o = offset as usize;
        assert!(
            data == model[o..o + data.len()],
            "engine read at {offset} differs from the model"
        );
    }
    // Random unaligned-length reads.
    for _ in 0..20 {
        let len = 1 + rng.below(300_000) as usize;
        let offset = rng.below(SIZE - len as u64);
        let data = read_back(&vol, offset, len).await;
        let o = offset as usize;
        assert!(data == model[o..o + len], "read of {len} at {offset} differs");
    }
    // And through the file system, independently of the engine.
    let on_disk = fs::read(&fx.path).expect("read the file");
    assert!(on_disk == model, "file contents differ from the model");
}

/// Punched or zeroed ranges read as zeros; the rest is untouched; a punched file frees blocks.
async fn write_zeroes(choice: EngineChoice) {
    const SIZE: u64 = 8 << 20;
    let fx = fixture(SIZE);
    let Some(vol) = open_with(&fx.path, true, &config(choice)) else {
        return;
    };
    let mut data = vec![0u8; SIZE as usize];
    Rng(5).fill(&mut data);
    for (i, chunk) in data.chunks(4 << 20).enumerate() {
        let buf = filled(&vol, chunk).await;
        vol.write_at(buf, (i * (4 << 20)) as u64).await.expect("write");
    }
    vol.sync_data().await.expect("sync");
    let blocks_before = fs::metadata(&fx.path).expect("stat").blocks();

    let mut model = data;
    // Aligned: a hole is punched.
    vol.write_zeroes(1 << 20, 2 << 20).await.expect("zero aligned");
    model[1 << 20..3 << 20].fill(0);
    // Unaligned head and tail.
    vol.write_zeroes(5 * 4096 + 100, 3 * 4096 + 17)
        .await
        .expect("zero unaligned");
    model[5 * 4096 + 100..8 * 4096 + 117].fill(0);
    // Empty range: nothing to do.
    vol.write_zeroes(SIZE, 0).await.expect("zero nothing");
    // The fallback (used where fallocate is unsupported): writes from the zero region.
    vol.zero_by_writing(6 << 20, (1 << 20) + 8192 + 1)
        .await
        .expect("zero by writing");
    model[6 << 20..(7 << 20) + 8193].fill(0);
    vol.sync_data().await.expect("sync");

    assert!(
        read_back(&vol, 0, 4 << 20).await == model[..4 << 20],
        "engine view after zeroing"
    );
    assert!(
        read_back(&vol, 4 << 20, 4 << 20).await == model[4 << 20..],
        "engine view after zeroing"
    );
    assert!(
        fs::read(&fx.path).expect("read") == model,
        "file view after zeroing"
    );
    let blocks_after = fs::metadata(&fx.path).expect("stat").blocks();
    assert!(
        blocks_after + (2 << 20) / 512 <= blocks_before,
        "punching 2 MiB frees its blocks ({blocks_before} -> {blocks_after} sectors)"
    );
}

/// Out-of-bounds writes, reads and zeroes are refused and leave the file unchanged.
async fn out_of_bounds(choice: EngineChoice) {
    const SIZE: u64 = 1 << 20;
    let fx = fixture(SIZE);
    let mut content = vec![0u8; SIZE as usize];
    Rng(9).fill(&mut content);
    fs::write(&fx.path, &content).expect("fill the file");
    let Some(vol) = open_with(&fx.path, true, &config(choice)) else {
        return;
    };
    assert_eq!(vol.size(), SIZE);
    let buf = vol.alloc(8192).await.expect("alloc");
    let e = vol
        .write_at(buf, SIZE - 4096)
        .await
        .expect_err("write past the end");
    assert_eq!(e.kind(), IoErrorKind::OutOfBounds, "{e}");
    let buf = vol.alloc(4096).await.expect("alloc");
    let e = vol
        .write_at(buf, u64::MAX - 100)
        .await
        .expect_err("overflowing offset");
    assert_eq!(e.kind(), IoErrorKind::OutOfBounds, "{e}");
    let buf = vol.alloc(4096).await.expect("alloc");
    let e = vol.read_at(buf, SIZE).await.expect_err("read past the end");
    assert_eq!(e.kind(), IoErrorKind::OutOfBounds, "{e}");
    let e = vol
        .write_zeroes(SIZE - 4096, 8192)
        .await
        .expect_err("zero past the end");
    assert_eq!(e.kind(), IoErrorKind::OutOfBounds, "{e}");
    let e = vol
        .alloc(32 << 20)
        .await
        .expect_err("buffer larger than the arena");
    assert_eq!(e.kind(), IoErrorKind::InvalidInput, "{e}");
    drop(vol);
    assert!(fs::read(&fx.path).expect("read") == content, "file unchanged");
    assert_eq!(
        fs::metadata(&fx.path).expect("stat").len(),
        SIZE,
        "size unchanged"
    );
}

/// A volume whose size is not a multiple of 4 KiB: the tail goes through the buffered fd.
async fn unaligned_tail(choice: EngineChoice) {
    const SIZE: u64 = (1 << 20) + 512;
    let fx = fixture(SIZE);
    let Some(vol) = open_with(&fx.path, true, &config(choice)) else {
        return;
    };
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng(11);
    // Aligned start, unaligned end: direct body then buffered tail, in one call.
    let mut data = vec![0u8; 8192 + 512];
    rng.fill(&mut data);
    let offset = SIZE - data.len() as u64;
    vol.write_at(filled(&vol, &data).await, offset)
        .await
        .expect("write the tail");
    model[offset as usize..].copy_from_slice(&data);
    // Unaligned start and end.
    let mut data = vec![0u8; 3000];
    rng.fill(&mut data);
    vol.write_at(filled(&vol, &data).await, 1000)
        .await
        .expect("write unaligned");
    model[1000..4000].copy_from_slice(&data);
    // A buffer truncated to an odd length.
    let mut buf = vol.alloc(8192).await.expect("alloc");
    rng.fill(&mut buf);
    buf.truncate(4097);
    model[65536..65536 + 4097].copy_from_slice(&buf);
    let buf = vol.write_at(buf, 65536).await.expect("write truncated");
    assert_eq!(buf.len(), 4097);
    vol.sync_data().await.expect("sync");

    assert!(read_back(&vol, 0, SIZE as usize).await == model, "engine view");
    assert!(
        read_back(&vol, SIZE - 512, 512).await == model[SIZE as usize - 512..],
        "tail read"
    );
    assert!(fs::read(&fx.path).expect("read") == model, "file view");
}

/// A writable 1 MiB volume whose buffer arena is 1 MiB too (`None`: engine unavailable). The
/// fixture must outlive the volume.
fn small_arena_volume(choice: EngineChoice) -> Option<(Fixture, Arc<Volume>)> {
    let fx = fixture(1 << 20);
    let cfg = EngineConfig {
        buffer_bytes: 1 << 20,
        ..config(choice)
    };
    let vol = open_with(&fx.path, true, &cfg)?;
    Some((fx, Arc::new(vol)))
}

/// `alloc` waits while the arena is full and proceeds once a buffer is dropped.
async fn alloc_backpressure(choice: EngineChoice) {
    let Some((_fx, vol)) = small_arena_volume(choice) else {
        return;
    };
    assert_eq!(vol.max_buf_len(), 1 << 20);
    let whole = vol.alloc(1 << 20).await.expect("alloc the whole arena");
    assert!(
        tokio::time::timeout(Duration::from_millis(50), vol.alloc(4096))
            .await
            .is_err(),
        "alloc must wait while the arena is full"
    );
    let waiter = {
        let vol = Arc::clone(&vol);
        tokio::spawn(async move { vol.alloc(512 << 10).await.map(|b| b.len()) })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished(), "still waiting");
    // The buffer goes through the engine and back before it is dropped.
    let whole = vol.write_at(whole, 0).await.expect("write");
    drop(whole);
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("alloc proceeds once memory is free")
        .expect("task")
        .expect("alloc");
    assert_eq!(got, 512 << 10);
}

/// `alloc_many` takes all its buffers at once or waits holding none; buffers that could never
/// fit together are refused.
async fn alloc_many_all_or_nothing(choice: EngineChoice) {
    let Some((_fx, vol)) = small_arena_volume(choice) else {
        return;
    };
    assert!(
        vol.alloc_many(&[512 << 10, 512 << 10, 4096]).await.is_err(),
        "more than the arena can ever hold together"
    );
    let half = vol.alloc(512 << 10).await.expect("alloc half the arena");
    let waiter = {
        let vol = Arc::clone(&vol);
        tokio::spawn(async move {
            vol.alloc_many(&[4096, 256 << 10, 300 << 10])
                .await
                .map(|b| b.iter().map(|b| (b.len(), b.arena_offset())).collect::<Vec<_>>())
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !waiter.is_finished(),
        "three buffers of 772 KiB must wait for the half in use"
    );
    // Nothing was taken while waiting: the free half is still whole, yet a later request queues
    // behind the waiter (FIFO).
    assert!(
        tokio::time::timeout(Duration::from_millis(50), vol.alloc(512 << 10))
            .await
            .is_err()
    );
    drop(half);
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("alloc_many proceeds once memory is free")
        .expect("task")
        .expect("alloc_many");
    let lens: Vec<usize> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        lens,
        [4096, 256 << 10, 300 << 10],
        "one buffer per length, in order"
    );
    let mut ranges: Vec<(usize, usize)> = got.iter().map(|&(len, at)| (at, at + len)).collect();
    ranges.sort_unstable();
    assert!(
        ranges.windows(2).all(|w| w[0].1 <= w[1].0),
        "buffers overlap: {ranges:?}"
    );
    assert!(ranges.last().is_some_and(|r| r.1 <= 1 << 20));
}

/// Operations cancelled mid-flight, then the volume dropped: no hang, no crash, and the
/// buffers return to the arena.
async fn drop_in_flight(choice: EngineChoice) {
    let fx = fixture(32 << 20);
    let Some(vol) = open_with(&fx.path, true, &config(choice)) else {
        return;
    };
    let vol = Arc::new(vol);
    // Futures polled once (the operation is submitted) and then dropped.
    for i in 0..8u64 {
        let buf = vol.alloc(1 << 20).await.expect("alloc");
        let _ = tokio::time::timeout(Duration::ZERO, vol.write_at(buf, i << 20)).await;
    }
    // Cancelled operations give their buffers back when they complete.
    let all = tokio::time::timeout(Duration::from_secs(10), vol.alloc(16 << 20))
        .await
        .expect("buffers of cancelled operations return to the arena")
        .expect("alloc");
    drop(all);
    // Tasks aborted while their writes are queued or in flight; then the volume goes away.
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let vol = Arc::clone(&vol);
        tasks.push(tokio::spawn(async move {
            loop {
                let buf = vol.alloc(1 << 20).await.expect("alloc");
                let _ = vol.write_at(buf, (i % 32) << 20).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let dropped = tokio::task::spawn_blocking(move || drop(vol));
    tokio::time::timeout(Duration::from_secs(10), dropped)
        .await
        .expect("dropping the volume does not hang")
        .expect("drop");
}

/// Read-only volumes refuse writes; reading past data that vanished is a short read.
async fn read_only_and_short_read(choice: EngineChoice) {
    const SIZE: u64 = 1 << 20;
    let fx = fixture(SIZE);
    let Some(ro) = open_with(&fx.path, false, &config(choice)) else {
        return;
    };
    let buf = ro.alloc(4096).await.expect("alloc");
    let e = ro
        .write_at(buf, 0)
        .await
        .expect_err("write to a read-only volume");
    assert_eq!(e.kind(), IoErrorKind::InvalidInput, "{e}");
    let e = ro
        .write_zeroes(0, 4096)
        .await
        .expect_err("zero a read-only volume");
    assert_eq!(e.kind(), IoErrorKind::InvalidInput, "{e}");
    ro.sync_data().await.expect("sync a read-only volume");
    // The file shrinks behind the volume's back.
    OpenOptions::new()
        .write(true)
        .open(&fx.path)
        .and_then(|f| f.set_len(SIZE / 2))
        .expect("truncate");
    let buf = ro.alloc(8192).await.expect("alloc");
    let e = ro
        .read_at(buf, SIZE / 2 - 4096)
        .await
        .expect_err("read across the new end");
    assert!(
        matches!(e, IoError::ShortRead { got: 4096, .. }),
        "expected a short read after 4096 bytes: {e}"
    );
    assert_eq!(e.kind(), IoErrorKind::Io);
}

/// O_DIRECT is on wherever statx reports support (and off when not asked for).
async fn direct_mode(choice: EngineChoice) {
    let fx = fixture(1 << 20);
    let Some(vol) = open_with(&fx.path, true, &config(choice)) else {
        return;
    };
    let supported = rustix::fs::statx(
        File::open(&fx.path).expect("open"),
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::DIOALIGN,
    )
    .map(|s| s.stx_dio_offset_align != 0)
    .unwrap_or(false);
    assert_eq!(vol.direct(), supported);
    assert_eq!(vol.path(), fx.path.as_path());
    let cfg = EngineConfig {
        direct: false,
        ..config(choice)
    };
    let Some(buffered) = open_with(&fx.path, true, &cfg) else {
        return;
    };
    assert!(!buffered.direct());
    let buf = filled(&buffered, &[7u8; 4096]).await;
    buffered.write_at(buf, 4096).await.expect("buffered write");
    assert_eq!(read_back(&buffered, 4096, 4096).await, vec![7u8; 4096]);
    // A buffer from another volume's arena works too (not a registered buffer there).
    let buf = filled(&vol, &[9u8; 8192]).await;
    let buf = buffered.write_at(buf, 8192).await.expect("foreign buffer write");
    let buf = buffered.read_at(buf, 4096).await.expect("foreign buffer read");
    assert_eq!(&buf[..4096], &[7u8; 4096][..]);
    assert_eq!(&buf[4096..], &[9u8; 4096][..]);
    let buf = vol
        .write_at(buf, 0)
        .await
        .expect("write back through the direct volume");
    drop(buf);
    vol.sync_data().await.expect("sync");
    let on_disk = fs::read(&fx.path).expect("read");
    assert_eq!(&on_disk[..4096], &[7u8; 4096][..]);
    assert_eq!(&on_disk[4096..16384], &[9u8; 12288][..]);
}

/// A loop block device (needs root and `losetup`; skipped otherwise): BLKGETSIZE64, the
/// block-device zeroing path and a 512-byte tail.
async fn block_device(choice: EngineChoice) {
    let Some(dev) = LoopDev::attach((4 << 20) + 512) else {
        return;
    };
    let Some(vol) = open_with(&dev.device, true, &config(choice)) else {
        return;
    };
    assert_eq!(vol.size(), (4 << 20) + 512);
    let mut model = vec![0u8; vol.size() as usize];
    Rng(13).fill(&mut model);
    let buf = filled(&vol, &model[..4 << 20]).await;
    vol.write_at(buf, 0).await.expect("write");
    let buf = filled(&vol, &model[4 << 20..]).await;
    vol.write_at(buf, 4 << 20).await.expect("write the 512-byte tail");
    vol.write_zeroes(4096, 65536).await.expect("zero range");
    model[4096..4096 + 65536].fill(0);
    vol.write_zeroes(4 << 20, 512).await.expect("zero the tail");
    model[4 << 20..].fill(0);
    vol.sync_data().await.expect("sync");
    assert!(read_back(&vol, 0, model.len()).await == model, "device contents");
}

/// A loop device over a file in a temporary directory, detached on drop.
struct LoopDev {
    device: PathBuf,
    _dir: TempDir,
}

impl LoopDev {
    fn attach(size: u64) -> Option<LoopDev> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: block device test needs root");
            return None;
        }
        let fx = fixture(size);
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&fx.path)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let device = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
                Some(LoopDev { device, _dir: fx.dir })
            }
            Ok(o) => {
                eprintln!(
                    "skipped: losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run losetup: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.device)
            .status();
    }
}

macro_rules! conformance {
    ($module:ident, $choice:expr) => {
        mod $module {
            use super::*;

            const CHOICE: EngineChoice = $choice;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_random_writes_match_model() {
                concurrent_random_writes(CHOICE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn write_zeroes_reads_back_zeros() {
                write_zeroes(CHOICE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn out_of_bounds_is_refused() {
                out_of_bounds(CHOICE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unaligned_tail_goes_buffered() {
                unaligned_tail(CHOICE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn alloc_waits_for_free_memory() {
                alloc_backpressure(CHOICE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn alloc_many_is_all_or_nothing() {
                alloc_many_all_or_nothing(CHOICE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn drop_with_ops_in_flight() {
                drop_in_flight(CHOICE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn read_only_and_short_reads() {
                read_only_and_short_read(CHOICE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn direct_where_supported() {
                direct_mode(CHOICE).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn loop_block_device() {
                block_device(CHOICE).await;
            }

            /// The same volume from a current-thread runtime (what a small tool would use).
            #[tokio::test(flavor = "current_thread")]
            async fn current_thread_runtime() {
                unaligned_tail(CHOICE).await;
            }
        }
    };
}

conformance!(uring, EngineChoice::IoUring);
conformance!(portable, EngineChoice::Portable);

// ---- Engine selection and configuration ----

#[test]
fn choice_parses_and_displays() {
    for (s, c) in [
        ("auto", EngineChoice::Auto),
        ("io_uring", EngineChoice::IoUring),
        ("portable", EngineChoice::Portable),
    ] {
        assert_eq!(s.parse::<EngineChoice>().expect("parse"), c);
        assert_eq!(c.to_string(), s);
        let json: EngineChoice = serde_json::from_str(&format!("\"{s}\"")).expect("serde");
        assert_eq!(json, c);
    }
    assert!("uring".parse::<EngineChoice>().is_err());
    assert!(serde_json::from_str::<EngineChoice>("\"IoUring\"").is_err());
    assert_eq!(EngineKind::IoUring.to_string(), "io_uring");
    assert_eq!(EngineKind::Portable.to_string(), "portable");
}

#[test]
fn config_defaults_and_validation() {
    let c = EngineConfig::default();
    assert_eq!(c.engine, EngineChoice::Auto);
    assert_eq!(c.queue_depth, 32);
    assert_eq!(c.buffer_bytes, 32 << 20);
    assert!(c.direct);
    let parsed: EngineConfig =
        serde_json::from_str(r#"{"engine":"portable","queue_depth":4}"#).expect("config");
    assert_eq!(parsed.engine, EngineChoice::Portable);
    assert_eq!(parsed.queue_depth, 4);
    assert_eq!(parsed.buffer_bytes, 32 << 20);
    assert!(serde_json::from_str::<EngineConfig>(r#"{"engin":"auto"}"#).is_err());
    let fx = fixture(4096);
    for bad in [
        EngineConfig {
            queue_depth: 0,
            ..EngineConfig::default()
        },
        EngineConfig {
            buffer_bytes: 5000,
            ..EngineConfig::default()
        },
    ] {
        let e = Volume::open(&fx.path, false, &bad).expect_err("bad config");
        assert_eq!(e.kind(), IoErrorKind::InvalidInput, "{e}");
    }
}

#[test]
fn resolve_and_engine_in_use() {
    let forced = std::env::var_os(ENGINE_ENV).is_some();
    let k = resolve(EngineChoice::Portable).expect("portable always resolves");
    if !forced {
        assert_eq!(k, EngineKind::Portable);
    }
    assert!(engine_in_use().is_some());
    let auto = resolve(EngineChoice::Auto).expect("auto always resolves");
    if !forced {
        let expected = if probe_io_uring().is_ok() {
            EngineKind::IoUring
        } else {
            EngineKind::Portable
        };
        assert_eq!(auto, expected);
    }
    match resolve(EngineChoice::IoUring) {
        Ok(k) => assert!(forced || k == EngineKind::IoUring),
        Err(e) => assert_eq!(e.kind(), IoErrorKind::Unsupported, "never a silent fallback"),
    }
}

#[test]
fn opening_other_file_types_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Volume::open(dir.path(), false, &config(EngineChoice::Portable)).expect_err("a dir");
    assert!(matches!(e, IoError::NotAVolume { .. }), "{e}");
    let e = Volume::open(&dir.path().join("missing"), false, &EngineConfig::default()).expect_err("missing");
    assert!(matches!(e, IoError::Open { .. }), "{e}");
}

// ---- Arena ----

#[tokio::test]
async fn arena_is_fifo_and_reuses_memory() {
    let arena = arena::Arena::new(1 << 20).expect("arena");
    assert_eq!(arena.max_len(), 1 << 20);
    let a = arena.alloc(512 << 10).expect("size ok").await;
    let b = arena.alloc(256 << 10).expect("size ok").await;
    // A big request waits; a small one that would fit must queue behind it (no starvation).
    let big = tokio::spawn(arena.alloc(512 << 10).expect("size ok"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        arena.try_alloc(4096).is_none(),
        "small requests queue behind the big one"
    );
    let small = tokio::spawn(arena.alloc(4096).expect("size ok"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!small.is_finished() && !big.is_finished());
    drop(a);
    let big = tokio::time::timeout(Duration::from_secs(5), big)
        .await
        .expect("big request served first")
        .expect("task");
    let small = tokio::time::timeout(Duration::from_secs(5), small)
        .await
        .expect("then the small one")
        .expect("task");
    assert_eq!((big.len(), small.len()), (512 << 10, 4096));
    // Buffers are 4096-aligned and disjoint.
    for buf in [&big, &small, &b] {
        assert_eq!(buf.as_ptr() as usize % 4096, 0);
    }
    drop((big, small, b));
    // All memory is back: the whole arena in one piece again.
    let all = arena.try_alloc(1 << 20).expect("everything returned and merged");
    assert_eq!(all.len(), 1 << 20);
    assert!(arena.alloc((1 << 20) + 1).is_err());
}

#[test]
fn arena_rounds_and_limits() {
    // 12 MiB: the largest block is 8 MiB.
    let arena = arena::Arena::new(12 << 20).expect("arena");
    assert_eq!(arena.max_len(), 8 << 20);
    let e = arena.alloc((8 << 20) + 1).expect_err("larger than any block");
    assert_eq!(e.kind(), IoErrorKind::InvalidInput);
    // 64 MiB: capped at 16 MiB; four 16 MiB buffers fit, and come back merged.
    let arena = arena::Arena::new(64 << 20).expect("arena");
    assert_eq!(arena.max_len(), MAX_IO_BUF);
    for _ in 0..3 {
        let bufs: Vec<IoBuf> = (0..4)
            .map(|_| arena.try_alloc(16 << 20).expect("16 MiB block"))
            .collect();
        assert!(arena.try_alloc(4096).is_none());
        drop(bufs);
        let small: Vec<IoBuf> = (0..16)
            .map(|_| arena.try_alloc(4 << 20).expect("4 MiB block"))
            .collect();
        drop(small);
    }
    let mut empty = arena.try_alloc(0).expect("empty buffer");
    assert!(empty.is_empty());
    empty.truncate(10);
    assert_eq!(empty.len(), 0);
}

// ---- AlignedBuf ----

#[test]
fn aligned_buf() {
    for len in [0, 1, 4096, 5000, 1 << 20, (4 << 20) + 1] {
        let mut b = AlignedBuf::zeroed(len);
        assert_eq!(b.len(), len);
        assert_eq!(b.is_empty(), len == 0);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b.fill(0xab);
        let r: &[u8] = b.as_ref();
        assert!(r.iter().all(|&x| x == 0xab));
        b.truncate(len / 2);
        assert_eq!(b.len(), len / 2);
    }
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<AlignedBuf>();
    send_sync::<Volume>();
    send_sync::<IoBuf>();
}

// ---- clone_file ----

/// A 16 MiB sparse file with three data segments (one at the very end).
fn sparse_source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("src.img");
    let mut model = vec![0u8; 16 << 20];
    let f = File::create(&path).expect("create");
    f.set_len(model.len() as u64).expect("size");
    let mut rng = Rng(21);
    for (offset, len) in [(0usize, 64 << 10), (5 << 20, 1 << 20), ((16 << 20) - 8192, 8192)] {
        rng.fill(&mut model[offset..offset + len]);
        f.write_all_at(&model[offset..offset + len], offset as u64)
            .expect("write");
    }
    f.sync_all().expect("sync");
    (path, model)
}

fn check_copy(src: &Path, dst: &Path, model: &[u8]) {
    assert!(fs::read(dst).expect("read dst") == model, "identical bytes");
    let (s, d) = (fs::metadata(src).expect("stat"), fs::metadata(dst).expect("stat"));
    assert_eq!(s.len(), d.len());
    assert_eq!(d.blocks(), s.blocks(), "holes preserved: same allocated blocks");
    assert!(d.blocks() * 512 < model.len() as u64 / 4, "the copy is sparse");
    assert!(!clone::tmp_path(dst).exists(), "no temporary file left");
}

#[test]
fn clone_file_copies_sparse_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, model) = sparse_source(dir.path());
    let dst = dir.path().join("dst.img");
    let method = clone_file(&src, &dst).expect("clone");
    // ext4 (this machine) has no reflink; btrfs/xfs would reflink.
    assert!(matches!(method, CloneMethod::Reflink | CloneMethod::SparseCopy));
    check_copy(&src, &dst, &model);
    assert_eq!(CloneMethod::Reflink.to_string(), "reflink");
    assert_eq!(CloneMethod::SparseCopy.to_string(), "sparse copy");
}

#[test]
fn sparse_copy_keeps_holes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, model) = sparse_source(dir.path());
    let dst = dir.path().join("copy.img");
    sparse_copy(&src, &dst).expect("copy");
    check_copy(&src, &dst, &model);
    // An empty source, and one that is all hole.
    for size in [0u64, 3 << 20] {
        let s = dir.path().join(format!("hole-{size}.img"));
        File::create(&s).and_then(|f| f.set_len(size)).expect("create");
        let d = dir.path().join(format!("hole-{size}.copy"));
        clone_file(&s, &d).expect("clone");
        assert_eq!(fs::metadata(&d).expect("stat").len(), size);
        assert_eq!(fs::metadata(&d).expect("stat").blocks(), 0);
    }
}

#[test]
fn clone_refuses_existing_destination() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (src, _) = sparse_source(dir.path());
    let dst = dir.path().join("taken.img");
    fs::write(&dst, b"keep me").expect("write");
    let e = clone_file(&src, &dst).expect_err("dst exists");
    assert_eq!(e.kind(), IoErrorKind::AlreadyExists, "{e}");
    let e = sparse_copy(&src, &dst).expect_err("dst exists");
    assert_eq!(e.kind(), IoErrorKind::AlreadyExists, "{e}");
    assert_eq!(fs::read(&dst).expect("read"), b"keep me");
    let e = clone_file(&dir.path().join("missing"), &dir.path().join("x")).expect_err("no src");
    assert!(matches!(e, IoError::CloneSource { .. }), "{e}");
    assert!(!dir.path().join("x").exists() && !dir.path().join("x.tmp").exists());
}
