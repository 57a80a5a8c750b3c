//! Consumers of durable streams, driven by async-nats 0.51 (raw requests
//! where the client has no call, or to see status codes on the wire):
//! CONSUMER.CREATE in all its subject forms, DURABLE.CREATE, INFO, DELETE,
//! NAMES, LIST, create/update actions, ephemeral clean-up; pull requests
//! (batch, expires, no_wait, max_bytes); deliver and ack policies; ack wait,
//! max deliver, backoff, max ack pending; filters; every kind of ack; push
//! consumers with heartbeats and deliver groups; and what survives a
//! restart.
//!
//! Each test runs its own server on a temporary store and is bounded in
//! time. Timings are short (ack waits of a few hundred milliseconds) but
//! every assertion on time is a lower bound or a generous upper one, so a
//! loaded machine slows the tests down without failing them.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, push, AckPolicy, DeliverPolicy, PullConsumer, PushConsumer},
    context::ConsumerInfoErrorKind,
    message::PublishMessage,
    stream::{Config as StreamConfig, ConsumerCreateStrictErrorKind, ConsumerUpdateErrorKind},
    AckKind,
};
use async_nats::StatusCode;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;

use common::jetstream::{
    ack_sync, ack_sync_with, assert_api_error, eventually, fetch, pull, seqs, JsServer,
};
use common::{next_msg, within};

/// How long a state change caused by an ack or a timer may take to show.
const SETTLE: Duration = Duration::from_secs(5);

