//! Cache coherence across instances: real processes on one PostgreSQL and Redis, and
//! in-process instances through a Redis that dies and comes back.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use app_core::testing::RedisServer;
use tiergate_config::Secret;

use crate::helpers::{Backends, TestApp, json_body};
use crate::shutdown::Task;

/// A `tiergate` process that is ready and subscribed to the invalidation channel.
async fn start_process(backends: &Backends) -> Task {
    // L1 entries that outlive the test: only an invalidation explains a fresh read.
    let vars = [
        ("TIERGATE_CACHE__L1_TTL", "60s"),
        ("TIERGATE_CACHE__REFRESH_AFTER", "0s"),
    ];
    Task::start_subscribed(backends, &vars).await
}

async fn version_at(client: &reqwest::Client, url: &str) -> i64 {
    let rsp = client.get(url).send().await.expect("GET");
    assert_eq!(rsp.status(), 200);
    json_body(rsp).await["item"]["version"]
        .as_i64()
        .expect("a version")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// Three processes; writes through the first, reads through the other two. After each
/// acknowledged write both others serve the new version within 50 ms at the 99th
/// percentile, over 1,000 writes — though their L1 lifetime is a minute. The lag
/// measured includes one HTTP round trip of the polling reader.
#[tokio::test]
#[ignore = "timing-sensitive: scripts/test runs it alone after the parallel suite"]
async fn writes_through_one_process_are_seen_by_the_others_within_50_ms() {
    let backends = Backends::new().await;
    let (writer, first, second) = tokio::join!(
        start_process(&backends),
        start_process(&backends),
        start_process(&backends)
    );
    let client = reqwest::Client::new();
    let rsp = client
        .post(format!("http://{}/items", writer.http))
        .header("content-type", "application/json")
        .body(r#"{"name":"v1"}"#)
        .send()
        .await
        .expect("POST");
    let id = json_body(rsp).await["item"]["id"].as_i64().expect("an id");
    let readers = [
        format!("http://{}/items/{id}", first.http),
        format!("http://{}/items/{id}", second.http),
    ];
    for url in &readers {
        assert_eq!(version_at(&client, url).await, 1, "warm the readers' L1");
    }

    let mut lags = Vec::with_capacity(2_000);
    for n in 0..1_000 {
        let rsp = client
            .put(format!("http://{}/items/{id}", writer.http))
            .header("content-type", "application/json")
            .body(format!(r#"{{"name":"v{n}"}}"#))
            .send()
            .await
            .expect("PUT");
        let written = json_body(rsp).await["item"]["version"]
            .as_i64()
            .expect("a version");
        let acknowledged = Instant::now();
        let waits = readers.iter().map(|url| {
            let client = client.clone();
            async move {
                while version_at(&client, url).await < written {
                    assert!(
                        acknowledged.elapsed() < Duration::from_secs(2),
                        "v{written} not seen within 2 s"
                    );
                }
                acknowledged.elapsed()
            }
        });
        lags.extend(futures_util::future::join_all(waits).await);
    }
    lags.sort();
    let (p50, p99, max) = (
        percentile(&lags, 0.50),
        percentile(&lags, 0.99),
        lags[lags.len() - 1],
    );
    println!(
        "invalidation lag over {} reads after 1000 writes: p50 {p50:?}, p99 {p99:?}, max {max:?}",
        lags.len()
    );
    assert!(p99 <= Duration::from_millis(50), "p99 {p99:?}");
}

/// Redis dies and comes back under a mixed read/write load on three instances: no request
/// answers 5xx, no read returns a version older than one the same instance acknowledged
/// before the read began, and afterwards every instance serves what PostgreSQL holds.
#[tokio::test]
async fn a_redis_outage_under_load_loses_nothing_and_converges() {
    let redis = RedisServer::start();
    let port = redis.port;
    let backends = Backends::new().await;
    let mut instances = Vec::new();
    for _ in 0..3 {
        let mut settings = backends.settings();
        settings.redis.url = Secret::new(redis.url());
        settings.redis.breaker_open = Duration::from_millis(200);
        settings.cache.degraded_l1_ttl = Duration::from_millis(500);
        instances.push(TestApp::start(settings).await);
    }
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(
            instances[n % 3].create(&format!("item {n}")).await["id"]
                .as_i64()
                .expect("id"),
        );
    }

    // Highest version each instance acknowledged, per item.
    let mut acknowledged: Vec<HashMap<i64, i64>> = vec![HashMap::new(); 3];
    let mut redis = Some(redis);
    let started = Instant::now();
    let mut phase = 0;
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(6) {
        // 0–2 s: Redis up; 2–4 s: Redis down; 4–6 s: Redis back (empty, as after a crash).
        if phase == 0 && started.elapsed() > Duration::from_secs(2) {
            if let Some(server) = redis.take() {
                server.stop();
            }
            phase = 1;
        } else if phase == 1 && started.elapsed() > Duration::from_secs(4) {
            redis = Some(RedisServer::start_on(port));
            phase = 2;
        }
        let i = fastrand::usize(..3);
        let id = ids[fastrand::usize(..ids.len())];
        let app = &instances[i];
        let path = format!("/items/{id}");
        requests += 1;
        if fastrand::u8(..4) == 0 {
            let rsp = app
                .client
                .put(app.url(&path))
                .header("content-type", "application/json")
                .body(format!(r#"{{"name":"w{requests}"}}"#))
                .send()
                .await
                .expect("PUT");
            assert_eq!(rsp.status(), 200, "write in phase {phase}");
            let version = json_body(rsp).await["item"]["version"]
                .as_i64()
                .expect("version");
            let seen = acknowledged[i].entry(id).or_default();
            *seen = (*seen).max(version);
        } else {
            let floor = acknowledged[i].get(&id).copied().unwrap_or(0);
            let rsp = app.get(&path).await;
            assert_eq!(rsp.status(), 200, "read in phase {phase}");
            let version = json_body(rsp).await["item"]["version"]
                .as_i64()
                .expect("version");
            assert!(
                version >= floor,
                "instance {i} read v{version} of {id} after acknowledging v{floor}"
            );
        }
    }
    assert!(redis.is_some(), "the outage happened and ended");

    // Convergence: every instance serves PostgreSQL's version of every item.
    let db = backends.db.client().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    for &id in &ids {
        let truth: i64 = db
            .query_one("SELECT version FROM items WHERE id = $1", &[&id])
            .await
            .expect("row")
            .get(0);
        for app in &instances {
            loop {
                let version =
                    json_body(app.get(&format!("/items/{id}")).await).await["item"]["version"]
                        .as_i64()
                        .expect("version");
                if version == truth {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "item {id}: v{version} served, PostgreSQL has v{truth}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    println!("{requests} requests across the outage, all answered, all instances converged");
    for app in instances {
        app.stop().await;
    }
}

/// In cluster mode the invalidations go by sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`):
/// two instances on a three-node Redis cluster, L1 lifetime a minute; a write through
/// one is read through the other at once, which only a delivered invalidation explains.
/// Checked against a subscriber that used plain `SUBSCRIBE` in cluster mode: the reader
/// kept the old version and the test failed. It also found the fence's `SCRIPT LOAD`
/// going to one node of the cluster, so the key's node answered `NOSCRIPT` and writes
/// turned Redis untrusted (now loaded on every primary).
#[tokio::test]
async fn in_cluster_mode_invalidations_go_by_sharded_pub_sub() {
    let backends = Backends::new().await;
    let cluster = app_core::testing::RedisCluster::start();
    let mut settings = backends.settings();
    settings.redis.url = Secret::new(cluster.url());
    settings.cache.l1_ttl = Duration::from_secs(60);
    settings.cache.refresh_after = Duration::ZERO;
    settings.database.migrate_on_start = true;
    let writer = TestApp::start(settings.clone()).await;
    let reader = TestApp::start(settings).await;
    let client = reqwest::Client::new();

    let id = writer.create("sharded").await["id"].as_i64().unwrap();
    let url = reader.url(&format!("/items/{id}"));
    assert_eq!(version_at(&client, &url).await, 1);
    for expected in 2..=5 {
        let rsp = client
            .put(writer.url(&format!("/items/{id}")))
            .header("content-type", "application/json")
            .body(format!(r#"{{"name":"v{expected}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        let deadline = Instant::now() + Duration::from_secs(2);
        while version_at(&client, &url).await < expected {
            assert!(
                Instant::now() < deadline,
                "the reader still serves an old version 2 s after the write"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let health = json_body(reader.get("/health").await).await;
    assert_eq!(health["services"]["cache"]["connected"], true, "{health}");
    reader.stop().await;
    writer.stop().await;
}
