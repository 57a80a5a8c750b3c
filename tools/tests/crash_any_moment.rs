//! Crash at any moment: the real `skiff` binary is killed with SIGKILL at a
//! random moment of a randomly chosen phase, over and over on one store,
//! and after each kill it must start again within 15 s with everything it
//! confirmed still there.
//!
//! Phases (each cycle picks one; the first cycles run each once, in a
//! seeded order, so that every phase is hit by every run):
//!
//! - `startup`: the running server is killed (idle), a new one is spawned
//!   on the store and killed 0-60 ms later, whether ready or not;
//! - `fresh`: a server on a new, empty store is killed while idle 0-300 ms
//!   after it is ready, and must then start again on that store;
//! - `churn`: streams `CHURN_<n>` and durable consumers on them are
//!   created, updated and deleted;
//! - `publish`: three connections publish to the stream `DATA` with 16-64
//!   PubAcks in flight each;
//! - `fetch`: the durable pull consumer `READER` on `DATA` fetches and
//!   acknowledges every message with a double ack (AckSync);
//! - `mixed`: all three of the above at once.
//!
//! What the server confirmed is kept in a [`Model`] across cycles: streams
//! and consumers whose creation (update, deletion) was answered, every
//! PubAck'd message (sequence and payload), every answered double ack. A
//! request the kill left unanswered is uncertain: either outcome is right,
//! until a later answer settles it. After each restart:
//!
//! - every stream and consumer confirmed created and not deleted since
//!   exists, with its last confirmed settings; every one confirmed deleted
//!   does not;
//! - every acknowledged publish is stored at its sequence with its payload;
//! - `READER`'s ack floor is not below the longest run of sequences from 1
//!   whose double acks were all answered, and no double-acked message is
//!   delivered again.
//!
//! Environment:
//!
//! - `CRASH_SEED`: the seed (decimal, or hex with `0x`); random otherwise.
//!   It is printed at the start and with every failure: the same seed
//!   replays the same schedule of phases, durations and kill moments (what
//!   the server manages to do within them depends on the machine);
//! - `CRASH_CYCLES`: kill cycles (default 30); `scripts/crash-soak.sh` runs
//!   hundreds;
//! - `CRASH_PHASES`: a comma-separated subset of the phases above, to chase
//!   one failure past another.
//!
//! Every wait is bounded; children are killed on drop; stores are temp dirs.

mod child;
// The helpers the library's integration tests use, in one place.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::future::{Future, IntoFuture};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer},
    message::PublishMessage,
    stream,
};
use bytes::Bytes;
use child::{no_reconnect, Skiff};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// A restarted server must be ready within this.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on one request or reply of the phases' clients.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on one request of the verification (the server is alive then:
/// not answering within this is a failure).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// After the kill, how long the clients may still read answers the dead
/// server had written to their sockets (such answers are confirmations).
const GRACE: Duration = Duration::from_millis(150);
/// A phase runs this long before the kill (uniformly at random).
const PHASE_MS: (u64, u64) = (20, 600);
/// The start-up kill comes this long after the spawn.
const STARTUP_KILL_MS: (u64, u64) = (0, 60);
/// The idle kill on a fresh store comes this long after ready.
const FRESH_KILL_MS: (u64, u64) = (0, 300);
/// Log lines of each server shown with a failure.
const LOG_TAIL: usize = 30;

const DATA: &str = "DATA";
const READER: &str = "READER";
const PUBLISHERS: usize = 3;
/// PubAcks each publisher has in flight (chosen per publisher and phase).
const WINDOW: (usize, usize) = (16, 64);
/// `READER`'s ack wait: messages delivered but not acked before a kill
/// come back this long after.
const READER_ACK_WAIT: Duration = Duration::from_secs(1);
/// Cycles on one store; then a new one (for long runs).
const EPOCH_CYCLES: usize = 50;
/// Messages per pull request of `READER`.
const FETCH_BATCH: usize = 32;
/// Messages a second each publisher sends, at most.
const PUBLISH_RATE: usize = 700;
/// Churn streams that exist or may exist at once, at most.
const MAX_CHURN_STREAMS: usize = 6;
/// Durable consumers per churn stream, at most.
const MAX_CHURN_CONSUMERS: usize = 3;
/// API error codes.
const STREAM_NOT_FOUND: u64 = 10059;
const CONSUMER_NOT_FOUND: u64 = 10014;

// ---------------------------------------------------------------------------
// Phases and failure reports.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Startup,
    Fresh,
    Churn,
    Publish,
    Fetch,
    Mixed,
}

const PHASES: [Phase; 6] = [
    Phase::Startup,
    Phase::Fresh,
    Phase::Churn,
    Phase::Publish,
    Phase::Fetch,
    Phase::Mixed,
];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Startup => "startup",
            Phase::Fresh => "fresh",
            Phase::Churn => "churn",
            Phase::Publish => "publish",
            Phase::Fetch => "fetch",
            Phase::Mixed => "mixed",
        }
    }
}

/// Where the run is, for failure messages.
#[derive(Clone, Copy)]
struct Ctx {
    seed: u64,
    cycle: usize,
    phase: Phase,
    /// How long the phase ran before the kill (ms).
    kill_ms: u64,
}

