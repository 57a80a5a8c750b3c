//! Opening routes: the route listener's accept loop, the dial loops with
//! their backoff, and TLS between nodes.
//!
//! A dial loop runs per peer address (at most one: `Cluster::dialing`).
//! Seeds loop for as long as the node runs; a peer learnt by gossip, or one
//! whose route dropped, gets `connect_retries` attempts after its last
//! successful route, then is forgotten until gossip names it again. While
//! another route to the same peer is kept (a duplicate), the loop waits for
//! that route to end instead of dialling.
//!
//! Bounds: at most [`MAX_LEARNT_DIALS`] loops for peers that are not seeds
//! run at once, so a peer gossiping thousands of addresses costs a bounded
//! number of tasks and sockets (the others are dialled when gossip names
//! them again, as each new route makes its peer re-send its INFO). Every
//! route connection, dialled or accepted, handshake included, holds a
//! [`RouteSlot`]: at most `cluster.max_routes` at once; an accepted one
//! beyond gets `-ERR` and is closed, a dial beyond counts as a failed
//! attempt.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rand::Rng;
use rustls_pki_types::ServerName;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::protocol::RouteConnect;
use super::route::{self, Outcome};
use super::Cluster;
use crate::config::cluster::RouteUrl;
use crate::config::TlsConfig;
use crate::protocol::{encode_err, ConnectOptions};
use crate::server::ServerState;
use crate::tls::{self, ServerTls};

/// Longest a TCP connect to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Most dial loops for peers that are not seeds (learnt by gossip, or
/// re-dialled after their route dropped) at once. Well above what a mesh
/// joining a node needs at a time: the rest follow as routes form.
pub(crate) const MAX_LEARNT_DIALS: usize = 32;

/// The `-ERR` text for a route connection beyond `cluster.max_routes`.
const MAX_ROUTES_EXCEEDED: &str = "maximum route connections exceeded";

/// One of the `cluster.max_routes` places for route connections, held for
/// the connection's life and given back when dropped.
pub(crate) struct RouteSlot(Arc<Cluster>);

impl Drop for RouteSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The dial loops running: their addresses, and how many are not seeds'.
#[derive(Default)]
pub(crate) struct Dialing {
    addrs: std::collections::HashSet<String>,
    learnt: usize,
}

/// TLS for routes: the acceptor for routes dialled in, the connector for
/// routes dialled out (presenting the same certificate, for mutual TLS).
pub(crate) struct RouteTls {
    acceptor: ServerTls,
    connector: tokio_rustls::TlsConnector,
}

