//! Durable streams, speaking the JetStream API subset that official clients
//! use: streams capture subjects into a [`crate::store`], consumers read them
//! in order, acknowledge, get redeliveries and replay.
//!
//! How it hooks into the broker: a stream is one more kind of subscriber
//! (an [`Subscriber`] on its subjects), so a publish reaches it
//! through the same routing as any client; replies (PubAcks, API answers,
//! consumer deliveries) go back out through [`ServerState::send_internal`].
//!
//! Threads: handlers run on the publisher's task and only queue work.
//! API requests are answered one at a time on a thread of their own (they
//! may touch the disk); each stream stores batches on the blocking pool
//! (one fsync per batch: group commit); each consumer delivers from a task
//! of its own. Pull requests and acks go straight to their consumer.
//!
//! Invariant: a PubAck is sent only after the message is stored and, with
//! `sync = "always"`, fsynced.

pub mod api;
mod consumer;
#[cfg(test)]
mod fault_tests;
// One file per concern, as in nats-server: the stream itself lives in
// `stream::stream`.
#[allow(clippy::module_inception)]
mod stream;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

use crate::config::{JetStreamConfig, SyncPolicy};
use crate::connection::WakeList;
use crate::metrics::Histogram;
use crate::protocol::Message;
use crate::server::ServerState;
use crate::store::{FileStorage, StoreError};
use crate::subscription::{Scope, Subscriber, Subscription};

use api::{
    now_nanos, reply_json, ApiError, CreateConsumerRequest, ListRequest, MsgDeleteRequest,
    MsgGetRequest, PurgeRequest, StreamConfig, StreamInfoRequest,
};
pub(crate) use stream::Stream;

/// Prefix of every API subject.
const API_PREFIX: &str = "$JS.API.";
/// Prefix of the reply subjects acks are sent to.
const ACK_PREFIX: &str = "$JS.ACK.";
/// Prefix of the reply subjects of flow-control requests.
const FLOW_CONTROL_PREFIX: &str = "$JS.FC.";
/// Requests waiting for the API thread; more are refused with 503.
const API_QUEUE: usize = 4096;
/// Names per NAMES page, infos per LIST page (nats-server's).
const NAMES_LIMIT: usize = 1024;
const LIST_LIMIT: usize = 256;

/// Why durable streams could not start.
#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    #[error("stream {name} in the config file: {error}")]
    Declared { name: String, error: ApiError },
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// The durable-stream layer of one server.
pub struct JetStream {
    server: Weak<ServerState>,
    storage: FileStorage,
    streams: RwLock<HashMap<String, Arc<Stream>>>,
    /// Streams found in the store that could not be opened (damaged data),
    /// with why: kept out of service, reported by the API (10118),
    /// `/jsz` and `/healthz`, and deletable; the other streams work on.
    offline: RwLock<HashMap<String, String>>,
    sync: SyncPolicy,
    /// `max_memory_store` and `max_file_store` (0: no limit).
    max_memory: u64,
    max_file: u64,
    api: std::sync::mpsc::SyncSender<ApiRequest>,
    subscriptions: Mutex<Vec<Arc<Subscription>>>,
    /// Latencies recorded once per stored batch, read by monitoring.
    pub(crate) latency: Latency,
}

/// Latencies of the store path, recorded once per batch (never per
/// message) into lock-free histograms that `/metrics` reads.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    /// How long a batch waited for its fsync (group commit included), file
    /// streams only; and the background syncs of `sync = "<interval>"`.
    pub fsync: Histogram,
    /// From when the ingest task saw a batch's oldest message to when the
    /// batch's PubAcks were queued (see `ingest_loop` for the bound).
    pub publish_ack: Histogram,
}

/// Totals of all streams, as `$JS.API.INFO` and `/jsz` report them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Bytes held by memory streams and by file streams.
    pub memory: u64,
    pub storage: u64,
    pub streams: usize,
    pub consumers: usize,
    pub messages: u64,
    pub bytes: u64,
}

/// One stream as monitoring shows it: the API's own STREAM.INFO and, when
/// asked for, each consumer's CONSUMER.INFO, so `/jsz`, `/metrics` and the
/// API never disagree.
pub(crate) struct StreamReport {
    pub info: api::StreamInfo,
    pub consumers: Vec<api::ConsumerInfo>,
}

struct ApiRequest {
    subject: String,
    reply: Option<Bytes>,
    payload: Bytes,
}

