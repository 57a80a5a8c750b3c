//! The real `skiff` binary as a child process, for the crash tests: started
//! on a store directory, killed with SIGKILL (on demand and on drop), its
//! log kept; and async-nats clients that never reconnect, so that nothing
//! they buffered reaches a restarted server.
//!
//! Both of the child's pipes are read (the server may log to either), until
//! it dies, so that it never blocks on a full pipe.
//!
//! Here, in the crate of the `skiff` binary, because `CARGO_BIN_EXE_skiff`
//! is defined only for its tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};

use crate::common::{within, WAIT};

/// A `skiff serve` child, killed (SIGKILL) and reaped on drop.
pub struct Skiff {
    child: Child,
    /// `nats://HOST:PORT` once ready; empty before.
    pub url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Skiff {
    /// Starts a server on `store` and waits until it is ready, panicking
    /// (with its log) if it is not within [`WAIT`].
    pub fn start(store: &Path) -> Skiff {
        Skiff::try_start(store, WAIT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server on `store` and waits until it is ready. On failure
    /// (it exited, or was not ready within `timeout`) the child is killed
    /// and the error says why, with the end of its log.
    pub fn try_start(store: &Path, timeout: Duration) -> Result<Skiff, String> {
        let mut skiff = Skiff::spawn(store);
        skiff.wait_ready(timeout)?;
        Ok(skiff)
    }

    /// Spawns a server on `store` without waiting for anything.
    pub fn spawn(store: &Path) -> Skiff {
        let mut child = Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["serve", "--listen", "127.0.0.1:0", "--store"])
            .arg(store)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "skiff=info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn skiff");
        let log = Arc::new(Mutex::new(Vec::new()));
        let outputs: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|o| Box::new(o) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|o| Box::new(o) as Box<dyn Read + Send>),
        ];
        for out in outputs.into_iter().flatten() {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines() {
                    let Ok(line) = line else { return };
                    log.lock()
                        .expect("log lock poisoned")
                        .push(strip_ansi(&line));
                }
            });
        }
        Skiff {
            child,
            url: String::new(),
            log,
        }
    }

    /// Waits for `Listening for client connections on HOST:PORT` and
    /// `Server is ready`, then sets [`Skiff::url`]. On failure the child is
    /// killed.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let (addr, ready) = {
                let log = self.log.lock().expect("log lock poisoned");
                let addr = log.iter().find_map(|l| {
                    l.split("Listening for client connections on ")
                        .nth(1)
                        .and_then(|rest| rest.split_whitespace().next())
                        .map(str::to_string)
                });
                (addr, log.iter().any(|l| l.contains("Server is ready")))
            };
            if let (Some(addr), true) = (addr, ready) {
                if !addr.starts_with("127.0.0.1:") {
                    self.kill();
                    return Err(format!("skiff bound to {addr}, not loopback"));
                }
                self.url = format!("nats://{addr}");
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the readers take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Err(format!(
                    "skiff exited with {status} before it was ready; its log:\n{}",
                    self.tail(usize::MAX)
                ));
            }
            if started.elapsed() > timeout {
                self.kill();
                return Err(format!(
                    "skiff not ready after {timeout:?}; its log:\n{}",
                    self.tail(usize::MAX)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Everything logged so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock poisoned").clone()
    }

    /// The last `n` log lines, one per line.
    pub fn tail(&self, n: usize) -> String {
        let log = self.log.lock().expect("log lock poisoned");
        let start = log.len().saturating_sub(n);
        log[start..].join("\n")
    }

    /// SIGKILL (what `Child::kill` sends on Unix), then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Skiff {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `s` without ANSI escape sequences (CSI: ESC [ params final-byte).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Connect options for a client that does not reconnect within the test:
/// after a kill, its buffered publishes and acks must not reach the
/// restarted server.
pub fn no_reconnect() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new().reconnect_delay_callback(|attempts| {
        // Called for the first connection too (with 1).
        if attempts <= 1 {
            Duration::ZERO
        } else {
            Duration::from_secs(3600)
        }
    })
}

/// A client that never reconnects ([`no_reconnect`]), connected within
/// [`WAIT`] or the test fails.
pub async fn connect(url: &str) -> async_nats::Client {
    within("connect", no_reconnect().connect(url))
        .await
        .expect("connect")
}

/// A JetStream context whose requests time out after 2 s.
pub fn context(client: async_nats::Client) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client)
}
