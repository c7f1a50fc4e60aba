use proptest::prelude::*;

use super::*;

// Encoders for what a server sends, written independently of the parsers.

fn option_reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> Vec<u8> {
    let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

fn block_status_payload(context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut b = context.to_be_bytes().to_vec();
    for (len, flags) in extents {
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
    }
    b
}

fn error_payload(error: u32, message: &[u8], offset: Option<u64>) -> Vec<u8> {
    let mut b = error.to_be_bytes().to_vec();
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message);
    if let Some(o) = offset {
        b.extend_from_slice(&o.to_be_bytes());
    }
    b
}

fn read_req(offset: u64, len: u32) -> Request {
    Request {
        flags: 0,
        command: CMD_READ,
        cookie: 7,
        offset,
        len,
    }
}

fn status_req(offset: u64, len: u32) -> Request {
    Request {
        command: CMD_BLOCK_STATUS,
        ..read_req(offset, len)
    }
}

/// Checks the header, then parses the payload, like the reader task.
fn chunk(kind: u16, flags: u16, payload: &[u8], req: &Request) -> Result<Chunk<'static>, ProtoError> {
    let payload: &'static [u8] = Box::leak(payload.to_vec().into_boxed_slice());
    let h = ChunkHeader {
        flags,
        kind,
        cookie: req.cookie,
        len: payload.len() as u32,
    };
    check_chunk_header(&h, req, true)?;
    parse_chunk(&h, payload, req)
}

#[test]
fn greeting() {
    let mut g = NBDMAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    assert_eq!(parse_greeting(&g), Ok(3));
    assert_eq!(client_flags(3), FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    assert_eq!(client_flags(1), FLAG_C_FIXED_NEWSTYLE);

    let mut not_fixed = g.clone();
    not_fixed[17] = 0;
    assert_eq!(parse_greeting(&not_fixed), Err(ProtoError::NotFixedNewstyle));
    let mut old = g.clone();
    old[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    assert_eq!(parse_greeting(&old), Err(ProtoError::OldStyle));
    let mut bad = g.clone();
    bad[0] ^= 1;
    assert!(matches!(parse_greeting(&bad), Err(ProtoError::BadMagic { .. })));
    assert!(matches!(parse_greeting(&g[..17]), Err(ProtoError::Length { .. })));
}

#[test]
fn option_reply_headers() {
    let r = option_reply(OPT_GO, REP_INFO, &[0; 12]);
    let h = parse_option_reply_header(&r[..20], OPT_GO).unwrap();
    assert_eq!(
        h,
        OptionReplyHeader {
            option: OPT_GO,
            reply: REP_INFO,
            len: 12
        }
    );
    assert!(!h.is_error());
    assert_eq!(
        parse_option_reply_header(&r[..20], OPT_STARTTLS),
        Err(ProtoError::WrongOption {
            sent: OPT_STARTTLS,
            got: OPT_GO
        })
    );
    // Payload length capped before anything is allocated.
    let mut big = option_reply(OPT_GO, REP_INFO, &[]);
    big[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        parse_option_reply_header(&big, OPT_GO),
        Err(ProtoError::TooLong { .. })
    ));
    // An ACK carries nothing.
    let ack = option_reply(OPT_GO, REP_ACK, &[1]);
    assert!(matches!(
        parse_option_reply_header(&ack[..20], OPT_GO),
        Err(ProtoError::BadLength { .. })
    ));
    let err = option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no");
    assert!(parse_option_reply_header(&err[..20], OPT_GO).unwrap().is_error());
    let mut bad = err.clone();
    bad[3] ^= 0xff;
    assert!(matches!(
        parse_option_reply_header(&bad[..20], OPT_GO),
        Err(ProtoError::BadMagic { .. })
    ));
}

#[test]
fn info_payloads() {
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&(64u64 << 20).to_be_bytes());
    export.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_READ_ONLY).to_be_bytes());
    assert_eq!(
        parse_info(&export),
        Ok(Info::Export {
            size: 64 << 20,
            flags: 3
        })
    );
    assert!(parse_info(&export[..11]).is_err());

    let sizes = |min: u32, pref: u32, max: u32| {
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [min, pref, max] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        parse_info(&b)
    };
    assert_eq!(
        sizes(512, 4096, 32 << 20),
        Ok(Info::BlockSize(BlockSizes {
            min: 512,
            preferred: 4096,
            max: 32 << 20
        }))
    );
    assert!(sizes(1, 4096, u32::MAX).is_ok());
    for (min, pref, max) in [
        (0, 4096, 4096),
        (3, 4096, 4096),
        (1 << 17, 1 << 17, 1 << 20),
        (512, 4096, 256),
        (512, 4096, 1000),
        (512, 0, 4096),
    ] {
        assert!(
            matches!(sizes(min, pref, max), Err(ProtoError::BadBlockSizes { .. })),
            "{min} {pref} {max}"
        );
    }

    let mut name = INFO_NAME.to_be_bytes().to_vec();
    name.extend_from_slice(b"vda\x07");
    assert_eq!(parse_info(&name), Ok(Info::Name("vda\u{fffd}".to_owned())));
    assert_eq!(parse_info(&[0, 99, 1, 2]), Ok(Info::Unknown(99)));
    assert!(parse_info(&[0]).is_err());
}

