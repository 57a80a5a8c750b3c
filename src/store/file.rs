//! File storage (`storage: file`): every stream of the server in one fjall
//! database under `jetstream.store_dir`.
//!
//! Layout. A `catalog` keyspace maps `s/<stream name>` to a numeric id
//! (`next_id` holds the next one; ids are never reused, so a recreated
//! stream never meets its predecessor's files). Stream `N` has three
//! keyspaces:
//! - `mN`: messages, key = sequence (8 bytes big-endian, so key order is
//!   sequence order and a range read starts anywhere), value =
//!   `[version 1][timestamp i64][header_len u32][subject_len u16][subject][payload]`;
//! - `iN`: subject index, key = `subject ++ 0x00 ++ sequence`, value = the
//!   message's size (u64): a subject's messages are one key range, and
//!   purges and counts never read message bodies;
//! - `rN`: records: `state` (last sequence and timestamp, message and byte
//!   counts, batch count; rewritten in every batch), `summary` (the
//!   per-subject summary saved on clean close), `meta` (the stream config,
//!   opaque), `c/<consumer>` (each consumer's config and state, opaque).
//!
//! The catalog's `gen` key numbers every batch of the database, and the
//! file `skiff.synced` beside fjall's files holds the last number known
//! durable (see [`SyncGroup`]).
//!
//! Recovery reads `state` and the first and last message keys; the
//! per-subject summary comes from `summary` when it was saved at the
//! current batch count (a clean close), otherwise from a scan of the
//! subject index (after a crash). It never reads all message bodies. Every
//! change is one fjall batch, atomic across the three keyspaces, so the
//! pieces always agree; if they do not, opening fails with
//! [`StoreError::Corrupt`]. Dropping the last handle of a stream saves its
//! summary and syncs, so it blocks briefly.
//!
//! Durability. A batch reaches the OS when committed; [`SyncGroup`] turns
//! concurrent `sync` calls into shared fsyncs of the journal (one journal
//! for the whole database, so one fsync covers every stream), and detects
//! on open a journal that lost writes confirmed durable.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Slice};
use parking_lot::{Condvar, Mutex};
use smallvec::SmallVec;

use super::engine::{
    Backend, Batch, Durability, IndexEntry, Iter, PersistedState, Recovered, StreamEngine,
    SubjectState,
};
use super::{Faults, Result, StoreError, StoreLimits, StoredMessage, StreamStore};

/// A stream stored on disk; opened with [`FileStorage::open_stream`].
pub type FileStore = StreamEngine<FileBackend>;

const CATALOG: &str = "catalog";
const STREAM_PREFIX: &[u8] = b"s/";
const NEXT_ID: &[u8] = b"next_id";
const STATE_KEY: &[u8] = b"state";
const META_KEY: &[u8] = b"meta";
const CONSUMER_PREFIX: &[u8] = b"c/";

const MESSAGE_VERSION: u8 = 1;
const MESSAGE_HEADER: usize = 1 + 8 + 4 + 2;
const STATE_VERSION: u8 = 1;
const STATE_LEN: usize = 1 + 8 * 5;
const SUMMARY_KEY: &[u8] = b"summary";
const SUMMARY_VERSION: u8 = 1;

/// Turns an I/O error into a [`StoreError::Io`] that says what was being done.
fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io {
        context: context.into(),
        source,
    }
}

/// Turns an fjall error into a [`StoreError`]: I/O failures stay I/O,
/// anything about the content of files (checksums, truncation, bad tags) is
/// corruption.
fn fjall_error(context: impl Into<String>) -> impl FnOnce(fjall::Error) -> StoreError {
    move |e| {
        let context = context.into();
        let io_source = match e {
            fjall::Error::Io(source) | fjall::Error::Storage(fjall::LsmError::Io(source)) => source,
            fjall::Error::Locked => io::Error::new(
                io::ErrorKind::WouldBlock,
                "the store directory is in use by another process",
            ),
            fjall::Error::Poisoned => {
                io::Error::other("an earlier write or fsync failed; reopen the store")
            }
            other => {
                return StoreError::corrupt(format!("{context}: {other:?}"));
            }
        };
        match io_source.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => {
                StoreError::corrupt(format!("{context}: {io_source}"))
            }
            _ => io_error(context)(io_source),
        }
    }
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

fn decode_seq(key: &[u8]) -> Result<u64> {
    match key.try_into() {
        Ok(b) => Ok(u64::from_be_bytes(b)),
        Err(_) => Err(StoreError::corrupt(format!(
            "message key of {} bytes",
            key.len()
        ))),
    }
}

/// A message's stored value, written straight into the buffer fjall keeps
/// (one allocation and one copy of the body per message).
fn encode_message(m: &StoredMessage) -> io::Result<Slice> {
    let mut head = [0u8; MESSAGE_HEADER];
    head[0] = MESSAGE_VERSION;
    head[1..9].copy_from_slice(&m.timestamp.to_be_bytes());
    // Both fit: the engine refuses longer subjects and payloads.
    head[9..13].copy_from_slice(&(m.header_len as u32).to_be_bytes());
    head[13..15].copy_from_slice(&(m.subject.len() as u16).to_be_bytes());
    let len = MESSAGE_HEADER + m.subject.len() + m.payload.len();
    let mut parts = io::Read::chain(io::Read::chain(&head[..], &m.subject[..]), &m.payload[..]);
    Slice::from_reader(&mut parts, len)
}

