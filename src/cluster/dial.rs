//! Opening routes: the route listener's accept loop, the dial loops with
//! their backoff, and TLS between nodes.
//!
//! A dial loop runs per peer address (at most one: `Cluster::dialing`).
//! Seeds loop for as long as the node runs; a peer learnt by gossip, or one
//! whose route dropped, gets `connect_retries` attempts after its last
//! successful route, then is forgotten until gossip names it again. While
//! another route to the same peer is kept (a duplicate), the loop waits for
//! that route to end instead of dialling.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};

use super::protocol::RouteConnect;
use super::route::{self, Outcome};
use super::Cluster;
use crate::config::cluster::RouteUrl;
use crate::config::TlsConfig;
use crate::protocol::ConnectOptions;
use crate::server::ServerState;
use crate::tls::{self, ServerTls};

/// Longest a TCP connect to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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
                let (server2, cluster2) = (Arc::clone(&server), Arc::clone(&cluster));
                server.spawn(async move {
                    serve_accepted(server2, cluster2, stream, remote).await;
                });
            }
            Err(e) => {
                tracing::error!("Error accepting route connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
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
    /// Starts a dial loop for `addr` unless one runs already. `url` carries
    /// credentials given with a seed; `forever` for seeds.
    pub(crate) fn dial(
        self: &Arc<Self>,
        server: &Arc<ServerState>,
        addr: String,
        url: Option<RouteUrl>,
        forever: bool,
    ) {
        if server.shutdown.is_cancelled() || !self.dialing.lock().insert(addr.clone()) {
            return;
        }
        let (server2, cluster) = (Arc::clone(server), Arc::clone(self));
        server.spawn(async move {
            cluster.dial_loop(&server2, &addr, url, forever).await;
            cluster.dialing.lock().remove(&addr);
        });
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
