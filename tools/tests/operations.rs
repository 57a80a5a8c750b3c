//! Operating a running server: reloading its configuration (embedded, and
//! `skiff serve` through SIGHUP and `skiff reload`), lame duck mode moving
//! clients to another node of a cluster, `skiff server check`, where
//! `skiff serve` logs (stderr) and how it reports a failed start.

// The helpers the library's integration tests use, in one place.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::jetstream::eventually;
use common::{nats, next_msg, round_trip, within, Raw, WAIT};
use futures::StreamExt;
use skiff::config::authorization::{PermissionsConfig, SubjectRulesConfig};
use skiff::config::cluster::ClusterConfig;
use skiff::{Config, ReloadError, Server, ServerHandle};

/// A core server's config on a free port with `extra` TOML appended.
fn config(extra: &str) -> Config {
    Config::from_toml(&format!(
        "listen = \"127.0.0.1:0\"\n[jetstream]\nenabled = false\n{extra}"
    ))
    .expect("test config parses")
}

/// alice may publish to `old.>` only.
const USERS_V1: &str = r#"
[[authorization.users]]
user = "alice"
password = "pw"
permissions = { publish = ["old.>"] }
"#;

/// alice may publish to `new.>` only; bob arrives.
const USERS_V2: &str = r#"
[[authorization.users]]
user = "alice"
password = "pw"
permissions = { publish = ["new.>"] }
[[authorization.users]]
user = "bob"
password = "pw2"
"#;