fn decode_message(seq: u64, v: &[u8]) -> Result<StoredMessage> {
    let bad = |why: &str| StoreError::corrupt(format!("message {seq}: {why}"));
    if v.first() != Some(&MESSAGE_VERSION) || v.len() < MESSAGE_HEADER {
        return Err(bad("unknown version or short header"));
    }
    let timestamp = be_u64(v, 1).ok_or_else(|| bad("short header"))? as i64;
    let header_len = u32::from_be_bytes([v[9], v[10], v[11], v[12]]) as usize;
    let subject_len = u16::from_be_bytes([v[13], v[14]]) as usize;
    let rest = &v[MESSAGE_HEADER..];
    if subject_len == 0 || subject_len > rest.len() {
        return Err(bad("subject length out of range"));
    }
    let (subject, payload) = rest.split_at(subject_len);
    if header_len > payload.len() {
        return Err(bad("header length exceeds payload"));
    }
    Ok(StoredMessage {
        seq,
        subject: Bytes::copy_from_slice(subject),
        header_len,
        payload: Bytes::copy_from_slice(payload),
        timestamp,
    })
}

/// On the stack for the usual subject lengths: fjall copies keys anyway.
fn index_key(subject: &[u8], seq: u64) -> SmallVec<[u8; 64]> {
    let mut k = SmallVec::with_capacity(subject.len() + 9);
    k.extend_from_slice(subject);
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Splits an index key into subject and sequence.
fn split_index_key(key: &[u8]) -> Result<(&[u8], u64)> {
    let bad = || StoreError::corrupt(format!("index key of {} bytes", key.len()));
    let split = key
        .len()
        .checked_sub(9)
        .filter(|&s| s > 0)
        .ok_or_else(bad)?;
    if key[split] != 0 {
        return Err(bad());
    }
    let seq = be_u64(key, split + 1).ok_or_else(bad)?;
    Ok((&key[..split], seq))
}

fn decode_size(v: &[u8]) -> Result<u64> {
    match v.try_into() {
        Ok(b) => Ok(u64::from_be_bytes(b)),
        Err(_) => Err(StoreError::corrupt("index value is not a size")),
    }
}

fn encode_state(s: &PersistedState) -> [u8; STATE_LEN] {
    let mut v = [0u8; STATE_LEN];
    v[0] = STATE_VERSION;
    v[1..9].copy_from_slice(&s.last_seq.to_be_bytes());
    v[9..17].copy_from_slice(&s.last_ts.to_be_bytes());
    v[17..25].copy_from_slice(&s.messages.to_be_bytes());
    v[25..33].copy_from_slice(&s.bytes.to_be_bytes());
    v[33..41].copy_from_slice(&s.commits.to_be_bytes());
    v
}

fn decode_state(v: &[u8]) -> Result<PersistedState> {
    let bad = || StoreError::corrupt("stream state record malformed");
    if v.len() != STATE_LEN || v[0] != STATE_VERSION {
        return Err(bad());
    }
    Ok(PersistedState {
        last_seq: be_u64(v, 1).ok_or_else(bad)?,
        last_ts: be_u64(v, 9).ok_or_else(bad)? as i64,
        messages: be_u64(v, 17).ok_or_else(bad)?,
        bytes: be_u64(v, 25).ok_or_else(bad)?,
        commits: be_u64(v, 33).ok_or_else(bad)?,
    })
}

/// The subject summary saved on clean close:
/// `[version][commits][count]` then per subject
/// `[len u16][subject][msgs][first][last]`.
fn encode_summary(commits: u64, subjects: &[(Bytes, SubjectState)]) -> Vec<u8> {
    let size: usize = subjects.iter().map(|(k, _)| 2 + k.len() + 24).sum();
    let mut v = Vec::with_capacity(17 + size);
    v.push(SUMMARY_VERSION);
    v.extend_from_slice(&commits.to_be_bytes());
    v.extend_from_slice(&(subjects.len() as u64).to_be_bytes());
    for (subject, s) in subjects {
        // Subjects are at most u16::MAX bytes (checked on append).
        v.extend_from_slice(&(subject.len() as u16).to_be_bytes());
        v.extend_from_slice(subject);
        for n in [s.msgs, s.first, s.last] {
            v.extend_from_slice(&n.to_be_bytes());
        }
    }
    v
}

/// The summary if it is well formed and was saved at `commits`; `None`
/// otherwise (the caller then rebuilds from the index).
fn decode_summary(v: &[u8], commits: u64) -> Option<Vec<(Bytes, SubjectState)>> {
    if v.first() != Some(&SUMMARY_VERSION) || be_u64(v, 1)? != commits {
        return None;
    }
    let count = be_u64(v, 9)?;
    let mut at = 17;
    let mut out = Vec::with_capacity(count.min(1 << 20) as usize);
    for _ in 0..count {
        let len = u16::from_be_bytes(v.get(at..at + 2)?.try_into().ok()?) as usize;
        let subject = v.get(at + 2..at + 2 + len)?;
        at += 2 + len;
        let state = SubjectState {
            msgs: be_u64(v, at)?,
            first: be_u64(v, at + 8)?,
            last: be_u64(v, at + 16)?,
        };
        at += 24;
        out.push((Bytes::copy_from_slice(subject), state));
    }
    (at == v.len()).then_some(out)
}

/// Every write of the database goes through here: batches are numbered
/// (the generation, stored in the batch itself) and `sync` is a group
/// commit.
///
/// Group commit: `sync` callers that arrive while an fsync is running wait
/// for it and then for at most one more, which covers all their writes. A
/// caller's target is the generation committed when it calls (its own
/// writes included); the leader reads the committed generation just before
/// its fsync, and everything up to it is then in the journal.
///
/// The fsync is of fjall's active journal file through a handle of our own,
/// not `Database::persist`, which holds the journal's lock through its
/// fsync and so stalls every commit (of every stream) for as long: here
/// the next batches are written while the previous ones are fsynced. That
/// is sound because fjall fsyncs a journal before it rotates to the next
/// one: every batch committed before the leader lists the journals is in
/// the newest journal it finds or in an older one, already fsynced. And it
/// is in the file, not in fjall's write buffer: `commit` has fjall move the
/// buffer into the file before it releases the journal. (Flushing that
/// buffer from the leader instead, as `persist(Buffer)`, takes the
/// journal's lock, and so waited for whichever batch was being committed
/// before every fsync.)
/// A failed fsync is final (the kernel may have dropped the pages it could
/// not write, so a later fsync could succeed without them): every later
/// `sync` fails too, until the database is reopened.
///
/// Lost-write detection: fjall treats an undecodable journal batch as a torn
/// tail and silently drops it and everything after it, which after media
/// damage would lose writes that `sync` had confirmed. So after each fsync
/// the leader writes the synced generation to a marker file (no fsync of
/// its own: a stale marker only weakens the check), and opening refuses a
/// database whose recovered generation is below the marker's. The marker
/// is advisory: opening writes it whole (temp file, rename) before it is
/// ever rewritten in place, and one that cannot be read (a crash or power
/// loss at the wrong moment) is logged and skips the check, never the start.
pub struct SyncGroup {
    db: Database,
    catalog: Keyspace,
    /// The last committed generation; held while committing, so generations
    /// follow journal order.
    commit: Mutex<u64>,
    committed: AtomicU64,
    state: Mutex<SyncState>,
    done: Condvar,
    fsyncs: AtomicU64,
    /// `None` when it could not be written at open (see `open`).
    marker: Mutex<Option<std::fs::File>>,
    dir: PathBuf,
    /// The newest journal's id and a handle on it; used by the leader only.
    journal: Mutex<Option<(u64, std::fs::File)>>,
    faults: Faults,
}

struct SyncState {
    synced: u64,
    leader: bool,
    /// Set by a failed fsync, for good.
    failed: bool,
}

const GEN_KEY: &[u8] = b"gen";
/// Attempts to find and open the newest journal before falling back to
/// fjall's own (lock-holding) fsync.
const JOURNAL_TRIES: usize = 4;
const MARKER_FILE: &str = "skiff.synced";

impl SyncGroup {
    /// Resumes numbering from the database and checks it against the marker.
    fn open(db: Database, catalog: Keyspace, dir: &Path) -> Result<SyncGroup> {
        let recovered = match catalog.get(GEN_KEY).map_err(fjall_error("read catalog"))? {
            Some(v) => be_u64(&v, 0).ok_or_else(|| StoreError::corrupt("catalog generation"))?,
            None => 0,
        };
        let path = dir.join(MARKER_FILE);
        let synced = match std::fs::read(&path) {
            Ok(bytes) => match decode_marker(&bytes) {
                Some(synced) => synced,
                // Advisory: a crash before its first write leaves it empty,
                // a torn write may leave it short. Only the check is lost.
                None => {
                    tracing::warn!(
                        "{} is unreadable ({} bytes); not checking this start for lost writes",
                        path.display(),
                        bytes.len()
                    );
                    0
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => {
                tracing::warn!(
                    "cannot read {}: {e}; not checking this start for lost writes",
                    path.display()
                );
                0
            }
        };
        if recovered < synced {
            return Err(StoreError::corrupt(format!(
                "database in {} recovered writes up to #{recovered}, but #{synced} were \
                 confirmed durable: its journal is damaged (to open what remains, \
                 accepting the loss, remove {})",
                dir.display(),
                path.display()
            )));
        }
        // Written whole before it is ever rewritten in place, so that the
        // file never exists without a readable generation in it. Advisory:
        // should it not be written (a full disk), the store opens without it.
        let marker = crate::fsutil::write_atomically(&path, &encode_marker(recovered), None)
            .and_then(|()| std::fs::OpenOptions::new().write(true).open(&path))
            .map_err(|e| {
                tracing::warn!(
                    "cannot write {}: {e}; lost writes will not be detected at the next start",
                    path.display()
                )
            })
            .ok();
        Ok(SyncGroup {
            db,
            catalog,
            commit: Mutex::new(recovered),
            committed: AtomicU64::new(recovered),
            state: Mutex::new(SyncState {
                synced: recovered,
                leader: false,
                failed: false,
            }),
            done: Condvar::new(),
            fsyncs: AtomicU64::new(0),
            marker: Mutex::new(marker),
            dir: dir.to_path_buf(),
            journal: Mutex::new(None),
            faults: Faults::default(),
        })
    }

    /// Commits a batch (to the OS, not yet durable) under the next generation.
    fn commit(&self, batch: fjall::OwnedWriteBatch, context: String) -> Result<()> {
        // Into the journal file before fjall lets go of the journal, so that
        // the fsync leader finds it there without taking fjall's lock.
        // (fjall's default for batches; `sync` relies on it, hence explicit.)
        self.faults.check_commit()?;
        let mut batch = batch.durability(Some(PersistMode::Buffer));
        let mut generation = self.commit.lock();
        let next = *generation + 1;
        batch.insert(&self.catalog, GEN_KEY, next.to_be_bytes());
        batch.commit().map_err(fjall_error(context))?;
        *generation = next;
        self.committed.store(next, Ordering::SeqCst);
        Ok(())
    }

    /// Fsyncs the newest journal (see the type's doc for why that covers
    /// every committed batch). The directory is listed only when the
    /// journal in hand has a successor. A journal that vanishes between
    /// listing and opening was rotated, hence fsynced, meanwhile: list
    /// again; should that keep happening, fsync under fjall's lock.
    fn fsync_journal(&self) -> Result<()> {
        let io = |context: &str| io_error(format!("{context} in {}", self.dir.display()));
        let mut journal = self.journal.lock();
        for _ in 0..JOURNAL_TRIES {
            let newest = match journal.as_ref() {
                Some((id, _)) if !self.dir.join(format!("{}.jnl", id + 1)).exists() => *id,
                _ => newest_journal(&self.dir).map_err(io("list journals"))?,
            };
            if journal.as_ref().map(|(id, _)| *id) != Some(newest) {
                let path = self.dir.join(format!("{newest}.jnl"));
                match std::fs::File::open(&path) {
                    Ok(file) => *journal = Some((newest, file)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io("open journal")(e)),
                }
            }
            if let Some((_, file)) = journal.as_ref() {
                return file.sync_all().map_err(io("fsync journal"));
            }
        }
        self.db
            .persist(PersistMode::SyncAll)
            .map_err(fjall_error("fsync"))
    }

    fn write_marker(&self, synced: u64) -> Result<()> {
        use std::io::{Seek, Write};
        let file = self.marker.lock();
        let Some(mut f) = file.as_ref() else {
            return Ok(());
        };
        f.seek(io::SeekFrom::Start(0))
            .and_then(|_| f.write_all(&encode_marker(synced)))
            .map_err(io_error(format!("write {MARKER_FILE}")))
    }
}

/// The highest id among fjall's journals (`<id>.jnl`) in `dir`.
fn newest_journal(dir: &Path) -> io::Result<u64> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.strip_suffix(".jnl"))
            .and_then(|id| id.parse::<u64>().ok());
        newest = newest.max(id);
    }
    newest.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no journal file"))
}

