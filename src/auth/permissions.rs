//! What one user may publish and subscribe to, compiled from the config for
//! fast checks, and the per-connection state the checks need.
//!
//! Rules, as in nats-server:
//! - no allow list means everything is allowed; an allow list allows only
//!   what it matches; the deny list always wins;
//! - a subscription is refused when its subject is not inside an allowed
//!   pattern, or lies wholly inside a denied one. A wildcard subscription
//!   that only *overlaps* a denied pattern is accepted and flagged: at
//!   delivery, messages on denied subjects are dropped for it
//!   ([`Permissions::denies_delivery`]), so the cost is paid only by flagged
//!   subscriptions;
//! - with `allow_responses`, a client may publish to the reply subject of a
//!   request delivered to it, up to `max` times within `expires`, even where
//!   its publish rules say no ([`Replies`]).
//!
//! Literal subjects (publish, delivery) are matched through a [`Sublist`]
//! of the patterns, whose match cache is shared by all connections of the
//! user; each connection also keeps a small [`PublishCache`] of answers so a
//! repeated publish subject costs one hash lookup.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::subject;
use crate::sublist::Sublist;

use crate::config::authorization::{AllowDeny, PermissionsConfig};

/// Most subjects a connection remembers publish answers for (nats-server's
/// `maxPermCacheSize`). When full it is cleared: refilling costs a sublist
/// lookup per subject, and publishers rarely use this many subjects.
pub const PUBLISH_CACHE_MAX: usize = 128;
/// Most reply subjects remembered for `allow_responses` per connection
/// (nats-server's `replyPermLimit`); when full, expired ones are pruned and,
/// if that is not enough, the oldest go.
pub const REPLIES_MAX: usize = 10_000;

/// Allow and deny patterns of one direction (publish or subscribe).
struct Rules {
    /// `None`: everything is allowed (unless denied).
    allow: Option<Patterns>,
    deny: Option<Patterns>,
}

/// Patterns as a list (for subset/overlap questions about wildcard
/// subscriptions) and as a sublist (for literal subjects, cached).
struct Patterns {
    list: Vec<Vec<u8>>,
    trie: Sublist<u32>,
}

impl Patterns {
    /// `None` when there is nothing to match.
    fn new(list: &[String]) -> Patterns {
        let trie = Sublist::new();
        for (i, p) in list.iter().enumerate() {
            // Validated with the config; an invalid one cannot match.
            let _ = trie.insert(p.as_bytes(), None, i as u32);
        }
        Patterns {
            list: list.iter().map(|p| p.as_bytes().to_vec()).collect(),
            trie,
        }
    }

    fn matches(&self, literal: &[u8]) -> bool {
        !self.trie.matches(literal).is_empty()
    }

    fn covers(&self, pattern: &[u8]) -> bool {
        self.list
            .iter()
            .any(|p| subject::pattern_is_subset(pattern, p))
    }

    fn overlaps(&self, pattern: &[u8]) -> bool {
        self.list
            .iter()
            .any(|p| subject::patterns_overlap(pattern, p))
    }
}

impl Rules {
    fn new(rules: Option<AllowDeny>) -> Rules {
        let Some(AllowDeny { allow, deny }) = rules else {
            return Rules {
                allow: None,
                deny: None,
            };
        };
        Rules {
            allow: allow.as_deref().map(Patterns::new),
            deny: (!deny.is_empty()).then(|| Patterns::new(&deny)),
        }
    }

    /// A literal subject is allowed.
    fn allows(&self, literal: &[u8]) -> bool {
        self.allow.as_ref().is_none_or(|a| a.matches(literal))
            && !self.deny.as_ref().is_some_and(|d| d.matches(literal))
    }
}

/// What a SUB may become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscribeCheck {
    /// Refused with a permissions violation.
    Refused,
    /// Accepted; every message it can match is allowed.
    Allowed,
    /// Accepted, but it overlaps denied subjects: filter at delivery.
    Filtered,
}

/// The compiled permissions of one user, shared by its connections.
pub struct Permissions {
    publish: Rules,
    subscribe: Rules,
    /// `(max, expires)` for replies to received requests.
    responses: Option<(usize, Duration)>,
}

