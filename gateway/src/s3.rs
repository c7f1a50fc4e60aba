//! The data plane: the S3 API (s3s) mapped onto block mode. Request layout and meaning are in
//! `docs/protocol.md`; the decisions are in `blockstore.rs`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::{
    Bucket, ETag, GetObjectInput, GetObjectOutput, HeadBucketInput, HeadBucketOutput, HeadObjectInput,
    HeadObjectOutput, ListBucketsInput, ListBucketsOutput, ListObjectsV2Input, ListObjectsV2Output, Object,
    PutObjectInput, PutObjectOutput, StreamingBlob, Timestamp,
};
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, s3_error};
use tern_core::protocol::{
    BATCH_HEADER_LEN, DIGEST_META, LANDED_RECORD_LEN, STATE_KEY, SyncPlan, ZERO_META, decode_batch_header,
    decode_batch_table,
};
use tern_core::{Digest, DiskId, HostId, PointId, error_chain};
use tracing::{debug, warn};

use crate::blockstore::{BlockError, BlockStore};
use crate::db::MetaDb;
use crate::metrics::Metrics;
use crate::secrets::MasterKey;

/// Longest an extent body may stall between two pieces before the request is dropped: a stalled
/// upload holds I/O buffer memory of its volume, so half-open connections must not keep it.
const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest sync plan body.
const MAX_PLAN_LEN: usize = 1 << 20;

/// What an object key of a host's bucket addresses.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    State,
    Begin(PointId),
    Extent {
        sync: PointId,
        disk: DiskId,
        offset: u64,
    },
    Batch {
        sync: PointId,
        disk: DiskId,
    },
    Commit(PointId),
    Landed(DiskId),
    Point(PointId),
}

fn parse_key(key: &str) -> Result<Key, S3Error> {
    let bad = || s3_error!(InvalidArgument, "unknown key {key:?} (see docs/protocol.md)");
    let parts: Vec<&str> = key.split('/').collect();
    let point = |s: &str| PointId::new(s).map_err(|e| s3_error!(InvalidArgument, "{e}"));
    let disk = |s: &str| DiskId::new(s).map_err(|e| s3_error!(InvalidArgument, "{e}"));
    Ok(match parts.as_slice() {
        [STATE_KEY] => Key::State,
        ["syncs", s, "begin"] => Key::Begin(point(s)?),
        ["syncs", s, "commit"] => Key::Commit(point(s)?),
        ["syncs", s, "disks", d, "batch"] => Key::Batch {
            sync: point(s)?,
            disk: disk(d)?,
        },
        ["syncs", s, "disks", d, off] => {
            if off.len() != 16 {
                return Err(bad());
            }
            let offset = u64::from_str_radix(off, 16).map_err(|_| bad())?;
            Key::Extent {
                sync: point(s)?,
                disk: disk(d)?,
                offset,
            }
        }
        ["landed", d] => Key::Landed(disk(d)?),
        ["points", p] => Key::Point(point(p)?),
        _ => return Err(bad()),
    })
}

fn host_of(bucket: &str) -> S3Result<HostId> {
    HostId::new(bucket).map_err(|_| s3_error!(NoSuchBucket, "no host {bucket:?}"))
}

fn s3_err(op: &str, metrics: &Metrics, e: BlockError) -> S3Error {
    metrics.error(op);
    let code = match &e {
        BlockError::NoSuchHost(_) => S3ErrorCode::NoSuchBucket,
        BlockError::InvalidArgument(_) | BlockError::Geometry(_) => S3ErrorCode::InvalidArgument,
        BlockError::InvalidRequest(_) => S3ErrorCode::InvalidRequest,
        BlockError::BadDigest { .. } => S3ErrorCode::BadDigest,
        BlockError::TooLarge(_) => S3ErrorCode::EntityTooLarge,
        BlockError::Incomplete { .. } | BlockError::Body(_) => S3ErrorCode::IncompleteBody,
        BlockError::NotFound(_) => S3ErrorCode::NoSuchKey,
        BlockError::Db(_)
        | BlockError::Provider(_)
        | BlockError::Io(_)
        | BlockError::Landed(_)
        | BlockError::ShuttingDown => {
            warn!(op, error = %error_chain(&e), "request failed");
            return S3Error::with_message(S3ErrorCode::InternalError, "internal error (see the gateway log)");
        }
    };
    debug!(op, error = %error_chain(&e), "request refused");
    S3Error::with_message(code, error_chain(&e))
}