/// The generation, then its complement, so that a damaged marker is seen.
fn encode_marker(synced: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&synced.to_be_bytes());
    v[8..].copy_from_slice(&(!synced).to_be_bytes());
    v
}

fn decode_marker(v: &[u8]) -> Option<u64> {
    match (be_u64(v, 0), be_u64(v, 8)) {
        (Some(a), Some(b)) if v.len() == 16 && a == !b => Some(a),
        _ => None,
    }
}

impl Durability for SyncGroup {
    fn sync(&self) -> Result<()> {
        self.faults.check_sync()?;
        let target = self.committed.load(Ordering::SeqCst);
        let mut state = self.state.lock();
        loop {
            if state.failed {
                return Err(io_error(format!("fsync in {}", self.dir.display()))(
                    io::Error::other("an earlier fsync failed; restart the server"),
                ));
            }
            if state.synced >= target {
                return Ok(());
            }
            if !state.leader {
                break;
            }
            self.done.wait(&mut state);
        }
        state.leader = true;
        drop(state);
        let upto = self.committed.load(Ordering::SeqCst);
        let result = self.fsync_journal().and_then(|()| self.write_marker(upto));
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock();
        state.leader = false;
        match &result {
            Ok(()) => state.synced = state.synced.max(upto),
            Err(_) => state.failed = true,
        }
        drop(state);
        self.done.notify_all();
        result
    }

