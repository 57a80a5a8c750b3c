//! The server: binds the listener, accepts clients, keeps the registry of
//! connections and the sublist, routes each published message, and shuts
//! down gracefully.
//!
//! [`Server::start`] returns a [`ServerHandle`] with the bound address, so
//! tests, benchmarks and examples embed the server on port 0.
//!
//! Routing ([`ServerState::route`]) is the one place where a published
//! message meets subscriptions: it asks the sublist (cached) who matches and
//! hands the message to each plain subscription and to one member of each
//! queue group (chosen cluster-wide, each member with the same chance, or a
//! member on this node first with `cluster.prefer_local_queue_members`);
//! peers of a cluster with matching interest get it forwarded once each
//! ([`crate::cluster`]). It
//! holds no lock while doing so; each subscriber's queue has its own short
//! lock.
//!
//! Subscriptions enter and leave the sublist through
//! [`ServerState::list_subscription`] and [`ServerState::unlist_subscription`],
//! which also keep the cluster's interest (what peers are told) in step.
//!
//! Operations: [`ServerHandle::reload`] swaps what may change while running
//! (the [`Live`] settings, TLS, declared streams; see [`crate::reload`]), and
//! [`ServerHandle::lame_duck`] stops accepting and closes the clients
//! gradually before the server stops (see [`crate::lame_duck`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use dashmap::DashMap;
use parking_lot::RwLock;
use smallvec::SmallVec;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::client::{self, ClientShared};
use crate::cluster::{names_queue, Cluster};
use crate::config::Config;
use crate::connection::{CloseReason, Counts, WakeList};
use crate::protocol::{encode_info, Limits, Message, ServerInfo};
use crate::stream::{JetStream, JetStreamError};
use crate::sublist::{InvalidSubject, QueueGroup, Sublist};
use crate::subscription::{Delivery, Peer, Scope, Subscriber, Subscription};
use crate::tls::{ReloadableTls, ServerTls};

pub use crate::reload::{ReloadError, Reloaded};

/// The version Skiff reports in INFO. Clients enable their modern code paths
/// (headers, no-responders) from it, so it names the nats-server release
/// whose client protocol Skiff implements.
pub const PROTOCOL_VERSION: &str = "2.10.0";

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("durable streams: {0}")]
    JetStream(#[from] crate::stream::JetStreamError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error(transparent)]
    Monitor(#[from] crate::monitor::MonitorError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    /// `store_dir` is not a directory the server can write to.
    #[error(
        "store directory {}: {problem}; set [jetstream] store_dir to a writable directory",
        path.display()
    )]
    StoreDir {
        path: std::path::PathBuf,
        problem: String,
    },
}

/// The entry point: `Server::start(config).await` runs a server.
pub struct Server;

impl Server {
    /// Validates `config`, binds the client listener and starts accepting.
    pub async fn start(config: Config) -> Result<ServerHandle, StartError> {
        config.validate()?;
        let tls = config.tls.as_ref().map(ServerTls::load).transpose()?;
        if config.jetstream.enabled {
            // Before anything is bound or logged, so that the one error
            // line says what is wrong instead of the store's I/O error.
            check_store_dir(&config.jetstream.store_dir)?;
        }
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen.clone(),
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen.clone(),
            source,
        })?;
        // Bound before anything is started, so a taken port fails cleanly.
        let http = match &config.http {
            Some(http) => Some(crate::monitor::bind(http).await?),
            None => None,
        };
        let state = Arc::new(ServerState::new(config, addr, tls));
        tracing::info!("Starting skiff {}", env!("CARGO_PKG_VERSION"));
        tracing::info!("  Server ID: {}", state.info.server_id);
        if state.config.jetstream.enabled {
            start_jetstream(&state).await?;
        }
        if state.tls.is_some() {
            tracing::info!("TLS required for client connections");
        }
        let route_addr = match &state.config.cluster {
            Some(config) => {
                let (cluster, bound) = Cluster::start(&state, config).await?;
                let _ = state.cluster.set(cluster);
                Some(bound)
            }
            None => None,
        };
        let http_addr = http.map(|listener| crate::monitor::serve(&state, listener));
        tracing::info!("Listening for client connections on {addr}");
        let accept = tokio::spawn(accept_loop(Arc::clone(&state), listener));
        tracing::info!("Server is ready");
        Ok(ServerHandle {
            state,
            accept,
            route_addr,
            http_addr,
        })
    }
}

