//! The gateway's request path: one request, start to finish, as named steps.
//!
//! 1. identify: keep a safe incoming `X-Request-Id` or make one;
//! 2. route: normalise the path (see [`crate::path`]; refused with 400 when it cannot
//!    be), then pick the route from the table in force (host and path);
//! 3. answer: the app in process (its body read first, holding no permit), an upstream
//!    group (the proxy), a redirect, a probe, or a JSON 404 — under the app's or the
//!    group's own in-flight budget;
//! 4. record: metrics by route and one access log line.
//!
//! Every failure of step 3 is a [`GatewayError`] that becomes its response through
//! [`GatewayError::into_response`] (the app answers its own errors), so the service never
//! fails and hyper never sees an error from it.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use app_core::App;
use app_core::api::X_CACHE;
use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt as _, future};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use tiergate_config::HttpSettings;

use crate::access_log::{self, AccessLog, RequestFields, ResponsePart, SeenHeaders, X_REQUEST_ID};
use crate::error::{ClientError, GatewayError, LocalError};
use crate::listener::Peer;
use crate::otlp::{SampledRequest, SpanExport};
use crate::path::{self, UnsafePath};
use crate::proxy::{self, ClientSide, ProxyRequest};
use crate::response::{ResponseBody, json, probe};
use crate::router::{Handler, Route, Router};
use crate::shed::InFlight;
use crate::trace::{self, TraceContext};

/// An incoming request id longer than this is replaced: it ends up in every log line.
const MAX_REQUEST_ID_LEN: usize = 64;

/// The public listener's service. Cheap to clone: one per connection.
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The table in force; a reload swaps it, and each request keeps the one it began
    /// with.
    router: ArcSwap<Router>,
    app: App,
    /// The deadline of one request to the app (`http.request_timeout`): past it the
    /// client gets a 503 instead of waiting on a stuck dependency. Upstream groups have
    /// their own limits.
    request_timeout: Duration,
    /// One permit per app request in flight on shed-able routes (`http.max_in_flight`),
    /// taken once its body is in. A request that finds none is answered 503 at once:
    /// queueing it would only add latency to every request behind it while the load
    /// balancer could retry elsewhere. Proxied requests count against their group's.
    in_flight: InFlight,
    /// `http.max_body_bytes`: how much of a body is read before the app sees it.
    max_body_bytes: usize,
    /// `http.body_read_timeout`.
    body_read_timeout: Duration,
    /// Upgraded connections tunnelled to upstreams.
    tunnels: proxy::Tunnels,
    /// Where each request's line goes; `None` when access lines are off.
    access_log: Option<AccessLog>,
    /// Where sampled requests' spans go; `None` when span export is off.
    spans: Option<SpanExport>,
}

impl Gateway {
    /// A gateway over `router` that hosts `app`, with the limits in `http`, writing an
    /// access line per request to `access_log` when there is one, and exporting sampled
    /// requests' spans to `spans` when there is one.
    pub fn new(
        router: Router,
        app: App,
        http: &HttpSettings,
        access_log: Option<AccessLog>,
        spans: Option<SpanExport>,
    ) -> Self {
        let gateway = Self {
            inner: Arc::new(Inner {
                router: ArcSwap::from_pointee(router),
                app,
                request_timeout: http.request_timeout,
                in_flight: InFlight::new(
                    http.max_in_flight,
                    metrics::counter!("tiergate_http_shed_total"),
                ),
                max_body_bytes: usize::try_from(http.max_body_bytes).unwrap_or(usize::MAX),
                body_read_timeout: http.body_read_timeout,
                tunnels: proxy::Tunnels::default(),
                access_log,
                spans,
            }),
        };
        gateway.follow_fleet();
        gateway
    }