#[test]
fn max_read_is_capped_and_aligned() {
    let b = |min, max| BlockSizes {
        min,
        preferred: 4096,
        max,
    };
    assert_eq!(BlockSizes::default().max_read(), 32 << 20);
    assert_eq!(b(1, u32::MAX).max_read(), 32 << 20);
    assert_eq!(b(512, 1 << 20).max_read(), 1 << 20);
    assert_eq!(b(4096, 4096 * 3).max_read(), 4096 * 3);
    assert_eq!(b(65536, 65536).max_read(), 65536);
}

#[test]
fn meta_context_payloads() {
    let mut p = 5u32.to_be_bytes().to_vec();
    p.extend_from_slice(b"base:allocation");
    assert_eq!(parse_meta_context(&p), Ok((5, "base:allocation")));
    assert!(parse_meta_context(&p[..3]).is_err());
    let mut bad = 5u32.to_be_bytes().to_vec();
    bad.extend_from_slice(b"a\0b");
    assert!(matches!(
        parse_meta_context(&bad),
        Err(ProtoError::BadString { .. })
    ));
    let mut bad = 5u32.to_be_bytes().to_vec();
    bad.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(
        parse_meta_context(&bad),
        Err(ProtoError::BadString { .. })
    ));
    let mut long = 5u32.to_be_bytes().to_vec();
    long.extend_from_slice(&[b'a'; MAX_STRING + 1]);
    assert!(matches!(
        parse_meta_context(&long),
        Err(ProtoError::TooLong { .. })
    ));
}

#[test]
fn option_encoders() {
    let go = encode_go("vda", &[INFO_BLOCK_SIZE]).unwrap();
    assert_eq!(go, [0, 0, 0, 3, b'v', b'd', b'a', 0, 1, 0, 3]);
    let meta = encode_set_meta_context("e", &["base:allocation".to_owned()]).unwrap();
    let mut expect = vec![0, 0, 0, 1, b'e', 0, 0, 0, 1, 0, 0, 0, 15];
    expect.extend_from_slice(b"base:allocation");
    assert_eq!(meta, expect);
    let opt = encode_option(OPT_GO, &go).unwrap();
    assert_eq!(&opt[..8], &IHAVEOPT.to_be_bytes());
    assert_eq!(&opt[8..16], &[0, 0, 0, 7, 0, 0, 0, 11]);
    assert_eq!(&opt[16..], &go[..]);
}

