//! Storage of durable streams: the messages of one stream, in sequence order,
//! with the indexes a JetStream-style consumer needs, and the opaque records
//! (stream config, consumer state) the layer above wants kept beside them.
//!
//! This layer knows nothing of the JSON API. It stores `(subject, headers +
//! data, timestamp)` under a sequence number and answers questions about
//! sequences, subjects and limits. One interface, [`StreamStore`], has two
//! implementations: [`MemoryStore`] (`storage: memory`) and [`FileStore`]
//! (`storage: file`, on the fjall LSM engine, opened through [`FileStorage`]).
//! Both are the same [`engine::StreamEngine`] over a different
//! [`engine::Backend`], so limits, purge and filter semantics are written once.
//!
//! Invariants, with JetStream's semantics (and nats-server's where it has
//! quirks, so clients see the same answers):
//! - Sequences start at 1, grow by one per stored message and are never
//!   reused, not even after a purge or a restart: an empty stream has
//!   `first_seq == last_seq + 1`.
//! - `messages`/`bytes` count what is stored; a message's size is
//!   `subject + headers + data + 16` bytes, as nats-server's memory store
//!   counts it (`bytes` and `max_bytes` use this size).
//! - `num_deleted` is the number of gaps between `first_seq` and `last_seq`.
//! - Writes reach the operating system when the call returns but are only
//!   durable after [`StreamStore::sync`]; `sync` is a group commit, so many
//!   writers share one fsync.
//! - Nothing read from disk is trusted: a malformed record is a
//!   [`StoreError::Corrupt`], never a panic.
//!
//! All methods block (disk I/O, and `sync` waits for an fsync); the async
//! server calls them from `spawn_blocking` or a dedicated thread.

pub mod engine;
pub mod faults;
pub mod file;
pub mod memory;

use std::time::Duration;

use bytes::Bytes;

use crate::subject;

pub use engine::StreamEngine;
pub use faults::Faults;
pub use file::{FileBackend, FileStorage, FileStore};
pub use memory::{MemoryBackend, MemoryStore};

/// One stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Stream sequence, from 1.
    pub seq: u64,
    /// The (literal) subject it was published to.
    pub subject: Bytes,
    /// Length of the header block at the start of `payload`; 0 = no headers.
    pub header_len: usize,
    /// Headers followed by data.
    pub payload: Bytes,
    /// When it was stored, in nanoseconds since the Unix epoch.
    pub timestamp: i64,
}

impl StoredMessage {
    /// The header block (`NATS/1.0 ...\r\n\r\n`), empty when there is none.
    pub fn headers(&self) -> &[u8] {
        &self.payload[..self.header_len.min(self.payload.len())]
    }

    /// The data after the headers.
    pub fn data(&self) -> &[u8] {
        &self.payload[self.header_len.min(self.payload.len())..]
    }

    /// The size counted against `bytes` and `max_bytes`.
    pub fn size(&self) -> u64 {
        message_size(self.subject.len(), self.payload.len())
    }
}

/// Size of a message as nats-server's memory store counts it: subject,
/// headers and data, plus 16 bytes for sequence and timestamp.
pub fn message_size(subject_len: usize, payload_len: usize) -> u64 {
    subject_len as u64 + payload_len as u64 + 16
}

/// The numbers STREAM.INFO reports, kept in memory (reading it is O(1)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamState {
    /// Messages stored.
    pub messages: u64,
    /// Their total size (see [`message_size`]).
    pub bytes: u64,
    /// Oldest stored sequence; `last_seq + 1` when empty.
    pub first_seq: u64,
    /// Timestamp of the oldest stored message; 0 when empty.
    pub first_ts: i64,
    /// Newest sequence ever assigned (it survives purges).
    pub last_seq: u64,
    /// Timestamp of the newest message ever stored; 0 if none yet.
    pub last_ts: i64,
    /// Distinct subjects among stored messages.
    pub num_subjects: u64,
    /// Gaps between `first_seq` and `last_seq` (deleted or purged by filter).
    pub num_deleted: u64,
}