impl JetStream {
    /// Opens the store, restores every stream and consumer, applies the
    /// streams declared in the config, and starts answering the API.
    pub(crate) fn start(
        server: &Arc<ServerState>,
        config: &JetStreamConfig,
    ) -> Result<Arc<JetStream>, JetStreamError> {
        let storage = FileStorage::open(&config.store_dir)?;
        let (api_tx, api_rx) = std::sync::mpsc::sync_channel(API_QUEUE);
        let js = Arc::new(JetStream {
            server: Arc::downgrade(server),
            storage,
            streams: RwLock::new(HashMap::new()),
            offline: RwLock::new(HashMap::new()),
            sync: config.sync,
            // The server resolves unset limits before it starts streams
            // (`JetStreamConfig::resolve_limits`); unset here means none.
            max_memory: config.max_memory_store.unwrap_or(0) as u64,
            max_file: config.max_file_store.unwrap_or(0) as u64,
            api: api_tx,
            subscriptions: Mutex::new(Vec::new()),
            latency: Latency::default(),
        });
        js.restore()?;
        js.declare_all(&config.streams)?;
        let worker = Arc::downgrade(&js);
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("skiff-js-api".into())
            .spawn(move || {
                // Creating streams and consumers spawns their tasks.
                let _runtime = runtime.enter();
                api_thread(worker, api_rx)
            })
            .map_err(JetStreamError::Thread)?;
        let handler: Arc<dyn Subscriber> = Arc::new(ApiHandler(Arc::downgrade(&js)));
        let subs = [API_PREFIX, ACK_PREFIX, FLOW_CONTROL_PREFIX].map(|prefix| {
            // Every node has its own stream API: a request is answered by
            // the node the client is connected to.
            server.subscribe_internal(&format!("{prefix}>"), Scope::Node, Arc::clone(&handler))
        });
        for sub in subs.into_iter().flatten() {
            js.subscriptions.lock().push(sub);
        }
        if let SyncPolicy::Interval(every) = config.sync {
            tokio::spawn(sync_periodically(Arc::downgrade(&js), every));
        }
        tokio::spawn(expire_periodically(Arc::downgrade(&js)));
        tracing::info!(
            "JetStream enabled: store {} ({} streams)",
            config.store_dir.display(),
            js.streams.read().len()
        );
        Ok(js)
    }

    /// Stops every stream and consumer and detaches from the server.
    pub(crate) fn shutdown(&self) {
        if let Some(server) = self.server.upgrade() {
            for sub in self.subscriptions.lock().drain(..) {
                server.end_subscription(&sub);
            }
        }
        for stream in self.streams.write().drain().map(|(_, s)| s) {
            stream.stop();
        }
        let _ = self.storage.sync();
    }

    fn restore(self: &Arc<Self>) -> Result<(), JetStreamError> {
        for name in self.storage.stream_names()? {
            match Stream::restore(self, &name) {
                Ok(Some(stream)) => {
                    self.streams.write().insert(name, stream);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!("stream {name} is offline: it could not be opened: {e}");
                    self.offline.write().insert(name, e.to_string());
                }
            }
        }
        Ok(())
    }

    /// Creates or updates the streams (and consumers) declared in the
    /// config file to match it: at start and on reload. Everything is
    /// checked first ([`JetStream::check_declared`]), so a declaration that
    /// cannot apply changes nothing (short of the disk failing half-way).
    /// A stream no longer declared is kept: it holds data.
    pub(crate) fn declare_all(
        self: &Arc<Self>,
        streams: &[StreamConfig],
    ) -> Result<(), JetStreamError> {
        self.check_declared(streams)?;
        for declared in streams {
            self.declare(declared.clone())
                .map_err(|error| JetStreamError::Declared {
                    name: declared.name.clone(),
                    error,
                })?;
        }
        Ok(())
    }