impl Ctx {
    /// Fails the test: what went wrong, how to replay it, and the end of
    /// the logs of the servers involved.
    fn fail(&self, what: &str, servers: &[(&str, Option<&Skiff>)]) -> ! {
        let mut msg = format!(
            "CRASH_SEED={} cycle {} phase {} (kill after {} ms): {what}",
            self.seed,
            self.cycle,
            self.phase.name(),
            self.kill_ms
        );
        for (label, server) in servers {
            if let Some(server) = server {
                let _ = write!(
                    msg,
                    "\n--- last {LOG_TAIL} log lines of the {label} server ---\n{}",
                    server.tail(LOG_TAIL)
                );
            }
        }
        let phases = std::env::var("CRASH_PHASES")
            .map(|p| format!(" CRASH_PHASES={p}"))
            .unwrap_or_default();
        let _ = write!(
            msg,
            "\n--- replay: CRASH_SEED={} CRASH_CYCLES={}{phases} cargo test -p skiff-tools --test \
             crash_any_moment -- --nocapture",
            self.seed,
            self.cycle + 1
        );
        panic!("{msg}");
    }
}

// ---------------------------------------------------------------------------
// What the server confirmed.

/// What is known of a stream or consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Known {
    /// Exists, with one of these settings versions (more than one while an
    /// update is unanswered).
    Present(BTreeSet<u64>),
    /// Confirmed deleted (or never created, as a deletion answered).
    Absent,
    /// A request about it went unanswered: anything goes until an answer.
    Uncertain,
}

#[derive(Default)]
struct Model {
    /// `CHURN_<n>` streams.
    streams: BTreeMap<String, Known>,
    /// Durable consumers on churn streams, by (stream, name).
    consumers: BTreeMap<(String, String), Known>,
    next_stream: u64,
    next_consumer: u64,
    next_version: u64,
    /// `DATA`: every PubAck'd message, sequence -> payload.
    acked: BTreeMap<u64, Bytes>,
    /// `DATA` sequences whose double ack through `READER` was answered,
    /// with the pull request that delivered them.
    double_acked: BTreeMap<u64, u64>,
    /// Pull requests `READER`'s fetchers sent, so far.
    pulls: u64,
    /// The highest ack floor `READER` showed right after a restart: read
    /// back from the store, so a later crash may not take it back either.
    reader_floor_restored: u64,
    /// Broken promises seen while a phase ran (not after a restart).
    violations: Vec<String>,
    /// Error replies (not failures: nothing is confirmed by them).
    error_replies: Vec<String>,
    churn_asked: u64,
    churn_answered: u64,
}

impl Model {
    fn record_pub_ack(&mut self, seq: u64, payload: Bytes) {
        if let Some(old) = self.acked.get(&seq) {
            if *old != payload {
                self.violations.push(format!(
                    "DATA seq {seq} PubAck'd twice: for {:?} and now for {:?}",
                    String::from_utf8_lossy(old),
                    String::from_utf8_lossy(&payload)
                ));
            }
        } else {
            self.acked.insert(seq, payload);
        }
    }

    /// The ack floor `READER` must have at least: the longest run 1..=n
    /// of sequences that were double-acked (answered) or under a floor
    /// restored after an earlier kill.
    fn double_ack_floor(&self) -> u64 {
        let mut n = self.reader_floor_restored;
        for &seq in self.double_acked.range(n + 1..).map(|(s, _)| s) {
            if seq != n + 1 {
                break;
            }
            n = seq;
        }
        n
    }

    fn live_streams(&self) -> Vec<String> {
        self.streams
            .iter()
            .filter(|(_, k)| matches!(k, Known::Present(_)))
            .map(|(n, _)| n.clone())
            .collect()
    }
}

type Shared = Arc<Mutex<Model>>;

fn lock(model: &Shared) -> MutexGuard<'_, Model> {
    model.lock().expect("model lock poisoned")
}

// ---------------------------------------------------------------------------
// Requests.

/// Why a request has no answer.
type NoAnswer = String;

async fn bounded<T>(
    what: &str,
    limit: Duration,
    fut: impl Future<Output = T>,
) -> Result<T, NoAnswer> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| format!("no answer to {what} within {limit:?}"))
}

async fn try_connect(url: &str, limit: Duration) -> Result<async_nats::Client, NoAnswer> {
    bounded("connect", limit, no_reconnect().connect(url))
        .await?
        .map_err(|e| format!("connect to {url}: {e}"))
}

/// A raw `$JS.API.<subject>` request: the JSON answer (an error answer
/// included, as `{"error": ...}`), or why there is none.
async fn api(
    client: &async_nats::Client,
    subject: &str,
    body: &Value,
    limit: Duration,
) -> Result<Value, NoAnswer> {
    let payload = if body.is_null() {
        Bytes::new()
    } else {
        Bytes::from(body.to_string())
    };
    let what = format!("$JS.API.{subject}");
    let reply = bounded(&what, limit, client.request(what.clone(), payload))
        .await?
        .map_err(|e| format!("{what}: {e}"))?;
    serde_json::from_slice(&reply.payload).map_err(|e| {
        format!(
            "{what}: answer is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&reply.payload)
        )
    })
}

fn err_code(reply: &Value) -> Option<u64> {
    reply.get("error")?.get("err_code")?.as_u64()
}

fn stream_config(name: &str, n: u64, version: u64) -> Value {
    json!({
        "name": name,
        "subjects": [format!("churn.{n}.>")],
        "storage": "file",
        "num_replicas": 1,
        "max_msgs": 1000 + version as i64,
        "description": format!("v{version}"),
    })
}

fn consumer_request(stream: &str, name: &str, version: u64, action: &str) -> Value {
    json!({
        "stream_name": stream,
        "config": {
            "durable_name": name,
            "ack_policy": "explicit",
            "max_ack_pending": 1000 + version as i64,
            "description": format!("v{version}"),
        },
        "action": action,
    })
}

/// What a confirmed (or confirmed-deleted) stream or consumer must look
/// like after a restart: its INFO answers with one of its confirmed
/// versions of `setting`, or with `not_found` once deleted.
struct Check<'a> {
    what: String,
    subject: String,
    setting: &'static str,
    not_found: u64,
    known: &'a Known,
}

