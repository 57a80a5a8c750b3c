//! One client connection: its read loop (parse → handle each op), its write
//! loop (drain the outbound queue to the socket), pings, limits, and the
//! cleanup when it goes.
//!
//! Two tasks per connection:
//! - the **reader** owns the read half, the parser state and the connection's
//!   options; it handles a whole read batch and then wakes, once each, every
//!   writer the batch queued frames for ([`WakeList`]);
//! - the **writer** owns the write half and writes whatever [`Outbound`] holds,
//!   with a deadline per write.
//!
//! What other tasks may touch lives in [`ClientShared`]: the outbound queue,
//! the subscription map (auto-unsubscribe removes entries from the
//! publisher's task), and the kill switch.
//!
//! Authentication: when the server has an
//! [`Authenticator`](crate::auth::Authenticator), INFO says
//! `auth_required` (with a nonce when nkey users exist), the first op must be
//! a CONNECT with good credentials within the auth timeout, and anything
//! else closes the connection: refused at its first byte, as nats-server
//! does, and until CONNECT is accepted the reader takes in no more than
//! `max_control_line` bytes, so a client that has not logged in cannot make
//! the server buffer a payload or an endless line. The accepted client's permissions are checked
//! on each PUB (through a per-connection [`PublishCache`]) and SUB, and at
//! delivery for subscriptions flagged by [`SubscribeCheck::Filtered`].
//!
//! Reloadable settings: a connection is served with the [`Live`] settings
//! current when it was accepted, and picks up a reloaded one at its next
//! read batch (one relaxed load tells): `max_payload`, `max_control_line`,
//! `max_subscriptions` and `max_pings_out` reach existing connections
//! that way. `max_pending`, `ping_interval` and `write_deadline` are fixed
//! when the connection starts, and so are its authenticator (judged
//! against the users of its greeting) and, once logged in, its user and
//! permissions.
//!
//! Invariants: every exit path runs [`Connection::cleanup`], which removes all
//! of the client's subscriptions from the sublist (breaking the
//! `Subscription → ClientShared` reference cycle) and deregisters it.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant, MissedTickBehavior};

use crate::auth::{
    Authenticator, PermissionViolation, Permissions, PublishCache, Replies, SubscribeCheck,
    AUTH_TIMEOUT, AUTH_VIOLATION,
};
use crate::connection::{read_some, write_loop, CloseReason, Link, ReadBuffer, WakeList};
use crate::protocol::{
    encode_err, encode_info, parse_client_op, ClientOp, ConnectOptions, Message, ProtocolError,
    CRLF, OK, PING, PONG,
};
use crate::server::{Live, ServerState};
use crate::subject;
use crate::subscription::{Subscriber, Subscription};
use crate::tls::{self, PeerIdentity};

/// The status a request gets when nobody is subscribed to its subject.
const NO_RESPONDERS: &[u8] = b"NATS/1.0 503\r\n\r\n";

/// What a connection said about itself and how it is secured, for
/// monitoring (`/connz`).
#[derive(Clone, Debug, Default)]
pub struct Details {
    pub lang: String,
    pub version: String,
    /// The authenticated user, when users are configured.
    pub user: Option<String>,
    /// TLS protocol version and cipher suite, for TLS connections.
    pub tls_version: Option<String>,
    pub tls_cipher: Option<String>,
}

/// The part of a client other tasks may touch: its [`Link`] (outbound
/// queue, writer, kill switch, traffic counts), which it derefs to, and what
/// only clients have.
pub struct ClientShared {
    pub link: Arc<Link>,
    details: Mutex<Details>,
    /// The client said `headers: true` in CONNECT.
    headers: AtomicBool,
    /// The client said `protocol: 1` in CONNECT: it takes INFO updates.
    info_updates: AtomicBool,
    subs: Mutex<HashMap<Bytes, Arc<Subscription>, ahash::RandomState>>,
    /// Set once at CONNECT when the client's user has permissions.
    auth: OnceLock<ClientAuth>,
}

