//! One consumer: which stored messages it has delivered, which wait for an
//! ack, what to redeliver and when, and the pull requests it is serving.
//!
//! All of a consumer's state sits behind one mutex and is changed only by
//! [`Consumer::pump`], which runs on the blocking pool from the consumer's
//! own task whenever something happened (a new message, a pull request, an
//! ack) or a deadline (redelivery, request expiry, heartbeat) passed.
//! Handlers on clients' tasks never take that mutex (the pump holds it
//! while it reads the store): they queue acks, pull requests and
//! flow-control answers in the [`Inbox`], which is bounded, and wake the
//! task.
//!
//! Invariants:
//! - A message is in `pending` from its delivery until it is acked, termed,
//!   or has been delivered `max_deliver` times; `ack_floor` never moves
//!   backwards; `next_seq` only grows.
//! - The persisted record (config, delivered, ack floor, pending and when
//!   each pending message is due) is written after every pump that changed
//!   it, outside the state lock, one writer at a time (`saved`, taken
//!   before the state lock), so an older record never overwrites a newer.
//! - An `AckSync` is answered only once its ack is saved (and, with
//!   `sync = "always"`, fsynced). A failed save leaves the state unsaved,
//!   retried every [`SAVE_RETRY`]; its `AckSync`s get no answer, so the
//!   client's request fails instead of confirming what is not stored.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::protocol::headers::{fields, HeaderBlock};
use crate::protocol::Message;
use crate::server::ServerState;
use crate::store::{StoreError, StoredMessage, StreamStore};
use crate::subject;

use super::api::{
    now_nanos, parse_rfc3339, rfc3339, to_json, AckPolicy, ApiError, ClusterInfo, ConsumerConfig,
    ConsumerInfo, DeliverPolicy, NextRequest, Retention, SequenceInfo, StreamConfig,
    DEFAULT_ACK_WAIT, DEFAULT_MAX_ACK_PENDING, DEFAULT_MAX_WAITING,
};
use super::stream::Stream;

/// How long an ephemeral consumer lives without activity, by default.
const DEFAULT_INACTIVE_THRESHOLD: i64 = 5_000_000_000;
/// A push consumer without interest retries after this long.
const PUSH_RETRY: Duration = Duration::from_millis(250);
/// With flow control, a push consumer asks the client to confirm it keeps
/// up after this many bytes, and waits for the answer.
const FLOW_CONTROL_WINDOW: usize = 256 * 1024;
/// Acks, pull requests and flow-control answers waiting for the pump. When
/// full, more are dropped (logged): a lost ack means a redelivery, a lost
/// `AckSync` or pull request a client timeout, never unbounded memory.
const INBOX_LIMIT: usize = 65_536;
/// After a failed save, the pump tries again this often.
const SAVE_RETRY: Duration = Duration::from_secs(1);

/// Sends a status message (headers only) to `target`.
pub(crate) fn send_status(
    server: &ServerState,
    target: &[u8],
    code: u16,
    description: &str,
    headers: &[(&str, String)],
) -> bool {
    let mut block = HeaderBlock::new(Some((code, description)));
    for (name, value) in headers {
        block = block.add(name, value);
    }
    let block = block.finish();
    server.send_internal(
        target,
        &Message::new(target, None, Some(block.len()), &block),
    )
}

/// The header fields a stored message was published with.
pub(crate) fn original_headers(m: &StoredMessage) -> Vec<(&str, &str)> {
    fields(m.headers())
        .filter_map(|(n, v)| Some((std::str::from_utf8(n).ok()?, std::str::from_utf8(v).ok()?)))
        .collect()
}