impl Check<'_> {
    fn against(&self, subject: &str, reply: &Value, wrong: &mut Vec<String>) {
        let what = &self.what;
        match self.known {
            Known::Present(versions) => {
                if reply.get("error").is_some() {
                    wrong.push(format!(
                        "{what} was confirmed created (settings v{versions:?}) but {subject} \
                         answers {reply}"
                    ));
                    return;
                }
                let found = version_of(reply, self.setting);
                if !found.is_some_and(|v| versions.contains(&v)) {
                    wrong.push(format!(
                        "{what}: confirmed settings are v{versions:?}, found description/{} of \
                         {found:?} ({})",
                        self.setting, reply["config"]
                    ));
                }
            }
            Known::Absent => {
                if err_code(reply) != Some(self.not_found) {
                    wrong.push(format!(
                        "{what} was confirmed deleted but {subject} answers {reply}"
                    ));
                }
            }
            Known::Uncertain => {}
        }
    }
}

/// The settings version a STREAM.INFO / CONSUMER.INFO answer shows, from
/// its description `v<k>` and `limit_field` = 1000 + k; `None` when the
/// two disagree.
fn version_of(info: &Value, limit_field: &str) -> Option<u64> {
    let config = info.get("config")?;
    let v: u64 = config
        .get("description")?
        .as_str()?
        .strip_prefix('v')?
        .parse()
        .ok()?;
    (config.get(limit_field)?.as_i64()? == 1000 + v as i64).then_some(v)
}

// ---------------------------------------------------------------------------
// The phases' clients. Each records what was confirmed as soon as it is
// answered, and marks what it asks as uncertain before asking: a task may
// be aborted at any await.

#[derive(Clone, Copy)]
enum ChurnOp {
    CreateStream,
    UpdateStream,
    DeleteStream,
    CreateConsumer,
    UpdateConsumer,
    DeleteConsumer,
}

/// Creates, updates and deletes churn streams and consumers until a
/// request goes unanswered (the kill).
async fn churn(url: String, model: Shared, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(client) = try_connect(&url, REQUEST_TIMEOUT).await else {
        return;
    };
    loop {
        let op = {
            let m = lock(&model);
            let live = m.live_streams();
            let possible = m
                .streams
                .values()
                .filter(|k| !matches!(k, Known::Absent))
                .count();
            let mut ops: Vec<(ChurnOp, u32)> = Vec::new();
            if possible < MAX_CHURN_STREAMS {
                ops.push((ChurnOp::CreateStream, 3));
            }
            if !live.is_empty() {
                ops.push((ChurnOp::UpdateStream, 2));
                ops.push((ChurnOp::CreateConsumer, 3));
                ops.push((ChurnOp::UpdateConsumer, 2));
                ops.push((ChurnOp::DeleteConsumer, 2));
            }
            if possible > 0 {
                ops.push((ChurnOp::DeleteStream, if possible > 3 { 3 } else { 1 }));
            }
            ops.choose_weighted(&mut rng, |(_, w)| *w)
                .expect("a churn operation")
                .0
        };
        if churn_step(&client, &model, &mut rng, op).await.is_err() {
            return;
        }
    }
}

