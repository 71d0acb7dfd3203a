//! Forwarding one request to an upstream group, as named steps:
//!
//! 1. [`prepare`], as the request comes in: strip hop-by-hop headers, keep or replace
//!    `Host`, rewrite the path, settle the fields this proxy sets (`X-Forwarded-*`,
//!    `Forwarded`, the request id), write the HTTP/1.1 head's common part, hold the body
//!    where a retry can take it back;
//! 2. [`Prepared::set_per_attempt`]: pick a target, add what its attempt sets (its
//!    `Host`, the `traceparent`), send the head ([`RequestHead`]: the client's fields
//!    are never copied, a retry sends them again) through the group's pool and wait for
//!    the response head within the group's limits;
//! 3. [`client_failure`]: a failed attempt that is the client's doing (its body broke,
//!    it went away, or it stopped sending) ends the request as a [`ClientError`],
//!    counted against no target; else [`classify`]: it becomes an [`UpstreamError`],
//!    counted against the target when it is the target's fault; [`Prepared::retryable`]
//!    says whether another attempt may follow: a failed connect, or a target whose
//!    connections are all busy, is retried on another target; a broken exchange only
//!    for an idempotent request without a body; a timeout never; every retry is paid
//!    from the group's retry budget;
//! 4. [`answer`]: an answer (any status) is never retried: its response streams down (or
//!    an upgrade is tunnelled after the upstream's real `101` to an upgrade the route
//!    allows; a `101` nobody asked for is the target's failure); a failure is returned
//!    as the [`GatewayError`] naming the side that failed and the limit that was hit.

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use app_core::spans::{self, ChildSpan};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tiergate_config::{HostHeader, UpstreamProtocol};
use tokio::time::Instant;

use super::body::{BodySlot, BoxError, Received, UploadState, UpstreamBody};
use super::group::Group;
use super::h1::RequestStart;
use super::headers::{self, ClientSide, Outgoing, ParsedHead, RequestHead, SetField};
use super::pool::{HeadClock, Lease, SendError};
use super::target::{InFlight, Target};
use super::tunnels::Tunnels;
use crate::error::{ClientError, GatewayError, Timeout, UpstreamError};
use crate::response::ResponseBody;
use crate::trace::{TRACEPARENT, TRACESTATE, TraceContext};

static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The most fields an attempt sets: `X-Forwarded-For/Proto/Host/Port`, `Forwarded`,
/// `X-Request-Id`, `tracestate`, `traceparent`, `Host`.
const SET_FIELDS: usize = 9;

/// One request on its way to an upstream group: the client's request, the group the
/// route chose, and what the route and the client's connection say about it.
#[derive(Debug)]
pub(crate) struct ProxyRequest<'a, B> {
    /// The request as the client sent it.
    pub(crate) req: Request<B>,
    /// Where it goes.
    pub(crate) group: &'a Arc<Group>,
    /// The client's connection.
    pub(crate) client: ClientSide,
    /// The path prefix the route matched, and what replaces it upstream.
    pub(crate) rewrite: Option<(&'a str, &'a str)>,
    /// The protocols the route lets a client switch to (`Upgrade`).
    pub(crate) upgrades: &'a [String],
    /// `proxy.trusted_hops`.
    pub(crate) trusted_hops: u32,
    /// `proxy.forwarded_header`.
    pub(crate) forwarded_header: bool,
    /// The request id the gateway settled on.
    pub(crate) request_id: &'a HeaderValue,
    /// The trace the request is part of, if any: each attempt carries it.
    pub(crate) trace: Option<TraceContext>,
    /// Where an upgraded connection's tunnel runs.
    pub(crate) tunnels: &'a Tunnels,
}

/// Forwards a `request` prepared for `group` (by [`prepare`]) and answers with what the
/// group said, and the index of the target that said it.
///
/// # Errors
/// No target gave an answer ([`UpstreamError`]).
pub(crate) fn forward(
    group: &Group,
    mut request: Box<Prepared>,
) -> impl Future<Output = Result<(Response<ResponseBody>, usize), GatewayError>> + use<'_> {
    let deadline = Instant::now() + group.settings.request_timeout;
    async move { attempts(group, &mut request, deadline).await }
}

