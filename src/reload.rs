//! Reloading the configuration of a running server (SIGHUP, `skiff
//! reload`, [`crate::ServerHandle::reload`]).
//!
//! All or nothing, because an operator who edits the file expects either
//! the file in force afterwards or an error saying why it is not: a reload
//! first checks everything that can fail (the config's own validation, keys
//! that cannot change while running, the TLS files, the declared streams)
//! and only then applies, in this order: declared streams (the one step
//! that writes to disk), the TLS acceptor, and the [`Live`] settings,
//! swapped whole.
//!
//! | key | reaches |
//! |---|---|
//! | `max_payload`, `max_control_line`, `max_subscriptions`, `max_pings_out` | every client, at its next read; clients that take INFO updates are sent the new `max_payload` |
//! | `max_pending`, `ping_interval`, `write_deadline` | new connections |
//! | `max_connections` | the next accept |
//! | `[authorization]` (users, passwords, permissions, timeout) | new connections; connected clients keep the user and permissions they logged in with |
//! | `[tls]` (certificate files are re-read at every reload) | new connections; open ones keep their session |
//! | `debug`, `trace` | the log level, which the binary applies (it owns the subscriber) |
//! | `lame_duck_duration`, `lame_duck_grace_period` | the next lame duck mode |
//! | `[[jetstream.streams]]` | created or updated as at start; a stream taken out of the file is kept (it holds data) |
//! | `[http] token` | the next monitoring request |
//!
//! Refused, naming the key (restart to change them): `listen`,
//! `server_name`, `client_advertise`, anything in `[cluster]`, `[jetstream]`
//! other than its streams, `[http]` on or off or its `listen`, a `max_control_line` above the one routes were
//! started with, and turning TLS or authorization on or off. The last two
//! because connected clients keep what they were admitted under: after
//! turning authorization on, anonymous clients would keep full rights, and
//! after turning TLS on, plain-text ones would stay in plain text — not
//! what turning either on means.
//!
//! Route connections keep the settings they started with.

use std::fmt;
use std::sync::Arc;

use crate::config::Config;
use crate::server::{Live, ServerState};
use crate::tls::ServerTls;

/// Why a reload was refused (the running settings stay as they were).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("turning TLS on or off needs a restart")]
    TlsToggled,
    #[error("turning authorization on or off needs a restart")]
    AuthToggled,
    /// A key that cannot change while the server runs.
    #[error("`{0}` cannot change while the server runs: restart it to apply the new value")]
    Fixed(&'static str),
    #[error(
        "max_control_line {wanted} is above {routes}, what route connections were started with: \
         restart to raise it"
    )]
    ControlLineAboveRoutes { wanted: usize, routes: usize },
    #[error("durable streams: {0}")]
    JetStream(#[from] crate::stream::JetStreamError),
    /// The reload's blocking task panicked (or the runtime is shutting
    /// down); what it had applied by then stays applied.
    #[error("the reload did not finish: {0}")]
    Aborted(String),
}

/// What a successful reload changed: the keys, in the order of the file's
/// documentation (`conf/skiff.toml`), plus `tls` whenever TLS is on (its
/// files are re-read every time).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    pub keys: Vec<&'static str>,
}

impl Reloaded {
    /// Whether `key` changed.
    pub fn includes(&self, key: &str) -> bool {
        self.keys.contains(&key)
    }
}

impl fmt::Display for Reloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.keys.is_empty() {
            f.write_str("no changes")
        } else {
            f.write_str(&self.keys.join(", "))
        }
    }
}

/// Checks `config` against the running server, then applies it; see the
/// module docs.
pub(crate) fn reload(state: &Arc<ServerState>, config: &Config) -> Result<Reloaded, ReloadError> {
    config.validate()?;
    let live = state.live();
    refuse_fixed(&live.config, config)?;
    if state.cluster.get().is_some() && config.max_control_line > state.limits.max_control_line {
        return Err(ReloadError::ControlLineAboveRoutes {
            wanted: config.max_control_line,
            routes: state.limits.max_control_line,
        });
    }
    let tls = match (&state.tls, &config.tls) {
        (Some(_), Some(new)) => Some(ServerTls::load(new)?),
        (None, None) => None,
        _ => return Err(ReloadError::TlsToggled),
    };
    let changes = changes(&live, config);
    let streams_changed = live.config.jetstream.streams != config.jetstream.streams;
    let js = state.jetstream.get().filter(|_| streams_changed);
    if let Some(js) = js {
        js.check_declared(&config.jetstream.streams)?;
    }

    // Checked: apply. Streams first, the only step that can still fail.
    if let Some(js) = js {
        js.declare_all(&config.jetstream.streams)?;
    }
    let mut keys = Vec::new();
    if let (Some(current), Some(new)) = (&state.tls, tls) {
        current.replace(new);
        tracing::info!("Reloaded: tls");
        keys.push("tls");
    }
    state.replace_live(config.clone());
    for (key, value) in changes {
        match value {
            Some(value) => tracing::info!("Reloaded: {key} = {value}"),
            None => tracing::info!("Reloaded: {key}"),
        }
        keys.push(key);
    }
    if live.config.max_payload != config.max_payload {
        state.announce_connect_urls();
    }
    let reloaded = Reloaded { keys };
    tracing::info!("Reloaded server configuration ({reloaded})");
    Ok(reloaded)
}