/// One churn operation; `Err` when it went unanswered.
async fn churn_step(
    client: &async_nats::Client,
    model: &Shared,
    rng: &mut StdRng,
    op: ChurnOp,
) -> Result<(), NoAnswer> {
    match op {
        ChurnOp::CreateStream => {
            let (name, n, version) = {
                let mut m = lock(model);
                let n = m.next_stream;
                m.next_stream += 1;
                let version = m.next_version;
                m.next_version += 1;
                let name = format!("CHURN_{n}");
                m.streams.insert(name.clone(), Known::Uncertain);
                (name, n, version)
            };
            let subject = format!("STREAM.CREATE.{name}");
            let reply = ask(client, model, &subject, &stream_config(&name, n, version)).await?;
            if reply.get("error").is_none() {
                lock(model)
                    .streams
                    .insert(name, Known::Present(BTreeSet::from([version])));
            }
        }
        ChurnOp::UpdateStream => {
            let Some((name, version)) = pick_and_version(model, rng, |m| m.live_streams()) else {
                return Ok(());
            };
            let n: u64 = name["CHURN_".len()..].parse().expect("churn stream number");
            if let Some(Known::Present(v)) = lock(model).streams.get_mut(&name) {
                v.insert(version);
            }
            let subject = format!("STREAM.UPDATE.{name}");
            let reply = ask(client, model, &subject, &stream_config(&name, n, version)).await?;
            if reply.get("error").is_none() {
                lock(model)
                    .streams
                    .insert(name, Known::Present(BTreeSet::from([version])));
            }
        }
        ChurnOp::DeleteStream => {
            let name = {
                let mut m = lock(model);
                let candidates: Vec<String> = m
                    .streams
                    .iter()
                    .filter(|(_, k)| !matches!(k, Known::Absent))
                    .map(|(n, _)| n.clone())
                    .collect();
                let Some(name) = candidates.choose(rng).cloned() else {
                    return Ok(());
                };
                m.streams.insert(name.clone(), Known::Uncertain);
                for ((s, _), k) in m.consumers.iter_mut() {
                    if *s == name {
                        *k = Known::Uncertain;
                    }
                }
                name
            };
            let subject = format!("STREAM.DELETE.{name}");
            let reply = ask(client, model, &subject, &Value::Null).await?;
            if reply.get("error").is_none() || err_code(&reply) == Some(STREAM_NOT_FOUND) {
                let mut m = lock(model);
                m.streams.insert(name.clone(), Known::Absent);
                m.consumers.retain(|(s, _), _| *s != name);
            }
        }
        ChurnOp::CreateConsumer => {
            let (stream, name, version) = {
                let mut m = lock(model);
                let live: Vec<String> = m
                    .live_streams()
                    .into_iter()
                    .filter(|s| {
                        m.consumers
                            .iter()
                            .filter(|((cs, _), k)| cs == s && !matches!(k, Known::Absent))
                            .count()
                            < MAX_CHURN_CONSUMERS
                    })
                    .collect();
                let Some(stream) = live.choose(rng).cloned() else {
                    return Ok(());
                };
                let name = format!("C_{}", m.next_consumer);
                m.next_consumer += 1;
                let version = m.next_version;
                m.next_version += 1;
                m.consumers
                    .insert((stream.clone(), name.clone()), Known::Uncertain);
                (stream, name, version)
            };
            let subject = format!("CONSUMER.CREATE.{stream}.{name}");
            let body = consumer_request(&stream, &name, version, "create");
            let reply = ask(client, model, &subject, &body).await?;
            if reply.get("error").is_none() {
                lock(model)
                    .consumers
                    .insert((stream, name), Known::Present(BTreeSet::from([version])));
            }
        }
        ChurnOp::UpdateConsumer => {
            let Some((key, version)) = pick_and_version(model, rng, |m| {
                m.consumers
                    .iter()
                    .filter(|((s, _), k)| {
                        matches!(k, Known::Present(_))
                            && matches!(m.streams.get(s), Some(Known::Present(_)))
                    })
                    .map(|(key, _)| key.clone())
                    .collect()
            }) else {
                return Ok(());
            };
            if let Some(Known::Present(v)) = lock(model).consumers.get_mut(&key) {
                v.insert(version);
            }
            let (stream, name) = &key;
            let subject = format!("CONSUMER.CREATE.{stream}.{name}");
            let body = consumer_request(stream, name, version, "update");
            let reply = ask(client, model, &subject, &body).await?;
            if reply.get("error").is_none() {
                lock(model)
                    .consumers
                    .insert(key, Known::Present(BTreeSet::from([version])));
            }
        }
        ChurnOp::DeleteConsumer => {
            let key = {
                let mut m = lock(model);
                let candidates: Vec<(String, String)> = m
                    .consumers
                    .iter()
                    .filter(|((s, _), k)| {
                        !matches!(k, Known::Absent)
                            && matches!(m.streams.get(s), Some(Known::Present(_)))
                    })
                    .map(|(key, _)| key.clone())
                    .collect();
                let Some(key) = candidates.choose(rng).cloned() else {
                    return Ok(());
                };
                m.consumers.insert(key.clone(), Known::Uncertain);
                key
            };
            let subject = format!("CONSUMER.DELETE.{}.{}", key.0, key.1);
            let reply = ask(client, model, &subject, &Value::Null).await?;
            if reply.get("error").is_none() || err_code(&reply) == Some(CONSUMER_NOT_FOUND) {
                lock(model).consumers.insert(key, Known::Absent);
            }
        }
    }
    Ok(())
}

/// One of `candidates(model)` at random and a new settings version.
fn pick_and_version<K: Clone>(
    model: &Shared,
    rng: &mut StdRng,
    candidates: impl Fn(&Model) -> Vec<K>,
) -> Option<(K, u64)> {
    let mut m = lock(model);
    let key = candidates(&m).choose(rng).cloned()?;
    let version = m.next_version;
    m.next_version += 1;
    Some((key, version))
}

/// A churn request: counts it, keeps error answers for the summary.
async fn ask(
    client: &async_nats::Client,
    model: &Shared,
    subject: &str,
    body: &Value,
) -> Result<Value, NoAnswer> {
    lock(model).churn_asked += 1;
    let reply = api(client, subject, body, REQUEST_TIMEOUT).await?;
    let mut m = lock(model);
    m.churn_answered += 1;
    if reply.get("error").is_some()
        && !matches!(
            err_code(&reply),
            Some(STREAM_NOT_FOUND | CONSUMER_NOT_FOUND)
        )
    {
        m.error_replies.push(format!("{subject}: {reply}"));
    }
    Ok(reply)
}

/// Publishes unique payloads to `data.p<k>` in bursts of `window`
/// (so that up to `window` PubAcks are in flight), at most
/// [`PUBLISH_RATE`] a second (to keep the store, hence restarts and
/// checks, small), until a PubAck does not come.
async fn publisher(url: String, k: usize, cycle: usize, window: usize, model: Shared) {
    let Ok(client) = try_connect(&url, REQUEST_TIMEOUT).await else {
        return;
    };
    let js = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client);
    let subject = format!("data.p{k}");
    let started = tokio::time::Instant::now();
    let burst_every = Duration::from_secs_f64(window as f64 / PUBLISH_RATE as f64);
    let mut inflight = VecDeque::new();
    for burst in 0u32.. {
        tokio::time::sleep_until(started + burst_every * burst).await;
        for j in 0..window {
            let i = burst as usize * window + j;
            let payload = Bytes::from(format!("c{cycle}.p{k}.{i}"));
            let publish = PublishMessage::build().payload(payload.clone());
            let sent = bounded(
                "publish",
                REQUEST_TIMEOUT,
                js.send_publish(subject.clone(), publish),
            )
            .await;
            match sent {
                Ok(Ok(future)) => inflight.push_back((payload, future)),
                _ => return,
            }
        }
        while let Some((payload, future)) = inflight.pop_front() {
            let ack = match bounded("PubAck", REQUEST_TIMEOUT, future.into_future()).await {
                Ok(Ok(ack)) => ack,
                _ => return,
            };
            let mut m = lock(&model);
            if ack.stream != DATA || ack.duplicate {
                m.violations.push(format!(
                    "publish of {:?} answered with an unexpected PubAck {ack:?}",
                    String::from_utf8_lossy(&payload)
                ));
            }
            m.record_pub_ack(ack.sequence, payload);
        }
    }
}