/// Steps 2 to 4: attempts on the group's targets until one answers, a failure may not
/// be retried, or the attempts or the retry budget run out.
async fn attempts(
    group: &Group,
    request: &mut Prepared,
    deadline: Instant,
) -> Result<(Response<ResponseBody>, usize), GatewayError> {
    group.metrics.requests.increment(1);
    group.budget.deposit();
    let mut tried: Vec<usize> = Vec::new();
    loop {
        let Some(index) = group.pick(&tried) else {
            group.metrics.no_target.increment(1);
            return Err(UpstreamError::NoHealthyTarget {
                group: group.name.clone(),
            }
            .into());
        };
        let target = &group.targets[index];
        let in_flight = target.start_request();
        let sent = Instant::now();
        // A traced request's attempt is a span of its own, the upstream's parent.
        let span_started = spans::start();
        let span_id = span_started.map(|_| spans::new_span_id());
        request.set_per_attempt(target, span_id);
        let mut clock = HeadClock::new(
            deadline,
            group.settings.response_timeout,
            request.body.upload(),
        );
        // Boxed on its own: inline, its state made the boxed proxied future pass 1 KiB,
        // past which the allocator takes its slow path.
        let head = request.head();
        let sent_on = group.pool();
        let result = Box::pin(sent_on.send(index, &head, request.body.attempt(), &mut clock)).await;
        spans::record(span_started, |at| {
            let status = result.as_ref().ok().map(|(rsp, _)| rsp.status());
            attempt_span(at, span_id, &request.method, target, tried.len(), status)
        });
        let failure = match result {
            Ok((rsp, lease)) => {
                let rsp = answer(group, request, rsp, lease, in_flight, sent, deadline)?;
                return Ok((rsp, index));
            }
            Err(err) => {
                if let Some(failure) = client_failure(group, &request.body, &err) {
                    return Err(failure.into());
                }
                classify(group, target, &err, clock.limit())
            }
        };
        drop(in_flight);
        if request.retryable(&failure, group, index, &tried)
            && tried.len() + 1 < request.max_attempts
            && Instant::now() < deadline
        {
            if group.budget.withdraw() {
                group.metrics.retries.increment(1);
                tried.push(index);
                continue;
            }
            group.metrics.retries_refused.increment(1);
        }
        return Err(failure.into());
    }
}

/// The span of one attempt on `target`, after OpenTelemetry's HTTP client conventions;
/// `status` is the answer's, none when the attempt got none.
fn attempt_span(
    at: SystemTime,
    span_id: Option<u64>,
    method: &Method,
    target: &Target,
    resends: usize,
    status: Option<StatusCode>,
) -> ChildSpan {
    let mut span = ChildSpan::client(method.as_str().to_owned(), at)
        .with("http.request.method", method.as_str().to_owned())
        .with("server.address", target.address.clone());
    if let Some(id) = span_id {
        span.span_id = id;
    }
    if resends > 0 {
        span = span.with(
            "http.request.resend_count",
            i64::try_from(resends).unwrap_or(i64::MAX),
        );
    }
    match status {
        Some(status) => span
            .with("http.response.status_code", i64::from(status.as_u16()))
            .failed(status.is_server_error()),
        None => span.with("error.type", "_OTHER").failed(true),
    }
}

/// A request made ready for its group, from which every attempt is built.
#[derive(Debug)]
pub(crate) struct Prepared {
    method: Method,
    /// What every attempt sends before its own fields (see [`RequestHead`]): no attempt
    /// copies or changes it.
    outgoing: Outgoing,
    /// The HTTP version spoken to the group.
    version: Version,
    /// What this proxy sets that `outgoing` does not carry already: when it is parsed,
    /// the fields of the request (forwarding, request id), `per_request` of them; then,
    /// always, the current attempt's (the target's `Host`, the `traceparent`).
    set: Vec<SetField>,
    per_request: usize,
    via: &'static HeaderValue,
    /// `false` when the client named no usable host: each attempt sends its target's.
    client_host: bool,
    body: BodySlot,
    idempotent: bool,
    /// The client connection's upgrade, when the request asks for one the group can
    /// carry, and where its tunnel will run.
    upgrade: Option<(OnUpgrade, Tunnels)>,
    max_attempts: usize,
    trace: Option<TraceContext>,
}