/// Refuses a `store_dir` that exists but is not a directory, cannot be
/// created, or cannot be written to (as the server's user).
fn check_store_dir(dir: &std::path::Path) -> Result<(), StartError> {
    let problem = |problem: String| StartError::StoreDir {
        path: dir.to_owned(),
        problem,
    };
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => return Err(problem("it is not a directory".into())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(|e| problem(format!("cannot create it: {e}")))?
        }
        Err(e) => return Err(problem(format!("cannot read it: {e}"))),
    }
    use rustix::fs::{access, Access};
    access(dir, Access::WRITE_OK | Access::EXEC_OK)
        .map_err(|e| problem(format!("not writable: {}", std::io::Error::from(e))))
}

/// `usize` is 64 bits wherever Skiff runs; elsewhere a limit past it is
/// as good as none.
fn saturating_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A running server. Dropping it leaves the server running; call
/// [`ServerHandle::shutdown`] to stop it.
pub struct ServerHandle {
    state: Arc<ServerState>,
    accept: tokio::task::JoinHandle<()>,
    route_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
}

impl ServerHandle {
    /// The JetStream subsystem, for the library's own tests.
    #[cfg(test)]
    pub(crate) fn jetstream(&self) -> Option<Arc<crate::stream::JetStream>> {
        self.state.jetstream.get().cloned()
    }

    /// The address clients connect to (with the real port when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// `nats://host:port` for this server.
    pub fn client_url(&self) -> String {
        format!("nats://{}", self.state.addr)
    }

    /// Number of connected clients.
    pub fn client_count(&self) -> usize {
        self.state.clients.len()
    }

    /// The address of the route listener, when the node is in a cluster.
    pub fn route_addr(&self) -> Option<SocketAddr> {
        self.route_addr
    }

    /// The address of the monitoring endpoints, when `[http]` is set.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// `nats-route://host:port` for this node, for other nodes' `routes`.
    pub fn route_url(&self) -> Option<String> {
        self.route_addr.map(|a| format!("nats-route://{a}"))
    }

