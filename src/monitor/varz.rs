//! `/varz`: the server's identity, limits, resource use and traffic totals,
//! in nats-server's field names.
//!
//! Traffic (`in_msgs`, `out_bytes`, ...) is [`ServerState::counts`]: closed
//! connections' totals plus every live client's and route's counters,
//! folded at read time. `mem` is the resident set size from
//! `/proc/self/statm`; `cpu` is the percentage of one core the process
//! used between the previous sample and this one (the first sample covers
//! the time since the monitor started; samples less than a second apart
//! repeat the last figure, so frequent polling does not make it noisy).
//! Both read 0 where `/proc` does not exist. Reading the streams' totals
//! takes each stream's state lock, so `/varz` runs on the blocking pool.

use std::time::Instant;

use parking_lot::Mutex;
use serde::Serialize;

use super::jsz::{js_config, JsConfig};
use super::{rfc3339, uptime, Monitor};
use crate::server::ServerState;

/// A CPU reading is refreshed at most this often.
const CPU_SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Serialize)]
pub(super) struct Varz {
    server_id: String,
    server_name: String,
    version: String,
    proto: u32,
    go: String,
    host: String,
    port: u16,
    auth_required: bool,
    tls_required: bool,
    max_connections: usize,
    max_subscriptions: usize,
    /// Durations in nanoseconds, as Go's `time.Duration` marshals.
    ping_interval: u128,
    ping_max: u32,
    write_deadline: u128,
    http_host: String,
    http_port: u16,
    max_control_line: usize,
    max_payload: usize,
    max_pending: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterVarz>,
    /// Empty without durable streams, as nats-server's.
    jetstream: JetStreamVarz,
    start: String,
    now: String,
    uptime: String,
    mem: u64,
    cores: usize,
    cpu: f64,
    connections: usize,
    total_connections: u64,
    routes: usize,
    remotes: usize,
    in_msgs: u64,
    out_msgs: u64,
    in_bytes: u64,
    out_bytes: u64,
    slow_consumers: u64,
    subscriptions: usize,
}

#[derive(Serialize, Default)]
struct JetStreamVarz {
    #[serde(skip_serializing_if = "Option::is_none")]
    config: Option<JsConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<JetStreamStats>,
}

#[derive(Serialize)]
struct JetStreamStats {
    memory: u64,
    storage: u64,
    reserved_memory: u64,
    reserved_storage: u64,
    accounts: usize,
}

#[derive(Serialize)]
struct ClusterVarz {
    name: String,
    addr: String,
    cluster_port: u16,
    urls: Vec<String>,
}

pub(super) fn varz(monitor: &Monitor) -> Varz {
    let state = &monitor.state;
    // Limits as running: a reload may have changed them since start.
    let live = state.live();
    let config = &live.config;
    let info = &state.info;
    let counts = state.counts();
    let routes = state.cluster.get().map(|c| c.routes().len()).unwrap_or(0);
    let process = ProcessStats::read();
    Varz {
        server_id: info.server_id.clone(),
        server_name: info.server_name.clone(),
        version: info.version.clone(),
        proto: info.proto as u32,
        go: info.go.clone(),
        host: info.host.clone(),
        port: info.port,
        auth_required: live.info.auth_required,
        tls_required: info.tls_required,
        max_connections: config.max_connections,
        max_subscriptions: config.max_subscriptions,
        ping_interval: config.ping_interval.as_nanos(),
        ping_max: config.max_pings_out,
        write_deadline: config.write_deadline.as_nanos(),
        http_host: monitor.addr.ip().to_string(),
        http_port: monitor.addr.port(),
        max_control_line: config.max_control_line,
        max_payload: config.max_payload,
        max_pending: config.max_pending,
        cluster: cluster(state),
        jetstream: jetstream(state),
        start: rfc3339(state.stats.started),
        now: rfc3339(std::time::SystemTime::now()),
        uptime: uptime(state.stats.started),
        mem: process.resident_bytes,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu: monitor.cpu.percent(process.cpu_seconds),
        connections: state.clients.len(),
        total_connections: state.stats.total_connections(),
        routes,
        remotes: routes,
        in_msgs: counts.in_msgs,
        out_msgs: counts.out_msgs,
        in_bytes: counts.in_bytes,
        out_bytes: counts.out_bytes,
        slow_consumers: state.stats.slow_consumers(),
        subscriptions: state.sublist.count(),
    }
}

