//! The logic of a stream store, written once over a [`Backend`] that only
//! stores and indexes messages.
//!
//! [`StreamEngine`] keeps the stream's numbers and a per-subject summary
//! (count, first and last sequence of every subject) in memory, and turns
//! every operation (append with its limits, delete, purge, expiry) into one
//! or more atomic [`Batch`]es for the backend. Each batch carries the
//! counters the stream must recover with ([`PersistedState`]), so what is on
//! disk is consistent after every batch, whatever happens between two.
//!
//! Invariants kept under the engine's lock:
//! - `messages`, `bytes`, `first_seq`, `last_seq` and the subject summary
//!   describe exactly what the backend holds;
//! - a subject is in the summary iff it has at least one stored message;
//! - large removals are split into batches of [`CHUNK`] messages, each
//!   leaving a consistent stream, so a purge of millions of messages needs
//!   bounded memory.
//!
//! If the disk accepted a batch but reading back to update the summary then
//! failed, the engine refuses further work ([`StoreError::Corrupt`]) rather
//! than answer from a summary it knows is stale; reopening recovers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{
    message_size, Filter, Result, StoreError, StoreLimits, StoreWriter, StoredMessage, StreamState,
    StreamStore,
};

/// Most messages removed by one batch.
pub const CHUNK: usize = 4096;

/// Above this many subjects needing an index seek, `next_matching` walks the
/// messages instead (one ordered scan beats many random seeks).
const MAX_SEEKS: usize = 64;

/// An entry of the per-subject index: a sequence and its message's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub seq: u64,
    pub size: u64,
}

/// A message to remove, with what the backend needs to unindex it.
#[derive(Clone, Debug)]
pub struct Removal {
    pub seq: u64,
    pub subject: Bytes,
    pub size: u64,
}

impl From<StoredMessage> for Removal {
    fn from(m: StoredMessage) -> Removal {
        Removal {
            seq: m.seq,
            size: m.size(),
            subject: m.subject,
        }
    }
}

/// The counters a backend persists with every batch; the rest of
/// [`StreamState`] is derived from the stored messages on recovery.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistedState {
    pub last_seq: u64,
    pub last_ts: i64,
    pub messages: u64,
    pub bytes: u64,
    /// Batches ever committed to the stream: anything saved alongside with
    /// an equal count describes the stream as it is.
    pub commits: u64,
}

/// One atomic change: store `puts`, remove `removed`, record `state`.
#[derive(Debug)]
pub struct Batch<'a> {
    /// In ascending sequence order, all above the stream's last sequence.
    pub puts: &'a [StoredMessage],
    pub removed: &'a [Removal],
    pub state: PersistedState,
}

/// Summary of one subject's stored messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubjectState {
    pub msgs: u64,
    pub first: u64,
    pub last: u64,
}

/// What a backend found on disk when opened.
#[derive(Debug, Default)]
pub struct Recovered {
    pub state: PersistedState,
    /// Sequence and timestamp of the oldest stored message.
    pub first: Option<(u64, i64)>,
    pub subjects: Vec<(Bytes, SubjectState)>,
}

/// A fallible iterator borrowed from a backend.
pub type Iter<'a, T> = Box<dyn Iterator<Item = Result<T>> + 'a>;

/// Makes written data durable; shared outside the engine's lock so that a
/// sync never blocks appends.
pub trait Durability: Send + Sync {
    fn sync(&self) -> Result<()>;
    fn sync_count(&self) -> u64;
}

/// The primitives a storage backend provides. Reads take `&self` and may run
/// concurrently; `commit` and `remove` run under the engine's write lock.
pub trait Backend: Send + Sync + 'static {
    /// The message stored under `seq`.
    fn get(&self, seq: u64) -> Result<Option<StoredMessage>>;
    /// Stored messages with sequence `>= from`, ascending.
    fn messages_from(&self, from: u64) -> Iter<'_, StoredMessage>;
    /// Stored sequences `>= from`, ascending.
    fn seqs_from(&self, from: u64) -> Iter<'_, u64>;
    /// Stored sequences `<= to`, descending.
    fn seqs_rev(&self, to: u64) -> Iter<'_, u64>;
    /// Index entries of `subject` with sequence `>= from`, ascending.
    fn subject_from(&self, subject: &[u8], from: u64) -> Iter<'_, IndexEntry>;
    /// Index entries of `subject` with sequence `<= to`, descending.
    fn subject_rev(&self, subject: &[u8], to: u64) -> Iter<'_, IndexEntry>;
    /// Applies a batch atomically (all or nothing, also across a crash).
    fn commit(&mut self, batch: Batch<'_>) -> Result<()>;
    /// The durability handle (called once, when the engine is built).
    fn durability(&self) -> Arc<dyn Durability>;
    fn save_meta(&self, meta: &[u8]) -> Result<()>;
    fn load_meta(&self) -> Result<Option<Vec<u8>>>;
    fn save_consumer(&self, name: &str, record: &[u8]) -> Result<()>;
    fn load_consumers(&self) -> Result<Vec<(String, Vec<u8>)>>;
    fn delete_consumer(&self, name: &str) -> Result<bool>;
    /// Drops all data of the stream.
    fn remove(&mut self) -> Result<()>;
    /// The engine is going away cleanly: a chance to save the subject
    /// summary so that the next open need not rebuild it. Best effort.
    fn close(&mut self, _state: &PersistedState, _subjects: &[(Bytes, SubjectState)]) {}
}