impl Permissions {
    pub fn new(config: &PermissionsConfig) -> Permissions {
        let responses = config.allow_responses.as_ref().and_then(|r| r.limits());
        let mut publish = config.publish.as_ref().map(|r| r.allow_deny());
        // nats-server: allowing responses without a publish allow list turns
        // off the blanket allow, so such a user publishes replies only.
        if responses.is_some() {
            let rules = publish.get_or_insert_with(AllowDeny::default);
            rules.allow.get_or_insert_with(Vec::new);
        }
        Permissions {
            publish: Rules::new(publish),
            subscribe: Rules::new(config.subscribe.as_ref().map(|r| r.allow_deny())),
            responses,
        }
    }

    /// Whether the publish rules allow `subject` (not counting replies).
    pub fn can_publish(&self, subject: &[u8]) -> bool {
        self.publish.allows(subject)
    }

    /// Whether `subject` (a valid subscription subject) may be subscribed.
    pub fn check_subscribe(&self, pattern: &[u8]) -> SubscribeCheck {
        let rules = &self.subscribe;
        if !rules.allow.as_ref().is_none_or(|a| a.covers(pattern)) {
            return SubscribeCheck::Refused;
        }
        match &rules.deny {
            Some(d) if d.covers(pattern) => SubscribeCheck::Refused,
            Some(d) if d.overlaps(pattern) => SubscribeCheck::Filtered,
            _ => SubscribeCheck::Allowed,
        }
    }

    /// Whether a message on `subject` must not reach a flagged subscription.
    pub fn denies_delivery(&self, subject: &[u8]) -> bool {
        self.subscribe
            .deny
            .as_ref()
            .is_some_and(|d| d.matches(subject))
    }

    /// `(max, expires)` when replies to received requests are allowed.
    pub fn responses(&self) -> Option<(usize, Duration)> {
        self.responses
    }
}

/// A connection's memory of publish answers: see [`PUBLISH_CACHE_MAX`].
#[derive(Default)]
pub struct PublishCache {
    answers: HashMap<Box<[u8]>, bool, ahash::RandomState>,
}

impl PublishCache {
    /// `perms.can_publish(subject)`, from the cache when possible.
    pub fn can_publish(&mut self, perms: &Permissions, subject: &[u8]) -> bool {
        if let Some(&answer) = self.answers.get(subject) {
            return answer;
        }
        let answer = perms.can_publish(subject);
        if self.answers.len() >= PUBLISH_CACHE_MAX {
            self.answers.clear();
        }
        self.answers.insert(subject.into(), answer);
        answer
    }
}

/// Reply subjects of requests delivered to a connection whose user has
/// `allow_responses`: how many replies each has had, and since when.
/// Bounded by [`REPLIES_MAX`].
pub struct Replies {
    max: usize,
    expires: Duration,
    open: HashMap<Box<[u8]>, (Instant, usize), ahash::RandomState>,
}

impl Replies {
    pub fn new(max: usize, expires: Duration) -> Replies {
        Replies {
            max,
            expires,
            open: HashMap::default(),
        }
    }

    /// A request with this reply subject was delivered.
    pub fn record(&mut self, reply: &[u8], now: Instant) {
        if self.open.len() >= REPLIES_MAX && !self.open.contains_key(reply) {
            self.prune(now);
        }
        self.open.insert(reply.into(), (now, 0));
    }

    /// Uses up one reply to `subject`; `false` if none is left (never
    /// recorded, used `max` times, or expired).
    pub fn consume(&mut self, subject: &[u8], now: Instant) -> bool {
        let Some((at, used)) = self.open.get_mut(subject) else {
            return false;
        };
        if now.duration_since(*at) > self.expires {
            self.open.remove(subject);
            return false;
        }
        *used += 1;
        if *used >= self.max {
            self.open.remove(subject);
        }
        true
    }

