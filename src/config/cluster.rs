//! The `[cluster]` table: how this node joins a mesh of Skiff nodes.
//!
//! Key names follow nats-server's `cluster {}` block (`name`, `listen`,
//! `routes`, `advertise`, `connect_retries`), so an operator's knowledge
//! carries over. The route port is separate from the client port; routes
//! can be encrypted and authenticated on their own (`[cluster.tls]`,
//! `[cluster.authorization]`).

use std::time::Duration;

use serde::Deserialize;

use super::authorization::Secret;
use super::{de_duration, de_size, ConfigError, TlsConfig};

/// The `[cluster]` table. Present means this node routes messages to peers.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Every node of one mesh has the same name; a route from a node of
    /// another cluster is refused.
    pub name: String,
    /// Route listen address, `HOST:PORT` (port 0: any free port).
    pub listen: String,
    /// Seed routes, `nats-route://[user:pass@]host:port`: dialled at start
    /// and re-dialled for as long as the node runs. The rest of the mesh is
    /// learnt from the seeds (gossip).
    pub routes: Vec<String>,
    /// `HOST:PORT` other nodes should dial for this node, when `listen` is
    /// not reachable as written (a wildcard address, NAT).
    pub advertise: Option<String>,
    /// How many times a route learnt by gossip is re-dialled after it drops
    /// before the node gives up on that peer (seeds are re-dialled forever).
    pub connect_retries: u32,
    /// First wait between dial attempts; it doubles up to
    /// `connect_backoff_max`.
    #[serde(deserialize_with = "de_duration")]
    pub connect_backoff: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub connect_backoff_max: Duration,
    /// Bytes queued to one route before it is cut off as a slow route. Larger
    /// than a client's budget: a route carries many clients' traffic.
    #[serde(deserialize_with = "de_size")]
    pub max_pending: usize,
    /// Most route connections at once, dialled and accepted together,
    /// counting those still in their handshake. One more accepted gets
    /// `-ERR 'maximum route connections exceeded'`; a dial waits for its
    /// next attempt. A full mesh needs one per peer (two for a moment when
    /// two nodes dial each other at once).
    pub max_routes: usize,
    /// Queue groups: give a message to a member on this node whenever there
    /// is one, instead of choosing among all members of the cluster, each
    /// with the same chance (nats-server's behaviour, the default). Saves a
    /// hop; members elsewhere then get only what is published where the
    /// group has no member.
    pub prefer_local_queue_members: bool,
    /// TLS between nodes: each node presents `cert_file` and, with `verify`,
    /// requires its peer's certificate signed by `ca_file` (mutual TLS).
    /// Routes start TLS at once, before any protocol line.
    pub tls: Option<TlsConfig>,
    /// Credentials a dialling node must present.
    pub authorization: Option<RouteAuthorization>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: "skiff".to_string(),
            listen: "0.0.0.0:6222".to_string(),
            routes: Vec::new(),
            advertise: None,
            connect_retries: 10,
            connect_backoff: Duration::from_millis(100),
            connect_backoff_max: Duration::from_secs(5),
            max_pending: 256 * 1024 * 1024,
            max_routes: 256,
            prefer_local_queue_members: false,
            tls: None,
            authorization: None,
        }
    }
}

/// `[cluster.authorization]`: one user and password (or a token) every node
/// of the mesh uses, as nats-server's cluster `authorization {}`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteAuthorization {
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
}