/// A [`StreamStore`] over backend `B`.
pub struct StreamEngine<B: Backend> {
    inner: RwLock<Inner<B>>,
    durability: Arc<dyn Durability>,
}

type SubjectMap = HashMap<Bytes, SubjectState, ahash::RandomState>;

enum Health {
    Open,
    Closed,
    /// A batch was committed but the in-memory view could not follow.
    Broken(String),
}

struct Inner<B> {
    backend: B,
    limits: StoreLimits,
    messages: u64,
    bytes: u64,
    first_seq: u64,
    first_ts: i64,
    last_seq: u64,
    last_ts: i64,
    commits: u64,
    subjects: SubjectMap,
    health: Health,
}

/// What [`Inner::admit`] weighs a new message against.
#[derive(Clone, Copy, Debug)]
struct Counts {
    messages: u64,
    bytes: u64,
    /// Messages stored on the new message's subject.
    subject_msgs: u64,
}

/// Whether an admitted message can be stored as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admission {
    Now,
    /// Its limits push older messages out, which must be read from the
    /// backend first.
    AfterRemovals,
}

/// A limit, with 0 meaning unlimited as in nats-server.
fn limit(value: Option<u64>) -> Option<u64> {
    value.filter(|&v| v > 0)
}

fn missing(what: &str) -> StoreError {
    StoreError::corrupt(format!("{what} is indexed but not stored"))
}

impl<B: Backend> StreamEngine<B> {
    /// An engine over an empty backend.
    pub fn empty(backend: B, limits: StoreLimits) -> Self {
        Self::build(
            backend,
            limits,
            PersistedState::default(),
            (1, 0),
            SubjectMap::default(),
        )
    }

    /// Builds the engine from what the backend recovered, checking that
    /// the pieces agree.
    pub fn recover(backend: B, limits: StoreLimits, recovered: Recovered) -> Result<Self> {
        let Recovered {
            state,
            first,
            subjects,
        } = recovered;
        let first = match first {
            Some((seq, ts)) if seq <= state.last_seq && state.messages > 0 => (seq, ts),
            None if state.messages == 0 => (state.last_seq + 1, 0),
            _ => {
                return Err(StoreError::corrupt(format!(
                    "recorded {} messages up to sequence {}, found first message {first:?}",
                    state.messages, state.last_seq
                )))
            }
        };
        Ok(Self::build(
            backend,
            limits,
            state,
            first,
            subjects.into_iter().collect(),
        ))
    }

