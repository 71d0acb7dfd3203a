//! Arbitrary upstream bytes through the proxy: one Tiergate, started once in process on
//! port 0, forwards `GET /` to a raw upstream that answers each connection's request with
//! the fuzz input and closes. Per input it asserts:
//!
//! - nothing panics (libfuzzer-sys aborts on a panic in any thread);
//! - the client gets a well-formed HTTP/1.1 answer, or its connection is cut, within a
//!   bound well past the group's timeouts (never a hang);
//! - an input whose first final head is malformed, truncated, or frames its body with
//!   both `Content-Length` and `Transfer-Encoding` gets a 502.
//!
//! Seeds: `gateway/tests/corpus/upstream-responses/` (scripts/fuzz copies them in).
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tiergate_config::{RouteSettings, Secret, Settings, UpstreamSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// The longest an answer may take: the group's whole-request limit, and some.
const HANG: Duration = Duration::from_secs(5);

/// How many header lines hyper's client takes in a response head.
const MAX_HEADERS: usize = 100;

struct Harness {
    runtime: Runtime,
    gateway: SocketAddr,
    /// What the upstream answers next.
    answer: Arc<Mutex<Vec<u8>>>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let answer = Arc::new(Mutex::new(Vec::new()));
        let gateway = runtime.block_on(start(answer.clone()));
        Harness {
            runtime,
            gateway,
            answer,
        }
    })
}

/// Starts the upstream and the gateway in front of it, and returns the gateway's address.
async fn start(answer: Arc<Mutex<Vec<u8>>>) -> SocketAddr {
    let upstream = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let target = upstream.local_addr().expect("upstream address").to_string();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = upstream.accept().await else {
                continue;
            };
            let bytes = answer.lock().expect("answer lock").clone();
            tokio::spawn(serve(stream, bytes));
        }
    });
    let mut settings = Settings::for_tests();
    // Nothing here needs the items app's stores: an address where nothing listens.
    settings.database.url = Secret::new("postgres://fuzz@127.0.0.1:9/fuzz".to_owned());
    settings.redis.url = Secret::new("redis://127.0.0.1:9".to_owned());
    settings.proxy.max_attempts = 1;
    let mut group = UpstreamSettings::new("fuzz", &[&target]);
    group.outlier.consecutive_failures = 0;
    group.response_timeout = Duration::from_secs(1);
    group.request_timeout = Duration::from_secs(2);
    settings.upstreams = vec![group];
    settings.routes = vec![RouteSettings::upstream("fuzz", "/", "fuzz")];
    let server = gateway::Server::bind(&settings)
        .await
        .expect("bind the gateway");
    let addr = server.http_addr().expect("the gateway's address");
    tokio::spawn(server.run(std::future::pending::<()>()));
    addr
}

/// Reads the request head, answers `bytes`, closes.
async fn serve(mut stream: TcpStream, bytes: Vec<u8>) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let _ = stream.write_all(&bytes).await;
    let _ = stream.shutdown().await;
}

/// What RFC 9112 makes of the input's first final head: `true` when it must be refused.
fn must_refuse(input: &[u8]) -> bool {
    let mut rest = input;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(rest) {
            Err(_) | Ok(httparse::Status::Partial) => return true,
            Ok(httparse::Status::Complete(len)) => {
                let code = response.code.unwrap_or_default();
                if (100..200).contains(&code) && code != 101 {
                    rest = &rest[len..];
                    continue;
                }
                let has = |name: &str| {
                    response
                        .headers
                        .iter()
                        .any(|h| h.name.eq_ignore_ascii_case(name))
                };
                return code == 101 || (has("content-length") && has("transfer-encoding"));
            }
        }
    }
}

/// Sends `GET /` to the gateway and returns all it wrote before closing or answering
/// in full (this client reads until the gateway closes or the bound passes).
async fn exchange(gateway: SocketAddr) -> Vec<u8> {
    let mut stream = TcpStream::connect(gateway)
        .await
        .expect("connect to the gateway");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n")
        .await
        .expect("send the request");
    let mut out = Vec::new();
    match tokio::time::timeout(HANG, stream.read_to_end(&mut out)).await {
        Ok(_) => out,
        Err(_) => panic!(
            "no answer within {HANG:?}; got {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
}

fuzz_target!(|input: &[u8]| {
    let harness = harness();
    *harness.answer.lock().expect("answer lock") = input.to_vec();
    let out = harness.runtime.block_on(exchange(harness.gateway));
    if out.is_empty() {
        // Cut before a head: the upstream broke off inside a body whose head it sent.
        assert!(
            !must_refuse(input),
            "a refusable answer was cut, not answered 502"
        );
        return;
    }
    // The upstream's fields, and the few the gateway adds.
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS + 16];
    let mut response = httparse::Response::new(&mut headers);
    let parsed = response.parse(&out);
    assert!(
        matches!(parsed, Ok(httparse::Status::Complete(_))),
        "the gateway's answer is not HTTP: {:?}",
        String::from_utf8_lossy(&out)
    );
    if must_refuse(input) {
        assert_eq!(
            response.code,
            Some(502),
            "refusable upstream answer {:?} passed as {:?}",
            String::from_utf8_lossy(input),
            String::from_utf8_lossy(&out)
        );
    }
});
