//! Run with: `cargo bench -p bench --bench cache_chain` (needs the PostgreSQL and Redis
//! of `scripts/services`; `TIERGATE_TEST_DATABASE_URL` / `TIERGATE_TEST_REDIS_URL`).
//!
//! One read through the whole chain (`Items::get`), by the tier that answers it:
//! - `l1_hit`: in-process, with the watermark and flush checks;
//! - `l2_hit`: L1 emptied for the key before each read (untimed), Redis answers;
//! - `miss`: L1 and Redis emptied before each read (untimed), PostgreSQL answers and the
//!   read fills Redis through the fence.
//!
//! The peer in the same run is the tier below: each row is a ratio to the next.
//! Last results: 2026-12-06 23:00 UTC (criterion medians) `l1_hit` 484.9 ns, `l2_hit`
//! 435.6 µs, `miss` 1.91 ms, on a VM whose figures wandered that evening: the same
//! binary at 22:44 (a `psql` loop sampling PostgreSQL beside it) gave 446.7 ns,
//! 113.6 µs, 883.0 µs; `bench/RESULTS.md` has an earlier machine's: 434 ns, 40 µs,
//! 460 µs. The cause of the slow Redis and PostgreSQL round trips was not found.

use std::hint::black_box;
use std::time::{Duration, Instant};

use app_core::hooks::Hooks;
use app_core::model::ItemId;
use app_core::service::Items;
use app_core::testing::{self, TestDb, TestRedis, policy, redis_url, settings};
use criterion::{Criterion, criterion_group, criterion_main};
use fred::prelude::*;

struct Chain {
    items: Items,
    id: ItemId,
    redis: Client,
    _db: TestDb,
    _prefix: TestRedis,
}

async fn chain() -> Chain {
    let db = TestDb::create().await;
    let prefix = TestRedis::new();
    let settings = settings(&db, &prefix);
    let ttl = Duration::from_secs(600);
    let items = testing::items(&settings, policy(ttl, ttl), Hooks::default());
    items.db().migrate().await.expect("migrate");
    assert!(
        items.l2().wait_connected(Duration::from_secs(5)).await,
        "Redis reachable"
    );
    let (id, _) = items.create("Blue hat").await.expect("create");
    let redis = Builder::from_config(Config::from_url(&redis_url()).expect("url"))
        .build()
        .expect("client");
    redis.init().await.expect("connect");
    Chain {
        items,
        id,
        redis,
        _db: db,
        _prefix: prefix,
    }
}

fn reads(c: &mut Criterion) {
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    else {
        panic!("a tokio runtime for the bench");
    };
    let chain = runtime.block_on(chain());
    let (items, id, redis) = (&chain.items, chain.id, &chain.redis);
    let key = items.l2().key(id.get());

    let mut group = c.benchmark_group("chain");
    group.bench_function("l1_hit", |b| {
        b.to_async(&runtime)
            .iter(|| async { black_box(items.get(id).await.map(|l| l.entry.version)) });
    });
    group.bench_function("l2_hit", |b| {
        b.to_async(&runtime).iter_custom(|iters| async move {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                items.l1().invalidate(id.get()).await;
                let started = Instant::now();
                black_box(items.get(id).await.map(|l| l.entry.version)).ok();
                timed += started.elapsed();
            }
            timed
        });
    });
    group.bench_function("miss", |b| {
        b.to_async(&runtime).iter_custom(|iters| {
            let key = key.clone();
            async move {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    items.l1().invalidate(id.get()).await;
                    let _: i64 = redis.del(key.as_str()).await.unwrap_or_default();
                    let started = Instant::now();
                    black_box(items.get(id).await.map(|l| l.entry.version)).ok();
                    timed += started.elapsed();
                }
                timed
            }
        });
    });
    group.finish();
}

criterion_group!(benches, reads);
criterion_main!(benches);
