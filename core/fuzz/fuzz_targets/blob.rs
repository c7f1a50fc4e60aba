//! Chunk blobs come from the bucket: untrusted. Decoding must never panic, and must return
//! plaintext only when it hashes to the id, with and without a key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::Digest;
use tern_core::object::blob::{chunk_id, decode};
use tern_core::object::{Cipher, StoreKey};

fuzz_target!(|data: &[u8]| {
    let key = StoreKey::from_bytes(&[7; 32], Cipher::ChaCha20Poly1305);
    let id = Digest([0x5a; 32]);
    for k in [None, Some(&key)] {
        if let Ok(plain) = decode(&id, data, k) {
            assert_eq!(chunk_id(&plain, k), id);
        }
    }
});
