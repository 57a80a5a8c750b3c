//! Helpers for the durable-stream tests: an embedded server with its own
//! temporary store that can be restarted on the same directory, raw
//! `$JS.API` requests, error-code extraction from async-nats errors, and
//! bounded fetches and polls.
//!
//! Every wait is bounded (by [`super::WAIT`] or an explicit deadline), so a
//! server that never answers fails the test with a message instead of
//! hanging it.

use std::error::Error as StdError;
use std::future::{Future, IntoFuture};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::PullConsumer, context::PublishAckFuture};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use skiff::{Config, Server, ServerHandle};

use super::within;

/// A server with durable streams in a temporary directory, and one
/// async-nats connection to it.
pub struct JsServer {
    pub server: ServerHandle,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    config: Config,
    dir: tempfile::TempDir,
}

impl JsServer {
    /// Starts a server on a free port with a fresh, empty store.
    pub async fn start() -> JsServer {
        let dir = tempfile::tempdir().expect("temporary store directory");
        let config = Config::with_streams("127.0.0.1:0", dir.path());
        JsServer::boot(config, dir).await
    }

    async fn boot(config: Config, dir: tempfile::TempDir) -> JsServer {
        let server = within("the server to start", Server::start(config.clone()))
            .await
            .expect("server starts");
        let client = within(
            "async-nats to connect",
            async_nats::connect(server.client_url()),
        )
        .await
        .expect("async-nats connects");
        let js = jetstream::new(client.clone());
        JsServer {
            server,
            client,
            js,
            config,
            dir,
        }
    }

    /// Shuts the server down and starts a new one on the same store (on a
    /// new port), with a new connection.
    pub async fn restart(self) -> JsServer {
        self.restart_after(Duration::ZERO).await
    }

    /// [`JsServer::restart`], with the server down for `downtime` (for
    /// timers that run on while no server does, such as ack waits).
    pub async fn restart_after(self, downtime: Duration) -> JsServer {
        let JsServer {
            server,
            client,
            js,
            mut config,
            dir,
        } = self;
        drop(js);
        drop(client);
        within("the server to shut down", server.shutdown()).await;
        tokio::time::sleep(downtime).await;
        config.listen = "127.0.0.1:0".into();
        JsServer::boot(config, dir).await
    }

    pub async fn shutdown(self) {
        drop(self.js);
        drop(self.client);
        within("the server to shut down", self.server.shutdown()).await;
        drop(self.dir);
    }

    /// A raw API request: `body` is sent as JSON to `$JS.API.<subject>` and
    /// the JSON reply is returned (errors included, as `{"error": ...}`).
    pub async fn api(&self, subject: &str, body: Value) -> Value {
        let payload = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let reply = within(
            &format!("a reply to $JS.API.{subject}"),
            self.client.request(format!("$JS.API.{subject}"), payload),
        )
        .await
        .unwrap_or_else(|e| panic!("request to $JS.API.{subject} failed: {e}"));
        serde_json::from_slice(&reply.payload).unwrap_or_else(|e| {
            panic!(
                "reply to $JS.API.{subject} is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&reply.payload)
            )
        })
    }

    /// Publishes and waits for the PubAck.
    pub async fn publish(&self, subject: &str, payload: &str) -> jetstream::publish::PublishAck {
        let ack = within(
            "a publish to be sent",
            self.js
                .publish(subject.to_string(), Bytes::from(payload.to_string())),
        )
        .await
        .unwrap_or_else(|e| panic!("publish to {subject} failed: {e}"));
        within("a PubAck", ack.into_future())
            .await
            .unwrap_or_else(|e| panic!("publish to {subject} not acknowledged: {e}"))
    }

    /// Publishes `(subject, payload)` pairs back to back, then waits for all
    /// the PubAcks (so the server may store them as one batch). Returns the
    /// sequences in publish order.
    pub async fn publish_all(&self, messages: &[(&str, &str)]) -> Vec<u64> {
        let mut pending: Vec<PublishAckFuture> = Vec::new();
        for (subject, payload) in messages {
            let ack = within(
                "a publish to be sent",
                self.js
                    .publish(subject.to_string(), Bytes::from(payload.to_string())),
            )
            .await
            .unwrap_or_else(|e| panic!("publish to {subject} failed: {e}"));
            pending.push(ack);
        }
        let mut seqs = Vec::new();
        for ack in pending {
            let ack = within("a PubAck", ack.into_future())
                .await
                .unwrap_or_else(|e| panic!("publish not acknowledged: {e}"));
            seqs.push(ack.sequence);
        }
        seqs
    }

