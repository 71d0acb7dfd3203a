//! The reverse proxy against real upstream servers on loopback: balancing, splits and
//! runtime switches, failures and retries, timeouts, WebSocket, headers, reload, and the
//! admin API.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use gateway::reload::ConfigSource;
use serde_json::{Value, json};
use tiergate_config::{
    Balance, HealthCheckSettings, OutlierSettings, RouteSettings, Settings, TargetSettings,
    UpstreamSettings,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    ADMIN_TOKEN, Backends, GetLoad, TestApp, assert_error, closed_port, json_body,
};
use crate::upstream::Upstream;

/// Settings whose every path goes to the group `web` over `upstreams`.
fn proxied(backends: &Backends, upstreams: &[&Upstream], balance: Balance) -> Settings {
    let targets: Vec<String> = upstreams.iter().map(|u| u.target()).collect();
    let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    let mut group = UpstreamSettings::new("web", &refs);
    group.balance = balance;
    let mut settings = backends.settings();
    settings.routes = vec![
        RouteSettings::app("items", "/items", false),
        RouteSettings::upstream("site", "/", "web"),
    ];
    settings.upstreams = vec![group];
    settings.admin.token = Some(ADMIN_TOKEN.into());
    settings
}

/// Settings with the route `web` split between groups `blue` and `green`.
fn blue_green(
    backends: &Backends,
    blue: &Upstream,
    green: &Upstream,
    split: (u32, u32),
) -> Settings {
    let mut settings = backends.settings();
    settings.routes = vec![
        RouteSettings::app("items", "/items", false),
        RouteSettings {
            split: Some(BTreeMap::from([
                ("blue".to_owned(), split.0),
                ("green".to_owned(), split.1),
            ])),
            ..RouteSettings::upstream("web", "/", "blue")
        },
    ];
    settings.routes[1].upstream = None;
    settings.upstreams = vec![
        UpstreamSettings::new("blue", &[&blue.target()]),
        UpstreamSettings::new("green", &[&green.target()]),
    ];
    settings.admin.token = Some(ADMIN_TOKEN.into());
    settings
}

/// Which upstream answered `path`.
async fn who(app: &TestApp, path: &str) -> String {
    let rsp = app.get(path).await;
    assert_eq!(rsp.status(), 200, "GET {path}");
    let body: Value = rsp.json().await.unwrap();
    body["upstream"].as_str().unwrap().to_owned()
}

/// `n` GETs of `path` over `concurrency` workers; returns (answered by name, failures).
async fn load(
    app: &TestApp,
    path: &str,
    n: usize,
    concurrency: usize,
) -> (BTreeMap<String, usize>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, url, next) = (app.client.clone(), app.url(path), next.clone());
        workers.push(tokio::spawn(async move {
            let mut seen = BTreeMap::new();
            let mut failed = 0;
            while next.fetch_add(1, Ordering::Relaxed) < n {
                match client.get(&url).send().await {
                    Ok(rsp) if rsp.status() == 200 => {
                        let body: Value = rsp.json().await.unwrap();
                        *seen
                            .entry(body["upstream"].as_str().unwrap().to_owned())
                            .or_insert(0) += 1;
                    }
                    _ => failed += 1,
                }
            }
            (seen, failed)
        }));
    }
    let mut seen = BTreeMap::new();
    let mut failed = 0;
    for worker in workers {
        let (s, f) = worker.await.unwrap();
        for (k, v) in s {
            *seen.entry(k).or_insert(0) += v;
        }
        failed += f;
    }
    (seen, failed)
}

