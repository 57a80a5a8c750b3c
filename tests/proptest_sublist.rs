//! Property tests of the sublist against the naive reference matcher
//! (`skiff::subject::matches_pattern` over every live subscription).
//!
//! Patterns and subjects use a small token alphabet so that matches, overlaps
//! and wildcards are common; inserts, removes and matches are interleaved so
//! that a stale match cache would be noticed. The model itself lives in
//! `fuzz/common/checks.rs`, shared with the `sublist` fuzz target.

#[path = "../fuzz/common/checks.rs"]
mod checks;

use checks::{for_each_subject, SublistModel, LITERALS, QUEUES};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{select, Index};

#[derive(Clone, Debug)]
enum Op {
    Insert(Vec<u8>, Option<&'static [u8]>, u32),
    /// Remove the nth live subscription.
    RemoveLive(Index),
    /// Remove something that is probably not there (wrong item or queue).
    RemoveAny(Vec<u8>, Option<&'static [u8]>, u32),
    Match(Vec<u8>),
}

fn join(tokens: Vec<&[u8]>) -> Vec<u8> {
    tokens.join(&b'.')
}

/// A valid pattern: literal tokens and `*`, maybe ending in `>`.
fn pattern() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        4 => select(&LITERALS[..]),
        2 => Just(&b"*"[..]),
    ];
    (vec(token, 0..4), any::<bool>()).prop_filter_map("empty pattern", |(mut tokens, full)| {
        if full {
            tokens.push(b">");
        }
        (!tokens.is_empty()).then(|| join(tokens))
    })
}

/// Patterns that must be refused.
fn invalid_pattern() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"".to_vec()),
        Just(b"a..b".to_vec()),
        Just(b".a".to_vec()),
        Just(b"a.".to_vec()),
        Just(b"a.>.b".to_vec()),
        Just(b">.>".to_vec()),
        Just(b"a b".to_vec()),
        Just(b"a.\tb".to_vec()),
    ]
}

fn literal() -> impl Strategy<Value = Vec<u8>> {
    vec(select(&LITERALS[..]), 1..5).prop_map(join)
}

fn queue() -> impl Strategy<Value = Option<&'static [u8]>> {
    option::weighted(0.4, select(&QUEUES[..]))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (pattern(), queue(), 0u32..12).prop_map(|(p, q, i)| Op::Insert(p, q, i)),
        1 => (invalid_pattern(), queue(), 0u32..12).prop_map(|(p, q, i)| Op::Insert(p, q, i)),
        3 => any::<Index>().prop_map(Op::RemoveLive),
        1 => (pattern(), queue(), 0u32..12).prop_map(|(p, q, i)| Op::RemoveAny(p, q, i)),
        5 => literal().prop_map(Op::Match),
    ]
}

fn run(ops: &[Op]) -> SublistModel {
    let mut model = SublistModel::new();
    for op in ops {
        run_one(&mut model, op);
    }
    model
}

proptest! {
    /// After any sequence of changes the sublist answers every subject
    /// exactly as the reference does.
    #[test]
    fn matches_agree_with_reference(ops in vec(op(), 0..60)) {
        let model = run(&ops);
        for_each_subject(3, |s| model.check(s));
    }

    /// Every subject is matched (and so cached) before each change, then
    /// checked again after it: a result cached before the change must not be
    /// served after it.
    #[test]
    fn cache_never_serves_stale_results(ops in vec(op(), 1..25)) {
        let mut model = SublistModel::new();
        for op in &ops {
            for_each_subject(2, |s| model.check(s));
            run_one(&mut model, op);
            for_each_subject(2, |s| model.check(s));
        }
    }

    /// Removing everything leaves nothing to match, whatever the order.
    #[test]
    fn removing_everything_empties(
        ops in vec((pattern(), queue(), 0u32..12), 0..40),
        order in vec(any::<Index>(), 40),
    ) {
        let mut model = SublistModel::new();
        for (p, q, i) in &ops {
            model.insert(p, *q, *i);
        }
        for_each_subject(3, |s| model.check(s));
        for n in order.iter().take(ops.len()) {
            let at = n.index(model.live.len());
            model.remove_live(at);
        }
        prop_assert_eq!(model.list.count(), 0);
        for_each_subject(3, |s| assert!(model.list.matches(s).is_empty()));
    }
}

fn run_one(model: &mut SublistModel, op: &Op) {
    match op {
        Op::Insert(p, q, i) => model.insert(p, *q, *i),
        Op::RemoveLive(n) => {
            if !model.live.is_empty() {
                model.remove_live(n.index(model.live.len()));
            }
        }
        Op::RemoveAny(p, q, i) => model.remove(p, *q, *i),
        Op::Match(s) => model.check(s),
    }
}
