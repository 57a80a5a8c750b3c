//! `/connz`: the client connections, paged and sorted, in nats-server's
//! shape.
//!
//! Query: `offset`, `limit` (default 1024), `sort` (`cid`, the default;
//! `start`, `uptime`, `msgs_to`, `msgs_from`, `bytes_to`, `bytes_from`,
//! `pending`, `subs`), `subs=1` for each connection's subscription list.
//! "To" is what the server sent the client (`out_*`), "from" what it
//! received (`in_*`), as in nats-server; counters and `subs` sort largest
//! first, `cid` and `start` oldest first.
//!
//! Only open client connections are listed (routes are in `/routez`).
//! Each row is read from the connection's shared state without stopping
//! it; the name, details and subscriptions are read only for the rows of
//! the requested page.

use std::sync::Arc;

use serde::Serialize;

use super::{page, rfc3339, uptime, Monitor, Query, RequestError, DEFAULT_LIMIT};
use crate::client::ClientShared;
use crate::connection::Counts;

#[derive(Serialize)]
pub(super) struct Connz {
    server_id: String,
    now: String,
    /// Connections on this page.
    num_connections: usize,
    /// Connections in all.
    total: usize,
    offset: usize,
    limit: usize,
    connections: Vec<ConnInfo>,
}

#[derive(Serialize)]
struct ConnInfo {
    cid: u64,
    kind: &'static str,
    #[serde(rename = "type")]
    kind_type: &'static str,
    ip: String,
    port: u16,
    start: String,
    uptime: String,
    pending_bytes: usize,
    in_msgs: u64,
    out_msgs: u64,
    in_bytes: u64,
    out_bytes: u64,
    subscriptions: usize,
    #[serde(skip_serializing_if = "String::is_empty")]
    name: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    lang: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cipher_suite: Option<String>,
    /// The authenticated user's name (never a credential).
    #[serde(skip_serializing_if = "Option::is_none")]
    authorized_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscriptions_list: Option<Vec<String>>,
}

/// The orders `/connz` can list connections in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sort {
    Cid,
    Start,
    MsgsTo,
    MsgsFrom,
    BytesTo,
    BytesFrom,
    Pending,
    Subs,
}

impl Sort {
    fn parse(text: Option<&str>) -> Result<Sort, RequestError> {
        Ok(match text.unwrap_or("cid") {
            "" | "cid" => Sort::Cid,
            // Longest uptime first is earliest start first.
            "start" | "uptime" => Sort::Start,
            "msgs_to" => Sort::MsgsTo,
            "msgs_from" => Sort::MsgsFrom,
            "bytes_to" => Sort::BytesTo,
            "bytes_from" => Sort::BytesFrom,
            "pending" => Sort::Pending,
            "subs" => Sort::Subs,
            other => return Err(RequestError::BadSort(other.to_string())),
        })
    }
}

/// What sorting needs of one connection, read once.
struct Row {
    client: Arc<ClientShared>,
    counts: Counts,
    pending: usize,
    subs: usize,
}

impl Row {
    /// The sort key: ascending for `cid` and `start`, descending (negated
    /// through `Reverse`) for the counters; ties are broken by cid.
    fn key(&self, sort: Sort) -> (std::cmp::Reverse<u64>, u64) {
        use std::cmp::Reverse;
        let descending = match sort {
            Sort::Cid | Sort::Start => 0,
            Sort::MsgsTo => self.counts.out_msgs,
            Sort::MsgsFrom => self.counts.in_msgs,
            Sort::BytesTo => self.counts.out_bytes,
            Sort::BytesFrom => self.counts.in_bytes,
            Sort::Pending => self.pending as u64,
            Sort::Subs => self.subs as u64,
        };
        // cids grow with accept order, so cid order is start order too.
        (Reverse(descending), self.client.id)
    }
}

pub(super) fn connz(monitor: &Monitor, query: &Query) -> Result<Connz, RequestError> {
    let sort = Sort::parse(query.get("sort"))?;
    let offset = query.number("offset", 0)?;
    let limit = query.number("limit", DEFAULT_LIMIT)?;
    let with_subs = query.flag("subs")?;
    let state = &monitor.state;
    // Clone the handles first: a DashMap shard stays locked while iterated,
    // and reading each client takes its own locks.
    let clients: Vec<Arc<ClientShared>> = state.clients.iter().map(|c| Arc::clone(&c)).collect();
    let mut rows: Vec<Row> = clients
        .into_iter()
        .map(|client| Row {
            counts: client.counts(),
            pending: client.outbound.pending(),
            subs: client.subscription_count(),
            client,
        })
        .collect();
    rows.sort_by_key(|r| r.key(sort));
    let total = rows.len();
    let connections: Vec<ConnInfo> = page(rows, offset, limit)
        .into_iter()
        .map(|row| conn_info(row, with_subs))
        .collect();
    Ok(Connz {
        server_id: state.info.server_id.clone(),
        now: rfc3339(std::time::SystemTime::now()),
        num_connections: connections.len(),
        total,
        offset,
        limit,
        connections,
    })
}

fn conn_info(row: Row, with_subs: bool) -> ConnInfo {
    let client = &row.client;
    let details = client.details();
    let subscriptions_list = with_subs.then(|| {
        let mut subjects: Vec<String> = client
            .subscriptions()
            .into_iter()
            .map(|(subject, _queue)| String::from_utf8_lossy(&subject).into_owned())
            .collect();
        subjects.sort();
        subjects
    });
    ConnInfo {
        cid: client.id,
        kind: "Client",
        kind_type: "nats",
        ip: client.addr.ip().to_string(),
        port: client.addr.port(),
        start: rfc3339(client.started),
        uptime: uptime(client.started),
        pending_bytes: row.pending,
        in_msgs: row.counts.in_msgs,
        out_msgs: row.counts.out_msgs,
        in_bytes: row.counts.in_bytes,
        out_bytes: row.counts.out_bytes,
        subscriptions: row.subs,
        name: client.name(),
        lang: details.lang,
        version: details.version,
        tls_version: details.tls_version,
        tls_cipher_suite: details.tls_cipher,
        authorized_user: details.user,
        subscriptions_list,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sort_names_are_nats_servers() {
        assert_eq!(Sort::parse(None).unwrap(), Sort::Cid);
        assert_eq!(Sort::parse(Some("bytes_to")).unwrap(), Sort::BytesTo);
        assert_eq!(Sort::parse(Some("uptime")).unwrap(), Sort::Start);
        assert!(matches!(
            Sort::parse(Some("size")),
            Err(RequestError::BadSort(s)) if s == "size"
        ));
    }
}
