//! One stream: its configuration, its store, the ingest path that turns
//! publishes into stored messages and PubAcks, and its consumers.
//!
//! Ingest: the stream's [`Subscriber`] copies each captured message
//! into a bounded queue (a full queue answers 503 rather than growing); the
//! ingest task stores whatever has queued up as one batch (one store write)
//! on the blocking pool and, with `sync = "always"`, fsyncs once for the
//! whole batch before any of its PubAcks is sent; the fsync of one batch
//! overlaps the write of the next. De-duplication (`Nats-Msg-Id`) and the
//! `Nats-Expected-*` checks happen in store order, so they are exact.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::connection::WakeList;
use crate::protocol::headers::{header_str, HeaderBlock};
use crate::protocol::Message;
use crate::store::{
    MemoryStore, StoreError, StoreLimits, StoreWriter, StoredMessage, StreamState, StreamStore,
};
use crate::subject;
use crate::subscription::{Scope, Subscriber, Subscription};

use super::api::{
    now_nanos, rfc3339, to_json, ApiError, ClusterInfo, ConsumerConfig, Discard, MsgGetRequest,
    PurgeRequest, Retention, Storage, StreamConfig, StreamInfo, StreamStateJson,
    DEFAULT_DUPLICATE_WINDOW,
};
use super::consumer::{self, Consumer};
use super::JetStream;

/// Messages waiting to be stored...
const INGEST_QUEUE: usize = 65_536;
/// ...and their bytes: beyond either, publishers get a 429 instead of the
/// queue growing.
const INGEST_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Most messages stored as one batch...
const BATCH_MAX: usize = 4096;
/// ...and most payload bytes, past which a batch is cut even if more
/// messages wait. A batch is fsynced only once it is written, so the write
/// of a large one would delay its fsync; batches of about this size let
/// the fsync of one run while the next is written (the fsync covers every
/// batch written meanwhile, so cutting does not multiply fsyncs). Small
/// messages still fill a batch by count.
const BATCH_MAX_BYTES: usize = 64 * 1024;

/// What is persisted about the stream itself.
#[derive(Serialize, Deserialize)]
struct Meta {
    config: StreamConfig,
    created: i64,
}

/// Recent `Nats-Msg-Id`s, for de-duplication within `duplicate_window`.
#[derive(Default)]
struct Dedup {
    ids: HashMap<String, u64>,
    order: VecDeque<(i64, String)>,
    last_id: Option<String>,
}

