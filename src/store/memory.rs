//! Memory storage (`storage: memory`): messages in a `BTreeMap` by
//! sequence, the subject index as one ordered map per subject. Nothing
//! survives the process; `sync` is free.
//!
//! The index holds exactly the stored messages: every `(subject, seq)` in
//! `index` has its message in `messages` and the other way round.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use super::engine::{Backend, Batch, Durability, IndexEntry, Iter, StreamEngine};
use super::{Result, StoreError, StoreLimits, StoredMessage};

/// A stream kept in memory.
pub type MemoryStore = StreamEngine<MemoryBackend>;

impl StreamEngine<MemoryBackend> {
    /// An empty stream with these limits.
    pub fn new(limits: StoreLimits) -> MemoryStore {
        StreamEngine::empty(MemoryBackend::default(), limits)
    }
}

/// The storage primitives of [`MemoryStore`].
#[derive(Default)]
pub struct MemoryBackend {
    messages: BTreeMap<u64, StoredMessage>,
    /// subject -> (seq -> size).
    index: HashMap<Bytes, BTreeMap<u64, u64>, ahash::RandomState>,
    records: Mutex<Records>,
}

#[derive(Default)]
struct Records {
    meta: Option<Vec<u8>>,
    consumers: BTreeMap<String, Vec<u8>>,
}

struct NoDurability;

impl Durability for NoDurability {
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn sync_count(&self) -> u64 {
        0
    }
}

fn entry((&seq, &size): (&u64, &u64)) -> Result<IndexEntry> {
    Ok(IndexEntry { seq, size })
}

impl Backend for MemoryBackend {
    fn get(&self, seq: u64) -> Result<Option<StoredMessage>> {
        Ok(self.messages.get(&seq).cloned())
    }

    fn messages_from(&self, from: u64) -> Iter<'_, StoredMessage> {
        Box::new(self.messages.range(from..).map(|(_, m)| Ok(m.clone())))
    }

    fn seqs_from(&self, from: u64) -> Iter<'_, u64> {
        Box::new(self.messages.range(from..).map(|(&seq, _)| Ok(seq)))
    }

    fn seqs_rev(&self, to: u64) -> Iter<'_, u64> {
        Box::new(self.messages.range(..=to).rev().map(|(&seq, _)| Ok(seq)))
    }

    fn subject_from(&self, subject: &[u8], from: u64) -> Iter<'_, IndexEntry> {
        match self.index.get(subject) {
            Some(seqs) => Box::new(seqs.range(from..).map(entry)),
            None => Box::new(std::iter::empty()),
        }
    }

    fn subject_rev(&self, subject: &[u8], to: u64) -> Iter<'_, IndexEntry> {
        match self.index.get(subject) {
            Some(seqs) => Box::new(seqs.range(..=to).rev().map(entry)),
            None => Box::new(std::iter::empty()),
        }
    }

    fn commit(&mut self, batch: Batch<'_>) -> Result<()> {
        for r in batch.removed {
            if self.messages.remove(&r.seq).is_none() {
                return Err(StoreError::corrupt(format!("message {} not stored", r.seq)));
            }
            if let Some(seqs) = self.index.get_mut(&r.subject) {
                seqs.remove(&r.seq);
                if seqs.is_empty() {
                    self.index.remove(&r.subject);
                }
            }
        }
        for m in batch.puts {
            self.index
                .entry(m.subject.clone())
                .or_default()
                .insert(m.seq, m.size());
            self.messages.insert(m.seq, m.clone());
        }
        Ok(())
    }

    fn durability(&self) -> Arc<dyn Durability> {
        Arc::new(NoDurability)
    }

    fn save_meta(&self, meta: &[u8]) -> Result<()> {
        self.records.lock().meta = Some(meta.to_vec());
        Ok(())
    }

    fn load_meta(&self) -> Result<Option<Vec<u8>>> {
        Ok(self.records.lock().meta.clone())
    }

    fn save_consumer(&self, name: &str, record: &[u8]) -> Result<()> {
        self.records
            .lock()
            .consumers
            .insert(name.to_string(), record.to_vec());
        Ok(())
    }

    fn load_consumers(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(self
            .records
            .lock()
            .consumers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn delete_consumer(&self, name: &str) -> Result<bool> {
        Ok(self.records.lock().consumers.remove(name).is_some())
    }

    fn remove(&mut self) -> Result<()> {
        self.messages.clear();
        self.index.clear();
        *self.records.lock() = Records::default();
        Ok(())
    }
}