/// Checks a consumer config against its stream and fills in defaults.
pub(crate) fn normalize(
    mut c: ConsumerConfig,
    stream: &StreamConfig,
    existing: &HashMap<String, Arc<Consumer>>,
) -> Result<ConsumerConfig, ApiError> {
    if let (Some(d), Some(n)) = (&c.durable_name, &c.name) {
        if d != n {
            return Err(ApiError::new(
                400,
                10132,
                "Consumer Durable and Name have to be equal if both are provided",
            ));
        }
    }
    let name = match c.consumer_name() {
        Some(n) => n.to_string(),
        None => {
            let generated = random_name();
            c.name = Some(generated.clone());
            generated
        }
    };
    if name
        .chars()
        .any(|ch| matches!(ch, '.' | '*' | '>' | '/' | '\\') || ch.is_whitespace())
    {
        return Err(ApiError::new(
            400,
            10103,
            "durable name can not contain '.', '*', '>'",
        ));
    }
    let filters = c.filters();
    for f in &filters {
        let inside = subject::is_valid_subject(f.as_bytes())
            && stream
                .subjects
                .iter()
                .any(|s| subject::patterns_overlap(s.as_bytes(), f.as_bytes()));
        if !inside {
            return Err(ApiError::new(
                400,
                10093,
                "consumer filter subject is not a valid subset of the interest subjects",
            ));
        }
    }
    if c.is_pull() {
        c.deliver_subject = None;
        if c.idle_heartbeat > 0 {
            return Err(ApiError::new(
                400,
                10088,
                "consumer idle heartbeat requires a push based consumer",
            ));
        }
        if c.flow_control {
            return Err(ApiError::new(
                400,
                10089,
                "consumer flow control requires a push based consumer",
            ));
        }
        if c.max_waiting == 0 {
            c.max_waiting = DEFAULT_MAX_WAITING;
        }
    } else {
        let deliver = c.deliver_subject.as_deref().unwrap_or("");
        if !subject::is_valid_literal_subject(deliver.as_bytes()) {
            return Err(ApiError::new(
                400,
                10079,
                "consumer deliver subject has wildcards",
            ));
        }
        if c.max_waiting != 0 {
            return Err(ApiError::new(
                400,
                10080,
                "consumer in push mode can not set max waiting",
            ));
        }
    }
    if c.ack_wait <= 0 {
        c.ack_wait = DEFAULT_ACK_WAIT;
    }
    if c.max_deliver == 0 {
        c.max_deliver = -1;
    }
    if !c.backoff.is_empty() && c.max_deliver > 0 && c.max_deliver as usize <= c.backoff.len() {
        return Err(ApiError::new(
            400,
            10116,
            "max deliver is required to be > length of backoff values",
        ));
    }
    if c.max_ack_pending == 0 && c.ack_policy != AckPolicy::None {
        c.max_ack_pending = DEFAULT_MAX_ACK_PENDING;
    }
    if c.durable_name.is_none() && c.inactive_threshold == 0 {
        c.inactive_threshold = DEFAULT_INACTIVE_THRESHOLD;
    }
    match c.deliver_policy {
        DeliverPolicy::ByStartSequence if c.opt_start_seq.unwrap_or(0) == 0 => {
            return Err(ApiError::consumer_config("consumer delivery policy is deliver by start sequence, but optional start sequence is not set"));
        }
        DeliverPolicy::ByStartTime
            if c.opt_start_time
                .as_deref()
                .and_then(parse_rfc3339)
                .is_none() =>
        {
            return Err(ApiError::consumer_config("consumer delivery policy is deliver by start time, but optional start time is not set"));
        }
        _ => {}
    }
    if stream.retention == Retention::WorkQueue {
        if c.ack_policy != AckPolicy::Explicit {
            return Err(ApiError::new(
                400,
                10098,
                "workqueue stream requires explicit ack",
            ));
        }
        if c.deliver_policy != DeliverPolicy::All {
            return Err(ApiError::new(
                400,
                10101,
                "consumer must be deliver all on workqueue stream",
            ));
        }
        for (other_name, other) in existing {
            if *other_name == name {
                continue;
            }
            let theirs = other.config().filters();
            if filters.is_empty() || theirs.is_empty() {
                return Err(ApiError::new(
                    400,
                    10099,
                    "multiple non-filtered consumers not allowed on workqueue stream",
                ));
            }
            let overlap = filters.iter().any(|a| {
                theirs
                    .iter()
                    .any(|b| subject::patterns_overlap(a.as_bytes(), b.as_bytes()))
            });
            if overlap {
                return Err(ApiError::new(
                    400,
                    10100,
                    "filtered consumer not unique on workqueue stream",
                ));
            }
        }
    }
    Ok(c)
}

fn random_name() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..22)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// What survives a restart.
#[derive(Serialize, Deserialize)]
struct Record {
    config: ConsumerConfig,
    created: i64,
    delivered: SequenceInfo,
    ack_floor: SequenceInfo,
    next_seq: u64,
    /// `(stream_seq, consumer_seq, deliveries)` of unacknowledged messages.
    pending: Vec<(u64, u64, u64)>,
    /// `(stream_seq, unix_nanos)`: when each of those is due for
    /// redelivery (its delivery time plus its ack wait, as `+WPI` and
    /// `-NAK` with a delay moved it). A restart keeps the deadline, as
    /// nats-server's stored delivery times do, instead of granting a
    /// whole new ack wait. A field of its own, and optional, so that
    /// records written before it still load and older versions still read
    /// new ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    redeliver_at: Vec<(u64, i64)>,
    catch_up: Vec<u64>,
}

struct Pending {
    cseq: u64,
    deliveries: u64,
    deadline: Instant,
}

struct PullRequest {
    reply: Bytes,
    batch_left: usize,
    bytes_left: Option<usize>,
    expires_at: Option<Instant>,
    no_wait: bool,
    heartbeat: Option<Duration>,
    next_heartbeat: Option<Instant>,
    delivered: usize,
}

enum AckKind {
    Ack,
    Nak(Option<Duration>),
    Progress,
    Next(NextRequest),
    Term,
}

struct AckEvent {
    kind: AckKind,
    seq: u64,
    reply: Option<Bytes>,
}

/// Whether a consumer's record, as it starts, is already in the store
/// (restored) or not yet (created).
enum Saved {
    Yes,
    No,
}

/// The state's version when a consumer starts.
const INITIAL_VERSION: u64 = 1;

/// What clients' tasks hand to the pump; see the module doc.
enum Incoming {
    Ack(AckEvent),
    Pull(PullRequest),
    FlowControlAnswer(Bytes),
}

/// A bounded queue of [`Incoming`] work; see [`INBOX_LIMIT`].
#[derive(Default)]
struct Inbox {
    items: VecDeque<Incoming>,
    dropped: u64,
}

struct State {
    /// Bumped by every change the record holds; see `Consumer::saved`.
    version: u64,
    delivered: SequenceInfo,
    ack_floor: SequenceInfo,
    next_seq: u64,
    catch_up: VecDeque<u64>,
    pending: BTreeMap<u64, Pending>,
    redeliver: BTreeSet<u64>,
    waiting: VecDeque<PullRequest>,
    last_active: Instant,
    last_delivery: Instant,
    push_retry_at: Option<Instant>,
    /// Flow control (push): the request the client has not answered yet;
    /// delivery stalls until it does.
    flow_control: Option<Bytes>,
    /// Bytes delivered since the last flow-control request.
    flow_bytes: usize,
    flow_requests: u64,
}

pub(crate) struct Consumer {
    name: String,
    stream: Weak<Stream>,
    stream_name: String,
    config: RwLock<ConsumerConfig>,
    created: i64,
    inbox: Mutex<Inbox>,
    /// The version of the state last saved, and the lock that makes saves
    /// one at a time (taken before `state`).
    saved: Mutex<u64>,
    state: Mutex<State>,
    wake: Notify,
    stopped: CancellationToken,
}

