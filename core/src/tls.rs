//! TLS certificate pinning, shared by every client of a gateway (agent, gateway CLI, tests).
//!
//! The gateway uses a self-signed certificate made on its first start; agents pin it by the
//! SHA-256 of its DER (`sha256:<64 hex digits>`, as the gateway prints it). The verifier accepts
//! exactly that certificate, whatever name or IP address it is reached by, and still verifies
//! the handshake signatures with the aws-lc-rs provider, so only the holder of the pinned
//! certificate's key can complete a handshake.

use std::sync::{Arc, Mutex};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};

/// The SHA-256 of a certificate's DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Why a TLS setting was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("fingerprint {0:?} is not \"sha256:\" followed by 64 hex digits")]
    BadFingerprint(String),
    #[error("failed to set up TLS")]
    Config(#[source] rustls::Error),
}

/// Parses `sha256:<64 hex digits>` (upper or lower case, colons between bytes allowed).
pub fn parse_fingerprint(text: &str) -> Result<Fingerprint, TlsError> {
    let bad = || TlsError::BadFingerprint(text.to_owned());
    let hex_part = text.trim().strip_prefix("sha256:").ok_or_else(bad)?;
    let hex_part: String = hex_part.chars().filter(|c| *c != ':').collect();
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part.to_ascii_lowercase(), &mut out).map_err(|_| bad())?;
    Ok(Fingerprint(out))
}

/// The certificate presented did not have the pinned fingerprint.
#[derive(Debug, thiserror::Error)]
#[error("the server's certificate fingerprint {seen} is not the pinned {pinned}")]
pub struct FingerprintMismatch {
    /// The fingerprint of the certificate the server presented.
    pub seen: Fingerprint,
    /// The pinned fingerprint.
    pub pinned: Fingerprint,
}

/// Accepts exactly one certificate (or, in recording mode, any certificate, remembering it).
#[derive(Debug)]
pub struct PinnedVerifier {
    pinned: Option<Fingerprint>,
    seen: Mutex<Option<Fingerprint>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    /// Accepts only the certificate with `fingerprint`.
    pub fn pinned(fingerprint: Fingerprint) -> Self {
        Self::new(Some(fingerprint))
    }

    /// Accepts any certificate and remembers the last one seen: only for trust on first use,
    /// whose caller shows the fingerprint to the operator and pins it from then on.
    pub fn recording() -> Self {
        Self::new(None)
    }

    fn new(pinned: Option<Fingerprint>) -> Self {
        Self {
            pinned,
            seen: Mutex::new(None),
            algorithms: provider().signature_verification_algorithms,
        }
    }

