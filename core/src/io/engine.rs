//! What the volume layer asks of an engine: one positional operation at a time, with the
//! buffer moved in and handed back with the completion.

use std::fs::File;
use std::io;

use super::EngineKind;
use super::arena::IoBuf;
use super::portable::PortableEngine;
use super::uring::UringEngine;

/// Which descriptor of the volume an operation goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdSel {
    /// The O_DIRECT descriptor (the buffered one when the volume has no O_DIRECT).
    Direct,
    /// The buffered descriptor, for ranges not aligned for O_DIRECT.
    Buffered,
}

impl FdSel {
    /// Index in the io_uring fixed-file table.
    pub(crate) fn index(self) -> u32 {
        match self {
            FdSel::Direct => 0,
            FdSel::Buffered => 1,
        }
    }
}

/// The volume's open descriptors.
#[derive(Debug)]
pub(crate) struct Files {
    pub(crate) direct: Option<File>,
    pub(crate) buffered: File,
}

impl Files {
    pub(crate) fn get(&self, sel: FdSel) -> &File {
        match sel {
            FdSel::Direct => self.direct.as_ref().unwrap_or(&self.buffered),
            FdSel::Buffered => &self.buffered,
        }
    }
}

/// One operation. Lengths are at most 16 MiB (`MAX_IO_BUF`) and ranges lie inside `buf`.
#[derive(Debug)]
pub(crate) enum Op {
    /// `pwrite` of `buf[at..at + len]` at `offset`.
    Write {
        fd: FdSel,
        buf: IoBuf,
        at: usize,
        len: usize,
        offset: u64,
    },
    /// `pwrite` of `len` (at most `ZERO_LEN`) zero bytes from the shared zero region.
    WriteZeroes { fd: FdSel, len: usize, offset: u64 },
    /// `pread` into `buf[at..at + len]` from `offset`.
    Read {
        fd: FdSel,
        buf: IoBuf,
        at: usize,
        len: usize,
        offset: u64,
    },
    /// `fallocate(mode, offset, len)`.
    Fallocate { mode: i32, offset: u64, len: u64 },
    /// `fdatasync`.
    Fdatasync,
}

impl Op {
    /// The buffer the operation carries, if any.
    pub(crate) fn into_buf(self) -> Option<IoBuf> {
        match self {
            Op::Write { buf, .. } | Op::Read { buf, .. } => Some(buf),
            Op::WriteZeroes { .. } | Op::Fallocate { .. } | Op::Fdatasync => None,
        }
    }
}

/// The completion of an [`Op`]: its buffer back, and the byte count or the OS error.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) buf: Option<IoBuf>,
    pub(crate) res: io::Result<usize>,
}

/// The engine behind a volume.
#[derive(Debug)]
pub(crate) enum Engine {
    Uring(UringEngine),
    Portable(PortableEngine),
}

impl Engine {
    pub(crate) fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::IoUring,
            Engine::Portable(_) => EngineKind::Portable,
        }
    }

    pub(crate) async fn exec(&self, op: Op) -> Done {
        match self {
            Engine::Uring(e) => e.exec(op).await,
            Engine::Portable(e) => e.exec(op).await,
        }
    }
}