async fn read_small_body(body: Option<StreamingBlob>, limit: usize) -> S3Result<Vec<u8>> {
    let mut out = Vec::new();
    if let Some(mut body) = body {
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| s3_error!(IncompleteBody, "{e}"))?;
            if out.len() + piece.len() > limit {
                return Err(s3_error!(EntityTooLarge, "body is larger than {limit} bytes"));
            }
            out.extend_from_slice(&piece);
        }
    }
    Ok(out)
}

fn ts(ms: u64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(ms))
}

/// The S3 service of the gateway.
#[derive(Debug, Clone)]
pub struct DataPlane {
    store: Arc<BlockStore>,
    metrics: Arc<Metrics>,
}

impl DataPlane {
    /// A data plane over `store`.
    pub fn new(store: Arc<BlockStore>, metrics: Arc<Metrics>) -> Self {
        Self { store, metrics }
    }

    async fn put_extent(
        &self,
        host: &HostId,
        key: (PointId, DiskId, u64),
        input: PutObjectInput,
        headers: &http::HeaderMap,
    ) -> Result<String, BlockError> {
        let (sync, disk, offset) = key;
        let meta = input.metadata.unwrap_or_default();
        let len = body_len(input.content_length, headers, input.body.as_ref())?;
        if let Some(z) = meta.get(ZERO_META) {
            let zlen: u64 = z
                .parse()
                .map_err(|_| BlockError::InvalidArgument(format!("bad {ZERO_META} length {z:?}")))?;
            if len != 0 {
                return Err(BlockError::InvalidArgument(
                    "a zero extent has an empty body".into(),
                ));
            }
            self.store.zero_extent(host, &sync, &disk, offset, zlen).await?;
            return Ok(format!("zero-{zlen}"));
        }
        let digest = meta
            .get(DIGEST_META)
            .and_then(|d| Digest::from_hex(d))
            .ok_or_else(|| {
                BlockError::InvalidArgument(format!(
                    "header x-amz-meta-{DIGEST_META} with 64 hex digits is required"
                ))
            })?;
        let mut target = self.store.prepare_extent(host, &sync, &disk, offset, len).await?;
        let mut body = Body::new(input.body, len);
        body.fill_checked(&mut target.buf, digest).await?;
        body.finish().await?;
        self.store.write_extent(target, digest).await?;
        Ok(digest.to_hex())
    }

    /// `PUT syncs/{sync}/disks/{disk}/batch`: the table is read and checked first, then every
    /// data body is received and digest-checked, and only then is anything written.
    async fn put_batch(
        &self,
        host: &HostId,
        sync: PointId,
        disk: DiskId,
        input: PutObjectInput,
        headers: &http::HeaderMap,
    ) -> Result<String, BlockError> {
        let len = body_len(input.content_length, headers, input.body.as_ref())?;
        let mut body = Body::new(input.body, len);
        let refused = |e: tern_core::protocol::BatchError| {
            BlockError::InvalidArgument(format!("batch refused: {}", error_chain(&e)))
        };
        let mut header = [0u8; BATCH_HEADER_LEN];
        body.fill(&mut header, None).await?;
        let count = decode_batch_header(&header).map_err(refused)?;
        let table_len = count * LANDED_RECORD_LEN;
        if len < (BATCH_HEADER_LEN + table_len) as u64 {
            return Err(BlockError::InvalidArgument(format!(
                "Content-Length {len} is shorter than the table of {count} extents"
            )));
        }
        let mut table = vec![0u8; table_len];
        let mut hasher = blake3::Hasher::new();
        body.fill(&mut table, Some(&mut hasher)).await?;
        let (extents, data_len) = decode_batch_table(&table).map_err(refused)?;
        if len != (BATCH_HEADER_LEN + table_len) as u64 + data_len {
            return Err(BlockError::InvalidArgument(format!(
                "Content-Length {len} does not match the batch: {BATCH_HEADER_LEN} + {table_len} bytes of table and {data_len} bytes of data"
            )));
        }
        let mut target = self.store.prepare_batch(host, &sync, &disk, extents).await?;
        let digests: Vec<Digest> = target.digests().collect();
        for (buf, digest) in target.bufs.iter_mut().zip(digests) {
            body.fill_checked(buf, digest).await?;
        }
        body.finish().await?;
        self.store.write_batch(target).await?;
        Ok(hasher.finalize().to_hex().to_string())
    }
}

