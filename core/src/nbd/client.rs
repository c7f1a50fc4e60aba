//! The async NBD client: negotiation, then one reader task that demultiplexes replies by cookie
//! and one writer task that batches requests, shared by every clone of [`NbdClient`].
//!
//! A request registers itself in the pending table (with a permit of the in-flight limit)
//! *before* its header is queued for the writer, so a reply can never arrive for a request the
//! reader does not know. The reader checks every reply against the request it answers (see
//! [`super::proto`]) and forwards the parsed chunks to the request's channel; the chunk with
//! the done flag removes the request from the table and releases its permit. Any violation of
//! the protocol, I/O error, or request timeout fails the whole connection: every request in
//! flight and every later one gets [`NbdError::Connection`] with the cause.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{Instrument as _, debug, warn};

use super::proto::{
    self, BlockSizes, Chunk, OptionReplyHeader, ProtoError, ReadCoverage, ReplyHeader, Request,
};
use super::{NbdAddr, NbdError, NbdUri};

/// Reads of one [`NbdClient::read`] call kept in flight at once when it is split.
const READ_WINDOW: usize = 4;
/// Most replies accepted to one option (`NBD_REP_INFO` or `NBD_REP_META_CONTEXT` lists).
const MAX_OPTION_REPLIES: usize = 1024;
/// How long a refused negotiation waits to send `NBD_OPT_ABORT`.
const ABORT_TIMEOUT: Duration = Duration::from_secs(1);

/// How to connect to an export.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The export name (`""`: the server's default export).
    pub export: String,
    /// Dirty bitmaps to negotiate (`qemu:dirty-bitmap:NAME` contexts). Each one is required:
    /// connecting fails with [`NbdError::MissingBitmap`] when the server does not export it.
    pub bitmaps: Vec<String>,
    /// TLS configuration (trusted roots, client certificate). When given, the client asks for
    /// TLS with `NBD_OPT_STARTTLS` before any other option.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The name to verify the server's certificate against (default: the URI's host; for a
    /// unix socket or a caller-supplied stream, `localhost`).
    pub tls_server_name: Option<String>,
    /// Refuse a server that does not agree to TLS (set by `nbds` URIs). Without it, a server
    /// refusing `NBD_OPT_STARTTLS` is used in plain text (with a warning).
    pub require_tls: bool,
    /// Limit for connecting and the whole negotiation (TLS included).
    pub connect_timeout: Duration,
    /// Limit for one request, from when it is queued to its last reply chunk. A request that
    /// times out closes the connection (the server is presumed dead).
    pub request_timeout: Duration,
    /// Most requests in flight on the connection (from all clones together).
    pub max_in_flight: usize,
}

impl ConnectOptions {
    /// Default [`ConnectOptions::connect_timeout`].
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default [`ConnectOptions::request_timeout`].
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
    /// Default [`ConnectOptions::max_in_flight`].
    pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;

    /// Options for `export` with the defaults.
    pub fn new(export: impl Into<String>) -> Self {
        Self {
            export: export.into(),
            bitmaps: Vec::new(),
            tls: None,
            tls_server_name: None,
            require_tls: false,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_in_flight: Self::DEFAULT_MAX_IN_FLIGHT,
        }
    }

    /// Options for the export of `uri`, requiring TLS for `nbds` URIs (the caller still has
    /// to set [`ConnectOptions::tls`]).
    pub fn for_uri(uri: &NbdUri) -> Self {
        let mut o = Self::new(uri.export.clone());
        o.require_tls = uri.tls;
        o
    }

    fn validate(&self) -> Result<(), NbdError> {
        let bad = |m: String| Err(NbdError::Options(m));
        if self.export.len() > proto::MAX_STRING || self.export.contains('\0') {
            return bad("the export name is longer than 4096 bytes or contains NUL".to_owned());
        }
        for b in &self.bitmaps {
            if b.is_empty()
                || b.contains('\0')
                || proto::CONTEXT_DIRTY_BITMAP_PREFIX.len() + b.len() > proto::MAX_STRING
            {
                return bad(format!("invalid dirty bitmap name {b:?}"));
            }
        }
        if self.require_tls && self.tls.is_none() {
            return bad("TLS is required but no TLS configuration was given".to_owned());
        }
        if self.max_in_flight == 0 || self.max_in_flight > Semaphore::MAX_PERMITS {
            return bad(format!("max_in_flight {} is out of range", self.max_in_flight));
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return bad("timeouts must not be zero".to_owned());
        }
        Ok(())
    }
}

impl Default for ConnectOptions {
    /// The default export with default limits.
    fn default() -> Self {
        Self::new("")
    }
}

/// The context name of dirty bitmap `bitmap`.
fn bitmap_context(bitmap: &str) -> String {
    format!("{}{bitmap}", proto::CONTEXT_DIRTY_BITMAP_PREFIX)
}

/// What the negotiation settled.
#[derive(Debug)]
struct Export {
    name: String,
    size: u64,
    flags: u16,
    block_sizes: BlockSizes,
    structured: bool,
    tls: bool,
    /// Negotiated metadata contexts: name and id.
    contexts: Vec<(String, u32)>,
    /// Bitmaps asked for in [`ConnectOptions::bitmaps`].
    bitmaps: Vec<String>,
}

/// A connected NBD export. Cheap to clone; all clones share one connection, and requests
/// from any number of tasks run concurrently over it.
#[derive(Debug, Clone)]
pub struct NbdClient {
    inner: Arc<Inner>,
}

