//! One route: a connection to a peer node, from handshake to cleanup.
//!
//! A route is served on the same connection plumbing as a client (a
//! [`Link`]: the bounded outbound queue, the writer task, the kill switch), so
//! forwarding a message costs what delivering it to a local client costs,
//! and a route that cannot keep up is cut off like a slow consumer (with the
//! larger `cluster.max_pending` budget).
//!
//! Handshake (the dialler is on the left):
//! ```text
//!            <- INFO {acceptor}
//! CONNECT {dialler, credentials} ->
//! INFO {dialler}                 ->
//! ```
//! after which both sides register the route with the [`Cluster`], which
//! sends it this node's interest (`RS+` for each subject and queue group),
//! and from then on `RS+`/`RS-`/`RMSG` flow both ways.
//!
//! Until the handshake is done, the peer has not proven anything (its
//! CONNECT's credentials are not yet accepted): the connection buffers at
//! most one control line, refuses a message (`RMSG`) at its header, and has
//! `HANDSHAKE_TIMEOUT` to finish. The route's large limits (payloads up to
//! `cluster.max_pending`) start with the registered route.
//!
//! Invariants: every interest a peer announced is a [`Subscription`] in the
//! sublist until the route ends; cleanup removes them all (breaking the
//! `Subscription -> Route` reference cycle) before the route is forgotten.
//! A message that came from a peer is delivered to local subscribers only
//! (one hop), so there are no loops and no duplicates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::protocol::{
    encode_msg_line, encode_route_connect, encode_route_info, msg_line_bound, parse_route_op,
    RouteConnect, RouteInfo, RouteOp,
};
use super::Cluster;
use crate::connection::{write_loop, CloseReason, Link, ReadBuffer, WakeList};
use crate::protocol::{encode_err, Limits, Message, ProtocolError, PING, PONG};
use crate::server::ServerState;
use crate::subscription::{Peer, Subscriber, Subscription};

/// Longest a new route may take to say who it is.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A peer's interest, as the key of its subscription: subject and queue.
type InterestKey = (Bytes, Option<Bytes>);

/// A registered route to one peer node.
pub struct Route {
    /// The peer's id (the key of the cluster's route table).
    pub peer_id: String,
    pub peer_name: String,
    /// Where the peer's route listener and client port are, as seen from
    /// here.
    pub route_addr: String,
    pub client_addr: String,
    /// This node dialled the connection (the duplicate rule needs it).
    pub dialed: bool,
    link: Arc<Link>,
    subs: Mutex<HashMap<InterestKey, Arc<Subscription>, ahash::RandomState>>,
    /// Cancelled when the route has ended and been forgotten.
    pub closed: CancellationToken,
}

/// A peer's interest is a subscription whose subscriber is its route:
/// routing forwards to it (see [`Peer`]) instead of delivering.
impl Subscriber for Route {
    fn deliver(&self, _sid: &[u8], _msg: &Message, _wakes: &mut WakeList) -> bool {
        false
    }

    fn peer(&self) -> Option<&dyn Peer> {
        Some(self)
    }
}

impl Peer for Route {
    /// Queues `msg` for the peer: an `RMSG` for its plain subscribers and,
    /// when `queues` is not empty, for one member of each of those groups.
    /// Returns whether it was queued.
    fn forward(&self, msg: &Message, queues: &[&[u8]], wakes: &mut WakeList) -> bool {
        let pushed = self.link.outbound.push_frame(
            msg_line_bound(msg, queues),
            msg,
            msg.payload(),
            |line| encode_msg_line(line, msg, queues),
        );
        self.link.queued(pushed, wakes)
    }
}

impl Route {
    /// Queues protocol bytes and wakes the writer at once.
    pub(crate) fn send(&self, bytes: &[u8]) {
        self.link.outbound_bytes(bytes);
    }

    /// Closes this route because another one to the same peer is kept.
    pub(crate) fn close_as_duplicate(&self) {
        self.link.cut_off(CloseReason::DuplicateRoute);
    }

    /// Number of interests the peer has announced.
    pub fn interest_count(&self) -> usize {
        self.subs.lock().len()
    }

