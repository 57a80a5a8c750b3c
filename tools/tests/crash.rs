//! The kill -9 test: the real `skiff` binary is killed with SIGKILL while
//! publishers and a consumer are busy, restarted on the same store, and
//! checked against what the clients were told before the kill:
//!
//! - every message whose PubAck arrived is stored, under the acked
//!   sequence; stored sequences run 1..=last without gaps; every id is
//!   stored once (retries with the same `Nats-Msg-Id` after the restart
//!   are recognised as duplicates); each publisher's stored messages are a
//!   prefix of what it sent;
//! - the durable consumer's ack floor is at least the floor that
//!   double-acks (AckSync) confirmed; no confirmed message is delivered
//!   again; every message not acked before the kill is delivered after it
//!   (at least once); first deliveries come in stream order.
//!
//! Plain acks may be lost by a crash (the message is redelivered): that is
//! at-least-once, not a failure.
//!
//! Every wait is bounded; children are killed on drop; stores are temp dirs.

mod child;
// The helpers the library's integration tests use, in one place.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, PullConsumer},
    message::PublishMessage,
    stream, AckKind, Context,
};
use child::{connect, context, Skiff};
use common::within;
use futures::StreamExt;

const STREAM: &str = "CRASH";
const DURABLE: &str = "worker";
const PUBLISHERS: usize = 4;
/// Bound on messages per publisher (time bounds them long before this).
const MAX_PER_PUBLISHER: usize = 100_000;
/// PubAcks each publisher waits for at once (so batches share an fsync).
const WINDOW: usize = 16;
/// The consumer's ack wait: pending messages come back this long after
/// the restart.
const ACK_WAIT: Duration = Duration::from_secs(1);
/// How long the busy phase runs before the kill, per kill point.
const KILL_AFTER_MS: [u64; 4] = [80, 300, 700, 1300];

// ---------------------------------------------------------------------------
// Clients.

#[derive(Default)]
struct PubLog {
    /// Ids handed to the client, in order.
    sent: Vec<String>,
    /// `(id, sequence)` of every PubAck received.
    acked: Vec<(String, u64)>,
}

/// Publishes `p<k>-<i>` with a window of outstanding PubAcks until an
/// error (the kill) or `stop`.
async fn publisher(url: String, k: usize, log: Arc<Mutex<PubLog>>, stop: Arc<AtomicBool>) {
    let js = context(connect(&url).await);
    let subject = format!("crash.p{k}");
    let mut inflight = VecDeque::new();
    let record = |id: String, ack: Result<jetstream::publish::PublishAck, _>| match ack {
        Ok(ack) => {
            assert!(
                !ack.duplicate,
                "{id} is unique but was acked as a duplicate"
            );
            log.lock().unwrap().acked.push((id, ack.sequence));
            true
        }
        Err::<_, jetstream::context::PublishError>(_) => false,
    };
    for i in 0..MAX_PER_PUBLISHER {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let id = format!("p{k}-{i:06}");
        log.lock().unwrap().sent.push(id.clone());
        let publish = PublishMessage::build()
            .payload(id.clone().into())
            .message_id(&id);
        match js.send_publish(subject.clone(), publish).await {
            Ok(future) => inflight.push_back((id, future)),
            Err(_) => return,
        }
        if inflight.len() >= WINDOW {
            let (id, future) = inflight.pop_front().unwrap();
            if !record(id, future.await) {
                return;
            }
        }
    }
    while let Some((id, future)) = inflight.pop_front() {
        if !record(id, future.await) {
            return;
        }
    }
}

#[derive(Default)]
struct ConsumerLog {
    /// `(stream seq, delivery count)` in arrival order.
    deliveries: Vec<(u64, i64)>,
    /// Messages a positive ack (plain or double) was sent for.
    acked: BTreeSet<u64>,
    /// Messages whose double-ack was confirmed.
    confirmed: BTreeSet<u64>,
    /// The longest prefix 1..=n entirely acked before some confirmed
    /// double-ack: the server must have persisted a floor of at least n.
    confirmed_floor: u64,
    /// The highest ack floor CONSUMER.INFO reported.
    observed_floor: u64,
}