struct Inner {
    export: Export,
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<WriterMsg>,
    reader: Mutex<Option<JoinHandle<()>>>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export", &self.export.name)
            .field("size", &self.export.size)
            .field("tls", &self.export.tls)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let already = {
            let mut st = self.shared.lock();
            let already = st.closing || st.dead.is_some();
            st.closing = true;
            already
        };
        if !already {
            // Best effort soft disconnect; the writer task exits after sending it.
            let _ = self.writer.send(WriterMsg::Disconnect(None));
        }
        if let Some(reader) = self.reader.lock().unwrap_or_else(PoisonError::into_inner).take() {
            reader.abort();
        }
    }
}

/// State shared by the client handles and the reader and writer tasks.
struct Shared {
    state: Mutex<State>,
    permits: Arc<Semaphore>,
    tasks: Mutex<Vec<AbortHandle>>,
    next_cookie: AtomicU64,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    /// Why the connection failed, once it did.
    dead: Option<Arc<NbdError>>,
    /// `NBD_CMD_DISC` sent or about to be: no new requests.
    closing: bool,
}

struct Pending {
    request: Request,
    tx: mpsc::UnboundedSender<Event>,
    _permit: OwnedSemaphorePermit,
}

/// What the reader forwards to the task waiting for a request.
enum Event {
    Data {
        offset: u64,
        data: Bytes,
    },
    Hole {
        offset: u64,
        len: u32,
    },
    Extents(proto::BlockStatus),
    Error {
        errno: u32,
        message: String,
        offset: Option<u64>,
    },
    Done,
    Failed(Arc<NbdError>),
}

enum WriterMsg {
    Request([u8; proto::REQUEST_LEN]),
    /// Send `NBD_CMD_DISC`, shut the connection down, report, exit.
    Disconnect(Option<oneshot::Sender<Result<(), NbdError>>>),
}

impl Shared {
    fn new(max_in_flight: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            permits: Arc::new(Semaphore::new(max_in_flight)),
            tasks: Mutex::new(Vec::new()),
            next_cookie: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error for a request on a connection that cannot take it.
    fn unusable(&self) -> NbdError {
        match &self.lock().dead {
            Some(e) => NbdError::Connection(e.clone()),
            None => NbdError::Closed,
        }
    }

    /// Marks the connection failed (once), fails every request in flight and stops the tasks.
    fn fail(&self, err: NbdError) -> Arc<NbdError> {
        let (err, pending) = {
            let mut st = self.lock();
            if let Some(e) = &st.dead {
                return e.clone();
            }
            let err = Arc::new(err);
            st.dead = Some(err.clone());
            (err, std::mem::take(&mut st.pending))
        };
        warn!(error = %crate::ErrorChain(&*err), in_flight = pending.len(), "NBD connection failed");
        for p in pending.into_values() {
            let _ = p.tx.send(Event::Failed(err.clone()));
        }
        self.permits.close();
        self.abort_tasks();
        err
    }

    fn abort_tasks(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
    }
}

/// Any byte stream the client can run over (TCP, unix socket, TLS, test pipes).
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + ?Sized> Io for T {}

fn io_error(e: std::io::Error) -> NbdError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        NbdError::ServerClosed
    } else {
        NbdError::Io(e)
    }
}

async fn read_exact<R: AsyncRead + Unpin + ?Sized>(r: &mut R, buf: &mut [u8]) -> Result<(), NbdError> {
    r.read_exact(buf).await.map(|_| ()).map_err(io_error)
}

async fn send_option(io: &mut Box<dyn Io>, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let msg = proto::encode_option(option, data)
        .ok_or_else(|| NbdError::Options("option data longer than 4 GiB".to_owned()))?;
    io.write_all(&msg).await.map_err(io_error)?;
    io.flush().await.map_err(io_error)
}

async fn read_option_reply(
    io: &mut Box<dyn Io>,
    option: u32,
) -> Result<(OptionReplyHeader, Vec<u8>), NbdError> {
    let mut hdr = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    read_exact(io, &mut hdr).await?;
    let h = proto::parse_option_reply_header(&hdr, option)?;
    // Bounded by MAX_OPTION_REPLY.
    let mut payload = vec![0u8; h.len as usize];
    read_exact(io, &mut payload).await?;
    Ok((h, payload))
}

/// Best effort `NBD_OPT_ABORT` after the server refused something (a soft disconnect, as the
/// protocol asks of clients that give up during negotiation).
async fn abort_negotiation(io: &mut Box<dyn Io>) {
    let _ = tokio::time::timeout(ABORT_TIMEOUT, async {
        send_option(io, proto::OPT_ABORT, &[]).await?;
        io.shutdown().await.map_err(io_error)
    })
    .await;
}

/// The error for a refused option (`h` is an error reply).
fn refusal(option: u32, h: &OptionReplyHeader, payload: &[u8], export: &str) -> NbdError {
    let message = proto::sanitize_message(payload);
    match h.reply {
        proto::REP_ERR_UNKNOWN => NbdError::UnknownExport {
            export: export.to_owned(),
            message,
        },
        proto::REP_ERR_TLS_REQD => NbdError::TlsRequired,
        proto::REP_ERR_SHUTDOWN => NbdError::ServerShutdown,
        reply => NbdError::Refused {
            option: proto::option_name(option),
            reply: proto::reply_name(reply),
            message,
        },
    }
}

