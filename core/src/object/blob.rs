//! The blob: how one chunk is stored as an object (byte layout in `docs/formats.md`).
//!
//! ```text
//! 0   4  magic "TBLB"
//! 4   1  version (1)
//! 5   1  flags: bit 0 zstd-compressed, bit 1 encrypted; other bits must be 0
//! 6   1  cipher: 0 none, 1 AES-256-GCM, 2 ChaCha20-Poly1305 (0 exactly when not encrypted)
//! 7   1  reserved, 0
//! 8   4  plaintext length, u32 little endian (1 ..= 16 MiB)
//! 12  8  key id (zeros when not encrypted)
//! 20 12  nonce (zeros when not encrypted)
//! 32  …  payload: the chunk, or its zstd frame; when encrypted, that sealed, then the 16-byte tag
//! ```
//!
//! The AEAD's associated data is the header followed by the chunk id, so a sealed blob cannot
//! be moved to another key or have its header edited. Decoding is for untrusted input: every
//! length is checked before use, decompression is bounded by the declared length, and the
//! plaintext must hash to the chunk id (keyed BLAKE3 when encrypted, BLAKE3 otherwise) before it
//! is returned.

use crate::Digest;
use crate::geometry::MAX_CHUNK_SIZE;

use super::crypto::{Cipher, KeyId, StoreKey, TAG_LEN};

/// The blob magic.
pub const BLOB_MAGIC: [u8; 4] = *b"TBLB";
/// The blob version.
pub const BLOB_VERSION: u8 = 1;
/// Header length.
pub const HEADER_LEN: usize = 32;

const FLAG_ZSTD: u8 = 1;
const FLAG_SEALED: u8 = 2;
/// Bytes sampled to decide whether a chunk is worth compressing.
const SAMPLE: usize = 64 << 10;

/// Why a blob could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlobError {
    #[error("not a chunk blob (bad magic or shorter than its header)")]
    NotABlob,
    #[error("unsupported blob version {0}")]
    Version(u8),
    #[error("invalid blob header ({0})")]
    Header(&'static str),
    #[error("the chunk is encrypted and no key was given")]
    NeedKey,
    #[error("the chunk is encrypted with key {found}, not with the given key {given}")]
    WrongKey { found: KeyId, given: KeyId },
    #[error("the chunk is not encrypted but a key was given: refusing plaintext in an encrypted store")]
    NotEncrypted,
    #[error("the chunk failed authentication (corrupted or tampered with)")]
    Authentication,
    #[error("the chunk's compressed data is corrupt")]
    Decompress,
    #[error("the chunk holds {got} bytes, its header says {expected}")]
    Length { expected: u32, got: usize },
    #[error("the chunk's content does not match its id")]
    Digest,
    #[error("failed to seal the chunk")]
    Seal,
}

/// The id of a chunk with plaintext `data`: keyed BLAKE3 under `key`'s id key, else BLAKE3.
pub fn chunk_id(data: &[u8], key: Option<&StoreKey>) -> Digest {
    match key {
        Some(k) => Digest(*blake3::keyed_hash(k.id_key(), data).as_bytes()),
        None => Digest::of(data),
    }
}

/// What [`encode`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    /// Compressed with zstd.
    pub compressed: bool,
    /// Sealed with the key.
    pub encrypted: bool,
}

/// Encodes chunk `id` with plaintext `data` (whose id the caller computed with [`chunk_id`]):
/// zstd at `level` when that saves space (`None`: never), sealed when `key` is given.
pub fn encode(
    id: &Digest,
    data: &[u8],
    key: Option<&StoreKey>,
    level: Option<i32>,
) -> Result<(Vec<u8>, Encoded), BlobError> {
    let plain_len = u32::try_from(data.len())
        .ok()
        .filter(|&n| n > 0 && n <= MAX_CHUNK_SIZE)
        .ok_or(BlobError::Header("chunk length"))?;
    let compressed = level.and_then(|l| compress(data, l));
    let mut out = Vec::with_capacity(HEADER_LEN + data.len() + TAG_LEN);
    out.extend_from_slice(&BLOB_MAGIC);
    out.push(BLOB_VERSION);
    let mut flags = 0;
    if compressed.is_some() {
        flags |= FLAG_ZSTD;
    }
    if key.is_some() {
        flags |= FLAG_SEALED;
    }
    out.push(flags);
    out.push(key.map_or(0, |k| k.cipher().code()));
    out.push(0);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&key.map_or([0; 8], |k| k.key_id().0));
    out.extend_from_slice(&[0; 12]);
    let payload = compressed.as_deref().unwrap_or(data);
    match key {
        None => out.extend_from_slice(payload),
        Some(k) => {
            let mut sealed = Vec::with_capacity(payload.len() + TAG_LEN);
            sealed.extend_from_slice(payload);
            let mut aad = [0u8; HEADER_LEN + 32];
            aad[..HEADER_LEN].copy_from_slice(&out[..HEADER_LEN]);
            aad[HEADER_LEN..].copy_from_slice(&id.0);
            // The nonce is part of the header but chosen by `seal`: authenticate the header
            // with a zero nonce field and store the nonce after. Decoding rebuilds the same
            // associated data.
            let nonce = k.seal(&aad, &mut sealed).map_err(|_| BlobError::Seal)?;
            out[20..32].copy_from_slice(&nonce);
            out.extend_from_slice(&sealed);
        }
    }
    Ok((
        out,
        Encoded {
            compressed: compressed.is_some(),
            encrypted: key.is_some(),
        },
    ))
}

