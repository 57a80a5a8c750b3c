//! The sublist: which subscriptions want a subject.
//!
//! A trie over subject tokens, with a `*` and a `>` child per level, like
//! nats-server's sublist. Matching walks only the branches a subject can reach,
//! so its cost depends on the subject's length, not on the number of
//! subscriptions. Results are cached per subject because publishers repeat
//! subjects far more often than subscriptions change.
//!
//! Invariants:
//! - The cache never holds a result older than the trie: every change to the
//!   trie drops the cached results of the subjects the changed pattern
//!   matches while holding the trie's write lock, and a result is cached
//!   while still holding the read lock it was computed under.
//! - Empty trie nodes are pruned on removal, so churn does not grow memory.
//! - The cache is bounded ([`CACHE_MAX`] subjects); when full, a quarter of
//!   it is dropped.
//! - A subject is cached only when it misses the cache a second time (a
//!   "doorkeeper" of recent misses decides), so one-off subjects such as
//!   request inboxes and PubAck replies neither pay for a cache entry nor
//!   push hot subjects out.
//!
//! The sublist is generic over what a subscription is (`T`): it knows nothing
//! of connections, streams or routes, only of patterns, queue names and
//! items compared with `==`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::RwLock;

use crate::subject::{self, FULL_WILDCARD, SINGLE_WILDCARD};

/// Most subjects kept in the match cache before it is cleared.
pub const CACHE_MAX: usize = 4096;
/// Slots of the doorkeeper, each holding the hash of a subject that missed
/// the cache once.
const SEEN_SLOTS: usize = 4096;

/// The pattern given to [`Sublist::insert`] is not a valid subscription
/// subject.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Invalid Subject")]
pub struct InvalidSubject;

/// Members of one queue group that match a subject: each message goes to one.
#[derive(Debug)]
pub struct QueueGroup<T> {
    pub name: Bytes,
    pub members: Vec<T>,
    next: AtomicUsize,
}

impl<T> QueueGroup<T> {
    /// The member for the next message: round-robin, so members share the
    /// work evenly.
    pub fn pick(&self) -> &T {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        &self.members[n % self.members.len()]
    }

    /// Like [`QueueGroup::pick`], among the members `eligible` accepts
    /// (`None` if there are none).
    pub fn pick_where(&self, eligible: impl Fn(&T) -> bool) -> Option<&T> {
        let count = self.members.iter().filter(|m| eligible(m)).count();
        if count == 0 {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.members.iter().filter(|m| eligible(m)).nth(n % count)
    }

    /// The member for the next message, each with a share proportional to
    /// its `weight` (a member standing for several, as a peer node's does,
    /// weighs their number): a weighted round-robin, so shares are exact
    /// over time. Two passes over the members, no allocation. `None` when
    /// all weights are 0 (or they changed between the passes).
    pub fn pick_weighted(&self, weight: impl Fn(&T) -> u32) -> Option<&T> {
        let total: u64 = self.members.iter().map(|m| u64::from(weight(m))).sum();
        if total == 0 {
            return None;
        }
        let mut at = self.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
        for member in &self.members {
            let w = u64::from(weight(member));
            if at < w {
                return Some(member);
            }
            at -= w;
        }
        None
    }
}

/// Everything that matches one subject.
#[derive(Debug)]
pub struct Matches<T> {
    /// Plain subscriptions: each gets every message.
    pub plain: Vec<T>,
    /// Queue groups (merged by name across patterns): one member each.
    pub queues: Vec<QueueGroup<T>>,
}

impl<T> Matches<T> {
    pub fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.queues.is_empty()
    }
}

struct Node<T> {
    next: Option<Box<Level<T>>>,
    plain: Vec<T>,
    queues: Vec<(Bytes, Vec<T>)>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            next: None,
            plain: Vec::new(),
            queues: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.queues.is_empty() && self.next.is_none()
    }
}

struct Level<T> {
    literal: HashMap<Box<[u8]>, Node<T>, ahash::RandomState>,
    single: Option<Box<Node<T>>>,
    full: Option<Box<Node<T>>>,
}

