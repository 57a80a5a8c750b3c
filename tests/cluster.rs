//! Clusters of embedded nodes (port 0 everywhere), driven by async-nats and
//! raw route connections: the mesh forms by gossip, messages cross it once,
//! queue groups stay exactly-once cluster-wide, and nodes come and go.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use common::jetstream::eventually;
use common::{nats, next_msg, round_trip, within, Raw, WAIT};
use futures::StreamExt;
use skiff::config::cluster::ClusterConfig;
use skiff::{Config, Server, ServerHandle};

/// A node named `name` in cluster "test", seeded with `seeds`, with fast
/// re-dials so tests do not wait on backoff.
fn node_config(name: &str, seeds: &[String]) -> Config {
    let mut config = Config::core("127.0.0.1:0");
    config.server_name = Some(name.to_string());
    let mut cluster = ClusterConfig::new("test", "127.0.0.1:0", seeds);
    cluster.connect_backoff = Duration::from_millis(20);
    cluster.connect_backoff_max = Duration::from_millis(200);
    config.cluster = Some(cluster);
    config
}

async fn node(name: &str, seeds: &[String]) -> ServerHandle {
    Server::start(node_config(name, seeds))
        .await
        .expect("node starts")
}

fn seed(node: &ServerHandle) -> Vec<String> {
    vec![node.route_url().expect("node has a route listener")]
}

/// Waits until every node has a route to every other one (by name).
async fn wait_for_mesh(nodes: &[&ServerHandle]) {
    for n in nodes {
        eventually("full mesh", WAIT, || async {
            (n.peer_names().len() == nodes.len() - 1).then_some(())
        })
        .await;
    }
}

/// A, B and C, where B and C know only A: the mesh forms by gossip.
async fn three_nodes() -> (ServerHandle, ServerHandle, ServerHandle) {
    let a = node("A", &[]).await;
    let b = node("B", &seed(&a)).await;
    let c = node("C", &seed(&a)).await;
    wait_for_mesh(&[&a, &b, &c]).await;
    (a, b, c)
}

/// Waits until `node` has heard (RS+) that a peer wants `subject`.
async fn wait_for_interest(node: &ServerHandle, subject: &str) {
    wait_for_peers_interested(node, subject, 1).await;
}

/// Waits until `peers` peer nodes have told `node` they want `subject`.
async fn wait_for_peers_interested(node: &ServerHandle, subject: &str, peers: usize) {
    eventually(
        &format!("{peers} peers' interest in {subject}"),
        WAIT,
        || async { (node.peers_interested(subject) >= peers).then_some(()) },
    )
    .await;
}

async fn shutdown(nodes: impl IntoIterator<Item = ServerHandle>) {
    for n in nodes {
        n.shutdown().await;
    }
}