    /// Messages forwarded to the peer and received from it.
    pub fn counts(&self) -> crate::connection::Counts {
        self.link.counts()
    }

    /// The route's connection id (`rid` in `/routez`), from the same
    /// sequence as client ids.
    pub fn id(&self) -> u64 {
        self.link.id
    }

    /// When the route was opened, and the address it runs to.
    pub fn started(&self) -> std::time::SystemTime {
        self.link.started
    }

    pub fn remote_addr(&self) -> SocketAddr {
        self.link.addr
    }

    /// Bytes queued to the peer and not yet written.
    pub fn pending(&self) -> usize {
        self.link.outbound.pending()
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} - rid:{} - \"{}\"",
            self.link.addr, self.link.id, self.peer_name
        )
    }
}

/// How a route connection ended, for the dial loop that opened it.
pub(crate) enum Outcome {
    /// It was registered and served until it dropped.
    Served,
    /// Another route to the same peer is kept; this token is cancelled when
    /// that one ends.
    Duplicate(CancellationToken),
    /// The address is this node's own route listener.
    Myself,
    /// The handshake failed (refused, garbage, timeout, shutdown).
    Failed,
}

/// A connection during its handshake.
struct Handshake<R> {
    server: Arc<ServerState>,
    cluster: Arc<Cluster>,
    link: Arc<Link>,
    reader: R,
    buf: ReadBuffer,
}

/// Serves one route connection (dialled when `dialed`, accepted
/// otherwise) until it ends.
pub(crate) async fn serve<R, W>(
    server: Arc<ServerState>,
    cluster: Arc<Cluster>,
    reader: R,
    writer: W,
    remote: SocketAddr,
    dialed: Option<RouteConnect>,
) -> Outcome
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let link = Arc::new(Link::new(
        server.next_client_id(),
        remote,
        cluster.config.max_pending,
    ));
    let write_task = tokio::spawn(write_loop(
        Arc::clone(&link),
        writer,
        server.config.write_deadline,
    ));
    let mut hs = Handshake {
        server,
        cluster,
        link,
        reader,
        buf: ReadBuffer::new(),
    };
    let greeted = tokio::time::timeout(HANDSHAKE_TIMEOUT, hs.greet(dialed.as_ref())).await;
    let peer = match greeted {
        Ok(Ok(peer)) => peer,
        Ok(Err(outcome)) => return hs.abandon(outcome, write_task).await,
        Err(_) => {
            tracing::warn!("{} - route handshake timed out", hs.link.addr);
            return hs.abandon(Outcome::Failed, write_task).await;
        }
    };
    let route = Arc::new(Route {
        peer_id: peer.server_id.clone(),
        peer_name: peer.server_name.clone(),
        route_addr: resolve(&peer.route_addr, remote),
        client_addr: resolve(&peer.client_addr, remote),
        dialed: dialed.is_some(),
        link: Arc::clone(&hs.link),
        subs: Mutex::new(HashMap::default()),
        closed: CancellationToken::new(),
    });
    if let Err(existing) = hs.cluster.register(&route) {
        tracing::debug!("{route} - duplicate route, keeping the other one");
        return hs.abandon(Outcome::Duplicate(existing), write_task).await;
    }
    tracing::info!("{route} - Route connection created");
    // This node's set of peers changed: its clients' connect_urls too.
    hs.server.announce_connect_urls();
    hs.cluster.learn(&hs.server, &peer);
    let Handshake {
        server,
        cluster,
        reader,
        mut buf,
        ..
    } = hs;
    let mut conn = Connection {
        server,
        cluster,
        route,
        pings_out: 0,
        wakes: WakeList::default(),
        received: (0, 0),
    };
    let reason = conn.read_loop(reader, &mut buf).await;
    conn.cleanup(reason, write_task).await;
    Outcome::Served
}

/// `host:port` with a wildcard host replaced by the address the route came
/// from (a node listening on `0.0.0.0` does not know which of its addresses
/// its peers reach).
fn resolve(addr: &str, remote: SocketAddr) -> String {
    match addr.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => SocketAddr::new(remote.ip(), a.port()).to_string(),
        _ => addr.to_string(),
    }
}

