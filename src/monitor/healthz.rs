//! `/healthz`: whether this node should get traffic, for load balancers and
//! Kubernetes probes.
//!
//! 200 `{"status":"ok"}` when the server is accepting clients and, with
//! durable streams, its store directory takes a write and an fsync; 503
//! `{"status":"unavailable","error":...}` otherwise (shutting down, in lame
//! duck mode, or the store directory is read-only, full or gone).
//!
//! The store probe creates a small file ([`PROBE_FILE`]) in the store
//! directory, writes it, fsyncs it and removes it: creating and removing
//! need a writable directory, the write and fsync a working disk. It runs
//! on the blocking pool, never on the message path, and its result is kept
//! for [`PROBE_TTL`] so that probes arriving together (or an unauthenticated
//! flood: this endpoint needs no token) cost one fsync a second at most.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use parking_lot::Mutex;
use serde::Serialize;

use super::{json, Monitor};

/// The file the probe writes in the store directory (and removes again).
pub const PROBE_FILE: &str = "skiff.healthz";
/// How long a probe's result is reused.
pub const PROBE_TTL: Duration = Duration::from_secs(1);

#[derive(Serialize)]
struct Health<'a> {
    status: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The last store probe and when it ran.
#[derive(Default)]
pub(super) struct Probe {
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Probe {
    /// The store's health, probing at most once per [`PROBE_TTL`]. Callers
    /// that arrive during a probe wait for it (the lock is held while it
    /// runs, on a blocking thread) and share its result.
    fn store(&self, dir: &Path) -> Result<(), String> {
        let mut last = self.last.lock();
        if let Some((at, result)) = &*last {
            if at.elapsed() < PROBE_TTL {
                return result.clone();
            }
        }
        let result = probe_store(dir).map_err(|e| {
            format!(
                "store directory {} is not writable: {e}",
                dir.join(PROBE_FILE).display()
            )
        });
        *last = Some((Instant::now(), result.clone()));
        result
    }
}

/// The whole check; runs on the blocking pool.
pub(super) fn healthz(monitor: &Monitor) -> Response<Full<Bytes>> {
    let state = &monitor.state;
    let verdict = if state.shutdown.is_cancelled() {
        Err("server is shutting down".to_string())
    } else if state.lame_duck.load(std::sync::atomic::Ordering::Relaxed) {
        // Clients are being moved away: so should new traffic be.
        Err("server is in lame duck mode".to_string())
    } else if let Some(reason) = state.jetstream_offline.get() {
        Err(format!("JetStream is offline: {reason}"))
    } else if let Some(js) = state.jetstream.get() {
        match js.offline_streams().first() {
            Some((name, reason)) => Err(format!("stream {name} is offline: {reason}")),
            None => monitor.health.store(js.store_dir()),
        }
    } else {
        Ok(())
    };
    match verdict {
        Ok(()) => json(
            StatusCode::OK,
            &Health {
                status: "ok",
                error: None,
            },
        ),
        Err(error) => {
            tracing::warn!("healthz: {error}");
            json(
                StatusCode::SERVICE_UNAVAILABLE,
                &Health {
                    status: "unavailable",
                    error: Some(error),
                },
            )
        }
    }
}

/// Creates, writes, fsyncs and removes [`PROBE_FILE`] in `dir`.
fn probe_store(dir: &Path) -> std::io::Result<()> {
    let path = dir.join(PROBE_FILE);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    file.write_all(b"ok\n")?;
    file.sync_all()?;
    drop(file);
    std::fs::remove_file(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writable_directory_passes_and_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(probe_store(dir.path()).is_ok());
        assert!(!dir.path().join(PROBE_FILE).exists());
    }

    #[test]
    fn a_missing_directory_or_a_blocked_probe_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        assert!(probe_store(&dir.path().join("gone")).is_err());
        // A directory where the probe file goes: fails even for root, whom
        // file permissions do not stop.
        std::fs::create_dir(dir.path().join(PROBE_FILE)).unwrap();
        assert!(probe_store(dir.path()).is_err());
    }

    #[test]
    fn results_are_reused_for_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let probe = Probe::default();
        assert!(probe.store(dir.path()).is_ok());
        std::fs::create_dir(dir.path().join(PROBE_FILE)).unwrap();
        // Within the TTL the earlier verdict stands.
        assert!(probe.store(dir.path()).is_ok());
        *probe.last.lock() = None;
        assert!(probe.store(dir.path()).is_err());
    }
}
