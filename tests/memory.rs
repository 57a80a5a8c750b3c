//! Memory a client can make the server hold, measured as the growth of this
//! process's resident set (the server is embedded in the test process).
//!
//! RSS is a coarse measure: the bounds below are set far from both what the
//! server needs and what the failures they guard against cost, so that
//! allocator noise decides nothing. The tests take a lock so that they never
//! measure each other.

mod common;

use std::time::Instant;

use common::{start_with, wait_for_clients, within, Raw};
use tokio::io::AsyncWriteExt;

/// One memory test at a time: RSS is the whole process's.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's resident set size in bytes, from `/proc/self/status`.
fn rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|n| n.trim().parse::<usize>().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

const SUBSCRIPTIONS: usize = 10_000;
/// Publishes of [`PUB_SIZE`] bytes after each SUB, so that read buffers are
/// large and each holds few SUBs: a subscription that kept a slice of its
/// read buffer would keep several KiB alive.
const PUBS_PER_SUB: usize = 4;
const PUB_SIZE: usize = 1024;
/// What one subscription may cost, all of the server's structures included
/// (measured: about 0.6 KiB; with subject and sid kept as slices of the read
/// buffer, about 4.8 KiB).
const MAX_BYTES_PER_SUB: usize = 2048;

/// A SUB's subject and sid are copied out of the read buffer: thousands of
/// subscriptions made amid publishes do not keep the read buffers they
/// arrived in alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_do_not_pin_the_read_buffers_they_arrived_in() {
    let _alone = MEASURING.lock().await;
    let server = start_with(|_| {}).await;
    let mut raw = Raw::connect_with(server.addr(), r#"{"verbose":false,"pedantic":false}"#).await;
    raw.ping_pong().await;

    let payload = vec![b'x'; PUB_SIZE];
    let mut batch = Vec::with_capacity(128 * 1024);
    let before = rss();
    let started = Instant::now();
    for first in (0..SUBSCRIPTIONS).step_by(16) {
        batch.clear();
        for i in first..(first + 16).min(SUBSCRIPTIONS) {
            batch.extend_from_slice(format!("SUB sub.{i} {i}\r\n").as_bytes());
            for _ in 0..PUBS_PER_SUB {
                // Nobody listens on `elsewhere`: the publishes only fill
                // the read buffers.
                batch.extend_from_slice(format!("PUB elsewhere {PUB_SIZE}\r\n").as_bytes());
                batch.extend_from_slice(&payload);
                batch.extend_from_slice(b"\r\n");
            }
        }
        within("a batch of SUBs and PUBs", raw.stream.write_all(&batch))
            .await
            .expect("write to server");
    }
    // PONG comes after every SUB before it has been handled.
    raw.ping_pong().await;
    let grown = rss().saturating_sub(before);
    let per_sub = grown / SUBSCRIPTIONS;
    eprintln!(
        "{SUBSCRIPTIONS} subscriptions in {:?}: RSS grew {grown} bytes, {per_sub} per subscription",
        started.elapsed()
    );
    assert!(
        per_sub <= MAX_BYTES_PER_SUB,
        "each subscription costs {per_sub} bytes of RSS, more than {MAX_BYTES_PER_SUB}"
    );
    drop(raw);
    wait_for_clients(&server, 0).await;
    server.shutdown().await;
}
