//! One conformance suite for every stream store backend: each `fn(&Kind)`
//! below runs once against memory storage and once against file storage
//! (see `conformance!`), plus file-only tests (restart, corruption, group
//! commit) and `#[ignore]`d measurements.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use skiff::store::{
    message_size, FileStorage, MemoryStore, StoreError, StoreLimits, StreamState, StreamStore,
};
use tempfile::TempDir;

/// A store under test; for file storage also its directory (removed on drop).
struct Fixture {
    store: Arc<dyn StreamStore>,
    dir: Option<TempDir>,
}

impl std::ops::Deref for Fixture {
    type Target = dyn StreamStore;
    fn deref(&self) -> &Self::Target {
        &*self.store
    }
}

type Kind = fn(StoreLimits) -> Fixture;

fn memory(limits: StoreLimits) -> Fixture {
    Fixture {
        store: Arc::new(MemoryStore::new(limits)),
        dir: None,
    }
}

fn file(limits: StoreLimits) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::open(dir.path()).unwrap();
    let store = storage.open_stream("S", limits).unwrap();
    Fixture {
        store,
        dir: Some(dir),
    }
}

/// Closes a file fixture and opens it again from disk.
fn reopen(f: Fixture, limits: StoreLimits) -> Fixture {
    let Fixture { store, dir } = f;
    drop(store);
    let dir = dir.expect("file fixture");
    let storage = FileStorage::open(dir.path()).unwrap();
    assert_eq!(storage.stream_names().unwrap(), vec!["S".to_string()]);
    let store = storage.open_stream("S", limits).unwrap();
    Fixture {
        store,
        dir: Some(dir),
    }
}

fn filters(list: &[&str]) -> Vec<Bytes> {
    list.iter()
        .map(|s| Bytes::copy_from_slice(s.as_bytes()))
        .collect()
}

fn put(s: &dyn StreamStore, subject: &str, ts: i64) -> u64 {
    s.append(subject.as_bytes(), 0, b"data", ts).unwrap()
}

/// Size of a message stored by `put`.
fn size(subject: &str) -> u64 {
    message_size(subject.len(), 4)
}

fn next_seq(s: &dyn StreamStore, from: u64, f: &[&str]) -> Option<u64> {
    s.next_matching(from, &filters(f)).unwrap().map(|m| m.seq)
}