/// Fetches from `READER` in batches and double-acks each batch's
/// messages (AckSyncs sent together, in stream order), until something
/// goes unanswered.
async fn fetcher(url: String, model: Shared) {
    let Ok(client) = try_connect(&url, REQUEST_TIMEOUT).await else {
        return;
    };
    let js = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client.clone());
    let Ok(Ok(stream)) = bounded("stream", REQUEST_TIMEOUT, js.get_stream_no_info(DATA)).await
    else {
        return;
    };
    let Ok(Ok(consumer)) = bounded(
        "consumer",
        REQUEST_TIMEOUT,
        stream.get_consumer::<pull::Config>(READER),
    )
    .await
    else {
        return;
    };
    loop {
        let pull = {
            let mut m = lock(&model);
            m.pulls += 1;
            m.pulls
        };
        let Ok(Ok(mut batch)) = bounded(
            "fetch",
            REQUEST_TIMEOUT,
            consumer
                .batch()
                .max_messages(FETCH_BATCH)
                .expires(Duration::from_millis(300))
                .messages(),
        )
        .await
        else {
            return;
        };
        let mut delivered = Vec::new();
        while let Ok(Some(m)) = bounded("message", REQUEST_TIMEOUT, batch.next()).await {
            let Ok(m) = m else { return };
            let Ok(info) = m.info() else { return };
            let (seq, count) = (info.stream_sequence, info.delivered);
            let Some(reply) = m.reply.clone() else { return };
            check_delivery(&model, pull, seq, count, &m.payload);
            delivered.push((seq, reply));
        }
        // AckSync by hand: `Message::double_ack` takes any reply, a
        // no-responders status included, as a confirmation.
        let acks = delivered.into_iter().map(|(seq, reply)| {
            let client = client.clone();
            let model = Arc::clone(&model);
            async move {
                let answer = bounded(
                    "double ack",
                    REQUEST_TIMEOUT,
                    client.request(reply, Bytes::from_static(b"+ACK")),
                )
                .await;
                match answer {
                    Ok(Ok(answer)) if answer.status.is_none() => {
                        lock(&model).double_acked.insert(seq, pull);
                        true
                    }
                    _ => false,
                }
            }
        });
        let answered = futures::future::join_all(acks).await;
        if answered.contains(&false) {
            return;
        }
    }
}

/// A delivery by `READER` in pull request `pull`: its payload must be the
/// acknowledged one, and it must not have been double-acked (answered)
/// before that pull request was sent.
fn check_delivery(model: &Shared, pull: u64, seq: u64, count: i64, payload: &Bytes) {
    let mut m = lock(model);
    if let Some(acked) = m.acked.get(&seq) {
        if acked != payload {
            let msg = format!(
                "READER delivered DATA seq {seq} with payload {:?}, but it was PubAck'd with \
                 {:?}",
                String::from_utf8_lossy(payload),
                String::from_utf8_lossy(acked)
            );
            m.violations.push(msg);
        }
    }
    if m.double_acked.get(&seq).is_some_and(|&p| p < pull) {
        let msg = format!(
            "READER delivered DATA seq {seq} again (delivery {count}) after its double ack \
             was answered"
        );
        m.violations.push(msg);
    }
}

// ---------------------------------------------------------------------------
// Verification after a restart.

struct Checked {
    acked: usize,
    double_ack_floor: u64,
    /// READER as CONSUMER.INFO shows it after the restart: ack floor,
    /// delivered, ack pending.
    reader: (u64, u64, u64),
}