#[test]
fn request_round_trip() {
    let r = Request {
        flags: CMD_FLAG_REQ_ONE,
        command: CMD_BLOCK_STATUS,
        cookie: 0x0102_0304_0506_0708,
        offset: 1 << 40,
        len: 65536,
    };
    let b = r.encode();
    assert_eq!(&b[..4], &REQUEST_MAGIC.to_be_bytes());
    assert_eq!(Request::parse(&b), Ok(r));
}

#[test]
fn reply_headers() {
    let mut simple = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    simple.extend_from_slice(&5u32.to_be_bytes());
    simple.extend_from_slice(&9u64.to_be_bytes());
    assert_eq!(reply_header_len([0x67, 0x44, 0x66, 0x98]), Ok(SIMPLE_REPLY_LEN));
    assert_eq!(
        parse_reply_header(&simple),
        Ok(ReplyHeader::Simple { error: 5, cookie: 9 })
    );
    let h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 9, 0);
    let parsed = parse_reply_header(&h).unwrap();
    assert_eq!(parsed.cookie(), 9);
    assert!(matches!(parsed, ReplyHeader::Structured(c) if c.is_done() && c.len == 0));
    assert_eq!(
        ChunkHeader {
            flags: 1,
            kind: 0,
            cookie: 9,
            len: 0
        }
        .encode()
        .to_vec(),
        h
    );
    assert!(matches!(
        reply_header_len([1, 2, 3, 4]),
        Err(ProtoError::BadMagic { .. })
    ));
    assert!(parse_reply_header(&h[..19]).is_err());
    assert!(parse_reply_header(&simple[..3]).is_err());
}

#[test]
fn simple_replies() {
    let r = read_req(0, 4096);
    assert_eq!(simple_payload_len(0, &r, false), Ok(4096));
    assert_eq!(simple_payload_len(5, &r, false), Ok(0));
    assert!(matches!(
        simple_payload_len(0, &r, true),
        Err(ProtoError::UnexpectedSimple { .. })
    ));
    assert!(matches!(
        simple_payload_len(22, &r, true),
        Err(ProtoError::UnexpectedSimple { .. })
    ));
    let s = status_req(0, 4096);
    assert_eq!(simple_payload_len(22, &s, true), Ok(0));
    assert!(simple_payload_len(0, &s, true).is_err());
}

