//! An async NBD (Network Block Device) client, to read disks exported by `qemu-nbd`, QEMU's
//! built-in NBD server (backup jobs with dirty bitmaps), `nbdkit` and other NBD servers.
//!
//! - [`proto`] (always built, no I/O): the wire format, encoders and the parsers of everything
//!   the server sends, with the checks that keep a lying server from causing a panic, an
//!   unbounded allocation or silent garbage. The fuzz target `nbd_reply` drives it.
//! - [`NbdClient`] (feature `nbd`): negotiation (fixed newstyle, `NBD_OPT_STARTTLS`,
//!   `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO`), then concurrent
//!   `NBD_CMD_READ` and `NBD_CMD_BLOCK_STATUS` over one connection, replies demultiplexed by
//!   cookie in a reader task. Clone it freely: every clone shares the connection.
//! - [`NbdUri`] / [`NbdAddr`] (feature `nbd`): `nbd://`, `nbds://`, `nbd+unix://`,
//!   `nbds+unix://` URIs.
//!
//! ```no_run
//! # async fn example() -> Result<(), tern_core::nbd::NbdError> {
//! use tern_core::nbd::{ConnectOptions, NbdClient, NbdUri};
//!
//! let uri = NbdUri::parse("nbd+unix:///vda?socket=/run/backup.sock")?;
//! let mut opts = ConnectOptions::for_uri(&uri);
//! opts.bitmaps = vec!["b0".to_owned()];
//! let nbd = NbdClient::connect(&uri.addr, &opts).await?;
//! let size = nbd.size();
//! let dirty = nbd.dirty("b0", 0..size).await?; // ranges written since b0 was created
//! let holes = nbd.holes(0..size).await?; // ranges that read as zeros
//! let mut buf = vec![0u8; 1 << 20];
//! nbd.read(0, &mut buf).await?;
//! nbd.close().await?;
//! # Ok(()) }
//! ```
//!
//! The protocol subset, limits, timeouts and how the agent uses this are in `docs/nbd.md`.

#[cfg(feature = "nbd")]
mod client;
#[cfg(feature = "nbd")]
mod error;
pub mod proto;
#[cfg(feature = "nbd")]
mod uri;

#[cfg(feature = "nbd")]
pub use client::{ConnectOptions, NbdClient};
#[cfg(feature = "nbd")]
pub use error::NbdError;
pub use proto::{BlockSizes, ProtoError, STATE_DIRTY, STATE_HOLE, STATE_ZERO};
#[cfg(feature = "nbd")]
pub use uri::{DEFAULT_PORT, NbdAddr, NbdUri};