/// Everything the model says was confirmed, against the restarted server:
/// the list of what is wrong (empty when all is well).
async fn verify(url: &str, model: &Shared) -> Result<Checked, Vec<String>> {
    let client = try_connect(url, VERIFY_TIMEOUT)
        .await
        .map_err(|e| vec![e])?;
    let js = jetstream::ContextBuilder::new()
        .timeout(VERIFY_TIMEOUT)
        .build(client.clone());
    let (streams, consumers, acked, floor, violations) = {
        let mut m = lock(model);
        (
            m.streams.clone(),
            m.consumers.clone(),
            m.acked.clone(),
            m.double_ack_floor(),
            std::mem::take(&mut m.violations),
        )
    };
    let mut wrong = violations;
    let ask = |subject: String| {
        let client = client.clone();
        async move {
            let reply = api(&client, &subject, &Value::Null, VERIFY_TIMEOUT).await;
            (subject, reply)
        }
    };

    // Churn streams and their consumers.
    let mut checks = Vec::new();
    for (name, known) in &streams {
        checks.push(Check {
            what: format!("stream {name}"),
            subject: format!("STREAM.INFO.{name}"),
            setting: "max_msgs",
            not_found: STREAM_NOT_FOUND,
            known,
        });
    }
    for ((stream, name), known) in &consumers {
        if matches!(streams.get(stream), Some(Known::Present(_))) {
            checks.push(Check {
                what: format!("consumer {stream}/{name}"),
                subject: format!("CONSUMER.INFO.{stream}.{name}"),
                setting: "max_ack_pending",
                not_found: CONSUMER_NOT_FOUND,
                known,
            });
        }
    }
    for check in checks {
        let (subject, reply) = ask(check.subject.clone()).await;
        match reply {
            Ok(reply) => check.against(&subject, &reply, &mut wrong),
            Err(e) => wrong.push(e),
        }
    }

    // DATA and READER.
    let (subject, reply) = ask(format!("STREAM.INFO.{DATA}")).await;
    let data_state = match reply {
        Ok(r) if r.get("error").is_none() => Some(r["state"].clone()),
        Ok(r) => {
            wrong.push(format!(
                "stream {DATA} was confirmed created but {subject} answers {r}"
            ));
            None
        }
        Err(e) => {
            wrong.push(e);
            None
        }
    };
    let (subject, reply) = ask(format!("CONSUMER.INFO.{DATA}.{READER}")).await;
    let mut reader = (0, 0, 0);
    match reply {
        Ok(r) if r.get("error").is_none() => {
            let ack_floor = r["ack_floor"]["stream_seq"].as_u64().unwrap_or(0);
            reader = (
                ack_floor,
                r["delivered"]["stream_seq"].as_u64().unwrap_or(0),
                r["num_ack_pending"].as_u64().unwrap_or(0),
            );
            if ack_floor < floor {
                let restored = lock(model).reader_floor_restored;
                wrong.push(format!(
                    "consumer {DATA}/{READER}: ack floor {ack_floor} is below {floor}: the \
                     double acks of {}..={floor} were all answered{} (ack floor {}, \
                     delivered {}, pending {})",
                    restored + 1,
                    if restored > 0 {
                        format!(", and {restored} was the floor after an earlier restart")
                    } else {
                        String::new()
                    },
                    r["ack_floor"],
                    r["delivered"],
                    r["num_ack_pending"]
                ));
            } else {
                let mut m = lock(model);
                m.reader_floor_restored = m.reader_floor_restored.max(ack_floor);
            }
        }
        Ok(r) => wrong.push(format!(
            "consumer {DATA}/{READER} was confirmed created but {subject} answers {r}"
        )),
        Err(e) => wrong.push(e),
    }
    if let (Some(state), Some((&last_acked, _))) = (&data_state, acked.last_key_value()) {
        let last = state["last_seq"].as_u64().unwrap_or(0);
        if last < last_acked {
            wrong.push(format!(
                "stream {DATA}: last sequence {last} is below the last acked {last_acked} \
                 (state {state})"
            ));
        }
    }
    if data_state.is_some() && !acked.is_empty() {
        if let Err(mut e) = check_acked_messages(&js, &acked).await {
            wrong.append(&mut e);
        }
    }

    if wrong.is_empty() {
        Ok(Checked {
            acked: acked.len(),
            double_ack_floor: floor,
            reader,
        })
    } else {
        Err(wrong)
    }
}

/// Reads `DATA` from its first acked sequence through an ephemeral,
/// unacknowledging consumer, and compares every acked message.
async fn check_acked_messages(
    js: &jetstream::Context,
    acked: &BTreeMap<u64, Bytes>,
) -> Result<(), Vec<String>> {
    let (&first, _) = acked.first_key_value().expect("acked messages");
    let (&last, _) = acked.last_key_value().expect("acked messages");
    let mut wrong = Vec::new();
    let stream = bounded("stream", VERIFY_TIMEOUT, js.get_stream_no_info(DATA))
        .await
        .map_err(|e| vec![e])?
        .map_err(|e| vec![format!("stream {DATA}: {e}")])?;
    let audit: PullConsumer = bounded(
        "audit consumer",
        VERIFY_TIMEOUT,
        stream.create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: first,
            },
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        }),
    )
    .await
    .map_err(|e| vec![e])?
    .map_err(|e| vec![format!("create audit consumer on {DATA}: {e}")])?;
    let audit_name = audit.cached_info().name.clone();
    let mut expected = acked.iter().peekable();
    let mut seen = first - 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    'read: while seen < last {
        if Instant::now() > deadline {
            wrong.push(format!(
                "reading {DATA} took over 30 s; read up to seq {seen} of {last}"
            ));
            break;
        }
        let mut batch = match bounded(
            "audit fetch",
            VERIFY_TIMEOUT,
            audit
                .batch()
                // No more than there are: a fetch waits until it expires
                // for what it asked beyond.
                .max_messages((last - seen).min(1000) as usize)
                .expires(Duration::from_millis(500))
                .messages(),
        )
        .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                wrong.push(format!("audit fetch on {DATA}: {e}"));
                break;
            }
            Err(e) => {
                wrong.push(e);
                break;
            }
        };
        let mut got = 0;
        loop {
            let m = match bounded("audit message", VERIFY_TIMEOUT, batch.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    wrong.push(format!("audit message on {DATA}: {e}"));
                    break 'read;
                }
                Err(e) => {
                    wrong.push(e);
                    break 'read;
                }
            };
            got += 1;
            let Ok(info) = m.info() else {
                wrong.push("audit message without JetStream metadata".into());
                break 'read;
            };
            let seq = info.stream_sequence;
            seen = seen.max(seq);
            while let Some((&s, payload)) = expected.peek() {
                if s > seq {
                    break;
                }
                if s < seq {
                    wrong.push(format!(
                        "{DATA} seq {s} was PubAck'd (payload {:?}) but is gone: the stream \
                         goes on at seq {seq}",
                        String::from_utf8_lossy(payload)
                    ));
                } else if **payload != m.payload {
                    wrong.push(format!(
                        "{DATA} seq {s} was PubAck'd with payload {:?} but holds {:?}",
                        String::from_utf8_lossy(payload),
                        String::from_utf8_lossy(&m.payload)
                    ));
                }
                expected.next();
            }
        }
        if got == 0 {
            break;
        }
    }
    for (s, payload) in expected.take(20) {
        wrong.push(format!(
            "{DATA} seq {s} was PubAck'd (payload {:?}) but is gone: the stream ends at seq \
             {seen}",
            String::from_utf8_lossy(payload)
        ));
    }
    let _ = bounded(
        "audit consumer deletion",
        VERIFY_TIMEOUT,
        stream.delete_consumer(&audit_name),
    )
    .await;
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong)
    }
}

