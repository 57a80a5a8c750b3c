//! The `[authorization]` table, with nats-server's key names:
//!
//! ```toml
//! [authorization]
//! timeout = "2s"                 # CONNECT must arrive within this
//! # one of: token = "...", user + password, or users:
//! [[authorization.users]]
//! user = "alice"
//! password = "$2b$11$..."        # bcrypt (`skiff passwd`) or plain text
//! permissions = { publish = ["orders.>"], subscribe = { allow = [">"], deny = ["secret.>"] } }
//! [[authorization.users]]
//! nkey = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"
//! ```
//!
//! Passwords and tokens are [`Secret`]s: `Debug` never prints them, so a
//! config dumped into a log leaks nothing.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::{de_duration, ConfigError};
use crate::subject;

/// How long a client has to send CONNECT when authentication is on:
/// nats-server's `AUTH_TIMEOUT`.
pub const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(2);
/// `allow_responses = true`: one reply per request...
pub const DEFAULT_RESPONSE_MAX: usize = 1;
/// ...within two minutes of it (nats-server's defaults).
pub const DEFAULT_RESPONSE_EXPIRES: Duration = Duration::from_secs(120);

/// A password or token from the config file. Shown as `[REDACTED]`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// The `[authorization]` table.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorizationConfig {
    /// One shared token (`auth_token` in CONNECT).
    pub token: Option<Secret>,
    /// One user name, with `password`.
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// Named users and nkey users, each with optional permissions.
    pub users: Vec<UserConfig>,
    /// Time allowed between accept and CONNECT.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Permissions of every user that has none of its own.
    #[serde(alias = "permissions", alias = "default_permission")]
    pub default_permissions: Option<PermissionsConfig>,
}

impl Default for AuthorizationConfig {
    fn default() -> Self {
        AuthorizationConfig {
            token: None,
            user: None,
            password: None,
            users: Vec::new(),
            timeout: DEFAULT_AUTH_TIMEOUT,
            default_permissions: None,
        }
    }
}

/// One entry of `users`: a name with a password, an nkey, or (for clients
/// identified by their TLS certificate) a name alone.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserConfig {
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// A user public nkey (`U...`): the client proves it holds the seed by
    /// signing the nonce of INFO.
    pub nkey: Option<String>,
    pub permissions: Option<PermissionsConfig>,
}

/// What one user may publish and subscribe to.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PermissionsConfig {
    pub publish: Option<SubjectRulesConfig>,
    pub subscribe: Option<SubjectRulesConfig>,
    /// May publish to the reply subject of each request it received.
    pub allow_responses: Option<AllowResponsesConfig>,
}

/// `publish`/`subscribe`: a subject, a list (allowed subjects) or
/// `{ allow, deny }`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SubjectRulesConfig {
    One(String),
    List(Vec<String>),
    Rules(AllowDeny),
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllowDeny {
    /// `None`: everything not denied; `Some([])`: nothing.
    pub allow: Option<Vec<String>>,
    pub deny: Vec<String>,
}

impl SubjectRulesConfig {
    /// The rules as allow and deny lists.
    pub fn allow_deny(&self) -> AllowDeny {
        match self {
            SubjectRulesConfig::One(s) => AllowDeny {
                allow: Some(vec![s.clone()]),
                deny: Vec::new(),
            },
            SubjectRulesConfig::List(l) => AllowDeny {
                allow: Some(l.clone()),
                deny: Vec::new(),
            },
            SubjectRulesConfig::Rules(r) => r.clone(),
        }
    }
}

/// `allow_responses = true` or `{ max = 5, expires = "1m" }`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum AllowResponsesConfig {
    Enabled(bool),
    Limits(ResponseLimits),
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseLimits {
    #[serde(default)]
    pub max: Option<usize>,
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub expires: Option<Duration>,
}

fn de_opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

impl AllowResponsesConfig {
    /// `(max replies per request, how long after the request)`, or `None`
    /// when responses are not allowed. Zero means the default, as in
    /// nats-server.
    pub fn limits(&self) -> Option<(usize, Duration)> {
        let (max, expires) = match self {
            AllowResponsesConfig::Enabled(false) => return None,
            AllowResponsesConfig::Enabled(true) => (None, None),
            AllowResponsesConfig::Limits(l) => (l.max, l.expires),
        };
        let max = max.filter(|&m| m > 0).unwrap_or(DEFAULT_RESPONSE_MAX);
        let expires = expires
            .filter(|e| !e.is_zero())
            .unwrap_or(DEFAULT_RESPONSE_EXPIRES);
        Some((max, expires))
    }
}

