//! Who may connect, and what they may do once connected.
//!
//! Job: turn the `[authorization]` config into an [`Authenticator`] that
//! judges each CONNECT (token, user and password — plain or bcrypt —, nkey
//! signature of the INFO nonce, or a TLS certificate mapped to a user), and
//! hand each accepted client its [`Permissions`].
//!
//! Invariants:
//! - Every refusal is one [`AuthError`] value, and the client sees one text
//!   for all of them, `Authorization Violation` ([`AUTH_VIOLATION`]), as with
//!   nats-server: a client cannot tell a wrong password from an unknown user.
//! - Secrets are never logged: config values are [`config::Secret`]s, CONNECT
//!   is traced through [`crate::protocol::ConnectOptions::redacted`], and
//!   [`AuthError`]'s texts name at most the user.
//! - Plain passwords and tokens are compared in constant time (`subtle`);
//!   bcrypt hashes (`$2a$`, `$2b$`, ...) are verified by `bcrypt`. A bcrypt
//!   check costs milliseconds by design, so connections judge CONNECT on
//!   tokio's blocking pool, never on a worker thread other connections
//!   share: routes through [`Authenticator::authenticate_off_thread`],
//!   clients in `client::Connection::authenticate`.
//! - Without `[authorization]` nothing here runs: no INFO fields, no checks,
//!   and connections carry no permissions (`None`), so they pay nothing.

pub mod permissions;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use subtle::ConstantTimeEq;

use crate::config::authorization as config;
pub use crate::config::authorization::{AuthorizationConfig, Secret};
use crate::protocol::ConnectOptions;
use crate::tls::PeerIdentity;
pub use permissions::{Permissions, PublishCache, Replies, SubscribeCheck};

/// The `-ERR` text of every refused CONNECT.
pub const AUTH_VIOLATION: &str = "Authorization Violation";
/// The `-ERR` text for a client that did not CONNECT in time.
pub const AUTH_TIMEOUT: &str = "Authentication Timeout";
/// Random bytes in a nonce, as in nats-server (15 characters of base64url).
const NONCE_BYTES: usize = 11;

/// Why a CONNECT was refused (the client only ever sees
/// [`AUTH_VIOLATION`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credentials")]
    NoCredentials,
    #[error("bad token")]
    BadToken,
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("bad password for user {0:?}")]
    BadPassword(String),
    #[error("unknown nkey {0:?}")]
    UnknownNkey(String),
    #[error("bad signature for nkey {0:?}")]
    BadSignature(String),
    #[error("no user matches certificate {0:?}")]
    UnknownCertificate(String),
    /// The check itself failed (it panicked, or the runtime is shutting
    /// down): refused, as nothing was proven.
    #[error("the credentials could not be checked: {0}")]
    Unchecked(String),
}

/// A refused PUB or SUB; its `Display` is the `-ERR` text, nats-server's
/// word for word (subjects quoted as Go's `%q` does). The connection stays
/// open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PermissionViolation {
    #[error("Permissions Violation for Publish to {}", go_quote(.0))]
    Publish(Vec<u8>),
    #[error("Permissions Violation for Subscription to {}{}", go_quote(.subject), queue_suffix(.queue.as_deref()))]
    Subscribe {
        subject: Vec<u8>,
        queue: Option<Vec<u8>>,
    },
}

fn queue_suffix(queue: Option<&[u8]>) -> String {
    queue.map_or_else(String::new, |q| format!(" using queue {}", go_quote(q)))
}

/// `bytes` in double quotes, escaped as Go's `%q` escapes them.
fn go_quote(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::from("\"");
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x80 && c.is_control() => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if c.is_control() => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out.push('"');
    out
}

/// An accepted client: who it is (for logs) and what it may do.
#[derive(Clone)]
pub struct Authenticated {
    pub user: String,
    /// `None`: no restrictions.
    pub permissions: Option<Arc<Permissions>>,
}