impl ClusterConfig {
    /// A cluster named `name` with routes on `listen`, seeded with `routes`.
    pub fn new(name: &str, listen: &str, routes: &[String]) -> ClusterConfig {
        ClusterConfig {
            name: name.to_string(),
            listen: listen.to_string(),
            routes: routes.to_vec(),
            ..ClusterConfig::default()
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(format!("cluster: {m}")));
        if self.name.is_empty() || self.name.contains(char::is_whitespace) {
            return invalid(format!("name {:?} must be one word", self.name));
        }
        for url in &self.routes {
            if RouteUrl::parse(url).is_none() {
                return invalid(format!(
                    "route {url:?} is not nats-route://[user:pass@]host:port"
                ));
            }
        }
        if self.connect_backoff.is_zero() || self.connect_backoff_max < self.connect_backoff {
            return invalid(
                "connect_backoff must be > 0 and at most connect_backoff_max".to_string(),
            );
        }
        if self.max_routes == 0 {
            return invalid("max_routes must be at least 1".to_string());
        }
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        if let Some(auth) = &self.authorization {
            let user_pass = auth.user.is_some() || auth.password.is_some();
            if user_pass && (auth.user.is_none() || auth.password.is_none()) {
                return invalid("authorization needs both user and password".to_string());
            }
            if user_pass == auth.token.is_some() {
                return invalid("authorization takes user and password, or a token".to_string());
            }
        }
        Ok(())
    }
}

/// A route URL from the config: `nats-route://[user:pass@]host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteUrl {
    /// `host:port`.
    pub addr: String,
    pub user: Option<String>,
    pub pass: Option<String>,
}

impl RouteUrl {
    /// Parses a route URL; the scheme may be left out (`host:port`).
    pub fn parse(url: &str) -> Option<RouteUrl> {
        let rest = url
            .strip_prefix("nats-route://")
            .or_else(|| url.strip_prefix("nats://"))
            .unwrap_or(url);
        let (userinfo, addr) = match rest.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, rest),
        };
        let addr = addr.trim_end_matches('/');
        let (host, port) = addr.rsplit_once(':')?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return None;
        }
        let (user, pass) = match userinfo.map(|u| u.split_once(':')) {
            Some(Some((user, pass))) => (Some(user.to_string()), Some(pass.to_string())),
            Some(None) => (userinfo.map(str::to_string), None),
            None => (None, None),
        };
        Some(RouteUrl {
            addr: addr.to_string(),
            user,
            pass,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn route_urls_parse_with_and_without_credentials() {
        let url = RouteUrl::parse("nats-route://route:s3cret@10.0.0.5:6222").unwrap();
        assert_eq!(url.addr, "10.0.0.5:6222");
        assert_eq!(
            (url.user.as_deref(), url.pass.as_deref()),
            (Some("route"), Some("s3cret"))
        );
        assert_eq!(RouteUrl::parse("host:6222").unwrap().addr, "host:6222");
        for bad in ["nats-route://host", "nats-route://:6222", "host:port", ""] {
            assert!(RouteUrl::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_cluster_table_is_parsed_and_checked() {
        let c = Config::from_toml(
            "[cluster]\nname = \"east\"\nlisten = \"127.0.0.1:6222\"\n\
             routes = [\"nats-route://10.0.0.6:6222\"]\nconnect_backoff = \"50ms\"\n\
             [cluster.authorization]\nuser = \"r\"\npassword = \"p\"\n",
        )
        .unwrap();
        let cluster = c.cluster.unwrap();
        assert_eq!((cluster.name.as_str(), cluster.routes.len()), ("east", 1));
        assert_eq!(cluster.connect_backoff, Duration::from_millis(50));
        assert_eq!(cluster.connect_retries, 10);
        assert_eq!(cluster.max_routes, 256);
        assert!(!cluster.prefer_local_queue_members);
        for (bad, says) in [
            ("[cluster]\nroutes = [\"nowhere\"]\n", "nowhere"),
            ("[cluster]\nname = \"two words\"\n", "one word"),
            ("[cluster.authorization]\nuser = \"r\"\n", "both"),
            ("[cluster]\nlisten_addr = \"x\"\n", "listen_addr"),
            ("[cluster]\nmax_pending = 10\n", "max_payload"),
            ("[cluster]\nmax_routes = 0\n", "max_routes"),
        ] {
            let err = Config::from_toml(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