impl Consumer {
    pub(crate) fn create(
        stream: &Arc<Stream>,
        config: ConsumerConfig,
    ) -> Result<Arc<Consumer>, ApiError> {
        let store = stream.store();
        let filters = filter_bytes(&config);
        let st = store.state();
        let mut catch_up = VecDeque::new();
        let start = |r: Result<u64, StoreError>| r.map_err(ApiError::store_failed);
        let next_seq = match config.deliver_policy {
            DeliverPolicy::All => st.first_seq.max(1),
            DeliverPolicy::New => st.last_seq + 1,
            DeliverPolicy::ByStartSequence => config.opt_start_seq.unwrap_or(1),
            DeliverPolicy::ByStartTime => start(
                store.seq_for_time(
                    config
                        .opt_start_time
                        .as_deref()
                        .and_then(parse_rfc3339)
                        .unwrap_or(0),
                ),
            )?,
            DeliverPolicy::Last => {
                let last = if filters.is_empty() {
                    (st.messages > 0).then_some(st.last_seq)
                } else {
                    let mut best = None;
                    for f in &filters {
                        if let Some(m) =
                            store.last_for_subject(f).map_err(ApiError::store_failed)?
                        {
                            best = best.max(Some(m.seq));
                        }
                    }
                    best
                };
                last.unwrap_or(st.last_seq + 1)
            }
            DeliverPolicy::LastPerSubject => {
                catch_up = store
                    .last_per_subject_seqs(&filters)
                    .map_err(ApiError::store_failed)?
                    .into();
                st.last_seq + 1
            }
        };
        let ack_floor_seq = next_seq.saturating_sub(1);
        let record = Record {
            config,
            created: now_nanos(),
            delivered: SequenceInfo {
                consumer_seq: 0,
                stream_seq: ack_floor_seq,
            },
            ack_floor: SequenceInfo {
                consumer_seq: 0,
                stream_seq: ack_floor_seq,
            },
            next_seq,
            pending: Vec::new(),
            redeliver_at: Vec::new(),
            catch_up: catch_up.into(),
        };
        let consumer = Consumer::start(stream, record, Saved::No);
        // A consumer the client was told exists survives a power cut.
        consumer.save(true)?;
        Ok(consumer)
    }

    pub(crate) fn restore(
        stream: &Arc<Stream>,
        record: &[u8],
    ) -> Result<Arc<Consumer>, StoreError> {
        let record: Record = serde_json::from_slice(record)
            .map_err(|e| StoreError::corrupt(format!("consumer record: {e}")))?;
        Ok(Consumer::start(stream, record, Saved::Yes))
    }

    fn start(stream: &Arc<Stream>, r: Record, saved: Saved) -> Arc<Consumer> {
        let (now, now_unix) = (Instant::now(), now_nanos());
        let ack_wait = Duration::from_nanos(r.config.ack_wait.max(0) as u64);
        let redeliver_at: HashMap<u64, i64> = r.redeliver_at.into_iter().collect();
        let consumer = Arc::new(Consumer {
            name: r.config.consumer_name().unwrap_or_default().to_string(),
            stream: Arc::downgrade(stream),
            stream_name: stream.name().to_string(),
            created: r.created,
            inbox: Mutex::new(Inbox::default()),
            saved: Mutex::new(match saved {
                Saved::Yes => INITIAL_VERSION,
                Saved::No => INITIAL_VERSION - 1,
            }),
            state: Mutex::new(State {
                version: INITIAL_VERSION,
                delivered: r.delivered,
                ack_floor: r.ack_floor,
                next_seq: r.next_seq,
                catch_up: r.catch_up.into(),
                // After a restart, unacknowledged messages are redelivered
                // when they were due (at once if that passed while the
                // server was down); records without deadlines wait one
                // ack wait from now.
                pending: r
                    .pending
                    .into_iter()
                    .map(|(seq, cseq, deliveries)| {
                        let deadline = match redeliver_at.get(&seq) {
                            Some(&at) => from_unix(at, now, now_unix),
                            None => now + ack_wait,
                        };
                        (
                            seq,
                            Pending {
                                cseq,
                                deliveries,
                                deadline,
                            },
                        )
                    })
                    .collect(),
                redeliver: BTreeSet::new(),
                waiting: VecDeque::new(),
                last_active: now,
                last_delivery: now,
                push_retry_at: None,
                flow_control: None,
                flow_bytes: 0,
                flow_requests: 0,
            }),
            config: RwLock::new(r.config),
            wake: Notify::new(),
            stopped: CancellationToken::new(),
        });
        tokio::spawn(run(Arc::downgrade(&consumer), consumer.stopped.clone()));
        consumer
    }

    pub(crate) fn config(&self) -> ConsumerConfig {
        self.config.read().clone()
    }

    pub(crate) fn update(&self, new: ConsumerConfig) -> Result<(), ApiError> {
        self.check_update(&new)?;
        *self.config.write() = new;
        self.state.lock().version += 1;
        self.save(true)?;
        self.wake();
        Ok(())
    }

