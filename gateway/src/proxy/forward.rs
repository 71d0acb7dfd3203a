//! Forwarding one request to an upstream group, as named steps:
//!
//! 1. prepare: strip hop-by-hop headers, set `X-Forwarded-*`, `Via`, `Host`, the
//!    request id, and rewrite the path;
//! 2. attempt: pick a target, send through the group's pool, wait for the response head
//!    within the group's limits;
//! 3. judge: a failed connect, or a target whose connections are all busy, is retried
//!    on another target; a broken exchange is retried only for an idempotent request
//!    without a body; an answer (any status) is never retried, and every retry is paid
//!    from the group's retry budget;
//! 4. answer: stream the upstream's response down (or tunnel an upgrade after its real
//!    `101`), or say as JSON which side failed and which limit was hit.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::{Either, Full};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tiergate_config::{HostHeader, UpstreamProtocol};
use tokio::time::Instant;

use super::body::{BodySlot, BoxError, UpstreamBody};
use super::group::Group;
use super::headers::{self, ClientSide};
use super::pool::{Lease, SendError};
use crate::error::{ClientError, GatewayError, Timeout, UpstreamError};
use crate::response::ResponseBody;

static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// What the route says about the request, beyond the group.
#[derive(Debug)]
pub(crate) struct Forwarding<'a> {
    /// The client's connection.
    pub(crate) client: ClientSide<'a>,
    /// The path prefix the route matched, and what replaces it upstream.
    pub(crate) rewrite: Option<(&'a str, &'a str)>,
    /// `proxy.trusted_hops`.
    pub(crate) trusted_hops: u32,
    /// `proxy.forwarded_header`.
    pub(crate) forwarded_header: bool,
    /// The request id the gateway settled on.
    pub(crate) request_id: &'a HeaderValue,
    /// The client connection's upgrade, when the request asks for one.
    pub(crate) upgrade: Option<OnUpgrade>,
    /// Where an upgraded connection's tunnel runs.
    pub(crate) tunnels: &'a super::Tunnels,
}