/// True when a refusal of an optional option still ends the negotiation.
fn refusal_is_fatal(h: &OptionReplyHeader) -> bool {
    matches!(
        h.reply,
        proto::REP_ERR_UNKNOWN | proto::REP_ERR_TLS_REQD | proto::REP_ERR_SHUTDOWN
    )
}

fn unexpected(option: u32, h: &OptionReplyHeader) -> NbdError {
    NbdError::Protocol(ProtoError::UnexpectedReply {
        option: proto::option_name(option),
        reply: h.reply,
    })
}

impl NbdClient {
    /// Connects to `addr` and negotiates the export of `opts` (see the module docs of
    /// [`super`] for what is negotiated). The whole of it is bounded by
    /// [`ConnectOptions::connect_timeout`].
    pub async fn connect(addr: &NbdAddr, opts: &ConnectOptions) -> Result<NbdClient, NbdError> {
        opts.validate()?;
        let addr_text = addr.to_string();
        let connect = async {
            let connect_error = |source| NbdError::Connect {
                addr: addr_text.clone(),
                source,
            };
            let (io, server_name): (Box<dyn Io>, &str) = match addr {
                NbdAddr::Tcp { host, port } => {
                    let s = TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(connect_error)?;
                    // Requests are small; don't let Nagle hold them back.
                    s.set_nodelay(true).map_err(connect_error)?;
                    (Box::new(s), host.as_str())
                }
                NbdAddr::Unix(path) => (
                    Box::new(UnixStream::connect(path).await.map_err(connect_error)?),
                    "localhost",
                ),
            };
            Self::negotiate(io, server_name, opts).await
        };
        match tokio::time::timeout(opts.connect_timeout, connect).await {
            Ok(r) => r,
            Err(_) => Err(NbdError::ConnectTimeout {
                addr: addr_text,
                after: opts.connect_timeout,
            }),
        }
    }

    /// Parses `uri` ([`NbdUri::parse`]) and connects to its export with default options, `tls`
    /// (required for `nbds` URIs) and `bitmaps`.
    pub async fn connect_uri(
        uri: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        bitmaps: &[String],
    ) -> Result<NbdClient, NbdError> {
        let uri = NbdUri::parse(uri)?;
        let mut opts = ConnectOptions::for_uri(&uri);
        opts.tls = tls;
        opts.bitmaps = bitmaps.to_vec();
        Self::connect(&uri.addr, &opts).await
    }

