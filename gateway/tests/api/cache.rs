//! The cache chain seen from outside: which tier answers, read-your-writes, single flight.

use crate::helpers::{Backends, TestApp, json_body};

#[tokio::test]
async fn the_second_read_is_answered_from_cache() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let id = backends.db.insert_item("cold").await;
    let path = format!("/items/{id}");

    let first = app.get(&path).await;
    assert_eq!(first.headers()["x-cache"], "miss");
    assert_eq!(json_body(first).await["source"], "database");

    let second = app.get(&path).await;
    assert_eq!(second.headers()["x-cache"], "l1");
    assert_eq!(json_body(second).await["source"], "cache");
    app.stop().await;
}

#[tokio::test]
async fn another_instance_reads_what_the_first_put_in_redis() {
    let backends = Backends::new().await;
    let first = TestApp::start(backends.settings()).await;
    let second = TestApp::start(backends.settings()).await;
    let id = backends.db.insert_item("shared").await;
    let path = format!("/items/{id}");

    assert_eq!(first.get(&path).await.headers()["x-cache"], "miss");
    let rsp = second.get(&path).await;
    assert_eq!(
        rsp.headers()["x-cache"],
        "l2",
        "filled into Redis by the first instance"
    );
    let body = json_body(rsp).await;
    assert_eq!(body["source"], "cache");
    assert_eq!(body["item"]["name"], "shared");
    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn after_an_update_every_read_on_that_instance_sees_the_new_version() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let item = app.create("v1").await;
    let path = format!("/items/{}", item["id"]);
    for version in 2..=20 {
        assert_eq!(
            json_body(app.get(&path).await).await["item"]["version"],
            version - 1,
            "warm the cache"
        );
        let rsp = app
            .client
            .put(app.url(&path))
            .header("content-type", "application/json")
            .body(format!(r#"{{"name":"v{version}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        for _ in 0..3 {
            let body = json_body(app.get(&path).await).await;
            assert_eq!(body["item"]["version"], version);
            assert_eq!(body["item"]["name"], format!("v{version}"));
        }
    }
    // A delete is seen at once too, though Redis and L1 held the item.
    assert_eq!(
        app.client
            .delete(app.url(&path))
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    assert_eq!(app.get(&path).await.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_first_reads_of_one_id_make_one_postgres_query() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let id = backends.db.insert_item("herd").await;
    let before = backends.db.items_table_scans().await;

    let path = format!("/items/{id}");
    let reads = (0..100).map(|_| app.get(&path));
    let responses = futures_util::future::join_all(reads).await;
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every read answered: {statuses:?}"
    );

    let after = backends.db.items_table_scans().await;
    assert_eq!(
        after - before,
        1,
        "100 concurrent cold reads, one query (counted by PostgreSQL)"
    );
    app.stop().await;
}

#[tokio::test]
async fn list_pages_are_cached_until_a_write_changes_them() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    app.create("first").await;

    let miss = app.get("/items?limit=10").await;
    assert_eq!(miss.headers()["x-cache"], "miss");
    assert_eq!(json_body(miss).await["source"], "database");
    let hit = app.get("/items?limit=10").await;
    assert_eq!(hit.headers()["x-cache"], "l1");
    let body = json_body(hit).await;
    assert_eq!(
        (body["source"].as_str(), body["count"].as_i64()),
        (Some("cache"), Some(1))
    );

    app.create("second").await;
    let after_write = app.get("/items?limit=10").await;
    assert_eq!(
        after_write.headers()["x-cache"],
        "miss",
        "the write moved the generation"
    );
    assert_eq!(json_body(after_write).await["count"], 2);
    app.stop().await;
}

/// The value of an unlabelled gauge in Prometheus text.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// List pages live in L1's byte budget and its gauge counts them. 40 distinct pages of
/// about 90 KB each (3.6 MB) through an L1 of 1 MiB: the gauge shows them, and never more
/// than the budget. Checked against the page cache it replaced (10,000 pages, no byte
/// bound, outside L1): the gauge stayed at 0 while the pages held 3.6 MB.
#[tokio::test]
async fn list_pages_are_held_within_the_l1_byte_budget_and_its_gauge() {
    const BUDGET: u64 = 1 << 20;
    let backends = Backends::new().await;
    let mut settings = backends.settings();
    settings.cache.l1_max_bytes = BUDGET;
    let app = TestApp::start(settings).await;
    // 300 items of 200 four-byte characters: about 900 bytes of JSON each.
    backends
        .db
        .client()
        .await
        .execute(
            "INSERT INTO items (name) SELECT repeat('𝄞', 200) FROM generate_series(1, 300)",
            &[],
        )
        .await
        .unwrap();
    for after in 0..40 {
        let rsp = app.get(&format!("/items?limit=100&after={after}")).await;
        assert_eq!(rsp.status(), 200);
        assert!(rsp.bytes().await.unwrap().len() > 80_000);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let bytes = loop {
        let bytes = gauge(&app.metrics().await, "tiergate_cache_l1_bytes").unwrap_or(0.0);
        #[allow(clippy::cast_precision_loss)]
        if bytes > 80_000.0 && bytes <= BUDGET as f64 {
            break bytes;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tiergate_cache_l1_bytes is {bytes}; the pages hold about 3.6 MB, the budget is {BUDGET}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    println!("tiergate_cache_l1_bytes after 40 pages of 90 KB, budget 1 MiB: {bytes}");
    app.stop().await;
}