    /// Checks declared streams as the API would, without changing
    /// anything: each config and its consumers, what updating an existing
    /// stream refuses, and subjects overlapping another stream's as they
    /// will be once every declaration is applied.
    pub(crate) fn check_declared(&self, streams: &[StreamConfig]) -> Result<(), JetStreamError> {
        let existing = self.streams.read().clone();
        let mut planned: HashMap<String, StreamConfig> = existing
            .iter()
            .map(|(name, s)| (name.clone(), s.config()))
            .collect();
        let mut declared_names = Vec::new();
        for declared in streams {
            let refused = |error| JetStreamError::Declared {
                name: declared.name.clone(),
                error,
            };
            if declared_names.contains(&declared.name) {
                return Err(refused(ApiError::stream_config("declared twice")));
            }
            let config = stream::normalize(declared.clone()).map_err(refused)?;
            let current = existing.get(&config.name);
            if let Some(stream) = current {
                stream.check_update(&config).map_err(refused)?;
            }
            for c in &declared.consumers {
                match current {
                    Some(stream) => stream.check_consumer(c.clone(), &config),
                    None => consumer::normalize(c.clone(), &config, &HashMap::new()).map(|_| ()),
                }
                .map_err(refused)?;
            }
            declared_names.push(config.name.clone());
            planned.insert(config.name.clone(), config);
        }
        for name in &declared_names {
            let ours = &planned[name];
            let overlap = planned.iter().find(|(other, theirs)| {
                *other != name
                    && ours.subjects.iter().any(|a| {
                        theirs
                            .subjects
                            .iter()
                            .any(|b| crate::subject::patterns_overlap(a.as_bytes(), b.as_bytes()))
                    })
            });
            if let Some((other, _)) = overlap {
                let error = ApiError::subjects_overlap();
                return Err(JetStreamError::Declared {
                    name: name.clone(),
                    error: ApiError::new(
                        error.code,
                        error.err_code,
                        format!("{} ({other})", error.description),
                    ),
                });
            }
        }
        Ok(())
    }

    fn declare(self: &Arc<Self>, config: StreamConfig) -> Result<(), ApiError> {
        let consumers = config.consumers.clone();
        let stream = match self.stream(&config.name) {
            Ok(existing) => {
                existing.update(config)?;
                existing
            }
            Err(_) => self.create_stream(config)?,
        };
        for consumer in consumers {
            stream.create_consumer(consumer, "")?;
        }
        Ok(())
    }

    pub(crate) fn server(&self) -> Option<Arc<ServerState>> {
        self.server.upgrade()
    }

    pub(crate) fn sync_always(&self) -> bool {
        self.sync == SyncPolicy::Always
    }

    /// Bytes still free under `max_memory_store`/`max_file_store` for
    /// streams of `storage`; `None` without a limit.
    pub(crate) fn storage_room(&self, storage: api::Storage) -> Option<u64> {
        let limit = match storage {
            api::Storage::Memory => self.max_memory,
            api::Storage::File => self.max_file,
        };
        if limit == 0 {
            return None;
        }
        let used: u64 = self
            .streams
            .read()
            .values()
            .filter(|s| s.config().storage == storage)
            .map(|s| s.state().bytes)
            .sum();
        Some(limit.saturating_sub(used))
    }

    pub(crate) fn storage(&self) -> &FileStorage {
        &self.storage
    }

    fn stream(&self, name: &str) -> Result<Arc<Stream>, ApiError> {
        if let Some(stream) = self.streams.read().get(name) {
            return Ok(Arc::clone(stream));
        }
        Err(self.missing(name))
    }

    /// The error for a stream that is not in service: offline, or unknown.
    fn missing(&self, name: &str) -> ApiError {
        match self.offline.read().get(name) {
            Some(reason) => ApiError::stream_offline(reason),
            None => ApiError::stream_not_found(),
        }
    }

    /// Streams that could not be opened, with why, sorted by name.
    pub(crate) fn offline_streams(&self) -> Vec<(String, String)> {
        let mut offline: Vec<_> = self
            .offline
            .read()
            .iter()
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        offline.sort();
        offline
    }

    fn create_stream(self: &Arc<Self>, config: StreamConfig) -> Result<Arc<Stream>, ApiError> {
        let config = stream::normalize(config)?;
        if let Some(reason) = self.offline.read().get(&config.name) {
            return Err(ApiError::stream_offline(reason));
        }
        let streams = self.streams.read();
        if let Some(existing) = streams.get(&config.name) {
            return if existing.config() == config {
                Ok(Arc::clone(existing))
            } else {
                Err(ApiError::stream_in_use())
            };
        }
        if overlaps(streams.values(), &config, None) {
            return Err(ApiError::subjects_overlap());
        }
        drop(streams);
        // A stream whose own limit cannot fit in what the server has left
        // is refused, as nats-server refuses its reservation.
        let room = self.storage_room(config.storage);
        if config.max_bytes > 0 && room.is_some_and(|left| config.max_bytes as u64 > left) {
            return Err(ApiError::insufficient_resources(config.storage));
        }
        let stream = Stream::create(self, config)?;
        self.streams
            .write()
            .insert(stream.name().to_string(), Arc::clone(&stream));
        Ok(stream)
    }