/// Step 1, when the request comes in: the request as every attempt sends it, less what
/// each attempt adds. Made at once, before the request waits for anything: nothing of
/// the client's head is kept (see [`RequestStart`]), so hyper's read buffer is this
/// connection's alone again before hyper reads ahead on it.
///
/// # Errors
/// The route's rewrite makes an invalid path of the request's.
pub(crate) fn prepare<B>(to: ProxyRequest<'_, B>) -> Result<Box<Prepared>, ClientError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let ProxyRequest {
        mut req,
        group,
        client,
        rewrite,
        upgrades,
        trusted_hops,
        forwarded_header,
        request_id,
        trace,
        tunnels,
    } = to;
    let path = upstream_path(req.uri(), rewrite).map_err(|()| ClientError::UnrewritablePath)?;
    // Only HTTP/1.1 connections to the target can be handed over to a tunnel.
    let http1 = group.settings.protocol == UpstreamProtocol::Http1;
    let upgrade_to = http1
        .then(|| headers::allowed_upgrade(req.headers(), upgrades))
        .flatten();
    let upgrade = upgrade_to
        .is_some()
        .then(|| (hyper::upgrade::on(&mut req), tunnels.clone()));
    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade_to);
    let client_host = match group.settings.host_header {
        HostHeader::Preserve => preserve_host(&mut parts, client.host.as_ref()),
        HostHeader::Target => false,
    };
    let mut set = Vec::with_capacity(SET_FIELDS);
    headers::forwarding(
        &parts.headers,
        &client,
        trusted_hops,
        forwarded_header,
        &mut set,
    );
    set.push((&X_REQUEST_ID, Some(request_id.clone())));
    // A trace started here has no state of the client's to go with it.
    if trace.is_some_and(|trace| !trace.continued) {
        set.push((&TRACESTATE, None));
    }
    let outgoing = if http1 && upgrade.is_none() {
        let written = written_start(&parts, &path, &set, client_host, trace.is_some());
        set.clear();
        Outgoing::Written(written)
    } else {
        Outgoing::Parsed(ParsedHead {
            method: parts.method.clone(),
            path,
            fields: parts.headers,
        })
    };
    Ok(Box::new(Prepared {
        idempotent: matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        ),
        method: parts.method,
        outgoing,
        version: if http1 {
            Version::HTTP_11
        } else {
            Version::HTTP_2
        },
        via: headers::via(parts.version),
        per_request: set.len(),
        set,
        client_host,
        body: BodySlot::new(body),
        upgrade,
        max_attempts: usize::try_from(group.proxy.max_attempts.max(1)).unwrap_or(1),
        trace,
    }))
}

/// The HTTP/1.1 start of every attempt: the request line to `path`, the client's fields
/// less those the proxy sets (in `set`, or on each attempt: see
/// [`Prepared::set_per_attempt`]), then `set`'s.
fn written_start(
    parts: &http::request::Parts,
    path: &PathAndQuery,
    set: &[SetField],
    client_host: bool,
    traced: bool,
) -> RequestStart {
    let per_attempt = [
        (!client_host).then_some(&header::HOST),
        traced.then_some(&TRACEPARENT),
    ];
    let replaced = |name: &HeaderName| {
        set.iter().any(|(set, _)| *set == name) || per_attempt.contains(&Some(name))
    };
    let kept = parts.headers.iter().filter(|(name, _)| !replaced(name));
    RequestStart::new(&parts.method, path.as_str(), kept.chain(headers::sent(set)))
}

impl Prepared {
    /// Step 2: what the attempt on `target` sets besides the request's own fields: the
    /// target's `Host` when the client's is not kept, and the trace with the attempt's
    /// span (`span_id`, when it has one of its own) as the upstream's parent.
    fn set_per_attempt(&mut self, target: &Target, span_id: Option<u64>) {
        self.set.truncate(self.per_request);
        if !self.client_host {
            self.set.push((&header::HOST, Some(target.host.clone())));
        }
        if let Some(trace) = self.trace {
            let parent = span_id.map_or(trace, |id| trace.with_span(id));
            self.set.push((&TRACEPARENT, Some(parent.traceparent())));
        }
    }

