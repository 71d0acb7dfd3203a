//! `/health`, `/livez`, `/readyz` and metrics, with the backends up and down.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use app_core::testing::RedisServer;

use gateway::reload::ConfigSource;
use tiergate_config::{RouteSettings, Secret, UpstreamSettings};

use crate::helpers::{ADMIN_TOKEN, Backends, TestApp, assert_error, closed_port, json_body};

#[tokio::test]
async fn health_is_healthy_with_both_backends_up() {
    let backends = Backends::new().await;
    let mut settings = backends.settings();
    settings.deployment.color = Some("green".to_owned());
    let app = TestApp::start(settings).await;

    let rsp = app.get("/health").await;
    assert_eq!(rsp.status(), 200);
    let body = json_body(rsp).await;
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    assert!(body["commit"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!(body["deployment"], "green");
    assert_eq!(body["services"]["database"]["connected"], true);
    assert!(body["services"]["database"]["latency_ms"].is_number());
    assert!(body["services"]["database"]["time"].is_string());
    assert_eq!(body["services"]["cache"]["connected"], true);
    for probe in ["/livez", "/readyz"] {
        assert_eq!(
            app.get(probe).await.status(),
            200,
            "{probe} on the public port"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn redis_down_is_degraded_and_items_are_still_served() {
    let backends = Backends::new().await;
    let mut settings = backends.settings();
    settings.redis.url = Secret::new(format!("redis://127.0.0.1:{}", closed_port()));
    let app = TestApp::start(settings).await;

    let rsp = app.get("/health").await;
    assert_eq!(
        rsp.status(),
        200,
        "a cache outage must not pull the task out of the load balancer"
    );
    let body = json_body(rsp).await;
    assert_eq!(body["status"], "degraded");
    assert_eq!(body["services"]["cache"]["connected"], false);
    assert_eq!(body["services"]["database"]["connected"], true);

    let item = app.create("no redis").await;
    let rsp = app.get(&format!("/items/{}", item["id"])).await;
    assert_eq!(rsp.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn redis_down_is_unhealthy_when_the_cache_is_required() {
    let backends = Backends::new().await;
    let mut settings = backends.settings();
    settings.redis.url = Secret::new(format!("redis://127.0.0.1:{}", closed_port()));
    settings.health.require_cache = true;
    let app = TestApp::start(settings).await;

    let rsp = app.get("/health").await;
    assert_eq!(rsp.status(), 503);
    assert_eq!(json_body(rsp).await["status"], "unhealthy");
    app.stop().await;
}

/// The backends' settings with a PostgreSQL address nothing listens on.
fn unreachable_database(backends: &Backends) -> tiergate_config::Settings {
    let mut settings = backends.settings();
    settings.database.url = Secret::new(format!(
        "postgres://postgres@127.0.0.1:{}/nowhere",
        closed_port()
    ));
    settings
}

/// The status of `path` on the admin listener.
async fn admin_status(app: &TestApp, path: &str) -> reqwest::StatusCode {
    let url = format!("http://{}{path}", app.admin);
    app.client.get(url).send().await.unwrap().status()
}

#[tokio::test]
async fn a_proxy_only_table_is_ready_without_its_database_until_shutdown() {
    let backends = Backends::new().await;
    let mut settings = unreachable_database(&backends);
    settings.routes = vec![RouteSettings::upstream("site", "/", "web")];
    settings.upstreams = vec![UpstreamSettings::new("web", &["127.0.0.1:9"])];
    settings.shutdown.drain_delay = Duration::from_secs(2);
    let mut app = TestApp::start_unready(settings).await;

    // No route needs the app: the database it cannot reach does not hold readiness.
    assert_eq!(admin_status(&app, "/readyz").await, 200);
    assert_eq!(app.get("/readyz").await.status(), 200);

    app.begin_stop();
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let status = admin_status(&app, "/readyz").await;
        if status == 503 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {status} while draining"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn a_proxy_only_table_leaves_the_database_alone_until_a_reload_routes_to_the_app() {
    let backends = Backends::new().await;
    // Stand-ins for PostgreSQL and Redis: listeners that only show whether anyone
    // connected (the kernel completes the handshake into the backlog; nothing answers).
    let stand_in = || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    };
    let ((database, database_addr), (redis, redis_addr)) = (stand_in(), stand_in());
    let mut settings = backends.settings();
    settings.database.url = Secret::new(format!("postgres://postgres@{database_addr}/nowhere"));
    settings.redis.url = Secret::new(format!("redis://{redis_addr}"));
    settings.admin.token = Some(ADMIN_TOKEN.into());
    let with_app = settings.clone();
    settings.routes = vec![RouteSettings::upstream("site", "/", "web")];
    settings.upstreams = vec![UpstreamSettings::new("web", &["127.0.0.1:9"])];
    let next = Arc::new(Mutex::new(settings.clone()));
    let source = {
        let next = next.clone();
        ConfigSource::new(move || Ok(next.lock().unwrap().clone()))
    };
    let app = TestApp::start_with_source(settings, source).await;

    // Served and ready, and the app's start-up never ran: it would have gone for the
    // database at once (with the app started at boot, this saw a connection). Redis is
    // not checked here: its client's first attempt comes too late to tell.
    assert_eq!(admin_status(&app, "/readyz").await, 200);
    let accepted = database.accept().map(|_| ()).map_err(|e| e.kind());
    assert_eq!(accepted, Err(std::io::ErrorKind::WouldBlock));

    // A reload that routes to the app starts it: it goes for both.
    *next.lock().unwrap() = with_app;
    assert_eq!(app.reload().await.status(), 200);
    for (name, listener) in [("database", database), ("redis", redis)] {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let connected = tokio::time::timeout(Duration::from_secs(10), listener.accept()).await;
        assert!(
            connected.is_ok_and(|c| c.is_ok()),
            "the app never reached {name}"
        );
    }
    assert_eq!(
        admin_status(&app, "/readyz").await,
        503,
        "the app is not ready"
    );
    app.stop().await;
}

#[tokio::test]
async fn postgres_unreachable_is_unhealthy_but_alive() {
    let backends = Backends::new().await;
    let mut settings = unreachable_database(&backends);
    settings.database.checkout_timeout = Duration::from_millis(200);
    let app = TestApp::start_unready(settings).await;

    let rsp = app.get("/health").await;
    assert_eq!(rsp.status(), 503);
    let body = json_body(rsp).await;
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(body["services"]["database"]["connected"], false);

    let admin = |path: &str| app.client.get(format!("http://{}{path}", app.admin)).send();
    assert_eq!(
        admin("/livez").await.unwrap().status(),
        200,
        "alive: no restart loop"
    );
    assert_eq!(admin("/readyz").await.unwrap().status(), 503);
    let rsp = app.get("/items/1").await;
    assert_eq!(rsp.headers()["retry-after"], "1");
    assert_error(rsp, 503, "unavailable").await;
    app.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text_on_the_admin_port() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let item = app.create("metered").await;
    app.get(&format!("/items/{}", item["id"])).await;

    let rsp = app
        .client
        .get(format!("http://{}/metrics", app.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let text = rsp.text().await.unwrap();
    for expected in [
        r#"tiergate_http_requests_total{route="items",status="2xx",code="200"}"#,
        r#"tiergate_http_requests_total{route="items",status="2xx",code="201"}"#,
        concat!(
            r#"tiergate_build_info{version=""#,
            env!("CARGO_PKG_VERSION"),
            r#"",commit=""#
        ),
        "process_resident_memory_bytes ",
        "process_open_fds ",
        r#"tiergate_http_request_duration_seconds_bucket{route="items",le="0.001"}"#,
        r#"tiergate_cache_requests_total{tier="l1",result="hit"}"#,
        r#"tiergate_db_pool_connections{pool="writer",state="idle"}"#,
        "tiergate_cache_l1_bytes",
    ] {
        assert!(text.contains(expected), "{expected} missing from:\n{text}");
    }
    assert_eq!(
        app.get("/metrics").await.status(),
        404,
        "metrics never on the public port"
    );
    app.stop().await;
}

/// The breaker gauge's value in a `/metrics` text.
fn breaker_gauge(metrics: &str) -> Option<String> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("tiergate_cache_l2_breaker_open "))
        .map(str::to_owned)
}

/// Writes `path` (every write touches Redis: fence and invalidation) until the breaker
/// gauge reads `want`, for at most 10 s.
async fn write_until_breaker_gauge(app: &TestApp, path: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        app.client
            .put(app.url(path))
            .header("content-type", "application/json")
            .body(r#"{"name":"breaker"}"#)
            .send()
            .await
            .expect("PUT");
        if breaker_gauge(&app.metrics().await).as_deref() == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tiergate_cache_l2_breaker_open never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `tiergate_cache_l2_breaker_open` (the metric the deployment's alarm watches) is 0
/// while Redis answers, 1 once Redis fails and the breaker skips it, and 0 again when
/// Redis is back and the breaker's probe succeeds.
///
/// Mutation that fails it: set the gauge to 0 whatever the breaker's state (or not at
/// all) in `App::record_gauges`.
#[tokio::test]
async fn the_breaker_gauge_shows_when_reads_skip_redis() {
    let redis = RedisServer::start();
    let port = redis.port;
    let backends = Backends::new().await;
    let mut settings = backends.settings();
    settings.redis.url = Secret::new(redis.url());
    settings.redis.breaker_failures = 1;
    settings.redis.breaker_open = Duration::from_millis(200);
    let app = TestApp::start(settings).await;
    let item = app.create("breaker").await;
    let path = format!("/items/{}", item["id"]);
    assert_eq!(breaker_gauge(&app.metrics().await).as_deref(), Some("0"));

    redis.stop();
    write_until_breaker_gauge(&app, &path, "1").await;
    let _redis = RedisServer::start_on(port);
    write_until_breaker_gauge(&app, &path, "0").await;
    app.stop().await;
}

/// Sends `n` `GET /health` over `connections` keep-alive connections at once; returns
/// how long they took and the largest `age_ms` answered. Every answer must be 200.
async fn health_burst(app: &TestApp, n: usize, connections: usize) -> (Duration, u64) {
    let started = Instant::now();
    let workers: Vec<_> = (0..connections)
        .map(|worker| {
            let (client, url) = (reqwest::Client::new(), app.url("/health"));
            let share = n / connections + usize::from(worker < n % connections);
            tokio::spawn(async move {
                let mut oldest = 0;
                for _ in 0..share {
                    let rsp = client.get(&url).send().await.unwrap();
                    assert_eq!(rsp.status(), 200);
                    let body: serde_json::Value = rsp.json().await.unwrap();
                    oldest = oldest.max(body["age_ms"].as_u64().expect("age_ms"));
                }
                oldest
            })
        })
        .collect();
    let mut oldest = 0;
    for worker in workers {
        oldest = oldest.max(worker.await.unwrap());
    }
    (started.elapsed(), oldest)
}

/// `/health` cannot be turned into database load: 2,000 requests as fast as they come
/// (about a second) make one probe per `health.max_age` (1 s), counted in PostgreSQL's
/// own statistics as transactions beyond what the instance commits idle over as long.
///
/// Mutation that fails it: probe on every request (`Probes::get` without its `fresh`
/// checks): about one transaction per request beyond idle.
#[tokio::test]
async fn a_burst_of_health_requests_makes_one_database_query_per_interval() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    assert_eq!(app.get("/health").await.status(), 200);

    let before = backends.db.committed_transactions().await;
    let (took, oldest) = health_burst(&app, 2_000, 32).await;
    let burst = backends.db.committed_transactions().await - before;
    // The same time without requests: the outbox relay's passes, the reconnections.
    tokio::time::sleep(took).await;
    let idle = backends.db.committed_transactions().await - before - burst;

    let beyond = burst - idle;
    let intervals = i64::try_from(took.as_millis().div_ceil(1000)).unwrap();
    eprintln!("2000 /health in {took:?}: {burst} transactions, {idle} idle, oldest {oldest} ms");
    assert!(
        beyond <= intervals + 2,
        "{beyond} transactions beyond idle for 2000 /health in {took:?} ({burst} against {idle})"
    );
    assert!(oldest < 1000, "an answer {oldest} ms old");
    app.stop().await;
}
