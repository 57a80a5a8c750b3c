//! What permissions cost.
//!
//! - `check/*`: one publish check for a user with 10 allowed and 2 denied
//!   patterns: `cached` is the per-connection cache hit every repeated
//!   subject gets, `uncached` asks the permissions' sublist (its own shared
//!   cache) for a different subject each time; `subscribe_wildcard` is the
//!   check a SUB pays once; `deliver_filter` the per-message check of a
//!   subscription that overlaps a denied subject.
//! - `server/*`: 1000 16-byte PUBs on 100 subjects to an embedded server,
//!   through a real connection and up to the PONG that proves they were all
//!   processed, for a client without permissions and for one whose every
//!   publish is checked (nobody subscribes, so routing costs the same).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use skiff::auth::{Permissions, PublishCache};
use skiff::config::authorization::{AllowDeny, PermissionsConfig, SubjectRulesConfig};
use skiff::{Config, Server};
use skiff_tools::conn::Endpoint;
use skiff_tools::{Connection, Credentials};

const BATCH: u64 = 1000;

fn permissions() -> Permissions {
    let allow: Vec<String> = (0..10).map(|i| format!("tenant{i}.>")).collect();
    let rules = SubjectRulesConfig::Rules(AllowDeny {
        allow: Some(allow),
        deny: vec!["tenant3.secret.>".into(), "tenant*.admin".into()],
    });
    Permissions::new(&PermissionsConfig {
        publish: Some(rules.clone()),
        subscribe: Some(rules),
        allow_responses: None,
    })
}

fn bench_checks(c: &mut Criterion) {
    let perms = permissions();
    let mut group = c.benchmark_group("permissions/check");
    group.throughput(Throughput::Elements(1));

    let mut cache = PublishCache::default();
    let hot = b"tenant3.orders.created";
    assert!(cache.can_publish(&perms, hot));
    group.bench_function("publish_cached", |b| {
        b.iter(|| black_box(cache.can_publish(&perms, black_box(hot))))
    });

    let subjects: Vec<Vec<u8>> = (0..10_000)
        .map(|i| format!("tenant{}.svc{}.evt", i % 12, i).into_bytes())
        .collect();
    let mut next = subjects.iter().cycle();
    group.bench_function("publish_uncached", |b| {
        b.iter(|| black_box(perms.can_publish(next.next().unwrap())))
    });

    group.bench_function("subscribe_wildcard", |b| {
        b.iter(|| black_box(perms.check_subscribe(black_box(b"tenant3.*.>"))))
    });
    group.bench_function("deliver_filter", |b| {
        b.iter(|| black_box(perms.denies_delivery(black_box(hot))))
    });
    group.finish();
}

fn bench_server(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let text = r#"
listen = "127.0.0.1:0"
[jetstream]
enabled = false
[[authorization.users]]
user = "open"
password = "p"
[[authorization.users]]
user = "limited"
password = "p"
permissions = { publish = { allow = ["tenant0.>", "tenant1.>", "tenant2.>", "bench.>"], deny = ["bench.secret"] } }
"#;
    let server = runtime
        .block_on(Server::start(Config::from_toml(text).expect("valid")))
        .expect("server starts");
    let url = server.client_url();
    let subjects: Vec<Vec<u8>> = (0..100)
        .map(|i| format!("bench.s{i}").into_bytes())
        .collect();

    let mut group = c.benchmark_group("permissions/server");
    group.throughput(Throughput::Elements(BATCH));
    for user in ["open", "limited"] {
        let credentials = Credentials {
            user: Some(user.into()),
            password: Some("p".into()),
            ..Credentials::default()
        };
        let endpoint = Endpoint::plain(&url)
            .expect("url parses")
            .with_credentials(&credentials);
        let mut conn = runtime
            .block_on(Connection::connect_to(&endpoint))
            .expect("connects");
        group.bench_function(format!("pub_1000/{user}"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    for i in 0..BATCH as usize {
                        let subject = &subjects[i % subjects.len()];
                        conn.publish(subject, None, b"0123456789abcdef")
                            .await
                            .expect("publish");
                    }
                    conn.flush().await.expect("flush");
                })
            })
        });
    }
    group.finish();
    runtime.block_on(server.shutdown());
}

criterion_group!(benches, bench_checks, bench_server);
criterion_main!(benches);
