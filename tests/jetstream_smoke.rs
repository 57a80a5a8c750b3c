//! First end-to-end check of durable streams with async-nats.

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use skiff::{Config, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_fetch_ack_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::with_streams("127.0.0.1:0", dir.path());
    let server = Server::start(config.clone()).await.unwrap();
    let client = async_nats::connect(server.client_url()).await.unwrap();
    let js = jetstream::new(client);
    let s = js
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..10 {
        let ack = js
            .publish(format!("orders.{i}"), format!("order {i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, i + 1);
    }
    let consumer = s
        .create_consumer(pull::Config {
            durable_name: Some("worker".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut msgs = consumer.fetch().max_messages(5).messages().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = msgs.next().await {
        let m = m.unwrap();
        got.push(String::from_utf8(m.payload.to_vec()).unwrap());
        m.ack().await.unwrap();
    }
    assert_eq!(
        got,
        (0..5).map(|i| format!("order {i}")).collect::<Vec<_>>()
    );
    let mut consumer = consumer;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let info = consumer.info().await.unwrap();
    assert_eq!(info.ack_floor.stream_sequence, 5);
    assert_eq!(info.num_pending, 5);
    drop(js);
    server.shutdown().await;

    let server = Server::start(config).await.unwrap();
    let client = async_nats::connect(server.client_url()).await.unwrap();
    let js = jetstream::new(client);
    let mut s = js.get_stream("ORDERS").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 10);
    let consumer: jetstream::consumer::PullConsumer = s.get_consumer("worker").await.unwrap();
    let mut msgs = consumer.fetch().max_messages(10).messages().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = msgs.next().await {
        let m = m.unwrap();
        got.push(m.info().unwrap().stream_sequence);
        m.ack().await.unwrap();
    }
    assert_eq!(got, (6..=10).collect::<Vec<_>>());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_declared_in_conf_streams_toml_exist_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/streams.toml");
    let mut config = Config::from_file(&path).unwrap();
    config.listen = "127.0.0.1:0".into();
    config.jetstream.store_dir = dir.path().to_path_buf();
    let server = Server::start(config.clone()).await.unwrap();
    let client = async_nats::connect(server.client_url()).await.unwrap();
    let js = jetstream::new(client);
    let mut orders = js.get_stream("ORDERS").await.unwrap();
    let info = orders.info().await.unwrap();
    assert_eq!(info.config.subjects, vec!["orders.>".to_string()]);
    assert_eq!(
        info.config.max_age,
        std::time::Duration::from_secs(7 * 86_400)
    );
    let mut fulfilment: jetstream::consumer::PullConsumer =
        orders.get_consumer("fulfilment").await.unwrap();
    let c = fulfilment.info().await.unwrap();
    assert_eq!(c.config.max_deliver, 5);
    assert_eq!(c.config.backoff.len(), 3);
    let mut jobs = js.get_stream("JOBS").await.unwrap();
    assert_eq!(
        jobs.info().await.unwrap().config.retention,
        stream::RetentionPolicy::WorkQueue
    );
    server.shutdown().await;

    // Starting again on the same store with the same file changes nothing.
    let server = Server::start(config).await.unwrap();
    let client = async_nats::connect(server.client_url()).await.unwrap();
    let js = jetstream::new(client);
    let mut names: Vec<String> = js.stream_names().map(|n| n.unwrap()).collect().await;
    names.sort();
    assert_eq!(names, vec!["JOBS".to_string(), "ORDERS".to_string()]);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_refuses_publishes_and_other_streams_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_streams("127.0.0.1:0", dir.path());
    config.jetstream.max_file_store = Some(4096);
    let server = Server::start(config).await.unwrap();
    let js = jetstream::new(async_nats::connect(server.client_url()).await.unwrap());
    for (name, storage) in [
        ("FULL", stream::StorageType::File),
        ("MEM", stream::StorageType::Memory),
    ] {
        js.create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{}.>", name.to_lowercase())],
            storage,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let kib = bytes::Bytes::from(vec![b'x'; 1024]);
    let mut refused = None;
    for i in 0..10 {
        match js
            .publish(format!("full.{i}"), kib.clone())
            .await
            .unwrap()
            .await
        {
            Ok(ack) => assert_eq!(ack.sequence, i + 1),
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("a 4 KiB store refuses the fifth 1 KiB message");
    assert!(refused.contains("insufficient storage"), "{refused}");
    // Memory streams have their own limit (unset: 75% of memory) and
    // carry on.
    let ack = js.publish("mem.1", kib).await.unwrap().await.unwrap();
    assert_eq!(ack.stream, "MEM");
    // A stream whose own max_bytes does not fit what is left is refused.
    let too_big = js
        .create_stream(stream::Config {
            name: "BIG".into(),
            subjects: vec!["big.>".into()],
            max_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .expect_err("1 MiB does not fit in a 4 KiB store");
    assert!(too_big.to_string().contains("10047"), "{too_big}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_memory_store_refuses_with_nats_servers_memory_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_streams("127.0.0.1:0", dir.path());
    config.jetstream.max_memory_store = Some(2048);
    let server = Server::start(config).await.unwrap();
    let js = jetstream::new(async_nats::connect(server.client_url()).await.unwrap());
    js.create_stream(stream::Config {
        name: "MEM".into(),
        subjects: vec!["mem.>".into()],
        storage: stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let kib = bytes::Bytes::from(vec![b'x'; 1024]);
    js.publish("mem.1", kib.clone())
        .await
        .unwrap()
        .await
        .unwrap();
    let refused = js
        .publish("mem.2", kib)
        .await
        .unwrap()
        .await
        .expect_err("a 2 KiB memory store takes one 1 KiB message");
    assert!(refused.to_string().contains("10028"), "{refused}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumer_with_flow_control_gets_everything() {
    // 4 MiB: many times the flow-control window, so delivery stalls and
    // resumes repeatedly.
    let (_dir, server, _client, s) = stream_of_kib_messages(4096).await;
    let consumer = s
        .create_consumer(jetstream::consumer::push::Config {
            deliver_subject: "deliver.fc".into(),
            flow_control: true,
            idle_heartbeat: std::time::Duration::from_millis(500),
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut seen = 0u64;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while seen < 4096 {
        let next = tokio::time::timeout_at(deadline, messages.next())
            .await
            .expect("all messages within 30 s")
            .unwrap()
            .unwrap();
        seen += 1;
        assert_eq!(next.info().unwrap().stream_sequence, seen);
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_stalls_delivery_until_the_client_answers() {
    let (_dir, server, client, s) = stream_of_kib_messages(1024).await;
    // A plain subscriber that sees the raw deliveries and status messages.
    let mut raw = client.subscribe("raw.fc").await.unwrap();
    client.flush().await.unwrap();
    s.create_consumer(jetstream::consumer::push::Config {
        deliver_subject: "raw.fc".into(),
        flow_control: true,
        idle_heartbeat: std::time::Duration::from_secs(5),
        ack_policy: jetstream::consumer::AckPolicy::None,
        ..Default::default()
    })
    .await
    .unwrap();
    let within = std::time::Duration::from_secs(10);
    let mut data = 0;
    let request = loop {
        let m = tokio::time::timeout(within, raw.next())
            .await
            .unwrap()
            .unwrap();
        match m.status {
            Some(status) if status.as_u16() == 100 => break m.reply.expect("a request to answer"),
            _ => data += 1,
        }
    };
    assert!(
        (200..=300).contains(&data),
        "window of 256 KiB, got {data} messages"
    );
    // Unanswered: nothing more arrives.
    let stalled = tokio::time::timeout(std::time::Duration::from_millis(700), raw.next()).await;
    assert!(stalled.is_err(), "delivery went on without an answer");
    // Answered: delivery resumes.
    client.publish(request, bytes::Bytes::new()).await.unwrap();
    let m = tokio::time::timeout(within, raw.next())
        .await
        .unwrap()
        .unwrap();
    assert!(m.status.is_none(), "a data message after the answer");
    server.shutdown().await;
}

/// A server with a stream `FC` on `fc.>` holding `count` 1 KiB messages,
/// for the flow-control tests.
async fn stream_of_kib_messages(
    count: usize,
) -> (
    tempfile::TempDir,
    skiff::ServerHandle,
    async_nats::Client,
    stream::Stream,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(Config::with_streams("127.0.0.1:0", dir.path()))
        .await
        .unwrap();
    let client = async_nats::connect(server.client_url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let s = js
        .create_stream(stream::Config {
            name: "FC".into(),
            subjects: vec!["fc.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let payload = bytes::Bytes::from(vec![b'x'; 1024]);
    let mut acks = Vec::new();
    for i in 0..count {
        acks.push(
            js.publish(format!("fc.{i}"), payload.clone())
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
    (dir, server, client, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_limits_are_the_configured_ones_or_nats_servers_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_streams("127.0.0.1:0", dir.path());
    config.jetstream.max_file_store = Some(1 << 20);
    let defaults = config.jetstream.resolve_limits();
    let server = Server::start(config).await.unwrap();
    let js = jetstream::new(async_nats::connect(server.client_url()).await.unwrap());
    let limits = js.query_account().await.unwrap().limits;
    assert_eq!(limits.max_storage, Some(1 << 20), "configured: kept");
    // Unset: 75% of the system's memory, as resolved at start.
    let max_memory = limits.max_memory.expect("a memory limit");
    assert_eq!(max_memory as u64, defaults.max_memory);
    assert!(max_memory > 0);
    server.shutdown().await;

    // 0: no limit at all (Skiff's meaning), reported as -1.
    let mut config = Config::with_streams("127.0.0.1:0", dir.path());
    config.jetstream.max_memory_store = Some(0);
    let server = Server::start(config).await.unwrap();
    let js = jetstream::new(async_nats::connect(server.client_url()).await.unwrap());
    let limits = js.query_account().await.unwrap().limits;
    assert_eq!(limits.max_memory, None, "-1: no limit");
    assert!(
        limits.max_storage.unwrap_or(0) > 0,
        "unset: 75% of free disk"
    );
    server.shutdown().await;
}