/// zstd-compresses `data` when a sample shows it is worth it and the result is smaller.
fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    if data.len() > 2 * SAMPLE {
        // Incompressible data (already compressed or encrypted) costs a full compression pass
        // for nothing: try a sample first.
        let sample = &data[data.len() / 2..data.len() / 2 + SAMPLE];
        let c = zstd::bulk::compress(sample, level).ok()?;
        if c.len() * 16 > sample.len() * 15 {
            return None;
        }
    }
    let c = zstd::bulk::compress(data, level).ok()?;
    (c.len() < data.len()).then_some(c)
}

/// A decoded blob header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    /// zstd-compressed.
    pub compressed: bool,
    /// The cipher, when encrypted.
    pub cipher: Option<Cipher>,
    /// Plaintext length.
    pub plain_len: u32,
    /// The key id, when encrypted.
    pub key_id: Option<KeyId>,
    nonce: [u8; 12],
}

/// Parses and checks a blob's header.
pub fn header(blob: &[u8]) -> Result<BlobHeader, BlobError> {
    let h = blob.get(..HEADER_LEN).ok_or(BlobError::NotABlob)?;
    if h[..4] != BLOB_MAGIC {
        return Err(BlobError::NotABlob);
    }
    if h[4] != BLOB_VERSION {
        return Err(BlobError::Version(h[4]));
    }
    let flags = h[5];
    if flags & !(FLAG_ZSTD | FLAG_SEALED) != 0 {
        return Err(BlobError::Header("unknown flags"));
    }
    if h[7] != 0 {
        return Err(BlobError::Header("reserved byte"));
    }
    let sealed = flags & FLAG_SEALED != 0;
    let cipher = match (sealed, h[6]) {
        (false, 0) => None,
        (true, c) => Some(Cipher::from_code(c).ok_or(BlobError::Header("unknown cipher"))?),
        (false, _) => return Err(BlobError::Header("cipher without encryption")),
    };
    let plain_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if plain_len == 0 || plain_len > MAX_CHUNK_SIZE {
        return Err(BlobError::Header("plaintext length"));
    }
    let mut key_id = [0u8; 8];
    key_id.copy_from_slice(&h[12..20]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&h[20..32]);
    if !sealed && (key_id != [0; 8] || nonce != [0; 12]) {
        return Err(BlobError::Header("key id or nonce without encryption"));
    }
    Ok(BlobHeader {
        compressed: flags & FLAG_ZSTD != 0,
        cipher,
        plain_len,
        key_id: sealed.then_some(KeyId(key_id)),
        nonce,
    })
}