impl Dedup {
    fn prune(&mut self, now: i64, window: i64) {
        while let Some((ts, _)) = self.order.front() {
            if now - ts <= window {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
    }

    fn record(&mut self, id: &str, seq: u64, ts: i64) {
        self.ids.insert(id.to_string(), seq);
        self.order.push_back((ts, id.to_string()));
        self.last_id = Some(id.to_string());
    }
}

pub(crate) struct Stream {
    name: String,
    /// `{"stream":"NAME","seq":`, the start of every PubAck.
    ack_prefix: Vec<u8>,
    js: Weak<JetStream>,
    config: RwLock<StreamConfig>,
    created: i64,
    store: Arc<dyn StreamStore>,
    ingest: mpsc::Sender<Message>,
    /// Bytes of publishes taken in but not yet answered (queued, being
    /// written or fsynced), against [`INGEST_MAX_BYTES`].
    ingest_bytes: AtomicUsize,
    dedup: Mutex<Dedup>,
    consumers: RwLock<HashMap<String, Arc<Consumer>>>,
    subscriptions: Mutex<Vec<Arc<Subscription>>>,
    stopped: CancellationToken,
}

/// Checks a config and fills in nats-server's defaults.
pub(crate) fn normalize(mut config: StreamConfig) -> Result<StreamConfig, ApiError> {
    let name_ok = !config.name.is_empty()
        && !config
            .name
            .chars()
            .any(|c| matches!(c, '.' | '*' | '>' | '/' | '\\') || c.is_whitespace());
    if !name_ok {
        return Err(ApiError::stream_config(
            "stream name is required and can not contain '.', '*', '>'",
        ));
    }
    if config.mirror.is_some() || config.sources.is_some() {
        return Err(ApiError::stream_config(
            "stream mirrors and sources are not supported",
        ));
    }
    if config.num_replicas > 1 {
        return Err(ApiError::new(
            500,
            10074,
            "replicas > 1 not supported in non-clustered mode",
        ));
    }
    config.num_replicas = 1;
    // As nats-server: 0 (what clients send for "not set") is unlimited, -1.
    for limit in [
        &mut config.max_msgs,
        &mut config.max_bytes,
        &mut config.max_msgs_per_subject,
        &mut config.max_msg_size,
        &mut config.max_consumers,
    ] {
        if *limit == 0 {
            *limit = -1;
        }
    }
    if config.subjects.is_empty() {
        config.subjects = vec![config.name.clone()];
    }
    for s in &config.subjects {
        if !subject::is_valid_subject(s.as_bytes()) || s.starts_with("$JS.API") {
            return Err(ApiError::stream_config(format!("invalid subject {s:?}")));
        }
    }
    if config.duplicate_window <= 0 {
        config.duplicate_window = DEFAULT_DUPLICATE_WINDOW;
        if config.max_age > 0 {
            config.duplicate_window = config.duplicate_window.min(config.max_age);
        }
    }
    if config.max_age < 0 || config.duplicate_window < 0 {
        return Err(ApiError::stream_config(
            "negative durations are not allowed",
        ));
    }
    Ok(config)
}

fn limit(v: i64) -> Option<u64> {
    (v > 0).then_some(v as u64)
}

fn store_limits(c: &StreamConfig) -> StoreLimits {
    StoreLimits {
        max_msgs: limit(c.max_msgs),
        max_bytes: limit(c.max_bytes),
        max_age: (c.max_age > 0).then(|| std::time::Duration::from_nanos(c.max_age as u64)),
        max_msgs_per_subject: limit(c.max_msgs_per_subject),
        max_msg_size: limit(c.max_msg_size),
        discard_new: c.discard == Discard::New,
        discard_new_per_subject: c.discard_new_per_subject,
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::MaxMsgSize => ApiError::new(400, 10054, "message size exceeds maximum allowed"),
        other => ApiError::store_failed(other),
    }
}

impl Stream {
    pub(crate) fn create(
        js: &Arc<JetStream>,
        config: StreamConfig,
    ) -> Result<Arc<Stream>, ApiError> {
        let meta = Meta {
            config,
            created: now_nanos(),
        };
        let limits = store_limits(&meta.config);
        let failed = |e: StoreError| ApiError::new(500, 10049, e.to_string());
        // A stream the client was told exists survives a power cut: file
        // streams are created with their config in one synced write.
        let store: Arc<dyn StreamStore> = match meta.config.storage {
            Storage::File => js
                .storage()
                .create_stream(&meta.config.name, limits, &to_json(&meta)?)
                .map_err(failed)?,
            Storage::Memory => Arc::new(MemoryStore::new(limits)),
        };
        Ok(Stream::start(js, meta, store))
    }

    /// Reopens a stream found in the store, with its consumers. `None`: the
    /// stream's creation never finished (a store written before streams
    /// were created with their config in one write, and a crash between
    /// the two): nothing was confirmed of it, and it is dropped.
    pub(crate) fn restore(
        js: &Arc<JetStream>,
        name: &str,
    ) -> Result<Option<Arc<Stream>>, StoreError> {
        let store = js.storage().open_stream(name, StoreLimits::default())?;
        let meta: Meta = match store.load_meta()? {
            Some(m) => serde_json::from_slice(&m)
                .map_err(|e| StoreError::corrupt(format!("stream {name}: config record: {e}")))?,
            None if store.state().last_seq == 0 && store.load_consumers()?.is_empty() => {
                tracing::warn!("stream {name} was never fully created; removing it");
                store.remove()?;
                return Ok(None);
            }
            None => {
                return Err(StoreError::corrupt(format!(
                    "stream {name} holds messages but no config record"
                )))
            }
        };
        store.update_limits(store_limits(&meta.config))?;
        let store: Arc<dyn StreamStore> = store;
        let stream = Stream::start(js, meta, Arc::clone(&store));
        stream.rebuild_dedup();
        for (name, record) in store.load_consumers()? {
            match Consumer::restore(&stream, &record) {
                Ok(c) => {
                    stream.consumers.write().insert(name, c);
                }
                Err(e) => tracing::error!(
                    "consumer {name} of stream {} could not be restored: {e}",
                    stream.name
                ),
            }
        }
        Ok(Some(stream))
    }

    fn start(js: &Arc<JetStream>, meta: Meta, store: Arc<dyn StreamStore>) -> Arc<Stream> {
        let (tx, rx) = mpsc::channel(INGEST_QUEUE);
        let stream = Arc::new(Stream {
            ack_prefix: ack_prefix(&meta.config.name),
            name: meta.config.name.clone(),
            js: Arc::downgrade(js),
            config: RwLock::new(meta.config),
            created: meta.created,
            store,
            ingest: tx,
            ingest_bytes: AtomicUsize::new(0),
            dedup: Mutex::new(Dedup::default()),
            consumers: RwLock::new(HashMap::new()),
            subscriptions: Mutex::new(Vec::new()),
            stopped: CancellationToken::new(),
        });
        stream.subscribe();
        tokio::spawn(ingest_loop(
            Arc::downgrade(&stream),
            rx,
            stream.stopped.clone(),
        ));
        stream
    }

    fn subscribe(self: &Arc<Self>) {
        let Some(server) = self.server_state() else {
            return;
        };
        let handler: Arc<dyn Subscriber> = Arc::new(Ingest(Arc::downgrade(self)));
        let mut subs = self.subscriptions.lock();
        for sub in subs.drain(..) {
            server.end_subscription(&sub);
        }
        for s in &self.config.read().subjects {
            match server.subscribe_internal(s, Scope::Cluster, Arc::clone(&handler)) {
                Ok(sub) => subs.push(sub),
                Err(e) => tracing::error!("stream {}: cannot capture {s}: {e}", self.name),
            }
        }
    }

    fn server_state(&self) -> Option<Arc<crate::server::ServerState>> {
        self.js.upgrade()?.server()
    }

    pub(crate) fn js(&self) -> Option<Arc<JetStream>> {
        self.js.upgrade()
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn config(&self) -> StreamConfig {
        self.config.read().clone()
    }

    pub(crate) fn store(&self) -> &Arc<dyn StreamStore> {
        &self.store
    }

    pub(crate) fn state(&self) -> StreamState {
        self.store.state()
    }

    /// Stops ingest and every consumer, and releases the subscriptions.
    pub(crate) fn stop(&self) {
        self.stopped.cancel();
        if let Some(server) = self.server_state() {
            for sub in self.subscriptions.lock().drain(..) {
                server.end_subscription(&sub);
            }
        }
        for c in self.consumers.write().drain().map(|(_, c)| c) {
            c.stop();
        }
    }

    pub(crate) fn info(&self, subjects_filter: Option<&str>) -> Result<StreamInfo, ApiError> {
        let config = self.config();
        let s = self.store.state();
        let subjects = match subjects_filter {
            Some(f) if !f.is_empty() => Some(
                self.store
                    .subjects(f.as_bytes())
                    .map_err(ApiError::store_failed)?
                    .into_iter()
                    .map(|(subject, n)| (String::from_utf8_lossy(&subject).into_owned(), n))
                    .collect(),
            ),
            _ => None,
        };
        let leader = self
            .server_state()
            .map(|srv| srv.info.server_name.clone())
            .unwrap_or_default();
        Ok(StreamInfo {
            config,
            created: rfc3339(self.created),
            state: StreamStateJson {
                messages: s.messages,
                bytes: s.bytes,
                first_seq: if s.last_seq == 0 { 0 } else { s.first_seq },
                first_ts: rfc3339(s.first_ts),
                last_seq: s.last_seq,
                last_ts: rfc3339(s.last_ts),
                num_subjects: s.num_subjects,
                num_deleted: s.num_deleted,
                consumer_count: self.consumers.read().len(),
                subjects,
            },
            cluster: ClusterInfo { leader },
            ts: rfc3339(now_nanos()),
        })
    }

    /// Applies a changed config (STREAM.UPDATE or the config file).
    pub(crate) fn update(self: &Arc<Self>, new: StreamConfig) -> Result<(), ApiError> {
        let new = normalize(new)?;
        self.check_update(&new)?;
        let old = self.config();
        if new == old {
            return Ok(());
        }
        self.store
            .update_limits(store_limits(&new))
            .map_err(|e| ApiError::new(500, 10069, e.to_string()))?;
        let subjects_changed = new.subjects != old.subjects;
        *self.config.write() = new.clone();
        let meta = Meta {
            config: new,
            created: self.created,
        };
        self.durable(self.store.save_meta(&to_json(&meta)?))
            .map_err(|e| ApiError::new(500, 10069, e.to_string()))?;
        if subjects_changed {
            self.subscribe();
        }
        Ok(())
    }

    pub(crate) fn purge(&self, r: &PurgeRequest) -> Result<u64, ApiError> {
        if self.config.read().deny_purge {
            return Err(ApiError::new(500, 10110, "stream purge not permitted"));
        }
        if r.seq.is_some() && r.keep.is_some() {
            return Err(ApiError::bad_request());
        }
        let purged = self
            .durable(
                self.store
                    .purge(r.filter.as_deref().map(str::as_bytes), r.seq, r.keep),
            )
            .map_err(|e| ApiError::new(500, 10110, e.to_string()))?;
        Ok(purged)
    }

    pub(crate) fn delete_message(&self, seq: u64) -> Result<(), ApiError> {
        if self.config.read().deny_delete {
            return Err(ApiError::new(500, 10057, "message delete not permitted"));
        }
        match self.durable(self.store.delete(seq)) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ApiError::new(
                400,
                10043,
                format!("sequence {seq} not found"),
            )),
            Err(e) => Err(ApiError::new(500, 10057, e.to_string())),
        }
    }

    /// An API change's outcome, once fsynced: a successful answer means the
    /// change is durable, whatever `sync` says of publishes.
    fn durable<T>(&self, done: Result<T, StoreError>) -> Result<T, StoreError> {
        done.and_then(|outcome| self.store.sync().map(|()| outcome))
    }

    fn find(&self, r: &MsgGetRequest) -> Result<Option<StoredMessage>, StoreError> {
        match (&r.last_by_subj, &r.next_by_subj, r.seq) {
            (Some(subject), _, _) => self.store.last_for_subject(subject.as_bytes()),
            (None, Some(subject), seq) => self.store.next_matching(
                seq.unwrap_or(0),
                &[Bytes::copy_from_slice(subject.as_bytes())],
            ),
            (None, None, Some(seq)) => self.store.get(seq),
            (None, None, None) => Ok(None),
        }
    }

    pub(crate) fn get_message(&self, r: &MsgGetRequest) -> Result<serde_json::Value, ApiError> {
        if r.seq.is_none() && r.last_by_subj.is_none() && r.next_by_subj.is_none() {
            return Err(ApiError::bad_request());
        }
        let m = self
            .find(r)
            .map_err(ApiError::store_failed)?
            .ok_or_else(ApiError::no_message_found)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut message = serde_json::json!({
            "subject": String::from_utf8_lossy(&m.subject),
            "seq": m.seq,
            "data": b64.encode(m.data()),
            "time": rfc3339(m.timestamp),
        });
        if m.header_len > 0 {
            message["hdrs"] = b64.encode(m.headers()).into();
        }
        Ok(serde_json::json!({ "message": message }))
    }

    /// DIRECT.GET: answers with the stored message itself, its stream
    /// coordinates in headers, or a 404 status.
    pub(crate) fn direct_get(&self, last_by: Option<&str>, payload: &[u8], reply: Option<&[u8]>) {
        let (Some(server), Some(reply)) = (self.server_state(), reply) else {
            return;
        };
        if !self.config.read().allow_direct {
            consumer::send_status(&server, reply, 503, "", &[]);
            return;
        }
        let request = match last_by {
            Some(subject) => Ok(MsgGetRequest {
                last_by_subj: Some(subject.to_string()),
                ..Default::default()
            }),
            None => serde_json::from_slice::<MsgGetRequest>(payload),
        };
        let found = match request {
            Ok(r) => self.find(&r).ok().flatten(),
            Err(_) => {
                consumer::send_status(&server, reply, 408, "Bad Request", &[]);
                return;
            }
        };
        let Some(m) = found else {
            consumer::send_status(&server, reply, 404, "Message Not Found", &[]);
            return;
        };
        let mut block = HeaderBlock::new(None);
        for (name, value) in consumer::original_headers(&m) {
            block = block.add(name, value);
        }
        let headers = block
            .add("Nats-Stream", &self.name)
            .add("Nats-Subject", &String::from_utf8_lossy(&m.subject))
            .add("Nats-Sequence", &m.seq.to_string())
            .add("Nats-Time-Stamp", &rfc3339(m.timestamp))
            .finish();
        let mut payload = headers.to_vec();
        payload.extend_from_slice(m.data());
        // Sent on the reply subject itself, as nats-server does: clients
        // match responses to requests by the subject (async-nats's request
        // multiplexer drops anything else); the stored subject is in
        // `Nats-Subject`.
        let msg = Message::new(reply, None, Some(headers.len()), &payload);
        server.send_internal(reply, &msg);
    }

    pub(crate) fn expire(&self, now: i64) {
        if self.config.read().max_age > 0 {
            if let Err(e) = self.store.expire(now) {
                tracing::warn!("stream {}: expiring messages failed: {e}", self.name);
            }
        }
    }

    pub(crate) fn consumer(&self, name: &str) -> Option<Arc<Consumer>> {
        self.consumers.read().get(name).cloned()
    }

    pub(crate) fn consumer_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.consumers.read().keys().cloned().collect();
        names.sort();
        names
    }