    fn build(
        backend: B,
        limits: StoreLimits,
        state: PersistedState,
        (first_seq, first_ts): (u64, i64),
        subjects: SubjectMap,
    ) -> Self {
        let durability = backend.durability();
        StreamEngine {
            inner: RwLock::new(Inner {
                backend,
                limits,
                messages: state.messages,
                bytes: state.bytes,
                first_seq,
                first_ts,
                last_seq: state.last_seq,
                last_ts: state.last_ts,
                commits: state.commits,
                subjects,
                health: Health::Open,
            }),
            durability,
        }
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, Inner<B>>> {
        let guard = self.inner.read();
        guard.check()?;
        Ok(guard)
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, Inner<B>>> {
        let guard = self.inner.write();
        guard.check()?;
        Ok(guard)
    }
}

impl<B: Backend> std::fmt::Debug for StreamEngine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.read();
        f.debug_struct("StreamEngine")
            .field("state", &inner.state())
            .field("limits", &inner.limits)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Drop for StreamEngine<B> {
    fn drop(&mut self) {
        let inner = self.inner.get_mut();
        if matches!(inner.health, Health::Open) {
            let subjects: Vec<(Bytes, SubjectState)> = inner
                .subjects
                .iter()
                .map(|(k, s)| (k.clone(), *s))
                .collect();
            let state = inner.persisted();
            inner.backend.close(&state, &subjects);
        }
    }
}

/// The message to store under `seq`.
fn owned_message(
    seq: u64,
    subject: Bytes,
    header_len: usize,
    payload: Bytes,
    timestamp: i64,
) -> StoredMessage {
    StoredMessage {
        seq,
        subject,
        header_len,
        payload,
        timestamp,
    }
}

/// The error of a writer whose staged messages could not be committed.
fn batch_failed(context: &str, why: String) -> StoreError {
    StoreError::Io {
        context: context.into(),
        source: std::io::Error::other(why),
    }
}

/// Checks an append's arguments before any lock is taken.
fn validate_append(subject: &[u8], header_len: usize, payload: &[u8]) -> Result<()> {
    if subject.is_empty() || subject.len() > u16::MAX as usize {
        return Err(StoreError::Invalid(format!(
            "subject length {} not in 1..=65535",
            subject.len()
        )));
    }
    // 0x00 separates subject from sequence in the file store's index keys.
    if subject.contains(&0) {
        return Err(StoreError::Invalid("subject contains a NUL byte".into()));
    }
    if header_len > payload.len() {
        return Err(StoreError::Invalid(format!(
            "header length {header_len} exceeds payload length {}",
            payload.len()
        )));
    }
    if payload.len() > u32::MAX as usize / 2 {
        return Err(StoreError::MaxMsgSize);
    }
    Ok(())
}

impl<B: Backend> Inner<B> {
    fn check(&self) -> Result<()> {
        match &self.health {
            Health::Open => Ok(()),
            Health::Closed => Err(StoreError::Closed),
            Health::Broken(why) => Err(StoreError::corrupt(format!(
                "store must be reopened after a failed update: {why}"
            ))),
        }
    }

    fn persisted(&self) -> PersistedState {
        PersistedState {
            last_seq: self.last_seq,
            last_ts: self.last_ts,
            messages: self.messages,
            bytes: self.bytes,
            commits: self.commits,
        }
    }

    fn state(&self) -> StreamState {
        StreamState {
            messages: self.messages,
            bytes: self.bytes,
            first_seq: self.first_seq,
            first_ts: self.first_ts,
            last_seq: self.last_seq,
            last_ts: self.last_ts,
            num_subjects: self.subjects.len() as u64,
            num_deleted: (self.last_seq + 1)
                .saturating_sub(self.first_seq)
                .saturating_sub(self.messages),
        }
    }

    /// Commits one batch, then updates the in-memory view to match.
    /// `new_last` raises `last_seq` (a compaction past the end).
    fn apply(
        &mut self,
        puts: &[StoredMessage],
        removed: &[Removal],
        new_last: Option<u64>,
    ) -> Result<()> {
        if puts.is_empty() && removed.is_empty() && new_last.is_none() {
            return Ok(());
        }
        let mut next = self.persisted();
        next.commits += 1;
        for r in removed {
            next.messages = next
                .messages
                .checked_sub(1)
                .ok_or_else(|| StoreError::corrupt("removing more messages than stored"))?;
            next.bytes = next.bytes.saturating_sub(r.size);
        }
        for m in puts {
            next.messages += 1;
            next.bytes += m.size();
            next.last_seq = m.seq;
            next.last_ts = m.timestamp;
        }
        if let Some(last) = new_last {
            next.last_seq = next.last_seq.max(last);
        }
        self.backend.commit(Batch {
            puts,
            removed,
            state: next,
        })?;
        // The disk has changed: if memory cannot follow, stop serving.
        if let Err(e) = self.follow(puts, removed, next) {
            self.health = Health::Broken(e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// Brings counters and the subject summary in line with a committed batch.
    fn follow(
        &mut self,
        puts: &[StoredMessage],
        removed: &[Removal],
        next: PersistedState,
    ) -> Result<()> {
        let old_first = self.first_seq;
        let was_empty = self.messages == 0;
        let mut first_removed = false;
        let mut stale: Vec<Bytes> = Vec::new();
        for r in removed {
            first_removed |= r.seq == old_first;
            let Some(s) = self.subjects.get_mut(&r.subject) else {
                return Err(StoreError::corrupt(format!(
                    "removed message {} of an unknown subject",
                    r.seq
                )));
            };
            s.msgs -= 1;
            if s.msgs == 0 {
                self.subjects.remove(&r.subject);
            } else if r.seq == s.first || r.seq == s.last {
                stale.push(r.subject.clone());
            }
        }
        for m in puts {
            self.subjects
                .entry(m.subject.clone())
                .and_modify(|s| {
                    s.msgs += 1;
                    s.last = m.seq;
                })
                .or_insert(SubjectState {
                    msgs: 1,
                    first: m.seq,
                    last: m.seq,
                });
        }
        self.messages = next.messages;
        self.bytes = next.bytes;
        self.last_seq = next.last_seq;
        self.last_ts = next.last_ts;
        self.commits = next.commits;
        stale.sort_unstable();
        stale.dedup();
        for subject in stale {
            self.refresh_subject(&subject)?;
        }
        if self.messages == 0 {
            self.first_seq = self.last_seq + 1;
            self.first_ts = 0;
        } else if was_empty || first_removed {
            let first = self
                .backend
                .messages_from(old_first)
                .next()
                .transpose()?
                .ok_or_else(|| StoreError::corrupt("stream has messages but no first one"))?;
            self.first_seq = first.seq;
            self.first_ts = first.timestamp;
        }
        Ok(())
    }

    /// Re-reads a subject's first and last sequence after some were removed.
    fn refresh_subject(&mut self, subject: &Bytes) -> Result<()> {
        let Some(s) = self.subjects.get(subject).copied() else {
            return Ok(());
        };
        let first = self.backend.subject_from(subject, s.first).next();
        let last = self.backend.subject_rev(subject, s.last).next();
        let (Some(first), Some(last)) = (first.transpose()?, last.transpose()?) else {
            return Err(StoreError::corrupt("subject counted but not indexed"));
        };
        if let Some(s) = self.subjects.get_mut(subject) {
            s.first = first.seq;
            s.last = last.seq;
        }
        Ok(())
    }

    /// Calls `f` once for every known subject matching `filter`.
    fn for_each_matching(&self, filter: &Filter<'_>, mut f: impl FnMut(&Bytes, &SubjectState)) {
        match filter {
            Filter::Literals(literals) => {
                for (i, l) in literals.iter().enumerate() {
                    // A literal listed twice must not count twice.
                    if literals[..i].contains(l) {
                        continue;
                    }
                    if let Some((k, s)) = self.subjects.get_key_value(l) {
                        f(k, s);
                    }
                }
            }
            _ => {
                for (k, s) in &self.subjects {
                    if filter.matches(k) {
                        f(k, s);
                    }
                }
            }
        }
    }

    fn matching_subjects(&self, filter: &Filter<'_>) -> Vec<(Bytes, SubjectState)> {
        let mut out = Vec::new();
        self.for_each_matching(filter, |k, s| out.push((k.clone(), *s)));
        out
    }

    fn get_indexed(&self, seq: u64) -> Result<StoredMessage> {
        self.backend
            .get(seq)?
            .ok_or_else(|| missing(&format!("message {seq}")))
    }

    // ---- append ----

    /// Refuses a message the limits do not let in, given the stream's
    /// `counts` (including anything staged but not yet committed), and says
    /// whether storing it means removing older messages first.
    fn admit(&self, subject: &[u8], payload_len: usize, counts: Counts) -> Result<Admission> {
        let size = message_size(subject.len(), payload_len);
        if limit(self.limits.max_msg_size).is_some_and(|max| payload_len as u64 > max) {
            return Err(StoreError::MaxMsgSize);
        }
        let at_subject_limit =
            limit(self.limits.max_msgs_per_subject).is_some_and(|max| counts.subject_msgs >= max);
        if self.limits.discard_new {
            self.check_discard_new(subject, size, at_subject_limit, counts)?;
        } else if limit(self.limits.max_bytes).is_some_and(|max| size > max) {
            // With discard old it would push out everything and still not fit.
            return Err(StoreError::MaxBytes);
        }
        let over =
            !self.limits.discard_new && self.over_limits(counts.messages + 1, counts.bytes + size);
        Ok(if at_subject_limit || over {
            Admission::AfterRemovals
        } else {
            Admission::Now
        })
    }

    /// Whether a stream of `msgs` messages and `bytes` bytes breaks
    /// `max_msgs` or `max_bytes`.
    fn over_limits(&self, msgs: u64, bytes: u64) -> bool {
        limit(self.limits.max_msgs).is_some_and(|m| msgs > m)
            || limit(self.limits.max_bytes).is_some_and(|m| bytes > m)
    }

    /// The counts [`Inner::admit`] needs for a message on `subject`, with
    /// nothing staged.
    fn counts(&self, subject: &[u8]) -> Counts {
        Counts {
            messages: self.messages,
            bytes: self.bytes,
            subject_msgs: self.subjects.get(subject).map_or(0, |s| s.msgs),
        }
    }

    /// Stores one message now, removing what its limits push out.
    fn append(
        &mut self,
        subject: Bytes,
        header_len: usize,
        payload: Bytes,
        timestamp: i64,
    ) -> Result<u64> {
        let admission = self.admit(&subject, payload.len(), self.counts(&subject))?;
        let msg = owned_message(self.last_seq + 1, subject, header_len, payload, timestamp);
        let mut removed = Vec::new();
        if admission == Admission::AfterRemovals {
            if let Some(max) = limit(self.limits.max_msgs_per_subject) {
                let excess = (self.counts(&msg.subject).subject_msgs + 1).saturating_sub(max);
                self.collect_subject_oldest(&msg.subject, excess, &mut removed)?;
            }
            if !self.limits.discard_new {
                self.collect_over_limits(1, msg.size(), &mut removed)?;
            }
        }
        self.apply(std::slice::from_ref(&msg), &removed, None)?;
        Ok(msg.seq)
    }

    /// The refusals of `discard: new`, with nats-server's rules: a subject
    /// at its own limit replaces its oldest message, so it passes the stream
    /// limits if that frees enough; the bytes limit refuses at `>=`.
    fn check_discard_new(
        &self,
        subject: &[u8],
        size: u64,
        at_subject_limit: bool,
        counts: Counts,
    ) -> Result<()> {
        if at_subject_limit && self.limits.discard_new_per_subject {
            return Err(StoreError::MaxMsgsPerSubject);
        }
        if limit(self.limits.max_msgs).is_some_and(|max| counts.messages >= max)
            && !at_subject_limit
        {
            return Err(StoreError::MaxMsgs);
        }
        if limit(self.limits.max_bytes).is_some_and(|max| counts.bytes + size >= max) {
            if !at_subject_limit {
                return Err(StoreError::MaxBytes);
            }
            let first = self.subjects.get(subject).map_or(0, |s| s.first);
            let oldest = self
                .backend
                .subject_from(subject, first)
                .next()
                .transpose()?;
            if oldest.is_none_or(|e| e.size < size) {
                return Err(StoreError::MaxBytes);
            }
        }
        Ok(())
    }

    /// Adds the `count` oldest messages of `subject` to `out`.
    fn collect_subject_oldest(
        &self,
        subject: &Bytes,
        count: u64,
        out: &mut Vec<Removal>,
    ) -> Result<()> {
        if count == 0 {
            return Ok(());
        }
        for entry in self.backend.subject_from(subject, 0).take(count as usize) {
            let e = entry?;
            out.push(Removal {
                seq: e.seq,
                subject: subject.clone(),
                size: e.size,
            });
        }
        Ok(())
    }

    /// With `discard: old`: adds the oldest messages to `out` until the
    /// stream, after adding `add_msgs`/`add_bytes` and removing `out`, is
    /// within `max_msgs` and `max_bytes`.
    fn collect_over_limits(
        &self,
        add_msgs: u64,
        add_bytes: u64,
        out: &mut Vec<Removal>,
    ) -> Result<()> {
        let mut msgs = self.messages + add_msgs;
        let mut bytes = self.bytes + add_bytes;
        for r in out.iter() {
            msgs -= 1;
            bytes = bytes.saturating_sub(r.size);
        }
        if !self.over_limits(msgs, bytes) {
            return Ok(());
        }
        let already: HashSet<u64> = out.iter().map(|r| r.seq).collect();
        for m in self.backend.messages_from(self.first_seq) {
            let m = m?;
            if already.contains(&m.seq) {
                continue;
            }
            msgs -= 1;
            bytes = bytes.saturating_sub(m.size());
            out.push(m.into());
            if !self.over_limits(msgs, bytes) {
                return Ok(());
            }
        }
        // Only the new message is left and it does not fit.
        Err(if limit(self.limits.max_bytes).is_some_and(|m| bytes > m) {
            StoreError::MaxBytes
        } else {
            StoreError::MaxMsgs
        })
    }

    // ---- reads ----

    fn next_matching(&self, from: u64, filters: &[Bytes]) -> Result<Option<StoredMessage>> {
        let from = from.max(self.first_seq);
        if self.messages == 0 || from > self.last_seq {
            return Ok(None);
        }
        let filter = Filter::new(filters);
        if matches!(filter, Filter::All) {
            return self.backend.messages_from(from).next().transpose();
        }
        // Subjects whose first message is at or after `from` give a
        // candidate for free; the others need an index seek.
        let mut best: Option<u64> = None;
        let mut to_seek: Vec<Bytes> = Vec::new();
        self.for_each_matching(&filter, |subject, s| {
            if s.first >= from {
                best = Some(best.map_or(s.first, |b| b.min(s.first)));
            } else if s.last >= from {
                to_seek.push(subject.clone());
            }
        });
        let bound = best.unwrap_or(self.last_seq + 1);
        if !to_seek.is_empty() {
            if to_seek.len() <= MAX_SEEKS && (to_seek.len() as u64) < bound - from {
                for subject in &to_seek {
                    if let Some(e) = self.backend.subject_from(subject, from).next() {
                        let seq = e?.seq;
                        best = Some(best.map_or(seq, |b| b.min(seq)));
                    }
                }
            } else {
                for m in self.backend.messages_from(from) {
                    let m = m?;
                    if m.seq >= bound {
                        break;
                    }
                    if filter.matches(&m.subject) {
                        return Ok(Some(m));
                    }
                }
            }
        }
        best.map(|seq| self.get_indexed(seq)).transpose()
    }

    fn last_for_subject(&self, pattern: &[u8]) -> Result<Option<StoredMessage>> {
        let filters = [Bytes::copy_from_slice(pattern)];
        let filter = Filter::new(&filters);
        let seq = if matches!(filter, Filter::All) {
            self.backend.seqs_rev(self.last_seq).next().transpose()?
        } else {
            let mut last = None;
            self.for_each_matching(&filter, |_, s| last = last.max(Some(s.last)));
            last
        };
        seq.map(|seq| self.get_indexed(seq)).transpose()
    }

    fn last_per_subject_seqs(&self, filters: &[Bytes]) -> Result<Vec<u64>> {
        let mut seqs = Vec::new();
        self.for_each_matching(&Filter::new(filters), |_, s| seqs.push(s.last));
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Binary search over sequences: the first stored message at or after
    /// a sequence is found with one seek, so gaps cost nothing extra.
    fn seq_for_time(&self, timestamp: i64) -> Result<u64> {
        if self.messages == 0 {
            return Ok(self.last_seq + 1);
        }
        if timestamp <= self.first_ts {
            return Ok(self.first_seq);
        }
        // Invariant: the first message at or after `lo` is older than
        // `timestamp`; the first at or after `hi` (if any) is not.
        let (mut lo, mut hi) = (self.first_seq, self.last_seq + 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            match self.backend.messages_from(mid).next().transpose()? {
                Some(m) if m.seq < hi && m.timestamp < timestamp => lo = m.seq.max(mid),
                _ => hi = mid,
            }
        }
        Ok(self
            .backend
            .seqs_from(hi)
            .next()
            .transpose()?
            .unwrap_or(self.last_seq + 1))
    }

    fn num_pending(&self, from: u64, filters: &[Bytes]) -> Result<u64> {
        let from = from.max(self.first_seq);
        if self.messages == 0 || from > self.last_seq {
            return Ok(0);
        }
        let filter = Filter::new(filters);
        if matches!(filter, Filter::All) {
            return self.count_stream_from(from);
        }
        let mut total = 0;
        let mut partial = Vec::new();
        self.for_each_matching(&filter, |subject, s| {
            if s.first >= from {
                total += s.msgs;
            } else if s.last >= from {
                partial.push((subject.clone(), *s));
            }
        });
        for (subject, s) in partial {
            total += self.count_subject_from(&subject, s, from)?;
        }
        Ok(total)
    }

    /// Stored messages with sequence `>= from` (`first_seq < from <= last_seq`),
    /// counting whichever side of `from` is shorter.
    fn count_stream_from(&self, from: u64) -> Result<u64> {
        if from <= self.first_seq {
            return Ok(self.messages);
        }
        if self.state().num_deleted == 0 {
            return Ok(self.last_seq - from + 1);
        }
        if self.last_seq - from < from - self.first_seq {
            count(self.backend.seqs_from(from))
        } else {
            let before = count(self.backend.seqs_rev(from - 1))?;
            Ok(self.messages.saturating_sub(before))
        }
    }

    /// Messages of one subject with sequence `>= from` (`s.first < from <= s.last`).
    fn count_subject_from(&self, subject: &[u8], s: SubjectState, from: u64) -> Result<u64> {
        if s.last - from < from - s.first {
            count(self.backend.subject_from(subject, from))
        } else {
            let before = count(self.backend.subject_rev(subject, from - 1))?;
            Ok(s.msgs.saturating_sub(before))
        }
    }

    fn subjects(&self, filter: &[u8]) -> Vec<(Bytes, u64)> {
        let filters = [Bytes::copy_from_slice(filter)];
        let mut out: Vec<(Bytes, u64)> = self
            .matching_subjects(&Filter::new(&filters))
            .into_iter()
            .map(|(k, s)| (k, s.msgs))
            .collect();
        out.sort_unstable();
        out
    }

    // ---- removal ----

    fn delete(&mut self, seq: u64) -> Result<bool> {
        let Some(m) = self.backend.get(seq)? else {
            return Ok(false);
        };
        self.apply(&[], &[m.into()], None)?;
        Ok(true)
    }

    fn purge(
        &mut self,
        filter: Option<&[u8]>,
        up_to: Option<u64>,
        keep: Option<u64>,
    ) -> Result<u64> {
        let keep = keep.filter(|&k| k > 0);
        let filter = filter
            .filter(|f| !f.is_empty() && *f != b">")
            .map(Bytes::copy_from_slice);
        let mut cutoff = up_to.unwrap_or(u64::MAX);
        let mut new_last = None;
        let subjects: Vec<(Bytes, SubjectState)> = match filter {
            None => {
                if let Some(k) = keep {
                    if k >= self.messages {
                        return Ok(0);
                    }
                    cutoff = cutoff.min(self.stream_keep_cutoff(k)?);
                } else if up_to.is_some_and(|s| s > self.last_seq + 1) {
                    // JetStream's compact past the end: the next message
                    // gets sequence `up_to`.
                    new_last = Some(cutoff - 1);
                }
                self.matching_subjects(&Filter::All)
            }
            Some(f) => {
                let filters = [f];
                let subjects = self.matching_subjects(&Filter::new(&filters));
                if let Some(k) = keep {
                    let total: u64 = subjects.iter().map(|(_, s)| s.msgs).sum();
                    if k >= total {
                        return Ok(0);
                    }
                    cutoff = cutoff.min(self.subjects_keep_cutoff(&subjects, k, total)?);
                }
                subjects
            }
        };
        let subjects: Vec<Bytes> = subjects
            .into_iter()
            .filter(|(_, s)| s.first < cutoff)
            .map(|(k, _)| k)
            .collect();
        self.remove_below(&subjects, cutoff, new_last)
    }

    /// The sequence from which the newest `keep` messages of the stream start
    /// (`0 < keep < messages`), walking from the nearer end.
    fn stream_keep_cutoff(&self, keep: u64) -> Result<u64> {
        let found = if keep <= self.messages - keep {
            self.backend.seqs_rev(self.last_seq).nth(keep as usize - 1)
        } else {
            self.backend
                .seqs_from(self.first_seq)
                .nth((self.messages - keep) as usize)
        };
        found
            .transpose()?
            .ok_or_else(|| StoreError::corrupt("fewer messages stored than counted"))
    }

    /// The sequence from which the newest `keep` messages of `subjects`
    /// start (`0 < keep < total`): a merge of their index entries in
    /// sequence order, from the nearer end.
    fn subjects_keep_cutoff(
        &self,
        subjects: &[(Bytes, SubjectState)],
        keep: u64,
        total: u64,
    ) -> Result<u64> {
        let from_end = keep <= total - keep;
        let mut iters: Vec<Iter<'_, IndexEntry>> = subjects
            .iter()
            .map(|(k, _)| {
                if from_end {
                    self.backend.subject_rev(k, u64::MAX)
                } else {
                    self.backend.subject_from(k, 0)
                }
            })
            .collect();
        // Max-heap on the order key: newest first from the end, oldest
        // first from the start.
        let key = |seq: u64| if from_end { seq } else { u64::MAX - seq };
        let mut heap = BinaryHeap::new();
        for (i, it) in iters.iter_mut().enumerate() {
            if let Some(e) = it.next().transpose()? {
                heap.push((key(e.seq), Reverse(i)));
            }
        }
        let skip = if from_end { keep - 1 } else { total - keep };
        let mut seen = 0;
        while let Some((k, Reverse(i))) = heap.pop() {
            if seen == skip {
                return Ok(key(k));
            }
            seen += 1;
            if let Some(e) = iters[i].next().transpose()? {
                heap.push((key(e.seq), Reverse(i)));
            }
        }
        Err(StoreError::corrupt("fewer messages indexed than counted"))
    }

    /// Removes every message of `subjects` below `cutoff`, in batches.
    fn remove_below(
        &mut self,
        subjects: &[Bytes],
        cutoff: u64,
        new_last: Option<u64>,
    ) -> Result<u64> {
        let mut pending: Vec<Removal> = Vec::new();
        let mut total = 0;
        for subject in subjects {
            let mut cursor = 0;
            loop {
                let mut full = false;
                for entry in self.backend.subject_from(subject, cursor) {
                    let e = entry?;
                    if e.seq >= cutoff {
                        break;
                    }
                    cursor = e.seq + 1;
                    pending.push(Removal {
                        seq: e.seq,
                        subject: subject.clone(),
                        size: e.size,
                    });
                    if pending.len() >= CHUNK {
                        full = true;
                        break;
                    }
                }
                if !full {
                    break;
                }
                total += pending.len() as u64;
                self.apply(&[], &pending, None)?;
                pending.clear();
            }
        }
        total += pending.len() as u64;
        self.apply(&[], &pending, new_last)?;
        Ok(total)
    }

    /// Removes the oldest messages while `expired` says so, in batches.
    fn remove_oldest_while(
        &mut self,
        mut expired: impl FnMut(&StoredMessage, u64, u64) -> bool,
    ) -> Result<u64> {
        let mut total = 0;
        loop {
            let mut pending = Vec::new();
            let (mut msgs, mut bytes) = (self.messages, self.bytes);
            for m in self.backend.messages_from(self.first_seq) {
                let m = m?;
                if !expired(&m, msgs, bytes) {
                    break;
                }
                msgs -= 1;
                bytes = bytes.saturating_sub(m.size());
                pending.push(m.into());
                if pending.len() >= CHUNK {
                    break;
                }
            }
            let done = pending.len() < CHUNK;
            total += pending.len() as u64;
            self.apply(&[], &pending, None)?;
            if done {
                return Ok(total);
            }
        }
    }

    fn expire(&mut self, now: i64) -> Result<u64> {
        let Some(max_age) = self.limits.max_age.filter(|a| !a.is_zero()) else {
            return Ok(0);
        };
        let max_age = i64::try_from(max_age.as_nanos()).unwrap_or(i64::MAX);
        let oldest_kept = now.saturating_sub(max_age);
        self.remove_oldest_while(|m, _, _| m.timestamp <= oldest_kept)
    }

    fn update_limits(&mut self, limits: StoreLimits) -> Result<u64> {
        self.limits = limits;
        let mut total = 0;
        if let Some(max) = limit(self.limits.max_msgs_per_subject) {
            let over: Vec<(Bytes, u64)> = self
                .subjects
                .iter()
                .filter(|(_, s)| s.msgs > max)
                .map(|(k, s)| (k.clone(), s.msgs - max))
                .collect();
            for (subject, excess) in over {
                let mut removed = Vec::new();
                let mut left = excess;
                while left > 0 {
                    removed.clear();
                    self.collect_subject_oldest(&subject, left.min(CHUNK as u64), &mut removed)?;
                    if removed.is_empty() {
                        break;
                    }
                    left -= removed.len() as u64;
                    total += removed.len() as u64;
                    self.apply(&[], &removed, None)?;
                }
            }
        }
        if !self.limits.discard_new {
            let (max_msgs, max_bytes) = (limit(self.limits.max_msgs), limit(self.limits.max_bytes));
            total += self.remove_oldest_while(|_, msgs, bytes| {
                max_msgs.is_some_and(|m| msgs > m) || max_bytes.is_some_and(|m| bytes > m)
            })?;
        }
        Ok(total)
    }
}

fn count<T>(iter: Iter<'_, T>) -> Result<u64> {
    let mut n = 0;
    for item in iter {
        item?;
        n += 1;
    }
    Ok(n)
}

/// Appends staged under the engine's write lock and committed together
/// (see [`StreamStore::writer`]).
///
/// Staged messages are not in `inner` yet: the counts and sequences the
/// writer reports add them on top. Only messages that need no reads from
/// the backend are staged; one whose limits push older messages out, or one
/// on a subject with a staged message under a per-subject limit, first
/// commits what is staged and is then appended on its own.
struct Writer<'a, B: Backend> {
    inner: RwLockWriteGuard<'a, Inner<B>>,
    staged: Vec<StoredMessage>,
    staged_bytes: u64,
    /// Subjects with a staged message; kept only under a per-subject limit.
    staged_subjects: HashSet<Bytes, ahash::RandomState>,
    /// Why committing staged messages failed: later appends fail too, so
    /// that what is stored stays a prefix of what was asked.
    failed: Option<String>,
}

impl<B: Backend> Writer<'_, B> {
    fn counts(&self, subject: &[u8]) -> Counts {
        let mut counts = self.inner.counts(subject);
        counts.messages += self.staged.len() as u64;
        counts.bytes += self.staged_bytes;
        counts
    }

    fn stage(&mut self, subject: Bytes, header_len: usize, payload: Bytes, ts: i64) -> u64 {
        let msg = owned_message(self.last_seq() + 1, subject, header_len, payload, ts);
        let seq = msg.seq;
        self.staged_bytes += msg.size();
        if limit(self.inner.limits.max_msgs_per_subject).is_some() {
            self.staged_subjects.insert(msg.subject.clone());
        }
        self.staged.push(msg);
        seq
    }

    fn flush(&mut self) -> Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let staged = std::mem::take(&mut self.staged);
        self.staged_bytes = 0;
        self.staged_subjects.clear();
        self.inner
            .apply(&staged, &[], None)
            .inspect_err(|e| self.failed = Some(e.to_string()))
    }
}

impl<B: Backend> StoreWriter for Writer<'_, B> {
    fn append(
        &mut self,
        subject: Bytes,
        header_len: usize,
        payload: Bytes,
        timestamp: i64,
    ) -> Result<u64> {
        if let Some(why) = &self.failed {
            return Err(batch_failed(
                "an earlier write of this batch failed",
                why.clone(),
            ));
        }
        self.inner.check()?;
        validate_append(&subject, header_len, &payload)?;
        if !self.staged_subjects.is_empty() && self.staged_subjects.contains(&subject) {
            self.flush()?;
        }
        match self
            .inner
            .admit(&subject, payload.len(), self.counts(&subject))?
        {
            Admission::Now => Ok(self.stage(subject, header_len, payload, timestamp)),
            Admission::AfterRemovals => {
                self.flush()?;
                self.inner.append(subject, header_len, payload, timestamp)
            }
        }
    }

    fn last_seq(&self) -> u64 {
        self.inner.last_seq + self.staged.len() as u64
    }

    fn last_seq_for_subject(&self, subject: &[u8]) -> u64 {
        let staged = self.staged.iter().rev().find(|m| m.subject == subject);
        staged.map_or_else(
            || self.inner.subjects.get(subject).map_or(0, |s| s.last),
            |m| m.seq,
        )
    }

    fn commit(mut self: Box<Self>) -> Result<()> {
        self.flush()?;
        match self.failed.take() {
            Some(why) => Err(batch_failed("write batch", why)),
            None => Ok(()),
        }
    }
}

impl<B: Backend> StreamStore for StreamEngine<B> {
    fn writer(&self) -> Result<Box<dyn StoreWriter + '_>> {
        Ok(Box::new(Writer {
            inner: self.write()?,
            staged: Vec::new(),
            staged_bytes: 0,
            staged_subjects: HashSet::default(),
            failed: None,
        }))
    }

    fn get(&self, seq: u64) -> Result<Option<StoredMessage>> {
        self.read()?.backend.get(seq)
    }

    fn next_matching(&self, from_seq: u64, filters: &[Bytes]) -> Result<Option<StoredMessage>> {
        self.read()?.next_matching(from_seq, filters)
    }

    fn last_for_subject(&self, pattern: &[u8]) -> Result<Option<StoredMessage>> {
        self.read()?.last_for_subject(pattern)
    }

    fn last_per_subject_seqs(&self, filters: &[Bytes]) -> Result<Vec<u64>> {
        self.read()?.last_per_subject_seqs(filters)
    }

    fn seq_for_time(&self, timestamp: i64) -> Result<u64> {
        self.read()?.seq_for_time(timestamp)
    }

    fn num_pending(&self, from_seq: u64, filters: &[Bytes]) -> Result<u64> {
        self.read()?.num_pending(from_seq, filters)
    }

    fn delete(&self, seq: u64) -> Result<bool> {
        self.write()?.delete(seq)
    }

    fn purge(
        &self,
        filter: Option<&[u8]>,
        up_to_seq: Option<u64>,
        keep: Option<u64>,
    ) -> Result<u64> {
        self.write()?.purge(filter, up_to_seq, keep)
    }

    fn expire(&self, now: i64) -> Result<u64> {
        self.write()?.expire(now)
    }

    fn state(&self) -> StreamState {
        self.inner.read().state()
    }

    fn subjects(&self, filter: &[u8]) -> Result<Vec<(Bytes, u64)>> {
        Ok(self.read()?.subjects(filter))
    }

    fn limits(&self) -> StoreLimits {
        self.inner.read().limits.clone()
    }

    fn update_limits(&self, limits: StoreLimits) -> Result<u64> {
        self.write()?.update_limits(limits)
    }

    fn sync(&self) -> Result<()> {
        // Checked, then released: the fsync must not hold the engine's lock
        // or appends from other threads could not join the group commit.
        drop(self.read()?);
        self.durability.sync()
    }

    fn sync_count(&self) -> u64 {
        self.durability.sync_count()
    }

    fn save_meta(&self, meta: &[u8]) -> Result<()> {
        self.read()?.backend.save_meta(meta)
    }

    fn load_meta(&self) -> Result<Option<Vec<u8>>> {
        self.read()?.backend.load_meta()
    }

    fn save_consumer(&self, name: &str, record: &[u8]) -> Result<()> {
        self.read()?.backend.save_consumer(name, record)
    }

    fn load_consumers(&self) -> Result<Vec<(String, Vec<u8>)>> {
        self.read()?.backend.load_consumers()
    }

    fn delete_consumer(&self, name: &str) -> Result<bool> {
        self.read()?.backend.delete_consumer(name)
    }

    fn remove(&self) -> Result<()> {
        let mut inner = self.write()?;
        inner.health = Health::Closed;
        inner.backend.remove()
    }
}
