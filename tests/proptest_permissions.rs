//! Property tests of the permission matcher against a naive model built on
//! `skiff::subject::matches_pattern` and brute force: every literal subject
//! of up to four tokens over an alphabet that has tokens the patterns never
//! use (so `*` is never "covered" by a list of literals by accident).

#[path = "../fuzz/common/checks.rs"]
mod checks;

use checks::for_each_subject;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use skiff::auth::{Permissions, PublishCache, SubscribeCheck};
use skiff::config::authorization::{AllowDeny, PermissionsConfig, SubjectRulesConfig};
use skiff::subject::matches_pattern;

/// Pattern tokens: two of the four literals `for_each_subject` uses, and
/// the wildcards.
const TOKENS: [&[u8]; 3] = [b"a", b"b", b"*"];

fn pattern() -> impl Strategy<Value = Vec<u8>> {
    (vec(select(&TOKENS[..]), 0..3), any::<bool>()).prop_filter_map("empty", |(mut t, full)| {
        if full {
            t.push(b">");
        }
        (!t.is_empty()).then(|| t.join(&b'.'))
    })
}

fn text(patterns: &[Vec<u8>]) -> Vec<String> {
    patterns
        .iter()
        .map(|p| String::from_utf8(p.clone()).unwrap())
        .collect()
}

/// Every subject of up to four tokens.
fn universe() -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for_each_subject(4, |s| all.push(s.to_vec()));
    all
}

/// Naive: `pattern` receives only what `of` matches.
fn covered(universe: &[Vec<u8>], pattern: &[u8], of: &[u8]) -> bool {
    universe
        .iter()
        .all(|s| !matches_pattern(pattern, s) || matches_pattern(of, s))
}

fn overlap(universe: &[Vec<u8>], pattern: &[u8], other: &[u8]) -> bool {
    universe
        .iter()
        .any(|s| matches_pattern(pattern, s) && matches_pattern(other, s))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn matcher_agrees_with_the_naive_model(
        allow in proptest::option::of(vec(pattern(), 0..4)),
        deny in vec(pattern(), 0..3),
        probes in vec(pattern(), 1..6),
    ) {
        let rules = SubjectRulesConfig::Rules(AllowDeny {
            allow: allow.as_deref().map(text),
            deny: text(&deny),
        });
        let perms = Permissions::new(&PermissionsConfig {
            publish: Some(rules.clone()),
            subscribe: Some(rules),
            allow_responses: None,
        });
        let universe = universe();
        let mut cache = PublishCache::default();
        for s in &universe {
            let allowed = allow.as_ref().is_none_or(|a| a.iter().any(|p| matches_pattern(p, s)))
                && !deny.iter().any(|d| matches_pattern(d, s));
            prop_assert_eq!(perms.can_publish(s), allowed, "publish {:?}", String::from_utf8_lossy(s));
            prop_assert_eq!(cache.can_publish(&perms, s), allowed);
            prop_assert_eq!(perms.denies_delivery(s), deny.iter().any(|d| matches_pattern(d, s)));
        }
        for p in &probes {
            let inside = allow.as_ref().is_none_or(|a| a.iter().any(|o| covered(&universe, p, o)));
            let expected = if !inside || deny.iter().any(|d| covered(&universe, p, d)) {
                SubscribeCheck::Refused
            } else if deny.iter().any(|d| overlap(&universe, p, d)) {
                SubscribeCheck::Filtered
            } else {
                SubscribeCheck::Allowed
            };
            prop_assert_eq!(perms.check_subscribe(p), expected, "subscribe {:?}", String::from_utf8_lossy(p));
        }
    }
}
