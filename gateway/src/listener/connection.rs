//! One accepted connection: the TLS handshake (when the listener has TLS), then hyper
//! over the guarded IO, driven to its end while it listens for the drain.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt as _;
use futures_util::future::{self, Either};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::checks::{check_request, without_body};
use super::drain::{Drain, Phase};
use super::guarded::Guarded;
use super::state::ConnState;
use super::{Limits, Peer, Transport};
use crate::error::{ClientError, GatewayError};
use crate::response::ResponseBody;
use crate::timer;

/// When the listener closes, how long a connection that has not sent a request yet gets
/// to send one (a client that connected just before the close) before it is closed.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// One accepted connection, before its protocol is known.
pub(super) struct Connection<H> {
    pub(super) name: &'static str,
    pub(super) peer: Peer,
    pub(super) builder: Arc<auto::Builder<TokioExecutor>>,
    pub(super) limits: Limits,
    pub(super) handler: H,
    pub(super) drain: Drain,
}

impl<H, Fut> Connection<H>
where
    H: Fn(Request<Incoming>, Peer) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    pub(super) async fn run(self, stream: TcpStream, transport: Transport) {
        match transport {
            Transport::Plain => self.serve(stream, None).await,
            Transport::Tls {
                acceptor,
                handshake_timeout,
            } => {
                let name = self.name;
                let handshake = tokio::time::timeout(handshake_timeout, acceptor.accept(stream));
                let (result, version) = match handshake.await {
                    Ok(Ok(tls)) => {
                        let session = tls.get_ref().1;
                        let version = match session.protocol_version() {
                            Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
                            Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
                            _ => "other",
                        };
                        let h2 = session.alpn_protocol() == Some(b"h2");
                        metrics::counter!("tiergate_tls_handshakes_total", "listener" => name, "result" => "ok", "version" => version).increment(1);
                        self.serve(tls, Some(h2)).await;
                        return;
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(listener = name, %error, "TLS handshake failed.");
                        ("error", "none")
                    }
                    Err(_) => {
                        tracing::debug!(listener = name, "TLS handshake timed out.");
                        ("timeout", "none")
                    }
                };
                metrics::counter!("tiergate_tls_handshakes_total", "listener" => name, "result" => result, "version" => version).increment(1);
                metrics::counter!("tiergate_connections_rejected_total", "listener" => name, "reason" => "tls_handshake").increment(1);
            }
        }
    }

    /// Serves HTTP on `io` (`h2` is what ALPN said, when there was ALPN) and drives the
    /// connection to its end, asking it to finish when the drain says so.
    async fn serve<S>(self, io: S, h2: Option<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let name = self.name;
        let state = Arc::new(ConnState {
            draining: self.drain.draining.clone(),
            ..ConnState::default()
        });
        let io = Guarded::new(io, state.clone(), &self.limits, h2, name);
        let peer = self.peer;
        let service = {
            let handler = self.handler;
            let state = state.clone();
            service_fn(move |req| answer(&handler, &state, peer, req))
        };
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let mut phase = self.drain.phase.clone();
        let draining = &self.drain.draining;
        let mut connection = pin!(connection);
        let mut asked = false;
        let mut finish_at: Option<Instant> = None;
        let mut call_back = CallBack::new(self.limits.idle_timeout);
        loop {
            let signal = {
                let grace = async {
                    match finish_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                // Unconstrained: they are polled to register the waker once, and a poll
                // refused for a spent scheduling budget would register nothing, leaving
                // the connection deaf to the drain.
                let mut signals = pin!(tokio::task::unconstrained(async {
                    tokio::select! {
                        biased;
                        () = state.goaway.notified() => None,
                        () = grace => None,
                        changed = phase.changed(), if finish_at.is_none() => Some(changed),
                    }
                }));
                // The waker the signals were last polled with.
                let mut registered: Option<std::task::Waker> = None;
                std::future::poll_fn(|cx| {
                    // The connection first, every time: it is what woke the task nearly
                    // always.
                    if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                        return Poll::Ready(Err(result));
                    }
                    call_back.after_poll(&state, cx);
                    if asked {
                        return Poll::Pending;
                    }
                    // No signal fires before a shutdown begins (`draining`, which the
                    // control also raises when it is dropped), so until then they are
                    // polled once to register the task's waker, not on every wake-up:
                    // each poll takes the locks of two `Notify`s.
                    let known = registered.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
                    if known && !draining.load(Ordering::Relaxed) {
                        return Poll::Pending;
                    }
                    if !known {
                        registered = Some(cx.waker().clone());
                    }
                    signals.as_mut().poll(cx).map(Ok)
                })
                .await
            };
            match signal {
                Err(result) => {
                    if let Err(error) = result {
                        tracing::debug!(listener = name, error = %error, "Connection ended with an error.");
                    }
                    return;
                }
                // GOAWAY asked for, or the first request's grace is over.
                Ok(None) => {}
                Ok(Some(changed)) => {
                    let now = *phase.borrow_and_update();
                    let h2 = state.spoke_h2.load(Ordering::Relaxed);
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
            // HTTP/2: GOAWAY, in-flight streams finish. HTTP/1.1: close when idle, else
            // after the response in flight.
            connection.as_mut().graceful_shutdown();
            asked = true;
        }
    }
}

/// The call back of an HTTP/1.1 connection whose request ended while hyper's read waited
/// without a clock (see `ConnState::unclocked`): the task is called back, hyper reads
/// again and the clock starts, before the idle timeout could run out.
struct CallBack {
    timer: Pin<Box<Sleep>>,
    /// The timer was polled since it was last reset: it will wake the task.
    set: bool,
    idle_timeout: Duration,
}

impl CallBack {
    fn new(idle_timeout: Duration) -> Self {
        Self {
            timer: Box::pin(tokio::time::sleep_until(Instant::now() + idle_timeout)),
            set: false,
            idle_timeout,
        }
    }

    /// After hyper's poll of the connection: counts the end of the requests and sets the
    /// call back. One set before and not yet come comes sooner still; else one is set
    /// (the deadline is ahead: the poll only registers it).
    fn after_poll(&mut self, state: &ConnState, cx: &mut Context<'_>) {
        if state.in_flight.load(Ordering::SeqCst) == 0
            && !state.spoke_h2.load(Ordering::Relaxed)
            && state.unclocked.swap(false, Ordering::SeqCst)
            && (!self.set || self.timer.is_elapsed())
        {
            let deadline = Instant::now() + self.idle_timeout;
            let _ = timer::poll_deadline(&mut self.timer, deadline, cx);
            self.set = true;
        }
    }
}

/// Answers one request with `handler`: a request whose framing is refused (see
/// `HeadScan`) or that no handler may see (see [`check_request`]) gets its error instead;
/// a HEAD gets its answer without the body; and while the server drains, the answer tells
/// the client to go elsewhere (`Connection: close`, or GOAWAY once the HTTP/2 stream
/// ends).
fn answer<H, Fut>(
    handler: &H,
    state: &Arc<ConnState>,
    peer: Peer,
    req: Request<Incoming>,
) -> impl Future<Output = Result<Response<ResponseBody>, Infallible>> + Send + use<H, Fut>
where
    H: Fn(Request<Incoming>, Peer) -> Fut,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let version = req.version();
    state.used.store(true, Ordering::Relaxed);
    if version == Version::HTTP_2 {
        state.spoke_h2.store(true, Ordering::Relaxed);
    }
    let (request, fault) = state.request_started();
    let head = req.method() == Method::HEAD;
    let checked = match fault {
        Some(fault) => Err(ClientError::from(fault)),
        None => check_request(&req),
    };
    let response = match checked {
        Ok(()) => Either::Left(handler(req, peer)),
        // The connection closes after it.
        Err(refused) => Either::Right(future::ready(GatewayError::from(refused).into_response())),
    };
    // A combinator, not an `async` block: one would hold the handler's future twice (as
    // what it captured and as what it awaits), and hyper moves this future per request.
    response.map(move |rsp| Ok(finish(rsp, head, version, &request.0)))
}

/// What every answer gets on its way out, while its request is still in flight.
fn finish(
    mut rsp: Response<ResponseBody>,
    head: bool,
    version: Version,
    state: &ConnState,
) -> Response<ResponseBody> {
    if head {
        rsp = without_body(rsp);
    }
    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Before hyper writes the `101`, so the tunnel's first bytes find it set.
        state.upgraded.store(true, Ordering::Release);
        state.head_started.store(false, Ordering::Release);
    }
    if state.draining.load(Ordering::Relaxed) {
        if version == Version::HTTP_2 {
            state.goaway.notify_one();
        } else {
            // hyper closes the connection after a response that says so.
            rsp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    rsp
}