impl AuthorizationConfig {
    /// Refuses combinations nats-server refuses, and anything that could
    /// never authenticate anyone as written.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(format!("authorization: {m}")));
        if self.timeout.is_zero() {
            return invalid("timeout must be greater than 0".into());
        }
        let single_user = self.user.is_some() || self.password.is_some();
        if single_user && (self.user.is_none() || self.password.is_none()) {
            return invalid("user and password go together".into());
        }
        let methods = [self.token.is_some(), single_user, !self.users.is_empty()];
        match methods.iter().filter(|&&m| m).count() {
            // Nobody could ever log in: surely not what was meant.
            0 => return invalid("give a token, a user and password, or users".into()),
            1 => {}
            _ => return invalid("use one of token, user/password, or users".into()),
        }
        if let Some(p) = &self.default_permissions {
            p.validate()?;
        }
        let mut names = std::collections::HashSet::new();
        for (i, u) in self.users.iter().enumerate() {
            u.validate(i)?;
            let id = u.nkey.as_ref().or(u.user.as_ref());
            if let Some(id) = id {
                if !names.insert(id.clone()) {
                    return invalid(format!("user `{id}` is listed twice"));
                }
            }
        }
        Ok(())
    }
}

impl UserConfig {
    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let invalid = |m: &str| {
            Err(ConfigError::Invalid(format!(
                "authorization.users[{index}]: {m}"
            )))
        };
        match (&self.user, &self.nkey) {
            (None, None) => return invalid("needs `user` or `nkey`"),
            (Some(_), Some(_)) => return invalid("has both `user` and `nkey`"),
            (None, Some(key)) => {
                if self.password.is_some() {
                    return invalid("an nkey user has no password");
                }
                if !is_user_nkey(key) {
                    return invalid("`nkey` is not a user public nkey (U...)");
                }
            }
            (Some(_), None) => {}
        }
        if let Some(p) = &self.permissions {
            p.validate()?;
        }
        Ok(())
    }
}

/// A valid public nkey of a user (`U...`).
fn is_user_nkey(key: &str) -> bool {
    key.starts_with('U') && nkeys::KeyPair::from_public_key(key).is_ok()
}

impl PermissionsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for rules in [&self.publish, &self.subscribe].into_iter().flatten() {
            let AllowDeny { allow, deny } = rules.allow_deny();
            for s in allow.iter().flatten().chain(&deny) {
                if !subject::is_valid_subject(s.as_bytes()) {
                    return Err(ConfigError::Invalid(format!(
                        "permissions: `{s}` is not a valid subject"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::time::Duration;

    fn parse(table: &str) -> Result<Config, String> {
        Config::from_toml(&format!("[authorization]\n{table}")).map_err(|e| e.to_string())
    }

    #[test]
    fn users_permissions_and_timeout_are_read() {
        let c = parse(
            "timeout = 3\n[[authorization.users]]\nuser = \"a\"\npassword = \"p\"\n\
             permissions = { publish = \"x\", subscribe = { deny = [\"y.>\"] }, \
             allow_responses = { max = 3, expires = \"1m\" } }\n",
        )
        .unwrap();
        let auth = c.authorization.unwrap();
        assert_eq!(auth.timeout, Duration::from_secs(3));
        let perms = auth.users[0].permissions.as_ref().unwrap();
        let limits = perms.allow_responses.as_ref().unwrap().limits();
        assert_eq!(limits, Some((3, Duration::from_secs(60))));
        let defaults = parse("token = \"t\"\n").unwrap().authorization.unwrap();
        assert_eq!(defaults.timeout, super::DEFAULT_AUTH_TIMEOUT);
    }

    #[test]
    fn misspelt_keys_and_impossible_setups_are_refused() {
        for (table, needle) in [
            ("tokn = \"t\"\n", "tokn"),
            ("token = \"t\"\nuser = \"u\"\npassword = \"p\"\n", "one of"),
            ("user = \"u\"\n", "together"),
            (
                "[[authorization.users]]\npassword = \"p\"\n",
                "needs `user` or `nkey`",
            ),
            ("[[authorization.users]]\nnkey = \"SUAB\"\n", "public nkey"),
            (
                "[[authorization.users]]\nuser = \"a\"\n[[authorization.users]]\nuser = \"a\"\n",
                "twice",
            ),
            (
                "[[authorization.users]]\nuser = \"a\"\npermissions = { publish = [\"a..b\"] }\n",
                "valid subject",
            ),
            ("timeout = \"0s\"\ntoken = \"t\"\n", "timeout"),
            ("timeout = \"5s\"\n", "give a token"),
        ] {
            let err = parse(table).expect_err(table);
            assert!(err.contains(needle), "{table}: {err}");
        }
        // A misspelt key inside permissions does not silently allow all.
        assert!(parse(
            "[[authorization.users]]\nuser = \"a\"\npassword = \"p\"\n\
             permissions = { publish = { alow = [\"x\"] } }\n"
        )
        .is_err());
    }
}
