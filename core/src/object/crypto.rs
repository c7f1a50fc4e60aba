//! The customer's key: chunk ids that leak nothing, and the AEAD that seals chunks.
//!
//! A key file holds 32 random bytes (64 hex digits, or the raw bytes). It stays on the
//! customer's side (agent and restore host); the gateway never sees it, which is why every
//! object the gateway must read (manifests, leases) carries no secret and why chunk ids in
//! manifests are keyed hashes. From the file's key three independent keys are derived with
//! BLAKE3's key derivation:
//!
//! - the chunk-id key: chunk id = keyed BLAKE3 of the plaintext, so equal chunks still dedup but
//!   an id says nothing about the content to someone without the key;
//! - the AEAD key (AES-256-GCM or ChaCha20-Poly1305);
//! - the key id: 8 bytes stored in every sealed blob and in the host's store config, so a wrong
//!   key is named as such instead of surfacing as a failed tag.

use std::fmt;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

const ID_CONTEXT: &str = "tern 2026-11 object-mode chunk id";
const AEAD_CONTEXT: &str = "tern 2026-11 object-mode chunk aead";
const KEY_ID_CONTEXT: &str = "tern 2026-11 object-mode key id";

/// Length of an AEAD tag.
pub const TAG_LEN: usize = 16;

/// The AEAD a store seals chunks with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cipher {
    /// AES-256 in Galois/counter mode (fast where the CPU has AES instructions).
    #[serde(rename = "aes-256-gcm")]
    Aes256Gcm,
    /// ChaCha20-Poly1305 (fast everywhere).
    #[serde(rename = "chacha20-poly1305")]
    ChaCha20Poly1305,
}

impl Cipher {
    /// Its code in a blob header.
    pub fn code(self) -> u8 {
        match self {
            Cipher::Aes256Gcm => 1,
            Cipher::ChaCha20Poly1305 => 2,
        }
    }

    /// The cipher with blob-header code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Cipher::Aes256Gcm),
            2 => Some(Cipher::ChaCha20Poly1305),
            _ => None,
        }
    }

    /// Its name in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }
}

impl std::str::FromStr for Cipher {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s {
            "aes-256-gcm" => Ok(Cipher::Aes256Gcm),
            "chacha20-poly1305" => Ok(Cipher::ChaCha20Poly1305),
            other => Err(KeyError::UnknownCipher(other.to_owned())),
        }
    }
}

/// The 8-byte id of a key, shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl std::str::FromStr for KeyId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let mut out = [0u8; 8];
        hex::decode_to_slice(s, &mut out).map_err(|_| KeyError::BadKeyId(s.to_owned()))?;
        Ok(KeyId(out))
    }
}

/// Why a key could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to read key file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write key file {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {0} must hold 32 bytes: 64 hex digits or the raw bytes")]
    Format(String),
    #[error("unknown cipher {0:?} (aes-256-gcm or chacha20-poly1305)")]
    UnknownCipher(String),
    #[error("bad key id {0:?}")]
    BadKeyId(String),
    #[error("failed to draw random bytes")]
    Random,
}

/// A loaded key: the derived keys, never the file's bytes, are kept.
pub struct StoreKey {
    cipher: Cipher,
    id_key: [u8; 32],
    aead: LessSafeKey,
    key_id: KeyId,
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreKey")
            .field("cipher", &self.cipher)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl StoreKey {
    /// Derives the keys from the 32 bytes of a key file.
    pub fn from_bytes(master: &[u8; 32], cipher: Cipher) -> Self {
        let id_key = blake3::derive_key(ID_CONTEXT, master);
        let aead_key = blake3::derive_key(AEAD_CONTEXT, master);
        let kid = blake3::derive_key(KEY_ID_CONTEXT, master);
        let alg = match cipher {
            Cipher::Aes256Gcm => &AES_256_GCM,
            Cipher::ChaCha20Poly1305 => &CHACHA20_POLY1305,
        };
        let unbound = match UnboundKey::new(alg, &aead_key) {
            Ok(k) => k,
            // Both algorithms take 32-byte keys; aws-lc cannot refuse one.
            Err(_) => unreachable!("a 32-byte key is valid for AES-256-GCM and ChaCha20-Poly1305"),
        };
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&kid[..8]);
        Self {
            cipher,
            id_key,
            aead: LessSafeKey::new(unbound),
            key_id: KeyId(key_id),
        }
    }

