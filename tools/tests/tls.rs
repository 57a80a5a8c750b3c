//! TLS for client connections, driven by async-nats, Skiff's own client
//! and raw sockets: the plain-text INFO then upgrade flow, refusals (plain
//! text, garbage, stalls, bad client certificates, old TLS versions),
//! `handshake_first`, and certificate reload. Every certificate is made
//! here, in a temporary directory, with rcgen.

// The helpers the library's integration tests use, in one place.
#[path = "../../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{next_msg, round_trip, wait_for_clients, within, Raw};
use rcgen::{CertificateParams, DnType};
use rustls::pki_types::ServerName;
use skiff::config::{TlsConfig, TlsVersion};
use skiff::{Config, Server, ServerHandle};
use skiff_tools::certs::{Authority, Issued};
use skiff_tools::conn::{Endpoint, TlsOptions};
use skiff_tools::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TLS_REQUIRED: &str = "-ERR 'Secure Connection - TLS Required'\r\n";

/// A CA, a server certificate for localhost and 127.0.0.1, and the files.
struct Pki {
    dir: tempfile::TempDir,
    ca: Authority,
    ca_file: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::new("Test CA").unwrap();
        let (ca_file, _) = write(dir.path(), "ca", &ca.issued());
        let (server_cert, server_key) = write(dir.path(), "server", &server_cert(&ca, "server-a"));
        Pki {
            dir,
            ca,
            ca_file,
            server_cert,
            server_key,
        }
    }

    /// A client certificate from this CA, written to `<name>.pem`.
    fn client(&self, name: &str) -> (PathBuf, PathBuf) {
        write(
            self.dir.path(),
            name,
            &self.ca.client(name, "Test Fleet").unwrap(),
        )
    }

    fn tls(&self) -> TlsConfig {
        TlsConfig::new(&self.server_cert, &self.server_key)
    }

    fn mutual(&self) -> TlsConfig {
        TlsConfig {
            ca_file: Some(self.ca_file.clone()),
            verify: true,
            ..self.tls()
        }
    }

    /// async-nats options that trust this CA and insist on TLS.
    fn nats_options(&self) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::new()
            .add_root_certificates(self.ca_file.clone())
            .require_tls(true)
    }
}

/// A server certificate for localhost and 127.0.0.1 whose CN is `cn`.
fn server_cert(ca: &Authority, cn: &str) -> Issued {
    let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let mut params = CertificateParams::new(hosts).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    skiff_tools::certs::valid_from_now(&mut params);
    ca.sign(params).unwrap()
}

fn write(dir: &Path, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}-key.pem"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    (cert, key)
}

fn config(tls: TlsConfig) -> Config {
    let mut config = Config::core("127.0.0.1:0");
    config.tls = Some(tls);
    config
}

async fn start(tls: TlsConfig) -> ServerHandle {
    Server::start(config(tls)).await.expect("server starts")
}

async fn nats(server: &ServerHandle, options: async_nats::ConnectOptions) -> async_nats::Client {
    within(
        "async-nats to connect",
        options.connect(server.client_url()),
    )
    .await
    .expect("async-nats connects")
}