async fn create_stream(s: &JsServer, name: &str, subjects: &[&str]) -> jetstream::stream::Stream {
    within(
        "STREAM.CREATE",
        s.js.create_stream(StreamConfig {
            name: name.to_string(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("creating stream {name} failed: {e}"))
}

fn durable(name: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(name.to_string()),
        ..Default::default()
    }
}

async fn pull_consumer(stream: &jetstream::stream::Stream, config: pull::Config) -> PullConsumer {
    within("CONSUMER.CREATE", stream.create_consumer(config))
        .await
        .unwrap_or_else(|e| panic!("creating a pull consumer failed: {e}"))
}

async fn push_consumer(stream: &jetstream::stream::Stream, config: push::Config) -> PushConsumer {
    within("CONSUMER.CREATE", stream.create_consumer(config))
        .await
        .unwrap_or_else(|e| panic!("creating a push consumer failed: {e}"))
}

/// Asserts nothing is delivered to `c` until `until`. Skipped when a very
/// slow machine has already passed most of that window (the assertion
/// would then be about the machine, not the server).
async fn quiet_until(c: &PullConsumer, until: Instant) {
    let window = until.saturating_duration_since(Instant::now());
    if window >= Duration::from_millis(100) {
        let got = pull(c, 1, window).await;
        assert!(got.is_empty(), "delivered early: {:?}", seqs(&got));
    }
}

/// How many times the message was delivered, from its ack subject.
fn delivered(m: &jetstream::Message) -> i64 {
    m.info().expect("JetStream metadata").delivered
}

/// The delivery count token of a raw delivery's ack subject
/// (`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`).
fn raw_delivered(m: &async_nats::Message) -> u64 {
    let reply = m.reply.as_ref().expect("an ack subject").to_string();
    reply.split('.').nth(4).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_create_subject_forms_and_durable_create() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "CF", &["cf.>"]).await;
        s.publish_all(&[("cf.a", "1"), ("cf.b", "2")]).await;

        // CONSUMER.CREATE.<stream>: an ephemeral consumer, named by the server.
        let raw = s
            .api(
                "CONSUMER.CREATE.CF",
                json!({"stream_name": "CF", "config": {"ack_policy": "explicit"}}),
            )
            .await;
        assert!(raw.get("error").is_none(), "{raw}");
        assert_eq!(
            raw["type"], "io.nats.jetstream.api.v1.consumer_create_response",
            "{raw}"
        );
        let ephemeral = raw["name"].as_str().expect("a generated name").to_string();
        assert!(!ephemeral.is_empty());
        assert_eq!(raw["stream_name"], "CF");
        assert!(raw["config"].get("durable_name").is_none(), "{raw}");
        assert_eq!(raw["num_pending"], 2, "{raw}");

        // CONSUMER.CREATE.<stream>.<name>: the name comes from the subject...
        let raw = s
            .api(
                "CONSUMER.CREATE.CF.named",
                json!({"stream_name": "CF", "config": {"ack_policy": "explicit"}}),
            )
            .await;
        assert_eq!(raw["name"], "named", "{raw}");
        // ...a durable name in the body must be the subject's: 10017...
        let raw = s
            .api(
                "CONSUMER.CREATE.CF.named2",
                json!({"stream_name": "CF", "config": {"durable_name": "other"}}),
            )
            .await;
        assert_api_error(&raw, 400, 10017);
        // ...while a different `name` in the body gives way to the
        // subject's, as in nats-server.
        let raw = s
            .api(
                "CONSUMER.CREATE.CF.named3",
                json!({"stream_name": "CF", "config": {"name": "other"}}),
            )
            .await;
        assert_eq!(raw["name"], "named3", "{raw}");
        // CONSUMER.CREATE.<stream> makes ephemerals only:
        // JSConsumerEphemeralWithDurableNameErr.
        let raw = s
            .api(
                "CONSUMER.CREATE.CF",
                json!({"stream_name": "CF", "config": {"durable_name": "d"}}),
            )
            .await;
        assert_api_error(&raw, 400, 10020);
        assert_eq!(
            raw["error"]["description"],
            "consumer expected to be ephemeral but a durable name was set in request",
            "{raw}"
        );

        // CONSUMER.CREATE.<stream>.<name>.<filter>
        let raw = s
            .api(
                "CONSUMER.CREATE.CF.filtered.cf.a",
                json!({"stream_name": "CF", "config": {
                    "name": "filtered", "filter_subject": "cf.a", "ack_policy": "explicit"
                }}),
            )
            .await;
        assert_eq!(raw["name"], "filtered", "{raw}");
        assert_eq!(raw["config"]["filter_subject"], "cf.a", "{raw}");
        assert_eq!(raw["num_pending"], 1, "{raw}");
        // The filter in the subject must be the one in the body: 10131.
        let raw = s
            .api(
                "CONSUMER.CREATE.CF.mismatch.cf.a",
                json!({"stream_name": "CF", "config": {
                    "name": "mismatch", "filter_subject": "cf.b"
                }}),
            )
            .await;
        assert_api_error(&raw, 400, 10131);

        // async-nats uses CREATE.<stream>.<name>.<filter> for a named
        // consumer with one filter.
        let c = pull_consumer(
            &stream,
            pull::Config {
                filter_subject: "cf.b".into(),
                ..durable("viaclient")
            },
        )
        .await;
        let info = c.cached_info();
        assert_eq!(info.name, "viaclient");
        assert_eq!(info.config.filter_subject, "cf.b");
        assert_eq!(info.num_pending, 1);
        assert_eq!(seqs(&fetch(&c, 10).await), vec![2]);

        // CONSUMER.DURABLE.CREATE.<stream>.<durable>
        let raw = s
            .api(
                "CONSUMER.DURABLE.CREATE.CF.legacy",
                json!({"stream_name": "CF", "config": {
                    "durable_name": "legacy", "ack_policy": "explicit"
                }}),
            )
            .await;
        assert_eq!(raw["name"], "legacy", "{raw}");
        assert_eq!(raw["config"]["durable_name"], "legacy", "{raw}");
        let raw = s
            .api(
                "CONSUMER.DURABLE.CREATE.CF.legacy2",
                json!({"stream_name": "CF", "config": {"durable_name": "nope"}}),
            )
            .await;
        assert_api_error(&raw, 400, 10017);

        // The stream in the body must be the one in the subject, and a
        // body without one does not match either: 10056.
        for body in [
            json!({"stream_name": "OTHER", "config": {}}),
            json!({"config": {}}),
        ] {
            let raw = s.api("CONSUMER.CREATE.CF", body).await;
            assert_api_error(&raw, 400, 10056);
        }

        let names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
        let names: BTreeSet<String> = names.into_iter().collect();
        let expected: BTreeSet<String> = [
            &ephemeral,
            "filtered",
            "legacy",
            "named",
            "named3",
            "viaclient",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(names, expected);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_create_checks_the_durable_name_as_nats_server_does() {
    within("the test", async {
        let s = JsServer::start().await;
        create_stream(&s, "DC", &["dc.>"]).await;
        let create = |subject: &str, config: Value| {
            let subject = format!("CONSUMER.DURABLE.CREATE.{subject}");
            let s = &s;
            async move {
                s.api(&subject, json!({"stream_name": "DC", "config": config}))
                    .await
            }
        };

        // No durable_name in the body: JSConsumerDurableNameNotSetErr,
        // even when `name` matches the subject (the durable name is what
        // this legacy API is about).
        for config in [
            json!({"ack_policy": "explicit"}),
            json!({"durable_name": ""}),
            json!({"name": "d1"}),
        ] {
            let raw = create("DC.d1", config).await;
            assert_api_error(&raw, 400, 10018);
            assert_eq!(
                raw["error"]["description"],
                "consumer expected to be durable but a durable name was not set",
                "{raw}"
            );
        }
        // A different one: JSConsumerDurableNameNotMatchSubjectErr.
        let raw = create("DC.d1", json!({"durable_name": "d2"})).await;
        assert_api_error(&raw, 400, 10017);
        assert_eq!(
            raw["error"]["description"],
            "consumer name in subject does not match durable name in request",
            "{raw}"
        );
        // No single durable token after the stream:
        // JSConsumerDurableNameNotInSubjectErr.
        for subject in ["DC", "DC.d1.x"] {
            let raw = create(subject, json!({"durable_name": "d1"})).await;
            assert_api_error(&raw, 400, 10016);
        }
        // nats-server checks the request before looking the stream up.
        let raw = s
            .api(
                "CONSUMER.DURABLE.CREATE.NOPE.d1",
                json!({"stream_name": "NOPE", "config": {}}),
            )
            .await;
        assert_api_error(&raw, 400, 10018);

        let raw = s.api("CONSUMER.NAMES.DC", Value::Null).await;
        assert_eq!(raw["consumers"], json!([]), "nothing was created: {raw}");

        // The durable name in the body and in the subject: created.
        let raw = create("DC.d1", json!({"durable_name": "d1"})).await;
        assert!(raw.get("error").is_none(), "{raw}");
        assert_eq!(raw["name"], "d1", "{raw}");
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_names_with_path_separators_are_refused() {
    within("the test", async {
        let s = JsServer::start().await;
        create_stream(&s, "PS", &["ps.>"]).await;
        // JSConsumerNameContainsPathSeparatorsErr for the name in the
        // subject, in each create form (before any other check of the
        // name)...
        let mut requests = Vec::new();
        for name in ["a/b", "a\\b"] {
            requests.push((format!("CONSUMER.CREATE.PS.{name}"), json!({})));
            requests.push((
                format!("CONSUMER.CREATE.PS.{name}.ps.x"),
                json!({"filter_subject": "ps.x"}),
            ));
            requests.push((
                format!("CONSUMER.DURABLE.CREATE.PS.{name}"),
                json!({"durable_name": name}),
            ));
            requests.push((format!("CONSUMER.DURABLE.CREATE.PS.{name}"), json!({})));
            // ...and for the name in the body when the subject has none.
            requests.push(("CONSUMER.CREATE.PS".to_string(), json!({"name": name})));
            requests.push((
                "CONSUMER.CREATE.PS".to_string(),
                json!({"durable_name": name}),
            ));
        }
        for (subject, config) in requests {
            let raw = s
                .api(&subject, json!({"stream_name": "PS", "config": config}))
                .await;
            assert_api_error(&raw, 400, 10127);
            assert_eq!(
                raw["error"]["description"], "Consumer name can not contain path separators",
                "{subject}: {raw}"
            );
        }
        let raw = s.api("CONSUMER.NAMES.PS", Value::Null).await;
        assert_eq!(raw["consumers"], json!([]), "nothing was created: {raw}");
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_info_delete_names_and_list() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "CI", &["ci.>"]).await;
        for name in ["a", "b", "c"] {
            pull_consumer(&stream, durable(name)).await;
        }

        let mut names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
        names.sort();
        assert_eq!(names, vec!["a", "b", "c"]);
        let infos: Vec<jetstream::consumer::Info> = stream.consumers().try_collect().await.unwrap();
        let mut listed: Vec<String> = infos.iter().map(|i| i.name.clone()).collect();
        listed.sort();
        assert_eq!(listed, names);
        let raw = s.api("CONSUMER.NAMES.CI", Value::Null).await;
        assert_eq!(raw["consumers"], json!(["a", "b", "c"]), "{raw}");
        assert_eq!(raw["total"], 3, "{raw}");
        let raw = s.api("CONSUMER.LIST.CI", json!({"offset": 2})).await;
        assert_eq!(raw["consumers"][0]["name"], "c", "{raw}");
        assert_eq!(
            (raw["total"].as_u64(), raw["offset"].as_u64()),
            (Some(3), Some(2))
        );

        let info = stream.consumer_info("b").await.unwrap();
        assert_eq!((info.name.as_str(), info.stream_name.as_str()), ("b", "CI"));
        assert_eq!(info.config.durable_name.as_deref(), Some("b"));
        assert_eq!(info.config.ack_policy, AckPolicy::Explicit);

        assert!(stream.delete_consumer("b").await.unwrap().success);
        let mut names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
        names.sort();
        assert_eq!(names, vec!["a", "c"]);
        let err = stream.consumer_info("b").await.unwrap_err();
        assert_eq!(err.kind(), ConsumerInfoErrorKind::NotFound);
        let err = stream
            .delete_consumer("b")
            .await
            .err()
            .expect("delete fails");
        match err.kind() {
            jetstream::stream::ConsumerErrorKind::JetStream(e) => {
                assert_eq!(e.error_code().0, 10014, "{e}")
            }
            other => panic!("unexpected error kind {other:?}"),
        }
        let raw = s.api("CONSUMER.DELETE.CI.b", Value::Null).await;
        assert_api_error(&raw, 404, 10014);
        assert_eq!(s.stream_info("CI").await.state.consumer_count, 2);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_create_and_update_actions() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "ACT", &["act.>"]).await;
        let one = pull::Config {
            description: Some("one".into()),
            ..durable("d")
        };

        // action "create": the same config again is fine, another is not.
        stream.create_consumer_strict(one.clone()).await.unwrap();
        stream.create_consumer_strict(one.clone()).await.unwrap();
        let err = stream
            .create_consumer_strict(pull::Config {
                description: Some("two".into()),
                ..durable("d")
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ConsumerCreateStrictErrorKind::AlreadyExists);
        let raw = s
            .api(
                "CONSUMER.CREATE.ACT.d",
                json!({"stream_name": "ACT", "action": "create", "config": {
                    "durable_name": "d", "ack_policy": "explicit", "description": "three"
                }}),
            )
            .await;
        assert_api_error(&raw, 400, 10148);

        // action "update": only what exists.
        let err = stream
            .update_consumer(durable("missing"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ConsumerUpdateErrorKind::DoesNotExist);
        let raw = s
            .api(
                "CONSUMER.CREATE.ACT.missing",
                json!({"stream_name": "ACT", "action": "update", "config": {
                    "durable_name": "missing"
                }}),
            )
            .await;
        assert_api_error(&raw, 400, 10149);
        let updated = stream
            .update_consumer(pull::Config {
                description: Some("two".into()),
                max_ack_pending: 5,
                ..durable("d")
            })
            .await
            .unwrap();
        let info = updated.cached_info();
        assert_eq!(info.config.description.as_deref(), Some("two"));
        assert_eq!(info.config.max_ack_pending, 5);

        // No action: create or update.
        let c = pull_consumer(
            &stream,
            pull::Config {
                description: Some("three".into()),
                ..durable("d")
            },
        )
        .await;
        assert_eq!(c.cached_info().config.description.as_deref(), Some("three"));
        let info = stream.consumer_info("d").await.unwrap();
        assert_eq!(info.config.description.as_deref(), Some("three"));

        // What a consumer delivers from can not change.
        let err = stream
            .update_consumer(pull::Config {
                deliver_policy: DeliverPolicy::New,
                ..durable("d")
            })
            .await
            .unwrap_err();
        match err.kind() {
            ConsumerUpdateErrorKind::JetStream(e) => assert_eq!(e.error_code().0, 10012, "{e}"),
            other => panic!("unexpected error kind {other:?}"),
        }
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_consumers_are_removed_after_inactive_threshold() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "EPH", &["eph.>"]).await;
        s.publish("eph.a", "x").await;
        let threshold = Duration::from_millis(300);
        let gone = |name: String| {
            let stream = &stream;
            async move {
                let name = &name;
                eventually("the inactive consumer is removed", SETTLE, || async move {
                    match stream.consumer_info(name).await {
                        Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Some(()),
                        _ => None,
                    }
                })
                .await
            }
        };

        // An ephemeral pull consumer nobody pulls from.
        let idle = pull_consumer(
            &stream,
            pull::Config {
                inactive_threshold: threshold,
                ..Default::default()
            },
        )
        .await;
        assert!(idle.cached_info().config.durable_name.is_none());
        gone(idle.cached_info().name.clone()).await;

        // A durable with an inactive threshold goes too (nats-server 2.9+);
        // one without stays.
        let with_threshold = pull_consumer(
            &stream,
            pull::Config {
                inactive_threshold: threshold,
                ..durable("temporary")
            },
        )
        .await;
        pull_consumer(&stream, durable("kept")).await;
        gone(with_threshold.cached_info().name.clone()).await;

        // A waiting pull request keeps an ephemeral consumer alive (a
        // longer threshold, so the request surely arrives in time).
        let waiting = pull_consumer(
            &stream,
            pull::Config {
                inactive_threshold: Duration::from_secs(1),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            },
        )
        .await;
        let name = waiting.cached_info().name.clone();
        let long_pull = pull(&waiting, 1, Duration::from_millis(2500));
        let check = async {
            tokio::time::sleep(Duration::from_millis(1800)).await;
            stream.consumer_info(&name).await.map(|_| ())
        };
        let (got, alive) = tokio::join!(long_pull, check);
        assert!(got.is_empty());
        alive.expect("the consumer lives while a pull request waits");
        gone(name).await;

        // A push consumer lives as long as its deliver subject has interest.
        let mut sub = s.client.subscribe("deliver.eph").await.unwrap();
        let pushed = push_consumer(
            &stream,
            push::Config {
                deliver_subject: "deliver.eph".into(),
                inactive_threshold: threshold,
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            },
        )
        .await;
        let name = pushed.cached_info().name.clone();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stream
            .consumer_info(&name)
            .await
            .expect("a push consumer with a subscriber stays");
        s.publish("eph.b", "y").await;
        assert_eq!(&next_msg(&mut sub).await.payload[..], b"y");
        sub.unsubscribe().await.unwrap();
        gone(name).await;

        stream
            .consumer_info("kept")
            .await
            .expect("a plain durable stays");
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_batch_expires_no_wait_and_max_bytes() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "PULL", &["pull.>"]).await;
        let c = pull_consumer(&stream, durable("c")).await;
        s.publish_n("pull.x", 10).await;

        // fetch (no_wait): what is there, up to the batch.
        assert_eq!(seqs(&fetch(&c, 4).await), vec![1, 2, 3, 4]);
        // A batch with expires gets the rest, then the server's 408 ends
        // it, long before the client's own fallback (expires + 5 s).
        let start = Instant::now();
        let got = pull(&c, 10, Duration::from_millis(400)).await;
        assert_eq!(seqs(&got), (5..=10).collect::<Vec<_>>());
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(350), "ended after {took:?}");
        assert!(took < Duration::from_millis(4500), "ended after {took:?}");
        // Nothing left: a no_wait fetch ends at once (404); async-nats sets
        // no timeout of its own here.
        assert!(fetch(&c, 5).await.is_empty());

        // The statuses on the wire.
        let inbox = s.client.new_inbox();
        let mut sub = s.client.subscribe(inbox.clone()).await.unwrap();
        let next = "$JS.API.CONSUMER.MSG.NEXT.PULL.c";
        let request = |body: Value| {
            s.client
                .publish_with_reply(next, inbox.clone(), Bytes::from(body.to_string()))
        };
        request(json!({"batch": 1, "no_wait": true})).await.unwrap();
        assert_eq!(next_msg(&mut sub).await.status, Some(StatusCode::NOT_FOUND));
        request(json!({"batch": 1, "expires": 200_000_000}))
            .await
            .unwrap();
        let timeout = next_msg(&mut sub).await;
        assert_eq!(timeout.status, Some(StatusCode::TIMEOUT));
        s.publish("pull.y", "11").await;
        // A bare number is a batch size; the message comes with its own
        // subject and an ack reply.
        request(json!(1)).await.unwrap();
        let m = next_msg(&mut sub).await;
        assert_eq!((m.subject.as_str(), &m.payload[..]), ("pull.y", &b"11"[..]));
        assert!(m
            .reply
            .as_ref()
            .unwrap()
            .starts_with("$JS.ACK.PULL.c.1.11."));

        // max_bytes: 2 of these 108-byte messages fit in 250 bytes; the
        // request ends with a 409 at the third, which stays for later.
        let big = "x".repeat(100);
        s.publish_all(&[("pull.big", &big), ("pull.big", &big), ("pull.big", &big)])
            .await;
        let mut batch = c
            .fetch()
            .max_messages(10)
            .max_bytes(250)
            .messages()
            .await
            .unwrap();
        let mut got = Vec::new();
        while let Some(item) = within("a fetched message", batch.next()).await {
            match item {
                Ok(m) => got.push(m),
                Err(e) => {
                    assert!(e.to_string().contains("409"), "{e}");
                    break;
                }
            }
        }
        assert_eq!(seqs(&got), vec![12, 13]);
        assert_eq!(seqs(&fetch(&c, 10).await), vec![14]);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_policies_choose_the_first_message() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "DP", &["dp.*"]).await;
        s.publish_all(&[("dp.a", "1"), ("dp.b", "2")]).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.publish_all(&[("dp.a", "3"), ("dp.b", "4")]).await;
        let start_time = stream.get_raw_message(3).await.unwrap().time;

        let policies = [
            ("all", DeliverPolicy::All, "", 4, vec![1, 2, 3, 4, 5]),
            ("last", DeliverPolicy::Last, "", 1, vec![4, 5]),
            ("new", DeliverPolicy::New, "", 0, vec![5]),
            (
                "seq",
                DeliverPolicy::ByStartSequence { start_sequence: 3 },
                "",
                2,
                vec![3, 4, 5],
            ),
            (
                "time",
                DeliverPolicy::ByStartTime { start_time },
                "",
                2,
                vec![3, 4, 5],
            ),
            ("lps", DeliverPolicy::LastPerSubject, "", 2, vec![3, 4, 5]),
            (
                "lps_a",
                DeliverPolicy::LastPerSubject,
                "dp.a",
                1,
                vec![3, 5],
            ),
            ("last_a", DeliverPolicy::Last, "dp.a", 1, vec![3, 5]),
        ];
        let mut consumers = Vec::new();
        for (name, policy, filter, pending, _) in &policies {
            let c = pull_consumer(
                &stream,
                pull::Config {
                    deliver_policy: *policy,
                    filter_subject: filter.to_string(),
                    ..durable(name)
                },
            )
            .await;
            assert_eq!(c.cached_info().config.deliver_policy, *policy, "{name}");
            assert_eq!(
                c.cached_info().num_pending,
                *pending,
                "num_pending of {name}"
            );
            consumers.push(c);
        }
        s.publish("dp.a", "5").await;
        for ((name, _, _, _, expected), c) in policies.iter().zip(&consumers) {
            assert_eq!(&seqs(&fetch(c, 10).await), expected, "deliveries of {name}");
        }

        // A start sequence is required by by_start_sequence.
        let raw = s
            .api(
                "CONSUMER.CREATE.DP.bad",
                json!({"stream_name": "DP", "config": {
                    "name": "bad", "deliver_policy": "by_start_sequence"
                }}),
            )
            .await;
        assert_eq!(raw["error"]["code"], 400, "{raw}");
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_policies_explicit_all_and_none() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "AP", &["ap.>"]).await;
        s.publish_n("ap.x", 3).await;

        // explicit: each message on its own.
        let explicit = pull_consumer(&stream, durable("explicit")).await;
        let got = fetch(&explicit, 10).await;
        ack_sync(&got[1]).await;
        let info = s.consumer_info("AP", "explicit").await;
        assert_eq!(info.num_ack_pending, 2);
        assert_eq!(info.ack_floor.stream_sequence, 0);
        assert_eq!(info.delivered.stream_sequence, 3);
        ack_sync(&got[0]).await;
        let info = s.consumer_info("AP", "explicit").await;
        assert_eq!(info.num_ack_pending, 1);
        assert_eq!(
            (
                info.ack_floor.stream_sequence,
                info.ack_floor.consumer_sequence
            ),
            (2, 2)
        );

        // all: an ack covers everything before it.
        let all = pull_consumer(
            &stream,
            pull::Config {
                ack_policy: AckPolicy::All,
                ..durable("all")
            },
        )
        .await;
        let got = fetch(&all, 10).await;
        assert_eq!(seqs(&got), vec![1, 2, 3]);
        ack_sync(&got[2]).await;
        let info = s.consumer_info("AP", "all").await;
        assert_eq!(info.num_ack_pending, 0);
        assert_eq!(
            (
                info.ack_floor.stream_sequence,
                info.ack_floor.consumer_sequence
            ),
            (3, 3)
        );

        // none: delivered is acknowledged, never redelivered.
        let none = pull_consumer(
            &stream,
            pull::Config {
                ack_policy: AckPolicy::None,
                ack_wait: Duration::from_millis(200),
                ..durable("none")
            },
        )
        .await;
        assert_eq!(seqs(&fetch(&none, 10).await), vec![1, 2, 3]);
        let info = s.consumer_info("AP", "none").await;
        assert_eq!(info.num_ack_pending, 0);
        assert_eq!(info.ack_floor.stream_sequence, 3);
        assert!(pull(&none, 1, Duration::from_millis(500)).await.is_empty());
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_wait_redelivers_and_info_counts() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "AW", &["aw.>"]).await;
        s.publish_n("aw.x", 3).await;
        let c = pull_consumer(
            &stream,
            pull::Config {
                ack_wait: Duration::from_millis(300),
                ..durable("c")
            },
        )
        .await;
        assert_eq!(c.cached_info().num_pending, 3);

        let before_fetch = Instant::now();
        let first = fetch(&c, 2).await;
        assert_eq!(seqs(&first), vec![1, 2]);
        assert!(first.iter().all(|m| delivered(m) == 1));
        let info = s.consumer_info("AW", "c").await;
        assert_eq!(
            (info.num_pending, info.num_ack_pending, info.num_redelivered),
            (1, 2, 0)
        );

        // Not acked within ack_wait: delivered again (after the new
        // message 3, which is there at once), and counted.
        let again = pull(&c, 3, Duration::from_secs(3)).await;
        assert!(before_fetch.elapsed() >= Duration::from_millis(290));
        let mut got: Vec<(u64, i64)> = again
            .iter()
            .map(|m| (m.info().unwrap().stream_sequence, delivered(m)))
            .collect();
        got.sort();
        assert_eq!(got, vec![(1, 2), (2, 2), (3, 1)]);
        let info = s.consumer_info("AW", "c").await;
        assert_eq!(
            (info.num_pending, info.num_ack_pending, info.num_redelivered),
            (0, 3, 2)
        );
        assert_eq!(info.delivered.consumer_sequence, 5);

        for m in &again {
            ack_sync(m).await;
        }
        let info = s.consumer_info("AW", "c").await;
        assert_eq!(
            (
                info.num_ack_pending,
                info.num_redelivered,
                info.ack_floor.stream_sequence
            ),
            (0, 0, 3)
        );
        // Acked: never again.
        assert!(pull(&c, 1, Duration::from_millis(700)).await.is_empty());
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliver_and_backoff() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "MD", &["md.>"]).await;

        // max_deliver 2: two deliveries, then no more.
        let limited = pull_consumer(
            &stream,
            pull::Config {
                ack_wait: Duration::from_millis(200),
                max_deliver: 2,
                filter_subject: "md.limited".into(),
                ..durable("limited")
            },
        )
        .await;
        s.publish("md.limited", "x").await;
        let first = fetch(&limited, 1).await;
        assert_eq!(delivered(&first[0]), 1);
        let second = pull(&limited, 1, Duration::from_secs(3)).await;
        assert_eq!(delivered(&second[0]), 2);
        assert!(pull(&limited, 1, Duration::from_millis(800))
            .await
            .is_empty());

        // backoff: the n-th redelivery waits backoff[n-1] (the last one
        // repeats); max_deliver must exceed the number of backoffs.
        let mut sub = s.client.subscribe("deliver.md").await.unwrap();
        let backoff = vec![Duration::from_millis(200), Duration::from_millis(700)];
        let c = push_consumer(
            &stream,
            push::Config {
                deliver_subject: "deliver.md".into(),
                ack_policy: AckPolicy::Explicit,
                backoff: backoff.clone(),
                max_deliver: 3,
                filter_subject: "md.backoff".into(),
                ..push::Config {
                    durable_name: Some("backoff".into()),
                    ..Default::default()
                }
            },
        )
        .await;
        assert_eq!(c.cached_info().config.backoff, backoff);
        s.publish("md.backoff", "y").await;
        let mut times = Vec::new();
        for n in 1..=3 {
            let m = next_msg(&mut sub).await;
            times.push(Instant::now());
            assert_eq!(raw_delivered(&m), n);
        }
        // Lower bounds, less some delivery jitter: the second gap is the
        // second backoff, not the first again.
        let gaps = [times[1] - times[0], times[2] - times[1]];
        assert!(gaps[0] >= Duration::from_millis(100), "{gaps:?}");
        assert!(gaps[1] >= Duration::from_millis(500), "{gaps:?}");
        assert!(
            times[2] - times[0] >= Duration::from_millis(800),
            "{gaps:?}"
        );
        let more = tokio::time::timeout(Duration::from_millis(1000), sub.next()).await;
        assert!(more.is_err(), "a fourth delivery beyond max_deliver");

        let raw = s
            .api(
                "CONSUMER.CREATE.MD.bad",
                json!({"stream_name": "MD", "config": {
                    "durable_name": "bad", "ack_policy": "explicit",
                    "backoff": [100_000_000, 200_000_000], "max_deliver": 2
                }}),
            )
            .await;
        assert_api_error(&raw, 400, 10116);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ack_pending_limits_outstanding_messages() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "MAP", &["map.>"]).await;
        s.publish_n("map.x", 10).await;
        let c = pull_consumer(
            &stream,
            pull::Config {
                max_ack_pending: 3,
                ..durable("c")
            },
        )
        .await;
        let got = pull(&c, 10, Duration::from_millis(500)).await;
        assert_eq!(seqs(&got), vec![1, 2, 3]);
        let info = s.consumer_info("MAP", "c").await;
        assert_eq!((info.num_ack_pending, info.num_pending), (3, 7));

        ack_sync(&got[0]).await;
        let more = pull(&c, 10, Duration::from_millis(400)).await;
        assert_eq!(seqs(&more), vec![4]);
        for m in got[1..].iter().chain(&more) {
            ack_sync(m).await;
        }
        let rest = pull(&c, 10, Duration::from_millis(400)).await;
        assert_eq!(seqs(&rest), vec![5, 6, 7]);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_subject_and_filter_subjects() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "FLT", &["flt.>"]).await;
        s.publish_all(&[
            ("flt.a", "1"),
            ("flt.b", "2"),
            ("flt.c", "3"),
            ("flt.a", "4"),
            ("flt.b.deep", "5"),
        ])
        .await;

        let one = pull_consumer(
            &stream,
            pull::Config {
                filter_subject: "flt.a".into(),
                ..durable("one")
            },
        )
        .await;
        assert_eq!(one.cached_info().num_pending, 2);
        assert_eq!(seqs(&fetch(&one, 10).await), vec![1, 4]);

        let many = pull_consumer(
            &stream,
            pull::Config {
                filter_subjects: vec!["flt.a".into(), "flt.c".into()],
                ..durable("many")
            },
        )
        .await;
        assert_eq!(
            many.cached_info().config.filter_subjects,
            vec!["flt.a".to_string(), "flt.c".to_string()]
        );
        assert_eq!(many.cached_info().num_pending, 3);
        assert_eq!(seqs(&fetch(&many, 10).await), vec![1, 3, 4]);

        let wild = pull_consumer(
            &stream,
            pull::Config {
                filter_subject: "flt.b.>".into(),
                ..durable("wild")
            },
        )
        .await;
        assert_eq!(seqs(&fetch(&wild, 10).await), vec![5]);

        // New messages are filtered the same way.
        s.publish_all(&[("flt.c", "6"), ("flt.a", "7")]).await;
        assert_eq!(seqs(&fetch(&one, 10).await), vec![7]);
        assert_eq!(seqs(&fetch(&many, 10).await), vec![6, 7]);

        // A filter outside the stream's subjects: 10093.
        let err = stream
            .create_consumer(pull::Config {
                filter_subject: "elsewhere".into(),
                ..durable("outside")
            })
            .await
            .unwrap_err();
        match err.kind() {
            jetstream::stream::ConsumerErrorKind::JetStream(e) => {
                assert_eq!(e.error_code().0, 10093, "{e}")
            }
            other => panic!("unexpected error kind {other:?}"),
        }
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_nak_delay_progress_term_and_ack_sync() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "ACK", &["ack.>"]).await;
        s.publish_all(&[
            ("ack.nak", "1"),
            ("ack.delay", "2"),
            ("ack.wpi", "3"),
            ("ack.term", "4"),
            ("ack.plain", "5"),
        ])
        .await;
        let consumer = |name: &'static str, ack_wait: Duration| {
            let stream = &stream;
            async move {
                pull_consumer(
                    stream,
                    pull::Config {
                        filter_subject: format!("ack.{name}"),
                        ack_wait,
                        ..durable(name)
                    },
                )
                .await
            }
        };

        // -NAK: redelivered at once, long before ack_wait.
        let nak = async {
            let c = consumer("nak", Duration::from_secs(30)).await;
            let m = fetch(&c, 1).await.remove(0);
            let naked = Instant::now();
            ack_sync_with(&m, AckKind::Nak(None)).await;
            let again = pull(&c, 1, Duration::from_secs(5)).await;
            assert_eq!((seqs(&again), delivered(&again[0])), (vec![1], 2));
            assert!(naked.elapsed() < Duration::from_secs(4));
        };

        // -NAK {"delay": ...}: redelivered after the delay.
        let delayed = async {
            let c = consumer("delay", Duration::from_secs(30)).await;
            let m = fetch(&c, 1).await.remove(0);
            let naked = Instant::now();
            ack_sync_with(&m, AckKind::Nak(Some(Duration::from_millis(700)))).await;
            quiet_until(&c, naked + Duration::from_millis(450)).await;
            let again = pull(&c, 1, Duration::from_secs(5)).await;
            assert_eq!((seqs(&again), delivered(&again[0])), (vec![2], 2));
            let waited = naked.elapsed();
            assert!(waited >= Duration::from_millis(650), "{waited:?}");
        };

        // +WPI: the ack wait starts over.
        let progress = async {
            let ack_wait = Duration::from_secs(1);
            let c = consumer("wpi", ack_wait).await;
            // Delivered (and its ack wait started) before `fetched`.
            let m = fetch(&c, 1).await.remove(0);
            let fetched = Instant::now();
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Applied after `progressing`: the new ack wait ends after
            // progressing + ack_wait.
            let progressing = Instant::now();
            ack_sync_with(&m, AckKind::Progress).await;
            if progressing - fetched < ack_wait - Duration::from_millis(100) {
                // The first ack wait ends within this window: no redelivery.
                quiet_until(&c, progressing + Duration::from_millis(700)).await;
            }
            let again = pull(&c, 1, Duration::from_secs(5)).await;
            assert_eq!((seqs(&again), delivered(&again[0])), (vec![3], 2));
            let waited = progressing.elapsed();
            assert!(waited >= Duration::from_millis(990), "{waited:?}");
        };

        // +TERM: never redelivered.
        let term = async {
            let c = consumer("term", Duration::from_millis(300)).await;
            let m = fetch(&c, 1).await.remove(0);
            ack_sync_with(&m, AckKind::Term).await;
            assert!(pull(&c, 1, Duration::from_millis(900)).await.is_empty());
            let info = s.consumer_info("ACK", "term").await;
            assert_eq!(
                (info.num_ack_pending, info.ack_floor.stream_sequence),
                (0, 4)
            );
        };

        // A plain +ACK (no reply) is applied too; the AckSync used above
        // (`double_ack`) is answered only once its ack is applied.
        let plain = async {
            let c = consumer("plain", Duration::from_secs(30)).await;
            let m = fetch(&c, 1).await.remove(0);
            m.ack().await.unwrap();
            eventually("the plain ack is applied", SETTLE, || async {
                let info = s.consumer_info("ACK", "plain").await;
                (info.num_ack_pending == 0 && info.ack_floor.stream_sequence == 5).then_some(())
            })
            .await;
        };

        tokio::join!(nak, delayed, progress, term, plain);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumer_delivers_and_sends_idle_heartbeats() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "PUSH", &["push.>"]).await;
        s.publish_n("push.x", 3).await;
        let heartbeat = Duration::from_millis(500);
        let c = push_consumer(
            &stream,
            push::Config {
                durable_name: Some("p".into()),
                deliver_subject: "deliver.push".into(),
                ack_policy: AckPolicy::Explicit,
                idle_heartbeat: heartbeat,
                ..Default::default()
            },
        )
        .await;
        let info = c.cached_info();
        assert_eq!(info.config.deliver_subject.as_deref(), Some("deliver.push"));
        assert_eq!(info.config.idle_heartbeat, heartbeat);

        let mut messages = c.messages().await.unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            let m = within("a push delivery", messages.next())
                .await
                .expect("push messages go on")
                .expect("a push delivery");
            ack_sync(&m).await;
            got.push(m);
        }
        assert_eq!(seqs(&got), vec![1, 2, 3]);
        // Idle: async-nats takes the heartbeats (it reports missing ones as
        // errors), so nothing comes.
        let idle = tokio::time::timeout(Duration::from_millis(1500), messages.next()).await;
        assert!(
            idle.is_err(),
            "unexpected item while idle: {:?}",
            idle.map(|m| m.map(|m| m.map(|m| m.message.subject)))
        );
        s.publish("push.x", "4").await;
        let m = within("a push delivery", messages.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seqs(std::slice::from_ref(&m)), vec![4]);
        ack_sync(&m).await;
        drop(messages);

        // On the wire: a 100 status with the last delivered sequences.
        let mut sub = s.client.subscribe("deliver.push").await.unwrap();
        let beat = next_msg(&mut sub).await;
        assert_eq!(beat.status, Some(StatusCode::IDLE_HEARTBEAT));
        assert_eq!(beat.description.as_deref(), Some("Idle Heartbeat"));
        let headers = beat.headers.expect("heartbeat headers");
        assert_eq!(
            headers.get("Nats-Last-Consumer").map(|v| v.as_str()),
            Some("4")
        );
        assert_eq!(
            headers.get("Nats-Last-Stream").map(|v| v.as_str()),
            Some("4")
        );
        let info = s.consumer_info("PUSH", "p").await;
        assert_eq!(
            (info.num_ack_pending, info.ack_floor.stream_sequence),
            (0, 4)
        );
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_group_gives_each_message_to_one_member() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "GRP", &["grp.>"]).await;
        let c = push_consumer(
            &stream,
            push::Config {
                durable_name: Some("g".into()),
                deliver_subject: "deliver.grp".into(),
                deliver_group: Some("workers".into()),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(
            c.cached_info().config.deliver_group.as_deref(),
            Some("workers")
        );
        let mut first = c.messages().await.unwrap();
        let mut second = c.messages().await.unwrap();
        s.publish_n("grp.job", 20).await;

        let mut seen = Vec::new();
        let mut per_member = [0usize; 2];
        while seen.len() < 20 {
            let (member, item) = within("a group delivery", async {
                tokio::select! {
                    m = first.next() => (0, m),
                    m = second.next() => (1, m),
                }
            })
            .await;
            let m = item.expect("push messages go on").expect("a delivery");
            m.ack().await.unwrap();
            per_member[member] += 1;
            seen.push(m.info().unwrap().stream_sequence);
        }
        seen.sort();
        assert_eq!(
            seen,
            (1..=20).collect::<Vec<_>>(),
            "each message exactly once"
        );
        assert!(per_member.iter().all(|&n| n > 0), "{per_member:?}");
        let extra = tokio::time::timeout(Duration::from_millis(500), async {
            tokio::select! {
                m = first.next() => m,
                m = second.next() => m,
            }
        })
        .await;
        assert!(extra.is_err(), "a message was delivered twice");
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_streams_messages_consumers_and_ack_state() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "DUR", &["dur.>"]).await;
        for i in 1..=10 {
            let ack = within("a PubAck", async {
                s.js.send_publish(
                    "dur.x",
                    PublishMessage::build()
                        .payload(Bytes::from(format!("m{i}")))
                        .message_id(format!("id-{i}")),
                )
                .await
                .unwrap()
                .await
                .unwrap()
            })
            .await;
            assert_eq!(ack.sequence, i);
        }
        let c = pull_consumer(
            &stream,
            pull::Config {
                ack_wait: Duration::from_millis(300),
                ..durable("worker")
            },
        )
        .await;
        push_consumer(
            &stream,
            push::Config {
                durable_name: Some("pusher".into()),
                deliver_subject: "deliver.dur".into(),
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await;
        let got = fetch(&c, 6).await;
        assert_eq!(seqs(&got), vec![1, 2, 3, 4, 5, 6]);
        for m in &got[..4] {
            ack_sync(m).await;
        }
        let before = s.consumer_info("DUR", "worker").await;
        assert_eq!(before.ack_floor.stream_sequence, 4);
        assert_eq!(before.num_ack_pending, 2);

        let s = s.restart().await;
        let info = s.stream_info("DUR").await;
        assert_eq!(
            (
                info.state.messages,
                info.state.first_sequence,
                info.state.last_sequence,
                info.state.consumer_count
            ),
            (10, 1, 10, 2)
        );
        let stream = s.js.get_stream("DUR").await.unwrap();
        let mut names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
        names.sort();
        assert_eq!(names, vec!["pusher", "worker"]);
        let info = s.consumer_info("DUR", "worker").await;
        assert_eq!(info.config.ack_wait, Duration::from_millis(300));
        assert_eq!(
            (
                info.ack_floor.stream_sequence,
                info.ack_floor.consumer_sequence
            ),
            (4, 4)
        );
        assert_eq!(
            (
                info.delivered.stream_sequence,
                info.delivered.consumer_sequence
            ),
            (6, 6)
        );
        assert_eq!((info.num_ack_pending, info.num_pending), (2, 4));
        let pusher = s.consumer_info("DUR", "pusher").await;
        assert_eq!(
            pusher.config.deliver_subject.as_deref(),
            Some("deliver.dur")
        );

        // De-duplication remembers ids from before the restart.
        let dup = within("a PubAck", async {
            s.js.send_publish(
                "dur.x",
                PublishMessage::build()
                    .payload(Bytes::from_static(b"again"))
                    .message_id("id-3"),
            )
            .await
            .unwrap()
            .await
            .unwrap()
        })
        .await;
        assert_eq!((dup.sequence, dup.duplicate), (3, true));

        // Unacknowledged 5 and 6 come again (after ack_wait), with 7..10.
        let c: PullConsumer = stream.get_consumer("worker").await.unwrap();
        let rest = pull(&c, 6, Duration::from_secs(5)).await;
        let mut got: Vec<(u64, i64)> = rest
            .iter()
            .map(|m| (m.info().unwrap().stream_sequence, delivered(m)))
            .collect();
        got.sort();
        assert_eq!(got, vec![(5, 2), (6, 2), (7, 1), (8, 1), (9, 1), (10, 1)]);
        for m in &rest {
            ack_sync(m).await;
        }
        let info = s.consumer_info("DUR", "worker").await;
        assert_eq!(
            (info.ack_floor.stream_sequence, info.num_ack_pending),
            (10, 0)
        );

        // The acks themselves are durable.
        let s = s.restart().await;
        let info = s.consumer_info("DUR", "worker").await;
        assert_eq!(
            (
                info.ack_floor.stream_sequence,
                info.num_ack_pending,
                info.num_pending
            ),
            (10, 0, 0)
        );
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_redelivers_at_the_ack_wait_of_the_original_delivery() {
    within("the test", async {
        let ack_wait = Duration::from_secs(2);
        let s = JsServer::start().await;
        let stream = create_stream(&s, "RD", &["rd.>"]).await;
        s.publish_n("rd.x", 2).await;
        let c = pull_consumer(
            &stream,
            pull::Config {
                ack_wait,
                ..durable("w")
            },
        )
        .await;
        let got = fetch(&c, 1).await;
        assert_eq!(seqs(&got), vec![1]);
        // Read back after the delivery was recorded (the consumer persists
        // under the lock CONSUMER.INFO takes).
        let info = s.consumer_info("RD", "w").await;
        assert_eq!(info.num_ack_pending, 1);

        // Down for longer than the ack wait: message 1 is due when the
        // server comes back, and is redelivered at once, not one whole
        // ack wait after the restart.
        let s = s.restart_after(ack_wait + Duration::from_millis(500)).await;
        let stream = s.js.get_stream("RD").await.unwrap();
        let c: PullConsumer = stream.get_consumer("w").await.unwrap();
        let asked = Instant::now();
        let again = pull(&c, 1, Duration::from_secs(1)).await;
        assert_eq!(
            seqs(&again),
            vec![1],
            "not redelivered right after the restart"
        );
        assert_eq!(delivered(&again[0]), 2);
        assert!(asked.elapsed() < ack_wait, "took {:?}", asked.elapsed());
        ack_sync(&again[0]).await;

        // A delivery whose ack wait has not passed yet keeps its deadline
        // across a quick restart: not redelivered early.
        let got = fetch(&c, 1).await;
        assert_eq!(seqs(&got), vec![2]);
        let delivered_at = Instant::now();
        let s = s.restart().await;
        let stream = s.js.get_stream("RD").await.unwrap();
        let c: PullConsumer = stream.get_consumer("w").await.unwrap();
        quiet_until(&c, delivered_at + ack_wait - Duration::from_millis(200)).await;
        let again = pull(&c, 1, Duration::from_secs(5)).await;
        assert_eq!(seqs(&again), vec![2]);
        assert_eq!(delivered(&again[0]), 2);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_messages_stream_pulls_again_and_survives_idle_time() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "PS", &["ps.>"]).await;
        let c = pull_consumer(&stream, durable("c")).await;
        // async-nats keeps a pull request open, pulls again when half the
        // batch arrived or the request expired, and treats two missed
        // heartbeats as an error.
        let mut messages = c
            .stream()
            .max_messages_per_batch(3)
            .expires(Duration::from_millis(1500))
            .heartbeat(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        s.publish_n("ps.x", 5).await;
        for seq in 1..=5 {
            let m = within("a message", messages.next())
                .await
                .expect("the stream goes on")
                .expect("a message");
            assert_eq!(seqs(std::slice::from_ref(&m)), vec![seq]);
            m.ack().await.unwrap();
        }
        // Idle across an expired request: heartbeats, no error.
        let idle = tokio::time::timeout(Duration::from_millis(2500), messages.next()).await;
        assert!(
            idle.is_err(),
            "unexpected item while idle: {:?}",
            idle.map(|m| m.map(|m| m.map(|m| m.message.subject)))
        );
        s.publish("ps.x", "6").await;
        let m = within("a message", messages.next()).await.unwrap().unwrap();
        assert_eq!(seqs(std::slice::from_ref(&m)), vec![6]);
        m.ack().await.unwrap();

        // Deleting the consumer ends the stream with an error.
        stream.delete_consumer("c").await.unwrap();
        let end = within("the end of the stream", messages.next()).await;
        assert!(matches!(end, Some(Err(_))), "{end:?}");
        s.shutdown().await;
    })
    .await
}

/// CPU time (user and system) used by this test process so far.
#[cfg(unix)]
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// A consumer with nothing to do sleeps until its next deadline, whatever
/// is waiting: a redelivery due but no pull request, a long pull request on
/// an ephemeral past its inactive threshold, a push consumer without
/// interest whose message went away. (Each of these used to make the
/// consumer's task loop without pause.)
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumers_do_not_busy_loop() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create_stream(&s, "IDLE", &["idle.>"]).await;
        s.publish_all(&[("idle.pull", "1"), ("idle.push", "2")])
            .await;

        // Redelivery due, nobody pulling.
        let due = pull_consumer(
            &stream,
            pull::Config {
                ack_wait: Duration::from_millis(100),
                filter_subject: "idle.pull".into(),
                ..durable("due")
            },
        )
        .await;
        assert_eq!(fetch(&due, 1).await.len(), 1);
        // A push consumer nobody listens to.
        push_consumer(
            &stream,
            push::Config {
                durable_name: Some("unheard".into()),
                deliver_subject: "deliver.nobody".into(),
                ack_policy: AckPolicy::Explicit,
                filter_subject: "idle.push".into(),
                ..Default::default()
            },
        )
        .await;
        // A long pull on an ephemeral with a short inactive threshold.
        let ephemeral = pull_consumer(
            &stream,
            pull::Config {
                inactive_threshold: Duration::from_millis(100),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            },
        )
        .await;
        let long_pull = pull(&ephemeral, 1, Duration::from_millis(3000));
        let measure = async {
            tokio::time::sleep(Duration::from_millis(400)).await;
            stream.delete_message(2).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let before = cpu_time();
            tokio::time::sleep(Duration::from_millis(2000)).await;
            cpu_time() - before
        };
        let (got, used) = tokio::join!(long_pull, measure);
        assert!(got.is_empty());
        // Idle, the whole process uses next to nothing; each of the three
        // loops alone used to take most of a core.
        assert!(
            used < Duration::from_millis(1000),
            "{used:?} of CPU in 2 s idle"
        );
        s.shutdown().await;
    })
    .await
}
