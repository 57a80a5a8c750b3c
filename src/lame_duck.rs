//! Lame duck mode (SIGUSR2, `skiff signal ldm`,
//! [`crate::ServerHandle::lame_duck`]): taking a node out of service
//! without dropping its clients on the floor, as nats-server does.
//!
//! 1. Stop accepting: the listener closes, so new connection attempts are
//!    refused at once and reconnecting clients move on to another node.
//! 2. Tell every client that takes INFO updates `ldm: true`, with
//!    `connect_urls` that no longer list this node.
//! 3. Leave them `lame_duck_grace_period` to move on their own.
//! 4. Close the rest gradually over what remains of `lame_duck_duration`,
//!    each flushing what is queued for it ([`pace`]). Gradually, because
//!    thousands of clients closed at once reconnect to the other nodes at
//!    the same instant; spread out, so are their reconnections.
//! 5. Stop the server (routes too): [`crate::ServerHandle::stopped`]
//!    resolves and the binary exits.
//!
//! Clients that reconnect elsewhere keep their subscriptions: the official
//! clients subscribe again on the new connection. Messages published on
//! other nodes reach the clients still here through the routes until they
//! are closed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::client::ClientShared;
use crate::server::ServerState;

/// Longest pause between two closes: a handful of clients need not keep
/// the node up for the whole duration (nats-server's bound).
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// Shortest pause; with more clients than that allows, they are closed in
/// batches.
const MIN_PAUSE: Duration = Duration::from_millis(1);

/// Enters lame duck mode; does nothing if it is on already or the server
/// is shutting down.
pub(crate) fn enter(state: &Arc<ServerState>) {
    if state.shutdown.is_cancelled() || state.lame_duck.swap(true, Ordering::SeqCst) {
        return;
    }
    tracing::info!("Entering lame duck mode, stop accepting new clients");
    state.stop_accepting.cancel();
    state.announce_connect_urls();
    let live = state.live();
    let (duration, grace) = (
        live.config.lame_duck_duration,
        live.config.lame_duck_grace_period,
    );
    state.spawn(drain(Arc::clone(state), duration, grace));
}

/// Steps 3 to 5 of the module docs; ends early if shutdown begins.
async fn drain(state: Arc<ServerState>, duration: Duration, grace: Duration) {
    let shutdown = state.shutdown.clone();
    if !state.clients.is_empty() {
        tracing::info!("Lame duck mode: clients have {grace:?} to move before closing starts");
        if !sleep_unless(&shutdown, grace).await {
            return;
        }
        let clients: Vec<Arc<ClientShared>> = state
            .clients
            .iter()
            .map(|c| Arc::clone(c.value()))
            .collect();
        let spread = duration.saturating_sub(grace);
        let (batch, pause) = pace(clients.len(), spread);
        tracing::info!(
            "Lame duck mode: closing {} client(s), {batch} every {pause:?}",
            clients.len()
        );
        for chunk in clients.chunks(batch) {
            for client in chunk {
                client.close();
            }
            if !sleep_unless(&shutdown, pause).await {
                return;
            }
        }
    }
    tracing::info!("Lame duck mode over: shutting down");
    shutdown.cancel();
}

/// Sleeps `time`; false if shutdown came first.
async fn sleep_unless(shutdown: &CancellationToken, time: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(time) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// How to close `clients` over `spread`: how many at a time, and the pause
/// after each batch. One at a time, `spread / clients` apart, but never
/// more than [`MAX_PAUSE`] apart; below [`MIN_PAUSE`], in batches sized to
/// finish within `spread`.
fn pace(clients: usize, spread: Duration) -> (usize, Duration) {
    let n = u32::try_from(clients.max(1)).unwrap_or(u32::MAX);
    let pause = spread / n;
    if pause >= MIN_PAUSE {
        return (1, pause.min(MAX_PAUSE));
    }
    let steps = (spread.as_millis() / MIN_PAUSE.as_millis()).max(1);
    let steps = usize::try_from(steps).unwrap_or(usize::MAX);
    (clients.div_ceil(steps).max(1), MIN_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_spread_but_never_a_second_apart() {
        let s = Duration::from_secs;
        assert_eq!(pace(10, s(110)), (1, s(1)));
        assert_eq!(pace(4, s(2)), (1, Duration::from_millis(500)));
        assert_eq!(
            pace(1, Duration::from_millis(300)),
            (1, Duration::from_millis(300))
        );
        // 100,000 clients in 10 s: batches of 10 every millisecond.
        assert_eq!(pace(100_000, s(10)), (10, MIN_PAUSE));
        assert_eq!(pace(5, Duration::ZERO), (5, MIN_PAUSE));
        assert_eq!(pace(0, s(1)).0, 1);
    }
}
