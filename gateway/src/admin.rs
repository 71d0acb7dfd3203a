//! The admin listener: `/metrics`, `/livez`, `/readyz`, and the runtime controls under
//! `/admin/`. It binds to loopback by default and must never face the public: metrics
//! reveal internals, and the controls move traffic.
//!
//! | request | answer |
//! |---|---|
//! | `GET /admin/routes` | the routes, splits, groups, targets and their health |
//! | `PUT /admin/routes/{name}/split` `{"blue":0,"green":100}` | new weights, in force at once |
//! | `POST /admin/reload` | reload the configuration (as SIGHUP), or say why not |
//!
//! The mutating endpoints need `Authorization: Bearer <admin.token>`; without a
//! configured token they are off (403).

use std::collections::BTreeMap;
use std::sync::Arc;

use app_core::App;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tiergate_config::Secret;

use crate::error::{ClientError, GatewayError};
use crate::proxy::{Group, SplitError};
use crate::reload::{ReloadError, Reloader};
use crate::response::{ResponseBody, json as json_response, probe};
use crate::router::{Handler, Router};
use crate::service::Gateway;

/// Largest admin request body read.
const MAX_BODY: usize = 64 * 1024;

/// What the admin endpoints act on.
#[derive(Debug)]
pub(crate) struct Admin {
    pub(crate) app: App,
    pub(crate) gateway: Gateway,
    pub(crate) metrics: PrometheusHandle,
    /// SHA-256 of `admin.token`: compared digest to digest, so the comparison's time
    /// says nothing about the token.
    pub(crate) token: Option<ring::digest::Digest>,
    pub(crate) reloader: Arc<Reloader>,
}

impl Admin {
    pub(crate) fn token_digest(token: Option<&Secret>) -> Option<ring::digest::Digest> {
        token.map(|t| ring::digest::digest(&ring::digest::SHA256, t.expose().as_bytes()))
    }

    /// Answers one admin request.
    pub(crate) async fn handle<B>(&self, req: Request<B>) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.answer(req)
            .await
            .unwrap_or_else(GatewayError::into_response)
    }

    /// The answer to one admin request, or why there is none.
    async fn answer<B>(&self, req: Request<B>) -> Result<Response<ResponseBody>, GatewayError>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // HEAD is a GET whose body the listener drops.
        let method = match req.method() {
            &Method::HEAD => &Method::GET,
            method => method,
        };
        let rsp = match (method, segments.as_slice()) {
            (&Method::GET, ["metrics"]) => {
                self.app.record_gauges();
                self.gateway.router().record_gauges();
                crate::metrics::record_process();
                let mut rsp = Response::new(Either::Left(Full::new(Bytes::from(
                    self.metrics.render(),
                ))));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                rsp
            }
            (&Method::GET, ["livez"]) => probe(true),
            (&Method::GET, ["readyz"]) => probe(self.gateway.is_ready()),
            (&Method::GET, [""]) => json_response(
                StatusCode::OK,
                Bytes::from_static(
                    br#"{"endpoints":["/metrics","/livez","/readyz","/admin/routes","/admin/routes/{name}/split","/admin/reload"]}"#,
                ),
            ),
            (&Method::GET, ["admin", "routes"]) => {
                reply(StatusCode::OK, &describe(&self.gateway.router()))
            }
            (&Method::PUT, ["admin", "routes", name, "split"]) => {
                self.authorize(&req)?;
                let name = (*name).to_owned();
                let weights = read_json::<BTreeMap<String, u32>, _>(req)
                    .await
                    .map_err(ClientError::BadRequest)?;
                self.set_split(&name, &weights)?
            }
            (&Method::POST, ["admin", "reload"]) => {
                self.authorize(&req)?;
                let reloaded = self
                    .reloader
                    .reload("admin API")
                    .map_err(|refused| match refused {
                        ReloadError::Invalid(e) => ClientError::ConfigRefused(e),
                        ReloadError::Table(e) => ClientError::TableRefused(e),
                    })?;
                reply(
                    StatusCode::OK,
                    &json!({ "status": "reloaded", "reloaded": reloaded }),
                )
            }
            (_, ["metrics" | "livez" | "readyz"] | ["admin", "routes"]) => {
                return Err(ClientError::MethodNotAllowed { allow: "GET, HEAD" }.into());
            }
            (_, ["admin", "routes", _, "split"]) => {
                return Err(ClientError::MethodNotAllowed { allow: "PUT" }.into());
            }
            (_, ["admin", "reload"]) => {
                return Err(ClientError::MethodNotAllowed { allow: "POST" }.into());
            }
            _ => return Err(ClientError::NoRoute.into()),
        };
        Ok(rsp)
    }

    /// Lets a request through only if it bears the configured token.
    ///
    /// # Errors
    /// No token is configured, or the request does not bear it.
    fn authorize<B>(&self, req: &Request<B>) -> Result<(), ClientError> {
        let Some(expected) = &self.token else {
            return Err(ClientError::AdminOff);
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| ring::digest::digest(&ring::digest::SHA256, t.trim().as_bytes()));
        match presented {
            Some(digest) if digest.as_ref() == expected.as_ref() => Ok(()),
            _ => Err(ClientError::Unauthorized),
        }
    }

    /// Puts new weights on the split of route `name`.
    ///
    /// # Errors
    /// No such route, no split on it, a group it does not have, or weights that sum to 0.
    fn set_split(
        &self,
        name: &str,
        weights: &BTreeMap<String, u32>,
    ) -> Result<Response<ResponseBody>, ClientError> {
        let router = self.gateway.router();
        let split = match router.route_named(name).map(|r| &r.handler) {
            Some(Handler::Split(split)) => split,
            Some(_) => return Err(ClientError::NotFound(format!("route {name} has no split"))),
            None => return Err(ClientError::NotFound(format!("no route named {name}"))),
        };
        split.set_weights(weights).map_err(|e| match e {
            SplitError::UnknownGroup(..) => ClientError::NotFound(e.to_string()),
            SplitError::ZeroSum => ClientError::BadRequest(e.to_string()),
        })?;
        let now = split.weights();
        tracing::info!(route = name, weights = ?now, "Split weights changed through the admin API.");
        Ok(reply(
            StatusCode::OK,
            &json!({ "route": name, "split": now }),
        ))
    }
}