    /// Number of reply subjects remembered.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Drops expired entries; if none were, the oldest half.
    fn prune(&mut self, now: Instant) {
        let expires = self.expires;
        self.open
            .retain(|_, (at, _)| now.duration_since(*at) <= expires);
        if self.open.len() >= REPLIES_MAX {
            let mut times: Vec<Instant> = self.open.values().map(|(at, _)| *at).collect();
            times.sort_unstable();
            let cut = times[times.len() / 2];
            self.open.retain(|_, (at, _)| *at > cut);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::authorization::{AllowResponsesConfig, SubjectRulesConfig};

    fn rules(allow: Option<&[&str]>, deny: &[&str]) -> Option<SubjectRulesConfig> {
        Some(SubjectRulesConfig::Rules(AllowDeny {
            allow: allow.map(|a| a.iter().map(|s| s.to_string()).collect()),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }))
    }

    #[test]
    fn deny_wins_over_allow() {
        let p = Permissions::new(&PermissionsConfig {
            publish: rules(Some(&["orders.>"]), &["orders.secret"]),
            ..Default::default()
        });
        assert!(p.can_publish(b"orders.eu"));
        assert!(!p.can_publish(b"orders.secret"));
        assert!(!p.can_publish(b"billing.eu"));
        // No subscribe rules: everything.
        assert_eq!(p.check_subscribe(b">"), SubscribeCheck::Allowed);
    }

    #[test]
    fn wildcard_subscriptions_inside_overlapping_or_outside() {
        let p = Permissions::new(&PermissionsConfig {
            subscribe: rules(Some(&["devices.*.>"]), &["devices.*.admin"]),
            ..Default::default()
        });
        assert_eq!(
            p.check_subscribe(b"devices.7.temp"),
            SubscribeCheck::Allowed
        );
        assert_eq!(p.check_subscribe(b"devices.7.>"), SubscribeCheck::Filtered);
        assert_eq!(
            p.check_subscribe(b"devices.7.admin"),
            SubscribeCheck::Refused
        );
        assert_eq!(p.check_subscribe(b"devices.>"), SubscribeCheck::Refused);
        assert!(p.denies_delivery(b"devices.7.admin"));
        assert!(!p.denies_delivery(b"devices.7.temp"));
    }

    #[test]
    fn responses_alone_allow_no_other_publish() {
        let p = Permissions::new(&PermissionsConfig {
            allow_responses: Some(AllowResponsesConfig::Enabled(true)),
            ..Default::default()
        });
        assert!(!p.can_publish(b"anything"));
        assert_eq!(
            p.responses(),
            Some((
                crate::config::authorization::DEFAULT_RESPONSE_MAX,
                Duration::from_secs(120)
            ))
        );
    }

    #[test]
    fn replies_are_used_up_and_expire() {
        let now = Instant::now();
        let mut r = Replies::new(2, Duration::from_secs(10));
        r.record(b"_INBOX.a", now);
        assert!(r.consume(b"_INBOX.a", now));
        assert!(r.consume(b"_INBOX.a", now));
        assert!(!r.consume(b"_INBOX.a", now));
        r.record(b"_INBOX.b", now);
        assert!(!r.consume(b"_INBOX.b", now + Duration::from_secs(11)));
        assert!(!r.consume(b"_INBOX.never", now));
        assert!(r.is_empty());
    }

    #[test]
    fn replies_stay_bounded() {
        let now = Instant::now();
        let mut r = Replies::new(1, Duration::from_secs(60));
        for i in 0..REPLIES_MAX + 10 {
            let at = now + Duration::from_millis(i as u64);
            r.record(format!("_INBOX.{i}").as_bytes(), at);
        }
        assert!(r.len() <= REPLIES_MAX);
        let last = format!("_INBOX.{}", REPLIES_MAX + 9);
        assert!(r.consume(last.as_bytes(), now + Duration::from_secs(1)));
    }

    #[test]
    fn publish_cache_agrees_and_stays_bounded() {
        let p = Permissions::new(&PermissionsConfig {
            publish: rules(None, &["x.*"]),
            ..Default::default()
        });
        let mut cache = PublishCache::default();
        for i in 0..PUBLISH_CACHE_MAX * 2 {
            let s = format!("x.{i}");
            assert!(!cache.can_publish(&p, s.as_bytes()));
            assert!(cache.can_publish(&p, format!("y.{i}").as_bytes()));
            assert!(cache.answers.len() <= PUBLISH_CACHE_MAX);
        }
    }
}