    /// Deletes a stream, an offline one included (how its damaged data is
    /// let go of).
    fn delete_stream(&self, name: &str) -> Result<(), ApiError> {
        let removed = self.streams.write().remove(name);
        match removed {
            Some(stream) => stream.stop(),
            None if self.offline.write().remove(name).is_some() => {}
            None => return Err(ApiError::stream_not_found()),
        }
        self.storage
            .delete_stream(name)
            .map_err(|e| ApiError::new(500, 10050, e.to_string()))?;
        Ok(())
    }

    /// Drops an ephemeral consumer that went inactive.
    pub(crate) fn forget_consumer(&self, stream: &str, consumer: &str) {
        if let Ok(s) = self.stream(stream) {
            let _ = s.delete_consumer(consumer);
        }
    }

    /// Routes an ack (`$JS.ACK.<stream>.<consumer>....`) to its consumer.
    fn ack(&self, subject: &str, msg: &Message) {
        if let Some(c) = self.consumer_at(&subject[ACK_PREFIX.len()..]) {
            c.ack(subject, msg.reply(), msg.data());
        }
    }

    /// The consumer named by the first two tokens of `path`
    /// (`<stream>.<consumer>[...]`), as in ack, flow-control and pull
    /// subjects.
    fn consumer_at(&self, path: &str) -> Option<Arc<consumer::Consumer>> {
        let mut tokens = path.split('.');
        let (stream, consumer) = (tokens.next()?, tokens.next()?);
        self.stream(stream).ok()?.consumer(consumer)
    }

    /// A pull request (`CONSUMER.MSG.NEXT.<stream>.<consumer>`), handled on
    /// the publisher's task without waiting for the API thread.
    fn pull(&self, rest: &str, msg: &Message) -> bool {
        let Some(reply) = msg.reply() else {
            return true;
        };
        match self.consumer_at(rest) {
            Some(c) => c.pull_request(reply, msg.data()),
            None => {
                // In nats-server a consumer answers its own pull subject, so
                // a missing one means no responders: tell the client so.
                if let Some(server) = self.server() {
                    consumer::send_status(&server, reply, 503, "", &[]);
                }
            }
        }
        true
    }
}

/// Whether `config`'s subjects overlap those of any stream but `except`.
fn overlaps<'a>(
    streams: impl Iterator<Item = &'a Arc<Stream>>,
    config: &StreamConfig,
    except: Option<&str>,
) -> bool {
    streams.filter(|s| Some(s.name()) != except).any(|s| {
        s.config().subjects.iter().any(|theirs| {
            config
                .subjects
                .iter()
                .any(|ours| crate::subject::patterns_overlap(ours.as_bytes(), theirs.as_bytes()))
        })
    })
}

/// Answers every API request with why JetStream is out of service (its
/// store could not be opened), so that clients see the reason instead of
/// a timeout.
pub(crate) fn serve_offline(server: &Arc<ServerState>, reason: &str) {
    struct Offline {
        server: Weak<ServerState>,
        answer: Vec<u8>,
    }
    impl Subscriber for Offline {
        fn deliver(&self, _sid: &[u8], msg: &Message, _wakes: &mut WakeList) -> bool {
            if let (Some(server), Some(reply)) = (self.server.upgrade(), msg.reply()) {
                server.send_internal(reply, &Message::new(reply, None, None, &self.answer));
            }
            true
        }
    }
    let handler: Arc<dyn Subscriber> = Arc::new(Offline {
        server: Arc::downgrade(server),
        answer: reply_json::<()>(
            "io.nats.jetstream.api.v1.error_response",
            Err(ApiError::jetstream_offline(reason)),
        ),
    });
    // The subscription lives as long as the server.
    let _ = server.subscribe_internal(&format!("{API_PREFIX}>"), Scope::Node, handler);
}

/// Receives API requests and acks on the publisher's task.
struct ApiHandler(Weak<JetStream>);

