//! `/metrics`: everything the JSON endpoints show, as Prometheus metrics.
//!
//! Served in the classic Prometheus text format (0.0.4), which every
//! Prometheus accepts. (Not OpenMetrics: there the counter
//! `skiff_connections_total` and the gauge `skiff_connections` would be
//! one family name twice.) Encoding is the `prometheus-client` crate's, fed by a
//! [`Collector`] built at scrape time: a [`Scrape`] reads the live state
//! once (per-connection counters folded, streams' and consumers' infos
//! from the stream API, the latency histograms' buckets) and encodes it as
//! constant counters, gauges and histograms. Nothing is registered or
//! counted between scrapes, so `/metrics` costs the message path nothing.
//!
//! Names (counters end in `_total`):
//! - server: `skiff_info{server_id,server_name,version}`, `skiff_up`,
//!   `skiff_uptime_seconds`, `skiff_start_time_seconds`,
//!   `process_resident_memory_bytes`, `process_cpu_seconds_total`;
//! - traffic: `skiff_messages_received_total`, `skiff_messages_sent_total`,
//!   `skiff_bytes_received_total`, `skiff_bytes_sent_total` (clients and
//!   routes, as `/varz`);
//! - clients: `skiff_connections`, `skiff_connections_total`,
//!   `skiff_slow_consumers_total`, `skiff_subscriptions`,
//!   `skiff_sublist_cache_entries`, `skiff_sublist_cache_misses_total`;
//! - routes (label `peer`, the peer's server name):
//!   `skiff_routes`, `skiff_route_messages_sent_total`,
//!   `skiff_route_messages_received_total`, `skiff_route_bytes_sent_total`,
//!   `skiff_route_bytes_received_total`, `skiff_route_pending_bytes`,
//!   `skiff_route_subscriptions` (a route's counters restart with the
//!   route, which `rate()` treats as a counter reset);
//! - streams, with durable streams on: `skiff_jetstream_enabled`,
//!   `skiff_jetstream_streams`, `skiff_jetstream_consumers`,
//!   `skiff_jetstream_memory_bytes`, `skiff_jetstream_storage_bytes`,
//!   `skiff_stream_messages{stream}`, `skiff_stream_bytes{stream}`,
//!   `skiff_stream_last_seq{stream}`, `skiff_stream_consumers{stream}`,
//!   `skiff_consumer_num_pending{stream,consumer}`,
//!   `skiff_consumer_num_ack_pending{stream,consumer}`,
//!   `skiff_consumer_num_redelivered{stream,consumer}`,
//!   `skiff_consumer_num_waiting{stream,consumer}`,
//!   `skiff_consumer_ack_floor_stream_seq{stream,consumer}`;
//! - latency histograms (seconds, recorded once per stored batch):
//!   `skiff_store_fsync_seconds` and `skiff_publish_ack_seconds`.

use std::fmt::Error as FmtError;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::varz::ProcessStats;
use super::{error, response, Monitor};
use crate::connection::Counts;
use crate::metrics::HistogramSnapshot;
use crate::stream::{StreamReport, Usage};

/// Encodes a fresh [`Scrape`] (on the blocking pool: consumer infos may
/// read the store).
pub(super) fn metrics(monitor: &Monitor) -> Response<Full<Bytes>> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape::read(monitor)));
    let mut text = String::new();
    match prometheus_text::encode(&mut text, &registry) {
        Ok(()) => response(StatusCode::OK, prometheus_text::CONTENT_TYPE, text),
        Err(FmtError) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics"),
    }
}

/// The server as read at one scrape.
#[derive(Debug)]
struct Scrape {
    server_id: String,
    server_name: String,
    version: String,
    uptime_seconds: f64,
    start_time_seconds: f64,
    process: ProcessStats,
    counts: Counts,
    connections: usize,
    total_connections: u64,
    slow_consumers: u64,
    subscriptions: usize,
    cache_entries: usize,
    cache_misses: u64,
    routes: Vec<RouteRow>,
    jetstream: Option<JetStreamRows>,
}

