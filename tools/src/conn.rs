//! A small async NATS client over one TCP connection (plain or TLS), built on
//! Skiff's own [`protocol`](skiff::protocol) module. It backs
//! `skiff pub/sub/req/reply` and `skiff bench`, and speaks to Skiff and
//! nats-server alike.
//!
//! An [`Endpoint`] says where and how to connect (address, TLS files); it is
//! built once, so that the TLS configuration is loaded once however many
//! connections are made. TLS is used when the URL is `tls://`, when any TLS
//! option is given, or when the server's INFO says `tls_required`; the
//! upgrade follows INFO (or precedes it with `--tls-first`), as with the
//! official clients. An endpoint also carries the [`Credentials`] to log in
//! with (given, or `user:pass@` / `token@` in the URL); they go only into
//! CONNECT, and `Debug` never shows them.
//!
//! One [`Connection`] owns the socket, a read buffer and a write buffer, and
//! every method takes `&mut self`: no background task, lock or channel sits
//! between the caller and the socket, which keeps the per-message cost of the
//! benchmark client close to the cost of parsing.
//!
//! Invariants:
//! - Outgoing ops are appended whole to the write buffer. It is written when
//!   it passes `WRITE_CHUNK` bytes (so many PUBs share one syscall), and
//!   always before the connection waits for input, so a request, a reply or a
//!   PONG never sits in the buffer while we block.
//! - Wherever ops are read, server PINGs are answered and `-ERR` becomes
//!   [`Error::Server`]. Messages read while waiting for something else (the
//!   PONG of [`Connection::flush`], a publisher's opportunistic read) are
//!   kept, in order, and returned first by [`Connection::next_message`].
//! - Waiting methods are cancel-safe: dropped half-way (by a timeout, say)
//!   they leave both buffers consistent, so the connection stays usable.
//! - Nothing that comes from the network is unwrapped.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use base64::Engine;
use bytes::{BufMut, BytesMut};
use rand::distributions::Alphanumeric;
use rand::Rng;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use skiff::protocol::{
    encode_connect, encode_pub_header, encode_sub, encode_unsub, parse_server_op, ConnectOptions,
    Limits, Message, ProtocolError, ServerInfo, ServerOp, CRLF, PING, PONG,
};

/// The server the command-line tools use unless told otherwise.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";
/// The port of a URL that names none.
const DEFAULT_PORT: u16 = 4222;
/// Buffered output is written once it reaches this size.
const WRITE_CHUNK: usize = 64 * 1024;
/// Read buffer growth step, and the least free space a read is given.
const READ_CHUNK: usize = 64 * 1024;
const READ_MIN: usize = 4 * 1024;
/// Longest control line accepted from a server: a clustered server's INFO
/// carries its peers' URLs and can be much longer than a MSG line.
const MAX_CONTROL_LINE: usize = 64 * 1024;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid server URL `{0}`: expected nats://[user:pass@|token@]host:port, tls://... or host:port"
    )]
    Url(String),
    #[error("invalid nkey seed: {0}")]
    Nkey(String),
    #[error(transparent)]
    TlsConfig(#[from] skiff::tls::TlsError),
    #[error("--tls-cert and --tls-key go together")]
    TlsCertWithoutKey,
    #[error("TLS handshake with the server failed: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("TLS was asked for, but the server does not offer it")]
    TlsNotOffered,
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server sent invalid protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server did not start with INFO")]
    NoInfo,
    #[error("invalid INFO from the server: {0}")]
    Info(#[source] serde_json::Error),
    /// The text of a `-ERR` line, without its quotes.
    #[error("server error: {0}")]
    Server(String),
    #[error("connection closed by the server")]
    Closed,
    #[error("timed out")]
    Timeout,
    #[error("no responders for a request on `{0}`")]
    NoResponders(String),
    #[error("a {size}-byte message exceeds the server's max_payload of {max} bytes")]
    MaxPayload { size: usize, max: usize },
}

/// How a client logs in: user and password, a token, or an nkey seed
/// (which signs the server's nonce). Empty: no credentials.
#[derive(Clone, Default)]
pub struct Credentials {
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// An nkey seed (`SU...`).
    pub nkey_seed: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "[REDACTED]"))
            .field("token", &self.token.as_ref().map(|_| "[REDACTED]"))
            .field("nkey_seed", &self.nkey_seed.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

impl Credentials {
    /// The credentials a URL's userinfo gives: `user:pass` or a token.
    fn from_userinfo(userinfo: Option<&str>) -> Credentials {
        match userinfo.map(|u| (u, u.split_once(':'))) {
            Some((_, Some((user, pass)))) => Credentials {
                user: Some(user.to_string()),
                password: Some(pass.to_string()),
                ..Credentials::default()
            },
            Some((token, None)) => Credentials {
                token: Some(token.to_string()),
                ..Credentials::default()
            },
            None => Credentials::default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.user.is_none() && self.token.is_none() && self.nkey_seed.is_none()
    }

    /// Puts the credentials into CONNECT, signing `nonce` with the nkey.
    fn apply(&self, options: &mut ConnectOptions, nonce: Option<&str>) -> Result<(), Error> {
        options.user = self.user.clone();
        options.pass = self.password.clone();
        options.auth_token = self.token.clone();
        if let Some(seed) = &self.nkey_seed {
            let key =
                nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| Error::Nkey(e.to_string()))?;
            options.nkey = Some(key.public_key());
            if let Some(nonce) = nonce {
                let sig = key
                    .sign(nonce.as_bytes())
                    .map_err(|e| Error::Nkey(e.to_string()))?;
                options.sig = Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig));
            }
        }
        Ok(())
    }
}