/// A raw client logged in as `user`.
async fn login(addr: std::net::SocketAddr, user: &str, pass: &str) -> Raw {
    let connect = format!(r#"{{"verbose":false,"user":"{user}","pass":"{pass}"}}"#);
    let mut raw = Raw::connect_with(addr, &connect).await;
    raw.ping_pong().await;
    raw
}

/// Whether the server let `raw` publish to `subject`.
async fn may_publish(raw: &mut Raw, subject: &str) -> bool {
    raw.send(format!("PUB {subject} 2\r\nhi\r\nPING\r\n")).await;
    let line = raw.read_line().await;
    if line == b"PONG\r\n" {
        return true;
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    assert!(text.contains("Permissions Violation for Publish"), "{text}");
    raw.expect(b"PONG\r\n").await;
    false
}

/// Asserts that logging in as `user` is refused.
async fn login_refused(addr: std::net::SocketAddr, user: &str, pass: &str) {
    let connect = format!(r#"{{"verbose":false,"user":"{user}","pass":"{pass}"}}"#);
    let mut raw = Raw::connect_with(addr, &connect).await;
    raw.send("PING\r\n").await;
    let said = String::from_utf8_lossy(&raw.read_to_close().await).into_owned();
    assert!(said.contains("Authorization Violation"), "{user}: {said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_gives_new_connections_the_new_permissions_and_keeps_the_old_ones() {
    let server = Server::start(config(USERS_V1)).await.unwrap();
    let mut before = login(server.addr(), "alice", "pw").await;
    assert!(may_publish(&mut before, "old.a").await);
    assert!(!may_publish(&mut before, "new.a").await);
    login_refused(server.addr(), "bob", "pw2").await;

    let reloaded = server.reload(&config(USERS_V2)).expect("reload");
    assert!(reloaded.includes("authorization"), "{reloaded}");

    // A new connection gets the new permissions, and bob may log in.
    let mut after = login(server.addr(), "alice", "pw").await;
    assert!(may_publish(&mut after, "new.a").await);
    assert!(!may_publish(&mut after, "old.a").await);
    let mut bob = login(server.addr(), "bob", "pw2").await;
    assert!(may_publish(&mut bob, "anything").await);
    // The connection made before keeps what it logged in with.
    assert!(may_publish(&mut before, "old.b").await);
    assert!(!may_publish(&mut before, "new.b").await);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_reload_is_refused_and_changes_nothing() {
    let server = Server::start(config(USERS_V1)).await.unwrap();
    let mut moved = config(USERS_V2);
    moved.listen = "127.0.0.1:1".into();
    let err = server.reload(&moved).unwrap_err();
    assert!(matches!(err, ReloadError::Fixed("listen")), "{err}");
    assert!(err.to_string().contains("restart"), "{err}");

    let mut broken = config(USERS_V2);
    broken.max_payload = 512;
    broken.authorization.as_mut().unwrap().users[0].permissions = Some(PermissionsConfig {
        publish: Some(SubjectRulesConfig::List(vec!["new..>".into()])),
        ..PermissionsConfig::default()
    });
    let err = server.reload(&broken).unwrap_err().to_string();
    assert!(err.contains("new..>"), "{err}");

    let err = server.reload(&config("")).unwrap_err();
    assert!(matches!(err, ReloadError::AuthToggled), "{err}");

    // Nothing of the refused files is in force: old users and
    // permissions, old limits.
    let mut alice = login(server.addr(), "alice", "pw").await;
    assert!(may_publish(&mut alice, "old.a").await);
    assert!(!may_publish(&mut alice, "new.a").await);
    login_refused(server.addr(), "bob", "pw2").await;
    let (_raw, info) = Raw::connect_info(server.addr()).await;
    assert_eq!(info["max_payload"], 1024 * 1024);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_limits_reach_new_and_existing_connections() {
    let server = Server::start(config("")).await.unwrap();
    let mut old = Raw::connect_with(server.addr(), r#"{"verbose":false,"protocol":1}"#).await;
    old.ping_pong().await;

    let mut smaller = config("");
    smaller.max_payload = 512;
    smaller.max_connections = 3;
    let reloaded = server.reload(&smaller).expect("reload");
    assert_eq!(reloaded.keys, ["max_payload", "max_connections"]);

    let (_new, info) = Raw::connect_info(server.addr()).await;
    assert_eq!(info["max_payload"], 512);
    // A client that takes INFO updates is told, and held to the new limit.
    let update = old.read_info().await;
    assert_eq!(update["max_payload"], 512);
    old.send(format!("PUB big 600\r\n{}\r\n", "x".repeat(600)))
        .await;
    let said = String::from_utf8_lossy(&old.read_to_close().await).into_owned();
    assert!(said.contains("Maximum Payload Violation"), "{said}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_declared_on_reload_appears() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "listen = \"127.0.0.1:0\"\n[jetstream]\nstore_dir = {:?}\n",
        dir.path()
    );
    let declared = |streams: &str| Config::from_toml(&format!("{base}{streams}")).unwrap();
    let server = Server::start(declared("")).await.unwrap();
    let js = async_nats::jetstream::new(nats(&server).await);
    assert!(js.get_stream("ORDERS").await.is_err());

    let orders = "[[jetstream.streams]]\nname = \"ORDERS\"\nsubjects = [\"orders.>\"]\n\
                  [[jetstream.streams.consumers]]\ndurable_name = \"ship\"\nack_policy = \"explicit\"\n";
    let reloaded = server.reload(&declared(orders)).expect("reload");
    assert!(reloaded.includes("jetstream.streams"), "{reloaded}");
    let mut stream = js.get_stream("ORDERS").await.expect("declared stream");
    assert_eq!(stream.info().await.unwrap().config.subjects, ["orders.>"]);
    let ack = js.publish("orders.1", "one".into()).await.unwrap();
    assert_eq!(ack.await.unwrap().stream, "ORDERS");
    assert!(stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("ship")
        .await
        .is_ok());

    // A declaration that overlaps another stream is refused whole.
    let overlapping =
        format!("{orders}[[jetstream.streams]]\nname = \"COPY\"\nsubjects = [\"orders.eu\"]\n");
    let err = server
        .reload(&declared(&overlapping))
        .unwrap_err()
        .to_string();
    assert!(err.contains("COPY") && err.contains("overlap"), "{err}");
    assert!(js.get_stream("COPY").await.is_err());
    server.shutdown().await;
}

/// A node of cluster "ops" with a short lame duck mode.
async fn node(name: &str, seeds: &[String]) -> ServerHandle {
    let mut config = Config::core("127.0.0.1:0");
    config.server_name = Some(name.to_string());
    config.lame_duck_duration = Duration::from_secs(1);
    config.lame_duck_grace_period = Duration::from_millis(200);
    let mut cluster = ClusterConfig::new("ops", "127.0.0.1:0", seeds);
    cluster.connect_backoff = Duration::from_millis(20);
    cluster.connect_backoff_max = Duration::from_millis(200);
    config.cluster = Some(cluster);
    Server::start(config).await.expect("node starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lame_duck_moves_a_client_to_the_other_node_with_its_subscription() {
    let a = node("A", &[]).await;
    let b = node("B", &[a.route_url().unwrap()]).await;
    for n in [&a, &b] {
        eventually("the mesh", WAIT, || async {
            (n.peer_names().len() == 1).then_some(())
        })
        .await;
    }
    let (events, mut lame_duck_seen) = tokio::sync::mpsc::unbounded_channel();
    let client = within(
        "connect to A",
        async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    if matches!(event, async_nats::Event::LameDuckMode) {
                        let _ = events.send(());
                    }
                }
            })
            .connect(a.client_url()),
    )
    .await
    .unwrap();
    let mut sub = client.subscribe("moved").await.unwrap();
    round_trip(&client).await;
    let mut raw = Raw::connect_with(a.addr(), r#"{"verbose":false,"protocol":1}"#).await;
    raw.ping_pong().await;

    a.lame_duck();
    assert!(a.is_lame_duck());
    // Clients are told, and pointed at B only.
    let info = raw.read_info().await;
    assert_eq!(info["ldm"], true, "{info}");
    assert_eq!(
        info["connect_urls"],
        serde_json::json!([b.addr().to_string()])
    );
    within("async-nats to see lame duck mode", lame_duck_seen.recv()).await;
    // A accepts nobody any more.
    eventually("A's listener to close", WAIT, || async {
        tokio::net::TcpStream::connect(a.addr()).await.err()
    })
    .await;

    // The client is closed, reconnects to B and subscribes again there.
    eventually("the client to be on B", WAIT, || async {
        (client.server_info().server_name == "B").then_some(())
    })
    .await;
    let publisher = nats(&b).await;
    let msg = within("the subscription to work on B", async {
        loop {
            publisher.publish("moved", "here".into()).await.unwrap();
            if let Ok(Some(msg)) =
                tokio::time::timeout(Duration::from_millis(200), sub.next()).await
            {
                break msg;
            }
        }
    })
    .await;
    assert_eq!(msg.payload, "here");
    raw.read_to_close().await;
    within("A to stop after lame duck mode", a.stopped()).await;
    within("A's shutdown", a.shutdown()).await;
    // Still subscribed, on B.
    round_trip(&client).await;
    publisher.publish("moved", "again".into()).await.unwrap();
    assert_eq!(next_msg(&mut sub).await.payload, "again");
    b.shutdown().await;
}

/// Runs the `skiff` binary with `args` to completion (bounded).
async fn skiff(args: &[&str]) -> std::process::Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    within(&format!("skiff {args:?}"), child)
        .await
        .expect("skiff runs")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_check_exits_0_when_healthy_and_1_when_not() {
    let server = Server::start(config(USERS_V1)).await.unwrap();
    let url = server.client_url();
    let ok = skiff(&[
        "server",
        "check",
        "-s",
        &url,
        "--user",
        "alice",
        "--password",
        "pw",
    ])
    .await;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert!(stdout(&ok).starts_with("OK: "), "{ok:?}");
    assert_eq!(stdout(&ok).lines().count(), 1, "{ok:?}");

    let refused = skiff(&[
        "server",
        "check",
        "-s",
        &url,
        "--user",
        "alice",
        "--password",
        "no",
    ])
    .await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        stdout(&refused).contains("Authorization Violation"),
        "{refused:?}"
    );

    let addr = server.addr();
    server.shutdown().await;
    let closed = skiff(&["server", "check", "-s", &format!("nats://{addr}")]).await;
    assert_eq!(closed.status.code(), Some(1), "{closed:?}");
    assert!(stdout(&closed).starts_with("ERROR: "), "{closed:?}");

    let usage = skiff(&["server", "check", "--no-such-flag"]).await;
    assert_eq!(usage.status.code(), Some(2), "{usage:?}");
}

/// `skiff serve -c FILE --pid-file PID` as a child process, killed and
/// reaped on drop (with its directory); its log (stderr) goes to a file
/// the test reads, its stdout to another, which must stay empty.
struct ServeProcess {
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl ServeProcess {
    fn start(config_text: &str) -> ServeProcess {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("skiff.toml"), config_text).unwrap();
        let log = std::fs::File::create(dir.path().join("skiff.log")).unwrap();
        let out = std::fs::File::create(dir.path().join("skiff.stdout")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
            .arg("serve")
            .arg("-c")
            .arg(dir.path().join("skiff.toml"))
            .arg("--pid-file")
            .arg(dir.path().join("skiff.pid"))
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn skiff");
        ServeProcess { child, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn rewrite(&self, config_text: &str) {
        std::fs::write(self.path("skiff.toml"), config_text).unwrap();
    }

    /// What it wrote to stderr: the log.
    fn log(&self) -> String {
        std::fs::read_to_string(self.path("skiff.log")).unwrap_or_default()
    }

    /// What it wrote to stdout.
    fn stdout(&self) -> String {
        std::fs::read_to_string(self.path("skiff.stdout")).unwrap_or_default()
    }

    /// Waits until a log line contains `needle`; returns that line.
    async fn wait_for(&self, needle: &str) -> String {
        let find = async {
            loop {
                if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                    return line.to_string();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        within(needle, find).await
    }

    async fn addr(&self) -> std::net::SocketAddr {
        let line = self.wait_for("Listening for client connections on ").await;
        self.wait_for("Server is ready").await;
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill only sends a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Waits for the process to exit on its own; its exit status.
    async fn exited(&mut self) -> std::process::ExitStatus {
        let child = &mut self.child;
        within("skiff serve to exit", async {
            loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve_config(max_payload: &str, debug: bool) -> String {
    format!(
        "listen = \"127.0.0.1:0\"\nmax_payload = {max_payload}\ndebug = {debug}\n\
         lame_duck_duration = \"1s\"\nlame_duck_grace_period = \"100ms\"\n\
         [jetstream]\nenabled = false\n"
    )
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skiff_serve_reloads_on_sighup_and_skiff_reload_and_exits_after_lame_duck() {
    let mut skiff_serve = ServeProcess::start(&serve_config("\"1MB\"", false));
    let addr = skiff_serve.addr().await;
    let pid_file = skiff_serve.path("skiff.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        skiff_serve.child.id().to_string()
    );

    // SIGHUP: new limits and the debug log level.
    skiff_serve.rewrite(&serve_config("2048", true));
    skiff_serve.signal(libc::SIGHUP);
    skiff_serve.wait_for("Reloaded: max_payload = 2048").await;
    skiff_serve
        .wait_for("Reloaded: log level skiff=debug")
        .await;
    let (_raw, info) = Raw::connect_info(addr).await;
    assert_eq!(info["max_payload"], 2048);
    skiff_serve.wait_for("Client connection created").await;

    // `skiff reload --pid-file`: a listen change is refused, nothing changes.
    skiff_serve.rewrite(&serve_config("4096", true).replace("127.0.0.1:0", "127.0.0.1:1"));
    let sent = skiff(&["reload", "--pid-file", path_arg(&pid_file)]).await;
    assert!(sent.status.success(), "{sent:?}");
    let line = skiff_serve
        .wait_for("Reload failed, keeping the running configuration")
        .await;
    assert!(line.contains("`listen`"), "{line}");
    let (_raw, info) = Raw::connect_info(addr).await;
    assert_eq!(info["max_payload"], 2048);

    // Lame duck mode: a connected client is told and closed, then the
    // process exits by itself.
    let mut client = Raw::connect_with(addr, r#"{"verbose":false,"protocol":1}"#).await;
    client.ping_pong().await;
    let sent = skiff(&["signal", "ldm", "--pid-file", path_arg(&pid_file)]).await;
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(client.read_info().await["ldm"], true);
    client.read_to_close().await;
    let status = skiff_serve.exited().await;
    assert!(status.success(), "{status:?}\n{}", skiff_serve.log());
    assert!(skiff_serve.log().contains("Entering lame duck mode"));
    assert!(!pid_file.exists(), "the pid file is removed at exit");
    // The log went to stderr, as nats-server's does (launchers wait there
    // for "Server is ready"); nothing of it reached stdout.
    assert!(skiff_serve.log().contains("Server is ready"));
    assert_eq!(skiff_serve.stdout(), "", "stdout holds no log");
}

/// Runs `skiff serve ARGS` in `dir`, expecting it to fail at start; its
/// stderr, which must be a single line, and nothing on stdout.
async fn failed_start(dir: &Path, args: &[&str]) -> String {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
        .arg("serve")
        .args(args)
        .current_dir(dir)
        .env_remove("RUST_LOG")
        // The line must not depend on whether a backtrace is asked for.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(&format!("skiff serve {args:?}"), child)
        .await
        .expect("skiff runs");
    assert!(!out.status.success(), "{args:?} started: {out:?}");
    assert_eq!(out.stdout, b"", "{args:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(stderr.lines().count(), 1, "{args:?}: one line:\n{stderr}");
    assert!(stderr.starts_with("skiff: "), "{stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_says_what_and_where_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let line = failed_start(dir.path(), &["--listen", &addr, "--store", "data"]).await;
    assert!(line.contains(&format!("cannot listen on {addr}")), "{line}");
    assert_eq!(line.matches("in use").count(), 1, "said once: {line}");
    assert!(line.contains("choose another address"), "{line}");

    let line = failed_start(dir.path(), &["-c", "missing.toml"]).await;
    assert!(line.contains("config file missing.toml"), "{line}");

    std::fs::write(
        dir.path().join("typo.toml"),
        "listen = \"127.0.0.1:0\"\nmax_paylod = 5\n",
    )
    .unwrap();
    let line = failed_start(dir.path(), &["-c", "typo.toml"]).await;
    assert!(line.contains("typo.toml: line 2, column 1:"), "{line}");
    assert!(line.contains("max_paylod"), "{line}");

    std::fs::write(dir.path().join("a-file"), "").unwrap();
    let line = failed_start(
        dir.path(),
        &["--listen", "127.0.0.1:0", "--store", "a-file"],
    )
    .await;
    assert!(
        line.contains("store directory a-file: it is not a directory"),
        "{line}"
    );
    drop(taken);
}