    /// The head of the current attempt.
    fn head(&self) -> RequestHead<'_> {
        RequestHead {
            outgoing: &self.outgoing,
            set: &self.set,
            via: self.via,
        }
    }

    /// Step 3's second half: whether the failed attempt on target `index` may be
    /// followed by another (the attempt count and the budget aside).
    fn retryable(
        &self,
        failure: &UpstreamError,
        group: &Group,
        index: usize,
        tried: &[usize],
    ) -> bool {
        match failure {
            // Nothing reached the target; the body, if any, is still in its slot.
            UpstreamError::Connect { .. } => self.body.replayable(),
            // It waited for the whole connect_timeout already: only another target helps.
            UpstreamError::Saturated { .. } => {
                self.body.replayable()
                    && (0..group.targets.len()).any(|i| i != index && !tried.contains(&i))
            }
            // The target may have acted on it: only a request that is safe to repeat and
            // has no body to lose.
            UpstreamError::BrokeOff { .. } => {
                self.idempotent && self.body.is_empty() && self.upgrade.is_none()
            }
            UpstreamError::TimedOut { .. }
            | UpstreamError::NoHealthyTarget { .. }
            | UpstreamError::UnaskedSwitch { .. }
            | UpstreamError::AmbiguousFraming { .. } => false,
        }
    }
}

/// Step 3, first: whether a failed attempt is the client's doing — its body broke
/// (400), it went away (499), or the group's request deadline ran out while the proxy
/// waited for more of its body (408). Such a failure is counted as the group's client
/// error, never against the target, and never retried.
fn client_failure(group: &Group, body: &BodySlot, err: &SendError) -> Option<ClientError> {
    let metrics = &group.metrics;
    let (failure, counter, kind) = match body.upload()?.state() {
        UploadState::Malformed => (
            ClientError::MalformedBody,
            &metrics.client_malformed,
            "malformed",
        ),
        UploadState::Aborted => (ClientError::BodyAborted, &metrics.client_aborted, "aborted"),
        UploadState::WaitingForClient if matches!(err, SendError::TimedOut) => (
            ClientError::UploadTimedOut {
                limit: group.settings.request_timeout,
            },
            &metrics.client_upload_timeout,
            "upload_timeout",
        ),
        UploadState::Moving | UploadState::WaitingForClient | UploadState::Sent => return None,
    };
    counter.increment(1);
    tracing::info!(group = group.name, kind, error = %err, "Proxied request failed on the client's side: {failure}.");
    Some(failure)
}

/// Step 3: what a failed attempt on `target` means, counted in its metrics and, when it
/// is the target's fault, against its health. `limit` is the limit that ran out if the
/// attempt timed out.
fn classify(group: &Group, target: &Target, err: &SendError, limit: Timeout) -> UpstreamError {
    let name = group.name.clone();
    let failure = match err {
        SendError::Connect(_) => {
            target.metrics.connect_errors.increment(1);
            UpstreamError::Connect { group: name }
        }
        SendError::Exchange(_) => {
            target.metrics.exchange_errors.increment(1);
            UpstreamError::BrokeOff { group: name }
        }
        SendError::Saturated => {
            target.metrics.saturated.increment(1);
            UpstreamError::Saturated {
                group: name,
                connect_timeout: group.settings.connect_timeout,
            }
        }
        SendError::TimedOut => {
            target.metrics.timeouts.increment(1);
            UpstreamError::TimedOut {
                group: name,
                timeout: limit,
                limit: match limit {
                    Timeout::Request => group.settings.request_timeout,
                    Timeout::Response => group.settings.response_timeout,
                },
            }
        }
    };
    if failure.marks_target() {
        target.record_failure(&group.settings.outlier);
    }
    let cause = std::error::Error::source(err).map(ToString::to_string);
    tracing::warn!(
        group = group.name,
        target = target.address,
        error = %err,
        cause,
        "Upstream attempt failed: {failure}."
    );
    failure
}

