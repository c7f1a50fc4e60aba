//! Connecting to a bucket: `object_store`'s S3 client (SigV4, retries with backoff, multipart)
//! over our own rustls configuration, so the trust is explicit: the system's roots, a CA file
//! (a private RGW or MinIO), or one pinned certificate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::client::{HttpClient, HttpConnector};
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use rustls_pki_types::pem::PemObject;

use crate::tls::{Fingerprint, TlsError};

/// Whom to trust for the endpoint's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The operating system's root certificates.
    System,
    /// The certificates in this PEM file.
    CaFile(PathBuf),
    /// Exactly this certificate.
    Pinned(Fingerprint),
}

/// A secret that never shows in logs or debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How to reach a bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// `https://host[:port]` (`http://` only with `allow_http`).
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// The region (`us-east-1` when the server does not care).
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: Secret,
    /// Whom to trust.
    pub trust: Trust,
    /// Allow plain HTTP (a local test server only: credentials are signed, not sent, but data is
    /// in the clear).
    pub allow_http: bool,
    /// Retries of one request (object_store backs off exponentially between them).
    pub max_retries: usize,
}

/// Why a bucket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("endpoint {0:?} must be an https:// URL (http:// needs --s3-allow-http)")]
    Endpoint(String),
    #[error("failed to read CA file {path}")]
    CaFile {
        path: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {0} holds no usable certificate")]
    NoCertificate(String),
    #[error("no system root certificates could be loaded")]
    NoSystemRoots,
    #[error("failed to set up TLS")]
    Tls(#[from] TlsError),
    #[error("failed to set up TLS")]
    Rustls(#[source] rustls::Error),
    #[error("failed to build the HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("failed to configure the S3 client")]
    Store(#[source] object_store::Error),
    #[error("{0:?} is not an s3://bucket[/prefix] URL")]
    Url(String),
}

/// Splits `s3://bucket/prefix` into the bucket and the prefix (possibly empty).
pub fn parse_url(url: &str) -> Result<(String, String), S3Error> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| S3Error::Url(url.to_owned()))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid {
        return Err(S3Error::Url(url.to_owned()));
    }
    Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
}

fn tls_config(trust: &Trust) -> Result<rustls::ClientConfig, S3Error> {
    let roots = match trust {
        Trust::Pinned(fp) => {
            return Ok(crate::tls::client_config(Arc::new(
                crate::tls::PinnedVerifier::pinned(*fp),
            ))?);
        }
        Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| S3Error::CaFile {
                    path: path.display().to_string(),
                    source,
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(S3Error::NoCertificate(path.display().to_string()));
            }
            roots
        }
        Trust::System => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(S3Error::NoSystemRoots);
            }
            roots
        }
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(crate::tls::provider()))
        .with_safe_default_protocol_versions()
        .map_err(S3Error::Rustls)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct Connector(reqwest::Client);

impl HttpConnector for Connector {
    fn connect(&self, _options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(self.0.clone()))
    }
}

/// Connects to the bucket (no request is made yet).
pub fn connect(config: &S3Config) -> Result<Arc<dyn ObjectStore>, S3Error> {
    let endpoint = config.endpoint.trim_end_matches('/');
    let https = endpoint.starts_with("https://");
    if !(https || config.allow_http && endpoint.starts_with("http://")) {
        return Err(S3Error::Endpoint(config.endpoint.clone()));
    }
    let mut builder = reqwest::Client::builder()
        .http1_only()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_keepalive(Duration::from_secs(30));
    if https {
        builder = builder.tls_backend_preconfigured(tls_config(&config.trust)?);
    }
    let client = builder.build().map_err(S3Error::Http)?;
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(15),
            base: 2.0,
        },
        max_retries: config.max_retries,
        retry_timeout: Duration::from_secs(300),
    };
    let store = AmazonS3Builder::new()
        .with_endpoint(endpoint)
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_access_key_id(&config.access_key_id)
        .with_secret_access_key(config.secret_access_key.expose())
        .with_virtual_hosted_style_request(false)
        .with_allow_http(config.allow_http)
        .with_retry(retry)
        .with_http_connector(Connector(client))
        .build()
        .map_err(S3Error::Store)?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        assert_eq!(
            parse_url("s3://tern-dr").unwrap(),
            ("tern-dr".into(), String::new())
        );
        assert_eq!(
            parse_url("s3://tern-dr/site-a/").unwrap(),
            ("tern-dr".into(), "site-a".into())
        );
        assert!(parse_url("https://x").is_err());
        assert!(parse_url("s3://A_B").is_err());
        assert!(parse_url("s3://").is_err());
    }
}