    /// What [`Stream::update`] refuses of `new` (normalized), checked
    /// without changing anything.
    pub(crate) fn check_update(&self, new: &StreamConfig) -> Result<(), ApiError> {
        let old = self.config();
        if new.storage != old.storage {
            return Err(ApiError::stream_config(
                "stream configuration update can not change storage type",
            ));
        }
        if (new.retention == Retention::WorkQueue) != (old.retention == Retention::WorkQueue) {
            return Err(ApiError::stream_config(
                "stream configuration update can not change retention policy to/from workqueue",
            ));
        }
        Ok(())
    }

    /// Checks a consumer declared for this stream, whose config is about
    /// to be `stream`, as creating or updating it would, without changing
    /// anything.
    pub(crate) fn check_consumer(
        &self,
        config: ConsumerConfig,
        stream: &StreamConfig,
    ) -> Result<(), ApiError> {
        let consumers = self.consumers.read();
        let config = consumer::normalize(config, stream, &consumers)?;
        match config.consumer_name().and_then(|n| consumers.get(n)) {
            Some(existing) => existing.check_update(&config),
            None => Ok(()),
        }
    }

    pub(crate) fn create_consumer(
        self: &Arc<Self>,
        config: ConsumerConfig,
        action: &str,
    ) -> Result<Arc<Consumer>, ApiError> {
        let config = consumer::normalize(config, &self.config(), &self.consumers.read())?;
        let name = config.consumer_name().unwrap_or_default().to_string();
        let existing = self.consumer(&name);
        match (existing, action) {
            (Some(c), _) if c.config() == config => Ok(c),
            (Some(_), "create") => Err(ApiError::new(400, 10148, "consumer already exists")),
            (Some(c), _) => {
                c.update(config)?;
                Ok(c)
            }
            (None, "update") => Err(ApiError::new(400, 10149, "consumer does not exist")),
            (None, _) => {
                let max = self.config.read().max_consumers;
                if max > 0 && self.consumers.read().len() as i64 >= max {
                    return Err(ApiError::new(400, 10026, "maximum consumers limit reached"));
                }
                let c = Consumer::create(self, config)?;
                self.consumers.write().insert(name, Arc::clone(&c));
                Ok(c)
            }
        }
    }