fn jetstream(state: &ServerState) -> JetStreamVarz {
    let Some(js) = state.jetstream.get() else {
        return JetStreamVarz::default();
    };
    let usage = js.usage();
    JetStreamVarz {
        config: Some(js_config(js)),
        stats: Some(JetStreamStats {
            memory: usage.memory,
            storage: usage.storage,
            reserved_memory: 0,
            reserved_storage: 0,
            accounts: 1,
        }),
    }
}

fn cluster(state: &ServerState) -> Option<ClusterVarz> {
    let config = state.config.cluster.as_ref()?;
    let cluster = state.cluster.get()?;
    let info = cluster.route_info();
    let port = info
        .route_addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0);
    Some(ClusterVarz {
        name: config.name.clone(),
        addr: info.route_addr,
        cluster_port: port,
        urls: cluster
            .routes()
            .iter()
            .map(|r| r.route_addr.clone())
            .collect(),
    })
}

/// Memory and CPU of this process, from `/proc/self` (zeros elsewhere).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct ProcessStats {
    pub resident_bytes: u64,
    /// User plus system CPU time since the process started.
    pub cpu_seconds: f64,
}

impl ProcessStats {
    pub(super) fn read() -> ProcessStats {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        ProcessStats {
            resident_bytes: resident_pages(&statm) * rustix::param::page_size() as u64,
            cpu_seconds: cpu_ticks(&stat) as f64
                / rustix::param::clock_ticks_per_second().max(1) as f64,
        }
    }
}

/// The second field of `/proc/self/statm`: resident pages.
fn resident_pages(statm: &str) -> u64 {
    statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `utime + stime` (fields 14 and 15) of `/proc/self/stat`, in clock ticks.
/// Fields are counted after the command name, which is in parentheses and
/// may itself hold spaces.
fn cpu_ticks(stat: &str) -> u64 {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let field = |n: usize| -> u64 { fields.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
    field(14) + field(15)
}

/// The CPU percentage between successive `/varz` samples.
pub(super) struct CpuMeter {
    last: Mutex<CpuSample>,
}

struct CpuSample {
    at: Instant,
    cpu_seconds: f64,
    percent: f64,
}

impl CpuMeter {
    pub(super) fn new() -> CpuMeter {
        CpuMeter {
            last: Mutex::new(CpuSample {
                at: Instant::now(),
                cpu_seconds: ProcessStats::read().cpu_seconds,
                percent: 0.0,
            }),
        }
    }

    /// Percent of one core used since the previous sample, given the
    /// process's CPU time now (100 = one core busy).
    pub(super) fn percent(&self, cpu_seconds: f64) -> f64 {
        let mut last = self.last.lock();
        let wall = last.at.elapsed();
        if wall < CPU_SAMPLE_EVERY {
            return last.percent;
        }
        let used = (cpu_seconds - last.cpu_seconds).max(0.0);
        // Two decimals, as nats-server shows it.
        let percent = (used / wall.as_secs_f64() * 10_000.0).round() / 100.0;
        *last = CpuSample {
            at: Instant::now(),
            cpu_seconds,
            percent,
        };
        percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_field_by_field() {
        assert_eq!(resident_pages("5000 1234 300 10 0 900 0\n"), 1234);
        assert_eq!(resident_pages(""), 0);
        // A command name with spaces and a parenthesis must not shift fields.
        let stat = "42 (my (odd) cmd) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0";
        assert_eq!(cpu_ticks(stat), 300);
        assert_eq!(cpu_ticks("garbage"), 0);
    }

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        if std::path::Path::new("/proc/self/statm").exists() {
            let stats = ProcessStats::read();
            assert!(stats.resident_bytes > 0);
            assert!(stats.cpu_seconds >= 0.0);
        }
    }
}
