//! The proxy's hardening (#23) against real upstreams on loopback: a failure is blamed
//! on the side that failed (a client's broken or stalled upload never counts against a
//! target), the response clock starts once the upload is sent, `request_timeout` bounds
//! the response body too, paths are normalised before routing and rewriting, and only
//! the upgrades a route allows are forwarded.
//!
//! Every test that checks a target is not blamed runs with `consecutive_failures = 1`
//! and `fail_open = false`: one failure counted against it ejects it for a minute, and
//! the next request gets 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tiergate_config::{OutlierSettings, RouteSettings, Settings, UpstreamSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{ADMIN_TOKEN, Backends, GetLoad, TestApp};
use crate::upstream::Upstream;

/// Every path to the group `group` over `upstreams`; a single counted failure ejects a
/// target for a minute, and with none left the group answers 503. (Metrics are the
/// process's: each test names its group apart, so its series are its own.)
fn strict(backends: &Backends, group: &str, upstreams: &[&Upstream]) -> Settings {
    let targets: Vec<String> = upstreams.iter().map(|u| u.target()).collect();
    let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    let name = group;
    let mut group = UpstreamSettings::new(name, &refs);
    group.balance = tiergate_config::Balance::RoundRobin;
    group.fail_open = false;
    group.outlier = OutlierSettings {
        consecutive_failures: 1,
        base_ejection: Duration::from_secs(60),
        max_ejection: Duration::from_secs(60),
    };
    let mut settings = backends.settings();
    settings.routes = vec![RouteSettings::upstream("site", "/", name)];
    settings.upstreams = vec![group];
    settings.admin.token = Some(ADMIN_TOKEN.into());
    settings
}