#[test]
fn data_and_hole_chunks() {
    let r = read_req(4096, 8192);
    let mut p = 8192u64.to_be_bytes().to_vec();
    p.extend_from_slice(&[0xab; 4096]);
    assert_eq!(
        chunk(REPLY_TYPE_OFFSET_DATA, 0, &p, &r),
        Ok(Chunk::Data {
            offset: 8192,
            data: &[0xab; 4096][..]
        })
    );
    // Data past the request's end.
    let mut p = 8193u64.to_be_bytes().to_vec();
    p.extend_from_slice(&[0; 4096]);
    assert!(matches!(
        chunk(REPLY_TYPE_OFFSET_DATA, 0, &p, &r),
        Err(ProtoError::OutsideRequest { .. })
    ));
    // Data before the request's start.
    let mut p = 0u64.to_be_bytes().to_vec();
    p.extend_from_slice(&[0; 16]);
    assert!(matches!(
        chunk(REPLY_TYPE_OFFSET_DATA, 0, &p, &r),
        Err(ProtoError::OutsideRequest { .. })
    ));
    // An offset that overflows.
    let mut p = (u64::MAX - 2).to_be_bytes().to_vec();
    p.extend_from_slice(&[0; 16]);
    assert!(chunk(REPLY_TYPE_OFFSET_DATA, 0, &p, &r).is_err());
    // No data at all, or more data than asked: refused from the header alone.
    let h = |len| ChunkHeader {
        flags: 0,
        kind: REPLY_TYPE_OFFSET_DATA,
        cookie: 7,
        len,
    };
    assert!(matches!(
        check_chunk_header(&h(8), &r, true),
        Err(ProtoError::BadLength { .. })
    ));
    assert!(matches!(
        check_chunk_header(&h(8 + 8193), &r, true),
        Err(ProtoError::TooLong { .. })
    ));
    assert!(matches!(
        check_chunk_header(&h(u32::MAX), &r, true),
        Err(ProtoError::TooLong { .. })
    ));
    assert_eq!(check_chunk_header(&h(8 + 8192), &r, true), Ok(8200));
    assert_eq!(
        check_chunk_header(&h(9), &r, false),
        Err(ProtoError::UnexpectedStructured)
    );

    let hole = |offset: u64, len: u32| {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend_from_slice(&len.to_be_bytes());
        chunk(REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE, &p, &r)
    };
    assert_eq!(
        hole(4096, 8192),
        Ok(Chunk::Hole {
            offset: 4096,
            len: 8192
        })
    );
    assert!(matches!(hole(4096, 0), Err(ProtoError::Empty { .. })));
    assert!(matches!(hole(4096, 8193), Err(ProtoError::OutsideRequest { .. })));
    assert!(matches!(
        hole(u64::MAX, 1),
        Err(ProtoError::OutsideRequest { .. })
    ));
    assert!(chunk(REPLY_TYPE_OFFSET_HOLE, 0, &[0; 13], &r).is_err());
    // A data chunk answering a block status request.
    let mut p = 4096u64.to_be_bytes().to_vec();
    p.extend_from_slice(&[0; 16]);
    assert!(matches!(
        chunk(REPLY_TYPE_OFFSET_DATA, 0, &p, &status_req(4096, 8192)),
        Err(ProtoError::UnexpectedChunk { .. })
    ));
}

#[test]
fn none_and_unknown_chunks() {
    let r = read_req(0, 512);
    assert_eq!(chunk(REPLY_TYPE_NONE, REPLY_FLAG_DONE, &[], &r), Ok(Chunk::None));
    assert_eq!(chunk(REPLY_TYPE_NONE, 0, &[], &r), Err(ProtoError::NoneNotDone));
    assert!(chunk(REPLY_TYPE_NONE, REPLY_FLAG_DONE, &[0], &r).is_err());
    assert!(matches!(
        chunk(77, 0, &[], &r),
        Err(ProtoError::UnexpectedChunk { kind: 77, .. })
    ));
    // A payload that does not match the header.
    let h = ChunkHeader {
        flags: 0,
        kind: REPLY_TYPE_OFFSET_HOLE,
        cookie: 7,
        len: 12,
    };
    assert!(matches!(
        parse_chunk(&h, &[0; 11], &r),
        Err(ProtoError::Length { .. })
    ));
}