impl Subscriber for ApiHandler {
    fn deliver(&self, _sid: &[u8], msg: &Message, _wakes: &mut WakeList) -> bool {
        let Some(js) = self.0.upgrade() else {
            return false;
        };
        let Ok(subject) = std::str::from_utf8(msg.subject()) else {
            return false;
        };
        if subject.starts_with(ACK_PREFIX) {
            js.ack(subject, msg);
            return true;
        }
        if let Some(rest) = subject.strip_prefix(FLOW_CONTROL_PREFIX) {
            if let Some(c) = js.consumer_at(rest) {
                c.flow_control_answered(msg.subject());
            }
            return true;
        }
        if let Some(rest) = subject.strip_prefix("$JS.API.CONSUMER.MSG.NEXT.") {
            return js.pull(rest, msg);
        }
        let request = ApiRequest {
            subject: subject.to_string(),
            reply: msg.reply().map(Bytes::copy_from_slice),
            payload: Bytes::copy_from_slice(msg.data()),
        };
        if js.api.try_send(request).is_err() {
            if let (Some(server), Some(reply)) = (js.server(), msg.reply()) {
                let body = reply_json::<()>(
                    "io.nats.jetstream.api.v1.system_overloaded",
                    Err(ApiError::new(
                        503,
                        10008,
                        "JetStream system temporarily unavailable",
                    )),
                );
                server.send_internal(reply, &Message::new(reply, None, None, &body));
            }
        }
        true
    }
}

fn api_thread(js: Weak<JetStream>, requests: std::sync::mpsc::Receiver<ApiRequest>) {
    while let Ok(request) = requests.recv() {
        let Some(js) = js.upgrade() else {
            return;
        };
        let Some(reply) = request.reply.clone() else {
            continue;
        };
        let body = js.answer(&request);
        // An empty body: the request was answered otherwise (DIRECT.GET
        // replies with the message itself).
        if body.is_empty() {
            continue;
        }
        if let Some(server) = js.server() {
            server.send_internal(&reply, &Message::new(&reply, None, None, &body));
        }
    }
}

fn parse<'a, T: serde::Deserialize<'a> + Default>(payload: &'a [u8]) -> Result<T, ApiError> {
    // Clients send nothing, or `null`, when they have no options.
    if payload.trim_ascii().is_empty() || payload.trim_ascii() == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(payload).map_err(ApiError::invalid_json)
}

#[derive(Serialize)]
struct Success {
    success: bool,
}

#[derive(Serialize)]
struct Paged<T: Serialize> {
    total: usize,
    offset: usize,
    limit: usize,
    #[serde(flatten)]
    items: T,
}

fn page<T: Clone>(all: &[T], offset: usize, limit: usize) -> (usize, Vec<T>) {
    (
        all.len(),
        all.iter().skip(offset).take(limit).cloned().collect(),
    )
}

const T_ACCOUNT: &str = "io.nats.jetstream.api.v1.account_info_response";

