//! Certificate pinning shared by every Tern client of a gateway (agent, gateway CLI, tests).
//!
//! The gateway makes a self-signed certificate on first start; clients do not trust a CA but
//! the SHA-256 fingerprint of that exact certificate (`sha256:<hex of SHA-256(DER)>`). The
//! TLS handshake signatures are still verified with the provider's algorithms.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest as _, Sha256};

/// The fingerprint of a DER certificate: `sha256:` and 64 lower-case hex digits.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// Why a fingerprint string was refused.
#[derive(Debug, thiserror::Error)]
#[error("fingerprint {0:?} is not 'sha256:' followed by 64 hex digits")]
pub struct FingerprintError(pub String);

/// Normalises a fingerprint given by an operator (case, optional `:` separators).
pub fn parse_fingerprint(s: &str) -> Result<String, FingerprintError> {
    let hexpart = s
        .trim()
        .strip_prefix("sha256:")
        .ok_or_else(|| FingerprintError(s.to_owned()))?;
    let hexpart: String = hexpart
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FingerprintError(s.to_owned()));
    }
    Ok(format!("sha256:{hexpart}"))
}

/// Accepts exactly the server certificate with the pinned fingerprint.
#[derive(Debug)]
pub struct PinnedVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedVerifier {
    /// A verifier for `fingerprint` (already normalised by [`parse_fingerprint`]).
    pub fn new(fingerprint: String) -> Self {
        Self {
            fingerprint,
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        }
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
        let seen = fingerprint(end_entity);
        if seen == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "gateway certificate {seen} does not match the pinned {}",
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client configuration that trusts only the pinned certificate, with ALPN for
/// HTTP/2 and HTTP/1.1.
pub fn pinned_client_config(fingerprint: String) -> Result<rustls::ClientConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier::new(fingerprint)))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse() {
        let f = fingerprint(b"x");
        assert_eq!(
            parse_fingerprint(&f.to_uppercase().replace("SHA256", "sha256")).unwrap(),
            f
        );
        assert!(parse_fingerprint("md5:00").is_err());
        assert!(parse_fingerprint("sha256:zz").is_err());
    }
}