    /// Has every fleet state this task applies put in force on the table in force, the
    /// heartbeat report the requests in flight, and rollout reports read each group's
    /// answers. Weak references: the app outlives no gateway.
    fn follow_fleet(&self) {
        let fleet = self.inner.app.fleet();
        let weak = Arc::downgrade(&self.inner);
        fleet.set_in_flight(Arc::new(move || {
            weak.upgrade().map_or(0, |inner| {
                // The app's requests, and those at the upstreams' targets.
                let router = inner.router.load();
                let targets = router.groups().values().flat_map(|g| g.targets.iter());
                let proxied: usize = targets.map(|t| t.in_flight()).sum();
                u64::try_from(inner.in_flight.taken() + proxied).unwrap_or(u64::MAX)
            })
        }));
        let weak = Arc::downgrade(&self.inner);
        fleet.set_tallies(Arc::new(move |group| {
            let inner = weak.upgrade()?;
            let router = inner.router.load();
            router.groups().get(group).map(|g| g.tally.read())
        }));
        let weak = Arc::downgrade(&self.inner);
        fleet.set_applier(Arc::new(move |state| {
            if let Some(inner) = weak.upgrade() {
                inner.router.load().follow_fleet(state);
            }
        }));
    }

    /// The tunnels of upgraded connections this gateway opened.
    pub fn tunnels(&self) -> &proxy::Tunnels {
        &self.inner.tunnels
    }

    /// What `/readyz` says: the app is ready (the fleet state loaded with it), or no
    /// route needs it (a proxy-only table without splits must not wait for a database it
    /// never uses) and no shutdown began.
    pub fn is_ready(&self) -> bool {
        let app = &self.inner.app;
        if self.inner.router.load().needs_app() {
            app.is_ready()
        } else {
            !app.is_draining()
        }
    }

    /// The route table in force.
    pub fn router(&self) -> Arc<Router> {
        self.inner.router.load_full()
    }

    /// Puts `router` in force for every request that starts from now on, with the
    /// fleet's runtime splits: no change can be applied in between and missed.
    pub fn swap_router(&self, router: Router) {
        let router = Arc::new(router);
        self.start_for(&router);
        self.inner.app.fleet().with_applied(|state| {
            router.follow_fleet(state);
            self.inner.router.store(router);
        });
    }

    /// Starts the background work the table in force needs: its groups' health checks and
    /// name resolution, and the app's work only when a route leads to it.
    pub fn start(&self) {
        self.start_for(&self.router());
    }

    /// Starts what `router` needs: its groups' health checks and name resolution, and
    /// the app's work (database, invalidations, housekeeping, the fleet state) only when
    /// a route leads to it or a split follows the fleet — a proxy-only instance without
    /// splits never connects to a database it does not use, until a reload needs it.
    fn start_for(&self, router: &Router) {
        router.start_groups();
        if router.needs_app() {
            self.inner.app.start();
        }
    }

