//! Authentication and permissions, as clients see them: official clients
//! (async-nats) logging in with tokens, passwords and nkeys, and raw TCP
//! sessions asserting the exact `-ERR` bytes nats-server sends, which of
//! them close the connection, and what permissions let through.

mod common;

use std::time::Duration;

use async_nats::jetstream;
use base64::Engine;
use common::{next_msg, read_until_closed, round_trip, within, Raw};
use skiff::{Config, Server, ServerHandle};

const VIOLATION: &str = "-ERR 'Authorization Violation'\r\n";

/// A core server on a free port with `toml` as its `[authorization]`
/// table (and anything after it).
async fn start_auth(toml: &str) -> ServerHandle {
    let text =
        format!("listen = \"127.0.0.1:0\"\n[jetstream]\nenabled = false\n[authorization]\n{toml}");
    let config = Config::from_toml(&text).expect("test config is valid");
    Server::start(config).await.expect("server starts")
}

/// Connects raw, reads INFO, sends `CONNECT json` quietly and proves the
/// server accepted it.
async fn raw_login(server: &ServerHandle, json: &str) -> Raw {
    let mut raw = Raw::connect_with(server.addr(), json).await;
    raw.ping_pong().await;
    raw
}

/// Connects raw with `json` and asserts the server refuses and closes.
async fn assert_refused(server: &ServerHandle, json: &str) {
    let mut raw = Raw::connect_with(server.addr(), json).await;
    let rest = raw.read_to_close().await;
    assert_eq!(String::from_utf8_lossy(&rest), VIOLATION, "CONNECT {json}");
}

