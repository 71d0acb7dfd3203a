//! Lifetimes and outages: stale entries served while PostgreSQL is down (within
//! `cache.max_stale`), writes refused meanwhile, and the background refresh of entries
//! near their end.

#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

use std::time::{Duration, Instant};

use app_core::cache::Tier;
use app_core::cache::l1::Policy;
use app_core::hooks::Hooks;
use app_core::model::ItemId;
use app_core::service::ServiceError;
use app_core::store::{Database, StoreError};
use app_core::testing::{self, TestDb, TestRedis, redis_url, settings};
use fred::prelude::*;
use tiergate_config::Secret;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A TCP forwarder to PostgreSQL that the test can cut, as an outage would.
struct Outage {
    tasks: JoinSet<()>,
    port: u16,
}

impl Outage {
    async fn forwarding_to(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { tasks, port }
    }

    /// Closes the listener and every forwarded connection.
    async fn cut(&mut self) {
        self.tasks.shutdown().await;
    }
}

/// The parts of a PostgreSQL URL: before the host, `host:port`, and the path.
fn split(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (auth, path) = rest.split_once('/').unwrap();
    let (userinfo, hostport) = auth
        .rsplit_once('@')
        .map_or((String::new(), auth), |(u, h)| (format!("{u}@"), h));
    (
        format!("{scheme}://{userinfo}"),
        hostport.to_owned(),
        path.to_owned(),
    )
}

#[tokio::test]
async fn while_postgres_is_down_stale_entries_are_served_and_writes_refused() {
    let db = TestDb::create().await;
    let redis = TestRedis::new();
    let mut settings = settings(&db, &redis);
    Database::new(&settings.database)
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let (before_host, target, path) = split(&db.url);
    let mut outage = Outage::forwarding_to(target).await;
    settings.database.url = Secret::new(format!("{before_host}127.0.0.1:{}/{path}", outage.port));
    settings.database.checkout_timeout = Duration::from_millis(200);
    // No Redis (a closed port): every reload must come from PostgreSQL.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    settings.redis.url = Secret::new(format!("redis://127.0.0.1:{closed}"));
    let fresh_for = Duration::from_millis(100);
    let policy = Policy {
        ttl: fresh_for,
        degraded_ttl: fresh_for,
        max_stale: Duration::from_secs(60),
        refresh_after: Duration::ZERO,
    };
    let items = testing::items(&settings, policy, Hooks::default());
    let cached = ItemId::from(db.insert_item("cached").await);
    let uncached = ItemId::from(db.insert_item("uncached").await);
    assert_eq!(items.get(cached).await.unwrap().entry.version, 1);

    outage.cut().await;
    // Past fresh (the TTL, with its 10 % jitter) but within max_stale.
    tokio::time::sleep(fresh_for.mul_f64(1.2)).await;
    let lookup = items.get(cached).await.unwrap();
    assert_eq!(
        (lookup.entry.version, lookup.tier),
        (1, Tier::L1),
        "stale, but served"
    );

    let error = items.get(uncached).await.unwrap_err();
    assert!(
        matches!(*error, ServiceError::Store(StoreError::Unavailable(_))),
        "{error:?}"
    );
    let error = items.update(cached, "new", None).await.unwrap_err();
    assert!(
        matches!(error, ServiceError::Store(StoreError::Unavailable(_))),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_entry_near_its_end_is_served_and_refreshed_once_in_the_background() {
    let db = TestDb::create().await;
    let redis = TestRedis::new();
    let settings = settings(&db, &redis);
    Database::new(&settings.database)
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let refresh_after = Duration::from_millis(50);
    let policy = Policy {
        ttl: Duration::from_secs(60),
        degraded_ttl: Duration::from_secs(60),
        max_stale: Duration::ZERO,
        refresh_after,
    };
    let items = testing::items(&settings, policy, Hooks::default());
    assert!(items.l2().wait_connected(Duration::from_secs(5)).await);
    let id = ItemId::from(db.insert_item("v1").await);
    assert_eq!(items.get(id).await.unwrap().entry.version, 1);

    // Changed behind the caches' back (as if its invalidation were lost), and gone from
    // Redis (its TTL ran out): only a refresh from PostgreSQL can find v2.
    let client = db.client().await;
    client
        .execute(
            "UPDATE items SET name = 'v2', version = 2 WHERE id = $1",
            &[&id.get()],
        )
        .await
        .unwrap();
    let admin = Builder::from_config(Config::from_url(&redis_url()).unwrap())
        .build()
        .unwrap();
    admin.init().await.unwrap();
    let _: i64 = admin.del(items.l2().key(id.get())).await.unwrap();
    tokio::time::sleep(refresh_after.mul_f64(1.5)).await;

    let lookup = items.get(id).await.unwrap();
    assert_eq!(
        (lookup.entry.version, lookup.tier),
        (1, Tier::L1),
        "served at once, not waited for"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lookup = items.get(id).await.unwrap();
        if lookup.entry.version == 2 {
            assert_eq!(
                lookup.tier,
                Tier::L1,
                "the refresh filled L1; no reader loaded it"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no refresh within 5 s");
        tokio::task::yield_now().await;
    }
}
