//! Heap allocations per request, counted by the global allocator: an L1-hit
//! `GET /items/{id}` through `Gateway::handle`, with access lines off and on. The access
//! line costs its request no allocation: its buffer is reused from the request before,
//! and rendering and writing the line allocate nothing. On the way, that no answer
//! holds the bytes of its request's head, which would cost an allocation more in hyper.
//!
//! A test binary of its own: its counting allocator sees every allocation of the
//! process (the request's thread, the access log's writer, background tasks), so nothing
//! else may run in it.

#![allow(clippy::unwrap_used)]

use std::alloc::System;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use app_core::App;
use app_core::health::BuildInfo;
use app_core::testing::{TestDb, TestRedis, settings, start_ready};
use bytes::Bytes;
use gateway::access_log::AccessLog;
use gateway::listener::Peer;
use gateway::response::ResponseBody;
use gateway::router::Router;
use gateway::service::Gateway;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

/// Counts every allocation of the process.
#[global_allocator]
static ALLOCATOR: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const BUILD: BuildInfo = BuildInfo {
    version: "test",
    commit: "test",
};

const PEER: Peer = Peer {
    addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000),
    tls: false,
    local_port: 8080,
};

/// Every request's headers, as a load balancer's request has them.
const HEADERS: &[(&str, &str)] = &[
    ("host", "api.example.com"),
    ("user-agent", "loadgen/1.0"),
    ("x-forwarded-for", "203.0.113.9"),
    (
        "x-amzn-trace-id",
        "Root=1-67891233-abcdef012345678912345678",
    ),
];

/// Headers whose values the app or the access line keep for the answer.
const KEPT_HEADERS: &[(&str, &str)] = &[
    ("x-request-id", "client-chosen-id-42"),
    ("if-none-match", "\"not-the-etag\""),
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
];

/// A request as hyper hands it over: its URI and header values (`HEADERS` and `extra`)
/// are slices of the one shared buffer the head was read into, so cloning them shares
/// their bytes.
fn get(head: &Bytes, path: &str, extra: &[(&'static str, &'static str)]) -> Request<Full<Bytes>> {
    let slice = |text: &str| {
        let at = head
            .windows(text.len())
            .position(|w| w == text.as_bytes())
            .unwrap();
        head.slice(at..at + text.len())
    };
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.uri_mut() = http::Uri::from_maybe_shared(slice(path)).unwrap();
    let headers = req.headers_mut();
    for &(name, value) in HEADERS.iter().chain(extra) {
        let value = http::HeaderValue::from_maybe_shared(slice(value)).unwrap();
        headers.insert(name, value);
    }
    req
}

/// The head of `GET path` with `HEADERS` and `extra`, read into a buffer that is
/// already shared (as hyper's read buffer is once a head is split off it).
fn head_with(path: &str, extra: &[(&str, &str)]) -> Bytes {
    let mut text = format!("GET {path} HTTP/1.1\r\n");
    for (name, value) in HEADERS.iter().chain(extra) {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    let head = Bytes::from(text.into_bytes());
    let _shared = head.clone();
    head
}

async fn answer(gateway: &Gateway, req: Request<Full<Bytes>>) -> StatusCode {
    finish(gateway.handle(req, PEER)).await
}

async fn finish(answering: impl Future<Output = Response<ResponseBody>>) -> StatusCode {
    let rsp = answering.await;
    let status = rsp.status();
    let _ = rsp.into_body().collect().await.unwrap();
    status
}

/// Allocations per L1-hit request through `gateway`, over `n` requests after a warm-up.
async fn allocations_per_request(gateway: &Gateway, path: &str, n: u64) -> f64 {
    // Warming up, the request also carries the headers the app and the access line
    // keep (its id, an `If-None-Match`, a `traceparent`), and nothing may still hold the
    // head's bytes once the answer is started: hyper reads ahead on the connection
    // before it polls the answer, and a read buffer still shared is replaced, an
    // allocation and a copy per request. (Mutation checked: the request id cloned
    // instead of copied fails it.)
    let kept = head_with(path, KEPT_HEADERS);
    for _ in 0..1_000 {
        let answering = gateway.handle(get(&kept, path, KEPT_HEADERS), PEER);
        assert!(
            kept.is_unique(),
            "the answer holds slices of the request's head"
        );
        assert_eq!(finish(answering).await, StatusCode::OK);
    }
    let head = head_with(path, &[]);
    let region = Region::new(ALLOCATOR);
    for _ in 0..n {
        answer(gateway, get(&head, path, &[])).await;
    }
    let change = region.change();
    #[allow(clippy::cast_precision_loss)]
    let per_request = (change.allocations + change.reallocations) as f64 / n as f64;
    per_request
}

/// The line's buffer is reused from the request before on the thread. Mutation
/// checked: with `RequestFields` allocating its buffer each time (as it did before), it
/// costs 1.00 allocation per request and fails.
#[test]
fn the_access_line_costs_its_request_no_allocation() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (db, redis) = runtime.block_on(async { (TestDb::create().await, TestRedis::new()) });
    let settings = settings(&db, &redis);
    let _metrics = gateway::metrics::install();
    let _entered = runtime.enter();
    let app = App::new(&settings, BUILD).unwrap();
    let quiet = Gateway::new(
        Router::new(&settings, None).unwrap(),
        app.clone(),
        &settings.http,
        None,
        None,
    );
    let log = AccessLog::to(1.0, std::io::sink).unwrap();
    let logged = Gateway::new(
        Router::new(&settings, None).unwrap(),
        app.clone(),
        &settings.http,
        Some(log.clone()),
        None,
    );
    let (without, with) = runtime.block_on(async {
        start_ready(&app).await;
        let mut create = Request::new(Full::new(Bytes::from_static(br#"{"name":"hat"}"#)));
        *create.method_mut() = Method::POST;
        *create.uri_mut() = http::Uri::from_static("/items");
        create
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        let rsp = quiet.handle(create, PEER).await;
        assert_eq!(rsp.status(), StatusCode::CREATED);
        let location = rsp.headers()["location"].to_str().unwrap().to_owned();
        let without = allocations_per_request(&quiet, &location, 10_000).await;
        let with = allocations_per_request(&logged, &location, 10_000).await;
        (without, with)
    });
    log.close();
    runtime.block_on(app.close());
    eprintln!("allocations per L1-hit request: {without:.2} without access lines, {with:.2} with");
    assert!(
        with - without < 0.5,
        "the access line costs {:.2} allocations per request",
        with - without
    );
}
