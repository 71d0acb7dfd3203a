//! The upper-limit server: the least an HTTP server over hyper can do per request (a
//! fixed JSON body), so its requests/s bound what any server on this box reaches. The
//! comparison runs it as `limit-server`; tests run it in process on port 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// Serves `listener` (HTTP/1.1 and h2c) until the task is dropped.
pub async fn serve(listener: TcpListener, stall: Stall) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let stall = stall.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                let stall = stall.take();
                async move {
                    if stall {
                        tokio::time::sleep(STALL).await;
                    }
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header(CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from_static(BODY)))
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