    /// Server names of the peers this node has a route to.
    pub fn peer_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .state
            .cluster
            .get()
            .map(|c| c.routes().iter().map(|r| r.peer_name.clone()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Whether some peer node has announced interest in `subject` (what a
    /// test waits for before publishing on this node for a subscriber on
    /// another).
    pub fn has_route_interest(&self, subject: &str) -> bool {
        self.peers_interested(subject) > 0
    }

    /// How many peer nodes have announced interest in `subject`.
    pub fn peers_interested(&self, subject: &str) -> usize {
        let matches = self.state.sublist.matches(subject.as_bytes());
        let members = matches.queues.iter().flat_map(|g| g.members.iter());
        let mut peers: Vec<*const ()> = matches
            .plain
            .iter()
            .chain(members)
            .filter_map(|s| s.peer())
            .map(peer_address)
            .collect();
        peers.sort();
        peers.dedup();
        peers.len()
    }

    /// Messages and bytes this server has received and sent since start,
    /// clients' and routes' together.
    pub fn counts(&self) -> Counts {
        self.state.counts()
    }

    /// This server's id (as in INFO).
    pub fn server_id(&self) -> &str {
        &self.state.info.server_id
    }

    /// Applies `config` (re-read from its file on SIGHUP) to the running
    /// server: limits, users and permissions, TLS certificates, lame duck
    /// settings and declared streams. Everything is checked first and a
    /// refused change (`listen`, `[cluster]`, the store, TLS or
    /// authorization on/off, ...) leaves the server as it was. See
    /// [`crate::reload`] for what reaches existing connections.
    pub fn reload(&self, config: &Config) -> Result<Reloaded, ReloadError> {
        crate::reload::reload(&self.state, config)
    }

    /// Loads a config with `load` and reloads it ([`ServerHandle::reload`]),
    /// both on the blocking pool: reading the file and the certificates
    /// and writing declared streams to disk must not hold up an async
    /// worker thread, which serves clients meanwhile. Returns what changed
    /// and the config now in force.
    pub async fn reload_with<F>(&self, load: F) -> Result<(Reloaded, Config), ReloadError>
    where
        F: FnOnce() -> Result<Config, ReloadError> + Send + 'static,
    {
        let state = Arc::clone(&self.state);
        let reload = move || {
            let config = load()?;
            let reloaded = crate::reload::reload(&state, &config)?;
            Ok((reloaded, config))
        };
        tokio::task::spawn_blocking(reload)
            .await
            .map_err(|e| ReloadError::Aborted(e.to_string()))?
    }

    /// Enters lame duck mode: stops accepting, tells clients (INFO `ldm`)
    /// to move to another node, closes the rest gradually over
    /// `lame_duck_duration`, then stops the server; [`ServerHandle::stopped`]
    /// resolves then. Returns at once; a second call does nothing.
    pub fn lame_duck(&self) {
        crate::lame_duck::enter(&self.state);
    }

    /// Whether the server is in lame duck mode.
    pub fn is_lame_duck(&self) -> bool {
        self.state.lame_duck.load(Ordering::Relaxed)
    }

    /// Resolves once the server has stopped serving on its own (lame duck
    /// mode closed its last client) or shutdown has begun; then call
    /// [`ServerHandle::shutdown`] to finish and wait for the tasks.
    pub async fn stopped(&self) {
        self.state.shutdown.cancelled().await;
    }

    /// Stops accepting, lets every client's queued output drain (each within
    /// `write_deadline`), closes them, and returns when all are gone.
    pub async fn shutdown(self) {
        tracing::info!("Initiating Shutdown...");
        self.state.shutdown.cancel();
        let _ = self.accept.await;
        if let Some(js) = self.state.jetstream.get().cloned() {
            // Its last fsync blocks: not on a worker thread.
            let _ = tokio::task::spawn_blocking(move || js.shutdown()).await;
        }
        self.state.tasks.close();
        self.state.tasks.wait().await;
        tracing::info!("Server Exiting..");
    }
}

/// The settings a reload may change, swapped whole by
/// [`ServerHandle::reload`]. A connection takes the current one (one
/// uncontended read lock and an `Arc` clone) when it is accepted, and
/// re-takes it only when its `version` is behind
/// [`ServerState::live_version`], one relaxed load per read batch: no lock
/// per message.
pub(crate) struct Live {
    /// Bumped by each reload.
    pub version: u64,
    /// The running configuration (reloadable keys current; the others as
    /// started, since a reload that changes them is refused).
    pub config: Config,
    /// What the client parser enforces.
    pub limits: Limits,
    /// Set when `[authorization]` is configured.
    pub auth: Option<Arc<Authenticator>>,
    /// The INFO clients are greeted with, before their own fields.
    pub info: ServerInfo,
}

impl Live {
    pub(crate) fn new(version: u64, config: Config, identity: &ServerInfo) -> Live {
        let info = ServerInfo {
            max_payload: config.max_payload,
            auth_required: config.authorization.is_some(),
            ..identity.clone()
        };
        Live {
            version,
            limits: Limits {
                max_control_line: config.max_control_line,
                max_payload: config.max_payload,
            },
            auth: config
                .authorization
                .as_ref()
                .map(|a| Arc::new(Authenticator::new(a))),
            info,
            config,
        }
    }
}

/// State shared by every connection of one server.
pub(crate) struct ServerState {
    /// The configuration as started. Keys that cannot change while running
    /// (`listen`, `[cluster]`, `[jetstream]` but its streams, names) are
    /// read here; reloadable ones from [`ServerState::live`].
    pub config: Config,
    pub addr: SocketAddr,
    /// This server's identity (id, name, version) as in INFO; the INFO
    /// clients get is [`Live::info`].
    pub info: ServerInfo,
    /// What route connections are parsed with, fixed at start: payloads up
    /// to `cluster.max_pending` (which every valid `max_payload`, reloaded
    /// or not, fits in), so a peer forwarding what its clients may publish
    /// is never cut off for it.
    pub limits: Limits,
    /// `cluster.prefer_local_queue_members`, read by routing on every
    /// queue message (fixed: a reload may not change `[cluster]`).
    prefer_local_queue_members: bool,
    /// What a reload may change; see [`Live`].
    live: RwLock<Arc<Live>>,
    live_version: AtomicU64,
    /// Lame duck mode: no new clients, INFO says `ldm`.
    pub lame_duck: AtomicBool,
    /// Stops the accept loop: cancelled by lame duck mode, and by shutdown
    /// (its parent).
    pub stop_accepting: CancellationToken,
    /// TLS for client connections, when configured; swapped by a reload.
    pub tls: Option<ReloadableTls>,
    pub sublist: Sublist<Arc<Subscription>>,
    pub clients: DashMap<u64, Arc<ClientShared>>,
    /// Durable streams, when enabled.
    pub jetstream: OnceLock<Arc<JetStream>>,
    /// Why durable streams are enabled but out of service: their store
    /// could not be opened (damaged files, a full disk; see
    /// `start_jetstream`). The server runs on without them, answering the
    /// API with the reason.
    pub jetstream_offline: OnceLock<String>,
    /// Routes to peer nodes, when `[cluster]` is configured.
    pub cluster: OnceLock<Arc<Cluster>>,
    pub stats: ServerStats,
    next_client_id: AtomicU64,
    pub shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ServerState {
    /// A plain server's state on `addr`, for unit tests that need one
    /// without a listener.
    #[cfg(test)]
    pub(crate) fn for_tests(config: Config, addr: SocketAddr) -> ServerState {
        ServerState::new(config, addr, None)
    }

    fn new(config: Config, addr: SocketAddr, tls: Option<ServerTls>) -> ServerState {
        let server_id = new_server_id();
        let info = ServerInfo {
            server_name: config
                .server_name
                .clone()
                .unwrap_or_else(|| server_id.clone()),
            server_id,
            version: PROTOCOL_VERSION.to_string(),
            proto: 1,
            go: format!("skiff {}", env!("CARGO_PKG_VERSION")),
            host: addr.ip().to_string(),
            port: addr.port(),
            headers: true,
            jetstream: config.jetstream.enabled,
            max_payload: config.max_payload,
            auth_required: config.authorization.is_some(),
            tls_required: tls.is_some(),
            ..ServerInfo::default()
        };
        let limits = Limits {
            max_control_line: config.max_control_line,
            max_payload: config.cluster.as_ref().map_or(config.max_payload, |c| {
                c.max_pending.max(config.max_payload)
            }),
        };
        let live = Live::new(0, config.clone(), &info);
        let shutdown = CancellationToken::new();
        ServerState {
            prefer_local_queue_members: config
                .cluster
                .as_ref()
                .is_some_and(|c| c.prefer_local_queue_members),
            config,
            addr,
            info,
            limits,
            live: RwLock::new(Arc::new(live)),
            live_version: AtomicU64::new(0),
            lame_duck: AtomicBool::new(false),
            stop_accepting: shutdown.child_token(),
            tls: tls.map(ReloadableTls::new),
            sublist: Sublist::new(),
            clients: DashMap::new(),
            jetstream: OnceLock::new(),
            jetstream_offline: OnceLock::new(),
            cluster: OnceLock::new(),
            stats: ServerStats::new(),
            next_client_id: AtomicU64::new(1),
            shutdown,
            tasks: TaskTracker::new(),
        }
    }

    /// The current reloadable settings; see [`Live`].
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&self.live.read())
    }

    /// The version of the current [`Live`] settings.
    pub fn live_version(&self) -> u64 {
        self.live_version.load(Ordering::Relaxed)
    }

    /// Makes `config` the running one (already checked by the reload).
    pub(crate) fn replace_live(&self, config: Config) {
        let mut live = self.live.write();
        let version = live.version + 1;
        *live = Arc::new(Live::new(version, config, &self.info));
        self.live_version.store(version, Ordering::Relaxed);
    }

    /// The server's traffic since start: closed connections' plus the live
    /// clients' and routes'.
    pub fn counts(&self) -> Counts {
        let mut total = self.stats.closed_counts();
        for client in self.clients.iter() {
            total += client.counts();
        }
        if let Some(cluster) = self.cluster.get() {
            for route in cluster.routes() {
                total += route.counts();
            }
        }
        total
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Delivers `msg` to every matching subscription (and one member of each
    /// matching queue group), forwarding it to peers with interest.
    /// `skip_client` is the publisher when it asked not to receive its own
    /// messages (`echo: false`). Returns whether anyone received it.
    pub fn route(&self, msg: &Message, skip_client: Option<u64>, wakes: &mut WakeList) -> bool {
        let origin = Origin::Local {
            skip_client,
            forward: true,
        };
        self.dispatch(msg.subject(), msg, origin, wakes)
    }

    /// Like [`ServerState::route`], but to the subscribers of `target`
    /// while the delivered message keeps its own subject: how stream
    /// consumers deliver a stored message to a pull request's inbox or a
    /// push consumer's deliver subject. Local subscribers only: a route
    /// message has one subject, so it cannot carry both.
    pub fn route_to(
        &self,
        target: &[u8],
        msg: &Message,
        skip_client: Option<u64>,
        wakes: &mut WakeList,
    ) -> bool {
        let origin = Origin::Local {
            skip_client,
            forward: target == msg.subject(),
        };
        self.dispatch(target, msg, origin, wakes)
    }

    /// Delivers a message a peer forwarded: to local subscribers only (one
    /// hop), and to queue groups only if the peer chose this node for them
    /// (`queues` names them).
    pub fn route_from_peer(&self, msg: &Message, queues: &[u8], wakes: &mut WakeList) -> bool {
        self.dispatch(msg.subject(), msg, Origin::Peer { queues }, wakes)
    }

    fn dispatch(
        &self,
        target: &[u8],
        msg: &Message,
        origin: Origin<'_>,
        wakes: &mut WakeList,
    ) -> bool {
        let matches = self.sublist.matches(target);
        let mut delivered = false;
        let mut forwards = Forwards::default();
        for sub in matches.plain.iter() {
            match sub.peer() {
                Some(peer) if origin.forwards() => forwards.add(peer, None),
                Some(_) => {}
                None if origin.wants(sub) => delivered |= self.deliver(sub, msg, wakes),
                None => {}
            }
        }
        for group in &matches.queues {
            if let Origin::Peer { queues } = origin {
                if !names_queue(queues, &group.name) {
                    continue;
                }
            }
            delivered |= self.deliver_to_group(group, msg, &origin, &mut forwards, wakes);
        }
        delivered | forwards.send(msg, wakes)
    }

    /// Gives `msg` to one member of `group`, here or (added to `forwards`)
    /// on a peer; returns whether a member here took it.
    ///
    /// A message published here goes to any member cluster-wide, each with
    /// the same chance, as nats-server does: a peer weighs as many members
    /// as its `RS+` announced, and picks one among its own. With
    /// `cluster.prefer_local_queue_members` (or for a message that may not
    /// leave this node, or came from a peer) a member here is tried first.
    /// A member here that cannot take the message (closing, at its
    /// auto-unsubscribe limit, the publisher itself with `echo: false`)
    /// passes it on to another one here, then to a peer.
    fn deliver_to_group<'a>(
        &self,
        group: &'a QueueGroup<Arc<Subscription>>,
        msg: &Message,
        origin: &Origin<'_>,
        forwards: &mut Forwards<'a>,
        wakes: &mut WakeList,
    ) -> bool {
        if origin.forwards() && !self.prefer_local_queue_members {
            if let Some(member) = group.pick_weighted(|s| s.queue_weight()) {
                match member.peer() {
                    Some(peer) => {
                        forwards.add(peer, Some(&group.name));
                        return false;
                    }
                    None if origin.wants(member) && self.deliver(member, msg, wakes) => {
                        return true;
                    }
                    None => {}
                }
            }
        }
        if self.deliver_to_member(group, msg, origin, wakes) {
            return true;
        }
        if origin.forwards() {
            let member = group.pick_where(|s| s.peer().is_some());
            if let Some(peer) = member.and_then(|s| s.peer()) {
                forwards.add(peer, Some(&group.name));
            }
        }
        false
    }

    /// Hands `msg` to one local member of `group`. Members are tried in
    /// turn so that one that cannot take the message (closing, or at its
    /// auto-unsubscribe limit) does not lose it.
    fn deliver_to_member(
        &self,
        group: &QueueGroup<Arc<Subscription>>,
        msg: &Message,
        origin: &Origin<'_>,
        wakes: &mut WakeList,
    ) -> bool {
        for _ in 0..group.members.len() {
            let Some(sub) = group.pick_where(|s| s.peer().is_none()) else {
                return false;
            };
            if origin.wants(sub) && self.deliver(sub, msg, wakes) {
                return true;
            }
        }
        false
    }

    fn deliver(&self, sub: &Arc<Subscription>, msg: &Message, wakes: &mut WakeList) -> bool {
        match sub.deliver(msg, wakes) {
            Delivery::Delivered => true,
            Delivery::DeliveredLast => {
                self.end_subscription(sub);
                true
            }
            Delivery::Skipped => false,
        }
    }

    /// Sends a message made inside the server (API replies, acks,
    /// deliveries of stream consumers) to the subscribers of `target`.
    pub fn send_internal(&self, target: &[u8], msg: &Message) -> bool {
        let mut wakes = WakeList::default();
        let delivered = self.route_to(target, msg, None, &mut wakes);
        wakes.wake_all();
        delivered
    }

    /// Subscribes a handler inside the server to `subject`; `scope` says
    /// whether peers forward matching messages to it.
    pub fn subscribe_internal(
        &self,
        subject: &str,
        scope: Scope,
        handler: Arc<dyn Subscriber>,
    ) -> Result<Arc<Subscription>, InvalidSubject> {
        let mut sub = Subscription::new(subject.as_bytes(), None, b"", handler);
        if scope == Scope::Node {
            sub = sub.node_only();
        }
        let sub = Arc::new(sub);
        self.list_subscription(&sub)?;
        Ok(sub)
    }

    /// Puts a subscription in the sublist and, if it is a local one that
    /// propagates, tells the peers. Undone by [`ServerState::unlist_subscription`].
    pub fn list_subscription(&self, sub: &Arc<Subscription>) -> Result<(), InvalidSubject> {
        self.sublist
            .insert(&sub.subject, sub.queue.as_deref(), Arc::clone(sub))?;
        if let Some(cluster) = self.cluster.get().filter(|_| sub.propagates()) {
            cluster.interest_added(sub);
        }
        Ok(())
    }

    /// Takes a local subscription out of the sublist and tells the peers.
    pub fn unlist_subscription(&self, sub: &Arc<Subscription>) {
        let removed = self.sublist.remove(&sub.subject, sub.queue.as_deref(), sub);
        if let Some(cluster) = self.cluster.get().filter(|_| removed && sub.propagates()) {
            cluster.interest_removed(sub);
        }
    }

    /// Ends a subscription for good: unlists it and has its subscriber
    /// forget it (a client drops the sid), as UNSUB's auto-unsubscribe does.
    pub fn end_subscription(&self, sub: &Arc<Subscription>) {
        self.unlist_subscription(sub);
        sub.subscriber.forget(&sub.sid);
    }

    /// The INFO a client is greeted with (before its own fields are set).
    pub fn client_info(&self) -> ServerInfo {
        self.client_info_from(&self.live())
    }

    /// The INFO of `live`, with the cluster's client URLs; in lame duck
    /// mode it says `ldm` and leaves this node out of them, so clients pick
    /// another node.
    pub(crate) fn client_info_from(&self, live: &Live) -> ServerInfo {
        let mut info = live.info.clone();
        info.ldm = self.lame_duck.load(Ordering::Relaxed);
        if let Some(cluster) = self.cluster.get() {
            info.connect_urls = cluster.connect_urls();
            if info.ldm {
                info.connect_urls.retain(|u| u != cluster.client_addr());
            }
        }
        info
    }

    /// Tells clients that asked for updates (CONNECT `protocol: 1`) the
    /// current INFO: the cluster's client URLs, so they can fail over to
    /// another node, a reloaded `max_payload`, lame duck mode.
    pub fn announce_connect_urls(&self) {
        let mut line = BytesMut::new();
        encode_info(&mut line, &self.client_info());
        for client in self.clients.iter() {
            client.send_info_update(&line);
        }
    }

    /// Runs `task` until it ends; shutdown waits for it.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }
}

/// Server-wide counters for monitoring. Traffic is counted per connection
/// (see [`Counts`]); a closing connection's counts are added here, so the
/// server's totals are these plus the live connections', folded when read.
/// Nothing here is touched per message.
pub struct ServerStats {
    pub started: std::time::SystemTime,
    total_connections: AtomicU64,
    slow_consumers: AtomicU64,
    closed: parking_lot::Mutex<Counts>,
}

impl ServerStats {
    fn new() -> ServerStats {
        ServerStats {
            started: std::time::SystemTime::now(),
            total_connections: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            closed: parking_lot::Mutex::new(Counts::default()),
        }
    }

    /// A client connection was accepted.
    pub(crate) fn connected(&self) {
        self.total_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection (client or route) ended: keep its traffic in the totals.
    pub(crate) fn closed(&self, conn: &crate::connection::Link, reason: CloseReason) {
        if matches!(
            reason,
            CloseReason::SlowConsumerPendingBytes | CloseReason::SlowConsumerWriteDeadline
        ) {
            self.slow_consumers.fetch_add(1, Ordering::Relaxed);
        }
        *self.closed.lock() += conn.counts();
    }

    /// Client connections accepted since start.
    pub fn total_connections(&self) -> u64 {
        self.total_connections.load(Ordering::Relaxed)
    }

    /// Connections (clients and routes) cut off as slow consumers.
    pub fn slow_consumers(&self) -> u64 {
        self.slow_consumers.load(Ordering::Relaxed)
    }

    /// Traffic of connections that have closed.
    pub fn closed_counts(&self) -> Counts {
        *self.closed.lock()
    }
}

/// Where a message being routed came from, which decides where it may go.
enum Origin<'a> {
    /// Published on this node: by a client (`skip_client` when it does not
    /// want its own messages) or inside the server. `forward`: peers with
    /// interest get it too.
    Local {
        skip_client: Option<u64>,
        forward: bool,
    },
    /// Forwarded by a peer, naming the queue groups it chose this node for.
    Peer { queues: &'a [u8] },
}

impl Origin<'_> {
    fn forwards(&self) -> bool {
        matches!(self, Origin::Local { forward: true, .. })
    }

    fn wants(&self, sub: &Subscription) -> bool {
        match (self, sub.subscriber.connection_id()) {
            (
                Origin::Local {
                    skip_client: Some(skip),
                    ..
                },
                Some(id),
            ) => id != *skip,
            _ => true,
        }
    }
}

/// The peers one message goes to, each once, with the queue groups it was
/// chosen for there. Inline for the usual few peers: no allocation per
/// message.
#[derive(Default)]
struct Forwards<'a>(SmallVec<[Forward<'a>; 4]>);

/// One peer and the queue groups it was chosen for.
type Forward<'a> = (&'a dyn Peer, SmallVec<[&'a [u8]; 2]>);

/// A peer's identity: the address of the object behind it.
fn peer_address(peer: &dyn Peer) -> *const () {
    peer as *const dyn Peer as *const ()
}

impl<'a> Forwards<'a> {
    fn add(&mut self, peer: &'a dyn Peer, queue: Option<&'a [u8]>) {
        let at = match self
            .0
            .iter()
            .position(|(p, _)| peer_address(*p) == peer_address(peer))
        {
            Some(at) => at,
            None => {
                self.0.push((peer, SmallVec::new()));
                self.0.len() - 1
            }
        };
        if let Some(queue) = queue {
            self.0[at].1.push(queue);
        }
    }

    /// Queues one RMSG per peer; whether any was queued.
    fn send(&self, msg: &Message, wakes: &mut WakeList) -> bool {
        let mut sent = false;
        for (peer, queues) in &self.0 {
            sent |= peer.forward(msg, queues, wakes);
        }
        sent
    }
}

/// Accepts clients until shutdown or lame duck mode; the listener closes
/// when it returns, so connection attempts are refused from then on.
/// Opens the store and starts durable streams, on a blocking thread (opening
/// reads and checks files). A store whose files are damaged does not stop
/// the server: it starts without streams, says why in its log, in every
/// API answer and in `/healthz`, and keeps the files as they are.
async fn start_jetstream(state: &Arc<ServerState>) -> Result<(), StartError> {
    let opening = Arc::clone(state);
    let start = move || {
        // Unset limits get nats-server's defaults, resolved once here (it
        // reads /proc/meminfo and the store's file system); `state.config`
        // keeps them unset, so that a reload of the same file compares
        // equal.
        let limits = opening.config.jetstream.resolve_limits();
        let mut config = opening.config.jetstream.clone();
        config.max_memory_store = Some(saturating_usize(limits.max_memory));
        config.max_file_store = Some(saturating_usize(limits.max_file));
        JetStream::start(&opening, &config).map(|js| (js, limits))
    };
    let started = tokio::task::spawn_blocking(start)
        .await
        .map_err(|e| JetStreamError::Thread(std::io::Error::other(e.to_string())))?;
    match started {
        Ok((js, limits)) => {
            let _ = state.jetstream.set(js);
            tracing::info!("JetStream limits: {limits}");
        }
        // Another process holding the store is a mistake to stop for;
        // anything else wrong with the store's files (damage, a full
        // disk) leaves the server up, saying why.
        Err(JetStreamError::Store(e)) if !e.is_locked() => {
            let reason = e.to_string();
            tracing::error!("JetStream is offline: {reason}");
            crate::stream::serve_offline(state, &reason);
            let _ = state.jetstream_offline.set(reason);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

async fn accept_loop(state: Arc<ServerState>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = state.stop_accepting.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let live = state.live();
                let max = live.config.max_connections;
                if max > 0 && state.clients.len() >= max {
                    tracing::warn!("{peer} - maximum connections exceeded ({max})");
                    state.tasks.spawn(client::refuse(
                        Arc::clone(&state),
                        live,
                        stream,
                        "maximum connections exceeded",
                    ));
                    continue;
                }
                let client = client::register(&state, &live, peer);
                let server = Arc::clone(&state);
                // Two task types, so that each connection's task is sized by
                // its own path: a plain one does not carry TLS state.
                match state.tls.as_ref().map(|t| t.current()) {
                    None => state
                        .tasks
                        .spawn(client::serve(server, live, client, stream)),
                    Some(tls) => state
                        .tasks
                        .spawn(client::serve_tls(server, live, client, stream, tls)),
                };
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::error!("Error accepting client connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!("accept loop stopped");
}

/// A random server id in nats-server's style (56 upper-case characters).
fn new_server_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut rng = rand::thread_rng();
    std::iter::once('N')
        .chain((0..55).map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char))
        .collect()
}