impl<T> Default for Level<T> {
    fn default() -> Self {
        Level {
            literal: HashMap::default(),
            single: None,
            full: None,
        }
    }
}

impl<T> Level<T> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.single.is_none() && self.full.is_none()
    }

    fn child_mut(&mut self, token: &[u8]) -> &mut Node<T> {
        if token == FULL_WILDCARD {
            self.full.get_or_insert_with(Box::default)
        } else if token == SINGLE_WILDCARD {
            self.single.get_or_insert_with(Box::default)
        } else {
            self.literal.entry(token.into()).or_default()
        }
    }
}

/// The subscription index. Cheap to share (`&Sublist` is enough to match,
/// insert and remove).
pub struct Sublist<T> {
    root: RwLock<Level<T>>,
    cache: DashMap<Bytes, Arc<Matches<T>>, ahash::RandomState>,
    count: AtomicUsize,
    /// Lookups the cache did not answer (counted on the slow path only;
    /// hits are lookups minus misses, lookups being counted by the caller).
    misses: AtomicU64,
    /// The doorkeeper: hashes of subjects that missed once (see the module
    /// doc). A collision only means a subject is cached a miss later.
    seen: Box<[AtomicU64]>,
    hasher: ahash::RandomState,
}

impl<T: Clone + PartialEq> Default for Sublist<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone + PartialEq> Sublist<T> {
    pub fn new() -> Self {
        Sublist {
            root: RwLock::new(Level::default()),
            cache: DashMap::default(),
            count: AtomicUsize::new(0),
            misses: AtomicU64::new(0),
            seen: (0..SEEN_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: ahash::RandomState::new(),
        }
    }

    /// Number of subscriptions held.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Lookups the match cache did not answer, since start.
    pub fn cache_misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Subjects whose matches are cached.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Adds `item` under `pattern`, in queue group `queue` if given.
    pub fn insert(
        &self,
        pattern: &[u8],
        queue: Option<&[u8]>,
        item: T,
    ) -> Result<(), InvalidSubject> {
        if !subject::is_valid_subject(pattern) {
            return Err(InvalidSubject);
        }
        let mut root = self.root.write();
        let mut level = &mut *root;
        let mut tokens = subject::tokens(pattern).peekable();
        let node = loop {
            let token = tokens.next().unwrap_or_default();
            let node = level.child_mut(token);
            if tokens.peek().is_none() {
                break node;
            }
            level = node.next.get_or_insert_with(Box::default);
        };
        match queue {
            None => node.plain.push(item),
            Some(q) => match node.queues.iter_mut().find(|(name, _)| name == q) {
                Some((_, members)) => members.push(item),
                None => node.queues.push((Bytes::copy_from_slice(q), vec![item])),
            },
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.invalidate(pattern);
        Ok(())
    }

    /// Removes `item` from `pattern` (and `queue`); `false` if it was not
    /// there.
    pub fn remove(&self, pattern: &[u8], queue: Option<&[u8]>, item: &T) -> bool {
        let tokens: Vec<&[u8]> = subject::tokens(pattern).collect();
        let mut root = self.root.write();
        let removed = remove_from(&mut root, &tokens, queue, item);
        if removed {
            self.count.fetch_sub(1, Ordering::Relaxed);
            self.invalidate(pattern);
        }
        removed
    }

    /// Makes room by dropping a quarter of the cache, chosen by hash order
    /// (so roughly at random). Clearing it all would make a stream of
    /// one-off subjects (request inboxes, PubAck replies) evict the hot
    /// subjects every few thousand messages.
    fn evict(&self) {
        let mut seen = 0usize;
        self.cache.retain(|_, _| {
            seen += 1;
            !seen.is_multiple_of(4)
        });
    }

    /// Drops the cached results a change to `pattern` affects: those of the
    /// subjects it matches. The others stay valid, so subscription churn on
    /// one subject (request inboxes) does not slow publishers on others.
    /// Called with the trie's write lock held.
    fn invalidate(&self, pattern: &[u8]) {
        self.cache
            .retain(|cached, _| !subject::matches_pattern(pattern, cached));
    }

    /// Whether `subject` missed the cache recently; records it if not.
    fn seen_before(&self, subject: &[u8]) -> bool {
        let hash = self.hasher.hash_one(subject);
        let slot = &self.seen[hash as usize % SEEN_SLOTS];
        slot.swap(hash, Ordering::Relaxed) == hash
    }

    /// All subscriptions matching the literal `subject`.
    pub fn matches(&self, subject: &[u8]) -> Arc<Matches<T>> {
        if let Some(hit) = self.cache.get(subject) {
            return Arc::clone(hit.value());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let root = self.root.read();
        let tokens: Vec<&[u8]> = subject::tokens(subject).collect();
        let mut found = Matches {
            plain: Vec::new(),
            queues: Vec::new(),
        };
        collect(&root, &tokens, &mut found);
        let found = Arc::new(found);
        if !self.seen_before(subject) {
            return found;
        }
        if self.cache.len() >= CACHE_MAX {
            self.evict();
        }
        self.cache
            .insert(Bytes::copy_from_slice(subject), Arc::clone(&found));
        found
    }
}

fn add_node<T: Clone>(node: &Node<T>, found: &mut Matches<T>) {
    found.plain.extend_from_slice(&node.plain);
    for (name, members) in &node.queues {
        match found.queues.iter_mut().find(|g| g.name == name) {
            Some(group) => group.members.extend_from_slice(members),
            None => found.queues.push(QueueGroup {
                name: name.clone(),
                members: members.clone(),
                // A random start: a cached result lives only until the
                // next subscription change, and restarting at 0 each time
                // would send every message to the first member.
                next: AtomicUsize::new(rand::random()),
            }),
        }
    }
}

fn collect<T: Clone>(level: &Level<T>, tokens: &[&[u8]], found: &mut Matches<T>) {
    let Some((token, rest)) = tokens.split_first() else {
        return;
    };
    if let Some(full) = &level.full {
        add_node(full, found);
    }
    let children = level
        .single
        .as_deref()
        .into_iter()
        .chain(level.literal.get(*token));
    for child in children {
        match (rest.is_empty(), &child.next) {
            (true, _) => add_node(child, found),
            (false, Some(next)) => collect(next, rest, found),
            (false, None) => {}
        }
    }
}

/// Removes `item` below `level`, pruning nodes left empty. Returns whether
/// it was found.
fn remove_from<T: PartialEq>(
    level: &mut Level<T>,
    tokens: &[&[u8]],
    queue: Option<&[u8]>,
    item: &T,
) -> bool {
    let Some((token, rest)) = tokens.split_first() else {
        return false;
    };
    let node = if *token == FULL_WILDCARD {
        level.full.as_deref_mut()
    } else if *token == SINGLE_WILDCARD {
        level.single.as_deref_mut()
    } else {
        level.literal.get_mut(*token)
    };
    let Some(node) = node else {
        return false;
    };
    let removed = if rest.is_empty() {
        remove_item(node, queue, item)
    } else {
        let removed = node
            .next
            .as_deref_mut()
            .is_some_and(|next| remove_from(next, rest, queue, item));
        if node.next.as_deref().is_some_and(Level::is_empty) {
            node.next = None;
        }
        removed
    };
    if node.is_empty() {
        if *token == FULL_WILDCARD {
            level.full = None;
        } else if *token == SINGLE_WILDCARD {
            level.single = None;
        } else {
            level.literal.remove(*token);
        }
    }
    removed
}

fn remove_item<T: PartialEq>(node: &mut Node<T>, queue: Option<&[u8]>, item: &T) -> bool {
    let list = match queue {
        None => &mut node.plain,
        Some(q) => match node.queues.iter_mut().find(|(name, _)| name == q) {
            Some((_, members)) => members,
            None => return false,
        },
    };
    let Some(at) = list.iter().position(|x| x == item) else {
        return false;
    };
    list.swap_remove(at);
    node.queues.retain(|(_, members)| !members.is_empty());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(m: &Matches<u32>) -> Vec<u32> {
        let mut v = m.plain.clone();
        v.sort();
        v
    }

    #[test]
    fn literal_and_wildcards_match() {
        let s = Sublist::new();
        s.insert(b"foo.bar", None, 1).unwrap();
        s.insert(b"foo.*", None, 2).unwrap();
        s.insert(b"foo.>", None, 3).unwrap();
        s.insert(b">", None, 4).unwrap();
        s.insert(b"foo", None, 5).unwrap();
        assert_eq!(names(&s.matches(b"foo.bar")), vec![1, 2, 3, 4]);
        assert_eq!(names(&s.matches(b"foo.baz.qux")), vec![3, 4]);
        assert_eq!(names(&s.matches(b"foo")), vec![4, 5]);
        assert_eq!(names(&s.matches(b"bar")), vec![4]);
    }

    #[test]
    fn removal_prunes_and_invalidates_cache() {
        let s = Sublist::new();
        s.insert(b"a.b.c", None, 1).unwrap();
        assert_eq!(names(&s.matches(b"a.b.c")), vec![1]);
        assert!(s.remove(b"a.b.c", None, &1));
        assert!(!s.remove(b"a.b.c", None, &1));
        assert!(s.matches(b"a.b.c").is_empty());
        assert!(s.root.read().is_empty());
        assert_eq!(s.count(), 0);
    }

    #[test]
    fn queue_groups_merge_by_name_and_rotate() {
        let s = Sublist::new();
        s.insert(b"work.*", Some(b"q"), 1).unwrap();
        s.insert(b"work.a", Some(b"q"), 2).unwrap();
        s.insert(b"work.a", Some(b"other"), 3).unwrap();
        let m = s.matches(b"work.a");
        assert_eq!(m.queues.len(), 2);
        let q = m.queues.iter().find(|g| &g.name[..] == b"q").unwrap();
        let picks: Vec<u32> = (0..4).map(|_| *q.pick()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == 1).count(), 2);
        assert_eq!(picks.iter().filter(|&&p| p == 2).count(), 2);
    }

    #[test]
    fn weighted_picks_give_each_member_its_weights_share() {
        let s = Sublist::new();
        for member in [1, 2, 3] {
            s.insert(b"work", Some(b"q"), member).unwrap();
        }
        let m = s.matches(b"work");
        let q = &m.queues[0];
        // Member 3 stands for three, member 2 for none.
        let weight = |m: &u32| if *m == 2 { 0 } else { *m };
        let mut shares = [0; 4];
        for _ in 0..400 {
            shares[*q.pick_weighted(weight).unwrap() as usize] += 1;
        }
        assert_eq!(shares, [0, 100, 0, 300]);
        assert!(q.pick_weighted(|_| 0).is_none());
    }

    #[test]
    fn a_full_cache_drops_a_part_not_everything() {
        let s = Sublist::new();
        s.insert(b"_INBOX.>", None, 1).unwrap();
        for i in 0..CACHE_MAX * 2 {
            let subject = format!("_INBOX.{i}");
            for _ in 0..2 {
                assert_eq!(names(&s.matches(subject.as_bytes())), vec![1]);
            }
            assert!(s.cache.len() <= CACHE_MAX);
        }
        assert!(s.cache.len() > CACHE_MAX / 2, "{}", s.cache.len());
    }

    #[test]
    fn only_subjects_seen_twice_are_cached() {
        let s = Sublist::new();
        s.insert(b"_INBOX.>", None, 1).unwrap();
        for i in 0..CACHE_MAX * 2 {
            let m = s.matches(format!("_INBOX.{i}").as_bytes());
            assert_eq!(names(&m), vec![1]);
        }
        assert_eq!(s.cache.len(), 0, "one-off subjects were cached");
        s.matches(b"orders.new");
        assert!(!s.cache.contains_key(&b"orders.new"[..]));
        s.matches(b"orders.new");
        assert!(s.cache.contains_key(&b"orders.new"[..]));
    }

    #[test]
    fn invalid_patterns_are_refused() {
        let s: Sublist<u32> = Sublist::new();
        assert_eq!(s.insert(b"foo..bar", None, 1), Err(InvalidSubject));
        assert_eq!(s.insert(b"foo.>.bar", None, 1), Err(InvalidSubject));
    }
}
