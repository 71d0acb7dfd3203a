//! What the gateway answers when it cannot answer as asked: one error type, split by the
//! side that failed, and the one place ([`GatewayError::into_response`]) where an error
//! becomes its JSON response (`{"error": code, "message": text}`).
//!
//! The side says who can act on the failure, and so what it may be blamed on:
//!
//! - [`ClientError`]: the request itself is at fault (its framing, its path, its
//!   credentials); the client must change it. Such a failure says nothing about any
//!   upstream.
//! - [`UpstreamError`]: an upstream group or one of its targets failed (no connection, a
//!   broken exchange, no response head in time, no free connection, no healthy target).
//! - [`LocalError`]: this process chose not to finish the request (too much in flight, the
//!   app's deadline).
//!
//! Only an upstream failure may count against a target's health, and not all of them do
//! ([`UpstreamError::marks_target`]): ask [`GatewayError::side`] before blaming a target.
//!
//! Errors the app answers (the items API) are `app-core`'s own and never pass through
//! here. The message of every variant is its `Display` text: it is what the client reads,
//! so it names the limit or setting at fault and never an internal cause.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::response::{ResponseBody, json};

/// nginx's code for a client that went away before its request was answered: no client
/// reads it, the access log and the metrics do.
const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// The side of an exchange that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (downstream): its request cannot be served as sent.
    Client,
    /// An upstream group or target.
    Upstream,
    /// This process: load shedding, its own deadlines.
    Local,
}

/// A request the gateway answers with an error, by the side that failed.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The client's request is at fault.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// An upstream failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// This process did not finish the request.
    #[error(transparent)]
    Local(#[from] LocalError),
}

/// The client's request cannot be served as sent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The head frames its body ambiguously (a request smuggler's trick); the connection
    /// closes after the answer, so nothing sent after that head is read as a request.
    #[error(
        "ambiguous message framing: Content-Length with Transfer-Encoding, or Content-Length twice"
    )]
    AmbiguousFraming,
    /// `Transfer-Encoding` is not a plain list of codings, or is given twice, or applies
    /// `chunked` twice or not last: the body's end cannot be trusted.
    #[error("Transfer-Encoding {why}")]
    BadTransferEncoding {
        /// What is wrong with it.
        why: &'static str,
    },
    /// A transfer coding other than `chunked` (`gzip, chunked`).
    #[error("Transfer-Encoding: only chunked is supported")]
    UnsupportedTransferCoding,
    /// hyper could not parse the request head.
    #[error("the request head is not valid HTTP/1.1 (its request line or a header line)")]
    MalformedHead,
    /// The request head is larger than `http.max_header_bytes`.
    #[error("the request head is larger than {limit} bytes (http.max_header_bytes)")]
    HeadTooLarge {
        /// `http.max_header_bytes`.
        limit: usize,
    },
    /// The request has more header lines than `http.max_headers`.
    #[error("the request has more than {limit} header lines (http.max_headers)")]
    TooManyHeaders {
        /// `http.max_headers`.
        limit: usize,
    },
    /// The request target is longer than hyper takes (65,534 bytes).
    #[error("the request target is too long")]
    UriTooLong,
    /// `Host` is missing on HTTP/1.1, given twice, disagrees with `:authority`, or is not a
    /// host with an optional port.
    #[error("{0}")]
    BadHost(&'static str),
    /// CONNECT: no route tunnels.
    #[error("CONNECT is not supported: this server is not a forward proxy")]
    ConnectRefused,
    /// TRACE on a route that is not the app's (the app answers its own 405).
    #[error("TRACE is not allowed: it would echo the request's headers back, credentials included")]
    TraceRefused,
    /// The request body did not arrive within `http.body_read_timeout`.
    #[error("the request body did not arrive within {} ms (http.body_read_timeout)", limit.as_millis())]
    BodyTimeout {
        /// `http.body_read_timeout`.
        limit: Duration,
    },
    /// The request body broke off: the connection ended, or its chunked framing is broken.
    #[error("the request body could not be read: it ended early or its chunked framing is broken")]
    UnreadableBody,
    /// The route's `rewrite_prefix` applied to the path makes no valid path.
    #[error("the rewritten path is not a valid URI path")]
    UnrewritablePath,
    /// The path cannot be normalised safely before routing.
    #[error("the path cannot be normalised safely: {0}")]
    UnsafePath(crate::path::UnsafePath),
    /// The request body's framing is broken (a chunk size that is not hexadecimal, a
    /// missing CRLF); the connection closes after the answer.
    #[error("the request body is malformed")]
    MalformedBody,
    /// The client closed its connection (or reset its stream) before its request body
    /// ended: it is no longer there to read the answer, which the access log keeps.
    #[error("the client closed the connection before its request body ended")]
    BodyAborted,
    /// The request body stopped arriving, and the group's whole-exchange limit ran out
    /// while the proxy waited for the client.
    #[error(
        "the request body did not arrive within {} ms (upstreams.request_timeout)",
        limit.as_millis()
    )]
    UploadTimedOut {
        /// The group's `request_timeout`.
        limit: Duration,
    },
    /// A redirect's `Location` would not be a valid header value.
    #[error("cannot redirect this URL")]
    CannotRedirect,
    /// A plain request to be sent to HTTPS names no host.
    #[error("a Host header is needed to redirect to HTTPS")]
    NoHostToRedirect,
    /// No route matches the request.
    #[error("no such route")]
    NoRoute,
    /// An admin request names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An admin request's body or parameters are not acceptable.
    #[error("{0}")]
    BadRequest(String),
    /// An admin request clashes with work in progress (a rollout already running).
    #[error("{0}")]
    Conflict(String),
    /// The endpoint exists but not for this method.
    #[error("this endpoint answers {allow} only")]
    MethodNotAllowed {
        /// The method it answers (the `Allow` header).
        allow: &'static str,
    },
    /// A mutating admin endpoint while `admin.token` is not set.
    #[error("admin.token is not set: the mutating admin endpoints are off")]
    AdminOff,
    /// A mutating admin endpoint without the configured token.
    #[error("this endpoint needs Authorization: Bearer <admin.token>")]
    Unauthorized,
    /// A reload was asked for and the configuration does not validate; every problem is
    /// listed in the answer's `problems`.
    #[error("the configuration was refused; the running one keeps serving")]
    ConfigRefused(tiergate_config::ConfigError),
    /// A reload was asked for and the route table cannot be built from the
    /// configuration.
    #[error(transparent)]
    TableRefused(crate::router::RouterError),
}