impl std::ops::Deref for ClientShared {
    type Target = Link;

    fn deref(&self) -> &Link {
        &self.link
    }
}

/// What delivery to a client with permissions needs to know.
struct ClientAuth {
    permissions: Arc<Permissions>,
    /// Reply subjects of requests delivered, when `allow_responses`.
    replies: Option<Mutex<Replies>>,
}

impl ClientShared {
    pub(crate) fn new(id: u64, addr: SocketAddr, max_pending: usize) -> ClientShared {
        ClientShared {
            link: Arc::new(Link::new(id, addr, max_pending)),
            details: Mutex::new(Details::default()),
            headers: AtomicBool::new(false),
            info_updates: AtomicBool::new(false),
            subs: Mutex::new(HashMap::default()),
            auth: OnceLock::new(),
        }
    }

    /// Remembers the reply subject of a request delivered to a client that
    /// may answer requests (`allow_responses`).
    fn note_reply(&self, msg: &Message) {
        let (Some(reply), Some(auth)) = (msg.reply(), self.auth.get()) else {
            return;
        };
        if let Some(replies) = &auth.replies {
            replies.lock().record(reply, std::time::Instant::now());
        }
    }

    /// Uses up one allowed reply to `subject`, if there is one.
    fn consume_reply(&self, subject: &[u8]) -> bool {
        self.auth
            .get()
            .and_then(|a| a.replies.as_ref())
            .is_some_and(|r| r.lock().consume(subject, std::time::Instant::now()))
    }

    /// Sends an INFO update (`connect_urls` changed) if the client takes them.
    pub(crate) fn send_info_update(self: &Arc<Self>, line: &[u8]) {
        if self.info_updates.load(Ordering::Relaxed) {
            self.link.outbound_bytes(line);
        }
    }

    /// Number of subscriptions this client holds.
    pub fn subscription_count(&self) -> usize {
        self.subs.lock().len()
    }

    /// Subject and queue group of each of this client's subscriptions.
    pub fn subscriptions(&self) -> Vec<(Bytes, Option<Bytes>)> {
        let subs = self.subs.lock();
        subs.values()
            .map(|s| (s.subject.clone(), s.queue.clone()))
            .collect()
    }

    pub fn details(&self) -> Details {
        self.details.lock().clone()
    }
}

/// A client is a subscriber: its subscriptions' messages go to its
/// outbound queue.
impl Subscriber for ClientShared {
    /// Queues `msg` for subscription `sid`. A client that cannot take it
    /// within `max_pending` is cut off as a slow consumer.
    fn deliver(&self, sid: &[u8], msg: &Message, wakes: &mut WakeList) -> bool {
        let pushed = self
            .outbound
            .push_msg(sid, msg, self.headers.load(Ordering::Relaxed));
        let queued = self.link.queued(pushed, wakes);
        if queued {
            self.note_reply(msg);
        }
        queued
    }

    /// Whether this client's permissions keep a message on `subject` from
    /// it (asked only for subscriptions flagged at SUB).
    fn denies(&self, subject: &[u8]) -> bool {
        self.auth
            .get()
            .is_some_and(|a| a.permissions.denies_delivery(subject))
    }

    fn connection_id(&self) -> Option<u64> {
        Some(self.id)
    }

    /// Drops `sid` from this client's map (the sublist no longer holds it).
    fn forget(&self, sid: &[u8]) {
        self.subs.lock().remove(sid);
    }
}

impl fmt::Display for ClientShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.link.fmt(f)
    }
}

/// Options from CONNECT. Before CONNECT a client is verbose and pedantic, as
/// nats-server's defaults are: a telnet user sees `+OK` and subject errors.
struct Options {
    verbose: bool,
    pedantic: bool,
    echo: bool,
    headers: bool,
    no_responders: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            verbose: true,
            pedantic: true,
            echo: true,
            headers: false,
            no_responders: false,
        }
    }
}