/// Step 4: the upstream's response to the attempt `sent` then, judged for the target's
/// health and passed down (its body streamed under `deadline`, the connection's `lease`
/// given back when it ends), or the tunnel of an upgrade it accepted.
fn answer(
    group: &Group,
    request: &mut Prepared,
    mut rsp: Response<Received>,
    lease: Option<Lease>,
    in_flight: InFlight,
    sent: Instant,
    deadline: Instant,
) -> Result<Response<ResponseBody>, GatewayError> {
    let target = in_flight.target();
    let status = rsp.status();
    target
        .metrics
        .response(status, sent.elapsed().as_secs_f64());
    if ambiguous_framing(rsp.headers()) {
        // The lease is dropped with the response: the connection closes, since where
        // this answer ends on it is anyone's guess.
        target.record_failure(&group.settings.outlier);
        let refused = UpstreamError::AmbiguousFraming {
            group: group.name.clone(),
        };
        return Err(warned(refused, &group.name, &target.address));
    }
    let switched = status == StatusCode::SWITCHING_PROTOCOLS;
    // A switch nobody asked for would hand the client a raw connection to the target,
    // past routing and headers (h2c smuggling): the target is broken.
    let unasked = switched && request.upgrade.is_none();
    if status.is_server_error() || unasked {
        target.record_failure(&group.settings.outlier);
    } else {
        target.record_success();
    }
    if switched {
        let Some((client, tunnels)) = request.upgrade.take() else {
            let refused = UpstreamError::UnaskedSwitch {
                group: group.name.clone(),
            };
            return Err(warned(refused, &group.name, &target.address));
        };
        let upstream = hyper::upgrade::on(&mut rsp);
        tunnels.spawn(tunnel(client, upstream, lease, in_flight));
        let (mut head, _) = rsp.into_parts();
        headers::append_via(&mut head.headers, Version::HTTP_11);
        return Ok(Response::from_parts(
            head,
            Either::Left(Full::new(Bytes::new())),
        ));
    }
    let (mut head, incoming) = rsp.into_parts();
    // The client's connection is this server's: an HTTP/1.0 upstream must not make the
    // server close it after the answer, as it does for a response marked HTTP/1.0.
    head.version = Version::HTTP_11;
    headers::strip_hop_by_hop(&mut head.headers, None);
    headers::append_via(&mut head.headers, request.version);
    Ok(Response::from_parts(
        head,
        Either::Right(UpstreamBody::new(incoming, lease, deadline, in_flight)),
    ))
}

/// A target's answer refused as `refused` says: logged with the target that gave it
/// (its failure is counted by the caller), and the error the client gets.
fn warned(refused: UpstreamError, group: &str, target: &str) -> GatewayError {
    tracing::warn!(group, target, error = %refused, "Upstream answer refused.");
    refused.into()
}

/// Whether an answer's framing is one RFC 9112 (§6.1, §6.3) says to refuse, or one this
/// proxy cannot pass on: `Transfer-Encoding` with `Content-Length` (the mark of request
/// smuggling and response splitting: the two disagree on where the answer ends), or a
/// transfer coding other than a single `chunked` (the body then runs to the close, and,
/// `Transfer-Encoding` being hop-by-hop, the client would get the coded bytes as if
/// they were the content).
fn ambiguous_framing(headers: &HeaderMap) -> bool {
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    let Some(coding) = codings.next() else {
        return false;
    };
    headers.contains_key(header::CONTENT_LENGTH)
        || codings.next().is_some()
        || !coding
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked")
}

/// Keeps the client's host for the upstream (`host`, found as the request came in: see
/// [`headers::client_authority`]): the authority its URI names (HTTP/2, absolute form)
/// replaces its `Host`, else its `Host` stays as it came (no copy per request). `false`
/// when the client named no usable host: the target's is sent.
fn preserve_host(parts: &mut http::request::Parts, host: Option<&HeaderValue>) -> bool {
    let Some(host) = host else {
        return false;
    };
    if parts.uri.authority().is_some() {
        parts.headers.insert(header::HOST, host.clone());
    }
    true
}