/// Fetches and acks: every 7th message (first delivery) is nak'd, every
/// 5th is double-acked, the rest plainly acked.
async fn consumer(url: String, log: Arc<Mutex<ConsumerLog>>, stop: Arc<AtomicBool>) {
    let js = context(connect(&url).await);
    let Ok(stream) = js.get_stream(STREAM).await else {
        return;
    };
    let Ok(consumer): Result<PullConsumer, _> = stream.get_consumer(DURABLE).await else {
        return;
    };
    let mut prefix = 0u64;
    for _ in 0..1_000_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(mut batch) = consumer.fetch().max_messages(64).messages().await else {
            return;
        };
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let Ok(m) = m else { return };
            got += 1;
            let (seq, delivered) = {
                let info = m.info().expect("ack subject");
                (info.stream_sequence, info.delivered)
            };
            log.lock().unwrap().deliveries.push((seq, delivered));
            if delivered == 1 && seq % 7 == 3 {
                if m.ack_with(AckKind::Nak(None)).await.is_err() {
                    return;
                }
                continue;
            }
            log.lock().unwrap().acked.insert(seq);
            if seq % 5 == 0 {
                if m.double_ack().await.is_err() {
                    return;
                }
                let mut log = log.lock().unwrap();
                log.confirmed.insert(seq);
                while log.acked.contains(&(prefix + 1)) {
                    prefix += 1;
                }
                log.confirmed_floor = log.confirmed_floor.max(prefix);
            } else if m.ack().await.is_err() {
                return;
            }
        }
        if got == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Samples the consumer's ack floor.
