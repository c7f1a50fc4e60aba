//! Arbitrary bytes through the NBD parsers never panic, and whatever they accept keeps the
//! invariants the client relies on: payload lengths bounded by the request, data and holes
//! inside the request and never overlapping, extents contiguous from the request's offset and
//! clipped to its end.
//!
//! Layout of an input: the whole input goes through the negotiation parsers; then byte 0
//! chooses the command (bit 0: read / block status) and whether structured replies were
//! negotiated (bit 1), bytes 1..9 the request offset, 9..13 its length, and the rest is read
//! as a stream of replies to that request, as the reader task reads them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_core::nbd::proto::{
    self, CMD_BLOCK_STATUS, CMD_READ, Chunk, ReadCoverage, ReplyHeader, Request, check_chunk_header,
    parse_chunk, parse_reply_header, reply_header_len, simple_payload_len,
};

fn negotiation(data: &[u8]) {
    let _ = proto::parse_greeting(data);
    let _ = proto::parse_info(data);
    let _ = proto::parse_meta_context(data);
    let _ = proto::parse_export_name_reply(data);
    let _ = proto::sanitize_message(data);
    let Some(header) = data.get(..proto::OPTION_REPLY_HEADER_LEN) else {
        return;
    };
    for option in [proto::OPT_STARTTLS, proto::OPT_SET_META_CONTEXT, proto::OPT_GO] {
        let Ok(h) = proto::parse_option_reply_header(header, option) else {
            continue;
        };
        assert!(h.len <= proto::MAX_OPTION_REPLY);
        let rest = &data[proto::OPTION_REPLY_HEADER_LEN..];
        let payload = &rest[..rest.len().min(h.len as usize)];
        match h.reply {
            proto::REP_INFO => {
                if let Ok(proto::Info::BlockSize(b)) = proto::parse_info(payload) {
                    assert!(b.min.is_power_of_two() && b.max >= b.min);
                    let max = b.max_read();
                    assert!(max >= b.min && max <= proto::MAX_READ_REQUEST.max(b.min) && max % b.min == 0);
                }
            }
            proto::REP_META_CONTEXT => {
                if let Ok((_, name)) = proto::parse_meta_context(payload) {
                    assert!(name.len() <= proto::MAX_STRING && !name.contains('\0'));
                }
            }
            _ => {
                let m = proto::sanitize_message(payload);
                assert!(!m.chars().any(char::is_control));
            }
        }
    }
}

fn transmission(data: &[u8]) {
    let Some(params) = data.get(..13) else {
        return;
    };
    let command = if params[0] & 1 == 0 {
        CMD_READ
    } else {
        CMD_BLOCK_STATUS
    };
    let structured = params[0] & 2 == 0;
    let offset = u64::from_be_bytes(params[1..9].try_into().unwrap_or_default());
    // The client never asks for more than 32 MiB of data, nor past the end of the address space.
    let len = u32::from_be_bytes(params[9..13].try_into().unwrap_or_default()) % (1 << 25) + 1;
    let Some(req_end) = offset.checked_add(u64::from(len)) else {
        return;
    };
    let request = Request {
        flags: 0,
        command,
        cookie: 1,
        offset,
        len,
    };
    let mut coverage = ReadCoverage::new(&request);
    let mut rest = &data[13..];
    let _ = proto::parse_block_status(rest, offset, len);
    while let Some(magic) = rest.get(..4) {
        let Ok(header_len) = reply_header_len([magic[0], magic[1], magic[2], magic[3]]) else {
            return;
        };
        let Some(header) = rest.get(..header_len) else {
            return;
        };
        let header = parse_reply_header(header).expect("a header of the length its magic says parses");
        rest = &rest[header_len..];
        match header {
            ReplyHeader::Simple { error, .. } => {
                if let Ok(n) = simple_payload_len(error, &request, structured) {
                    assert!(n as u64 <= u64::from(len));
                }
                return;
            }
            ReplyHeader::Structured(h) => {
                let Ok(n) = check_chunk_header(&h, &request, structured) else {
                    return;
                };
                let content = match command {
                    CMD_READ => 8 + u64::from(len),
                    _ => 4 + 8 * u64::from(len.min(proto::MAX_EXTENTS)),
                };
                let bound = content.max(u64::from(proto::MAX_ERROR_CHUNK));
                assert!(
                    n as u64 <= bound,
                    "payload of {n} bytes allowed for a request of {len}"
                );
                let Some(payload) = rest.get(..n) else {
                    return;
                };
                rest = &rest[n..];
                match parse_chunk(&h, payload, &request) {
                    Ok(Chunk::Data { offset: at, data }) => {
                        assert!(at >= offset && at + data.len() as u64 <= req_end && !data.is_empty());
                        if coverage.add("data", at, data.len() as u64).is_err() {
                            return;
                        }
                    }
                    Ok(Chunk::Hole { offset: at, len: n }) => {
                        assert!(at >= offset && at + u64::from(n) <= req_end && n > 0);
                        if coverage.add("hole", at, u64::from(n)).is_err() {
                            return;
                        }
                    }
                    Ok(Chunk::BlockStatus(bs)) => {
                        let mut pos = offset;
                        for (r, _) in &bs.extents {
                            assert!(r.start == pos && r.end > r.start && r.end <= req_end);
                            pos = r.end;
                        }
                        assert!(!bs.extents.is_empty());
                    }
                    Ok(Chunk::Error {
                        error,
                        message,
                        offset: at,
                    }) => {
                        assert!(error != 0 && message.len() <= 3 * proto::MAX_STRING);
                        if let Some(at) = at {
                            assert!(at >= offset && at < req_end);
                        }
                    }
                    Ok(Chunk::None) => assert!(h.is_done()),
                    Err(_) => return,
                }
                if h.is_done() {
                    if coverage.finish().is_ok() && command == CMD_READ {
                        assert!(coverage.is_complete());
                    }
                    return;
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    negotiation(data);
    transmission(data);
});