    fn sync_count(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }
}

struct Shared {
    db: Database,
    catalog: Keyspace,
    sync: Arc<SyncGroup>,
    /// Streams currently open, so that one stream never has two engines.
    open: Mutex<HashMap<String, Weak<FileStore>>>,
    dir: PathBuf,
}

fn keyspace_names(id: u64) -> [String; 3] {
    [format!("m{id}"), format!("i{id}"), format!("r{id}")]
}

/// Options a keyspace is created with (fjall keeps them with it). Memtables
/// are sized by role: message bodies are the bulk; the record and catalog
/// keyspaces hold a few keys rewritten by every batch, whose versions pile
/// up in the memtable until it is flushed, so theirs are small.
fn keyspace_options(name: &str) -> KeyspaceCreateOptions {
    const MIB: u64 = 1024 * 1024;
    let memtable = match name.as_bytes().first() {
        Some(b'm') => 32 * MIB,
        Some(b'i') => 16 * MIB,
        _ => 4 * MIB,
    };
    KeyspaceCreateOptions::default().max_memtable_size(memtable)
}

/// Most journal kept before memtables are flushed: bounds both the memory
/// of unflushed writes and the replay on open.
const MAX_JOURNAL: u64 = 128 * 1024 * 1024;

/// The id of a keyspace named by [`keyspace_names`].
fn keyspace_id(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(['m', 'i', 'r'])?;
    rest.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| rest.parse().ok())
        .flatten()
}

fn stream_key(name: &str) -> Vec<u8> {
    [STREAM_PREFIX, name.as_bytes()].concat()
}

impl Shared {
    fn keyspace(&self, name: &str) -> Result<Keyspace> {
        self.db
            .keyspace(name, || keyspace_options(name))
            .map_err(fjall_error(format!("open keyspace {name}")))
    }

