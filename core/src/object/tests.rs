//! Object mode against the local-file object store: the session, pruning and GC interleaved
//! at random, and the invariant that no surviving point ever misses a chunk.

#![allow(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use super::gc::{GcOptions, collect_garbage, prune};
use super::retention::Retention;
use super::session::{PutOutcome, SessionError, SessionOptions, SyncSession};
use super::{Cipher, Repo, StoreKey, blob};
use crate::manifest::ChunkRef;
use crate::{ChunkGeometry, DiskId, DiskManifest, HostId, Manifest, PointId};

const CHUNK: u32 = 64 << 10;

/// A store that yields to other tasks a random number of times before every operation, so
/// that the actors interleave differently for every seed.
#[derive(Debug)]
struct Jitter {
    inner: LocalFileSystem,
    rng: Mutex<rand::rngs::StdRng>,
}

impl fmt::Display for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Jitter({})", self.inner)
    }
}

impl Jitter {
    async fn pause(&self) {
        let n = self.rng.lock().unwrap().random_range(0..6);
        for _ in 0..n {
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait]
impl ObjectStore for Jitter {
    async fn put_opts(&self, l: &Path, p: PutPayload, o: PutOptions) -> object_store::Result<PutResult> {
        self.pause().await;
        self.inner.put_opts(l, p, o).await
    }
    async fn put_multipart_opts(
        &self,
        l: &Path,
        o: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.pause().await;
        self.inner.put_multipart_opts(l, o).await
    }
    async fn get_opts(&self, l: &Path, o: GetOptions) -> object_store::Result<GetResult> {
        self.pause().await;
        self.inner.get_opts(l, o).await
    }
    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.pause().await;
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, o: CopyOptions) -> object_store::Result<()> {
        self.pause().await;
        self.inner.copy_opts(from, to, o).await
    }
}

fn content(n: u8) -> Bytes {
    let mut v = vec![n; CHUNK as usize];
    v[0] = 0xEE;
    Bytes::from(v)
}

/// One sync: `picks[i]` = content of chunk i (0 = zero chunk).
async fn sync_once(
    repo: &Repo,
    host: &HostId,
    n: u64,
    picks: &[u8],
    key: Option<&Arc<StoreKey>>,
    journal: &std::path::Path,
) -> Manifest {
    let point = PointId::generate(1_790_000_000_000 + n * 1000, n as u32);
    loop {
        let opts = SessionOptions {
            chunk_size: CHUNK,
            compression: Some(1),
            lease_ttl: Duration::from_secs(3600),
            journal: Some(journal.to_path_buf()),
        };
        let s = SyncSession::open(repo.clone(), host.clone(), point.clone(), key.cloned(), &opts)
            .await
            .unwrap();
        let mut chunks = Vec::new();
        for &p in picks {
            if p == 0 {
                chunks.push(ChunkRef::Zero);
                continue;
            }
            let data = content(p);
            let id = s.chunk_id(&data);
            s.put_chunk(id, data).await.unwrap();
            chunks.push(ChunkRef::Data(id));
        }
        let m = Manifest {
            host_id: host.clone(),
            point_id: point.clone(),
            created_unix_ms: 1_790_000_000_000 + n * 1000,
            disks: vec![DiskManifest {
                disk_id: DiskId::new("sda").unwrap(),
                geometry: ChunkGeometry::new(u64::from(CHUNK) * picks.len() as u64, CHUNK).unwrap(),
                chunks,
            }],
        };
        match s.commit(&m).await {
            Ok(()) => return m,
            // What the agent does: run the sync again.
            Err(SessionError::ChunksLost { .. }) => continue,
            Err(e) => panic!("{}", crate::error_chain(&e)),
        }
    }
}

async fn check_points(repo: &Repo, key: Option<&StoreKey>) -> usize {
    let mut checked = 0;
    for host in repo.list_hosts().await.unwrap() {
        for p in repo.list_points(&host).await.unwrap() {
            let m = repo.get_manifest(&host, &p.id).await.unwrap();
            for c in m.disks.iter().flat_map(|d| d.chunks.iter()) {
                if let ChunkRef::Data(id) = c {
                    let b = repo
                        .get_chunk(id)
                        .await
                        .unwrap_or_else(|e| panic!("point {} lost chunk {id}: {e}", p.id));
                    blob::decode(id, &b, key).unwrap();
                    checked += 1;
                }
            }
        }
    }
    checked
}

#[derive(Debug, Clone)]
struct Scenario {
    seed: u64,
    /// Per host, per sync, the contents of its 4 chunks.
    syncs: Vec<Vec<Vec<u8>>>,
    keep_last: u32,
    gcs: usize,
    prunes: usize,
    encrypted: bool,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        any::<u64>(),
        prop::collection::vec(
            prop::collection::vec(prop::collection::vec(0u8..7, 4), 1..5),
            1..3,
        ),
        1u32..3,
        1usize..4,
        1usize..4,
        any::<bool>(),
    )
        .prop_map(|(seed, syncs, keep_last, gcs, prunes, encrypted)| Scenario {
            seed,
            syncs,
            keep_last,
            gcs,
            prunes,
            encrypted,
        })
}