async fn nats_connect(
    server: &ServerHandle,
    options: async_nats::ConnectOptions,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    within(
        "async-nats to connect",
        options.connect(server.client_url()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_is_accepted_and_a_wrong_one_refused() {
    let server = start_auth("token = \"s3cr3t\"\n").await;
    let good = nats_connect(
        &server,
        async_nats::ConnectOptions::with_token("s3cr3t".into()),
    )
    .await
    .expect("the right token connects");
    round_trip(&good).await;
    let bad = nats_connect(
        &server,
        async_nats::ConnectOptions::with_token("nope".into()),
    )
    .await;
    assert!(bad.is_err(), "a wrong token must not connect");

    raw_login(&server, r#"{"verbose":false,"auth_token":"s3cr3t"}"#).await;
    assert_refused(&server, r#"{"verbose":false,"auth_token":"nope"}"#).await;
    assert_refused(&server, r#"{"verbose":false}"#).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_bcrypt_passwords() {
    let hash = bcrypt::hash("hashed-pw", 4).unwrap();
    let server = start_auth(&format!(
        "[[authorization.users]]\nuser = \"alice\"\npassword = \"plain-pw\"\n\
         [[authorization.users]]\nuser = \"bob\"\npassword = \"{hash}\"\n"
    ))
    .await;
    for (user, pass) in [("alice", "plain-pw"), ("bob", "hashed-pw")] {
        let client = nats_connect(
            &server,
            async_nats::ConnectOptions::with_user_and_password(user.into(), pass.into()),
        )
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"));
        round_trip(&client).await;
    }
    for (user, pass) in [("alice", "hashed-pw"), ("bob", "plain-pw"), ("eve", "x")] {
        let refused = nats_connect(
            &server,
            async_nats::ConnectOptions::with_user_and_password(user.into(), pass.into()),
        )
        .await;
        assert!(refused.is_err(), "{user}/{pass} must not connect");
    }
    assert_refused(&server, r#"{"verbose":false,"user":"bob","pass":"$2b$"}"#).await;
    assert_refused(&server, r#"{"verbose":false,"user":"bob"}"#).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_user_from_the_authorization_table() {
    let server = start_auth("user = \"admin\"\npassword = \"pw\"\n").await;
    raw_login(&server, r#"{"verbose":false,"user":"admin","pass":"pw"}"#).await;
    assert_refused(&server, r#"{"verbose":false,"user":"admin","pass":"pW"}"#).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_users_sign_the_nonce() {
    let key = nkeys::KeyPair::new_user();
    let server = start_auth(&format!(
        "[[authorization.users]]\nnkey = \"{}\"\n",
        key.public_key()
    ))
    .await;
    let seed = key.seed().unwrap();
    let client = nats_connect(&server, async_nats::ConnectOptions::with_nkey(seed))
        .await
        .expect("the nkey user connects");
    round_trip(&client).await;

    let stranger = nats_connect(
        &server,
        async_nats::ConnectOptions::with_nkey(nkeys::KeyPair::new_user().seed().unwrap()),
    )
    .await;
    assert!(stranger.is_err(), "an unknown nkey must not connect");

    // Raw: each connection gets its own nonce, and only its signature works.
    let sign = |nonce: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.sign(nonce.as_bytes()).unwrap())
    };
    let (mut raw, info) = Raw::connect_info(server.addr()).await;
    let nonce = info["nonce"]
        .as_str()
        .expect("INFO carries a nonce")
        .to_string();
    let (mut other, other_info) = Raw::connect_info(server.addr()).await;
    assert_ne!(other_info["nonce"].as_str(), Some(nonce.as_str()));
    let connect = |sig: String| {
        format!(
            "CONNECT {{\"verbose\":false,\"nkey\":\"{}\",\"sig\":\"{sig}\"}}\r\n",
            key.public_key()
        )
    };
    raw.send(connect(sign(&nonce))).await;
    raw.ping_pong().await;
    other.send(connect(sign(&nonce))).await;
    assert_eq!(
        String::from_utf8_lossy(&other.read_to_close().await),
        VIOLATION
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_requires_auth_and_names_no_users() {
    let server =
        start_auth("[[authorization.users]]\nuser = \"alice\"\npassword = \"visible-secret\"\n")
            .await;
    let mut raw = Raw::connect(server.addr()).await;
    let line = String::from_utf8(raw.read_line().await).unwrap();
    assert!(line.contains("\"auth_required\":true"), "{line}");
    assert!(
        !line.contains("alice") && !line.contains("visible-secret"),
        "{line}"
    );
    // No nkey users: no nonce.
    assert!(!line.contains("nonce"), "{line}");

    let open = common::start().await;
    let (_raw, info) = Raw::connect_info(open.addr()).await;
    assert!(info.get("auth_required").is_none(), "{info}");
    open.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anything_before_connect_is_a_violation_and_closes() {
    let server = start_auth("token = \"t\"\n").await;
    for first in ["PUB foo 1\r\nx\r\n", "SUB foo 1\r\n", "PING\r\n"] {
        let (mut raw, _) = Raw::connect_info(server.addr()).await;
        raw.send(first).await;
        let rest = raw.read_to_close().await;
        assert_eq!(String::from_utf8_lossy(&rest), VIOLATION, "{first:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_connects_times_out() {
    let server = start_auth("token = \"t\"\ntimeout = \"300ms\"\n").await;
    let (mut raw, _) = Raw::connect_info(server.addr()).await;
    let started = std::time::Instant::now();
    let rest = raw.read_to_close().await;
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "-ERR 'Authentication Timeout'\r\n"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));

    // An authenticated client outlives the timeout.
    let mut ok = raw_login(&server, r#"{"verbose":false,"auth_token":"t"}"#).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok.ping_pong().await;
    server.shutdown().await;
}

/// Users for the permission tests: "pub" is limited in what it publishes,
/// "sub" in what it subscribes to, "svc" answers requests, "root" may do
/// anything.
const USERS: &str = r#"
[[authorization.users]]
user = "pub"
password = "p"
permissions = { publish = { allow = ["orders.>", "status"], deny = ["orders.secret"] } }
[[authorization.users]]
user = "sub"
password = "p"
permissions = { subscribe = { allow = ["devices.>"], deny = ["devices.*.admin"] } }
[[authorization.users]]
user = "svc"
password = "p"
permissions = { subscribe = ["svc.>"], allow_responses = true }
[[authorization.users]]
user = "root"
password = "p"
"#;

fn login(user: &str) -> String {
    format!(r#"{{"verbose":false,"user":"{user}","pass":"p"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_permissions_allow_deny_and_wildcards() {
    let server = start_auth(USERS).await;
    let mut root = raw_login(&server, &login("root")).await;
    root.send("SUB > 1\r\n").await;
    root.ping_pong().await;

    let mut publisher = raw_login(&server, &login("pub")).await;
    publisher
        .send("PUB orders.eu.created 1\r\na\r\nPUB orders.secret 1\r\nb\r\nPUB billing 1\r\nc\r\nPUB status 1\r\nd\r\n")
        .await;
    publisher
        .expect(concat!(
            "-ERR 'Permissions Violation for Publish to \"orders.secret\"'\r\n",
            "-ERR 'Permissions Violation for Publish to \"billing\"'\r\n",
        ))
        .await;
    // Still connected, and the cached answers stay right.
    publisher.send("PUB orders.secret 1\r\nb\r\n").await;
    publisher
        .expect("-ERR 'Permissions Violation for Publish to \"orders.secret\"'\r\n")
        .await;
    publisher.ping_pong().await;

    root.expect("MSG orders.eu.created 1 1\r\na\r\nMSG status 1 1\r\nd\r\n")
        .await;
    root.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_permissions_and_the_queue_text() {
    let server = start_auth(USERS).await;
    let mut sub = raw_login(&server, &login("sub")).await;
    sub.send(concat!(
        "SUB devices.7.temp 1\r\n",
        "SUB orders.> 2\r\n",
        "SUB orders.> workers 3\r\n",
        "SUB devices.7.admin 4\r\n",
        "SUB > 5\r\n",
    ))
    .await;
    sub.expect(concat!(
        "-ERR 'Permissions Violation for Subscription to \"orders.>\"'\r\n",
        "-ERR 'Permissions Violation for Subscription to \"orders.>\" using queue \"workers\"'\r\n",
        "-ERR 'Permissions Violation for Subscription to \"devices.7.admin\"'\r\n",
        "-ERR 'Permissions Violation for Subscription to \">\"'\r\n",
    ))
    .await;
    sub.ping_pong().await;

    // Only the allowed subscription exists: it alone delivers.
    let mut root = raw_login(&server, &login("root")).await;
    root.send("PUB devices.7.temp 2\r\n21\r\nPUB orders.x 1\r\nx\r\n")
        .await;
    root.ping_pong().await;
    sub.expect("MSG devices.7.temp 1 2\r\n21\r\n").await;
    sub.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_over_a_denied_subject_receives_only_the_allowed() {
    let server = start_auth(USERS).await;
    let mut sub = raw_login(&server, &login("sub")).await;
    sub.send("SUB devices.7.> 1\r\nSUB devices.7.* q 2\r\nUNSUB 1 2\r\n")
        .await;
    sub.ping_pong().await;

    let mut root = raw_login(&server, &login("root")).await;
    root.send(concat!(
        "PUB devices.7.admin 1\r\nA\r\n",
        "PUB devices.7.temp 1\r\nT\r\n",
        "PUB devices.7.admin 1\r\nA\r\n",
        "PUB devices.7.fan.speed 1\r\nF\r\n",
    ))
    .await;
    root.ping_pong().await;
    // Filtered messages do not count towards UNSUB's maximum either.
    sub.expect(concat!(
        "MSG devices.7.temp 1 1\r\nT\r\n",
        "MSG devices.7.temp 2 1\r\nT\r\n",
        "MSG devices.7.fan.speed 1 1\r\nF\r\n",
    ))
    .await;
    sub.ping_pong().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_may_answer_each_request_once() {
    let server = start_auth(USERS).await;
    let mut svc = raw_login(&server, &login("svc")).await;
    svc.send("SUB svc.echo 1\r\n").await;
    svc.ping_pong().await;

    let mut app = raw_login(&server, &login("root")).await;
    app.send("SUB _INBOX.app.* 9\r\nPUB svc.echo _INBOX.app.1 2\r\nhi\r\n")
        .await;
    svc.expect("MSG svc.echo 1 _INBOX.app.1 2\r\nhi\r\n").await;

    svc.send("PUB _INBOX.app.1 3\r\nyes\r\n").await;
    app.expect("MSG _INBOX.app.1 9 3\r\nyes\r\n").await;
    // A second reply, a reply nobody asked for, and any other publish are
    // refused; the service stays connected.
    svc.send("PUB _INBOX.app.1 5\r\nagain\r\nPUB _INBOX.app.2 1\r\nx\r\nPUB svc.other 1\r\nx\r\n")
        .await;
    svc.expect(concat!(
        "-ERR 'Permissions Violation for Publish to \"_INBOX.app.1\"'\r\n",
        "-ERR 'Permissions Violation for Publish to \"_INBOX.app.2\"'\r\n",
        "-ERR 'Permissions Violation for Publish to \"svc.other\"'\r\n",
    ))
    .await;
    svc.ping_pong().await;
    app.ping_pong().await;

    // With async-nats on both sides, as a real service runs.
    let service = nats_connect(
        &server,
        async_nats::ConnectOptions::with_user_and_password("svc".into(), "p".into()),
    )
    .await
    .unwrap();
    let mut requests = service.subscribe("svc.time").await.unwrap();
    flush_round_trip(&service).await;
    let answer = tokio::spawn(async move {
        let request = next_msg(&mut requests).await;
        let reply = request.reply.expect("a request has a reply subject");
        service.publish(reply, "noon".into()).await.unwrap();
        service.flush().await.unwrap();
        service
    });
    let client = nats_connect(
        &server,
        async_nats::ConnectOptions::with_user_and_password("root".into(), "p".into()),
    )
    .await
    .unwrap();
    let reply = within("the reply", client.request("svc.time", "now?".into()))
        .await
        .expect("the service answers");
    assert_eq!(&reply.payload[..], b"noon");
    let _service = answer.await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_api_follows_publish_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[jetstream]\nstore_dir = {:?}\n[authorization]\n{}",
        dir.path().display().to_string(),
        r#"
[[authorization.users]]
user = "admin"
password = "p"
permissions = { publish = ["$JS.API.>", "orders.>"], subscribe = ["_INBOX.>"] }
[[authorization.users]]
user = "app"
password = "p"
permissions = { publish = ["orders.>"], subscribe = ["_INBOX.>"] }
"#
    );
    let server = Server::start(Config::from_toml(&text).unwrap())
        .await
        .unwrap();
    let stream = jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    };

    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let app = nats_connect(
        &server,
        async_nats::ConnectOptions::with_user_and_password("app".into(), "p".into())
            .event_callback(move |event| {
                let errors_tx = errors_tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = errors_tx.send(e.to_string());
                    }
                }
            }),
    )
    .await
    .unwrap();
    let mut js = jetstream::new(app);
    js.set_timeout(Duration::from_millis(500));
    assert!(
        js.create_stream(stream.clone()).await.is_err(),
        "app may not use the stream API"
    );
    let error = within("the server's -ERR", errors.recv()).await.unwrap();
    assert!(
        error.contains("Permissions Violation for Publish to \"$JS.API.STREAM.CREATE.ORDERS\""),
        "{error}"
    );

    let admin = nats_connect(
        &server,
        async_nats::ConnectOptions::with_user_and_password("admin".into(), "p".into()),
    )
    .await
    .unwrap();
    let js = jetstream::new(admin);
    js.create_stream(stream)
        .await
        .expect("admin creates the stream");
    let ack = js.publish("orders.1", "x".into()).await.unwrap();
    assert_eq!(ack.await.unwrap().sequence, 1);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_auth_config_is_valid_and_works() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/auth.toml");
    let mut config = Config::from_file(&path).expect("conf/auth.toml is valid");
    config.listen = "127.0.0.1:0".into();
    config.jetstream.enabled = false;
    let server = Server::start(config).await.unwrap();
    // The device user of the example, with the password its comment gives.
    let device = nats_connect(
        &server,
        async_nats::ConnectOptions::with_user_and_password("device-42".into(), "device-pw".into()),
    )
    .await
    .expect("the example's device user connects");
    let mut own = device.subscribe("devices.42.commands").await.unwrap();
    flush_round_trip(&device).await;
    device
        .publish("devices.42.commands", "reboot".into())
        .await
        .unwrap();
    assert_eq!(&next_msg(&mut own).await.payload[..], b"reboot");
    server.shutdown().await;
}

/// A round trip for a client that may not use `_INBOX.>` as a subject of
/// its own: a PING/PONG through `flush`.
async fn flush_round_trip(client: &async_nats::Client) {
    within("a flush", client.flush()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_pipelined_after_connect_wait_for_the_verdict() {
    let hash = bcrypt::hash("pw", 4).unwrap();
    let server = start_auth(&format!(
        "[[authorization.users]]\nuser = \"bob\"\npassword = \"{hash}\"\n"
    ))
    .await;
    let pipelined = |pass: &str| {
        format!(
            "CONNECT {{\"verbose\":true,\"user\":\"bob\",\"pass\":\"{pass}\"}}\r\n\
             SUB a 1\r\nPUB a 1\r\nx\r\nPING\r\n"
        )
    };
    let (mut raw, _) = Raw::connect_info(server.addr()).await;
    raw.send(pipelined("pw")).await;
    raw.expect("+OK\r\n+OK\r\n+OK\r\nMSG a 1 1\r\nx\r\nPONG\r\n")
        .await;

    // Refused: nothing after the CONNECT is handled.
    let (mut raw, _) = Raw::connect_info(server.addr()).await;
    raw.send(pipelined("wrong")).await;
    assert_eq!(
        String::from_utf8_lossy(&raw.read_to_close().await),
        VIOLATION
    );
    server.shutdown().await;
}

/// Writes `head` and then up to 1008 KiB of `filler` (in 16 KiB writes, until
/// the server stops taking them) on a fresh connection that has read INFO,
/// and returns everything the server sent until it closed.
async fn send_before_login(server: &ServerHandle, head: &[u8], filler: u8) -> String {
    use tokio::io::AsyncWriteExt;
    let (raw, _) = Raw::connect_info(server.addr()).await;
    let (mut read, mut write) = raw.stream.into_split();
    let head = head.to_vec();
    let writer = tokio::spawn(async move {
        if write.write_all(&head).await.is_err() {
            return;
        }
        let chunk = vec![filler; 16 * 1024];
        for _ in 0..63 {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
        // Hold the connection open: the server must answer without the
        // client closing (which would end the wait for a payload too).
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let received = read_until_closed(&mut read, "the server to refuse and close").await;
    writer.abort();
    String::from_utf8_lossy(&received).into_owned()
}

/// Before it has logged in, a client cannot make the server buffer more
/// than a control line: an op other than CONNECT is refused at its first
/// byte (as nats-server does), not after its payload has been read, and a
/// CONNECT line without an end is cut off at `max_control_line`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_has_not_logged_in_cannot_make_the_server_buffer_much() {
    // An auth timeout longer than the test waits: only the refusal itself
    // may close these connections.
    let server = start_auth("token = \"s3cr3t\"\ntimeout = \"60s\"\n").await;
    let started = std::time::Instant::now();
    // A PUB just under max_payload (1 MiB) whose payload never fully
    // arrives.
    let said = send_before_login(&server, b"PUB foo 1048000\r\n", b'x').await;
    assert_eq!(said, VIOLATION, "a large PUB before CONNECT");
    // About 1 MiB of garbage without a line end.
    let said = send_before_login(&server, b"", b'x').await;
    assert_eq!(said, VIOLATION, "garbage before CONNECT");
    // A CONNECT that never ends.
    let said = send_before_login(&server, b"CONNECT {\"auth_token\":\"", b'a').await;
    assert_eq!(
        said, "-ERR 'maximum control line exceeded'\r\n",
        "an endless CONNECT"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "refusals took {:?}",
        started.elapsed()
    );
    // A good login still works, pipelined ops included.
    let (mut raw, _) = Raw::connect_info(server.addr()).await;
    raw.send("CONNECT {\"verbose\":false,\"auth_token\":\"s3cr3t\"}\r\nSUB a 1\r\nPUB a 1\r\nx\r\nPING\r\n")
        .await;
    raw.expect("MSG a 1 1\r\nx\r\nPONG\r\n").await;
    server.shutdown().await;
}