fn none() -> StoreLimits {
    StoreLimits::default()
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod memory_store {
            $( #[test] fn $test() { super::$test(super::memory) } )*
        }
        mod file_store {
            $( #[test] fn $test() { super::$test(super::file) } )*
        }
    };
}

conformance!(
    append_and_get,
    headers_are_kept,
    invalid_appends_are_refused,
    sequences_survive_purge,
    next_matching_filters,
    next_matching_many_subjects,
    last_for_subject_and_per_subject,
    seq_for_time_search,
    num_pending_counts,
    delete_interior_first_last,
    purge_variants,
    max_msgs_limit,
    max_bytes_limit,
    max_age_expiry,
    max_msgs_per_subject_limit,
    max_msg_size_limit,
    update_limits_enforces,
    records_kept,
    removed_store_is_closed,
    random_ops_match_model,
    batched_appends_match_single_appends,
    writer_sees_its_own_appends,
);

fn append_and_get(kind: Kind) {
    let s = kind(none());
    assert_eq!(
        s.state(),
        StreamState {
            first_seq: 1,
            ..Default::default()
        }
    );
    assert_eq!(put(&*s, "a", 10), 1);
    assert_eq!(put(&*s, "b.c", 20), 2);
    assert_eq!(put(&*s, "a", 30), 3);
    let m = s.get(2).unwrap().unwrap();
    assert_eq!(
        (m.seq, &m.subject[..], m.data(), m.timestamp),
        (2, &b"b.c"[..], &b"data"[..], 20)
    );
    assert!(s.get(0).unwrap().is_none());
    assert!(s.get(4).unwrap().is_none());
    assert_eq!(
        s.state(),
        StreamState {
            messages: 3,
            bytes: 2 * size("a") + size("b.c"),
            first_seq: 1,
            first_ts: 10,
            last_seq: 3,
            last_ts: 30,
            num_subjects: 2,
            num_deleted: 0,
        }
    );
    assert_eq!(
        s.subjects(b">").unwrap(),
        vec![
            (Bytes::from_static(b"a"), 2),
            (Bytes::from_static(b"b.c"), 1)
        ]
    );
    assert_eq!(s.subjects(b"b.*").unwrap().len(), 1);
}

fn headers_are_kept(kind: Kind) {
    let s = kind(none());
    let hdr = b"NATS/1.0\r\nX: y\r\n\r\n";
    let payload = [&hdr[..], b"body"].concat();
    let seq = s.append(b"h", hdr.len(), &payload, 1).unwrap();
    let m = s.get(seq).unwrap().unwrap();
    assert_eq!(m.header_len, hdr.len());
    assert_eq!(m.headers(), hdr);
    assert_eq!(m.data(), b"body");
    assert_eq!(s.state().bytes, message_size(1, payload.len()));
}

fn invalid_appends_are_refused(kind: Kind) {
    let s = kind(none());
    for (subject, hdr, payload) in [
        (&b""[..], 0, &b"x"[..]),
        (b"a\0b", 0, b"x"),
        (b"a", 5, b"x"),
    ] {
        let err = s.append(subject, hdr, payload, 1).unwrap_err();
        assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    }
    assert_eq!(s.state().last_seq, 0);
}

fn sequences_survive_purge(kind: Kind) {
    let s = kind(none());
    for i in 0..5 {
        put(&*s, "a", i);
    }
    assert_eq!(s.purge(None, None, None).unwrap(), 5);
    let st = s.state();
    assert_eq!(
        (st.messages, st.bytes, st.first_seq, st.last_seq),
        (0, 0, 6, 5)
    );
    assert_eq!((st.first_ts, st.num_subjects, st.num_deleted), (0, 0, 0));
    assert_eq!(put(&*s, "a", 9), 6);
    assert_eq!(s.state().first_seq, 6);
    // Compacting past the end moves the next sequence forward.
    assert_eq!(s.purge(None, Some(20), None).unwrap(), 1);
    let st = s.state();
    assert_eq!((st.messages, st.first_seq, st.last_seq), (0, 20, 19));
    assert_eq!(put(&*s, "a", 10), 20);
}

fn next_matching_filters(kind: Kind) {
    let s = kind(none());
    // 1:a.1 2:a.2 3:b.1 4:a.1 5:c 6:b.1.x
    for subject in ["a.1", "a.2", "b.1", "a.1", "c", "b.1.x"] {
        put(&*s, subject, 1);
    }
    assert_eq!(next_seq(&*s, 1, &[]), Some(1));
    assert_eq!(next_seq(&*s, 0, &[">"]), Some(1));
    assert_eq!(next_seq(&*s, 4, &[]), Some(4));
    assert_eq!(next_seq(&*s, 7, &[]), None);
    assert_eq!(next_seq(&*s, 1, &["a.1"]), Some(1));
    assert_eq!(next_seq(&*s, 2, &["a.1"]), Some(4));
    assert_eq!(next_seq(&*s, 5, &["a.1"]), None);
    assert_eq!(next_seq(&*s, 1, &["nope"]), None);
    assert_eq!(next_seq(&*s, 2, &["a.*"]), Some(2));
    assert_eq!(next_seq(&*s, 3, &["a.*"]), Some(4));
    assert_eq!(next_seq(&*s, 1, &["b.>"]), Some(3));
    assert_eq!(next_seq(&*s, 4, &["b.>"]), Some(6));
    assert_eq!(next_seq(&*s, 4, &["b.*"]), None);
    assert_eq!(next_seq(&*s, 2, &["c", "b.1"]), Some(3));
    assert_eq!(next_seq(&*s, 4, &["c", "b.1"]), Some(5));
    assert_eq!(next_seq(&*s, 1, &["*.2", "c"]), Some(2));
    assert_eq!(next_seq(&*s, 3, &["*.2", "c"]), Some(5));
    // Deleted messages are skipped.
    s.delete(4).unwrap();
    assert_eq!(next_seq(&*s, 2, &["a.1"]), None);
    assert_eq!(next_seq(&*s, 4, &[]), Some(5));
    let m = s.next_matching(3, &filters(&["*.1"])).unwrap().unwrap();
    assert_eq!((m.seq, &m.subject[..]), (3, &b"b.1"[..]));
}

/// Enough partially consumed subjects to take the scan path instead of
/// per-subject seeks; both must give the same answers.
fn next_matching_many_subjects(kind: Kind) {
    let s = kind(none());
    for round in 0..3 {
        for i in 0..100 {
            put(&*s, &format!("s.{i}"), round);
        }
    }
    put(&*s, "t.0", 0);
    for from in [1, 50, 150, 199, 250, 301] {
        assert_eq!(
            next_seq(&*s, from, &["s.>"]),
            Some(from.min(300)).filter(|_| from <= 300)
        );
        assert_eq!(next_seq(&*s, from, &["t.*"]), Some(301));
        assert_eq!(
            next_seq(&*s, from, &["s.7"]),
            [8, 108, 208].into_iter().find(|&q| q >= from)
        );
    }
    assert_eq!(s.num_pending(150, &filters(&["s.*"])).unwrap(), 151);
    assert_eq!(
        s.num_pending(150, &filters(&["s.1", "s.1", "s.2"]))
            .unwrap(),
        2
    );
}

fn last_for_subject_and_per_subject(kind: Kind) {
    let s = kind(none());
    // 1:a.1 2:a.2 3:b 4:a.1 5:b
    for subject in ["a.1", "a.2", "b", "a.1", "b"] {
        put(&*s, subject, 1);
    }
    let last = |p: &str| s.last_for_subject(p.as_bytes()).unwrap().map(|m| m.seq);
    assert_eq!(last("a.1"), Some(4));
    assert_eq!(last("a.2"), Some(2));
    assert_eq!(last("a.*"), Some(4));
    assert_eq!(last(">"), Some(5));
    assert_eq!(last("zz"), None);
    assert_eq!(s.last_per_subject_seqs(&[]).unwrap(), vec![2, 4, 5]);
    assert_eq!(
        s.last_per_subject_seqs(&filters(&["a.>"])).unwrap(),
        vec![2, 4]
    );
    assert_eq!(
        s.last_per_subject_seqs(&filters(&["b", "a.2"])).unwrap(),
        vec![2, 5]
    );
    s.delete(5).unwrap();
    s.delete(4).unwrap();
    assert_eq!(last("a.1"), Some(1));
    assert_eq!(last(">"), Some(3));
    assert_eq!(s.last_per_subject_seqs(&[]).unwrap(), vec![1, 2, 3]);
}

fn seq_for_time_search(kind: Kind) {
    let s = kind(none());
    assert_eq!(s.seq_for_time(5).unwrap(), 1);
    for i in 1..=100 {
        put(&*s, "a", i * 10);
    }
    assert_eq!(s.seq_for_time(0).unwrap(), 1);
    assert_eq!(s.seq_for_time(10).unwrap(), 1);
    assert_eq!(s.seq_for_time(11).unwrap(), 2);
    assert_eq!(s.seq_for_time(500).unwrap(), 50);
    assert_eq!(s.seq_for_time(501).unwrap(), 51);
    assert_eq!(s.seq_for_time(1000).unwrap(), 100);
    assert_eq!(s.seq_for_time(1001).unwrap(), 101);
    for seq in 40..=60 {
        s.delete(seq).unwrap();
    }
    assert_eq!(s.seq_for_time(450).unwrap(), 61);
    assert_eq!(s.seq_for_time(390).unwrap(), 39);
    assert_eq!(s.seq_for_time(391).unwrap(), 61);
    s.purge(None, Some(30), None).unwrap();
    assert_eq!(s.seq_for_time(0).unwrap(), 30);
}

fn num_pending_counts(kind: Kind) {
    let s = kind(none());
    for i in 1..=20 {
        put(&*s, if i % 2 == 0 { "even" } else { "odd" }, i);
    }
    let pending = |from: u64, f: &[&str]| s.num_pending(from, &filters(f)).unwrap();
    assert_eq!(pending(0, &[]), 20);
    assert_eq!(pending(5, &[]), 16);
    assert_eq!(pending(20, &[]), 1);
    assert_eq!(pending(21, &[]), 0);
    assert_eq!(pending(1, &["even"]), 10);
    assert_eq!(pending(5, &["even"]), 8);
    assert_eq!(pending(5, &["odd", "even"]), 16);
    assert_eq!(pending(5, &["*"]), 16);
    assert_eq!(pending(5, &["none"]), 0);
    // Interior deletes are not counted.
    for seq in [3, 6, 9, 18] {
        s.delete(seq).unwrap();
    }
    assert_eq!(pending(0, &[]), 16);
    assert_eq!(pending(5, &[]), 13);
    assert_eq!(pending(17, &[]), 3);
    assert_eq!(pending(5, &["even"]), 6);
    assert_eq!(pending(5, &["odd"]), 7);
}

fn delete_interior_first_last(kind: Kind) {
    let s = kind(none());
    for i in 1..=5 {
        put(&*s, "a", i * 100);
    }
    assert!(s.delete(3).unwrap());
    assert!(!s.delete(3).unwrap());
    assert!(!s.delete(99).unwrap());
    let st = s.state();
    assert_eq!(
        (st.messages, st.first_seq, st.last_seq, st.num_deleted),
        (4, 1, 5, 1)
    );
    assert!(s.delete(1).unwrap());
    let st = s.state();
    assert_eq!((st.first_seq, st.first_ts, st.num_deleted), (2, 200, 1));
    assert!(s.delete(2).unwrap());
    let st = s.state();
    // 3 is gone too, so the first is 4 and no gap remains.
    assert_eq!(
        (st.messages, st.first_seq, st.first_ts, st.num_deleted),
        (2, 4, 400, 0)
    );
    assert!(s.delete(5).unwrap());
    let st = s.state();
    assert_eq!(
        (
            st.messages,
            st.first_seq,
            st.last_seq,
            st.last_ts,
            st.num_deleted
        ),
        (1, 4, 5, 500, 1)
    );
    assert!(s.delete(4).unwrap());
    let st = s.state();
    assert_eq!(
        (
            st.messages,
            st.bytes,
            st.first_seq,
            st.last_seq,
            st.num_deleted
        ),
        (0, 0, 6, 5, 0)
    );
    assert_eq!(put(&*s, "a", 600), 6);
}

fn purge_variants(kind: Kind) {
    // 1..=12 alternating a, b.x, b.y
    let fill = |s: &dyn StreamStore| {
        for i in 0..12 {
            put(s, ["a", "b.x", "b.y"][i % 3], i as i64);
        }
    };
    let seqs = |s: &dyn StreamStore| -> Vec<u64> {
        (1..=s.state().last_seq)
            .filter(|&q| s.get(q).unwrap().is_some())
            .collect()
    };

    let s = kind(none());
    fill(&*s);
    assert_eq!(s.purge(Some(b"a"), None, None).unwrap(), 4);
    assert_eq!(seqs(&*s), vec![2, 3, 5, 6, 8, 9, 11, 12]);
    assert_eq!(s.state().first_seq, 2);
    assert_eq!(s.state().num_subjects, 2);
    assert_eq!(s.purge(Some(b"b.*"), None, Some(3)).unwrap(), 5);
    assert_eq!(seqs(&*s), vec![9, 11, 12]);
    assert_eq!(s.purge(Some(b">"), None, None).unwrap(), 3);
    assert_eq!(s.state().first_seq, 13);

    let s = kind(none());
    fill(&*s);
    assert_eq!(s.purge(None, Some(5), None).unwrap(), 4);
    assert_eq!(s.state().first_seq, 5);
    assert_eq!(s.purge(None, None, Some(3)).unwrap(), 5);
    assert_eq!(seqs(&*s), vec![10, 11, 12]);
    assert_eq!(s.purge(None, None, Some(5)).unwrap(), 0);

    let s = kind(none());
    fill(&*s);
    // Filter and sequence: only b.x below 9.
    assert_eq!(s.purge(Some(b"b.x"), Some(9), None).unwrap(), 3);
    assert_eq!(seqs(&*s), vec![1, 3, 4, 6, 7, 9, 10, 11, 12]);
    // Filter and keep on a wildcard: the newest 4 of b.* stay.
    assert_eq!(s.purge(Some(b"b.>"), None, Some(4)).unwrap(), 1);
    assert_eq!(seqs(&*s), vec![1, 4, 6, 7, 9, 10, 11, 12]);
    // Keep most of a subject: counts from the other end.
    assert_eq!(s.purge(Some(b"a"), None, Some(3)).unwrap(), 1);
    assert_eq!(seqs(&*s), vec![4, 6, 7, 9, 10, 11, 12]);
    assert_eq!(s.state().num_deleted, 2);
    // A filter with an up_to past the end does not move sequences.
    assert_eq!(s.purge(Some(b"a"), Some(100), None).unwrap(), 3);
    assert_eq!(s.state().last_seq, 12);
    assert_eq!(s.purge(Some(b"nothing"), None, None).unwrap(), 0);
    assert_eq!(put(&*s, "a", 0), 13);
}

fn max_msgs_limit(kind: Kind) {
    let limits = StoreLimits {
        max_msgs: Some(3),
        ..none()
    };
    let s = kind(limits.clone());
    for i in 1..=5 {
        put(&*s, "a", i);
    }
    let st = s.state();
    assert_eq!(
        (st.messages, st.first_seq, st.last_seq, st.first_ts),
        (3, 3, 5, 3)
    );

    let s = kind(StoreLimits {
        discard_new: true,
        ..limits
    });
    for i in 1..=3 {
        put(&*s, "a", i);
    }
    let err = s.append(b"a", 0, b"data", 4).unwrap_err();
    assert!(matches!(err, StoreError::MaxMsgs));
    assert_eq!(err.to_string(), "maximum messages exceeded");
    assert_eq!(s.state().last_seq, 3);
}

fn max_bytes_limit(kind: Kind) {
    let one = size("a");
    let limits = StoreLimits {
        max_bytes: Some(3 * one),
        ..none()
    };
    let s = kind(limits.clone());
    for i in 1..=5 {
        put(&*s, "a", i);
    }
    let st = s.state();
    assert_eq!((st.messages, st.bytes, st.first_seq), (3, 3 * one, 3));
    // A message that could never fit is refused even with discard old.
    let big = vec![0u8; 4 * one as usize];
    assert!(matches!(
        s.append(b"a", 0, &big, 6).unwrap_err(),
        StoreError::MaxBytes
    ));

    let s = kind(StoreLimits {
        discard_new: true,
        ..limits
    });
    // As in nats-server, discard new refuses the message that would make the
    // stream exactly full.
    put(&*s, "a", 1);
    put(&*s, "a", 2);
    let err = s.append(b"a", 0, b"data", 3).unwrap_err();
    assert!(matches!(err, StoreError::MaxBytes));
    assert_eq!(err.to_string(), "maximum bytes exceeded");
    assert_eq!(s.state().messages, 2);
}

fn max_age_expiry(kind: Kind) {
    let s = kind(StoreLimits {
        max_age: Some(Duration::from_nanos(100)),
        ..none()
    });
    for ts in [10, 20, 30, 40, 50] {
        put(&*s, "a", ts);
    }
    assert_eq!(s.expire(120).unwrap(), 2);
    let st = s.state();
    assert_eq!((st.messages, st.first_seq, st.first_ts), (3, 3, 30));
    assert_eq!(s.expire(120).unwrap(), 0);
    assert_eq!(s.expire(1_000).unwrap(), 3);
    let st = s.state();
    assert_eq!((st.messages, st.first_seq, st.last_seq), (0, 6, 5));
    // Without max_age nothing expires.
    let s = kind(none());
    put(&*s, "a", 1);
    assert_eq!(s.expire(i64::MAX).unwrap(), 0);
}

fn max_msgs_per_subject_limit(kind: Kind) {
    let limits = StoreLimits {
        max_msgs_per_subject: Some(2),
        ..none()
    };
    let s = kind(limits.clone());
    for subject in ["a", "b", "a", "a", "b", "a"] {
        put(&*s, subject, 1);
    }
    // a: 1,3,4,6 -> 4,6; b: 2,5
    assert_eq!(s.last_per_subject_seqs(&[]).unwrap(), vec![5, 6]);
    assert_eq!(
        s.subjects(b">")
            .unwrap()
            .iter()
            .map(|(_, n)| *n)
            .collect::<Vec<_>>(),
        vec![2, 2]
    );
    assert_eq!(s.state().first_seq, 2);
    assert_eq!(next_seq(&*s, 1, &["a"]), Some(4));

    // Discard new without the per-subject flag still replaces per subject.
    let s = kind(StoreLimits {
        discard_new: true,
        max_msgs: Some(2),
        ..limits.clone()
    });
    put(&*s, "a", 1);
    put(&*s, "a", 2);
    assert_eq!(put(&*s, "a", 3), 3);
    assert!(matches!(
        s.append(b"b", 0, b"data", 4).unwrap_err(),
        StoreError::MaxMsgs
    ));

    let s = kind(StoreLimits {
        discard_new: true,
        discard_new_per_subject: true,
        ..limits
    });
    put(&*s, "a", 1);
    put(&*s, "a", 2);
    let err = s.append(b"a", 0, b"data", 3).unwrap_err();
    assert!(matches!(err, StoreError::MaxMsgsPerSubject));
    assert_eq!(err.to_string(), "maximum messages per subject exceeded");
    put(&*s, "b", 4);
}

fn max_msg_size_limit(kind: Kind) {
    let s = kind(StoreLimits {
        max_msg_size: Some(4),
        ..none()
    });
    put(&*s, "a", 1);
    let err = s.append(b"a", 0, b"12345", 2).unwrap_err();
    assert!(matches!(err, StoreError::MaxMsgSize));
    assert_eq!(err.to_string(), "message size exceeds maximum allowed");
    // Headers count.
    assert!(s.append(b"a", 2, b"hhdat", 3).is_err());
    assert_eq!(s.state().messages, 1);
}

fn update_limits_enforces(kind: Kind) {
    let s = kind(none());
    for i in 0..10 {
        put(&*s, ["a", "b"][i % 2], i as i64);
    }
    let removed = s
        .update_limits(StoreLimits {
            max_msgs_per_subject: Some(3),
            ..none()
        })
        .unwrap();
    assert_eq!(removed, 4);
    assert_eq!(s.state().messages, 6);
    let removed = s
        .update_limits(StoreLimits {
            max_msgs: Some(2),
            ..none()
        })
        .unwrap();
    assert_eq!(removed, 4);
    let st = s.state();
    assert_eq!((st.messages, st.first_seq), (2, 9));
    assert_eq!(s.limits().max_msgs, Some(2));
    // Lowering a limit with discard new removes nothing (as nats-server).
    let removed = s
        .update_limits(StoreLimits {
            max_msgs: Some(1),
            discard_new: true,
            ..none()
        })
        .unwrap();
    assert_eq!(removed, 0);
}

fn records_kept(kind: Kind) {
    let s = kind(none());
    assert_eq!(s.load_meta().unwrap(), None);
    s.save_meta(b"{\"name\":\"S\"}").unwrap();
    s.save_meta(b"{\"name\":\"S\",\"v\":2}").unwrap();
    assert_eq!(s.load_meta().unwrap().unwrap(), b"{\"name\":\"S\",\"v\":2}");
    s.save_consumer("c2", b"two").unwrap();
    s.save_consumer("c1", b"one").unwrap();
    s.save_consumer("c1", b"one'").unwrap();
    assert_eq!(
        s.load_consumers().unwrap(),
        vec![
            ("c1".to_string(), b"one'".to_vec()),
            ("c2".to_string(), b"two".to_vec())
        ]
    );
    assert!(s.delete_consumer("c2").unwrap());
    assert!(!s.delete_consumer("c2").unwrap());
    assert_eq!(s.load_consumers().unwrap().len(), 1);
    s.sync().unwrap();
}

fn removed_store_is_closed(kind: Kind) {
    let s = kind(none());
    put(&*s, "a", 1);
    s.remove().unwrap();
    assert!(matches!(
        s.append(b"a", 0, b"x", 1).unwrap_err(),
        StoreError::Closed
    ));
    assert!(matches!(s.get(1).unwrap_err(), StoreError::Closed));
    assert!(matches!(s.remove().unwrap_err(), StoreError::Closed));
}

/// A reference model: what every query must answer, computed naively.
#[derive(Default)]
struct Model {
    msgs: BTreeMap<u64, (String, i64)>,
    last_seq: u64,
}

impl Model {
    fn matching(&self, from: u64, f: &[&str]) -> impl Iterator<Item = (&u64, &(String, i64))> {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        self.msgs.range(from..).filter(move |(_, (subj, _))| {
            f.is_empty()
                || f.iter()
                    .any(|p| skiff::subject::matches_pattern(p.as_bytes(), subj.as_bytes()))
        })
    }
}

fn check_against_model(s: &dyn StreamStore, model: &Model, rng: &mut StdRng, patterns: &[&str]) {
    let st = s.state();
    assert_eq!(st.messages, model.msgs.len() as u64);
    assert_eq!(st.last_seq, model.last_seq);
    assert_eq!(
        st.first_seq,
        model
            .msgs
            .keys()
            .next()
            .copied()
            .unwrap_or(model.last_seq + 1)
    );
    assert_eq!(
        st.bytes,
        model.msgs.values().map(|(subj, _)| size(subj)).sum::<u64>()
    );
    for _ in 0..20 {
        let from = rng.gen_range(0..=model.last_seq + 2);
        let n = rng.gen_range(0..3);
        let f: Vec<&str> = (0..n)
            .map(|_| patterns[rng.gen_range(0..patterns.len())])
            .collect();
        let expected_next = model.matching(from, &f).next().map(|(q, _)| *q);
        assert_eq!(
            next_seq(s, from, &f),
            expected_next,
            "next_matching({from}, {f:?})"
        );
        let expected_pending = model.matching(from, &f).count() as u64;
        assert_eq!(
            s.num_pending(from, &filters(&f)).unwrap(),
            expected_pending,
            "num_pending({from}, {f:?})"
        );
        let mut last: BTreeMap<&str, u64> = BTreeMap::new();
        for (q, (subj, _)) in model.matching(0, &f) {
            last.insert(subj, *q);
        }
        let mut expected_last: Vec<u64> = last.values().copied().collect();
        expected_last.sort_unstable();
        assert_eq!(
            s.last_per_subject_seqs(&filters(&f)).unwrap(),
            expected_last,
            "{f:?}"
        );
        if let Some(p) = f.first() {
            let expected = model.matching(0, &[p]).last().map(|(q, _)| *q);
            assert_eq!(
                s.last_for_subject(p.as_bytes()).unwrap().map(|m| m.seq),
                expected
            );
            let counts = s.subjects(p.as_bytes()).unwrap();
            assert_eq!(
                counts.iter().map(|(_, n)| n).sum::<u64>(),
                model.matching(0, &[p]).count() as u64
            );
        }
    }
}

fn random_ops_match_model(kind: Kind) {
    let subjects = ["a", "a.b", "a.c", "a.b.c", "b.x", "b.y", "c.d.e", "z"];
    let patterns = [
        "a", "a.*", "a.>", "*.b", "b.*", "*.*", "*.d.>", "z", ">", "q",
    ];
    let mut rng = StdRng::seed_from_u64(7);
    let s = kind(none());
    let mut model = Model::default();
    let mut ts = 0;
    for round in 0..30 {
        for _ in 0..rng.gen_range(1..40) {
            let subj = subjects[rng.gen_range(0..subjects.len())];
            ts += rng.gen_range(0..3);
            let seq = put(&*s, subj, ts);
            model.last_seq = seq;
            model.msgs.insert(seq, (subj.to_string(), ts));
        }
        for _ in 0..rng.gen_range(0..5) {
            let seq = rng.gen_range(1..=model.last_seq);
            assert_eq!(s.delete(seq).unwrap(), model.msgs.remove(&seq).is_some());
        }
        if round % 7 == 6 {
            let p = patterns[rng.gen_range(0..patterns.len())];
            let doomed: Vec<u64> = model.matching(0, &[p]).map(|(q, _)| *q).take(5).collect();
            let keep = model.matching(0, &[p]).count() as u64 - doomed.len() as u64;
            assert_eq!(
                s.purge(Some(p.as_bytes()), None, Some(keep)).unwrap(),
                doomed.len() as u64
            );
            for q in doomed {
                model.msgs.remove(&q);
            }
        }
        // seq_for_time against the model.
        let t = rng.gen_range(0..=ts + 1);
        let expected = model
            .msgs
            .iter()
            .find(|(_, (_, mt))| *mt >= t)
            .map_or(model.last_seq + 1, |(q, _)| *q);
        assert_eq!(s.seq_for_time(t).unwrap(), expected, "seq_for_time({t})");
        check_against_model(&*s, &model, &mut rng, &patterns);
    }
}

/// Limits under which appends inside one writer must interact: per-subject
/// replacement, discard old and discard new at the stream limits.
fn batch_limits() -> Vec<StoreLimits> {
    vec![
        none(),
        StoreLimits {
            max_msgs_per_subject: Some(2),
            ..none()
        },
        StoreLimits {
            max_msgs: Some(25),
            max_bytes: Some(40 * size("a.b")),
            ..none()
        },
        StoreLimits {
            max_msgs: Some(30),
            discard_new: true,
            ..none()
        },
        StoreLimits {
            max_msgs_per_subject: Some(3),
            max_bytes: Some(20 * size("a.b")),
            discard_new: true,
            ..none()
        },
        StoreLimits {
            max_msgs_per_subject: Some(1),
            discard_new: true,
            discard_new_per_subject: true,
            ..none()
        },
    ]
}

/// Every message, in order, as `(seq, subject)`.
fn contents(s: &dyn StreamStore) -> Vec<(u64, Bytes)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(m) = s.next_matching(from, &[]).unwrap() {
        from = m.seq + 1;
        out.push((m.seq, m.subject));
    }
    out
}

