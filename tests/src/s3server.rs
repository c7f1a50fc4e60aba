//! `tern-test-s3`: a real S3 server for tests, in process ([`start`]) or as the binary
//! `tern-test-s3 --root DIR --info FILE [--port N] [--bucket NAME]... [--ca-file PEM]`.
//!
//! It serves the `s3s-fs` crate (every bucket a directory under the root, every object a file)
//! over HTTPS on `127.0.0.1` (HTTP/1.1, a fresh self-signed certificate for 127.0.0.1 and
//! localhost), path-style (`https://127.0.0.1:PORT/BUCKET/KEY`), with SigV4 checked for one
//! generated access key; unsigned requests are refused. The binary writes its info file once it
//! listens (atomically, JSON):
//!
//! ```json
//! {"endpoint": "https://127.0.0.1:PORT", "access_key_id": "...", "secret_access_key": "...",
//!  "ca_file": "/path/NAME.ca.pem", "fingerprint": "sha256:<hex of the certificate's DER>"}
//! ```
//!
//! and serves until SIGINT/SIGTERM. The certificate is self-signed, so `ca_file` is both the CA
//! to trust and the certificate to pin.
//!
//! What `s3s-fs` 0.14 does and does not do (read from its source):
//! - PutObject, GetObject (with ranges), HeadObject, CopyObject, DeleteObject, DeleteObjects,
//!   ListObjects/ListObjectsV2 (prefix, delimiter, start-after, continuation, max-keys),
//!   multipart uploads (create, upload part, upload part copy, list parts, complete, abort),
//!   buckets (create, delete, head, list, location). ETags are MD5s (`md5-of-md5s-N` for
//!   multipart); `LastModified` is the file's mtime, on GET, HEAD and list entries.
//! - List entries carry key, size and `LastModified` but no ETag.
//! - Conditional writes: `If-None-Match: *` and `If-Match: <etag>` on PutObject and
//!   CompleteMultipartUpload, but checked before writing, not atomically with the rename: two
//!   racing creates can both succeed.
//! - CompleteMultipartUpload needs parts numbered 1..N in order, each but the last at least
//!   5 MiB; it deletes the upload, so a retried Complete (after a lost answer) fails with
//!   AccessDenied instead of succeeding as on AWS.
//! - A PUT into a bucket that does not exist creates its directory (no NoSuchBucket); a key is
//!   a path, so `a` and `a/b` cannot both exist; keys ending in `/` are directories.
//! - DeleteObject leaves the object's metadata and ETag files under the root (harmless: a new
//!   PUT overwrites them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use rand::Rng;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use serde::{Deserialize, Serialize};
use tokio_rustls::TlsAcceptor;

use crate::fixture::{Background, TestCert, bind_loopback, serve_tls, write_atomic};

/// How to start the server.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Buckets to create (directories under the root) before serving.
    pub buckets: Vec<String>,
    /// Where to write the certificate (PEM); `None`: a temporary file the server removes when
    /// dropped.
    pub ca_file: Option<PathBuf>,
}

/// The info file of `tern-test-s3`: how to reach and trust a running server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Info {
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The one access key id SigV4 accepts.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
    /// The server's self-signed certificate, PEM: the CA to trust.
    pub ca_file: PathBuf,
    /// `sha256:<hex>` of the certificate's DER.
    pub fingerprint: String,
}

/// A running S3 server; dropping it stops it.
#[derive(Debug)]
pub struct S3Server {
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The one access key id SigV4 accepts.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
    /// The certificate, PEM (the CA to trust).
    pub ca_pem: String,
    /// Where the certificate was written.
    pub ca_file: PathBuf,
    /// `sha256:<hex>` of the certificate's DER.
    pub fingerprint: String,
    /// The data directory (one subdirectory per bucket).
    pub root: PathBuf,
    _server: Background,
    _ca_dir: Option<tempfile::TempDir>,
}

impl S3Server {
    /// The info file's contents.
    pub fn info(&self) -> S3Info {
        S3Info {
            endpoint: self.endpoint.clone(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            ca_file: self.ca_file.clone(),
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// Creates bucket `name` (a directory under the root) if it does not exist.
    pub fn create_bucket(&self, name: &str) -> Result<()> {
        create_bucket(&self.root, name)
    }
}

fn create_bucket(root: &Path, name: &str) -> Result<()> {
    let valid = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['.', '-']);
    if !valid {
        bail!("{name:?} is not a valid bucket name");
    }
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))
}

/// Starts a server on 127.0.0.1 storing its data under `root` (created if missing), with a new
/// certificate and a new access key. Needs no Tokio runtime (it runs its own on a thread).
pub fn start(root: &Path, options: S3Options) -> Result<S3Server> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    for b in &options.buckets {
        create_bucket(root, b)?;
    }
    let cert = TestCert::generate()?;
    let (ca_file, ca_dir) = match options.ca_file {
        Some(p) => (p, None),
        None => {
            let dir = tempfile::tempdir()?;
            (dir.path().join("s3-ca.pem"), Some(dir))
        }
    };
    write_atomic(&ca_file, cert.cert_pem.as_bytes())?;

    let mut rng = rand::rng();
    let mut pick = |alphabet: &[u8], n: usize| -> String {
        (0..n)
            .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
            .collect()
    };
    let access_key_id = format!("TT{}", pick(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 18));
    let secret_access_key = pick(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
        40,
    );

    // s3s_fs::Error is not a std error; its Debug shows the cause.
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| anyhow!("opening {}: {e:?}", root.display()))?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(
        access_key_id.clone(),
        secret_access_key.clone(),
    ));
    let service = builder.build();
    let acceptor = TlsAcceptor::from(cert.server_config()?);
    let listener = bind_loopback(options.port)?;
    let server = Background::spawn("tern-test-s3", listener, move |l| serve_tls(l, acceptor, service))?;
    let addr = server.addr();
    Ok(S3Server {
        endpoint: format!("https://{addr}"),
        addr,
        access_key_id,
        secret_access_key,
        ca_pem: cert.cert_pem,
        ca_file,
        fingerprint: cert.fingerprint,
        root: root.canonicalize()?,
        _server: server,
        _ca_dir: ca_dir,
    })
}