impl<R: AsyncRead + Unpin> Handshake<R> {
    /// Exchanges CONNECT and INFO; returns the peer's INFO.
    async fn greet(&mut self, dialed: Option<&RouteConnect>) -> Result<RouteInfo, Outcome> {
        let Some(connect) = dialed else {
            self.send_info();
            let connect = self.expect_connect().await?;
            let peer = self.expect_info().await?;
            if peer.server_id != connect.server_id {
                return Err(self.refuse(&"CONNECT and INFO name different servers"));
            }
            return Ok(peer);
        };
        let peer = self.expect_info().await?;
        if peer.server_id == self.cluster.server_id {
            return Err(Outcome::Myself);
        }
        if peer.cluster != self.cluster.config.name {
            return Err(self.refuse(&format!(
                "peer is in cluster {:?}, not {:?}",
                peer.cluster, self.cluster.config.name
            )));
        }
        let mut line = BytesMut::new();
        encode_route_connect(&mut line, connect);
        self.link.outbound_bytes(&line);
        self.send_info();
        Ok(peer)
    }

    fn send_info(&self) {
        let mut line = BytesMut::new();
        encode_route_info(&mut line, &self.cluster.route_info());
        self.link.outbound_bytes(&line);
    }

    async fn expect_connect(&mut self) -> Result<RouteConnect, Outcome> {
        let RouteOp::Connect(json) = self.next_op().await? else {
            return Err(self.refuse(&"expected CONNECT"));
        };
        let mut connect: RouteConnect = match serde_json::from_slice(&json) {
            Ok(c) => c,
            Err(e) => return Err(self.refuse(&format!("Invalid CONNECT JSON: {e}"))),
        };
        if connect.cluster != self.cluster.config.name {
            return Err(self.refuse(&format!(
                "peer is in cluster {:?}, not {:?}",
                connect.cluster, self.cluster.config.name
            )));
        }
        if let Some(auth) = &self.cluster.auth {
            // Off this worker thread: a bcrypt check takes milliseconds.
            // The credentials are not needed after it.
            let credentials = std::mem::take(&mut connect.credentials);
            let judged = Arc::clone(auth)
                .authenticate_off_thread(credentials, None, None)
                .await;
            if let Err(e) = judged {
                tracing::warn!("{} - route authentication error: {e}", self.link.addr);
                self.refuse_with(&crate::auth::AUTH_VIOLATION);
                return Err(Outcome::Failed);
            }
        }
        Ok(connect)
    }

    async fn expect_info(&mut self) -> Result<RouteInfo, Outcome> {
        match self.next_op().await? {
            RouteOp::Info(json) => serde_json::from_slice(&json)
                .map_err(|e| self.refuse(&format!("Invalid INFO JSON: {e}"))),
            RouteOp::Err(text) => {
                tracing::warn!(
                    "{} - route refused by peer: {}",
                    self.link.addr,
                    String::from_utf8_lossy(&text)
                );
                Err(Outcome::Failed)
            }
            _ => Err(self.refuse(&"expected INFO")),
        }
    }

    /// The next op, reading as needed.
    ///
    /// Until the handshake is done the peer is nobody: it may not make this
    /// node hold more than one control line (INFO or CONNECT, both within
    /// `max_control_line`). So ops are parsed with no room for a payload (an
    /// `RMSG` announcing one is refused at its header, not awaited), and no
    /// read takes the buffer past one control line and its CRLF: the route
    /// limits (payloads up to `cluster.max_pending`) apply only once the
    /// route is registered.
    async fn next_op(&mut self) -> Result<RouteOp, Outcome> {
        let limits = Limits {
            max_control_line: self.server.limits.max_control_line,
            max_payload: 0,
        };
        let cap = limits.max_control_line.saturating_add(2);
        loop {
            match parse_route_op(&mut self.buf.buf, &limits) {
                Ok(Some(op)) => return Ok(op),
                Ok(None) => {}
                Err(e) => return Err(self.refuse(&e)),
            }
            // A full buffer without a whole op: as a line too long.
            let left = cap.saturating_sub(self.buf.buf.len());
            if left == 0 {
                return Err(self.refuse(&ProtocolError::MaxControlLine));
            }
            let room = self.buf.prepare().min(left);
            let mut reader = (&mut self.reader).take(room as u64);
            let read = tokio::select! {
                read = reader.read_buf(&mut self.buf.buf) => read,
                _ = self.server.shutdown.cancelled() => return Err(Outcome::Failed),
            };
            match read {
                Ok(0) | Err(_) => return Err(Outcome::Failed),
                Ok(n) => self.buf.record(n, room),
            }
        }
    }