/// The client's TLS settings, as given on the command line.
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    /// CA that signed the server's certificate (`--tls-ca`).
    pub ca_file: Option<PathBuf>,
    /// Our certificate, for servers that verify clients (`--tls-cert`).
    pub cert_file: Option<PathBuf>,
    /// Its key (`--tls-key`).
    pub key_file: Option<PathBuf>,
    /// Start TLS before the server's INFO (`--tls-first`), for servers with
    /// `handshake_first`.
    pub first: bool,
}

impl TlsOptions {
    /// Whether any TLS option is set, which asks for TLS.
    fn any(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some() || self.first
    }
}

/// Where to connect and how. Cheap to clone: connections made from one
/// endpoint share its TLS configuration.
#[derive(Clone)]
pub struct Endpoint {
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    /// Use TLS even if the server does not require it.
    want_tls: bool,
    tls_first: bool,
    credentials: Credentials,
}

impl Endpoint {
    /// `url` is `nats://host:port`, `tls://host:port`, `host:port` or `host`.
    pub fn new(url: &str, tls: &TlsOptions) -> Result<Endpoint, Error> {
        let target = parse_url(url)?;
        let cert_key = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => return Err(Error::TlsCertWithoutKey),
        };
        let config = skiff::tls::client_config(tls.ca_file.as_deref(), cert_key)?;
        let server_name =
            ServerName::try_from(target.host.clone()).map_err(|_| Error::Url(url.to_string()))?;
        Ok(Endpoint {
            addr: target.addr,
            server_name,
            tls: Arc::new(config),
            want_tls: target.tls || tls.any(),
            tls_first: tls.first,
            credentials: Credentials::from_userinfo(target.userinfo.as_deref()),
        })
    }

    /// Logs in with `credentials` instead of those in the URL, unless
    /// `credentials` is empty.
    pub fn with_credentials(mut self, credentials: &Credentials) -> Endpoint {
        if !credentials.is_empty() {
            self.credentials = credentials.clone();
        }
        self
    }

    /// A plain `nats://` endpoint with no TLS options.
    pub fn plain(url: &str) -> Result<Endpoint, Error> {
        Endpoint::new(url, &TlsOptions::default())
    }

    /// The `host:port` connected to.
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

/// The connection's byte stream: TCP, or TLS over TCP after the upgrade.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Only while the TCP stream is being handed to the TLS handshake.
    Upgrading,
}

