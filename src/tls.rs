//! TLS for client connections: loading certificates and keys, the server's
//! swappable acceptor configuration, the per-connection handshake, the
//! client side used by `skiff`'s own tools, and the identity a client
//! certificate proves.
//!
//! The flow is nats-server's: INFO (with `tls_required`) goes out in plain
//! text, the client starts the handshake, and the protocol continues over
//! TLS without a second INFO. With `handshake_first` the handshake comes
//! first and INFO is the first thing sent over TLS.
//!
//! Invariants:
//! - Only the ring crypto provider is used (no aws-lc, so no cmake).
//! - A handshake runs in the connection's own task and is bounded by the
//!   configured `timeout`: a client that stalls, sends garbage or a bad
//!   certificate costs one task for at most that long, never the accept loop.
//! - A reload replaces the whole [`ServerTls`] at once: a connection uses
//!   the one it read when it was accepted, so it sees either the old or the
//!   new settings, never a mix. A reload that fails leaves the old in place.
//! - Nothing read from disk or from the network is unwrapped.

use std::fmt::{self, Write as _};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{TlsConfig, TlsVersion};

pub use tokio_rustls::server::TlsStream as ServerTlsStream;

/// The first byte of a TLS record that carries a handshake message, i.e. of
/// every ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// What nats-server tells a client that does not start TLS on a port that
/// requires it (also after a handshake timeout).
pub const TLS_REQUIRED_ERR: &str = "Secure Connection - TLS Required";
/// Most bytes read and dropped from a refused plain-text client before
/// closing, so that our `-ERR` is not lost to a reset.
const DRAIN_LIMIT: usize = 64 * 1024;
const DRAIN_TIME: Duration = Duration::from_millis(200);

/// Why TLS settings could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls: cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("tls: {what} {path} holds no {expected}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("tls: ca_file {path}: {message}")]
    Ca { path: PathBuf, message: String },
    #[error("tls: certificate and key cannot be used: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls: client certificate verification: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Who a verified client certificate says the client is: what
/// `verify_and_map` matches users against: a `users` entry whose `user`
/// equals the subject or one of the SANs is that client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The subject in RFC 2253 form, most specific first: `CN=device-1,O=Acme`.
    pub subject: String,
    /// Subject alternative names: DNS names, e-mail addresses, URIs and IP
    /// addresses, as plain text in certificate order.
    pub sans: Vec<String>,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.subject)
    }
}

/// The server's TLS settings as loaded: the rustls configuration and the
/// parts of the `[tls]` table the connection flow needs.
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// INFO says `tls_verify`: clients must present a certificate.
    pub verify: bool,
    /// The certificate names the user (`verify_and_map`).
    pub map_to_user: bool,
    pub handshake_first: bool,
    pub timeout: Duration,
}

impl ServerTls {
    /// Reads the files named in `config` and builds the acceptor.
    pub fn load(config: &TlsConfig) -> Result<ServerTls, TlsError> {
        let certs = load_certs(&config.cert_file, "cert_file")?;
        let key = load_key(&config.key_file)?;
        let provider = server_provider();
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions(config.min_version))?;
        let builder = match &config.ca_file {
            Some(ca) if config.requires_client_cert() => {
                let roots = Arc::new(load_roots(ca)?);
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots, provider).build()?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut server = builder.with_single_cert(certs, key)?;
        // Our cipher suite order, not the client's: see server_provider.
        server.ignore_client_order = true;
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            verify: config.requires_client_cert(),
            map_to_user: config.verify_and_map,
            handshake_first: config.handshake_first,
            timeout: config.timeout,
        })
    }
}

/// The current [`ServerTls`], replaced whole by a reload. Read once per
/// accepted connection: a read lock held for a pointer copy.
pub struct ReloadableTls(RwLock<Arc<ServerTls>>);

impl ReloadableTls {
    pub fn new(tls: ServerTls) -> ReloadableTls {
        ReloadableTls(RwLock::new(Arc::new(tls)))
    }

    pub fn current(&self) -> Arc<ServerTls> {
        Arc::clone(&self.0.read())
    }

    /// New connections use `tls` from now on; existing ones keep theirs.
    pub fn replace(&self, tls: ServerTls) {
        *self.0.write() = Arc::new(tls);
    }
}