async fn admin_put_split(
    app: &TestApp,
    route: &str,
    body: &str,
    token: Option<&str>,
) -> reqwest::Response {
    let mut req = app
        .client
        .put(format!("http://{}/admin/routes/{route}/split", app.admin))
        .body(body.to_owned());
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn each_balancing_mode_spreads_as_configured() {
    let backends = Backends::new().await;
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );

    let app = TestApp::start(proxied(&backends, &[&a, &b, &c], Balance::RoundRobin)).await;
    let (seen, failed) = load(&app, "/rr", 300, 1).await;
    assert_eq!(failed, 0);
    assert_eq!(
        seen.values().copied().collect::<Vec<_>>(),
        [100, 100, 100],
        "{seen:?}"
    );
    app.stop().await;

    let mut settings = proxied(&backends, &[&a, &b], Balance::Weighted);
    settings.upstreams[0].targets[0] = TargetSettings::Weighted {
        address: a.target(),
        weight: 3,
    };
    let app = TestApp::start(settings).await;
    let (seen, _) = load(&app, "/weighted", 400, 1).await;
    assert_eq!((seen["a"], seen["b"]), (300, 100), "{seen:?}");
    app.stop().await;

    // Least outstanding: `slow` holds each request 50 ms, so under concurrent load it
    // has more in flight and gets fewer of them. (At 20 ms, a box busy with compiles
    // slowed the fast target enough to bring the ratio under 3.)
    let slow = Upstream::slow("slow", Duration::from_millis(50)).await;
    let app = TestApp::start(proxied(&backends, &[&slow, &a], Balance::LeastOutstanding)).await;
    let (seen, failed) = load(&app, "/lor", 600, 8).await;
    assert_eq!(failed, 0);
    let (slow_n, fast_n) = (seen.get("slow").copied().unwrap_or(0), seen["a"]);
    assert!(
        fast_n > 3 * slow_n,
        "least outstanding favours the fast target: {seen:?}"
    );
    assert!(slow_n > 0, "the slow target still gets some: {seen:?}");
    app.stop().await;
}

#[tokio::test]
async fn a_90_10_split_lands_within_two_percent_over_10000_requests() {
    let backends = Backends::new().await;
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let app = TestApp::start(blue_green(&backends, &blue, &green, (90, 10))).await;
    let (seen, failed) = load(&app, "/", 10_000, 16).await;
    assert_eq!(failed, 0);
    #[allow(clippy::cast_precision_loss)]
    let blue_share = seen["blue"] as f64 / 10_000.0;
    println!(
        "90/10 split over 10,000 requests: blue {}, green {}",
        seen["blue"], seen["green"]
    );
    assert!((0.88..=0.92).contains(&blue_share), "{seen:?}");
    app.stop().await;
}