fn batched_appends_match_single_appends(kind: Kind) {
    let subjects = ["a.b", "a.c", "b.x", "b.yy"];
    for (case, limits) in batch_limits().into_iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(case as u64);
        let single = kind(limits.clone());
        let batched = kind(limits.clone());
        for _ in 0..20 {
            let batch: Vec<&str> = (0..rng.gen_range(1..12))
                .map(|_| subjects[rng.gen_range(0..subjects.len())])
                .collect();
            let mut writer = batched.writer().unwrap();
            for (i, subj) in batch.iter().enumerate() {
                let one = single
                    .append(subj.as_bytes(), 0, b"data", 1)
                    .map_err(|e| e.to_string());
                let many = writer
                    .append(
                        Bytes::from(subj.to_string()),
                        0,
                        Bytes::from_static(b"data"),
                        1,
                    )
                    .map_err(|e| e.to_string());
                assert_eq!(one, many, "case {case}, message {i} of {batch:?}");
                assert_eq!(writer.last_seq(), single.state().last_seq, "case {case}");
            }
            writer.commit().unwrap();
            assert_eq!(batched.state(), single.state(), "case {case}");
            assert_eq!(contents(&*batched), contents(&*single), "case {case}");
        }
    }
}

fn writer_sees_its_own_appends(kind: Kind) {
    let s = kind(none());
    put(&*s, "a", 1);
    let mut w = s.writer().unwrap();
    assert_eq!(
        w.append(Bytes::from_static(b"b"), 0, Bytes::from_static(b"x"), 2)
            .unwrap(),
        2
    );
    assert_eq!(
        w.append(Bytes::from_static(b"a"), 0, Bytes::from_static(b"x"), 2)
            .unwrap(),
        3
    );
    assert_eq!(w.last_seq(), 3);
    assert_eq!(w.last_seq_for_subject(b"a"), 3);
    assert_eq!(w.last_seq_for_subject(b"b"), 2);
    assert_eq!(w.last_seq_for_subject(b"c"), 0);
    drop(w);
    // Dropped without commit: nothing of it was stored.
    assert_eq!(s.state().last_seq, 1);
    assert_eq!(s.get(2).unwrap(), None);
    let mut w = s.writer().unwrap();
    assert_eq!(
        w.append(Bytes::from_static(b"b"), 0, Bytes::from_static(b"x"), 3)
            .unwrap(),
        2
    );
    w.commit().unwrap();
    assert_eq!(s.state().messages, 2);
    assert_eq!(s.last_for_subject(b"b").unwrap().map(|m| m.seq), Some(2));
}

