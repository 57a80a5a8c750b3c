//! The HTTP monitoring endpoints, hit with raw HTTP/1.1 over a TcpStream
//! and checked against traffic each test generates with async-nats:
//! `/varz`, `/connz` (paging, sorting, subscriptions), `/subsz`, `/routez`
//! on a two-node cluster, `/jsz` with a stream and a consumer, `/healthz`
//! (503 once the store cannot be written), `/metrics` through a Prometheus
//! text-format parser, the bearer token, and 404/405.
//!
//! Counters are folded from per-connection tallies that a reader adds after
//! each read batch, so a test waits (bounded) for a count to reach the
//! number it expects and then asserts it is exact.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use common::jetstream::eventually;
use common::{nats, nats_with, next_msg, start_with, within, WAIT};
use futures::StreamExt;
use serde_json::Value;
use skiff::config::cluster::ClusterConfig;
use skiff::config::http::HttpConfig;
use skiff::store::StreamStore;
use skiff::{Config, Server, ServerHandle, StartError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP answer.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request (`Connection: close`) and reads the whole answer.
async fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> Reply {
    within(&format!("an answer to {method} {path}"), async {
        let mut stream = TcpStream::connect(addr).await.expect("HTTP connect");
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\nContent-Length: 0\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("HTTP write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("HTTP read");
        let text = String::from_utf8(raw).expect("HTTP answer is UTF-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head ends");
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("HTTP status line");
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_string(),
        }
    })
    .await
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, None).await
}

/// GET that must answer 200 with JSON.
async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let reply = get(addr, path).await;
    assert_eq!(reply.status, 200, "GET {path}: {}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    reply.json()
}

fn monitored(config: &mut Config) {
    config.http = Some(HttpConfig::new("127.0.0.1:0"));
}

/// A core server with the endpoints on a free loopback port.
async fn start_monitored() -> (ServerHandle, SocketAddr) {
    let server = start_with(monitored).await;
    let http = server.http_addr().expect("the server serves HTTP");
    (server, http)
}

