//! The Cloud Sync Gateway as a target: its S3 API (`docs/protocol.md`) through
//! `object_store`'s S3 client, over HTTPS with the gateway's certificate pinned.
//!
//! `object_store` signs every request (SigV4, region `tern`, `UNSIGNED-PAYLOAD`: TLS protects
//! the body and every extent carries its BLAKE3 digest) and retries what is safe to retry
//! (connection errors, timeouts of idempotent requests, 5xx, 429) with exponential backoff.
//! The HTTP client is ours: a `reqwest::Client` whose rustls configuration accepts only the
//! pinned certificate, handed to `object_store` through its `HttpConnector` trait.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{HttpClient, HttpConnector, HttpError};
use object_store::path::Path;
use object_store::{
    Attribute, AttributeValue, Attributes, BackoffConfig, ClientOptions, GetOptions, ObjectStore, PutOptions,
    PutPayload, RetryConfig,
};
use tern_core::protocol::{
    DIGEST_META, HostState, LandedExtent, LandedKind, STATE_KEY, SyncPlan, ZERO_META, batch_key, begin_key,
    commit_key, encode_batch_table, extent_key, landed_key, point_key,
};
use tern_core::{Digest, DiskId, HostId, Manifest, PointId};

use super::{BatchBody, BatchExtent, ErrorKind, PointEntry, Target, TargetError};
use crate::tls::{Fingerprint, PinnedVerifier, client_config};

pub use tern_core::object::s3::Secret;

/// How to reach and authenticate to a gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `https://host:port` of the data plane.
    pub endpoint: String,
    /// The protected host (the bucket).
    pub host: HostId,
    /// The access key the admin issued for this host.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: Secret,
    /// The gateway certificate's fingerprint.
    pub fingerprint: Fingerprint,
}

/// Why a gateway connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("endpoint {0:?} is not an https:// URL with a host")]
    Endpoint(String),
    #[error("failed to set up TLS")]
    Tls(#[from] crate::tls::TlsError),
    #[error("failed to build the HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("failed to configure the S3 client")]
    Store(#[source] object_store::Error),
    #[error("failed to connect to the gateway at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the gateway at {endpoint} presented certificate {seen}, not the pinned {pinned}")]
    Mismatch {
        endpoint: String,
        seen: Fingerprint,
        pinned: Fingerprint,
    },
}

/// Checks that `endpoint` is `https://host[:port]` and returns it without a trailing slash.
pub fn check_endpoint(endpoint: &str) -> Result<String, GatewayError> {
    let e = endpoint.trim_end_matches('/');
    match e.strip_prefix("https://") {
        Some(rest) if !rest.is_empty() && !rest.contains('/') => Ok(e.to_owned()),
        _ => Err(GatewayError::Endpoint(endpoint.to_owned())),
    }
}

fn http_client(verifier: Arc<PinnedVerifier>) -> Result<reqwest::Client, GatewayError> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(verifier)?)
        .http1_only()
        .connect_timeout(Duration::from_secs(10))
        // A commit answers once the point is committed (volume snapshots): allow minutes.
        .read_timeout(Duration::from_secs(300))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_keepalive(Duration::from_secs(30))
        .build()
        .map_err(GatewayError::Http)
}

/// Connects to `endpoint` once with a verifier that accepts any certificate and returns the
/// certificate's fingerprint (trust on first use). Any HTTP answer will do.
pub async fn probe_fingerprint(endpoint: &str) -> Result<Fingerprint, GatewayError> {
    let endpoint = check_endpoint(endpoint)?;
    let verifier = Arc::new(PinnedVerifier::recording());
    let client = http_client(verifier.clone())?;
    let result = client.get(format!("{endpoint}/")).send().await;
    match (verifier.last_seen(), result) {
        (Some(fp), _) => Ok(fp),
        (None, Err(source)) => Err(GatewayError::Connect { endpoint, source }),
        // Unreachable in practice: an HTTPS answer implies a certificate.
        (None, Ok(_)) => Err(GatewayError::Endpoint(endpoint)),
    }
}

/// Hands our pinned `reqwest::Client` to `object_store`.
#[derive(Debug)]
struct PinnedConnector(reqwest::Client);

impl HttpConnector for PinnedConnector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.0.clone()))
    }
}

/// The gateway's S3 API for one host.
#[derive(Debug, Clone)]
pub struct GatewayTarget {
    store: Arc<AmazonS3>,
    endpoint: String,
    host: HostId,
}