/// A request body read in exact pieces, bounded by its announced length, with an idle timeout.
struct Body {
    stream: Option<StreamingBlob>,
    /// Received and not yet consumed.
    rest: Bytes,
    /// Bytes received so far.
    got: u64,
    /// The announced length.
    len: u64,
}

impl Body {
    fn new(stream: Option<StreamingBlob>, len: u64) -> Self {
        Self {
            stream,
            rest: Bytes::new(),
            got: 0,
            len,
        }
    }

    /// The next piece from the network, `None` at its end.
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BlockError> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        let next = tokio::time::timeout(BODY_IDLE_TIMEOUT, stream.next())
            .await
            .map_err(|_| BlockError::Incomplete {
                got: self.got,
                expected: self.len,
            })?;
        let Some(piece) = next else { return Ok(None) };
        let piece: Bytes = piece.map_err(BlockError::Body)?;
        self.got += piece.len() as u64;
        if self.got > self.len {
            return Err(BlockError::TooLarge(self.len));
        }
        Ok(Some(piece))
    }

    /// Fills all of `dst`, feeding `hasher` with the bytes.
    async fn fill(
        &mut self,
        dst: &mut [u8],
        mut hasher: Option<&mut blake3::Hasher>,
    ) -> Result<(), BlockError> {
        let mut at = 0;
        while at < dst.len() {
            if self.rest.is_empty() {
                self.rest = self.next_piece().await?.ok_or(BlockError::Incomplete {
                    got: self.got,
                    expected: self.len,
                })?;
                continue;
            }
            let piece = self.rest.split_to(self.rest.len().min(dst.len() - at));
            dst[at..at + piece.len()].copy_from_slice(&piece);
            if let Some(h) = hasher.as_deref_mut() {
                h.update(&piece);
            }
            at += piece.len();
        }
        Ok(())
    }

    /// Fills all of `dst` and checks that its BLAKE3 is `digest`.
    async fn fill_checked(&mut self, dst: &mut [u8], digest: Digest) -> Result<(), BlockError> {
        let mut hasher = blake3::Hasher::new();
        self.fill(dst, Some(&mut hasher)).await?;
        let actual = Digest(*hasher.finalize().as_bytes());
        if actual != digest {
            return Err(BlockError::BadDigest {
                expected: digest,
                actual,
            });
        }
        Ok(())
    }

    /// Checks that the body ends here.
    async fn finish(&mut self) -> Result<(), BlockError> {
        if !self.rest.is_empty() {
            return Err(BlockError::TooLarge(self.len));
        }
        while let Some(piece) = self.next_piece().await? {
            if !piece.is_empty() {
                return Err(BlockError::TooLarge(self.len));
            }
        }
        if self.got != self.len {
            return Err(BlockError::Incomplete {
                got: self.got,
                expected: self.len,
            });
        }
        Ok(())
    }
}

