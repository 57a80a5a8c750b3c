//! The `[http]` table: the monitoring endpoints ([`crate::monitor`]).
//!
//! Off unless the table (or `--http HOST:PORT`) is given. It binds to
//! loopback by default, because the endpoints describe every connection of
//! the server; expose it wider only behind `token` or a firewall.

use serde::Deserialize;

use super::authorization::Secret;
use super::ConfigError;

/// nats-server's monitoring port, on loopback.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8222";

/// The `[http]` table. Present means the monitoring endpoints are served.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `HOST:PORT` of the HTTP listener (port 0: any free port).
    pub listen: String,
    /// When set, every endpoint but `/healthz` requires
    /// `Authorization: Bearer <token>`. A [`Secret`]: never printed.
    pub token: Option<Secret>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: DEFAULT_HTTP_LISTEN.to_string(),
            token: None,
        }
    }
}

impl HttpConfig {
    /// The endpoints on `listen`, without a token.
    pub fn new(listen: &str) -> HttpConfig {
        HttpConfig {
            listen: listen.to_string(),
            token: None,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(format!("http: {m}")));
        if self.listen.trim().is_empty() {
            return invalid("listen must be HOST:PORT");
        }
        if self.token.as_ref().is_some_and(|t| t.0.is_empty()) {
            return invalid("token must not be empty (leave it out for no token)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn http_is_off_by_default_and_on_loopback_when_asked() {
        assert!(Config::from_toml("").unwrap().http.is_none());
        let c = Config::from_toml("[http]\n").unwrap();
        let http = c.http.unwrap();
        assert_eq!(http.listen, "127.0.0.1:8222");
        assert!(http.token.is_none());
    }

    #[test]
    fn http_token_is_read_and_never_printed() {
        let c =
            Config::from_toml("[http]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n").unwrap();
        let http = c.http.unwrap();
        assert_eq!(http.token.as_ref().map(|t| t.0.as_str()), Some("s3cret"));
        assert!(!format!("{http:?}").contains("s3cret"));
    }

    #[test]
    fn http_mistakes_are_refused() {
        for (bad, says) in [
            ("[http]\nlisten = \"\"\n", "listen"),
            ("[http]\ntoken = \"\"\n", "token"),
            ("[http]\nport = 8222\n", "port"),
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