// ---- file storage only ----

#[test]
fn file_reopen_keeps_everything() {
    let limits = StoreLimits {
        max_msgs_per_subject: Some(10),
        ..none()
    };
    let s = file(limits.clone());
    for i in 0..30 {
        let hdr = b"NATS/1.0\r\n\r\n";
        let payload = [&hdr[..], format!("m{i}").as_bytes()].concat();
        s.append(
            ["a.1", "a.2", "b"][i % 3].as_bytes(),
            hdr.len(),
            &payload,
            i as i64,
        )
        .unwrap();
    }
    s.delete(14).unwrap();
    s.purge(Some(b"b"), Some(10), None).unwrap();
    s.save_meta(b"config").unwrap();
    s.save_consumer("dur", b"ack floor 7").unwrap();
    s.sync().unwrap();
    let before = s.state();
    let messages: Vec<_> = (0..=31).map(|q| s.get(q).unwrap()).collect();

    let s = reopen(s, limits.clone());
    assert_eq!(s.state(), before);
    assert_eq!(
        (0..=31).map(|q| s.get(q).unwrap()).collect::<Vec<_>>(),
        messages
    );
    assert_eq!(next_seq(&*s, 1, &["b"]), Some(12));
    assert_eq!(next_seq(&*s, 13, &["a.*"]), Some(13));
    assert_eq!(next_seq(&*s, 14, &["a.2"]), Some(17));
    assert_eq!(s.last_for_subject(b"a.1").unwrap().unwrap().seq, 28);
    assert_eq!(s.subjects(b"a.*").unwrap().len(), 2);
    assert_eq!(s.load_meta().unwrap().unwrap(), b"config");
    assert_eq!(
        s.load_consumers().unwrap(),
        vec![("dur".to_string(), b"ack floor 7".to_vec())]
    );
    // Sequences continue, after a purge too, across restarts.
    assert_eq!(put(&*s, "a.1", 40), 31);
    s.purge(None, None, None).unwrap();
    let s = reopen(s, limits);
    let st = s.state();
    assert_eq!(
        (st.messages, st.first_seq, st.last_seq, st.num_subjects),
        (0, 32, 31, 0)
    );
    assert_eq!(put(&*s, "c", 50), 32);
}

