//! `jspub` and `jsconsume`: durable-stream scenarios in the spirit of
//! `nats bench --js`, driven through the plain JetStream API subjects so
//! that they measure Skiff and nats-server alike.
//!
//! - `jspub` (re)creates a file stream on the bench subject and publishes
//!   with a reply inbox on each message, keeping up to `--window` PubAcks
//!   outstanding (`nats bench --js --pubbatch`), from `--pubs` connections
//!   side by side (`nats bench --js --pub`), each with its own window and
//!   share of the messages. Only acknowledged messages count: a PubAck is
//!   the server's promise that the message is stored.
//! - `jsconsume` reads a stream (filling it first, with the `jspub` code,
//!   unless it already holds `--msgs` messages) through a durable pull
//!   consumer with explicit acks, pulling `--batch` messages per request and
//!   acking each one.
//!
//! Invariants:
//! - One connection does everything (`jspub` adds one per further
//!   publisher, publishing only), and one wildcard inbox subscription
//!   (the connection's own) takes every reply: PubAcks under `<inbox>.p<n>`,
//!   pull-request status messages under `<inbox>.c<n>`. Letters keep these
//!   apart from the numbered subjects of [`Connection::request`], used for
//!   the API calls.
//! - Output is buffered ([`Connection::publish`]) and written when 64 KiB
//!   are pending or the client waits for input, so messages, acks and pull
//!   requests go out in batches. No window or pull is ever waited on with
//!   unwritten output.
//! - Every loop is bounded by the message count and the run's deadline.

use std::collections::VecDeque;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::{timeout_at, Instant};

use super::{
    connect, rss_bytes, server_name, split, BenchError, BenchOptions, JsReport, Latency, Progress,
    Report, Side, BATCH, MAX_LATENCY_NS,
};
use crate::conn::{self, Connection, Endpoint};
use skiff::protocol::{headers, Message};

/// The durable consumer `jsconsume` creates (and deletes first).
pub const CONSUMER: &str = "skiff-bench";
/// Longest wait for one JetStream API reply.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a pull request waits on the server for messages; one that ends
/// with a 408 is simply replaced.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Pull requests in flight at once. Two keep the consumer busy while the
/// client works through a batch; more would only queue on the server.
const MAX_PULLS: usize = 2;
/// Distinct error texts a report keeps.
const MAX_ERRORS: usize = 5;
/// Pause after a pull request was refused outright (a status other than a
/// timeout), so that a misconfigured run does not spin until its deadline.
const REFUSED_PAUSE: Duration = Duration::from_millis(10);
/// Where consumer deliveries carry their ack subject.
const ACK_PREFIX: &[u8] = b"$JS.ACK.";

