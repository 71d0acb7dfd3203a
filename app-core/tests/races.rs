//! The races of `docs/cache-protocol.md`, each made to happen exactly, with pause points
//! ([`app_core::hooks`]) instead of sleeps. Several `Items` in one process stand in for
//! several tasks: each has its own L1, all share one database and one Redis prefix.
//!
//! Each test names its guard and how it was checked that the test fails without it.
//! R7 (a fill started before a flush) is a unit test in `cache::l1`.

#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

use std::time::{Duration, Instant};

use app_core::cache::bus::Bus;
use app_core::cache::l2::{Filler, Stored};
use app_core::cache::{Kind, Tier};
use app_core::fleet::{Control, Fleet};
use app_core::health::BuildInfo;
use app_core::hooks::{Hooks, Point};
use app_core::model::ItemId;
use app_core::service::Items;
use app_core::testing::{self, Pauses, RedisServer, Replica, TestDb, TestRedis, policy, settings};
use fred::prelude::*;
use tiergate_config::{FleetSettings, Secret};

/// Long lifetimes: a stale entry these tests catch must not hide by expiring.
const LONG: Duration = Duration::from_secs(60);

struct Backends {
    db: TestDb,
    redis: TestRedis,
    /// Overrides the shared Redis (for tests that kill connections).
    redis_url: Option<String>,
}

impl Backends {
    async fn new() -> Self {
        Self {
            db: TestDb::create().await,
            redis: TestRedis::new(),
            redis_url: None,
        }
    }

    /// One "task": its own L1, the shared database and Redis prefix.
    async fn instance(&self, hooks: Hooks) -> Items {
        self.instance_on(&self.db, hooks).await
    }

    async fn instance_on(&self, db: &TestDb, hooks: Hooks) -> Items {
        let mut settings = settings(db, &self.redis);
        if let Some(url) = &self.redis_url {
            settings.redis.url = Secret::new(url.clone());
        }
        settings.cache.l2_ttl = LONG;
        let items = testing::items(&settings, policy(LONG, LONG), hooks);
        items.db().migrate().await.unwrap();
        assert!(
            items.l2().wait_connected(Duration::from_secs(5)).await,
            "Redis reachable"
        );
        items
    }

    async fn insert(&self, name: &str) -> ItemId {
        insert_into(&self.db, name).await
    }
}

async fn insert_into(db: &TestDb, name: &str) -> ItemId {
    ItemId::from(db.insert_item(name).await)
}

async fn version(items: &Items, id: ItemId) -> i64 {
    items.get(id).await.unwrap().entry.version
}

/// What the bus does on receipt of the writer's invalidation.
async fn deliver(to: &Items, id: ItemId, version: i64) {
    to.l1().invalidate_version(id.get(), version).await;
}

/// R1 — a reader read v1 from PostgreSQL; a writer then commits v2 and fences it; the
/// reader's late fill of v1 must not replace v2 in Redis.
/// Guard: the Lua fence. Checked: with the fence's version comparison removed
/// (`cur_ver > ver` never true), Redis ends at v1 and the assertion fails.
#[tokio::test]
async fn r1_a_late_fill_never_replaces_a_newer_version_in_l2() {
    let b = Backends::new().await;
    let pauses = Pauses::new();
    let reader = b.instance(pauses.hooks()).await;
    let writer = b.instance(Hooks::default()).await;
    let id = b.insert("v1").await;

    let gate = pauses.arm(Point::BeforeL2Fill, id.get());
    let read = tokio::spawn({
        let reader = reader.clone();
        async move { reader.get(id).await.map(|l| l.entry.version) }
    });
    gate.arrived().await;
    writer.update(id, "v2", None).await.unwrap();
    gate.release();
    assert_eq!(
        read.await.unwrap().unwrap(),
        1,
        "the read began before the write"
    );

    let (in_l2, stored) = writer.l2().get(id.get()).await.unwrap().unwrap();
    assert_eq!(in_l2, 2, "the fence kept v2");
    assert!(matches!(stored, Stored::Value(_)));
    let fresh = b.instance(Hooks::default()).await;
    let lookup = fresh.get(id).await.unwrap();
    assert_eq!((lookup.entry.version, lookup.tier), (2, Tier::L2));
}