#[derive(Debug)]
struct RouteRow {
    peer: String,
    counts: Counts,
    pending: usize,
    subscriptions: usize,
}

#[derive(Debug)]
struct JetStreamRows {
    usage: Usage,
    streams: Vec<StreamRow>,
    consumers: Vec<ConsumerRow>,
    fsync: HistogramSnapshot,
    publish_ack: HistogramSnapshot,
}

#[derive(Debug)]
struct StreamRow {
    stream: String,
    messages: u64,
    bytes: u64,
    last_seq: u64,
    consumers: usize,
}

#[derive(Debug)]
struct ConsumerRow {
    stream: String,
    consumer: String,
    num_pending: u64,
    num_ack_pending: usize,
    num_redelivered: usize,
    num_waiting: usize,
    ack_floor: u64,
}

impl Scrape {
    fn read(monitor: &Monitor) -> Scrape {
        let state = &monitor.state;
        let since_start = std::time::SystemTime::now()
            .duration_since(state.stats.started)
            .unwrap_or_default();
        let started = super::unix_nanos(state.stats.started) as f64 / 1e9;
        let routes = state
            .cluster
            .get()
            .map(|c| c.routes())
            .unwrap_or_default()
            .iter()
            .map(|r| RouteRow {
                peer: r.peer_name.clone(),
                counts: r.counts(),
                pending: r.pending(),
                subscriptions: r.interest_count(),
            })
            .collect();
        let jetstream = state.jetstream.get().map(|js| {
            let report = js.report(true);
            JetStreamRows {
                usage: js.usage(),
                consumers: report.iter().flat_map(consumer_rows).collect(),
                streams: report.iter().map(stream_row).collect(),
                fsync: js.latency.fsync.snapshot(),
                publish_ack: js.latency.publish_ack.snapshot(),
            }
        });
        Scrape {
            server_id: state.info.server_id.clone(),
            server_name: state.info.server_name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_seconds: since_start.as_secs_f64(),
            start_time_seconds: started,
            process: ProcessStats::read(),
            counts: state.counts(),
            connections: state.clients.len(),
            total_connections: state.stats.total_connections(),
            slow_consumers: state.stats.slow_consumers(),
            subscriptions: state.sublist.count(),
            cache_entries: state.sublist.cache_len(),
            cache_misses: state.sublist.cache_misses(),
            routes,
            jetstream,
        }
    }
}

fn stream_row(s: &StreamReport) -> StreamRow {
    StreamRow {
        stream: s.info.config.name.clone(),
        messages: s.info.state.messages,
        bytes: s.info.state.bytes,
        last_seq: s.info.state.last_seq,
        consumers: s.info.state.consumer_count,
    }
}

fn consumer_rows(s: &StreamReport) -> impl Iterator<Item = ConsumerRow> + '_ {
    s.consumers.iter().map(|c| ConsumerRow {
        stream: c.stream_name.clone(),
        consumer: c.name.clone(),
        num_pending: c.num_pending,
        num_ack_pending: c.num_ack_pending,
        num_redelivered: c.num_redelivered,
        num_waiting: c.num_waiting,
        ack_floor: c.ack_floor.stream_seq,
    })
}