    /// Answers one request from `peer`. Generic over the body so benches and tests can
    /// call it without a socket.
    ///
    /// Steps 1 and 2, and the start of the app's answer, run here, before the first
    /// poll; the future keeps only what the rest needs, and owns it: hyper moves it a
    /// few times per request, and a request is bigger than all of that.
    pub fn handle<B>(
        &self,
        mut req: Request<B>,
        peer: Peer,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + use<B>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = quanta::Instant::now();
        // A guard, not a clone of the table's `Arc`: nothing needs the table after this
        // call (the route, which is all the future keeps, is an `Arc` of its own).
        let router = self.inner.router.load();
        let (route, refused) = route(&router, &mut req);
        let seen = SeenHeaders::of(req.headers());
        let request_id = request_id(seen.request_id);
        let (trace, logged) = self
            .inner
            .observe(&req, &seen, peer, &request_id, &route, &router);
        // Only the app answers TRACE (its own 405): nothing is echoed.
        let traced_here = req.method() == Method::TRACE;
        let to = |group, req: Request<B>| ProxyRequest {
            client: client_side(&req, peer),
            req,
            group,
            rewrite: route.rewrite(),
            upgrades: route.upgrades(),
            trusted_hops: router.proxy.trusted_hops,
            forwarded_header: router.proxy.forwarded_header,
            request_id: &request_id,
            trace,
            tunnels: &self.inner.tunnels,
        };
        let answer = match (refused, &route.handler) {
            (Some(why), _) => Answer::Refused(ClientError::UnsafePath(why)),
            // Nearly every read: no body to wait for.
            (None, Handler::App) if req.body().is_end_stream() => {
                Answer::App(traced(&logged, self.inner.app.handle(req)))
            }
            (None, Handler::App) => Answer::AppAfterBody(Box::new(req)),
            (None, Handler::Upstream(group)) if !traced_here => {
                Answer::proxied(group, proxy::prepare(to(group, req)), Picked::ByRoute)
            }
            (None, Handler::Split(split)) if !traced_here => {
                let (group, set_cookie) = split.pick(req.headers());
                let picked = Picked::BySplit { set_cookie };
                Answer::proxied(group, proxy::prepare(to(group, req)), picked)
            }
            // Boxed: a request is most of what the future would hold.
            (None, _) => Answer::Here(Box::new(req)),
        };
        let gateway = self.clone();
        async move {
            let inner = &gateway.inner;
            let mut upstream: Option<Upstream> = None;
            // Each arm ends in a response; an error becomes one through
            // `GatewayError::into_response` in its arm, so the app's answer, the hot path,
            // is never wrapped in a `Result` and copied out of it.
            let mut rsp = match answer {
                Answer::App(app) => inner.app_answer(&route, app, started).await,
                // Boxed: the body's read is bigger than all the rest of this future, which
                // hyper moves per request, and reads never wait for a body.
                Answer::AppAfterBody(req) => {
                    Box::pin(inner.app_after_body(&route, &logged, *req, started)).await
                }
                Answer::Refused(error) => GatewayError::from(error).into_response(),
                Answer::Proxied {
                    group,
                    request,
                    picked: Picked::ByRoute,
                } => {
                    let answer = proxied(&group, request, None);
                    let (rsp, target) = Box::pin(in_scope(&logged, answer)).await;
                    upstream = Some((group, target));
                    rsp
                }
                Answer::Proxied {
                    group,
                    request,
                    picked: Picked::BySplit { set_cookie },
                } => {
                    let answer = tallied(&group, proxied(&group, request, set_cookie));
                    let (rsp, target) = Box::pin(in_scope(&logged, answer)).await;
                    upstream = Some((group, target));
                    rsp
                }
                Answer::Here(req) => {
                    match &route.handler {
                        _ if traced_here => {
                            GatewayError::from(ClientError::TraceRefused).into_response()
                        }
                        Handler::Redirect(base) => {
                            redirect(base, &req).unwrap_or_else(GatewayError::into_response)
                        }
                        Handler::Livez => probe(true),
                        Handler::Readyz => probe(gateway.is_ready()),
                        // `Answer::App` took the app's requests, `Answer::Proxied` the
                        // upstreams'.
                        Handler::App
                        | Handler::NotFound
                        | Handler::Upstream(_)
                        | Handler::Split(_) => {
                            GatewayError::from(ClientError::NoRoute).into_response()
                        }
                    }
                }
            };

            let elapsed = started.elapsed();
            inner.record(&route, &rsp, logged, upstream.as_ref(), elapsed);
            rsp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
            rsp
        }
    }
}

/// The app's `answer`, run where the spans below the request's are recorded when the
/// request is sampled for export (boxed again; the others are left as they are).
fn traced(logged: &Logged, answer: app_core::api::Answer) -> app_core::api::Answer {
    match &logged.sampled {
        Some(sampled) => Box::pin(sampled.recorder.scope(answer)),
        None => answer,
    }
}

/// `answer` (a proxied one), run where its attempts' spans are recorded when the
/// request is sampled for export. Not an `async fn`: one would hold `answer` twice (as
/// its argument and as what it awaits), and the proxied answer is boxed, so every byte
/// of it is copied once per request.
fn in_scope<F: Future>(logged: &Logged, answer: F) -> impl Future<Output = F::Output> + use<F> {
    match &logged.sampled {
        Some(sampled) => future::Either::Left(sampled.recorder.scope(answer)),
        None => future::Either::Right(answer),
    }
}

