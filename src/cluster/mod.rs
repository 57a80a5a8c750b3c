//! The cluster: this node's routes to its peers, the interest it tells them
//! about, and how the mesh forms by gossip.
//!
//! - **Routes** ([`route`]): one connection per peer, speaking the route
//!   protocol ([`protocol`]). A peer's interest is a [`Subscription`] whose
//!   subscriber is the [`Route`]; routing (`ServerState::route`) forwards a
//!   locally published message to each peer with matching interest, once,
//!   naming the queue groups it chose that peer for. A message that came
//!   from a peer is delivered locally only: one hop, no loops.
//! - **Interest** (this file): a count per (subject, queue) of local
//!   subscriptions. The first one for a subject sends `RS+` to every route,
//!   the last one gone sends `RS-`; a queue group's `RS+` carries its member
//!   count, the weight peers give this node when they pick a member of the
//!   group cluster-wide. A new route is sent the whole table when it registers, under the
//!   same lock that orders later changes, so no change is lost or reordered.
//! - **Gossip**: a node's INFO lists its peers; a node that learns of one it
//!   has no route to dials it, so a node seeded with any one member joins
//!   the full mesh. When two nodes dial each other at once, both keep the
//!   connection dialled by the node with the smaller id and close the other.
//! - **Dialling** ([`dial`]): seeds are dialled for as long as the node
//!   runs; a peer learnt by gossip is re-dialled `connect_retries` times
//!   after it drops, with backoff. Dial loops for peers learnt by gossip,
//!   and route connections (`max_routes`), are bounded in number.
//!
//! Lock order: `interest` before `routes`; neither is held across an
//! `.await`.

mod dial;
mod protocol;
mod route;

pub use protocol::{
    encode_interest, encode_msg_line, encode_no_interest, encode_route_info, names_queue,
    parse_route_op, RouteInfo, RouteOp,
};
pub use route::Route;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, AuthorizationConfig};
use crate::config::cluster::{ClusterConfig, RouteUrl};
use crate::server::ServerState;
use crate::subscription::Subscription;
use protocol::Peer;

/// Why the cluster layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot listen for routes on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cluster TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// This node's part of the mesh. Lives in [`ServerState`] once started.
pub(crate) struct Cluster {
    pub config: ClusterConfig,
    pub server_id: String,
    server_name: String,
    /// Where peers dial this node, and where its clients connect.
    route_addr: String,
    client_addr: String,
    /// Checks a dialling node's credentials, when the cluster has them
    /// (shared with the blocking pool, where the checks run).
    pub auth: Option<Arc<Authenticator>>,
    tls: Option<dial::RouteTls>,
    /// Local subscriptions per (subject, queue): what the peers are told.
    interest: Mutex<HashMap<(Bytes, Option<Bytes>), u32, ahash::RandomState>>,
    /// Registered routes by peer id.
    routes: Mutex<HashMap<String, Arc<Route>>>,
    /// The dial loops running (see [`dial`] for their bound).
    dialing: Mutex<dial::Dialing>,
    /// Route connections open, handshakes included (at most
    /// `config.max_routes`; see [`dial::RouteSlot`]).
    connections: AtomicUsize,
}

impl Cluster {
    /// Binds the route listener, starts accepting routes and dials the
    /// seeds. Returns the cluster and the bound route address.
    pub async fn start(
        server: &Arc<ServerState>,
        config: &ClusterConfig,
    ) -> Result<(Arc<Cluster>, SocketAddr), ClusterError> {
        let bind_error = |source| ClusterError::Bind {
            addr: config.listen.clone(),
            source,
        };
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(bind_error)?;
        let bound = listener.local_addr().map_err(bind_error)?;
        let tls = config.tls.as_ref().map(dial::RouteTls::load).transpose()?;
        let auth = config.authorization.as_ref().map(|a| {
            Arc::new(Authenticator::new(&AuthorizationConfig {
                user: a.user.clone(),
                password: a.password.clone(),
                token: a.token.clone(),
                ..AuthorizationConfig::default()
            }))
        });
        let client_addr = server
            .config
            .client_advertise
            .clone()
            .unwrap_or_else(|| server.addr.to_string());
        let cluster = Arc::new(Cluster {
            config: config.clone(),
            server_id: server.info.server_id.clone(),
            server_name: server.info.server_name.clone(),
            route_addr: config
                .advertise
                .clone()
                .unwrap_or_else(|| bound.to_string()),
            client_addr,
            auth,
            tls,
            interest: Mutex::new(HashMap::default()),
            routes: Mutex::new(HashMap::new()),
            dialing: Mutex::new(dial::Dialing::default()),
            connections: AtomicUsize::new(0),
        });
        tracing::info!(
            "Cluster {:?}: listening for route connections on {bound}",
            config.name
        );
        server.spawn(dial::accept_loop(
            Arc::clone(server),
            Arc::clone(&cluster),
            listener,
        ));
        for url in &config.routes {
            if let Some(url) = RouteUrl::parse(url) {
                cluster.dial(server, url.addr.clone(), Some(url), true);
            }
        }
        Ok((cluster, bound))
    }

    /// A local subscription was added: tell the peers if it is news.
    pub fn interest_added(&self, sub: &Subscription) {
        let mut interest = self.interest.lock();
        let key = (sub.subject.clone(), sub.queue.clone());
        let count = interest.entry(key).or_insert(0);
        *count += 1;
        let mut line = BytesMut::new();
        match &sub.queue {
            Some(queue) => encode_interest(&mut line, &sub.subject, Some((queue, *count))),
            None if *count == 1 => encode_interest(&mut line, &sub.subject, None),
            None => return,
        }
        self.broadcast(&line);
    }

