//! Property test of a durable stream and two durable pull consumers (one on
//! every subject, one filtered to `model.a`) against a model: random
//! publishes to `model.a` / `model.b` (with and without `Nats-Msg-Id`, ids
//! drawn from a small set so that duplicates are common), fetches, acks /
//! naks / terms (plain or AckSync) of delivered messages, and in-process
//! restarts (`shutdown` + `Server::start` on the same store).
//!
//! Checked:
//! - PubAck sequences are consecutive; a repeated id is answered as a
//!   duplicate of its first sequence, also across restarts;
//! - no acknowledged publish is lost: at the end every stored message is
//!   read back and compared with the model;
//! - a fetch delivers exactly what the consumer owes, in order: messages
//!   waiting for redelivery (nak'd) in stream order, then first deliveries
//!   of the messages its filter takes, in stream order, with the right
//!   delivery counts;
//! - after a restart the ack floor and the number of pending acks are
//!   within what was confirmed and what was attempted; acked messages are
//!   not redelivered, pending ones are: each case ends with a restart, a
//!   nak of every delivered message and a fetch of everything.
//!
//! Plain acks and naks are fire-and-forget: one sent just before a restart
//! may or may not have been applied, so the model keeps, per message, the
//! set of states the server may be in, and narrows it from what later
//! fetches show. An AckSync (answered after the consumer's state is stored
//! and fsynced) settles everything sent before it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, PullConsumer},
    message::PublishMessage,
    stream, Context,
};
use futures::StreamExt;
use proptest::prelude::*;
use proptest::sample::Index;
use skiff::{Config, Server, ServerHandle};

const STREAM: &str = "MODEL";
/// The consumers: durable name and filter subject.
const CONSUMERS: [(&str, Option<&str>); 2] = [("all", None), ("only-a", Some("model.a"))];
/// Long enough that nothing is redelivered for an expired ack wait during
/// a case: redeliveries come from naks only.
const ACK_WAIT: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AckOp {
    Ack,
    Nak,
    Term,
}