    fn stream_ids(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for guard in self.catalog.prefix(STREAM_PREFIX) {
            let (k, v) = guard.into_inner().map_err(fjall_error("read catalog"))?;
            let name = std::str::from_utf8(&k[STREAM_PREFIX.len()..])
                .map_err(|_| StoreError::corrupt("stream name in catalog is not UTF-8"))?;
            let id = be_u64(&v, 0)
                .filter(|_| v.len() == 8)
                .ok_or_else(|| StoreError::corrupt(format!("catalog entry of stream {name}")))?;
            out.push((name.to_string(), id));
        }
        Ok(out)
    }

    fn stream_id(&self, name: &str) -> Result<Option<u64>> {
        let Some(v) = self
            .catalog
            .get(stream_key(name))
            .map_err(fjall_error("read catalog"))?
        else {
            return Ok(None);
        };
        match be_u64(&v, 0).filter(|_| v.len() == 8) {
            Some(id) => Ok(Some(id)),
            None => Err(StoreError::corrupt(format!(
                "catalog entry of stream {name}"
            ))),
        }
    }

    /// Registers a new stream, with its own record (`meta`) in the same
    /// atomic batch: a stream is never found without the config it was
    /// created with. Its keyspaces are created first: a crash in between
    /// leaves orphans, which the next open deletes.
    fn create_stream(&self, name: &str, meta: Option<&[u8]>) -> Result<u64> {
        let id = match self
            .catalog
            .get(NEXT_ID)
            .map_err(fjall_error("read catalog"))?
        {
            Some(v) => be_u64(&v, 0).ok_or_else(|| StoreError::corrupt("catalog next_id"))?,
            None => 1,
        };
        let [.., records] = keyspace_names(id).map(|ks| self.keyspace(&ks));
        let records = records?;
        let mut batch = self.db.batch();
        if let Some(meta) = meta {
            batch.insert(&records, META_KEY, meta);
        }
        batch.insert(&self.catalog, stream_key(name), id.to_be_bytes());
        batch.insert(&self.catalog, NEXT_ID, (id + 1).to_be_bytes());
        self.sync.commit(batch, "write catalog".into())?;
        // Creating a stream is rare and the caller will rely on it. Not
        // durable, it is taken back, so that the caller's retry can create
        // it afresh (should that fail too, a restart finds it, complete).
        if let Err(e) = self.sync.sync() {
            if let Err(undo) = self.drop_stream(name, id) {
                tracing::warn!("stream {name}: undoing an unsynced creation failed: {undo}");
            }
            return Err(e);
        }
        Ok(id)
    }

    /// Unregisters a stream (durably) and deletes its keyspaces.
    fn drop_stream(&self, name: &str, id: u64) -> Result<()> {
        let mut batch = self.db.batch();
        batch.remove(&self.catalog, stream_key(name));
        self.sync.commit(batch, "write catalog".into())?;
        self.sync.sync()?;
        self.delete_keyspaces(id)
    }

    fn delete_keyspaces(&self, id: u64) -> Result<()> {
        for ks in keyspace_names(id) {
            if self.db.keyspace_exists(&ks) {
                let handle = self.keyspace(&ks)?;
                self.db
                    .delete_keyspace(handle)
                    .map_err(fjall_error(format!("delete keyspace {ks}")))?;
            }
        }
        Ok(())
    }

    /// Deletes keyspaces of streams that are not in the catalog (a crash
    /// between creating a stream's keyspaces and registering it).
    fn remove_orphans(&self) -> Result<()> {
        let known: HashSet<u64> = self.stream_ids()?.into_iter().map(|(_, id)| id).collect();
        let orphans: HashSet<u64> = self
            .db
            .list_keyspace_names()
            .iter()
            .filter_map(|name| keyspace_id(name))
            .filter(|id| !known.contains(id))
            .collect();
        for id in orphans {
            tracing::warn!(id, "deleting keyspaces of an unregistered stream");
            self.delete_keyspaces(id)?;
        }
        Ok(())
    }
}

