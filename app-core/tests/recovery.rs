//! After a Redis outage: writes made meanwhile left outbox rows (their fences failed),
//! and reads skip Redis until those writes are fenced. The recovery must make Redis
//! trustworthy again in seconds, whatever the backlog, and while writes go on.
//! Against a private `redis-server` (the test kills it) and the real PostgreSQL.

#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

use std::time::{Duration, Instant};

use app_core::cache::Tier;
use app_core::cache::l2::Stored;
use app_core::hooks::Hooks;
use app_core::model::ItemId;
use app_core::service::Items;
use app_core::testing::{self, RedisServer, TestDb, TestRedis, policy, settings};
use tiergate_config::Secret;

const LONG: Duration = Duration::from_secs(60);

/// One instance on the private Redis `url`; its breaker never opens, so only the relay
/// decides when Redis is used again.
async fn instance(db: &TestDb, redis: &TestRedis, url: &str) -> Items {
    let mut settings = settings(db, redis);
    settings.redis.url = Secret::new(url.to_owned());
    settings.redis.breaker_failures = u32::MAX;
    // A relay pass sends fences in batches of a thousand; on a loaded CI box one batch can
    // outlast the default 250 ms, which ends the pass early. These tests are about what
    // one pass repairs, not about the timeout.
    settings.redis.command_timeout = Duration::from_secs(5);
    let items = testing::items(&settings, policy(LONG, Duration::ZERO), Hooks::default());
    items.db().migrate().await.unwrap();
    assert!(items.l2().wait_connected(Duration::from_secs(5)).await);
    items
}

/// Waits until Redis answers this instance again (its client reconnects with backoff).
async fn wait_for_redis(items: &Items) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while items.l2().ping().await.is_err() {
        assert!(Instant::now() < deadline, "Redis did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `n` items behind the app's back with their outbox rows, as writers whose
/// fences failed during the outage leave them; returns their ids.
async fn backlog(db: &TestDb, n: i64) -> Vec<i64> {
    let client = db.client().await;
    let rows = client
        .query(
            "WITH created AS (INSERT INTO items (name)
                              SELECT 'backlog ' || n FROM generate_series(1, $1::bigint) AS n
                              RETURNING id, version),
                  queued AS (INSERT INTO cache_outbox (item_id, version)
                             SELECT id, version FROM created)
             SELECT id FROM created",
            &[&n],
        )
        .await
        .unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

async fn outbox_rows(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM cache_outbox", &[])
        .await
        .unwrap()
        .get(0)
}

/// A backlog of 5,000 writes (five seconds of a busy instance's writes) is repaired in
/// one relay pass, and Redis is read again right after it. Checked against the relay it
/// replaced (100 rows a pass, one round trip per fence and per publish): one pass left
/// 4,900 rows and Redis untrusted, a pass a second for 50 s.
#[tokio::test]
async fn one_relay_pass_repairs_a_backlog_of_thousands_and_trusts_redis_again() {
    let db = TestDb::create().await;
    let redis = TestRedis::new();
    let server = RedisServer::start();
    let port = server.port;
    let items = instance(&db, &redis, &server.url()).await;
    let seen = ItemId::from(db.insert_item("seen").await);
    assert_eq!(items.get(seen).await.unwrap().tier, Tier::Database);

    server.stop();
    // A write whose fence fails: from now on reads skip Redis.
    items
        .update(seen, "changed in the outage", None)
        .await
        .unwrap();
    assert!(!items.l2().is_trusted());
    let ids = backlog(&db, 5_000).await;
    let server = RedisServer::start_on(port);
    wait_for_redis(&items).await;

    let started = Instant::now();
    let relayed = items.relay_outbox(Duration::ZERO).await.unwrap();
    let took = started.elapsed();
    println!("one relay pass: {relayed} rows in {took:?}");
    assert!(items.l2().is_trusted(), "Redis trusted after one pass");
    assert_eq!(outbox_rows(&db).await, 0);
    // Fenced: a tombstone at the written version sends the next reader to PostgreSQL.
    let (version, stored) = items.l2().get(ids[0]).await.unwrap().unwrap();
    assert_eq!((version, stored), (1, Stored::Tombstone));
    items.l1().flush();
    let lookup = items.get(seen).await.unwrap();
    assert_eq!(lookup.entry.version, 2);
    assert_eq!(
        items.get(seen).await.unwrap().tier,
        Tier::L1,
        "filled after the recovery"
    );
    let fresh = instance(&db, &redis, &server.url()).await;
    assert_eq!(
        fresh.get(seen).await.unwrap().tier,
        Tier::L2,
        "and Redis is read"
    );
}