/// R2 — an L1 fill of v1 is in flight when the invalidation of v2 arrives; moka inserts
/// the old value after the invalidation.
/// Guard: the watermark check. Checked: with `L1::is_current` ignoring the watermark,
/// both reads return v1.
#[tokio::test]
async fn r2_an_invalidation_during_a_fill_is_not_undone_by_the_fill() {
    let b = Backends::new().await;
    let pauses = Pauses::new();
    let reader = b.instance(pauses.hooks()).await;
    let writer = b.instance(Hooks::default()).await;
    let id = b.insert("v1").await;

    let gate = pauses.arm(Point::BeforeL1Insert, id.get());
    let read = tokio::spawn({
        let reader = reader.clone();
        async move { reader.get(id).await.map(|l| l.entry.version) }
    });
    gate.arrived().await;
    writer.update(id, "v2", None).await.unwrap();
    deliver(&reader, id, 2).await;
    gate.release();

    assert_eq!(
        read.await.unwrap().unwrap(),
        2,
        "the superseded fill is not served"
    );
    assert_eq!(version(&reader, id).await, 2, "nor kept in L1");
}

/// R3 — this instance writes v2 while its own fill of v1 is in flight; the fill lands
/// last. Guard: the watermark is raised before the written entry is inserted. Checked:
/// with `observe_version` removed from `L1::insert_written`, the read after the write
/// returns v1.
#[tokio::test]
async fn r3_a_local_write_is_not_overwritten_by_an_older_fill() {
    let b = Backends::new().await;
    let pauses = Pauses::new();
    let instance = b.instance(pauses.hooks()).await;
    let id = b.insert("v1").await;

    let gate = pauses.arm(Point::BeforeL1Insert, id.get());
    let read = tokio::spawn({
        let instance = instance.clone();
        async move { instance.get(id).await.map(|l| l.entry.version) }
    });
    gate.arrived().await;
    instance.update(id, "v2", None).await.unwrap();
    gate.release();
    read.await.unwrap().unwrap();
    assert_eq!(version(&instance, id).await, 2, "read-your-writes");
}

/// R4 — the fence must precede the publish: a peer woken by the message re-reads L2 and
/// must find the new version there, or it would cache the old one with nothing left to
/// correct it. Guard: the write order. Checked: with publish moved before the fence in
/// `Items::after_commit`, L2 still holds v1 at the pause.
#[tokio::test]
async fn r4_the_invalidation_is_published_only_after_the_fence() {
    let b = Backends::new().await;
    let pauses = Pauses::new();
    let writer = b.instance(pauses.hooks()).await;
    let peer = b.instance(Hooks::default()).await;
    let id = b.insert("v1").await;
    assert_eq!(
        version(&peer, id).await,
        1,
        "the peer holds v1, and so does L2"
    );

    let gate = pauses.arm(Point::BeforePublish, id.get());
    let write = tokio::spawn({
        let writer = writer.clone();
        async move { writer.update(id, "v2", None).await.map(|_| ()) }
    });
    gate.arrived().await;
    assert_eq!(
        writer.l2().get(id.get()).await.unwrap().unwrap().0,
        2,
        "fenced before publishing"
    );
    gate.release();
    write.await.unwrap().unwrap();

    deliver(&peer, id, 2).await;
    let lookup = peer.get(id).await.unwrap();
    assert_eq!((lookup.entry.version, lookup.tier), (2, Tier::L2));
}