/// Limits of a stream, set at creation and changed with
/// [`StreamStore::update_limits`]. `None` is unlimited, and so is `Some(0)`
/// (nats-server's 0), so a JSON config maps over directly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreLimits {
    /// Most messages kept.
    pub max_msgs: Option<u64>,
    /// Most bytes kept (see [`message_size`]).
    pub max_bytes: Option<u64>,
    /// Messages older than this are removed by [`StreamStore::expire`].
    pub max_age: Option<Duration>,
    /// Most messages kept per subject.
    pub max_msgs_per_subject: Option<u64>,
    /// Largest headers + data accepted.
    pub max_msg_size: Option<u64>,
    /// At a limit, refuse new messages (`discard: new`) instead of removing
    /// the oldest (`discard: old`).
    pub discard_new: bool,
    /// With `discard_new`, also refuse a message whose subject is at
    /// `max_msgs_per_subject` (`discard_new_per_subject`); otherwise that
    /// subject's oldest message is replaced, as in nats-server.
    pub discard_new_per_subject: bool,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The disk or the storage engine failed.
    #[error("store I/O error ({context}): {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// Data read back is not what was written.
    #[error("store corrupt: {context}")]
    Corrupt { context: String },
    /// `discard: new` and the stream holds `max_msgs`.
    #[error("maximum messages exceeded")]
    MaxMsgs,
    /// `discard: new` and the stream holds `max_bytes` (or the message alone
    /// could never fit).
    #[error("maximum bytes exceeded")]
    MaxBytes,
    /// `discard_new_per_subject` and the subject holds `max_msgs_per_subject`.
    #[error("maximum messages per subject exceeded")]
    MaxMsgsPerSubject,
    /// Headers + data exceed `max_msg_size`.
    #[error("message size exceeds maximum allowed")]
    MaxMsgSize,
    /// The request itself is malformed (empty subject, headers longer than
    /// the payload, a bad stream name ...).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The stream was removed (or its store failed and must be reopened).
    #[error("store closed")]
    Closed,
}

impl StoreError {
    /// The store directory is in use by another process.
    pub fn is_locked(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if source.kind() == std::io::ErrorKind::WouldBlock)
    }

    pub(crate) fn corrupt(context: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            context: context.into(),
        }
    }
}

/// Result of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The storage of one stream. Object safe: the server holds
/// `Arc<dyn StreamStore>` whatever the storage type.
///
/// Subject filters (`filters: &[Bytes]`) are subscription patterns that may
/// contain `*` and `>`; a message matches when any filter matches its
/// subject; an empty slice (or one containing `>`) matches everything.
pub trait StreamStore: Send + Sync {
    /// Stores a message under the next sequence and returns that sequence.
    /// Enforces the limits: with `discard: old` the oldest messages (the
    /// subject's oldest for `max_msgs_per_subject`) are removed to make room;
    /// with `discard: new` the message is refused with the limit's error.
    /// Not durable until [`StreamStore::sync`].
    fn append(
        &self,
        subject: &[u8],
        header_len: usize,
        payload: &[u8],
        timestamp: i64,
    ) -> Result<u64> {
        let mut writer = self.writer()?;
        let (subject, payload) = (
            Bytes::copy_from_slice(subject),
            Bytes::copy_from_slice(payload),
        );
        let seq = writer.append(subject, header_len, payload, timestamp)?;
        writer.commit()?;
        Ok(seq)
    }

    /// A writer that groups many appends into as few atomic writes as the
    /// limits allow (one, when no message pushes older ones out), for a
    /// publisher's batch. It holds the stream's write lock until committed
    /// or dropped.
    fn writer(&self) -> Result<Box<dyn StoreWriter + '_>>;

    /// The message stored under `seq`, if any.
    fn get(&self, seq: u64) -> Result<Option<StoredMessage>>;

    /// The first message with sequence `>= from_seq` matching `filters`.
    /// Uses the per-subject index for literal filters, so it does not scan
    /// messages of other subjects.
    fn next_matching(&self, from_seq: u64, filters: &[Bytes]) -> Result<Option<StoredMessage>>;

    /// The newest message whose subject matches `pattern` (DIRECT.GET by
    /// subject, deliver policy `last`).
    fn last_for_subject(&self, pattern: &[u8]) -> Result<Option<StoredMessage>>;

    /// Sorted sequences of the newest message of every distinct subject
    /// matching `filters` (deliver policy `last_per_subject`).
    fn last_per_subject_seqs(&self, filters: &[Bytes]) -> Result<Vec<u64>>;

    /// The first sequence whose message has `timestamp >= timestamp`, or
    /// `last_seq + 1` if none (deliver policy `by_start_time`). Assumes
    /// timestamps do not decrease with sequence, as a clock stamping
    /// appends gives.
    fn seq_for_time(&self, timestamp: i64) -> Result<u64>;

    /// How many messages matching `filters` have sequence `>= from_seq`.
    /// O(1) without filters unless there are interior deletes.
    fn num_pending(&self, from_seq: u64, filters: &[Bytes]) -> Result<u64>;

    /// Removes one message (MSG.DELETE); `false` if it was not stored.
    fn delete(&self, seq: u64) -> Result<bool>;

