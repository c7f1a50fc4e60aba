//! Parsing arbitrary bytes as an `rbd export-diff` stream never panics nor allocates from a
//! length field; whatever is accepted is a valid change map whose data ranges are exactly the
//! data handed to the writer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::changes::{ChangeKind, ChangeMap};
use tern_core::rbd_diff::{self, Expect, MemExtents};

fuzz_target!(|data: &[u8]| {
    // The first byte picks what the caller expects and whether a v1 or v2 header goes before the
    // rest (so the fuzzer spends its time on records), the rest is the stream.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let stream: Vec<u8> = match sel >> 2 & 3 {
        0 => rest.to_vec(),
        1 => [&rbd_diff::HEADER_V1[..], rest].concat(),
        _ => [&rbd_diff::HEADER_V2[..], rest].concat(),
    };
    let stream = &stream[..];
    let mut expect = if sel & 1 == 0 {
        Expect::full("b")
    } else {
        Expect::incremental("a", "b")
    };
    if sel & 2 != 0 {
        expect = expect.with_max_size(1 << 20);
    }
    let Ok((diff, extents)) = rbd_diff::parse(stream, &expect) else {
        return;
    };
    assert_eq!(diff.stream_len, stream.len() as u64);
    assert_eq!(diff.to_snap, expect.to_snap);
    assert_eq!(diff.from_snap, expect.from_snap);
    assert!(expect.max_size.is_none_or(|m| diff.size <= m));
    assert_eq!(diff.changes.size(), diff.size);
    let rebuilt = ChangeMap::from_sorted(diff.size, diff.changes.changes().iter().cloned())
        .expect("an accepted map keeps its invariants");
    assert_eq!(rebuilt, diff.changes);
    assert_eq!(extents.bytes(), diff.changes.bytes().0);
    for (off, bytes) in extents.extents() {
        let end = off + bytes.len() as u64;
        assert!(
            diff.changes
                .changes()
                .iter()
                .any(|c| c.kind == ChangeKind::Data && c.range.start <= *off && end <= c.range.end)
        );
    }
    // The streaming decoder agrees with the in-memory one.
    let mut again = MemExtents::default();
    let streamed = rbd_diff::decode(stream, &expect, &mut again).expect("same input, same answer");
    assert_eq!(streamed, diff);
    assert_eq!(again, extents);
    // Growing from any base keeps the invariants.
    let grown = diff.changes_from_base(diff.size / 2);
    assert!(ChangeMap::from_sorted(grown.size(), grown.changes().iter().cloned()).is_ok());
});
