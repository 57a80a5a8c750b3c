//! Configuration: the TOML file and its defaults, as one typed [`Config`].
//!
//! Key names follow nats-server's (`max_payload`, `ping_interval`, ...), so
//! people can carry their knowledge over. Unknown keys are refused with the
//! key's name and line, because a misspelt limit silently ignored is worse
//! than a server that does not start. Durations are written `"2m"`, `"10s"`,
//! `"500ms"` or as a number of seconds; sizes `"1MB"`, `"64MiB"`, `"4KB"` or a
//! number of bytes.
//!
//! Each layer has its own table: `[jetstream]` (its unset store limits
//! resolved in [`limits`]; the streams and consumers it declares,
//! `[[jetstream.streams]]`, typed in [`streams`], the same types the
//! JetStream API speaks), `[authorization]` (types in [`authorization`]),
//! `[tls]`, `[cluster]` (types in [`cluster`]), `[http]` (types in
//! [`http`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub use crate::units::{parse_duration, parse_size};

pub mod authorization;
pub mod cluster;
pub mod http;
pub mod limits;
pub mod streams;

/// Everything the server needs to start. `Config::default()` is a working
/// single node listening on `0.0.0.0:4222`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Client listen address, `HOST:PORT`; port 0 picks a free port.
    pub listen: String,
    /// Name shown in INFO; defaults to the server id.
    pub server_name: Option<String>,
    /// Largest message a client may publish, headers included.
    #[serde(deserialize_with = "de_size")]
    pub max_payload: usize,
    /// Bytes queued to one client before it is cut off as a slow consumer.
    #[serde(deserialize_with = "de_size")]
    pub max_pending: usize,
    /// Most client connections at once (0: no limit).
    pub max_connections: usize,
    /// Longest control line a client may send.
    #[serde(deserialize_with = "de_size")]
    pub max_control_line: usize,
    /// Most subscriptions per connection (0: no limit).
    pub max_subscriptions: usize,
    /// How often the server PINGs an idle client.
    #[serde(deserialize_with = "de_duration")]
    pub ping_interval: Duration,
    /// Unanswered PINGs after which a client is stale and closed.
    pub max_pings_out: u32,
    /// Longest a single write to a client may block before it is cut off.
    #[serde(deserialize_with = "de_duration")]
    pub write_deadline: Duration,
    /// Log debug messages.
    pub debug: bool,
    /// Log every protocol operation (very verbose).
    pub trace: bool,
    /// Lame duck mode (SIGUSR2): the longest it takes, from the signal to
    /// the exit, to close every client (nats-server's key and default).
    #[serde(deserialize_with = "de_duration")]
    pub lame_duck_duration: Duration,
    /// Lame duck mode: how long clients are left to move away on their own
    /// before the server starts closing them. Part of `lame_duck_duration`.
    #[serde(deserialize_with = "de_duration")]
    pub lame_duck_grace_period: Duration,
    /// Durable streams.
    pub jetstream: JetStreamConfig,
    /// Who may connect and what they may do (`None`: anyone, anything).
    pub authorization: Option<authorization::AuthorizationConfig>,
    /// TLS for client connections; present means required.
    pub tls: Option<TlsConfig>,
    /// `HOST:PORT` clients are told to reach this node at (INFO
    /// `connect_urls` on other nodes), when `listen` is not it.
    pub client_advertise: Option<String>,
    /// Routes to the other nodes of a cluster (`None`: a single node).
    pub cluster: Option<cluster::ClusterConfig>,
    /// Monitoring endpoints over HTTP (`None`: off).
    pub http: Option<http::HttpConfig>,
}

/// The `[tls]` table. When present every client must use TLS, as with
/// nats-server's `tls {}` block: INFO says `tls_required` in plain text and
/// the client upgrades before CONNECT (or, with `handshake_first`, before
/// INFO). The files are read when the server starts or reloads
/// ([`crate::tls`]), so a broken certificate is reported then.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The server's private key (PEM: PKCS#8, RSA or EC).
    pub key_file: PathBuf,
    /// Certificate authorities that sign client certificates (PEM).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Require a client certificate signed by `ca_file` (mutual TLS).
    #[serde(default)]
    pub verify: bool,
    /// Like `verify`, and the certificate names the user (see
    /// [`crate::tls::PeerIdentity`]).
    #[serde(default)]
    pub verify_and_map: bool,
    /// Start TLS at once, before INFO, for clients that expect it.
    #[serde(default)]
    pub handshake_first: bool,
    /// How long a client has to complete the handshake.
    #[serde(default = "default_tls_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Oldest TLS version accepted: `"1.2"` or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
}

/// nats-server's default TLS handshake deadline.
fn default_tls_timeout() -> Duration {
    Duration::from_secs(2)
}

/// A TLS protocol version as written in the config file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

