//! Store failures on demand, so that every error path above the store (a
//! PubAck, an AckSync, an API answer) can be tested: what a client is told
//! when a write or an fsync fails, and that the state is retried.
//!
//! Every [`super::FileStorage`] has one set, off by default; checking it is
//! one relaxed atomic load per commit or fsync. Injected failures are not
//! sticky, unlike a real failed fsync (which fails every later sync until
//! the store is reopened), so that recovery after the fault can be tested
//! too.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Result, StoreError};

/// Switches for injected failures.
#[derive(Debug, Default)]
pub struct Faults {
    commits: AtomicBool,
    syncs: AtomicBool,
}

impl Faults {
    /// While on, every write batch (messages, records, catalog) fails
    /// before it reaches the database.
    pub fn fail_commits(&self, on: bool) {
        self.commits.store(on, Ordering::SeqCst);
    }

    /// While on, every fsync fails (after the writes reached the OS).
    pub fn fail_syncs(&self, on: bool) {
        self.syncs.store(on, Ordering::SeqCst);
    }

    pub(crate) fn check_commit(&self) -> Result<()> {
        Self::check(&self.commits, "write")
    }

    pub(crate) fn check_sync(&self) -> Result<()> {
        Self::check(&self.syncs, "fsync")
    }

    fn check(switch: &AtomicBool, what: &str) -> Result<()> {
        if switch.load(Ordering::Relaxed) {
            return Err(StoreError::Io {
                context: format!("{what} (injected fault)"),
                source: io::Error::other("injected failure"),
            });
        }
        Ok(())
    }
}
