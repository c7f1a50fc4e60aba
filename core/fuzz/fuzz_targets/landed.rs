//! Decoding arbitrary bytes as landed-extent records, or as a batch header and table, never
//! panics, and what decodes encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::protocol::{
    BATCH_HEADER_LEN, LandedExtent, decode_batch_header, decode_batch_table, encode_batch_table,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = LandedExtent::decode_all(data) {
        let mut out = Vec::new();
        for e in &v {
            e.encode(&mut out);
        }
        assert_eq!(out, data);
    }
    if let Some(header) = data.first_chunk::<BATCH_HEADER_LEN>()
        && let Ok(count) = decode_batch_header(header)
        && let Ok((extents, _)) = decode_batch_table(&data[BATCH_HEADER_LEN..])
        && extents.len() == count
    {
        assert_eq!(encode_batch_table(&extents), data);
    }
});