impl TlsConfig {
    /// A certificate and key, with nats-server's defaults for the rest.
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> TlsConfig {
        TlsConfig {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            ca_file: None,
            verify: false,
            verify_and_map: false,
            handshake_first: false,
            timeout: default_tls_timeout(),
            min_version: TlsVersion::V1_2,
        }
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.verify || self.verify_and_map
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(format!("tls: {m}")));
        if self.requires_client_cert() && self.ca_file.is_none() {
            return invalid(
                "verify and verify_and_map need ca_file, the CA of client certificates",
            );
        }
        if self.timeout.is_zero() {
            return invalid("timeout must be greater than 0");
        }
        Ok(())
    }
}

/// The `[jetstream]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// Durable streams on or off.
    pub enabled: bool,
    /// Where streams are stored.
    pub store_dir: PathBuf,
    /// When stored messages reach the disk: `"always"` (fsync before each
    /// PubAck, with concurrent publishes sharing one fsync) or an interval
    /// such as `"2m"` (faster; a crash may lose what was acknowledged since
    /// the last sync, as with nats-server's default).
    pub sync: SyncPolicy,
    /// Most bytes all memory streams may hold (0: no limit). Unset:
    /// nats-server's default, 75% of the system's memory, resolved when
    /// the server starts ([`JetStreamConfig::resolve_limits`]).
    #[serde(deserialize_with = "de_opt_size")]
    pub max_memory_store: Option<usize>,
    /// Most bytes all file streams may hold (0: no limit). Unset:
    /// nats-server's default, 75% of the disk space available to the store
    /// (see [`limits`]).
    #[serde(deserialize_with = "de_opt_size")]
    pub max_file_store: Option<usize>,
    /// Streams (and their consumers) created or updated at start-up.
    pub streams: Vec<streams::StreamConfig>,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            enabled: true,
            store_dir: PathBuf::from("./data"),
            sync: SyncPolicy::Always,
            max_memory_store: None,
            max_file_store: None,
            streams: Vec::new(),
        }
    }
}

/// When stream writes are fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Before every PubAck (group commit).
    Always,
    /// Every interval, in the background.
    Interval(Duration),
}

impl<'de> Deserialize<'de> for SyncPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.eq_ignore_ascii_case("always") {
            return Ok(SyncPolicy::Always);
        }
        parse_duration(&text)
            .map(SyncPolicy::Interval)
            .map_err(serde::de::Error::custom)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:4222".to_string(),
            server_name: None,
            max_payload: 1024 * 1024,
            max_pending: 64 * 1024 * 1024,
            max_connections: 64 * 1024,
            max_control_line: 4096,
            max_subscriptions: 0,
            ping_interval: Duration::from_secs(120),
            max_pings_out: 2,
            write_deadline: Duration::from_secs(10),
            debug: false,
            trace: false,
            lame_duck_duration: Duration::from_secs(120),
            lame_duck_grace_period: Duration::from_secs(10),
            jetstream: JetStreamConfig::default(),
            authorization: None,
            tls: None,
            client_advertise: None,
            cluster: None,
            http: None,
        }
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Core messaging only, on `listen`: no durable streams, so nothing is
    /// written to disk and any number of servers can run in one process
    /// (what tests, benchmarks and examples embed).
    pub fn core(listen: &str) -> Config {
        let mut config = Config {
            listen: listen.to_string(),
            ..Config::default()
        };
        config.jetstream.enabled = false;
        config
    }

    /// Core messaging and durable streams stored in `store_dir`, on
    /// `listen` (what stream tests and examples embed).
    pub fn with_streams(listen: &str, store_dir: impl Into<PathBuf>) -> Config {
        let mut config = Config::core(listen);
        config.jetstream.enabled = true;
        config.jetstream.store_dir = store_dir.into();
        config
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        // Tables shared with the JSON API (declared streams) ignore unknown
        // fields there, as nats-server does; in a file a misspelt key is
        // refused all the same.
        let mut ignored = Vec::new();
        let config: Config = serde_ignored::deserialize(toml::Deserializer::new(text), |path| {
            ignored.push(path.to_string())
        })
        .map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: toml_error(text, &e),
        })?;
        if let Some(key) = ignored.first() {
            return Err(ConfigError::Parse {
                path: PathBuf::new(),
                message: format!("unknown key `{key}`"),
            });
        }
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.max_payload == 0 {
            return invalid("max_payload must be greater than 0");
        }
        if self.max_pending < self.max_payload {
            return invalid("max_pending must be at least max_payload");
        }
        if self.max_control_line < 32 {
            return invalid("max_control_line must be at least 32 bytes");
        }
        if self.ping_interval.is_zero() || self.write_deadline.is_zero() {
            return invalid("ping_interval and write_deadline must be greater than 0");
        }
        if self.lame_duck_grace_period >= self.lame_duck_duration {
            return invalid("lame_duck_grace_period must be shorter than lame_duck_duration");
        }
        if let Some(auth) = &self.authorization {
            auth.validate()?;
        }
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
            if cluster.max_pending < self.max_payload {
                return invalid("cluster.max_pending must be at least max_payload");
            }
        }
        if let Some(http) = &self.http {
            http.validate()?;
        }
        Ok(())
    }
}