    /// Publishes `n` messages `"<subject> <i>"` (i from 1) to `subject`.
    pub async fn publish_n(&self, subject: &str, n: usize) -> Vec<u64> {
        let payloads: Vec<String> = (1..=n).map(|i| format!("{subject} {i}")).collect();
        let messages: Vec<(&str, &str)> = payloads.iter().map(|p| (subject, p.as_str())).collect();
        self.publish_all(&messages).await
    }

    /// The current STREAM.INFO.
    pub async fn stream_info(&self, stream: &str) -> jetstream::stream::Info {
        let s = within("a stream handle", self.js.get_stream_no_info(stream))
            .await
            .expect("stream handle");
        within("STREAM.INFO", s.get_info())
            .await
            .unwrap_or_else(|e| panic!("STREAM.INFO {stream} failed: {e}"))
    }

    /// The current CONSUMER.INFO.
    pub async fn consumer_info(&self, stream: &str, consumer: &str) -> jetstream::consumer::Info {
        let v = self
            .api(&format!("CONSUMER.INFO.{stream}.{consumer}"), Value::Null)
            .await;
        assert!(
            v.get("error").is_none(),
            "CONSUMER.INFO {stream}.{consumer} failed: {v}"
        );
        serde_json::from_value(v).expect("CONSUMER.INFO reply parses as async-nats consumer::Info")
    }
}

/// `err_code` of a raw API reply, if it is an error.
pub fn err_code(reply: &Value) -> Option<u64> {
    reply.get("error")?.get("err_code")?.as_u64()
}

/// Asserts a raw API reply is an error with `err_code` (and HTTP-like
/// `code`).
#[track_caller]
pub fn assert_api_error(reply: &Value, code: u64, err_code: u64) {
    let error = reply
        .get("error")
        .unwrap_or_else(|| panic!("expected error {err_code}, got success: {reply}"));
    assert_eq!(
        (error["code"].as_u64(), error["err_code"].as_u64()),
        (Some(code), Some(err_code)),
        "unexpected error: {reply}"
    );
}

/// The JetStream API error somewhere in `error`'s source chain.
pub fn api_error_in(error: &(dyn StdError + 'static)) -> Option<jetstream::Error> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(js) = e.downcast_ref::<jetstream::Error>() {
            return Some(js.clone());
        }
        current = e.source();
    }
    None
}

/// `err_code` of the JetStream API error in `error`'s source chain.
pub fn code_in(error: &(dyn StdError + 'static)) -> Option<u64> {
    api_error_in(error).map(|e| e.error_code().0)
}

/// Fetches what is available now (`no_wait`): the client stops at the
/// server's 404/408 status. Panics on an error item.
pub async fn fetch(consumer: &PullConsumer, max: usize) -> Vec<jetstream::Message> {
    let mut batch = within(
        "a fetch to start",
        consumer.fetch().max_messages(max).messages(),
    )
    .await
    .expect("fetch request");
    let mut got = Vec::new();
    while let Some(m) = within("a fetched message or the end of the fetch", batch.next()).await {
        got.push(m.expect("fetched message"));
    }
    got
}

/// A pull request that waits up to `expires` for `max` messages; ends at
/// the server's 408 when fewer came.
pub async fn pull(
    consumer: &PullConsumer,
    max: usize,
    expires: Duration,
) -> Vec<jetstream::Message> {
    let mut batch = within(
        "a pull request to start",
        consumer
            .batch()
            .max_messages(max)
            .expires(expires)
            .messages(),
    )
    .await
    .expect("pull request");
    let mut got = Vec::new();
    while let Some(m) = within("a pulled message or the end of the pull", batch.next()).await {
        got.push(m.expect("pulled message"));
    }
    got
}

/// Stream sequences of delivered messages.
pub fn seqs(messages: &[jetstream::Message]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m.info().expect("JetStream metadata").stream_sequence)
        .collect()
}

/// Acknowledges with `AckSync`: returns once the server confirmed.
pub async fn ack_sync(message: &jetstream::Message) {
    within("an ack to be confirmed", message.double_ack())
        .await
        .expect("ack confirmed");
}

/// Acknowledges `kind` with a reply: returns once the server processed it.
pub async fn ack_sync_with(message: &jetstream::Message, kind: jetstream::AckKind) {
    within("an ack to be confirmed", message.double_ack_with(kind))
        .await
        .expect("ack confirmed");
}

/// Polls `check` every 25 ms until it returns `Some`, for at most
/// `deadline`; panics with `what` otherwise.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > end {
            panic!("not true after {deadline:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