/// Whether async-nats gets a working connection: connecting and one round
/// trip (with TLS 1.3 a refused client certificate shows only at the first
/// read after the handshake).
async fn nats_works(server: &ServerHandle, options: async_nats::ConnectOptions) -> bool {
    let attempt = async {
        let client = options.connect(server.client_url()).await.ok()?;
        client.flush().await.ok()
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Publishes and receives one message on `client`.
async fn pub_sub(client: &async_nats::Client) {
    let mut sub = client.subscribe("tls.test").await.unwrap();
    client.flush().await.unwrap();
    client.publish("tls.test", "secret".into()).await.unwrap();
    assert_eq!(next_msg(&mut sub).await.payload.as_ref(), b"secret");
}

/// A rustls client that trusts `ca_file`, with `versions`.
fn rustls_client(
    ca_file: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in skiff::tls::load_certs(ca_file, "ca").unwrap() {
        roots.add(cert).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(skiff::tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Reads INFO in plain text and runs a TLS handshake with `client`.
async fn raw_tls(
    addr: SocketAddr,
    client: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(addr).await?;
    let mut info = Vec::new();
    while !info.ends_with(b"\r\n") {
        let mut byte = [0u8; 1];
        if tcp.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        info.push(byte[0]);
    }
    assert!(info.starts_with(b"INFO "), "{info:?}");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// The CN of the certificate a new connection is served.
async fn served_cn(addr: SocketAddr, ca_file: &Path) -> String {
    let client = rustls_client(ca_file, rustls::ALL_VERSIONS);
    let tls = within("a TLS handshake", raw_tls(addr, client))
        .await
        .expect("handshake");
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    skiff::tls::peer_identity(leaf).unwrap().subject
}

#[tokio::test]
async fn tls_pub_sub_works_with_async_nats() {
    let pki = Pki::new();
    let server = start(pki.tls()).await;
    let client = nats(&server, pki.nats_options()).await;
    pub_sub(&client).await;
    // A client that only learns from INFO that TLS is required upgrades too.
    let follower = nats(
        &server,
        async_nats::ConnectOptions::new().add_root_certificates(pki.ca_file.clone()),
    )
    .await;
    round_trip(&follower).await;
    server.shutdown().await;
}

#[tokio::test]
async fn info_says_tls_required_and_tls_verify_in_plain_text() {
    let pki = Pki::new();
    let server = start(pki.tls()).await;
    let (_raw, info) = Raw::connect_info(server.addr()).await;
    assert_eq!(info["tls_required"], true);
    assert!(info.get("tls_verify").is_none(), "{info}");
    server.shutdown().await;

    for verify in [
        pki.mutual(),
        TlsConfig {
            verify: false,
            verify_and_map: true,
            ..pki.mutual()
        },
    ] {
        let server = start(verify).await;
        let (_raw, info) = Raw::connect_info(server.addr()).await;
        assert_eq!(info["tls_required"], true);
        assert_eq!(info["tls_verify"], true);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn plain_text_client_is_refused_with_nats_servers_error() {
    let pki = Pki::new();
    let server = start(pki.tls()).await;
    let mut raw = Raw::connect_with(server.addr(), "{\"verbose\":false}").await;
    raw.send(b"PUB a 1\r\nx\r\nPING\r\n").await;
    let answer = raw.read_to_close().await;
    assert_eq!(String::from_utf8_lossy(&answer), TLS_REQUIRED);
    wait_for_clients(&server, 0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_accepts_only_valid_certificates_of_its_ca() {
    let pki = Pki::new();
    let server = start(pki.mutual()).await;
    let (cert, key) = pki.client("device-1");
    let good = pki.nats_options().add_client_certificate(cert, key);
    let client = nats(&server, good).await;
    pub_sub(&client).await;

    assert!(
        !nats_works(&server, pki.nats_options()).await,
        "no certificate"
    );

    let other_ca = Authority::new("Other CA").unwrap();
    let (cert, key) = write(
        pki.dir.path(),
        "intruder",
        &other_ca.client("intruder", "Elsewhere").unwrap(),
    );
    let other = pki.nats_options().add_client_certificate(cert, key);
    assert!(
        !nats_works(&server, other).await,
        "certificate of another CA"
    );

    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "old-device");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let (cert, key) = write(pki.dir.path(), "expired", &pki.ca.sign(params).unwrap());
    let expired = pki.nats_options().add_client_certificate(cert, key);
    assert!(!nats_works(&server, expired).await, "expired certificate");

    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "device-1");
    skiff_tools::certs::valid_from_now(&mut params);
    let own = params.self_signed(&key).unwrap();
    let (cert, key) = write(
        pki.dir.path(),
        "self-signed",
        &Issued {
            cert_pem: own.pem(),
            key_pem: key.serialize_pem(),
        },
    );
    let self_signed = pki.nats_options().add_client_certificate(cert, key);
    assert!(
        !nats_works(&server, self_signed).await,
        "self-signed certificate"
    );

    // The refusals cost the good client nothing.
    round_trip(&client).await;
    wait_for_clients(&server, 1).await;
    server.shutdown().await;
}

#[tokio::test]
async fn skiff_tools_connect_with_client_certificates() {
    let pki = Pki::new();
    let server = start(pki.mutual()).await;
    let (cert, key) = pki.client("device-7");
    let tls = TlsOptions {
        ca_file: Some(pki.ca_file.clone()),
        cert_file: Some(cert),
        key_file: Some(key),
        first: false,
    };
    let url = format!("tls://localhost:{}", server.addr().port());
    let endpoint = Endpoint::new(&url, &tls).unwrap();
    let mut sub = within("skiff to connect", Connection::connect_to(&endpoint))
        .await
        .unwrap();
    assert!(sub.is_tls());
    sub.subscribe(b"fleet.>", None);
    sub.flush().await.unwrap();
    let mut publisher = Connection::connect_to(&endpoint).await.unwrap();
    publisher.publish(b"fleet.7", None, b"up").await.unwrap();
    publisher.flush().await.unwrap();
    let message = within("a message", sub.next_message()).await.unwrap();
    assert_eq!(message.data(), b"up");

    // Without a CA the tool says what is missing.
    let no_ca = Endpoint::plain(&server.client_url()).unwrap();
    let err = Connection::connect_to(&no_ca).await.err().unwrap();
    assert!(err.to_string().contains("--tls-ca"), "{err}");
    server.shutdown().await;
}

#[tokio::test]
async fn handshake_first_sends_info_over_tls_only() {
    let pki = Pki::new();
    let server = start(TlsConfig {
        handshake_first: true,
        timeout: Duration::from_millis(500),
        ..pki.tls()
    })
    .await;
    let client = nats(&server, pki.nats_options().tls_first()).await;
    pub_sub(&client).await;

    let endpoint = Endpoint::new(
        &server.client_url(),
        &TlsOptions {
            ca_file: Some(pki.ca_file.clone()),
            first: true,
            ..TlsOptions::default()
        },
    )
    .unwrap();
    let mut conn = Connection::connect_to(&endpoint).await.unwrap();
    assert!(conn.info().tls_required);
    conn.flush().await.unwrap();

    // Nothing in plain text: a client waiting for INFO hears nothing and is
    // closed at the deadline.
    let mut raw = Raw::connect(server.addr()).await;
    raw.expect_closed().await;
    server.shutdown().await;
}

#[tokio::test]
async fn garbage_instead_of_a_client_hello_is_closed_and_others_carry_on() {
    let pki = Pki::new();
    let server = start(TlsConfig {
        timeout: Duration::from_secs(1),
        ..pki.tls()
    })
    .await;
    let client = nats(&server, pki.nats_options()).await;
    let (mut raw, _) = Raw::connect_info(server.addr()).await;
    // A handshake record header followed by nonsense.
    raw.send(b"\x16\x03\x01\x00\x10this is no hello").await;
    let started = Instant::now();
    raw.read_to_close().await;
    assert!(started.elapsed() < Duration::from_secs(1), "closed at once");
    pub_sub(&client).await;
    wait_for_clients(&server, 1).await;
    server.shutdown().await;
}

#[tokio::test]
async fn stalled_handshake_is_closed_after_the_timeout() {
    let pki = Pki::new();
    let timeout = Duration::from_millis(400);
    let server = start(TlsConfig {
        timeout,
        ..pki.tls()
    })
    .await;
    let client = nats(&server, pki.nats_options()).await;
    // A client that sends nothing is told in plain text, as nats-server
    // does; one that stalls mid-handshake speaks TLS, and plain text would
    // be garbage to it: it is only closed.
    for (first_bytes, told) in [(&b""[..], TLS_REQUIRED), (b"\x16\x03\x01", "")] {
        let (mut raw, _) = Raw::connect_info(server.addr()).await;
        let started = Instant::now();
        raw.send(first_bytes).await;
        let answer = raw.read_to_close().await;
        let took = started.elapsed();
        assert!(took >= timeout - Duration::from_millis(50), "{took:?}");
        assert!(took < timeout * 10, "{took:?}");
        assert_eq!(String::from_utf8_lossy(&answer), told);
    }
    round_trip(&client).await;
    server.shutdown().await;
}

#[tokio::test]
async fn reload_serves_the_new_certificate_to_new_connections_only() {
    let pki = Pki::new();
    let config = config(pki.tls());
    let server = Server::start(config.clone()).await.unwrap();
    assert_eq!(served_cn(server.addr(), &pki.ca_file).await, "CN=server-a");
    let before = nats(&server, pki.nats_options()).await;

    write(pki.dir.path(), "server", &server_cert(&pki.ca, "server-b"));
    server.reload(&config).unwrap();
    assert_eq!(served_cn(server.addr(), &pki.ca_file).await, "CN=server-b");
    round_trip(&before).await;
    pub_sub(&nats(&server, pki.nats_options()).await).await;

    // A broken key is refused and the running certificate stays.
    std::fs::write(&pki.server_key, "not a key").unwrap();
    let err = server.reload(&config).unwrap_err().to_string();
    assert!(err.contains("server-key.pem"), "{err}");
    assert_eq!(served_cn(server.addr(), &pki.ca_file).await, "CN=server-b");
    // Turning TLS off needs a restart.
    assert!(server.reload(&Config::core("127.0.0.1:0")).is_err());
    server.shutdown().await;
}

#[tokio::test]
async fn min_version_1_3_refuses_a_tls12_only_client() {
    let pki = Pki::new();
    let server = start(TlsConfig {
        min_version: TlsVersion::V1_3,
        ..pki.tls()
    })
    .await;
    let tls12 = rustls_client(&pki.ca_file, &[&rustls::version::TLS12]);
    let refused = within("a TLS 1.2 handshake", raw_tls(server.addr(), tls12)).await;
    assert!(refused.is_err(), "TLS 1.2 accepted");
    let tls13 = rustls_client(&pki.ca_file, &[&rustls::version::TLS13]);
    let mut ok = within("a TLS 1.3 handshake", raw_tls(server.addr(), tls13))
        .await
        .expect("TLS 1.3 accepted");
    // The server's choice, though rustls clients list AES-256 first.
    let suite = ok.get_ref().1.negotiated_cipher_suite().unwrap().suite();
    assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    ok.write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n")
        .await
        .unwrap();
    ok.flush().await.unwrap();
    let mut pong = [0u8; 6];
    within("PONG over TLS", ok.read_exact(&mut pong))
        .await
        .unwrap();
    assert_eq!(&pong, b"PONG\r\n");
    server.shutdown().await;
}

#[tokio::test]
async fn broken_tls_files_stop_the_server_from_starting() {
    let pki = Pki::new();
    let missing = TlsConfig::new(pki.dir.path().join("nope.pem"), &pki.server_key);
    let err = Server::start(config(missing))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope.pem"), "{err}");
    let mismatched = TlsConfig::new(&pki.server_cert, pki.client("x").1);
    assert!(Server::start(config(mismatched)).await.is_err());
}

#[tokio::test]
async fn conf_tls_toml_runs_with_what_gen_certs_writes() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = ["localhost".to_string(), "127.0.0.1".to_string()];
    let generated = skiff_tools::certs::generate(&dir.path().join("certs"), &hosts, 2).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/tls.toml");
    let mut config = Config::from_file(&example).unwrap();
    config.listen = "127.0.0.1:0".into();
    config.jetstream.enabled = false;
    // The example's paths are relative to where the server runs: here.
    let tls = config.tls.as_mut().unwrap();
    assert!(tls.verify, "the example is mutual TLS");
    for path in [&mut tls.cert_file, &mut tls.key_file] {
        *path = dir.path().join(&*path);
    }
    tls.ca_file = tls.ca_file.as_ref().map(|p| dir.path().join(p));
    let server = Server::start(config).await.unwrap();

    let (cert, key) = generated.devices[0].clone();
    let device = TlsOptions {
        ca_file: Some(generated.ca.clone()),
        cert_file: Some(cert),
        key_file: Some(key),
        first: false,
    };
    let endpoint = Endpoint::new(&server.client_url(), &device).unwrap();
    let mut conn = Connection::connect_to(&endpoint).await.unwrap();
    conn.flush().await.unwrap();
    let anonymous = TlsOptions {
        ca_file: Some(generated.ca.clone()),
        ..TlsOptions::default()
    };
    let endpoint = Endpoint::new(&server.client_url(), &anonymous).unwrap();
    let refused = async { Connection::connect_to(&endpoint).await?.flush().await };
    assert!(refused.await.is_err(), "no client certificate");
    server.shutdown().await;
}

/// `skiff serve -c FILE` as a child process, killed on drop; its log goes
/// to a file so that the test can wait for lines in it.
struct ServeProcess {
    child: std::process::Child,
    log: PathBuf,
}

impl ServeProcess {
    fn start(config: &Path, log: PathBuf) -> ServeProcess {
        let out = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_skiff"))
            .args(["serve", "--listen", "127.0.0.1:0", "-c"])
            .arg(config)
            .env("RUST_LOG", "skiff=info")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn skiff");
        ServeProcess { child, log }
    }

    /// Waits until a log line contains `needle`; returns that line.
    async fn wait_for(&self, needle: &str) -> String {
        let find = async {
            loop {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                    return line.to_string();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        within(needle, find).await
    }

    async fn addr(&self) -> SocketAddr {
        let line = self.wait_for("Listening for client connections on ").await;
        let addr = line.rsplit(' ').next().unwrap();
        self.wait_for("Server is ready").await;
        addr.parse().unwrap()
    }

    fn hangup(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill only sends a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate_of_skiff_serve() {
    let pki = Pki::new();
    let config = pki.dir.path().join("skiff.toml");
    std::fs::write(
        &config,
        format!(
            "[jetstream]\nenabled = false\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
            pki.server_cert, pki.server_key
        ),
    )
    .unwrap();
    let skiff = ServeProcess::start(&config, pki.dir.path().join("skiff.log"));
    let addr = skiff.addr().await;
    assert_eq!(served_cn(addr, &pki.ca_file).await, "CN=server-a");

    write(pki.dir.path(), "server", &server_cert(&pki.ca, "server-b"));
    skiff.hangup();
    skiff.wait_for("Reloaded: tls").await;
    assert_eq!(served_cn(addr, &pki.ca_file).await, "CN=server-b");

    std::fs::write(&pki.server_key, "not a key").unwrap();
    skiff.hangup();
    let line = skiff.wait_for("Reload failed").await;
    assert!(line.contains("server-key.pem"), "{line}");
    assert_eq!(served_cn(addr, &pki.ca_file).await, "CN=server-b");
}

#[tokio::test]
async fn verify_and_map_logs_in_the_user_the_certificate_names() {
    let pki = Pki::new();
    let text = format!(
        r#"listen = "127.0.0.1:0"
[jetstream]
enabled = false
[tls]
cert_file = "{}"
key_file = "{}"
ca_file = "{}"
verify_and_map = true
[[authorization.users]]
user = "CN=device-1,O=Test Fleet"
"#,
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca_file.display()
    );
    let server = Server::start(Config::from_toml(&text).expect("config parses"))
        .await
        .expect("server starts");
    let (cert, key) = pki.client("device-1");
    let mapped = pki.nats_options().add_client_certificate(cert, key);
    let client = nats(&server, mapped).await;
    pub_sub(&client).await;
    // Signed by the same CA, but no user carries its name.
    let (cert, key) = pki.client("device-2");
    let unmapped = pki.nats_options().add_client_certificate(cert, key);
    assert!(
        !nats_works(&server, unmapped).await,
        "a certificate that names no user"
    );
    round_trip(&client).await;
    server.shutdown().await;
}