/// A named user's credential.
enum Credential {
    Password(Secret),
    /// Only through a TLS certificate (`verify_and_map`).
    Certificate,
}

struct User {
    credential: Credential,
    permissions: Option<Arc<Permissions>>,
}

/// Judges CONNECTs against the `[authorization]` config. Built once per
/// server; shared by all connections.
pub struct Authenticator {
    token: Option<Secret>,
    users: HashMap<String, User>,
    nkeys: HashMap<String, Option<Arc<Permissions>>>,
    default_permissions: Option<Arc<Permissions>>,
    timeout: Duration,
}

impl Authenticator {
    /// `config` must have passed [`AuthorizationConfig::validate`].
    pub fn new(config: &AuthorizationConfig) -> Authenticator {
        let default_permissions = config
            .default_permissions
            .as_ref()
            .map(|p| Arc::new(Permissions::new(p)));
        let own = |p: &Option<config::PermissionsConfig>| match p {
            Some(p) => Some(Arc::new(Permissions::new(p))),
            None => default_permissions.clone(),
        };
        let mut users = HashMap::new();
        let mut nkeys = HashMap::new();
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            users.insert(
                user.clone(),
                User {
                    credential: Credential::Password(password.clone()),
                    permissions: default_permissions.clone(),
                },
            );
        }
        for u in &config.users {
            match (&u.nkey, &u.user) {
                (Some(key), _) => {
                    nkeys.insert(key.clone(), own(&u.permissions));
                }
                (None, Some(name)) => {
                    let credential = match &u.password {
                        Some(p) => Credential::Password(p.clone()),
                        None => Credential::Certificate,
                    };
                    users.insert(
                        name.clone(),
                        User {
                            credential,
                            permissions: own(&u.permissions),
                        },
                    );
                }
                (None, None) => {}
            }
        }
        let plain = users
            .values()
            .any(|u| matches!(&u.credential, Credential::Password(p) if !is_bcrypt(&p.0)));
        if plain {
            tracing::warn!("Plaintext passwords detected, use nkeys or bcrypt (skiff passwd)");
        }
        for (name, u) in &users {
            if matches!(u.credential, Credential::Certificate) {
                tracing::info!("User {name:?} has no password: only a TLS client certificate mapped to it (verify_and_map) logs in as it");
            }
        }
        Authenticator {
            token: config.token.clone(),
            users,
            nkeys,
            default_permissions,
            timeout: config.timeout,
        }
    }

    /// How long a client has to authenticate.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether INFO must carry a nonce (there are nkey users).
    pub fn needs_nonce(&self) -> bool {
        !self.nkeys.is_empty()
    }

    /// A fresh nonce for one connection's INFO.
    pub fn new_nonce() -> String {
        use rand::RngCore;
        let mut raw = [0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut raw);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    }

    /// Judges one CONNECT. `nonce` is the one this connection's INFO
    /// carried; `cert` is the identity of a verified client certificate,
    /// given only when the TLS config maps certificates to users
    /// (`verify_and_map`).
    pub fn authenticate(
        &self,
        connect: &ConnectOptions,
        nonce: Option<&str>,
        cert: Option<&PeerIdentity>,
    ) -> Result<Authenticated, AuthError> {
        if let Some(cert) = cert {
            return self.by_certificate(cert);
        }
        if let Some(key) = &connect.nkey {
            return self.by_nkey(key, connect.sig.as_deref(), nonce);
        }
        if let Some(token) = &self.token {
            let given = connect
                .auth_token
                .as_deref()
                .ok_or(AuthError::NoCredentials)?;
            return if secret_matches(&token.0, given) {
                Ok(self.accepted("token".to_string(), self.default_permissions.clone()))
            } else {
                Err(AuthError::BadToken)
            };
        }
        let name = connect.user.as_deref().ok_or(AuthError::NoCredentials)?;
        let user = self
            .users
            .get(name)
            .ok_or_else(|| AuthError::UnknownUser(name.to_string()))?;
        let given = connect.pass.as_deref().unwrap_or("");
        match &user.credential {
            Credential::Password(p) if secret_matches(&p.0, given) => {
                Ok(self.accepted(name.to_string(), user.permissions.clone()))
            }
            _ => Err(AuthError::BadPassword(name.to_string())),
        }
    }

    /// [`Authenticator::authenticate`] on tokio's blocking pool, for a
    /// connection's task to await: a bcrypt check takes milliseconds by
    /// design, which must not stall the other connections served by the
    /// same worker thread. `connect` is handed back with the verdict.
    pub async fn authenticate_off_thread(
        self: Arc<Self>,
        connect: ConnectOptions,
        nonce: Option<String>,
        cert: Option<PeerIdentity>,
    ) -> Result<(Authenticated, ConnectOptions), AuthError> {
        tokio::task::spawn_blocking(move || {
            self.authenticate(&connect, nonce.as_deref(), cert.as_ref())
                .map(|accepted| (accepted, connect))
        })
        .await
        .unwrap_or_else(|e| Err(AuthError::Unchecked(e.to_string())))
    }

    fn by_nkey(
        &self,
        key: &str,
        sig: Option<&str>,
        nonce: Option<&str>,
    ) -> Result<Authenticated, AuthError> {
        let permissions = self
            .nkeys
            .get(key)
            .ok_or_else(|| AuthError::UnknownNkey(key.to_string()))?;
        let bad = || AuthError::BadSignature(key.to_string());
        let (sig, nonce) = sig.zip(nonce).ok_or_else(bad)?;
        // nats-server accepts raw base64url and, as a fallback, standard
        // base64.
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .or_else(|_| base64::engine::general_purpose::STANDARD.decode(sig))
            .map_err(|_| bad())?;
        let public = nkeys::KeyPair::from_public_key(key).map_err(|_| bad())?;
        public.verify(nonce.as_bytes(), &sig).map_err(|_| bad())?;
        Ok(self.accepted(key.to_string(), permissions.clone()))
    }

    fn by_certificate(&self, cert: &PeerIdentity) -> Result<Authenticated, AuthError> {
        std::iter::once(&cert.subject)
            .chain(&cert.sans)
            .find_map(|name| match self.users.get(name) {
                Some(u) if matches!(u.credential, Credential::Certificate) => {
                    Some(self.accepted(name.clone(), u.permissions.clone()))
                }
                _ => None,
            })
            .ok_or_else(|| AuthError::UnknownCertificate(cert.subject.clone()))
    }

    fn accepted(&self, user: String, permissions: Option<Arc<Permissions>>) -> Authenticated {
        Authenticated { user, permissions }
    }
}