fn upgrading() -> std::io::Error {
    std::io::Error::new(ErrorKind::NotConnected, "TLS upgrade in progress")
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

/// What reading stopped at: a delivery, or the answer to one of our PINGs.
enum Event {
    Message(Message),
    Pong,
}

/// The reply subjects of [`Connection::request`]: one wildcard subscription
/// to `_INBOX.<random>.*`, made on first use, a fresh last token per request.
struct Inbox {
    prefix: String,
    next: u64,
    subscribed: bool,
}

impl Inbox {
    fn new() -> Inbox {
        let token: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(22)
            .map(char::from)
            .collect();
        Inbox {
            prefix: format!("_INBOX.{token}."),
            next: 0,
            subscribed: false,
        }
    }
}

/// One client connection. See the module docs for the buffering rules.
pub struct Connection {
    stream: Stream,
    read_buf: BytesMut,
    write_buf: BytesMut,
    info: ServerInfo,
    limits: Limits,
    next_sid: u64,
    /// Our PINGs whose PONG has not come back yet.
    pings_out: usize,
    /// Messages read while waiting for something else.
    backlog: VecDeque<Message>,
    inbox: Inbox,
}

impl Connection {
    /// Connects to `url` (`nats://host:port`, `tls://host:port`,
    /// `host:port` or `host`) without TLS options; see
    /// [`Connection::connect_to`].
    pub async fn connect(url: &str) -> Result<Connection, Error> {
        Connection::connect_to(&Endpoint::plain(url)?).await
    }

    /// Connects to `endpoint`, reads the server's INFO, upgrades to TLS if
    /// either side asks for it, sends CONNECT and returns once the server has
    /// answered a PING, i.e. has accepted the connection.
    pub async fn connect_to(endpoint: &Endpoint) -> Result<Connection, Error> {
        let addr = endpoint.addr.clone();
        let stream = TcpStream::connect(&addr)
            .await
            .map_err(|source| Error::Connect { addr, source })?;
        // Writes are coalesced here already; Nagle would only add latency.
        stream.set_nodelay(true)?;
        let mut conn = Connection {
            stream: Stream::Plain(stream),
            read_buf: BytesMut::new(),
            write_buf: BytesMut::new(),
            info: ServerInfo::default(),
            limits: Limits {
                max_control_line: MAX_CONTROL_LINE,
                ..Limits::default()
            },
            next_sid: 0,
            pings_out: 0,
            backlog: VecDeque::new(),
            inbox: Inbox::new(),
        };
        if endpoint.tls_first {
            conn.start_tls(endpoint).await?;
        }
        conn.info = match conn.next_op().await? {
            ServerOp::Info(json) => serde_json::from_slice(&json).map_err(Error::Info)?,
            _ => return Err(Error::NoInfo),
        };
        if !endpoint.tls_first && (endpoint.want_tls || conn.info.tls_required) {
            if !conn.info.tls_required && !conn.info.tls_available {
                return Err(Error::TlsNotOffered);
            }
            conn.start_tls(endpoint).await?;
        }
        // The server never delivers more than it accepts from a publisher.
        conn.limits.max_payload = conn.info.max_payload;
        let mut options = ConnectOptions {
            verbose: Some(false),
            pedantic: Some(false),
            echo: Some(true),
            headers: Some(true),
            no_responders: Some(true),
            protocol: Some(1),
            tls_required: Some(matches!(conn.stream, Stream::Tls(_))),
            lang: Some("rust-skiff".to_string()),
            version: Some(env!("CARGO_PKG_VERSION").to_string()),
            ..ConnectOptions::default()
        };
        endpoint
            .credentials
            .apply(&mut options, conn.info.nonce.as_deref())?;
        encode_connect(&mut conn.write_buf, &options);
        conn.flush().await?;
        Ok(conn)
    }

    /// Runs the TLS handshake on the TCP stream. Nothing is buffered in
    /// either direction at this point: the server waits for our ClientHello.
    async fn start_tls(&mut self, endpoint: &Endpoint) -> Result<(), Error> {
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Upgrading) else {
            return Ok(());
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&endpoint.tls));
        let tls = connector
            .connect(endpoint.server_name.clone(), tcp)
            .await
            .map_err(Error::Handshake)?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// Whether the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// The server's INFO as received on connect.
    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    /// Queues a publish. The write happens once enough output is buffered,
    /// or at the next wait; call [`Connection::flush`] to be sure the server
    /// has processed it.
    pub async fn publish(
        &mut self,
        subject: &[u8],
        reply: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<(), Error> {
        self.append_pub(subject, reply, payload)?;
        if self.write_buf.len() >= WRITE_CHUNK {
            self.write_out().await?;
            // A publisher may never wait for input: look at what the server
            // sent (a PING to answer, an -ERR to report) without blocking.
            self.poll_incoming()?;
        }
        Ok(())
    }

    /// Queues `SUB subject [queue] sid` and returns the sid. It reaches the
    /// server with the next write; [`Connection::flush`] makes sure it is in
    /// place before anything is published.
    pub fn subscribe(&mut self, subject: &[u8], queue: Option<&[u8]>) -> u64 {
        self.next_sid += 1;
        let sid = itoa::Buffer::new()
            .format(self.next_sid)
            .as_bytes()
            .to_vec();
        encode_sub(&mut self.write_buf, subject, queue, &sid);
        self.next_sid
    }

    /// Queues `UNSUB sid [max]`: with `max`, the subscription ends after that
    /// many messages in total.
    pub fn unsubscribe(&mut self, sid: u64, max: Option<u64>) {
        encode_unsub(
            &mut self.write_buf,
            itoa::Buffer::new().format(sid).as_bytes(),
            max,
        );
    }

    /// The next message delivered to any of this connection's subscriptions.
    pub async fn next_message(&mut self) -> Result<Message, Error> {
        loop {
            if let Some(message) = self.try_next_message()? {
                return Ok(message);
            }
            self.fill().await?;
        }
    }

    /// The next message if it has already been read, without I/O. A busy
    /// consumer drains each read with it and waits (with a timeout, say)
    /// only when it returns `None`.
    pub fn try_next_message(&mut self) -> Result<Option<Message>, Error> {
        if let Some(message) = self.backlog.pop_front() {
            return Ok(Some(message));
        }
        // A PONG here answers a flush that was cancelled: nothing waits.
        while let Some(event) = self.buffered_event()? {
            if let Event::Message(message) = event {
                return Ok(Some(message));
            }
        }
        Ok(None)
    }

    /// Writes everything buffered, then waits until the server has answered a
    /// PING, i.e. has processed everything sent before it.
    pub async fn flush(&mut self) -> Result<(), Error> {
        self.write_buf.put_slice(PING);
        self.pings_out += 1;
        // PONGs come back in order, so once none is outstanding ours is in;
        // counting also absorbs the PONG of an earlier, cancelled flush.
        while self.pings_out > 0 {
            if let Event::Message(message) = self.next_event().await? {
                self.backlog.push_back(message);
            }
        }
        Ok(())
    }

    /// Publishes `payload` to `subject` with a fresh reply subject and waits
    /// up to `timeout` for the reply. A 503 status (no subscriber) is
    /// [`Error::NoResponders`]. A reply that arrives after its request timed
    /// out is dropped by later requests, but may be returned by
    /// [`Connection::next_message`].
    pub async fn request(
        &mut self,
        subject: &[u8],
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Message, Error> {
        let reply = self.new_reply_subject();
        // Appended, not published: nothing may be read (and possibly put in
        // the backlog) before the wait below.
        self.append_pub(subject, Some(reply.as_bytes()), payload)?;
        let wait = async {
            loop {
                let Event::Message(message) = self.next_event().await? else {
                    continue;
                };
                if message.subject() == reply.as_bytes() {
                    return if is_no_responders(&message) {
                        Err(Error::NoResponders(
                            String::from_utf8_lossy(subject).into_owned(),
                        ))
                    } else {
                        Ok(message)
                    };
                }
                if !self.is_inbox_subject(message.subject()) {
                    self.backlog.push_back(message);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout)?
    }

    /// A new reply subject under this connection's inbox, subscribing to the
    /// inbox on first use.
    fn new_reply_subject(&mut self) -> String {
        let inbox = self.inbox();
        inbox.next += 1;
        format!("{}{}", inbox.prefix, inbox.next)
    }

    /// This connection's inbox prefix, `_INBOX.<random>.`, subscribing to
    /// `_INBOX.<random>.*` on first use (the subscription reaches the server
    /// with the next write). A caller that pipelines many requests appends
    /// last tokens of its own, so that one subscription serves them all;
    /// [`Connection::request`] numbers its reply subjects from 1, so such
    /// tokens should not be plain numbers (start them with a letter).
    pub fn inbox_prefix(&mut self) -> &str {
        &self.inbox().prefix
    }

    fn inbox(&mut self) -> &mut Inbox {
        if !self.inbox.subscribed {
            let wildcard = format!("{}*", self.inbox.prefix);
            self.subscribe(wildcard.as_bytes(), None);
            self.inbox.subscribed = true;
        }
        &mut self.inbox
    }

    fn is_inbox_subject(&self, subject: &[u8]) -> bool {
        self.inbox.subscribed && subject.starts_with(self.inbox.prefix.as_bytes())
    }

    /// Encodes a PUB into the write buffer, refusing what the server would
    /// refuse (and close the connection for).
    fn append_pub(
        &mut self,
        subject: &[u8],
        reply: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<(), Error> {
        if payload.len() > self.info.max_payload {
            return Err(Error::MaxPayload {
                size: payload.len(),
                max: self.info.max_payload,
            });
        }
        encode_pub_header(&mut self.write_buf, subject, reply, None, payload.len());
        self.write_buf.put_slice(payload);
        self.write_buf.put_slice(CRLF);
        Ok(())
    }

    /// Reads until a message or a PONG, handling everything else.
    async fn next_event(&mut self) -> Result<Event, Error> {
        loop {
            if let Some(event) = self.buffered_event()? {
                return Ok(event);
            }
            self.fill().await?;
        }
    }

    /// The next message or PONG among the ops already read, handling the
    /// others on the way.
    fn buffered_event(&mut self) -> Result<Option<Event>, Error> {
        while let Some(op) = parse_server_op(&mut self.read_buf, &self.limits)? {
            if let Some(event) = self.handle(op)? {
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// Handles the control ops; returns what a caller may be waiting for.
    fn handle(&mut self, op: ServerOp) -> Result<Option<Event>, Error> {
        match op {
            ServerOp::Msg { message, .. } => Ok(Some(Event::Message(message))),
            ServerOp::Pong => {
                self.pings_out = self.pings_out.saturating_sub(1);
                Ok(Some(Event::Pong))
            }
            ServerOp::Ping => {
                self.write_buf.put_slice(PONG);
                Ok(None)
            }
            // A later INFO announces cluster changes, which we do not follow.
            ServerOp::Ok | ServerOp::Info(_) => Ok(None),
            ServerOp::Err(text) => Err(Error::Server(
                String::from_utf8_lossy(&text)
                    .trim()
                    .trim_matches('\'')
                    .to_string(),
            )),
        }
    }

    /// The next op as it is (only the handshake needs one unhandled).
    async fn next_op(&mut self) -> Result<ServerOp, Error> {
        loop {
            if let Some(op) = parse_server_op(&mut self.read_buf, &self.limits)? {
                return Ok(op);
            }
            self.fill().await?;
        }
    }

    /// Reads more input, after writing out all pending output.
    async fn fill(&mut self) -> Result<(), Error> {
        self.write_out().await?;
        self.reserve_read();
        if self.stream.read_buf(&mut self.read_buf).await? == 0 {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Reads what has already arrived, without waiting, and handles it;
    /// messages go to the backlog.
    fn poll_incoming(&mut self) -> Result<(), Error> {
        self.reserve_read();
        match self.try_read() {
            Ok(0) => return Err(Error::Closed),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        while let Some(event) = self.buffered_event()? {
            if let Event::Message(message) = event {
                self.backlog.push_back(message);
            }
        }
        Ok(())
    }

    /// Reads what has already arrived without waiting: `WouldBlock` when
    /// nothing has. One poll with a waker that does nothing, which works for
    /// TCP and TLS alike (a TLS record may need several TCP reads, which
    /// the TLS stream does within the poll); the next real wait registers
    /// its own waker.
    fn try_read(&mut self) -> std::io::Result<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        let read =
            tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), &mut cx, &mut self.read_buf);
        match read {
            Poll::Ready(result) => result,
            Poll::Pending => Err(ErrorKind::WouldBlock.into()),
        }
    }

    fn reserve_read(&mut self) {
        if self.read_buf.capacity() - self.read_buf.len() < READ_MIN {
            self.read_buf.reserve(READ_CHUNK);
        }
    }

    /// Writes the whole write buffer. Cancel-safe: `write_all_buf` advances
    /// the buffer past whatever was written before a cancellation.
    async fn write_out(&mut self) -> Result<(), Error> {
        if !self.write_buf.is_empty() {
            self.stream.write_all_buf(&mut self.write_buf).await?;
            // TLS may hold records back until flushed; for TCP a no-op.
            self.stream.flush().await?;
        }
        Ok(())
    }
}

/// A reply that only says nobody is subscribed: an `HMSG` with status 503.
fn is_no_responders(message: &Message) -> bool {
    message.headers().starts_with(b"NATS/1.0 503")
}

/// What a server URL names.
#[derive(Debug, PartialEq)]
struct Target {
    /// `host:port`, with the default port when none is given.
    addr: String,
    /// The host alone (without IPv6 brackets): what the server's
    /// certificate must name.
    host: String,
    /// The URL said `tls://`.
    tls: bool,
    /// `user:pass` or `token` before an `@`.
    userinfo: Option<String>,
}

fn parse_url(url: &str) -> Result<Target, Error> {
    let bad = || Error::Url(url.to_string());
    let (tls, rest) = match url.trim().split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("nats") => (false, rest),
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("tls") => (true, rest),
        Some(_) => return Err(bad()),
        None => (false, url.trim()),
    };
    let rest = rest.trim_end_matches('/');
    let (userinfo, rest) = match rest.rsplit_once('@') {
        Some(("", _)) => return Err(bad()),
        Some((info, host)) => (Some(info.to_string()), host),
        None => (None, rest),
    };
    // Paths and lists of servers belong to later features.
    if rest.is_empty() || rest.contains(['@', '/', ',']) {
        return Err(bad());
    }
    let bracketed_ipv6 = rest.starts_with('[') && rest.ends_with(']');
    let (host, addr) = match rest.rsplit_once(':') {
        Some((host, port)) if !bracketed_ipv6 => {
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            (host, rest.to_string())
        }
        _ => (rest, format!("{rest}:{DEFAULT_PORT}")),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok(Target {
        addr,
        host,
        tls,
        userinfo,
    })
}

/// `host:port` from a server URL.
#[cfg(test)]
fn host_port(url: &str) -> Result<String, Error> {
    parse_url(url).map(|t| t.addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_server as server;

    #[test]
    fn urls_are_understood() {
        assert_eq!(host_port("nats://1.2.3.4:5").unwrap(), "1.2.3.4:5");
        assert_eq!(host_port("localhost").unwrap(), "localhost:4222");
        assert_eq!(host_port("NATS://h/").unwrap(), "h:4222");
        assert_eq!(host_port("[::1]").unwrap(), "[::1]:4222");
        assert_eq!(host_port("[::1]:7").unwrap(), "[::1]:7");
        for bad in ["http://h:1", "h:port", "", "@h:1", ":4222", "a:1,b:2", "u@"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
        let t = parse_url("tls://[::1]:4443").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.host.as_str(), t.tls),
            ("[::1]:4443", "::1", true)
        );
        assert!(!parse_url("localhost").unwrap().tls);
        let t = parse_url("nats://u:p@h:1").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.userinfo.as_deref()),
            ("h:1", Some("u:p"))
        );
        let c = Credentials::from_userinfo(Some("u:p"));
        assert_eq!(
            (c.user.as_deref(), c.password.as_deref()),
            (Some("u"), Some("p"))
        );
        let c = Credentials::from_userinfo(Some("tok"));
        assert_eq!(c.token.as_deref(), Some("tok"));
        assert!(!format!("{c:?}").contains("tok\""), "{c:?}");
    }

    #[tokio::test]
    async fn logs_in_with_password_url_and_nkey() {
        let key = nkeys::KeyPair::new_user();
        let text = format!(
            "listen = \"127.0.0.1:0\"\n[jetstream]\nenabled = false\n\
             [[authorization.users]]\nuser = \"u\"\npassword = \"p\"\n\
             [[authorization.users]]\nnkey = \"{}\"\n",
            key.public_key()
        );
        let server = skiff::Server::start(skiff::Config::from_toml(&text).unwrap())
            .await
            .unwrap();
        let addr = server.addr();
        let mut by_url = Connection::connect(&format!("nats://u:p@{addr}"))
            .await
            .unwrap();
        by_url.flush().await.unwrap();
        let creds = Credentials {
            nkey_seed: Some(key.seed().unwrap()),
            ..Credentials::default()
        };
        let endpoint = Endpoint::plain(&addr.to_string())
            .unwrap()
            .with_credentials(&creds);
        let mut by_key = Connection::connect_to(&endpoint).await.unwrap();
        by_key.flush().await.unwrap();
        let err = Connection::connect(&format!("nats://u:wrong@{addr}"))
            .await
            .err()
            .expect("a wrong password is refused");
        assert!(
            matches!(&err, Error::Server(t) if t == "Authorization Violation"),
            "{err}"
        );
        server.shutdown().await;
    }

    #[tokio::test]
    async fn publish_subscribe_and_flush() {
        let server = server().await;
        let mut sub = Connection::connect(&server.client_url()).await.unwrap();
        assert!(sub.info().headers);
        let sid = sub.subscribe(b"a.*", None);
        sub.unsubscribe(sid, Some(3));
        sub.flush().await.unwrap();

        let mut publisher = Connection::connect(&server.client_url()).await.unwrap();
        // More than one write chunk, so that publish writes on its own.
        let body = vec![b'x'; 1000];
        for _ in 0..100 {
            publisher.publish(b"a.b", None, &body).await.unwrap();
        }
        publisher.flush().await.unwrap();
        for _ in 0..3 {
            let m = sub.next_message().await.unwrap();
            assert_eq!((m.subject(), m.data().len()), (&b"a.b"[..], 1000));
        }
        // Auto-unsubscribed after 3: a flush sees no further message.
        sub.flush().await.unwrap();
        assert!(sub.backlog.is_empty());
        server.shutdown().await;
    }

    #[tokio::test]
    async fn request_reply_timeout_and_no_responders() {
        let server = server().await;
        let url = server.client_url();
        let mut replier = Connection::connect(&url).await.unwrap();
        replier.subscribe(b"svc", Some(b"q"));
        replier.flush().await.unwrap();
        let serve = tokio::spawn(async move {
            let m = replier.next_message().await.unwrap();
            let reply = m.reply().unwrap().to_vec();
            replier.publish(&reply, None, b"pong").await.unwrap();
            replier.flush().await.unwrap();
            replier
        });

        let mut requester = Connection::connect(&url).await.unwrap();
        let m = requester
            .request(b"svc", b"ping", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(m.data(), b"pong");
        let _replier = serve.await.unwrap();

        // The replier is alive but no longer answers: a timeout.
        let err = requester
            .request(b"svc", b"ping", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout), "{err}");
        let err = requester
            .request(b"nobody", b"", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NoResponders(_)), "{err}");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn oversized_publish_is_refused_locally() {
        let server = server().await;
        let mut conn = Connection::connect(&server.client_url()).await.unwrap();
        let big = vec![0; conn.info().max_payload + 1];
        let err = conn.publish(b"x", None, &big).await.unwrap_err();
        assert!(matches!(err, Error::MaxPayload { .. }), "{err}");
        conn.flush().await.unwrap();
        server.shutdown().await;
    }

    #[tokio::test]
    async fn connecting_to_nothing_fails() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let err = Connection::connect(&addr.to_string())
            .await
            .err()
            .expect("nothing listens");
        assert!(matches!(err, Error::Connect { .. }), "{err}");
    }
}
