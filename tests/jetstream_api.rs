//! The JetStream API of durable streams, driven by async-nats 0.51 as an
//! application would (raw `$JS.API` requests where the client has no call,
//! or to pin the wire format): account info; stream create, update, info,
//! delete, purge, names and list; message get and delete; direct get;
//! publishing (PubAck, de-duplication, `Nats-Expected-*` headers); limits;
//! workqueue and interest retention; memory storage. Error replies are
//! checked both as async-nats error kinds and as nats-server error codes.
//!
//! Each test runs its own server on a temporary store and is bounded in
//! time.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    context::{
        CreateStreamErrorKind, GetStreamByNameErrorKind, GetStreamErrorKind, PublishErrorKind,
    },
    message::PublishMessage,
    publish::PublishAck,
    stream::{
        Config as StreamConfig, DeleteMessageErrorKind, DirectGetErrorKind, DiscardPolicy,
        LastRawMessageErrorKind, PurgeErrorKind, RawMessageErrorKind, RetentionPolicy, StorageType,
    },
    ErrorCode,
};
use async_nats::StatusCode;
use bytes::Bytes;
use futures::TryStreamExt;
use serde_json::{json, Value};

use common::jetstream::{ack_sync, assert_api_error, code_in, eventually, fetch, seqs, JsServer};
use common::within;

/// How long a state change caused by an ack may take to show.
const SETTLE: Duration = Duration::from_secs(5);