impl JetStream {
    /// Answers one API request with the JSON reply body.
    fn answer(self: &Arc<Self>, request: &ApiRequest) -> Vec<u8> {
        let subject = &request.subject[API_PREFIX.len()..];
        let payload = &request.payload[..];
        let mut parts = subject.splitn(3, '.');
        let (a, b, rest) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let kind = |k: &str| format!("io.nats.jetstream.api.v1.{k}_response");
        match (a, b) {
            ("INFO", "") => reply_json(T_ACCOUNT, Ok(self.account_info())),
            ("STREAM", "CREATE") => reply_json(
                &kind("stream_create"),
                parse::<StreamConfig>(payload).and_then(|c| {
                    if c.name != rest {
                        return Err(ApiError::stream_name_mismatch());
                    }
                    if api::has_path_separator(rest) {
                        return Err(ApiError::stream_name_contains_path_separators());
                    }
                    self.create_stream(c)?.info(None)
                }),
            ),
            ("STREAM", "UPDATE") => reply_json(
                &kind("stream_update"),
                parse::<StreamConfig>(payload).and_then(|c| {
                    if c.name != rest {
                        return Err(ApiError::stream_name_mismatch());
                    }
                    let stream = self.stream(rest)?;
                    let candidate = stream::normalize(c)?;
                    if overlaps(self.streams.read().values(), &candidate, Some(rest)) {
                        return Err(ApiError::subjects_overlap());
                    }
                    stream.update(candidate)?;
                    stream.info(None)
                }),
            ),
            ("STREAM", "INFO") => reply_json(
                &kind("stream_info"),
                parse::<StreamInfoRequest>(payload)
                    .and_then(|r| self.stream(rest)?.info(r.subjects_filter.as_deref())),
            ),
            ("STREAM", "DELETE") => reply_json(
                &kind("stream_delete"),
                self.delete_stream(rest).map(|()| Success { success: true }),
            ),
            ("STREAM", "PURGE") => {
                #[derive(Serialize)]
                struct Purged {
                    success: bool,
                    purged: u64,
                }
                reply_json(
                    &kind("stream_purge"),
                    parse::<PurgeRequest>(payload).and_then(|r| {
                        let purged = self.stream(rest)?.purge(&r)?;
                        Ok(Purged {
                            success: true,
                            purged,
                        })
                    }),
                )
            }
            ("STREAM", "NAMES") => reply_json(
                &kind("stream_names"),
                parse::<ListRequest>(payload).map(|r| {
                    #[derive(Serialize)]
                    struct Names {
                        streams: Vec<String>,
                    }
                    let names = self.stream_names(r.subject.as_deref());
                    let (total, streams) = page(&names, r.offset, NAMES_LIMIT);
                    Paged {
                        total,
                        offset: r.offset,
                        limit: NAMES_LIMIT,
                        items: Names { streams },
                    }
                }),
            ),
            ("STREAM", "LIST") => reply_json(
                &kind("stream_list"),
                parse::<ListRequest>(payload).map(|r| {
                    #[derive(Serialize)]
                    struct List {
                        streams: Vec<api::StreamInfo>,
                        /// nats-server 2.12's: streams it cannot serve, with why.
                        #[serde(skip_serializing_if = "HashMap::is_empty")]
                        offline: HashMap<String, String>,
                    }
                    let names = self.stream_names(r.subject.as_deref());
                    let (total, names) = page(&names, r.offset, LIST_LIMIT);
                    let mut streams = Vec::new();
                    let mut offline = HashMap::new();
                    for name in &names {
                        match self.stream(name).and_then(|s| s.info(None)) {
                            Ok(info) => streams.push(info),
                            Err(e) => {
                                offline.insert(name.clone(), e.description);
                            }
                        }
                    }
                    Paged {
                        total,
                        offset: r.offset,
                        limit: LIST_LIMIT,
                        items: List { streams, offline },
                    }
                }),
            ),
            ("STREAM", "MSG") => self.answer_msg(rest, payload),
            ("DIRECT", "GET") => {
                // Direct gets answer with the message itself (headers and
                // data), not JSON; see `Stream::direct_get`.
                let (stream, last_by) = rest
                    .split_once('.')
                    .map_or((rest, None), |(s, l)| (s, Some(l)));
                match self.stream(stream) {
                    Ok(s) => s.direct_get(last_by, payload, request.reply.as_deref()),
                    // nats-server has no responder for a stream that does
                    // not exist: clients expect a no-responders status.
                    Err(_) => {
                        if let (Some(server), Some(reply)) = (self.server(), &request.reply) {
                            consumer::send_status(&server, reply, 503, "", &[]);
                        }
                    }
                }
                Vec::new()
            }
            ("CONSUMER", _) => self.answer_consumer(b, rest, payload),
            _ => reply_json::<()>(
                "io.nats.jetstream.api.v1.error_response",
                Err(ApiError::bad_request()),
            ),
        }
    }

    fn answer_msg(&self, rest: &str, payload: &[u8]) -> Vec<u8> {
        match rest.split_once('.') {
            Some(("GET", stream)) => reply_json(
                "io.nats.jetstream.api.v1.stream_msg_get_response",
                parse::<MsgGetRequest>(payload).and_then(|r| self.stream(stream)?.get_message(&r)),
            ),
            Some(("DELETE", stream)) => reply_json(
                "io.nats.jetstream.api.v1.stream_msg_delete_response",
                parse::<MsgDeleteRequest>(payload).and_then(|r| {
                    self.stream(stream)?.delete_message(r.seq)?;
                    Ok(Success { success: true })
                }),
            ),
            _ => reply_json::<()>(
                "io.nats.jetstream.api.v1.error_response",
                Err(ApiError::bad_request()),
            ),
        }
    }