/// Owns the database under one directory and opens, lists and deletes its
/// streams. Cheap to clone.
#[derive(Clone)]
pub struct FileStorage {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStorage")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

impl FileStorage {
    /// Opens (or creates) the database in `dir`. Fails if another process
    /// has it open, or with [`StoreError::Corrupt`] if its files are damaged.
    pub fn open(dir: impl AsRef<Path>) -> Result<FileStorage> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_error(format!("create {}", dir.display())))?;
        let context = format!("open store in {}", dir.display());
        let db = Database::builder(&dir)
            .max_journaling_size(MAX_JOURNAL)
            .open()
            .map_err(|e| {
                // The directory exists (created above): a missing file is one
                // the database's own metadata refers to.
                match fjall_error(context.clone())(e) {
                    StoreError::Io { context, source }
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        StoreError::corrupt(format!(
                            "{context}: a database file is missing: {source}"
                        ))
                    }
                    other => other,
                }
            })?;
        let catalog = db
            .keyspace(CATALOG, || keyspace_options(CATALOG))
            .map_err(fjall_error(context))?;
        let sync = Arc::new(SyncGroup::open(db.clone(), catalog.clone(), &dir)?);
        let shared = Arc::new(Shared {
            sync,
            db,
            catalog,
            open: Mutex::new(HashMap::new()),
            dir,
        });
        shared.remove_orphans()?;
        Ok(FileStorage { shared })
    }

    /// The directory this storage lives in.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Names of all stored streams, sorted.
    pub fn stream_names(&self) -> Result<Vec<String>> {
        Ok(self
            .shared
            .stream_ids()?
            .into_iter()
            .map(|(name, _)| name)
            .collect())
    }

    /// Whether a stream of this name is stored.
    pub fn contains(&self, name: &str) -> Result<bool> {
        Ok(self.shared.stream_id(name)?.is_some())
    }

    /// Opens stream `name`, creating it (durably) if it does not exist. A
    /// stream that is already open is returned as is, with `limits`
    /// applied. On restart, open with the limits from the stream's own
    /// record: `open_stream(name, default)` then `load_meta` and
    /// `update_limits`.
    pub fn open_stream(&self, name: &str, limits: StoreLimits) -> Result<Arc<FileStore>> {
        check_stream_name(name)?;
        let mut open = self.shared.open.lock();
        if let Some(store) = open.get(name).and_then(Weak::upgrade) {
            // Not under the registry lock: `remove` takes the engine's lock
            // and then the registry's.
            drop(open);
            store.update_limits(limits)?;
            return Ok(store);
        }
        let id = match self.shared.stream_id(name)? {
            Some(id) => id,
            None => self.shared.create_stream(name, None)?,
        };
        let store = self.start_stream(name, id, limits)?;
        open.insert(name.to_string(), Arc::downgrade(&store));
        Ok(store)
    }

    /// Creates stream `name` with its own record (see
    /// [`StreamStore::save_meta`]) in one atomic, synced write, so that a
    /// crash leaves either no stream or one with its config. Fails with
    /// [`StoreError::Invalid`] if the stream exists.
    pub fn create_stream(
        &self,
        name: &str,
        limits: StoreLimits,
        meta: &[u8],
    ) -> Result<Arc<FileStore>> {
        check_stream_name(name)?;
        let mut open = self.shared.open.lock();
        if self.shared.stream_id(name)?.is_some() {
            return Err(StoreError::Invalid(format!("stream {name} exists")));
        }
        let id = self.shared.create_stream(name, Some(meta))?;
        let store = self.start_stream(name, id, limits)?;
        open.insert(name.to_string(), Arc::downgrade(&store));
        Ok(store)
    }

    fn start_stream(&self, name: &str, id: u64, limits: StoreLimits) -> Result<Arc<FileStore>> {
        let backend = FileBackend::open(self.shared.clone(), name, id)?;
        let recovered = backend.recover()?;
        Ok(Arc::new(StreamEngine::recover(backend, limits, recovered)?))
    }

    /// Deletes stream `name` and all its data; `false` if there was none.
    /// An open handle to it fails with [`StoreError::Closed`] afterwards.
    pub fn delete_stream(&self, name: &str) -> Result<bool> {
        let open = self.shared.open.lock();
        if let Some(store) = open.get(name).and_then(Weak::upgrade) {
            // Its backend unregisters it, under the same lock.
            drop(open);
            store.remove()?;
            return Ok(true);
        }
        // Held until the stream is gone, so that it cannot be opened meanwhile.
        let _open = open;
        match self.shared.stream_id(name)? {
            Some(id) => {
                self.shared.drop_stream(name, id)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Makes everything written to any stream durable (group commit).
    pub fn sync(&self) -> Result<()> {
        self.shared.sync.sync()
    }

    /// fsyncs performed so far.
    pub fn sync_count(&self) -> u64 {
        self.shared.sync.sync_count()
    }

    /// Failures on demand, for tests (see [`Faults`]).
    pub fn faults(&self) -> &Faults {
        &self.shared.sync.faults
    }
}

fn check_stream_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(StoreError::Invalid(format!(
            "stream name length {} not in 1..=255",
            name.len()
        )));
    }
    Ok(())
}

/// The storage primitives of [`FileStore`]: one stream's keyspaces.
pub struct FileBackend {
    shared: Arc<Shared>,
    name: String,
    id: u64,
    messages: Keyspace,
    index: Keyspace,
    records: Keyspace,
}

impl FileBackend {
    fn open(shared: Arc<Shared>, name: &str, id: u64) -> Result<FileBackend> {
        let [m, i, r] = keyspace_names(id);
        Ok(FileBackend {
            messages: shared.keyspace(&m)?,
            index: shared.keyspace(&i)?,
            records: shared.keyspace(&r)?,
            shared,
            name: name.to_string(),
            id,
        })
    }

    fn context(&self, what: &str) -> String {
        format!("stream {}: {what}", self.name)
    }

    /// Reads what the engine needs to resume: the state record, the first
    /// and last message keys, and the subject index (keys only).
    fn recover(&self) -> Result<Recovered> {
        let state = match self
            .records
            .get(STATE_KEY)
            .map_err(fjall_error(self.context("read state")))?
        {
            Some(v) => decode_state(&v)?,
            None => PersistedState::default(),
        };
        let first = match self.messages.first_key_value() {
            Some(guard) => {
                let (k, v) = guard
                    .into_inner()
                    .map_err(fjall_error(self.context("read first message")))?;
                let seq = decode_seq(&k)?;
                Some((seq, decode_message(seq, &v)?.timestamp))
            }
            None => None,
        };
        if let Some(guard) = self.messages.last_key_value() {
            let k = guard
                .key()
                .map_err(fjall_error(self.context("read last message")))?;
            let last = decode_seq(&k)?;
            if last > state.last_seq {
                return Err(StoreError::corrupt(self.context(&format!(
                    "message {last} stored beyond recorded last sequence {}",
                    state.last_seq
                ))));
            }
        }
        let subjects = match self.load_summary(&state)? {
            Some(subjects) => subjects,
            None => self.scan_index(&state)?,
        };
        Ok(Recovered {
            state,
            first,
            subjects,
        })
    }