/// Why a client did not get through the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("client sent plain text on a TLS port")]
    PlainText,
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("client closed the connection before the TLS handshake")]
    Closed,
    #[error("server shutting down during the TLS handshake")]
    Shutdown,
    #[error("TLS handshake error: {0}")]
    Io(#[from] io::Error),
}

/// Runs the server side of the handshake on `stream`. Unless the settings
/// say `handshake_first`, `info` (the encoded INFO line) is written in plain
/// text first. A client that sends something other than a ClientHello, or
/// nothing before the deadline, is told [`TLS_REQUIRED_ERR`] in plain text
/// (as nats-server does) and dropped. One that stalls after starting the
/// handshake speaks TLS, to which plain text would be garbage: it is only
/// dropped.
pub async fn accept(
    tls: &ServerTls,
    mut stream: TcpStream,
    info: &[u8],
) -> Result<(ServerTlsStream<TcpStream>, Option<PeerIdentity>), HandshakeError> {
    // One deadline for the whole handshake, from its start.
    let deadline = tokio::time::Instant::now() + tls.timeout;
    // The TcpStream stays ours until the handshake starts, so that a refusal
    // can still be written to it.
    let greet = async {
        if !tls.handshake_first {
            stream.write_all(info).await?;
        }
        expect_client_hello(&stream).await
    };
    let started = tokio::time::timeout_at(deadline, greet).await;
    let refusal = match started {
        Ok(Ok(())) => None,
        Ok(Err(HandshakeError::PlainText)) => Some(HandshakeError::PlainText),
        Ok(Err(e)) => return Err(e),
        Err(_) => Some(HandshakeError::Timeout(tls.timeout)),
    };
    if let Some(reason) = refusal {
        if !tls.handshake_first {
            refuse_plain(stream).await;
        }
        return Err(reason);
    }
    let handshake = tls.acceptor.accept(stream);
    let stream = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(|_| HandshakeError::Timeout(tls.timeout))??;
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| peer_identity(leaf));
    Ok((stream, identity))
}

/// Waits for the client's first byte without consuming it.
async fn expect_client_hello(stream: &TcpStream) -> Result<(), HandshakeError> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await? {
        0 => Err(HandshakeError::Closed),
        _ if first[0] == TLS_HANDSHAKE_RECORD => Ok(()),
        _ => Err(HandshakeError::PlainText),
    }
}

/// Sends `-ERR 'Secure Connection - TLS Required'` and closes. What the
/// client already sent is read and dropped first (briefly, and bounded):
/// closing a socket with unread input resets it, and the client could lose
/// the error before reading it.
async fn refuse_plain(mut stream: TcpStream) {
    let mut line = bytes::BytesMut::new();
    crate::protocol::encode_err(&mut line, &TLS_REQUIRED_ERR);
    let drain = async {
        stream.write_all(&line).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < DRAIN_LIMIT {
            match stream.read(&mut sink).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<_, io::Error>(())
    };
    let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
}

/// The subject and alternative names of a DER certificate, or `None` if it
/// does not parse (rustls has verified it by then, so that would be odd).
pub fn peer_identity(cert: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = rfc2253(cert.subject());
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .filter_map(san_text)
            .collect(),
        _ => Vec::new(),
    };
    Some(PeerIdentity { subject, sans })
}

/// A distinguished name in RFC 2253 form: RDNs from last to first (the
/// certificate stores the most general first), `,` between them, `+`
/// between the attributes of a multi-valued RDN. This is the form Go's
/// `pkix.Name.String()` gives, so nats-server users carry over.
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.into_iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = attr.attr_type().to_id_string();
            match attribute_short_name(&oid) {
                Some(short) => out.push_str(short),
                None => out.push_str(&oid),
            }
            out.push('=');
            match attr.as_str() {
                Ok(text) if attribute_short_name(&oid).is_some() => escape_rfc2253(text, &mut out),
                // Unknown attributes and non-string values as the hex of
                // their DER encoding, as RFC 2253 (2.4) prescribes.
                _ => {
                    out.push('#');
                    let value = attr.attr_value();
                    hex(value.header.raw_tag().unwrap_or(&[]), &mut out);
                    hex(&der_length(value.data.len()), &mut out);
                    hex(value.data, &mut out);
                }
            }
        }
    }
    out
}

