//! Store limits left unset in `[jetstream]`, resolved once at start the
//! way nats-server resolves them (`dynJetStreamConfig`, `diskAvailable`):
//!
//! - `max_memory_store`: 75% of the system's total memory
//!   (`MemTotal` in `/proc/meminfo`); 256 MiB when that cannot be read.
//! - `max_file_store`: 75% of the space available to unprivileged users on
//!   the file system of `store_dir` (statvfs `f_bavail`); 1 TiB when that
//!   cannot be read. To that available space is added what the store
//!   directory already holds, as nats-server 2.14.6 does with the bytes it
//!   recovers: otherwise the limit would shrink at every restart by what
//!   the streams themselves occupy, until a full store could no longer
//!   take a message after a restart.
//!
//! An explicit value is kept as it is (`0`: no limit, Skiff's meaning;
//! nats-server reads an explicit 0 as "none allowed").

use std::fmt;
use std::path::Path;

use super::JetStreamConfig;
use crate::units::format_size;

/// `max_memory_store` when the system's memory cannot be read
/// (nats-server's `JetStreamMaxMemDefault`).
pub const FALLBACK_MAX_MEMORY: u64 = 256 * 1024 * 1024;
/// `max_file_store` when the free space cannot be read (nats-server's
/// `JetStreamMaxStoreDefault`).
pub const FALLBACK_MAX_FILE: u64 = 1024 * 1024 * 1024 * 1024;

/// The store limits a server runs with, in bytes (0: no limit), and where
/// each came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    pub max_memory: u64,
    pub max_file: u64,
    pub memory_from: Source,
    pub file_from: Source,
}

/// Where a resolved limit came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Set in the config.
    Configured,
    /// 75% of this many bytes (total memory, or the space available to
    /// the store).
    ThreeQuartersOf(u64),
    /// The system could not be asked: nats-server's fixed default.
    Fallback(String),
}

impl JetStreamConfig {
    /// The limits to run with: the configured ones, and nats-server's
    /// defaults for those left unset (see the module docs). Reads
    /// `/proc/meminfo` and the store's file system (and walks the store
    /// directory) only for an unset limit; call it once, at start.
    pub fn resolve_limits(&self) -> StoreLimits {
        let (max_memory, memory_from) = match self.max_memory_store {
            Some(n) => (n as u64, Source::Configured),
            None => match total_memory() {
                Ok(total) => (three_quarters(total), Source::ThreeQuartersOf(total)),
                Err(e) => (FALLBACK_MAX_MEMORY, Source::Fallback(e)),
            },
        };
        let (max_file, file_from) = match self.max_file_store {
            Some(n) => (n as u64, Source::Configured),
            None => match available_to_store(&self.store_dir) {
                Ok(room) => (three_quarters(room), Source::ThreeQuartersOf(room)),
                Err(e) => (FALLBACK_MAX_FILE, Source::Fallback(e)),
            },
        };
        StoreLimits {
            max_memory,
            max_file,
            memory_from,
            file_from,
        }
    }
}

/// nats-server's arithmetic: `n / 4 * 3`.
fn three_quarters(n: u64) -> u64 {
    n / 4 * 3
}

/// One line in nats-server's words (its start-up log says "Max Memory" and
/// "Max Storage"), with where each value came from.
impl fmt::Display for StoreLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let describe = |bytes: u64, from: &Source, of: &str| {
            let value = if bytes == 0 {
                "no limit".to_string()
            } else {
                format_size(bytes)
            };
            match from {
                Source::Configured => format!("{value} (configured)"),
                Source::ThreeQuartersOf(n) => format!("{value} (75% of {} {of})", format_size(*n)),
                Source::Fallback(why) => format!("{value} (default: {why})"),
            }
        };
        write!(
            f,
            "Max Memory: {}, Max Storage: {}",
            describe(self.max_memory, &self.memory_from, "system memory"),
            describe(self.max_file, &self.file_from, "available to the store"),
        )
    }
}

/// Total system memory in bytes, from `/proc/meminfo`.
fn total_memory() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
    parse_mem_total(&text).ok_or_else(|| "no MemTotal in /proc/meminfo".to_string())
}

/// `MemTotal:       16318480 kB` → bytes.
fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let n: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => n.checked_mul(1024),
        None => Some(n),
        Some(_) => None,
    }
}

/// Bytes free to unprivileged users on the file system that holds (or
/// will hold) `store_dir`, plus what the directory already holds.
fn available_to_store(store_dir: &Path) -> Result<u64, String> {
    // The directory may not exist yet (the store creates it): ask about
    // its nearest existing ancestor, on the same file system as it will be.
    let existing = store_dir
        .ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .unwrap_or(Path::new("."));
    let stat = rustix::fs::statvfs(existing).map_err(|e| {
        format!(
            "cannot read the free space under {}: {}",
            existing.display(),
            std::io::Error::from(e)
        )
    })?;
    let available = stat.f_bavail.saturating_mul(stat.f_frsize);
    Ok(available.saturating_add(bytes_under(store_dir)))
}

/// The size of the files under `dir` (0 if it does not exist). Unreadable
/// entries count as empty: this only keeps a default from shrinking.
fn bytes_under(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // symlink_metadata: a link is not followed out of the store.
            match entry.path().symlink_metadata() {
                Ok(m) if m.is_dir() => pending.push(entry.path()),
                Ok(m) if m.is_file() => total = total.saturating_add(m.len()),
                _ => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_is_read_in_kib() {
        let meminfo = "MemTotal:       16318480 kB\nMemFree:         1234 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(16_318_480 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots\n"), None);
    }

    #[test]
    fn unset_limits_are_three_quarters_of_memory_and_of_the_stores_room() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = JetStreamConfig {
            store_dir: dir.path().join("not-yet-created"),
            ..JetStreamConfig::default()
        };
        let limits = config.resolve_limits();
        let Source::ThreeQuartersOf(memory) = limits.memory_from else {
            panic!("memory is read on Linux: {limits:?}");
        };
        assert_eq!(limits.max_memory, memory / 4 * 3);
        assert!(limits.max_memory > 0);
        let Source::ThreeQuartersOf(room) = limits.file_from else {
            panic!("the free space is read on Linux: {limits:?}");
        };
        assert_eq!(limits.max_file, room / 4 * 3);
        assert!(!config.store_dir.exists(), "resolving creates nothing");

        config.max_memory_store = Some(0);
        config.max_file_store = Some(4096);
        let limits = config.resolve_limits();
        assert_eq!((limits.max_memory, limits.max_file), (0, 4096));
        assert_eq!(limits.file_from, Source::Configured);
        let line = limits.to_string();
        assert!(line.contains("Max Memory: no limit (configured)"), "{line}");
        assert!(line.contains("Max Storage: 4.00 KB (configured)"), "{line}");
    }

    #[test]
    fn what_the_store_holds_counts_as_room_for_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("streams")).unwrap();
        std::fs::write(dir.path().join("streams").join("log"), vec![0u8; 10_000]).unwrap();
        std::fs::write(dir.path().join("meta"), vec![0u8; 2_000]).unwrap();
        assert_eq!(bytes_under(dir.path()), 12_000);
        assert_eq!(bytes_under(&dir.path().join("missing")), 0);
    }
}