impl AckOp {
    fn body(self) -> &'static str {
        match self {
            AckOp::Ack => "+ACK",
            AckOp::Nak => "-NAK",
            AckOp::Term => "+TERM",
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Publish to `model.a` (`true`) or `model.b`, with `Nats-Msg-Id:
    /// id-<n>` when given.
    Publish(bool, Option<u8>),
    /// Pull up to this many messages (no wait) from consumer `.0`.
    Fetch(usize, u8),
    /// Ack, nak or term one of the messages consumer `c` delivered so far
    /// (maybe one already acked, maybe one delivered before a restart);
    /// AckSync when `sync`.
    Ack {
        c: usize,
        pick: Index,
        op: AckOp,
        sync: bool,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let ack_op = prop_oneof![3 => Just(AckOp::Ack), 1 => Just(AckOp::Nak), 1 => Just(AckOp::Term)];
    let consumer = 0..CONSUMERS.len();
    prop_oneof![
        4 => (any::<bool>(), proptest::option::weighted(0.6, 0u8..8))
            .prop_map(|(a, id)| Op::Publish(a, id)),
        3 => (consumer.clone(), 1u8..5).prop_map(|(c, n)| Op::Fetch(c, n)),
        4 => (consumer, any::<Index>(), ack_op, any::<bool>())
            .prop_map(|(c, pick, op, sync)| Op::Ack { c, pick, op, sync }),
        1 => Just(Op::Restart),
    ]
}

// Possible states of a delivered message on the server, as bits.
/// Acknowledged or terminated: never delivered again.
const ACKED: u8 = 1;
/// Pending, waiting for its ack (or the ack wait).
const PENDING: u8 = 2;
/// Pending and nak'd: next in line for redelivery.
const REDELIVER: u8 = 4;

/// A restart keeps pending messages but forgets which were nak'd (they
/// come back after the ack wait).
fn after_restart(s: u8) -> u8 {
    if s & REDELIVER != 0 {
        (s & !REDELIVER) | PENDING
    } else {
        s
    }
}

fn apply(s: u8, op: AckOp) -> u8 {
    match op {
        AckOp::Ack | AckOp::Term => ACKED,
        AckOp::Nak => {
            let mut out = s & ACKED;
            if s & (PENDING | REDELIVER) != 0 {
                out |= REDELIVER;
            }
            out
        }
    }
}

struct Delivered {
    /// States the running server may have.
    now: u8,
    /// States a restart may bring back (everything since the last point
    /// known to be stored).
    stored: u8,
    deliveries: i64,
    /// The ack subject of its last delivery.
    reply: String,
}

/// One consumer as the model sees it.
struct ConsumerModel {
    filter: Option<&'static str>,
    /// One past the last sequence delivered for the first time.
    next_new: u64,
    delivered: BTreeMap<u64, Delivered>,
}

impl ConsumerModel {
    /// The consumer stored its whole state: what may be running is what
    /// a restart brings back.
    fn settle(&mut self) {
        for d in self.delivered.values_mut() {
            d.stored = d.now;
        }
    }

    /// Bounds of the ack floor. It is computed lazily (on the consumer's
    /// next run after an ack) as "below the oldest pending message", or
    /// the last delivered one when none is pending: at least the last
    /// delivered message up to which everything delivered is surely acked,
    /// at most just below the oldest surely pending one.
    fn floor_bounds(&self) -> (u64, u64) {
        let mut lo = 0;
        for (seq, d) in &self.delivered {
            if d.now != ACKED {
                break;
            }
            lo = *seq;
        }
        let last = self.next_new - 1;
        let hi = self
            .delivered
            .iter()
            .find(|(_, d)| d.now & ACKED == 0)
            .map_or(last, |(seq, _)| seq - 1);
        (lo, hi)
    }
}

struct Model {
    /// Subject, id and payload of each stored message, by sequence - 1.
    messages: Vec<(&'static str, Option<String>, String)>,
    ids: HashMap<String, u64>,
    consumers: Vec<ConsumerModel>,
    anon: u64,
    stats: Stats,
}

/// What a case exercised (printed with `--nocapture`).
#[derive(Debug, Default)]
struct Stats {
    publishes: usize,
    duplicates: usize,
    first_deliveries: usize,
    redeliveries: usize,
    acks_sync: usize,
    acks_plain: usize,
    restarts: usize,
    /// Messages whose state a restart left uncertain (a plain ack or nak
    /// just before it).
    uncertain_after_restart: usize,
}

impl Model {
    fn new() -> Model {
        Model {
            messages: Vec::new(),
            ids: HashMap::new(),
            consumers: CONSUMERS
                .iter()
                .map(|(_, filter)| ConsumerModel {
                    filter: *filter,
                    next_new: 1,
                    delivered: BTreeMap::new(),
                })
                .collect(),
            anon: 0,
            stats: Stats::default(),
        }
    }

    fn last_seq(&self) -> u64 {
        self.messages.len() as u64
    }

    /// Stored messages from `from` on that consumer `c` takes.
    fn matching_from(&self, c: usize, from: u64) -> Vec<u64> {
        let filter = self.consumers[c].filter;
        (from..=self.last_seq())
            .filter(|seq| filter.is_none_or(|f| self.messages[*seq as usize - 1].0 == f))
            .collect()
    }

    fn restart(&mut self) {
        self.stats.restarts += 1;
        for c in &mut self.consumers {
            for d in c.delivered.values_mut() {
                d.now = after_restart(d.stored);
                d.stored = d.now;
                if d.now.count_ones() > 1 {
                    self.stats.uncertain_after_restart += 1;
                }
            }
        }
    }
}

struct Harness {
    config: Config,
    server: Option<ServerHandle>,
    client: async_nats::Client,
    js: Context,
    consumers: Vec<PullConsumer>,
}

async fn step<T, E: std::fmt::Debug>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e:?}")),
        Err(_) => Err(format!("{what}: timed out after {STEP:?}")),
    }
}

async fn connect(server: &ServerHandle) -> Result<(async_nats::Client, Context), String> {
    let client = step("connect", async_nats::connect(server.client_url())).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(client.clone());
    Ok((client, js))
}