    fn refuse(&self, why: &dyn std::fmt::Display) -> Outcome {
        tracing::warn!("{} - route refused: {why}", self.link.addr);
        self.refuse_with(why);
        Outcome::Failed
    }

    fn refuse_with(&self, text: &dyn std::fmt::Display) {
        let mut line = BytesMut::new();
        encode_err(&mut line, text);
        self.link.outbound_bytes(&line);
    }

    /// Ends a connection that never became a route: flush what is queued
    /// (an `-ERR`), then close.
    async fn abandon(self, outcome: Outcome, write_task: tokio::task::JoinHandle<()>) -> Outcome {
        self.link
            .finish(write_task, self.server.config.write_deadline)
            .await;
        outcome
    }
}

/// A registered route's reader side.
struct Connection {
    server: Arc<ServerState>,
    cluster: Arc<Cluster>,
    route: Arc<Route>,
    pings_out: u32,
    wakes: WakeList,
    /// Messages and payload bytes received in this read batch.
    received: (u64, u64),
}

impl Connection {
    async fn read_loop<R: AsyncRead + Unpin>(
        &mut self,
        mut reader: R,
        buf: &mut ReadBuffer,
    ) -> CloseReason {
        let period = self.server.config.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let link = Arc::clone(&self.route.link);
        let shutdown = self.server.shutdown.clone();
        // Ops that arrived with the peer's INFO.
        let pins = buf.alloc();
        if let Err(reason) = self.process(&mut buf.buf, pins) {
            return reason;
        }
        loop {
            let room = buf.prepare();
            tokio::select! {
                biased;
                reason = link.killed() => return reason,
                _ = shutdown.cancelled() => return CloseReason::ServerShutdown,
                _ = ping.tick() => {
                    if self.pings_out + 1 > self.server.config.max_pings_out {
                        return CloseReason::StaleConnection;
                    }
                    self.pings_out += 1;
                    self.route.send(PING);
                }
                read = reader.read_buf(&mut buf.buf) => match read {
                    Ok(0) => return CloseReason::ClientClosed,
                    Ok(n) => {
                        buf.record(n, room);
                        let pins = buf.alloc();
                        let result = self.process(&mut buf.buf, pins);
                        self.wakes.wake_all();
                        self.route.link.add_received(&mut self.received);
                        buf.settle();
                        if let Err(reason) = result {
                            return reason;
                        }
                    }
                    Err(e) => {
                        tracing::debug!("{} - route read error: {e}", self.route);
                        return CloseReason::ReadError;
                    }
                },
            }
        }
    }

    /// Handles every complete op in `buf`, whose allocation is `pins`
    /// bytes (what a payload shared from it keeps alive).
    fn process(&mut self, buf: &mut BytesMut, pins: usize) -> Result<(), CloseReason> {
        loop {
            match parse_route_op(buf, &self.server.limits) {
                Ok(Some(mut op)) => {
                    if let RouteOp::Msg { message, .. } = &mut op {
                        message.set_pins(pins);
                    }
                    self.handle(op)?
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.protocol_error(&e)),
            }
        }
    }

