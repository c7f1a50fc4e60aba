//! Decoding arbitrary bytes as a manifest never panics; whatever decodes re-encodes to the
//! same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        let again = m.encode().expect("a decoded manifest encodes");
        assert_eq!(again, data);
    }
});