fn text(msg: &async_nats::Message) -> String {
    String::from_utf8_lossy(&msg.payload).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_forms_a_full_mesh_without_duplicate_routes() {
    let (a, b, c) = three_nodes().await;
    assert_eq!(a.peer_names(), ["B", "C"]);
    assert_eq!(b.peer_names(), ["A", "C"]);
    assert_eq!(c.peer_names(), ["A", "B"]);
    // Two nodes that dial each other at once keep exactly one route.
    let mut x_config = node_config("X", &[]);
    let x_addr = free_port();
    x_config.cluster.as_mut().unwrap().listen = x_addr.to_string();
    let y = node("Y", &[format!("nats-route://{x_addr}")]).await;
    x_config.cluster.as_mut().unwrap().routes = seed(&y);
    let x = Server::start(x_config).await.unwrap();
    wait_for_mesh(&[&x, &y]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        (x.peer_names(), y.peer_names()),
        (vec!["Y".to_string()], vec!["X".to_string()])
    );
    shutdown([a, b, c, x, y]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_wildcards_cross_nodes_in_order() {
    let (a, b, c) = three_nodes().await;
    let (pa, sb, sc) = (nats(&a).await, nats(&b).await, nats(&c).await);
    let mut exact = sb.subscribe("orders.new").await.unwrap();
    let mut star = sc.subscribe("orders.*").await.unwrap();
    let mut full = sc.subscribe("orders.>").await.unwrap();
    round_trip(&sb).await;
    round_trip(&sc).await;
    // B's and C's subscriptions both, and C's `>` (sent after its `*`).
    wait_for_peers_interested(&a, "orders.new", 2).await;
    wait_for_interest(&a, "orders.x.y").await;

    for i in 0..200 {
        pa.publish("orders.new", i.to_string().into())
            .await
            .unwrap();
    }
    pa.publish("orders.x.y", "deep".into()).await.unwrap();
    for sub in [&mut exact, &mut star, &mut full] {
        for i in 0..200 {
            assert_eq!(text(&next_msg(sub).await), i.to_string(), "in order");
        }
    }
    assert_eq!(text(&next_msg(&mut full).await), "deep");
    // Nothing arrives twice, though C matches the subject with two patterns.
    round_trip(&sc).await;
    assert!(ready(&mut star).is_empty() && ready(&mut full).is_empty());
    shutdown([a, b, c]).await;
}

/// Messages already delivered to `sub`, without waiting.
fn ready(sub: &mut async_nats::Subscriber) -> Vec<async_nats::Message> {
    use futures::FutureExt;
    let mut out = Vec::new();
    while let Some(Some(m)) = tokio::task::unconstrained(sub.next()).now_or_never() {
        out.push(m);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_gets_every_message_once() {
    let (a, b, c) = three_nodes().await;
    let clients = [nats(&a).await, nats(&b).await, nats(&c).await];
    let mut subs = Vec::new();
    for client in &clients {
        subs.push(client.subscribe("fan").await.unwrap());
        round_trip(client).await;
    }
    // Each node must know both other nodes' subscribers before publishing.
    for n in [&a, &b, &c] {
        wait_for_peers_interested(n, "fan", 2).await;
    }
    for i in 0..1000 {
        clients[i % 3]
            .publish("fan", i.to_string().into())
            .await
            .unwrap();
    }
    for sub in &mut subs {
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(text(&next_msg(sub).await)), "duplicate");
        }
    }
    for (client, sub) in clients.iter().zip(&mut subs) {
        round_trip(client).await;
        assert!(ready(sub).is_empty(), "more than 1000");
    }
    // Each node received its clients' ~333 and the peers' ~667 over routes
    // (plus the round trips), and sent each message once to each peer with
    // interest and once to its own subscriber.
    for n in [&a, &b, &c] {
        let counts = n.counts();
        assert!(counts.in_msgs >= 1000, "{counts:?}");
        assert!(counts.out_msgs >= 1000 + 2 * 333, "{counts:?}");
    }
    shutdown([a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_across_nodes_gets_each_message_exactly_once() {
    let (a, b, c) = three_nodes().await;
    let clients = [nats(&a).await, nats(&b).await, nats(&c).await];
    let mut members = Vec::new();
    for client in &clients {
        members.push(
            client
                .queue_subscribe("work", "workers".into())
                .await
                .unwrap(),
        );
        round_trip(client).await;
    }
    // Publish from a node and a client with no member of their own.
    let d = node("D", &seed(&a)).await;
    wait_for_mesh(&[&a, &b, &c, &d]).await;
    wait_for_peers_interested(&d, "work", 3).await;
    let publisher = nats(&d).await;
    for i in 0..3000 {
        publisher
            .publish("work", i.to_string().into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let mut counts = BTreeMap::new();
    let mut seen = HashSet::new();
    let all = within("3000 queue messages", async {
        while seen.len() < 3000 {
            for (i, m) in members.iter_mut().enumerate() {
                for msg in ready(m) {
                    assert!(seen.insert(text(&msg)), "delivered twice: {}", text(&msg));
                    *counts.entry(i).or_insert(0) += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen.len()
    })
    .await;
    assert_eq!(all, 3000);
    // Every node's member did some of the work.
    assert_eq!(counts.len(), 3, "{counts:?}");
    for client in &clients {
        round_trip(client).await;
    }
    for m in &mut members {
        assert!(ready(m).is_empty(), "a message went twice");
    }

    shutdown([a, b, c, d]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_across_nodes_and_no_responders_too() {
    let (a, b, c) = three_nodes().await;
    let (service, requester) = (nats(&b).await, nats(&c).await);
    let mut requests = service.subscribe("time.now").await.unwrap();
    round_trip(&service).await;
    wait_for_interest(&c, "time.now").await;
    let answer = tokio::spawn(async move {
        let req = requests.next().await.unwrap();
        service
            .publish(req.reply.unwrap(), "noon".into())
            .await
            .unwrap();
        service.flush().await.unwrap();
        service
    });
    let reply = within(
        "a reply across nodes",
        requester.request("time.now", "?".into()),
    )
    .await
    .unwrap();
    assert_eq!(text(&reply), "noon");
    let _service = answer.await.unwrap();
    // Nobody anywhere: the requester is told at once.
    let err = within(
        "no responders",
        requester.request("nobody.home", "?".into()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    shutdown([a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_forwarding() {
    let (a, b, c) = three_nodes().await;
    let sub_client = nats(&b).await;
    let mut sub = sub_client.subscribe("temp").await.unwrap();
    round_trip(&sub_client).await;
    wait_for_interest(&a, "temp").await;
    sub.unsubscribe().await.unwrap();
    round_trip(&sub_client).await;
    eventually("interest withdrawn", WAIT, || async {
        (!a.has_route_interest("temp")).then_some(())
    })
    .await;
    // Two subscriptions on one node: the interest lasts until both go.
    let mut s1 = sub_client.subscribe("temp").await.unwrap();
    let _s2 = sub_client.subscribe("temp").await.unwrap();
    round_trip(&sub_client).await;
    wait_for_interest(&a, "temp").await;
    s1.unsubscribe().await.unwrap();
    round_trip(&sub_client).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(a.has_route_interest("temp"));
    shutdown([a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_survives_the_seed_and_finds_late_joiners() {
    let (a, b, c) = three_nodes().await;
    // D knows only C, and still gets what is published on A.
    let d = node("D", &seed(&c)).await;
    wait_for_mesh(&[&a, &b, &c, &d]).await;
    let on_d = nats(&d).await;
    let mut sub = on_d.subscribe("late").await.unwrap();
    round_trip(&on_d).await;
    wait_for_interest(&a, "late").await;
    let on_a = nats(&a).await;
    on_a.publish("late", "hi".into()).await.unwrap();
    on_a.flush().await.unwrap();
    assert_eq!(text(&next_msg(&mut sub).await), "hi");

    // The seed goes away: B still reaches C.
    a.shutdown().await;
    let on_c = nats(&c).await;
    let mut sub = on_c.subscribe("after").await.unwrap();
    round_trip(&on_c).await;
    wait_for_interest(&b, "after").await;
    let on_b = nats(&b).await;
    on_b.publish("after", "still here".into()).await.unwrap();
    assert_eq!(text(&next_msg(&mut sub).await), "still here");
    shutdown([b, c, d]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_fails_over_to_a_node_it_learnt_from_connect_urls() {
    let (a, b, c) = three_nodes().await;
    let client = within(
        "connect",
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(a.client_url()),
    )
    .await
    .unwrap();
    let mut sub = client.subscribe("alive").await.unwrap();
    round_trip(&client).await;
    // The INFO it got names the other nodes' client URLs.
    let (mut raw, info) = Raw::connect_info(a.addr()).await;
    let urls = info["connect_urls"].as_array().cloned().unwrap_or_default();
    assert_eq!(urls.len(), 3, "{info}");
    raw.send("PING\r\n").await;

    a.shutdown().await;
    let publisher = nats(&b).await;
    // The client reconnects to B or C and re-subscribes; publish until the
    // subscription works again.
    within("the subscription to work again", async {
        loop {
            publisher.publish("alive", "yes".into()).await.unwrap();
            if let Ok(Some(msg)) =
                tokio::time::timeout(Duration::from_millis(200), sub.next()).await
            {
                break msg;
            }
        }
    })
    .await;
    shutdown([b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_and_routes_both_ways() {
    let (a, b, c) = three_nodes().await;
    c.shutdown().await;
    eventually("A to notice C is gone", WAIT, || async {
        (a.peer_names() == ["B"]).then_some(())
    })
    .await;
    let c = node("C", &seed(&a)).await;
    wait_for_mesh(&[&a, &b, &c]).await;
    let (on_a, on_c) = (nats(&a).await, nats(&c).await);
    let mut at_a = on_a.subscribe("to.a").await.unwrap();
    let mut at_c = on_c.subscribe("to.c").await.unwrap();
    round_trip(&on_a).await;
    round_trip(&on_c).await;
    wait_for_interest(&c, "to.a").await;
    wait_for_interest(&a, "to.c").await;
    on_c.publish("to.a", "from c".into()).await.unwrap();
    on_a.publish("to.c", "from a".into()).await.unwrap();
    assert_eq!(text(&next_msg(&mut at_a).await), "from c");
    assert_eq!(text(&next_msg(&mut at_c).await), "from a");
    shutdown([a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_sends_garbage_is_closed_and_the_node_carries_on() {
    let a = node("A", &[]).await;
    let route_addr = a.route_addr().unwrap();
    let mut raw = Raw::connect(route_addr).await;
    let info = raw.read_line().await;
    assert!(
        info.starts_with(b"INFO {"),
        "{}",
        String::from_utf8_lossy(&info)
    );
    raw.send("HELLO THERE\r\n").await;
    let rest = raw.read_to_close().await;
    assert!(
        String::from_utf8_lossy(&rest).contains("-ERR"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    // A route of another cluster is refused too.
    let mut raw = Raw::connect(route_addr).await;
    raw.read_line().await;
    raw.send("CONNECT {\"server_id\":\"NX\",\"cluster\":\"other\"}\r\n")
        .await;
    let rest = raw.read_to_close().await;
    assert!(String::from_utf8_lossy(&rest).contains("cluster"));
    // Clients are unaffected.
    let client = nats(&a).await;
    round_trip(&client).await;
    assert!(a.peer_names().is_empty());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_stops_reading_is_cut_off_as_a_slow_route() {
    let mut config = node_config("A", &[]);
    config.cluster.as_mut().unwrap().max_pending = 256 * 1024;
    config.max_pending = 256 * 1024;
    config.max_payload = 64 * 1024;
    let a = Server::start(config).await.unwrap();
    // A hand-made peer: handshake, ask for everything, never read again.
    let mut raw = Raw::connect(a.route_addr().unwrap()).await;
    raw.read_line().await;
    raw.send(
        "CONNECT {\"server_id\":\"NSTALLED\",\"cluster\":\"test\"}\r\n\
         INFO {\"server_id\":\"NSTALLED\",\"server_name\":\"stalled\",\"cluster\":\"test\",\
         \"route_addr\":\"127.0.0.1:1\",\"client_addr\":\"127.0.0.1:1\"}\r\n\
         RS+ $G flood\r\n",
    )
    .await;
    wait_for_interest(&a, "flood").await;
    assert_eq!(a.peer_names(), ["stalled"]);
    let publisher = nats(&a).await;
    let payload = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
    within("the stalled route to be cut off", async {
        for _ in 0..100_000 {
            publisher.publish("flood", payload.clone()).await.unwrap();
            if a.peer_names().is_empty() {
                return;
            }
        }
        panic!("never cut off");
    })
    .await;
    round_trip(&publisher).await;
    drop(raw);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_need_the_cluster_credentials() {
    use skiff::config::authorization::Secret;
    use skiff::config::cluster::RouteAuthorization;
    let auth = |user: &str, pass: &str| RouteAuthorization {
        user: Some(user.to_string()),
        password: Some(Secret(pass.to_string())),
        token: None,
    };
    let mut a_config = node_config("A", &[]);
    a_config.cluster.as_mut().unwrap().authorization = Some(auth("route", "s3cret"));
    let a = Server::start(a_config).await.unwrap();
    let addr = a.route_addr().unwrap();
    // Wrong password in the seed URL: refused, however often it retries.
    let b = node("B", &[format!("nats-route://route:wrong@{addr}")]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.peer_names().is_empty() && b.peer_names().is_empty());
    // Credentials from the URL, and from the node's own authorization.
    let c = node("C", &[format!("nats-route://route:s3cret@{addr}")]).await;
    let mut d_config = node_config("D", &seed(&a));
    d_config.cluster.as_mut().unwrap().authorization = Some(auth("route", "s3cret"));
    let d = Server::start(d_config).await.unwrap();
    eventually("C and D to join A", WAIT, || async {
        (a.peer_names() == ["C", "D"]).then_some(())
    })
    .await;
    shutdown([a, b, c, d]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_can_require_mutual_tls() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use skiff::config::TlsConfig;
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // A CA, and for each node a certificate for 127.0.0.1 it signed: with
    // no extended key usage, good for a route's both ends.
    let authority = |name: &str| {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap(), key)
    };
    let tls_for = |(ca, ca_key): &(rcgen::Certificate, KeyPair), tag: &str| {
        let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let node = params.signed_by(&key, ca, ca_key).unwrap();
        TlsConfig {
            ca_file: Some(write(&format!("{tag}-ca.pem"), &ca.pem())),
            verify: true,
            ..TlsConfig::new(
                write(&format!("{tag}.pem"), &node.pem()),
                write(&format!("{tag}-key.pem"), &key.serialize_pem()),
            )
        }
    };
    let ours = authority("Cluster CA");
    let theirs = authority("Other CA");
    let with_tls = |name: &str, seeds: &[String], tls: TlsConfig| {
        let mut config = node_config(name, seeds);
        config.cluster.as_mut().unwrap().tls = Some(tls);
        config
    };
    let a = Server::start(with_tls("A", &[], tls_for(&ours, "a")))
        .await
        .unwrap();
    let b = Server::start(with_tls("B", &seed(&a), tls_for(&ours, "b")))
        .await
        .unwrap();
    wait_for_mesh(&[&a, &b]).await;
    let (on_a, on_b) = (nats(&a).await, nats(&b).await);
    let mut sub = on_b.subscribe("secure").await.unwrap();
    round_trip(&on_b).await;
    wait_for_interest(&a, "secure").await;
    on_a.publish("secure", "sealed".into()).await.unwrap();
    assert_eq!(text(&next_msg(&mut sub).await), "sealed");
    // A node whose certificate another CA signed, and one without TLS, stay
    // out.
    let c = Server::start(with_tls("C", &seed(&a), tls_for(&theirs, "c")))
        .await
        .unwrap();
    let d = node("D", &seed(&a)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(a.peer_names(), ["B"]);
    assert!(c.peer_names().is_empty() && d.peer_names().is_empty());
    shutdown([a, b, c, d]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_captures_publishes_from_every_node() {
    let store = tempfile::tempdir().unwrap();
    let mut a_config = node_config("A", &[]);
    a_config.jetstream = Config::with_streams("127.0.0.1:0", store.path()).jetstream;
    let a = Server::start(a_config).await.unwrap();
    let b = node("B", &seed(&a)).await;
    wait_for_mesh(&[&a, &b]).await;
    let js_a = async_nats::jetstream::new(nats(&a).await);
    js_a.create_stream(async_nats::jetstream::stream::Config {
        name: "ORDERS".to_string(),
        subjects: vec!["orders.>".to_string()],
        ..Default::default()
    })
    .await
    .unwrap();
    wait_for_interest(&b, "orders.1").await;
    // Published on B, stored on A, acknowledged back across the route.
    let js_b = async_nats::jetstream::new(nats(&b).await);
    for i in 1..=3u64 {
        let ack = within("a PubAck across nodes", async {
            js_b.publish(format!("orders.{i}"), "new".into())
                .await
                .unwrap()
                .await
                .unwrap()
        })
        .await;
        assert_eq!((ack.stream.as_str(), ack.sequence), ("ORDERS", i));
    }
    let mut stream = js_a.get_stream("ORDERS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 3);
    shutdown([a, b]).await;
}

#[test]
fn the_example_cluster_files_describe_one_mesh() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf");
    let mut route_ports = Vec::new();
    for n in ["a", "b", "c"] {
        let config = Config::from_file(&dir.join(format!("cluster-{n}.toml"))).unwrap();
        let cluster = config.cluster.expect("a [cluster] table");
        assert_eq!(cluster.name, "local");
        assert_eq!(cluster.routes.len(), 3, "every node lists every route");
        assert!(cluster.routes.iter().any(|r| r.ends_with(&cluster.listen)));
        assert_eq!(config.server_name.as_deref(), Some(&*format!("node-{n}")));
        route_ports.push(cluster.listen);
    }
    route_ports.dedup();
    assert_eq!(route_ports.len(), 3);
}

/// A free loopback port (bound and released: the test then listens on it).
fn free_port() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_is_dialled_until_it_comes_up_and_again_after_it_restarts() {
    let a_route = free_port();
    let a_config = || {
        let mut config = node_config("A", &[]);
        config.cluster.as_mut().unwrap().listen = a_route.to_string();
        config
    };
    // B starts first: its seed is not there yet.
    let b = node("B", &[format!("nats-route://{a_route}")]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(b.peer_names().is_empty());
    let a = Server::start(a_config()).await.unwrap();
    wait_for_mesh(&[&a, &b]).await;
    // A goes away and comes back on the same address: B dials it again.
    a.shutdown().await;
    eventually("B to notice A is gone", WAIT, || async {
        b.peer_names().is_empty().then_some(())
    })
    .await;
    let a = Server::start(a_config()).await.unwrap();
    wait_for_mesh(&[&a, &b]).await;
    let (on_a, on_b) = (nats(&a).await, nats(&b).await);
    let mut sub = on_a.subscribe("back").await.unwrap();
    round_trip(&on_a).await;
    wait_for_interest(&b, "back").await;
    on_b.publish("back", "welcome".into()).await.unwrap();
    assert_eq!(text(&next_msg(&mut sub).await), "welcome");
    shutdown([a, b]).await;
}

/// Queue members on `nodes` (one each, group "workers" on "work"), with
/// every node knowing the other nodes' members.
async fn one_member_per_node(
    nodes: &[&ServerHandle],
) -> (Vec<async_nats::Client>, Vec<async_nats::Subscriber>) {
    let (mut clients, mut members) = (Vec::new(), Vec::new());
    for n in nodes {
        let client = nats(n).await;
        let member = client
            .queue_subscribe("work", "workers".into())
            .await
            .unwrap();
        round_trip(&client).await;
        clients.push(client);
        members.push(member);
    }
    for n in nodes {
        wait_for_peers_interested(n, "work", nodes.len() - 1).await;
    }
    (clients, members)
}

/// Publishes `n` numbered messages on "work" from `publisher`, waits until
/// the members have them all (each exactly once) and returns how many each
/// member got.
async fn share_of_each_member(
    publisher: &async_nats::Client,
    clients: &[async_nats::Client],
    members: &mut [async_nats::Subscriber],
    n: usize,
) -> Vec<usize> {
    for i in 0..n {
        publisher
            .publish("work", i.to_string().into())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let mut counts = vec![0; members.len()];
    let mut seen = HashSet::new();
    within("every queue message", async {
        while seen.len() < n {
            for (i, m) in members.iter_mut().enumerate() {
                for msg in ready(m) {
                    assert!(seen.insert(text(&msg)), "delivered twice: {}", text(&msg));
                    counts[i] += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // Nothing more is on its way.
    round_trip(publisher).await;
    for client in clients {
        round_trip(client).await;
    }
    for m in members.iter_mut() {
        assert!(ready(m).is_empty(), "a message went twice");
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_members_on_every_node_share_what_one_node_publishes() {
    let (a, b, c) = three_nodes().await;
    let (clients, mut members) = one_member_per_node(&[&a, &b, &c]).await;
    let counts = share_of_each_member(&clients[0], &clients, &mut members, 3000).await;
    // A member on the publisher's node has no better chance than the others.
    for (i, &count) in counts.iter().enumerate() {
        assert!(
            (600..=1410).contains(&count),
            "member {i} got {count} of 3000: {counts:?}"
        );
    }
    // A node with two members weighs two: each of the four gets a quarter.
    members.push(
        clients[1]
            .queue_subscribe("work", "workers".into())
            .await
            .unwrap(),
    );
    let _sync = clients[1].subscribe("sync").await.unwrap();
    round_trip(&clients[1]).await;
    // One node's RS+ arrive in order: once A knows of "sync", it knows B's
    // new weight.
    wait_for_interest(&a, "sync").await;
    let counts = share_of_each_member(&clients[0], &clients, &mut members, 4000).await;
    for (i, &count) in counts.iter().enumerate() {
        assert!(
            (800..=1200).contains(&count),
            "member {i} got {count} of 4000: {counts:?}"
        );
    }
    shutdown([a, b, c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_members_on_the_publishers_node_can_be_preferred() {
    let prefer_local = |name: &str, seeds: &[String]| {
        let mut config = node_config(name, seeds);
        config.cluster.as_mut().unwrap().prefer_local_queue_members = true;
        Server::start(config)
    };
    let a = prefer_local("A", &[]).await.unwrap();
    let b = prefer_local("B", &seed(&a)).await.unwrap();
    let c = prefer_local("C", &seed(&a)).await.unwrap();
    wait_for_mesh(&[&a, &b, &c]).await;
    let (clients, mut members) = one_member_per_node(&[&a, &b, &c]).await;
    let counts = share_of_each_member(&clients[0], &clients, &mut members, 3000).await;
    assert_eq!(counts, [3000, 0, 0]);
    // Published where there is no member: one of the other nodes' gets it.
    let d = prefer_local("D", &seed(&a)).await.unwrap();
    wait_for_mesh(&[&a, &b, &c, &d]).await;
    wait_for_peers_interested(&d, "work", 3).await;
    let on_d = nats(&d).await;
    let counts = share_of_each_member(&on_d, &clients, &mut members, 300).await;
    assert_eq!(counts.iter().sum::<usize>(), 300, "{counts:?}");
    shutdown([a, b, c, d]).await;
}

/// The first line a server sends on a new connection to `addr`, or what it
/// sent before closing (empty if nothing).
async fn first_line(addr: std::net::SocketAddr) -> (Raw, String) {
    use tokio::io::AsyncReadExt;
    let mut raw = Raw::connect(addr).await;
    let mut got = Vec::new();
    within("a line or a close", async {
        while !got.ends_with(b"\r\n") {
            let mut byte = [0u8; 1];
            match raw.stream.read(&mut byte).await {
                Ok(1) => got.push(byte[0]),
                _ => break,
            }
        }
    })
    .await;
    (raw, String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_before_connect_is_refused_at_once_without_buffering_it() {
    use tokio::io::AsyncWriteExt;
    let a = node("A", &[]).await;
    let route_addr = a.route_addr().unwrap();
    // A message header announcing 200 MB, then a little of it: the server
    // refuses it at the header instead of waiting for the rest.
    let mut raw = Raw::connect(route_addr).await;
    assert!(raw.read_line().await.starts_with(b"INFO {"));
    raw.send(format!("RMSG $G blob 200000000\r\n{}", "x".repeat(100)))
        .await;
    let rest = String::from_utf8_lossy(&raw.read_to_close().await).into_owned();
    assert!(
        rest.contains("-ERR 'Maximum Payload Violation'"),
        "{rest:?}"
    );

    // The same, streaming the 200 MB as fast as the server takes them: it
    // stops reading (and closes) long before.
    let (mut raw, info) = first_line(route_addr).await;
    assert!(info.starts_with("INFO {"), "{info}");
    let started = std::time::Instant::now();
    let written = within("the blob to be cut short", async {
        let mut written = raw
            .stream
            .write_all(b"RMSG $G blob 200000000\r\n")
            .await
            .map_or(0, |_| 25);
        let chunk = vec![b'x'; 1 << 20];
        while written < 200_000_000 {
            if raw.stream.write_all(&chunk).await.is_err() {
                break;
            }
            written += chunk.len();
        }
        written
    })
    .await;
    assert!(written < 32 << 20, "the server took {written} bytes");
    // Well within the handshake timeout (5 s): refused, not timed out.
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(raw);

    // A line without an end is cut off at the control line limit.
    let (mut raw, _) = first_line(route_addr).await;
    raw.send("x".repeat(16 * 1024)).await;
    let rest = String::from_utf8_lossy(&raw.read_to_close().await).into_owned();
    assert!(
        rest.contains("-ERR 'maximum control line exceeded'"),
        "{rest:?}"
    );

    // Clients are unaffected, and nothing became a route.
    let client = nats(&a).await;
    let mut sub = client.subscribe("alive").await.unwrap();
    client.publish("alive", "yes".into()).await.unwrap();
    assert_eq!(text(&next_msg(&mut sub).await), "yes");
    assert!(a.peer_names().is_empty());
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_connections_beyond_max_routes_are_refused() {
    let mut config = node_config("A", &[]);
    config.cluster.as_mut().unwrap().max_routes = 2;
    let a = Server::start(config).await.unwrap();
    let route_addr = a.route_addr().unwrap();
    // Two connections in their handshake hold both places.
    let (first, line) = first_line(route_addr).await;
    assert!(line.starts_with("INFO {"), "{line}");
    let (_second, line) = first_line(route_addr).await;
    assert!(line.starts_with("INFO {"), "{line}");
    let (mut third, line) = first_line(route_addr).await;
    assert_eq!(line, "-ERR 'maximum route connections exceeded'\r\n");
    third.expect_closed().await;
    // A place is freed when a connection ends.
    drop(first);
    eventually("a free place", WAIT, || async {
        let (_raw, line) = first_line(route_addr).await;
        line.starts_with("INFO {").then_some(())
    })
    .await;
    // Clients are unaffected.
    let client = nats(&a).await;
    round_trip(&client).await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_gossiping_thousands_of_addresses_gets_a_bounded_number_of_dials() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // Where the gossiped addresses lead: a listener that accepts and never
    // answers, so each dial stays open in its handshake and is counted.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    let sink = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            held.push(stream);
        }
    });
    let mut config = node_config("A", &[]);
    // Room for the big INFO below, so that gossip is what is tested.
    config.max_control_line = 1 << 20;
    let a = Server::start(config).await.unwrap();
    // Distinct addresses, all on loopback (127.0.0.0/8), all reaching the
    // listener.
    let peers: Vec<String> = (0..2000)
        .map(|i| {
            format!(
                "{{\"server_id\":\"NPEER{i}\",\"route_addr\":\"127.0.{}.{}:{port}\"}}",
                i / 250,
                i % 250 + 1
            )
        })
        .collect();
    let mut raw = Raw::connect(a.route_addr().unwrap()).await;
    raw.read_line().await;
    raw.send(format!(
        "CONNECT {{\"server_id\":\"NGOSSIP\",\"cluster\":\"test\"}}\r\n\
         INFO {{\"server_id\":\"NGOSSIP\",\"server_name\":\"gossip\",\"cluster\":\"test\",\
         \"route_addr\":\"127.0.0.1:1\",\"client_addr\":\"127.0.0.1:1\",\"peers\":[{}]}}\r\n",
        peers.join(",")
    ))
    .await;
    eventually("the gossiping peer's route", WAIT, || async {
        (a.peer_names() == ["gossip"]).then_some(())
    })
    .await;
    eventually("some dials", WAIT, || async {
        (accepted.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;
    // The dials stay open (the handshake timeout is 5 s): what arrived in a
    // second is how many run at once.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dials = accepted.load(Ordering::Relaxed);
    // The node dials at most 32 gossiped peers at once.
    assert!(dials <= 32, "{dials} dials at once");
    // The node carries on.
    let client = nats(&a).await;
    round_trip(&client).await;
    drop(raw);
    a.shutdown().await;
    sink.abort();
}

/// On a one-thread runtime (the server's and the test's), route passwords
/// hashed with bcrypt (slow by design) are checked while clients are
/// served: the checks run off the async threads.
#[tokio::test(flavor = "current_thread")]
async fn route_passwords_hashed_with_bcrypt_are_checked_off_the_async_threads() {
    use skiff::config::authorization::Secret;
    use skiff::config::cluster::RouteAuthorization;
    use std::time::Instant;
    let hash = bcrypt::hash("s3cret", 8).unwrap();
    let started = Instant::now();
    assert!(bcrypt::verify("s3cret", &hash).unwrap());
    let one_check = started.elapsed();
    let mut config = node_config("A", &[]);
    config.cluster.as_mut().unwrap().authorization = Some(RouteAuthorization {
        user: Some("route".to_string()),
        password: Some(Secret(hash)),
        token: None,
    });
    let a = Server::start(config).await.unwrap();
    let client = nats(&a).await;
    round_trip(&client).await;
    let mut routes = Vec::new();
    for _ in 0..8 {
        let mut raw = Raw::connect(a.route_addr().unwrap()).await;
        raw.read_line().await;
        routes.push(raw);
    }
    // Eight CONNECTs at once (these writes do not wait, so the server runs
    // only once the round trip below waits): judged on this thread, they
    // would hold the round trip for eight times one check.
    let started = Instant::now();
    for (i, raw) in routes.iter_mut().enumerate() {
        raw.send(format!(
            "CONNECT {{\"server_id\":\"NR{i}\",\"cluster\":\"test\",\
             \"user\":\"route\",\"pass\":\"s3cret\"}}\r\n"
        ))
        .await;
    }
    round_trip(&client).await;
    let took = started.elapsed();
    assert!(
        took < one_check * 3,
        "a round trip took {took:?} while routes were judged (one check: {one_check:?})"
    );
    // And the checks do accept the password.
    routes[0]
        .send(
            "INFO {\"server_id\":\"NR0\",\"server_name\":\"r0\",\"cluster\":\"test\",\
             \"route_addr\":\"127.0.0.1:1\",\"client_addr\":\"127.0.0.1:1\"}\r\n",
        )
        .await;
    eventually("the route to be accepted", WAIT, || async {
        (a.peer_names() == ["r0"]).then_some(())
    })
    .await;
    drop(routes);
    a.shutdown().await;
}