impl Options {
    /// Fields the client left out keep their current value.
    fn apply(&mut self, c: &ConnectOptions) {
        self.verbose = c.verbose.unwrap_or(self.verbose);
        self.pedantic = c.pedantic.unwrap_or(self.pedantic);
        self.echo = c.echo.unwrap_or(self.echo);
        self.headers = c.headers.unwrap_or(self.headers);
        self.no_responders = c.no_responders.unwrap_or(self.no_responders);
    }
}

/// The reader side of one connection.
struct Connection {
    server: Arc<ServerState>,
    /// The reloadable settings in force; see the module docs.
    live: Arc<Live>,
    /// Judges this connection's CONNECT: the one its greeting was made for
    /// (the nonce in INFO depends on it), kept across reloads.
    auth: Option<Arc<Authenticator>>,
    client: Arc<ClientShared>,
    options: Options,
    pings_out: u32,
    wakes: WakeList,
    /// Auth is required and CONNECT has not been accepted yet.
    awaiting_auth: bool,
    /// A CONNECT waiting to be judged; set only while `awaiting_auth`.
    pending_connect: Option<ConnectOptions>,
    /// The nonce this connection's INFO carried.
    nonce: Option<String>,
    /// The verified client certificate's identity, when certificates name
    /// users (`verify_and_map`); `None` otherwise.
    cert: Option<PeerIdentity>,
    /// The client's permissions (`None`: unrestricted, no checks at all).
    permissions: Option<Arc<Permissions>>,
    publish_cache: PublishCache,
    /// Messages and payload bytes received in this read batch.
    received: (u64, u64),
}

/// Registers a newly accepted connection. Called on the accept loop itself,
/// so that `max_connections` counts every accepted client, even ones whose
/// task has not run yet.
pub(crate) fn register(server: &ServerState, live: &Live, addr: SocketAddr) -> Arc<ClientShared> {
    let id = server.next_client_id();
    let client = Arc::new(ClientShared::new(id, addr, live.config.max_pending));
    server.clients.insert(id, Arc::clone(&client));
    server.stats.connected();
    client
}

/// Serves one accepted TCP connection in plain text until it closes.
/// `live`: the settings current when it was accepted.
pub(crate) async fn serve(
    server: Arc<ServerState>,
    live: Arc<Live>,
    client: Arc<ClientShared>,
    stream: TcpStream,
) {
    let (info, greeting) = greet(&server, live, &client, false);
    let _ = client.outbound.push_bytes(&info);
    let (reader, writer) = stream.into_split();
    serve_split(server, client, reader, writer, greeting).await;
}

/// [`serve`] for a server that requires TLS: the handshake, then the
/// connection over it. A task of its own type (see the accept loop): its
/// state is larger, and plain connections' tasks must not be sized by it.
pub(crate) async fn serve_tls(
    server: Arc<ServerState>,
    live: Arc<Live>,
    client: Arc<ClientShared>,
    stream: TcpStream,
    tls: Arc<tls::ServerTls>,
) {
    let (info, mut greeting) = greet(&server, live, &client, tls.verify);
    // Boxed: the handshake's own state is needed only until it ends.
    let handshake = tokio::select! {
        result = Box::pin(tls::accept(&tls, stream, &info)) => result,
        _ = server.shutdown.cancelled() => Err(tls::HandshakeError::Shutdown),
    };
    match handshake {
        Ok((stream, identity)) => {
            if tls.handshake_first {
                let _ = client.outbound.push_bytes(&info);
            }
            {
                let session = stream.get_ref().1;
                let mut details = client.details.lock();
                details.tls_version = session.protocol_version().map(|v| format!("{v:?}"));
                details.tls_cipher = session
                    .negotiated_cipher_suite()
                    .map(|c| format!("{:?}", c.suite()));
            }
            if let Some(identity) = &identity {
                tracing::debug!("{client} - TLS client certificate: {identity}");
            }
            greeting.cert = identity.filter(|_| tls.map_to_user);
            let (reader, writer) = tokio::io::split(stream);
            serve_split(server, client, reader, writer, greeting).await
        }
        Err(e @ (tls::HandshakeError::Closed | tls::HandshakeError::Shutdown)) => {
            // Port probes and health checks connect and leave: not news.
            tracing::debug!("{client} - {e}");
            server.clients.remove(&client.id);
        }
        Err(e) => {
            // The client's doing (or its network's), not the server's: a
            // warning, naming the client, not an error.
            tracing::warn!("{client} - {e}");
            server.clients.remove(&client.id);
        }
    }
}