    pub(crate) fn delete_consumer(&self, name: &str) -> Result<(), ApiError> {
        let c = self
            .consumers
            .write()
            .remove(name)
            .ok_or_else(ApiError::consumer_not_found)?;
        c.stop();
        c.notify_deleted();
        self.durable(self.store.delete_consumer(name))
            .map_err(ApiError::store_failed)?;
        Ok(())
    }

    /// A consumer acknowledged `seq`: under workqueue retention the message
    /// is done; under interest retention once every consumer that wants it
    /// has acknowledged it.
    pub(crate) fn acknowledged(&self, seq: u64) {
        let retention = self.config.read().retention;
        let done = match retention {
            Retention::Limits => false,
            Retention::WorkQueue => true,
            // Only here is the message read back: to know whose filter it is.
            Retention::Interest => match self.store.get(seq) {
                Ok(Some(m)) => self.interest_done(seq, &m.subject),
                _ => false,
            },
        };
        if done {
            self.remove_done(seq);
        }
    }

    /// Under interest retention: whether no consumer still waits for `seq`
    /// (on `subject`), which is at once the case when none wants it.
    fn interest_done(&self, seq: u64, subject: &[u8]) -> bool {
        self.consumers
            .read()
            .values()
            .all(|c| !c.wants(subject) || c.has_acked(seq))
    }