    /// What [`Consumer::update`] refuses of `new`, checked without changing
    /// anything.
    pub(crate) fn check_update(&self, new: &ConsumerConfig) -> Result<(), ApiError> {
        let old = self.config();
        let fixed = |c: &ConsumerConfig| {
            (
                c.deliver_policy,
                c.ack_policy,
                c.opt_start_seq,
                c.opt_start_time.clone(),
                c.deliver_subject.is_some(),
            )
        };
        if fixed(&old) != fixed(new) {
            return Err(ApiError::consumer_config(
                "consumer configuration can not be updated",
            ));
        }
        Ok(())
    }

    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) fn stop(&self) {
        self.stopped.cancel();
    }

    /// Tells waiting pull requests the consumer is gone.
    pub(crate) fn notify_deleted(&self) {
        let Some(server) = self.server() else {
            return;
        };
        let queued: Vec<PullRequest> = (self.inbox.lock().items.drain(..))
            .filter_map(|item| match item {
                Incoming::Pull(r) => Some(r),
                _ => None,
            })
            .collect();
        let waiting: Vec<PullRequest> = self.state.lock().waiting.drain(..).collect();
        for r in waiting.iter().chain(&queued) {
            send_status(&server, &r.reply, 409, "Consumer Deleted", &[]);
        }
    }

    fn server(&self) -> Option<Arc<ServerState>> {
        self.stream.upgrade()?.js()?.server()
    }

    /// Whether this consumer's filter takes `subject`.
    pub(crate) fn wants(&self, subject_name: &[u8]) -> bool {
        let filters = self.config.read().filters();
        filters.is_empty()
            || filters
                .iter()
                .any(|f| subject::matches_pattern(f.as_bytes(), subject_name))
    }

    /// Whether `seq` has been delivered and acknowledged (or is below the
    /// consumer's start).
    pub(crate) fn has_acked(&self, seq: u64) -> bool {
        let st = self.state.lock();
        seq <= st.ack_floor.stream_seq || (seq < st.next_seq && !st.pending.contains_key(&seq))
    }

    /// An ack arrived on `$JS.ACK.<stream>.<consumer>.<n>.<sseq>.<cseq>.<ts>.<pending>`.
    pub(crate) fn ack(&self, ack_subject: &str, reply: Option<&[u8]>, body: &[u8]) {
        let Some(seq) = ack_subject
            .split('.')
            .nth(5)
            .and_then(|t| t.parse::<u64>().ok())
        else {
            return;
        };
        let text = std::str::from_utf8(body).unwrap_or("").trim();
        let (verb, arg) = text
            .split_once(' ')
            .map_or((text, ""), |(v, a)| (v, a.trim()));
        let kind = match verb {
            "" | "+ACK" => AckKind::Ack,
            "-NAK" => AckKind::Nak(parse_delay(arg)),
            "+WPI" => AckKind::Progress,
            "+NXT" => AckKind::Next(parse_next(arg.as_bytes())),
            "+TERM" => AckKind::Term,
            _ => return,
        };
        self.queue(Incoming::Ack(AckEvent {
            kind,
            seq,
            reply: reply.map(Bytes::copy_from_slice),
        }));
    }

    /// Hands work to the pump (see [`Inbox`]) and wakes it.
    fn queue(&self, item: Incoming) {
        let mut inbox = self.inbox.lock();
        if inbox.items.len() >= INBOX_LIMIT {
            inbox.dropped += 1;
            if inbox.dropped.is_power_of_two() {
                tracing::warn!(
                    "consumer {} of {}: {} acks or pull requests dropped, the consumer is \
                     behind",
                    self.name,
                    self.stream_name,
                    inbox.dropped
                );
            }
            return;
        }
        inbox.items.push_back(item);
        drop(inbox);
        self.wake();
    }

    /// A pull request (CONSUMER.MSG.NEXT) with its reply inbox.
    pub(crate) fn pull_request(&self, reply: &[u8], body: &[u8]) {
        let Some(server) = self.server() else {
            return;
        };
        let config = self.config.read();
        if !config.is_pull() {
            send_status(&server, reply, 409, "Consumer is push based", &[]);
            return;
        }
        let request = parse_next(body);
        let refuse = |description: String| {
            send_status(&server, reply, 409, &description, &[]);
        };
        if config.max_batch > 0 && request.batch as i64 > config.max_batch {
            return refuse(format!("Exceeded MaxRequestBatch of {}", config.max_batch));
        }
        if config.max_expires > 0 && request.expires > config.max_expires {
            return refuse(format!(
                "Exceeded MaxRequestExpires of {:?}",
                Duration::from_nanos(config.max_expires as u64)
            ));
        }
        if config.max_bytes > 0 && request.max_bytes as i64 > config.max_bytes {
            return refuse(format!(
                "Exceeded MaxRequestMaxBytes of {}",
                config.max_bytes
            ));
        }
        drop(config);
        let now = Instant::now();
        let heartbeat = (request.idle_heartbeat > 0)
            .then(|| Duration::from_nanos(request.idle_heartbeat as u64));
        self.queue(Incoming::Pull(PullRequest {
            reply: Bytes::copy_from_slice(reply),
            batch_left: request.batch.max(1),
            bytes_left: (request.max_bytes > 0).then_some(request.max_bytes),
            expires_at: (request.expires > 0)
                .then(|| now + Duration::from_nanos(request.expires as u64)),
            no_wait: request.no_wait,
            heartbeat,
            next_heartbeat: heartbeat.map(|h| now + h),
            delivered: 0,
        }));
    }

    pub(crate) fn info(&self) -> ConsumerInfo {
        let config = self.config();
        // Copied out, so that the count below reads the store unlocked.
        let (
            next_seq,
            catch_up,
            delivered,
            ack_floor,
            num_ack_pending,
            num_redelivered,
            num_waiting,
        ) = {
            let st = self.state.lock();
            (
                st.next_seq,
                st.catch_up.len() as u64,
                st.delivered,
                st.ack_floor,
                st.pending.len(),
                st.pending.values().filter(|p| p.deliveries > 1).count(),
                st.waiting.len(),
            )
        };
        let num_pending = self
            .stream
            .upgrade()
            .and_then(|s| s.store().num_pending(next_seq, &filter_bytes(&config)).ok())
            .unwrap_or(0)
            + catch_up;
        let leader = self
            .server()
            .map(|s| s.info.server_name.clone())
            .unwrap_or_default();
        ConsumerInfo {
            stream_name: self.stream_name.clone(),
            name: self.name.clone(),
            created: rfc3339(self.created),
            delivered,
            ack_floor,
            num_ack_pending,
            num_redelivered,
            num_waiting,
            num_pending,
            cluster: ClusterInfo { leader },
            push_bound: false,
            ts: rfc3339(now_nanos()),
            config,
        }
    }

    /// Saves the state if it changed since the last save, then fsyncs when
    /// `sync`. One save at a time, outside the state lock: see the module
    /// doc. On failure the state stays unsaved, for the next pump to retry.
    fn save(&self, sync: bool) -> Result<(), ApiError> {
        let Some(stream) = self.stream.upgrade() else {
            return Ok(());
        };
        let mut saved = self.saved.lock();
        let snapshot = {
            let st = self.state.lock();
            (st.version != *saved).then(|| (st.version, self.record(&st)))
        };
        let store = stream.store();
        if let Some((_, record)) = &snapshot {
            store
                .save_consumer(&self.name, &to_json(record)?)
                .map_err(ApiError::store_failed)?;
        }
        if sync {
            store.sync().map_err(ApiError::store_failed)?;
        }
        if let Some((version, _)) = snapshot {
            *saved = version;
        }
        Ok(())
    }

    fn record(&self, st: &State) -> Record {
        let (now, now_unix) = (Instant::now(), now_nanos());
        Record {
            config: self.config(),
            created: self.created,
            delivered: st.delivered,
            ack_floor: st.ack_floor,
            next_seq: st.next_seq,
            pending: st
                .pending
                .iter()
                .map(|(s, p)| (*s, p.cseq, p.deliveries))
                .collect(),
            redeliver_at: st
                .pending
                .iter()
                .map(|(s, p)| (*s, to_unix(p.deadline, now, now_unix)))
                .collect(),
            catch_up: st.catch_up.iter().copied().collect(),
        }
    }

    /// Moves what clients queued into the state: acks to apply, pull
    /// requests to serve (or refuse, beyond `max_waiting`), flow-control
    /// answers.
    fn take_inbox(
        &self,
        st: &mut State,
        config: &ConsumerConfig,
        server: &ServerState,
        now: Instant,
    ) -> Vec<AckEvent> {
        let items = std::mem::take(&mut self.inbox.lock().items);
        let mut acks = Vec::new();
        for item in items {
            match item {
                Incoming::Ack(ack) => acks.push(ack),
                Incoming::Pull(request) => {
                    if st.waiting.len() >= config.max_waiting.max(1) as usize {
                        send_status(server, &request.reply, 409, "Exceeded MaxWaiting", &[]);
                    } else {
                        st.waiting.push_back(request);
                        st.last_active = now;
                    }
                }
                Incoming::FlowControlAnswer(subject) => {
                    if st.flow_control.as_deref() == Some(&subject[..]) {
                        st.flow_control = None;
                        st.flow_bytes = 0;
                    }
                }
            }
        }
        acks
    }

    /// Does all pending work; returns when it next needs to run.
    fn pump(&self) -> Option<Instant> {
        let stream = self.stream.upgrade()?;
        let js = stream.js()?;
        let server = js.server()?;
        let config = self.config();
        let store = Arc::clone(stream.store());
        let now = Instant::now();
        let mut st = self.state.lock();
        let mut done = Vec::new();
        let mut confirm = Vec::new();
        let acks = self.take_inbox(&mut st, &config, &server, now);
        self.apply_acks(&mut st, &config, acks, now, &mut done, &mut confirm);
        let expired: Vec<u64> = st
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(s, _)| *s)
            .collect();
        st.redeliver.extend(expired);
        self.expire_requests(&mut st, &server, now);
        self.deliver(&mut st, &config, store.as_ref(), &server, now);
        self.finish_no_wait(&mut st, &server);
        self.heartbeats(&mut st, &config, &server, now);
        if let (Some(deliver), true) = (&config.deliver_subject, config.inactive_threshold > 0) {
            // A push consumer is active while its deliver subject has
            // interest (nats-server's rule), delivered to or not.
            if !server.sublist.matches(deliver.as_bytes()).is_empty() {
                st.last_active = now;
            }
        }
        // Durables too, when they set a threshold (nats-server 2.9+).
        let inactive = config.inactive_threshold > 0
            && st.waiting.is_empty()
            && now.duration_since(st.last_active)
                > Duration::from_nanos(config.inactive_threshold as u64);
        let mut next = next_deadline(&st, &config);
        drop(st);
        // Retention deletes first, so that the sync below covers them too.
        for seq in done {
            stream.acknowledged(seq);
        }
        let sync = !confirm.is_empty() && js.sync_always();
        match self.save(sync) {
            Ok(()) => {
                for reply in confirm {
                    server.send_internal(&reply, &Message::new(&reply, None, None, b""));
                }
            }
            Err(e) => {
                tracing::error!(
                    "consumer {} of {}: saving state failed ({} double acks left unanswered): {}",
                    self.name,
                    self.stream_name,
                    confirm.len(),
                    e.description
                );
                let retry = now + SAVE_RETRY;
                next = Some(next.map_or(retry, |n| n.min(retry)));
            }
        }
        if inactive {
            tracing::debug!(
                "ephemeral consumer {} of {} is inactive, deleting",
                self.name,
                self.stream_name
            );
            js.forget_consumer(&self.stream_name, &self.name);
            return None;
        }
        next
    }

    fn apply_acks(
        &self,
        st: &mut State,
        config: &ConsumerConfig,
        acks: Vec<AckEvent>,
        now: Instant,
        done: &mut Vec<u64>,
        confirm: &mut Vec<Bytes>,
    ) {
        let ack_wait = Duration::from_nanos(config.ack_wait.max(0) as u64);
        for ack in acks {
            st.last_active = now;
            match ack.kind {
                AckKind::Ack | AckKind::Term | AckKind::Next(_) => {
                    let acked: Vec<u64> = match config.ack_policy {
                        AckPolicy::All => st.pending.range(..=ack.seq).map(|(s, _)| *s).collect(),
                        _ => st
                            .pending
                            .contains_key(&ack.seq)
                            .then_some(ack.seq)
                            .into_iter()
                            .collect(),
                    };
                    for seq in acked {
                        st.pending.remove(&seq);
                        st.redeliver.remove(&seq);
                        done.push(seq);
                    }
                    if let (AckKind::Next(request), Some(reply)) = (&ack.kind, &ack.reply) {
                        st.waiting.push_back(PullRequest {
                            reply: reply.clone(),
                            batch_left: request.batch.max(1),
                            bytes_left: None,
                            expires_at: (request.expires > 0)
                                .then(|| now + Duration::from_nanos(request.expires as u64)),
                            no_wait: request.no_wait,
                            heartbeat: None,
                            next_heartbeat: None,
                            delivered: 0,
                        });
                    }
                }
                AckKind::Nak(delay) => {
                    if let Some(p) = st.pending.get_mut(&ack.seq) {
                        match delay {
                            Some(d) => p.deadline = now + d,
                            None => {
                                st.redeliver.insert(ack.seq);
                            }
                        }
                    }
                }
                AckKind::Progress => {
                    if let Some(p) = st.pending.get_mut(&ack.seq) {
                        p.deadline = now + ack_wait;
                    }
                }
            }
            if let (Some(reply), false) = (ack.reply, matches!(ack.kind, AckKind::Next(_))) {
                confirm.push(reply);
            }
            st.version += 1;
        }
        // The floor: everything below the oldest unacknowledged message.
        let floor = match st.pending.iter().next() {
            None => st.delivered,
            Some((seq, p)) => SequenceInfo {
                consumer_seq: p.cseq - 1,
                stream_seq: seq - 1,
            },
        };
        if floor.stream_seq > st.ack_floor.stream_seq {
            st.ack_floor = floor;
        }
    }

    fn expire_requests(&self, st: &mut State, server: &ServerState, now: Instant) {
        st.waiting.retain(|r| {
            if r.expires_at.is_some_and(|at| at <= now) {
                timeout_status(server, r);
                return false;
            }
            true
        });
    }

    /// After delivering what there is, `no_wait` requests end: 404 when they
    /// got nothing, 408 with what is left when they got some.
    fn finish_no_wait(&self, st: &mut State, server: &ServerState) {
        st.waiting.retain(|r| {
            if !r.no_wait {
                return true;
            }
            if r.delivered == 0 {
                send_status(server, &r.reply, 404, "No Messages", &[]);
            } else {
                timeout_status(server, r);
            }
            false
        });
    }

    fn heartbeats(
        &self,
        st: &mut State,
        config: &ConsumerConfig,
        server: &ServerState,
        now: Instant,
    ) {
        for r in st.waiting.iter_mut() {
            if let (Some(at), Some(every)) = (r.next_heartbeat, r.heartbeat) {
                if at <= now {
                    send_status(server, &r.reply, 100, "Idle Heartbeat", &[]);
                    r.next_heartbeat = Some(now + every);
                }
            }
        }
        if let (Some(deliver), true) = (&config.deliver_subject, config.idle_heartbeat > 0) {
            let every = Duration::from_nanos(config.idle_heartbeat as u64);
            if let (Some(reply), true) = (
                &st.flow_control,
                now.duration_since(st.last_delivery) >= every,
            ) {
                // Stalled: repeat the request, in case the client missed it.
                send_flow_control(server, deliver.as_bytes(), reply);
                st.last_delivery = now;
            }
            if now.duration_since(st.last_delivery) >= every {
                let headers = [
                    ("Nats-Last-Consumer", st.delivered.consumer_seq.to_string()),
                    ("Nats-Last-Stream", st.delivered.stream_seq.to_string()),
                ];
                if send_status(server, deliver.as_bytes(), 100, "Idle Heartbeat", &headers) {
                    st.last_active = now;
                }
                st.last_delivery = now;
            }
        }
    }

    /// Delivers as much as the consumer's limits and requests allow.
    fn deliver(
        &self,
        st: &mut State,
        config: &ConsumerConfig,
        store: &dyn StreamStore,
        server: &ServerState,
        now: Instant,
    ) {
        let filters = filter_bytes(config);
        let push_target = config
            .deliver_subject
            .as_ref()
            .map(|d| Bytes::copy_from_slice(d.as_bytes()));
        if push_target.is_some() {
            if st.push_retry_at.is_some_and(|t| t > now) {
                return;
            }
            // Due: a failed delivery below sets it again. Left in the past
            // it would make the consumer's task spin.
            st.push_retry_at = None;
        }
        let mut num_pending =
            store.num_pending(st.next_seq, &filters).unwrap_or(0) + st.catch_up.len() as u64;
        loop {
            if push_target.is_some() && config.flow_control {
                if st.flow_control.is_some() {
                    return;
                }
                if st.flow_bytes >= FLOW_CONTROL_WINDOW {
                    self.request_flow_control(st, server, config);
                    return;
                }
            }
            if config.ack_policy != AckPolicy::None
                && config.max_ack_pending > 0
                && st.pending.len() as i64 >= config.max_ack_pending
                && st.redeliver.is_empty()
            {
                return;
            }
            let target = match (&push_target, st.waiting.front()) {
                (Some(t), _) => t.clone(),
                (None, Some(r)) => r.reply.clone(),
                (None, None) => return,
            };
            let Some((source, m)) = self.next_message(st, store, &filters) else {
                return;
            };
            let deliveries = match source {
                Source::Redelivery => st.pending.get(&m.seq).map_or(1, |p| p.deliveries + 1),
                _ => 1,
            };
            if config.max_deliver > 0 && deliveries as i64 > config.max_deliver {
                st.pending.remove(&m.seq);
                st.version += 1;
                continue;
            }
            let size = m.payload.len() + m.subject.len();
            if let (None, Some(r)) = (&push_target, st.waiting.front()) {
                if r.bytes_left.is_some_and(|left| size > left) {
                    send_status(server, &r.reply, 409, "Message Size Exceeds MaxBytes", &[]);
                    st.waiting.pop_front();
                    self.put_back(st, source, m.seq);
                    continue;
                }
            }
            if source != Source::Redelivery {
                num_pending = num_pending.saturating_sub(1);
            }
            let cseq = st.delivered.consumer_seq + 1;
            let reply = format!(
                "$JS.ACK.{}.{}.{}.{}.{}.{}.{}",
                self.stream_name, self.name, deliveries, m.seq, cseq, m.timestamp, num_pending
            );
            let msg = delivery(&m, reply.as_bytes(), config.headers_only);
            if !server.send_internal(&target, &msg) {
                self.put_back(st, source, m.seq);
                if push_target.is_some() {
                    st.push_retry_at = Some(now + PUSH_RETRY);
                    return;
                }
                // The requester is gone.
                st.waiting.pop_front();
                continue;
            }
            st.push_retry_at = None;
            st.last_active = now;
            st.last_delivery = now;
            if push_target.is_some() && config.flow_control {
                st.flow_bytes += size;
            }
            st.delivered.consumer_seq = cseq;
            st.delivered.stream_seq = st.delivered.stream_seq.max(m.seq);
            if config.ack_policy == AckPolicy::None {
                st.pending.remove(&m.seq);
                st.ack_floor = st.delivered;
            } else {
                let wait = ack_wait_for(config, deliveries);
                st.pending.insert(
                    m.seq,
                    Pending {
                        cseq,
                        deliveries,
                        deadline: now + wait,
                    },
                );
            }
            st.version += 1;
            if push_target.is_none() {
                if let Some(r) = st.waiting.front_mut() {
                    r.batch_left -= 1;
                    r.delivered += 1;
                    r.bytes_left = r.bytes_left.map(|left| left - size);
                    if r.batch_left == 0 {
                        st.waiting.pop_front();
                    }
                }
            }
        }
    }

    /// Asks the push client to confirm it keeps up; delivery waits for the
    /// answer on the request's reply subject.
    fn request_flow_control(&self, st: &mut State, server: &ServerState, config: &ConsumerConfig) {
        let Some(deliver) = &config.deliver_subject else {
            return;
        };
        st.flow_requests += 1;
        let reply = Bytes::from(format!(
            "$JS.FC.{}.{}.{}",
            self.stream_name, self.name, st.flow_requests
        ));
        send_flow_control(server, deliver.as_bytes(), &reply);
        st.flow_control = Some(reply);
    }

    /// The client answered a flow-control request (`$JS.FC....`).
    pub(crate) fn flow_control_answered(&self, subject: &[u8]) {
        self.queue(Incoming::FlowControlAnswer(Bytes::copy_from_slice(subject)));
    }

    /// The next message to deliver: redeliveries first, then the
    /// last-per-subject catch-up list, then new messages.
    fn next_message(
        &self,
        st: &mut State,
        store: &dyn StreamStore,
        filters: &[Bytes],
    ) -> Option<(Source, StoredMessage)> {
        while let Some(seq) = st.redeliver.pop_first() {
            match store.get(seq) {
                Ok(Some(m)) => return Some((Source::Redelivery, m)),
                // Deleted meanwhile: nothing left to redeliver.
                _ => {
                    st.pending.remove(&seq);
                }
            }
        }
        while let Some(seq) = st.catch_up.pop_front() {
            if let Ok(Some(m)) = store.get(seq) {
                return Some((Source::CatchUp, m));
            }
        }
        match store.next_matching(st.next_seq, filters) {
            Ok(Some(m)) => {
                st.next_seq = m.seq + 1;
                Some((Source::New, m))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!("consumer {}: reading the stream failed: {e}", self.name);
                None
            }
        }
    }

    fn put_back(&self, st: &mut State, source: Source, seq: u64) {
        match source {
            Source::Redelivery => {
                st.redeliver.insert(seq);
            }
            Source::CatchUp => st.catch_up.push_front(seq),
            Source::New => st.next_seq = st.next_seq.min(seq),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Redelivery,
    CatchUp,
    New,
}

/// `NATS/1.0 100 FlowControl Request`, answered by publishing to `reply`.
fn send_flow_control(server: &ServerState, target: &[u8], reply: &[u8]) {
    let block = HeaderBlock::new(Some((100, "FlowControl Request"))).finish();
    let msg = Message::new(target, Some(reply), Some(block.len()), &block);
    server.send_internal(target, &msg);
}

fn timeout_status(server: &ServerState, r: &PullRequest) {
    let headers = [
        ("Nats-Pending-Messages", r.batch_left.to_string()),
        ("Nats-Pending-Bytes", r.bytes_left.unwrap_or(0).to_string()),
    ];
    send_status(server, &r.reply, 408, "Request Timeout", &headers);
}

/// The message as a consumer delivers it: its own subject, headers and
/// data, with the ack subject as reply.
fn delivery(m: &StoredMessage, reply: &[u8], headers_only: bool) -> Message {
    if !headers_only {
        let header_len = (m.header_len > 0).then_some(m.header_len);
        return Message::new(&m.subject, Some(reply), header_len, &m.payload);
    }
    let mut block = HeaderBlock::new(None);
    for (name, value) in original_headers(m) {
        block = block.add(name, value);
    }
    let block = block
        .add("Nats-Msg-Size", &m.data().len().to_string())
        .finish();
    Message::new(&m.subject, Some(reply), Some(block.len()), &block)
}

fn ack_wait_for(config: &ConsumerConfig, deliveries: u64) -> Duration {
    let nanos = if config.backoff.is_empty() {
        config.ack_wait
    } else {
        let i = (deliveries as usize)
            .saturating_sub(1)
            .min(config.backoff.len() - 1);
        config.backoff[i]
    };
    Duration::from_nanos(nanos.max(0) as u64)
}

/// `at` as Unix nanos, `now` being `now_unix`: deadlines are kept on the
/// monotonic clock, which does not survive a restart.
fn to_unix(at: Instant, now: Instant, now_unix: i64) -> i64 {
    let nanos = |d: Duration| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX);
    match at.checked_duration_since(now) {
        Some(ahead) => now_unix.saturating_add(nanos(ahead)),
        None => now_unix.saturating_sub(nanos(now - at)),
    }
}

