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
//! queue group. It holds no lock while doing so; each subscriber's queue has
//! its own short lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::client::{self, ClientShared, WakeList};
use crate::config::Config;
use crate::protocol::{Limits, Message, ServerInfo};
use crate::stream::JetStream;
use crate::sublist::{InvalidSubject, Sublist};
use crate::subscription::{Delivery, InternalSubscriber, Subscriber, Subscription};
use crate::tls::{ReloadableTls, ServerTls};

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
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Why a reload was refused (the running settings stay as they were).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("turning TLS on or off needs a restart")]
    TlsToggled,
}

/// The entry point: `Server::start(config).await` runs a server.
pub struct Server;

impl Server {
    /// Validates `config`, binds the client listener and starts accepting.
    pub async fn start(config: Config) -> Result<ServerHandle, StartError> {
        config.validate()?;
        let tls = config.tls.as_ref().map(ServerTls::load).transpose()?;
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
        let state = Arc::new(ServerState::new(config, addr, tls));
        tracing::info!("Starting skiff {}", env!("CARGO_PKG_VERSION"));
        tracing::info!("  Server ID: {}", state.info.server_id);
        if state.config.jetstream.enabled {
            let js = JetStream::start(&state, &state.config.jetstream)?;
            let _ = state.jetstream.set(js);
        }
        if state.tls.is_some() {
            tracing::info!("TLS required for client connections");
        }
        tracing::info!("Listening for client connections on {addr}");
        let accept = tokio::spawn(accept_loop(Arc::clone(&state), listener));
        tracing::info!("Server is ready");
        Ok(ServerHandle { state, accept })
    }
}

/// A running server. Dropping it leaves the server running; call
/// [`ServerHandle::shutdown`] to stop it.
pub struct ServerHandle {
    state: Arc<ServerState>,
    accept: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
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

    /// Applies what can change while running from `config` (re-read from
    /// its file on SIGHUP): for now the TLS certificate, key, CA and
    /// settings. New connections use them; existing ones keep theirs. On
    /// error nothing changes.
    pub fn reload(&self, config: &Config) -> Result<(), ReloadError> {
        config.validate()?;
        match (&self.state.tls, &config.tls) {
            (Some(current), Some(new)) => {
                current.replace(ServerTls::load(new)?);
                tracing::info!("Reloaded: tls");
                Ok(())
            }
            (None, None) => Ok(()),
            _ => Err(ReloadError::TlsToggled),
        }
    }

    /// Stops accepting, lets every client's queued output drain (each within
    /// `write_deadline`), closes them, and returns when all are gone.
    pub async fn shutdown(self) {
        tracing::info!("Initiating Shutdown...");
        self.state.shutdown.cancel();
        let _ = self.accept.await;
        if let Some(js) = self.state.jetstream.get() {
            js.shutdown();
        }
        self.state.tasks.close();
        self.state.tasks.wait().await;
        tracing::info!("Server Exiting..");
    }
}

/// State shared by every connection of one server.
pub(crate) struct ServerState {
    pub config: Config,
    pub addr: SocketAddr,
    pub info: ServerInfo,
    pub limits: Limits,
    /// Set when `[authorization]` is configured.
    pub auth: Option<Authenticator>,
    /// TLS for client connections, when configured; swapped by a reload.
    pub tls: Option<ReloadableTls>,
    pub sublist: Sublist<Arc<Subscription>>,
    pub clients: DashMap<u64, Arc<ClientShared>>,
    /// Durable streams, when enabled.
    pub jetstream: OnceLock<Arc<JetStream>>,
    next_client_id: AtomicU64,
    pub shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl ServerState {
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
        let auth = config.authorization.as_ref().map(Authenticator::new);
        let limits = Limits {
            max_control_line: config.max_control_line,
            max_payload: config.max_payload,
        };
        ServerState {
            config,
            addr,
            info,
            limits,
            auth,
            tls: tls.map(ReloadableTls::new),
            sublist: Sublist::new(),
            clients: DashMap::new(),
            jetstream: OnceLock::new(),
            next_client_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Delivers `msg` to every matching subscription (and one member of each
    /// matching queue group). `skip_client` is the publisher when it asked
    /// not to receive its own messages (`echo: false`). Returns whether
    /// anyone received it.
    pub fn route(&self, msg: &Message, skip_client: Option<u64>, wakes: &mut WakeList) -> bool {
        self.route_to(msg.subject(), msg, skip_client, wakes)
    }

    /// Like [`ServerState::route`], but to the subscribers of `target`
    /// while the delivered message keeps its own subject: how stream
    /// consumers deliver a stored message to a pull request's inbox or a
    /// push consumer's deliver subject.
    pub fn route_to(
        &self,
        target: &[u8],
        msg: &Message,
        skip_client: Option<u64>,
        wakes: &mut WakeList,
    ) -> bool {
        let matches = self.sublist.matches(target);
        let mut delivered = false;
        let wanted = |sub: &Subscription| match (skip_client, sub.client()) {
            (Some(skip), Some(c)) => c.id != skip,
            _ => true,
        };
        for sub in matches.plain.iter().filter(|s| wanted(s)) {
            delivered |= self.deliver(sub, msg, wakes);
        }
        for group in &matches.queues {
            // Try members in turn so that one that cannot take the message
            // (closing, or at its auto-unsubscribe limit) does not lose it.
            for _ in 0..group.members.len() {
                let sub = group.pick();
                if wanted(sub) && self.deliver(sub, msg, wakes) {
                    delivered = true;
                    break;
                }
            }
        }
        delivered
    }

    fn deliver(&self, sub: &Arc<Subscription>, msg: &Message, wakes: &mut WakeList) -> bool {
        match sub.deliver(msg, wakes) {
            Delivery::Delivered => true,
            Delivery::DeliveredLast => {
                self.remove_subscription(sub);
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

    /// Subscribes a handler inside the server to `subject`.
    pub fn subscribe_internal(
        &self,
        subject: &str,
        queue: Option<&str>,
        handler: Arc<dyn InternalSubscriber>,
    ) -> Result<Arc<Subscription>, InvalidSubject> {
        let sub = Arc::new(Subscription::new(
            Bytes::copy_from_slice(subject.as_bytes()),
            queue.map(|q| Bytes::copy_from_slice(q.as_bytes())),
            Bytes::new(),
            Subscriber::Internal(handler),
        ));
        self.sublist
            .insert(&sub.subject, sub.queue.as_deref(), Arc::clone(&sub))?;
        Ok(sub)
    }

    /// Removes a subscription from the sublist and from its client.
    pub fn remove_subscription(&self, sub: &Arc<Subscription>) {
        self.sublist.remove(&sub.subject, sub.queue.as_deref(), sub);
        if let Some(client) = sub.client() {
            client.forget_subscription(&sub.sid);
        }
    }
}

async fn accept_loop(state: Arc<ServerState>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let max = state.config.max_connections;
                if max > 0 && state.clients.len() >= max {
                    tracing::warn!("{peer} - maximum connections exceeded ({max})");
                    state.tasks.spawn(client::refuse(
                        Arc::clone(&state),
                        stream,
                        "maximum connections exceeded",
                    ));
                    continue;
                }
                let client = client::register(&state, peer);
                state
                    .tasks
                    .spawn(client::serve(Arc::clone(&state), client, stream));
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