    fn remove_done(&self, seq: u64) {
        if let Err(e) = self.store.delete(seq) {
            tracing::warn!(
                "stream {}: removing {seq}, which is done, failed: {e}",
                self.name
            );
        }
    }

    fn notify_consumers(&self) {
        for c in self.consumers.read().values() {
            c.wake();
        }
    }

    /// Rebuilds the de-duplication window from stored `Nats-Msg-Id`s, so
    /// that a retry after a restart is still recognised.
    fn rebuild_dedup(&self) {
        let window = self.config.read().duplicate_window;
        let now = now_nanos();
        let Ok(mut seq) = self.store.seq_for_time(now - window) else {
            return;
        };
        let mut dedup = self.dedup.lock();
        *dedup = Dedup::default();
        while let Ok(Some(m)) = self.store.next_matching(seq, &[]) {
            if let Some(id) = header_str(m.headers(), "Nats-Msg-Id") {
                dedup.record(id, m.seq, m.timestamp);
            }
            seq = m.seq + 1;
        }
    }

    /// Makes written batches durable (with `sync = "always"`): one fsync
    /// covers them all. On failure their publishes are answered with the
    /// error instead. Runs on the blocking pool.
    fn sync_written(&self, group: &mut [Written]) {
        let stored_any = group.iter().any(Written::stored_any);
        let Some(js) = self.js().filter(|js| stored_any && js.sync_always()) else {
            return;
        };
        let started = std::time::Instant::now();
        let synced = self.store.sync();
        // A memory stream's sync is a no-op: not an fsync to time.
        if self.is_file() {
            js.latency.fsync.observe(started.elapsed());
        }
        if let Err(e) = synced {
            tracing::error!(
                "stream {}: fsync failed, publishes are not acknowledged: {e}",
                self.name
            );
            fail_all(group, &ApiError::store_failed(&e));
        }
    }

    /// Wakes the consumers for durable batches and answers each publish, in
    /// order. Runs on the blocking pool, while the next batches are fsynced.
    fn answer_written(&self, group: &[Written]) {
        if group.iter().any(Written::stored_any) {
            self.notify_consumers();
        }
        let js = self.js();
        for written in group {
            // Before the answers go out: a publisher that has its PubAck
            // finds the budget already given back.
            self.ingest_bytes
                .fetch_sub(written.bytes, Ordering::Relaxed);
            let acked = self.answer(&written.batch, &written.results);
            if let Some(js) = js.as_ref().filter(|_| acked && written.stored_any()) {
                js.latency.publish_ack.observe(written.received.elapsed());
            }
        }
    }

    fn is_file(&self) -> bool {
        self.config.read().storage == Storage::File
    }

    /// Sends each publish of `batch` that has a reply subject its PubAck or
    /// error. The replies share one buffer and their writers are woken once.
    /// Returns whether any reply was sent.
    fn answer(&self, batch: &[Message], results: &[Result<PubAck, ApiError>]) -> bool {
        let Some(server) = self.server_state() else {
            return false;
        };
        let mut buf = BytesMut::new();
        let mut replies = Vec::with_capacity(batch.len());
        for (m, result) in batch.iter().zip(results) {
            if let Some(reply) = m.reply() {
                let start = buf.len();
                buf.extend_from_slice(reply);
                let subject = start..buf.len();
                encode_reply(&self.ack_prefix, &mut buf, result);
                replies.push((subject.clone(), subject.end..buf.len()));
            }
        }
        let answered = !replies.is_empty();
        let buf = buf.freeze();
        let mut wakes = WakeList::default();
        for (subject, body) in replies {
            let reply = Message::from_parts(buf.clone(), subject.clone(), None, None, body);
            server.route_to(&buf[subject], &reply, None, &mut wakes);
        }
        wakes.wake_all();
        answered
    }

