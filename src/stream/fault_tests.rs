//! The store failing under a running server: what clients are told, and
//! that nothing is confirmed that was not saved. Faults are injected with
//! [`crate::store::Faults`] on the server's own storage.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, consumer::PullConsumer, stream, Context};
use futures::StreamExt;

use crate::store::Faults;
use crate::{Config, Server, ServerHandle};

/// Longer than a client's wait below: a consumer's failed save is retried
/// within this.
const RETRIED: Duration = Duration::from_millis(1500);

async fn start(dir: &std::path::Path) -> (ServerHandle, Context) {
    let mut config = Config::core("127.0.0.1:0");
    config.jetstream.enabled = true;
    config.jetstream.store_dir = dir.to_path_buf();
    let server = Server::start(config).await.expect("server starts");
    let client = async_nats::connect(server.client_url())
        .await
        .expect("connect");
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(700))
        .build(client);
    (server, js)
}

/// Turns a fault of the server's storage on or off.
fn inject(server: &ServerHandle, fault: fn(&Faults, bool), on: bool) {
    let js = server.jetstream().expect("jetstream");
    fault(js.storage().faults(), on);
}

async fn orders(js: &Context) -> jetstream::stream::Stream {
    js.create_stream(stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream")
}

/// The consumer's saved record, as the store holds it.
fn saved_ack_floor(server: &ServerHandle, consumer: &str) -> u64 {
    let js = server.jetstream().expect("jetstream");
    let stream = js.stream("ORDERS").expect("stream");
    let records = stream.store().load_consumers().expect("records");
    let (_, record) = records
        .iter()
        .find(|(name, _)| name == consumer)
        .expect("a saved record");
    let json: serde_json::Value = serde_json::from_slice(record).expect("JSON");
    json["ack_floor"]["stream_seq"].as_u64().expect("ack floor")
}

#[tokio::test]
async fn a_failed_fsync_fails_the_publish_and_publishing_resumes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, js) = start(dir.path()).await;
    orders(&js).await;

    inject(&server, Faults::fail_syncs, true);
    let refused = js
        .publish("orders.1", "a".into())
        .await
        .expect("sent")
        .await;
    let error = refused.expect_err("no PubAck without an fsync").to_string();
    assert!(error.contains("10077"), "{error}");

    inject(&server, Faults::fail_syncs, false);
    let ack = js
        .publish("orders.1", "b".into())
        .await
        .expect("sent")
        .await;
    assert!(ack.expect("acked once the disk works").sequence >= 1);
    server.shutdown().await;
}

#[tokio::test]
async fn a_failed_write_stores_nothing_and_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, js) = start(dir.path()).await;
    let stream = orders(&js).await;

    inject(&server, Faults::fail_commits, true);
    let refused = js
        .publish("orders.1", "a".into())
        .await
        .expect("sent")
        .await;
    assert!(refused.is_err());
    inject(&server, Faults::fail_commits, false);
    let info = stream.get_info().await.expect("info");
    assert_eq!(info.state.messages, 0);
    let ack = js
        .publish("orders.1", "b".into())
        .await
        .expect("sent")
        .await;
    assert_eq!(ack.expect("acked").sequence, 1);
    server.shutdown().await;
}

/// The consumer's next message.
async fn fetch_one(consumer: &PullConsumer) -> jetstream::Message {
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    batch.next().await.expect("a message").expect("no error")
}

/// A double ack whose save fails gets no answer (the client's request
/// fails); the ack is saved by a retry once the store works again.
/// `floor_while_failing`: what the store holds meanwhile (a failed fsync
/// leaves the written record readable, just not durable).
async fn double_ack_waits_for_the_save(fail: fn(&Faults, bool), floor_while_failing: u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, js) = start(dir.path()).await;
    let stream = orders(&js).await;
    for i in 0..2 {
        js.publish(format!("orders.{i}"), "x".into())
            .await
            .expect("sent")
            .await
            .expect("acked");
    }
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("worker".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let first = fetch_one(&consumer).await;

    inject(&server, fail, true);
    first
        .double_ack()
        .await
        .expect_err("a double ack is not confirmed while its save fails");
    assert_eq!(saved_ack_floor(&server, "worker"), floor_while_failing);

    inject(&server, fail, false);
    tokio::time::sleep(RETRIED).await;
    assert_eq!(
        saved_ack_floor(&server, "worker"),
        1,
        "the failed save is retried"
    );
    let second = fetch_one(&consumer).await;
    assert_eq!(second.info().expect("info").stream_sequence, 2);
    second.double_ack().await.expect("confirmed");
    assert_eq!(saved_ack_floor(&server, "worker"), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn a_double_ack_is_not_confirmed_when_its_write_fails() {
    double_ack_waits_for_the_save(Faults::fail_commits, 0).await;
}

#[tokio::test]
async fn a_double_ack_is_not_confirmed_when_its_fsync_fails() {
    double_ack_waits_for_the_save(Faults::fail_syncs, 1).await;
}

/// Every API change answers with an error while the store fails, and works
/// once it does not.
async fn api_changes_fail_with_the_store(fail: fn(&Faults, bool)) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, js) = start(dir.path()).await;
    let stream = orders(&js).await;
    let durable = |name: &str| pull::Config {
        durable_name: Some(name.into()),
        ..Default::default()
    };
    stream
        .create_consumer(durable("old"))
        .await
        .expect("consumer");

    inject(&server, fail, true);
    let new_stream = stream::Config {
        name: "OTHER".into(),
        subjects: vec!["other.>".into()],
        ..Default::default()
    };
    js.create_stream(new_stream.clone())
        .await
        .expect_err("stream create");
    stream
        .create_consumer(durable("new"))
        .await
        .expect_err("consumer create");
    let update = stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        max_messages: 10,
        ..Default::default()
    };
    js.update_stream(update.clone())
        .await
        .expect_err("stream update");
    assert!(
        stream.delete_consumer("old").await.is_err(),
        "consumer delete"
    );

    inject(&server, fail, false);
    js.create_stream(new_stream).await.expect("stream create");
    stream
        .create_consumer(durable("new"))
        .await
        .expect("consumer create");
    js.update_stream(update).await.expect("stream update");
    server.shutdown().await;
}

#[tokio::test]
async fn api_changes_fail_when_writes_fail() {
    api_changes_fail_with_the_store(Faults::fail_commits).await;
}

#[tokio::test]
async fn api_changes_fail_when_fsyncs_fail() {
    api_changes_fail_with_the_store(Faults::fail_syncs).await;
}