/// The path and query sent up: the route's prefix replaced when it rewrites, else the
/// client's own (a clone shares its bytes).
fn upstream_path(uri: &Uri, rewrite: Option<(&str, &str)>) -> Result<PathAndQuery, ()> {
    let Some((prefix, replacement)) = rewrite else {
        return Ok(uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")));
    };
    let original = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let rest = original.strip_prefix(prefix).unwrap_or(original);
    let base = replacement.trim_end_matches('/');
    let joined = if rest.is_empty() || rest.starts_with('?') {
        format!("{base}/{rest}")
    } else {
        format!("{base}{rest}")
    };
    joined.parse().map_err(|_| ())
}

/// Copies bytes both ways between the client and the upstream once both sides have
/// switched protocols; the target counts it as in flight until it ends. An HTTP/1.1
/// connection hands itself to the upgrade only while it is driven.
async fn tunnel(client: OnUpgrade, upstream: OnUpgrade, lease: Option<Lease>, in_flight: InFlight) {
    let handed_over = async {
        match lease {
            Some(lease) => lease.run_out().await,
            None => None,
        }
    };
    // `_room`: the upstream connection's place under `max_connections_per_target`, held
    // until the tunnel over it ends.
    let (upgraded, _room) = tokio::join!(async { tokio::try_join!(client, upstream) }, handed_over);
    match upgraded {
        Ok((client, upstream)) => {
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(%error, target = in_flight.target().address, "Upgraded connection ended with an error.");
            }
        }
        Err(error) => {
            tracing::debug!(%error, target = in_flight.target().address, "Upgrade failed.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(fields: &[(&'static str, &'static str)]) -> bool {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(*name, HeaderValue::from_static(value));
        }
        ambiguous_framing(&headers)
    }

    /// Mutation: dropping any of the three conditions of `ambiguous_framing`.
    #[test]
    fn a_length_with_a_coding_or_a_coding_other_than_chunked_is_refused() {
        assert!(!framing(&[("content-length", "5")]));
        assert!(!framing(&[("transfer-encoding", "chunked")]));
        assert!(!framing(&[("transfer-encoding", "Chunked")]));
        assert!(framing(&[
            ("transfer-encoding", "chunked"),
            ("content-length", "5")
        ]));
        assert!(framing(&[("transfer-encoding", "gzip")]));
        assert!(framing(&[("transfer-encoding", "gzip, chunked")]));
        assert!(framing(&[
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "chunked")
        ]));
    }

    fn path(uri: &str, rewrite: Option<(&str, &str)>) -> String {
        upstream_path(&uri.parse().unwrap(), rewrite)
            .unwrap()
            .to_string()
    }

    #[test]
    fn rewrites_replace_the_matched_prefix() {
        assert_eq!(path("/api/v1/x?a=1", None), "/api/v1/x?a=1");
        assert_eq!(path("/api/v1/x?a=1", Some(("/api", "/"))), "/v1/x?a=1");
        assert_eq!(path("/api", Some(("/api", "/"))), "/");
        assert_eq!(path("/api?q", Some(("/api", "/"))), "/?q");
        assert_eq!(path("/api/x", Some(("/api", "/v2"))), "/v2/x");
        assert_eq!(path("/x", Some(("", "/root"))), "/root/x");
    }

    #[test]
    fn the_client_host_is_its_uri_authority_else_its_host_header() {
        let parts = |uri: &str, host: Option<&'static str>| {
            let mut req = Request::builder().uri(uri);
            if let Some(host) = host {
                req = req.header(header::HOST, host);
            }
            req.body(()).unwrap().into_parts().0
        };
        let preserved = |parts: &mut http::request::Parts| {
            let host = headers::client_authority(&parts.uri, &parts.headers);
            preserve_host(parts, host.as_ref())
        };
        let mut absolute = parts("http://named.example:8080/x", Some("other.example"));
        assert!(preserved(&mut absolute));
        assert_eq!(absolute.headers[header::HOST], "named.example:8080");
        let mut origin = parts("/x", Some("shop.example"));
        assert!(preserved(&mut origin));
        assert_eq!(origin.headers[header::HOST], "shop.example");
        assert!(!preserved(&mut parts("/x", None)), "the target's then");
        let mut unreadable = parts("/x", None);
        unreadable
            .headers
            .insert(header::HOST, HeaderValue::from_bytes(b"caf\xe9").unwrap());
        assert!(!preserved(&mut unreadable), "not text: the target's then");
    }
}