impl RouteTls {
    pub fn load(config: &TlsConfig) -> Result<RouteTls, crate::tls::TlsError> {
        // Routes start TLS at once: both ends know it from their config.
        let acceptor = ServerTls::load(&TlsConfig {
            handshake_first: true,
            ..config.clone()
        })?;
        let client = tls::client_config(
            config.ca_file.as_deref(),
            Some((&config.cert_file, &config.key_file)),
        )?;
        Ok(RouteTls {
            acceptor,
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }
}

/// Accepts route connections until shutdown.
pub(crate) async fn accept_loop(
    server: Arc<ServerState>,
    cluster: Arc<Cluster>,
    listener: TcpListener,
) {
    loop {
        let accepted = tokio::select! {
            _ = server.shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                let Some(slot) = cluster.route_slot() else {
                    tracing::warn!(
                        "{remote} - {MAX_ROUTES_EXCEEDED} ({})",
                        cluster.config.max_routes
                    );
                    server.spawn(refuse(stream, cluster.tls.is_none()));
                    continue;
                };
                let (server2, cluster2) = (Arc::clone(&server), Arc::clone(&cluster));
                server.spawn(async move {
                    serve_accepted(server2, cluster2, stream, remote).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::error!("Error accepting route connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Closes a route connection beyond `max_routes`, saying why when the
/// routes are plain text. A TLS route is closed without a word: an `-ERR`
/// before its handshake would be garbage to it, and a handshake costs more
/// than a refusal is worth.
async fn refuse(mut stream: TcpStream, plain: bool) {
    if plain {
        let mut line = BytesMut::new();
        encode_err(&mut line, &MAX_ROUTES_EXCEEDED);
        let _ = tokio::time::timeout(CONNECT_TIMEOUT, stream.write_all(&line)).await;
    }
    let _ = tokio::time::timeout(CONNECT_TIMEOUT, stream.shutdown()).await;
}

async fn serve_accepted(
    server: Arc<ServerState>,
    cluster: Arc<Cluster>,
    stream: TcpStream,
    remote: SocketAddr,
) {
    let Some(tls) = &cluster.tls else {
        let (reader, writer) = stream.into_split();
        route::serve(server, cluster, reader, writer, remote, None).await;
        return;
    };
    match Box::pin(tls::accept(&tls.acceptor, stream, &[])).await {
        Ok((stream, _)) => {
            let (reader, writer) = tokio::io::split(stream);
            route::serve(server, cluster, reader, writer, remote, None).await;
        }
        Err(e) => tracing::warn!("{remote} - route TLS handshake failed: {e}"),
    }
}

impl Cluster {
    /// A place for one more route connection, if there is one.
    pub(crate) fn route_slot(self: &Arc<Self>) -> Option<RouteSlot> {
        let max = self.config.max_routes;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(RouteSlot(Arc::clone(self)))
    }

    /// Starts a dial loop for `addr` unless one runs already. `url` carries
    /// credentials given with a seed; `forever` for seeds. Returns `false`
    /// when `addr` is not a seed and [`MAX_LEARNT_DIALS`] such loops run
    /// already (nothing is started then).
    pub(crate) fn dial(
        self: &Arc<Self>,
        server: &Arc<ServerState>,
        addr: String,
        url: Option<RouteUrl>,
        forever: bool,
    ) -> bool {
        if server.shutdown.is_cancelled() {
            return true;
        }
        {
            let mut dialing = self.dialing.lock();
            if dialing.addrs.contains(&addr) {
                return true;
            }
            if !forever {
                if dialing.learnt >= MAX_LEARNT_DIALS {
                    return false;
                }
                dialing.learnt += 1;
            }
            dialing.addrs.insert(addr.clone());
        }
        let (server2, cluster) = (Arc::clone(server), Arc::clone(self));
        server.spawn(async move {
            cluster.dial_loop(&server2, &addr, url, forever).await;
            let mut dialing = cluster.dialing.lock();
            dialing.addrs.remove(&addr);
            if !forever {
                dialing.learnt -= 1;
            }
        });
        true
    }

    async fn dial_loop(
        self: &Arc<Self>,
        server: &Arc<ServerState>,
        addr: &str,
        url: Option<RouteUrl>,
        forever: bool,
    ) {
        let connect = self.connect_message(url.as_ref());
        let mut backoff = self.config.connect_backoff;
        let mut failures = 0u32;
        // A dropped route was just seen closing: give the peer a moment.
        let mut wait = !forever;
        loop {
            if wait && !self.pause(server, backoff).await {
                return;
            }
            wait = true;
            match self.dial_once(server, addr, &connect).await {
                Outcome::Served => {
                    failures = 0;
                    backoff = self.config.connect_backoff;
                    continue;
                }
                Outcome::Duplicate(kept) => {
                    tokio::select! {
                        _ = kept.cancelled() => {}
                        _ = server.shutdown.cancelled() => return,
                    }
                    failures = 0;
                    continue;
                }
                Outcome::Myself => {
                    tracing::debug!("route {addr} is this node itself");
                    return;
                }
                Outcome::Failed => {}
            }
            failures += 1;
            if !forever && failures > self.config.connect_retries {
                tracing::info!("Giving up on route {addr} after {failures} attempts");
                return;
            }
            backoff = (backoff * 2).min(self.config.connect_backoff_max);
        }
    }

    /// Waits about `backoff` (with jitter, so nodes restarted together do
    /// not dial in lock step). `false` on shutdown.
    async fn pause(&self, server: &ServerState, backoff: Duration) -> bool {
        let jitter = rand::thread_rng().gen_range(0.5..1.0);
        tokio::select! {
            _ = tokio::time::sleep(backoff.mul_f64(jitter)) => true,
            _ = server.shutdown.cancelled() => false,
        }
    }

    /// One attempt: connect, TLS if configured, then serve the route.
    async fn dial_once(
        self: &Arc<Self>,
        server: &Arc<ServerState>,
        addr: &str,
        connect: &RouteConnect,
    ) -> Outcome {
        let Some(_slot) = self.route_slot() else {
            tracing::debug!(
                "Not dialling route {addr}: {MAX_ROUTES_EXCEEDED} ({})",
                self.config.max_routes
            );
            return Outcome::Failed;
        };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!("Error trying to connect to route {addr}: {e}");
                return Outcome::Failed;
            }
            Err(_) => {
                tracing::debug!("Timed out connecting to route {addr}");
                return Outcome::Failed;
            }
        };
        let _ = stream.set_nodelay(true);
        let remote = stream
            .peer_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (server, cluster) = (Arc::clone(server), Arc::clone(self));
        let Some(tls) = &self.tls else {
            let (reader, writer) = stream.into_split();
            return route::serve(
                server,
                cluster,
                reader,
                writer,
                remote,
                Some(connect.clone()),
            )
            .await;
        };
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let Ok(name) = ServerName::try_from(host.to_string()) else {
            tracing::warn!("route {addr}: {host:?} is not a valid TLS server name");
            return Outcome::Failed;
        };
        let handshake = tls.connector.connect(name, stream);
        match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Ok(Ok(stream)) => {
                let (reader, writer) = tokio::io::split(stream);
                route::serve(
                    server,
                    cluster,
                    reader,
                    writer,
                    remote,
                    Some(connect.clone()),
                )
                .await
            }
            Ok(Err(e)) => {
                tracing::warn!("route {addr}: TLS handshake failed: {e}");
                Outcome::Failed
            }
            Err(_) => {
                tracing::warn!("route {addr}: TLS handshake timed out");
                Outcome::Failed
            }
        }
    }

    /// The CONNECT this node sends: its id, and the credentials of the seed
    /// URL or, failing those, the cluster's own.
    fn connect_message(&self, url: Option<&RouteUrl>) -> RouteConnect {
        let own = self.config.authorization.as_ref();
        let mut credentials = ConnectOptions::default();
        match url.filter(|u| u.user.is_some()) {
            Some(url) => {
                credentials.user = url.user.clone();
                credentials.pass = url.pass.clone();
            }
            None => {
                credentials.user = own.and_then(|a| a.user.clone());
                credentials.pass = own.and_then(|a| a.password.as_ref().map(|p| p.0.clone()));
                credentials.auth_token = own.and_then(|a| a.token.as_ref().map(|t| t.0.clone()));
            }
        }
        RouteConnect {
            server_id: self.server_id.clone(),
            cluster: self.config.name.clone(),
            credentials,
        }
    }
}