#[test]
fn error_chunks() {
    let r = read_req(4096, 4096);
    assert_eq!(
        chunk(
            REPLY_TYPE_ERROR,
            REPLY_FLAG_DONE,
            &error_payload(5, b"disk on fire", None),
            &r
        ),
        Ok(Chunk::Error {
            error: 5,
            message: "disk on fire".to_owned(),
            offset: None
        })
    );
    assert_eq!(
        chunk(REPLY_TYPE_ERROR_OFFSET, 0, &error_payload(5, b"", Some(5000)), &r),
        Ok(Chunk::Error {
            error: 5,
            message: String::new(),
            offset: Some(5000)
        })
    );
    // Offset outside the request.
    assert!(matches!(
        chunk(REPLY_TYPE_ERROR_OFFSET, 0, &error_payload(5, b"", Some(8192)), &r),
        Err(ProtoError::OutsideRequest { .. })
    ));
    // Error code 0.
    assert_eq!(
        chunk(REPLY_TYPE_ERROR, 0, &error_payload(0, b"x", None), &r),
        Err(ProtoError::ZeroError)
    );
    // Message longer than the chunk, or trailing bytes.
    let mut p = error_payload(5, b"abc", None);
    p.truncate(8);
    assert!(matches!(
        chunk(REPLY_TYPE_ERROR, 0, &p, &r),
        Err(ProtoError::ErrorMessageLength { .. })
    ));
    let mut p = error_payload(5, b"abc", None);
    p.push(0);
    assert!(matches!(
        chunk(REPLY_TYPE_ERROR, 0, &p, &r),
        Err(ProtoError::ErrorMessageLength { .. })
    ));
    // Too short, too long.
    assert!(chunk(REPLY_TYPE_ERROR, 0, &[0, 0, 0, 5, 0], &r).is_err());
    assert!(chunk(REPLY_TYPE_ERROR_OFFSET, 0, &error_payload(5, b"", None), &r).is_err());
    let h = ChunkHeader {
        flags: 0,
        kind: REPLY_TYPE_ERROR,
        cookie: 7,
        len: MAX_ERROR_CHUNK + 1,
    };
    assert!(matches!(
        check_chunk_header(&h, &r, true),
        Err(ProtoError::TooLong { .. })
    ));
    // Unknown error types are errors, with room for trailing fields.
    let mut p = error_payload(22, b"new", None);
    p.extend_from_slice(&[1, 2, 3]);
    assert_eq!(
        chunk(REPLY_TYPE_FLAG_ERROR | 9, 0, &p, &r),
        Ok(Chunk::Error {
            error: 22,
            message: "new".to_owned(),
            offset: None
        })
    );
    // Control characters never reach a log line.
    let Ok(Chunk::Error { message, .. }) =
        chunk(REPLY_TYPE_ERROR, 0, &error_payload(5, b"a\nb\x1b[31m", None), &r)
    else {
        panic!("error chunk refused");
    };
    assert!(!message.chars().any(char::is_control), "{message:?}");
    assert_eq!(Errno(5).to_string(), "EIO (input/output error)");
    assert_eq!(Errno(4242).to_string(), "error 4242");
}

#[test]
fn block_status_payloads() {
    let ok = |extents: &[(u32, u32)]| parse_block_status(&block_status_payload(3, extents), 1000, 100);
    assert_eq!(
        ok(&[(40, 1), (60, 0)]),
        Ok(BlockStatus {
            context: 3,
            extents: vec![(1000..1040, 1), (1040..1100, 0)]
        })
    );
    // Fewer than asked.
    assert_eq!(ok(&[(10, 3)]).unwrap().extents, vec![(1000..1010, 3)]);
    // The last extent may go past the request; it is clipped.
    assert_eq!(
        ok(&[(50, 0), (u32::MAX, 2)]).unwrap().extents,
        vec![(1000..1050, 0), (1050..1100, 2)]
    );
    // But nothing may follow an extent that reached the end.
    assert!(matches!(
        ok(&[(100, 0), (1, 0)]),
        Err(ProtoError::ExtentsPastRequest { .. })
    ));
    assert!(matches!(
        ok(&[(200, 0), (1, 0)]),
        Err(ProtoError::ExtentsPastRequest { .. })
    ));
    // Zero-length extents.
    assert!(matches!(ok(&[(0, 0)]), Err(ProtoError::Empty { .. })));
    assert!(matches!(ok(&[(10, 0), (0, 1)]), Err(ProtoError::Empty { .. })));
    // No extent, misaligned payloads.
    assert!(ok(&[]).is_err());
    let mut p = block_status_payload(3, &[(10, 0)]);
    p.push(0);
    assert!(parse_block_status(&p, 1000, 100).is_err());
    // More extents than bytes asked.
    assert!(matches!(
        parse_block_status(&block_status_payload(3, &[(1, 0), (1, 0), (1, 0)]), 0, 2),
        Err(ProtoError::TooLong { .. })
    ));
    // Near the end of the address space.
    assert_eq!(
        parse_block_status(&block_status_payload(1, &[(u32::MAX, 0)]), u64::MAX - 10, 10)
            .unwrap()
            .extents,
        vec![(u64::MAX - 10..u64::MAX, 0)]
    );
    assert!(parse_block_status(&block_status_payload(1, &[(1, 0)]), u64::MAX - 1, 10).is_err());
    // The header check bounds the payload by the request before it is read.
    let h = |len| ChunkHeader {
        flags: 0,
        kind: REPLY_TYPE_BLOCK_STATUS,
        cookie: 7,
        len,
    };
    let r = status_req(0, 2);
    assert_eq!(check_chunk_header(&h(4 + 16), &r, true), Ok(20));
    assert!(matches!(
        check_chunk_header(&h(4 + 24), &r, true),
        Err(ProtoError::TooLong { .. })
    ));
    assert!(check_chunk_header(&h(4), &r, true).is_err());
    assert!(check_chunk_header(&h(13), &r, true).is_err());
    assert!(check_chunk_header(&h(u32::MAX - 3), &status_req(0, u32::MAX), true).is_err());
    assert!(matches!(
        check_chunk_header(&h(12), &read_req(0, 512), true),
        Err(ProtoError::UnexpectedChunk { .. })
    ));
}