/// The route table as the admin API shows it.
fn describe(router: &Router) -> Value {
    let routes: Vec<Value> = router
        .routes()
        .map(|route| {
            let target = match &route.handler {
                Handler::App => json!({ "app": true }),
                Handler::Upstream(group) => json!({ "upstream": group.name }),
                Handler::Split(split) => json!({ "split": split.weights() }),
                Handler::Redirect(url) => json!({ "redirect": url }),
                Handler::Livez | Handler::Readyz | Handler::NotFound => json!({ "builtin": true }),
            };
            let settings = route.settings.as_ref();
            json!({
                "name": route.name,
                "host": settings.and_then(|s| s.host.clone()),
                "path": settings.map(|s| s.path.clone()),
                "exact": settings.is_some_and(|s| s.exact),
                "rewrite_prefix": route.rewrite,
                "target": target,
            })
        })
        .collect();
    let groups: Vec<Value> = router
        .groups()
        .values()
        .map(|g| describe_group(g))
        .collect();
    json!({ "routes": routes, "groups": groups })
}

fn describe_group(group: &Group) -> Value {
    let targets: Vec<Value> = group
        .targets
        .iter()
        .map(|t| {
            json!({
                "address": t.address,
                "weight": t.weight,
                "healthy": t.healthy(),
                "ejected": t.ejected(),
                "available": t.available(),
                "in_flight": t.in_flight(),
            })
        })
        .collect();
    json!({
        "name": group.name,
        "balance": group.settings.balance,
        "protocol": group.settings.protocol,
        "health_check": group.settings.health_check.as_ref().map(|c| json!({
            "path": c.path,
            "interval_ms": c.interval.as_millis(),
            "timeout_ms": c.timeout.as_millis(),
        })),
        "fail_open": group.settings.fail_open,
        "targets": targets,
    })
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes, or says why not.
async fn read_json<T, B>(req: Request<B>) -> Result<T, String>
where
    T: serde::de::DeserializeOwned,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Err(format!(
                "cannot read the body (at most {MAX_BODY} bytes): {e}"
            ));
        }
    };
    // serde's own message names Rust types ("expected u32", "a map"): only where it
    // went wrong is kept.
    serde_json::from_slice(&bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => {
                "the body must be a JSON object of group names to non-negative integer weights"
            }
            _ => "the body is not valid JSON",
        };
        format!("{what} (line {}, column {})", e.line(), e.column())
    })
}

fn reply(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    json_response(status, Bytes::from(body.to_string()))
}