    /// The summary saved at the last clean close, if no batch came after
    /// it and its totals agree with the state record.
    fn load_summary(&self, state: &PersistedState) -> Result<Option<Vec<(Bytes, SubjectState)>>> {
        let Some(v) = self
            .records
            .get(SUMMARY_KEY)
            .map_err(fjall_error(self.context("read summary")))?
        else {
            return Ok(None);
        };
        let Some(subjects) = decode_summary(&v, state.commits) else {
            return Ok(None);
        };
        let messages: u64 = subjects.iter().map(|(_, s)| s.msgs).sum();
        Ok((messages == state.messages).then_some(subjects))
    }

    /// Rebuilds the per-subject summary from the index and checks its totals
    /// against the state record.
    fn scan_index(&self, state: &PersistedState) -> Result<Vec<(Bytes, SubjectState)>> {
        let mut subjects: HashMap<Bytes, SubjectState, ahash::RandomState> = HashMap::default();
        let (mut messages, mut bytes) = (0u64, 0u64);
        for guard in self.index.iter() {
            let (k, v) = guard
                .into_inner()
                .map_err(fjall_error(self.context("read index")))?;
            let (subject, seq) = split_index_key(&k)?;
            messages += 1;
            bytes += decode_size(&v)?;
            match subjects.get_mut(subject) {
                Some(s) => {
                    s.msgs += 1;
                    s.first = s.first.min(seq);
                    s.last = s.last.max(seq);
                }
                None => {
                    let s = SubjectState {
                        msgs: 1,
                        first: seq,
                        last: seq,
                    };
                    subjects.insert(Bytes::copy_from_slice(subject), s);
                }
            }
        }
        if messages != state.messages || bytes != state.bytes {
            return Err(StoreError::corrupt(self.context(&format!(
                "index holds {messages} messages of {bytes} bytes, state records {} of {}",
                state.messages, state.bytes
            ))));
        }
        Ok(subjects.into_iter().collect())
    }

    fn message_iter(&self, iter: fjall::Iter) -> Iter<'_, StoredMessage> {
        Box::new(iter.map(move |guard| {
            let (k, v) = guard
                .into_inner()
                .map_err(fjall_error(self.context("read message")))?;
            decode_message(decode_seq(&k)?, &v)
        }))
    }

    fn seq_iter(&self, iter: impl Iterator<Item = fjall::Guard> + 'static) -> Iter<'_, u64> {
        Box::new(iter.map(move |guard| {
            let k = guard
                .key()
                .map_err(fjall_error(self.context("read message key")))?;
            decode_seq(&k)
        }))
    }

    /// Index entries of one subject from a range read; keys of other
    /// subjects that sort inside the range (possible only if a subject
    /// contained 0x00) are skipped by length.
    fn index_iter(
        &self,
        subject: &[u8],
        iter: impl Iterator<Item = fjall::Guard> + 'static,
    ) -> Iter<'_, IndexEntry> {
        let key_len = subject.len() + 9;
        Box::new(iter.filter_map(move |guard| {
            let entry = (|| {
                let (k, v) = guard
                    .into_inner()
                    .map_err(fjall_error(self.context("read index")))?;
                if k.len() != key_len {
                    return Ok(None);
                }
                let (_, seq) = split_index_key(&k)?;
                Ok(Some(IndexEntry {
                    seq,
                    size: decode_size(&v)?,
                }))
            })();
            entry.transpose()
        }))
    }

    /// Records are written outside message batches, numbered like them.
    fn write_record(&self, key: Vec<u8>, value: Option<&[u8]>) -> Result<()> {
        let mut batch = self.shared.db.batch();
        match value {
            Some(v) => batch.insert(&self.records, key, v),
            None => batch.remove(&self.records, key),
        }
        self.shared.sync.commit(batch, self.context("write record"))
    }
}

impl Backend for FileBackend {
    fn get(&self, seq: u64) -> Result<Option<StoredMessage>> {
        let value = self
            .messages
            .get(seq.to_be_bytes())
            .map_err(fjall_error(self.context("read message")))?;
        value.map(|v| decode_message(seq, &v)).transpose()
    }

