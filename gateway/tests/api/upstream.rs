//! Upstream servers for the proxy tests: real hyper servers on loopback that say who they
//! are and what they received.
//!
//! - `GET /slow/{ms}`: answers after `ms` milliseconds;
//! - `GET /hop`: answers with hop-by-hop headers that must not reach the client;
//! - `GET /ws`: a WebSocket echo (handshake and frames by tungstenite);
//! - `POST /count`: reads the body as it streams in and answers its length;
//! - `GET /bytes/{n}`: answers `n` bytes, streamed in 64 KiB chunks;
//! - `GET /drip/{ms}`: answers at once, then a byte of body every `ms` milliseconds;
//! - anything else: 200 with `{"upstream", "method", "path", "version", "headers"}`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{AbortHandle, JoinSet};

type Chunks =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;

/// A whole answer, or a streamed one.
type UpstreamBody = Either<Full<Bytes>, StreamBody<Chunks>>;

/// A running upstream. Dropping it stops it.
pub struct Upstream {
    pub addr: SocketAddr,
    name: &'static str,
    /// Requests answered (not counting health checks).
    hits: Arc<AtomicUsize>,
    /// Requests in flight now, and the most there ever were.
    concurrency: Arc<(AtomicUsize, AtomicUsize)>,
    delay: Duration,
    server: Option<AbortHandle>,
}

impl Upstream {
    /// An upstream named `name` on a free port.
    pub async fn start(name: &'static str) -> Self {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap(), Duration::ZERO).await
    }

    /// An upstream that waits `delay` before every answer.
    pub async fn slow(name: &'static str, delay: Duration) -> Self {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap(), delay).await
    }

    async fn start_on(name: &'static str, addr: SocketAddr, delay: Duration) -> Self {
        let mut upstream = Self {
            addr,
            name,
            hits: Arc::new(AtomicUsize::new(0)),
            concurrency: Arc::new((AtomicUsize::new(0), AtomicUsize::new(0))),
            delay,
            server: None,
        };
        upstream.listen().await;
        upstream
    }

    async fn listen(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind upstream");
        self.addr = listener.local_addr().unwrap();
        let (name, hits, delay) = (self.name, self.hits.clone(), self.delay);
        let concurrency = self.concurrency.clone();
        let task = tokio::spawn(async move {
            // Connections live in the set, so aborting the accept loop drops them all.
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let hits = hits.clone();
                let concurrency = concurrency.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let concurrency = concurrency.clone();
                        let hits = hits.clone();
                        async move {
                            let now = concurrency.0.fetch_add(1, Ordering::SeqCst) + 1;
                            concurrency.1.fetch_max(now, Ordering::SeqCst);
                            let rsp = answer(name, hits, delay, req).await;
                            concurrency.0.fetch_sub(1, Ordering::SeqCst);
                            rsp
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        self.server = Some(task.abort_handle());
    }

    /// Stops accepting and drops every open connection, as a crashed process would.
    pub fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.listen().await;
    }

    /// The most requests that were ever in flight at once.
    pub fn peak_concurrency(&self) -> usize {
        self.concurrency.1.load(Ordering::SeqCst)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.concurrency.0.load(Ordering::SeqCst)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn answer(
    name: &'static str,
    hits: Arc<AtomicUsize>,
    delay: Duration,
    mut req: Request<Incoming>,
) -> Result<Response<UpstreamBody>, Infallible> {
    let checked = req
        .headers()
        .get("user-agent")
        .is_some_and(|v| v == "tiergate-health-check");
    if !checked {
        hits.fetch_add(1, Ordering::Relaxed);
    }
    tokio::time::sleep(delay).await;
    let path = req.uri().path().to_owned();
    if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    if path == "/ws" {
        return Ok(websocket_echo(&mut req));
    }
    if path == "/count" {
        let mut body = req.into_body();
        let mut length = 0;
        while let Some(Ok(frame)) = body.frame().await {
            length += frame.data_ref().map_or(0, Bytes::len);
        }
        let answer = serde_json::json!({ "upstream": name, "length": length });
        return Ok(Response::new(Either::Left(Full::new(Bytes::from(
            answer.to_string(),
        )))));
    }
    if let Some(ms) = path.strip_prefix("/drip/") {
        // A byte every `ms` milliseconds, for a minute.
        let every = Duration::from_millis(ms.parse().unwrap_or(100));
        let drip = futures_util::stream::unfold(0, move |n| async move {
            if n > 60_000 / every.as_millis().max(1) {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok(Frame::data(Bytes::from_static(b"."))), n + 1))
        });
        return Ok(Response::new(Either::Right(StreamBody::new(
            Box::pin(drip) as Chunks,
        ))));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        let chunks = (0..n).step_by(64 * 1024).map(move |at| {
            let len = (n - at).min(64 * 1024);
            Ok(Frame::data(Bytes::from(vec![b'x'; len])))
        });
        let body = StreamBody::new(Box::pin(futures_util::stream::iter(chunks)) as Chunks);
        return Ok(Response::new(Either::Right(body)));
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_owned())
            .or_default()
            .push(v.to_str().unwrap_or("<binary>").to_owned());
    }
    let body = serde_json::json!({
        "upstream": name,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map(|p| p.as_str()),
        "version": format!("{:?}", req.version()),
        "headers": headers,
    });
    let mut rsp = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    rsp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if path == "/hop" {
        let h = rsp.headers_mut();
        h.insert("connection", "x-upstream-private".parse().unwrap());
        h.insert("x-upstream-private", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-upstream-public", "yes".parse().unwrap());
    }
    Ok(rsp)
}

/// Answers a WebSocket handshake with a real `101` and echoes every message after it.
fn websocket_echo(req: &mut Request<Incoming>) -> Response<UpstreamBody> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut rsp = Response::new(Either::Left(Full::new(Bytes::from_static(
            b"not a websocket",
        ))));
        *rsp.status_mut() = StatusCode::BAD_REQUEST;
        return rsp;
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() || ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept)
        .body(Either::Left(Full::new(Bytes::new())))
        .unwrap()
}
