//! The upper-limit server: the least an HTTP server over hyper can do per request (a
//! fixed JSON body), so its requests/s bound what any server on this box reaches. The
//! comparison runs it as `limit-server`, also as the upstream behind the proxies (then
//! its [`Stats`] tell how often they reused their upstream connections); tests run it
//! in process on port 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// What every answer carries: about the size of an item's JSON.
pub const BODY: &[u8] = br#"{"source":"cache","item":{"id":1,"name":"Blue hat","created_at":"2026-11-22T02:20:03.992190Z","updated_at":"2026-11-22T02:20:03.992190Z","version":1}}"#;

/// Makes the server stall once: when set, the next request to arrive clears it and
/// waits this long before answering (other connections keep being served).
#[derive(Debug, Clone, Default)]
pub struct Stall {
    armed: Arc<AtomicBool>,
}

/// How long an armed stall lasts.
pub const STALL: Duration = Duration::from_secs(1);

impl Stall {
    /// Arms the stall for the next request.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    fn take(&self) -> bool {
        self.armed.swap(false, Ordering::SeqCst)
    }
}

/// What the server counted since it started.
#[derive(Debug, Default)]
pub struct Stats {
    /// TCP connections accepted.
    pub connections: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
}

impl Stats {
    /// One line for scripts: `connections=N requests=M`.
    pub fn line(&self) -> String {
        format!(
            "connections={} requests={}",
            self.connections.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed)
        )
    }
}

/// What the server answers, and where it counts.
#[derive(Debug, Clone)]
pub struct Options {
    /// The body of every answer (`application/json`).
    pub body: Bytes,
    /// A one-off stall, for tests.
    pub stall: Stall,
    /// Connections and requests so far.
    pub stats: Arc<Stats>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            body: Bytes::from_static(BODY),
            stall: Stall::default(),
            stats: Arc::default(),
        }
    }
}

/// A JSON body of exactly `len` bytes (at least 16): `{"pad":"xxx…"}`, so a proxy
/// benchmark can ask for 1 KiB.
///
/// # Errors
/// `len` is below 16 or above 64 MiB.
pub fn body_of(len: usize) -> anyhow::Result<Bytes> {
    if !(16..=64 << 20).contains(&len) {
        anyhow::bail!("a body must be between 16 bytes and 64 MiB, got {len}");
    }
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(br#"{"pad":""#);
    body.resize(len - 2, b'x');
    body.extend_from_slice(br#""}"#);
    Ok(Bytes::from(body))
}

/// Serves `listener` (HTTP/1.1 and h2c) with the fixed item body until the task is
/// dropped.
pub async fn serve(listener: TcpListener, stall: Stall) {
    serve_with(
        listener,
        Options {
            stall,
            ..Options::default()
        },
    )
    .await;
}

/// Serves `listener` (HTTP/1.1 and h2c) as `options` say until the task is dropped.
pub async fn serve_with(listener: TcpListener, options: Options) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        options.stats.connections.fetch_add(1, Ordering::Relaxed);
        let options = options.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                let stall = options.stall.take();
                options.stats.requests.fetch_add(1, Ordering::Relaxed);
                let body = options.body.clone();
                async move {
                    if stall {
                        tokio::time::sleep(STALL).await;
                    }
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header(CONTENT_TYPE, "application/json")
                            .body(Full::new(body))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_asked_size_and_are_json() {
        for len in [16, 1024, 4096] {
            let body = body_of(len).unwrap();
            assert_eq!(body.len(), len);
            let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(value["pad"].is_string());
        }
        assert!(body_of(15).is_err());
    }
}