#[tokio::test]
async fn switching_blue_to_green_under_load_loses_no_request_and_rolls_back() {
    let backends = Backends::new().await;
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let app = TestApp::start(blue_green(&backends, &blue, &green, (100, 0))).await;
    assert_eq!(who(&app, "/").await, "blue");

    // Load runs until told to stop; every answer is recorded in order per worker.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, url, stop) = (app.client.clone(), app.url("/"), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let rsp = client.get(&url).send().await;
                let answer = match rsp {
                    Ok(rsp) if rsp.status() == 200 => {
                        let body: Value = rsp.json().await.unwrap();
                        body["upstream"].as_str().unwrap().to_owned()
                    }
                    Ok(rsp) => format!("status {}", rsp.status()),
                    Err(e) => format!("error {e}"),
                };
                answers.push(answer);
            }
            answers
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rsp = admin_put_split(
        &app,
        "web",
        r#"{"blue": 0, "green": 100}"#,
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(rsp.status(), 200);
    let body = json_body(rsp).await;
    assert_eq!(body["split"], json!({"blue": 0, "green": 100}));
    let switched = blue.hits();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for worker in workers {
        let answers = worker.await.unwrap();
        total += answers.len();
        let bad: Vec<&String> = answers
            .iter()
            .filter(|a| *a != "blue" && *a != "green")
            .collect();
        assert!(bad.is_empty(), "failed requests during the switch: {bad:?}");
        // Per worker: blues, then greens, never back.
        let first_green = answers
            .iter()
            .position(|a| a == "green")
            .unwrap_or(answers.len());
        assert!(
            answers[first_green..].iter().all(|a| a == "green"),
            "{answers:?}"
        );
    }
    assert!(total > 100, "the load ran: {total} requests");
    assert!(
        blue.hits() <= switched + 8,
        "blue got traffic after the switch"
    );
    assert_eq!(who(&app, "/").await, "green");

    // Rollback is the same call.
    let rsp = admin_put_split(
        &app,
        "web",
        r#"{"blue": 100, "green": 0}"#,
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(who(&app, "/").await, "blue");
    app.stop().await;
}

#[tokio::test]
async fn a_killed_target_costs_no_request_and_returns_after_it_comes_back() {
    let backends = Backends::new().await;
    let (mut a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let mut settings = proxied(&backends, &[&a, &b], Balance::RoundRobin);
    settings.upstreams[0].health_check = Some(HealthCheckSettings {
        path: "/".to_owned(),
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    });
    settings.upstreams[0].outlier = OutlierSettings {
        consecutive_failures: 2,
        base_ejection: Duration::from_millis(500),
        max_ejection: Duration::from_secs(2),
    };
    let app = TestApp::start(settings).await;
    let load = GetLoad::start(&app.client, &app.url("/"), 8);
    load.more(200).await;
    assert!(a.hits() > 0 && b.hits() > 0, "both serve before the kill");
    a.kill();
    let killed_at = a.hits();
    load.more(2000).await;
    assert_eq!(load.failed(), 0, "no request failed after the kill");

    a.restart().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.hits() == killed_at {
        assert!(
            Instant::now() < deadline,
            "the target did not return to rotation within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (answered, failed) = load.stop().await;
    assert_eq!(failed, 0, "no request failed");
    let metrics = app.metrics().await;
    println!(
        "killed target: {answered} requests answered, 0 failed; retries: {}",
        metric_line(&metrics, "tiergate_upstream_retries_total{group=\"web\"}")
    );
    app.stop().await;
}

#[tokio::test]
async fn a_slow_upstream_answers_504_at_the_response_timeout() {
    let backends = Backends::new().await;
    let slow = Upstream::start("slow").await;
    let mut settings = proxied(&backends, &[&slow], Balance::RoundRobin);
    settings.upstreams[0].response_timeout = Duration::from_millis(300);
    let app = TestApp::start(settings).await;
    let started = Instant::now();
    let body = assert_error(app.get("/slow/3000").await, 504, "upstream_timeout").await;
    let took = started.elapsed();
    assert!(
        (Duration::from_millis(300)..Duration::from_millis(1500)).contains(&took),
        "504 after {took:?}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("300 ms") && message.contains("response_timeout"),
        "{message}"
    );
    // A failed connect is a 502 that says so, and nothing of the target leaks.
    let mut settings = backends.settings();
    let closed = format!("127.0.0.1:{}", closed_port());
    settings.routes = vec![RouteSettings::upstream("down", "/", "down")];
    settings.upstreams = vec![UpstreamSettings::new("down", &[&closed])];
    let down = TestApp::start(settings).await;
    let body = assert_error(down.get("/").await, 502, "bad_gateway").await;
    assert!(!body.to_string().contains(&closed), "{body}");
    down.stop().await;
    app.stop().await;
}

#[tokio::test]
async fn retries_stay_within_the_budget_when_a_whole_group_is_down() {
    let backends = Backends::new().await;
    let mut settings = backends.settings();
    let targets = [
        format!("127.0.0.1:{}", closed_port()),
        format!("127.0.0.1:{}", closed_port()),
    ];
    settings.routes = vec![RouteSettings::upstream("down", "/", "down")];
    settings.upstreams = vec![UpstreamSettings::new("down", &[&targets[0], &targets[1]])];
    settings.upstreams[0].outlier.consecutive_failures = 0;
    settings.proxy.retry_budget_percent = 0;
    settings.proxy.retry_budget_min_per_second = 2;
    let app = TestApp::start(settings).await;
    for _ in 0..20 {
        assert_error(app.get("/").await, 502, "bad_gateway").await;
    }
    let metrics = app.metrics().await;
    let retries = metric_line(&metrics, "tiergate_upstream_retries_total{group=\"down\"}");
    let refused = metric_line(
        &metrics,
        "tiergate_upstream_retries_refused_total{group=\"down\"}",
    );
    // One second's floor at start, plus at most one more second's while the test ran.
    assert!(retries <= 4.0, "retries {retries} beyond the budget");
    assert!(refused >= 16.0, "refused {refused}");
    app.stop().await;
}

#[tokio::test]
async fn a_retried_request_carries_the_forwarding_headers_once() {
    // The first target refuses every connection: each request picked for it is retried
    // on the second. Each attempt gets the proxy's headers on its own copy of the
    // client's, so the retry must carry them, and only once.
    let backends = Backends::new().await;
    let upstream = Upstream::start("up").await;
    let mut settings = backends.settings();
    let targets = [format!("127.0.0.1:{}", closed_port()), upstream.target()];
    settings.routes = vec![RouteSettings::upstream("site", "/", "web")];
    settings.upstreams = vec![UpstreamSettings::new("web", &[&targets[0], &targets[1]])];
    settings.upstreams[0].balance = Balance::RoundRobin;
    settings.upstreams[0].outlier.consecutive_failures = 0;
    let app = TestApp::start(settings).await;
    for _ in 0..4 {
        let rsp = app
            .client
            .get(app.url("/retried?q=1"))
            .header("x-forwarded-for", "6.6.6.6")
            .header("x-request-id", "req-7")
            .send()
            .await
            .unwrap();
        assert_eq!(rsp.status(), 200);
        let seen: Value = rsp.json().await.unwrap();
        let h = &seen["headers"];
        assert_eq!(h["x-forwarded-for"], json!(["127.0.0.1"]), "{h}");
        assert_eq!(h["x-forwarded-port"], json!([app.addr.port().to_string()]));
        assert_eq!(h["x-forwarded-host"], json!([app.addr.to_string()]));
        assert_eq!(h["via"], json!(["1.1 tiergate"]), "{h}");
        assert_eq!(h["x-request-id"], json!(["req-7"]), "{h}");
        assert_eq!(seen["path"], json!("/retried?q=1"), "{seen}");
    }
    let metrics = app.metrics().await;
    let retries = metric_line(&metrics, "tiergate_upstream_retries_total{group=\"web\"}");
    assert!(
        retries >= 2.0,
        "round robin sent half to the closed target: {retries}"
    );
    app.stop().await;
}

#[tokio::test]
async fn websocket_echo_goes_through_the_proxy() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("ws").await;
    let app = TestApp::start(proxied(&backends, &[&upstream], Balance::RoundRobin)).await;
    let url = format!("ws://{}/ws", app.addr);
    let (mut ws, rsp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("handshake through the proxy");
    assert_eq!(rsp.status(), 101);
    for text in ["hello", "through", "tiergate"] {
        ws.send(text.into()).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
    app.stop().await;
}

/// Sends `head` as the whole request over a fresh connection and returns the response.
async fn raw_request(addr: std::net::SocketAddr, head: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn hop_by_hop_headers_never_cross_the_proxy() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("up").await;
    let app = TestApp::start(proxied(&backends, &[&upstream], Balance::RoundRobin)).await;
    let rsp = raw_request(
        app.addr,
        "GET /hop HTTP/1.1\r\nHost: shop.example\r\nConnection: close, x-client-private\r\n\
         x-client-private: secret\r\nKeep-Alive: timeout=9\r\nProxy-Authorization: Basic eDp5\r\n\
         TE: trailers\r\nUpgrade: h2c\r\nx-client-public: yes\r\n\r\n",
    )
    .await;
    let (head, body) = rsp.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        !head.contains("x-upstream-private") && !head.contains("keep-alive"),
        "{head}"
    );
    assert!(
        head.contains("x-upstream-public: yes") && head.contains("via: 1.1 tiergate"),
        "{head}"
    );
    let seen: Value = serde_json::from_str(body).unwrap();
    let headers = seen["headers"].as_object().unwrap();
    for gone in [
        "x-client-private",
        "keep-alive",
        "proxy-authorization",
        "te",
        "upgrade",
    ] {
        assert!(
            !headers.contains_key(gone),
            "{gone} reached the upstream: {headers:?}"
        );
    }
    assert!(!headers.contains_key("connection"), "{headers:?}");
    assert_eq!(headers["x-client-public"], json!(["yes"]));
    assert_eq!(headers["host"], json!(["shop.example"]), "Host preserved");
    assert_eq!(headers["via"], json!(["1.1 tiergate"]));
    assert_eq!(headers["x-request-id"].as_array().map(Vec::len), Some(1));
    app.stop().await;
}

#[tokio::test]
async fn x_forwarded_for_trusts_only_the_configured_hops() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("up").await;
    let headers_seen = |app: &TestApp, xff: &'static str| {
        let req = app
            .client
            .get(app.url("/xff"))
            .header("x-forwarded-for", xff)
            .header("x-forwarded-proto", "https")
            .header(
                "x-amzn-trace-id",
                "Root=1-67891233-abcdef012345678912345678",
            )
            .header("x-request-id", "req-123");
        async move {
            let body: Value = req.send().await.unwrap().json().await.unwrap();
            body["headers"].clone()
        }
    };

    let app = TestApp::start(proxied(&backends, &[&upstream], Balance::RoundRobin)).await;
    let h = headers_seen(&app, "6.6.6.6").await;
    assert_eq!(
        h["x-forwarded-for"],
        json!(["127.0.0.1"]),
        "no trusted hop: the client's claim goes"
    );
    assert_eq!(h["x-forwarded-proto"], json!(["http"]));
    assert_eq!(h["x-forwarded-host"], json!([app.addr.to_string()]));
    assert_eq!(h["x-forwarded-port"], json!([app.addr.port().to_string()]));
    assert_eq!(
        h["x-request-id"],
        json!(["req-123"]),
        "a safe request id is passed on"
    );
    assert_eq!(
        h["x-amzn-trace-id"],
        json!(["Root=1-67891233-abcdef012345678912345678"])
    );
    app.stop().await;

    let mut settings = proxied(&backends, &[&upstream], Balance::RoundRobin);
    settings.proxy.trusted_hops = 1;
    settings.proxy.forwarded_header = true;
    let app = TestApp::start(settings).await;
    let h = headers_seen(&app, "6.6.6.6, 203.0.113.7").await;
    assert_eq!(
        h["x-forwarded-for"],
        json!(["203.0.113.7, 127.0.0.1"]),
        "one trusted hop: its entry stays, the forged one goes"
    );
    assert_eq!(
        h["x-forwarded-proto"],
        json!(["https"]),
        "the trusted proxy's proto"
    );
    assert_eq!(
        h["forwarded"],
        json!([format!("for=127.0.0.1;proto=http;host=\"{}\"", app.addr)])
    );
    app.stop().await;
}

#[tokio::test]
async fn a_bad_reload_is_refused_while_traffic_continues() {
    let backends = Backends::new().await;
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let settings = blue_green(&backends, &blue, &green, (100, 0));
    // The reload source is this shared slot: the test writes the "file".
    let next: Arc<std::sync::Mutex<Settings>> = Arc::new(std::sync::Mutex::new(settings.clone()));
    let source = {
        let next = next.clone();
        ConfigSource::new(move || {
            let settings = next.lock().unwrap().clone();
            settings.validate().map(|()| settings)
        })
    };
    let app = TestApp::start_with_source(settings.clone(), source).await;
    let load = GetLoad::start(&app.client, &app.url("/"), 1);
    load.more(20).await;
    let reload = || app.reload();

    // A split naming a group that does not exist: refused, with the problem listed.
    let mut bad = settings.clone();
    bad.routes[1].split = Some(BTreeMap::from([("purple".to_owned(), 1)]));
    *next.lock().unwrap() = bad;
    let rsp = reload().await;
    assert_eq!(rsp.status(), 400);
    let body = json_body(rsp).await;
    assert_eq!(body["error"], "invalid_config");
    assert!(body["problems"].to_string().contains("purple"), "{body}");
    assert_eq!(
        who(&app, "/").await,
        "blue",
        "the running table still serves"
    );
    load.more(20).await;

    // A good one: everything to green.
    let mut good = settings.clone();
    good.routes[1].split = Some(BTreeMap::from([
        ("blue".to_owned(), 0),
        ("green".to_owned(), 1),
    ]));
    *next.lock().unwrap() = good;
    let rsp = reload().await;
    assert_eq!(rsp.status(), 200);
    assert_eq!(who(&app, "/").await, "green");

    load.more(20).await;
    let (_, failed) = load.stop().await;
    assert_eq!(failed, 0);
    app.stop().await;
}

#[tokio::test]
async fn the_admin_api_shows_routes_and_guards_changes() {
    let backends = Backends::new().await;
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let app = TestApp::start(blue_green(&backends, &blue, &green, (100, 0))).await;

    let routes: Value = app
        .client
        .get(format!("http://{}/admin/routes", app.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(routes["routes"][1]["name"], "web");
    assert_eq!(
        routes["routes"][1]["target"]["split"],
        json!({"blue": 100, "green": 0})
    );
    assert_eq!(routes["groups"][0]["name"], "blue");
    assert_eq!(routes["groups"][0]["targets"][0]["address"], blue.target());
    assert_eq!(routes["groups"][0]["targets"][0]["healthy"], true);

    let put =
        |body: &'static str, token: Option<&'static str>| admin_put_split(&app, "web", body, token);
    assert_error(put(r#"{"green": 100}"#, None).await, 401, "unauthorized").await;
    assert_error(
        put(r#"{"green": 100}"#, Some("wrong-token-wrong-token")).await,
        401,
        "unauthorized",
    )
    .await;
    assert_error(put("not json", Some(ADMIN_TOKEN)).await, 400, "bad_request").await;
    assert_error(
        put(r#"{"green": -1}"#, Some(ADMIN_TOKEN)).await,
        400,
        "bad_request",
    )
    .await;
    assert_error(
        put(r#"{"green": 1.5}"#, Some(ADMIN_TOKEN)).await,
        400,
        "bad_request",
    )
    .await;
    assert_error(
        put(r#"{"blue": 0, "green": 0}"#, Some(ADMIN_TOKEN)).await,
        400,
        "bad_request",
    )
    .await;
    assert_error(
        put(r#"{"purple": 1}"#, Some(ADMIN_TOKEN)).await,
        404,
        "not_found",
    )
    .await;
    assert_error(
        admin_put_split(&app, "nowhere", r#"{"green": 1}"#, Some(ADMIN_TOKEN)).await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(
        who(&app, "/").await,
        "blue",
        "no refused call changed anything"
    );
    app.stop().await;

    // Without a configured token the mutating endpoints are off.
    let mut settings = blue_green(&backends, &blue, &green, (100, 0));
    settings.admin.token = None;
    let app = TestApp::start(settings).await;
    assert_error(
        admin_put_split(&app, "web", r#"{"green": 1}"#, Some(ADMIN_TOKEN)).await,
        403,
        "forbidden",
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn keep_alive_connections_to_the_upstream_are_reused() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("up").await;
    let app = TestApp::start(proxied(&backends, &[&upstream], Balance::RoundRobin)).await;
    for _ in 0..100 {
        assert_eq!(who(&app, "/reuse").await, "up");
    }
    let metrics = app.metrics().await;
    let created = metric_line(
        &metrics,
        &format!(
            "tiergate_upstream_connections_created_total{{group=\"web\",target=\"{}\"}}",
            upstream.target()
        ),
    );
    assert!(
        (1.0..=2.0).contains(&created),
        "{created} connections for 100 sequential requests"
    );
    app.stop().await;
}

#[tokio::test]
async fn max_connections_per_target_caps_the_connections_and_the_rest_wait_or_get_503() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("capped").await;
    let mut settings = proxied(&backends, &[&upstream], Balance::RoundRobin);
    settings.upstreams[0].max_connections_per_target = 2;
    let app = TestApp::start(settings).await;
    // Eight at once, each held 200 ms by the target: two go up at a time, the others
    // wait for a connection to come back and all are answered.
    let answers = futures_util::future::join_all((0..8).map(|_| app.get("/slow/200"))).await;
    for rsp in answers {
        assert_eq!(rsp.status(), 200);
    }
    assert_eq!(upstream.peak_concurrency(), 2);
    let created = metric_line(
        &app.metrics().await,
        &format!(
            "tiergate_upstream_connections_created_total{{group=\"web\",target=\"{}\"}}",
            upstream.target()
        ),
    );
    assert_eq!(created, 2.0);
    app.stop().await;

    // One connection allowed, held for 2 s, and a 200 ms wait: the second request gets a
    // 503 that names the limits, and the target is not marked down for being busy.
    let upstream = Upstream::start("capped").await;
    let mut settings = proxied(&backends, &[&upstream], Balance::RoundRobin);
    settings.upstreams[0].max_connections_per_target = 1;
    settings.upstreams[0].connect_timeout = Duration::from_millis(200);
    let app = TestApp::start(settings).await;
    let held = app.get("/slow/2000");
    let busy = async {
        while upstream.peak_concurrency() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        app.get("/busy").await
    };
    let (held, busy) = tokio::join!(held, busy);
    assert_eq!(held.status(), 200);
    let body = assert_error(busy, 503, "upstream_saturated").await;
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("200 ms") && message.contains("max_connections_per_target"),
        "{message}"
    );
    let metrics = app.metrics().await;
    let series = |kind: &str| {
        format!(
            "tiergate_upstream_errors_total{{group=\"web\",target=\"{}\",kind=\"{kind}\"}}",
            upstream.target()
        )
    };
    assert_eq!(
        metric_line(&metrics, &series("saturated")),
        1.0,
        "one wait, not retried on the only target: {metrics}"
    );
    assert_eq!(who(&app, "/after").await, "capped", "still in rotation");
    app.stop().await;
}

#[tokio::test]
async fn a_websocket_tunnel_keeps_its_connection_under_the_cap_until_it_ends() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("ws").await;
    let mut settings = proxied(&backends, &[&upstream], Balance::RoundRobin);
    settings.upstreams[0].max_connections_per_target = 1;
    settings.upstreams[0].connect_timeout = Duration::from_millis(200);
    let app = TestApp::start(settings).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr))
        .await
        .expect("handshake through the proxy");
    ws.send("open".into()).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "open"
    );

    // The one connection the target may have is the tunnel's.
    assert_error(app.get("/busy").await, 503, "upstream_saturated").await;

    // Once the tunnel ends, its place is free again. Each try waits up to the 200 ms
    // connect_timeout for it; the tunnel ends a moment after both sides closed.
    ws.close(None).await.unwrap();
    while ws.next().await.is_some() {}
    drop(ws);
    let mut status = 0;
    for _ in 0..25 {
        status = app.get("/after").await.status().as_u16();
        if status == 200 {
            break;
        }
    }
    assert_eq!(status, 200, "the tunnel's connection was given back");
    app.stop().await;
}

/// The value of the sample whose name and labels are exactly `series`; 0 when absent.
fn metric_line(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn an_h2_group_speaks_http2_to_its_targets() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("h2").await;
    let mut settings = proxied(&backends, &[&upstream], Balance::RoundRobin);
    settings.upstreams[0].protocol = tiergate_config::UpstreamProtocol::H2;
    let app = TestApp::start(settings).await;
    let body: Value = app.get("/h2").await.json().await.unwrap();
    assert_eq!(body["version"], "HTTP/2.0");
    assert_eq!(body["upstream"], "h2");
    app.stop().await;
}

#[tokio::test]
async fn bodies_stream_both_ways_past_the_app_body_limit() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("up").await;
    let app = TestApp::start(proxied(&backends, &[&upstream], Balance::RoundRobin)).await;
    // 4 MiB up, in chunks, without a Content-Length (chunked): the proxy passes the
    // stream on rather than collecting it (http.max_body_bytes, 64 KiB, is the app's).
    let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 64 * 1024]));
    let rsp = app
        .client
        .post(app.url("/count"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let body: Value = rsp.json().await.unwrap();
    assert_eq!(body["length"], 4 * 1024 * 1024);

    let mut rsp = app.get("/bytes/4194304").await;
    assert_eq!(rsp.status(), 200);
    let mut total = 0;
    let mut frames = 0;
    while let Some(chunk) = rsp.chunk().await.unwrap() {
        total += chunk.len();
        frames += 1;
    }
    assert_eq!(total, 4 * 1024 * 1024);
    assert!(
        frames > 1,
        "the answer came down in pieces, not as one buffer"
    );
    app.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_file_and_a_broken_file_keeps_the_running_routes() {
    use crate::shutdown::Task;
    let backends = Backends::new().await;
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let config = tempfile::NamedTempFile::new().unwrap();
    let write = |to: &str| {
        let toml = format!(
            "[[routes]]\nname = \"web\"\npath = \"/\"\nupstream = \"{to}\"\n\n\
             [[upstreams]]\nname = \"blue\"\ntargets = [\"{}\"]\n\n\
             [[upstreams]]\nname = \"green\"\ntargets = [\"{}\"]\n",
            blue.target(),
            green.target()
        );
        std::fs::write(config.path(), toml).unwrap();
    };
    write("blue");
    let path = config.path().to_str().unwrap().to_owned();
    let mut task = Task::start(&backends, &[("TIERGATE_CONFIG", &path)]).await;
    task.wait_ready().await;
    let client = reqwest::Client::new();
    let url = task.url("/");
    let who = |client: &reqwest::Client| {
        let req = client.get(&url).send();
        async move {
            let body: Value = req.await.unwrap().json().await.unwrap();
            body["upstream"].as_str().unwrap().to_owned()
        }
    };
    assert_eq!(who(&client).await, "blue");

    write("green");
    task.signal("HUP");
    crate::startup::wait_for_log(&mut task.log, "Configuration reloaded.").await;
    assert_eq!(who(&client).await, "green");

    std::fs::write(
        config.path(),
        "[[routes]]\nname = \"web\"\nupstream = \"nowhere\"\n",
    )
    .unwrap();
    task.signal("HUP");
    let refused = crate::startup::wait_for_log(
        &mut task.log,
        "Configuration reload refused; the running routes keep serving.",
    )
    .await;
    assert!(refused.to_string().contains("nowhere"), "{refused}");
    assert_eq!(
        who(&client).await,
        "green",
        "still serving after a refused reload"
    );

    task.signal("TERM");
    assert!(task.exit_within(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn http2_streams_past_the_cap_wait_for_a_free_one() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("up").await;
    let mut settings = proxied(&backends, &[&upstream], Balance::RoundRobin);
    settings.http.h2_max_concurrent_streams = 2;
    let app = TestApp::start(settings).await;
    // One HTTP/2 connection, eight requests at once, each held 200 ms upstream: the
    // server's SETTINGS cap two streams, so they go up two at a time.
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let started = Instant::now();
    let requests = (0..8).map(|_| {
        let req = client.get(app.url("/slow/200")).send();
        async move { req.await.map(|r| r.status().as_u16()) }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(200))),
        "{statuses:?}"
    );
    assert_eq!(upstream.peak_concurrency(), 2, "two streams at a time");
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "{:?}",
        started.elapsed()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_named_target_gets_its_own_host_when_asked() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("named").await;
    let mut settings = backends.settings();
    let target = format!("localhost:{}", upstream.addr.port());
    settings.routes = vec![RouteSettings::upstream("named", "/", "named")];
    settings.upstreams = vec![UpstreamSettings::new("named", &[&target])];
    settings.upstreams[0].host_header = tiergate_config::HostHeader::Target;
    settings.upstreams[0].resolve_interval = Duration::from_millis(100);
    let app = TestApp::start(settings).await;
    for _ in 0..3 {
        let body: Value = app.get("/").await.json().await.unwrap();
        assert_eq!(body["upstream"], "named");
        assert_eq!(body["headers"]["host"], json!([target]));
        assert_eq!(
            body["headers"]["x-forwarded-host"],
            json!([app.addr.to_string()])
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn an_upgrade_the_upstream_declines_stays_plain_http() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("plain").await;
    let app = TestApp::start(proxied(&backends, &[&upstream], Balance::RoundRobin)).await;
    // The upstream answers 200, not 101: the client gets that answer, and its
    // connection goes on as HTTP/1.1 (a second request on it is answered too).
    let mut stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let upgrade =
        "GET /no-ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    stream.write_all(upgrade.as_bytes()).await.unwrap();
    let first = read_one_response(&mut stream).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    stream
        .write_all(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = String::new();
    stream.read_to_string(&mut rest).await.unwrap();
    assert!(
        rest.starts_with("HTTP/1.1 200") && rest.contains("/after"),
        "{rest}"
    );
    app.stop().await;
}

/// Reads one response with a `Content-Length` body from `stream`.
async fn read_one_response(stream: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn a_body_still_streaming_at_the_request_timeout_is_cut() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("drip").await;
    let mut settings = proxied(&backends, &[&upstream], Balance::RoundRobin);
    settings.upstreams[0].response_timeout = Duration::from_millis(400);
    settings.upstreams[0].request_timeout = Duration::from_millis(400);
    let app = TestApp::start(settings).await;
    let started = Instant::now();
    let mut rsp = app.get("/drip/50").await;
    assert_eq!(rsp.status(), 200, "the head came in time");
    let mut received = 0;
    let cut = loop {
        match rsp.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    let took = started.elapsed();
    assert!(cut, "the body was cut, not ended");
    assert!(received > 0, "some of it arrived first");
    assert!(
        (Duration::from_millis(400)..Duration::from_millis(1500)).contains(&took),
        "cut after {took:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn shutdown_waits_for_an_open_websocket_until_its_deadline_then_cuts_it() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("ws").await;
    let mut settings = proxied(&backends, &[&upstream], Balance::RoundRobin);
    settings.shutdown.drain_delay = Duration::ZERO;
    settings.shutdown.timeout = Duration::from_millis(1500);
    let app = TestApp::start(settings).await;
    let url = format!("ws://{}/ws", app.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let echo = async |ws: &mut tokio_tungstenite::WebSocketStream<_>, text: &str| {
        ws.send(text.into()).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    };
    echo(&mut ws, "before").await;

    let stopping = Instant::now();
    let mut stopped = tokio::spawn(app.stop());
    // The HTTP side has drained at once (nothing else is open); the tunnel still works
    // and the server is still waiting for it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo(&mut ws, "while draining").await;
    assert!(!stopped.is_finished(), "stopped while a WebSocket was open");

    // Past the deadline the tunnel is cut and the server stops.
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(msg)) if msg.is_close() => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "the tunnel was not cut within 5 s");
    tokio::time::timeout(Duration::from_secs(5), &mut stopped)
        .await
        .expect("the server stopped after cutting the tunnel")
        .unwrap();
    let took = stopping.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "stopped after {took:?}; the deadline was 1.5 s"
    );
}
