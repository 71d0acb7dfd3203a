//! Run with: `cargo bench -p bench --bench cache_l1`
//!
//! The L1 hot path in isolation: a hit checked against the version watermark and the
//! flush stamp, and building a cache entry (the served JSON body) from an item's JSON.
//!
//! Last results: 2026-12-06 23:00 UTC, a 2-core VM slower than usual that evening
//! (criterion medians): `hit_with_watermark` 291.7 ns, `miss` 166.0 ns,
//! `entry_from_item_json` 117.7 ns, `serve_body_from_entry` 27.3 ns. Earlier figures
//! and the machine: `bench/RESULTS.md`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use app_core::cache::l1::L1;
use app_core::cache::{Entry, Kind, Tier};
use app_core::testing::policy;
use criterion::{Criterion, criterion_group, criterion_main};

const ITEM_JSON: &[u8] = br#"{"id":42,"name":"Blue hat","created_at":"2026-11-22T02:20:03.992190Z","updated_at":"2026-11-22T02:20:03.992190Z","version":3}"#;

fn l1_hit(c: &mut Criterion) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().build() else {
        panic!("a tokio runtime for the bench");
    };
    let ttl = Duration::from_secs(600);
    let l1 = L1::new(64 << 20, policy(ttl, ttl));
    let stamp = || l1.stamp(Tier::Database, Instant::now(), Kind::Value);
    runtime.block_on(async {
        for id in 0..10_000 {
            l1.insert_written(id, Arc::new(Entry::value(3, ITEM_JSON, stamp())))
                .await;
        }
    });

    let mut group = c.benchmark_group("l1");
    group.bench_function("hit_with_watermark", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(l1.get(black_box(4_242)).await) });
    });
    group.bench_function("miss", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(l1.get(black_box(1_000_000)).await) });
    });
    group.bench_function("entry_from_item_json", |b| {
        let stamp = stamp();
        b.iter(|| black_box(Entry::value(3, black_box(ITEM_JSON), stamp)));
    });
    group.bench_function("serve_body_from_entry", |b| {
        let entry = Entry::value(3, ITEM_JSON, stamp());
        b.iter(|| black_box(entry.body(black_box(Tier::L1))));
    });
    group.finish();
}

criterion_group!(benches, l1_hit);
criterion_main!(benches);
