//! Block I/O engines: how the gateway writes volumes and the restore code writes disks.
//!
//! - [`Volume::open`] (in `factory.rs`) is the single entry point: it [`resolve`]s the engine
//!   (io_uring when it works, else the portable engine; `TERN_IO_ENGINE` forces one), opens the
//!   file or block device (O_DIRECT where `statx` says it is supported, plus a buffered
//!   descriptor for unaligned ranges) and logs once which engine and mode it uses.
//! - Buffers are owned: [`Volume::alloc`] hands out an [`IoBuf`] from the volume's arena
//!   (waiting while it is full: backpressure), which is moved into the engine for each
//!   operation and handed back with the completion.
//! - `uring.rs`: one ring and one I/O thread per volume, fixed files and one fixed buffer.
//!   `portable.rs`: positional syscalls on tokio's blocking threads.
//! - [`clone_file`]: reflink, else sparse copy. [`AlignedBuf`]: a 4096-aligned heap buffer.
//!
//! See `docs/io-engines.md`.

mod arena;
mod buf;
mod clone;
mod config;
mod engine;
mod error;
mod factory;
mod portable;
mod uring;
mod volume;

#[cfg(test)]
mod tests;

use std::io;

pub use arena::IoBuf;
pub use buf::{ALIGN, AlignedBuf};
pub use clone::{CloneMethod, clone_file, sparse_copy};
pub use config::{
    DEFAULT_BUFFER_BYTES, DEFAULT_QUEUE_DEPTH, EngineChoice, EngineConfig, EngineKind, MAX_BUFFER_BYTES,
    MAX_IO_BUF, MAX_QUEUE_DEPTH,
};
pub use error::{IoError, IoErrorKind};
pub use factory::{ENGINE_ENV, engine_in_use, resolve};
pub use uring::probe_io_uring;
pub use volume::Volume;

/// Runs a blocking call off the async threads: tokio's blocking pool when in a runtime, else a
/// short-lived thread.
pub(crate) async fn run_blocking<T, F>(f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h
            .spawn_blocking(f)
            .await
            .unwrap_or_else(|_| Err(error::engine_stopped())),
        Err(_) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(f());
            });
            rx.await.unwrap_or_else(|_| Err(error::engine_stopped()))
        }
    }
}