async fn observer(url: String, log: Arc<Mutex<ConsumerLog>>, stop: Arc<AtomicBool>) {
    let js = context(connect(&url).await);
    let Ok(stream) = js.get_stream(STREAM).await else {
        return;
    };
    let Ok(mut consumer): Result<PullConsumer, _> = stream.get_consumer(DURABLE).await else {
        return;
    };
    for _ in 0..10_000 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(info) = consumer.info().await else {
            return;
        };
        let floor = info.ack_floor.stream_sequence;
        {
            let mut log = log.lock().unwrap();
            log.observed_floor = log.observed_floor.max(floor);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn create_stream_and_consumer(js: &Context) {
    let stream = within(
        "create stream",
        js.create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["crash.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        }),
    )
    .await
    .expect("create stream");
    within(
        "create consumer",
        stream.create_consumer(pull::Config {
            durable_name: Some(DURABLE.into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            ..Default::default()
        }),
    )
    .await
    .expect("create consumer");
}

/// Every stored message, in order, through an ephemeral consumer that does
/// not ack: `(seq, id)`.
async fn read_all(js: &Context, expected: u64) -> Vec<(u64, String)> {
    let stream = js.get_stream(STREAM).await.expect("get stream");
    let audit: PullConsumer = within(
        "create audit consumer",
        stream.create_consumer(pull::Config {
            ack_policy: AckPolicy::None,
            ..Default::default()
        }),
    )
    .await
    .expect("create audit consumer");
    let mut out = Vec::new();
    let rounds = expected / 256 + 50;
    for _ in 0..rounds {
        if out.len() as u64 >= expected {
            break;
        }
        let mut batch = within("fetch", audit.fetch().max_messages(256).messages())
            .await
            .expect("fetch");
        while let Some(m) = within("audit message", batch.next()).await {
            let m = m.expect("audit message");
            let seq = m.info().expect("ack subject").stream_sequence;
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            assert_eq!(
                id.as_bytes(),
                &m.payload[..],
                "seq {seq}: payload and Nats-Msg-Id disagree"
            );
            out.push((seq, id));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// One kill point.

struct Outcome {
    acked_publishes: usize,
    stored: u64,
    confirmed_acks: usize,
    confirmed_floor: u64,
    observed_floor: u64,
    floor_after: u64,
    redelivered_after: usize,
}

async fn kill_point(kill_after: Duration, kill_again: bool) -> Outcome {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = Skiff::start(dir.path());
    let js = context(connect(&server.url).await);
    create_stream_and_consumer(&js).await;

    let stop = Arc::new(AtomicBool::new(false));
    let pub_logs: Vec<Arc<Mutex<PubLog>>> = (0..PUBLISHERS).map(|_| Arc::default()).collect();
    let consumer_log = Arc::new(Mutex::new(ConsumerLog::default()));
    let mut tasks = Vec::new();
    for (k, log) in pub_logs.iter().enumerate() {
        tasks.push(tokio::spawn(publisher(
            server.url.clone(),
            k,
            Arc::clone(log),
            Arc::clone(&stop),
        )));
    }
    tasks.push(tokio::spawn(consumer(
        server.url.clone(),
        Arc::clone(&consumer_log),
        Arc::clone(&stop),
    )));
    tasks.push(tokio::spawn(observer(
        server.url.clone(),
        Arc::clone(&consumer_log),
        Arc::clone(&stop),
    )));

    tokio::time::sleep(kill_after).await;
    server.kill();
    // What the dead server wrote to the sockets may still be read.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(js);

    let pubs: Vec<PubLog> = pub_logs
        .iter()
        .map(|l| std::mem::take(&mut *l.lock().unwrap()))
        .collect();
    let before = std::mem::take(&mut *consumer_log.lock().unwrap());
    check_first_deliveries_in_order(&before.deliveries, "before the kill");

    // ---- Restart on the same store; with `kill_again`, kill the restarted
    // server as soon as it is ready (a crash right after recovery) and
    // start once more.
    if kill_again {
        Skiff::start(dir.path()).kill();
    }
    let server = Skiff::start(dir.path());
    let js = context(connect(&server.url).await);
    let mut stream = within("get stream", js.get_stream(STREAM))
        .await
        .unwrap_or_else(|e| panic!("stream lost: {e}; log: {:#?}", server.lines()));
    let mut durable: PullConsumer = within("get consumer", stream.get_consumer(DURABLE))
        .await
        .unwrap_or_else(|e| panic!("consumer lost: {e}; log: {:#?}", server.lines()));

    // The consumer's state as restored, before anything changes it.
    let floor_after = within("consumer info", durable.info())
        .await
        .expect("consumer info")
        .ack_floor
        .stream_sequence;
    assert!(
        floor_after >= before.confirmed_floor,
        "ack floor {floor_after} after restart is below the floor {} confirmed by double-acks",
        before.confirmed_floor
    );
    // Stronger, and true for kill -9 (not for a power cut): CONSUMER.INFO
    // reads the floor under the lock the consumer holds while storing it,
    // and a store write reaches the OS before the call returns.
    assert!(
        floor_after >= before.observed_floor,
        "ack floor {floor_after} after restart is below the floor {} CONSUMER.INFO reported",
        before.observed_floor
    );

    let state = within("stream info", stream.info())
        .await
        .expect("stream info")
        .state
        .clone();
    assert_eq!(state.first_sequence, 1, "{state:?}");
    assert_eq!(
        state.messages, state.last_sequence,
        "gaps among stored messages: {state:?}"
    );
    let stored_before_retry = state.last_sequence;

    // ---- Retries after the restart: acked ids must be duplicates of
    // themselves, in-flight ids either duplicates or new.
    let mut retried_new = Vec::new();
    let mut next_new = stored_before_retry + 1;
    for (k, p) in pubs.iter().enumerate() {
        let acked: HashSet<&str> = p.acked.iter().map(|(id, _)| id.as_str()).collect();
        let unacked = p.sent.iter().filter(|id| !acked.contains(id.as_str()));
        let recent_acked = p.acked.iter().rev().take(10).map(|(id, _)| id);
        for id in unacked.chain(recent_acked) {
            let publish = PublishMessage::build()
                .payload(id.clone().into())
                .message_id(id);
            let ack = within("retry publish", async {
                js.send_publish(format!("crash.p{k}"), publish)
                    .await
                    .expect("retry publish")
                    .await
                    .expect("retry PubAck")
            })
            .await;
            if let Some((_, seq)) = p.acked.iter().find(|(a, _)| a == id) {
                assert!(
                    ack.duplicate && ack.sequence == *seq,
                    "retry of acked {id} (seq {seq}) after restart: {ack:?}"
                );
            } else if ack.duplicate {
                assert!(
                    ack.sequence <= stored_before_retry,
                    "{id}: duplicate of {}",
                    ack.sequence
                );
            } else {
                assert_eq!(ack.sequence, next_new, "retry of {id}: sequence");
                next_new += 1;
                retried_new.push(id.clone());
            }
        }
    }

    // ---- Everything stored, in order, once.
    let total = next_new - 1;
    let all = read_all(&js, total).await;
    let seqs: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "stored sequences are not 1..={total}"
    );
    let mut by_id: HashMap<&str, u64> = HashMap::new();
    for (seq, id) in &all {
        if let Some(first) = by_id.insert(id, *seq) {
            panic!("{id} stored twice: at {first} and {seq}");
        }
    }
    let mut acked_publishes = 0;
    for (k, p) in pubs.iter().enumerate() {
        for (id, seq) in &p.acked {
            acked_publishes += 1;
            assert_eq!(
                by_id.get(id.as_str()),
                Some(seq),
                "acked publish {id} (seq {seq}) lost or moved"
            );
        }
        // What publisher k got stored before the kill is a prefix of what
        // it sent (a crash loses a tail, never a message in the middle).
        let stored: Vec<usize> = all
            .iter()
            .filter(|(seq, id)| *seq <= stored_before_retry && id.starts_with(&format!("p{k}-")))
            .map(|(_, id)| id[id.find('-').unwrap() + 1..].parse().unwrap())
            .collect();
        assert_eq!(
            stored,
            (0..stored.len()).collect::<Vec<_>>(),
            "publisher {k}: stored messages are not a prefix of those sent"
        );
    }

    // ---- The durable consumer after the restart: nothing confirmed comes
    // back, everything not acked does (pending ones after ACK_WAIT).
    let required: BTreeSet<u64> = (1..=total).filter(|s| !before.acked.contains(s)).collect();
    let mut after: Vec<(u64, i64)> = Vec::new();
    let started = Instant::now();
    loop {
        let seen: BTreeSet<u64> = after.iter().map(|(s, _)| *s).collect();
        let covered = required.is_subset(&seen);
        if covered && started.elapsed() > ACK_WAIT + Duration::from_millis(400) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not delivered after the restart: {:?}",
            required.difference(&seen).take(20).collect::<Vec<_>>()
        );
        let mut batch = within("fetch", durable.fetch().max_messages(256).messages())
            .await
            .expect("fetch");
        let mut got = 0;
        while let Some(m) = within("message", batch.next()).await {
            let m = m.expect("message");
            let info = m.info().expect("ack subject");
            after.push((info.stream_sequence, info.delivered));
            m.ack().await.expect("ack");
            got += 1;
        }
        if got == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    check_first_deliveries_in_order(&after, "after the restart");
    for (seq, _) in &after {
        assert!(
            !before.confirmed.contains(seq),
            "message {seq} was double-acked (confirmed) before the kill but redelivered"
        );
        assert!(
            *seq > before.confirmed_floor,
            "message {seq} is below the confirmed ack floor {} but redelivered",
            before.confirmed_floor
        );
    }
    let errors: Vec<String> = server
        .lines()
        .into_iter()
        .filter(|l| l.contains("ERROR"))
        .collect();
    assert!(
        errors.is_empty(),
        "the restarted server logged errors: {errors:#?}"
    );

    Outcome {
        acked_publishes,
        stored: stored_before_retry,
        confirmed_acks: before.confirmed.len(),
        confirmed_floor: before.confirmed_floor,
        observed_floor: before.observed_floor,
        floor_after,
        redelivered_after: after.len(),
    }
}

/// First deliveries (delivery count 1) come in increasing stream order.
fn check_first_deliveries_in_order(deliveries: &[(u64, i64)], when: &str) {
    let firsts: Vec<u64> = deliveries
        .iter()
        .filter(|(_, n)| *n == 1)
        .map(|(s, _)| *s)
        .collect();
    for w in firsts.windows(2) {
        assert!(
            w[0] < w[1],
            "first deliveries out of stream order {when}: {} then {}",
            w[0],
            w[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_acknowledged() {
    let started = Instant::now();
    let mut total_acked = 0;
    for (i, ms) in KILL_AFTER_MS.into_iter().enumerate() {
        let kill_again = i % 2 == 1;
        let o = kill_point(Duration::from_millis(ms), kill_again).await;
        eprintln!(
            "kill after {ms} ms{}: {} acked publishes checked, {} stored; {} double-acks \
             confirmed, confirmed floor {}, observed floor {}, floor after restart {}; \
             {} deliveries after restart",
            if kill_again {
                " (and again after recovery)"
            } else {
                ""
            },
            o.acked_publishes,
            o.stored,
            o.confirmed_acks,
            o.confirmed_floor,
            o.observed_floor,
            o.floor_after,
            o.redelivered_after
        );
        total_acked += o.acked_publishes;
    }
    assert!(total_acked > 0, "no publish was acknowledged before a kill");
    eprintln!(
        "{} kill points, {total_acked} acked publishes checked in {:?}",
        KILL_AFTER_MS.len(),
        started.elapsed()
    );
}

/// A kill right after the stream and consumer creation replies, before
/// any publish (whose fsync would cover them), loses neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_right_after_create_keeps_stream_and_consumer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = Skiff::start(dir.path());
    let js = context(connect(&server.url).await);
    create_stream_and_consumer(&js).await;
    server.kill();
    drop(js);

    let server = Skiff::start(dir.path());
    let js = context(connect(&server.url).await);
    let stream = within("get stream", js.get_stream(STREAM))
        .await
        .unwrap_or_else(|e| panic!("stream lost: {e}; log: {:#?}", server.lines()));
    let _: PullConsumer = within("get consumer", stream.get_consumer(DURABLE))
        .await
        .unwrap_or_else(|e| panic!("consumer lost: {e}; log: {:#?}", server.lines()));
}