/// What a connection's greeting told or learnt about the client, for
/// authentication when its CONNECT arrives, and the settings it was made
/// with.
pub(crate) struct Greeting {
    live: Arc<Live>,
    /// The nonce INFO carried (only when nkey users exist).
    nonce: Option<String>,
    /// The verified certificate's identity, when certificates name users.
    cert: Option<PeerIdentity>,
}

/// The INFO this client is greeted with, and the nonce in it.
fn greet(
    server: &ServerState,
    live: Arc<Live>,
    client: &ClientShared,
    tls_verify: bool,
) -> (BytesMut, Greeting) {
    let mut info = server.client_info_from(&live);
    info.client_id = client.id;
    info.client_ip = client.addr.ip().to_string();
    info.tls_verify = tls_verify;
    info.nonce = live
        .auth
        .as_ref()
        .filter(|a| a.needs_nonce())
        .map(|_| Authenticator::new_nonce());
    let mut line = BytesMut::new();
    encode_info(&mut line, &info);
    let greeting = Greeting {
        live,
        nonce: info.nonce,
        cert: None,
    };
    (line, greeting)
}

/// Serves a connection given as two halves (of a TCP or a TLS stream) whose
/// INFO has already been sent or queued, with what that [`Greeting`] holds.
pub(crate) async fn serve_split<R, W>(
    server: Arc<ServerState>,
    client: Arc<ClientShared>,
    reader: R,
    writer: W,
    greeting: Greeting,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!("{client} - Client connection created");
    let live = greeting.live;
    let write_task = tokio::spawn(write_loop(
        Arc::clone(&client.link),
        writer,
        live.config.write_deadline,
    ));
    let auth = live.auth.clone();
    let mut conn = Connection {
        awaiting_auth: auth.is_some(),
        pending_connect: None,
        server,
        live,
        auth,
        client,
        options: Options::default(),
        pings_out: 0,
        wakes: WakeList::default(),
        nonce: greeting.nonce,
        cert: greeting.cert,
        permissions: None,
        publish_cache: PublishCache::default(),
        received: (0, 0),
    };
    let reason = conn.read_loop(reader).await;
    conn.cleanup(reason, write_task).await;
}

/// Refuses a connection: INFO, then `-ERR 'text'`, then close.
pub(crate) async fn refuse(
    server: Arc<ServerState>,
    live: Arc<Live>,
    mut stream: TcpStream,
    text: &'static str,
) {
    let mut out = BytesMut::new();
    encode_info(&mut out, &server.client_info_from(&live));
    encode_err(&mut out, &text);
    let _ = timeout(live.config.write_deadline, stream.write_all(&out)).await;
    let _ = stream.shutdown().await;
}

