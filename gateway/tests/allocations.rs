//! Heap allocations per request, counted by the global allocator: an L1-hit
//! `GET /items/{id}` through `Gateway::handle`, with access lines off and on. The access
//! line may cost its request one allocation, the box that carries what it needs of the
//! request to the answer (inline, it would double the size of the request's future,
//! which hyper moves); rendering and writing the line allocate nothing.
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
use gateway::router::Router;
use gateway::service::Gateway;
use http::{Method, Request, StatusCode};
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

/// A request as hyper hands it over: its URI and header values are slices of the one
/// shared buffer the head was read into, so cloning them shares their bytes.
fn get(head: &Bytes, path: &str) -> Request<Full<Bytes>> {
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
    for (name, value) in [
        ("host", "api.example.com"),
        ("user-agent", "loadgen/1.0"),
        ("x-forwarded-for", "203.0.113.9"),
        (
            "x-amzn-trace-id",
            "Root=1-67891233-abcdef012345678912345678",
        ),
    ] {
        let value = http::HeaderValue::from_maybe_shared(slice(value)).unwrap();
        headers.insert(name, value);
    }
    req
}

/// The head of `GET path`, read into a buffer that is already shared (as hyper's read
/// buffer is once a head is split off it).
fn head(path: &str) -> Bytes {
    let text = format!(
        "GET {path} HTTP/1.1\r\nhost: api.example.com\r\nuser-agent: loadgen/1.0\r\n\
         x-forwarded-for: 203.0.113.9\r\n\
         x-amzn-trace-id: Root=1-67891233-abcdef012345678912345678\r\n\r\n"
    );
    let head = Bytes::from(text.into_bytes());
    let _shared = head.clone();
    head
}

async fn answer(gateway: &Gateway, req: Request<Full<Bytes>>) -> StatusCode {
    let rsp = gateway.handle(req, PEER).await;
    let status = rsp.status();
    let _ = rsp.into_body().collect().await.unwrap();
    status
}

/// Allocations per L1-hit request through `gateway`, over `n` requests after a warm-up.
async fn allocations_per_request(gateway: &Gateway, path: &str, n: u64) -> f64 {
    let head = head(path);
    for _ in 0..1_000 {
        assert_eq!(answer(gateway, get(&head, path)).await, StatusCode::OK);
    }
    let region = Region::new(ALLOCATOR);
    for _ in 0..n {
        answer(gateway, get(&head, path)).await;
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