/// R5 — an invalidation is lost while the subscriber reconnects. Once subscribed again,
/// the peer flushes L1 and stops serving what changed meanwhile.
/// Guard: flush on reconnect. Checked: with `Bus::resubscribe` not flushing, the peer
/// keeps serving v1 (its L1 lifetime is 60 s) and the deadline below is hit.
#[tokio::test]
async fn r5_a_lost_invalidation_is_made_good_by_the_flush_on_reconnect() {
    let server = RedisServer::start();
    let mut b = Backends::new().await;
    b.redis_url = Some(server.url());
    let writer = b.instance(Hooks::default()).await;
    let peer = b.instance(Hooks::default()).await;
    let fleet = Fleet::new(
        Control::new(peer.db().clone(), peer.l2().clone()),
        "peer".to_owned(),
        BuildInfo {
            version: "test",
            commit: "test",
        },
        None,
        &FleetSettings::default(),
    );
    let bus = Bus::new(peer.l2(), peer.l1().clone(), peer.origin(), fleet).unwrap();
    tokio::spawn(bus.run());
    let admin = admin_client(&server.url()).await;
    wait_for_subscribers(&admin, writer.l2().channel(), 1).await;

    let id = b.insert("v1").await;
    assert_eq!(version(&peer, id).await, 1);
    // The write whose message is lost: committed and fenced, never delivered.
    let client = b.db.client().await;
    client
        .execute(
            "UPDATE items SET name = 'v2', version = version + 1 WHERE id = $1",
            &[&id.get()],
        )
        .await
        .unwrap();
    writer
        .l2()
        .fill(id.get(), 2, &Stored::Tombstone, None, Filler::Writer)
        .await
        .unwrap();
    assert_eq!(
        version(&peer, id).await,
        1,
        "without the message the peer still serves v1"
    );

    let _: Value = admin
        .custom(fred::cmd!("CLIENT"), vec!["KILL", "TYPE", "pubsub"])
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while version(&peer, id).await != 2 {
        assert!(
            Instant::now() < deadline,
            "the peer still serves v1 after reconnecting"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// R6 — the writer dies after its commit, before fencing and publishing. Its outbox row
/// stays; the relay of another instance fences and publishes for it.
/// Guard: the outbox relay. The test shows the state before the relay (Redis at v1, so
/// every peer would keep v1) and after it.
#[tokio::test]
async fn r6_a_writer_that_dies_after_commit_is_repaired_by_the_relay() {
    let b = Backends::new().await;
    let pauses = Pauses::new();
    let writer = b.instance(pauses.hooks()).await;
    let peer = b.instance(Hooks::default()).await;
    let id = b.insert("v1").await;
    assert_eq!(version(&peer, id).await, 1);

    let gate = pauses.arm(Point::AfterCommit, id.get());
    let write = tokio::spawn({
        let writer = writer.clone();
        async move { writer.update(id, "v2", None).await.map(|_| ()) }
    });
    gate.arrived().await;
    write.abort(); // the writer dies here
    let _ = write.await;
    assert_eq!(
        writer.l2().get(id.get()).await.unwrap().unwrap().0,
        1,
        "nothing fenced"
    );

    assert_eq!(peer.relay_outbox(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(version(&peer, id).await, 2, "the relay applied it here too");
    let fresh = b.instance(Hooks::default()).await;
    assert_eq!(version(&fresh, id).await, 2, "and fenced it in Redis");
    assert_eq!(
        peer.relay_outbox(Duration::ZERO).await.unwrap(),
        0,
        "nothing left"
    );
}

/// A "task" reading through `replica`, which may lag at most `REPLICA_MAX_LAG`.
async fn reading_through(b: &Backends, replica: &Replica, hooks: Hooks) -> Items {
    let mut settings = settings(&b.db, &b.redis);
    settings.cache.l2_ttl = LONG;
    settings.database.reader_url = Some(Secret::new(replica.url(&b.db)));
    settings.database.reader_max_lag = REPLICA_MAX_LAG;
    let items = testing::items(&settings, policy(LONG, LONG), hooks);
    assert!(items.l2().wait_connected(Duration::from_secs(5)).await);
    items
}

/// How long a read waits for a lagging replica here before the writer answers.
const REPLICA_MAX_LAG: Duration = Duration::from_millis(200);

/// R8 — the reader replica lags: after the invalidation of v2 it still returns v1, and
/// Redis no longer holds the key.
/// Guards: the reader's proof (it has not replayed v2, so the writer answers) and the
/// watermark (a reader answer older than a version announced here is read again from
/// the writer; the recent-write window, a third guard, is zero here). Checked: with the
/// proof accepting any replay position and `Items::read_database`'s watermark re-read
/// removed, Redis ends at v1; with either one alone, the test passes.
#[tokio::test]
async fn r8_a_lagging_replica_does_not_bring_back_an_old_version() {
    let replica = Replica::start(env!("CARGO_TARGET_TMPDIR")).await;
    let b = Backends::new().await;
    let writer = b.instance(Hooks::default()).await;
    let id = b.insert("v1").await;
    replica.catch_up().await;
    let mut settings = settings(&b.db, &b.redis);
    settings.cache.recent_write_window = Duration::ZERO;
    settings.cache.l2_ttl = LONG;
    settings.database.reader_url = Some(Secret::new(replica.url(&b.db)));
    settings.database.reader_max_lag = REPLICA_MAX_LAG;
    let peer = testing::items(&settings, policy(LONG, LONG), Hooks::default());
    assert!(peer.l2().wait_connected(Duration::from_secs(5)).await);
    assert_eq!(version(&peer, id).await, 1, "the peer caches v1");

    replica.pause_replay().await;
    writer.update(id, "v2", None).await.unwrap();
    // No copy in Redis to help: the lagging replica is all the peer can read.
    let admin = admin_client(&app_core::testing::redis_url()).await;
    let _: i64 = admin.del(peer.l2().key(id.get())).await.unwrap();
    deliver(&peer, id, 2).await;
    assert_eq!(version(&peer, id).await, 2);
    let in_l2 = peer.l2().get(id.get()).await.unwrap().map(|(v, _)| v);
    assert_eq!(
        in_l2,
        Some(2),
        "the writer's answer filled Redis, not the replica's"
    );
    replica.resume_replay().await;
}

/// R13 — replica lag after Redis evicted the fence: a task that never saw the write (no
/// watermark: it started after it) misses L1 and L2, takes a lease, and reads a replica
/// that has not replayed the write. Likewise for an item inserted while the replica
/// lags: its "no such id" must not be cached as final.
/// Guard: a reader's answer counts only when the reader has replayed the writer's WAL
/// position taken after the lease (`store::replica`); here it has not, so after
/// `REPLICA_MAX_LAG` the writer answers. Checked: with the proof accepting any replay
/// position (`if true || replayed >= writer_at` in `poll_caught_up`), the new task
/// serves v1 and fills Redis with it, and answers "no such id" for the new item.
#[tokio::test]
async fn r13_a_lagging_replica_fills_no_old_version_and_no_false_absence() {
    let replica = Replica::start(env!("CARGO_TARGET_TMPDIR")).await;
    let b = Backends::new().await;
    let writer = b.instance(Hooks::default()).await;
    let (changed, _) = writer.create("v1").await.unwrap();
    replica.catch_up().await;

    replica.pause_replay().await;
    writer.update(changed, "v2", None).await.unwrap();
    let (created, _) = writer.create("new").await.unwrap();
    let admin = admin_client(&app_core::testing::redis_url()).await;
    for id in [changed, created] {
        // Evicted, fence and all.
        let _: i64 = admin.del(writer.l2().key(id.get())).await.unwrap();
    }

    let newcomer = reading_through(&b, &replica, Hooks::default()).await;
    let lookup = newcomer.get(changed).await.unwrap();
    assert_eq!(
        lookup.entry.version, 2,
        "the lagging replica's v1 is not served"
    );
    let in_l2 = newcomer.l2().get(changed.get()).await.unwrap();
    assert_eq!(in_l2.map(|(v, _)| v), Some(2), "nor put in Redis");
    let lookup = newcomer.get(created).await.unwrap();
    assert_eq!(
        (lookup.entry.kind, lookup.entry.version),
        (Kind::Value, 1),
        "an item the replica has not replayed yet exists"
    );

    replica.resume_replay().await;
    replica.catch_up().await;
    let later = reading_through(&b, &replica, Hooks::default()).await;
    let lookup = later.get(changed).await.unwrap();
    assert_eq!((lookup.entry.version, lookup.tier), (2, Tier::L2));
}

/// R9 — an id is read before it exists (its absence is cached), then created.
/// Guard: the insert is version 1, above the absence's 0, so its fence replaces the
/// absent entry in Redis, and it is invalidated like any write. Checked: with the fence
/// refusing to replace an absent entry (`if cur[2] == 'n' then return 0 end`), the
/// fresh instance answers 404.
#[tokio::test]
async fn r9_a_cached_absence_gives_way_to_the_insert() {
    let b = Backends::new().await;
    let writer = b.instance(Hooks::default()).await;
    let peer = b.instance(Hooks::default()).await;
    let probe = b.insert("probe").await;
    let next = ItemId::from(probe.get() + 1);
    assert_eq!(peer.get(next).await.unwrap().entry.kind, Kind::Absent);

    let (id, _) = writer.create("new").await.unwrap();
    assert_eq!(id, next);
    deliver(&peer, id, 1).await;
    let lookup = peer.get(id).await.unwrap();
    assert_eq!((lookup.entry.kind, lookup.entry.version), (Kind::Value, 1));
    let fresh = b.instance(Hooks::default()).await;
    assert_eq!(
        version(&fresh, id).await,
        1,
        "Redis' absent entry was fenced over"
    );
}

/// R10 — two writes, their messages delivered out of order (v3 before v2).
/// Guard: the watermark keeps the maximum; fences compare versions. Checked: with
/// `Watermark::raise` overwriting instead of keeping the maximum, v2 counts as current.
#[tokio::test]
async fn r10_reordered_invalidations_keep_the_newest_version() {
    let b = Backends::new().await;
    let writer = b.instance(Hooks::default()).await;
    let peer = b.instance(Hooks::default()).await;
    let id = b.insert("v1").await;
    assert_eq!(version(&peer, id).await, 1);
    writer.update(id, "v2", None).await.unwrap();
    let v2 = writer.get(id).await.unwrap().entry;
    writer.update(id, "v3", None).await.unwrap();

    deliver(&peer, id, 3).await;
    deliver(&peer, id, 2).await;
    assert_eq!(version(&peer, id).await, 3);
    assert!(
        !peer.l1().is_current(id.get(), &v2),
        "v2 is below the watermark"
    );
    assert_eq!(writer.l2().get(id.get()).await.unwrap().unwrap().0, 3);
}

/// R11 — a herd on one cold key across two tasks: single flight per task, so at most one
/// PostgreSQL query per task (counted by PostgreSQL).
/// Guard: `L1::get_or_load` (moka's `try_get_with`). Checked: with `Items::get`
/// calling the loader directly, the count grows with the readers.
#[tokio::test]
async fn r11_a_herd_on_a_cold_key_makes_one_query_per_task() {
    let b = Backends::new().await;
    let tasks = [
        b.instance(Hooks::default()).await,
        b.instance(Hooks::default()).await,
    ];
    let id = b.insert("cold").await;
    let before = b.db.items_table_scans().await;

    let reads = tasks.iter().flat_map(|t| (0..50).map(move |_| t.get(id)));
    let results = futures_util::future::join_all(reads).await;
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|l| l.entry.version == 1))
    );

    let queries = b.db.items_table_scans().await - before;
    assert!(
        (1..=2).contains(&queries),
        "{queries} queries for 100 reads on two tasks"
    );
}

/// R12 — the request loading a key is cancelled mid-fill; a waiter takes over and every
/// waiter gets the item, with at most one more query.
/// Guard: the single flight, and moka handing an abandoned `try_get_with` to a waiter.
/// Checked: with `Items::get` calling the loader directly (no flight to hand over), the
/// count is 11 and the assertion fails.
#[tokio::test]
async fn r12_a_cancelled_loader_is_taken_over_by_a_waiter() {
    let b = Backends::new().await;
    let pauses = Pauses::new();
    let task = b.instance(pauses.hooks()).await;
    let id = b.insert("v1").await;
    let before = b.db.items_table_scans().await;

    let gate = pauses.arm(Point::AfterDbRead, id.get());
    let leader = tokio::spawn({
        let task = task.clone();
        async move { task.get(id).await.map(|l| l.entry.version) }
    });
    gate.arrived().await;
    let waiters: Vec<_> = (0..10)
        .map(|_| {
            let task = task.clone();
            tokio::spawn(async move { task.get(id).await.map(|l| l.entry.version) })
        })
        .collect();
    leader.abort(); // the client went away while its request was loading
    assert!(leader.await.is_err_and(|e| e.is_cancelled()));
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap().unwrap(), 1);
    }
    let queries = b.db.items_table_scans().await - before;
    assert!(queries <= 2, "{queries} queries");
}