impl Harness {
    async fn start(dir: &std::path::Path) -> Result<Harness, String> {
        let config = Config::with_streams("127.0.0.1:0", dir);
        let server = step("start", Server::start(config.clone())).await?;
        let (client, js) = connect(&server).await?;
        let stream = step(
            "create stream",
            js.create_stream(stream::Config {
                name: STREAM.into(),
                subjects: vec!["model.>".into()],
                storage: stream::StorageType::File,
                ..Default::default()
            }),
        )
        .await?;
        let mut consumers = Vec::new();
        for (name, filter) in CONSUMERS {
            let consumer = step(
                "create consumer",
                stream.create_consumer(pull::Config {
                    durable_name: Some(name.into()),
                    filter_subject: filter.unwrap_or_default().into(),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    ..Default::default()
                }),
            )
            .await?;
            consumers.push(consumer);
        }
        Ok(Harness {
            config,
            server: Some(server),
            client,
            js,
            consumers,
        })
    }

    async fn restart(&mut self) -> Result<(), String> {
        if let Some(server) = self.server.take() {
            step("shutdown", async {
                server.shutdown().await;
                Ok::<_, ()>(())
            })
            .await?;
        }
        let server = step("restart", Server::start(self.config.clone())).await?;
        let (client, js) = connect(&server).await?;
        let stream = step("get stream", js.get_stream(STREAM)).await?;
        self.consumers.clear();
        for (name, _) in CONSUMERS {
            self.consumers
                .push(step("get consumer", stream.get_consumer(name)).await?);
        }
        self.client = client;
        self.js = js;
        self.server = Some(server);
        Ok(())
    }

    async fn shutdown(mut self) {
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(STEP, server.shutdown()).await;
        }
    }
}

async fn publish(h: &Harness, m: &mut Model, to_a: bool, id: Option<u8>) -> Result<(), String> {
    let subject = if to_a { "model.a" } else { "model.b" };
    let id = id.map(|n| format!("id-{n}"));
    let payload = match &id {
        Some(id) => id.clone(),
        None => {
            m.anon += 1;
            format!("anon-{}", m.anon)
        }
    };
    let mut message = PublishMessage::build().payload(payload.clone().into());
    if let Some(id) = &id {
        message = message.message_id(id);
    }
    let ack = step("publish", async {
        match h.js.send_publish(subject, message).await {
            Ok(future) => future.await.map_err(|e| format!("{e:?}")),
            Err(e) => Err(format!("{e:?}")),
        }
    })
    .await?;
    m.stats.publishes += 1;
    match id.as_ref().and_then(|id| m.ids.get(id)) {
        Some(&seq) => {
            m.stats.duplicates += 1;
            if !ack.duplicate || ack.sequence != seq {
                return Err(format!(
                    "{id:?} was stored as {seq}: expected a duplicate PubAck, got {ack:?}"
                ));
            }
        }
        None => {
            if ack.duplicate || ack.sequence != m.last_seq() + 1 {
                return Err(format!(
                    "publish {id:?}: expected new sequence {}, got {ack:?}",
                    m.last_seq() + 1
                ));
            }
            if let Some(id) = &id {
                m.ids.insert(id.clone(), ack.sequence);
            }
            m.messages.push((subject, id, payload));
        }
    }
    Ok(())
}