/// The announced body length: `Content-Length`, or for `aws-chunked` uploads (clients that
/// send trailing checksums) `x-amz-decoded-content-length`.
fn body_len(
    content_length: Option<i64>,
    headers: &http::HeaderMap,
    body: Option<&StreamingBlob>,
) -> Result<u64, BlockError> {
    let decoded = headers
        .get("x-amz-decoded-content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let exact = body
        .and_then(|b| s3s::stream::ByteStream::remaining_length(b).exact())
        .map(|n| n as i64);
    let len = decoded
        .or(content_length)
        .or(exact)
        .ok_or_else(|| BlockError::InvalidArgument("Content-Length is required".into()))?;
    u64::try_from(len).map_err(|_| BlockError::InvalidArgument("negative Content-Length".into()))
}

impl DataPlane {
    /// The bytes of a readable key and its modification time.
    async fn read_key(&self, bucket: &str, key: &str) -> S3Result<(Vec<u8>, Option<u64>)> {
        let host = host_of(bucket)?;
        Ok(match parse_key(key)? {
            Key::State => {
                let st = self
                    .store
                    .state(&host)
                    .await
                    .map_err(|e| s3_err("state", &self.metrics, e))?;
                (
                    serde_json::to_vec(&st).map_err(|e| s3_error!(InternalError, "{e}"))?,
                    None,
                )
            }
            Key::Landed(disk) => (
                self.store
                    .landed(&host, &disk)
                    .await
                    .map_err(|e| s3_err("landed", &self.metrics, e))?,
                None,
            ),
            Key::Point(p) => {
                let m = self
                    .store
                    .manifest(&host, &p)
                    .map_err(|e| s3_err("point", &self.metrics, e))?;
                let rec = self.store.db().point(&host, &p).ok().flatten();
                (m, rec.map(|r| r.created_unix_ms))
            }
            _ => return Err(s3_error!(NoSuchKey, "this key cannot be read")),
        })
    }
}

fn blob(bytes: Vec<u8>) -> StreamingBlob {
    StreamingBlob::wrap(futures::stream::once(async move {
        Ok::<_, std::io::Error>(Bytes::from(bytes))
    }))
}

#[async_trait::async_trait]
impl S3 for DataPlane {
    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let host = host_of(&req.input.bucket)?;
        let etag = match parse_key(&req.input.key)? {
            Key::Extent { sync, disk, offset } => self
                .put_extent(&host, (sync, disk, offset), req.input, &req.headers)
                .await
                .map_err(|e| s3_err("extent", &self.metrics, e))?,
            Key::Batch { sync, disk } => self
                .put_batch(&host, sync, disk, req.input, &req.headers)
                .await
                .map_err(|e| s3_err("batch", &self.metrics, e))?,
            Key::Begin(sync) => {
                let body = read_small_body(req.input.body, MAX_PLAN_LEN).await?;
                let plan: SyncPlan = serde_json::from_slice(&body)
                    .map_err(|e| s3_error!(InvalidArgument, "sync plan refused: {e}"))?;
                self.store
                    .begin(&host, &sync, plan)
                    .await
                    .map_err(|e| s3_err("begin", &self.metrics, e))?;
                blake3::hash(&body).to_hex().to_string()
            }
            Key::Commit(sync) => {
                let limit = self
                    .store
                    .max_manifest_len(&host)
                    .await
                    .map_err(|e| s3_err("commit", &self.metrics, e))?;
                let body = read_small_body(req.input.body, limit).await?;
                self.store
                    .commit(&host, &sync, &body)
                    .await
                    .map_err(|e| s3_err("commit", &self.metrics, e))?;
                blake3::hash(&body).to_hex().to_string()
            }
            _ => return Err(s3_error!(InvalidArgument, "this key cannot be written")),
        };
        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(ETag::Strong(etag)),
            ..Default::default()
        }))
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        let (body, modified) = self.read_key(&req.input.bucket, &req.input.key).await?;
        let out = GetObjectOutput {
            content_length: Some(body.len() as i64),
            e_tag: Some(ETag::Strong(blake3::hash(&body).to_hex().to_string())),
            last_modified: modified.map(ts),
            body: Some(blob(body)),
            ..Default::default()
        };
        Ok(S3Response::new(out))
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        let (body, modified) = self.read_key(&req.input.bucket, &req.input.key).await?;
        Ok(S3Response::new(HeadObjectOutput {
            content_length: Some(body.len() as i64),
            e_tag: Some(ETag::Strong(blake3::hash(&body).to_hex().to_string())),
            last_modified: modified.map(ts),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        let host = host_of(&req.input.bucket)?;
        let prefix = req.input.prefix.clone().unwrap_or_default();
        let points = self
            .store
            .points(&host)
            .map_err(|e| s3_err("list", &self.metrics, e))?;
        let contents: Vec<Object> = points
            .into_iter()
            .map(|(id, rec)| (format!("points/{id}"), rec))
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| req.input.start_after.as_ref().is_none_or(|s| k > s))
            .map(|(k, rec)| Object {
                key: Some(k),
                size: Some(rec.manifest_len as i64),
                last_modified: Some(ts(rec.created_unix_ms)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(host.to_string()),
            prefix: Some(prefix),
            key_count: Some(contents.len() as i32),
            max_keys: Some(contents.len().max(1000) as i32),
            is_truncated: Some(false),
            contents: Some(contents),
            ..Default::default()
        }))
    }

    async fn list_buckets(
        &self,
        req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let key = req
            .credentials
            .as_ref()
            .map(|c| c.access_key.clone())
            .unwrap_or_default();
        let rec = self
            .store
            .db()
            .key(&key)
            .map_err(|e| s3_err("list", &self.metrics, e.into()))?;
        let buckets = rec
            .map(|r| {
                r.hosts
                    .into_iter()
                    .map(move |h| (h, r.created_unix_ms))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .map(|(h, created)| Bucket {
                name: Some(h.to_string()),
                creation_date: Some(ts(created)),
                ..Default::default()
            })
            .collect();
        Ok(S3Response::new(ListBucketsOutput {
            buckets: Some(buckets),
            ..Default::default()
        }))
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        let host = host_of(&req.input.bucket)?;
        self.store
            .state(&host)
            .await
            .map_err(|e| s3_err("head", &self.metrics, e))?;
        Ok(S3Response::new(HeadBucketOutput::default()))
    }
}

/// SigV4 secrets, unsealed from the metadata DB per request.
#[derive(Debug, Clone)]
pub struct KeyAuth {
    db: MetaDb,
    master: Arc<MasterKey>,
}

impl KeyAuth {
    /// Authentication over the keys in `db`.
    pub fn new(db: MetaDb, master: Arc<MasterKey>) -> Self {
        Self { db, master }
    }
}

#[async_trait::async_trait]
impl S3Auth for KeyAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        let rec = self
            .db
            .key(access_key)
            .map_err(|e| {
                warn!(error = %error_chain(&e), "reading access keys failed");
                s3_error!(InternalError)
            })?
            .ok_or_else(|| s3_error!(InvalidAccessKeyId))?;
        let sealed = hex::decode(&rec.sealed_secret).map_err(|_| s3_error!(InternalError))?;
        let secret = self.master.open(access_key, &sealed).map_err(|e| {
            warn!(key = access_key, error = %e, "cannot unseal an access key");
            s3_error!(InternalError)
        })?;
        Ok(SecretKey::from(secret))
    }
}