/// Counts a split's answer against the group that gave it, for a rollout judging the
/// group (see `app_core::rollout`). Not an `async fn`, as [`in_scope`].
fn tallied<T>(
    group: &proxy::Group,
    answer: impl Future<Output = (Response<ResponseBody>, T)>,
) -> impl Future<Output = (Response<ResponseBody>, T)> {
    let sent = quanta::Instant::now();
    answer.map(move |(rsp, target)| {
        group
            .tally
            .observe(rsp.status().is_server_error(), sent.elapsed());
        (rsp, target)
    })
}

/// Step 2: the request's path normalised (in place), then its route. A path that
/// cannot be normalised safely gets the route of unmatched requests, and the refusal.
fn route<B>(router: &Router, req: &mut Request<B>) -> (Arc<Route>, Option<UnsafePath>) {
    // Routed, rewritten and sent up as one path: the normalised one.
    match path::normalise_uri(req.uri()) {
        Ok(normal) => {
            if let Some(normal) = normal {
                *req.uri_mut() = normal;
            }
            // The host is looked at only when some route matches on it.
            let host = router
                .matches_hosts()
                .then(|| request_host(req).map(str::to_ascii_lowercase))
                .flatten();
            let route = router.route(host.as_deref(), req.uri().path());
            (route.clone(), None)
        }
        Err(why) => (router.unmatched().clone(), Some(why)),
    }
}

/// The group a proxied request went to, and the target that answered (none when none
/// did).
type Upstream = (Arc<proxy::Group>, Option<usize>);

/// What a request's access line and span need after the request has moved on into the
/// app or the proxy; the span's part boxed (rarely there, and big).
#[derive(Debug, Default)]
struct Logged {
    fields: Option<RequestFields>,
    sampled: Option<Box<SampledRequest>>,
}

impl Inner {
    /// The request's trace (for the access line, the spans and the upstreams: none when
    /// none of them is there), and what its access line and span need after the request
    /// has moved on (nothing when both are off).
    fn observe<B: Body>(
        &self,
        req: &Request<B>,
        seen: &SeenHeaders<'_>,
        peer: Peer,
        request_id: &HeaderValue,
        route: &Route,
        router: &Router,
    ) -> (Option<TraceContext>, Logged) {
        let logging = self.access_log.is_some() || self.spans.is_some();
        let start = router.proxy.start_traces;
        if !logging {
            let trace = (!matches!(route.handler, Handler::App))
                .then(|| TraceContext::from_traceparent(seen.traceparent, start))
                .flatten();
            return (trace, Logged::default());
        }
        let mut trace = TraceContext::from_traceparent(seen.traceparent, start);
        let hops = router.proxy.trusted_hops;
        let client = access_log::client_address(req.headers(), peer.addr.ip(), hops);
        let sampled = match (&self.spans, &mut trace) {
            (Some(spans), Some(trace)) if spans.samples(trace) => {
                trace.mark_sampled();
                let sampled = SampledRequest::of(req, client, request_id, *trace);
                Some(Box::new(sampled))
            }
            _ => None,
        };
        let fields = self
            .access_log
            .is_some()
            .then(|| RequestFields::of(req, seen, client, request_id, trace.as_ref()));
        (trace, Logged { fields, sampled })
    }

    /// Step 4: the request's metrics, and its access line and span when they are on.
    fn record(
        &self,
        route: &Route,
        rsp: &Response<ResponseBody>,
        logged: Logged,
        upstream: Option<&Upstream>,
        elapsed: Duration,
    ) {
        route.metrics.observe(rsp.status(), elapsed.as_secs_f64());
        if logged.fields.is_none() && logged.sampled.is_none() {
            return;
        }
        let upstream = upstream.map(|(group, target)| {
            let target = target.map(|i| group.targets[i].address.as_str());
            (group.name.as_str(), target)
        });
        let answered = ResponsePart {
            route: &route.name,
            status: rsp.status().as_u16(),
            cache: rsp.headers().get(&X_CACHE),
            body_size: rsp.body().size_hint().exact(),
            upstream,
            duration: elapsed,
        };
        if let (Some(log), Some(fields)) = (&self.access_log, &logged.fields) {
            log.log(fields, &answered);
        }
        if let (Some(spans), Some(sampled)) = (&self.spans, logged.sampled) {
            spans.request_done(*sampled, &answered);
        }
    }