    /// The fingerprint of the last certificate a server presented.
    pub fn last_seen(&self) -> Option<Fingerprint> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = Fingerprint::of(end_entity.as_ref());
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(seen);
        match self.pinned {
            None => Ok(ServerCertVerified::assertion()),
            Some(pinned) if pinned == seen => Ok(ServerCertVerified::assertion()),
            Some(pinned) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(FingerprintMismatch {
                    seen,
                    pinned,
                }))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The aws-lc-rs crypto provider of every Tern TLS endpoint (agent, gateway, NBD client),
/// offering AES-128-GCM first.
///
/// TLS 1.3's mandatory suite: 128-bit security, and ten AES rounds instead of fourteen on
/// every byte of a sync. AES-256-GCM and ChaCha20-Poly1305 stay offered for peers that prefer
/// them.
pub fn provider() -> CryptoProvider {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    p
}

/// A rustls client configuration that trusts only what `verifier` accepts, speaking HTTP/1.1
/// (one connection per request in flight; bodies are large).
pub fn client_config(verifier: Arc<PinnedVerifier>) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A client configuration that trusts only the certificate with `fingerprint`
/// (`sha256:<hex>`).
pub fn pinned_client_config(fingerprint: &str) -> Result<rustls::ClientConfig, TlsError> {
    client_config(Arc::new(PinnedVerifier::pinned(parse_fingerprint(fingerprint)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::server::{ClientHello, ResolvesServerCert};
    use rustls::sign::CertifiedKey;
    use rustls::{ClientConnection, ServerConnection};

    struct TestCert {
        der: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    }

    fn make_cert() -> TestCert {
        let ck = rcgen::generate_simple_self_signed(vec!["tern-gateway".to_owned()]).unwrap();
        TestCert {
            der: ck.cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der())),
        }
    }

    /// Serves `cert` but signs the handshake with `key` (which may not be the cert's key).
    #[derive(Debug)]
    struct Resolver(Arc<CertifiedKey>);
    impl ResolvesServerCert for Resolver {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    fn server_config(cert: &TestCert, key: &PrivateKeyDer<'static>) -> rustls::ServerConfig {
        let p = Arc::new(provider());
        let signing = p.key_provider.load_private_key(key.clone_key()).unwrap();
        rustls::ServerConfig::builder_with_provider(p)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(Arc::new(CertifiedKey::new(
                vec![cert.der.clone()],
                signing,
            )))))
    }

    /// Runs a TLS handshake in memory (no network). Returns the negotiated cipher suite, or
    /// the client's error.
    fn handshake(
        server: rustls::ServerConfig,
        verifier: Arc<PinnedVerifier>,
    ) -> Result<Option<rustls::CipherSuite>, rustls::Error> {
        let client_cfg = client_config(verifier).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut client = ClientConnection::new(Arc::new(client_cfg), name).unwrap();
        let mut server = ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..20 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                server.read_tls(&mut rd).unwrap();
            }
            // A server-side failure shows up as an alert the client then reports.
            let _ = server.process_new_packets();
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
            }
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(server.negotiated_cipher_suite().map(|s| s.suite()));
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn accepts_the_pinned_certificate_and_rejects_another() {
        let a = make_cert();
        let b = make_cert();
        let fa = Fingerprint::of(&a.der);
        let fb = Fingerprint::of(&b.der);
        assert_ne!(fa, fb);

        let suite = handshake(server_config(&a, &a.key), Arc::new(PinnedVerifier::pinned(fa))).unwrap();
        assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256));

        let v = Arc::new(PinnedVerifier::pinned(fa));
        let err = handshake(server_config(&b, &b.key), v.clone()).unwrap_err();
        let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = &err else {
            panic!("{err:?}");
        };
        let mismatch = other.0.downcast_ref::<FingerprintMismatch>().unwrap();
        assert_eq!((mismatch.seen, mismatch.pinned), (fb, fa));
        assert_eq!(v.last_seen(), Some(fb));
    }

    #[test]
    fn the_pinned_certificate_without_its_key_is_rejected() {
        // A server that copied the pinned certificate but not its private key.
        let a = make_cert();
        let b = make_cert();
        let err = handshake(
            server_config(&a, &b.key),
            Arc::new(PinnedVerifier::pinned(Fingerprint::of(&a.der))),
        )
        .unwrap_err();
        assert!(
            !matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Other(_))
            ),
            "{err:?}"
        );
    }

    #[test]
    fn recording_mode_remembers_the_certificate() {
        let a = make_cert();
        let v = Arc::new(PinnedVerifier::recording());
        handshake(server_config(&a, &a.key), v.clone()).unwrap();
        assert_eq!(v.last_seen(), Some(Fingerprint::of(&a.der)));
    }

    #[test]
    fn fingerprint_syntax() {
        let f = Fingerprint([0xab; 32]);
        let text = f.to_string();
        assert_eq!(text, format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(parse_fingerprint(&text).unwrap(), f);
        assert_eq!(
            parse_fingerprint(&text.to_uppercase().replace("SHA256", "sha256")).unwrap(),
            f
        );
        let colons = format!("sha256:{}", vec!["AB"; 32].join(":"));
        assert_eq!(parse_fingerprint(&colons).unwrap(), f);
        assert!(parse_fingerprint("ab".repeat(32).as_str()).is_err());
        assert!(parse_fingerprint("sha256:abc").is_err());
        assert!(parse_fingerprint("md5:00").is_err());
    }

    #[test]
    fn aes_128_gcm_is_offered_first() {
        let p = provider();
        assert_eq!(
            p.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert_eq!(
            p.cipher_suites.len(),
            rustls::crypto::aws_lc_rs::default_provider().cipher_suites.len()
        );
    }
}