    fn answer_consumer(&self, verb: &str, rest: &str, payload: &[u8]) -> Vec<u8> {
        let kind = |k: &str| format!("io.nats.jetstream.api.v1.consumer_{k}_response");
        let (stream_name, tail) = rest.split_once('.').map_or((rest, ""), |(s, t)| (s, t));
        let stream = self.stream(stream_name);
        match verb {
            "CREATE" | "DURABLE" => reply_json(
                &kind("create"),
                parse::<CreateConsumerRequest>(payload)
                    .and_then(|r| self.create_consumer(verb == "DURABLE", rest, r))
                    .map(|c| c.info()),
            ),
            "INFO" => reply_json(
                &kind("info"),
                stream
                    .and_then(|s| s.consumer(tail).ok_or_else(ApiError::consumer_not_found))
                    .map(|c| c.info()),
            ),
            "DELETE" => reply_json(
                &kind("delete"),
                stream
                    .and_then(|s| s.delete_consumer(tail))
                    .map(|()| Success { success: true }),
            ),
            "NAMES" | "LIST" => {
                let request = parse::<ListRequest>(payload);
                let result = stream.and_then(|s| Ok((s, request?)));
                if verb == "NAMES" {
                    #[derive(Serialize)]
                    struct Names {
                        consumers: Vec<String>,
                    }
                    reply_json(
                        &kind("names"),
                        result.map(|(s, r)| {
                            let (total, consumers) =
                                page(&s.consumer_names(), r.offset, NAMES_LIMIT);
                            Paged {
                                total,
                                offset: r.offset,
                                limit: NAMES_LIMIT,
                                items: Names { consumers },
                            }
                        }),
                    )
                } else {
                    #[derive(Serialize)]
                    struct List {
                        consumers: Vec<api::ConsumerInfo>,
                    }
                    reply_json(
                        &kind("list"),
                        result.map(|(s, r)| {
                            let (total, names) = page(&s.consumer_names(), r.offset, LIST_LIMIT);
                            let consumers = names
                                .iter()
                                .filter_map(|n| Some(s.consumer(n)?.info()))
                                .collect();
                            Paged {
                                total,
                                offset: r.offset,
                                limit: LIST_LIMIT,
                                items: List { consumers },
                            }
                        }),
                    )
                }
            }
            _ => reply_json::<()>(
                "io.nats.jetstream.api.v1.error_response",
                Err(ApiError::bad_request()),
            ),
        }
    }

    /// CONSUMER.CREATE.<stream>[.<name>[.<filter>]] (`rest` after CREATE)
    /// and CONSUMER.DURABLE.CREATE.<stream>.<durable> (`rest` after
    /// DURABLE). The request is checked against its subject in
    /// nats-server's order, which looks the stream up only after, so that
    /// clients get the same error for the same mistake.
    fn create_consumer(
        &self,
        durable: bool,
        rest: &str,
        mut r: CreateConsumerRequest,
    ) -> Result<Arc<consumer::Consumer>, ApiError> {
        let (stream_name, name, filter) = if durable {
            let mut tokens = rest.split('.');
            if tokens.next() != Some("CREATE") {
                return Err(ApiError::bad_request());
            }
            match (tokens.next(), tokens.next(), tokens.next()) {
                (Some(stream), Some(name), None) if !name.is_empty() => (stream, Some(name), None),
                _ => return Err(ApiError::durable_name_not_in_subject()),
            }
        } else {
            let mut tokens = rest.splitn(3, '.');
            let stream = tokens.next().unwrap_or("");
            (
                stream,
                tokens.next().filter(|n| !n.is_empty()),
                tokens.next(),
            )
        };
        // An empty `stream_name` is a mismatch too, as in nats-server.
        if r.stream_name != stream_name {
            return Err(ApiError::stream_name_mismatch());
        }
        // The subject's name, else the body's.
        if name
            .or(r.config.consumer_name())
            .is_some_and(api::has_path_separator)
        {
            return Err(ApiError::consumer_name_contains_path_separators());
        }
        let durable_name = r.config.durable_name.as_deref().filter(|d| !d.is_empty());
        match (durable, name) {
            // The legacy durable API takes the durable name from the body
            // and only checks it against the subject: nats-server neither
            // fills it in nor accepts `name` instead.
            (true, _) => match durable_name {
                None => return Err(ApiError::durable_name_not_set()),
                Some(d) if Some(d) != name => return Err(ApiError::durable_name_mismatch()),
                Some(_) => {}
            },
            // CREATE.<stream>.<name>: a durable name in the body must be the
            // subject's; the subject's name replaces the body's `name`.
            (false, Some(name)) => {
                if durable_name.is_some_and(|d| d != name) {
                    return Err(ApiError::durable_name_mismatch());
                }
                r.config.name = Some(name.to_string());
            }
            // CREATE.<stream> makes ephemeral consumers only.
            (false, None) if durable_name.is_some() => {
                return Err(ApiError::ephemeral_with_durable_name())
            }
            (false, None) => {}
        }
        if let Some(filter) = filter {
            let filters = r.config.filters();
            if filters.len() > 1 || filters.first().is_some_and(|f| f != filter) {
                return Err(ApiError::new(
                    400,
                    10131,
                    "Consumer create request did not match filtered subject from create subject",
                ));
            }
        }
        self.stream(stream_name)?
            .create_consumer(r.config, &r.action)
    }