fn run(sc: &Scenario) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Jitter {
            inner: LocalFileSystem::new_with_prefix(dir.path()).unwrap(),
            rng: Mutex::new(rand::rngs::StdRng::seed_from_u64(sc.seed)),
        };
        let repo = Repo::new(Arc::new(store), "dr");
        let key = sc
            .encrypted
            .then(|| Arc::new(StoreKey::from_bytes(&[9; 32], Cipher::ChaCha20Poly1305)));
        let gc = GcOptions {
            grace: Duration::ZERO,
            lease_ttl: Duration::from_secs(3600),
            dry_run: false,
        };
        let policy = Retention {
            keep_last: sc.keep_last,
            ..Default::default()
        };
        let hosts: Vec<HostId> = (0..sc.syncs.len())
            .map(|i| HostId::new(format!("host-{i}")).unwrap())
            .collect();

        let syncs = futures::future::join_all(sc.syncs.iter().zip(&hosts).map(|(list, host)| {
            let repo = repo.clone();
            let key = key.clone();
            let journal = dir.path().join(format!("{host}.journal"));
            async move {
                for (n, picks) in list.iter().enumerate() {
                    sync_once(&repo, host, n as u64, picks, key.as_ref(), &journal).await;
                }
            }
        }));
        let pruner = async {
            for _ in 0..sc.prunes {
                for h in &hosts {
                    prune(&repo, h, &policy, false).await.unwrap();
                }
                tokio::task::yield_now().await;
            }
        };
        let collector = async {
            for _ in 0..sc.gcs {
                collect_garbage(&repo, &gc).await.unwrap();
                tokio::task::yield_now().await;
            }
        };
        tokio::join!(syncs, pruner, collector);
        check_points(&repo, key.as_deref()).await;

        // Quiet now: prune and collect once more; the store then holds exactly what the
        // surviving points need.
        for h in &hosts {
            let r = prune(&repo, h, &policy, false).await.unwrap();
            assert!(r.kept.len() <= sc.keep_last as usize);
        }
        let report = collect_garbage(&repo, &gc).await.unwrap();
        assert_eq!(report.missing, 0);
        check_points(&repo, key.as_deref()).await;
        let mut needed = HashSet::new();
        for h in &hosts {
            for p in repo.list_points(h).await.unwrap() {
                let m = repo.get_manifest(h, &p.id).await.unwrap();
                needed.extend(m.data_chunks());
            }
        }
        let present: HashSet<_> = repo
            .list_chunks()
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(present, needed, "GC leaves exactly the chunks the points need");
        assert!(
            repo.list_leases(None).await.unwrap().is_empty(),
            "every lease was released"
        );
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn sync_prune_and_gc_interleaved_never_lose_a_needed_chunk(sc in scenario()) {
        run(&sc);
    }
}

#[test]
fn dedup_across_disks_and_points_and_a_wrong_key_is_named() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::new(
            Arc::new(LocalFileSystem::new_with_prefix(dir.path()).unwrap()),
            "",
        );
        let key = Arc::new(StoreKey::from_bytes(&[1; 32], Cipher::Aes256Gcm));
        let host = HostId::new("web-01").unwrap();
        let j = dir.path().join("j");
        // The same content four times in one point, then again in a second point.
        sync_once(&repo, &host, 0, &[3, 3, 0, 3], Some(&key), &j).await;
        sync_once(&repo, &host, 1, &[3, 4, 3, 3], Some(&key), &j).await;
        assert_eq!(repo.list_chunks().await.unwrap().len(), 2);

        // The same new chunk four times at once (a window of identical chunks): sent once.
        let opts = SessionOptions {
            chunk_size: CHUNK,
            compression: None,
            lease_ttl: Duration::from_secs(60),
            journal: None,
        };
        let p = PointId::new("p2b").unwrap();
        let s = SyncSession::open(repo.clone(), host.clone(), p, Some(key.clone()), &opts)
            .await
            .unwrap();
        let data = content(5);
        let id = s.chunk_id(&data);
        let outcomes = futures::future::join_all((0..4).map(|_| s.put_chunk(id, data.clone()))).await;
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| matches!(o, Ok(PutOutcome::Stored { .. })))
                .count(),
            1
        );
        assert_eq!(s.stats().chunks_stored, 1);
        assert_eq!(s.stats().chunks_known, 3);
        drop(s);

        let other = Arc::new(StoreKey::from_bytes(&[2; 32], Cipher::Aes256Gcm));
        let opts = SessionOptions {
            chunk_size: CHUNK,
            compression: None,
            lease_ttl: Duration::from_secs(60),
            journal: None,
        };
        let p = PointId::new("p3").unwrap();
        let e = SyncSession::open(repo.clone(), host.clone(), p.clone(), Some(other), &opts)
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::WrongKey { .. }), "{e}");
        let e = SyncSession::open(repo.clone(), host.clone(), p, None, &opts)
            .await
            .unwrap_err();
        assert!(matches!(e, SessionError::NeedKey { .. }), "{e}");
    });
}