/// Publishes `n` messages of `size` bytes on `subject` and waits until
/// `sub` has received them all.
async fn publish_and_receive(
    publisher: &async_nats::Client,
    sub: &mut async_nats::Subscriber,
    subject: &str,
    n: usize,
    size: usize,
) {
    for _ in 0..n {
        publisher
            .publish(subject.to_string(), vec![b'x'; size].into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    for _ in 0..n {
        next_msg(sub).await;
    }
}

/// Polls `path` until `field` (a JSON pointer) reads `want`.
async fn wait_for_value(addr: SocketAddr, path: &str, pointer: &str, want: u64) -> Value {
    eventually(&format!("{path} {pointer} == {want}"), WAIT, || async {
        let v = get_json(addr, path).await;
        (v.pointer(pointer).and_then(Value::as_u64) == Some(want)).then_some(v)
    })
    .await
}

fn u(v: &Value, pointer: &str) -> u64 {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no number at {pointer} in {v:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn varz_counts_the_traffic_a_test_generates() {
    let (server, http) = start_monitored().await;
    let subscriber = nats(&server).await;
    let publisher = nats(&server).await;
    let mut sub = subscriber.subscribe("load").await.unwrap();
    subscriber.flush().await.unwrap();
    let before = get_json(http, "/varz").await;
    assert_eq!(before["server_id"], server.server_id());
    assert_eq!(u(&before, "/connections"), 2);
    assert!(u(&before, "/total_connections") >= 2);
    assert_eq!(u(&before, "/port"), u64::from(server.addr().port()));
    assert_eq!(u(&before, "/http_port"), u64::from(http.port()));
    assert_eq!(u(&before, "/max_payload"), 1 << 20);
    assert_eq!(u(&before, "/max_pending"), 64 << 20);
    assert_eq!(u(&before, "/ping_interval"), 120_000_000_000);
    assert!(u(&before, "/subscriptions") >= 1);
    assert!(before["uptime"].as_str().is_some_and(|s| s.ends_with('s')));
    assert!(before["now"].as_str().is_some_and(|s| s.contains('T')));
    assert!(before["cpu"].as_f64().is_some());
    assert_eq!(
        before["jetstream"],
        serde_json::json!({}),
        "no durable streams"
    );
    if std::path::Path::new("/proc/self/statm").exists() {
        assert!(u(&before, "/mem") > 1 << 20, "resident memory: {before:#}");
    }

    publish_and_receive(&publisher, &mut sub, "load", 100, 10).await;
    let want_in = u(&before, "/in_msgs") + 100;
    let after = wait_for_value(http, "/varz", "/in_msgs", want_in).await;
    assert_eq!(u(&after, "/in_bytes"), u(&before, "/in_bytes") + 1000);
    assert_eq!(u(&after, "/out_msgs"), u(&before, "/out_msgs") + 100);
    assert_eq!(u(&after, "/out_bytes"), u(&before, "/out_bytes") + 1000);
    assert_eq!(u(&after, "/slow_consumers"), 0);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connz_shows_each_connection_and_pages_and_sorts() {
    let (server, http) = start_monitored().await;
    let named = |name: &str| async_nats::ConnectOptions::new().name(name);
    let alpha = nats_with(&server, named("alpha")).await;
    let beta = nats_with(&server, named("beta")).await;
    let gamma = nats_with(&server, named("gamma")).await;
    let mut subs = Vec::new();
    for (client, subjects) in [
        (&alpha, &["a.1"][..]),
        (&beta, &["b.1", "b.2"][..]),
        (&gamma, &["c.1", "c.2", "c.3"][..]),
    ] {
        for s in subjects {
            subs.push(client.subscribe(s.to_string()).await.unwrap());
        }
        client.flush().await.unwrap();
    }
    // beta publishes 3 × 100 B, alpha 1 × 10 B, gamma nothing.
    for _ in 0..3 {
        beta.publish("nowhere", vec![b'b'; 100].into())
            .await
            .unwrap();
    }
    alpha
        .publish("nowhere", vec![b'a'; 10].into())
        .await
        .unwrap();
    alpha.flush().await.unwrap();
    beta.flush().await.unwrap();

    let connz = eventually("connz to count beta's publishes", WAIT, || async {
        let v = get_json(http, "/connz?subs=1").await;
        let beta = v["connections"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "beta")?
            .clone();
        (beta["in_msgs"] == 3).then_some(v)
    })
    .await;
    assert_eq!(connz["server_id"], server.server_id());
    assert_eq!(u(&connz, "/num_connections"), 3);
    assert_eq!(u(&connz, "/total"), 3);
    assert_eq!(u(&connz, "/offset"), 0);
    assert_eq!(u(&connz, "/limit"), 1024);
    let conns = connz["connections"].as_array().unwrap();
    let names: Vec<&str> = conns.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma"], "sorted by cid");
    let beta_row = &conns[1];
    assert_eq!(beta_row["in_bytes"], 300);
    assert_eq!(beta_row["subscriptions"], 2);
    assert_eq!(
        beta_row["subscriptions_list"],
        serde_json::json!(["b.1", "b.2"])
    );
    assert_eq!(beta_row["lang"], "rust");
    assert_eq!(beta_row["ip"], "127.0.0.1");
    assert!(beta_row["version"].as_str().is_some_and(|v| !v.is_empty()));
    assert!(beta_row["port"].as_u64().is_some_and(|p| p > 0));
    assert!(beta_row.get("tls_version").is_none(), "plain connection");
    assert!(
        beta_row.get("authorized_user").is_none(),
        "no users configured"
    );
    let cids: Vec<u64> = conns.iter().map(|c| c["cid"].as_u64().unwrap()).collect();

    // Without subs=1 no lists.
    let plain = get_json(http, "/connz").await;
    assert!(plain["connections"][0].get("subscriptions_list").is_none());

    // Paging: the second connection alone.
    let paged = get_json(http, "/connz?offset=1&limit=1").await;
    assert_eq!(u(&paged, "/num_connections"), 1);
    assert_eq!(u(&paged, "/total"), 3);
    assert_eq!(u(&paged, "/connections/0/cid"), cids[1]);
    let past = get_json(http, "/connz?offset=5").await;
    assert_eq!(u(&past, "/num_connections"), 0);

    // Sorting: largest first for counters.
    let order = |v: &Value| -> Vec<String> {
        v["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        order(&get_json(http, "/connz?sort=subs").await),
        ["gamma", "beta", "alpha"]
    );
    assert_eq!(
        order(&get_json(http, "/connz?sort=bytes_from").await),
        ["beta", "alpha", "gamma"]
    );
    assert_eq!(
        order(&get_json(http, "/connz?sort=msgs_from").await),
        ["beta", "alpha", "gamma"]
    );
    assert_eq!(
        order(&get_json(http, "/connz?sort=start").await),
        ["alpha", "beta", "gamma"]
    );

    // Bad queries are 400s that say what was wrong.
    let bad = get(http, "/connz?sort=size").await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("size"), "{}", bad.body);
    assert_eq!(get(http, "/connz?limit=many").await.status, 400);
    drop(subs);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsz_counts_subscriptions_and_the_match_cache() {
    let (server, http) = start_monitored().await;
    let client = nats(&server).await;
    let mut sub = client.subscribe("orders.*").await.unwrap();
    let _queue = client
        .queue_subscribe("work", "workers".to_string())
        .await
        .unwrap();
    client.flush().await.unwrap();
    publish_and_receive(&client, &mut sub, "orders.eu", 200, 1).await;

    let subsz = get_json(http, "/subsz").await;
    assert!(u(&subsz, "/num_subscriptions") >= 2);
    assert!(u(&subsz, "/num_cache") >= 1);
    assert!(subsz.get("subscriptions_list").is_none());
    let rate = subsz["cache_hit_rate"].as_f64().unwrap();
    // 200 publishes on one subject: one miss, the rest cached.
    assert!(rate > 0.9 && rate <= 1.0, "hit rate {rate}: {subsz:#}");

    let listed = get_json(http, "/subsz?subs=1").await;
    assert_eq!(u(&listed, "/total"), 2);
    let list = listed["subscriptions_list"].as_array().unwrap();
    let subjects: Vec<&str> = list
        .iter()
        .map(|s| s["subject"].as_str().unwrap())
        .collect();
    assert_eq!(subjects, ["orders.*", "work"]);
    assert_eq!(list[1]["qgroup"], "workers");
    assert_eq!(list[0]["cid"], list[1]["cid"]);
    let paged = get_json(http, "/subsz?subs=1&offset=1&limit=1").await;
    assert_eq!(paged["subscriptions_list"][0]["subject"], "work");
    server.shutdown().await;
}

/// Node `name` of cluster "test" seeded with `seeds`, with the endpoints on.
async fn monitored_node(name: &str, seeds: &[String]) -> ServerHandle {
    let mut config = Config::core("127.0.0.1:0");
    config.server_name = Some(name.to_string());
    let mut cluster = ClusterConfig::new("test", "127.0.0.1:0", seeds);
    cluster.connect_backoff = Duration::from_millis(20);
    cluster.connect_backoff_max = Duration::from_millis(200);
    config.cluster = Some(cluster);
    monitored(&mut config);
    Server::start(config).await.expect("node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routez_shows_the_peer_and_the_traffic_between_nodes() {
    let a = monitored_node("A", &[]).await;
    let b = monitored_node("B", &[a.route_url().unwrap()]).await;
    let (http_a, http_b) = (a.http_addr().unwrap(), b.http_addr().unwrap());
    eventually("A and B to be routed", WAIT, || async {
        (a.peer_names() == ["B"] && b.peer_names() == ["A"]).then_some(())
    })
    .await;
    let on_b = nats(&b).await;
    let mut sub = on_b.subscribe("cross").await.unwrap();
    on_b.flush().await.unwrap();
    eventually("A to hear B's interest", WAIT, || async {
        a.has_route_interest("cross").then_some(())
    })
    .await;
    let on_a = nats(&a).await;
    publish_and_receive(&on_a, &mut sub, "cross", 10, 10).await;

    let routez_a = wait_for_value(http_a, "/routez", "/routes/0/out_msgs", 10).await;
    assert_eq!(u(&routez_a, "/num_routes"), 1);
    let route = &routez_a["routes"][0];
    assert_eq!(route["remote_name"], "B");
    assert_eq!(route["remote_id"], b.server_id());
    assert_eq!(route["out_bytes"], 100);
    assert_eq!(route["ip"], "127.0.0.1");
    assert!(u(&routez_a, "/routes/0/subscriptions") >= 1, "B's interest");
    assert!(route["pending_size"].as_u64().is_some());

    let routez_b = wait_for_value(http_b, "/routez", "/routes/0/in_msgs", 10).await;
    assert_eq!(routez_b["routes"][0]["remote_name"], "A");
    // One of the two dialled the route the mesh kept; each side says which.
    assert_ne!(routez_b["routes"][0]["did_solicit"], route["did_solicit"]);
    assert!(route["did_solicit"].is_boolean());
    assert_eq!(routez_b["routes"][0]["in_bytes"], 100);

    let varz = get_json(http_a, "/varz").await;
    assert_eq!(u(&varz, "/routes"), 1);
    assert_eq!(varz["cluster"]["name"], "test");

    let metrics = scrape(http_a).await;
    let peer = [("peer", "B")];
    assert_eq!(
        metrics.value("skiff_route_messages_sent_total", &peer),
        Some(10.0)
    );
    assert_eq!(
        metrics.value("skiff_route_bytes_sent_total", &peer),
        Some(100.0)
    );
    assert_eq!(metrics.value("skiff_routes", &[]), Some(1.0));
    assert!(metrics.value("skiff_route_pending_bytes", &peer).is_some());

    // A core server has no routes, and says so.
    let (single, http) = start_monitored().await;
    assert_eq!(u(&get_json(http, "/routez").await, "/num_routes"), 0);
    single.shutdown().await;
    b.shutdown().await;
    a.shutdown().await;
}

/// A server with durable streams in a temporary directory and the
/// endpoints on.
async fn start_with_streams() -> (ServerHandle, SocketAddr, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary store directory");
    let mut config = Config::with_streams("127.0.0.1:0", dir.path());
    monitored(&mut config);
    let server = within("the server to start", Server::start(config))
        .await
        .expect("server starts");
    let http = server.http_addr().expect("the server serves HTTP");
    (server, http, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsz_and_metrics_report_streams_and_consumers() {
    let (server, http, _dir) = start_with_streams().await;
    let client = nats(&server).await;
    let js = jetstream::new(client.clone());
    let mut orders = js
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..5 {
        js.publish(format!("orders.{i}"), vec![b'o'; 20].into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let consumer = orders
        .create_consumer(pull::Config {
            durable_name: Some("ship".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    // Two delivered and not acked: 3 pending, 2 awaiting ack.
    let mut batch = consumer.fetch().max_messages(2).messages().await.unwrap();
    for _ in 0..2 {
        within("a fetched message", batch.next())
            .await
            .unwrap()
            .unwrap();
    }
    let api = orders.info().await.unwrap().state.clone();
    assert_eq!(api.messages, 5);

    let jsz = get_json(http, "/jsz").await;
    assert_eq!(u(&jsz, "/streams"), 1);
    assert_eq!(u(&jsz, "/consumers"), 1);
    assert_eq!(u(&jsz, "/messages"), 5);
    assert_eq!(u(&jsz, "/bytes"), api.bytes);
    assert_eq!(u(&jsz, "/storage"), api.bytes);
    assert_eq!(u(&jsz, "/memory"), 0);
    assert_eq!(jsz["config"]["sync_always"], true);
    assert!(jsz.get("account_details").is_none());

    let detailed = get_json(http, "/jsz?consumers=1&config=1").await;
    let stream = &detailed["account_details"][0]["stream_detail"][0];
    assert_eq!(detailed["account_details"][0]["name"], "$G");
    assert_eq!(stream["name"], "ORDERS");
    assert_eq!(stream["state"]["messages"], 5);
    assert_eq!(stream["state"]["last_seq"], 5);
    assert_eq!(
        stream["config"]["subjects"],
        serde_json::json!(["orders.>"])
    );
    let ship = &stream["consumer_detail"][0];
    assert_eq!(ship["name"], "ship");
    assert_eq!(ship["num_pending"], 3);
    assert_eq!(ship["num_ack_pending"], 2);
    let varz = get_json(http, "/varz").await;
    assert_eq!(u(&varz, "/jetstream/stats/storage"), api.bytes);
    // Unset limits are reported as resolved at start (nats-server's
    // defaults), not as -1.
    let defaults = Config::default().jetstream.resolve_limits();
    assert_eq!(
        u(&varz, "/jetstream/config/max_memory"),
        defaults.max_memory
    );
    assert!(u(&varz, "/jetstream/config/max_storage") > 0, "{varz}");
    assert_eq!(
        detailed["config"]["max_storage"], varz["jetstream"]["config"]["max_storage"],
        "/jsz and /varz agree"
    );
    let streams_only = get_json(http, "/jsz?streams=1").await;
    let detail = &streams_only["account_details"][0]["stream_detail"][0];
    assert!(detail.get("consumer_detail").is_none());
    assert!(detail.get("config").is_none());

    let metrics = scrape(http).await;
    let orders_label = [("stream", "ORDERS")];
    let ship_labels = [("stream", "ORDERS"), ("consumer", "ship")];
    assert_eq!(
        metrics.value("skiff_stream_messages", &orders_label),
        Some(5.0)
    );
    assert_eq!(
        metrics.value("skiff_stream_bytes", &orders_label),
        Some(api.bytes as f64)
    );
    assert_eq!(
        metrics.value("skiff_consumer_num_pending", &ship_labels),
        Some(3.0)
    );
    assert_eq!(
        metrics.value("skiff_consumer_num_ack_pending", &ship_labels),
        Some(2.0)
    );
    assert_eq!(metrics.value("skiff_jetstream_streams", &[]), Some(1.0));
    // Five acknowledged publishes, each fsynced before its PubAck: at least
    // one fsync and one publish-to-ack observation, in consistent buckets.
    for name in ["skiff_store_fsync_seconds", "skiff_publish_ack_seconds"] {
        let count = metrics
            .value(&format!("{name}_count"), &[])
            .unwrap_or_else(|| panic!("{name}_count"));
        assert!((1.0..=5.0).contains(&count), "{name}_count = {count}");
        let buckets = metrics.histogram(name);
        assert_eq!(buckets.last().map(|b| b.less_than), Some(f64::INFINITY));
        assert_eq!(buckets.last().map(|b| b.count), Some(count));
        assert!(
            buckets.windows(2).all(|w| w[0].count <= w[1].count),
            "cumulative"
        );
        assert!(metrics
            .value(&format!("{name}_sum"), &[])
            .is_some_and(|s| s > 0.0));
    }
    drop(batch);
    server.shutdown().await;
}

/// A parsed `/metrics`.
struct Metrics(prometheus_parse::Scrape);

impl Metrics {
    /// The value of the counter, gauge or untyped sample `name` whose
    /// labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        use prometheus_parse::Value as V;
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .find_map(|s| match s.value {
                V::Counter(v) | V::Gauge(v) | V::Untyped(v) => Some(v),
                _ => None,
            })
    }

    fn kind(&self, name: &str) -> Option<&prometheus_parse::Value> {
        self.0
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| &s.value)
    }

    fn histogram(&self, name: &str) -> Vec<prometheus_parse::HistogramCount> {
        match self.kind(name) {
            Some(prometheus_parse::Value::Histogram(buckets)) => buckets.clone(),
            other => panic!("{name} is not a histogram: {other:?}"),
        }
    }
}

async fn scrape(http: SocketAddr) -> Metrics {
    let reply = get(http, "/metrics").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        reply.header("content-type")
    );
    let lines = reply.body.lines().map(|l| Ok(l.to_string()));
    Metrics(prometheus_parse::Scrape::parse(lines).expect("/metrics parses"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_agree_with_the_traffic() {
    let (server, http) = start_monitored().await;
    let subscriber = nats(&server).await;
    let publisher = nats(&server).await;
    let mut sub = subscriber.subscribe("load").await.unwrap();
    subscriber.flush().await.unwrap();
    let before = get_json(http, "/varz").await;
    publish_and_receive(&publisher, &mut sub, "load", 100, 10).await;
    wait_for_value(http, "/varz", "/in_msgs", u(&before, "/in_msgs") + 100).await;

    let metrics = scrape(http).await;
    let counter = |name: &str| match metrics.kind(name) {
        Some(prometheus_parse::Value::Counter(v)) => *v,
        other => panic!("{name} is not a counter: {other:?}"),
    };
    let gauge = |name: &str| match metrics.kind(name) {
        Some(prometheus_parse::Value::Gauge(v)) => *v,
        other => panic!("{name} is not a gauge: {other:?}"),
    };
    let was = |p: &str| u(&before, p) as f64;
    assert_eq!(
        counter("skiff_messages_received_total"),
        was("/in_msgs") + 100.0
    );
    assert_eq!(
        counter("skiff_bytes_received_total"),
        was("/in_bytes") + 1000.0
    );
    assert_eq!(
        counter("skiff_messages_sent_total"),
        was("/out_msgs") + 100.0
    );
    assert_eq!(
        counter("skiff_bytes_sent_total"),
        was("/out_bytes") + 1000.0
    );
    assert_eq!(gauge("skiff_connections"), 2.0);
    assert!(counter("skiff_connections_total") >= 2.0);
    assert_eq!(counter("skiff_slow_consumers_total"), 0.0);
    assert!(gauge("skiff_subscriptions") >= 1.0);
    assert_eq!(gauge("skiff_up"), 1.0);
    assert!(gauge("skiff_uptime_seconds") > 0.0);
    assert_eq!(gauge("skiff_jetstream_enabled"), 0.0);
    assert_eq!(
        metrics.value("skiff_info", &[("server_id", server.server_id())]),
        Some(1.0)
    );
    assert!(metrics.0.docs.contains_key("skiff_messages_received_total"));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_503_when_the_store_cannot_be_written() {
    let (server, http, dir) = start_with_streams().await;
    let ok = get(http, "/healthz").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["status"], "ok");

    // Read-only store directory. Root ignores directory permissions, so
    // there (as in CI) the probe's file name is taken by a directory
    // instead, which no one can open for writing.
    let store = dir.path().to_path_buf();
    let blocker = store.join(skiff::monitor::PROBE_FILE);
    set_mode(&store, 0o500);
    let still_writable = std::fs::write(store.join("writable-check"), b"x").is_ok();
    if still_writable {
        let _ = std::fs::remove_file(store.join("writable-check"));
        set_mode(&store, 0o700);
        std::fs::create_dir(&blocker).unwrap();
    }
    let down = eventually("/healthz to turn 503", WAIT, || async {
        let r = get(http, "/healthz").await;
        (r.status == 503).then_some(r)
    })
    .await;
    let body = down.json();
    assert_eq!(body["status"], "unavailable");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("not writable")),
        "{body}"
    );

    // Writable again: healthy again.
    set_mode(&store, 0o700);
    let _ = std::fs::remove_dir(&blocker);
    eventually("/healthz to recover", WAIT, || async {
        (get(http, "/healthz").await.status == 200).then_some(())
    })
    .await;

    // Without durable streams there is no store to probe.
    let (core, core_http) = start_monitored().await;
    assert_eq!(get(core_http, "/healthz").await.status, 200);
    core.shutdown().await;
    server.shutdown().await;
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_required_everywhere_but_healthz_and_never_shown() {
    let server = start_with(|c| {
        let mut http = HttpConfig::new("127.0.0.1:0");
        http.token = Some(skiff::auth::Secret("monitor-s3cret".into()));
        c.http = Some(http);
        let auth = c.authorization.get_or_insert_with(Default::default);
        auth.user = Some("app".into());
        auth.password = Some(skiff::auth::Secret("client-pa55".into()));
    })
    .await;
    let http = server.http_addr().unwrap();
    let client = nats_with(
        &server,
        async_nats::ConnectOptions::with_user_and_password("app".into(), "client-pa55".into()),
    )
    .await;
    client.flush().await.unwrap();

    for path in [
        "/varz", "/connz", "/subsz", "/routez", "/jsz", "/metrics", "/",
    ] {
        let refused = get(http, path).await;
        assert_eq!(refused.status, 401, "{path} without a token");
        assert!(refused
            .header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")));
        let wrong = request(http, "GET", path, Some("monitor-s3creT")).await;
        assert_eq!(wrong.status, 401, "{path} with a wrong token");
        let allowed = request(http, "GET", path, Some("monitor-s3cret")).await;
        assert_eq!(allowed.status, 200, "{path}: {}", allowed.body);
        for secret in ["monitor-s3cret", "client-pa55"] {
            assert!(!allowed.body.contains(secret), "{path} shows {secret}");
        }
    }
    let connz = request(http, "GET", "/connz", Some("monitor-s3cret"))
        .await
        .json();
    assert_eq!(connz["connections"][0]["authorized_user"], "app");
    let varz = request(http, "GET", "/varz", Some("monitor-s3cret"))
        .await
        .json();
    assert_eq!(varz["auth_required"], true);
    assert_eq!(
        get(http, "/healthz").await.status,
        200,
        "probes send no token"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_get_is_allowed_and_unknown_paths_are_not_found() {
    let (server, http) = start_monitored().await;
    for method in ["POST", "PUT", "DELETE"] {
        let refused = request(http, method, "/varz", None).await;
        assert_eq!(refused.status, 405, "{method}");
        assert_eq!(refused.header("allow"), Some("GET"));
    }
    assert_eq!(get(http, "/nope").await.status, 404);
    assert_eq!(get(http, "/varzz").await.status, 404);
    let index = get_json(http, "/").await;
    assert!(index["endpoints"].as_array().is_some_and(|e| e.len() == 7));
    assert_eq!(get(http, "/subscriptionsz").await.status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoints_are_off_by_default_and_stop_with_the_server() {
    let plain = start_with(|_| {}).await;
    assert_eq!(plain.http_addr(), None);
    plain.shutdown().await;

    let (server, http) = start_monitored().await;
    assert!(http.ip().is_loopback());
    // A keep-alive connection left open does not hold shutdown up.
    let mut idle = TcpStream::connect(http).await.unwrap();
    idle.write_all(b"GET /varz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    within("a keep-alive answer", idle.read_exact(&mut first))
        .await
        .unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    within("shutdown", server.shutdown()).await;
    assert!(TcpStream::connect(http).await.is_err(), "listener closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_http_port_fails_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = Config::core("127.0.0.1:0");
    config.http = Some(HttpConfig::new(&taken.local_addr().unwrap().to_string()));
    match Server::start(config).await {
        Err(StartError::Monitor(e)) => assert!(e.to_string().contains("monitoring"), "{e}"),
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("started on a taken port"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_uses_only_exported_metrics() {
    let (server, http, _dir) = start_with_streams().await;
    let metrics = scrape(http).await;
    // Every family is described (HELP) even before it has a sample.
    let mut exported: Vec<String> = metrics.0.docs.keys().cloned().collect();
    for suffix in ["_bucket", "_sum", "_count"] {
        for h in ["skiff_store_fsync_seconds", "skiff_publish_ack_seconds"] {
            exported.push(format!("{h}{suffix}"));
        }
    }
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/grafana/skiff-dashboard.json"),
    )
    .unwrap();
    let json: Value = serde_json::from_str(&dashboard).expect("the dashboard is valid JSON");
    assert_eq!(json["title"], "Skiff");
    let mut used = Vec::new();
    for prefix in ["skiff_", "process_"] {
        for (at, _) in dashboard.match_indices(prefix) {
            let name: String = dashboard[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `skiff-overview` (the uid) and label-only words are not metrics.
            if name.len() > prefix.len() {
                used.push(name);
            }
        }
    }
    assert!(used.len() > 10, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(name),
            "the dashboard uses {name}, which /metrics lacks"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_token_but_not_the_listener() {
    let mut config = Config::core("127.0.0.1:0");
    let mut http = HttpConfig::new("127.0.0.1:0");
    http.token = Some(skiff::auth::Secret("first".into()));
    config.http = Some(http);
    let server = Server::start(config.clone()).await.expect("server starts");
    let addr = server.http_addr().unwrap();
    assert_eq!(
        request(addr, "GET", "/varz", Some("first")).await.status,
        200
    );

    let mut rotated = config.clone();
    if let Some(http) = rotated.http.as_mut() {
        http.token = Some(skiff::auth::Secret("second".into()));
    }
    server.reload(&rotated).expect("a new token is reloadable");
    assert_eq!(
        request(addr, "GET", "/varz", Some("first")).await.status,
        401
    );
    assert_eq!(
        request(addr, "GET", "/varz", Some("second")).await.status,
        200
    );

    let mut moved = rotated.clone();
    if let Some(http) = moved.http.as_mut() {
        http.listen = "127.0.0.1:1".into();
    }
    let refused = server.reload(&moved).unwrap_err().to_string();
    assert!(refused.contains("http.listen"), "{refused}");
    let mut off = rotated.clone();
    off.http = None;
    assert!(
        server.reload(&off).is_err(),
        "turning monitoring off needs a restart"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_in_lame_duck_mode() {
    let server = start_with(|c| {
        monitored(c);
        // Long enough that the server is still up while the test looks.
        c.lame_duck_duration = Duration::from_secs(30);
        c.lame_duck_grace_period = Duration::from_secs(10);
    })
    .await;
    let http = server.http_addr().unwrap();
    // A connected client keeps the drain (and so the server) going; with
    // none, lame duck mode ends in a shutdown at once.
    let client = nats(&server).await;
    client.flush().await.unwrap();
    assert_eq!(get(http, "/healthz").await.status, 200);
    server.lame_duck();
    let reply = get(http, "/healthz").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("lame duck"), "{}", reply.body);
    // The other endpoints still answer: operators watch the drain.
    assert_eq!(get(http, "/varz").await.status, 200);
    within("shutdown", server.shutdown()).await;
}

/// Starts a monitored server with streams on an existing store directory.
async fn start_on_store(dir: &std::path::Path) -> (ServerHandle, SocketAddr) {
    let mut config = Config::with_streams("127.0.0.1:0", dir);
    monitored(&mut config);
    let server = within("the server to start", Server::start(config))
        .await
        .expect("a damaged store never stops the server");
    let http = server.http_addr().expect("the server serves HTTP");
    (server, http)
}

/// A JetStream API request's JSON answer.
async fn api(client: &async_nats::Client, subject: &str) -> Value {
    let reply = within(
        subject,
        client.request(format!("$JS.API.{subject}"), "".into()),
    )
    .await
    .expect("an answer");
    serde_json::from_slice(&reply.payload).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stream_is_offline_and_the_others_work_on() {
    let dir = tempfile::tempdir().expect("temporary store directory");
    {
        let (server, _) = start_on_store(dir.path()).await;
        let js = jetstream::new(nats(&server).await);
        for name in ["GOOD", "BROKEN"] {
            js.create_stream(stream::Config {
                name: name.into(),
                subjects: vec![format!("{}.>", name.to_lowercase())],
                ..Default::default()
            })
            .await
            .expect("stream");
        }
        server.shutdown().await;
    }
    // The stream's own record, damaged.
    {
        let storage = skiff::store::FileStorage::open(dir.path()).expect("store opens");
        let broken = storage
            .open_stream("BROKEN", Default::default())
            .expect("stream opens");
        broken.save_meta(b"{not json").expect("write");
        broken.sync().expect("sync");
    }
    let (server, http) = start_on_store(dir.path()).await;
    let client = nats(&server).await;
    let info = api(&client, "STREAM.INFO.BROKEN").await;
    assert_eq!(info["error"]["err_code"], 10118, "{info}");
    let why = info["error"]["description"].as_str().unwrap_or("");
    assert!(why.contains("config record"), "{info}");
    let names = api(&client, "STREAM.NAMES").await;
    assert_eq!(names["streams"], serde_json::json!(["BROKEN", "GOOD"]));
    let list = api(&client, "STREAM.LIST").await;
    assert!(list["offline"]["BROKEN"].is_string(), "{list}");
    // The other stream takes publishes.
    let js = jetstream::new(client.clone());
    let ack = js.publish("good.1", "x".into()).await.unwrap().await;
    assert_eq!(ack.expect("GOOD works").stream, "GOOD");

    let health = get(http, "/healthz").await;
    assert_eq!(health.status, 503, "{}", health.body);
    assert!(health.body.contains("BROKEN"), "{}", health.body);
    let jsz = get_json(http, "/jsz").await;
    assert_eq!(jsz["offline"][0]["name"], "BROKEN", "{jsz}");

    // Deleting it lets the damage go.
    let deleted = api(&client, "STREAM.DELETE.BROKEN").await;
    assert_eq!(deleted["success"], true, "{deleted}");
    assert_eq!(get(http, "/healthz").await.status, 200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_lost_confirmed_writes_leaves_the_server_up_without_streams() {
    let dir = tempfile::tempdir().expect("temporary store directory");
    {
        let (server, _) = start_on_store(dir.path()).await;
        server.shutdown().await;
    }
    // The marker says far more was confirmed durable than the journal holds.
    let claimed: u64 = 1_000_000;
    let marker = [claimed.to_be_bytes(), (!claimed).to_be_bytes()].concat();
    std::fs::write(dir.path().join("skiff.synced"), marker).expect("write marker");

    let (server, http) = start_on_store(dir.path()).await;
    let client = nats(&server).await;
    let info = api(&client, "INFO").await;
    assert_eq!(info["error"]["err_code"], 10008, "{info}");
    assert!(
        info["error"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("journal is damaged")),
        "{info}"
    );
    // Core messaging works.
    let mut sub = client.subscribe("core.x").await.unwrap();
    client.publish("core.x", "hi".into()).await.unwrap();
    assert_eq!(next_msg(&mut sub).await.payload, "hi");
    let health = get(http, "/healthz").await;
    assert_eq!(health.status, 503, "{}", health.body);
    assert!(
        health.body.contains("JetStream is offline"),
        "{}",
        health.body
    );
    server.shutdown().await;
}

/// Starts on `dir` and checks that streams take publishes and the server
/// is healthy.
async fn streams_work_on(dir: &std::path::Path) {
    let (server, http) = start_on_store(dir).await;
    let js = jetstream::new(nats(&server).await);
    js.create_stream(stream::Config {
        name: "S".into(),
        subjects: vec!["s.>".into()],
        ..Default::default()
    })
    .await
    .expect("streams work");
    let ack = js.publish("s.1", "x".into()).await.unwrap().await;
    assert_eq!(ack.expect("acked").sequence, 1);
    assert_eq!(get(http, "/healthz").await.status, 200);
    server.shutdown().await;
}

#[tokio::test]
async fn a_sync_marker_that_cannot_be_read_or_written_does_not_stop_the_start() {
    let dir = tempfile::tempdir().expect("temporary store directory");
    // Neither readable nor replaceable as a file.
    std::fs::create_dir_all(dir.path().join("skiff.synced/inside")).expect("directory");
    streams_work_on(dir.path()).await;
}

#[tokio::test]
async fn an_empty_or_torn_sync_marker_does_not_stop_the_start() {
    for content in [&b""[..], &b"\x00\x00\x00"[..], &[0xffu8; 16][..]] {
        let dir = tempfile::tempdir().expect("temporary store directory");
        std::fs::write(dir.path().join("skiff.synced"), content).expect("write marker");
        streams_work_on(dir.path()).await;
    }
}