/// A TOML error on one line, `line L, column C: what`: toml's own text
/// draws the offending line with a caret over several lines, which a log
/// line or a start-up error cannot show.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(span) = e.span() else {
        return what;
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
    format!("line {line}, column {column}: {what}")
}

/// A number or a string with a unit, as nats-server accepts them.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => Ok(n as usize),
        NumberOrText::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

fn de_opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    de_size(d).map(Some)
}

pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match NumberOrText::deserialize(d)? {
        NumberOrText::Number(n) => Ok(Duration::from_secs(n)),
        NumberOrText::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_nats_servers() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.max_payload, 1 << 20);
        assert_eq!(c.max_control_line, 4096);
        assert_eq!(c.ping_interval, Duration::from_secs(120));
        assert_eq!(c.max_pings_out, 2);
        assert_eq!(c.listen, "0.0.0.0:4222");
    }

    #[test]
    fn units_are_understood() {
        let c = Config::from_toml(
            "max_payload = \"2MB\"\nping_interval = \"30s\"\nwrite_deadline = 3\nmax_pending = 8388608\n",
        )
        .unwrap();
        assert_eq!(c.max_payload, 2 << 20);
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert_eq!(c.write_deadline, Duration::from_secs(3));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = Config::from_toml("listen = \"127.0.0.1:0\"\nmax_paylod = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_paylod"), "{err}");
        assert!(err.contains("line 2, column 1:"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
        let err = Config::from_toml("max_payload = \"1MB\"\n\nping_interval = [1]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 3, column 17:"), "{err}");
    }

    #[test]
    fn declared_streams_are_parsed_and_checked() {
        let c = Config::from_toml(
            "[[jetstream.streams]]\nname = \"ORDERS\"\nsubjects = [\"orders.>\"]\nmax_age = \"7d\"\n\
             [[jetstream.streams.consumers]]\ndurable_name = \"ship\"\nack_policy = \"explicit\"\nack_wait = \"30s\"\n",
        )
        .unwrap();
        let s = &c.jetstream.streams[0];
        assert_eq!(s.max_age, 7 * 86_400 * 1_000_000_000);
        assert_eq!(s.consumers[0].ack_wait, 30_000_000_000);
        let err = Config::from_toml("[[jetstream.streams]]\nname = \"O\"\nmax_mesgs = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_mesgs"), "{err}");
    }

    #[test]
    fn tls_table_is_parsed_with_defaults_and_checked() {
        let c = Config::from_toml(
            "[tls]\ncert_file = \"s.pem\"\nkey_file = \"k.pem\"\ntimeout = \"500ms\"\nmin_version = \"1.3\"\n",
        )
        .unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.timeout, Duration::from_millis(500));
        assert_eq!(tls.min_version, TlsVersion::V1_3);
        assert!(!tls.requires_client_cert());
        let default = Config::from_toml("[tls]\ncert_file = \"s\"\nkey_file = \"k\"\n").unwrap();
        assert_eq!(default.tls.unwrap().timeout, Duration::from_secs(2));
        for (bad, says) in [
            ("[tls]\ncert_file = \"s\"\n", "key_file"),
            (
                "[tls]\ncert_file = \"s\"\nkey_file = \"k\"\nverify = true\n",
                "ca_file",
            ),
            (
                "[tls]\ncert_file = \"s\"\nkey_file = \"k\"\nmin_version = \"1.1\"\n",
                "1.1",
            ),
            (
                "[tls]\ncert_file = \"s\"\nkey_file = \"k\"\nverfy = true\n",
                "verfy",
            ),
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn the_documented_config_file_holds_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/skiff.toml");
        let c = Config::from_file(&path).unwrap();
        let d = Config::default();
        assert_eq!(
            (
                c.max_payload,
                c.lame_duck_duration,
                c.lame_duck_grace_period
            ),
            (
                d.max_payload,
                d.lame_duck_duration,
                d.lame_duck_grace_period
            )
        );
    }

    #[test]
    fn lame_duck_keys_have_nats_servers_defaults() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.lame_duck_duration, Duration::from_secs(120));
        assert_eq!(c.lame_duck_grace_period, Duration::from_secs(10));
        let c = Config::from_toml("lame_duck_duration = \"30s\"\nlame_duck_grace_period = \"1s\"")
            .unwrap();
        assert_eq!(c.lame_duck_duration, Duration::from_secs(30));
        let err = Config::from_toml("lame_duck_duration = \"5s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lame_duck_grace_period"), "{err}");
    }

    #[test]
    fn impossible_values_are_refused() {
        assert!(Config::from_toml("max_payload = 0").is_err());
        assert!(Config::from_toml("max_payload = \"1XB\"").is_err());
    }
}