impl GatewayTarget {
    /// Sets up the client and checks that the gateway answers with the pinned certificate.
    pub async fn connect(config: GatewayConfig) -> Result<Self, GatewayError> {
        let endpoint = check_endpoint(&config.endpoint)?;
        let verifier = Arc::new(PinnedVerifier::pinned(config.fingerprint));
        let client = http_client(verifier.clone())?;
        // One request outside object_store first: a wrong certificate then fails at once with a
        // clear message instead of after object_store's connection retries.
        if let Err(source) = client.get(format!("{endpoint}/")).send().await {
            return Err(match verifier.last_seen() {
                Some(seen) if seen != config.fingerprint => GatewayError::Mismatch {
                    endpoint,
                    seen,
                    pinned: config.fingerprint,
                },
                _ => GatewayError::Connect { endpoint, source },
            });
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
        };
        let store = AmazonS3Builder::new()
            .with_endpoint(&endpoint)
            .with_bucket_name(config.host.as_str())
            .with_region("tern")
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(config.secret_access_key.expose())
            .with_virtual_hosted_style_request(false)
            .with_unsigned_payload(true)
            .with_retry(retry)
            .with_http_connector(PinnedConnector(client))
            .build()
            .map_err(GatewayError::Store)?;
        Ok(Self {
            store: Arc::new(store),
            endpoint,
            host: config.host,
        })
    }

    async fn get(&self, key: &str, op: impl Into<String>) -> Result<Bytes, TargetError> {
        let op = op.into();
        let path = parse_path(key, &op)?;
        let result = self
            .store
            .get_opts(&path, GetOptions::default())
            .await
            .map_err(|e| map_err(&op, e))?;
        result.bytes().await.map_err(|e| map_err(&op, e))
    }

    async fn put(
        &self,
        key: &str,
        body: PutPayload,
        attributes: Attributes,
        op: impl Into<String>,
    ) -> Result<(), TargetError> {
        let op = op.into();
        let path = parse_path(key, &op)?;
        let opts = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&path, body, opts)
            .await
            .map_err(|e| map_err(&op, e))?;
        Ok(())
    }
}

fn parse_path(key: &str, op: &str) -> Result<Path, TargetError> {
    Path::parse(key).map_err(|e| TargetError::new(op, ErrorKind::Permanent, e))
}

/// Classifies an `object_store` error: network trouble and server errors are transient.
fn map_err(op: &str, e: object_store::Error) -> TargetError {
    use object_store::Error as E;
    let kind = match &e {
        E::NotFound { .. } => ErrorKind::NotFound,
        E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::Precondition { .. }
        | E::AlreadyExists { .. }
        | E::NotModified { .. }
        | E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. } => ErrorKind::Permanent,
        _ => classify_chain(&e),
    };
    TargetError::new(op, kind, e)
}

fn classify_chain(e: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<HttpError>().is_some() {
            return ErrorKind::Transient;
        }
        // object_store's request error is not public: read its status from its message
        // ("Server returned non-2xx status code: 503 Service Unavailable: ...").
        let text = err.to_string();
        if let Some(status) = status_in(&text) {
            return if status >= 500 || status == 429 || status == 408 {
                ErrorKind::Transient
            } else {
                ErrorKind::Permanent
            };
        }
        if text.starts_with("Server returned error response") {
            return ErrorKind::Transient;
        }
        cur = err.source();
    }
    ErrorKind::Permanent
}

fn status_in(text: &str) -> Option<u16> {
    const MARK: &str = "Server returned non-2xx status code: ";
    let rest = &text[text.find(MARK)? + MARK.len()..];
    rest.get(..3)?.parse().ok()
}

fn metadata(key: &'static str, value: String) -> Attributes {
    let mut a = Attributes::new();
    a.insert(Attribute::Metadata(key.into()), AttributeValue::from(value));
    a
}

impl Target for GatewayTarget {
    fn describe(&self) -> String {
        format!("{}/{}", self.endpoint, self.host)
    }

    async fn state(&self) -> Result<HostState, TargetError> {
        let op = "read the host's state";
        let bytes = self.get(STATE_KEY, op).await?;
        serde_json::from_slice(&bytes).map_err(|e| TargetError::new(op, ErrorKind::Permanent, e))
    }

    async fn begin(&self, sync: &PointId, plan: &SyncPlan) -> Result<(), TargetError> {
        let op = format!("begin sync {sync}");
        let body = serde_json::to_vec(plan).map_err(|e| TargetError::new(&op, ErrorKind::Permanent, e))?;
        self.put(&begin_key(sync), body.into(), Attributes::new(), op)
            .await
    }