/// The short names RFC 2253 and Go's `pkix` use.
fn attribute_short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.5" => "SERIALNUMBER",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.17" => "POSTALCODE",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        _ => return None,
    })
}

/// Escapes an attribute value: the special characters `,+"\<>;` always, a
/// leading `#` or space and a trailing space.
fn escape_rfc2253(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

/// A DER length: one byte below 128, else 0x80 + the count of big-endian
/// bytes that follow.
fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        return vec![len as u8];
    }
    let bytes: Vec<u8> = len
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    std::iter::once(0x80 | bytes.len() as u8)
        .chain(bytes)
        .collect()
}

fn hex(bytes: &[u8], out: &mut String) {
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
}

fn san_text(name: &x509_parser::extensions::GeneralName<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    match name {
        GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
            Some(s.to_string())
        }
        GeneralName::IPAddress(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(*bytes)
                .ok()
                .map(|b| Ipv4Addr::from(b).to_string()),
            16 => <[u8; 16]>::try_from(*bytes)
                .ok()
                .map(|b| Ipv6Addr::from(b).to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// The client side, for `skiff`'s own tools: trust `ca_file` (if given, else
/// nothing), and present `cert_key` if given.
pub fn client_config(
    ca_file: Option<&Path>,
    cert_key: Option<(&Path, &Path)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(TlsVersion::V1_2))?;
    let builder = match ca_file {
        Some(ca) => builder.with_root_certificates(load_roots(ca)?),
        // Without a CA nothing can be verified: say so at the handshake.
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoTrustedCa(provider()))),
    };
    Ok(match cert_key {
        Some((cert, key)) => {
            builder.with_client_auth_cert(load_certs(cert, "certificate")?, load_key(key)?)?
        }
        None => builder.with_no_client_auth(),
    })
}

/// A verifier that refuses every server with a message that says what is
/// missing, instead of rustls' "UnknownIssuer" against an empty store.
#[derive(Debug)]
struct NoTrustedCa(Arc<CryptoProvider>);

