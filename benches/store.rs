//! Store write throughput: batches of 128 appends (16 B or 1 KiB payloads)
//! committed through one [`StoreWriter`], as the stream ingest task writes
//! a publisher's burst, into file storage (fjall, no fsync: the fsync is a
//! disk's cost, measured by `skiff bench jspub`) and memory storage.
//! Reported in messages per second. The file store keeps growing across
//! iterations, as a stream does; old messages are flushed to disk by
//! fjall in the background, which is part of the cost.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use skiff::store::{FileStorage, MemoryStore, StoreLimits, StreamStore};

const BATCH: usize = 128;

fn write_batch(store: &dyn StreamStore, subject: &Bytes, payload: &Bytes) {
    let mut writer = store.writer().expect("writer");
    for _ in 0..BATCH {
        writer
            .append(subject.clone(), 0, payload.clone(), 1)
            .expect("append");
    }
    writer.commit().expect("commit");
}

fn bench_append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let storage = FileStorage::open(dir.path()).expect("open storage");
    let mut group = c.benchmark_group("store_append");
    group.throughput(Throughput::Elements(BATCH as u64));
    let subject = Bytes::from_static(b"orders.eu.created");
    for (name, size) in [("16b", 16), ("1k", 1024)] {
        let payload = Bytes::from(vec![b'x'; size]);
        let file = storage
            .open_stream(&format!("bench_{name}"), StoreLimits::default())
            .expect("open stream");
        group.bench_function(format!("file/{name}"), |b| {
            b.iter(|| write_batch(&*file, &subject, &payload))
        });
        let memory = MemoryStore::new(StoreLimits::default());
        group.bench_function(format!("memory/{name}"), |b| {
            b.iter(|| write_batch(&memory, &subject, &payload))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_append);
criterion_main!(benches);