/// R14 — a writer's fence failed during a Redis outage (here the writer cannot reach
/// Redis at all; L2 still holds v1), and this instance lost its channel: it recovers
/// with a relay pass, which must fence that write before reads use Redis again.
/// Guard: the recovery's horizon (every row committed before it began is relayed before
/// it trusts). Checked: with `recover` trusting without relaying, the read below
/// returns v1 from Redis.
#[tokio::test]
async fn r14_a_write_whose_fence_failed_is_fenced_before_redis_is_trusted_again() {
    let b = Backends::new().await;
    let reader = b.instance(Hooks::default()).await;
    let id = b.insert("v1").await;
    assert_eq!(version(&reader, id).await, 1, "v1 filled into Redis");

    let mut cut_off = settings(&b.db, &b.redis);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    cut_off.redis.url = Secret::new(format!("redis://{}", closed.local_addr().unwrap()));
    drop(closed);
    let writer = testing::items(&cut_off, policy(LONG, LONG), Hooks::default());
    writer.update(id, "v2", None).await.unwrap();
    assert_eq!(
        reader.l2().get(id.get()).await.unwrap().unwrap().0,
        1,
        "the fence failed"
    );

    reader.l2().distrust(); // as the bus does when the channel drops
    reader.relay_outbox(Duration::ZERO).await.unwrap();
    assert!(reader.l2().is_trusted());
    reader.l1().flush(); // as the bus does when the channel is back
    assert_eq!(version(&reader, id).await, 2);
}

