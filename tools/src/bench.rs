//! `skiff bench`: load scenarios in the spirit of `nats bench`, run with
//! Skiff's own client against any NATS-protocol server, so that Skiff and
//! nats-server are measured by the same client in the same way.
//!
//! Scenarios ([`Scenario`]): `pub` (publishers only), `pubsub` (publishers
//! and subscribers on one subject), `fanout` (one publisher, many
//! subscribers), `queue` (one queue group shares the messages), `reqrep`
//! (requests one at a time, with latency percentiles), `conns` (many idle
//! connections, for the server's memory per connection), and the durable
//! stream scenarios `jspub` and `jsconsume` ([`js`]).
//!
//! The client is built not to be the bottleneck: publishers write 64 KiB of
//! PUB frames per syscall ([`Connection::publish`]), subscribers only parse
//! and count, and shared counters are touched in batches where exactness is
//! not needed.
//!
//! Invariants:
//! - Every loop is bounded by a count and by the run's deadline
//!   (`--timeout`): a run always ends, and reports what did not arrive.
//! - Subscriptions are in place (flushed) before the first publish, and
//!   publishers flush at the end, so every message the server accepted is
//!   expected by every subscriber (by one member of the queue group).
//! - With `--size` of at least 8 bytes, each message carries its sequence
//!   number in its first 8 bytes, and the queue scenario checks that every
//!   number was delivered exactly once across the group.

use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::conn::{self, Connection, Credentials, Endpoint, TlsOptions};
use skiff::protocol::Message;

mod js;

/// The queue group of the `queue` and `reqrep` scenarios.
const QUEUE_GROUP: &[u8] = b"skiff-bench";
/// Publishers look at the clock and report progress once per this many
/// messages; plain subscribers report progress as often.
const BATCH: u64 = 1024;
/// Connections the `conns` scenario opens at once.
const CONNECT_WORKERS: usize = 64;
/// Pause between opening the idle connections and reading the server's
/// memory, so that it has finished its own work for them.
const SETTLE: Duration = Duration::from_secs(1);
/// Latencies are recorded in nanoseconds up to this bound.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// What `skiff bench` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N publishers, no subscribers.
    Pub,
    /// N publishers, M subscribers on the same subject.
    Pubsub,
    /// One publisher, M subscribers.
    Fanout,
    /// One publisher, M subscribers in one queue group.
    Queue,
    /// Requests one at a time through M repliers (a queue group).
    Reqrep,
    /// N idle connections with one subscription each.
    Conns,
    /// N publishers to a durable stream, each with a window of outstanding PubAcks.
    #[value(name = "jspub")]
    JsPub,
    /// Pulls and acks a stream's messages through a durable consumer.
    #[value(name = "jsconsume")]
    JsConsume,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Pub => "pub",
            Scenario::Pubsub => "pubsub",
            Scenario::Fanout => "fanout",
            Scenario::Queue => "queue",
            Scenario::Reqrep => "reqrep",
            Scenario::Conns => "conns",
            Scenario::JsPub => "jspub",
            Scenario::JsConsume => "jsconsume",
        }
    }
}

/// The settings of one run; [`BenchOptions::new`] gives each scenario's
/// defaults.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub url: String,
    /// Where subscribers (and repliers) connect, when not `url`: another
    /// node of the same cluster, to measure the route between them.
    pub sub_url: Option<String>,
    /// TLS files and mode, for servers that require TLS.
    pub tls: TlsOptions,
    /// How the benchmark's connections log in.
    pub credentials: Credentials,
    pub scenario: Scenario,
    /// Messages to publish in total (requests for `reqrep`).
    pub msgs: u64,
    /// Payload bytes per message.
    pub size: usize,
    pub pubs: usize,
    pub subs: usize,
    /// Connections for `conns`.
    pub conns: usize,
    pub subject: String,
    /// The whole run, publishing and waiting for the last message, must end
    /// within this.
    pub timeout: Duration,
    /// Show a progress bar (only ever on a terminal).
    pub progress: bool,
    /// For `conns`: the server's process, whose memory is measured (the
    /// stream scenarios report its memory at the end).
    pub server_pid: Option<u32>,
    /// The stream of `jspub` and `jsconsume`.
    pub stream: String,
    /// `jspub`: most PubAcks outstanding at once.
    pub window: usize,
    /// `jsconsume`: messages asked for per pull request.
    pub batch: usize,
}

impl BenchOptions {
    pub fn new(url: &str, scenario: Scenario) -> BenchOptions {
        let (pubs, subs) = match scenario {
            Scenario::Pub | Scenario::JsPub => (1, 0),
            Scenario::Pubsub | Scenario::Reqrep | Scenario::JsConsume => (1, 1),
            Scenario::Fanout | Scenario::Queue => (1, 4),
            Scenario::Conns => (0, 0),
        };
        let js = matches!(scenario, Scenario::JsPub | Scenario::JsConsume);
        BenchOptions {
            url: url.to_string(),
            sub_url: None,
            tls: TlsOptions::default(),
            credentials: Credentials::default(),
            scenario,
            msgs: match scenario {
                Scenario::Reqrep => 20_000,
                // Stored messages cost disk space and, with fsync, time.
                Scenario::JsPub | Scenario::JsConsume => 200_000,
                _ => 1_000_000,
            },
            size: 16,
            pubs,
            subs,
            conns: 10_000,
            // A subject of their own keeps the stream from storing what the
            // core scenarios publish on the same server.
            subject: if js { "bench.js" } else { "bench" }.to_string(),
            timeout: Duration::from_secs(60),
            progress: true,
            server_pid: None,
            stream: "BENCH".to_string(),
            window: 256,
            batch: 500,
        }
    }