    /// Checks and stages every message of `batch` in one store writer, then
    /// commits them together: one write for the batch, not one per message.
    /// Runs on the blocking pool.
    fn write_batch(
        &self,
        batch: Vec<Message>,
        bytes: usize,
        received: std::time::Instant,
    ) -> Written {
        let results = self.store_all(&batch);
        if self.config.read().retention == Retention::Interest {
            // A message no consumer wants is done as soon as it is stored:
            // nats-server does not keep it either (its sequence is used up).
            for (m, result) in batch.iter().zip(&results) {
                if let Ok(ack) = result {
                    if !ack.duplicate && self.interest_done(ack.seq, m.subject()) {
                        self.remove_done(ack.seq);
                    }
                }
            }
        }
        Written {
            batch,
            bytes,
            results,
            received,
        }
    }

    fn store_all(&self, batch: &[Message]) -> Vec<Result<PubAck, ApiError>> {
        let now = now_nanos();
        let mut results = Vec::with_capacity(batch.len());
        // Lock order: config, dedup, then the store (as `rebuild_dedup`).
        let config = self.config.read();
        let mut dedup = self.dedup.lock();
        dedup.prune(now, config.duplicate_window);
        // Before the writer: the room counts this stream's state too.
        let mut room = self.js().and_then(|js| js.storage_room(config.storage));
        let committed = self.store.writer().and_then(|mut writer| {
            for m in batch {
                let size = crate::store::message_size(m.subject().len(), m.payload().len());
                let result = match room {
                    Some(left) if size > left => {
                        Err(ApiError::insufficient_resources(config.storage))
                    }
                    _ => self.store_one(&mut *writer, &config, &mut dedup, m, now),
                };
                if let (Some(left), Ok(_)) = (&mut room, &result) {
                    *left = left.saturating_sub(size);
                }
                results.push(result);
            }
            writer.commit()
        });
        drop((config, dedup));
        if let Err(e) = committed {
            tracing::error!(
                "stream {}: storing a batch failed, its publishes are not acknowledged: {e}",
                self.name
            );
            let stored = self.store.state().last_seq;
            results.resize_with(batch.len(), || Err(ApiError::store_failed(&e)));
            for r in &mut results {
                if matches!(r, Ok(ack) if ack.seq > stored) {
                    *r = Err(ApiError::store_failed(&e));
                }
            }
            // Ids recorded for messages that were not stored would make
            // their retries look like duplicates.
            self.rebuild_dedup();
        }
        results
    }

    /// Checks one message's headers against the stream and stages it.
    fn store_one(
        &self,
        writer: &mut dyn StoreWriter,
        config: &StreamConfig,
        dedup: &mut Dedup,
        m: &Message,
        now: i64,
    ) -> Result<PubAck, ApiError> {
        if config.sealed {
            return Err(ApiError::new(
                400,
                10109,
                "invalid operation on sealed stream",
            ));
        }
        let headers = m.headers();
        if let Some(expected) = header_str(headers, "Nats-Expected-Stream") {
            if expected != self.name {
                return Err(ApiError::new(400, 10060, "expected stream does not match"));
            }
        }
        let msg_id = header_str(headers, "Nats-Msg-Id").filter(|id| !id.is_empty());
        if let Some(seq) = msg_id.and_then(|id| dedup.ids.get(id)) {
            return Ok(PubAck {
                seq: *seq,
                duplicate: true,
            });
        }
        if let Some(expected) = header_str(headers, "Nats-Expected-Last-Sequence") {
            let last = writer.last_seq();
            if expected.parse::<u64>().ok() != Some(last) {
                return Err(ApiError::new(
                    400,
                    10071,
                    format!("wrong last sequence: {last}"),
                ));
            }
        }
        if let Some(expected) = header_str(headers, "Nats-Expected-Last-Msg-Id") {
            let last = dedup.last_id.as_deref().unwrap_or("");
            if expected != last {
                return Err(ApiError::new(
                    400,
                    10070,
                    format!("wrong last msg ID: {last}"),
                ));
            }
        }
        if let Some(expected) = header_str(headers, "Nats-Expected-Last-Subject-Sequence") {
            let last = writer.last_seq_for_subject(m.subject());
            if expected.parse::<u64>().ok() != Some(last) {
                return Err(ApiError::new(
                    400,
                    10071,
                    format!("wrong last sequence: {last}"),
                ));
            }
        }
        let seq = writer
            .append(
                m.subject_bytes(),
                m.header_len().unwrap_or(0),
                m.payload_bytes(),
                now,
            )
            .map_err(store_error)?;
        if let Some(id) = msg_id {
            dedup.record(id, seq, now);
        }
        Ok(PubAck {
            seq,
            duplicate: false,
        })
    }
}

/// The reply to a stored publish (the stream's name is added when it is
/// encoded, see [`Stream::encode_reply`]).
#[derive(Clone, Copy, Debug)]
struct PubAck {
    seq: u64,
    duplicate: bool,
}

/// Appends a publish's answer as nats-server writes it:
/// `{"stream":"NAME","seq":N}` (with `"duplicate":true` for a duplicate),
/// or `{"error":{...}}`. `ack_prefix` is the stream's [`ack_prefix`].
fn encode_reply(ack_prefix: &[u8], out: &mut BytesMut, result: &Result<PubAck, ApiError>) {
    match result {
        Ok(ack) => {
            out.extend_from_slice(ack_prefix);
            out.extend_from_slice(itoa::Buffer::new().format(ack.seq).as_bytes());
            if ack.duplicate {
                out.extend_from_slice(b",\"duplicate\":true");
            }
            out.extend_from_slice(b"}");
        }
        Err(error) => {
            let body = serde_json::json!({ "error": error });
            let _ = serde_json::to_writer(out.writer(), &body);
        }
    }
}