/// `jspub`: a fresh stream, then `msgs` publishes with PubAcks.
pub(super) async fn run_jspub(
    options: &BenchOptions,
    endpoint: &Endpoint,
    deadline: Instant,
) -> Result<Report, BenchError> {
    let mut conn = connect(endpoint, deadline).await?;
    let server = server_name(&conn);
    recreate_stream(&mut conn, options, deadline).await?;
    let mut conns = vec![conn];
    for _ in 1..options.pubs {
        conns.push(connect(endpoint, deadline).await?);
    }
    let progress = Progress::start(options.progress, options.msgs, "acked", deadline);
    // Each publisher in a task of its own, with its own window and share.
    let runs: Vec<_> = conns
        .into_iter()
        .zip(split(options.msgs, options.pubs))
        .map(|(mut conn, (_, msgs))| {
            let (options, count) = (options.clone(), progress.count.clone());
            tokio::spawn(async move {
                publish_acked(&mut conn, &options, msgs, deadline, Some(&count)).await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(runs.len());
    for run in runs {
        outcomes.push(run.await?);
    }
    let outcome = outcomes
        .into_iter()
        .reduce(Published::merge)
        .ok_or_else(|| BenchError::Options("--pubs must be at least 1".into()))?;
    progress.finish();

    let published = Side {
        msgs: outcome.acked,
        secs: outcome.secs,
    };
    let none = Side { msgs: 0, secs: 0.0 };
    let mut report = Report::new(options, server, published, none);
    report.expected = options.msgs;
    report.lost = options.msgs - outcome.acked.min(options.msgs);
    report.latency_us = latency(&outcome.latencies);
    report.js = Some(JsReport {
        stream: options.stream.clone(),
        sent: outcome.sent,
        acked: outcome.acked,
        failed: outcome.failed,
        reused: false,
        server_rss: server_rss(options),
    });
    report.errors = outcome.errors;
    Ok(report)
}

/// `jsconsume`: a stream with at least `msgs` messages (made by the `jspub`
/// code if needed), a fresh durable pull consumer, and `msgs` messages
/// pulled and acked.
pub(super) async fn run_jsconsume(
    options: &BenchOptions,
    endpoint: &Endpoint,
    deadline: Instant,
) -> Result<Report, BenchError> {
    let mut conn = connect(endpoint, deadline).await?;
    let server = server_name(&conn);
    let mut errors = Vec::new();
    let stored = stream_messages(&mut conn, &options.stream, deadline).await?;
    let reused = stored.is_some_and(|n| n >= options.msgs);
    let mut fill = None;
    if !reused {
        recreate_stream(&mut conn, options, deadline).await?;
        let progress = Progress::start(options.progress, options.msgs, "stored", deadline);
        let outcome = publish_acked(
            &mut conn,
            options,
            options.msgs,
            deadline,
            Some(&progress.count),
        )
        .await;
        progress.finish();
        errors.extend(outcome.errors.iter().cloned());
        if outcome.acked < options.msgs {
            // Consuming would only wait for messages that are not there.
            errors.push(format!(
                "only {} of {} messages were stored",
                outcome.acked, options.msgs
            ));
        }
        fill = Some(outcome);
    }

    let mut consumed = Consumed::default();
    if fill.as_ref().is_none_or(|f| f.acked >= options.msgs) {
        create_consumer(&mut conn, &options.stream, deadline).await?;
        let progress = Progress::start(options.progress, options.msgs, "consumed", deadline);
        consumed = pull_and_ack(&mut conn, options, deadline, &progress).await;
        progress.finish();
        push_error(&mut errors, consumed.errors.drain(..));
    }

    let published = fill.as_ref().map_or(Side { msgs: 0, secs: 0.0 }, |f| Side {
        msgs: f.acked,
        secs: f.secs,
    });
    let received = Side {
        msgs: consumed.received,
        secs: consumed.secs,
    };
    let mut report = Report::new(options, server, published, received);
    report.expected = options.msgs;
    report.lost = options.msgs - consumed.received.min(options.msgs);
    report.js = Some(JsReport {
        stream: options.stream.clone(),
        sent: fill.as_ref().map_or(0, |f| f.sent),
        acked: fill.as_ref().map_or(0, |f| f.acked),
        failed: fill.as_ref().map_or(0, |f| f.failed),
        reused,
        server_rss: server_rss(options),
    });
    report.errors = errors;
    Ok(report)
}

fn server_rss(options: &BenchOptions) -> Option<u64> {
    // Informational: a server we may not read (another user's) is no error.
    options.server_pid.and_then(|pid| rss_bytes(pid).ok())
}

/// One JetStream API call: the reply's JSON, or its `error` as
/// [`BenchError::Api`].
async fn api(
    conn: &mut Connection,
    subject: &str,
    body: &Value,
    deadline: Instant,
) -> Result<Value, BenchError> {
    let wait = API_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
    let reply = match conn
        .request(subject.as_bytes(), body.to_string().as_bytes(), wait)
        .await
    {
        Ok(reply) => reply,
        Err(conn::Error::NoResponders(_)) => {
            return Err(BenchError::Api {
                subject: subject.to_string(),
                message: "no responders: is JetStream enabled on the server?".to_string(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    let value: Value = serde_json::from_slice(reply.data()).map_err(|e| BenchError::Api {
        subject: subject.to_string(),
        message: format!("invalid JSON reply: {e}"),
    })?;
    match value.get("error") {
        Some(error) => Err(BenchError::Api {
            subject: subject.to_string(),
            message: describe(error),
        }),
        None => Ok(value),
    }
}

/// `description (code)` of an API error object, or its JSON.
fn describe(error: &Value) -> String {
    match (error.get("description"), error.get("code")) {
        (Some(Value::String(d)), Some(code)) => format!("{d} ({code})"),
        (Some(Value::String(d)), None) => d.clone(),
        _ => error.to_string(),
    }
}

/// Whether an API error is a 404 (no such stream or consumer).
fn is_not_found(e: &BenchError) -> bool {
    matches!(e, BenchError::Api { message, .. } if message.ends_with("(404)"))
}

/// How many messages stream `name` holds, or `None` if it does not exist.
async fn stream_messages(
    conn: &mut Connection,
    name: &str,
    deadline: Instant,
) -> Result<Option<u64>, BenchError> {
    match api(
        conn,
        &format!("$JS.API.STREAM.INFO.{name}"),
        &json!({}),
        deadline,
    )
    .await
    {
        Ok(info) => Ok(Some(info["state"]["messages"].as_u64().unwrap_or(0))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes the bench stream if it exists and creates it empty, with file
/// storage, on the bench subject.
async fn recreate_stream(
    conn: &mut Connection,
    options: &BenchOptions,
    deadline: Instant,
) -> Result<(), BenchError> {
    let name = &options.stream;
    match api(
        conn,
        &format!("$JS.API.STREAM.DELETE.{name}"),
        &json!({}),
        deadline,
    )
    .await
    {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e),
    }
    let config = json!({
        "name": name,
        "subjects": [options.subject],
        "storage": "file",
    });
    api(
        conn,
        &format!("$JS.API.STREAM.CREATE.{name}"),
        &config,
        deadline,
    )
    .await?;
    Ok(())
}

/// Deletes the bench consumer if it exists and creates it afresh, so that
/// it delivers the stream from its first message.
async fn create_consumer(
    conn: &mut Connection,
    stream: &str,
    deadline: Instant,
) -> Result<(), BenchError> {
    let delete = format!("$JS.API.CONSUMER.DELETE.{stream}.{CONSUMER}");
    match api(conn, &delete, &json!({}), deadline).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e),
    }
    let request = json!({
        "stream_name": stream,
        "config": {
            "durable_name": CONSUMER,
            "ack_policy": "explicit",
            "deliver_policy": "all",
        },
    });
    let create = format!("$JS.API.CONSUMER.CREATE.{stream}.{CONSUMER}");
    api(conn, &create, &request, deadline).await?;
    Ok(())
}

/// What [`publish_acked`] achieved.
struct Published {
    sent: u64,
    acked: u64,
    failed: u64,
    /// Until the last reply (or the deadline).
    secs: f64,
    latencies: Histogram<u64>,
    errors: Vec<String>,
}

impl Published {
    /// The outcome of publishers that ran side by side: counts add up, the
    /// time is the slowest one's.
    fn merge(mut self, other: Published) -> Published {
        self.sent += other.sent;
        self.acked += other.acked;
        self.failed += other.failed;
        self.secs = self.secs.max(other.secs);
        // Both histograms have the same bounds (`new_histogram`).
        let _ = self.latencies.add(&other.latencies);
        push_error(&mut self.errors, other.errors);
        self
    }
}

/// A PubAck: `{"stream":..,"seq":..}` or `{"error":{..}}`.
#[derive(Deserialize)]
struct PubAck {
    seq: Option<u64>,
    error: Option<Value>,
}

/// Publishes `msgs` messages with reply subjects `<inbox>.p<n>`, at most
/// `window` without a reply, and counts the PubAcks. Failures end up in the
/// counts and the error list: the caller reports them with what did work.
async fn publish_acked(
    conn: &mut Connection,
    options: &BenchOptions,
    msgs: u64,
    deadline: Instant,
    progress: Option<&AtomicU64>,
) -> Published {
    let window = options.window.max(1) as u64;
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(conn.inbox_prefix().as_bytes());
    reply.push(b'p');
    let base = reply.len();
    let subject = options.subject.as_bytes();
    let mut payload = vec![0u8; options.size];
    // Send times by `seq % window`: at most `window` are outstanding, so a
    // slot is reused only once its reply is in (or counted as lost).
    let mut sent_at: Vec<(u64, Instant)> = Vec::new();
    let mut latencies = new_histogram();
    let mut out = Published {
        sent: 0,
        acked: 0,
        failed: 0,
        secs: 0.0,
        latencies: new_histogram(),
        errors: Vec::new(),
    };
    let start = Instant::now();
    let mut last = start;
    let mut reported = 0;
    'run: while out.acked + out.failed < msgs {
        // Top the window up; the PUBs go out together at the wait below.
        while out.sent < msgs && out.sent - out.acked - out.failed < window {
            let seq = out.sent;
            if let Some(stamp) = payload.get_mut(..8) {
                stamp.copy_from_slice(&seq.to_le_bytes());
            }
            reply.truncate(base);
            reply.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
            if let Err(e) = conn.publish(subject, Some(&reply), &payload).await {
                push_error(&mut out.errors, [e.to_string()]);
                break 'run;
            }
            let now = Instant::now();
            let slot = (seq % window) as usize;
            if slot < sent_at.len() {
                sent_at[slot] = (seq, now);
            } else {
                sent_at.push((seq, now));
            }
            out.sent += 1;
            if out.sent.is_multiple_of(BATCH) && now >= deadline {
                break 'run;
            }
        }
        // Wait for one reply, then take whatever else has arrived.
        let mut next = match next_within(conn, deadline, "PubAcks").await {
            Ok(message) => Some(message),
            Err(e) => {
                push_error(&mut out.errors, [e]);
                break;
            }
        };
        while let Some(message) = next {
            let Some(seq) = message
                .subject()
                .strip_prefix(&reply[..base])
                .and_then(parse_u64)
            else {
                // Not a PubAck (a late API reply, say).
                next = conn.try_next_message().ok().flatten();
                continue;
            };
            match ack_outcome(&message) {
                Ok(()) => {
                    out.acked += 1;
                    if let Some(&(sent_seq, at)) = sent_at.get((seq % window) as usize) {
                        if sent_seq == seq {
                            latencies.saturating_record(at.elapsed().as_nanos() as u64);
                        }
                    }
                }
                Err(e) => {
                    out.failed += 1;
                    push_error(&mut out.errors, [e]);
                }
            }
            last = Instant::now();
            next = match conn.try_next_message() {
                Ok(next) => next,
                Err(e) => {
                    push_error(&mut out.errors, [e.to_string()]);
                    break 'run;
                }
            };
        }
        if let Some(p) = progress {
            let done = out.acked + out.failed;
            p.fetch_add(done - reported, std::sync::atomic::Ordering::Relaxed);
            reported = done;
        }
    }
    out.secs = (last - start).as_secs_f64();
    out.latencies = latencies;
    out
}

/// Whether a PubAck says the message was stored; the reason if not.
/// The next message: one already read, or the next to arrive before
/// `deadline`. The error is what the run reports (`waiting` names what was
/// awaited).
async fn next_within(
    conn: &mut Connection,
    deadline: Instant,
    waiting: &str,
) -> Result<Message, String> {
    match conn.try_next_message() {
        Ok(Some(message)) => Ok(message),
        Ok(None) => match timeout_at(deadline, conn.next_message()).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err(format!("timed out waiting for {waiting}")),
        },
        Err(e) => Err(e.to_string()),
    }
}

fn ack_outcome(message: &Message) -> Result<(), String> {
    if let Some(code) = headers::status(message.headers()) {
        return Err(match code {
            503 => "no responders: no stream takes the subject".to_string(),
            _ => format!("status {code} instead of a PubAck"),
        });
    }
    match serde_json::from_slice::<PubAck>(message.data()) {
        Ok(PubAck {
            error: Some(error), ..
        }) => Err(describe(&error)),
        Ok(PubAck { seq: Some(_), .. }) => Ok(()),
        Ok(_) => Err("a PubAck without seq".to_string()),
        Err(e) => Err(format!("invalid PubAck: {e}")),
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("constant, valid bounds")
}

fn latency(histogram: &Histogram<u64>) -> Option<Latency> {
    let micros = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    (!histogram.is_empty()).then(|| Latency {
        p50: micros(0.5),
        p90: micros(0.9),
        p99: micros(0.99),
        p999: micros(0.999),
        max: histogram.max() as f64 / 1000.0,
    })
}

/// Adds errors not seen yet, up to [`MAX_ERRORS`].
fn push_error(errors: &mut Vec<String>, new: impl IntoIterator<Item = String>) {
    for e in new {
        if errors.len() < MAX_ERRORS && !errors.contains(&e) {
            errors.push(e);
        }
    }
}

/// What [`pull_and_ack`] achieved.
#[derive(Default)]
struct Consumed {
    received: u64,
    /// Until the last message (or the deadline).
    secs: f64,
    errors: Vec<String>,
}

/// An outstanding pull request: its number (the last token of its reply
/// subject) and how many messages it may still bring.
struct Pull {
    id: u64,
    left: u64,
}

/// Pulls `msgs` messages from the bench consumer, acking each one, with up
/// to [`MAX_PULLS`] requests of `batch` in flight: a new one goes out when
/// less than half a batch is still to come.
async fn pull_and_ack(
    conn: &mut Connection,
    options: &BenchOptions,
    deadline: Instant,
    progress: &Progress,
) -> Consumed {
    let batch = options.batch.max(1) as u64;
    let next_subject = format!("$JS.API.CONSUMER.MSG.NEXT.{}.{CONSUMER}", options.stream);
    let mut reply = Vec::with_capacity(64);
    reply.extend_from_slice(conn.inbox_prefix().as_bytes());
    reply.push(b'c');
    let base = reply.len();
    let mut pulls: VecDeque<Pull> = VecDeque::new();
    let mut next_id = 0;
    let mut out = Consumed::default();
    let start = Instant::now();
    let mut last = start;
    while out.received < options.msgs {
        let asked: u64 = pulls.iter().map(|p| p.left).sum();
        if pulls.len() < MAX_PULLS && asked <= batch / 2 && out.received + asked < options.msgs {
            let count = batch.min(options.msgs - out.received - asked);
            let expires = PULL_EXPIRES.min(deadline.saturating_duration_since(Instant::now()));
            let body = format!(
                r#"{{"batch":{count},"expires":{}}}"#,
                expires.as_nanos().max(1)
            );
            reply.truncate(base);
            reply.extend_from_slice(itoa::Buffer::new().format(next_id).as_bytes());
            if let Err(e) = conn
                .publish(next_subject.as_bytes(), Some(&reply), body.as_bytes())
                .await
            {
                push_error(&mut out.errors, [e.to_string()]);
                break;
            }
            pulls.push_back(Pull {
                id: next_id,
                left: count,
            });
            next_id += 1;
            continue;
        }
        let message = match next_within(conn, deadline, "messages").await {
            Ok(message) => message,
            Err(e) => {
                push_error(&mut out.errors, [e]);
                break;
            }
        };
        if let Some(ack) = message.reply().filter(|r| r.starts_with(ACK_PREFIX)) {
            // The ack rides along with the next write.
            if let Err(e) = conn.publish(ack, None, b"").await {
                push_error(&mut out.errors, [e.to_string()]);
                break;
            }
            out.received += 1;
            // The server serves pull requests in order, so this message
            // belongs to the oldest one; a 408 corrects any drift.
            if let Some(front) = pulls.front_mut() {
                front.left = front.left.saturating_sub(1);
                if front.left == 0 {
                    pulls.pop_front();
                }
            }
            if out.received.is_multiple_of(BATCH) {
                last = Instant::now();
                progress
                    .count
                    .fetch_add(BATCH, std::sync::atomic::Ordering::Relaxed);
                if last >= deadline {
                    break;
                }
            }
            continue;
        }
        // A status message about one of our pull requests: it has ended
        // (404, 408, 409) or is idle (100).
        let code = headers::status(message.headers());
        let id = message
            .subject()
            .strip_prefix(&reply[..base])
            .and_then(parse_u64);
        let (Some(code), Some(id)) = (code, id) else {
            continue;
        };
        if code == 100 {
            continue;
        }
        pulls.retain(|p| p.id != id);
        if code != 408 && code != 404 {
            let description = String::from_utf8_lossy(message.headers());
            let line = description.lines().next().unwrap_or_default();
            push_error(&mut out.errors, [format!("pull request refused: {line}")]);
            if pulls.is_empty() {
                tokio::time::sleep(REFUSED_PAUSE).await;
            }
        }
    }
    if out.received == options.msgs {
        last = Instant::now();
    }
    out.secs = (last - start).as_secs_f64();
    // The last acks are still buffered: the server has them once its PONG
    // is back, so that a second run finds the consumer in a clean state.
    if let Ok(Err(e)) = timeout_at(deadline, conn.flush()).await {
        push_error(&mut out.errors, [e.to_string()]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pub_acks_are_classified() {
        let ok = Message::new(b"i.p1", None, None, br#"{"stream":"S","seq":7}"#);
        assert_eq!(ack_outcome(&ok), Ok(()));
        let refused = Message::new(
            b"i.p1",
            None,
            None,
            br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
        );
        assert_eq!(
            ack_outcome(&refused),
            Err("maximum messages exceeded (503)".to_string())
        );
        let block = b"NATS/1.0 503\r\n\r\n";
        let none = Message::new(b"i.p1", None, Some(block.len()), block);
        assert!(ack_outcome(&none).unwrap_err().contains("no responders"));
        let garbage = Message::new(b"i.p1", None, None, b"{");
        assert!(ack_outcome(&garbage).is_err());
    }
}