/// Forwards `req` to `group` and answers with what it said, or with a JSON error naming
/// the failure.
pub(crate) async fn forward<B>(
    group: &Arc<Group>,
    req: Request<B>,
    how: Forwarding<'_>,
) -> Result<Response<ResponseBody>, GatewayError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let deadline = started + group.settings.request_timeout;
    let (mut parts, body) = req.into_parts();

    // 1. prepare
    let upgrade = how.upgrade.filter(|_| {
        headers::wants_upgrade(&parts.headers) && group.settings.protocol == UpstreamProtocol::Http1
    });
    let client_version = parts.version;
    headers::strip_hop_by_hop(&mut parts.headers, upgrade.is_some());
    let client_host = match group.settings.host_header {
        HostHeader::Preserve => preserve_host(&mut parts),
        HostHeader::Target => false,
    };
    let path = match upstream_path(&parts.uri, how.rewrite) {
        Ok(path) => path,
        Err(()) => return Err(ClientError::UnrewritablePath.into()),
    };
    let body = BodySlot::new(body);
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let version = match group.settings.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::H2 => Version::HTTP_2,
    };
    group.metrics.requests.increment(1);
    group.budget.deposit();

    let max_attempts = group.proxy.max_attempts.max(1);
    // The client's headers: the first attempt takes them, a retry a copy made now (a
    // clone of what the client sent only shares its bytes). What this proxy adds is set
    // on each attempt's own map: a value built here would need an allocation to be
    // shared with a copy.
    let mut first = Some(std::mem::take(&mut parts.headers));
    let for_retries = (max_attempts > 1).then(|| first.clone()).flatten();
    let ours = |headers: &mut http::HeaderMap| {
        headers::set_forwarding(headers, how.client, how.trusted_hops, how.forwarded_header);
        headers::append_via(headers, client_version);
        headers.insert(X_REQUEST_ID.clone(), how.request_id.clone());
    };

    let mut tried: Vec<usize> = Vec::new();
    loop {
        // 2. attempt
        let Some(index) = group.pick(&tried) else {
            group.metrics.no_target.increment(1);
            return Err(UpstreamError::NoHealthyTarget {
                group: group.name.clone(),
            }
            .into());
        };
        let target = &group.targets[index];
        let mut attempt = Request::new(body.attempt());
        *attempt.method_mut() = parts.method.clone();
        *attempt.uri_mut() = Uri::from(path.clone());
        *attempt.version_mut() = version;
        let headers = attempt.headers_mut();
        *headers = first
            .take()
            .or_else(|| for_retries.clone())
            .unwrap_or_default();
        ours(headers);
        if !client_host {
            attempt
                .headers_mut()
                .insert(header::HOST, target.host.clone());
        }
        let in_flight = target.start_request();
        let sent = Instant::now();
        let head_by = deadline.min(sent + group.settings.response_timeout);
        let result = group.pool().send(index, attempt, head_by).await;

        // 3. judge
        let failure = match result {
            Ok((mut rsp, lease)) => {
                let status = rsp.status();
                target
                    .metrics
                    .response(status, sent.elapsed().as_secs_f64());
                if status.is_server_error() {
                    target.record_failure(&group.settings.outlier);
                } else {
                    target.record_success();
                }
                // 4. answer
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client) = upgrade {
                        let upstream = hyper::upgrade::on(&mut rsp);
                        how.tunnels
                            .spawn(tunnel(client, upstream, lease, in_flight));
                        let (mut head, _) = rsp.into_parts();
                        headers::append_via(&mut head.headers, Version::HTTP_11);
                        return Ok(Response::from_parts(
                            head,
                            Either::Left(Full::new(Bytes::new())),
                        ));
                    }
                }
                let (mut head, incoming) = rsp.into_parts();
                headers::strip_hop_by_hop(&mut head.headers, false);
                headers::append_via(&mut head.headers, version);
                return Ok(Response::from_parts(
                    head,
                    Either::Right(UpstreamBody::new(incoming, lease, deadline, in_flight)),
                ));
            }
            Err(err) => {
                let failure = match err {
                    SendError::Connect(_) => {
                        target.metrics.connect_errors.increment(1);
                        target.record_failure(&group.settings.outlier);
                        Failure::Connect
                    }
                    SendError::Exchange(_) => {
                        target.metrics.exchange_errors.increment(1);
                        target.record_failure(&group.settings.outlier);
                        Failure::Exchange
                    }
                    // Busy is not broken: no mark against the target's health.
                    SendError::Saturated => {
                        target.metrics.saturated.increment(1);
                        Failure::Saturated
                    }
                    SendError::TimedOut => {
                        target.metrics.timeouts.increment(1);
                        target.record_failure(&group.settings.outlier);
                        let (limit, timeout) = if head_by == deadline {
                            (group.settings.request_timeout, Timeout::Request)
                        } else {
                            (group.settings.response_timeout, Timeout::Response)
                        };
                        tracing::warn!(
                            group = group.name,
                            target = target.address,
                            limit_ms = limit.as_millis(),
                            "Upstream sent no response head in time."
                        );
                        return Err(UpstreamError::TimedOut {
                            group: group.name.clone(),
                            timeout,
                            limit,
                        }
                        .into());
                    }
                };
                failure.logged(group, &target.address, &err)
            }
        };
        drop(in_flight);

        let retryable = match failure {
            // Nothing reached the target; the body, if any, is still in its slot.
            Failure::Connect => body.replayable(),
            // It waited for the whole connect_timeout already: only another target helps.
            Failure::Saturated => {
                body.replayable()
                    && (0..group.targets.len()).any(|i| i != index && !tried.contains(&i))
            }
            // The target may have acted on it: only a request that is safe to repeat and
            // has no body to lose.
            Failure::Exchange => idempotent && body.is_empty() && upgrade.is_none(),
        };
        let attempts_left = tried.len() + 1 < usize::try_from(max_attempts).unwrap_or(1);
        if retryable && attempts_left && Instant::now() < deadline {
            if group.budget.withdraw() {
                group.metrics.retries.increment(1);
                tried.push(index);
                continue;
            }
            group.metrics.retries_refused.increment(1);
        }
        let group_name = group.name.clone();
        return Err(match failure {
            Failure::Connect => UpstreamError::Connect { group: group_name },
            Failure::Exchange => UpstreamError::BrokeOff { group: group_name },
            Failure::Saturated => UpstreamError::Saturated {
                group: group_name,
                connect_timeout: group.settings.connect_timeout,
            },
        }
        .into());
    }
}

/// Why an attempt got no response.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// No connection to the target.
    Connect,
    /// The connection failed while sending or before the response head.
    Exchange,
    /// Every connection the target may have was busy.
    Saturated,
}

impl Failure {
    fn logged(self, group: &Group, target: &str, err: &dyn std::error::Error) -> Self {
        let cause = std::error::Error::source(err).map(ToString::to_string);
        tracing::warn!(
            group = group.name,
            target,
            kind = ?self,
            error = %err,
            cause,
            "Upstream attempt failed."
        );
        self
    }
}

/// Keeps the client's host for the upstream: the authority its URI names (HTTP/2,
/// absolute form) replaces its `Host`, else its `Host` stays as it came (no copy per
/// request). `false` when the client named no usable host: the target's is sent.
fn preserve_host(parts: &mut http::request::Parts) -> bool {
    if let Some(authority) = parts.uri.authority() {
        if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(header::HOST, host);
            return true;
        }
    }
    parts
        .headers
        .get(header::HOST)
        .is_some_and(|host| host.to_str().is_ok())
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
async fn tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    lease: Option<Lease>,
    in_flight: super::target::InFlight,
) {
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
        let mut absolute = parts("http://named.example:8080/x", Some("other.example"));
        assert!(preserve_host(&mut absolute));
        assert_eq!(absolute.headers[header::HOST], "named.example:8080");
        let mut origin = parts("/x", Some("shop.example"));
        assert!(preserve_host(&mut origin));
        assert_eq!(origin.headers[header::HOST], "shop.example");
        assert!(!preserve_host(&mut parts("/x", None)), "the target's then");
    }
}