/// A deterministic history: appends, deletes, a filtered purge, records,
/// a sync half-way and unsynced writes after it.
fn crash_script(s: &dyn StreamStore) {
    for i in 0..300u64 {
        let subject = format!("crash.{}", i % 7);
        s.append(subject.as_bytes(), 0, &i.to_be_bytes(), i as i64)
            .unwrap();
    }
    for seq in (5..300).step_by(11) {
        s.delete(seq).unwrap();
    }
    s.purge(Some(b"crash.3"), None, Some(4)).unwrap();
    s.save_consumer("c", b"state 1").unwrap();
    s.sync().unwrap();
    for i in 300..400u64 {
        let subject = format!("crash.{}", i % 5);
        s.append(subject.as_bytes(), 0, &i.to_be_bytes(), i as i64)
            .unwrap();
    }
    s.delete(1).unwrap();
    s.save_consumer("c", b"state 2").unwrap();
}

/// Writes reach the OS when a call returns: a process crash (no clean
/// close, so no saved summary either) loses nothing, and recovery rebuilds
/// the same stream as memory storage holds after the same history.
#[test]
fn file_recovers_after_crash() {
    const CHILD: &str = "SKIFF_STORE_CRASH_DIR";
    if let Ok(dir) = std::env::var(CHILD) {
        let storage = FileStorage::open(&dir).unwrap();
        let s = storage.open_stream("S", none()).unwrap();
        crash_script(&*s);
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "file_recovers_after_crash", "--nocapture"])
        .env(CHILD, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must crash");

    let expected = MemoryStore::new(none());
    crash_script(&expected);
    let storage = FileStorage::open(dir.path()).unwrap();
    let s = storage.open_stream("S", none()).unwrap();
    assert_eq!(s.state(), expected.state());
    for seq in 0..=expected.state().last_seq + 1 {
        assert_eq!(s.get(seq).unwrap(), expected.get(seq).unwrap(), "seq {seq}");
    }
    assert_eq!(s.subjects(b">").unwrap(), expected.subjects(b">").unwrap());
    assert_eq!(
        s.last_per_subject_seqs(&[]).unwrap(),
        expected.last_per_subject_seqs(&[]).unwrap()
    );
    for from in [0, 50, 299, 350] {
        let f = filters(&["crash.3"]);
        assert_eq!(
            s.next_matching(from, &f).unwrap(),
            expected.next_matching(from, &f).unwrap()
        );
    }
    assert_eq!(
        s.load_consumers().unwrap(),
        expected.load_consumers().unwrap()
    );
    // And it goes on from there.
    assert_eq!(put(&*s, "after", 0), expected.state().last_seq + 1);
}

