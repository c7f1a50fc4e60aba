//! Access keys for the data plane and the admin credential for the control plane.
//!
//! SigV4 needs the secret on the server side, so secrets cannot be stored as one-way hashes.
//! They are sealed with AES-256-GCM under a 32-byte master key kept in `<data_dir>/master.key`
//! (mode 0600, outside the metadata DB); the access key id is the associated data, so a sealed
//! secret cannot be moved to another key id. The admin token is stored only as its SHA-256.

use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use rand::RngCore;
use sha2::{Digest as _, Sha256};

use crate::fsutil::write_secret_atomic;

/// Why sealing or unsealing failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read master key {path}")]
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
    #[error("master key {0} is not 32 bytes")]
    MasterKey(PathBuf),
    #[error("sealed secret of key {0} cannot be opened (wrong master key or corrupted)")]
    Open(String),
}

/// The master key that seals access-key secrets.
pub struct MasterKey(LessSafeKey);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Loads `path`, creating a random key there on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretError> {
        if !path.exists() {
            let mut k = [0u8; 32];
            rand::rng().fill_bytes(&mut k);
            write_secret_atomic(path, &k).map_err(|source| SecretError::Write {
                path: path.to_owned(),
                source,
            })?;
        }
        let bytes = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?;
        let key =
            UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| SecretError::MasterKey(path.to_owned()))?;
        if bytes.len() != 32 {
            return Err(SecretError::MasterKey(path.to_owned()));
        }
        Ok(Self(LessSafeKey::new(key)))
    }

    /// Seals `secret` for `key_id`: nonce (12 bytes) followed by ciphertext and tag.
    pub fn seal(&self, key_id: &str, secret: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let mut buf = secret.as_bytes().to_vec();
        // Sealing into a Vec cannot fail for inputs this small.
        if self
            .0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key_id.as_bytes()),
                &mut buf,
            )
            .is_err()
        {
            buf.clear();
        }
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    /// Opens a sealed secret of `key_id`.
    pub fn open(&self, key_id: &str, sealed: &[u8]) -> Result<String, SecretError> {
        let err = || SecretError::Open(key_id.to_owned());
        if sealed.len() < NONCE_LEN {
            return Err(err());
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| err())?;
        let mut buf = ct.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(key_id.as_bytes()), &mut buf)
            .map_err(|_| err())?;
        String::from_utf8(plain.to_vec()).map_err(|_| err())
    }
}

const KEY_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const SECRET_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn random_string(alphabet: &[u8], len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| {
            // Rejection sampling keeps the distribution uniform.
            loop {
                let b = (rng.next_u32() & 0xff) as usize;
                if b < 256 - 256 % alphabet.len() {
                    return alphabet[b % alphabet.len()] as char;
                }
            }
        })
        .collect()
}

/// A new access key id (`TK` + 18 characters).
pub fn new_access_key_id() -> String {
    format!("TK{}", random_string(KEY_ALPHABET, 18))
}

/// A new secret access key (40 characters).
pub fn new_secret() -> String {
    random_string(SECRET_ALPHABET, 40)
}

/// A new admin token (64 hex digits).
pub fn new_admin_token() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// SHA-256 of a token, as stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Constant-time comparison of a presented token with a stored hash.
pub fn token_matches(token: &str, stored: &[u8; 32]) -> bool {
    let h = token_hash(token);
    h.iter().zip(stored.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_binding() {
        let dir = tempfile::tempdir().unwrap();
        let mk = MasterKey::load_or_create(&dir.path().join("master.key")).unwrap();
        let sealed = mk.seal("TKA", "s3cr3t");
        assert!(!sealed.windows(6).any(|w| w == b"s3cr3t"));
        assert_eq!(mk.open("TKA", &sealed).unwrap(), "s3cr3t");
        assert!(mk.open("TKB", &sealed).is_err());
        let mk2 = MasterKey::load_or_create(&dir.path().join("master.key")).unwrap();
        assert_eq!(mk2.open("TKA", &sealed).unwrap(), "s3cr3t");
        let other = MasterKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.open("TKA", &sealed).is_err());
    }

    #[test]
    fn ids_and_tokens() {
        let id = new_access_key_id();
        assert_eq!(id.len(), 20);
        assert_ne!(new_secret(), new_secret());
        let t = new_admin_token();
        assert!(token_matches(&t, &token_hash(&t)));
        assert!(!token_matches("x", &token_hash(&t)));
    }
}
