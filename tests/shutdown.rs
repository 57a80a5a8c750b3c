//! Graceful shutdown: what is queued for a subscriber is delivered, every
//! connection is closed, and `shutdown()` returns promptly.

mod common;

use std::time::{Duration, Instant};

use common::{nats, start, start_with, wait_for_clients, within, Raw};
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

const PAYLOAD: usize = 4096;
const MESSAGES: usize = 2000;

/// A raw subscriber whose tiny receive buffer makes the server queue most of
/// what is published to it.
async fn tight_subscriber(server: &skiff::ServerHandle, subject: &str) -> Raw {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = within("connect", socket.connect(server.addr()))
        .await
        .unwrap();
    let mut raw = Raw::from_stream(stream);
    raw.read_info().await;
    raw.send(format!(
        "CONNECT {{\"verbose\":false}}\r\nSUB {subject} 1\r\n"
    ))
    .await;
    raw.ping_pong().await;
    raw
}

/// Publishes `MESSAGES` messages of `PAYLOAD` bytes from a raw client and
/// waits until the server has routed them all.
async fn publish_all(server: &skiff::ServerHandle, subject: &str) -> Raw {
    let mut publisher = Raw::connect_with(server.addr(), r#"{"verbose":false}"#).await;
    let mut batch = Vec::new();
    for i in 0..MESSAGES {
        let mut payload = format!("{i:<12}").into_bytes();
        payload.resize(PAYLOAD, b'x');
        batch.extend_from_slice(format!("PUB {subject} {PAYLOAD}\r\n").as_bytes());
        batch.extend_from_slice(&payload);
        batch.extend_from_slice(b"\r\n");
    }
    publisher.send(&batch).await;
    publisher.ping_pong().await;
    publisher
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_flushes_queued_messages_and_closes_connections() {
    let server = start().await;
    let subscriber = tight_subscriber(&server, "queued").await;
    let mut publisher = publish_all(&server, "queued").await;
    wait_for_clients(&server, 2).await;

    // Shut down while megabytes are still queued for the subscriber.
    let shutdown = tokio::spawn(server.shutdown());

    // The subscriber gets every message, in order, then the connection ends.
    let (mut read, _write) = subscriber.stream.into_split();
    let received = within("the queued messages and the close", async {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) => panic!("connection reset instead of closed: {e}"),
            }
        }
    })
    .await;
    let mut expected = Vec::new();
    for i in 0..MESSAGES {
        let mut payload = format!("{i:<12}").into_bytes();
        payload.resize(PAYLOAD, b'x');
        expected.extend_from_slice(format!("MSG queued 1 {PAYLOAD}\r\n").as_bytes());
        expected.extend_from_slice(&payload);
        expected.extend_from_slice(b"\r\n");
    }
    assert_eq!(received.len(), expected.len(), "bytes flushed on shutdown");
    assert!(received == expected, "the flushed messages differ");

    // The publisher is closed too, and shutdown returns.
    publisher.expect_closed().await;
    within("shutdown to return", shutdown).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_promptly_with_idle_clients_connected() {
    let server = start().await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(nats(&server).await);
    }
    let mut raws = Vec::new();
    for _ in 0..5 {
        let mut raw = Raw::connect_with(server.addr(), r#"{"verbose":false}"#).await;
        raw.send("SUB idle 1\r\n").await;
        raw.ping_pong().await;
        raws.push(raw);
    }
    wait_for_clients(&server, 10).await;

    let started = Instant::now();
    within("shutdown with idle clients", server.shutdown()).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
    for raw in &mut raws {
        raw.expect_closed().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_a_client_that_does_not_read_after_the_write_deadline() {
    let server = start_with(|c| c.write_deadline = Duration::from_secs(1)).await;
    // Never reads again: what is queued for it cannot be flushed.
    let stuck = tight_subscriber(&server, "stuck").await;
    let _publisher = publish_all(&server, "stuck").await;

    let started = Instant::now();
    within("shutdown despite a stuck client", server.shutdown()).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
    drop(stuck);
}