#[test]
fn file_storage_lists_and_deletes_streams() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::open(dir.path()).unwrap();
    let a = storage.open_stream("A", none()).unwrap();
    let b = storage.open_stream("B", none()).unwrap();
    put(&*a, "x", 1);
    put(&*b, "y", 1);
    // Opening an open stream gives the same store.
    assert!(Arc::ptr_eq(&a, &storage.open_stream("A", none()).unwrap()));
    assert_eq!(storage.stream_names().unwrap(), vec!["A", "B"]);
    assert!(storage.delete_stream("A").unwrap());
    assert!(!storage.delete_stream("A").unwrap());
    assert!(matches!(a.get(1).unwrap_err(), StoreError::Closed));
    b.remove().unwrap();
    assert!(!storage.contains("B").unwrap());
    drop((a, b, storage));

    let storage = FileStorage::open(dir.path()).unwrap();
    assert!(storage.stream_names().unwrap().is_empty());
    // A recreated stream starts afresh.
    let a = storage.open_stream("A", none()).unwrap();
    assert_eq!(a.state().messages, 0);
    assert_eq!(put(&*a, "x", 1), 1);
    assert!(matches!(
        storage.open_stream("", none()).unwrap_err(),
        StoreError::Invalid(_)
    ));
}

#[test]
fn file_storage_is_locked_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let _storage = FileStorage::open(dir.path()).unwrap();
    let err = FileStorage::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
}

