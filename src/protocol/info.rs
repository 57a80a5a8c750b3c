//! The JSON bodies of `INFO` (server → client) and `CONNECT` (client → server).

use serde::{Deserialize, Serialize};

/// What the server tells a client on connect. Field names are nats-server's;
/// clients decide which features to use from `version`, `proto` and
/// `headers`, so these must be truthful.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerInfo {
    pub server_id: String,
    pub server_name: String,
    pub version: String,
    pub proto: u8,
    #[serde(default)]
    pub go: String,
    pub host: String,
    pub port: u16,
    #[serde(default)]
    pub headers: bool,
    pub max_payload: usize,
    #[serde(default)]
    pub client_id: u64,
    #[serde(default)]
    pub client_ip: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub jetstream: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub auth_required: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_required: bool,
    /// Clients must present a certificate (mutual TLS).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_verify: bool,
    /// TLS is offered but not required.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_available: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect_urls: Vec<String>,
    /// Random per connection when nkey users exist: the client signs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// Lame duck mode: the server is about to go away; clients should
    /// reconnect to another node of `connect_urls` (which no longer lists
    /// this one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ldm: bool,
}

/// What a client says in `CONNECT`. Every field is optional: one the client
/// leaves out keeps the server's default for it (nats-server decodes CONNECT
/// over its defaults the same way), see [`ConnectOptions::merge_into`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verbose: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pedantic: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_responders: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_required: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lang: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<String>,
}

/// A `CONNECT` body that is not valid JSON of the expected shape.
#[derive(Debug, thiserror::Error)]
#[error("Invalid CONNECT JSON: {0}")]
pub struct ConnectError(#[from] serde_json::Error);

impl ConnectOptions {
    pub fn from_json(json: &[u8]) -> Result<ConnectOptions, ConnectError> {
        Ok(serde_json::from_slice(json)?)
    }

    /// A copy safe to log: password, token, signature and JWT replaced.
    pub fn redacted(&self) -> ConnectOptions {
        let hide = |v: &Option<String>| v.as_ref().map(|_| "[REDACTED]".to_string());
        ConnectOptions {
            pass: hide(&self.pass),
            auth_token: hide(&self.auth_token),
            sig: hide(&self.sig),
            jwt: hide(&self.jwt),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_connect_hides_every_secret() {
        let c = ConnectOptions::from_json(
            br#"{"user":"u","pass":"pw1","auth_token":"tk2","sig":"sg3","jwt":"jw4","nkey":"UA"}"#,
        )
        .unwrap();
        let shown = serde_json::to_string(&c.redacted()).unwrap();
        for secret in ["pw1", "tk2", "sg3", "jw4"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("\"user\":\"u\"") && shown.contains("UA"),
            "{shown}"
        );
    }
}
