//! The gateway's TLS identity: a self-signed certificate made on first start (rcgen), kept in
//! `<data_dir>/tls/`, identified by its SHA-256 fingerprint that clients pin.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::fsutil::{write_atomic, write_secret_atomic};

/// Why the TLS identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("cannot generate a certificate")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration refused")]
    Rustls(#[from] rustls::Error),
}

/// The loaded identity.
#[derive(Debug)]
pub struct TlsIdentity {
    /// Certificate chain (one self-signed certificate).
    pub certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// `sha256:<hex>` of the certificate.
    pub fingerprint: String,
    /// Whether this start created it.
    pub created: bool,
}

impl TlsIdentity {
    /// Loads `<dir>/cert.pem` and `<dir>/key.pem`, creating them (and `fingerprint`) when
    /// missing.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join("cert.pem");
        let key_path = dir.join("key.pem");
        let mut created = false;
        if !cert_path.exists() || !key_path.exists() {
            std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
                path: dir.to_owned(),
                source,
            })?;
            let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
            if let Ok(h) = rustix::system::uname().nodename().to_str() {
                names.push(h.to_owned());
            }
            let ck = rcgen::generate_simple_self_signed(names)?;
            write_secret_atomic(&key_path, ck.signing_key.serialize_pem().as_bytes()).map_err(|source| {
                TlsError::Write {
                    path: key_path.clone(),
                    source,
                }
            })?;
            write_atomic(&cert_path, ck.cert.pem().as_bytes()).map_err(|source| TlsError::Write {
                path: cert_path.clone(),
                source,
            })?;
            created = true;
        }
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| TlsError::Read {
                path: p.to_owned(),
                source,
            })
        };
        let cert_pem = read(&cert_path)?;
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|_| TlsError::Pem {
                path: cert_path.clone(),
                what: "certificate",
            })?;
        let first = certs.first().ok_or_else(|| TlsError::Pem {
            path: cert_path.clone(),
            what: "certificate",
        })?;
        let fingerprint = tern_core::tls::Fingerprint::of(first).to_string();
        let key_pem = read(&key_path)?;
        let key = rustls_pemfile::pkcs8_private_keys(&mut key_pem.as_slice())
            .next()
            .and_then(Result::ok)
            .map(|k: PrivatePkcs8KeyDer<'static>| PrivateKeyDer::Pkcs8(k))
            .ok_or_else(|| TlsError::Pem {
                path: key_path.clone(),
                what: "PKCS#8 private key",
            })?;
        let fp_path = dir.join("fingerprint");
        write_atomic(&fp_path, format!("{fingerprint}\n").as_bytes()).map_err(|source| TlsError::Write {
            path: fp_path,
            source,
        })?;
        Ok(Self {
            certs,
            key,
            fingerprint,
            created,
        })
    }

    /// A rustls server configuration (aws-lc-rs, TLS 1.2/1.3) offering the ALPN `protocols`.
    pub fn server_config(&self, protocols: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(tern_core::tls::provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())?;
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = TlsIdentity::load_or_create(dir.path()).unwrap();
        assert!(a.created);
        let b = TlsIdentity::load_or_create(dir.path()).unwrap();
        assert!(!b.created);
        assert_eq!(a.fingerprint, b.fingerprint);
        assert!(b.server_config(&[b"http/1.1"]).is_ok());
        let mode = std::fs::metadata(dir.path().join("key.pem")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o077,
            0
        );
    }
}