    fn validate(&self) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::Options(m.to_string()));
        match self.scenario {
            Scenario::Conns if self.conns == 0 => bad("--conns must be at least 1"),
            Scenario::Conns => Ok(()),
            Scenario::JsPub | Scenario::JsConsume => {
                let valid_name = !self.stream.is_empty()
                    && !self
                        .stream
                        .contains(|c: char| c.is_whitespace() || ".*>".contains(c));
                let one = BenchOptions::new("", self.scenario);
                if self.msgs == 0 || self.window == 0 || self.batch == 0 {
                    bad("--msgs, --window and --batch must be at least 1")
                } else if self.subs != one.subs {
                    bad("jspub and jsconsume have no subscribers: --subs does not apply")
                } else if self.pubs == 0 || (self.scenario == Scenario::JsConsume && self.pubs != 1)
                {
                    bad("jspub needs --pubs of at least 1; jsconsume uses one connection")
                } else if !valid_name {
                    bad("--stream must be a name without spaces, `.`, `*` or `>`")
                } else {
                    Ok(())
                }
            }
            _ if self.msgs == 0 || self.pubs == 0 => bad("--msgs and --pubs must be at least 1"),
            Scenario::Pub if self.subs > 0 => bad("pub has no subscribers: use pubsub"),
            Scenario::Pub => Ok(()),
            _ if self.subs == 0 => bad("--subs must be at least 1"),
            Scenario::Fanout | Scenario::Reqrep if self.pubs != 1 => {
                bad("fanout and reqrep have exactly one publisher")
            }
            _ => Ok(()),
        }
    }
}

/// Why a run could not be carried out (or, for [`Report::check`], did not
/// deliver everything).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Client(#[from] conn::Error),
    #[error("a bench task failed: {0}")]
    Task(#[from] JoinError),
    #[error("cannot open {wanted} files: the hard limit is {max} (raise it with `ulimit -Hn`)")]
    FdLimit { wanted: u64, max: u64 },
    #[error("cannot read the memory use of process {pid}: {source}")]
    Rss { pid: u32, source: std::io::Error },
    /// A JetStream API call failed; `message` is the server's description.
    #[error("{subject}: {message}")]
    Api { subject: String, message: String },
    #[error("{lost} messages lost and {duplicates} duplicated")]
    Incomplete { lost: u64, duplicates: u64 },
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The `conns` scenario's findings.
#[derive(Clone, Debug, Serialize)]
pub struct ConnsReport {
    pub connections: usize,
    pub connect_secs: f64,
    /// Connections completed per second (each a TCP connect, INFO, the TLS
    /// handshake if any, CONNECT and a PING round trip), with
    /// `CONNECT_WORKERS` connecting at once.
    pub connects_per_sec: f64,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
    /// Server memory growth divided by the number of connections.
    pub bytes_per_conn: Option<f64>,
}

/// The stream scenarios' findings.
#[derive(Clone, Debug, Serialize)]
pub struct JsReport {
    pub stream: String,
    /// Messages published with a reply inbox (by `jspub`, or by `jsconsume`
    /// to fill the stream).
    pub sent: u64,
    /// PubAcks that confirmed storage.
    pub acked: u64,
    /// Replies that refused the message (an `error` PubAck, no stream).
    pub failed: u64,
    /// `jsconsume`: the stream already held enough messages.
    pub reused: bool,
    /// The server's resident memory at the end, with `--server-pid`.
    pub server_rss: Option<u64>,
}

/// The outcome of a run: a table by `Display`, one JSON object by
/// [`Report::json`], a CSV header and row by [`Report::csv`].
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub scenario: Scenario,
    /// The server's version and implementation, from its INFO.
    pub server: String,
    pub msgs: u64,
    pub size: usize,
    pub pubs: usize,
    pub subs: usize,
    pub published: u64,
    pub pub_secs: f64,
    pub pub_msgs_per_sec: f64,
    pub pub_mb_per_sec: f64,
    /// Deliveries expected by all subscribers together.
    pub expected: u64,
    pub received: u64,
    pub sub_secs: f64,
    pub sub_msgs_per_sec: f64,
    pub sub_mb_per_sec: f64,
    pub lost: u64,
    pub duplicates: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conns: Option<ConnsReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub js: Option<JsReport>,
    /// What went wrong on individual connections.
    pub errors: Vec<String>,
}

/// Runs one scenario to the end (or to its deadline).
pub async fn run(options: &BenchOptions) -> Result<Report, BenchError> {
    options.validate()?;
    // Built once: every connection of the run shares its TLS configuration.
    let endpoint =
        Endpoint::new(&options.url, &options.tls)?.with_credentials(&options.credentials);
    let sub_endpoint = match &options.sub_url {
        Some(url) => Endpoint::new(url, &options.tls)?.with_credentials(&options.credentials),
        None => endpoint.clone(),
    };
    let endpoints = Endpoints {
        publish: endpoint,
        subscribe: sub_endpoint,
        remote: options.sub_url.is_some(),
    };
    let deadline = Instant::now() + options.timeout;
    match options.scenario {
        Scenario::Conns => run_conns(options, &endpoints.publish, deadline).await,
        Scenario::Reqrep => run_reqrep(options, &endpoints, deadline).await,
        Scenario::JsPub => js::run_jspub(options, &endpoints.publish, deadline).await,
        Scenario::JsConsume => js::run_jsconsume(options, &endpoints.publish, deadline).await,
        _ => run_flow(options, &endpoints, deadline).await,
    }
}