impl ServerCertVerifier for NoTrustedCa {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General(
            "no CA to verify the server's certificate with: pass --tls-ca".to_string(),
        ))
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no CA".to_string()))
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("no CA".to_string()))
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The ring provider, the only one this crate builds with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's provider: ring's cipher suites with AES-128-GCM first.
/// rustls lists AES-256-GCM first, and a rustls client asks for it, but it
/// costs more per byte (14 AES rounds instead of 10); AES-128-GCM first is
/// also the order of Go's crypto/tls, so of nats-server, on machines with
/// AES instructions.
fn server_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort: the order within each group stays ring's.
    provider.cipher_suites.sort_by_key(|suite| {
        use rustls::CipherSuite::*;
        !matches!(
            suite.suite(),
            TLS13_AES_128_GCM_SHA256
                | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

/// TLS 1.3 only.
static TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn versions(min: TlsVersion) -> &'static [&'static SupportedProtocolVersion] {
    match min {
        TlsVersion::V1_2 => rustls::ALL_VERSIONS,
        TlsVersion::V1_3 => TLS13_ONLY,
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, in order (leaf first for a chain).
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path, what)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            path: path.to_owned(),
            expected: "PEM certificate",
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file: PKCS#8 (`PRIVATE KEY`), RSA
/// (`RSA PRIVATE KEY`, PKCS#1) or EC (`EC PRIVATE KEY`, SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path, "key_file")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::Pem {
        what: "key_file",
        path: path.to_owned(),
        expected: "PEM private key (PKCS#8, RSA or EC)",
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, "ca_file")? {
        roots.add(cert).map_err(|e| TlsError::Ca {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert_with_key(key: &KeyPair) -> String {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "k");
        params.self_signed(key).unwrap().pem()
    }

    fn load_pair(cert_pem: &str, key_pem: &str) -> Result<ServerTls, TlsError> {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, cert_pem).unwrap();
        std::fs::write(&key, key_pem).unwrap();
        ServerTls::load(&TlsConfig::new(cert, key))
    }

    /// The SEC1 `ECPrivateKey` inside a PKCS#8 EC key: the OCTET STRING
    /// that is its third element.
    fn sec1_from_pkcs8(pkcs8: &[u8]) -> Vec<u8> {
        use x509_parser::der_parser::parse_der;
        let (_, info) = parse_der(pkcs8).unwrap();
        let fields = info.as_sequence().unwrap();
        fields[2].as_slice().unwrap().to_vec()
    }

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<_> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn pkcs8_ec_and_rsa_keys_load() {
        let key = KeyPair::generate().unwrap();
        let cert = cert_with_key(&key);
        load_pair(&cert, &key.serialize_pem()).expect("PKCS#8");

        let sec1 = pem("EC PRIVATE KEY", &sec1_from_pkcs8(&key.serialize_der()));
        assert!(matches!(
            PrivateKeyDer::from_pem_slice(sec1.as_bytes()),
            Ok(PrivateKeyDer::Sec1(_))
        ));
        load_pair(&cert, &sec1).expect("SEC1");

        // ring cannot generate RSA keys: openssl makes one in the
        // traditional PKCS#1 form (`RSA PRIVATE KEY`) and its certificate.
        let dir = tempfile::tempdir().unwrap();
        let (rsa, rsa_cert) = (dir.path().join("rsa.pem"), dir.path().join("rsa-cert.pem"));
        openssl(&["genrsa", "-traditional", "-out", path(&rsa), "2048"]);
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            path(&rsa),
            "-subj",
            "/CN=k",
            "-days",
            "1",
            "-out",
            path(&rsa_cert),
        ]);
        let rsa_pem = std::fs::read_to_string(&rsa).unwrap();
        assert!(
            rsa_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
            "{rsa_pem}"
        );
        assert!(matches!(
            PrivateKeyDer::from_pem_slice(rsa_pem.as_bytes()),
            Ok(PrivateKeyDer::Pkcs1(_))
        ));
        let cert = std::fs::read_to_string(&rsa_cert).unwrap();
        load_pair(&cert, &rsa_pem).expect("PKCS#1");
    }

    fn path(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    fn openssl(args: &[&str]) {
        let status = std::process::Command::new("openssl")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl is installed");
        assert!(status.success(), "openssl {args:?}");
    }

    #[test]
    fn broken_files_are_named_in_the_error() {
        let key = KeyPair::generate().unwrap();
        let cert = cert_with_key(&key);
        let err = load_pair(&cert, "not a key").err().unwrap().to_string();
        assert!(err.contains("key_file") && err.contains("k.pem"), "{err}");
        let err = load_pair("nothing", &key.serialize_pem())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("cert_file"), "{err}");
        let other = KeyPair::generate().unwrap();
        assert!(
            load_pair(&cert, &other.serialize_pem()).is_err(),
            "mismatched key"
        );
        let missing = ServerTls::load(&TlsConfig::new("/nonexistent/c.pem", "k"));
        let err = missing.err().unwrap().to_string();
        assert!(err.contains("/nonexistent/c.pem"), "{err}");
    }

    #[test]
    fn subject_is_in_rfc2253_order_with_escapes_and_sans() {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["device-1.example".to_string(), "10.0.0.7".to_string()])
                .unwrap();
        params.subject_alt_names.push(rcgen::SanType::Rfc822Name(
            "ops@example.com".try_into().unwrap(),
        ));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CountryName, "NL");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme, Inc.");
        params
            .distinguished_name
            .push(DnType::CommonName, "device-1");
        let cert = params.self_signed(&key).unwrap();
        let id = peer_identity(cert.der()).unwrap();
        assert_eq!(id.subject, "CN=device-1,O=Acme\\, Inc.,C=NL");
        assert_eq!(id.sans, ["device-1.example", "10.0.0.7", "ops@example.com"]);
    }

    #[test]
    fn unknown_attributes_are_dotted_oids_with_hex_der_values() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CustomDnType(vec![1, 2, 3, 4]), "x");
        params.distinguished_name.push(DnType::CommonName, "d");
        let cert = params.self_signed(&key).unwrap();
        let id = peer_identity(cert.der()).unwrap();
        // UTF8String (tag 0x0c), length 1, "x".
        assert_eq!(id.subject, "CN=d,1.2.3.4=#0c0178");
        assert_eq!(der_length(300), [0x82, 0x01, 0x2c]);
    }

    #[test]
    fn values_are_escaped() {
        let mut out = String::new();
        escape_rfc2253("#a+b;c ", &mut out);
        assert_eq!(out, "\\#a\\+b\\;c\\ ");
    }
}
