//! Subjects: validation and tokenising, with nats-server's rules.
//!
//! A subject is a non-empty sequence of `.`-separated tokens, none empty and
//! none containing whitespace. In a subscription a token may be the wildcard
//! `*` (exactly one token) or, as the last token only, `>` (one or more
//! tokens). A token that merely contains `*` or `>` (`foo*`) is a literal.
//! A publish subject must be literal: no wildcard tokens at all.

/// Separator between tokens.
pub const SEPARATOR: u8 = b'.';
/// Matches exactly one token.
pub const SINGLE_WILDCARD: &[u8] = b"*";
/// Matches one or more trailing tokens.
pub const FULL_WILDCARD: &[u8] = b">";

/// The tokens of a subject, in order.
pub fn tokens(subject: &[u8]) -> impl Iterator<Item = &[u8]> {
    subject.split(|&b| b == SEPARATOR)
}

fn has_whitespace(token: &[u8]) -> bool {
    token
        .iter()
        .any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0c'))
}

/// Valid as a subscription subject (wildcards allowed).
pub fn is_valid_subject(subject: &[u8]) -> bool {
    if subject.is_empty() {
        return false;
    }
    let mut after_full_wildcard = false;
    for token in tokens(subject) {
        if token.is_empty() || after_full_wildcard || has_whitespace(token) {
            return false;
        }
        after_full_wildcard = token == FULL_WILDCARD;
    }
    true
}

/// Valid as a publish subject: valid, and no wildcard tokens.
pub fn is_valid_literal_subject(subject: &[u8]) -> bool {
    is_valid_subject(subject) && tokens(subject).all(|t| t != SINGLE_WILDCARD && t != FULL_WILDCARD)
}

/// Whether a literal `subject` is matched by the subscription `pattern`.
/// This is the reference definition the sublist is tested against.
pub fn matches_pattern(pattern: &[u8], subject: &[u8]) -> bool {
    let mut subject_tokens = tokens(subject);
    for p in tokens(pattern) {
        if p == FULL_WILDCARD {
            return subject_tokens.next().is_some();
        }
        match subject_tokens.next() {
            Some(s) if p == SINGLE_WILDCARD || p == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// Whether two subscription patterns can match a common subject (stream
/// subjects must not overlap).
pub fn patterns_overlap(a: &[u8], b: &[u8]) -> bool {
    let mut a_tokens = tokens(a);
    let mut b_tokens = tokens(b);
    loop {
        match (a_tokens.next(), b_tokens.next()) {
            (None, None) => return true,
            (Some(x), Some(y)) if x == FULL_WILDCARD || y == FULL_WILDCARD => return true,
            (Some(x), Some(y)) if x == SINGLE_WILDCARD || y == SINGLE_WILDCARD || x == y => {}
            _ => return false,
        }
    }
}

/// Whether every subject `pattern` matches is also matched by `of`: a
/// subscription to `pattern` can only ever receive what `of` allows
/// (permission checks on wildcard subscriptions).
pub fn pattern_is_subset(pattern: &[u8], of: &[u8]) -> bool {
    let mut p_tokens = tokens(pattern);
    for o in tokens(of) {
        let Some(p) = p_tokens.next() else {
            return false;
        };
        if o == FULL_WILDCARD {
            return true;
        }
        // `>` in `pattern` reaches any depth; only `>` in `of` covers it.
        if p == FULL_WILDCARD || (p == SINGLE_WILDCARD && o != SINGLE_WILDCARD) {
            return false;
        }
        if o != SINGLE_WILDCARD && o != p {
            return false;
        }
    }
    p_tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_follows_nats_rules() {
        for ok in [
            "foo", "foo.bar", "foo.*", "foo.>", ">", "*.*", "foo*.bar", "a.b>",
        ] {
            assert!(is_valid_subject(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "foo.",
            ".foo",
            "foo..bar",
            "foo.>.bar",
            "foo bar",
            "a.\tb",
        ] {
            assert!(!is_valid_subject(bad.as_bytes()), "{bad}");
        }
        assert!(is_valid_literal_subject(b"foo.bar"));
        assert!(is_valid_literal_subject(b"foo*.bar"));
        assert!(!is_valid_literal_subject(b"foo.*"));
        assert!(!is_valid_literal_subject(b"foo.>"));
    }

    #[test]
    fn overlapping_patterns() {
        assert!(patterns_overlap(b"orders.*", b"orders.eu"));
        assert!(patterns_overlap(b"orders.>", b"*.eu.x"));
        assert!(patterns_overlap(b"a.b", b"a.b"));
        assert!(!patterns_overlap(b"orders.*", b"orders.eu.x"));
        assert!(!patterns_overlap(b"a", b"a.>"));
        assert!(!patterns_overlap(b"a.b", b"a.c"));
    }

    #[test]
    fn subset_patterns() {
        assert!(pattern_is_subset(b"a.b", b"a.*"));
        assert!(pattern_is_subset(b"a.*", b"a.*"));
        assert!(pattern_is_subset(b"a.*.c", b"a.>"));
        assert!(pattern_is_subset(b"a.>", b"a.>"));
        assert!(pattern_is_subset(b"a.>", b">"));
        assert!(!pattern_is_subset(b"a.>", b"a.*"));
        assert!(!pattern_is_subset(b"a.*", b"a.b"));
        assert!(!pattern_is_subset(b"a", b"a.>"));
        assert!(!pattern_is_subset(b"a.b.c", b"a.*"));
        assert!(!pattern_is_subset(b"a.b", b"a.b.c"));
    }

    #[test]
    fn wildcard_semantics() {
        assert!(matches_pattern(b"foo.*", b"foo.bar"));
        assert!(!matches_pattern(b"foo.*", b"foo.bar.baz"));
        assert!(!matches_pattern(b"foo.*", b"foo"));
        assert!(matches_pattern(b"foo.>", b"foo.bar.baz"));
        assert!(!matches_pattern(b"foo.>", b"foo"));
        assert!(matches_pattern(b">", b"foo"));
        assert!(matches_pattern(b"*.bar", b"foo.bar"));
        assert!(!matches_pattern(b"foo", b"foo.bar"));
    }
}