/// Unix nanos back on the monotonic clock; a time already past is now.
fn from_unix(at_unix: i64, now: Instant, now_unix: i64) -> Instant {
    now + Duration::from_nanos(at_unix.saturating_sub(now_unix).max(0) as u64)
}

fn next_deadline(st: &State, config: &ConsumerConfig) -> Option<Instant> {
    let mut next: Option<Instant> = None;
    let mut consider = |t: Option<Instant>| {
        if let Some(t) = t {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
    };
    // Only deadlines still ahead: an expired message waits in `redeliver`
    // (for a pull request or interest), and its past deadline would make
    // the consumer's task spin until then.
    consider(
        st.pending
            .iter()
            .filter(|(seq, _)| !st.redeliver.contains(seq))
            .map(|(_, p)| p.deadline)
            .min(),
    );
    for r in &st.waiting {
        consider(r.expires_at);
        consider(r.next_heartbeat);
    }
    consider(st.push_retry_at);
    if config.idle_heartbeat > 0 && config.deliver_subject.is_some() {
        consider(Some(
            st.last_delivery + Duration::from_nanos(config.idle_heartbeat as u64),
        ));
    }
    // While pull requests wait the consumer is active; their expiry wakes
    // the task anyway.
    if config.inactive_threshold > 0 && st.waiting.is_empty() {
        consider(Some(
            st.last_active
                + Duration::from_nanos(config.inactive_threshold as u64)
                + Duration::from_millis(10),
        ));
    }
    next
}

fn filter_bytes(config: &ConsumerConfig) -> Vec<Bytes> {
    config.filters().into_iter().map(Bytes::from).collect()
}

/// `-NAK {"delay": nanos}` or `-NAK` alone.
fn parse_delay(arg: &str) -> Option<Duration> {
    #[derive(Deserialize)]
    struct Delay {
        delay: i64,
    }
    serde_json::from_str::<Delay>(arg)
        .ok()
        .filter(|d| d.delay > 0)
        .map(|d| Duration::from_nanos(d.delay as u64))
}

/// A pull request body: JSON, a bare batch size, or nothing (one message).
fn parse_next(body: &[u8]) -> NextRequest {
    let text = std::str::from_utf8(body).unwrap_or("").trim();
    if text.is_empty() {
        return NextRequest {
            batch: 1,
            ..Default::default()
        };
    }
    if let Ok(batch) = text.parse::<usize>() {
        return NextRequest {
            batch,
            ..Default::default()
        };
    }
    serde_json::from_str(text).unwrap_or(NextRequest {
        batch: 1,
        ..Default::default()
    })
}

async fn run(consumer: Weak<Consumer>, stopped: CancellationToken) {
    loop {
        let Some(c) = consumer.upgrade() else {
            return;
        };
        let worker = Arc::clone(&c);
        let next = tokio::task::spawn_blocking(move || worker.pump())
            .await
            .ok()
            .flatten();
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stopped.cancelled() => return,
            _ = c.wake.notified() => {}
            _ = sleep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_written_without_redelivery_deadlines_still_load() {
        let old = r#"{"config":{"durable_name":"d","ack_policy":"explicit"},"created":1,
            "delivered":{"consumer_seq":2,"stream_seq":2},
            "ack_floor":{"consumer_seq":1,"stream_seq":1},
            "next_seq":3,"pending":[[2,2,1]],"catch_up":[]}"#;
        let record: Record = serde_json::from_str(old).unwrap();
        assert_eq!(record.pending, vec![(2, 2, 1)]);
        assert!(record.redeliver_at.is_empty());
    }

    #[test]
    fn deadlines_keep_their_distance_through_unix_time() {
        let (now, now_unix) = (Instant::now(), 1_700_000_000_000_000_000);
        let due = to_unix(now + Duration::from_millis(1500), now, now_unix);
        assert_eq!(due, now_unix + 1_500_000_000);
        // Back one second later: due in half a second.
        let later = now + Duration::from_secs(1);
        let later_unix = now_unix + 1_000_000_000;
        assert_eq!(
            from_unix(due, later, later_unix),
            later + Duration::from_millis(500)
        );
        // Already past: due now, not in the past of the new clock.
        let past = to_unix(now, later, later_unix);
        assert_eq!(past, now_unix);
        assert_eq!(from_unix(past, later, later_unix), later);
    }
}