/// How a file is damaged: only its used part (fjall preallocates its
/// journal as a sparse 64 MiB file; the zeros past the data are not content).
#[derive(Clone, Copy)]
enum Damage {
    /// Cut the content in half.
    Truncate,
    /// Overwrite the content with random bytes, keeping the length.
    Garbage,
}

/// A file of a store directory: path, content up to its last non-zero
/// byte, and length.
type FileImage = (std::path::PathBuf, Vec<u8>, u64);

/// Writes a stream, then damages each file of the database in turn: opening
/// must fail with a store error or give back the whole stream (the file was
/// not needed, e.g. a superseded version), never panic and never silently
/// lose messages. Returns one line per damaged file.
fn open_after_damage(damage: Damage) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = FileStorage::open(dir.path()).unwrap();
        let s = storage.open_stream("S", none()).unwrap();
        for i in 0..200 {
            s.append(b"a.b", 0, &[i as u8; 300], i).unwrap();
        }
        s.sync().unwrap();
    }
    let mut dirs = Vec::new();
    let images: Vec<FileImage> = walk(dir.path(), &mut dirs)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            let rel = p.strip_prefix(dir.path()).unwrap().to_path_buf();
            (rel, bytes[..used].to_vec(), bytes.len() as u64)
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(1);
    let mut outcomes = Vec::new();
    // The lock file is empty and fjall needs it: not a victim.
    for victim in (0..images.len()).filter(|&i| !images[i].0.ends_with("lock")) {
        let copy = tempfile::tempdir().unwrap();
        for d in &dirs {
            std::fs::create_dir_all(copy.path().join(d.strip_prefix(dir.path()).unwrap())).unwrap();
        }
        for (i, (rel, content, len)) in images.iter().enumerate() {
            let path = copy.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let (content, len) = match (i == victim, damage) {
                (false, _) => (content.clone(), *len),
                (true, Damage::Truncate) => (
                    content[..content.len() / 2].to_vec(),
                    content.len() as u64 / 2,
                ),
                (true, Damage::Garbage) => {
                    let n = content.len().max(64);
                    ((0..n).map(|_| rng.gen()).collect(), (*len).max(n as u64))
                }
            };
            let file = std::fs::File::create(&path).unwrap();
            std::io::Write::write_all(&mut &file, &content).unwrap();
            file.set_len(len).unwrap();
        }
        let outcome = open_damaged(copy.path());
        outcomes.push(format!("{}: {outcome}", images[victim].0.display()));
    }
    outcomes
}

fn open_damaged(dir: &std::path::Path) -> String {
    let storage = match FileStorage::open(dir) {
        Ok(storage) => storage,
        Err(e) => return format!("error: {e}"),
    };
    let s = match storage.open_stream("S", none()) {
        Ok(s) => s,
        Err(e) => return format!("error: {e}"),
    };
    // Whatever opened must read back whole.
    let mut read = 0;
    let mut seq = 0;
    loop {
        match s.next_matching(seq, &[]) {
            Ok(Some(m)) => {
                assert_eq!(m.payload.len(), 300);
                read += 1;
                seq = m.seq + 1;
            }
            Ok(None) => break,
            Err(e) => return format!("error: {e} (reading)"),
        }
    }
    assert_eq!(read, s.state().messages);
    format!("opened with {read} messages")
}