/// A bcrypt hash, as nats-server recognises them (`$2a$`, `$2b$`, ...).
fn is_bcrypt(stored: &str) -> bool {
    stored.starts_with("$2") && stored.len() > 4 && stored.as_bytes().get(3) == Some(&b'$')
}

/// Compares a configured password or token with what the client sent:
/// bcrypt when the stored value is a hash, else in constant time.
fn secret_matches(stored: &str, given: &str) -> bool {
    if is_bcrypt(stored) {
        return bcrypt::verify(given, stored).unwrap_or(false);
    }
    stored.as_bytes().ct_eq(given.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::authorization::UserConfig;

    fn connect(json: &str) -> ConnectOptions {
        ConnectOptions::from_json(json.as_bytes()).unwrap()
    }

    fn users() -> Authenticator {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        Authenticator::new(&AuthorizationConfig {
            users: vec![
                UserConfig {
                    user: Some("plain".into()),
                    password: Some(Secret("pw".into())),
                    ..Default::default()
                },
                UserConfig {
                    user: Some("hashed".into()),
                    password: Some(Secret(hash)),
                    ..Default::default()
                },
                UserConfig {
                    user: Some("CN=device-7".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        })
    }

    #[test]
    fn passwords_plain_and_bcrypt() {
        let a = users();
        assert!(a
            .authenticate(&connect(r#"{"user":"plain","pass":"pw"}"#), None, None)
            .is_ok());
        assert!(a
            .authenticate(&connect(r#"{"user":"hashed","pass":"s3cret"}"#), None, None)
            .is_ok());
        assert_eq!(
            a.authenticate(&connect(r#"{"user":"hashed","pass":"nope"}"#), None, None)
                .err(),
            Some(AuthError::BadPassword("hashed".into()))
        );
        assert_eq!(
            a.authenticate(&connect(r#"{"user":"ghost","pass":"pw"}"#), None, None)
                .err(),
            Some(AuthError::UnknownUser("ghost".into()))
        );
        assert_eq!(
            a.authenticate(&connect("{}"), None, None).err(),
            Some(AuthError::NoCredentials)
        );
        // A certificate-only user cannot log in with a password, even empty.
        assert!(a
            .authenticate(&connect(r#"{"user":"CN=device-7","pass":""}"#), None, None)
            .is_err());
    }

    #[test]
    fn certificates_map_to_password_less_users() {
        let a = users();
        let cert = PeerIdentity {
            subject: "CN=other".into(),
            sans: vec!["CN=device-7".into()],
        };
        let ok = a.authenticate(&connect("{}"), None, Some(&cert)).unwrap();
        assert_eq!(ok.user, "CN=device-7");
        let stranger = PeerIdentity {
            subject: "CN=plain".into(),
            sans: vec![],
        };
        // "plain" has a password: a certificate does not stand in for it.
        assert!(a
            .authenticate(&connect("{}"), None, Some(&stranger))
            .is_err());
    }

    #[test]
    fn nkey_signatures_over_the_nonce() {
        let kp = nkeys::KeyPair::new_user();
        let a = Authenticator::new(&AuthorizationConfig {
            users: vec![UserConfig {
                nkey: Some(kp.public_key()),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert!(a.needs_nonce());
        let nonce = Authenticator::new_nonce();
        assert_eq!(nonce.len(), 15);
        let sign = |n: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.sign(n.as_bytes()).unwrap())
        };
        let c = connect(&format!(
            r#"{{"nkey":"{}","sig":"{}"}}"#,
            kp.public_key(),
            sign(&nonce)
        ));
        assert!(a.authenticate(&c, Some(&nonce), None).is_ok());
        // The signature of another nonce, or none, does not do.
        assert!(a.authenticate(&c, Some("other"), None).is_err());
        assert!(a.authenticate(&c, None, None).is_err());
        let stranger = nkeys::KeyPair::new_user();
        let c = connect(&format!(
            r#"{{"nkey":"{}","sig":"{}"}}"#,
            stranger.public_key(),
            sign(&nonce)
        ));
        assert!(matches!(
            a.authenticate(&c, Some(&nonce), None),
            Err(AuthError::UnknownNkey(_))
        ));
    }

    #[test]
    fn violation_texts_are_nats_servers() {
        assert_eq!(
            PermissionViolation::Publish(b"a.b".to_vec()).to_string(),
            r#"Permissions Violation for Publish to "a.b""#
        );
        let sub = PermissionViolation::Subscribe {
            subject: b"x.>".to_vec(),
            queue: Some(b"q".to_vec()),
        };
        assert_eq!(
            sub.to_string(),
            r#"Permissions Violation for Subscription to "x.>" using queue "q""#
        );
        assert_eq!(go_quote(b"a\"b\\\x01\xff"), r#""a\"b\\\x01\xff""#);
    }

    #[test]
    fn secrets_do_not_show_in_debug_output() {
        let config = AuthorizationConfig {
            token: Some(Secret("hunter2".into())),
            ..Default::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
