//! The responses the gateway makes itself: the body type every listener serves, and the
//! JSON answers (probes, errors) built whole in memory.
//!
//! It sits below the listener, the request path and the proxy, which all make or pass
//! these responses, so none of them has to import another for it.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};

use crate::proxy::UpstreamBody;

/// The body of every response the gateway makes: whole (the app, errors, probes) or
/// streamed from an upstream.
pub type ResponseBody = Either<Full<Bytes>, UpstreamBody>;

/// A response of `status` with a JSON body made in advance.
pub(crate) fn json(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut rsp = Response::new(Either::Left(Full::new(body)));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    rsp
}

/// A probe answer: 200 or 503 with a one-word JSON body.
pub(crate) fn probe(ok: bool) -> Response<ResponseBody> {
    let (status, body) = if ok {
        (StatusCode::OK, r#"{"status":"ok"}"#)
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"unavailable"}"#,
        )
    };
    json(status, Bytes::from_static(body.as_bytes()))
}