    fn handle(&mut self, op: RouteOp) -> Result<(), CloseReason> {
        if self.server.config.trace {
            tracing::trace!("{} - <<- {op:?}", self.route);
        }
        match op {
            RouteOp::Msg { message, queues } => {
                self.received.0 += 1;
                self.received.1 += message.payload().len() as u64;
                self.server
                    .route_from_peer(&message, &queues, &mut self.wakes);
            }
            RouteOp::Interest { subject, queue } => match queue {
                Some((queue, members)) => self.add_interest(subject, Some(queue), members)?,
                None => self.add_interest(subject, None, 1)?,
            },
            RouteOp::NoInterest { subject, queue } => self.remove_interest(subject, queue),
            RouteOp::Ping => self.route.send(PONG),
            RouteOp::Pong => self.pings_out = 0,
            RouteOp::Ok => {}
            RouteOp::Info(json) => match serde_json::from_slice::<RouteInfo>(&json) {
                Ok(info) => self.cluster.learn(&self.server, &info),
                Err(e) => tracing::warn!("{} - ignoring invalid INFO: {e}", self.route),
            },
            RouteOp::Err(text) => {
                tracing::warn!(
                    "{} - peer says: {}",
                    self.route,
                    String::from_utf8_lossy(&text)
                );
                return Err(CloseReason::ParseError);
            }
            RouteOp::Connect(_) => {
                return Err(self.protocol_error(&"CONNECT on an established route"))
            }
        }
        Ok(())
    }

    /// The peer's clients want `subject`: forward matching messages to it.
    /// For a queue group, `members` is how many the peer has: the weight
    /// routing gives the peer when it picks a member cluster-wide (the peer
    /// then picks among its own). A repeated `RS+` is a new weight.
    fn add_interest(
        &mut self,
        subject: Bytes,
        queue: Option<Bytes>,
        members: u32,
    ) -> Result<(), CloseReason> {
        let mut subs = self.route.subs.lock();
        if let Some(sub) = subs.get(&(subject.clone(), queue.clone())) {
            sub.set_queue_weight(members);
            return Ok(());
        }
        // The subscription copies subject and queue out of the read buffer,
        // and the map is keyed by that copy, so that nothing kept for the
        // peer's interest pins the buffer the `RS+` arrived in.
        let sub = Arc::new(Subscription::new(
            &subject,
            queue.as_deref(),
            b"",
            Arc::clone(&self.route) as Arc<dyn Subscriber>,
        ));
        // Before it is in the sublist, so no message sees a wrong weight.
        sub.set_queue_weight(members);
        let key = (sub.subject.clone(), sub.queue.clone());
        // A peer's interest is not local: the server does not tell the
        // other peers about it (`Subscription::propagates`).
        if self.server.list_subscription(&sub).is_err() {
            drop(subs);
            return Err(self.protocol_error(&ProtocolError::InvalidArguments("RS+")));
        }
        subs.insert(key, sub);
        Ok(())
    }

    fn remove_interest(&mut self, subject: Bytes, queue: Option<Bytes>) {
        let removed = self.route.subs.lock().remove(&(subject, queue));
        if let Some(sub) = removed {
            self.server.unlist_subscription(&sub);
        }
    }

    fn protocol_error(&self, e: &dyn std::fmt::Display) -> CloseReason {
        tracing::warn!("{} - route protocol error: {e}", self.route);
        let mut line = BytesMut::new();
        encode_err(&mut line, e);
        self.route.send(&line);
        CloseReason::ParseError
    }

    /// Forgets everything the peer announced, deregisters the route, lets
    /// the writer flush, and arranges for the peer to be dialled again when
    /// it went away on its own.
    async fn cleanup(mut self, reason: CloseReason, write_task: tokio::task::JoinHandle<()>) {
        let subs: Vec<_> = self.route.subs.lock().drain().map(|(_, s)| s).collect();
        for sub in &subs {
            self.server.unlist_subscription(sub);
        }
        self.route.link.add_received(&mut self.received);
        self.cluster.deregister(&self.server, &self.route);
        self.route
            .link
            .finish(write_task, self.server.config.write_deadline)
            .await;
        self.server.stats.closed(&self.route.link, reason);
        self.route.closed.cancel();
        tracing::info!("{} - Route connection closed: {reason}", self.route);
        let dropped = !matches!(
            reason,
            CloseReason::ServerShutdown | CloseReason::DuplicateRoute
        );
        if dropped && !self.route.dialed {
            // The dialling side's loop redials by itself; this side learnt
            // the peer's address from its INFO and tries it too (unless the
            // dials for learnt peers are all taken: then the other side's
            // loop alone brings the route back).
            self.cluster
                .dial(&self.server, self.route.route_addr.clone(), None, false);
        }
    }
}