/// Files under `dir`; the directories go to `dirs`.
fn walk(dir: &std::path::Path, dirs: &mut Vec<std::path::PathBuf>) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            dirs.push(path.clone());
            out.extend(walk(&path, dirs));
        } else {
            out.push(path);
        }
    }
    out
}

fn check_outcomes(outcomes: &[String]) {
    println!("{}", outcomes.join("\n"));
    for o in outcomes {
        assert!(
            o.contains(": error: store") || o.ends_with("opened with 200 messages"),
            "{o}"
        );
    }
    // The journal holds the messages: damaging it must be noticed.
    assert!(
        outcomes
            .iter()
            .any(|o| o.contains(".jnl: error: store corrupt")),
        "{outcomes:#?}"
    );
}

#[test]
fn file_garbage_gives_error_not_panic() {
    check_outcomes(&open_after_damage(Damage::Garbage));
}

#[test]
fn file_truncation_gives_error_not_panic() {
    check_outcomes(&open_after_damage(Damage::Truncate));
}

#[test]
fn file_group_commit_shares_fsyncs() {
    let s = file(none());
    let threads = 8;
    let per_thread = 200;
    std::thread::scope(|scope| {
        for t in 0..threads {
            let store = &*s;
            scope.spawn(move || {
                let subject = format!("t.{t}");
                for i in 0..per_thread {
                    store.append(subject.as_bytes(), 0, b"x", i).unwrap();
                    store.sync().unwrap();
                }
            });
        }
    });
    let fsyncs = s.sync_count();
    let total = threads * per_thread;
    println!("{total} append+sync from {threads} threads: {fsyncs} fsyncs");
    assert_eq!(s.state().messages, total as u64);
    assert!(
        fsyncs < total as u64 * 3 / 4,
        "{fsyncs} fsyncs for {total} syncs"
    );
    // Nothing new: no fsync.
    s.sync().unwrap();
    assert_eq!(s.sync_count(), fsyncs);
}

// ---- measurements (cargo test --release --test store_conformance -- --ignored --nocapture) ----

fn appends_per_second(threads: usize, per_thread: usize) -> (f64, u64) {
    let s = file(none());
    let payload = vec![7u8; 128];
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (store, payload) = (&*s, &payload);
            scope.spawn(move || {
                let subject = format!("bench.{t}");
                for i in 0..per_thread {
                    store
                        .append(subject.as_bytes(), 0, payload, i as i64)
                        .unwrap();
                    store.sync().unwrap();
                }
            });
        }
    });
    let rate = (threads * per_thread) as f64 / start.elapsed().as_secs_f64();
    (rate, s.sync_count())
}

#[test]
#[ignore]
fn measure_synced_append_rate() {
    for (threads, per_thread) in [(1, 2000), (8, 1000)] {
        let (rate, fsyncs) = appends_per_second(threads, per_thread);
        println!(
            "{threads} thread(s): {rate:.0} appends/s with sync after each, {fsyncs} fsyncs for {} appends",
            threads * per_thread
        );
    }
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore]
fn measure_rss_two_million_messages() {
    let dir = tempfile::tempdir().unwrap();
    let payload = vec![42u8; 1024];
    let start = Instant::now();
    {
        let storage = FileStorage::open(dir.path()).unwrap();
        let s = storage.open_stream("BIG", none()).unwrap();
        for i in 0..2_000_000u64 {
            let subject = format!("big.{}", i % 1000);
            s.append(subject.as_bytes(), 0, &payload, i as i64).unwrap();
            if i % 500_000 == 499_999 {
                println!(
                    "{} messages, {:.1}s, RSS {} MiB",
                    i + 1,
                    start.elapsed().as_secs_f64(),
                    rss_kib("VmRSS:") / 1024
                );
            }
        }
        s.sync().unwrap();
        println!(
            "stored 2,000,000 x 1 KiB in {:.1}s: RSS {} MiB, peak {} MiB, state {:?}",
            start.elapsed().as_secs_f64(),
            rss_kib("VmRSS:") / 1024,
            rss_kib("VmHWM:") / 1024,
            s.state()
        );
    }
    let reopen_start = Instant::now();
    let storage = FileStorage::open(dir.path()).unwrap();
    let database = reopen_start.elapsed();
    let s = storage.open_stream("BIG", none()).unwrap();
    println!(
        "reopened in {:.2}s (database {:.2}s, stream {:.2}s): {} messages, {} subjects, RSS {} MiB",
        reopen_start.elapsed().as_secs_f64(),
        database.as_secs_f64(),
        (reopen_start.elapsed() - database).as_secs_f64(),
        s.state().messages,
        s.state().num_subjects,
        rss_kib("VmRSS:") / 1024
    );
    let t = Instant::now();
    let m = s
        .next_matching(1_000_000, &filters(&["big.7"]))
        .unwrap()
        .unwrap();
    println!("next_matching(1e6, big.7) = {} in {:?}", m.seq, t.elapsed());
    let t = Instant::now();
    let n = s.num_pending(1_000_000, &filters(&["big.7"])).unwrap();
    println!("num_pending(1e6, big.7) = {n} in {:?}", t.elapsed());
}

#[test]
#[ignore]
fn measure_unsynced_append_rate() {
    for (storage, n) in [("memory", 300_000u64), ("file", 300_000)] {
        let s = if storage == "memory" {
            memory(none())
        } else {
            file(none())
        };
        let payload = vec![42u8; 1024];
        let start = Instant::now();
        for i in 0..n {
            let subject = format!("big.{}", i % 1000);
            s.append(subject.as_bytes(), 0, &payload, i as i64).unwrap();
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        println!("{storage}: {rate:.0} appends/s of 1 KiB without sync");
    }
}