    /// A local subscription was removed: tell the peers if it was the last
    /// of its kind (or a queue group's new weight).
    pub fn interest_removed(&self, sub: &Subscription) {
        let mut interest = self.interest.lock();
        let key = (sub.subject.clone(), sub.queue.clone());
        let Some(count) = interest.get_mut(&key) else {
            return;
        };
        *count -= 1;
        let left = *count;
        let mut line = BytesMut::new();
        match (&sub.queue, left) {
            (queue, 0) => {
                interest.remove(&key);
                encode_no_interest(&mut line, &sub.subject, queue.as_deref());
            }
            (Some(queue), left) => encode_interest(&mut line, &sub.subject, Some((queue, left))),
            // Other local subscriptions to the subject remain: no news.
            (None, _) => return,
        }
        self.broadcast(&line);
    }

    /// Sends `bytes` to every route. Interest changes call it with
    /// `interest` held, so they reach every peer in the order they happened.
    fn broadcast(&self, bytes: &[u8]) {
        for route in self.routes.lock().values() {
            route.send(bytes);
        }
    }

    /// Registers a route whose handshake is done, unless another route to
    /// the same peer is kept (then returns that one's `closed` token), and
    /// sends it this node's whole interest.
    fn register(&self, route: &Arc<Route>) -> Result<(), CancellationToken> {
        {
            let interest = self.interest.lock();
            let mut routes = self.routes.lock();
            if let Some(existing) = routes.get(&route.peer_id) {
                if !self.keeps_new(route, existing) {
                    return Err(existing.closed.clone());
                }
                existing.close_as_duplicate();
            }
            routes.insert(route.peer_id.clone(), Arc::clone(route));
            let mut lines = BytesMut::new();
            for ((subject, queue), count) in interest.iter() {
                encode_interest(&mut lines, subject, queue.as_deref().map(|q| (q, *count)));
            }
            route.send(&lines);
        }
        self.gossip();
        Ok(())
    }

    /// Of two routes to one peer, both ends keep the one dialled by the node
    /// with the smaller id (and, for two dialled the same way, the older).
    fn keeps_new(&self, new: &Route, existing: &Route) -> bool {
        let smaller_dials = self.server_id < new.peer_id;
        new.dialed != existing.dialed && new.dialed == smaller_dials
    }

    /// Forgets `route` if it is the registered one.
    fn deregister(&self, server: &ServerState, route: &Arc<Route>) {
        let removed = {
            let mut routes = self.routes.lock();
            match routes.get(&route.peer_id) {
                Some(r) if Arc::ptr_eq(r, route) => routes.remove(&route.peer_id).is_some(),
                _ => false,
            }
        };
        if removed && !server.shutdown.is_cancelled() {
            self.gossip();
            server.announce_connect_urls();
        }
    }

    /// Tells every peer this node's current INFO (its peer list changed).
    fn gossip(&self) {
        let mut line = BytesMut::new();
        encode_route_info(&mut line, &self.route_info());
        self.broadcast(&line);
    }

    /// This node's INFO for routes.
    pub fn route_info(&self) -> RouteInfo {
        let peers = self
            .routes
            .lock()
            .values()
            .map(|r| Peer {
                server_id: r.peer_id.clone(),
                route_addr: r.route_addr.clone(),
            })
            .collect();
        RouteInfo {
            server_id: self.server_id.clone(),
            server_name: self.server_name.clone(),
            cluster: self.config.name.clone(),
            route_addr: self.route_addr.clone(),
            client_addr: self.client_addr.clone(),
            auth_required: self.auth.is_some(),
            peers,
        }
    }

    /// Dials the peers `info` names that this node has no route to, as many
    /// as [`dial::MAX_LEARNT_DIALS`] allows; gossip names the others again
    /// as routes form.
    fn learn(self: &Arc<Self>, server: &Arc<ServerState>, info: &RouteInfo) {
        let unknown: Vec<String> = {
            let routes = self.routes.lock();
            info.peers
                .iter()
                .filter(|p| p.server_id != self.server_id && !routes.contains_key(&p.server_id))
                .map(|p| p.route_addr.clone())
                .collect()
        };
        let named = unknown.len();
        for (dialled, addr) in unknown.into_iter().enumerate() {
            if !self.dial(server, addr, None, false) {
                tracing::debug!(
                    "Gossip named {named} peers to dial; {dialled} started, the rest wait for \
                     a free dial ({} at most)",
                    dial::MAX_LEARNT_DIALS
                );
                break;
            }
        }
    }

    /// Client URLs of every node (this one's first), for INFO
    /// `connect_urls`.
    pub fn connect_urls(&self) -> Vec<String> {
        let mut urls = vec![self.client_addr.clone()];
        urls.extend(self.routes.lock().values().map(|r| r.client_addr.clone()));
        urls.retain(|u| {
            u.parse::<SocketAddr>()
                .map_or(true, |a| !a.ip().is_unspecified())
        });
        urls
    }

    /// This node's client URL as the other nodes list it (what lame duck
    /// mode leaves out of `connect_urls`).
    pub fn client_addr(&self) -> &str {
        &self.client_addr
    }

    /// The registered routes.
    pub fn routes(&self) -> Vec<Arc<Route>> {
        self.routes.lock().values().cloned().collect()
    }
}