/// An upstream group, or a target of it, failed. `group` is the group's name.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection to a target could be made.
    #[error("cannot connect to upstream group {group}")]
    Connect {
        /// The group's name.
        group: String,
    },
    /// The connection failed while the request was sent or before the response head.
    #[error("upstream group {group} broke off the exchange")]
    BrokeOff {
        /// The group's name.
        group: String,
    },
    /// No response head within the group's limit.
    #[error(
        "upstream group {group} sent no response head within {} ms (upstreams.{})",
        limit.as_millis(),
        timeout.key()
    )]
    TimedOut {
        /// The group's name.
        group: String,
        /// Which of the group's limits ran out.
        timeout: Timeout,
        /// Its value.
        limit: Duration,
    },
    /// Every connection the target may have stayed busy for all of `connect_timeout`.
    #[error(
        "every connection to upstream group {group} stayed busy for {} ms \
         (upstreams.max_connections_per_target, upstreams.connect_timeout)",
        connect_timeout.as_millis()
    )]
    Saturated {
        /// The group's name.
        group: String,
        /// The group's `connect_timeout`.
        connect_timeout: Duration,
    },
    /// A target answered `101 Switching Protocols` to a request that asked for no
    /// upgrade (or none it may have): no tunnel is opened for it.
    #[error("upstream group {group} switched protocols unasked")]
    UnaskedSwitch {
        /// The group's name.
        group: String,
    },
    /// A target answered with framing RFC 9112 says to refuse (`Transfer-Encoding`
    /// with `Content-Length`, or a transfer coding other than `chunked`): the connection
    /// is closed, the answer not passed on.
    #[error("upstream group {group} answered with ambiguous framing")]
    AmbiguousFraming {
        /// The group's name.
        group: String,
    },
    /// No target of the group is healthy and the group does not fail open.
    #[error("no target of upstream group {group} is healthy (fail_open is off)")]
    NoHealthyTarget {
        /// The group's name.
        group: String,
    },
}

/// Which of an upstream group's limits ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timeout {
    /// `upstreams.response_timeout`: one attempt's wait for its response head.
    Response,
    /// `upstreams.request_timeout`: the whole request, every attempt included.
    Request,
}

impl Timeout {
    /// The setting's key under `upstreams`.
    fn key(self) -> &'static str {
        match self {
            Self::Response => "response_timeout",
            Self::Request => "request_timeout",
        }
    }
}

/// This process did not finish the request.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// `http.max_in_flight` requests were in flight: shed at once rather than queued.
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    /// A group's `max_in_flight` requests were in flight.
    #[error(
        "too many requests in flight to upstream group {group} (upstreams.max_in_flight); retry shortly"
    )]
    GroupOverloaded {
        /// The group's name.
        group: String,
    },
    /// The app did not answer within `http.request_timeout`.
    #[error("the request took longer than {} ms", limit.as_millis())]
    AppDeadline {
        /// `http.request_timeout`.
        limit: Duration,
    },
    /// PostgreSQL, which holds the fleet state, did not answer: no change is made, and
    /// every task keeps serving the state it has.
    #[error(
        "the fleet state in PostgreSQL cannot be reached: nothing was changed, and every \
         task keeps serving the state it has; retry once the database is back"
    )]
    FleetUnavailable,
}