    /// The app's answer to a request with a body: the body first, under its own deadline
    /// and holding no permit (shedding counts work, not waiting for a client's bytes).
    async fn app_after_body<B>(
        &self,
        route: &Route,
        logged: &Logged,
        req: Request<B>,
        started: quanta::Instant,
    ) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes>,
    {
        let received = receive_body(req, self.max_body_bytes, self.body_read_timeout).await;
        // The request goes into the app's answer before that is awaited, so the future
        // does not keep it across the wait.
        match received.map(|req| traced(logged, self.app.handle(req))) {
            Ok(app) => self.app_answer(route, app, started).await,
            Err(refused) => GatewayError::from(refused).into_response(),
        }
    }

    /// The app's answer under the app's budget (`http.max_in_flight`, on the routes that
    /// count) and `http.request_timeout`.
    async fn app_answer(
        &self,
        route: &Route,
        mut app: app_core::api::Answer,
        started: quanta::Instant,
    ) -> Response<ResponseBody> {
        // Held until the response head is ready, so it bounds the work in progress.
        let _permit = match route.shed.then(|| self.in_flight.try_acquire()) {
            Some(None) => return GatewayError::from(LocalError::Overloaded).into_response(),
            Some(permit) => permit,
            None => None,
        };
        // Polled once before any deadline is set: an L1 hit is ready at once and never
        // needs the timer. (An `if let`, so its answer is not kept in the future across
        // the wait below.)
        let rsp = 'answered: {
            if let Poll::Ready(rsp) =
                std::future::poll_fn(|cx| Poll::Ready(app.as_mut().poll(cx))).await
            {
                break 'answered Ok(rsp);
            }
            // Boxed: the timer would make every request's future bigger, and only a
            // request that waits needs it.
            let left = self.request_timeout.saturating_sub(started.elapsed());
            Box::pin(tokio::time::timeout(left, app)).await
        };
        match rsp {
            Ok(rsp) => rsp.map(Either::Left),
            Err(_) => GatewayError::from(LocalError::AppDeadline {
                limit: self.request_timeout,
            })
            .into_response(),
        }
    }
}

/// Step 3 as it stands when `handle` returns.
enum Answer<B> {
    /// The app's answer, started: the request went into it.
    App(app_core::api::Answer),
    /// For the app, once its body is in.
    AppAfterBody(Box<Request<B>>),
    /// For an upstream group, prepared as it came in (see `proxy::prepare`).
    Proxied {
        group: Arc<proxy::Group>,
        request: Box<proxy::Prepared>,
        picked: Picked,
    },
    /// Answered inside the future, from the request.
    Here(Box<Request<B>>),
    /// Refused before it was routed (its path cannot be normalised safely) or forwarded
    /// (the route cannot rewrite its path).
    Refused(ClientError),
}

/// What chose a proxied request's group.
enum Picked {
    /// The route names the group.
    ByRoute,
    /// A split picked it: its answers count for the split's rollout, and the client may
    /// be given the split's cookie.
    BySplit { set_cookie: Option<HeaderValue> },
}

impl<B> Answer<B> {
    /// The answer of `group`, `picked` so, to a `prepared` request.
    fn proxied(
        group: &Arc<proxy::Group>,
        prepared: Result<Box<proxy::Prepared>, ClientError>,
        picked: Picked,
    ) -> Self {
        match prepared {
            Ok(request) => Self::Proxied {
                group: group.clone(),
                request,
                picked,
            },
            Err(refused) => Self::Refused(refused),
        }
    }
}

