//! `/routez`: this node's routes to its peers and their traffic, in
//! nats-server's shape.
//!
//! A route is listed once its handshake is done and it is registered with
//! the cluster (the mesh's live links); a peer whose route is down is not
//! listed. Counters are the route connection's own, so they restart from 0
//! when a route is re-established. `subscriptions` is the number of
//! interests (subjects and queue groups) the peer has announced.

use serde::Serialize;

use super::{rfc3339, uptime, Monitor};

#[derive(Serialize)]
pub(super) struct Routez {
    server_id: String,
    server_name: String,
    now: String,
    num_routes: usize,
    routes: Vec<RouteInfo>,
}

#[derive(Serialize)]
struct RouteInfo {
    rid: u64,
    remote_id: String,
    remote_name: String,
    /// This node dialled the route (it did not accept it).
    did_solicit: bool,
    ip: String,
    port: u16,
    start: String,
    uptime: String,
    /// Where the peer's route and client listeners are.
    route_url: String,
    client_url: String,
    pending_size: usize,
    in_msgs: u64,
    out_msgs: u64,
    in_bytes: u64,
    out_bytes: u64,
    subscriptions: usize,
}

pub(super) fn routez(monitor: &Monitor) -> Routez {
    let state = &monitor.state;
    let mut routes: Vec<RouteInfo> = state
        .cluster
        .get()
        .map(|c| c.routes())
        .unwrap_or_default()
        .iter()
        .map(|route| {
            let counts = route.counts();
            let remote = route.remote_addr();
            RouteInfo {
                rid: route.id(),
                remote_id: route.peer_id.clone(),
                remote_name: route.peer_name.clone(),
                did_solicit: route.dialed,
                ip: remote.ip().to_string(),
                port: remote.port(),
                start: rfc3339(route.started()),
                uptime: uptime(route.started()),
                route_url: format!("nats-route://{}", route.route_addr),
                client_url: format!("nats://{}", route.client_addr),
                pending_size: route.pending(),
                in_msgs: counts.in_msgs,
                out_msgs: counts.out_msgs,
                in_bytes: counts.in_bytes,
                out_bytes: counts.out_bytes,
                subscriptions: route.interest_count(),
            }
        })
        .collect();
    routes.sort_by_key(|r| r.rid);
    Routez {
        server_id: state.info.server_id.clone(),
        server_name: state.info.server_name.clone(),
        now: rfc3339(std::time::SystemTime::now()),
        num_routes: routes.len(),
        routes,
    }
}