/// Whether every target of every group is in rotation, as the admin API says.
async fn all_targets_available(app: &TestApp) -> bool {
    let rsp = app
        .client
        .get(format!("http://{}/admin/routes", app.admin))
        .send()
        .await
        .unwrap();
    let routes: Value = rsp.json().await.unwrap();
    routes["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["targets"].as_array().unwrap())
        .all(|t| t["available"] == true)
}

/// After a client's failure: the next request is served and no target was ejected.
async fn assert_target_not_blamed(app: &TestApp) {
    assert_eq!(
        app.get("/after").await.status(),
        200,
        "the target is not blamed"
    );
    assert!(all_targets_available(app).await);
}

/// The status line's code of a raw HTTP/1.1 response, 0 when none came.
fn status_of(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Sends `request` on a fresh connection and reads until the server closes it (or 10 s).
async fn exchange(app: &TestApp, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A chunked body whose first chunk size is not hexadecimal.
const MALFORMED_CHUNK: &[u8] =
    b"POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nA\r\n0\r\n\r\n";

/// A 100-byte body of which only 10 bytes come.
const SHORT_UPLOAD: &[u8] =
    b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789";

/// Mutation: classify a client body's error as the upstream's (`BrokeOff`) again, and
/// the malformed chunk gets 502 and ejects the target (the GET after it gets 503).
#[tokio::test]
async fn a_malformed_chunk_is_the_clients_400_and_ejects_no_target() {
    let backends = Backends::new().await;
    let up = Upstream::start("up").await;
    let app = TestApp::start(strict(&backends, "malformed", &[&up])).await;
    let answer = exchange(&app, MALFORMED_CHUNK).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert!(answer.contains("\"bad_request\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_target_not_blamed(&app).await;
    app.stop().await;
}

/// Mutation: drop the client-failure check before `classify` in `forward`, and the
/// upload the client abandons ejects the target.
#[tokio::test]
async fn a_client_that_closes_mid_upload_ejects_no_target() {
    let backends = Backends::new().await;
    let up = Upstream::start("up").await;
    let app = TestApp::start(strict(&backends, "aborted", &[&up])).await;
    // Half-closed after 10 of 100 bytes, then closed outright after 10 of 100 bytes.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(SHORT_UPLOAD).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    // (Whether the half-closed one reached the upstream is a race; this one does: the
    // proxy sends its head up and waits for the rest of its body.)
    let seen = up.hits();
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(SHORT_UPLOAD).await.unwrap();
    wait_for_hits(&up, seen + 1).await;
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    let metric = "tiergate_upstream_client_errors_total{group=\"aborted\",kind=\"aborted\"}";
    while metric_value(&app.metrics().await, metric) < 2.0 {
        assert!(
            Instant::now() < deadline,
            "both aborts counted as the client's"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_target_not_blamed(&app).await;
    app.stop().await;
}

/// Waits until `up` has seen `n` requests; fails after 5 s.
async fn wait_for_hits(up: &Upstream, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.hits() < n {
        assert!(
            Instant::now() < deadline,
            "the upstream saw {} requests",
            up.hits()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The value of the series `series` (name and labels as printed) in `metrics`.
fn metric_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Mutation: time the response head from the start of the attempt again (not from the
/// end of the upload), and this gets 504 at the request timeout and ejects the target.
#[tokio::test]
async fn a_stalled_upload_is_the_clients_408_at_the_request_timeout() {
    let backends = Backends::new().await;
    let up = Upstream::start("up").await;
    let mut settings = strict(&backends, "stalled", &[&up]);
    settings.upstreams[0].response_timeout = Duration::from_millis(200);
    settings.upstreams[0].request_timeout = Duration::from_millis(600);
    let app = TestApp::start(settings).await;
    let started = Instant::now();
    let answer = exchange(&app, SHORT_UPLOAD).await;
    let took = started.elapsed();
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(
        (Duration::from_millis(600)..Duration::from_secs(3)).contains(&took),
        "408 after {took:?}"
    );
    assert_target_not_blamed(&app).await;
    app.stop().await;
}

/// Uploads `chunks` bytes through the proxy, one byte every `every`, with the group's
/// `response_timeout` far shorter than the upload: it must succeed.
async fn slow_upload_succeeds(chunks: usize, every: Duration, response_timeout: Duration) {
    let backends = Backends::new().await;
    let up = Upstream::start("up").await;
    let mut settings = strict(&backends, "upload", &[&up]);
    settings.upstreams[0].response_timeout = response_timeout;
    settings.upstreams[0].request_timeout = every * u32::try_from(chunks).unwrap() * 2;
    let app = TestApp::start(settings).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = format!("POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: {chunks}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    for _ in 0..chunks {
        tokio::time::sleep(every).await;
        stream.write_all(b"x").await.unwrap();
    }
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut out))
        .await
        .expect("an answer after the upload")
        .unwrap();
    let answer = String::from_utf8_lossy(&out[..n]);
    println!(
        "upload of {chunks} bytes over {:?} with response_timeout = {response_timeout:?}: {}",
        started.elapsed(),
        answer.lines().next().unwrap_or("")
    );
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert!(answer.contains(&format!("\"length\":{chunks}")), "{answer}");
    assert!(all_targets_available(&app).await);
    app.stop().await;
}

/// Mutation: start the response clock with the attempt again, and the upload gets 504
/// after 1 s.
#[tokio::test]
async fn an_upload_longer_than_the_response_timeout_succeeds() {
    slow_upload_succeeds(8, Duration::from_millis(400), Duration::from_secs(1)).await;
}

/// The acceptance figure of #23.2: a 60 s upload with `response_timeout = 3s` (alone
/// in the timing step of scripts/test: it takes a minute).
#[tokio::test]
#[ignore = "timing: a minute long, run alone"]
async fn a_60_second_upload_succeeds_with_a_3_second_response_timeout() {
    slow_upload_succeeds(60, Duration::from_secs(1), Duration::from_secs(3)).await;
}

/// Mutation: check the deadline only when the upstream makes the body wait (as before),
/// and a client that reads slowly keeps the response flowing long past
/// `request_timeout`.
#[tokio::test]
async fn request_timeout_cuts_a_response_the_client_reads_slowly() {
    let backends = Backends::new().await;
    let up = Upstream::start("up").await;
    let mut settings = strict(&backends, "slow-reader", &[&up]);
    settings.upstreams[0].request_timeout = Duration::from_secs(1);
    let app = TestApp::start(settings).await;
    let total: usize = 256 * 1024 * 1024;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let head = format!("GET /bytes/{total} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // About 6 MB/s: slower than loopback by far, so the upstream is always ahead.
    let started = Instant::now();
    let mut received = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(n)) => received += n,
            Err(_) => break false,
        }
        if started.elapsed() > Duration::from_secs(10) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = started.elapsed();
    println!("slow reader: {received} of {total} bytes, cut after {took:?}");
    assert!(ended && received < total, "the response was cut");
    assert!(
        took < Duration::from_secs(5),
        "cut near the 1 s limit: {took:?}"
    );
    let metrics = app.metrics().await;
    let cut = "tiergate_upstream_responses_cut_total{group=\"slow-reader\",target=\"";
    let series = format!("{cut}{}\",side=\"client\"}}", up.target());
    assert_eq!(
        metric_value(&metrics, &series),
        1.0,
        "blamed on the slow client"
    );
    assert!(all_targets_available(&app).await);
    app.stop().await;
}

/// What the upstream behind `route` saw of `path` (a raw request: HTTP clients
/// normalise paths themselves), or the status the proxy answered instead.
async fn upstream_path_of(app: &TestApp, path: &str) -> Result<(String, String), u16> {
    let answer = exchange(
        app,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let status = status_of(&answer);
    if status != 200 {
        return Err(status);
    }
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let seen: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    Ok((
        seen["upstream"].as_str().unwrap_or("").to_owned(),
        seen["path"].as_str().unwrap_or("").to_owned(),
    ))
}

/// Mutation: route and rewrite the path as it came (skip `path::normalise`), and
/// `/pub/../admin/routes` reaches `pub` as `/public/../admin/routes`.
#[tokio::test]
async fn paths_are_normalised_before_routing_and_rewriting() {
    let backends = Backends::new().await;
    let (public, other) = (Upstream::start("pub").await, Upstream::start("other").await);
    let mut settings = backends.settings();
    settings.routes = vec![
        RouteSettings {
            rewrite_prefix: Some("/public".to_owned()),
            ..RouteSettings::upstream("pub", "/pub", "pub")
        },
        RouteSettings::upstream("rest", "/", "other"),
    ];
    settings.upstreams = vec![
        UpstreamSettings::new("pub", &[&public.target()]),
        UpstreamSettings::new("other", &[&other.target()]),
    ];
    let app = TestApp::start(settings).await;
    let seen = |who: &str, path: &str| Ok((who.to_owned(), path.to_owned()));
    for (sent, expected) in [
        ("/pub/x", seen("pub", "/public/x")),
        ("/pub/../admin/routes", seen("other", "/admin/routes")),
        ("/pub/%2e%2e/secret", seen("other", "/secret")),
        ("/pub/%2E%2E/secret", seen("other", "/secret")),
        (
            "/pub/a/./b/../c?q=/../x",
            seen("pub", "/public/a/c?q=/../x"),
        ),
        ("/pub/a/%2e/b/..", seen("pub", "/public/a/")),
        ("/x/..%2fpub", Err(400)),
        ("/pub/..%2F..%2Fsecret", Err(400)),
        ("/pub/%5c..%5csecret", Err(400)),
        ("/pub/../../etc/passwd", Err(400)),
        ("/pub/%zz", Err(400)),
        ("/%70ub/%7Euser", seen("pub", "/public/~user")),
        ("/pub/a%3Bb", seen("pub", "/public/a%3Bb")),
    ] {
        assert_eq!(upstream_path_of(&app, sent).await, expected, "GET {sent}");
    }
    app.stop().await;
}

/// A raw HTTP/1.1 upstream that switches protocols whenever asked (or, with `always`,
/// even when not asked), then keeps every byte it receives.
struct Switcher {
    addr: std::net::SocketAddr,
    received: Arc<std::sync::Mutex<Vec<u8>>>,
    switched: Arc<AtomicUsize>,
}

impl Switcher {
    async fn start(always: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let switched = Arc::new(AtomicUsize::new(0));
        let (kept, count) = (received.clone(), switched.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (kept, count) = (kept.clone(), count.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut tunnel = false;
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        kept.lock().unwrap().extend_from_slice(&buf[..n]);
                        if tunnel {
                            continue;
                        }
                        let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                        let answer: &[u8] = if always || head.contains("\r\nupgrade:") {
                            tunnel = true;
                            count.fetch_add(1, Ordering::SeqCst);
                            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                        } else {
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                        };
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            received,
            switched,
        }
    }

    fn received(&self) -> String {
        String::from_utf8_lossy(&self.received.lock().unwrap()).to_ascii_lowercase()
    }
}

/// What a client trying h2c smuggling gets: the status of its upgrade request, and of
/// the request it sends next on the same connection with a spoofed `X-Forwarded-For`.
async fn try_h2c(app: &TestApp) -> String {
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        )
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .map_or(0, |r| r.unwrap_or(0));
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    let _ = stream
        .write_all(b"GET /next HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n")
        .await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    first
}

/// Mutation: forward `Upgrade` whatever protocol it names (as before), and the h2c
/// upgrade opens a tunnel through which `6.6.6.6` reaches the upstream unchanged.
#[tokio::test]
async fn an_h2c_upgrade_never_opens_a_tunnel() {
    let backends = Backends::new().await;
    for always in [false, true] {
        let up = Switcher::start(always).await;
        let mut settings = backends.settings();
        settings.routes = vec![RouteSettings::upstream("site", "/", "web")];
        settings.upstreams = vec![UpstreamSettings::new("web", &[&up.addr.to_string()])];
        let app = TestApp::start(settings).await;
        let first = try_h2c(&app).await;
        let received = up.received();
        assert_ne!(
            status_of(&first),
            101,
            "no switch (always = {always}): {first}"
        );
        assert!(
            !received.contains("6.6.6.6"),
            "spoofed address passed: {received}"
        );
        assert!(
            !received.contains("h2c"),
            "Upgrade: h2c went up: {received}"
        );
        assert!(!received.contains("http2-settings"), "{received}");
        if always {
            assert_eq!(status_of(&first), 502, "a 101 nobody asked for: {first}");
        } else {
            assert_eq!(up.switched.load(Ordering::SeqCst), 0);
        }
        app.stop().await;
    }
}

/// Mutation: ignore the route's `upgrades` (forward any `Upgrade`), and the WebSocket
/// handshake goes through a route that allows none.
#[tokio::test]
async fn a_route_forwards_only_the_upgrades_it_allows() {
    let backends = Backends::new().await;
    let up = Upstream::start("ws").await;
    let mut settings = backends.settings();
    settings.routes = vec![
        // `/plain/ws` goes up as `/ws`, the upstream's WebSocket echo.
        RouteSettings {
            upgrades: Vec::new(),
            rewrite_prefix: Some("/".to_owned()),
            ..RouteSettings::upstream("plain", "/plain", "web")
        },
        RouteSettings::upstream("site", "/", "web"),
    ];
    settings.upstreams = vec![UpstreamSettings::new("web", &[&up.target()])];
    let app = TestApp::start(settings).await;
    let allowed = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr)).await;
    assert!(
        allowed.is_ok(),
        "WebSocket is allowed by default: {allowed:?}"
    );
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/plain/ws", app.addr)).await;
    assert!(refused.is_err(), "no upgrade on a route that allows none");
    app.stop().await;
}

/// The acceptance figure of #23.1: with `fail_open = false` and one failure enough to
/// eject, 1,000 malformed or abandoned uploads leave every target in rotation, and
/// another client's requests all succeed meanwhile.
#[tokio::test]
async fn a_thousand_broken_uploads_leave_every_target_in_rotation() {
    let backends = Backends::new().await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let app = TestApp::start(strict(&backends, "thousand", &[&a, &b])).await;
    let load = GetLoad::start(&app.client, &app.url("/"), 4);
    let next = Arc::new(AtomicUsize::new(0));
    let malformed_400 = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (addr, next, malformed_400) = (app.addr, next.clone(), malformed_400.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= 1000 {
                    return;
                }
                let mut stream = TcpStream::connect(addr).await.unwrap();
                if i % 2 == 0 {
                    stream.write_all(MALFORMED_CHUNK).await.unwrap();
                    let mut out = Vec::new();
                    let read = stream.read_to_end(&mut out);
                    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
                    if status_of(&String::from_utf8_lossy(&out)) == 400 {
                        malformed_400.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    // Abandoned: 10 of 100 bytes, then the connection is closed.
                    stream.write_all(SHORT_UPLOAD).await.unwrap();
                    let _ = stream.shutdown().await;
                    let mut out = Vec::new();
                    let read = stream.read_to_end(&mut out);
                    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
                }
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    load.more(100).await;
    let (answered, failed) = load.stop().await;
    let metrics = app.metrics().await;
    let ejections: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tiergate_upstream_ejections_total{group=\"thousand\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let available = all_targets_available(&app).await;
    println!(
        "1,000 broken uploads (500 malformed: {} answered 400; 500 abandoned): \
         other client {answered} answered, {failed} failed; ejections {ejections}; \
         every target available: {available}",
        malformed_400.load(Ordering::Relaxed)
    );
    assert_eq!(failed, 0, "the other client's requests all succeeded");
    assert_eq!(malformed_400.load(Ordering::Relaxed), 500);
    assert_eq!(ejections, 0.0);
    assert!(available);
    app.stop().await;
}
