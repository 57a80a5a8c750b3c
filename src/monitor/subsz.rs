//! `/subsz`: the sublist's size and match-cache statistics; with `subs=1`
//! the client subscriptions (paged by `offset`/`limit`).
//!
//! `cache_hit_rate` is an estimate: the sublist counts its cache misses but
//! not its lookups (counting every lookup would be an atomic per message),
//! so lookups are taken to be the messages received from clients and
//! routes (`num_matches`), one lookup each. Lookups for messages the
//! server makes itself (stream API replies, consumer deliveries) are missing
//! from that figure, so with heavy stream traffic the rate reads low; it is
//! clamped to [0, 1].

use serde::Serialize;

use super::{page, rfc3339, Monitor, Query, RequestError, DEFAULT_LIMIT};

#[derive(Serialize)]
pub(super) struct Subsz {
    server_id: String,
    now: String,
    /// Entries in the sublist: client subscriptions, the server's own
    /// (stream API, streams) and peers' interest.
    num_subscriptions: usize,
    /// Subjects whose matches are cached.
    num_cache: usize,
    /// Lookups, estimated as messages received (see the module doc).
    num_matches: u64,
    num_cache_misses: u64,
    cache_hit_rate: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscriptions_list: Option<Vec<SubInfo>>,
}

#[derive(Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct SubInfo {
    cid: u64,
    subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    qgroup: Option<String>,
}

pub(super) fn subsz(monitor: &Monitor, query: &Query) -> Result<Subsz, RequestError> {
    let with_subs = query.flag("subs")?;
    let offset = query.number("offset", 0)?;
    let limit = query.number("limit", DEFAULT_LIMIT)?;
    let state = &monitor.state;
    let sublist = &state.sublist;
    let matches = state.counts().in_msgs;
    let misses = sublist.cache_misses();
    let mut subsz = Subsz {
        server_id: state.info.server_id.clone(),
        now: rfc3339(std::time::SystemTime::now()),
        num_subscriptions: sublist.count(),
        num_cache: sublist.cache_len(),
        num_matches: matches,
        num_cache_misses: misses,
        cache_hit_rate: hit_rate(misses, matches),
        total: None,
        offset: None,
        limit: None,
        subscriptions_list: None,
    };
    if with_subs {
        let clients: Vec<_> = state.clients.iter().map(|c| c.value().clone()).collect();
        let mut subs: Vec<SubInfo> = clients
            .iter()
            .flat_map(|client| {
                client
                    .subscriptions()
                    .into_iter()
                    .map(|(subject, queue)| SubInfo {
                        cid: client.id,
                        subject: String::from_utf8_lossy(&subject).into_owned(),
                        qgroup: queue.map(|q| String::from_utf8_lossy(&q).into_owned()),
                    })
            })
            .collect();
        subs.sort();
        subsz.total = Some(subs.len());
        subsz.offset = Some(offset);
        subsz.limit = Some(limit);
        subsz.subscriptions_list = Some(page(subs, offset, limit));
    }
    Ok(subsz)
}

/// `1 - misses / lookups`, clamped to [0, 1]; 0 before any lookup.
fn hit_rate(misses: u64, lookups: u64) -> f64 {
    if lookups == 0 {
        return 0.0;
    }
    (1.0 - misses as f64 / lookups as f64).clamp(0.0, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_rate_is_clamped() {
        assert_eq!(hit_rate(0, 0), 0.0);
        assert_eq!(hit_rate(1, 100), 0.99);
        assert_eq!(hit_rate(500, 100), 0.0);
    }
}
