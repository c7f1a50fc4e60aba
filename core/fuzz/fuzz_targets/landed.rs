//! Decoding arbitrary bytes as landed-extent records never panics and round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::protocol::LandedExtent;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = LandedExtent::decode_all(data) {
        let mut out = Vec::new();
        for e in &v {
            e.encode(&mut out);
        }
        assert_eq!(out, data);
    }
});
