//! Accept loops: TCP connections served by hyper, HTTP/1.1 and HTTP/2 (h2c by prior
//! knowledge) on one port, and the drain that ends them.
//!
//! Shutdown runs in two phases, driven by `Drain`:
//!
//! 1. **Draining** (`shutdown.drain_delay`): the loop keeps accepting, so requests the
//!    load balancer still routes here are served. Every HTTP/1.x response carries
//!    `Connection: close` (the client's next request opens a connection elsewhere), and
//!    HTTP/2 connections get GOAWAY. Idle HTTP/1.1 connections are left open on purpose:
//!    closing one races a request the client may be sending on it at that moment, which
//!    is how an ALB ends up answering 502.
//! 2. **Closing**: connections already in the accept backlog are taken in, then the
//!    listening socket closes (new connections are refused). Every connection is asked to
//!    finish: idle HTTP/1.1 closes now, a request in flight gets its response first, and
//!    a connection that has sent nothing yet gets `FIRST_REQUEST_GRACE` (1 s) to send its
//!    request. Connections still open at the deadline are dropped.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

/// How long to pause after a failed `accept` (EMFILE and the like): long enough not to
/// spin on a full descriptor table, short enough to recover quickly.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// When the listener closes, how long a connection that has not sent a request yet gets
/// to send one (a client that connected just before the close) before it is closed.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Where a shutdown stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Normal operation.
    Serving,
    /// Still accepting, but telling every client to go elsewhere.
    Draining,
    /// No longer accepting; connections finish until the deadline.
    Closing { deadline: Instant },
}

/// The shutdown phase as the accept loops and connections see it. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Drain {
    phase: watch::Receiver<Phase>,
    /// Mirrors "phase is not Serving" for the per-request check: one relaxed load on the
    /// hot path instead of the watch channel's lock.
    draining: Arc<AtomicBool>,
}

/// The sending side of [`Drain`], held by the server.
#[derive(Debug)]
pub(crate) struct DrainControl {
    phase: watch::Sender<Phase>,
    draining: Arc<AtomicBool>,
}

impl DrainControl {
    pub(crate) fn new() -> (Self, Drain) {
        let (tx, rx) = watch::channel(Phase::Serving);
        let draining = Arc::new(AtomicBool::new(false));
        (
            Self {
                phase: tx,
                draining: draining.clone(),
            },
            Drain {
                phase: rx,
                draining,
            },
        )
    }

    /// Enters `phase`; the loops and connections react at once.
    pub(crate) fn enter(&self, phase: Phase) {
        self.draining
            .store(phase != Phase::Serving, Ordering::Relaxed);
        self.phase.send_replace(phase);
    }
}

/// Per-connection facts the service shares with the task that drives the connection.
#[derive(Debug, Default)]
struct ConnState {
    /// The connection spoke HTTP/2 at least once: GOAWAY is how to drain it.
    h2: AtomicBool,
    /// A request on an HTTP/2 connection finished while draining: send GOAWAY now.
    goaway: Notify,
    /// At least one request arrived on the connection.
    used: AtomicBool,
}

/// Serves `listener` with `handler` until the drain reaches [`Phase::Closing`], then
/// waits for open connections until its deadline.
pub(crate) async fn serve<H, Fut>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    drain: Drain,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper needs a timer for its header-read timeout (slow-loris protection).
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    // Each connection task holds a sender; `recv` yields `None` once all have ended.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    // Serves one accepted connection in a task of its own.
    let spawn = |stream: TcpStream| {
        // Responses are small and written whole: send them without waiting for more.
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnState::default());
        let service = {
            let handler = handler.clone();
            let state = state.clone();
            let draining = drain.draining.clone();
            service_fn(move |req: Request<Incoming>| {
                let version = req.version();
                state.used.store(true, Ordering::Relaxed);
                if version == Version::HTTP_2 {
                    state.h2.store(true, Ordering::Relaxed);
                }
                let response = handler(req);
                let state = state.clone();
                let draining = draining.clone();
                async move {
                    let mut rsp = response.await;
                    if draining.load(Ordering::Relaxed) {
                        if version == Version::HTTP_2 {
                            state.goaway.notify_one();
                        } else {
                            // hyper closes the connection after a response that says so.
                            rsp.headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        }
                    }
                    Ok::<_, Infallible>(rsp)
                }
            })
        };
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let mut phase = drain.phase.clone();
        let open = open_tx.clone();
        // Drives the connection to its end, asking it to finish when the drain says so.
        tokio::spawn(async move {
            let _open = open;
            let mut connection = pin!(connection);
            let mut asked = false;
            let mut finish_at: Option<Instant> = None;
            loop {
                let grace = async {
                    match finish_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::debug!(listener = name, error = %error, "Connection ended with an error.");
                        }
                        return;
                    }
                    () = state.goaway.notified(), if !asked => {}
                    () = grace, if !asked => {}
                    changed = phase.changed(), if !asked && finish_at.is_none() => {
                        let now = *phase.borrow_and_update();
                        let h2 = state.h2.load(Ordering::Relaxed);
                        match (changed, now) {
                            // hyper closes a connection that has not read a request yet
                            // without reading one; its first request may be on the wire.
                            (Err(_) | Ok(()), Phase::Closing { .. })
                                if !state.used.load(Ordering::Relaxed) =>
                            {
                                finish_at = Some(Instant::now() + FIRST_REQUEST_GRACE);
                                continue;
                            }
                            // The server is gone or closing: finish now.
                            (Err(_), _) | (Ok(()), Phase::Closing { .. }) => {}
                            (Ok(()), Phase::Draining) if h2 => {}
                            // HTTP/1.x drains per response (`Connection: close`).
                            (Ok(()), _) => continue,
                        }
                    }
                }
                // HTTP/2: GOAWAY, in-flight streams finish. HTTP/1.1: close when idle,
                // else after the response in flight.
                connection.as_mut().graceful_shutdown();
                asked = true;
            }
        });
    };

    let mut phase = drain.phase.clone();
    let deadline = loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = phase.wait_for(|p| matches!(p, Phase::Closing { .. })) => {
                match changed.as_deref() {
                    Ok(Phase::Closing { deadline }) => break *deadline,
                    // The server went away without a deadline: nothing left to wait for.
                    _ => break Instant::now(),
                }
            }
        };
        match accepted {
            Ok((stream, _peer)) => spawn(stream),
            Err(error) => {
                tracing::warn!(listener = name, %error, "Accept failed; backing off.");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    };

    // Connections the kernel has completed but we have not accepted would be reset when
    // the socket closes, requests and all: take them in first. (A zero timeout still
    // polls `accept` once.)
    while let Ok(Ok((stream, _peer))) =
        tokio::time::timeout(Duration::ZERO, listener.accept()).await
    {
        spawn(stream);
    }
    drop(listener);
    tracing::info!(listener = name, "Stopped accepting.");
    drop(open_tx);
    tokio::select! {
        _ = open_rx.recv() => tracing::info!(listener = name, "All connections drained."),
        () = tokio::time::sleep_until(deadline) => tracing::warn!(listener = name, "Shutdown deadline passed; dropping open connections."),
    }
}