    /// Loads a key file: 64 hex digits (surrounding whitespace allowed) or 32 raw bytes.
    pub fn load(path: &Path, cipher: Cipher) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes, cipher, &path.display().to_string())
    }

    /// Parses a key file's content (64 hex digits, surrounding whitespace allowed, or 32 raw
    /// bytes); `name` says where it came from in an error.
    pub fn parse(bytes: &[u8], cipher: Cipher, name: &str) -> Result<Self, KeyError> {
        let mut master = [0u8; 32];
        let text = std::str::from_utf8(bytes).map(str::trim).ok();
        match text {
            Some(t) if t.len() == 64 && hex::decode_to_slice(t, &mut master).is_ok() => {}
            _ if bytes.len() == 32 => master.copy_from_slice(bytes),
            _ => return Err(KeyError::Format(name.to_owned())),
        }
        let key = Self::from_bytes(&master, cipher);
        master.fill(0);
        Ok(key)
    }

    /// Writes a new random key file (64 hex digits, mode 0600); refuses to overwrite one.
    pub fn generate(path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut master = [0u8; 32];
        aws_lc_rs::rand::fill(&mut master).map_err(|_| KeyError::Random)?;
        let text = format!("{}\n", hex::encode(master));
        master.fill(0);
        let write_err = |source| KeyError::Write {
            path: path.display().to_string(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_err)?;
        f.write_all(text.as_bytes()).map_err(write_err)?;
        f.sync_all().map_err(write_err)
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// The key's id.
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// The key of the keyed chunk-id hash.
    pub fn id_key(&self) -> &[u8; 32] {
        &self.id_key
    }

    /// Seals `in_out` in place (appending the tag) under a fresh random nonce, which is
    /// returned.
    pub(crate) fn seal(&self, aad: &[u8], in_out: &mut Vec<u8>) -> Result<[u8; NONCE_LEN], KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| KeyError::Random)?;
        self.aead
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
            .map_err(|_| KeyError::Random)?;
        Ok(nonce)
    }

    /// Opens a sealed payload (ciphertext and tag) in place; `None` when it is not authentic.
    pub(crate) fn open<'a>(
        &self,
        nonce: [u8; NONCE_LEN],
        aad: &[u8],
        in_out: &'a mut [u8],
    ) -> Option<&'a [u8]> {
        self.aead
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), in_out)
            .ok()
            .map(|p| &*p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_load_as_hex_or_raw_and_derive_distinct_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        StoreKey::generate(&p).unwrap();
        assert!(
            StoreKey::generate(&p).is_err(),
            "an existing key file is never overwritten"
        );
        let a = StoreKey::load(&p, Cipher::Aes256Gcm).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let mut raw = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut raw).unwrap();
        let raw_path = dir.path().join("raw");
        std::fs::write(&raw_path, raw).unwrap();
        let b = StoreKey::load(&raw_path, Cipher::ChaCha20Poly1305).unwrap();
        assert_eq!(a.key_id(), b.key_id());
        assert_eq!(a.id_key(), b.id_key());
        assert_ne!(&a.id_key()[..8], &a.key_id().0[..]);
        let other = StoreKey::from_bytes(&[7; 32], Cipher::Aes256Gcm);
        assert_ne!(other.key_id(), a.key_id());

        std::fs::write(p.with_extension("bad"), "not a key").unwrap();
        assert!(matches!(
            StoreKey::load(&p.with_extension("bad"), Cipher::Aes256Gcm),
            Err(KeyError::Format(_))
        ));
    }

    #[test]
    fn seal_and_open_round_trip_and_detect_tampering() {
        for cipher in [Cipher::Aes256Gcm, Cipher::ChaCha20Poly1305] {
            let k = StoreKey::from_bytes(&[1; 32], cipher);
            let mut buf = b"secret chunk".to_vec();
            let nonce = k.seal(b"aad", &mut buf).unwrap();
            assert_eq!(buf.len(), 12 + TAG_LEN);
            let mut good = buf.clone();
            assert_eq!(k.open(nonce, b"aad", &mut good).unwrap(), b"secret chunk");
            let mut bad_aad = buf.clone();
            assert!(k.open(nonce, b"other", &mut bad_aad).is_none());
            let mut flipped = buf.clone();
            flipped[3] ^= 1;
            assert!(k.open(nonce, b"aad", &mut flipped).is_none());
        }
    }
}