// ---------------------------------------------------------------------------
// The run.

fn env_seed() -> u64 {
    match std::env::var("CRASH_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|e| panic!("CRASH_SEED={s:?} is not a number: {e}"))
        }
        Err(_) => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            // Keep it short enough to type.
            (nanos ^ u64::from(std::process::id()).rotate_left(32)) % 1_000_000_000
        }
    }
}

fn env_cycles() -> usize {
    match std::env::var("CRASH_CYCLES") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("CRASH_CYCLES={s:?} is not a number: {e}")),
        Err(_) => 30,
    }
}

fn env_phases() -> Vec<Phase> {
    match std::env::var("CRASH_PHASES") {
        Ok(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                *PHASES
                    .iter()
                    .find(|ph| ph.name() == p)
                    .unwrap_or_else(|| panic!("CRASH_PHASES: unknown phase {p:?}"))
            })
            .collect(),
        Err(_) => PHASES.to_vec(),
    }
}

fn ms(rng: &mut StdRng, (lo, hi): (u64, u64)) -> u64 {
    rng.gen_range(lo..=hi)
}

/// Starts the server on `store` within [`START_TIMEOUT`], or fails the run.
async fn restart(store: &Path, ctx: &Ctx, killed: Option<&Skiff>) -> Skiff {
    let store = store.to_path_buf();
    let started = tokio::task::spawn_blocking(move || Skiff::try_start(&store, START_TIMEOUT))
        .await
        .expect("start task");
    started.unwrap_or_else(|e| {
        ctx.fail(
            &format!("the server did not start again after the kill: {e}"),
            &[("killed", killed)],
        )
    })
}

/// `fresh`: a server on a new, empty store, killed while idle 0-300 ms
/// after it is ready, must start again on that store.
async fn fresh_store(ctx: &Ctx, idle: Duration) {
    let dir = tempfile::tempdir().expect("temp dir for a fresh store");
    let first = restart(dir.path(), ctx, None).await;
    tokio::time::sleep(idle).await;
    let mut first = first;
    first.kill();
    let again = restart(dir.path(), ctx, Some(&first)).await;
    let alive = async {
        let client = try_connect(&again.url, VERIFY_TIMEOUT).await?;
        let info = api(&client, "INFO", &Value::Null, VERIFY_TIMEOUT).await?;
        match info.get("error") {
            None => Ok(()),
            Some(_) => Err(format!("$JS.API.INFO answers {info}")),
        }
    };
    if let Err(e) = alive.await {
        ctx.fail(
            &format!("restarted on a fresh store, but: {e}"),
            &[("killed", Some(&first)), ("restarted", Some(&again))],
        );
    }
}