impl UpstreamError {
    /// Whether the failure counts against the target that was tried: a target that
    /// refused, broke off or stalled is suspect; one whose connections were all busy is
    /// busy, not broken, and no target was tried when none was healthy.
    pub fn marks_target(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::BrokeOff { .. }
            | Self::TimedOut { .. }
            | Self::UnaskedSwitch { .. }
            | Self::AmbiguousFraming { .. } => true,
            Self::Saturated { .. } | Self::NoHealthyTarget { .. } => false,
        }
    }
}

impl GatewayError {
    /// The side that failed.
    pub fn side(&self) -> Side {
        match self {
            Self::Client(_) => Side::Client,
            Self::Upstream(_) => Side::Upstream,
            Self::Local(_) => Side::Local,
        }
    }

    /// The status and the `error` code of the answer.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Client(error) => match error {
                ClientError::UnsupportedTransferCoding | ClientError::ConnectRefused => {
                    (StatusCode::NOT_IMPLEMENTED, "not_implemented")
                }
                ClientError::HeadTooLarge { .. } | ClientError::TooManyHeaders { .. } => (
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "headers_too_large",
                ),
                ClientError::UriTooLong => (StatusCode::URI_TOO_LONG, "uri_too_long"),
                ClientError::BodyTimeout { .. } => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
                ClientError::TraceRefused => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
                ClientError::AmbiguousFraming
                | ClientError::BadTransferEncoding { .. }
                | ClientError::MalformedHead
                | ClientError::BadHost(_)
                | ClientError::UnreadableBody
                | ClientError::UnrewritablePath
                | ClientError::UnsafePath(_)
                | ClientError::MalformedBody
                | ClientError::CannotRedirect
                | ClientError::NoHostToRedirect
                | ClientError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                ClientError::NoRoute | ClientError::NotFound(_) => {
                    (StatusCode::NOT_FOUND, "not_found")
                }
                ClientError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                ClientError::MethodNotAllowed { .. } => {
                    (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
                }
                ClientError::BodyAborted => (CLIENT_CLOSED_REQUEST, "client_closed_request"),
                ClientError::UploadTimedOut { .. } => {
                    (StatusCode::REQUEST_TIMEOUT, "request_timeout")
                }
                ClientError::AdminOff => (StatusCode::FORBIDDEN, "forbidden"),
                ClientError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
                ClientError::ConfigRefused(_) | ClientError::TableRefused(_) => {
                    (StatusCode::BAD_REQUEST, "invalid_config")
                }
            },
            Self::Upstream(error) => match error {
                UpstreamError::Connect { .. }
                | UpstreamError::BrokeOff { .. }
                | UpstreamError::UnaskedSwitch { .. }
                | UpstreamError::AmbiguousFraming { .. } => {
                    (StatusCode::BAD_GATEWAY, "bad_gateway")
                }
                UpstreamError::TimedOut { .. } => (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"),
                UpstreamError::Saturated { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "upstream_saturated")
                }
                UpstreamError::NoHealthyTarget { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_upstream")
                }
            },
            Self::Local(error) => match error {
                LocalError::Overloaded | LocalError::GroupOverloaded { .. } => {
                    (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
                }
                LocalError::AppDeadline { .. } => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
                LocalError::FleetUnavailable => {
                    (StatusCode::SERVICE_UNAVAILABLE, "fleet_unavailable")
                }
            },
        }
    }

    /// The JSON answer: `{"error": code, "message": text}` (and a refused configuration's
    /// `problems`), with the headers the failure calls for.
    pub fn into_response(self) -> Response<ResponseBody> {
        let (status, _) = self.status_and_code();
        let mut rsp = json(status, self.json_body());
        if let Some((name, value)) = self.extra_header() {
            rsp.headers_mut().insert(name, value);
        }
        if self.closes_connection() {
            // hyper closes the connection after a response that says so.
            rsp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        rsp
    }

    /// The answer as HTTP/1.1 bytes, for a request hyper refused before any service saw
    /// it (the connection then closes).
    pub(crate) fn into_http1_bytes(self) -> Vec<u8> {
        let (status, _) = self.status_and_code();
        let body = self.json_body();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
            status.as_str(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes();
        if let Some((name, value)) = self.extra_header() {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }

    /// `{"error": code, "message": text}`, and a refused configuration's `problems`.
    fn json_body(&self) -> Bytes {
        let (_, code) = self.status_and_code();
        let message = self.to_string();
        let problems = match self {
            Self::Client(ClientError::ConfigRefused(refused)) => Some(refused.problems.as_slice()),
            _ => None,
        };
        serde_json::to_vec(&Body {
            error: code,
            message: &message,
            problems,
        })
        .map_or_else(|_| Bytes::new(), Bytes::from)
    }

    /// The header the failure calls for, besides the content type.
    fn extra_header(&self) -> Option<(header::HeaderName, HeaderValue)> {
        match self {
            Self::Client(ClientError::MethodNotAllowed { allow }) => {
                Some((header::ALLOW, HeaderValue::from_static(allow)))
            }
            Self::Client(ClientError::TraceRefused) => Some((
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            )),
            Self::Client(ClientError::Unauthorized) => {
                Some((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")))
            }
            Self::Local(_) => Some((header::RETRY_AFTER, HeaderValue::from_static("1"))),
            _ => None,
        }
    }

    /// Whether the connection must close after the answer: the request's framing or head
    /// cannot be trusted, so nothing after it on the connection can be read as a request.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            Self::Client(
                ClientError::AmbiguousFraming
                    | ClientError::BadTransferEncoding { .. }
                    | ClientError::UnsupportedTransferCoding
                    | ClientError::MalformedHead
                    | ClientError::HeadTooLarge { .. }
                    | ClientError::TooManyHeaders { .. }
                    | ClientError::UriTooLong
                    | ClientError::BadHost(_)
                    | ClientError::ConnectRefused
                    | ClientError::BodyTimeout { .. }
                    | ClientError::UnreadableBody
                    | ClientError::MalformedBody
                    | ClientError::BodyAborted
                    | ClientError::UploadTimedOut { .. }
            )
        )
    }
}

/// An error answer's body.
#[derive(serde::Serialize)]
struct Body<'a> {
    error: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<&'a [String]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(rsp: Response<ResponseBody>) -> serde_json::Value {
        use http_body_util::BodyExt as _;
        let bytes = rsp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// Mutation: answer `Side::Upstream` for `Client` in `side`, or give `Saturated` a
    /// mark against the target, and this fails.
    #[test]
    fn the_side_and_the_blame_follow_the_variant() {
        assert_eq!(
            GatewayError::from(ClientError::AmbiguousFraming).side(),
            Side::Client
        );
        assert_eq!(
            GatewayError::from(LocalError::Overloaded).side(),
            Side::Local
        );
        let saturated = UpstreamError::Saturated {
            group: "g".into(),
            connect_timeout: Duration::from_secs(1),
        };
        assert!(!saturated.marks_target());
        assert!(UpstreamError::Connect { group: "g".into() }.marks_target());
        assert_eq!(GatewayError::from(saturated).side(), Side::Upstream);
    }

    /// Mutation: answer `BodyAborted` with the upstream's 502, or drop the
    /// `Connection: close` of the body failures, and this fails.
    #[tokio::test]
    async fn a_client_body_failure_is_the_clients_and_closes_the_connection() {
        for (error, status, code) in [
            (ClientError::MalformedBody, 400, "bad_request"),
            (ClientError::BodyAborted, 499, "client_closed_request"),
            (
                ClientError::UploadTimedOut {
                    limit: Duration::from_secs(2),
                },
                408,
                "request_timeout",
            ),
        ] {
            let error = GatewayError::from(error);
            assert_eq!(error.side(), Side::Client);
            let rsp = error.into_response();
            assert_eq!(rsp.status(), status);
            assert_eq!(rsp.headers()[header::CONNECTION], "close");
            assert_eq!(body(rsp).await["error"], code);
        }
        assert!(UpstreamError::UnaskedSwitch { group: "g".into() }.marks_target());
    }

    /// Mutation: drop `timeout.key()` from `TimedOut`'s message, or the `Retry-After` of
    /// local errors, and this fails.
    #[tokio::test]
    async fn an_error_answers_its_status_code_message_and_headers() {
        let rsp = GatewayError::from(UpstreamError::TimedOut {
            group: "api".into(),
            timeout: Timeout::Request,
            limit: Duration::from_millis(1500),
        })
        .into_response();
        assert_eq!(rsp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(rsp.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            body(rsp).await,
            serde_json::json!({
                "error": "upstream_timeout",
                "message": "upstream group api sent no response head within 1500 ms (upstreams.request_timeout)",
            })
        );
        let rsp = GatewayError::from(LocalError::Overloaded).into_response();
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[header::RETRY_AFTER], "1");
        let refused = tiergate_config::ConfigError {
            problems: vec!["a: b".into()],
        };
        let rsp = GatewayError::from(ClientError::ConfigRefused(refused)).into_response();
        assert_eq!(body(rsp).await["problems"], serde_json::json!(["a: b"]));
    }
}