    fn stream_names(&self, subject: Option<&str>) -> Vec<String> {
        let mut names: Vec<String> =
            self.streams
                .read()
                .values()
                .filter(|s| {
                    subject.is_none_or(|f| {
                        s.config().subjects.iter().any(|ours| {
                            crate::subject::patterns_overlap(ours.as_bytes(), f.as_bytes())
                        })
                    })
                })
                .map(|s| s.name().to_string())
                .collect();
        // Their subjects are unknown: listed only when not filtering.
        if subject.is_none() {
            names.extend(self.offline.read().keys().cloned());
        }
        names.sort();
        names
    }

    fn account_info(&self) -> serde_json::Value {
        let usage = self.usage();
        // The one account's limits are the server's store limits (-1: none).
        let limit = |l: u64| if l == 0 { -1 } else { l as i64 };
        serde_json::json!({
            "memory": usage.memory,
            "storage": usage.storage,
            "reserved_memory": 0,
            "reserved_storage": 0,
            "streams": usage.streams,
            "consumers": usage.consumers,
            "limits": {
                "max_memory": limit(self.max_memory), "max_storage": limit(self.max_file),
                "max_streams": -1, "max_consumers": -1,
                "max_ack_pending": -1, "memory_max_stream_bytes": -1,
                "storage_max_stream_bytes": -1, "max_bytes_required": false
            },
            "api": {"total": 0, "errors": 0},
        })
    }

    /// Totals over every stream. Reads each stream's state (in memory: no
    /// disk access).
    pub(crate) fn usage(&self) -> Usage {
        let streams = self.streams.read();
        let mut usage = Usage {
            streams: streams.len(),
            ..Usage::default()
        };
        for s in streams.values() {
            let state = s.state();
            match s.config().storage {
                api::Storage::Memory => usage.memory += state.bytes,
                api::Storage::File => usage.storage += state.bytes,
            }
            usage.messages += state.messages;
            usage.bytes += state.bytes;
            usage.consumers += s.consumer_names().len();
        }
        usage
    }

    /// Every stream's info, sorted by name, with its consumers' infos when
    /// `consumers` (through the same `info` calls the API answers with).
    /// A consumer's `num_pending` may read the store: call this from a
    /// blocking thread.
    pub(crate) fn report(&self, consumers: bool) -> Vec<StreamReport> {
        let mut streams: Vec<Arc<Stream>> = self.streams.read().values().cloned().collect();
        streams.sort_by(|a, b| a.name().cmp(b.name()));
        streams
            .iter()
            .filter_map(|s| {
                // Without a subjects filter `info` reads no store index and
                // cannot fail; a stream that errors anyway is left out.
                let info = s.info(None).ok()?;
                let consumers = if consumers {
                    let mut names = s.consumer_names();
                    names.sort();
                    names
                        .iter()
                        .filter_map(|n| Some(s.consumer(n)?.info()))
                        .collect()
                } else {
                    Vec::new()
                };
                Some(StreamReport { info, consumers })
            })
            .collect()
    }

    /// Where file streams are stored, and the store limits
    /// (`max_memory_store`, `max_file_store`; 0: none).
    pub(crate) fn store_dir(&self) -> &std::path::Path {
        self.storage.dir()
    }

    pub(crate) fn store_limits(&self) -> (u64, u64) {
        (self.max_memory, self.max_file)
    }

    /// The sync policy: `None` for `always`, else the background interval.
    pub(crate) fn sync_interval(&self) -> Option<Duration> {
        match self.sync {
            SyncPolicy::Always => None,
            SyncPolicy::Interval(every) => Some(every),
        }
    }
}

async fn sync_periodically(js: Weak<JetStream>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(js) = js.upgrade() else {
            return;
        };
        let _ = tokio::task::spawn_blocking(move || {
            let (started, before) = (std::time::Instant::now(), js.storage.sync_count());
            let synced = js.storage.sync();
            // Only real fsyncs: an idle interval has nothing to sync.
            if js.storage.sync_count() != before {
                js.latency.fsync.observe(started.elapsed());
            }
            synced
        })
        .await;
    }
}

/// Applies `max_age` once a second.
async fn expire_periodically(js: Weak<JetStream>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(js) = js.upgrade() else {
            return;
        };
        let streams: Vec<Arc<Stream>> = js.streams.read().values().cloned().collect();
        let now = now_nanos();
        let _ = tokio::task::spawn_blocking(move || {
            for s in streams {
                s.expire(now);
            }
        })
        .await;
    }
}