/// Decodes the blob of chunk `id` and returns its verified plaintext.
pub fn decode(id: &Digest, blob: &[u8], key: Option<&StoreKey>) -> Result<Vec<u8>, BlobError> {
    let h = header(blob)?;
    let payload = &blob[HEADER_LEN..];
    let mut opened;
    let payload: &[u8] = match (h.key_id, key) {
        (None, None) => payload,
        (None, Some(_)) => return Err(BlobError::NotEncrypted),
        (Some(_), None) => return Err(BlobError::NeedKey),
        (Some(found), Some(k)) => {
            if found != k.key_id() {
                return Err(BlobError::WrongKey {
                    found,
                    given: k.key_id(),
                });
            }
            if Some(k.cipher()) != h.cipher {
                return Err(BlobError::Header("cipher differs from the key's"));
            }
            if payload.len() < TAG_LEN {
                return Err(BlobError::Authentication);
            }
            let mut aad = [0u8; HEADER_LEN + 32];
            aad[..HEADER_LEN].copy_from_slice(&blob[..HEADER_LEN]);
            aad[20..32].fill(0);
            aad[HEADER_LEN..].copy_from_slice(&id.0);
            opened = payload.to_vec();
            let n = k
                .open(h.nonce, &aad, &mut opened)
                .ok_or(BlobError::Authentication)?
                .len();
            opened.truncate(n);
            &opened
        }
    };
    let plain = if h.compressed {
        let out = zstd::bulk::decompress(payload, h.plain_len as usize).map_err(|_| BlobError::Decompress)?;
        if out.len() != h.plain_len as usize {
            return Err(BlobError::Length {
                expected: h.plain_len,
                got: out.len(),
            });
        }
        out
    } else {
        if payload.len() != h.plain_len as usize {
            return Err(BlobError::Length {
                expected: h.plain_len,
                got: payload.len(),
            });
        }
        payload.to_vec()
    };
    if chunk_id(&plain, key) != *id {
        return Err(BlobError::Digest);
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::crypto::Cipher;
    use proptest::prelude::*;

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog. "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn compressible_chunks_shrink_and_incompressible_ones_are_stored_plain() {
        let t = text(4 << 20);
        let id = chunk_id(&t, None);
        let (blob, e) = encode(&id, &t, None, Some(3)).unwrap();
        assert!(e.compressed && !e.encrypted);
        assert!(blob.len() < t.len() / 10);
        assert_eq!(decode(&id, &blob, None).unwrap(), t);

        let r = random(4 << 20, 9);
        let id = chunk_id(&r, None);
        let (blob, e) = encode(&id, &r, None, Some(3)).unwrap();
        assert!(!e.compressed);
        assert_eq!(blob.len(), HEADER_LEN + r.len());
        assert_eq!(decode(&id, &blob, None).unwrap(), r);
    }

    #[test]
    fn sealed_blobs_hide_the_plaintext_and_name_a_wrong_key() {
        let k = StoreKey::from_bytes(&[3; 32], Cipher::Aes256Gcm);
        let t = text(1 << 20);
        let id = chunk_id(&t, Some(&k));
        assert_ne!(id, Digest::of(&t), "encrypted stores use keyed ids");
        let (blob, e) = encode(&id, &t, Some(&k), None).unwrap();
        assert!(e.encrypted && !e.compressed);
        assert!(!blob.windows(19).any(|w| w == b"the quick brown fox"));
        assert_eq!(decode(&id, &blob, Some(&k)).unwrap(), t);

        let other = StoreKey::from_bytes(&[4; 32], Cipher::Aes256Gcm);
        assert!(matches!(
            decode(&id, &blob, Some(&other)),
            Err(BlobError::WrongKey { .. })
        ));
        assert_eq!(decode(&id, &blob, None), Err(BlobError::NeedKey));
        // A blob moved under another id fails authentication.
        let moved = Digest([9; 32]);
        assert_eq!(decode(&moved, &blob, Some(&k)), Err(BlobError::Authentication));
        // Plaintext blobs are refused when a key is expected.
        let pid = chunk_id(&t, None);
        let (plain, _) = encode(&pid, &t, None, None).unwrap();
        assert_eq!(decode(&pid, &plain, Some(&k)), Err(BlobError::NotEncrypted));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_flipped_bit_and_truncation_is_rejected(
            len in 1usize..20_000,
            compress in any::<bool>(),
            cipher in prop::option::of(prop_oneof![Just(Cipher::Aes256Gcm), Just(Cipher::ChaCha20Poly1305)]),
            bit in any::<prop::sample::Index>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let data = if compress { text(len) } else { random(len, len as u64) };
            let key = cipher.map(|c| StoreKey::from_bytes(&[5; 32], c));
            let id = chunk_id(&data, key.as_ref());
            let (blob, _) = encode(&id, &data, key.as_ref(), compress.then_some(1)).unwrap();
            prop_assert_eq!(&decode(&id, &blob, key.as_ref()).unwrap(), &data);
            let mut flipped = blob.clone();
            let i = bit.index(blob.len() * 8);
            flipped[i / 8] ^= 1 << (i % 8);
            match decode(&id, &flipped, key.as_ref()) {
                Err(_) => {}
                // A zstd frame without AEAD can absorb a flip that changes no output (its window
                // descriptor, say); the digest check then proves the content is the original.
                // Sealed blobs are authenticated whole: any flip must fail.
                Ok(out) => {
                    prop_assert!(key.is_none() && compress, "a flipped bit {} was accepted", i);
                    prop_assert_eq!(&out, &data);
                }
            }
            let n = cut.index(blob.len());
            prop_assert!(decode(&id, &blob[..n], key.as_ref()).is_err());
        }
    }
}
