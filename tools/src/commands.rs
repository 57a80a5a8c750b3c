//! The `skiff pub`, `sub`, `req`, `reply` and `server check` commands: short
//! loops over a [`Connection`] that print what they receive the way the
//! `nats` CLI does. `main.rs` only parses flags and calls these.

use std::io::Write;
use std::time::Duration;

use super::conn::{Connection, Endpoint, Error};
use skiff::protocol::Message;

/// Publishes `data` to `subject` `count` times and returns once the server
/// has processed every message.
pub async fn publish(
    endpoint: &Endpoint,
    subject: &str,
    data: &[u8],
    count: u64,
) -> Result<(), Error> {
    let mut conn = Connection::connect_to(endpoint).await?;
    for _ in 0..count {
        conn.publish(subject.as_bytes(), None, data).await?;
    }
    conn.flush().await
}

/// Connects and subscribes to `subject` (in `queue` if given); returns once
/// the server has the subscription in place.
pub async fn listen(
    endpoint: &Endpoint,
    subject: &str,
    queue: Option<&str>,
) -> Result<Connection, Error> {
    let mut conn = Connection::connect_to(endpoint).await?;
    conn.subscribe(subject.as_bytes(), queue.map(str::as_bytes));
    conn.flush().await?;
    Ok(conn)
}

/// Prints each message received on `conn` as `[#n] Received on "subject":
/// data`, and with `reply_with`, answers each request with it. Stops after
/// `count` messages (never without one: the command runs until killed).
pub async fn receive(
    conn: &mut Connection,
    count: Option<u64>,
    reply_with: Option<&[u8]>,
    out: &mut impl Write,
) -> Result<(), Error> {
    for n in 1..=count.unwrap_or(u64::MAX) {
        let message = conn.next_message().await?;
        print_message(out, n, &message)?;
        if let (Some(data), Some(reply)) = (reply_with, message.reply()) {
            // Written before the next wait for input, so replies are prompt.
            conn.publish(reply, None, data).await?;
        }
    }
    conn.flush().await
}

fn print_message(out: &mut impl Write, n: u64, message: &Message) -> std::io::Result<()> {
    writeln!(
        out,
        "[#{n}] Received on \"{}\": {}",
        String::from_utf8_lossy(message.subject()),
        String::from_utf8_lossy(message.data())
    )?;
    // Each line at once, also when the output is a pipe.
    out.flush()
}

/// Sends one request and waits up to `timeout` for its reply; returns the
/// reply and the round-trip time.
pub async fn request(
    endpoint: &Endpoint,
    subject: &str,
    data: &[u8],
    timeout: Duration,
) -> Result<(Message, Duration), Error> {
    let mut conn = Connection::connect_to(endpoint).await?;
    let start = std::time::Instant::now();
    let reply = conn.request(subject.as_bytes(), data, timeout).await?;
    Ok((reply, start.elapsed()))
}

/// What `skiff server check` learnt about a server that answered.
#[derive(Clone, Debug)]
pub struct Health {
    pub server_name: String,
    /// The protocol version INFO reports, and the implementation (`go`).
    pub version: String,
    pub implementation: String,
    /// Connecting, INFO, CONNECT and a PING round trip.
    pub elapsed: Duration,
    /// INFO said `ldm`: the server is about to go away.
    pub lame_duck: bool,
}

/// Connects, logs in and waits for the answer to a PING, all within
/// `timeout`: the server is up and accepts this client.
pub async fn check(endpoint: &Endpoint, timeout: Duration) -> Result<Health, Error> {
    let start = std::time::Instant::now();
    let conn = tokio::time::timeout(timeout, Connection::connect_to(endpoint))
        .await
        .map_err(|_| Error::Timeout)??;
    let info = conn.info();
    Ok(Health {
        server_name: info.server_name.clone(),
        version: info.version.clone(),
        implementation: info.go.clone(),
        elapsed: start.elapsed(),
        lame_duck: info.ldm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sub_prints_and_reply_answers() {
        let server = crate::test_server().await;
        let url = Endpoint::plain(&server.client_url()).unwrap();

        let mut sub = listen(&url, "greet.*", None).await.unwrap();
        publish(&url, "greet.en", b"hello", 2).await.unwrap();
        let mut out = Vec::new();
        receive(&mut sub, Some(2), None, &mut out).await.unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[#1] Received on \"greet.en\": hello\n[#2] Received on \"greet.en\": hello\n"
        );

        let mut replier = listen(&url, "time", Some("workers")).await.unwrap();
        let serve = tokio::spawn(async move {
            let mut out = Vec::new();
            receive(&mut replier, Some(1), Some(b"noon"), &mut out)
                .await
                .map(|()| out)
        });
        let (reply, _rtt) = request(&url, "time", b"now?", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(reply.data(), b"noon");
        let printed = serve.await.unwrap().unwrap();
        assert_eq!(printed, b"[#1] Received on \"time\": now?\n");
        server.shutdown().await;
    }

    #[tokio::test]
    async fn check_reports_a_live_server_and_a_closed_port() {
        let server = crate::test_server().await;
        let url = Endpoint::plain(&server.client_url()).unwrap();
        let health = check(&url, Duration::from_secs(5)).await.unwrap();
        assert_eq!(health.version, skiff::server::PROTOCOL_VERSION);
        assert!(!health.lame_duck);
        let addr = server.addr();
        server.shutdown().await;
        let closed = Endpoint::plain(&format!("nats://{addr}")).unwrap();
        assert!(check(&closed, Duration::from_secs(5)).await.is_err());
    }
}