/// Where publishers and subscribers connect.
struct Endpoints {
    publish: Endpoint,
    subscribe: Endpoint,
    /// Subscribers are on another server: their interest must reach the
    /// publishers' server before the run starts.
    remote: bool,
}

impl Endpoints {
    /// Waits until subscriptions made on the subscribers' server (all of
    /// them flushed before this is called) have reached the publishers'
    /// server. A probe subscription made after them travels the same route
    /// in order, so once a probe published on the publishers' server comes
    /// back, every earlier subscription is known there too.
    async fn await_interest(&self, deadline: Instant) -> Result<(), conn::Error> {
        if !self.remote {
            return Ok(());
        }
        let probe = b"_SKIFF_BENCH.probe";
        let mut listener = subscriber(&self.subscribe, probe, None, deadline).await?;
        let mut prober = connect(&self.publish, deadline).await?;
        loop {
            prober.publish(probe, None, b"?").await?;
            within(deadline, prober.flush()).await?;
            let wait = Instant::now() + Duration::from_millis(20);
            match timeout_at(wait.min(deadline), listener.next_message()).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) if Instant::now() >= deadline => return Err(conn::Error::Timeout),
                Err(_) => {}
            }
        }
    }
}

/// Counts of one side of a run, turned into rates.
struct Side {
    msgs: u64,
    secs: f64,
}

impl Side {
    fn rates(&self, size: usize) -> (f64, f64) {
        if self.secs <= 0.0 {
            return (0.0, 0.0);
        }
        let rate = self.msgs as f64 / self.secs;
        (rate, rate * size as f64 / 1e6)
    }
}

impl Report {
    fn new(options: &BenchOptions, server: String, published: Side, received: Side) -> Report {
        let (pub_msgs_per_sec, pub_mb_per_sec) = published.rates(options.size);
        let (sub_msgs_per_sec, sub_mb_per_sec) = received.rates(options.size);
        Report {
            scenario: options.scenario,
            server,
            msgs: options.msgs,
            size: options.size,
            pubs: options.pubs,
            subs: options.subs,
            published: published.msgs,
            pub_secs: published.secs,
            pub_msgs_per_sec,
            pub_mb_per_sec,
            expected: 0,
            received: received.msgs,
            sub_secs: received.secs,
            sub_msgs_per_sec,
            sub_mb_per_sec,
            lost: 0,
            duplicates: 0,
            latency_us: None,
            conns: None,
            js: None,
            errors: Vec::new(),
        }
    }

    /// An error if anything was lost or delivered twice.
    pub fn check(&self) -> Result<(), BenchError> {
        if self.lost > 0 || self.duplicates > 0 {
            return Err(BenchError::Incomplete {
                lost: self.lost,
                duplicates: self.duplicates,
            });
        }
        Ok(())
    }