fn stream_config(name: &str, subjects: &[&str]) -> StreamConfig {
    StreamConfig {
        name: name.to_string(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn create(s: &JsServer, config: StreamConfig) -> jetstream::stream::Stream {
    let name = config.name.clone();
    within("STREAM.CREATE", s.js.create_stream(config))
        .await
        .unwrap_or_else(|e| panic!("creating stream {name} failed: {e}"))
}

async fn send(
    s: &JsServer,
    subject: &str,
    message: PublishMessage,
) -> Result<PublishAck, jetstream::context::PublishError> {
    within("a publish and its PubAck", async {
        s.js.send_publish(subject.to_string(), message).await?.await
    })
    .await
}

fn msg(payload: &str) -> PublishMessage {
    PublishMessage::build().payload(Bytes::from(payload.to_string()))
}

/// The nats-server error code inside an async-nats error kind that carries a
/// `jetstream::Error`.
fn kind_code(error: &jetstream::Error) -> u64 {
    error.error_code().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_info_counts_streams_consumers_and_bytes() {
    within("the test", async {
        let s = JsServer::start().await;
        let account = s.js.query_account().await.unwrap();
        assert_eq!(
            (
                account.streams,
                account.consumers,
                account.memory,
                account.storage
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(account.limits.max_streams, None, "-1 is unlimited");

        create(&s, stream_config("FILE", &["file.>"])).await;
        create(
            &s,
            StreamConfig {
                storage: StorageType::Memory,
                ..stream_config("MEM", &["mem.>"])
            },
        )
        .await;
        s.publish("file.a", "hello").await;
        s.publish("mem.a", "hi").await;
        let file = s.js.get_stream("FILE").await.unwrap();
        file.create_consumer(pull::Config {
            durable_name: Some("c".into()),
            ..Default::default()
        })
        .await
        .unwrap();

        let account = s.js.query_account().await.unwrap();
        assert_eq!(account.streams, 2);
        assert_eq!(account.consumers, 1);
        // subject + data + 16, as nats-server's memory store counts.
        assert_eq!(account.storage, (6 + 5 + 16) as u64);
        assert_eq!(account.memory, (5 + 2 + 16) as u64);

        let raw = s.api("INFO", Value::Null).await;
        assert_eq!(
            raw["type"], "io.nats.jetstream.api.v1.account_info_response",
            "{raw}"
        );
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_create_echoes_defaults_and_checks_conflicts() {
    within("the test", async {
        let s = JsServer::start().await;
        let config = stream_config("ORDERS", &["orders.>"]);
        let stream = create(&s, config.clone()).await;
        let info = stream.cached_info().clone();
        let c = &info.config;
        assert_eq!(c.name, "ORDERS");
        assert_eq!(c.subjects, vec!["orders.>".to_string()]);
        // nats-server turns the zeros async-nats sends into -1 (unlimited).
        assert_eq!(
            (
                c.max_messages,
                c.max_bytes,
                c.max_messages_per_subject,
                c.max_consumers,
                c.max_message_size
            ),
            (-1, -1, -1, -1, -1)
        );
        assert_eq!(c.max_age, Duration::ZERO);
        assert_eq!(c.duplicate_window, Duration::from_secs(120));
        assert_eq!(c.num_replicas, 1);
        assert_eq!(c.storage, StorageType::File);
        assert_eq!(c.retention, RetentionPolicy::Limits);
        assert_eq!(c.discard, DiscardPolicy::Old);
        let st = &info.state;
        assert_eq!(
            (
                st.messages,
                st.bytes,
                st.first_sequence,
                st.last_sequence,
                st.consumer_count
            ),
            (0, 0, 0, 0, 0)
        );

        // The same config again is fine and answers the same stream.
        let again = create(&s, config.clone()).await;
        assert_eq!(again.cached_info().created, info.created);
        // So is the config with nats-server's defaults spelled out.
        let raw = s
            .api(
                "STREAM.CREATE.ORDERS",
                json!({
                    "name": "ORDERS", "subjects": ["orders.>"], "max_msgs": -1,
                    "max_bytes": -1, "max_msgs_per_subject": -1, "max_consumers": -1,
                    "max_msg_size": -1, "duplicate_window": 120_000_000_000u64,
                    "num_replicas": 1, "storage": "file", "retention": "limits",
                    "discard": "old"
                }),
            )
            .await;
        assert!(raw.get("error").is_none(), "{raw}");
        assert_eq!(
            raw["type"], "io.nats.jetstream.api.v1.stream_create_response",
            "{raw}"
        );

        // A different config under the same name: 10058.
        let err =
            s.js.create_stream(StreamConfig {
                max_messages: 10,
                ..config.clone()
            })
            .await
            .unwrap_err();
        match err.kind() {
            CreateStreamErrorKind::JetStream(e) => {
                assert_eq!(e.error_code(), ErrorCode::STREAM_NAME_EXIST, "{e}")
            }
            other => panic!("unexpected error kind {other:?}"),
        }
        // Subjects overlapping another stream's: 10065.
        let err =
            s.js.create_stream(stream_config("OTHER", &["orders.eu.*"]))
                .await
                .unwrap_err();
        match err.kind() {
            CreateStreamErrorKind::JetStream(e) => {
                assert_eq!(e.error_code(), ErrorCode::STREAM_SUBJECT_OVERLAP, "{e}")
            }
            other => panic!("unexpected error kind {other:?}"),
        }
        let raw = s
            .api(
                "STREAM.CREATE.OTHER",
                json!({"name": "OTHER", "subjects": ["orders.x"]}),
            )
            .await;
        assert_api_error(&raw, 400, 10065);

        // Invalid names: async-nats refuses "a.b" itself; the server refuses
        // what reaches it.
        let err =
            s.js.create_stream(stream_config("a.b", &["ab"]))
                .await
                .unwrap_err();
        assert_eq!(err.kind(), CreateStreamErrorKind::InvalidStreamName);
        // (Path separators have an error of their own, see
        // `stream_names_with_path_separators_are_refused`.)
        // Name in the subject and in the body differ: 10056.
        let raw = s.api("STREAM.CREATE.X", json!({"name": "Y"})).await;
        assert_api_error(&raw, 400, 10056);
        // An invalid config is JSStreamInvalidConfigF, which nats-server
        // answers with code 500, not 400.
        let raw = s
            .api(
                "STREAM.CREATE.X",
                json!({"name": "X", "subjects": ["a..b"]}),
            )
            .await;
        assert_api_error(&raw, 500, 10052);
        // Replicas on a single server: JSStreamReplicasNotSupportedErr.
        let raw = s
            .api("STREAM.CREATE.X", json!({"name": "X", "num_replicas": 3}))
            .await;
        assert_api_error(&raw, 500, 10074);
        // Not JSON: 10025.
        let reply = within(
            "a reply",
            s.client
                .request("$JS.API.STREAM.CREATE.X", Bytes::from_static(b"{nope")),
        )
        .await
        .unwrap();
        let raw: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_api_error(&raw, 400, 10025);

        // None of the failures created anything.
        let names: Vec<String> = s.js.stream_names().try_collect().await.unwrap();
        assert_eq!(names, vec!["ORDERS".to_string()]);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_names_with_path_separators_are_refused() {
    within("the test", async {
        let s = JsServer::start().await;
        // Both separators, anywhere in the name: nats-server's
        // JSStreamNameContainsPathSeparatorsErr, not the generic 10052.
        for name in ["a/b", "a\\b", "/x", "x\\"] {
            let raw = s
                .api(
                    &format!("STREAM.CREATE.{name}"),
                    json!({"name": name, "subjects": ["ps"]}),
                )
                .await;
            assert_api_error(&raw, 400, 10128);
            assert_eq!(
                raw["error"]["description"], "Stream name can not contain path separators",
                "{raw}"
            );
        }
        // A body naming another stream is a mismatch first (10056), as in
        // nats-server, whatever the names contain.
        let raw = s
            .api(
                "STREAM.CREATE.a/b",
                json!({"name": "ab", "subjects": ["ps"]}),
            )
            .await;
        assert_api_error(&raw, 400, 10056);
        let raw = s
            .api(
                "STREAM.CREATE.ab",
                json!({"name": "a/b", "subjects": ["ps"]}),
            )
            .await;
        assert_api_error(&raw, 400, 10056);

        let names: Vec<String> = s.js.stream_names().try_collect().await.unwrap();
        assert!(names.is_empty(), "{names:?}");
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_update_applies_limits_and_subjects() {
    within("the test", async {
        let s = JsServer::start().await;
        create(&s, stream_config("EVENTS", &["ev.a.>"])).await;
        s.publish_n("ev.a.x", 10).await;

        // Lowering max_msgs drops the oldest at once.
        let info =
            s.js.update_stream(StreamConfig {
                max_messages: 5,
                ..stream_config("EVENTS", &["ev.a.>"])
            })
            .await
            .unwrap();
        assert_eq!(info.config.max_messages, 5);
        assert_eq!(
            (
                info.state.messages,
                info.state.first_sequence,
                info.state.last_sequence
            ),
            (5, 6, 10)
        );

        // Adding a subject captures it.
        s.js.update_stream(StreamConfig {
            max_messages: 5,
            ..stream_config("EVENTS", &["ev.a.>", "ev.b.>"])
        })
        .await
        .unwrap();
        assert_eq!(s.publish("ev.b.1", "b").await.sequence, 11);

        // Removing one releases it: nobody answers a publish there.
        s.js.update_stream(StreamConfig {
            max_messages: 5,
            ..stream_config("EVENTS", &["ev.b.>"])
        })
        .await
        .unwrap();
        let err = send(&s, "ev.a.x", msg("lost")).await.unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::StreamNotFound);
        assert_eq!(s.publish("ev.b.2", "b").await.sequence, 12);
        let info = s.stream_info("EVENTS").await;
        assert_eq!(info.config.subjects, vec!["ev.b.>".to_string()]);

        // Updating a stream that does not exist.
        let err =
            s.js.update_stream(stream_config("NOPE", &["nope"]))
                .await
                .unwrap_err();
        assert_eq!(err.kind(), CreateStreamErrorKind::NotFound);
        let raw = s
            .api(
                "STREAM.UPDATE.NOPE",
                json!({"name": "NOPE", "subjects": ["nope"]}),
            )
            .await;
        assert_api_error(&raw, 404, 10059);

        // Taking another stream's subjects: 10065.
        create(&s, stream_config("OTHER", &["other.>"])).await;
        let err =
            s.js.update_stream(stream_config("EVENTS", &["ev.b.>", "other.x"]))
                .await
                .unwrap_err();
        match err.kind() {
            CreateStreamErrorKind::JetStream(e) => {
                assert_eq!(e.error_code(), ErrorCode::STREAM_SUBJECT_OVERLAP, "{e}")
            }
            other => panic!("unexpected error kind {other:?}"),
        }
        // The storage type can not change.
        let err =
            s.js.update_stream(StreamConfig {
                storage: StorageType::Memory,
                max_messages: 5,
                ..stream_config("EVENTS", &["ev.b.>"])
            })
            .await
            .unwrap_err();
        assert!(
            matches!(err.kind(), CreateStreamErrorKind::JetStream(_)),
            "{err}"
        );
        let info = s.stream_info("EVENTS").await;
        assert_eq!(info.config.storage, StorageType::File);
        assert_eq!(info.state.messages, 5);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_info_reports_state_and_subject_counts() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(&s, stream_config("STATE", &["st.>"])).await;
        let messages = [
            ("st.a.1", "one"),
            ("st.a.1", "two"),
            ("st.a.1", "three"),
            ("st.a.2", "four"),
            ("st.a.2", "five"),
            ("st.b", "six"),
        ];
        assert_eq!(s.publish_all(&messages).await, vec![1, 2, 3, 4, 5, 6]);
        for name in ["c1", "c2"] {
            stream
                .create_consumer(pull::Config {
                    durable_name: Some(name.into()),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let expected_bytes: u64 = messages
            .iter()
            .map(|(subject, data)| (subject.len() + data.len() + 16) as u64)
            .sum();

        let info = s.stream_info("STATE").await;
        let st = &info.state;
        assert_eq!(st.messages, 6);
        assert_eq!(st.bytes, expected_bytes);
        assert_eq!((st.first_sequence, st.last_sequence), (1, 6));
        assert_eq!(st.subjects_count, 3);
        assert_eq!(st.consumer_count, 2);
        assert!(st.first_timestamp <= st.last_timestamp);
        assert_eq!(st.deleted_count.unwrap_or(0), 0);

        // subjects_filter: message counts per matching subject.
        let subjects: HashMap<String, usize> = stream
            .info_with_subjects("st.a.*")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(
            subjects,
            HashMap::from([("st.a.1".to_string(), 3), ("st.a.2".to_string(), 2)])
        );
        let raw = s
            .api("STREAM.INFO.STATE", json!({"subjects_filter": ">"}))
            .await;
        assert_eq!(
            raw["state"]["subjects"],
            json!({"st.a.1": 3, "st.a.2": 2, "st.b": 1}),
            "{raw}"
        );
        let raw = s.api("STREAM.INFO.STATE", Value::Null).await;
        assert!(raw["state"].get("subjects").is_none(), "{raw}");
        assert_eq!(
            raw["type"], "io.nats.jetstream.api.v1.stream_info_response",
            "{raw}"
        );

        // An interior delete is counted.
        assert!(stream.delete_message(3).await.unwrap());
        let info = s.stream_info("STATE").await;
        assert_eq!(info.state.messages, 5);
        assert_eq!(info.state.deleted_count, Some(1));
        assert_eq!(info.state.bytes, expected_bytes - (6 + 5 + 16));
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_delete_and_not_found_errors() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(&s, stream_config("GONE", &["gone.>"])).await;
        s.publish("gone.a", "x").await;
        stream
            .create_consumer(pull::Config {
                durable_name: Some("c".into()),
                ..Default::default()
            })
            .await
            .unwrap();

        // Consumer not found: 10014.
        let err = stream.consumer_info("nope").await.unwrap_err();
        assert_eq!(err.kind(), ConsumerInfoErrorKind::NotFound);
        let err =
            s.js.get_consumer_from_stream::<pull::Config, _, _>("nope", "GONE")
                .await
                .unwrap_err();
        match err.kind() {
            jetstream::stream::ConsumerErrorKind::JetStream(e) => {
                assert_eq!(e.error_code(), ErrorCode::CONSUMER_NOT_FOUND, "{e}")
            }
            other => panic!("unexpected error kind {other:?}"),
        }
        let raw = s.api("CONSUMER.INFO.GONE.nope", Value::Null).await;
        assert_api_error(&raw, 404, 10014);

        let deleted = s.js.delete_stream("GONE").await.unwrap();
        assert!(deleted.success);

        // Stream not found: 10059, however it is asked.
        for err in [
            s.js.get_stream("GONE").await.unwrap_err(),
            s.js.delete_stream("GONE")
                .await
                .err()
                .expect("delete fails"),
        ] {
            match err.kind() {
                GetStreamErrorKind::JetStream(e) => {
                    assert_eq!(e.error_code(), ErrorCode::STREAM_NOT_FOUND, "{e}")
                }
                other => panic!("unexpected error kind {other:?}"),
            }
        }
        let err = stream.consumer_info("c").await.unwrap_err();
        assert_eq!(err.kind(), ConsumerInfoErrorKind::StreamNotFound);
        let err = stream.get_info().await.unwrap_err();
        assert_eq!(code_in(&err), Some(10059), "{err}");
        for (subject, body) in [
            ("STREAM.INFO.GONE", Value::Null),
            ("STREAM.DELETE.GONE", Value::Null),
            ("STREAM.PURGE.GONE", Value::Null),
            ("STREAM.MSG.GET.GONE", json!({"seq": 1})),
            ("STREAM.MSG.DELETE.GONE", json!({"seq": 1})),
            ("CONSUMER.INFO.GONE.c", Value::Null),
            ("CONSUMER.NAMES.GONE", Value::Null),
            ("CONSUMER.LIST.GONE", Value::Null),
            ("CONSUMER.DELETE.GONE.c", Value::Null),
            (
                "CONSUMER.CREATE.GONE",
                json!({"stream_name": "GONE", "config": {}}),
            ),
        ] {
            let raw = s.api(subject, body).await;
            assert_api_error(&raw, 404, 10059);
        }

        // Its subjects are free again.
        let err = send(&s, "gone.a", msg("x")).await.unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::StreamNotFound);
        let again = create(&s, stream_config("AGAIN", &["gone.>"])).await;
        assert_eq!(again.cached_info().state.messages, 0);
        assert_eq!(s.publish("gone.a", "y").await.stream, "AGAIN");
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_purge_all_filter_keep_sequence_and_deny_purge() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(&s, stream_config("PURGE", &["p.>"])).await;
        // Odd sequences on p.x, even on p.y.
        let messages: Vec<(&str, &str)> = (0..10)
            .map(|i| (if i % 2 == 0 { "p.x" } else { "p.y" }, "data"))
            .collect();
        s.publish_all(&messages).await;

        let r = stream.purge().filter("p.x").await.unwrap();
        assert_eq!((r.success, r.purged), (true, 5));
        let info = s.stream_info("PURGE").await;
        assert_eq!((info.state.messages, info.state.first_sequence), (5, 2));

        let r = stream.purge().filter("p.y").keep(2).await.unwrap();
        assert_eq!(r.purged, 3);
        let info = s.stream_info("PURGE").await;
        assert_eq!((info.state.messages, info.state.first_sequence), (2, 8));

        s.publish_n("p.z", 5).await; // 11..=15
                                     // Everything below 13.
        let r = stream.purge().sequence(13).await.unwrap();
        assert_eq!(r.purged, 4);
        let info = s.stream_info("PURGE").await;
        assert_eq!((info.state.messages, info.state.first_sequence), (3, 13));

        let r = stream.purge().keep(1).await.unwrap();
        assert_eq!(r.purged, 2);

        let r = stream.purge().await.unwrap();
        assert_eq!(r.purged, 1);
        let info = s.stream_info("PURGE").await;
        assert_eq!(
            (
                info.state.messages,
                info.state.first_sequence,
                info.state.last_sequence
            ),
            (0, 16, 15)
        );
        // Sequences go on after a purge.
        assert_eq!(s.publish("p.x", "after").await.sequence, 16);

        // keep and seq together are a bad request.
        let raw = s
            .api("STREAM.PURGE.PURGE", json!({"keep": 1, "seq": 3}))
            .await;
        assert_api_error(&raw, 400, 10003);

        // deny_purge: 10110.
        let denied = create(
            &s,
            StreamConfig {
                deny_purge: true,
                ..stream_config("NOPURGE", &["np.>"])
            },
        )
        .await;
        s.publish("np.a", "x").await;
        let err = denied.purge().await.unwrap_err();
        match err.kind() {
            PurgeErrorKind::JetStream(e) => assert_eq!(kind_code(&e), 10110, "{e}"),
            other => panic!("unexpected error kind {other:?}"),
        }
        assert_eq!(s.stream_info("NOPURGE").await.state.messages, 1);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_names_and_list_with_subject_filter() {
    within("the test", async {
        let s = JsServer::start().await;
        create(&s, stream_config("ALPHA", &["alpha.>"])).await;
        create(&s, stream_config("BETA", &["beta.*", "shared.beta"])).await;
        create(&s, stream_config("GAMMA", &["gamma"])).await;

        let mut names: Vec<String> = s.js.stream_names().try_collect().await.unwrap();
        names.sort();
        assert_eq!(names, vec!["ALPHA", "BETA", "GAMMA"]);
        let infos: Vec<jetstream::stream::Info> = s.js.streams().try_collect().await.unwrap();
        let mut listed: Vec<String> = infos.iter().map(|i| i.config.name.clone()).collect();
        listed.sort();
        assert_eq!(listed, names);

        // By subject (async-nats asks STREAM.NAMES with a subject filter).
        assert_eq!(s.js.stream_by_subject("beta.x").await.unwrap(), "BETA");
        assert_eq!(
            s.js.stream_by_subject("alpha.one.two").await.unwrap(),
            "ALPHA"
        );
        assert_eq!(s.js.stream_by_subject("shared.beta").await.unwrap(), "BETA");
        let err = s.js.stream_by_subject("delta").await.unwrap_err();
        assert_eq!(err.kind(), GetStreamByNameErrorKind::NotFound);

        // A wildcard filter selects every stream it overlaps.
        let raw = s.api("STREAM.NAMES", json!({"subject": "*.x"})).await;
        assert_eq!(raw["streams"], json!(["ALPHA", "BETA"]), "{raw}");
        assert_eq!(raw["total"], 2, "{raw}");
        let raw = s.api("STREAM.LIST", json!({"subject": "gamma"})).await;
        assert_eq!(raw["total"], 1, "{raw}");
        assert_eq!(raw["streams"][0]["config"]["name"], "GAMMA", "{raw}");
        assert_eq!(
            raw["type"], "io.nats.jetstream.api.v1.stream_list_response",
            "{raw}"
        );
        // Paging.
        let raw = s.api("STREAM.NAMES", json!({"offset": 1})).await;
        assert_eq!(raw["streams"], json!(["BETA", "GAMMA"]), "{raw}");
        assert_eq!(
            (raw["total"].as_u64(), raw["offset"].as_u64()),
            (Some(3), Some(1))
        );
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_get_by_sequence_and_by_subject() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(&s, stream_config("GET", &["get.>"])).await;
        s.publish("get.a", "first").await;
        send(&s, "get.a", msg("second").header("X-Trace", "abc"))
            .await
            .unwrap();
        s.publish("get.b", "third").await;

        let m = stream.get_raw_message(2).await.unwrap();
        assert_eq!((m.subject.as_str(), m.sequence), ("get.a", 2));
        assert_eq!(&m.payload[..], b"second");
        assert_eq!(m.headers.get("X-Trace").map(|v| v.as_str()), Some("abc"));
        let m = stream
            .get_last_raw_message_by_subject("get.a")
            .await
            .unwrap();
        assert_eq!((m.sequence, &m.payload[..]), (2, &b"second"[..]));
        let m = stream
            .get_last_raw_message_by_subject("get.*")
            .await
            .unwrap();
        assert_eq!(m.sequence, 3);
        let m = stream
            .get_next_raw_message_by_subject("get.a")
            .await
            .unwrap();
        assert_eq!(m.sequence, 1);
        let m = stream
            .get_first_raw_message_by_subject("get.a", 2)
            .await
            .unwrap();
        assert_eq!(m.sequence, 2);

        // The wire format: base64 data, RFC 3339 time.
        let raw = s.api("STREAM.MSG.GET.GET", json!({"seq": 1})).await;
        assert_eq!(raw["message"]["subject"], "get.a", "{raw}");
        assert_eq!(raw["message"]["seq"], 1, "{raw}");
        assert_eq!(raw["message"]["data"], "Zmlyc3Q=", "{raw}");
        assert!(raw["message"]["time"].as_str().is_some(), "{raw}");
        assert!(raw["message"].get("hdrs").is_none(), "{raw}");
        assert_eq!(
            raw["type"], "io.nats.jetstream.api.v1.stream_msg_get_response",
            "{raw}"
        );

        // Not there: 10037.
        let err = stream.get_raw_message(99).await.unwrap_err();
        assert_eq!(err.kind(), RawMessageErrorKind::NoMessageFound);
        let err = stream
            .get_last_raw_message_by_subject("get.c")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), LastRawMessageErrorKind::NoMessageFound);
        let raw = s.api("STREAM.MSG.GET.GET", json!({"seq": 99})).await;
        assert_api_error(&raw, 404, 10037);
        // Neither a sequence nor a subject: bad request.
        let raw = s.api("STREAM.MSG.GET.GET", json!({})).await;
        assert_api_error(&raw, 400, 10003);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msg_delete_and_deny_delete() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(&s, stream_config("DEL", &["del.>"])).await;
        s.publish_n("del.x", 3).await;

        assert!(stream.delete_message(2).await.unwrap());
        let err = stream.get_raw_message(2).await.unwrap_err();
        assert_eq!(err.kind(), RawMessageErrorKind::NoMessageFound);
        let info = s.stream_info("DEL").await;
        assert_eq!(
            (
                info.state.messages,
                info.state.first_sequence,
                info.state.last_sequence,
                info.state.deleted_count
            ),
            (2, 1, 3, Some(1))
        );
        // Deleting it again: sequence not found, 10043 (as nats-server).
        let err = stream.delete_message(2).await.unwrap_err();
        match err.kind() {
            DeleteMessageErrorKind::JetStream(e) => assert_eq!(kind_code(&e), 10043, "{e}"),
            other => panic!("unexpected error kind {other:?}"),
        }
        let raw = s.api("STREAM.MSG.DELETE.DEL", json!({"seq": 2})).await;
        assert_api_error(&raw, 400, 10043);
        let raw = s.api("STREAM.MSG.DELETE.DEL", json!({"seq": 1})).await;
        assert_eq!(raw["success"], true, "{raw}");
        let info = s.stream_info("DEL").await;
        assert_eq!((info.state.messages, info.state.first_sequence), (1, 3));

        // deny_delete: 10057, and the message stays.
        let kept = create(
            &s,
            StreamConfig {
                deny_delete: true,
                ..stream_config("KEEP", &["keep.>"])
            },
        )
        .await;
        s.publish("keep.a", "x").await;
        let err = kept.delete_message(1).await.unwrap_err();
        match err.kind() {
            DeleteMessageErrorKind::JetStream(e) => assert_eq!(kind_code(&e), 10057, "{e}"),
            other => panic!("unexpected error kind {other:?}"),
        }
        assert_eq!(kept.get_raw_message(1).await.unwrap().sequence, 1);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_get_by_sequence_and_by_subject() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(
            &s,
            StreamConfig {
                allow_direct: true,
                ..stream_config("DIRECT", &["dg.>"])
            },
        )
        .await;
        s.publish("dg.a", "a1").await;
        send(&s, "dg.b", msg("b1").header("X-K", "v"))
            .await
            .unwrap();
        s.publish("dg.a", "a2").await;

        let m = stream.direct_get(2).await.unwrap();
        assert_eq!((m.subject.as_str(), m.sequence), ("dg.b", 2));
        assert_eq!(&m.payload[..], b"b1");
        assert_eq!(m.headers.get("X-K").map(|v| v.as_str()), Some("v"));
        assert_eq!(
            m.headers.get("Nats-Stream").map(|v| v.as_str()),
            Some("DIRECT")
        );
        let m = stream.direct_get_last_for_subject("dg.a").await.unwrap();
        assert_eq!((m.sequence, &m.payload[..]), (3, &b"a2"[..]));
        let m = stream.direct_get_first_for_subject("dg.a").await.unwrap();
        assert_eq!(m.sequence, 1);
        let m = stream
            .direct_get_next_for_subject("dg.a", Some(2))
            .await
            .unwrap();
        assert_eq!(m.sequence, 3);

        // Not there: a 404 status, which async-nats reports as NotFound.
        let err = stream.direct_get(9).await.unwrap_err();
        assert_eq!(err.kind(), DirectGetErrorKind::NotFound);
        let err = stream
            .direct_get_last_for_subject("dg.zzz")
            .await
            .unwrap_err();
        assert_eq!(err.kind(), DirectGetErrorKind::NotFound);
        let reply = within(
            "a direct get reply",
            s.client.request(
                "$JS.API.DIRECT.GET.DIRECT",
                Bytes::from_static(br#"{"seq":9}"#),
            ),
        )
        .await
        .unwrap();
        assert_eq!(reply.status, Some(StatusCode::NOT_FOUND));

        // Without allow_direct nothing answers (no responders), as with
        // nats-server; the same for a stream that does not exist.
        let plain = create(&s, stream_config("PLAIN", &["plain.>"])).await;
        s.publish("plain.a", "x").await;
        let err = plain.direct_get(1).await.unwrap_err();
        assert!(
            matches!(
                err.kind(),
                DirectGetErrorKind::ErrorResponse(StatusCode::NO_RESPONDERS, _)
            ),
            "{err:?}"
        );
        let missing = s.js.get_stream_no_info("MISSING").await.unwrap();
        let err = missing.direct_get(1).await.unwrap_err();
        assert!(
            matches!(
                err.kind(),
                DirectGetErrorKind::ErrorResponse(StatusCode::NO_RESPONDERS, _)
            ),
            "{err:?}"
        );
        // Turning allow_direct on by update enables it.
        s.js.update_stream(StreamConfig {
            allow_direct: true,
            ..stream_config("PLAIN", &["plain.>"])
        })
        .await
        .unwrap();
        assert_eq!(plain.direct_get(1).await.unwrap().sequence, 1);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_acks_and_msg_id_dedup_within_the_window() {
    within("the test", async {
        let s = JsServer::start().await;
        let info = create(
            &s,
            StreamConfig {
                duplicate_window: Duration::from_secs(2),
                ..stream_config("DEDUP", &["dd.>"])
            },
        )
        .await
        .cached_info()
        .clone();
        assert_eq!(info.config.duplicate_window, Duration::from_secs(2));

        let ack = s.publish("dd.a", "x").await;
        assert_eq!(
            (ack.stream.as_str(), ack.sequence, ack.duplicate),
            ("DEDUP", 1, false)
        );
        let first = send(&s, "dd.a", msg("x").message_id("m-1")).await.unwrap();
        assert_eq!((first.sequence, first.duplicate), (2, false));
        let again = send(&s, "dd.a", msg("x").message_id("m-1")).await.unwrap();
        assert_eq!(
            (again.stream.as_str(), again.sequence, again.duplicate),
            ("DEDUP", 2, true)
        );
        // The id alone decides, whatever the subject.
        let other_subject = send(&s, "dd.c", msg("y").message_id("m-1")).await.unwrap();
        assert_eq!((other_subject.sequence, other_subject.duplicate), (2, true));
        let second = send(&s, "dd.b", msg("x").message_id("m-2")).await.unwrap();
        assert_eq!((second.sequence, second.duplicate), (3, false));
        assert_eq!(s.stream_info("DEDUP").await.state.messages, 3);

        // After the window the same id is a new message.
        tokio::time::sleep(Duration::from_millis(2300)).await;
        let later = send(&s, "dd.a", msg("x").message_id("m-1")).await.unwrap();
        assert_eq!((later.sequence, later.duplicate), (4, false));
        let dup = send(&s, "dd.a", msg("x").message_id("m-1")).await.unwrap();
        assert_eq!((dup.sequence, dup.duplicate), (4, true));
        assert_eq!(s.stream_info("DEDUP").await.state.messages, 4);

        // The wire format of a duplicate's PubAck.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", "m-1");
        let reply = within(
            "a PubAck",
            s.client
                .request_with_headers("dd.b", headers, Bytes::from_static(b"x")),
        )
        .await
        .unwrap();
        let raw: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(raw, json!({"stream": "DEDUP", "seq": 4, "duplicate": true}));
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expected_headers_are_accepted_and_refused() {
    within("the test", async {
        let s = JsServer::start().await;
        create(&s, stream_config("EXP", &["exp.>"])).await;
        s.publish("exp.a", "1").await;
        s.publish("exp.b", "2").await;

        // Nats-Expected-Stream
        let ok = send(&s, "exp.a", msg("3").expected_stream("EXP"))
            .await
            .unwrap();
        assert_eq!(ok.sequence, 3);
        let err = send(&s, "exp.a", msg("x").expected_stream("OTHER"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::Other);
        assert_eq!(code_in(&err), Some(10060), "{err}");

        // Nats-Expected-Last-Sequence
        let ok = send(&s, "exp.a", msg("4").expected_last_sequence(3))
            .await
            .unwrap();
        assert_eq!(ok.sequence, 4);
        let err = send(&s, "exp.a", msg("x").expected_last_sequence(3))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::WrongLastSequence);
        assert_eq!(code_in(&err), Some(10071), "{err}");

        // Nats-Expected-Last-Subject-Sequence
        let ok = send(&s, "exp.b", msg("5").expected_last_subject_sequence(2))
            .await
            .unwrap();
        assert_eq!(ok.sequence, 5);
        let err = send(&s, "exp.b", msg("x").expected_last_subject_sequence(2))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::WrongLastSequence);
        assert_eq!(code_in(&err), Some(10071), "{err}");
        // 0: the subject must have no message yet.
        let ok = send(&s, "exp.new", msg("6").expected_last_subject_sequence(0))
            .await
            .unwrap();
        assert_eq!(ok.sequence, 6);

        // Nats-Expected-Last-Msg-Id
        let ok = send(&s, "exp.a", msg("7").message_id("id-1"))
            .await
            .unwrap();
        assert_eq!(ok.sequence, 7);
        let ok = send(
            &s,
            "exp.a",
            msg("8").message_id("id-2").expected_last_message_id("id-1"),
        )
        .await
        .unwrap();
        assert_eq!(ok.sequence, 8);
        let err = send(&s, "exp.a", msg("x").expected_last_message_id("id-1"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), PublishErrorKind::WrongLastMessageId);
        assert_eq!(code_in(&err), Some(10070), "{err}");

        // Refused publishes were not stored.
        let info = s.stream_info("EXP").await;
        assert_eq!((info.state.messages, info.state.last_sequence), (8, 8));
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_max_msgs_and_max_bytes_with_discard_old_and_new() {
    within("the test", async {
        let s = JsServer::start().await;

        // max_msgs, discard old: the oldest go.
        create(
            &s,
            StreamConfig {
                max_messages: 3,
                ..stream_config("MOLD", &["mold"])
            },
        )
        .await;
        s.publish_n("mold", 5).await;
        let info = s.stream_info("MOLD").await;
        assert_eq!(
            (
                info.state.messages,
                info.state.first_sequence,
                info.state.last_sequence
            ),
            (3, 3, 5)
        );

        // max_msgs, discard new: the new one is refused.
        create(
            &s,
            StreamConfig {
                max_messages: 3,
                discard: DiscardPolicy::New,
                ..stream_config("MNEW", &["mnew"])
            },
        )
        .await;
        s.publish_n("mnew", 3).await;
        let err = send(&s, "mnew", msg("4")).await.unwrap_err();
        let api = common::jetstream::api_error_in(&err).expect("an API error");
        assert_eq!(api.error_code().0, 10077, "{api}");
        assert!(
            api.to_string().contains("maximum messages exceeded"),
            "{api}"
        );
        let info = s.stream_info("MNEW").await;
        assert_eq!((info.state.messages, info.state.last_sequence), (3, 3));

        // max_bytes: each message is 4 + 10 + 16 = 30 bytes; 100 hold three.
        create(
            &s,
            StreamConfig {
                max_bytes: 100,
                ..stream_config("BOLD", &["bold"])
            },
        )
        .await;
        for _ in 0..5 {
            s.publish("bold", "0123456789").await;
        }
        let info = s.stream_info("BOLD").await;
        assert_eq!(
            (
                info.state.messages,
                info.state.bytes,
                info.state.first_sequence
            ),
            (3, 90, 3)
        );
        create(
            &s,
            StreamConfig {
                max_bytes: 100,
                discard: DiscardPolicy::New,
                ..stream_config("BNEW", &["bnew"])
            },
        )
        .await;
        for _ in 0..3 {
            s.publish("bnew", "0123456789").await;
        }
        let err = send(&s, "bnew", msg("0123456789")).await.unwrap_err();
        let api = common::jetstream::api_error_in(&err).expect("an API error");
        assert_eq!(api.error_code().0, 10077, "{api}");
        assert!(api.to_string().contains("maximum bytes exceeded"), "{api}");
        let info = s.stream_info("BNEW").await;
        assert_eq!((info.state.messages, info.state.bytes), (3, 90));
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_per_subject_message_size_and_age() {
    within("the test", async {
        let s = JsServer::start().await;

        // max_msgs_per_subject
        let per = create(
            &s,
            StreamConfig {
                max_messages_per_subject: 2,
                ..stream_config("PERSUBJ", &["ps.*"])
            },
        )
        .await;
        s.publish_all(&[("ps.a", "1"), ("ps.a", "2"), ("ps.a", "3"), ("ps.b", "4")])
            .await;
        let info = s.stream_info("PERSUBJ").await;
        assert_eq!((info.state.messages, info.state.first_sequence), (3, 2));
        let err = per.get_raw_message(1).await.unwrap_err();
        assert_eq!(err.kind(), RawMessageErrorKind::NoMessageFound);

        // max_msg_size: headers + data.
        create(
            &s,
            StreamConfig {
                max_message_size: 10,
                ..stream_config("SIZE", &["size"])
            },
        )
        .await;
        assert_eq!(s.publish("size", "0123456789").await.sequence, 1);
        let err = send(&s, "size", msg("0123456789a")).await.unwrap_err();
        assert_eq!(code_in(&err), Some(10054), "{err}");
        assert_eq!(s.stream_info("SIZE").await.state.messages, 1);

        // max_age: messages go once older; the duplicate window follows.
        let age = create(
            &s,
            StreamConfig {
                max_age: Duration::from_millis(500),
                ..stream_config("AGE", &["age"])
            },
        )
        .await;
        let config = &age.cached_info().config;
        assert_eq!(config.max_age, Duration::from_millis(500));
        assert_eq!(config.duplicate_window, Duration::from_millis(500));
        let seqs = s.publish_n("age", 3).await;
        assert_eq!(seqs, vec![1, 2, 3]);
        eventually(
            "messages older than max_age are removed",
            SETTLE,
            || async {
                let st = s.stream_info("AGE").await.state;
                (st.messages == 0).then_some(st)
            },
        )
        .await;
        let info = s.stream_info("AGE").await;
        assert_eq!(
            (info.state.first_sequence, info.state.last_sequence),
            (4, 3)
        );
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workqueue_removes_acked_messages_and_restricts_consumers() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(
            &s,
            StreamConfig {
                retention: RetentionPolicy::WorkQueue,
                ..stream_config("WQ", &["wq.>"])
            },
        )
        .await;
        let worker = stream
            .create_consumer(pull::Config {
                durable_name: Some("worker".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        s.publish_n("wq.job", 3).await;
        let jobs = fetch(&worker, 10).await;
        assert_eq!(seqs(&jobs), vec![1, 2, 3]);
        ack_sync(&jobs[0]).await;
        ack_sync(&jobs[1]).await;
        eventually("acked jobs are removed", SETTLE, || async {
            let st = s.stream_info("WQ").await.state;
            (st.messages == 1).then_some(())
        })
        .await;
        ack_sync(&jobs[2]).await;
        eventually("all jobs are removed", SETTLE, || async {
            let st = s.stream_info("WQ").await.state;
            (st.messages == 0 && st.first_sequence == 4).then_some(())
        })
        .await;

        let refused = |config: pull::Config| {
            let stream = &stream;
            async move {
                let err = stream.create_consumer(config).await.unwrap_err();
                match err.kind() {
                    jetstream::stream::ConsumerErrorKind::JetStream(e) => e.error_code().0,
                    other => panic!("unexpected error kind {other:?}"),
                }
            }
        };
        // A second unfiltered consumer: 10099.
        let code = refused(pull::Config {
            durable_name: Some("second".into()),
            ..Default::default()
        })
        .await;
        assert_eq!(code, 10099);
        // Not explicit ack: 10098; not deliver all: 10101.
        let code = refused(pull::Config {
            durable_name: Some("noack".into()),
            filter_subject: "wq.other".into(),
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await;
        assert_eq!(code, 10098);
        let code = refused(pull::Config {
            durable_name: Some("new".into()),
            filter_subject: "wq.other".into(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await;
        assert_eq!(code, 10101);

        // Filtered consumers must not overlap: 10100.
        stream.delete_consumer("worker").await.unwrap();
        for (name, filter) in [("eu", "wq.eu.>"), ("us", "wq.us.>")] {
            stream
                .create_consumer(pull::Config {
                    durable_name: Some(name.into()),
                    filter_subject: filter.into(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let code = refused(pull::Config {
            durable_name: Some("eu-x".into()),
            filter_subject: "wq.eu.x".into(),
            ..Default::default()
        })
        .await;
        assert_eq!(code, 10100);
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_removes_messages_once_every_interested_consumer_acked() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(
            &s,
            StreamConfig {
                retention: RetentionPolicy::Interest,
                ..stream_config("INT", &["int.>"])
            },
        )
        .await;
        let mut consumers = Vec::new();
        for (name, filter) in [("a", ""), ("b", ""), ("other", "int.other")] {
            consumers.push(
                stream
                    .create_consumer(pull::Config {
                        durable_name: Some(name.into()),
                        filter_subject: filter.into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap(),
            );
        }
        s.publish_n("int.x", 2).await;

        let from_a = fetch(&consumers[0], 10).await;
        assert_eq!(seqs(&from_a), vec![1, 2]);
        for m in &from_a {
            ack_sync(m).await;
        }
        // b has not acked yet; "other" does not want int.x.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(s.stream_info("INT").await.state.messages, 2);

        let from_b = fetch(&consumers[1], 10).await;
        assert_eq!(seqs(&from_b), vec![1, 2]);
        ack_sync(&from_b[0]).await;
        eventually("message 1 is removed", SETTLE, || async {
            let st = s.stream_info("INT").await.state;
            (st.messages == 1 && st.first_sequence == 2).then_some(())
        })
        .await;
        ack_sync(&from_b[1]).await;
        eventually("message 2 is removed", SETTLE, || async {
            (s.stream_info("INT").await.state.messages == 0).then_some(())
        })
        .await;
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_keeps_nothing_nobody_wants() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(
            &s,
            StreamConfig {
                retention: RetentionPolicy::Interest,
                ..stream_config("NOINT", &["noint.>"])
            },
        )
        .await;
        // No consumer yet: acknowledged, sequence used, nothing kept.
        assert_eq!(s.publish_n("noint.x", 2).await, vec![1, 2]);
        let st = s.stream_info("NOINT").await.state;
        assert_eq!((st.messages, st.last_sequence), (0, 2));
        stream
            .create_consumer(pull::Config {
                durable_name: Some("only-y".into()),
                filter_subject: "noint.y".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(s.publish_n("noint.x", 1).await, vec![3]);
        assert_eq!(s.publish_n("noint.y", 1).await, vec![4]);
        let st = s.stream_info("NOINT").await.state;
        assert_eq!((st.messages, st.first_sequence), (1, 4));
        s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_storage_stores_serves_and_consumes() {
    within("the test", async {
        let s = JsServer::start().await;
        let stream = create(
            &s,
            StreamConfig {
                storage: StorageType::Memory,
                allow_direct: true,
                ..stream_config("MEMS", &["mems.>"])
            },
        )
        .await;
        assert_eq!(stream.cached_info().config.storage, StorageType::Memory);
        assert_eq!(s.publish_n("mems.a", 3).await, vec![1, 2, 3]);
        let info = s.stream_info("MEMS").await;
        assert_eq!(info.config.storage, StorageType::Memory);
        assert_eq!(info.state.messages, 3);
        assert_eq!(
            &stream.get_raw_message(2).await.unwrap().payload[..],
            b"mems.a 2"
        );
        assert_eq!(
            &stream.direct_get(3).await.unwrap().payload[..],
            b"mems.a 3"
        );

        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("c".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        let got = fetch(&consumer, 10).await;
        assert_eq!(seqs(&got), vec![1, 2, 3]);
        for m in &got {
            ack_sync(m).await;
        }
        let info = s.consumer_info("MEMS", "c").await;
        assert_eq!(
            (info.ack_floor.stream_sequence, info.num_ack_pending),
            (3, 0)
        );

        assert!(stream.delete_message(1).await.unwrap());
        assert_eq!(stream.purge().await.unwrap().purged, 2);
        let account = s.js.query_account().await.unwrap();
        assert_eq!((account.memory, account.storage), (0, 0));
        s.shutdown().await;
    })
    .await
}