/// Runs the clients of `phase` against `server` for `run`, then kills it
/// and lets the clients read what was already answered.
async fn busy_phase(
    phase: Phase,
    server: &mut Skiff,
    run: Duration,
    cycle: usize,
    rng: &mut StdRng,
    model: &Shared,
) {
    let mut tasks = Vec::new();
    let url = server.url.clone();
    if matches!(phase, Phase::Churn | Phase::Mixed) {
        tasks.push(tokio::spawn(churn(
            url.clone(),
            Arc::clone(model),
            rng.gen(),
        )));
    }
    if matches!(phase, Phase::Publish | Phase::Mixed) {
        for k in 0..PUBLISHERS {
            let window = rng.gen_range(WINDOW.0..=WINDOW.1);
            tasks.push(tokio::spawn(publisher(
                url.clone(),
                k,
                cycle,
                window,
                Arc::clone(model),
            )));
        }
    }
    if matches!(phase, Phase::Fetch | Phase::Mixed) {
        tasks.push(tokio::spawn(fetcher(url.clone(), Arc::clone(model))));
    }
    tokio::time::sleep(run).await;
    server.kill();
    tokio::time::sleep(GRACE).await;
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Creates `DATA` and `READER` on the first server, before any kill.
async fn set_up(server: &Skiff, ctx: &Ctx) {
    let setup = async {
        let client = try_connect(&server.url, VERIFY_TIMEOUT).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(VERIFY_TIMEOUT)
            .build(client);
        let stream = bounded(
            "create DATA",
            VERIFY_TIMEOUT,
            js.create_stream(stream::Config {
                name: DATA.into(),
                subjects: vec!["data.>".into()],
                storage: stream::StorageType::File,
                ..Default::default()
            }),
        )
        .await?
        .map_err(|e| format!("create {DATA}: {e}"))?;
        bounded(
            "create READER",
            VERIFY_TIMEOUT,
            stream.create_consumer(pull::Config {
                durable_name: Some(READER.into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: READER_ACK_WAIT,
                ..Default::default()
            }),
        )
        .await?
        .map_err(|e| format!("create {READER}: {e}"))?;
        Ok::<(), NoAnswer>(())
    };
    if let Err(e) = setup.await {
        ctx.fail(&format!("setting up: {e}"), &[("first", Some(server))]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_any_moment_loses_nothing_confirmed() {
    let seed = env_seed();
    let cycles = env_cycles();
    let phases = env_phases();
    assert!(!phases.is_empty(), "CRASH_PHASES selects no phase");
    eprintln!(
        "crash_any_moment: CRASH_SEED={seed} CRASH_CYCLES={cycles} phases {:?}",
        phases.iter().map(|p| p.name()).collect::<Vec<_>>()
    );
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("crash_any_moment: replay with CRASH_SEED={seed}");
        previous_hook(info);
    }));

    let started = Instant::now();
    // Every phase once first, in a seeded order; then at random. From an
    // RNG of its own, so that fewer cycles replay a prefix of the run.
    let mut schedule_rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed_5eed_5eed);
    let mut schedule = phases.clone();
    schedule.shuffle(&mut schedule_rng);
    while schedule.len() < cycles {
        schedule.push(*phases.choose(&mut schedule_rng).expect("a phase"));
    }
    schedule.truncate(cycles);
    let mut rng = StdRng::seed_from_u64(seed);

    let mut store = tempfile::tempdir().expect("temp dir for the store");
    let mut model: Shared = Arc::default();
    let mut ctx = Ctx {
        seed,
        cycle: 0,
        phase: schedule.first().copied().unwrap_or(Phase::Startup),
        kill_ms: 0,
    };
    let mut server = restart(store.path(), &ctx, None).await;
    set_up(&server, &ctx).await;

    let mut per_phase = [0usize; PHASES.len()];
    let mut kills = 0usize;
    let mut totals = Totals::default();
    for (cycle, &phase) in schedule.iter().enumerate() {
        let cycle_started = Instant::now();
        per_phase[PHASES.iter().position(|p| *p == phase).expect("phase")] += 1;
        ctx = Ctx {
            seed,
            cycle,
            phase,
            kill_ms: 0,
        };
        if cycle > 0 && cycle % EPOCH_CYCLES == 0 {
            // A new store, so that long runs do not slow down with its size.
            server.kill();
            totals.add(&lock(&model));
            store = tempfile::tempdir().expect("temp dir for the store");
            model = Arc::default();
            server = restart(store.path(), &ctx, None).await;
            set_up(&server, &ctx).await;
            eprintln!("cycle {cycle:3}: a new store");
        }
        let killed = match phase {
            Phase::Fresh => {
                ctx.kill_ms = ms(&mut rng, FRESH_KILL_MS);
                fresh_store(&ctx, Duration::from_millis(ctx.kill_ms)).await;
                kills += 1;
                eprintln!(
                    "cycle {cycle:3} {:8} kill {:3} ms after ready: restarted ({:?})",
                    phase.name(),
                    ctx.kill_ms,
                    cycle_started.elapsed()
                );
                continue;
            }
            Phase::Startup => {
                ctx.kill_ms = ms(&mut rng, STARTUP_KILL_MS);
                // The running server dies idle, the next one while it starts.
                server.kill();
                let mut starting = Skiff::spawn(store.path());
                tokio::time::sleep(Duration::from_millis(ctx.kill_ms)).await;
                starting.kill();
                kills += 2;
                starting
            }
            Phase::Churn | Phase::Publish | Phase::Fetch | Phase::Mixed => {
                ctx.kill_ms = ms(&mut rng, PHASE_MS);
                busy_phase(
                    phase,
                    &mut server,
                    Duration::from_millis(ctx.kill_ms),
                    cycle,
                    &mut rng,
                    &model,
                )
                .await;
                kills += 1;
                server
            }
        };
        let restart_started = Instant::now();
        server = restart(store.path(), &ctx, Some(&killed)).await;
        let restart_took = restart_started.elapsed();
        let verify_started = Instant::now();
        let checked = match verify(&server.url, &model).await {
            Ok(checked) => checked,
            Err(wrong) => {
                let shown = wrong.len().min(30);
                let mut what = format!(
                    "{} confirmed thing(s) wrong after the restart{}:",
                    wrong.len(),
                    if shown < wrong.len() {
                        format!(" (first {shown})")
                    } else {
                        String::new()
                    }
                );
                for w in &wrong[..shown] {
                    let _ = write!(what, "\n  - {w}");
                }
                ctx.fail(
                    &what,
                    &[("killed", Some(&killed)), ("restarted", Some(&server))],
                );
            }
        };
        drop(killed);
        let m = lock(&model);
        eprintln!(
            "cycle {cycle:3} {:8} kill {:3} ms: restart {:?}, verify {:?} ({} acked, floor \
             {} (READER: floor {}, delivered {}, pending {}), {} streams, {} consumers \
             known), cycle {:?}",
            phase.name(),
            ctx.kill_ms,
            restart_took,
            verify_started.elapsed(),
            checked.acked,
            checked.double_ack_floor,
            checked.reader.0,
            checked.reader.1,
            checked.reader.2,
            m.streams.len(),
            m.consumers.len(),
            cycle_started.elapsed()
        );
    }
    drop(server);
    totals.add(&lock(&model));

    let phases_run: Vec<String> = PHASES
        .iter()
        .zip(per_phase)
        .map(|(p, n)| format!("{} {n}", p.name()))
        .collect();
    eprintln!(
        "crash_any_moment: CRASH_SEED={seed}: {cycles} cycles ({}), {kills} kills, {} acked \
         publishes checked, {} double acks answered (ack floor checked up to {}), churn \
         requests {} answered / {} unanswered, {} error answers{}; {:?}",
        phases_run.join(", "),
        totals.acked,
        totals.double_acked,
        totals.double_ack_floor,
        totals.churn_answered,
        totals.churn_unanswered,
        totals.error_replies.len(),
        totals
            .error_replies
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        started.elapsed()
    );
}

/// What the stores of a run confirmed and the checks held to.
#[derive(Default)]
struct Totals {
    acked: usize,
    double_acked: usize,
    double_ack_floor: u64,
    churn_answered: u64,
    churn_unanswered: u64,
    error_replies: Vec<String>,
}

impl Totals {
    fn add(&mut self, m: &Model) {
        self.acked += m.acked.len();
        self.double_acked += m.double_acked.len();
        self.double_ack_floor += m.double_ack_floor();
        self.churn_answered += m.churn_answered;
        self.churn_unanswered += m.churn_asked - m.churn_answered;
        self.error_replies.extend(m.error_replies.iter().cloned());
    }
}
