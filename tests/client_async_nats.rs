//! The server driven by a real NATS client library (async-nats): if these
//! pass, applications written against nats-server work against Skiff.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use common::{nats, nats_with, next_msg, round_trip, start, start_with, wait_for_clients, within};
use futures::{FutureExt, StreamExt};

/// Messages already delivered to `sub`'s channel, without waiting. (Outside
/// tokio's cooperative budget, which would otherwise make a long run of ready
/// messages look pending.)
fn ready_messages(sub: &mut async_nats::Subscriber) -> Vec<async_nats::Message> {
    let mut out = Vec::new();
    while let Some(Some(msg)) = tokio::task::unconstrained(sub.next()).now_or_never() {
        out.push(msg);
    }
    out
}

/// Receives from `sub` until a message with payload `end`, returning the
/// payloads before it.
async fn payloads_until(sub: &mut async_nats::Subscriber, end: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let msg = next_msg(sub).await;
        let text = String::from_utf8(msg.payload.to_vec()).unwrap();
        if text == end {
            return out;
        }
        out.push(text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_a_subscriber_on_another_connection() {
    let server = start().await;
    let subscriber = nats(&server).await;
    let publisher = nats(&server).await;
    let mut sub = subscriber.subscribe("greet.joe").await.unwrap();
    round_trip(&subscriber).await;

    publisher
        .publish("greet.joe", "hello".into())
        .await
        .unwrap();
    let msg = next_msg(&mut sub).await;
    assert_eq!(msg.subject.as_str(), "greet.joe");
    assert_eq!(&msg.payload[..], b"hello");
    assert!(msg.reply.is_none());
    assert!(msg.headers.is_none());

    // An empty payload is a message too.
    publisher.publish("greet.joe", Bytes::new()).await.unwrap();
    let msg = next_msg(&mut sub).await;
    assert!(msg.payload.is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_match_one_token_or_the_tail() {
    let server = start().await;
    let client = nats(&server).await;
    let mut star = client.subscribe("foo.*").await.unwrap();
    let mut tail = client.subscribe("foo.>").await.unwrap();
    let mut mid = client.subscribe("*.bar.*").await.unwrap();
    let mut all = client.subscribe(">").await.unwrap();
    // One connection: its SUBs are processed before its PUBs.

    for subject in [
        "foo",
        "foo.bar",
        "foo.bar.baz",
        "bar.foo",
        "x.bar.y",
        "foo.bar.y",
        "x.bar",
        "x.bar.y.z",
    ] {
        client.publish(subject, subject.into()).await.unwrap();
    }
    // One sentinel that every subscription matches marks the end: anything
    // (wrongly) delivered would have arrived before it.
    client.publish("end.bar.end", "END".into()).await.unwrap();
    client.publish("foo.end", "END".into()).await.unwrap();

    assert_eq!(payloads_until(&mut star, "END").await, ["foo.bar"]);
    assert_eq!(
        payloads_until(&mut tail, "END").await,
        ["foo.bar", "foo.bar.baz", "foo.bar.y"]
    );
    assert_eq!(
        payloads_until(&mut mid, "END").await,
        ["foo.bar.baz", "x.bar.y", "foo.bar.y"]
    );
    assert_eq!(
        payloads_until(&mut all, "END").await,
        [
            "foo",
            "foo.bar",
            "foo.bar.baz",
            "bar.foo",
            "x.bar.y",
            "foo.bar.y",
            "x.bar",
            "x.bar.y.z"
        ]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_delivers_each_message_once_spread_over_members() {
    const MEMBERS: usize = 3;
    const MESSAGES: usize = 300;
    let server = start().await;
    let publisher = nats(&server).await;
    let mut plain = publisher.subscribe("jobs").await.unwrap();
    let mut members = Vec::new();
    for _ in 0..MEMBERS {
        let client = nats(&server).await;
        let queue = client
            .queue_subscribe("jobs", "workers".into())
            .await
            .unwrap();
        let done = client.subscribe("jobs.done").await.unwrap();
        round_trip(&client).await;
        members.push((client, queue, done));
    }

    for i in 0..MESSAGES {
        publisher
            .publish("jobs", i.to_string().into())
            .await
            .unwrap();
    }
    publisher.publish("jobs.done", "".into()).await.unwrap();

    // A plain subscriber beside the group gets every message.
    for i in 0..MESSAGES {
        assert_eq!(next_msg(&mut plain).await.payload, i.to_string());
    }

    let mut seen = BTreeSet::new();
    let mut total = 0;
    for (_client, queue, done) in &mut members {
        // `jobs.done` was published last: once a member has it, every job
        // routed to that member is already in its queue subscription.
        next_msg(done).await;
        let got = ready_messages(queue);
        assert!(
            !got.is_empty(),
            "a member of the group received nothing: not spread"
        );
        total += got.len();
        for msg in got {
            let i: usize = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
            assert!(seen.insert(i), "message {i} delivered twice");
        }
    }
    assert_eq!(total, MESSAGES);
    assert_eq!(seen, (0..MESSAGES).collect());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_member_that_disconnects_gets_no_more_and_nothing_is_lost() {
    let server = start().await;
    let publisher = nats(&server).await;
    let leaving = nats(&server).await;
    let staying = nats(&server).await;
    let _gone = leaving
        .queue_subscribe("tasks", "workers".into())
        .await
        .unwrap();
    let mut stays = staying
        .queue_subscribe("tasks", "workers".into())
        .await
        .unwrap();
    round_trip(&leaving).await;
    round_trip(&staying).await;
    wait_for_clients(&server, 3).await;

    drop(_gone);
    drop(leaving);
    // Once the server has dropped the client, its subscriptions are gone.
    wait_for_clients(&server, 2).await;
    for i in 0..50 {
        publisher
            .publish("tasks", i.to_string().into())
            .await
            .unwrap();
    }
    for i in 0..50 {
        assert_eq!(next_msg(&mut stays).await.payload, i.to_string());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_gets_the_reply_of_a_responder() {
    let server = start().await;
    let responder = nats(&server).await;
    let mut requests = responder.subscribe("svc.upper").await.unwrap();
    round_trip(&responder).await;
    let service = tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            let reply = msg.reply.expect("request carries a reply subject");
            let upper = String::from_utf8(msg.payload.to_vec())
                .unwrap()
                .to_uppercase();
            responder.publish(reply, upper.into()).await.unwrap();
        }
    });

    let requester = nats(&server).await;
    let replies = futures::future::join_all((0..20).map(|i| {
        let requester = requester.clone();
        async move {
            requester
                .request("svc.upper", format!("req {i}").into())
                .await
        }
    }));
    let replies = within("20 replies", replies).await;
    for (i, reply) in replies.into_iter().enumerate() {
        assert_eq!(reply.unwrap().payload, format!("REQ {i}"));
    }
    service.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_without_responders_fails_fast_with_no_responders() {
    let server = start().await;
    // A long request timeout: only the server's 503 can end the request
    // quickly.
    let client = nats_with(
        &server,
        async_nats::ConnectOptions::new().request_timeout(Some(Duration::from_secs(60))),
    )
    .await;
    let started = Instant::now();
    let err = within(
        "the no-responders answer",
        client.request("nobody.home", "anyone?".into()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));

    // With headers too, and the connection stays usable.
    let mut headers = HeaderMap::new();
    headers.insert("X-Try", "2");
    let err = within(
        "the no-responders answer",
        client.request_with_headers("nobody.home", headers, "".into()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders, "{err}");
    round_trip(&client).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_round_trip() {
    let server = start().await;
    let client = nats(&server).await;
    let mut sub = client.subscribe("with.headers").await.unwrap();
    round_trip(&client).await;

    let mut headers = HeaderMap::new();
    headers.insert("Trace-Id", "abc-123");
    headers.append("Multi", "one");
    headers.append("Multi", "two");
    client
        .publish_with_headers("with.headers", headers.clone(), "body".into())
        .await
        .unwrap();
    let msg = next_msg(&mut sub).await;
    assert_eq!(&msg.payload[..], b"body");
    let got = msg.headers.expect("headers delivered");
    assert_eq!(got.get("Trace-Id").map(|v| v.as_str()), Some("abc-123"));
    let multi: Vec<&str> = got.get_all("Multi").map(|v| v.as_str()).collect::<Vec<_>>();
    assert_eq!(multi, ["one", "two"]);
    assert_eq!(got, headers);
    assert!(msg.status.is_none());

    // Headers with an empty payload, and a request/reply with headers.
    client
        .publish_with_headers("with.headers", headers.clone(), Bytes::new())
        .await
        .unwrap();
    let msg = next_msg(&mut sub).await;
    assert!(msg.payload.is_empty());
    assert_eq!(msg.headers.as_ref(), Some(&headers));

    let responder = nats(&server).await;
    let mut requests = responder.subscribe("svc.headers").await.unwrap();
    round_trip(&responder).await;
    let service = tokio::spawn(async move {
        let msg = requests.next().await.unwrap();
        let mut reply_headers = HeaderMap::new();
        let echoed = msg.headers.unwrap().get("Ask").unwrap().to_string();
        reply_headers.insert("Answer", echoed.as_str());
        responder
            .publish_with_headers(msg.reply.unwrap(), reply_headers, "ok".into())
            .await
            .unwrap();
        // Dropping a client does not flush what it has not yet written.
        responder.flush().await.unwrap();
    });
    let mut ask = HeaderMap::new();
    ask.insert("Ask", "42");
    let reply = within(
        "a reply with headers",
        client.request_with_headers("svc.headers", ask, "?".into()),
    )
    .await
    .unwrap();
    assert_eq!(
        reply.headers.unwrap().get("Answer").map(|v| v.as_str()),
        Some("42")
    );
    service.await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_more_than_max_payload_is_refused() {
    let server = start_with(|c| c.max_payload = 1024).await;
    let client = nats(&server).await;
    // The client learns the limit from INFO.
    assert_eq!(client.server_info().max_payload, 1024);
    assert_eq!(client.max_payload(), 1024);
    let mut sub = client.subscribe("big").await.unwrap();
    round_trip(&client).await;

    let err = client
        .publish("big", vec![b'x'; 1025].into())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), async_nats::PublishErrorKind::MaxPayloadExceeded);

    // Headers count against the limit.
    let mut headers = HeaderMap::new();
    headers.insert("Pad", "y".repeat(64).as_str());
    let err = client
        .publish_with_headers("big", headers, vec![b'x'; 1000].into())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), async_nats::PublishErrorKind::MaxPayloadExceeded);

    let err = client
        .request("big", vec![b'x'; 2000].into())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::MaxPayloadExceeded);

    // Exactly the limit passes, and the connection is still fine.
    client
        .publish("big", vec![b'x'; 1024].into())
        .await
        .unwrap();
    let msg = next_msg(&mut sub).await;
    assert_eq!(msg.payload.len(), 1024);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_arrive_in_publish_order() {
    const N: usize = 10_000;
    let server = start().await;
    let subscriber = nats(&server).await;
    let mut sub = subscriber.subscribe("ordered").await.unwrap();
    round_trip(&subscriber).await;

    let publisher = nats(&server).await;
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            publisher
                .publish("ordered", i.to_string().into())
                .await
                .unwrap();
        }
        publisher.flush().await.unwrap();
        publisher
    });
    within("10,000 messages in order", async {
        for i in 0..N {
            let msg = sub.next().await.expect("subscription open");
            assert_eq!(msg.payload, i.to_string(), "message {i} out of order");
        }
    })
    .await;
    within("the publisher", publishing).await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    let server = start().await;
    let client = nats(&server).await;
    let mut sub = client.subscribe("u.x").await.unwrap();
    let mut other = client.subscribe("u.*").await.unwrap();
    round_trip(&client).await;

    client.publish("u.x", "1".into()).await.unwrap();
    assert_eq!(next_msg(&mut sub).await.payload, "1");
    assert_eq!(next_msg(&mut other).await.payload, "1");

    sub.unsubscribe().await.unwrap();
    client.publish("u.x", "2".into()).await.unwrap();
    assert_eq!(next_msg(&mut other).await.payload, "2");
    assert!(within("the subscription to end", sub.next())
        .await
        .is_none());

    // The server really dropped it: once the last subscription on the subject
    // is gone, a request to it gets no responders.
    other.unsubscribe().await.unwrap();
    let err = within("no responders", client.request("u.x", "?".into()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_unsubscribe_delivers_exactly_n() {
    let server = start().await;
    let subscriber = nats(&server).await;
    let mut sub = subscriber.subscribe("auto").await.unwrap();
    sub.unsubscribe_after(3).await.unwrap();
    round_trip(&subscriber).await;

    let publisher = nats(&server).await;
    for i in 0..10 {
        publisher
            .publish("auto", i.to_string().into())
            .await
            .unwrap();
    }
    let got: Vec<Bytes> = within(
        "three messages then the end",
        sub.map(|m| m.payload).collect(),
    )
    .await;
    assert_eq!(got, ["0", "1", "2"]);

    // The server removed the subscription after the third message.
    let err = within("no responders", publisher.request("auto", "?".into()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_echo_client_does_not_receive_its_own_messages() {
    let server = start().await;
    let quiet = nats_with(&server, async_nats::ConnectOptions::new().no_echo()).await;
    let other = nats(&server).await;
    let mut quiet_sub = quiet.subscribe("echo.test").await.unwrap();
    let mut other_sub = other.subscribe("echo.test").await.unwrap();
    // Make sure both subscriptions are in place (the no-echo client cannot
    // round-trip through itself, so it uses a request with no responders).
    let err = quiet.request("echo.sync", "".into()).await.unwrap_err();
    assert_eq!(err.kind(), RequestErrorKind::NoResponders);
    round_trip(&other).await;

    quiet
        .publish("echo.test", "from-quiet".into())
        .await
        .unwrap();
    // Once the other client has it, the server has routed it.
    assert_eq!(next_msg(&mut other_sub).await.payload, "from-quiet");
    other
        .publish("echo.test", "from-other".into())
        .await
        .unwrap();
    assert_eq!(next_msg(&mut other_sub).await.payload, "from-other");
    // The no-echo client's first message is the other's: its own was not
    // echoed back.
    assert_eq!(next_msg(&mut quiet_sub).await.payload, "from-other");
    assert!(ready_messages(&mut quiet_sub).is_empty());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_delivers_what_was_sent_then_closes() {
    let server = start().await;
    let subscriber = nats(&server).await;
    let sub = subscriber.subscribe("drain.me").await.unwrap();
    round_trip(&subscriber).await;
    let publisher = nats(&server).await;
    wait_for_clients(&server, 2).await;

    for i in 0..100 {
        publisher
            .publish("drain.me", i.to_string().into())
            .await
            .unwrap();
    }
    round_trip(&publisher).await;
    // The publisher's messages are queued to the subscriber before this
    // round trip's reply, so the subscriber's client has them all when it
    // returns.
    round_trip(&subscriber).await;

    subscriber.drain().await.unwrap();
    let got: Vec<Bytes> = within(
        "the drained subscription to end",
        sub.map(|m| m.payload).collect(),
    )
    .await;
    let expected: Vec<Bytes> = (0..100).map(|i| Bytes::from(i.to_string())).collect();
    assert_eq!(got, expected);

    // The drained client leaves; the publisher is unaffected.
    wait_for_clients(&server, 1).await;
    round_trip(&publisher).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_subscriptions_on_one_connection_all_receive() {
    const N: usize = 10_000;
    let server = start().await;
    let subscriber = nats(&server).await;
    let mut subs = Vec::with_capacity(N);
    for i in 0..N {
        subs.push(subscriber.subscribe(format!("many.{i}")).await.unwrap());
    }
    let mut everyone = Vec::with_capacity(N);
    for _ in 0..N {
        everyone.push(subscriber.subscribe("many.all").await.unwrap());
    }
    round_trip(&subscriber).await;

    let publisher = nats(&server).await;
    for i in 0..N {
        publisher
            .publish(format!("many.{i}"), i.to_string().into())
            .await
            .unwrap();
    }
    publisher.publish("many.all", "all".into()).await.unwrap();

    // Each subscription gets its own message, and only that one.
    let mut merged = futures::stream::select_all(subs.into_iter().map(|s| s.take(1)));
    let mut seen = HashSet::new();
    within("a message on each of 10,000 subjects", async {
        while let Some(msg) = merged.next().await {
            let i: usize = std::str::from_utf8(&msg.payload).unwrap().parse().unwrap();
            assert_eq!(msg.subject.as_str(), format!("many.{i}"));
            assert!(seen.insert(i), "subscription {i} got two messages");
            if seen.len() == N {
                break;
            }
        }
    })
    .await;
    assert_eq!(seen.len(), N);

    // One message on a subject 10,000 subscriptions share reaches each.
    within(
        "the shared message on each of 10,000 subscriptions",
        async {
            for sub in &mut everyone {
                assert_eq!(sub.next().await.unwrap().payload, "all");
            }
        },
    )
    .await;
    server.shutdown().await;
}
