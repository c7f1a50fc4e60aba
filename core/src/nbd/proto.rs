//! The NBD wire format: constants, encoders for what the client sends, and parsers for what the
//! server sends. No I/O and no async runtime here, so the fuzz target builds it without the
//! `nbd` feature.
//!
//! Every parser takes bytes from the network as untrusted: lengths are checked against the
//! request they answer and against fixed caps *before* anything is allocated or read, offsets
//! are checked with overflow-free arithmetic, and a violation is a [`ProtoError`], never a
//! panic. The caps:
//!
//! | what                                   | cap                                              |
//! |----------------------------------------|--------------------------------------------------|
//! | option reply payload                   | [`MAX_OPTION_REPLY`] (64 KiB)                    |
//! | `OFFSET_DATA` chunk                    | 8 + the request's length                         |
//! | `BLOCK_STATUS` chunk                   | 4 + 8 × min(request length, [`MAX_EXTENTS`])     |
//! | error chunk                            | [`MAX_ERROR_CHUNK`]                              |
//! | disjoint pieces of one read reply      | [`MAX_READ_FRAGMENTS`]                           |
//!
//! Byte layouts follow the NBD protocol specification
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>); all integers are
//! big-endian.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Bound, Range};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle handshake magic, also the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The second magic of the (unsupported) oldstyle handshake.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the server must omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`: the legacy way to enter transmission (no error reporting).
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_STARTTLS`: upgrade the connection to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_GO`: choose the export and enter transmission.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// `NBD_REP_ACK`: the option succeeded (or a list of replies is over).
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: an export description (reply to `NBD_OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`: one piece of information about the export.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`: one selected metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: the server does not know the option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`: the server's policy forbids the option.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`: the option is syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`: not supported on the server's platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`: the server requires TLS first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`: the client must request `NBD_INFO_BLOCK_SIZE`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`: the request or reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// `NBD_REP_ERR_EXT_HEADER_REQD`: the server requires extended headers.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

/// `NBD_INFO_EXPORT`: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the other flags are valid (always set).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: the server's cache is shared between connections.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_DISC`: soft disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Command flag `NBD_CMD_FLAG_REQ_ONE`: one extent per context (not used by this client).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply flag: this is the last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`: no payload, final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: a range that reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`: the request failed.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`: the request failed at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

/// `base:allocation` flag: the extent is a hole (unallocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME` flag: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The metadata context that reports allocation.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// Prefix of QEMU's dirty-bitmap metadata contexts.
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// `NBD_ESHUTDOWN`: the server is shutting down (the client must disconnect).
pub const ESHUTDOWN: u32 = 108;

/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Largest option reply payload accepted.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most extents accepted in one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (16 MiB of payload).
pub const MAX_EXTENTS: u32 = 2 * 1024 * 1024;
/// Largest error chunk accepted (a maximal message plus room for trailing fields).
pub const MAX_ERROR_CHUNK: u32 = 6 + u16::MAX as u32 + 64;
/// Most disjoint pieces one read reply may leave before it is rejected as abusive (chunks
/// arriving in order merge into one piece).
pub const MAX_READ_FRAGMENTS: usize = 1 << 16;
/// Largest read the client sends, whatever the server allows (the spec's interoperable maximum).
pub const MAX_READ_REQUEST: u32 = 32 * 1024 * 1024;
/// Length of the server's greeting: `NBDMAGIC`, `IHAVEOPT`, 16 bits of handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a request.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Length of the reply to `NBD_OPT_EXPORT_NAME` without the 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;
/// The zero bytes after the reply to `NBD_OPT_EXPORT_NAME` unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// What the server sent that breaks the protocol (or our limits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("{what} has magic {got:#x}, expected {expected:#x}")]
    BadMagic {
        what: &'static str,
        expected: u64,
        got: u64,
    },
    #[error("the server speaks the oldstyle NBD handshake, which is not supported")]
    OldStyle,
    #[error("the server does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("{what} is {got} bytes long, expected {expected}")]
    Length {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{what} of {len} bytes is not valid")]
    BadLength { what: &'static str, len: u64 },
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong { what: &'static str, len: u64, max: u64 },
    #[error("reply to option {got} while waiting for a reply to option {sent}")]
    WrongOption { sent: u32, got: u32 },
    #[error("unexpected reply {reply:#x} to {option}")]
    UnexpectedReply { option: &'static str, reply: u32 },
    #[error("{what} is not valid UTF-8 or contains NUL")]
    BadString { what: &'static str },
    #[error("invalid block sizes: minimum {min}, preferred {preferred}, maximum {max}")]
    BadBlockSizes { min: u32, preferred: u32, max: u32 },
    #[error("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")]
    MissingExportInfo,
    #[error("reply for cookie {0:#x}, which matches no request in flight")]
    UnknownCookie(u64),
    #[error("structured reply though structured replies were not negotiated")]
    UnexpectedStructured,
    #[error("simple reply to {command}, which needs a structured reply")]
    UnexpectedSimple { command: &'static str },
    #[error("chunk type {kind:#x} is not valid in a reply to {command}")]
    UnexpectedChunk { kind: u16, command: &'static str },
    #[error("NBD_REPLY_TYPE_NONE without the done flag")]
    NoneNotDone,
    #[error("error chunk with error code 0")]
    ZeroError,
    #[error("error message of {msg_len} bytes does not fit in a chunk of {len} bytes")]
    ErrorMessageLength { msg_len: u16, len: u32 },
    #[error("{what} at {start}..{end} lies outside the request {req_start}..{req_end}")]
    OutsideRequest {
        what: &'static str,
        start: u64,
        end: u64,
        req_start: u64,
        req_end: u64,
    },
    #[error("{what} at {start}..{end} overlaps data already received")]
    Overlap {
        what: &'static str,
        start: u64,
        end: u64,
    },
    #[error("zero-length {what} at {offset}")]
    Empty { what: &'static str, offset: u64 },
    #[error("read reply split into more than {MAX_READ_FRAGMENTS} disjoint pieces")]
    TooFragmented,
    #[error("read reply of {start}..{end} ends without covering {gap_start}..{gap_end}")]
    Incomplete {
        start: u64,
        end: u64,
        gap_start: u64,
        gap_end: u64,
    },
    #[error("block status extents continue after the requested range {req_start}..{req_end} was covered")]
    ExtentsPastRequest { req_start: u64, req_end: u64 },
    #[error("block status for metadata context id {0}, which was not negotiated")]
    UnknownContext(u32),
    #[error("two block status chunks for metadata context id {0} in one reply")]
    DuplicateContext(u32),
    #[error("block status reply without extents for metadata context id {0}")]
    MissingContext(u32),
    #[error("metadata context id {id} given to both {first:?} and {second:?}")]
    DuplicateContextId { id: u32, first: String, second: String },
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    let bytes = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(bytes.try_into().ok()?))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn exact(what: &'static str, buf: &[u8], expected: usize) -> Result<(), ProtoError> {
    if buf.len() == expected {
        Ok(())
    } else {
        Err(ProtoError::Length {
            what,
            got: buf.len(),
            expected,
        })
    }
}

/// A protocol string: UTF-8, no NUL, at most [`MAX_STRING`] bytes.
fn string<'a>(what: &'static str, b: &'a [u8]) -> Result<&'a str, ProtoError> {
    if b.len() > MAX_STRING {
        return Err(ProtoError::TooLong {
            what,
            len: b.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    let s = std::str::from_utf8(b).map_err(|_| ProtoError::BadString { what })?;
    if s.contains('\0') {
        return Err(ProtoError::BadString { what });
    }
    Ok(s)
}

/// A message from the server made safe to show: invalid UTF-8 and control characters replaced,
/// at most [`MAX_STRING`] bytes kept.
pub fn sanitize_message(b: &[u8]) -> String {
    let b = &b[..b.len().min(MAX_STRING)];
    String::from_utf8_lossy(b)
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// Parses the server's greeting ([`GREETING_LEN`] bytes) and returns its handshake flags.
/// Refuses the oldstyle handshake and servers without fixed newstyle.
pub fn parse_greeting(buf: &[u8]) -> Result<u16, ProtoError> {
    exact("server greeting", buf, GREETING_LEN)?;
    let magic = be_u64(buf, 0).unwrap_or_default();
    if magic != NBDMAGIC {
        return Err(ProtoError::BadMagic {
            what: "server greeting",
            expected: NBDMAGIC,
            got: magic,
        });
    }
    let second = be_u64(buf, 8).unwrap_or_default();
    if second == OLDSTYLE_MAGIC {
        return Err(ProtoError::OldStyle);
    }
    if second != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "server greeting",
            expected: IHAVEOPT,
            got: second,
        });
    }
    let flags = be_u16(buf, 16).unwrap_or_default();
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtoError::NotFixedNewstyle);
    }
    Ok(flags)
}

/// The client flags to answer a greeting with `server_flags`.
pub fn client_flags(server_flags: u16) -> u32 {
    let mut flags = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        flags |= FLAG_C_NO_ZEROES;
    }
    flags
}

/// Encodes an option: `IHAVEOPT`, the option, the data length, the data. Returns `None` when
/// the data does not fit a 32-bit length.
pub fn encode_option(option: u32, data: &[u8]) -> Option<Vec<u8>> {
    let len = u32::try_from(data.len()).ok()?;
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    Some(out)
}

fn push_string(out: &mut Vec<u8>, s: &str) -> Option<()> {
    out.extend_from_slice(&u32::try_from(s.len()).ok()?.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    Some(())
}

/// The data of `NBD_OPT_GO`: the export name and the information types requested.
pub fn encode_go(export: &str, infos: &[u16]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    push_string(&mut out, export)?;
    out.extend_from_slice(&u16::try_from(infos.len()).ok()?.to_be_bytes());
    for i in infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
    Some(out)
}

/// The data of `NBD_OPT_SET_META_CONTEXT`: the export name and the queries.
pub fn encode_set_meta_context(export: &str, queries: &[String]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    push_string(&mut out, export)?;
    out.extend_from_slice(&u32::try_from(queries.len()).ok()?.to_be_bytes());
    for q in queries {
        push_string(&mut out, q)?;
    }
    Some(out)
}

/// The header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this replies to.
    pub option: u32,
    /// The reply type (`REP_*`).
    pub reply: u32,
    /// Length of the payload that follows (at most [`MAX_OPTION_REPLY`]).
    pub len: u32,
}

impl OptionReplyHeader {
    /// True for an error reply (bit 31 set).
    pub fn is_error(&self) -> bool {
        self.reply & REP_FLAG_ERROR != 0
    }
}

/// Parses an option reply header ([`OPTION_REPLY_HEADER_LEN`] bytes) answering `sent_option`:
/// checks the magic, that it answers that option, and caps the payload length.
pub fn parse_option_reply_header(buf: &[u8], sent_option: u32) -> Result<OptionReplyHeader, ProtoError> {
    exact("option reply header", buf, OPTION_REPLY_HEADER_LEN)?;
    let magic = be_u64(buf, 0).unwrap_or_default();
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "option reply",
            expected: OPTION_REPLY_MAGIC,
            got: magic,
        });
    }
    let h = OptionReplyHeader {
        option: be_u32(buf, 8).unwrap_or_default(),
        reply: be_u32(buf, 12).unwrap_or_default(),
        len: be_u32(buf, 16).unwrap_or_default(),
    };
    if h.option != sent_option {
        return Err(ProtoError::WrongOption {
            sent: sent_option,
            got: h.option,
        });
    }
    if h.len > MAX_OPTION_REPLY {
        return Err(ProtoError::TooLong {
            what: "option reply",
            len: u64::from(h.len),
            max: u64::from(MAX_OPTION_REPLY),
        });
    }
    if h.reply == REP_ACK && h.len != 0 {
        return Err(ProtoError::BadLength {
            what: "NBD_REP_ACK payload",
            len: u64::from(h.len),
        });
    }
    Ok(h)
}

/// The block size constraints of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests must be aligned to this (a power of two, at most 64 KiB).
    pub min: u32,
    /// Requests aligned to this are efficient.
    pub preferred: u32,
    /// Largest read the server accepts (`0xffffffff`: no limit of its own).
    pub max: u32,
}

impl Default for BlockSizes {
    /// What applies when the server does not say: 1, 4 KiB, 32 MiB.
    fn default() -> Self {
        Self {
            min: 1,
            preferred: 4096,
            max: MAX_READ_REQUEST,
        }
    }
}

impl BlockSizes {
    /// Checks the constraints we rely on: the minimum is a power of two no larger than 64 KiB,
    /// the preferred size a nonzero power of two, the maximum at least the minimum and a
    /// multiple of it (or `0xffffffff`).
    pub fn validate(self) -> Result<Self, ProtoError> {
        let ok = self.min.is_power_of_two()
            && self.min <= 65536
            && self.preferred.is_power_of_two()
            && self.max >= self.min
            && (self.max == u32::MAX || self.max.is_multiple_of(self.min));
        if ok {
            Ok(self)
        } else {
            Err(ProtoError::BadBlockSizes {
                min: self.min,
                preferred: self.preferred,
                max: self.max,
            })
        }
    }

    /// Largest read request to send: the server's maximum, capped at [`MAX_READ_REQUEST`],
    /// aligned down to the minimum (never below it).
    pub fn max_read(&self) -> u32 {
        let cap = self.max.min(MAX_READ_REQUEST);
        let min = self.min.max(1);
        (cap - cap % min).max(min)
    }
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size in bytes and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags (`TFLAG_*`).
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE` (validated).
    BlockSize(BlockSizes),
    /// `NBD_INFO_NAME` (sanitized).
    Name(String),
    /// `NBD_INFO_DESCRIPTION` (sanitized).
    Description(String),
    /// An information type this client does not know (to be ignored).
    Unknown(u16),
}

/// Parses the payload of an `NBD_REP_INFO` reply.
pub fn parse_info(payload: &[u8]) -> Result<Info, ProtoError> {
    let kind = be_u16(payload, 0).ok_or(ProtoError::BadLength {
        what: "NBD_REP_INFO",
        len: payload.len() as u64,
    })?;
    let rest = &payload[2..];
    match kind {
        INFO_EXPORT => {
            exact("NBD_INFO_EXPORT", payload, 12)?;
            Ok(Info::Export {
                size: be_u64(rest, 0).unwrap_or_default(),
                flags: be_u16(rest, 8).unwrap_or_default(),
            })
        }
        INFO_BLOCK_SIZE => {
            exact("NBD_INFO_BLOCK_SIZE", payload, 14)?;
            Ok(Info::BlockSize(
                BlockSizes {
                    min: be_u32(rest, 0).unwrap_or_default(),
                    preferred: be_u32(rest, 4).unwrap_or_default(),
                    max: be_u32(rest, 8).unwrap_or_default(),
                }
                .validate()?,
            ))
        }
        INFO_NAME => Ok(Info::Name(sanitize_message(rest))),
        INFO_DESCRIPTION => Ok(Info::Description(sanitize_message(rest))),
        other => Ok(Info::Unknown(other)),
    }
}

/// Parses the payload of an `NBD_REP_META_CONTEXT` reply: the context id and its name.
pub fn parse_meta_context(payload: &[u8]) -> Result<(u32, &str), ProtoError> {
    let id = be_u32(payload, 0).ok_or(ProtoError::BadLength {
        what: "NBD_REP_META_CONTEXT",
        len: payload.len() as u64,
    })?;
    let name = string("metadata context name", &payload[4..])?;
    Ok((id, name))
}

/// Parses the reply to `NBD_OPT_EXPORT_NAME` (size and transmission flags); `buf` holds
/// [`EXPORT_NAME_REPLY_LEN`] bytes, the zero padding is read and ignored by the caller.
pub fn parse_export_name_reply(buf: &[u8]) -> Result<(u64, u16), ProtoError> {
    exact("NBD_OPT_EXPORT_NAME reply", buf, EXPORT_NAME_REPLY_LEN)?;
    Ok((
        be_u64(buf, 0).unwrap_or_default(),
        be_u16(buf, 8).unwrap_or_default(),
    ))
}

/// The name of an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an unknown option",
    }
}

/// The name of an option reply type, for messages.
pub fn reply_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (option not supported)",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (forbidden by the server's policy)",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID (invalid option)",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on the server's platform)",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (TLS required)",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (no such export)",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (server shutting down)",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD (block sizes must be negotiated)",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (request too large)",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD (extended headers required)",
        r if r & REP_FLAG_ERROR != 0 => "an unknown error reply",
        _ => "an unknown reply",
    }
}

/// An NBD error code, displayed by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub u32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            1 => "EPERM (operation not permitted)",
            5 => "EIO (input/output error)",
            12 => "ENOMEM (out of memory)",
            22 => "EINVAL (invalid argument)",
            28 => "ENOSPC (no space left)",
            75 => "EOVERFLOW (value too large)",
            95 => "ENOTSUP (not supported)",
            108 => "ESHUTDOWN (server shutting down)",
            other => return write!(f, "error {other}"),
        };
        f.write_str(name)
    }
}

/// The name of a command, for messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "NBD_CMD_READ",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "an unknown command",
    }
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command (`CMD_*`).
    pub command: u16,
    /// The cookie (handle) the replies will carry.
    pub cookie: u64,
    /// Offset in the export.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Request {
    /// The request's bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Parses a request (for test servers and the fuzz target).
    pub fn parse(buf: &[u8]) -> Result<Self, ProtoError> {
        exact("request", buf, REQUEST_LEN)?;
        let magic = be_u32(buf, 0).unwrap_or_default();
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                expected: u64::from(REQUEST_MAGIC),
                got: u64::from(magic),
            });
        }
        Ok(Self {
            flags: be_u16(buf, 4).unwrap_or_default(),
            command: be_u16(buf, 6).unwrap_or_default(),
            cookie: be_u64(buf, 8).unwrap_or_default(),
            offset: be_u64(buf, 16).unwrap_or_default(),
            len: be_u32(buf, 24).unwrap_or_default(),
        })
    }

    /// The byte range the request covers (saturating: requests we build never overflow).
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset.saturating_add(u64::from(self.len))
    }
}

/// The header of a structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Flags (`REPLY_FLAG_*`).
    pub flags: u16,
    /// Chunk type (`REPLY_TYPE_*`).
    pub kind: u16,
    /// The cookie of the request this answers.
    pub cookie: u64,
    /// Length of the payload that follows.
    pub len: u32,
}

impl ChunkHeader {
    /// True for the last chunk of a reply.
    pub fn is_done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }

    /// The header's bytes (for test servers).
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..20].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A reply header: simple or structured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: an error code (0 = success) and the cookie.
    Simple {
        /// NBD error code, 0 on success.
        error: u32,
        /// The cookie of the request this answers.
        cookie: u64,
    },
    /// A structured reply chunk.
    Structured(ChunkHeader),
}

impl ReplyHeader {
    /// The cookie of the request this answers.
    pub fn cookie(&self) -> u64 {
        match self {
            Self::Simple { cookie, .. } => *cookie,
            Self::Structured(h) => h.cookie,
        }
    }
}

/// The length of the header that starts with `magic` (the first 4 bytes of any reply), or an
/// error for an unknown magic.
pub fn reply_header_len(magic: [u8; 4]) -> Result<usize, ProtoError> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(CHUNK_HEADER_LEN),
        other => Err(ProtoError::BadMagic {
            what: "reply",
            expected: u64::from(STRUCTURED_REPLY_MAGIC),
            got: u64::from(other),
        }),
    }
}

/// Parses a whole reply header (magic included, [`SIMPLE_REPLY_LEN`] or [`CHUNK_HEADER_LEN`]
/// bytes as [`reply_header_len`] said).
pub fn parse_reply_header(buf: &[u8]) -> Result<ReplyHeader, ProtoError> {
    let magic: [u8; 4] = buf
        .get(..4)
        .and_then(|m| m.try_into().ok())
        .ok_or(ProtoError::Length {
            what: "reply header",
            got: buf.len(),
            expected: SIMPLE_REPLY_LEN,
        })?;
    let len = reply_header_len(magic)?;
    exact("reply header", buf, len)?;
    if len == SIMPLE_REPLY_LEN {
        Ok(ReplyHeader::Simple {
            error: be_u32(buf, 4).unwrap_or_default(),
            cookie: be_u64(buf, 8).unwrap_or_default(),
        })
    } else {
        Ok(ReplyHeader::Structured(ChunkHeader {
            flags: be_u16(buf, 4).unwrap_or_default(),
            kind: be_u16(buf, 6).unwrap_or_default(),
            cookie: be_u64(buf, 8).unwrap_or_default(),
            len: be_u32(buf, 16).unwrap_or_default(),
        }))
    }
}

/// Length of the payload that follows a simple reply with `error` to `request`: the data of a
/// successful read, nothing otherwise. Refuses simple replies where structured ones are due.
pub fn simple_payload_len(error: u32, request: &Request, structured: bool) -> Result<usize, ProtoError> {
    let command = command_name(request.command);
    match request.command {
        CMD_READ if structured => Err(ProtoError::UnexpectedSimple { command }),
        CMD_READ if error == 0 => Ok(request.len as usize),
        CMD_BLOCK_STATUS if error == 0 => Err(ProtoError::UnexpectedSimple { command }),
        _ => Ok(0),
    }
}

/// Checks a chunk header against the request it answers, before its payload is read: the type
/// must be valid for the command and the length within the bounds of that type and request.
/// Returns the payload length to read.
pub fn check_chunk_header(
    header: &ChunkHeader,
    request: &Request,
    structured: bool,
) -> Result<usize, ProtoError> {
    if !structured {
        return Err(ProtoError::UnexpectedStructured);
    }
    let command = command_name(request.command);
    let len = header.len;
    let bad = |what| ProtoError::BadLength {
        what,
        len: u64::from(len),
    };
    let too_long = |what, max: u64| ProtoError::TooLong {
        what,
        len: u64::from(len),
        max,
    };
    match (header.kind, request.command) {
        (REPLY_TYPE_NONE, _) => {
            if len != 0 {
                return Err(bad("NBD_REPLY_TYPE_NONE chunk"));
            }
            if !header.is_done() {
                return Err(ProtoError::NoneNotDone);
            }
        }
        (REPLY_TYPE_OFFSET_DATA, CMD_READ) => {
            let max = 8 + u64::from(request.len);
            if len <= 8 {
                return Err(bad("NBD_REPLY_TYPE_OFFSET_DATA chunk"));
            }
            if u64::from(len) > max {
                return Err(too_long("NBD_REPLY_TYPE_OFFSET_DATA chunk", max));
            }
        }
        (REPLY_TYPE_OFFSET_HOLE, CMD_READ) => {
            if len != 12 {
                return Err(bad("NBD_REPLY_TYPE_OFFSET_HOLE chunk"));
            }
        }
        (REPLY_TYPE_BLOCK_STATUS, CMD_BLOCK_STATUS) => {
            let max = 4 + 8 * u64::from(request.len.min(MAX_EXTENTS));
            if len < 12 || !(len - 4).is_multiple_of(8) {
                return Err(bad("NBD_REPLY_TYPE_BLOCK_STATUS chunk"));
            }
            if u64::from(len) > max {
                return Err(too_long("NBD_REPLY_TYPE_BLOCK_STATUS chunk", max));
            }
        }
        (kind, _) if kind & REPLY_TYPE_FLAG_ERROR != 0 => {
            let min = if kind == REPLY_TYPE_ERROR_OFFSET { 14 } else { 6 };
            if len < min {
                return Err(bad("error chunk"));
            }
            if len > MAX_ERROR_CHUNK {
                return Err(too_long("error chunk", u64::from(MAX_ERROR_CHUNK)));
            }
        }
        (kind, _) => return Err(ProtoError::UnexpectedChunk { kind, command }),
    }
    Ok(len as usize)
}

/// One parsed chunk of a structured reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk<'a> {
    /// `NBD_REPLY_TYPE_NONE`: the reply is over.
    None,
    /// Data at an absolute offset, inside the request.
    Data {
        /// Offset in the export.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// A range inside the request that reads as zeros.
    Hole {
        /// Offset in the export.
        offset: u64,
        /// Length in bytes (nonzero).
        len: u32,
    },
    /// Extents of one metadata context.
    BlockStatus(BlockStatus),
    /// An error chunk.
    Error {
        /// NBD error code (nonzero).
        error: u32,
        /// The server's message (sanitized, possibly empty).
        message: String,
        /// For `NBD_REPLY_TYPE_ERROR_OFFSET`: where, inside the request.
        offset: Option<u64>,
    },
}

/// Extents of one metadata context for a block status request, starting at the request's
/// offset, contiguous, not empty, clipped to the request's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// The context id (as negotiated).
    pub context: u32,
    /// `(range, flags)` pairs.
    pub extents: Vec<(Range<u64>, u32)>,
}

fn inside(what: &'static str, start: u64, len: u64, request: &Request) -> Result<(), ProtoError> {
    let req = request.range();
    let end = start.checked_add(len);
    match end {
        Some(end) if start >= req.start && end <= req.end => Ok(()),
        _ => Err(ProtoError::OutsideRequest {
            what,
            start,
            end: end.unwrap_or(u64::MAX),
            req_start: req.start,
            req_end: req.end,
        }),
    }
}

/// Parses a chunk's payload after [`check_chunk_header`] accepted its header: data and holes
/// must lie inside the request, extents must start at the request's offset (see
/// [`parse_block_status`]), error chunks must carry a nonzero code and a message that fits.
pub fn parse_chunk<'a>(
    header: &ChunkHeader,
    payload: &'a [u8],
    request: &Request,
) -> Result<Chunk<'a>, ProtoError> {
    exact("chunk payload", payload, header.len as usize)?;
    match header.kind {
        REPLY_TYPE_NONE => Ok(Chunk::None),
        REPLY_TYPE_OFFSET_DATA => {
            let offset = be_u64(payload, 0).ok_or(ProtoError::BadLength {
                what: "NBD_REPLY_TYPE_OFFSET_DATA chunk",
                len: payload.len() as u64,
            })?;
            let data = &payload[8..];
            if data.is_empty() {
                return Err(ProtoError::Empty {
                    what: "data chunk",
                    offset,
                });
            }
            inside("data chunk", offset, data.len() as u64, request)?;
            Ok(Chunk::Data { offset, data })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            exact("NBD_REPLY_TYPE_OFFSET_HOLE chunk", payload, 12)?;
            let offset = be_u64(payload, 0).unwrap_or_default();
            let len = be_u32(payload, 8).unwrap_or_default();
            if len == 0 {
                return Err(ProtoError::Empty {
                    what: "hole chunk",
                    offset,
                });
            }
            inside("hole chunk", offset, u64::from(len), request)?;
            Ok(Chunk::Hole { offset, len })
        }
        REPLY_TYPE_BLOCK_STATUS => Ok(Chunk::BlockStatus(parse_block_status(
            payload,
            request.offset,
            request.len,
        )?)),
        kind if kind & REPLY_TYPE_FLAG_ERROR != 0 => {
            let error = be_u32(payload, 0).unwrap_or_default();
            let msg_len = be_u16(payload, 4).unwrap_or_default();
            let fixed_tail = if kind == REPLY_TYPE_ERROR_OFFSET { 8 } else { 0 };
            let msg_end = 6 + usize::from(msg_len);
            let fits = match kind {
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => msg_end + fixed_tail == payload.len(),
                // Unknown error types may carry further fields after the message.
                _ => msg_end <= payload.len(),
            };
            if !fits {
                return Err(ProtoError::ErrorMessageLength {
                    msg_len,
                    len: header.len,
                });
            }
            if error == 0 {
                return Err(ProtoError::ZeroError);
            }
            let message = sanitize_message(&payload[6..msg_end]);
            let offset = if kind == REPLY_TYPE_ERROR_OFFSET {
                let at = be_u64(payload, msg_end).unwrap_or_default();
                inside("error offset", at, 1, request)?;
                Some(at)
            } else {
                None
            };
            Ok(Chunk::Error {
                error,
                message,
                offset,
            })
        }
        kind => Err(ProtoError::UnexpectedChunk {
            kind,
            command: command_name(request.command),
        }),
    }
}

/// Parses an `NBD_REPLY_TYPE_BLOCK_STATUS` payload answering a request for `len` bytes at
/// `offset`: a context id then `(length, flags)` descriptors. The extents start at `offset`
/// and follow each other; each is nonzero; all but the last must end before the request's end;
/// the last may go past it and is clipped.
pub fn parse_block_status(payload: &[u8], offset: u64, len: u32) -> Result<BlockStatus, ProtoError> {
    let bad = || ProtoError::BadLength {
        what: "NBD_REPLY_TYPE_BLOCK_STATUS chunk",
        len: payload.len() as u64,
    };
    if payload.len() < 12 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(bad());
    }
    let count = (payload.len() - 4) / 8;
    if count > MAX_EXTENTS as usize || count as u64 > u64::from(len) {
        return Err(ProtoError::TooLong {
            what: "block status extent list",
            len: count as u64,
            max: u64::from(len.min(MAX_EXTENTS)),
        });
    }
    let context = be_u32(payload, 0).ok_or_else(bad)?;
    let req_end = offset
        .checked_add(u64::from(len))
        .ok_or(ProtoError::OutsideRequest {
            what: "block status request",
            start: offset,
            end: u64::MAX,
            req_start: offset,
            req_end: u64::MAX,
        })?;
    let mut extents = Vec::with_capacity(count);
    let mut pos = offset;
    for i in 0..count {
        let at = 4 + 8 * i;
        let ext_len = be_u32(payload, at).ok_or_else(bad)?;
        let flags = be_u32(payload, at + 4).ok_or_else(bad)?;
        if pos >= req_end {
            return Err(ProtoError::ExtentsPastRequest {
                req_start: offset,
                req_end,
            });
        }
        if ext_len == 0 {
            return Err(ProtoError::Empty {
                what: "block status extent",
                offset: pos,
            });
        }
        let end = pos.saturating_add(u64::from(ext_len)).min(req_end);
        extents.push((pos..end, flags));
        pos = end;
    }
    Ok(BlockStatus { context, extents })
}

/// Tracks which bytes of a read request the chunks of its reply covered: every chunk must lie
/// inside the request and overlap no earlier chunk, and a successful reply must cover the
/// request exactly.
#[derive(Debug, Clone)]
pub struct ReadCoverage {
    start: u64,
    end: u64,
    /// Disjoint covered pieces, start → end; touching pieces are merged.
    pieces: BTreeMap<u64, u64>,
}

impl ReadCoverage {
    /// Coverage of `request` (nothing covered yet).
    pub fn new(request: &Request) -> Self {
        let r = request.range();
        Self {
            start: r.start,
            end: r.end,
            pieces: BTreeMap::new(),
        }
    }

    /// Records `len` bytes at `offset`, refusing what lies outside the request or overlaps.
    pub fn add(&mut self, what: &'static str, offset: u64, len: u64) -> Result<(), ProtoError> {
        if len == 0 {
            return Err(ProtoError::Empty { what, offset });
        }
        let end = match offset.checked_add(len) {
            Some(end) if offset >= self.start && end <= self.end => end,
            end => {
                return Err(ProtoError::OutsideRequest {
                    what,
                    start: offset,
                    end: end.unwrap_or(u64::MAX),
                    req_start: self.start,
                    req_end: self.end,
                });
            }
        };
        let overlap = ProtoError::Overlap {
            what,
            start: offset,
            end,
        };
        let before = self.pieces.range(..=offset).next_back().map(|(s, e)| (*s, *e));
        if let Some((_, prev_end)) = before
            && prev_end > offset
        {
            return Err(overlap);
        }
        let after = self
            .pieces
            .range((Bound::Excluded(offset), Bound::Unbounded))
            .next()
            .map(|(s, e)| (*s, *e));
        if let Some((next_start, _)) = after
            && next_start < end
        {
            return Err(overlap);
        }
        let mut new = offset..end;
        if let Some((prev_start, prev_end)) = before
            && prev_end == offset
        {
            self.pieces.remove(&prev_start);
            new.start = prev_start;
        }
        if let Some((next_start, next_end)) = after
            && next_start == end
        {
            self.pieces.remove(&next_start);
            new.end = next_end;
        }
        self.pieces.insert(new.start, new.end);
        if self.pieces.len() > MAX_READ_FRAGMENTS {
            return Err(ProtoError::TooFragmented);
        }
        Ok(())
    }

    /// True when the whole request is covered.
    pub fn is_complete(&self) -> bool {
        self.start == self.end || self.pieces.get(&self.start) == Some(&self.end)
    }

    /// Succeeds when the whole request is covered, else names the first gap.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.is_complete() {
            return Ok(());
        }
        let mut pos = self.start;
        for (s, e) in &self.pieces {
            if *s > pos {
                break;
            }
            pos = *e;
        }
        let gap_end = self
            .pieces
            .range((Bound::Excluded(pos), Bound::Unbounded))
            .next()
            .map_or(self.end, |(s, _)| *s);
        Err(ProtoError::Incomplete {
            start: self.start,
            end: self.end,
            gap_start: pos,
            gap_end,
        })
    }
}

#[cfg(test)]
mod tests;
