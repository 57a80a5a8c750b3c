//! Memory a client can make the server hold, measured as the growth of this
//! process's resident set (the server is embedded in the test process).
//!
//! RSS is a coarse measure: the bounds below are set far from both what the
//! server needs and what the failures they guard against cost, so that
//! allocator noise decides nothing. The tests take a lock so that they never
//! measure each other.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start_with, wait_for_clients, within, Raw};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;

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

/// The highest RSS seen while it runs, sampled every millisecond on a thread
/// of its own.
struct PeakRss {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start() -> PeakRss {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(rss()));
        let thread = std::thread::spawn({
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        PeakRss {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("sampler thread");
        }
        self.peak.load(Ordering::Relaxed).max(rss())
    }
}

const MAX_PENDING: usize = 4 * 1024 * 1024;
const MSG_SIZE: usize = 4096;
/// Of every this many messages published, one is for the stalled
/// subscriber: each of its messages then lies in a read buffer with others,
/// which a zero-copy slice in its queue would keep alive.
const ONE_IN: usize = 16;
/// What the server may hold beyond `max_pending` for one stalled
/// subscriber: read buffers, arenas, allocator slack.
const SLACK: usize = 8 * 1024 * 1024;
/// Give up (and fail) after publishing this much without the subscriber
/// cut off.
const MAX_PUBLISHED: usize = 1 << 30;

/// `max_pending` bounds what a stalled subscriber costs in memory, not only
/// in bytes queued: its queue does not keep alive whole read buffers for
/// the few messages in them that are its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_costs_at_most_max_pending() {
    let _alone = MEASURING.lock().await;
    let server = start_with(|c| {
        c.max_pending = MAX_PENDING;
        // Long enough that only max_pending can explain the disconnect.
        c.write_deadline = Duration::from_secs(120);
    })
    .await;

    // Subscribes, then never reads (with a small receive buffer, so that
    // the kernel takes little of what is sent to it).
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("receive buffer size");
    let stream = within(
        "stalled subscriber to connect",
        socket.connect(server.addr()),
    )
    .await
    .expect("connect");
    let mut stalled = Raw::from_stream(stream);
    stalled.read_info().await;
    stalled
        .send("CONNECT {\"verbose\":false}\r\nSUB stalled 1\r\n")
        .await;
    stalled.ping_pong().await;

    let mut publisher =
        Raw::connect_with(server.addr(), r#"{"verbose":false,"pedantic":false}"#).await;
    publisher.ping_pong().await;
    wait_for_clients(&server, 2).await;

    let payload = vec![b'x'; MSG_SIZE];
    let mut batch = Vec::new();
    for i in 0..ONE_IN {
        let subject = if i == 0 { "stalled" } else { "elsewhere" };
        batch.extend_from_slice(format!("PUB {subject} {MSG_SIZE}\r\n").as_bytes());
        batch.extend_from_slice(&payload);
        batch.extend_from_slice(b"\r\n");
    }

    let before = rss();
    let peak = PeakRss::start();
    let started = Instant::now();
    let mut published = 0;
    within("the stalled subscriber to be cut off", async {
        while server.client_count() == 2 {
            assert!(
                published < MAX_PUBLISHED,
                "published {published} bytes and the stalled subscriber is still connected"
            );
            publisher.stream.write_all(&batch).await.expect("publish");
            published += batch.len();
        }
    })
    .await;
    let grown = peak.stop().saturating_sub(before);
    eprintln!(
        "stalled subscriber cut off after {published} bytes published in {:?}; \
         peak RSS growth {grown} bytes (max_pending {MAX_PENDING})",
        started.elapsed()
    );
    assert!(
        grown <= MAX_PENDING + SLACK,
        "RSS grew {grown} bytes for a subscriber with max_pending {MAX_PENDING}"
    );
    // The publisher was not held up.
    publisher.ping_pong().await;
    server.shutdown().await;
}
