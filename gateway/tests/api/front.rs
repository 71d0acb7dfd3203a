//! The front door, spoken over raw sockets where the bytes matter: what every listener
//! refuses before anything answers a request (framing, `Host`, CONNECT and TRACE), HEAD on
//! every GET route, JSON for every error the server writes (hyper's parser errors too),
//! request bodies read without a load-shedding permit, and in-flight budgets the app and
//! the proxy do not share.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tiergate_config::{RouteSettings, Settings, UpstreamSettings};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::helpers::{Backends, TestApp};
use crate::raw::{Raw, closes, exchange, read_raw};
use crate::upstream::Upstream;

/// Settings with `/items` for the app and `/up` to the group `web` at `upstream`.
fn app_and_proxy(backends: &Backends, upstream: &Upstream) -> Settings {
    let mut settings = backends.settings();
    settings.routes = vec![
        RouteSettings::app("items", "/items", false),
        RouteSettings::app("health", "/health", true),
        RouteSettings::upstream("up", "/up", "web"),
    ];
    settings.upstreams = vec![UpstreamSettings::new("web", &[&upstream.target()])];
    settings
}

const CHUNKED_NAME: &str = "e\r\n{\"name\":\"abc\"}\r\n0\r\n\r\n";

/// Mutation: drop the Transfer-Encoding check from the head scan and every case but
/// `gzip` and `chunked, gzip` (which hyper refuses itself) reaches the app or the upstream.
#[tokio::test]
async fn transfer_encoding_must_be_chunked_once_and_last_on_app_and_proxied_routes() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("web").await;
    let app = TestApp::start(app_and_proxy(&backends, &upstream)).await;
    let cases: &[(&str, &str, u16, &str)] = &[
        (
            "gzip, chunked",
            "Transfer-Encoding: gzip, chunked\r\n",
            501,
            "not_implemented",
        ),
        (
            "identity, chunked",
            "Transfer-Encoding: identity, chunked\r\n",
            501,
            "not_implemented",
        ),
        (
            "chunked, chunked",
            "Transfer-Encoding: chunked, chunked\r\n",
            400,
            "bad_request",
        ),
        (
            "Transfer-Encoding twice",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            400,
            "bad_request",
        ),
        (
            "a tab before chunked",
            "Transfer-Encoding:\tchunked\r\n",
            400,
            "bad_request",
        ),
        (
            "an empty element",
            "Transfer-Encoding: ,chunked\r\n",
            400,
            "bad_request",
        ),
        (
            "gzip alone",
            "Transfer-Encoding: gzip\r\n",
            400,
            "bad_request",
        ),
        (
            "chunked, gzip",
            "Transfer-Encoding: chunked, gzip\r\n",
            400,
            "bad_request",
        ),
    ];
    let mut wrong = Vec::new();
    for path in ["/items", "/up/x"] {
        for (name, te, status, code) in cases {
            let request = format!(
                "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{te}\r\n{CHUNKED_NAME}"
            );
            let (rsp, closed) = exchange(app.addr, request.as_bytes()).await;
            let body = if rsp.header("content-type") == Some("application/json") {
                rsp.error()
            } else {
                Value::Null
            };
            if rsp.status != *status
                || body["error"] != *code
                || rsp.header("connection") != Some("close")
                || !closed
            {
                wrong.push(format!(
                    "{path} {name}: {} {body} connection={:?} closed={closed}",
                    rsp.status,
                    rsp.header("connection")
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(upstream.hits(), 0, "nothing reached the upstream");

    // chunked itself, in any case, is fine.
    for te in ["chunked", "Chunked"] {
        let request = format!(
            "POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: {te}\r\n\r\n{CHUNKED_NAME}"
        );
        let (rsp, _) = exchange(app.addr, request.as_bytes()).await;
        assert_eq!(rsp.status, 201, "{te}: {rsp:?}");
    }
    app.stop().await;
}

/// Mutation: skip the Host check in the connection's `answer` and the first five cases
/// are served.
#[tokio::test]
async fn host_is_required_once_and_must_be_a_host_and_port() {
    let app = TestApp::start_unready(Settings::for_tests()).await;
    let refused = [
        ("no Host", "GET /livez HTTP/1.1\r\n\r\n".to_owned()),
        (
            "two Hosts",
            "GET /livez HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n".to_owned(),
        ),
        (
            "a path in Host",
            "GET /livez HTTP/1.1\r\nHost: a.test/../admin\r\n\r\n".to_owned(),
        ),
        (
            "userinfo in Host",
            "GET /livez HTTP/1.1\r\nHost: x@internal.test\r\n\r\n".to_owned(),
        ),
        (
            "a port out of range",
            "GET /livez HTTP/1.1\r\nHost: a.test:99999\r\n\r\n".to_owned(),
        ),
        (
            "an empty Host",
            "GET /livez HTTP/1.1\r\nHost: \r\n\r\n".to_owned(),
        ),
        (
            "HTTP/1.0 with two Hosts",
            "GET /livez HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n".to_owned(),
        ),
    ];
    let mut wrong = Vec::new();
    for (name, request) in &refused {
        let (rsp, _) = exchange(app.addr, request.as_bytes()).await;
        if rsp.status != 400 {
            wrong.push(format!("{name}: {} {:?}", rsp.status, rsp.body));
        } else {
            assert_eq!(rsp.error()["error"], "bad_request", "{name}");
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    for host in [
        "a.test",
        "A.Test:8080",
        "[::1]:8080",
        "127.0.0.1",
        "under_score.test",
    ] {
        let request = format!("GET /livez HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let (rsp, _) = exchange(app.addr, request.as_bytes()).await;
        assert_eq!(rsp.status, 200, "Host: {host}");
    }
    let (rsp, _) = exchange(app.addr, b"GET /livez HTTP/1.0\r\n\r\n").await;
    assert_eq!(rsp.status, 200, "HTTP/1.0 needs no Host");

    // HTTP/2: `:authority` and a Host that names another host, or Host twice.
    let tcp = TcpStream::connect(app.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let get = |hosts: &[&str]| {
        let mut req = http::Request::get("http://a.test/livez");
        for host in hosts {
            req = req.header("host", *host);
        }
        req.body(Empty::<Bytes>::new()).unwrap()
    };
    let status = |rsp: http::Response<hyper::body::Incoming>| rsp.status().as_u16();
    assert_eq!(status(send.send_request(get(&[])).await.unwrap()), 200);
    assert_eq!(
        status(send.send_request(get(&["a.test"])).await.unwrap()),
        200
    );
    assert_eq!(
        status(send.send_request(get(&["b.test"])).await.unwrap()),
        400,
        ":authority a.test with Host b.test"
    );
    assert_eq!(
        status(send.send_request(get(&["a.test", "a.test"])).await.unwrap()),
        400,
        "Host twice"
    );
    app.stop().await;
}

/// Mutation: let `strip_hop_by_hop` remove what `Connection` names, Host included, and
/// the upstream sees the target's address instead.
#[tokio::test]
async fn connection_cannot_strip_host_on_the_way_up() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("web").await;
    let app = TestApp::start(app_and_proxy(&backends, &upstream)).await;
    let (rsp, _) = exchange(
        app.addr,
        b"GET /up/x HTTP/1.1\r\nHost: front.test\r\nConnection: Host, keep-alive\r\n\r\n",
    )
    .await;
    assert_eq!(rsp.status, 200, "{rsp:?}");
    let seen: Value = serde_json::from_slice(&rsp.body).unwrap();
    assert_eq!(seen["headers"]["host"], serde_json::json!(["front.test"]));
    assert_eq!(
        seen["headers"]["x-forwarded-host"],
        serde_json::json!(["front.test"])
    );
    app.stop().await;
}

/// HEAD of `path` then GET `/livez` on one connection: the HEAD answer must have no body
/// (the GET's answer comes next, whole). Returns the HEAD answer.
async fn head_then_get(addr: SocketAddr, path: &str) -> Raw {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let requests =
        format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\nGET /livez HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(requests.as_bytes()).await.unwrap();
    let head = read_raw(&mut stream, true).await;
    let next = read_raw(&mut stream, false).await;
    assert_eq!(next.status, 200, "after HEAD {path}: {next:?}");
    head
}

async fn get_raw(addr: SocketAddr, path: &str) -> Raw {
    let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    exchange(addr, request.as_bytes()).await.0
}

/// Mutation: take HEAD out of the app's routes (or the admin's) and these answer 405.
#[tokio::test]
async fn head_answers_every_get_route_with_its_headers_and_no_body() {
    let backends = Backends::new().await;
    let app = TestApp::start(backends.settings()).await;
    let id = app.create("hat").await["id"].as_i64().unwrap();
    let item = format!("/items/{id}");
    // Read once, so the GET and the HEAD below both come from L1.
    assert_eq!(app.get(&item).await.status(), 200);

    let public = [
        item.as_str(),
        "/items",
        "/items?limit=1",
        "/health",
        "/livez",
        "/readyz",
    ];
    let admin = ["/metrics", "/livez", "/readyz", "/admin/routes", "/"];
    for (addr, paths) in [(app.addr, &public[..]), (app.admin, &admin[..])] {
        for path in paths {
            let get = get_raw(addr, path).await;
            let head = head_then_get(addr, path).await;
            assert_eq!(head.status, get.status, "HEAD {path}");
            assert_eq!(
                head.header("content-type"),
                get.header("content-type"),
                "HEAD {path}"
            );
            assert!(head.header("content-length").is_some(), "HEAD {path}");
            if *path == item {
                assert_eq!(head.header("etag"), get.header("etag"));
                assert!(head.header("x-cache").is_some());
                // The body names its tier: the lengths agree when the tiers do (an L1
                // entry may expire between the two on a slow machine).
                if head.header("x-cache") == get.header("x-cache") {
                    assert_eq!(
                        head.header("content-length"),
                        get.header("content-length"),
                        "HEAD {path}"
                    );
                }
            }
        }
    }
    // A HEAD the app refuses still says so, with its Allow.
    let rsp = app.client.delete(app.url("/health")).send().await.unwrap();
    assert_eq!(rsp.status(), 405);
    assert_eq!(rsp.headers()["allow"], "GET, HEAD");

    // Over HTTP/2 as well: the same length, no DATA.
    let tcp = TcpStream::connect(app.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = |method: http::Method| {
        http::Request::builder()
            .method(method)
            .uri(format!("http://{}{item}", app.addr))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let get = send.send_request(request(http::Method::GET)).await.unwrap();
    let rsp = send
        .send_request(request(http::Method::HEAD))
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    let length = rsp.headers()["content-length"].to_str().unwrap().to_owned();
    let same_tier = rsp.headers().get("x-cache") == get.headers().get("x-cache");
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    assert!(body.is_empty(), "HEAD over h2 sent {} bytes", body.len());
    let got = get.into_body().collect().await.unwrap().to_bytes();
    if same_tier {
        assert_eq!(length, got.len().to_string(), "HEAD's length is GET's");
    }
    app.stop().await;
}

/// Mutation: let hyper's own answer through (no rewrite in the guarded IO) and each of
/// these is a bodiless 400, 414 or 431.
#[tokio::test]
async fn every_error_the_server_writes_is_json_hypers_own_included() {
    // The default head limit (16 KiB) for the oversized head, as the listener test that
    // proves the 431 (far over it, and the server's close while the client still writes
    // resets the connection, answer and all); room for a 70,000-byte target in another.
    let app = TestApp::start_unready(Settings::for_tests()).await;
    let mut roomy = Settings::for_tests();
    roomy.http.max_header_bytes = 96 * 1024;
    let roomy = TestApp::start_unready(roomy).await;
    let big = format!(
        "GET /livez HTTP/1.1\r\nHost: t\r\nx-big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let many: String = (0..150).map(|i| format!("x-{i}: y\r\n")).collect();
    let many = format!("GET /livez HTTP/1.1\r\nHost: t\r\n{many}\r\n");
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(70_000));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("a head over the limit", big, 431, "http.max_header_bytes"),
        ("too many header lines", many, 431, "http.max_headers"),
        ("a request target too long", long_uri, 414, ""),
        (
            "an unknown HTTP version",
            "GET /livez HTTP/9.9\r\nHost: t\r\n\r\n".to_owned(),
            400,
            "",
        ),
        (
            "a space in a header name",
            "GET /livez HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n".to_owned(),
            400,
            "",
        ),
        (
            "obs-fold",
            "GET /livez HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\n\r\n".to_owned(),
            400,
            "",
        ),
        (
            "a bad Content-Length",
            "POST /livez HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n".to_owned(),
            400,
            "",
        ),
        (
            "two Content-Lengths",
            "POST /livez HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"
                .to_owned(),
            400,
            "",
        ),
    ];
    let mut wrong = Vec::new();
    for (name, request, status, names) in &cases {
        let addr = if *status == 414 { roomy.addr } else { app.addr };
        let (rsp, closed) = exchange(addr, request.as_bytes()).await;
        let json = rsp.header("content-type") == Some("application/json");
        let body: Value = serde_json::from_slice(&rsp.body).unwrap_or(Value::Null);
        if rsp.status != *status
            || !json
            || !body["message"].as_str().is_some_and(|m| m.contains(names))
            || !closed
        {
            wrong.push(format!(
                "{name}: {} json={json} {:?} closed={closed}",
                rsp.status,
                String::from_utf8_lossy(&rsp.body)
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    roomy.stop().await;
    app.stop().await;
}

/// Mutation: forward CONNECT and TRACE like any other method and the upstream sees them.
#[tokio::test]
async fn connect_and_trace_are_refused_and_never_forwarded() {
    let backends = Backends::new().await;
    let upstream = Upstream::start("web").await;
    let mut settings = app_and_proxy(&backends, &upstream);
    settings
        .routes
        .push(RouteSettings::upstream("site", "/", "web"));
    let app = TestApp::start(settings).await;

    let (rsp, closed) = exchange(
        app.addr,
        b"CONNECT internal.test:443 HTTP/1.1\r\nHost: internal.test:443\r\n\r\n",
    )
    .await;
    assert_eq!(rsp.status, 501, "{rsp:?}");
    assert_eq!(rsp.error()["error"], "not_implemented");
    assert!(closed, "the connection closes after a refused CONNECT");

    for path in ["/up/x", "/"] {
        let request = format!("TRACE {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        let (rsp, _) = exchange(app.addr, request.as_bytes()).await;
        assert_eq!(rsp.status, 405, "TRACE {path}: {rsp:?}");
        assert_eq!(rsp.error()["error"], "method_not_allowed");
        assert!(rsp.header("allow").is_some_and(|a| !a.contains("TRACE")));
    }
    let (rsp, _) = exchange(app.addr, b"TRACE /items HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(rsp.status, 405);
    assert_eq!(rsp.header("allow"), Some("GET, HEAD, POST"));
    assert_eq!(upstream.hits(), 0, "nothing reached the upstream");
    app.stop().await;
}

/// Mutation: read the body without the deadline and the client waits on to the request
/// timeout (then 503), or forever.
#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408_at_the_body_read_timeout() {
    let backends = Backends::new().await;
    let mut settings = backends.settings();
    settings.http.body_read_timeout = Duration::from_millis(300);
    let app = TestApp::start(settings).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"name\":",
        )
        .await
        .unwrap();
    let sent = Instant::now();
    let rsp = read_raw(&mut stream, false).await;
    let waited = sent.elapsed();
    assert_eq!(rsp.status, 408, "{rsp:?}");
    assert_eq!(rsp.error()["error"], "request_timeout");
    assert_eq!(rsp.header("connection"), Some("close"));
    assert!(closes(&mut stream).await);
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(2000),
        "answered after {waited:?}; the body read timeout is 300 ms"
    );
    app.stop().await;
}

/// Mutation: take the permit before the body is read (as before) and the GETs get 503
/// `overloaded` while the uploads trickle — or the uploads get it instead of `100
/// Continue`.
#[tokio::test]
async fn slow_request_bodies_hold_no_load_shedding_permit() {
    let backends = Backends::new().await;
    let mut settings = backends.settings();
    settings.http.max_in_flight = 4;
    settings.http.body_read_timeout = Duration::from_secs(30);
    let app = TestApp::start(settings).await;
    let id = app.create("hat").await["id"].as_i64().unwrap();
    let item = format!("/items/{id}");

    // Ten uploads, each seen being read (`100 Continue` is sent when the server reads
    // the body), then stalled after one byte.
    let mut uploads = Vec::new();
    for _ in 0..10 {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream
            .write_all(
                b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 60000\r\nExpect: 100-continue\r\n\r\n",
            )
            .await
            .unwrap();
        let interim = read_raw(&mut stream, true).await;
        assert_eq!(interim.status, 100, "the upload was not read: {interim:?}");
        stream.write_all(b"{").await.unwrap();
        uploads.push(stream);
    }
    for _ in 0..20 {
        let rsp = app.get(&item).await;
        assert_eq!(rsp.status(), 200, "GET while 10 uploads trickle");
    }
    drop(uploads);
    app.stop().await;
}

/// Mutation: count proxied requests against `http.max_in_flight` (one budget for both,
/// as before) and `/items` answers 503 while the upstream holds its requests.
#[tokio::test]
async fn the_proxy_and_the_app_have_in_flight_budgets_of_their_own() {
    let backends = Backends::new().await;
    let upstream = Upstream::slow("web", Duration::from_secs(10)).await;
    let mut settings = app_and_proxy(&backends, &upstream);
    settings.http.max_in_flight = 4;
    settings.upstreams[0].max_in_flight = 3;
    settings.upstreams[0].response_timeout = Duration::from_secs(20);
    settings.upstreams[0].request_timeout = Duration::from_secs(20);
    let app = TestApp::start(settings).await;
    let id = app.create("hat").await["id"].as_i64().unwrap();

    let held: Vec<_> = (0..3)
        .map(|_| {
            let (client, url) = (app.client.clone(), app.url("/up/x"));
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status()) })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.in_flight() < 3 {
        assert!(
            Instant::now() < deadline,
            "the upstream never held 3 requests"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The group's budget is spent: one more is shed, by the group's limit.
    let rsp = app.get("/up/x").await;
    let body = crate::helpers::assert_error(rsp, 503, "overloaded").await;
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("upstreams.max_in_flight")),
        "{body}"
    );
    // The app's is untouched.
    for _ in 0..8 {
        assert_eq!(app.get(&format!("/items/{id}")).await.status(), 200);
    }
    for request in held {
        request.abort();
    }
    // The held requests end with their upstream, so the drain need not wait for them.
    drop(upstream);
    app.stop().await;
}

/// Mutation: put serde's message back in the admin API's 400 and it names `u32`.
#[tokio::test]
async fn admin_body_errors_are_told_without_the_server_s_types() {
    let mut settings = Settings::for_tests();
    let port = crate::helpers::closed_port();
    settings.upstreams = vec![
        UpstreamSettings::new("blue", &[&format!("127.0.0.1:{port}")]),
        UpstreamSettings::new("green", &[&format!("127.0.0.1:{port}")]),
    ];
    let mut web = RouteSettings::upstream("web", "/", "blue");
    web.upstream = None;
    web.split = Some([("blue".to_owned(), 100), ("green".to_owned(), 0)].into());
    settings.routes = vec![web];
    settings.admin.token = Some(crate::helpers::ADMIN_TOKEN.into());
    let app = TestApp::start_unready(settings).await;
    for body in [r#"{"blue": "x"}"#, r#"{"blue": -1}"#, "[1]", "{"] {
        let rsp = app
            .client
            .put(format!("http://{}/admin/routes/web/split", app.admin))
            .bearer_auth(crate::helpers::ADMIN_TOKEN)
            .body(body)
            .send()
            .await
            .unwrap();
        let error = crate::helpers::assert_error(rsp, 400, "bad_request").await;
        let message = error["message"].as_str().unwrap();
        for rust in ["u32", "map", "sequence", "struct"] {
            assert!(!message.contains(rust), "{body}: {message}");
        }
    }
    app.stop().await;
}

/// A WebSocket's bytes are not a request head: the listener's header clock must not cut
/// the tunnel. Mutation: leave the head tracking on after the `101` and the client's
/// first frame starts the header clock, which cuts the tunnel 300 ms later.
#[tokio::test]
async fn a_websocket_is_not_cut_at_the_header_read_timeout() {
    use futures_util::{SinkExt, StreamExt};
    let backends = Backends::new().await;
    let upstream = Upstream::start("web").await;
    let mut settings = backends.settings();
    settings.routes = vec![RouteSettings::upstream("ws", "/ws", "web")];
    settings.upstreams = vec![UpstreamSettings::new("web", &[&upstream.target()])];
    settings.http.header_read_timeout = Duration::from_millis(300);
    let app = TestApp::start(settings).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr))
        .await
        .unwrap();
    for text in ["one", "two", "three"] {
        ws.send(text.into()).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
        // Quiet for longer than the header timeout, well within the idle one.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    ws.close(None).await.unwrap();
    app.stop().await;
}