/// R15 — a recovery is under way when a fence of this instance fails (Redis blocks writes:
/// `CLIENT PAUSE WRITE`, so the fence times out and L2 keeps v1): the recovery must not
/// trust Redis when it ends, or the read below would get Redis' v1. Guard: the distrust
/// epoch. Checked: with `trust_unless_distrusted_since` trusting whatever the epoch, the
/// recovery trusted Redis and the test failed.
#[tokio::test]
async fn r15_a_fence_failing_during_a_recovery_keeps_redis_untrusted() {
    let server = RedisServer::start();
    let mut b = Backends::new().await;
    b.redis_url = Some(server.url());
    let pauses = Pauses::new();
    let task = b.instance(pauses.hooks()).await;
    let id = b.insert("v1").await;
    assert_eq!(version(&task, id).await, 1, "v1 filled into Redis");

    task.l2().distrust();
    let gate = pauses.arm(Point::BeforeTrust, 0);
    let recovery = tokio::spawn({
        let task = task.clone();
        async move { task.relay_outbox(Duration::ZERO).await.map(|_| ()) }
    });
    gate.arrived().await;
    let admin = admin_client(&server.url()).await;
    let _: Value = admin
        .custom(fred::cmd!("CLIENT"), vec!["PAUSE", "20000", "WRITE"])
        .await
        .unwrap();
    task.update(id, "v2", None).await.unwrap();
    gate.release();
    recovery.await.unwrap().unwrap();

    assert!(
        !task.l2().is_trusted(),
        "a fence failed after the recovery began"
    );
    task.l1().flush();
    assert_eq!(
        version(&task, id).await,
        2,
        "read from PostgreSQL, not Redis' v1"
    );
    let _: Value = admin
        .custom(fred::cmd!("CLIENT"), vec!["UNPAUSE"])
        .await
        .unwrap();
}

async fn admin_client(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

/// Waits until `channel` has `n` subscribers on the server.
async fn wait_for_subscribers(admin: &Client, channel: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counts: Vec<Value> = admin
            .custom(fred::cmd!("PUBSUB"), vec!["NUMSUB", channel])
            .await
            .unwrap();
        if counts.get(1).and_then(Value::as_i64) == Some(n) {
            return;
        }
        assert!(Instant::now() < deadline, "no subscriber on {channel}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