#[test]
fn read_coverage() {
    let r = read_req(1000, 100);
    let mut c = ReadCoverage::new(&r);
    assert!(!c.is_complete());
    c.add("d", 1050, 10).unwrap();
    c.add("d", 1000, 20).unwrap();
    assert_eq!(
        c.finish(),
        Err(ProtoError::Incomplete {
            start: 1000,
            end: 1100,
            gap_start: 1020,
            gap_end: 1050
        })
    );
    assert!(matches!(c.add("d", 1055, 1), Err(ProtoError::Overlap { .. })));
    assert!(matches!(c.add("d", 1040, 11), Err(ProtoError::Overlap { .. })));
    assert!(matches!(c.add("d", 1019, 2), Err(ProtoError::Overlap { .. })));
    assert!(matches!(c.add("d", 1000, 1), Err(ProtoError::Overlap { .. })));
    assert!(matches!(
        c.add("d", 990, 5),
        Err(ProtoError::OutsideRequest { .. })
    ));
    assert!(matches!(
        c.add("d", 1090, 11),
        Err(ProtoError::OutsideRequest { .. })
    ));
    assert!(matches!(
        c.add("d", u64::MAX, 2),
        Err(ProtoError::OutsideRequest { .. })
    ));
    assert!(matches!(c.add("d", 1030, 0), Err(ProtoError::Empty { .. })));
    c.add("d", 1020, 30).unwrap();
    assert_eq!(
        c.finish(),
        Err(ProtoError::Incomplete {
            start: 1000,
            end: 1100,
            gap_start: 1060,
            gap_end: 1100
        })
    );
    c.add("d", 1060, 40).unwrap();
    assert!(c.is_complete());
    assert_eq!(c.finish(), Ok(()));
    assert!(matches!(c.add("d", 1099, 1), Err(ProtoError::Overlap { .. })));

    // A gap at the start.
    let mut c = ReadCoverage::new(&r);
    c.add("d", 1010, 90).unwrap();
    assert!(matches!(
        c.finish(),
        Err(ProtoError::Incomplete {
            gap_start: 1000,
            gap_end: 1010,
            ..
        })
    ));
}

#[test]
fn read_coverage_refuses_abusive_fragmentation() {
    let r = read_req(0, 4 << 20);
    let mut c = ReadCoverage::new(&r);
    let mut result = Ok(());
    for i in 0..=MAX_READ_FRAGMENTS as u64 {
        result = c.add("d", i * 2, 1);
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(ProtoError::TooFragmented));
}

