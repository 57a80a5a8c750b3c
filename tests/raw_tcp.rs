//! What a telnet user sees: the protocol spoken by hand over TCP, asserting
//! the exact bytes the server sends back, its errors, and which errors close
//! the connection.

mod common;

use std::time::Duration;

use common::{read_until_closed, start, start_with, wait_for_clients, within, Raw};

const QUIET: &str = r#"{"verbose":false}"#;
const QUIET_HEADERS: &str = r#"{"verbose":false,"headers":true}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_is_the_first_line_with_the_expected_fields() {
    let server = start_with(|c| c.max_payload = 123_456).await;
    let (mut raw, info) = Raw::connect_info(server.addr()).await;

    let server_id = info["server_id"].as_str().expect("server_id is a string");
    assert!(!server_id.is_empty());
    assert!(
        info["version"]
            .as_str()
            .expect("version is a string")
            .starts_with("2."),
        "{info}"
    );
    assert_eq!(info["proto"], 1);
    assert_eq!(info["headers"], true);
    assert_eq!(info["max_payload"], 123_456);
    assert_eq!(info["client_ip"], "127.0.0.1");
    assert_eq!(info["port"], server.addr().port());
    let first_id = info["client_id"].as_u64().expect("client_id is a number");
    assert!(first_id > 0);

    // Every connection gets its own client id, from the same server.
    let (_other, other_info) = Raw::connect_info(server.addr()).await;
    assert_eq!(other_info["server_id"], server_id);
    assert_ne!(other_info["client_id"].as_u64().unwrap(), first_id);

    // Nothing else is sent before the client speaks.
    raw.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_gives_exactly_the_nats_bytes() {
    let server = start().await;
    let mut raw = Raw::connect_with(server.addr(), QUIET_HEADERS).await;
    raw.send(concat!(
        "SUB foo 1\r\n",
        "SUB foo.* workers 2\r\n",
        "PUB foo 5\r\nhello\r\n",
        "PUB foo.bar reply.to 2\r\nhi\r\n",
        "PUB foo 0\r\n\r\n",
        "HPUB foo 18 20\r\nNATS/1.0\r\nA: b\r\n\r\nhi\r\n",
        "HPUB foo r 18 20\r\nNATS/1.0\r\nA: b\r\n\r\nhi\r\n",
        "PONG\r\n",
        "PING\r\n",
    ))
    .await;
    raw.expect(concat!(
        "MSG foo 1 5\r\nhello\r\n",
        "MSG foo.bar 2 reply.to 2\r\nhi\r\n",
        "MSG foo 1 0\r\n\r\n",
        "HMSG foo 1 18 20\r\nNATS/1.0\r\nA: b\r\n\r\nhi\r\n",
        "HMSG foo 1 r 18 20\r\nNATS/1.0\r\nA: b\r\n\r\nhi\r\n",
        "PONG\r\n",
    ))
    .await;

    // UNSUB without max stops delivery at once; with max after that many in
    // total (sid 2 has had one message already).
    raw.send(concat!(
        "UNSUB 1\r\n",
        "PUB foo 1\r\nx\r\n",
        "UNSUB 2 3\r\n",
        "PUB foo.a 1\r\na\r\n",
        "PUB foo.b 1\r\nb\r\n",
        "PUB foo.c 1\r\nc\r\n",
        "PING\r\n",
    ))
    .await;
    raw.expect(concat!(
        "MSG foo.a 2 1\r\na\r\n",
        "MSG foo.b 2 1\r\nb\r\n",
        "PONG\r\n",
    ))
    .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsub_max_counts_messages_already_delivered() {
    let server = start().await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    raw.send("SUB s 7\r\nPUB s 1\r\n1\r\nPUB s 1\r\n2\r\nUNSUB 7 2\r\nPUB s 1\r\n3\r\nPING\r\n")
        .await;
    raw.expect("MSG s 7 1\r\n1\r\nMSG s 7 1\r\n2\r\nPONG\r\n")
        .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_stripped_for_a_subscriber_without_headers() {
    let server = start().await;
    let mut plain = Raw::connect_with(server.addr(), QUIET).await;
    plain.send("SUB foo 1\r\n").await;
    plain.ping_pong().await;
    let mut publisher = Raw::connect_with(server.addr(), QUIET_HEADERS).await;
    publisher
        .send("HPUB foo 18 20\r\nNATS/1.0\r\nA: b\r\n\r\nhi\r\n")
        .await;
    publisher.ping_pong().await;
    plain.expect("MSG foo 1 2\r\nhi\r\n").await;
    plain.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowercase_and_mixed_case_verbs_are_accepted() {
    let server = start().await;
    let mut raw = Raw::connect_info(server.addr()).await.0;
    raw.send(concat!(
        "connect {\"verbose\":false,\"headers\":true}\r\n",
        "sub foo 1\r\n",
        "pub foo 2\r\nhi\r\n",
        "hpub foo 12 14\r\nNATS/1.0\r\n\r\nyo\r\n",
        "Unsub 1\r\n",
        "pUb foo 2\r\nno\r\n",
        "pInG\r\n",
    ))
    .await;
    raw.expect("MSG foo 1 2\r\nhi\r\nHMSG foo 1 12 14\r\nNATS/1.0\r\n\r\nyo\r\nPONG\r\n")
        .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_newline_line_ends_are_accepted() {
    let server = start().await;
    let mut raw = Raw::connect_info(server.addr()).await.0;
    raw.send("CONNECT {\"verbose\":false}\nSUB foo 1\nPUB foo 5\nhello\nPUB foo 0\n\nPING\n")
        .await;
    // The server always answers with CRLF.
    raw.expect("MSG foo 1 5\r\nhello\r\nMSG foo 1 0\r\n\r\nPONG\r\n")
        .await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_spaces_and_tabs_separate_arguments() {
    let server = start().await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    raw.send(concat!(
        "SUB \t foo  \t q\t\t1\r\n",
        "PUB   foo \t r  2  \r\nhi\r\n",
        "PUB\tfoo\t3\r\nabc\r\n",
        "UNSUB  \t1 \r\n",
        "PUB foo 1\r\nx\r\n",
        "PING  \r\n",
    ))
    .await;
    raw.expect("MSG foo 1 r 2\r\nhi\r\nMSG foo 1 3\r\nabc\r\nPONG\r\n")
        .await;
    server.shutdown().await;
}

/// A session exercising every client verb, and what it must produce.
const SCRIPT: &str = concat!(
    "CONNECT {\"verbose\":false,\"headers\":true}\r\n",
    "SUB foo.* 1\r\n",
    "SUB foo.> q 2\r\n",
    "PUB foo.a 5\r\nhello\r\n",
    "PUB foo.b reply 3\r\nabc\r\n",
    "HPUB foo.c 18 21\r\nNATS/1.0\r\nA: b\r\n\r\nxyz\r\n",
    "UNSUB 1\r\n",
    "PUB foo.d.e 2\r\nde\r\n",
    "PONG\r\n",
    "PING\r\n",
);
const SCRIPT_OUTPUT: &str = concat!(
    "MSG foo.a 1 5\r\nhello\r\n",
    "MSG foo.a 2 5\r\nhello\r\n",
    "MSG foo.b 1 reply 3\r\nabc\r\n",
    "MSG foo.b 2 reply 3\r\nabc\r\n",
    "HMSG foo.c 1 18 21\r\nNATS/1.0\r\nA: b\r\n\r\nxyz\r\n",
    "HMSG foo.c 2 18 21\r\nNATS/1.0\r\nA: b\r\n\r\nxyz\r\n",
    "MSG foo.d.e 2 2\r\nde\r\n",
    "PONG\r\n",
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_session_in_one_write_gives_the_expected_output() {
    let server = start().await;
    let mut raw = Raw::connect_info(server.addr()).await.0;
    raw.send(SCRIPT).await;
    raw.expect(SCRIPT_OUTPUT).await;
    raw.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_per_write_gives_the_same_output() {
    let server = start().await;
    let mut raw = Raw::connect_info(server.addr()).await.0;
    for byte in SCRIPT.as_bytes() {
        raw.send([*byte]).await;
        // Let the server see this byte on its own before the next one.
        tokio::task::yield_now().await;
    }
    raw.expect(SCRIPT_OUTPUT).await;
    raw.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbose_before_connect_acknowledges_each_command() {
    let server = start().await;
    let mut raw = Raw::connect_info(server.addr()).await.0;
    // Before CONNECT a client is verbose, as with nats-server.
    raw.send("SUB foo 1\r\n").await;
    raw.expect("+OK\r\n").await;
    raw.send("PUB bar 2\r\nhi\r\n").await;
    raw.expect("+OK\r\n").await;
    raw.send("UNSUB 1\r\n").await;
    raw.expect("+OK\r\n").await;
    // PING is answered by PONG alone.
    raw.ping_pong().await;
    // A CONNECT that leaves `verbose` out keeps it on (and is acknowledged).
    raw.send("CONNECT {\"name\":\"telnet\"}\r\n").await;
    raw.expect("+OK\r\n").await;
    raw.send("SUB foo 2\r\n").await;
    raw.expect("+OK\r\n").await;
    // Turning verbose off is not acknowledged, nor is anything after.
    raw.send("CONNECT {\"verbose\":false}\r\n").await;
    raw.send("SUB foo 3\r\nPUB bar 2\r\nhi\r\nUNSUB 3\r\n")
        .await;
    raw.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_operation_is_an_error_and_closes() {
    let server = start().await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    raw.send("FOO bar\r\nPING\r\n").await;
    raw.expect("-ERR 'Unknown Protocol Operation'\r\n").await;
    raw.expect_closed().await;
    wait_for_clients(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_not_followed_by_crlf_is_an_error_and_closes() {
    let server = start().await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    raw.send("SUB foo 1\r\nPUB foo 2\r\nabc\r\nPING\r\n").await;
    raw.expect("-ERR 'Unknown Protocol Operation'\r\n").await;
    raw.expect_closed().await;
    wait_for_clients(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_payload_violation_is_an_error_and_closes() {
    let server = start_with(|c| c.max_payload = 1024).await;
    // Exactly max_payload is fine.
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    let body = "x".repeat(1024);
    raw.send(format!("SUB foo 1\r\nPUB foo 1024\r\n{body}\r\n"))
        .await;
    raw.expect(format!("MSG foo 1 1024\r\n{body}\r\n")).await;
    raw.ping_pong().await;
    // One more byte is refused as soon as the control line is read: the
    // server does not wait for (or buffer) the payload.
    raw.send("PUB foo 1025\r\n").await;
    raw.expect("-ERR 'Maximum Payload Violation'\r\n").await;
    raw.expect_closed().await;

    // HPUB counts headers and payload together.
    let mut raw = Raw::connect_with(server.addr(), QUIET_HEADERS).await;
    raw.send("HPUB foo 12 1025\r\n").await;
    raw.expect("-ERR 'Maximum Payload Violation'\r\n").await;
    raw.expect_closed().await;
    wait_for_clients(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_arguments_are_an_error_and_close() {
    let server = start().await;
    for (input, verb) in [
        ("PUB foo bar\r\n", "PUB"),
        ("PUB foo\r\n", "PUB"),
        ("PUB foo -1\r\n", "PUB"),
        ("PUB a b c 1\r\n", "PUB"),
        ("HPUB foo 10 5\r\n", "HPUB"),
        ("HPUB foo x 5\r\n", "HPUB"),
        ("SUB foo\r\n", "SUB"),
        ("SUB\r\n", "SUB"),
        ("UNSUB\r\n", "UNSUB"),
        ("UNSUB 1 x\r\n", "UNSUB"),
        ("CONNECT\r\n", "CONNECT"),
    ] {
        let mut raw = Raw::connect_with(server.addr(), QUIET).await;
        raw.send(format!("{input}PING\r\n")).await;
        raw.expect(format!("-ERR 'Invalid Protocol Arguments for {verb}'\r\n"))
            .await;
        raw.expect_closed().await;
    }
    wait_for_clients(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_connect_json_is_an_error_and_closes() {
    let server = start().await;
    for json in ["{bad", "[1,2]", "{\"verbose\":\"yes\"}", "\"str\""] {
        let mut raw = Raw::connect_info(server.addr()).await.0;
        raw.send(format!("CONNECT {json}\r\nPING\r\n")).await;
        raw.expect("-ERR 'Invalid CONNECT JSON'\r\n").await;
        raw.expect_closed().await;
    }
    wait_for_clients(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_responders_without_headers_is_refused_as_nats_server_does() {
    let server = start().await;
    let mut raw = Raw::connect_info(server.addr()).await.0;
    raw.send("CONNECT {\"verbose\":false,\"no_responders\":true}\r\nPING\r\n")
        .await;
    raw.expect("-ERR 'no responders requires headers support'\r\n")
        .await;
    raw.expect_closed().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sub_to_an_invalid_subject_is_an_error_and_the_connection_stays() {
    let server = start().await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    for subject in ["foo..bar", "foo.", ".foo", "foo.>.bar", ">.a"] {
        raw.send(format!("SUB {subject} 1\r\n")).await;
        raw.expect("-ERR 'Invalid Subject'\r\n").await;
        raw.ping_pong().await;
    }
    // The refused sid was not taken: it can be used for a valid subject.
    raw.send("SUB ok 1\r\nPUB ok 2\r\nhi\r\n").await;
    raw.expect("MSG ok 1 2\r\nhi\r\n").await;
    raw.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pedantic_publish_to_a_wildcard_is_an_error_and_the_connection_stays() {
    let server = start().await;
    let mut raw = Raw::connect_with(server.addr(), r#"{"verbose":false,"pedantic":true}"#).await;
    for subject in ["foo.*", "foo.>", ">", "*"] {
        raw.send(format!("PUB {subject} 2\r\nhi\r\n")).await;
        raw.expect("-ERR 'Invalid Publish Subject'\r\n").await;
        raw.ping_pong().await;
    }
    // A literal that merely contains `*` is fine.
    raw.send("SUB foo* 1\r\nPUB foo* 2\r\nhi\r\n").await;
    raw.expect("MSG foo* 1 2\r\nhi\r\n").await;
    raw.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_line_over_the_limit_is_an_error_and_closes() {
    let server = start().await;
    // With a line end.
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    raw.send(format!("SUB foo {}\r\n", "x".repeat(5000))).await;
    raw.expect("-ERR 'maximum control line exceeded'\r\n").await;
    raw.expect_closed().await;
    // Without one: the server does not wait for the rest of the line.
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    raw.send(format!("PUB foo{}", " ".repeat(5000))).await;
    raw.expect("-ERR 'maximum control line exceeded'\r\n").await;
    raw.expect_closed().await;
    wait_for_clients(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_line_limit_is_configurable() {
    let server = start_with(|c| c.max_control_line = 64).await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    let ok = "a".repeat(40);
    raw.send(format!("SUB {ok} 1\r\nPUB {ok} 1\r\nx\r\n")).await;
    raw.expect(format!("MSG {ok} 1 1\r\nx\r\n")).await;
    raw.ping_pong().await;
    raw.send(format!("SUB {} 1\r\n", "b".repeat(100))).await;
    raw.expect("-ERR 'maximum control line exceeded'\r\n").await;
    raw.expect_closed().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_megabyte_line_without_newline_is_cut_off_without_buffering() {
    let server = start().await;
    let (raw, _) = Raw::connect_info(server.addr()).await;
    let (mut read, mut write) = raw.stream.into_split();
    // Write 10 MB with no line end. The server must refuse after about
    // max_control_line bytes; if it buffered the line waiting for a newline
    // it would never answer.
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let chunk = vec![b'A'; 64 * 1024];
        for _ in 0..160 {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let received = read_until_closed(&mut read, "the server to cut the connection off").await;
    assert_eq!(
        String::from_utf8_lossy(&received),
        "-ERR 'maximum control line exceeded'\r\n"
    );
    wait_for_clients(&server, 0).await;
    writer.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_pings_is_stale_and_closed() {
    let server = start_with(|c| {
        c.ping_interval = Duration::from_millis(200);
        c.max_pings_out = 2;
    })
    .await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    raw.expect("PING\r\nPING\r\n-ERR 'Stale Connection'\r\n")
        .await;
    raw.expect_closed().await;
    wait_for_clients(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_answers_pings_stays_connected() {
    let server = start_with(|c| {
        c.ping_interval = Duration::from_millis(100);
        c.max_pings_out = 2;
    })
    .await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    // Well past max_pings_out intervals, answering each PING.
    for _ in 0..6 {
        raw.expect("PING\r\n").await;
        raw.send("PONG\r\n").await;
    }
    raw.send("SUB foo 1\r\nPUB foo 2\r\nhi\r\n").await;
    // A PING from the server may come before the message; answer it too.
    let mut line = raw.read_line().await;
    while line == b"PING\r\n" {
        raw.send("PONG\r\n").await;
        line = raw.read_line().await;
    }
    assert_eq!(String::from_utf8_lossy(&line), "MSG foo 1 2\r\n");
    raw.expect("hi\r\n").await;
    assert_eq!(server.client_count(), 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_max_connections_are_refused() {
    let server = start_with(|c| c.max_connections = 2).await;
    let (mut first, _) = Raw::connect_info(server.addr()).await;
    let (mut second, _) = Raw::connect_info(server.addr()).await;
    wait_for_clients(&server, 2).await;

    let (mut third, info) = Raw::connect_info(server.addr()).await;
    assert_eq!(info["proto"], 1);
    third
        .expect("-ERR 'maximum connections exceeded'\r\n")
        .await;
    third.expect_closed().await;
    assert_eq!(server.client_count(), 2);

    // The admitted ones are unaffected, and a slot freed can be reused.
    first.ping_pong().await;
    second.ping_pong().await;
    drop(first);
    wait_for_clients(&server, 1).await;
    let (mut fourth, _) = Raw::connect_info(server.addr()).await;
    fourth.ping_pong().await;
    assert_eq!(server.client_count(), 2);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_responders_gives_a_503_status_message() {
    let server = start().await;
    let mut raw = Raw::connect_with(
        server.addr(),
        r#"{"headers":true,"no_responders":true,"verbose":false}"#,
    )
    .await;
    raw.send("SUB _INBOX.abc.* 9\r\nPUB nobody.home _INBOX.abc.1 2\r\nhi\r\n")
        .await;
    raw.expect("HMSG _INBOX.abc.1 9 16 16\r\nNATS/1.0 503\r\n\r\n\r\n")
        .await;
    raw.ping_pong().await;

    // With a subscriber there is no status message.
    raw.send("SUB svc 1\r\nPUB svc _INBOX.abc.2 2\r\nhi\r\n")
        .await;
    raw.expect("MSG svc 1 _INBOX.abc.2 2\r\nhi\r\n").await;
    raw.ping_pong().await;

    // Without no_responders (or without headers) nothing is sent.
    let mut plain = Raw::connect_with(server.addr(), QUIET_HEADERS).await;
    plain
        .send("SUB _INBOX.x 1\r\nPUB nobody _INBOX.x 0\r\n\r\n")
        .await;
    plain.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_payload_is_cleaned_up() {
    let server = start().await;
    let mut watcher = Raw::connect_with(server.addr(), QUIET).await;
    watcher.send("SUB foo 1\r\n").await;
    watcher.ping_pong().await;

    // A subscriber that leaves mid-payload: its subscription must go too.
    let mut leaver = Raw::connect_with(server.addr(), QUIET_HEADERS).await;
    leaver.send("SUB foo 1\r\nSUB _INBOX.l 2\r\n").await;
    leaver.ping_pong().await;
    wait_for_clients(&server, 2).await;
    leaver.send("PUB foo 10\r\nhel").await;
    drop(leaver);
    wait_for_clients(&server, 1).await;

    // The partial message was not delivered; the others keep working.
    watcher.send("PUB foo 2\r\nok\r\n").await;
    watcher.expect("MSG foo 1 2\r\nok\r\n").await;
    watcher.ping_pong().await;

    // And the leaver's subscriptions are gone from the server: a request to
    // its subject gets no responders.
    let client = common::nats(&server).await;
    let err = within(
        "a request to a departed subscriber",
        client.request("_INBOX.l", "?".into()),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), async_nats::RequestErrorKind::NoResponders);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_truncated_frames_are_cleaned_up() {
    let server = start().await;
    let client = common::nats(&server).await;
    let mut sub = client.subscribe("alive").await.unwrap();
    common::round_trip(&client).await;
    wait_for_clients(&server, 1).await;

    // Deterministic pseudo-random bytes.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let inputs: Vec<Vec<u8>> = vec![
        garbage,
        vec![0u8; 100],
        b"\r\n\r\n\r\n".to_vec(),
        b"PUB foo 5\r\nhel".to_vec(),
        b"HPUB foo 12 20\r\nNATS/1.0\r\n".to_vec(),
        b"SUB foo".to_vec(),
        b"CONNECT {\"verbose\":fal".to_vec(),
        b"PUB alive 3\r\nabcdefgh".to_vec(),
        b"\xff\xfe\xfd\r\n".to_vec(),
    ];
    for input in &inputs {
        let mut raw = Raw::connect(server.addr()).await;
        raw.send(input).await;
        // Either the server closes it, or the client hangs up half way.
        drop(raw);
    }
    // A few that wait for the server to close them.
    for input in [&b"\x00\x01\x02\r\n"[..], b"PING PONG\r\nGARBAGE\r\n"] {
        let mut raw = Raw::connect(server.addr()).await;
        raw.send(input).await;
        let rest = raw.read_to_close().await;
        assert!(
            rest.ends_with(b"-ERR 'Unknown Protocol Operation'\r\n"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    wait_for_clients(&server, 1).await;

    // Nothing partial was delivered, and the server still works.
    client.publish("alive", "yes".into()).await.unwrap();
    let msg = common::next_msg(&mut sub).await;
    assert_eq!(&msg.payload[..], b"yes");
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    raw.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_group_spreads_even_when_subscriptions_change_between_messages() {
    // Subscription churn (a SUB and UNSUB between messages, as clients with
    // per-request inboxes do) must not send every message to one member.
    const MESSAGES: usize = 40;
    let server = start().await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    let mut script = String::from("SUB jobs workers 1\r\nSUB jobs workers 2\r\n");
    for i in 0..MESSAGES {
        let sid = 100 + i;
        script.push_str(&format!(
            "PUB jobs 1\r\nx\r\nSUB other.{i} {sid}\r\nUNSUB {sid}\r\n"
        ));
    }
    script.push_str("PING\r\n");
    raw.send(script).await;
    let mut per_member = [0usize; 2];
    for _ in 0..MESSAGES {
        let line = raw.read_line().await;
        match &line[..] {
            b"MSG jobs 1 1\r\n" => per_member[0] += 1,
            b"MSG jobs 2 1\r\n" => per_member[1] += 1,
            other => panic!("unexpected {:?}", String::from_utf8_lossy(other)),
        }
        raw.expect("x\r\n").await;
    }
    raw.expect("PONG\r\n").await;
    // Each message went to exactly one member, and both members had some
    // (nats-server picks at random: all 40 to one member has odds 2^-39).
    assert_eq!(per_member[0] + per_member[1], MESSAGES);
    assert!(
        per_member[0] > 0 && per_member[1] > 0,
        "not spread: {per_member:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_member_at_its_unsub_max_passes_messages_to_the_others() {
    let server = start().await;
    let mut raw = Raw::connect_with(server.addr(), QUIET).await;
    raw.send("SUB q g 1\r\nSUB q g 2\r\nUNSUB 1 1\r\n").await;
    raw.send("PUB q 1\r\na\r\n".repeat(6) + "PING\r\n").await;
    let mut per_member = [0usize; 2];
    for _ in 0..6 {
        match &raw.read_line().await[..] {
            b"MSG q 1 1\r\n" => per_member[0] += 1,
            b"MSG q 2 1\r\n" => per_member[1] += 1,
            other => panic!("unexpected {:?}", String::from_utf8_lossy(other)),
        }
        raw.expect("a\r\n").await;
    }
    raw.expect("PONG\r\n").await;
    // None lost, and the member with max 1 had at most one.
    assert!(per_member[0] <= 1, "{per_member:?}");
    assert_eq!(per_member[0] + per_member[1], 6);
    server.shutdown().await;
}