/// Refuses a change of what cannot change while running.
fn refuse_fixed(old: &Config, new: &Config) -> Result<(), ReloadError> {
    let fixed = |key, same: bool| {
        if same {
            Ok(())
        } else {
            Err(ReloadError::Fixed(key))
        }
    };
    fixed("listen", old.listen == new.listen)?;
    fixed("server_name", old.server_name == new.server_name)?;
    fixed(
        "client_advertise",
        old.client_advertise == new.client_advertise,
    )?;
    let (oj, nj) = (&old.jetstream, &new.jetstream);
    fixed("jetstream.enabled", oj.enabled == nj.enabled)?;
    fixed("jetstream.store_dir", oj.store_dir == nj.store_dir)?;
    fixed("jetstream.sync", oj.sync == nj.sync)?;
    fixed(
        "jetstream.max_memory_store",
        oj.max_memory_store == nj.max_memory_store,
    )?;
    fixed(
        "jetstream.max_file_store",
        oj.max_file_store == nj.max_file_store,
    )?;
    match (&old.cluster, &new.cluster) {
        (None, None) => {}
        (Some(o), Some(n)) => {
            fixed("cluster.listen", o.listen == n.listen)?;
            fixed("cluster.name", o.name == n.name)?;
            fixed("cluster", o == n)?;
        }
        _ => return Err(ReloadError::Fixed("cluster")),
    }
    let http_listen = |c: &Config| c.http.as_ref().map(|h| h.listen.clone());
    fixed("http.listen", http_listen(old) == http_listen(new))?;
    if old.authorization.is_some() != new.authorization.is_some() {
        return Err(ReloadError::AuthToggled);
    }
    Ok(())
}

/// The reloadable keys whose value changes, with the value to log (none
/// for tables, which may hold secrets).
fn changes(live: &Live, new: &Config) -> Vec<(&'static str, Option<String>)> {
    let old = &live.config;
    let mut changes = Vec::new();
    let mut check = |key, differs: bool, value: String| {
        if differs {
            changes.push((key, Some(value)));
        }
    };
    check(
        "max_payload",
        old.max_payload != new.max_payload,
        new.max_payload.to_string(),
    );
    check(
        "max_pending",
        old.max_pending != new.max_pending,
        new.max_pending.to_string(),
    );
    check(
        "max_connections",
        old.max_connections != new.max_connections,
        new.max_connections.to_string(),
    );
    check(
        "max_control_line",
        old.max_control_line != new.max_control_line,
        new.max_control_line.to_string(),
    );
    check(
        "max_subscriptions",
        old.max_subscriptions != new.max_subscriptions,
        new.max_subscriptions.to_string(),
    );
    check(
        "ping_interval",
        old.ping_interval != new.ping_interval,
        format!("{:?}", new.ping_interval),
    );
    check(
        "max_pings_out",
        old.max_pings_out != new.max_pings_out,
        new.max_pings_out.to_string(),
    );
    check(
        "write_deadline",
        old.write_deadline != new.write_deadline,
        format!("{:?}", new.write_deadline),
    );
    check("debug", old.debug != new.debug, new.debug.to_string());
    check("trace", old.trace != new.trace, new.trace.to_string());
    check(
        "lame_duck_duration",
        old.lame_duck_duration != new.lame_duck_duration,
        format!("{:?}", new.lame_duck_duration),
    );
    check(
        "lame_duck_grace_period",
        old.lame_duck_grace_period != new.lame_duck_grace_period,
        format!("{:?}", new.lame_duck_grace_period),
    );
    let names: Vec<&str> = new
        .jetstream
        .streams
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    check(
        "jetstream.streams",
        new.jetstream.enabled && old.jetstream.streams != new.jetstream.streams,
        names.join(", "),
    );
    if old.authorization != new.authorization {
        changes.push(("authorization", None));
    }
    let token = |c: &Config| c.http.as_ref().and_then(|h| h.token.clone());
    if token(old) != token(new) {
        // Named, never printed.
        changes.push(("http.token", None));
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cluster::ClusterConfig;

    #[test]
    fn fixed_keys_are_named() {
        let old = Config::core("127.0.0.1:4222");
        let refused = |tweak: &dyn Fn(&mut Config)| {
            let mut new = old.clone();
            tweak(&mut new);
            refuse_fixed(&old, &new).unwrap_err().to_string()
        };
        assert!(refused(&|c| c.listen = "127.0.0.1:4333".into()).contains("`listen`"));
        assert!(refused(&|c| c.jetstream.enabled = true).contains("jetstream.enabled"));
        assert!(refused(&|c| c.cluster = Some(ClusterConfig::default())).contains("`cluster`"));
        assert!(refused(&|c| {
            c.authorization = Some(crate::auth::AuthorizationConfig {
                token: Some(crate::auth::Secret("t".into())),
                ..Default::default()
            })
        })
        .contains("authorization"));
        let mut clustered = old.clone();
        clustered.cluster = Some(ClusterConfig::default());
        let mut renamed = clustered.clone();
        renamed.cluster.as_mut().unwrap().name = "other".into();
        let err = refuse_fixed(&clustered, &renamed).unwrap_err().to_string();
        assert!(err.contains("cluster.name"), "{err}");
        let mut limits = old.clone();
        limits.max_payload = 1024;
        limits.debug = true;
        assert!(refuse_fixed(&old, &limits).is_ok());
    }

    #[test]
    fn reloaded_lists_its_keys() {
        let r = Reloaded {
            keys: vec!["tls", "max_payload"],
        };
        assert!(r.includes("max_payload") && !r.includes("debug"));
        assert_eq!(r.to_string(), "tls, max_payload");
        assert_eq!(Reloaded::default().to_string(), "no changes");
    }
}