impl Connection {
    async fn read_loop<R: AsyncRead + Unpin>(&mut self, mut reader: R) -> CloseReason {
        let mut buf = ReadBuffer::new();
        let period = self.live.config.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let client = Arc::clone(&self.client);
        let shutdown = self.server.shutdown.clone();
        // Disabled by its guard once CONNECT is accepted (or when no auth
        // is configured, where the period is never used).
        let auth_timeout = self.auth.as_ref().map_or(period, |a| a.timeout());
        let auth_deadline = tokio::time::sleep(auth_timeout);
        tokio::pin!(auth_deadline);
        loop {
            let room = buf.prepare();
            let read_limit = self.pre_connect_read_limit(buf.buf.len());
            tokio::select! {
                biased;
                reason = client.killed() => return reason,
                _ = shutdown.cancelled() => return CloseReason::ServerShutdown,
                _ = client.close_requested() => return CloseReason::ServerShutdown,
                _ = &mut auth_deadline, if self.awaiting_auth => {
                    tracing::debug!("{} - {AUTH_TIMEOUT}", self.client);
                    self.send_err(&AUTH_TIMEOUT);
                    self.wakes.wake_all();
                    return CloseReason::AuthenticationTimeout;
                }
                _ = ping.tick() => {
                    let result = self.ping_tick();
                    self.wakes.wake_all();
                    if let Err(reason) = result {
                        return reason;
                    }
                }
                read = read_some(&mut reader, &mut buf.buf, read_limit) => {
                    match read {
                        Ok(0) => return CloseReason::ClientClosed,
                        Ok(n) => {
                            buf.record(n, read_limit.map_or(room, |l| room.min(l)));
                            let mut result = self.process(&mut buf);
                            // A CONNECT to judge pauses the batch; the ops
                            // after it wait for the verdict.
                            while result.is_ok() {
                                let Some(options) = self.pending_connect.take() else {
                                    break;
                                };
                                self.wakes.wake_all();
                                result = match self.authenticate(options).await {
                                    Ok(()) => self.process(&mut buf),
                                    Err(reason) => Err(reason),
                                };
                            }
                            self.wakes.wake_all();
                            self.client.add_received(&mut self.received);
                            buf.settle();
                            if let Err(reason) = result {
                                return reason;
                            }
                        }
                        Err(e) => {
                            tracing::debug!("{} - read error: {e}", self.client);
                            return CloseReason::ReadError;
                        }
                    }
                }
            }
        }
    }

    /// How much the next read may take while the client has yet to log in
    /// (`None`: no limit but the buffer's room). Until its CONNECT is
    /// accepted, a client that must authenticate can send nothing but that
    /// one control line, so the server never holds more than
    /// `max_control_line` and its line end for it, however much it sends.
    fn pre_connect_read_limit(&self, buffered: usize) -> Option<usize> {
        if !self.awaiting_auth {
            return None;
        }
        let most = self.live.limits.max_control_line + CRLF.len();
        // Never 0: a read of 0 bytes would look like the end of the stream.
        // (What is buffered is at most `most - 1`: a longer line without its
        // end is refused by the parser.)
        Some(most.saturating_sub(buffered).max(1))
    }

