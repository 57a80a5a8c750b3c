//! Helpers shared by the integration tests: an embedded server on a free port,
//! a raw TCP client that asserts exact bytes (what a telnet user sees), and
//! bounded waits. The tools crate's tests (tools/tests/) include it too, by
//! path.
//!
//! Every wait here is bounded by [`WAIT`]; a test that would hang fails with
//! a message saying what it was waiting for instead.

#![allow(dead_code)]

pub mod jetstream;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use skiff::{Config, Server, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single wait may take. Generous, because the tests must
/// pass on a loaded two-core machine; a passing test never waits this long.
pub const WAIT: Duration = Duration::from_secs(20);

/// Runs `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A server on a free loopback port with the default configuration.
pub async fn start() -> ServerHandle {
    start_with(|_| {}).await
}

/// A server on a free loopback port with `tweak` applied to the defaults.
pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> ServerHandle {
    let mut config = Config::core("127.0.0.1:0");
    tweak(&mut config);
    Server::start(config).await.expect("server starts")
}

/// Waits until the server counts exactly `n` connected clients.
pub async fn wait_for_clients(server: &ServerHandle, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let count = server.client_count();
        if count == n {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("server still counts {count} clients after {WAIT:?}, expected {n}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Connects an async-nats client to `server`.
pub async fn nats(server: &ServerHandle) -> async_nats::Client {
    nats_with(server, async_nats::ConnectOptions::new()).await
}

/// Connects an async-nats client with `options`.
pub async fn nats_with(
    server: &ServerHandle,
    options: async_nats::ConnectOptions,
) -> async_nats::Client {
    within(
        "async-nats to connect",
        options.connect(server.client_url()),
    )
    .await
    .expect("async-nats connects")
}

/// A server round trip on `client`'s connection: subscribes to a fresh inbox,
/// publishes to it and waits for the message. When it returns, the server
/// has processed everything the client sent before (one connection's
/// commands are handled in order). Needs echo (the default).
pub async fn round_trip(client: &async_nats::Client) {
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client.publish(inbox, "sync".into()).await.unwrap();
    let msg = within("a round trip through the server", sub.next()).await;
    assert!(msg.is_some(), "round-trip subscription ended");
    sub.unsubscribe().await.unwrap();
}

/// Receives the next message of `sub`, bounded by [`WAIT`].
pub async fn next_msg(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    within("a message", sub.next())
        .await
        .expect("subscription ended before the expected message")
}

/// A raw TCP connection that speaks the protocol by hand and asserts the exact
/// bytes the server sends. Bytes received but not yet consumed by an
/// assertion are kept, so how the server's output is split into reads never
/// matters.
pub struct Raw {
    pub stream: TcpStream,
    received: Vec<u8>,
}

impl Raw {
    /// Connects without reading anything.
    pub async fn connect(addr: SocketAddr) -> Raw {
        let stream = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        stream.set_nodelay(true).unwrap();
        Raw::from_stream(stream)
    }

    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw {
            stream,
            received: Vec::new(),
        }
    }

    /// Connects and consumes the INFO line, returning its JSON.
    pub async fn connect_info(addr: SocketAddr) -> (Raw, serde_json::Value) {
        let mut raw = Raw::connect(addr).await;
        let info = raw.read_info().await;
        (raw, info)
    }

    /// Connects, consumes INFO and sends `connect_json` as CONNECT.
    pub async fn connect_with(addr: SocketAddr, connect_json: &str) -> Raw {
        let (mut raw, _) = Raw::connect_info(addr).await;
        raw.send(format!("CONNECT {connect_json}\r\n")).await;
        raw
    }

    /// Consumes the INFO line and returns its JSON.
    pub async fn read_info(&mut self) -> serde_json::Value {
        let line = self.read_line().await;
        let text = std::str::from_utf8(&line).expect("INFO is UTF-8");
        let json = text
            .strip_prefix("INFO ")
            .unwrap_or_else(|| panic!("first line is not INFO: {text:?}"))
            .strip_suffix("\r\n")
            .expect("INFO ends with CRLF");
        serde_json::from_str(json).expect("INFO carries valid JSON")
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        within("a write", self.stream.write_all(bytes.as_ref()))
            .await
            .expect("write to server");
    }

    /// One read into the buffer. `Ok(0)` at EOF; a reset is an error.
    async fn fill(&mut self) -> std::io::Result<usize> {
        self.received.reserve(64 * 1024);
        self.stream.read_buf(&mut self.received).await
    }

    /// Waits until at least `n` bytes are buffered (panics on EOF).
    async fn want(&mut self, n: usize, what: &str) {
        while self.received.len() < n {
            let read = tokio::time::timeout(WAIT, self.fill()).await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => panic!(
                    "connection closed while waiting for {what}; received {:?}",
                    String::from_utf8_lossy(&self.received)
                ),
                Ok(Ok(_)) => {}
                Err(_) => panic!(
                    "timed out waiting for {what}; received {:?}",
                    String::from_utf8_lossy(&self.received)
                ),
            }
        }
    }

    /// Asserts that the next bytes from the server are exactly `expected`.
    pub async fn expect(&mut self, expected: impl AsRef<[u8]>) {
        let expected = expected.as_ref();
        let what = format!("{:?}", String::from_utf8_lossy(expected));
        self.want(expected.len(), &what).await;
        let got: Vec<u8> = self.received.drain(..expected.len()).collect();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected),
            "unexpected bytes from the server"
        );
        assert_eq!(got, expected);
    }

    /// The next line, CRLF included.
    pub async fn read_line(&mut self) -> Vec<u8> {
        self.read_until(b"\r\n").await
    }

    /// Everything up to and including the first `needle`.
    pub async fn read_until(&mut self, needle: &[u8]) -> Vec<u8> {
        let mut searched = 0;
        loop {
            if let Some(pos) = self.received[searched..]
                .windows(needle.len())
                .position(|w| w == needle)
            {
                let end = searched + pos + needle.len();
                return self.received.drain(..end).collect();
            }
            searched = self.received.len().saturating_sub(needle.len() - 1);
            let what = format!("{:?}", String::from_utf8_lossy(needle));
            self.want(self.received.len() + 1, &what).await;
        }
    }

    /// Sends PING and asserts the very next bytes are `PONG`: proves the
    /// connection is open and nothing else was sent before.
    pub async fn ping_pong(&mut self) {
        self.send(b"PING\r\n").await;
        self.expect(b"PONG\r\n").await;
    }

    /// Reads until the server closes the connection (EOF or reset) and
    /// returns whatever arrived before.
    pub async fn read_to_close(&mut self) -> Vec<u8> {
        loop {
            match tokio::time::timeout(WAIT, self.fill()).await {
                Ok(Ok(0)) | Ok(Err(_)) => return std::mem::take(&mut self.received),
                Ok(Ok(_)) => {}
                Err(_) => panic!(
                    "the server did not close the connection within {WAIT:?}; received {:?}",
                    String::from_utf8_lossy(&self.received)
                ),
            }
        }
    }

    /// Asserts the server closes the connection without sending anything
    /// more.
    pub async fn expect_closed(&mut self) {
        let rest = self.read_to_close().await;
        assert!(
            rest.is_empty(),
            "expected the connection to close, got {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

/// Everything `read` yields until the server closes the connection (or it
/// fails), within [`WAIT`]; `what` names the wait in a timeout's panic.
pub async fn read_until_closed(
    read: &mut (impl tokio::io::AsyncRead + Unpin),
    what: &str,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    within(what, async {
        let mut buf = [0u8; 4096];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    received
}