    /// Negotiates over an already connected stream (a tunnel, a test pipe). TLS verifies the
    /// server as [`ConnectOptions::tls_server_name`] or `localhost`.
    pub async fn connect_stream<S>(stream: S, opts: &ConnectOptions) -> Result<NbdClient, NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        opts.validate()?;
        match tokio::time::timeout(
            opts.connect_timeout,
            Self::negotiate(Box::new(stream), "localhost", opts),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(NbdError::ConnectTimeout {
                addr: "a caller-supplied stream".to_owned(),
                after: opts.connect_timeout,
            }),
        }
    }

    async fn negotiate(
        mut io: Box<dyn Io>,
        server_name: &str,
        opts: &ConnectOptions,
    ) -> Result<NbdClient, NbdError> {
        let mut greeting = [0u8; proto::GREETING_LEN];
        read_exact(&mut io, &mut greeting).await?;
        let server_flags = proto::parse_greeting(&greeting)?;
        let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
        io.write_all(&proto::client_flags(server_flags).to_be_bytes())
            .await
            .map_err(io_error)?;

        let mut tls = false;
        if let Some(config) = &opts.tls {
            send_option(&mut io, proto::OPT_STARTTLS, &[]).await?;
            let (h, _) = read_option_reply(&mut io, proto::OPT_STARTTLS).await?;
            if h.reply == proto::REP_ACK {
                let name = opts.tls_server_name.as_deref().unwrap_or(server_name).to_owned();
                let server_name =
                    ServerName::try_from(name.clone()).map_err(|_| NbdError::TlsServerName(name))?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(server_name, io)
                    .await
                    .map_err(NbdError::TlsHandshake)?;
                io = Box::new(stream);
                tls = true;
            } else if h.is_error() {
                if opts.require_tls {
                    abort_negotiation(&mut io).await;
                    return Err(NbdError::TlsNotOffered {
                        reply: proto::reply_name(h.reply),
                    });
                }
                warn!(
                    reply = proto::reply_name(h.reply),
                    "the NBD server refused TLS; continuing in plain text"
                );
            } else {
                return Err(unexpected(proto::OPT_STARTTLS, &h));
            }
        }

        send_option(&mut io, proto::OPT_STRUCTURED_REPLY, &[]).await?;
        let (h, payload) = read_option_reply(&mut io, proto::OPT_STRUCTURED_REPLY).await?;
        let structured = match h.reply {
            proto::REP_ACK => true,
            _ if h.is_error() && refusal_is_fatal(&h) => {
                return Err(refusal(proto::OPT_STRUCTURED_REPLY, &h, &payload, &opts.export));
            }
            _ if h.is_error() => {
                debug!(
                    reply = proto::reply_name(h.reply),
                    "the NBD server refused structured replies"
                );
                false
            }
            _ => return Err(unexpected(proto::OPT_STRUCTURED_REPLY, &h)),
        };

        let contexts = if structured {
            Self::negotiate_contexts(&mut io, opts).await?
        } else {
            Vec::new()
        };
        for b in &opts.bitmaps {
            let name = bitmap_context(b);
            if !contexts.iter().any(|(n, _)| *n == name) {
                abort_negotiation(&mut io).await;
                return Err(NbdError::MissingBitmap(b.clone()));
            }
        }

        let (size, flags, block_sizes) = Self::go(&mut io, opts, no_zeroes).await?;
        let export = Export {
            name: opts.export.clone(),
            size,
            flags,
            block_sizes,
            structured,
            tls,
            contexts,
            bitmaps: opts.bitmaps.clone(),
        };
        debug!(
            export = %export.name,
            size,
            flags,
            min_block = block_sizes.min,
            max_block = block_sizes.max,
            structured,
            tls,
            contexts = ?export.contexts,
            "NBD export opened"
        );
        Ok(Self::start(io, export, opts))
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation` and the bitmaps; returns what the
    /// server selected (only names asked for).
    async fn negotiate_contexts(
        io: &mut Box<dyn Io>,
        opts: &ConnectOptions,
    ) -> Result<Vec<(String, u32)>, NbdError> {
        let mut queries = vec![proto::CONTEXT_BASE_ALLOCATION.to_owned()];
        for b in &opts.bitmaps {
            let q = bitmap_context(b);
            if !queries.contains(&q) {
                queries.push(q);
            }
        }
        let data = proto::encode_set_meta_context(&opts.export, &queries)
            .ok_or_else(|| NbdError::Options("metadata context query too long".to_owned()))?;
        send_option(io, proto::OPT_SET_META_CONTEXT, &data).await?;
        let mut contexts: Vec<(String, u32)> = Vec::new();
        for _ in 0..MAX_OPTION_REPLIES {
            let (h, payload) = read_option_reply(io, proto::OPT_SET_META_CONTEXT).await?;
            match h.reply {
                proto::REP_META_CONTEXT => {
                    let (id, name) = proto::parse_meta_context(&payload)?;
                    if let Some((other, _)) = contexts.iter().find(|(_, i)| *i == id) {
                        return Err(ProtoError::DuplicateContextId {
                            id,
                            first: other.clone(),
                            second: name.to_owned(),
                        }
                        .into());
                    }
                    if queries.iter().any(|q| q == name) && !contexts.iter().any(|(n, _)| n == name) {
                        contexts.push((name.to_owned(), id));
                    } else {
                        debug!(context = name, "ignoring a metadata context not asked for");
                    }
                }
                proto::REP_ACK => return Ok(contexts),
                _ if h.is_error() && refusal_is_fatal(&h) => {
                    abort_negotiation(io).await;
                    return Err(refusal(proto::OPT_SET_META_CONTEXT, &h, &payload, &opts.export));
                }
                _ if h.is_error() => {
                    debug!(
                        reply = proto::reply_name(h.reply),
                        "the NBD server refused metadata contexts"
                    );
                    return Ok(Vec::new());
                }
                _ => return Err(unexpected(proto::OPT_SET_META_CONTEXT, &h)),
            }
        }
        Err(ProtoError::TooLong {
            what: "list of NBD_OPT_SET_META_CONTEXT replies",
            len: MAX_OPTION_REPLIES as u64 + 1,
            max: MAX_OPTION_REPLIES as u64,
        }
        .into())
    }

    /// `NBD_OPT_GO` asking for block sizes, falling back to `NBD_OPT_EXPORT_NAME` on servers
    /// that do not know `NBD_OPT_GO`. Returns size, transmission flags, block sizes.
    async fn go(
        io: &mut Box<dyn Io>,
        opts: &ConnectOptions,
        no_zeroes: bool,
    ) -> Result<(u64, u16, BlockSizes), NbdError> {
        let data = proto::encode_go(&opts.export, &[proto::INFO_BLOCK_SIZE])
            .ok_or_else(|| NbdError::Options("export name too long".to_owned()))?;
        send_option(io, proto::OPT_GO, &data).await?;
        let mut export = None;
        let mut sizes = None;
        for _ in 0..MAX_OPTION_REPLIES {
            let (h, payload) = read_option_reply(io, proto::OPT_GO).await?;
            match h.reply {
                proto::REP_INFO => match proto::parse_info(&payload)? {
                    proto::Info::Export { size, flags } => export = Some((size, flags)),
                    proto::Info::BlockSize(b) => sizes = Some(b),
                    other => debug!(info = ?other, "NBD export information"),
                },
                proto::REP_ACK => {
                    let (size, flags) = export.ok_or(ProtoError::MissingExportInfo)?;
                    return Ok((size, flags, sizes.unwrap_or_default()));
                }
                proto::REP_ERR_UNSUP => return Self::go_export_name(io, opts, no_zeroes).await,
                _ if h.is_error() => {
                    let err = refusal(proto::OPT_GO, &h, &payload, &opts.export);
                    abort_negotiation(io).await;
                    return Err(err);
                }
                _ => return Err(unexpected(proto::OPT_GO, &h)),
            }
        }
        Err(ProtoError::TooLong {
            what: "list of NBD_OPT_GO replies",
            len: MAX_OPTION_REPLIES as u64 + 1,
            max: MAX_OPTION_REPLIES as u64,
        }
        .into())
    }

    async fn go_export_name(
        io: &mut Box<dyn Io>,
        opts: &ConnectOptions,
        no_zeroes: bool,
    ) -> Result<(u64, u16, BlockSizes), NbdError> {
        debug!("the NBD server does not know NBD_OPT_GO; using NBD_OPT_EXPORT_NAME");
        send_option(io, proto::OPT_EXPORT_NAME, opts.export.as_bytes()).await?;
        let mut reply = [0u8; proto::EXPORT_NAME_REPLY_LEN + proto::EXPORT_NAME_ZEROES];
        let len = if no_zeroes {
            proto::EXPORT_NAME_REPLY_LEN
        } else {
            reply.len()
        };
        match read_exact(io, &mut reply[..len]).await {
            Err(NbdError::ServerClosed) => {
                return Err(NbdError::UnknownExport {
                    export: opts.export.clone(),
                    message: "the server closed the connection after NBD_OPT_EXPORT_NAME".to_owned(),
                });
            }
            r => r?,
        }
        let (size, flags) = proto::parse_export_name_reply(&reply[..proto::EXPORT_NAME_REPLY_LEN])?;
        Ok((size, flags, BlockSizes::default()))
    }

    fn start(io: Box<dyn Io>, export: Export, opts: &ConnectOptions) -> NbdClient {
        let (rd, wr) = tokio::io::split(io);
        let shared = Arc::new(Shared::new(opts.max_in_flight));
        let (wtx, wrx) = mpsc::unbounded_channel();
        // The tasks log in the caller's span (host, disk, sync ids) plus the export.
        let span = tracing::info_span!("nbd", export = %export.name);
        let writer =
            tokio::spawn(writer_task(wr, wrx, shared.clone(), opts.request_timeout).instrument(span.clone()));
        let reader = Reader {
            rd,
            shared: shared.clone(),
            structured: export.structured,
            contexts: export.contexts.iter().map(|(_, id)| *id).collect(),
            progress: HashMap::new(),
            writer: wtx.clone(),
        };
        let reader = tokio::spawn(reader.run().instrument(span));
        shared
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend([reader.abort_handle(), writer.abort_handle()]);
        NbdClient {
            inner: Arc::new(Inner {
                export,
                shared,
                writer: wtx,
                reader: Mutex::new(Some(reader)),
                request_timeout: opts.request_timeout,
            }),
        }
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.export.size
    }

    /// The export's block size constraints (defaults when the server gave none: 1, 4 KiB,
    /// 32 MiB).
    pub fn block_sizes(&self) -> BlockSizes {
        self.inner.export.block_sizes
    }

    /// The export name as asked for.
    pub fn export_name(&self) -> &str {
        &self.inner.export.name
    }

    /// The transmission flags (`proto::TFLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.inner.export.flags
    }

    /// True when the server says the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.inner.export.flags & proto::TFLAG_READ_ONLY != 0
    }

    /// True when the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.inner.export.tls
    }

    /// True when structured replies were negotiated (needed for block status).
    pub fn has_structured_replies(&self) -> bool {
        self.inner.export.structured
    }

    /// True when the server agreed to report metadata context `name`.
    pub fn has_context(&self, name: &str) -> bool {
        self.context_id(name).is_some()
    }

    fn context_id(&self, name: &str) -> Option<u32> {
        self.inner
            .export
            .contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, id)| *id)
    }

    fn check_range(&self, command: &'static str, start: u64, end: Option<u64>) -> Result<u64, NbdError> {
        let size = self.size();
        match end {
            Some(end) if start <= end && end <= size => Ok(end),
            end => Err(NbdError::OutOfRange {
                command,
                start,
                end: end.unwrap_or(u64::MAX),
                size,
            }),
        }
    }

    /// Registers a request and queues it for the writer.
    async fn submit(
        &self,
        command: u16,
        offset: u64,
        len: u32,
    ) -> Result<mpsc::UnboundedReceiver<Event>, NbdError> {
        let shared = &self.inner.shared;
        let permit = shared
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| shared.unusable())?;
        let request = Request {
            flags: 0,
            command,
            cookie: shared.next_cookie.fetch_add(1, Ordering::Relaxed),
            offset,
            len,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = shared.lock();
        if let Some(e) = &st.dead {
            return Err(NbdError::Connection(e.clone()));
        }
        if st.closing {
            return Err(NbdError::Closed);
        }
        st.pending.insert(
            request.cookie,
            Pending {
                request,
                tx,
                _permit: permit,
            },
        );
        if self
            .inner
            .writer
            .send(WriterMsg::Request(request.encode()))
            .is_err()
        {
            st.pending.remove(&request.cookie);
            return Err(NbdError::Closed);
        }
        Ok(rx)
    }

    /// Waits for the reply to a request, handing data and extents to `on_event`; fails with
    /// the first error chunk once the reply is over. Times out per
    /// [`ConnectOptions::request_timeout`], which fails the connection.
    async fn wait(
        &self,
        request: (&'static str, u64, u64),
        rx: &mut mpsc::UnboundedReceiver<Event>,
        mut on_event: impl FnMut(Event) -> Result<(), NbdError>,
    ) -> Result<(), NbdError> {
        let (command, offset, len) = request;
        let after = self.inner.request_timeout;
        let wait = async {
            let mut first_error = None;
            loop {
                match rx.recv().await {
                    Some(Event::Done) => return first_error.map_or(Ok(()), Err),
                    Some(Event::Failed(e)) => return Err(NbdError::Connection(e)),
                    Some(Event::Error {
                        errno,
                        message,
                        offset: error_offset,
                    }) => {
                        first_error.get_or_insert(NbdError::Server {
                            command,
                            offset,
                            len,
                            errno: proto::Errno(errno),
                            message,
                            error_offset,
                        });
                    }
                    Some(ev) => {
                        if first_error.is_none() {
                            on_event(ev)?;
                        }
                    }
                    None => return Err(self.inner.shared.unusable()),
                }
            }
        };
        match tokio::time::timeout(after, wait).await {
            Ok(r) => r,
            Err(_) => {
                self.inner.shared.fail(NbdError::Timeout { command, after });
                Err(NbdError::Timeout { command, after })
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset` (holes read as zeros). `offset` and the length must
    /// be multiples of the minimum block size (the length may instead end at the export's
    /// end). Reads longer than the server's maximum block size (capped at 32 MiB) are split
    /// into several requests kept in flight together. Every reply is checked to cover its
    /// request exactly once; on any error the content of `buf` is unspecified.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let len = buf.len() as u64;
        let end = self.check_range("NBD_CMD_READ", offset, offset.checked_add(len))?;
        let min = self.block_sizes().min;
        let m = u64::from(min);
        if !offset.is_multiple_of(m) || (!len.is_multiple_of(m) && end != self.size()) {
            return Err(NbdError::Unaligned { offset, len, min });
        }
        let max = self.block_sizes().max_read() as usize;
        let mut window = VecDeque::with_capacity(READ_WINDOW);
        let mut pos = offset;
        for piece in buf.chunks_mut(max) {
            // A piece is at most `max_read()`, a u32.
            let n = u32::try_from(piece.len()).unwrap_or(u32::MAX);
            let rx = self.submit(proto::CMD_READ, pos, n).await?;
            window.push_back((pos, piece, rx));
            pos += u64::from(n);
            if window.len() >= READ_WINDOW
                && let Some((o, p, rx)) = window.pop_front()
            {
                self.finish_read(o, p, rx).await?;
            }
        }
        while let Some((o, p, rx)) = window.pop_front() {
            self.finish_read(o, p, rx).await?;
        }
        Ok(())
    }

    async fn finish_read(
        &self,
        offset: u64,
        piece: &mut [u8],
        mut rx: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), NbdError> {
        let len = piece.len() as u64;
        self.wait(("NBD_CMD_READ", offset, len), &mut rx, |ev| {
            // The reader checked that chunks lie inside the request; slicing is checked anyway.
            let (at, n) = match &ev {
                Event::Data { offset: at, data } => (*at, data.len()),
                Event::Hole { offset: at, len } => (*at, *len as usize),
                _ => return Ok(()),
            };
            let dst = at
                .checked_sub(offset)
                .and_then(|s| usize::try_from(s).ok())
                .and_then(|s| piece.get_mut(s..s.checked_add(n)?))
                .ok_or(ProtoError::OutsideRequest {
                    what: "read chunk",
                    start: at,
                    end: at.saturating_add(n as u64),
                    req_start: offset,
                    req_end: offset + len,
                })?;
            match ev {
                Event::Data { data, .. } => dst.copy_from_slice(&data),
                _ => dst.fill(0),
            }
            Ok(())
        })
        .await
    }

    /// The extents of metadata context `context` over `range`, as `(range, flags)` pairs in
    /// order, covering `range` exactly, adjacent extents with equal flags merged. Requests are
    /// aligned out to the minimum block size and repeated until the range is covered (servers
    /// may answer for less than asked, but must make progress); the result is clipped to
    /// `range`. Fails with [`NbdError::ContextUnavailable`] when the context was not negotiated.
    pub async fn block_status(
        &self,
        context: &str,
        range: Range<u64>,
    ) -> Result<Vec<(Range<u64>, u32)>, NbdError> {
        let id = self
            .context_id(context)
            .ok_or_else(|| NbdError::ContextUnavailable(context.to_owned()))?;
        self.check_range("NBD_CMD_BLOCK_STATUS", range.start, Some(range.end))?;
        let mut out: Vec<(Range<u64>, u32)> = Vec::new();
        if range.is_empty() {
            return Ok(out);
        }
        let min = u64::from(self.block_sizes().min);
        let start = range.start - range.start % min;
        let end = range
            .end
            .checked_next_multiple_of(min)
            .unwrap_or(u64::MAX)
            .min(self.size());
        let max_len = u64::from(u32::MAX) - u64::from(u32::MAX) % min;
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(max_len);
            let len32 = u32::try_from(len).unwrap_or(u32::MAX);
            let mut rx = self.submit(proto::CMD_BLOCK_STATUS, pos, len32).await?;
            let mut got = None;
            self.wait(("NBD_CMD_BLOCK_STATUS", pos, len), &mut rx, |ev| {
                if let Event::Extents(bs) = ev
                    && bs.context == id
                {
                    got = Some(bs.extents);
                }
                Ok(())
            })
            .await?;
            let extents = got.ok_or(ProtoError::MissingContext(id))?;
            let next = extents.last().map_or(pos, |(r, _)| r.end);
            if next <= pos {
                return Err(ProtoError::Empty {
                    what: "block status reply",
                    offset: pos,
                }
                .into());
            }
            for (r, flags) in extents {
                let r = r.start.max(range.start)..r.end.min(range.end);
                push_merged(&mut out, r, flags);
            }
            pos = next;
        }
        Ok(out)
    }

    /// The `base:allocation` extents of `range` (flags [`proto::STATE_HOLE`],
    /// [`proto::STATE_ZERO`]); see [`NbdClient::block_status`].
    pub async fn allocation(&self, range: Range<u64>) -> Result<Vec<(Range<u64>, u32)>, NbdError> {
        self.block_status(proto::CONTEXT_BASE_ALLOCATION, range).await
    }

    /// The parts of `range` that need not be read: `base:allocation` extents flagged
    /// [`proto::STATE_HOLE`] or [`proto::STATE_ZERO`], merged. (The spec leaves the content of
    /// a hole without the zero flag undefined; such a hole is treated as zeros too.)
    pub async fn holes(&self, range: Range<u64>) -> Result<Vec<Range<u64>>, NbdError> {
        let extents = self.allocation(range).await?;
        Ok(select(extents, |f| {
            f & (proto::STATE_HOLE | proto::STATE_ZERO) != 0
        }))
    }

    /// The dirty parts of `range` in QEMU dirty bitmap `bitmap` (context
    /// `qemu:dirty-bitmap:BITMAP`, flag [`proto::STATE_DIRTY`]), merged. The bitmap must be
    /// listed in [`ConnectOptions::bitmaps`].
    pub async fn dirty(&self, bitmap: &str, range: Range<u64>) -> Result<Vec<Range<u64>>, NbdError> {
        if !self.inner.export.bitmaps.iter().any(|b| b == bitmap) {
            return Err(NbdError::BitmapNotRequested(bitmap.to_owned()));
        }
        let extents = self.block_status(&bitmap_context(bitmap), range).await?;
        Ok(select(extents, |f| f & proto::STATE_DIRTY != 0))
    }

    /// Sends `NBD_CMD_DISC` and waits (up to the request timeout) for the server to finish the
    /// requests in flight and close the connection. Other clones see [`NbdError::Closed`]
    /// afterwards. Dropping the last clone disconnects too, without waiting.
    pub async fn close(self) -> Result<(), NbdError> {
        let inner = &self.inner;
        let shared = &inner.shared;
        {
            let mut st = shared.lock();
            if let Some(e) = &st.dead {
                return Err(NbdError::Connection(e.clone()));
            }
            if st.closing {
                return Ok(());
            }
            st.closing = true;
        }
        let (tx, rx) = oneshot::channel();
        if inner.writer.send(WriterMsg::Disconnect(Some(tx))).is_err() {
            return Err(shared.unusable());
        }
        let after = inner.request_timeout;
        let sent = match tokio::time::timeout(after, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(shared.unusable()),
            Err(_) => Err(NbdError::Timeout {
                command: "NBD_CMD_DISC",
                after,
            }),
        };
        let reader = inner.reader.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(reader) = reader
            && tokio::time::timeout(after, reader).await.is_err()
        {
            warn!("the NBD server did not close the connection after NBD_CMD_DISC");
        }
        shared.abort_tasks();
        sent
    }
}

fn push_merged(out: &mut Vec<(Range<u64>, u32)>, r: Range<u64>, flags: u32) {
    if r.is_empty() {
        return;
    }
    match out.last_mut() {
        Some((last, f)) if last.end == r.start && *f == flags => last.end = r.end,
        _ => out.push((r, flags)),
    }
}

/// The ranges of `extents` whose flags satisfy `keep`, touching ones merged.
fn select(extents: Vec<(Range<u64>, u32)>, keep: impl Fn(u32) -> bool) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for (r, f) in extents {
        if !keep(f) {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

async fn writer_task(
    mut wr: WriteHalf<Box<dyn Io>>,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    shared: Arc<Shared>,
    timeout: Duration,
) {
    const BATCH: usize = 64;
    let mut buf = Vec::with_capacity(BATCH * proto::REQUEST_LEN);
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut disconnect = None;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                WriterMsg::Request(b) => buf.extend_from_slice(&b),
                WriterMsg::Disconnect(done) => {
                    let disc = Request {
                        flags: 0,
                        command: proto::CMD_DISC,
                        cookie: 0,
                        offset: 0,
                        len: 0,
                    };
                    buf.extend_from_slice(&disc.encode());
                    disconnect = Some(done);
                    break;
                }
            }
            if buf.len() < BATCH * proto::REQUEST_LEN {
                next = rx.try_recv().ok();
            }
        }
        let write = async {
            wr.write_all(&buf).await?;
            wr.flush().await?;
            if disconnect.is_some() {
                wr.shutdown().await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let result = match tokio::time::timeout(timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io_error(e)),
            Err(_) => Err(NbdError::Timeout {
                command: "sending requests",
                after: timeout,
            }),
        };
        match (result, disconnect) {
            (result, Some(done)) => {
                if let Some(done) = done {
                    let _ = done.send(result);
                }
                return;
            }
            (Err(e), None) => {
                shared.fail(e);
                return;
            }
            (Ok(()), None) => {}
        }
    }
}

/// Per-request checks the reader keeps across the chunks of one reply.
struct Progress {
    /// Read: which bytes the chunks covered.
    coverage: Option<ReadCoverage>,
    /// Block status: contexts seen.
    seen: Vec<u32>,
    errored: bool,
}

impl Progress {
    fn new(request: &Request) -> Self {
        Self {
            coverage: (request.command == proto::CMD_READ).then(|| ReadCoverage::new(request)),
            seen: Vec::new(),
            errored: false,
        }
    }

    fn cover(&mut self, what: &'static str, offset: u64, len: u64) -> Result<(), ProtoError> {
        match &mut self.coverage {
            Some(c) => c.add(what, offset, len),
            None => Ok(()),
        }
    }

    /// At the done flag: a successful reply must be complete.
    fn finish(&self, request: &Request, contexts: &[u32]) -> Result<(), ProtoError> {
        if self.errored {
            return Ok(());
        }
        match request.command {
            proto::CMD_READ => self.coverage.as_ref().map_or(Ok(()), ReadCoverage::finish),
            proto::CMD_BLOCK_STATUS => match contexts.iter().find(|c| !self.seen.contains(c)) {
                Some(missing) => Err(ProtoError::MissingContext(*missing)),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

struct Reader {
    rd: ReadHalf<Box<dyn Io>>,
    shared: Arc<Shared>,
    structured: bool,
    /// Ids of the negotiated metadata contexts.
    contexts: Vec<u32>,
    progress: HashMap<u64, Progress>,
    writer: mpsc::UnboundedSender<WriterMsg>,
}

impl Reader {
    async fn run(mut self) {
        match self.read_replies().await {
            Ok(()) => debug!("NBD connection closed"),
            Err(e) => {
                self.shared.fail(e);
            }
        }
    }

    async fn read_payload(&mut self, len: usize) -> Result<Bytes, NbdError> {
        // `len` was bounded by the request it answers (see `proto::check_chunk_header`).
        let mut buf = BytesMut::zeroed(len);
        read_exact(&mut self.rd, &mut buf).await?;
        Ok(buf.freeze())
    }

    /// Removes a finished request and tells its waiter.
    fn complete(&self, cookie: u64) {
        let pending = self.shared.lock().pending.remove(&cookie);
        if let Some(p) = pending {
            let _ = p.tx.send(Event::Done);
        }
    }

    async fn read_replies(&mut self) -> Result<(), NbdError> {
        loop {
            let mut header = [0u8; proto::CHUNK_HEADER_LEN];
            let n = self.rd.read(&mut header[..4]).await.map_err(io_error)?;
            if n == 0 {
                let st = self.shared.lock();
                return if st.closing && st.pending.is_empty() {
                    Ok(())
                } else {
                    Err(NbdError::ServerClosed)
                };
            }
            read_exact(&mut self.rd, &mut header[n..4]).await?;
            let magic = [header[0], header[1], header[2], header[3]];
            let header_len = proto::reply_header_len(magic)?;
            read_exact(&mut self.rd, &mut header[4..header_len]).await?;
            let header = proto::parse_reply_header(&header[..header_len])?;
            let cookie = header.cookie();
            let (request, tx) = {
                let st = self.shared.lock();
                let p = st.pending.get(&cookie).ok_or(ProtoError::UnknownCookie(cookie))?;
                (p.request, p.tx.clone())
            };
            match header {
                ReplyHeader::Simple { error, .. } => {
                    let len = proto::simple_payload_len(error, &request, self.structured)?;
                    if error != 0 {
                        let _ = tx.send(Event::Error {
                            errno: error,
                            message: String::new(),
                            offset: None,
                        });
                    } else if len > 0 {
                        let data = self.read_payload(len).await?;
                        let _ = tx.send(Event::Data {
                            offset: request.offset,
                            data,
                        });
                    }
                    self.complete(cookie);
                }
                ReplyHeader::Structured(h) => {
                    let len = proto::check_chunk_header(&h, &request, self.structured)?;
                    let payload = self.read_payload(len).await?;
                    let chunk = proto::parse_chunk(&h, &payload, &request)?;
                    let progress = self
                        .progress
                        .entry(cookie)
                        .or_insert_with(|| Progress::new(&request));
                    let event = match chunk {
                        Chunk::None => None,
                        Chunk::Data { offset, data } => {
                            progress.cover("data chunk", offset, data.len() as u64)?;
                            Some(Event::Data {
                                offset,
                                data: payload.slice_ref(data),
                            })
                        }
                        Chunk::Hole { offset, len } => {
                            progress.cover("hole chunk", offset, u64::from(len))?;
                            Some(Event::Hole { offset, len })
                        }
                        Chunk::BlockStatus(bs) => {
                            if !self.contexts.contains(&bs.context) {
                                return Err(ProtoError::UnknownContext(bs.context).into());
                            }
                            if progress.seen.contains(&bs.context) {
                                return Err(ProtoError::DuplicateContext(bs.context).into());
                            }
                            progress.seen.push(bs.context);
                            Some(Event::Extents(bs))
                        }
                        Chunk::Error {
                            error,
                            message,
                            offset,
                        } => {
                            progress.errored = true;
                            if error == proto::ESHUTDOWN {
                                // The protocol asks for a soft disconnect.
                                self.shared.lock().closing = true;
                                let _ = self.writer.send(WriterMsg::Disconnect(None));
                            }
                            Some(Event::Error {
                                errno: error,
                                message,
                                offset,
                            })
                        }
                    };
                    if let Some(ev) = event {
                        let _ = tx.send(ev);
                    }
                    if h.is_done() {
                        if let Some(progress) = self.progress.remove(&cookie) {
                            progress.finish(&request, &self.contexts)?;
                        }
                        self.complete(cookie);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