/// Writes one unlabelled counter (`_total` is added by the encoder).
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), FmtError> {
    let metric = ConstCounter::new(value);
    metric.encode(e.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Writes one unlabelled gauge.
fn gauge<V>(e: &mut DescriptorEncoder, name: &str, help: &str, value: V) -> Result<(), FmtError>
where
    ConstGauge<V>: EncodeMetric,
{
    let metric = ConstGauge::new(value);
    metric.encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// Writes a family with one sample per row, labelled by `labels(row)`.
fn family<R, L, V>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[R],
    labels: impl Fn(&R) -> L,
    value: impl Fn(&R) -> V,
) -> Result<(), FmtError>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: prometheus_client::encoding::EncodeGaugeValue
        + prometheus_client::encoding::EncodeCounterValue
        + Copy,
{
    let mut metric = e.encode_descriptor(name, help, None, kind)?;
    for row in rows {
        let labels = labels(row);
        let sample = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value(row)).encode(sample)?,
            _ => ConstGauge::new(value(row)).encode(sample)?,
        }
    }
    Ok(())
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &HistogramSnapshot,
) -> Result<(), FmtError> {
    let seconds = Unit::Seconds;
    let mut metric = e.encode_descriptor(name, help, Some(&seconds), MetricType::Histogram)?;
    metric.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), FmtError> {
        let e = &mut e;
        let info = [
            ("server_id", self.server_id.as_str()),
            ("server_name", self.server_name.as_str()),
            ("version", self.version.as_str()),
        ];
        let mut metric = e.encode_descriptor(
            "skiff",
            "The server's identity (always 1).",
            None,
            MetricType::Info,
        )?;
        metric.encode_info(&info)?;
        gauge(e, "skiff_up", "1 while the server answers.", 1u64)?;
        gauge(
            e,
            "skiff_uptime_seconds",
            "Seconds since the server started.",
            self.uptime_seconds,
        )?;
        gauge(
            e,
            "skiff_start_time_seconds",
            "When the server started, in seconds since the Unix epoch.",
            self.start_time_seconds,
        )?;
        gauge(
            e,
            "process_resident_memory_bytes",
            "Resident memory of the server process.",
            self.process.resident_bytes,
        )?;
        let cpu = ConstCounter::new(self.process.cpu_seconds);
        cpu.encode(e.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time of the server process.",
            None,
            MetricType::Counter,
        )?)?;

        let c = &self.counts;
        counter(
            e,
            "skiff_messages_received",
            "Messages received from clients and routes.",
            c.in_msgs,
        )?;
        counter(
            e,
            "skiff_messages_sent",
            "Messages sent to clients and routes.",
            c.out_msgs,
        )?;
        counter(
            e,
            "skiff_bytes_received",
            "Payload bytes received from clients and routes.",
            c.in_bytes,
        )?;
        counter(
            e,
            "skiff_bytes_sent",
            "Payload bytes sent to clients and routes.",
            c.out_bytes,
        )?;
        gauge(
            e,
            "skiff_connections",
            "Client connections open now.",
            self.connections as u64,
        )?;
        counter(
            e,
            "skiff_connections",
            "Client connections accepted since start.",
            self.total_connections,
        )?;
        counter(
            e,
            "skiff_slow_consumers",
            "Connections cut off as slow consumers.",
            self.slow_consumers,
        )?;
        gauge(
            e,
            "skiff_subscriptions",
            "Sublist entries: client, internal and route subscriptions.",
            self.subscriptions as u64,
        )?;
        gauge(
            e,
            "skiff_sublist_cache_entries",
            "Subjects whose matches are cached.",
            self.cache_entries as u64,
        )?;
        counter(
            e,
            "skiff_sublist_cache_misses",
            "Sublist lookups the match cache did not answer.",
            self.cache_misses,
        )?;

        let routes = &self.routes;
        let peer = |r: &RouteRow| [("peer", r.peer.clone())];
        gauge(
            e,
            "skiff_routes",
            "Routes to peer nodes.",
            routes.len() as u64,
        )?;
        family(
            e,
            "skiff_route_messages_sent",
            "Messages forwarded to the peer.",
            MetricType::Counter,
            routes,
            peer,
            |r| r.counts.out_msgs,
        )?;
        family(
            e,
            "skiff_route_messages_received",
            "Messages received from the peer.",
            MetricType::Counter,
            routes,
            peer,
            |r| r.counts.in_msgs,
        )?;
        family(
            e,
            "skiff_route_bytes_sent",
            "Payload bytes forwarded to the peer.",
            MetricType::Counter,
            routes,
            peer,
            |r| r.counts.out_bytes,
        )?;
        family(
            e,
            "skiff_route_bytes_received",
            "Payload bytes received from the peer.",
            MetricType::Counter,
            routes,
            peer,
            |r| r.counts.in_bytes,
        )?;
        family(
            e,
            "skiff_route_pending_bytes",
            "Bytes queued to the peer, not yet written.",
            MetricType::Gauge,
            routes,
            peer,
            |r| r.pending as u64,
        )?;
        family(
            e,
            "skiff_route_subscriptions",
            "Interests the peer has announced.",
            MetricType::Gauge,
            routes,
            peer,
            |r| r.subscriptions as u64,
        )?;

        gauge(
            e,
            "skiff_jetstream_enabled",
            "1 when durable streams are on.",
            u64::from(self.jetstream.is_some()),
        )?;
        let Some(js) = &self.jetstream else {
            return Ok(());
        };
        let u = &js.usage;
        gauge(e, "skiff_jetstream_streams", "Streams.", u.streams as u64)?;
        gauge(
            e,
            "skiff_jetstream_consumers",
            "Consumers of all streams.",
            u.consumers as u64,
        )?;
        gauge(
            e,
            "skiff_jetstream_memory_bytes",
            "Bytes held by memory streams.",
            u.memory,
        )?;
        gauge(
            e,
            "skiff_jetstream_storage_bytes",
            "Bytes held by file streams.",
            u.storage,
        )?;

        let s = &js.streams;
        let stream = |r: &StreamRow| [("stream", r.stream.clone())];
        family(
            e,
            "skiff_stream_messages",
            "Messages stored in the stream.",
            MetricType::Gauge,
            s,
            stream,
            |r| r.messages,
        )?;
        family(
            e,
            "skiff_stream_bytes",
            "Bytes stored in the stream.",
            MetricType::Gauge,
            s,
            stream,
            |r| r.bytes,
        )?;
        family(
            e,
            "skiff_stream_last_seq",
            "The stream's last sequence.",
            MetricType::Gauge,
            s,
            stream,
            |r| r.last_seq,
        )?;
        family(
            e,
            "skiff_stream_consumers",
            "Consumers of the stream.",
            MetricType::Gauge,
            s,
            stream,
            |r| r.consumers as u64,
        )?;

        let c = &js.consumers;
        let consumer = |r: &ConsumerRow| {
            [
                ("stream", r.stream.clone()),
                ("consumer", r.consumer.clone()),
            ]
        };
        family(
            e,
            "skiff_consumer_num_pending",
            "Messages not yet delivered to the consumer.",
            MetricType::Gauge,
            c,
            consumer,
            |r| r.num_pending,
        )?;
        family(
            e,
            "skiff_consumer_num_ack_pending",
            "Messages delivered and not yet acknowledged.",
            MetricType::Gauge,
            c,
            consumer,
            |r| r.num_ack_pending as u64,
        )?;
        family(
            e,
            "skiff_consumer_num_redelivered",
            "Unacknowledged messages delivered more than once.",
            MetricType::Gauge,
            c,
            consumer,
            |r| r.num_redelivered as u64,
        )?;
        family(
            e,
            "skiff_consumer_num_waiting",
            "Pull requests waiting.",
            MetricType::Gauge,
            c,
            consumer,
            |r| r.num_waiting as u64,
        )?;
        family(
            e,
            "skiff_consumer_ack_floor_stream_seq",
            "Stream sequence below which everything is acknowledged.",
            MetricType::Gauge,
            c,
            consumer,
            |r| r.ack_floor,
        )?;

        histogram(
            e,
            "skiff_store_fsync",
            "Time a stored batch waited for its fsync (group commit included).",
            &js.fsync,
        )?;
        histogram(
            e,
            "skiff_publish_ack",
            "From a batch's oldest publish reaching its stream to its PubAcks being sent.",
            &js.publish_ack,
        )
    }
}