    /// Removes messages with JetStream's purge semantics and returns how
    /// many. `filter`: only messages whose subject matches (`None` or `>`:
    /// all). `up_to_seq`: only messages below it (exclusive); without a
    /// filter and beyond the end, the next sequence becomes `up_to_seq`.
    /// `keep`: spare the newest `keep` matching messages. Without any of
    /// them the stream is emptied and `first_seq` becomes `last_seq + 1`.
    fn purge(
        &self,
        filter: Option<&[u8]>,
        up_to_seq: Option<u64>,
        keep: Option<u64>,
    ) -> Result<u64>;

    /// Removes messages older than `max_age` at `now` (unix nanos): those
    /// with `timestamp <= now - max_age`, oldest first. Returns how many.
    fn expire(&self, now: i64) -> Result<u64>;

    /// The current state, O(1).
    fn state(&self) -> StreamState;

    /// Message counts of the subjects matching `filter`, sorted by subject.
    fn subjects(&self, filter: &[u8]) -> Result<Vec<(Bytes, u64)>>;

    /// The limits in force.
    fn limits(&self) -> StoreLimits;

    /// Changes the limits and enforces the lowered ones as nats-server
    /// does (per subject always, `max_msgs`/`max_bytes` with `discard: old`).
    /// Returns how many messages were removed. `max_age` is applied by the
    /// next [`StreamStore::expire`].
    fn update_limits(&self, limits: StoreLimits) -> Result<u64>;

    /// Makes everything written so far (messages, deletes, records) durable.
    /// Group commit: concurrent callers share one fsync. Blocks.
    fn sync(&self) -> Result<()>;

    /// fsyncs performed by this store's database so far (metrics, tests);
    /// 0 for memory storage.
    fn sync_count(&self) -> u64;

    /// Stores the stream's own record (its config, as the layer above
    /// serialises it), replacing the previous one.
    fn save_meta(&self, meta: &[u8]) -> Result<()>;

    /// The record given to [`StreamStore::save_meta`], if any.
    fn load_meta(&self) -> Result<Option<Vec<u8>>>;

    /// Stores the record of consumer `name` (config and state: ack floor,
    /// pending, redelivery counts), replacing the previous one.
    fn save_consumer(&self, name: &str, record: &[u8]) -> Result<()>;

    /// All consumer records, sorted by name.
    fn load_consumers(&self) -> Result<Vec<(String, Vec<u8>)>>;

    /// Removes consumer `name`'s record; `false` if there was none.
    fn delete_consumer(&self, name: &str) -> Result<bool>;

    /// Removes the stream and all its data. Every later call on this store
    /// fails with [`StoreError::Closed`].
    fn remove(&self) -> Result<()>;
}

/// Appends made together: see [`StreamStore::writer`]. What it reports
/// includes its own appends that are not committed yet.
pub trait StoreWriter {
    /// Like [`StreamStore::append`]: checks the limits and returns the
    /// sequence the message gets, but the message may only be stored by
    /// [`StoreWriter::commit`]. The parts are taken as shared `Bytes`, so
    /// that staging a message copies nothing.
    fn append(
        &mut self,
        subject: Bytes,
        header_len: usize,
        payload: Bytes,
        timestamp: i64,
    ) -> Result<u64>;

    /// The newest sequence assigned, these appends included.
    fn last_seq(&self) -> u64;

    /// The sequence of the newest message on the literal `subject`, these
    /// appends included; 0 if there is none.
    fn last_seq_for_subject(&self, subject: &[u8]) -> u64;

    /// Stores what is staged. After an error, exactly the sequences above
    /// the store's `state().last_seq` were not stored. Dropping a writer
    /// without committing discards what it staged.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// A set of subject filters, classified once per call.
#[derive(Debug)]
pub(crate) enum Filter<'a> {
    /// No filter, or `>`: every subject.
    All,
    /// Only literal subjects: looked up directly in the subject index.
    Literals(&'a [Bytes]),
    /// At least one wildcard: every known subject is tested.
    Patterns(&'a [Bytes]),
}

impl<'a> Filter<'a> {
    pub(crate) fn new(filters: &'a [Bytes]) -> Filter<'a> {
        if filters.is_empty() || filters.iter().any(|f| &f[..] == subject::FULL_WILDCARD) {
            Filter::All
        } else if filters.iter().all(|f| is_literal(f)) {
            Filter::Literals(filters)
        } else {
            Filter::Patterns(filters)
        }
    }

    pub(crate) fn matches(&self, subject: &[u8]) -> bool {
        match self {
            Filter::All => true,
            Filter::Literals(l) => l.iter().any(|f| &f[..] == subject),
            Filter::Patterns(p) => p.iter().any(|f| subject::matches_pattern(f, subject)),
        }
    }
}

/// Whether a filter has no wildcard token (so it names one subject).
pub(crate) fn is_literal(pattern: &[u8]) -> bool {
    subject::tokens(pattern).all(|t| t != subject::SINGLE_WILDCARD && t != subject::FULL_WILDCARD)
}