    /// Handles every complete op in `buf`, with the current settings.
    fn process(&mut self, read: &mut ReadBuffer) -> Result<(), CloseReason> {
        // Every op parsed here lies in the allocation the buffer has read
        // into since `prepare` (which alone replaces it).
        let pins = read.alloc();
        let buf = &mut read.buf;
        if self.live.version != self.server.live_version() {
            self.live = self.server.live();
        }
        let limits = self.live.limits;
        loop {
            // nats-server refuses at the first byte that cannot start
            // CONNECT, rather than waiting for the whole op: a PUB's payload
            // is never buffered for a client that has not logged in.
            if self.awaiting_auth && buf.first().is_some_and(|b| !b.eq_ignore_ascii_case(&b'C')) {
                return Err(self.auth_violation(&"operation before CONNECT"));
            }
            match parse_client_op(buf, &limits) {
                Ok(Some(mut op)) => {
                    if let ClientOp::Pub(msg) = &mut op {
                        msg.set_pins(pins);
                    }
                    self.handle(op)?;
                    if self.pending_connect.is_some() {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.protocol_error(e)),
            }
        }
    }

    fn protocol_error(&mut self, e: ProtocolError) -> CloseReason {
        tracing::warn!("{} - Client parser ERROR: {e}", self.client);
        self.send_err(&e);
        match e {
            ProtocolError::MaxPayload => CloseReason::MaxPayloadExceeded,
            ProtocolError::MaxControlLine => CloseReason::MaxControlLineExceeded,
            ProtocolError::UnknownOperation | ProtocolError::InvalidArguments(_) => {
                CloseReason::ParseError
            }
        }
    }

    fn handle(&mut self, op: ClientOp) -> Result<(), CloseReason> {
        // Follows the log level, which a reload may change.
        if tracing::enabled!(tracing::Level::TRACE) {
            self.trace_op(&op);
        }
        if self.awaiting_auth && !matches!(op, ClientOp::Connect(_)) {
            // nats-server: with auth required, the first op must be CONNECT.
            return Err(self.auth_violation(&"operation before CONNECT"));
        }
        match op {
            ClientOp::Pub(msg) => self.publish(msg),
            ClientOp::Sub {
                subject,
                queue,
                sid,
            } => self.subscribe(subject, queue, sid),
            ClientOp::Unsub { sid, max } => self.unsubscribe(&sid, max),
            ClientOp::Ping => self.send(PONG),
            ClientOp::Pong => self.pings_out = 0,
            ClientOp::Connect(json) => return self.connect(&json),
        }
        Ok(())
    }

    /// Traces an op; CONNECT with its secrets redacted.
    fn trace_op(&self, op: &ClientOp) {
        match op {
            ClientOp::Connect(json) => {
                let shown = ConnectOptions::from_json(json)
                    .ok()
                    .and_then(|c| serde_json::to_string(&c.redacted()).ok())
                    .unwrap_or_else(|| "(invalid JSON)".to_string());
                tracing::trace!("{} - <<- CONNECT {shown}", self.client);
            }
            op => tracing::trace!("{} - <<- {op:?}", self.client),
        }
    }

    /// Refuses the client: `-ERR 'Authorization Violation'`, then close.
    fn auth_violation(&mut self, why: &dyn fmt::Display) -> CloseReason {
        tracing::warn!("{} - authentication error: {why}", self.client);
        self.send_err(&AUTH_VIOLATION);
        CloseReason::AuthenticationViolation
    }

    /// Checks the credentials of a CONNECT, takes the user's permissions,
    /// then applies the CONNECT. The check runs on the blocking pool: a
    /// bcrypt verification takes milliseconds by design, which must not
    /// stall the other connections of this worker thread.
    async fn authenticate(&mut self, options: ConnectOptions) -> Result<(), CloseReason> {
        let Some(auth) = self.auth.clone() else {
            return Err(self.auth_violation(&"no authenticator"));
        };
        let (nonce, cert) = (self.nonce.clone(), self.cert.clone());
        let (accepted, options) = match auth.authenticate_off_thread(options, nonce, cert).await {
            Ok(accepted) => accepted,
            Err(e) => return Err(self.auth_violation(&e)),
        };
        self.awaiting_auth = false;
        tracing::debug!("{} - authenticated as {:?}", self.client, accepted.user);
        self.client.details.lock().user = Some(accepted.user.clone());
        if let Some(permissions) = accepted.permissions {
            let replies = permissions
                .responses()
                .map(|(max, expires)| Mutex::new(Replies::new(max, expires)));
            let _ = self.client.auth.set(ClientAuth {
                permissions: Arc::clone(&permissions),
                replies,
            });
            self.permissions = Some(permissions);
        }
        self.apply_connect(options)
    }

    fn connect(&mut self, json: &[u8]) -> Result<(), CloseReason> {
        let options = match ConnectOptions::from_json(json) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!("{} - {e}", self.client);
                self.send_err(&"Invalid CONNECT JSON");
                return Err(CloseReason::ParseError);
            }
        };
        if self.awaiting_auth {
            // Judged by the read loop, off this thread: see `authenticate`.
            self.pending_connect = Some(options);
            return Ok(());
        }
        self.apply_connect(options)
    }

    /// Takes the options of an accepted CONNECT.
    fn apply_connect(&mut self, options: ConnectOptions) -> Result<(), CloseReason> {
        self.options.apply(&options);
        if self.options.no_responders && !self.options.headers {
            self.send_err(&"no responders requires headers support");
            return Err(CloseReason::ParseError);
        }
        self.client
            .headers
            .store(self.options.headers, Ordering::Relaxed);
        if options.protocol.is_some_and(|p| p >= 1) {
            self.client.info_updates.store(true, Ordering::Relaxed);
        }
        {
            let mut details = self.client.details.lock();
            details.lang = options.lang.clone().unwrap_or_default();
            details.version = options.version.clone().unwrap_or_default();
        }
        if let Some(name) = options.name {
            *self.client.name.lock() = name;
        }
        self.ok();
        Ok(())
    }

    fn publish(&mut self, msg: Message) {
        self.received.0 += 1;
        self.received.1 += msg.payload().len() as u64;
        if self.options.pedantic && !subject::is_valid_literal_subject(msg.subject()) {
            self.send_err(&"Invalid Publish Subject");
            return;
        }
        if !self.may_publish(msg.subject()) {
            let violation = PermissionViolation::Publish(msg.subject().to_vec());
            tracing::warn!("{} - {violation}", self.client);
            self.send_err(&violation);
            return;
        }
        // nats-server acknowledges a verbose PUB before delivering it, so a
        // client subscribed to its own subject sees +OK before the MSG.
        self.ok();
        let skip = (!self.options.echo).then_some(self.client.id);
        let delivered = self.server.route(&msg, skip, &mut self.wakes);
        if !delivered && self.options.no_responders && self.options.headers {
            if let Some(reply) = msg.reply() {
                self.no_responders(reply);
            }
        }
    }

    /// Whether the client's permissions let it publish to `subject`: its
    /// publish rules (cached per connection), else a reply it owes.
    fn may_publish(&mut self, subject: &[u8]) -> bool {
        let Some(permissions) = &self.permissions else {
            return true;
        };
        self.publish_cache.can_publish(permissions, subject) || self.client.consume_reply(subject)
    }

    /// Tells the requester nobody listens: an `HMSG` with status 503 on its
    /// own subscription that matches the reply subject.
    fn no_responders(&mut self, reply: &[u8]) {
        let sid = {
            let subs = self.client.subs.lock();
            subs.values()
                .find(|s| subject::matches_pattern(&s.subject, reply))
                .map(|s| s.sid.clone())
        };
        if let Some(sid) = sid {
            let status = Message::new(reply, None, Some(NO_RESPONDERS.len()), NO_RESPONDERS);
            self.client.deliver(&sid, &status, &mut self.wakes);
        }
    }

    fn subscribe(&mut self, subject: Bytes, queue: Option<Bytes>, sid: Bytes) {
        if !subject::is_valid_subject(&subject) {
            self.send_err(&"Invalid Subject");
            return;
        }
        let check = self
            .permissions
            .as_ref()
            .map_or(SubscribeCheck::Allowed, |p| p.check_subscribe(&subject));
        if check == SubscribeCheck::Refused {
            let violation = PermissionViolation::Subscribe {
                subject: subject.to_vec(),
                queue: queue.as_ref().map(|q| q.to_vec()),
            };
            tracing::warn!("{} - {violation}", self.client);
            self.send_err(&violation);
            return;
        }
        let sub = {
            let mut subs = self.client.subs.lock();
            let max = self.live.config.max_subscriptions;
            if subs.contains_key(&sid) {
                // nats-server ignores a SUB that reuses a live sid.
                None
            } else if max > 0 && subs.len() >= max {
                drop(subs);
                self.send_err(&"maximum subscriptions exceeded");
                return;
            } else {
                let mut sub = Subscription::new(
                    &subject,
                    queue.as_deref(),
                    &sid,
                    Arc::clone(&self.client) as Arc<dyn Subscriber>,
                );
                if check == SubscribeCheck::Filtered {
                    sub = sub.with_deny_filter();
                }
                let sub = Arc::new(sub);
                // Keyed by the subscription's own copy of the sid, not the
                // parsed one (a slice of the read buffer).
                subs.insert(sub.sid.clone(), Arc::clone(&sub));
                Some(sub)
            }
        };
        if let Some(sub) = sub {
            // Validated above, so the insert cannot fail.
            let _ = self.server.list_subscription(&sub);
        }
        self.ok();
    }

    fn unsubscribe(&mut self, sid: &[u8], max: Option<u64>) {
        let sub = self.client.subs.lock().get(sid).cloned();
        if let Some(sub) = sub {
            let keep = matches!(max, Some(m) if m > 0 && !sub.set_max(m));
            if !keep {
                self.server.end_subscription(&sub);
            }
        }
        self.ok();
    }

    /// The ping timer fired: ping the client, or close it if it has not
    /// answered `max_pings_out` pings.
    fn ping_tick(&mut self) -> Result<(), CloseReason> {
        if self.pings_out + 1 > self.live.config.max_pings_out {
            tracing::debug!("{} - Stale Client Connection - Closing", self.client);
            self.send_err(&"Stale Connection");
            return Err(CloseReason::StaleConnection);
        }
        self.pings_out += 1;
        self.send(PING);
        Ok(())
    }

    fn ok(&mut self) {
        if self.options.verbose {
            self.send(OK);
        }
    }

    fn send_err(&mut self, text: &dyn fmt::Display) {
        let mut line = BytesMut::new();
        encode_err(&mut line, text);
        self.send(&line);
    }

    fn send(&mut self, bytes: &[u8]) {
        let pushed = self.client.outbound.push_bytes(bytes);
        self.client.link.queued(pushed, &mut self.wakes);
    }

    /// Removes every trace of the client from the server, then lets the
    /// writer flush what is queued (within `write_deadline`) and close.
    async fn cleanup(mut self, reason: CloseReason, write_task: tokio::task::JoinHandle<()>) {
        let subs: Vec<_> = self.client.subs.lock().drain().map(|(_, s)| s).collect();
        for sub in &subs {
            self.server.unlist_subscription(sub);
        }
        self.client.add_received(&mut self.received);
        self.server.clients.remove(&self.client.id);
        self.client
            .finish(write_task, self.live.config.write_deadline)
            .await;
        self.server.stats.closed(&self.client, reason);
        tracing::debug!("{} - Client connection closed: {reason}", self.client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    /// Every idle connection holds its reader's and its writer's task, so
    /// their futures' sizes are memory per connection. Two things made them
    /// balloon before: the TLS path's state in the same future as the plain
    /// path (4.5 KB for plain connections too) and the iovec array held
    /// across the write's `.await` (1 KB). The bounds leave room for small changes, not for
    /// either of those to come back.
    #[tokio::test]
    async fn idle_connection_tasks_stay_small() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let socket = std::net::TcpStream::connect(addr).expect("connect");
        socket.set_nonblocking(true).expect("non-blocking");
        let stream = TcpStream::from_std(socket).expect("tokio stream");
        let server = Arc::new(ServerState::for_tests(Config::core("127.0.0.1:0"), addr));
        let live = server.live();
        let client = register(&server, &live, addr);
        let serving = serve(Arc::clone(&server), live, Arc::clone(&client), stream);
        let size = std::mem::size_of_val(&serving);
        assert!(size <= 2560, "the reader's task future is {size} bytes");
        let (_peer, half) = tokio::io::duplex(64);
        let writing = write_loop(Arc::clone(&client.link), half, Duration::from_secs(1));
        let size = std::mem::size_of_val(&writing);
        assert!(size <= 512, "the writer's task future is {size} bytes");
    }
}
