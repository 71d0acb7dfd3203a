//! Reads through the shared streaming replica (`scripts/services --replica`), which no
//! test pauses or stops: a replica that has caught up answers misses itself, and its
//! answers are trusted like the writer's. The lagging cases are races R8 and R13 in
//! `races.rs`, on private replicas.

#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

use std::time::Duration;

use app_core::cache::Tier;
use app_core::hooks::Hooks;
use app_core::store::Moved;
use app_core::testing::{self, Replica, TestDb, TestRedis, policy, settings};

const LONG: Duration = Duration::from_secs(60);
use tiergate_config::Secret;

/// A replica that has replayed the write answers the miss, proven current, and its
/// answer fills Redis for every other task. Checked: with the proof never satisfied
/// (`replayed > writer_at + u64::MAX / 2`), the writer answers, counted as `behind`, and
/// the first assertion fails.
#[tokio::test]
async fn a_replica_that_caught_up_answers_misses_and_fills_redis() {
    let replica = Replica::shared();
    let (db, redis) = (TestDb::create().await, TestRedis::new());
    let mut settings = settings(&db, &redis);
    let writer = testing::items(&settings, policy(LONG, LONG), Hooks::default());
    writer.db().migrate().await.unwrap();
    let (id, _) = writer.create("on the replica").await.unwrap();
    // Redis loses it, so the next task must read PostgreSQL.
    assert!(writer.l2().wait_connected(Duration::from_secs(5)).await);
    let client = fred_client().await;
    let _: i64 = fred::interfaces::KeysInterface::del(&client, writer.l2().key(id.get()))
        .await
        .unwrap();
    replica.catch_up().await;

    settings.database.reader_url = Some(Secret::new(replica.url(&db)));
    // Other tests write all the time, and a shared replica follows them: give it room.
    settings.database.reader_max_lag = Duration::from_secs(10);
    let reader = testing::items(&settings, policy(LONG, LONG), Hooks::default());
    assert!(reader.l2().wait_connected(Duration::from_secs(5)).await);
    let lookup = reader.get(id).await.unwrap();
    assert_eq!((lookup.entry.version, lookup.tier), (1, Tier::Database));
    let stats = reader.db().reader_stats().unwrap();
    assert_eq!(stats.answered, 1, "the replica answered: {stats:?}");
    assert_eq!(stats.moved(Moved::Behind) + stats.moved(Moved::Down), 0);

    let other = testing::items(&settings, policy(LONG, LONG), Hooks::default());
    assert!(other.l2().wait_connected(Duration::from_secs(5)).await);
    let lookup = other.get(id).await.unwrap();
    assert_eq!(
        (lookup.entry.version, lookup.tier),
        (1, Tier::L2),
        "the replica's answer filled Redis"
    );
}

async fn fred_client() -> fred::clients::Client {
    use fred::interfaces::ClientLike;
    let config = fred::types::config::Config::from_url(&testing::redis_url()).unwrap();
    let client = fred::types::Builder::from_config(config).build().unwrap();
    client.init().await.unwrap();
    client
}