proptest! {
    #[test]
    fn coverage_accepts_any_exact_tiling_in_any_order(
        cuts in proptest::collection::btree_set(1u64..4095, 0..40),
        order in proptest::collection::vec(any::<u32>(), 0..41),
    ) {
        let r = read_req(1 << 30, 4096);
        let mut bounds: Vec<u64> = vec![0];
        bounds.extend(cuts.iter().copied());
        bounds.push(4096);
        let mut pieces: Vec<(u64, u64)> = bounds.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
        // Shuffle by the random keys.
        let mut keyed: Vec<(u32, (u64, u64))> =
            pieces.drain(..).enumerate().map(|(i, p)| (order.get(i).copied().unwrap_or(0), p)).collect();
        keyed.sort_by_key(|(k, _)| *k);
        let mut c = ReadCoverage::new(&r);
        for (_, (off, len)) in &keyed {
            prop_assert!(!c.is_complete());
            c.add("d", (1 << 30) + off, *len).unwrap();
        }
        prop_assert_eq!(c.finish(), Ok(()));
    }

    #[test]
    fn coverage_refuses_any_overlap(a in 0u64..4096, alen in 1u64..512, b in 0u64..4096, blen in 1u64..512) {
        let r = read_req(0, 8192);
        let mut c = ReadCoverage::new(&r);
        c.add("d", a, alen).unwrap();
        let overlaps = a < b + blen && b < a + alen;
        prop_assert_eq!(c.add("d", b, blen).is_err(), overlaps);
    }

    #[test]
    fn block_status_round_trip(
        offset in 0u64..(1 << 50),
        len in 1u32..(1 << 24),
        extents in proptest::collection::vec((1u32..(1 << 20), any::<u32>()), 1..50),
        context in any::<u32>(),
    ) {
        let payload = block_status_payload(context, &extents);
        match parse_block_status(&payload, offset, len) {
            Ok(bs) => {
                prop_assert_eq!(bs.context, context);
                let mut pos = offset;
                for (i, (r, flags)) in bs.extents.iter().enumerate() {
                    prop_assert_eq!(r.start, pos);
                    prop_assert!(r.end > r.start);
                    prop_assert_eq!(*flags, extents[i].1);
                    if i + 1 < extents.len() {
                        prop_assert_eq!(r.end - r.start, u64::from(extents[i].0));
                    }
                    pos = r.end;
                }
                prop_assert!(pos <= offset + u64::from(len));
                prop_assert_eq!(bs.extents.len(), extents.len());
            }
            Err(e) => {
                // Refused only when an extent other than the last reaches the end.
                let sum_but_last: u64 = extents[..extents.len() - 1].iter().map(|(l, _)| u64::from(*l)).sum();
                prop_assert!(sum_but_last >= u64::from(len) || extents.len() as u64 > u64::from(len), "{e}");
            }
        }
    }

    #[test]
    fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256), kind in any::<u16>(), flags in any::<u16>()) {
        let _ = parse_greeting(&data);
        let _ = parse_option_reply_header(&data, OPT_GO);
        let _ = parse_info(&data);
        let _ = parse_meta_context(&data);
        let _ = parse_reply_header(&data);
        for r in [read_req(4096, 256), status_req(4096, 256)] {
            let h = ChunkHeader { flags, kind, cookie: 7, len: data.len() as u32 };
            if check_chunk_header(&h, &r, true).is_ok() {
                let _ = parse_chunk(&h, &data, &r);
            }
            let _ = parse_block_status(&data, 4096, 256);
        }
    }

    #[test]
    fn error_chunk_round_trip(error in 1u32.., message in "[a-z ]{0,100}", offset in proptest::option::of(0u64..100)) {
        let r = read_req(0, 100);
        let kind = if offset.is_some() { REPLY_TYPE_ERROR_OFFSET } else { REPLY_TYPE_ERROR };
        let got = chunk(kind, REPLY_FLAG_DONE, &error_payload(error, message.as_bytes(), offset), &r);
        prop_assert_eq!(got, Ok(Chunk::Error { error, message: message.clone(), offset }));
    }
}