/// The start of a PubAck's JSON, with the stream's name escaped once.
fn ack_prefix(name: &str) -> Vec<u8> {
    let mut prefix = b"{\"stream\":".to_vec();
    let _ = serde_json::to_writer(&mut prefix, name);
    prefix.extend_from_slice(b",\"seq\":");
    prefix
}

/// The stream's subscription on its subjects: queues a copy of each
/// message for the ingest task.
struct Ingest(Weak<Stream>);

impl Subscriber for Ingest {
    fn deliver(&self, _sid: &[u8], msg: &Message, _wakes: &mut WakeList) -> bool {
        let Some(stream) = self.0.upgrade() else {
            return false;
        };
        // A copy: the original is a slice of a client's read buffer, which
        // must not be pinned by a queue.
        let owned = Message::new(msg.subject(), msg.reply(), msg.header_len(), msg.payload());
        let size = owned.payload().len();
        let budget =
            stream.ingest_bytes.fetch_add(size, Ordering::Relaxed) + size <= INGEST_MAX_BYTES;
        if !budget || stream.ingest.try_send(owned).is_err() {
            stream.ingest_bytes.fetch_sub(size, Ordering::Relaxed);
            if let (Some(server), Some(reply)) = (stream.server_state(), msg.reply()) {
                let mut body = BytesMut::new();
                let busy = Err(ApiError::new(429, 10167, "too many requests"));
                encode_reply(&stream.ack_prefix, &mut body, &busy);
                server.send_internal(reply, &Message::new(reply, None, None, &body));
            }
        }
        true
    }
}

/// A batch written to the store, with each publish's outcome so far.
struct Written {
    batch: Vec<Message>,
    /// The batch's payload bytes: its share of [`INGEST_MAX_BYTES`], given
    /// back when it is answered.
    bytes: usize,
    results: Vec<Result<PubAck, ApiError>>,
    /// When the ingest task saw the batch's oldest message (see
    /// [`ingest_loop`]), for the publish-to-ack latency.
    received: std::time::Instant,
}

impl Written {
    /// Whether the batch stored anything new (not only duplicates/refusals).
    fn stored_any(&self) -> bool {
        self.results
            .iter()
            .any(|r| matches!(r, Ok(a) if !a.duplicate))
    }
}

/// Turns every publish of `group` into `error`: none of them is durable.
fn fail_all(group: &mut [Written], error: &ApiError) {
    for r in group.iter_mut().flat_map(|w| w.results.iter_mut()) {
        *r = Err(error.clone());
    }
}

/// Written batches waiting for their fsync and PubAcks. The ingest task
/// keeps writing while earlier batches are fsynced, up to this many ahead
/// (their bytes still count against [`INGEST_MAX_BYTES`] until answered).
const WRITTEN_MAX: usize = 8;