    /// The report as one line of JSON.
    pub fn json(&self) -> String {
        // A struct of numbers and strings always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A CSV header line and one row: the JSON fields in name order, nested
    /// ones flattened to `parent.child` columns.
    pub fn csv(&self) -> String {
        let mut columns = Vec::new();
        flatten(
            "",
            &serde_json::to_value(self).unwrap_or_default(),
            &mut columns,
        );
        let (names, values): (Vec<_>, Vec<_>) = columns.into_iter().unzip();
        format!("{}\n{}\n", names.join(","), values.join(","))
    }
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value;
    match value {
        Value::Object(fields) => {
            for (name, field) in fields {
                let name = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                flatten(&name, field, out);
            }
        }
        Value::Array(items) => {
            let text: Vec<String> = items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                .collect();
            out.push((prefix.to_string(), csv_quote(&text.join("; "))));
        }
        Value::String(s) => out.push((prefix.to_string(), csv_quote(s))),
        Value::Null => out.push((prefix.to_string(), String::new())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

fn csv_quote(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "skiff bench {} against {}",
            self.scenario.name(),
            self.server
        )?;
        if let Some(c) = &self.conns {
            writeln!(
                f,
                "{} idle connections with one subscription each, opened in {:.2} s ({} per second)",
                grouped(c.connections as u64),
                c.connect_secs,
                grouped(c.connects_per_sec.round() as u64)
            )?;
            if let (Some(before), Some(after), Some(per)) =
                (c.rss_before, c.rss_after, c.bytes_per_conn)
            {
                writeln!(
                    f,
                    "server RSS {:.1} MiB -> {:.1} MiB: {} bytes per connection",
                    before as f64 / 1048576.0,
                    after as f64 / 1048576.0,
                    grouped(per.round() as u64)
                )?;
            }
        } else if let Some(js) = &self.js {
            self.fmt_js(f, js)?;
        } else {
            writeln!(
                f,
                "{} msgs of {} B, {} publisher(s), {} subscriber(s)\n",
                grouped(self.msgs),
                self.size,
                self.pubs,
                self.subs
            )?;
            rate_header(f)?;
            let mut row =
                |name: &str, rate: f64, mb: f64, secs: f64| rate_row(f, name, rate, mb, secs);
            row(
                "publishers",
                self.pub_msgs_per_sec,
                self.pub_mb_per_sec,
                self.pub_secs,
            )?;
            if self.subs > 0 {
                row(
                    "subscribers",
                    self.sub_msgs_per_sec,
                    self.sub_mb_per_sec,
                    self.sub_secs,
                )?;
                writeln!(
                    f,
                    "\nreceived {} of {}: {} lost, {} duplicated",
                    grouped(self.received),
                    grouped(self.expected),
                    grouped(self.lost),
                    grouped(self.duplicates)
                )?;
            }
        }
        if let Some(l) = &self.latency_us {
            writeln!(
                f,
                "latency (µs): p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                l.p50, l.p90, l.p99, l.p999, l.max
            )?;
        }
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

impl Report {
    /// The table of `jspub` and `jsconsume`: acked publishes (the fill, for
    /// `jsconsume`, unless the stream was reused) and consumed messages.
    fn fmt_js(&self, f: &mut fmt::Formatter<'_>, js: &JsReport) -> fmt::Result {
        writeln!(
            f,
            "{} msgs of {} B, stream {}{}\n",
            grouped(self.msgs),
            self.size,
            js.stream,
            if js.reused { " (reused)" } else { "" }
        )?;
        rate_header(f)?;
        let mut row = |name: &str, rate: f64, mb: f64, secs: f64| rate_row(f, name, rate, mb, secs);
        if js.sent > 0 {
            row(
                "acked pubs",
                self.pub_msgs_per_sec,
                self.pub_mb_per_sec,
                self.pub_secs,
            )?;
        }
        if self.scenario == Scenario::JsConsume {
            row(
                "consumed",
                self.sub_msgs_per_sec,
                self.sub_mb_per_sec,
                self.sub_secs,
            )?;
        }
        writeln!(f)?;
        if js.sent > 0 {
            writeln!(
                f,
                "published {}: {} acked, {} refused",
                grouped(js.sent),
                grouped(js.acked),
                grouped(js.failed)
            )?;
        }
        if self.scenario == Scenario::JsConsume {
            writeln!(
                f,
                "consumed and acked {} of {}",
                grouped(self.received),
                grouped(self.expected)
            )?;
        }
        if let Some(rss) = js.server_rss {
            writeln!(f, "server RSS {:.1} MiB", rss as f64 / 1048576.0)?;
        }
        Ok(())
    }
}

/// The header of a rate table in the summary.
fn rate_header(f: &mut fmt::Formatter<'_>) -> fmt::Result {
    writeln!(
        f,
        "{:<12} {:>12} {:>10} {:>10}",
        "", "msgs/s", "MB/s", "secs"
    )
}

/// One row of a rate table.
fn rate_row(f: &mut fmt::Formatter<'_>, name: &str, rate: f64, mb: f64, secs: f64) -> fmt::Result {
    writeln!(
        f,
        "{name:<12} {:>12} {mb:>10.2} {secs:>10.3}",
        grouped(rate.round() as u64)
    )
}

/// `1234567` → `1,234,567`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A progress bar over a shared counter that the run's tasks bump. The bar
/// is only drawn on a terminal; the counter always counts.
struct Progress {
    count: Arc<AtomicU64>,
    ticker: Option<(ProgressBar, JoinHandle<()>)>,
}

impl Progress {
    fn start(enabled: bool, total: u64, what: &'static str, deadline: Instant) -> Progress {
        let count = Arc::new(AtomicU64::new(0));
        let ticker = (enabled && std::io::stdout().is_terminal()).then(|| {
            let bar = ProgressBar::new(total).with_message(what);
            let style = ProgressStyle::with_template(
                "{msg:>9} [{bar:40}] {human_pos}/{human_len} {per_sec:0} ({elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            let (shown, counter) = (bar.clone(), Arc::clone(&count));
            let task = tokio::spawn(async move {
                while Instant::now() < deadline {
                    shown.set_position(counter.load(Ordering::Relaxed));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
            (bar, task)
        });
        Progress { count, ticker }
    }

    fn finish(self) {
        if let Some((bar, task)) = self.ticker {
            task.abort();
            bar.finish_and_clear();
        }
    }
}

/// Connects, bounded by the run's deadline.
async fn connect(endpoint: &Endpoint, deadline: Instant) -> Result<Connection, conn::Error> {
    within(deadline, Connection::connect_to(endpoint)).await
}

/// `work`, or [`conn::Error::Timeout`] once `deadline` passes.
async fn within<T>(
    deadline: Instant,
    work: impl std::future::Future<Output = Result<T, conn::Error>>,
) -> Result<T, conn::Error> {
    timeout_at(deadline, work)
        .await
        .map_err(|_| conn::Error::Timeout)?
}

/// A connection subscribed to `subject`, with the subscription in place.
async fn subscriber(
    endpoint: &Endpoint,
    subject: &[u8],
    queue: Option<&[u8]>,
    deadline: Instant,
) -> Result<Connection, conn::Error> {
    let mut conn = connect(endpoint, deadline).await?;
    conn.subscribe(subject, queue);
    within(deadline, conn.flush()).await?;
    Ok(conn)
}

fn server_name(conn: &Connection) -> String {
    let info = conn.info();
    format!("{} ({})", info.version, info.go)
}

/// The next message, or `None` once `stop` is cancelled or the deadline
/// passes (or on an error, recorded in `error`). Both are looked at only
/// when no message is buffered: a select and a timer per message would cost
/// as much as parsing it.
async fn next_until(
    conn: &mut Connection,
    stop: &CancellationToken,
    deadline: Instant,
    error: &mut Option<String>,
) -> Option<Message> {
    let next = match conn.try_next_message() {
        Ok(Some(message)) => return Some(message),
        Ok(None) => tokio::select! {
            biased;
            message = conn.next_message() => message,
            _ = stop.cancelled() => return None,
            _ = sleep_until(deadline) => return None,
        },
        Err(e) => Err(e),
    };
    next.map_err(|e| *error = Some(e.to_string())).ok()
}

/// The sequence number a publisher stamped into a payload.
fn sequence(payload: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = payload.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// One publisher's share of the messages: sequence numbers
/// `first..first + count`.
struct PubJob {
    conn: Connection,
    subject: Bytes,
    size: usize,
    first: u64,
    count: u64,
    start: Instant,
    deadline: Instant,
    /// Bumped by publishers only when nobody else counts progress.
    progress: Option<Arc<AtomicU64>>,
}

struct PubResult {
    sent: u64,
    secs: f64,
    error: Option<String>,
}

async fn publish_share(mut job: PubJob) -> PubResult {
    let mut payload = vec![0u8; job.size];
    let mut sent: u64 = 0;
    let mut error = None;
    for seq in job.first..job.first + job.count {
        if sent.is_multiple_of(BATCH) {
            if Instant::now() >= job.deadline {
                break;
            }
            if let Some(p) = &job.progress {
                p.fetch_add(sent.min(BATCH), Ordering::Relaxed);
            }
        }
        if let Some(stamp) = payload.get_mut(..8) {
            stamp.copy_from_slice(&seq.to_le_bytes());
        }
        if let Err(e) = job.conn.publish(&job.subject, None, &payload).await {
            error = Some(e.to_string());
            break;
        }
        sent += 1;
    }
    if error.is_none() {
        // The server has routed every message once its PONG is back.
        if let Err(e) = within(job.deadline, job.conn.flush()).await {
            error = Some(e.to_string());
        }
    }
    PubResult {
        sent,
        secs: job.start.elapsed().as_secs_f64(),
        error,
    }
}

/// How a subscriber knows it is done.
enum Target {
    /// It alone receives every message.
    Own(u64),
    /// Its queue group together receives this many; `done` is cancelled
    /// when the group's count (the progress counter) reaches it.
    Group(u64, CancellationToken),
}

struct SubJob {
    conn: Connection,
    target: Target,
    /// Set for the queue scenario: which sequence numbers arrived.
    seen: Option<Vec<u64>>,
    start: Instant,
    deadline: Instant,
    progress: Arc<AtomicU64>,
}

struct SubResult {
    received: u64,
    secs: f64,
    /// Sequence numbers this subscriber saw twice.
    duplicates: u64,
    seen: Option<Vec<u64>>,
    error: Option<String>,
}

async fn count_messages(mut job: SubJob) -> SubResult {
    let (limit, stop) = match &job.target {
        Target::Own(n) => (*n, CancellationToken::new()),
        Target::Group(n, done) => (*n, done.clone()),
    };
    let mut received: u64 = 0;
    let mut duplicates = 0;
    let mut error = None;
    let mut last = job.start;
    while received < limit {
        let Some(message) = next_until(&mut job.conn, &stop, job.deadline, &mut error).await else {
            break;
        };
        received += 1;
        if let (Some(seen), Some(seq)) = (&mut job.seen, sequence(message.payload())) {
            if let Some(word) = seen.get_mut((seq / 64) as usize) {
                let bit = 1u64 << (seq % 64);
                duplicates += u64::from(*word & bit != 0);
                *word |= bit;
            }
        }
        match &job.target {
            // Exact, so that the member taking the group's last message
            // knows it and stops the others.
            Target::Group(n, done) => {
                if job.progress.fetch_add(1, Ordering::Relaxed) + 1 >= *n {
                    done.cancel();
                }
            }
            Target::Own(_) => {
                if received.is_multiple_of(BATCH) {
                    job.progress.fetch_add(BATCH, Ordering::Relaxed);
                }
            }
        }
        if received.is_multiple_of(BATCH) {
            last = Instant::now();
        }
    }
    if received == limit || stop.is_cancelled() {
        last = Instant::now();
    }
    SubResult {
        received,
        secs: (last - job.start).as_secs_f64(),
        duplicates,
        seen: job.seen,
        error,
    }
}

/// `pub`, `pubsub`, `fanout` and `queue`: publishers send `msgs` messages
/// in all, subscribers count them.
async fn run_flow(
    options: &BenchOptions,
    endpoints: &Endpoints,
    deadline: Instant,
) -> Result<Report, BenchError> {
    let subject = Bytes::from(options.subject.clone().into_bytes());
    let queue = options.scenario == Scenario::Queue;
    let expected = if queue {
        options.msgs
    } else {
        options.msgs * options.subs as u64
    };
    let mut subscribers = Vec::with_capacity(options.subs);
    for _ in 0..options.subs {
        let group = queue.then_some(QUEUE_GROUP);
        subscribers.push(subscriber(&endpoints.subscribe, &subject, group, deadline).await?);
    }
    if !subscribers.is_empty() {
        endpoints.await_interest(deadline).await?;
    }
    let mut publishers = Vec::with_capacity(options.pubs);
    for _ in 0..options.pubs {
        publishers.push(connect(&endpoints.publish, deadline).await?);
    }
    let server = publishers.first().map(server_name).unwrap_or_default();

    let (what, total) = if options.subs > 0 {
        ("received", expected)
    } else {
        ("published", options.msgs)
    };
    let progress = Progress::start(options.progress, total, what, deadline);
    let group_done = CancellationToken::new();
    // Only the queue scenario checks sequence numbers; it needs room for
    // one bit per message in each member.
    let track = queue && options.size >= 8;
    let start = Instant::now();
    let sub_tasks: Vec<_> = subscribers
        .into_iter()
        .map(|conn| {
            tokio::spawn(count_messages(SubJob {
                conn,
                target: if queue {
                    Target::Group(options.msgs, group_done.clone())
                } else {
                    Target::Own(options.msgs)
                },
                seen: track.then(|| vec![0; options.msgs.div_ceil(64) as usize]),
                start,
                deadline,
                progress: Arc::clone(&progress.count),
            }))
        })
        .collect();
    let shares = split(options.msgs, options.pubs);
    let pub_tasks: Vec<_> = publishers
        .into_iter()
        .zip(shares)
        .map(|(conn, (first, count))| {
            tokio::spawn(publish_share(PubJob {
                conn,
                subject: subject.clone(),
                size: options.size,
                first,
                count,
                start,
                deadline,
                progress: (options.subs == 0).then(|| Arc::clone(&progress.count)),
            }))
        })
        .collect();

    let mut errors = Vec::new();
    let mut published = Side { msgs: 0, secs: 0.0 };
    for task in pub_tasks {
        let r = task.await?;
        published.msgs += r.sent;
        published.secs = published.secs.max(r.secs);
        errors.extend(r.error);
    }
    let mut received = Side { msgs: 0, secs: 0.0 };
    let mut duplicates = 0;
    let mut seen_by_group: Option<Vec<u64>> = None;
    for task in sub_tasks {
        let r = task.await?;
        received.msgs += r.received;
        received.secs = received.secs.max(r.secs);
        duplicates += r.duplicates;
        errors.extend(r.error);
        if let Some(seen) = r.seen {
            duplicates += merge_seen(&mut seen_by_group, seen);
        }
    }
    progress.finish();

    let mut report = Report::new(options, server, published, received);
    report.expected = expected;
    match seen_by_group {
        Some(seen) => {
            let unique: u64 = seen.iter().map(|w| u64::from(w.count_ones())).sum();
            report.lost = expected - unique.min(expected);
        }
        None => report.lost = expected.saturating_sub(report.received),
    }
    report.duplicates = if track {
        duplicates
    } else {
        report.received.saturating_sub(expected)
    };
    report.errors = errors;
    Ok(report)
}

/// ORs one member's bitmap into the group's; returns how many of its
/// numbers the group had already seen.
fn merge_seen(group: &mut Option<Vec<u64>>, seen: Vec<u64>) -> u64 {
    match group {
        None => {
            *group = Some(seen);
            0
        }
        Some(all) => all
            .iter_mut()
            .zip(seen)
            .map(|(a, s)| {
                let twice = u64::from((*a & s).count_ones());
                *a |= s;
                twice
            })
            .sum(),
    }
}

/// Splits `total` into `parts` consecutive ranges `(first, count)`.
fn split(total: u64, parts: usize) -> Vec<(u64, u64)> {
    let parts = parts.max(1) as u64;
    let (each, extra) = (total / parts, total % parts);
    let mut first = 0;
    (0..parts)
        .map(|i| {
            let count = each + u64::from(i < extra);
            let range = (first, count);
            first += count;
            range
        })
        .collect()
}

/// `reqrep`: one request at a time, each timed, through a queue group of
/// repliers that echo the payload.
async fn run_reqrep(
    options: &BenchOptions,
    endpoints: &Endpoints,
    deadline: Instant,
) -> Result<Report, BenchError> {
    let subject = options.subject.as_bytes();
    let stop = CancellationToken::new();
    let mut repliers = Vec::with_capacity(options.subs);
    for _ in 0..options.subs {
        let mut conn =
            subscriber(&endpoints.subscribe, subject, Some(QUEUE_GROUP), deadline).await?;
        let (stop, limit) = (stop.clone(), options.msgs);
        repliers.push(tokio::spawn(async move {
            let mut error = None;
            for _ in 0..limit {
                let Some(request) = next_until(&mut conn, &stop, deadline, &mut error).await else {
                    break;
                };
                if let Some(reply) = request.reply() {
                    if let Err(e) = conn.publish(reply, None, request.payload()).await {
                        error = Some(e.to_string());
                        break;
                    }
                }
            }
            // The last reply is still buffered when the count runs out.
            if error.is_none() && !stop.is_cancelled() {
                error = within(deadline, conn.flush())
                    .await
                    .err()
                    .map(|e| e.to_string());
            }
            error
        }));
    }
    endpoints.await_interest(deadline).await?;
    let mut requester = connect(&endpoints.publish, deadline).await?;
    let server = server_name(&requester);
    let progress = Progress::start(options.progress, options.msgs, "requests", deadline);
    let mut latencies = Histogram::<u64>::new_with_bounds(1, MAX_LATENCY_NS, 3)
        .map_err(|e| BenchError::Options(e.to_string()))?;
    let payload = vec![0u8; options.size];
    let mut errors = Vec::new();
    let mut sent: u64 = 0;
    let start = Instant::now();
    while sent < options.msgs {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        sent += 1;
        match requester.request(subject, &payload, deadline - now).await {
            Ok(_) => latencies.saturating_record(now.elapsed().as_nanos() as u64),
            Err(e) => {
                errors.push(e.to_string());
                break;
            }
        }
        progress.count.fetch_add(1, Ordering::Relaxed);
    }
    let secs = start.elapsed().as_secs_f64();
    progress.finish();
    stop.cancel();
    for replier in repliers {
        errors.extend(replier.await?);
    }

    let answered = latencies.len();
    let mut report = Report::new(
        options,
        server,
        Side { msgs: sent, secs },
        Side {
            msgs: answered,
            secs,
        },
    );
    report.expected = options.msgs;
    report.lost = options.msgs - answered.min(options.msgs);
    let micros = |q: f64| latencies.value_at_quantile(q) as f64 / 1000.0;
    report.latency_us = (answered > 0).then(|| Latency {
        p50: micros(0.5),
        p90: micros(0.9),
        p99: micros(0.99),
        p999: micros(0.999),
        max: latencies.max() as f64 / 1000.0,
    });
    report.errors = errors;
    Ok(report)
}

/// `conns`: opens `conns` connections, each with a subscription of its own,
/// and measures how much the server's memory grew.
async fn run_conns(
    options: &BenchOptions,
    endpoint: &Endpoint,
    deadline: Instant,
) -> Result<Report, BenchError> {
    // Our sockets, plus a margin for the runtime and stdio.
    raise_fd_limit(options.conns as u64 + 64)?;
    let rss = |pid| rss_bytes(pid).map_err(|source| BenchError::Rss { pid, source });
    let rss_before = options.server_pid.map(rss).transpose()?;
    let progress = Progress::start(
        options.progress,
        options.conns as u64,
        "connected",
        deadline,
    );
    let start = Instant::now();
    let shares = split(options.conns as u64, CONNECT_WORKERS.min(options.conns));
    let workers: Vec<_> = shares
        .into_iter()
        .map(|(first, count)| {
            let endpoint = endpoint.clone();
            let subject = options.subject.clone();
            let progress = Arc::clone(&progress.count);
            tokio::spawn(async move {
                let mut held = Vec::with_capacity(count as usize);
                for i in first..first + count {
                    let sub = format!("{subject}.{i}");
                    held.push(subscriber(&endpoint, sub.as_bytes(), None, deadline).await?);
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, conn::Error>(held)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(options.conns);
    for worker in workers {
        held.extend(worker.await??);
    }
    let connect_secs = start.elapsed().as_secs_f64();
    progress.finish();
    let server = held.first().map(server_name).unwrap_or_default();
    tokio::time::sleep(SETTLE).await;
    let rss_after = options.server_pid.map(rss).transpose()?;
    let bytes_per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / held.len() as f64),
        _ => None,
    };
    let no_messages = || Side { msgs: 0, secs: 0.0 };
    let mut report = Report::new(options, server, no_messages(), no_messages());
    report.msgs = 0;
    report.conns = Some(ConnsReport {
        connections: held.len(),
        connect_secs,
        connects_per_sec: held.len() as f64 / connect_secs.max(f64::EPSILON),
        rss_before,
        rss_after,
        bytes_per_conn,
    });
    Ok(report)
}

/// A process's resident memory, from `/proc/PID/status`.
fn rss_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no VmRSS line"))
}

/// Raises the soft limit on open files to `wanted`, up to the hard limit.
fn raise_fd_limit(wanted: u64) -> Result<(), BenchError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(conn::Error::Io(std::io::Error::last_os_error()).into());
    }
    if limit.rlim_cur >= wanted {
        return Ok(());
    }
    if limit.rlim_max < wanted {
        return Err(BenchError::FdLimit {
            wanted,
            max: limit.rlim_max,
        });
    }
    limit.rlim_cur = wanted;
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(conn::Error::Io(std::io::Error::last_os_error()).into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use skiff::{Config, Server};

    use crate::test_server as server;

    fn small(url: &str, scenario: Scenario) -> BenchOptions {
        BenchOptions {
            msgs: 2_000,
            progress: false,
            timeout: Duration::from_secs(20),
            ..BenchOptions::new(url, scenario)
        }
    }

    #[tokio::test]
    async fn every_flow_scenario_delivers_everything() {
        let server = server().await;
        let url = server.client_url();
        for (scenario, pubs, expected) in [
            (Scenario::Pub, 2, 0),
            (Scenario::Pubsub, 3, 2_000),
            (Scenario::Fanout, 1, 4 * 2_000),
            (Scenario::Queue, 2, 2_000),
        ] {
            let options = BenchOptions {
                pubs,
                ..small(&url, scenario)
            };
            let report = run(&options).await.unwrap();
            assert_eq!(report.published, 2_000, "{report}");
            assert_eq!(report.expected, expected, "{report}");
            assert_eq!(report.received, expected, "{report}");
            assert_eq!((report.lost, report.duplicates), (0, 0), "{report}");
            assert!(report.errors.is_empty(), "{report}");
            report.check().unwrap();
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn reqrep_measures_latency() {
        let server = server().await;
        // One replier answers the last request too; two share them.
        for subs in [1, 2] {
            let options = BenchOptions {
                msgs: 200,
                subs,
                timeout: Duration::from_secs(5),
                ..small(&server.client_url(), Scenario::Reqrep)
            };
            let report = run(&options).await.unwrap();
            assert_eq!(report.received, 200, "{report}");
            assert!(report.errors.is_empty(), "{report}");
            let latency = report.latency_us.as_ref().unwrap();
            assert!(latency.p50 > 0.0 && latency.p50 <= latency.p99, "{report}");
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn conns_measures_server_memory() {
        let server = server().await;
        let options = BenchOptions {
            conns: 50,
            server_pid: Some(std::process::id()),
            ..small(&server.client_url(), Scenario::Conns)
        };
        let report = run(&options).await.unwrap();
        let conns = report.conns.as_ref().unwrap();
        assert_eq!(conns.connections, 50);
        assert!(conns.bytes_per_conn.is_some(), "{report}");
        assert_eq!(server.client_count(), 50);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn stream_scenarios_publish_and_consume_everything() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::with_streams("127.0.0.1:0", dir.path());
        let server = Server::start(config).await.expect("server starts");
        let url = server.client_url();
        let jspub = BenchOptions {
            msgs: 300,
            window: 16,
            ..small(&url, Scenario::JsPub)
        };
        // Twice: the second run starts again from an empty stream.
        for _ in 0..2 {
            let report = run(&jspub).await.unwrap();
            let js = report.js.as_ref().unwrap();
            assert_eq!((js.sent, js.acked, js.failed), (300, 300, 0), "{report}");
            assert_eq!(report.published, 300, "{report}");
            assert!(report.errors.is_empty(), "{report}");
            assert!(report.latency_us.is_some(), "{report}");
            report.check().unwrap();
        }
        // Three publishers share the messages, each with its own window.
        let three = BenchOptions {
            msgs: 301,
            pubs: 3,
            ..jspub.clone()
        };
        let report = run(&three).await.unwrap();
        let js = report.js.as_ref().unwrap();
        assert_eq!((js.sent, js.acked, js.failed), (301, 301, 0), "{report}");
        report.check().unwrap();
        let endpoint = crate::conn::Endpoint::new(&url, &TlsOptions::default()).unwrap();
        let subject = "$JS.API.STREAM.INFO.BENCH";
        let (info, _) = crate::commands::request(&endpoint, subject, b"", Duration::from_secs(5))
            .await
            .unwrap();
        let info = String::from_utf8_lossy(info.payload()).into_owned();
        assert!(info.contains("\"messages\":301"), "{info}");

        // The stream holds 301: consuming 200 reuses it, in batches that
        // do not divide the count, twice from the start with a new consumer.
        let consume = BenchOptions {
            msgs: 200,
            batch: 30,
            ..small(&url, Scenario::JsConsume)
        };
        for _ in 0..2 {
            let report = run(&consume).await.unwrap();
            assert!(report.js.as_ref().unwrap().reused, "{report}");
            assert_eq!(report.received, 200, "{report}");
            assert!(report.errors.is_empty(), "{report}");
            report.check().unwrap();
        }
        // Too few messages (or none, in another stream): filled first.
        for (stream, subject) in [("BENCH", "bench.js"), ("OTHER", "other")] {
            let options = BenchOptions {
                msgs: 500,
                stream: stream.into(),
                subject: subject.into(),
                ..consume.clone()
            };
            let report = run(&options).await.unwrap();
            let js = report.js.as_ref().unwrap();
            assert!(!js.reused, "{report}");
            assert_eq!((js.acked, report.received), (500, 500), "{report}");
            assert!(report.errors.is_empty(), "{report}");
            assert!(report.to_string().contains("consumed and acked 500 of 500"));
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn stream_scenarios_need_jetstream() {
        let server = server().await;
        let err = run(&small(&server.client_url(), Scenario::JsPub))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("JetStream enabled"), "{err}");
        server.shutdown().await;
    }

    #[test]
    fn reports_render_as_table_json_and_csv() {
        let options = BenchOptions::new("nats://x:1", Scenario::Reqrep);
        let mut report = Report::new(
            &options,
            "2.9.10 (go1.19)".into(),
            Side {
                msgs: 1000,
                secs: 0.5,
            },
            Side {
                msgs: 1000,
                secs: 0.5,
            },
        );
        report.latency_us = Some(Latency {
            p50: 10.0,
            p90: 20.0,
            p99: 30.0,
            p999: 40.0,
            max: 50.0,
        });
        report.errors.push("a, \"b\"".into());
        assert!(report.to_string().contains("2,000"));
        let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        assert_eq!(json["latency_us"]["p99"], 30.0);
        let csv = report.csv();
        let (header, row) = csv.trim_end().split_once('\n').unwrap();
        // Columns come in name order, nested ones as `parent.child`.
        assert!(
            header.starts_with("duplicates,errors,expected,"),
            "{header}"
        );
        assert!(header.contains(",latency_us.p999,"), "{header}");
        assert!(row.starts_with(r#"0,"a, ""b""",0,"#), "{row}");
        assert!(row.contains(",reqrep,2.9.10 (go1.19),16,"), "{row}");
    }

    #[test]
    fn helpers() {
        assert_eq!(split(10, 3), vec![(0, 4), (4, 3), (7, 3)]);
        assert_eq!(grouped(1234567), "1,234,567");
        assert_eq!(grouped(12), "12");
        assert_eq!(sequence(&7u64.to_le_bytes()), Some(7));
        assert_eq!(sequence(b"short"), None);
        let mut group = None;
        assert_eq!(merge_seen(&mut group, vec![0b101]), 0);
        assert_eq!(merge_seen(&mut group, vec![0b110]), 1);
        assert!(BenchOptions::new("x", Scenario::Pub).validate().is_ok());
        let fanout = BenchOptions {
            pubs: 2,
            ..BenchOptions::new("x", Scenario::Fanout)
        };
        assert!(fanout.validate().is_err());
        for bad in ["", "A.B", "A B", "*"] {
            let options = BenchOptions {
                stream: bad.into(),
                ..BenchOptions::new("x", Scenario::JsPub)
            };
            assert!(options.validate().is_err(), "{bad}");
        }
        let two = BenchOptions {
            pubs: 2,
            ..BenchOptions::new("x", Scenario::JsConsume)
        };
        assert!(two.validate().is_err());
        let two = BenchOptions {
            pubs: 2,
            ..BenchOptions::new("x", Scenario::JsPub)
        };
        assert!(two.validate().is_ok());
        assert!(BenchOptions::new("x", Scenario::JsConsume)
            .validate()
            .is_ok());
    }
}
