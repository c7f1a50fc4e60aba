//! Why an NBD operation failed.

use std::sync::Arc;
use std::time::Duration;

use super::proto::{Errno, ProtoError};

/// Why an NBD operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The URI is not one of the forms in [`super::NbdUri::parse`].
    #[error("invalid NBD URI {uri:?}: {reason}")]
    Uri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The [`super::ConnectOptions`] are inconsistent.
    #[error("invalid NBD connection options: {0}")]
    Options(String),
    /// The socket could not be connected.
    #[error("failed to connect to the NBD server at {addr}")]
    Connect {
        /// The address, for the message.
        addr: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// Connecting and negotiating took longer than `ConnectOptions::connect_timeout`.
    #[error("timed out after {after:?} connecting to the NBD server at {addr}")]
    ConnectTimeout {
        /// The address, for the message.
        addr: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// Reading from or writing to the server failed.
    #[error("failed to exchange data with the NBD server")]
    Io(#[source] std::io::Error),
    /// The server closed the connection while the client expected more.
    #[error("the NBD server closed the connection")]
    ServerClosed,
    /// The server broke the protocol; the connection was dropped.
    #[error("the NBD server broke the protocol")]
    Protocol(#[from] ProtoError),
    /// TLS is required (`nbds://` or `ConnectOptions::require_tls`) but the server refused
    /// `NBD_OPT_STARTTLS`.
    #[error("the NBD server does not offer TLS, which is required (it answered {reply})")]
    TlsNotOffered {
        /// The server's reply to `NBD_OPT_STARTTLS`.
        reply: &'static str,
    },
    /// The server requires TLS but the client has no TLS configuration.
    #[error("the NBD server requires TLS: use an nbds:// URI and give a TLS configuration")]
    TlsRequired,
    /// The TLS server name is not a valid DNS name or IP address.
    #[error("{0:?} is not a valid TLS server name")]
    TlsServerName(String),
    /// The TLS handshake failed (certificate not trusted, name mismatch, ...).
    #[error("TLS handshake with the NBD server failed")]
    TlsHandshake(#[source] std::io::Error),
    /// The server has no export of that name.
    #[error("the NBD server has no export named {export:?}{}", fmt_message(message))]
    UnknownExport {
        /// The export asked for.
        export: String,
        /// The server's message, if any.
        message: String,
    },
    /// The server is shutting down.
    #[error("the NBD server is shutting down")]
    ServerShutdown,
    /// The server refused an option this client needs.
    #[error("the NBD server refused {option}: {reply}{}", fmt_message(message))]
    Refused {
        /// The option refused.
        option: &'static str,
        /// The reply type.
        reply: &'static str,
        /// The server's message, if any.
        message: String,
    },
    /// A dirty bitmap listed in `ConnectOptions::bitmaps` is not exported by the server.
    #[error("the NBD server does not export dirty bitmap '{0}'")]
    MissingBitmap(String),
    /// [`super::NbdClient::dirty`] for a bitmap not listed in `ConnectOptions::bitmaps`.
    #[error("dirty bitmap '{0}' was not requested when connecting (ConnectOptions::bitmaps)")]
    BitmapNotRequested(String),
    /// The metadata context was not negotiated (the server does not offer it, or it does not
    /// support structured replies).
    #[error("the NBD server did not agree to report metadata context {0:?}")]
    ContextUnavailable(String),
    /// The request lies (partly) past the end of the export.
    #[error("{command} of {start}..{end} is outside the export ({size} bytes)")]
    OutOfRange {
        /// The command.
        command: &'static str,
        /// Start of the range asked.
        start: u64,
        /// End of the range asked.
        end: u64,
        /// Export size.
        size: u64,
    },
    /// A read not aligned to the export's minimum block size.
    #[error("read of {len} bytes at {offset} is not aligned to the export's minimum block size {min}")]
    Unaligned {
        /// Offset asked.
        offset: u64,
        /// Length asked.
        len: u64,
        /// The minimum block size.
        min: u32,
    },
    /// The server failed the request (the connection stays usable).
    #[error("the NBD server failed {command} of {len} bytes at {offset}: {errno}{}{}",
        error_offset.map(|o| format!(" at offset {o}")).unwrap_or_default(), fmt_message(message))]
    Server {
        /// The command.
        command: &'static str,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// The NBD error code.
        errno: Errno,
        /// The server's message, if any.
        message: String,
        /// Where the error happened, when the server said.
        error_offset: Option<u64>,
    },
    /// No complete reply within `ConnectOptions::request_timeout`; the connection was closed.
    #[error("{command} timed out after {after:?}; the NBD connection was closed")]
    Timeout {
        /// The command.
        command: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// The connection was closed by [`super::NbdClient::close`].
    #[error("the NBD connection is closed")]
    Closed,
    /// The connection failed earlier (for every request in flight or issued after).
    #[error("the NBD connection failed")]
    Connection(#[source] Arc<NbdError>),
}

fn fmt_message(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(" ({message})")
    }
}

impl NbdError {
    /// True when the connection is unusable (closed, failed, timed out): a new connection may
    /// succeed. False for errors that a new connection would repeat (bad URI, unknown export,
    /// missing bitmap, TLS refused) and for a request the server failed on a live connection.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::Io(_)
            | Self::ServerClosed
            | Self::Protocol(_)
            | Self::ServerShutdown
            | Self::Timeout { .. }
            | Self::Closed => true,
            Self::Connection(inner) => inner.is_connection_lost(),
            _ => false,
        }
    }
}