/// Takes what has queued up (at most [`BATCH_MAX`] messages or about
/// [`BATCH_MAX_BYTES`]) as one batch, writes
/// it, and passes it on to [`answer_loop`].
///
/// Publish-to-ack latency is timed from one clock read per batch, not per
/// message: a batch whose first message had to be waited for starts when
/// it arrived (the wake-up); one whose first message was already queued
/// (it came while the previous batch was being written) starts when the
/// previous batch was taken. That start is never later than the message's
/// arrival, so the figure errs on the slow side by at most one batch write,
/// except after a batch cut at its limits, whose leftovers may be older
/// than that.
async fn ingest_loop(
    stream: Weak<Stream>,
    mut rx: mpsc::Receiver<Message>,
    stopped: CancellationToken,
) {
    let (written_tx, written_rx) = mpsc::channel(WRITTEN_MAX);
    tokio::spawn(answer_loop(stream.clone(), written_rx));
    let mut taken = std::time::Instant::now();
    loop {
        if stopped.is_cancelled() {
            return;
        }
        let (first, received) = match rx.try_recv() {
            Ok(m) => (m, taken),
            Err(mpsc::error::TryRecvError::Disconnected) => return,
            Err(mpsc::error::TryRecvError::Empty) => {
                let m = tokio::select! {
                    _ = stopped.cancelled() => return,
                    m = rx.recv() => match m { Some(m) => m, None => return },
                };
                (m, std::time::Instant::now())
            }
        };
        let mut bytes = first.payload().len();
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX && bytes < BATCH_MAX_BYTES {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.payload().len();
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        taken = std::time::Instant::now();
        let Some(s) = stream.upgrade() else {
            return;
        };
        let Ok(written) =
            tokio::task::spawn_blocking(move || s.write_batch(batch, bytes, received)).await
        else {
            tracing::error!("stream ingest batch panicked, its publishes are not acknowledged");
            // It will never be answered: give its share of the budget back
            // here, or the stream would refuse more publishes for good.
            if let Some(s) = stream.upgrade() {
                s.ingest_bytes.fetch_sub(bytes, Ordering::Relaxed);
            }
            continue;
        };
        if written_tx.send(written).await.is_err() {
            return;
        }
    }
}

/// Makes written batches durable and answers them, in order, as a
/// three-stage pipeline with [`ingest_loop`]: while one group of batches is
/// fsynced (one fsync for all the batches written meanwhile), the group
/// before it is answered and the ingest task writes the next. Ends when the
/// ingest task has gone and every batch it wrote is answered.
async fn answer_loop(stream: Weak<Stream>, mut rx: mpsc::Receiver<Written>) {
    let mut synced: Option<Vec<Written>> = None;
    loop {
        // Wait for new batches only when nothing synced waits for answers.
        let mut group = Vec::new();
        if synced.is_none() {
            match rx.recv().await {
                Some(written) => group.push(written),
                None => return,
            }
        }
        while let Ok(written) = rx.try_recv() {
            group.push(written);
        }
        let Some(s) = stream.upgrade() else {
            return;
        };
        let answering = synced.take().map(|done| {
            let s = s.clone();
            tokio::task::spawn_blocking(move || s.answer_written(&done))
        });
        let syncing = (!group.is_empty()).then(|| {
            tokio::task::spawn_blocking(move || {
                // The group is answered whatever happens: a panic here
                // would otherwise lose its PubAcks and its ingest budget.
                let synced = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    s.sync_written(&mut group)
                }));
                if synced.is_err() {
                    tracing::error!("stream fsync panicked, publishes are not acknowledged");
                    fail_all(&mut group, &ApiError::store_failed("fsync failed"));
                }
                group
            })
        });
        if let Some(answering) = answering {
            if let Err(e) = answering.await {
                tracing::error!("stream PubAck batch panicked: {e}");
            }
        }
        if let Some(syncing) = syncing {
            match syncing.await {
                Ok(group) => synced = Some(group),
                Err(e) => tracing::error!("stream fsync task failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_json(name: &str, result: Result<PubAck, ApiError>) -> serde_json::Value {
        let mut out = BytesMut::new();
        encode_reply(&ack_prefix(name), &mut out, &result);
        serde_json::from_slice(&out).unwrap_or(serde_json::Value::Null)
    }

    #[test]
    fn pub_ack_is_the_json_clients_parse() {
        let ack = PubAck {
            seq: 42,
            duplicate: false,
        };
        let json = reply_json(r#"od"d\ers"#, Ok(ack));
        assert_eq!(
            json,
            serde_json::json!({"stream": r#"od"d\ers"#, "seq": 42})
        );
        let dup = PubAck {
            seq: 7,
            duplicate: true,
        };
        let json = reply_json("ORDERS", Ok(dup));
        assert_eq!(
            json,
            serde_json::json!({"stream": "ORDERS", "seq": 7, "duplicate": true})
        );
    }

    #[test]
    fn a_refused_publish_gets_an_api_error() {
        let json = reply_json(
            "ORDERS",
            Err(ApiError::new(429, 10167, "too many requests")),
        );
        assert_eq!(json["error"]["code"], 429);
        assert_eq!(json["error"]["err_code"], 10167);
    }

    /// A publish that would take the stream beyond its ingest budget is
    /// refused with 429 / 10167 and not stored; once the bytes in flight
    /// are answered the budget is back and the same publish is acked.
    #[tokio::test]
    async fn a_publish_beyond_the_ingest_budget_gets_429() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = crate::Config::core("127.0.0.1:0");
        config.jetstream.enabled = true;
        config.jetstream.store_dir = dir.path().to_path_buf();
        config.jetstream.streams = vec![serde_json::from_value(serde_json::json!({
            "name": "BUDGET", "subjects": ["budget.>"]
        }))
        .expect("stream config")];
        let server = crate::Server::start(config).await.expect("server starts");
        let stream = server
            .jetstream()
            .and_then(|js| js.stream("BUDGET").ok())
            .expect("the declared stream");
        let client = async_nats::connect(server.client_url())
            .await
            .expect("connect");
        let publish = || client.request("budget.a", "hi".into());

        // As if 64 MiB of publishes were still waiting for their PubAcks.
        stream
            .ingest_bytes
            .store(INGEST_MAX_BYTES - 1, Ordering::Relaxed);
        let reply = publish().await.expect("an answer");
        let json: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON");
        assert_eq!(json["error"]["code"], 429, "{json}");
        assert_eq!(json["error"]["err_code"], 10167, "{json}");
        assert_eq!(stream.state().messages, 0);
        // The refused publish gave its bytes back.
        assert_eq!(
            stream.ingest_bytes.load(Ordering::Relaxed),
            INGEST_MAX_BYTES - 1
        );

        stream.ingest_bytes.store(0, Ordering::Relaxed);
        let reply = publish().await.expect("an answer");
        let json: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON");
        assert_eq!(json, serde_json::json!({"stream": "BUDGET", "seq": 1}));
        // Answered, so its bytes no longer count.
        assert_eq!(stream.ingest_bytes.load(Ordering::Relaxed), 0);
        server.shutdown().await;
    }
}