/// Fetches up to `batch` from consumer `c` and checks them against what it
/// owes.
async fn fetch(h: &Harness, m: &mut Model, c: usize, batch: usize) -> Result<(), String> {
    let consumer = &h.consumers[c];
    let mut messages = step("fetch", consumer.fetch().max_messages(batch).messages()).await?;
    let mut got: Vec<(u64, i64, String)> = Vec::new();
    loop {
        let next = tokio::time::timeout(STEP, messages.next())
            .await
            .map_err(|_| "fetch: timed out waiting for messages".to_string())?;
        let Some(msg) = next else { break };
        let msg = msg.map_err(|e| format!("fetch: {e:?}"))?;
        let info = msg.info().map_err(|e| format!("ack subject: {e:?}"))?;
        let reply = msg
            .reply
            .as_ref()
            .map(|r| r.to_string())
            .ok_or("delivery without reply")?;
        got.push((info.stream_sequence, info.delivered, reply));
        if got.len() > batch {
            return Err(format!("fetch of {batch} delivered more"));
        }
    }
    let seqs: Vec<u64> = got.iter().map(|(s, _, _)| *s).collect();
    let context = || format!("{} fetch of {batch} delivered {seqs:?}", CONSUMERS[c].0);
    let mut new_expected = m.matching_from(c, m.consumers[c].next_new);
    let cm = &mut m.consumers[c];
    // Redeliveries (sequences delivered before) first, then new ones.
    let split = seqs.iter().take_while(|s| **s < cm.next_new).count();
    let (redelivered, new) = seqs.split_at(split);
    for w in redelivered.windows(2) {
        if w[0] >= w[1] {
            return Err(format!("{}: redeliveries out of order", context()));
        }
    }
    if let Some(seq) = redelivered.iter().find(|s| !cm.delivered.contains_key(s)) {
        return Err(format!("{}: {seq} was never delivered before", context()));
    }
    new_expected.truncate(batch - split);
    // The server hands out every queued redelivery before anything new,
    // and stops early only when it runs out.
    let exhausted = !new.is_empty() || seqs.len() < batch;
    let highest = redelivered.last().copied().unwrap_or(0);
    for (seq, d) in cm.delivered.iter_mut() {
        let here = redelivered.contains(seq);
        let skipped = !here && (exhausted || *seq < highest);
        if here {
            if d.now & REDELIVER == 0 {
                return Err(format!(
                    "{}: {seq} redelivered, but it was {} (acked: {})",
                    context(),
                    describe(d.now),
                    d.now & ACKED != 0
                ));
            }
        } else if skipped && d.now & REDELIVER != 0 {
            if d.now == REDELIVER {
                return Err(format!("{}: nak'd {seq} not redelivered", context()));
            }
            d.now &= !REDELIVER;
            if d.now == 0 {
                d.now = PENDING;
            }
        }
    }
    // When not exhausted, the batch was all redeliveries.
    if exhausted && new != &new_expected[..] {
        return Err(format!(
            "{}: expected first deliveries {new_expected:?}",
            context()
        ));
    }
    for (seq, delivered, reply) in got {
        let d = cm.delivered.entry(seq).or_insert(Delivered {
            now: PENDING,
            stored: PENDING,
            deliveries: 0,
            reply: String::new(),
        });
        if delivered != d.deliveries + 1 {
            return Err(format!(
                "{seq} delivered with count {delivered}, expected {}",
                d.deliveries + 1
            ));
        }
        if delivered == 1 {
            m.stats.first_deliveries += 1;
        } else {
            m.stats.redeliveries += 1;
        }
        d.deliveries = delivered;
        d.now = PENDING;
        d.reply = reply;
        if seq >= cm.next_new {
            cm.next_new = seq + 1;
        }
    }
    // The pump that delivered stored the consumer with every earlier ack
    // applied.
    cm.settle();
    Ok(())
}

fn describe(s: u8) -> String {
    let mut parts = Vec::new();
    for (bit, name) in [(ACKED, "acked"), (PENDING, "pending"), (REDELIVER, "nak'd")] {
        if s & bit != 0 {
            parts.push(name);
        }
    }
    parts.join("|")
}

async fn ack(
    h: &Harness,
    m: &mut Model,
    c: usize,
    seq: u64,
    op: AckOp,
    sync: bool,
) -> Result<(), String> {
    let cm = &mut m.consumers[c];
    let d = cm
        .delivered
        .get_mut(&seq)
        .expect("picked a delivered message");
    let reply = d.reply.clone();
    d.now = apply(d.now, op);
    d.stored |= d.now;
    if sync {
        m.stats.acks_sync += 1;
        let answer = step("AckSync", h.client.request(reply, op.body().into())).await?;
        if !answer.payload.is_empty() {
            return Err(format!("AckSync answered {:?}", answer.payload));
        }
        cm.settle();
    } else {
        m.stats.acks_plain += 1;
        step("ack", h.client.publish(reply, op.body().into())).await?;
    }
    Ok(())
}

