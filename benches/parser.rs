//! Parser throughput: a buffer of 1000 `PUB` ops with 16 B or 1 KiB
//! payloads, parsed whole (`whole`) or fed in 4 KiB reads as a socket would
//! deliver them (`reads_4k`, where ops straddle reads and are re-scanned).
//! Reported in messages per second.

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use skiff::protocol::{parse_client_op, ClientOp, Limits};

const OPS: usize = 1000;

fn wire(payload: usize) -> Vec<u8> {
    let body = vec![b'x'; payload];
    let mut out = Vec::new();
    for i in 0..OPS {
        out.extend_from_slice(format!("PUB orders.eu.{} {payload}\r\n", i % 100).as_bytes());
        out.extend_from_slice(&body);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn parse_all(buf: &mut BytesMut, limits: &Limits) -> usize {
    let mut n = 0;
    while let Some(op) = parse_client_op(buf, limits).unwrap() {
        debug_assert!(matches!(op, ClientOp::Pub(_)));
        black_box(op);
        n += 1;
    }
    n
}

fn bench_parser(c: &mut Criterion) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("parser");
    group.throughput(Throughput::Elements(OPS as u64));
    for (name, payload) in [("pub_16b", 16), ("pub_1k", 1024)] {
        let wire = wire(payload);
        group.bench_function(format!("{name}/whole"), |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| assert_eq!(parse_all(&mut buf, &limits), OPS),
                BatchSize::LargeInput,
            )
        });
        group.bench_function(format!("{name}/reads_4k"), |b| {
            b.iter_batched(
                || BytesMut::with_capacity(64 * 1024),
                |mut buf| {
                    let mut n = 0;
                    for read in wire.chunks(4096) {
                        buf.extend_from_slice(read);
                        n += parse_all(&mut buf, &limits);
                    }
                    assert_eq!(n, OPS);
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench_parser);
criterion_main!(benches);