    fn messages_from(&self, from: u64) -> Iter<'_, StoredMessage> {
        self.message_iter(self.messages.range(from.to_be_bytes()..))
    }

    fn seqs_from(&self, from: u64) -> Iter<'_, u64> {
        self.seq_iter(self.messages.range(from.to_be_bytes()..))
    }

    fn seqs_rev(&self, to: u64) -> Iter<'_, u64> {
        self.seq_iter(self.messages.range(..=to.to_be_bytes()).rev())
    }

    fn subject_from(&self, subject: &[u8], from: u64) -> Iter<'_, IndexEntry> {
        let range = index_key(subject, from)..=index_key(subject, u64::MAX);
        self.index_iter(subject, self.index.range(range))
    }

    fn subject_rev(&self, subject: &[u8], to: u64) -> Iter<'_, IndexEntry> {
        let range = index_key(subject, 0)..=index_key(subject, to);
        self.index_iter(subject, self.index.range(range).rev())
    }

    fn commit(&mut self, batch: Batch<'_>) -> Result<()> {
        let mut b = self.shared.db.batch();
        for r in batch.removed {
            b.remove(&self.messages, r.seq.to_be_bytes());
            b.remove(&self.index, &index_key(&r.subject, r.seq)[..]);
        }
        for m in batch.puts {
            let value = encode_message(m).map_err(io_error(self.context("encode message")))?;
            b.insert(&self.messages, m.seq.to_be_bytes(), value);
            b.insert(
                &self.index,
                &index_key(&m.subject, m.seq)[..],
                m.size().to_be_bytes(),
            );
        }
        b.insert(&self.records, STATE_KEY, encode_state(&batch.state));
        self.shared.sync.commit(b, self.context("write batch"))
    }

    fn durability(&self) -> Arc<dyn Durability> {
        self.shared.sync.clone()
    }

    fn save_meta(&self, meta: &[u8]) -> Result<()> {
        self.write_record(META_KEY.to_vec(), Some(meta))
    }

    fn load_meta(&self) -> Result<Option<Vec<u8>>> {
        let v = self
            .records
            .get(META_KEY)
            .map_err(fjall_error(self.context("read meta")))?;
        Ok(v.map(|v| v.to_vec()))
    }

    fn save_consumer(&self, name: &str, record: &[u8]) -> Result<()> {
        self.write_record([CONSUMER_PREFIX, name.as_bytes()].concat(), Some(record))
    }

    fn load_consumers(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut out = Vec::new();
        for guard in self.records.prefix(CONSUMER_PREFIX) {
            let (k, v) = guard
                .into_inner()
                .map_err(fjall_error(self.context("read consumers")))?;
            let name = std::str::from_utf8(&k[CONSUMER_PREFIX.len()..])
                .map_err(|_| StoreError::corrupt(self.context("consumer name is not UTF-8")))?;
            out.push((name.to_string(), v.to_vec()));
        }
        Ok(out)
    }

    fn delete_consumer(&self, name: &str) -> Result<bool> {
        let key = [CONSUMER_PREFIX, name.as_bytes()].concat();
        let existed = self
            .records
            .contains_key(&key)
            .map_err(fjall_error(self.context("read consumers")))?;
        if existed {
            self.write_record(key, None)?;
        }
        Ok(existed)
    }

    fn remove(&mut self) -> Result<()> {
        self.shared.open.lock().remove(&self.name);
        self.shared.drop_stream(&self.name, self.id)
    }

    /// Saves the subject summary (durably), so that a clean restart skips
    /// the index scan; after a crash the stream's commit count will have
    /// moved on and the summary is ignored.
    fn close(&mut self, state: &PersistedState, subjects: &[(Bytes, SubjectState)]) {
        let summary = encode_summary(state.commits, subjects);
        let result = self
            .write_record(SUMMARY_KEY.to_vec(), Some(&summary))
            .and_then(|()| self.shared.sync.sync());
        if let Err(e) = result {
            tracing::warn!(stream = %self.name, error = %e, "could not save the subject summary");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sync fsyncs the journal file, so a synced batch must be in that
    /// file, not in fjall's write buffer (which a kill -9 loses): a small
    /// batch would stay in the buffer unless the commit moves it out.
    #[test]
    fn a_synced_batch_is_in_the_journal_file() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io_error("temp dir"))?;
        let storage = FileStorage::open(dir.path())?;
        let store = storage.open_stream("S", StoreLimits::default())?;
        let marker = b"a-payload-to-find-in-the-journal";
        store.append(b"a", 0, marker, 1)?;
        store.sync()?;
        let newest = newest_journal(dir.path()).map_err(io_error("list"))?;
        let journal = std::fs::read(dir.path().join(format!("{newest}.jnl")))
            .map_err(io_error("read journal"))?;
        assert!(
            journal.windows(marker.len()).any(|w| w == marker),
            "the synced message is not in the journal file"
        );
        Ok(())
    }

    /// The fsync outside fjall's lock is only sound if it follows fjall
    /// from journal to journal: after a rotation, fsyncing the old file
    /// would confirm writes that sit unsynced in the new one.
    #[test]
    fn sync_follows_the_journal_through_rotations() -> Result<()> {
        let dir = tempfile::tempdir().map_err(io_error("temp dir"))?;
        let storage = FileStorage::open(dir.path())?;
        let store = storage.open_stream("S", StoreLimits::default())?;
        // Incompressible: fjall compresses journal entries.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let body: Bytes = (0..256 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let synced_journal = || storage.shared.sync.journal.lock().as_ref().map(|j| j.0);
        store.append(b"a", 0, &body, 1)?;
        store.sync()?;
        let first = synced_journal();
        assert_eq!(
            first,
            Some(newest_journal(dir.path()).map_err(io_error("list"))?)
        );
        // fjall rotates its journal at a flush once it holds 64 MB: write
        // past that, then have the message keyspace flushed.
        for i in 0..280 {
            let mut writer = store.writer()?;
            writer.append(Bytes::from_static(b"a"), 0, body.clone(), i)?;
            writer.commit()?;
        }
        let id = storage.shared.stream_id("S")?.ok_or(StoreError::Closed)?;
        let [messages, ..] = keyspace_names(id);
        storage
            .shared
            .keyspace(&messages)?
            .rotate_memtable_and_wait()
            .map_err(fjall_error("flush"))?;
        store.append(b"a", 0, &body, 2)?;
        store.sync()?;
        let newest = newest_journal(dir.path()).map_err(io_error("list"))?;
        assert!(Some(newest) > first, "the journal did not rotate");
        assert_eq!(synced_journal(), Some(newest));
        Ok(())
    }
}