/// After a restart: each consumer's ack floor and pending count are within
/// the model's bounds, and it resumes after its last first delivery.
async fn check_consumers(h: &mut Harness, m: &Model) -> Result<(), String> {
    for (c, cm) in m.consumers.iter().enumerate() {
        let name = CONSUMERS[c].0;
        let info = step("consumer info", h.consumers[c].info()).await?;
        let floor = info.ack_floor.stream_sequence;
        let (lo, hi) = cm.floor_bounds();
        if floor < lo || floor > hi {
            return Err(format!(
                "{name}: ack floor {floor} after restart, expected {lo}..={hi}"
            ));
        }
        let pending_lo = cm.delivered.values().filter(|d| d.now == PENDING).count();
        let pending_hi = cm
            .delivered
            .values()
            .filter(|d| d.now & PENDING != 0)
            .count();
        if info.num_ack_pending < pending_lo || info.num_ack_pending > pending_hi {
            return Err(format!(
                "{name}: {} pending acks after restart, expected {pending_lo}..={pending_hi}",
                info.num_ack_pending
            ));
        }
        if info.delivered.stream_sequence != cm.next_new - 1 {
            return Err(format!(
                "{name}: delivered up to {} after restart, expected {}",
                info.delivered.stream_sequence,
                cm.next_new - 1
            ));
        }
    }
    Ok(())
}

/// Every stored message, read back one by one.
async fn check_stream(h: &Harness, m: &Model) -> Result<(), String> {
    let mut stream = step("get stream", h.js.get_stream(STREAM)).await?;
    let state = step("stream info", stream.info()).await?.state.clone();
    if state.messages != m.last_seq() || state.last_sequence != m.last_seq() {
        return Err(format!(
            "stream holds {state:?}, expected 1..={}",
            m.last_seq()
        ));
    }
    for (i, (subject, id, payload)) in m.messages.iter().enumerate() {
        let seq = i as u64 + 1;
        let msg = step("get message", stream.get_raw_message(seq)).await?;
        let stored_id = msg
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_string());
        if &stored_id != id || msg.payload != payload.as_bytes() || msg.subject.as_str() != *subject
        {
            return Err(format!(
                "message {seq} is {} {stored_id:?} {:?}, expected {subject} {id:?} {payload:?}",
                msg.subject, msg.payload
            ));
        }
    }
    Ok(())
}

async fn run(ops: Vec<Op>) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut h = Harness::start(dir.path()).await?;
    let result = run_ops(&mut h, &ops).await;
    h.shutdown().await;
    result
}

async fn run_ops(h: &mut Harness, ops: &[Op]) -> Result<(), String> {
    let mut m = Model::new();
    for (i, op) in ops.iter().enumerate() {
        let at = |e: String| format!("op {i} {op:?}: {e}");
        match op {
            Op::Publish(to_a, id) => publish(h, &mut m, *to_a, *id).await.map_err(at)?,
            Op::Fetch(c, n) => fetch(h, &mut m, *c, *n as usize).await.map_err(at)?,
            Op::Ack { c, pick, op, sync } => {
                let delivered = &m.consumers[*c].delivered;
                if delivered.is_empty() {
                    continue;
                }
                let seq = *delivered
                    .keys()
                    .nth(pick.index(delivered.len()))
                    .expect("index in range");
                ack(h, &mut m, *c, seq, *op, *sync).await.map_err(at)?;
            }
            Op::Restart => {
                h.restart().await.map_err(at)?;
                m.restart();
                check_consumers(h, &m).await.map_err(at)?;
            }
        }
    }
    // The end: restart, nak everything ever delivered (a no-op for acked
    // messages) and fetch all: exactly the pending ones come back, then
    // what was never delivered.
    let at = |e: String| format!("final check: {e}");
    h.restart().await.map_err(at)?;
    m.restart();
    check_consumers(h, &m).await.map_err(at)?;
    for c in 0..m.consumers.len() {
        let seqs: Vec<u64> = m.consumers[c].delivered.keys().copied().collect();
        for seq in seqs {
            ack(h, &mut m, c, seq, AckOp::Nak, true).await.map_err(at)?;
        }
        let all = m.consumers[c].delivered.len() + m.last_seq() as usize + 1;
        fetch(h, &mut m, c, all).await.map_err(at)?;
    }
    check_stream(h, &m).await.map_err(at)?;
    eprintln!("{:?}", m.stats);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        // Each case creates a store (about 0.3 s in a debug build); set
        // PROPTEST_CASES for a longer run.
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            ProptestConfig::default().cases
        } else {
            12
        },
        max_shrink_iters: 200,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn stream_and_consumer_match_the_model(ops in proptest::collection::vec(op(), 10..50)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let result = runtime.block_on(run(ops));
        runtime.shutdown_timeout(Duration::from_secs(5));
        if let Err(e) = result {
            return Err(TestCaseError::fail(e));
        }
    }
}
