//! The admin listener: `/metrics`, `/livez`, `/readyz`. It binds to loopback by default
//! and must never face the public: metrics reveal internals.

use app_core::App;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::service::{json, not_found, probe};

/// Answers one admin request.
pub(crate) fn handle<B>(
    req: &Request<B>,
    app: &App,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => {
            app.record_gauges();
            let mut rsp = Response::new(Full::new(Bytes::from(metrics.render())));
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            rsp
        }
        "/livez" => probe(true),
        "/readyz" => probe(app.is_ready()),
        "/" => json(
            StatusCode::OK,
            Bytes::from_static(br#"{"endpoints":["/metrics","/livez","/readyz"]}"#),
        ),
        _ => not_found(),
    }
}