/// Authorisation: a request must be signed, and may touch only the hosts of its key.
#[derive(Debug, Clone)]
pub struct HostAccess {
    db: MetaDb,
}

impl HostAccess {
    /// Access control over the keys in `db`.
    pub fn new(db: MetaDb) -> Self {
        Self { db }
    }
}

#[async_trait::async_trait]
impl S3Access for HostAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let Some(creds) = cx.credentials() else {
            return Err(s3_error!(AccessDenied, "requests must be signed"));
        };
        let Some(bucket) = cx.s3_path().get_bucket_name() else {
            return Ok(());
        };
        let rec = self
            .db
            .key(&creds.access_key)
            .map_err(|_| s3_error!(InternalError))?;
        match rec {
            Some(r) if r.hosts.iter().any(|h| h.as_str() == bucket) => Ok(()),
            _ => Err(s3_error!(AccessDenied, "this key may not access host {bucket:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse() {
        assert_eq!(parse_key("state").unwrap(), Key::State);
        assert_eq!(
            parse_key("syncs/p1/disks/sda/0000000000001000").unwrap(),
            Key::Extent {
                sync: PointId::new("p1").unwrap(),
                disk: DiskId::new("sda").unwrap(),
                offset: 4096
            }
        );
        assert_eq!(
            parse_key("syncs/p1/disks/sda/batch").unwrap(),
            Key::Batch {
                sync: PointId::new("p1").unwrap(),
                disk: DiskId::new("sda").unwrap(),
            }
        );
        assert!(parse_key("syncs/p1/disks/sda/1000").is_err());
        assert!(parse_key("syncs/p1/disks/sda/zzzzzzzzzzzzzzzz").is_err());
        assert!(parse_key("syncs/../begin").is_err());
        assert!(parse_key("points/a/b").is_err());
        assert!(parse_key("").is_err());
    }
}