    async fn landed(&self, disk: &DiskId) -> Result<Vec<LandedExtent>, TargetError> {
        let op = format!("read the landed extents of disk {disk}");
        match self.get(&landed_key(disk), &op).await {
            Ok(bytes) => {
                LandedExtent::decode_all(&bytes).map_err(|e| TargetError::new(op, ErrorKind::Permanent, e))
            }
            Err(e) if e.kind == ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    async fn put_extent(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        body: Bytes,
        digest: Digest,
    ) -> Result<(), TargetError> {
        let op = format!("send {} bytes at {offset} of disk {disk}", body.len());
        let attrs = metadata(DIGEST_META, digest.to_hex());
        self.put(
            &extent_key(sync, disk, offset),
            PutPayload::from_bytes(body),
            attrs,
            op,
        )
        .await
    }

    async fn put_zero(
        &self,
        sync: &PointId,
        disk: &DiskId,
        offset: u64,
        len: u64,
    ) -> Result<(), TargetError> {
        let op = format!("zero {len} bytes at {offset} of disk {disk}");
        let attrs = metadata(ZERO_META, len.to_string());
        self.put(&extent_key(sync, disk, offset), PutPayload::default(), attrs, op)
            .await
    }

    async fn put_batch(
        &self,
        sync: &PointId,
        disk: &DiskId,
        mut extents: Vec<BatchExtent>,
    ) -> Result<(), TargetError> {
        if extents.len() == 1
            && let Some(one) = extents.pop()
        {
            return super::put_one(self, sync, disk, one).await;
        }
        let first = extents.first().map_or(0, |x| x.offset);
        let op = format!(
            "send a batch of {} extents from {first} of disk {disk}",
            extents.len()
        );
        // The table, then the data bodies in table order: one request, no copy of the bodies.
        let mut table = Vec::with_capacity(extents.len());
        let mut bodies = Vec::with_capacity(extents.len() + 1);
        for x in &extents {
            let len = u32::try_from(x.len()).map_err(|e| TargetError::new(&op, ErrorKind::Permanent, e))?;
            let kind = match &x.body {
                BatchBody::Data(body, digest) => {
                    bodies.push(body.clone());
                    LandedKind::Data(*digest)
                }
                BatchBody::Zero(_) => LandedKind::Zero,
            };
            table.push(LandedExtent {
                offset: x.offset,
                len,
                kind,
            });
        }
        let payload: PutPayload = std::iter::once(Bytes::from(encode_batch_table(&table)))
            .chain(bodies)
            .collect();
        self.put(&batch_key(sync, disk), payload, Attributes::new(), op)
            .await
    }

    async fn commit(&self, sync: &PointId, manifest: &Manifest) -> Result<(), TargetError> {
        let op = format!("commit sync {sync}");
        let body = manifest
            .encode()
            .map_err(|e| TargetError::new(&op, ErrorKind::Permanent, e))?;
        self.put(&commit_key(sync), body.into(), Attributes::new(), op)
            .await
    }

    async fn get_point(&self, point: &PointId) -> Result<Manifest, TargetError> {
        let op = format!("read point {point}");
        let bytes = self.get(&point_key(point), &op).await?;
        Manifest::decode(&bytes).map_err(|e| TargetError::new(op, ErrorKind::Permanent, e))
    }

    async fn list_points(&self) -> Result<Vec<PointEntry>, TargetError> {
        let op = "list the host's points";
        let prefix = Path::from("points");
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| map_err(op, e))?;
        let mut out: Vec<PointEntry> = metas
            .into_iter()
            .filter_map(|m| {
                let id = PointId::new(m.location.filename()?).ok()?;
                let ms = m.last_modified.timestamp_millis();
                Some(PointEntry {
                    id,
                    manifest_len: m.size,
                    modified_unix_ms: u64::try_from(ms).unwrap_or(0),
                })
            })
            .collect();
        out.sort_by(|a, b| (a.modified_unix_ms, &a.id).cmp(&(b.modified_unix_ms, &b.id)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            check_endpoint("https://127.0.0.1:8443/").unwrap(),
            "https://127.0.0.1:8443"
        );
        assert!(check_endpoint("http://127.0.0.1:8443").is_err());
        assert!(check_endpoint("https://").is_err());
        assert!(check_endpoint("https://gw/bucket").is_err());
    }

    #[test]
    fn statuses_in_object_store_messages() {
        assert_eq!(
            status_in("Server returned non-2xx status code: 503 Service Unavailable: x"),
            Some(503)
        );
        assert_eq!(
            status_in(
                "Error performing PUT in 1s - Server returned non-2xx status code: 400 Bad Request: <Code>BadDigest</Code>"
            ),
            Some(400)
        );
        assert_eq!(status_in("something else"), None);
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret::new("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
