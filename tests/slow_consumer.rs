//! A subscriber that stops reading must not hold up anyone else: once more
//! than `max_pending` bytes are queued for it, the server cuts it off, while
//! publishers never wait and fast subscribers miss nothing.

mod common;

use std::time::Duration;

use common::{nats, round_trip, start_with, wait_for_clients, within, Raw};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

const MAX_PENDING: usize = 256 * 1024;
const PAYLOAD: usize = 4096;
/// Messages per batch: the fast subscriber is let to catch up after each, so
/// it never has more than one batch (well under `max_pending`) outstanding.
const BATCH: usize = 16;
/// Give up (and fail) after this many bytes without the slow client cut off.
const MAX_TOTAL: usize = 256 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_is_cut_off_and_nobody_else_suffers() {
    let server = start_with(|c| {
        c.max_pending = MAX_PENDING;
        // max_pending may not be below max_payload.
        c.max_payload = 64 * 1024;
        // Long enough that only max_pending can explain a disconnect.
        c.write_deadline = Duration::from_secs(120);
    })
    .await;

    // The slow subscriber: a tiny receive buffer, and it stops reading once
    // subscribed.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = within("slow connect", socket.connect(server.addr()))
        .await
        .unwrap();
    let mut slow = Raw::from_stream(stream);
    slow.read_info().await;
    slow.send("CONNECT {\"verbose\":false}\r\nSUB firehose 1\r\n")
        .await;
    slow.ping_pong().await;

    // The fast subscriber counts what it gets, checking order as it goes.
    let fast = nats(&server).await;
    let mut fast_sub = fast.subscribe("firehose").await.unwrap();
    round_trip(&fast).await;
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let fast_task = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(msg) = fast_sub.next().await {
            assert_eq!(msg.payload.len(), PAYLOAD);
            let index = std::str::from_utf8(&msg.payload[..12]).unwrap();
            assert_eq!(
                index.trim_end().parse::<usize>().unwrap(),
                n,
                "out of order"
            );
            n += 1;
            count_tx.send_replace(n);
        }
    });

    let publisher = nats(&server).await;
    wait_for_clients(&server, 3).await;

    let mut sent = 0usize;
    let mut cut_off_at = None;
    within("publishing until the slow consumer is cut off", async {
        loop {
            for _ in 0..BATCH {
                let mut payload = format!("{sent:<12}").into_bytes();
                payload.resize(PAYLOAD, b'x');
                publisher.publish("firehose", payload.into()).await.unwrap();
                sent += 1;
            }
            publisher.flush().await.unwrap();
            count_rx.wait_for(|&n| n >= sent).await.unwrap();
            if cut_off_at.is_none() && server.client_count() == 2 {
                cut_off_at = Some(sent);
            }
            match cut_off_at {
                // Keep going a little after the cut-off: the others are fine.
                Some(at) if sent >= at + 10 * BATCH => break,
                _ => assert!(
                    sent * PAYLOAD < MAX_TOTAL,
                    "slow consumer still connected after {sent} messages"
                ),
            }
        }
    })
    .await;

    // The slow one's socket ends (EOF or reset) after whatever the kernel
    // had buffered for it; the server did not keep it open.
    let (mut read, _write) = slow.stream.into_split();
    let drained = within("the slow consumer's socket to close", async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    // It got less than was published: it was cut off, not served in full.
    assert!(drained < sent * PAYLOAD, "drained {drained} bytes");

    assert_eq!(server.client_count(), 2, "only the two fast clients remain");
    // The fast subscriber got every message, in order (checked as it went).
    assert_eq!(
        *count_rx.borrow(),
        sent,
        "the fast subscriber missed messages"
    );
    assert!(!fast_task.is_finished(), "the fast subscriber failed");
    fast_task.abort();
    within("shutdown", server.shutdown()).await;
}