/// Reads the body of a request for the app, whole, before the request takes its place
/// under `http.max_in_flight`: at most one byte more than `http.max_body_bytes` (the app
/// then answers 413 in its own words), within `http.body_read_timeout`. A declared
/// length over the limit is not read at all: the app refuses it by its header.
///
/// # Errors
/// The body did not arrive in time, or broke off.
async fn receive_body<B>(
    req: Request<B>,
    max: usize,
    limit: Duration,
) -> Result<Request<Full<Bytes>>, ClientError>
where
    B: Body<Data = Bytes>,
{
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    if declared.is_some_and(|len| len > max as u64) {
        return Ok(Request::from_parts(parts, Full::default()));
    }
    let read = async move {
        let mut body = std::pin::pin!(body);
        let mut bytes = BytesMut::new();
        while bytes.len() <= max {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        bytes.extend_from_slice(&data);
                    }
                }
                Some(Err(_)) => return Err(ClientError::UnreadableBody),
            }
        }
        Ok(bytes.freeze())
    };
    let bytes = tokio::time::timeout(limit, read)
        .await
        .map_err(|_| ClientError::BodyTimeout { limit })??;
    Ok(Request::from_parts(parts, Full::new(bytes)))
}

/// Forwards a request to its upstream group within the group's `max_in_flight`, and
/// answers with what came back, or with the error's response, and says which of the
/// group's targets answered; a split's sticky cookie (when the client is to be pinned
/// to the group it went to) goes with every answer, an error's too.
///
/// The permit is taken and the request prepared before the future is made: it then
/// holds the prepared request only, not the request as well.
fn proxied(
    group: &proxy::Group,
    request: Box<proxy::Prepared>,
    set_cookie: Option<HeaderValue>,
) -> impl Future<Output = (Response<ResponseBody>, Option<usize>)> + use<'_> {
    // Held until the response head is ready, as the app's: the group's own budget, so a
    // slow upstream never takes the app's places, nor another group's.
    let permit = group.in_flight.try_acquire();
    let forwarding = permit.as_ref().map(|_| proxy::forward(group, request));
    async move {
        let (mut rsp, target) = match forwarding {
            None => (
                GatewayError::from(LocalError::GroupOverloaded {
                    group: group.name.clone(),
                })
                .into_response(),
                None,
            ),
            Some(forwarding) => match forwarding.await {
                Ok((rsp, target)) => (rsp, Some(target)),
                Err(error) => (error.into_response(), None),
            },
        };
        drop(permit);
        if let Some(cookie) = set_cookie {
            rsp.headers_mut().append(header::SET_COOKIE, cookie);
        }
        (rsp, target)
    }
}

/// The client's side of a proxied request: its connection, and the authority it named.
fn client_side<B>(req: &Request<B>, peer: Peer) -> ClientSide {
    ClientSide {
        peer: peer.addr,
        tls: peer.tls,
        local_port: peer.local_port,
        host: proxy::client_authority(req.uri(), req.headers()),
    }
}

/// The authority the request names, port included: the URI's (HTTP/2, absolute form)
/// or the `Host` header.
fn request_authority<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(authority) => Some(authority.as_str()),
        None => req.headers().get(header::HOST)?.to_str().ok(),
    }
}

/// The host the request names, without port.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    let raw = request_authority(req)?;
    let host = match raw.rsplit_once(':') {
        // `[::1]:8080` or `name:8080`; a bare IPv6 literal has no port to strip.
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') => {
            host
        }
        _ => raw,
    };
    (!host.is_empty()).then_some(host)
}

/// A 308 to `base` followed by the request's path and query.
///
/// # Errors
/// The result is not a valid `Location`.
fn redirect<B>(base: &str, req: &Request<B>) -> Result<Response<ResponseBody>, GatewayError> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location =
        HeaderValue::try_from(format!("{base}{path}")).map_err(|_| ClientError::CannotRedirect)?;
    Ok(permanent_redirect(
        location,
        br#"{"error":"moved","message":"this resource has moved"}"#,
    ))
}

/// A 308 to `location`, with a JSON body that says why for a client that does not
/// follow it.
fn permanent_redirect(location: HeaderValue, body: &'static [u8]) -> Response<ResponseBody> {
    let mut rsp = json(StatusCode::PERMANENT_REDIRECT, Bytes::from_static(body));
    rsp.headers_mut().insert(header::LOCATION, location);
    rsp
}

/// The probe paths a load balancer checks over plain HTTP: never redirected.
const PROBE_PATHS: [&str; 3] = ["/health", "/livez", "/readyz"];

