//! Sublist micro-benchmarks over a realistic population: ~10k subscriptions,
//! mostly literal, with `*` and `>` wildcards and a queue group.
//!
//! - `match/cached`: the same subject every time (a cache hit).
//! - `match/uncached`: a different subject every iteration, cycling through
//!   more subjects than the cache holds, so every lookup walks the trie.
//! - `insert_remove`: one subscription added and removed again (each change
//!   also clears the match cache).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use skiff::sublist::{Sublist, CACHE_MAX};

const TENANTS: usize = 10;
const SERVICES: usize = 30;
const EVENTS: usize = 30;

fn subject(t: usize, s: usize, e: usize) -> Vec<u8> {
    format!("tenant{t}.svc{s}.evt{e}").into_bytes()
}

/// 9000 literal subscriptions, 900 with `*`, 100 with `>` and 300 queue
/// subscribers: 10,300 in all.
fn population() -> Sublist<u32> {
    let list = Sublist::new();
    let mut id = 0;
    let mut add = |pattern: String, queue: Option<&[u8]>| {
        list.insert(pattern.as_bytes(), queue, id).unwrap();
        id += 1;
    };
    for t in 0..TENANTS {
        for s in 0..SERVICES {
            for e in 0..EVENTS {
                add(format!("tenant{t}.svc{s}.evt{e}"), None);
            }
        }
    }
    for t in 0..TENANTS {
        for e in 0..EVENTS {
            add(format!("tenant{t}.*.evt{e}"), None);
        }
        for s in 0..SERVICES {
            add(format!("tenant{t}.svc{s}.*"), None);
        }
    }
    for s in 0..SERVICES {
        for e in 0..10 {
            add(format!("*.svc{s}.evt{e}"), None);
        }
    }
    for t in 0..TENANTS {
        for s in 0..10 {
            add(format!("tenant{t}.svc{s}.>"), None);
        }
    }
    for t in 0..TENANTS {
        for s in 0..SERVICES {
            add(format!("tenant{t}.svc{s}.evt0"), Some(b"workers"));
        }
    }
    assert_eq!(list.count(), 10_300);
    list
}

fn bench_sublist(c: &mut Criterion) {
    let list = population();
    // Every literal subject there is: more than the cache holds.
    let subjects: Vec<Vec<u8>> = (0..TENANTS)
        .flat_map(|t| (0..SERVICES).flat_map(move |s| (0..EVENTS).map(move |e| subject(t, s, e))))
        .collect();
    assert!(subjects.len() > CACHE_MAX);

    let mut group = c.benchmark_group("sublist");
    group.throughput(Throughput::Elements(1));

    let hot = subject(3, 7, 0);
    let found = list.matches(&hot);
    assert!(found.plain.len() >= 5 && found.queues.len() == 1);
    group.bench_function("match/cached", |b| {
        b.iter(|| black_box(list.matches(black_box(&hot))))
    });

    let mut next = subjects.iter().cycle();
    group.bench_function("match/uncached", |b| {
        b.iter(|| black_box(list.matches(next.next().unwrap())))
    });

    let mut id = 1_000_000;
    group.bench_function("insert_remove/literal", |b| {
        b.iter(|| {
            id += 1;
            list.insert(b"tenant5.svc5.evt5", None, id).unwrap();
            assert!(list.remove(b"tenant5.svc5.evt5", None, &id));
        })
    });
    group.bench_function("insert_remove/new_wildcard_branch", |b| {
        b.iter(|| {
            id += 1;
            list.insert(b"tenant5.*.new.>", Some(b"q"), id).unwrap();
            assert!(list.remove(b"tenant5.*.new.>", Some(b"q"), &id));
        })
    });
    group.finish();
}

criterion_group!(benches, bench_sublist);
criterion_main!(benches);