/// A 308 to the same URL over HTTPS on `https_port`, for the plain listener when
/// `listen.redirect_to_https` is set; `None` for the probe paths, which are served.
/// 308 (not 301) keeps the method and body of a POST.
///
/// # Errors
/// The request names no host, or the URL is not a valid `Location`.
pub fn redirect_to_https<B>(
    req: &Request<B>,
    https_port: u16,
) -> Option<Result<Response<ResponseBody>, GatewayError>> {
    if PROBE_PATHS.contains(&req.uri().path()) {
        return None;
    }
    let authority = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            let host = req.headers().get(header::HOST)?.to_str().ok()?;
            let uri: http::uri::Authority = host.parse().ok()?;
            Some(uri.host().to_owned())
        });
    let Some(host) = authority else {
        return Some(Err(ClientError::NoHostToRedirect.into()));
    };
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = match HeaderValue::try_from(format!("https://{host}{port}{path}")) {
        Ok(location) => location,
        Err(_) => return Some(Err(ClientError::CannotRedirect.into())),
    };
    Some(Ok(permanent_redirect(
        location,
        br#"{"error":"https_required","message":"use HTTPS"}"#,
    )))
}

/// The incoming id if it is short and of safe characters (it is logged and echoed),
/// else a new random one.
fn request_id(incoming: Option<&HeaderValue>) -> HeaderValue {
    let safe = |v: &&HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty()
            && b.len() <= MAX_REQUEST_ID_LEN
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    };
    // Owned by a shared buffer from the start: the proxy sends a clone upstream, and a
    // clone of a plain copy would allocate again to share it.
    let owned = match incoming.filter(safe) {
        // A copy, not a clone: a clone shares the connection's read buffer until the
        // answer is written, and hyper, reading ahead meanwhile, would replace that
        // buffer (see `access_log::RequestFields`).
        Some(id) => Bytes::from_owner(RequestId::copy(id.as_bytes())),
        None => Bytes::from_owner(trace::hex_u128(fastrand::u128(..))),
    };
    HeaderValue::from_maybe_shared(owned).unwrap_or(HeaderValue::from_static("unknown"))
}

/// A request id a client sent, copied out of its request.
struct RequestId {
    bytes: [u8; MAX_REQUEST_ID_LEN],
    len: usize,
}

impl RequestId {
    /// `id`, which `request_id` has checked is no longer than `MAX_REQUEST_ID_LEN`.
    fn copy(id: &[u8]) -> Self {
        let len = id.len().min(MAX_REQUEST_ID_LEN);
        let mut bytes = [0; MAX_REQUEST_ID_LEN];
        bytes[..len].copy_from_slice(&id[..len]);
        Self { bytes, len }
    }
}

impl AsRef<[u8]> for RequestId {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_go_to_the_https_port_and_spare_the_probes() {
        let req = Request::get("/items/1?x=2")
            .header(header::HOST, "api.example.com:8080")
            .body(())
            .unwrap();
        let rsp = redirect_to_https(&req, 8443).unwrap().unwrap();
        assert_eq!(rsp.status(), 308);
        assert_eq!(
            rsp.headers()[header::LOCATION],
            "https://api.example.com:8443/items/1?x=2"
        );
        let rsp = redirect_to_https(&req, 443).unwrap().unwrap();
        assert_eq!(
            rsp.headers()[header::LOCATION],
            "https://api.example.com/items/1?x=2"
        );
        let probe = Request::get("/health").body(()).unwrap();
        assert!(redirect_to_https(&probe, 443).is_none());
        let no_host = Request::get("/items").body(()).unwrap();
        let refused = redirect_to_https(&no_host, 443).unwrap().unwrap_err();
        assert_eq!(refused.into_response().status(), 400);
    }

    #[test]
    fn safe_request_ids_are_kept_and_others_replaced() {
        let keep = HeaderValue::from_static("abc-123_x.y");
        assert_eq!(request_id(Some(&keep)), keep);
        for bad in ["", "has space", "semi;colon", &"a".repeat(65)] {
            let v = HeaderValue::from_str(bad).unwrap();
            let id = request_id(Some(&v));
            assert_ne!(id, v);
            assert_eq!(id.len(), 32);
        }
    }
}
