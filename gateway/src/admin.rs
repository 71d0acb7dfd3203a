//! The admin listener: `/metrics`, `/livez`, `/readyz`, the API contract, and the runtime
//! controls under `/admin/`. It binds to loopback by default and must never face the
//! public: metrics reveal internals, and the controls move traffic.
//!
//! | request | answer |
//! |---|---|
//! | `GET /openapi.json`, `GET /openapi.yaml` | the API contract, `docs/openapi.yaml` |
//! | `GET /admin/routes` | the routes, splits, groups, targets and their health |
//! | `PUT /admin/routes/{name}/split` `{"blue":0,"green":100}` | new weights, fleet-wide (docs/fleet.md) |
//! | `DELETE /admin/routes/{name}/split` | back to the file's weights, fleet-wide |
//! | `GET /admin/fleet` | the live tasks and the revision each has applied |
//! | `POST /admin/rollouts` | start a rollout, driven by this task (docs/fleet.md) |
//! | `GET /admin/rollouts` | the rollouts, newest first |
//! | `POST /admin/rollouts/{route}/abort` | end the route's rollout, back to the previous group |
//! | `POST /admin/reload` | reload the configuration (as SIGHUP), or say why not |
//!
//! Every path and method is a row of [`ENDPOINTS`]. The mutating endpoints need
//! `Authorization: Bearer <admin.token>`; without a configured token they are off (403).
//! On a listener bound beyond loopback every `/admin/*` endpoint needs it (the
//! configuration check refuses such a listener without a token); the probes, `/metrics`
//! and the API contract never do.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use app_core::App;
use app_core::api::{Endpoint, Unrouted, route};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full, Limited};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{Value, json};
use tiergate_config::Secret;

use crate::control::{PlanError, RolloutAsk};
use crate::error::{ClientError, GatewayError, LocalError};
use crate::proxy::{Group, SplitError};
use crate::reload::{ReloadError, Reloader};
use crate::response::{ResponseBody, json as json_response, probe};
use crate::router::{Handler, Router};
use crate::service::Gateway;

/// The API contract as written, and as JSON (converted by the build script).
const OPENAPI_YAML: &str = include_str!("../../docs/openapi.yaml");
const OPENAPI_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/openapi.json"));

/// What an admin request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Index,
    Metrics,
    Livez,
    Readyz,
    OpenApiJson,
    OpenApiYaml,
    Routes,
    Fleet,
    SetSplit,
    ResetSplit,
    Rollouts,
    StartRollout,
    AbortRollout,
    Reload,
}

/// The admin listener's endpoints: the one table its router reads, `/` lists, and the
/// contract test compares with `docs/openapi.yaml`. HEAD is a GET whose body the
/// listener drops.
pub static ENDPOINTS: [Endpoint<Operation>; 12] = [
    Endpoint {
        path: "/",
        allow: "GET, HEAD",
        routes: &[
            (Method::GET, Operation::Index),
            (Method::HEAD, Operation::Index),
        ],
    },
    Endpoint {
        path: "/metrics",
        allow: "GET, HEAD",
        routes: &[
            (Method::GET, Operation::Metrics),
            (Method::HEAD, Operation::Metrics),
        ],
    },
    Endpoint {
        path: "/livez",
        allow: "GET, HEAD",
        routes: &[
            (Method::GET, Operation::Livez),
            (Method::HEAD, Operation::Livez),
        ],
    },
    Endpoint {
        path: "/readyz",
        allow: "GET, HEAD",
        routes: &[
            (Method::GET, Operation::Readyz),
            (Method::HEAD, Operation::Readyz),
        ],
    },
    Endpoint {
        path: "/openapi.json",
        allow: "GET, HEAD",
        routes: &[
            (Method::GET, Operation::OpenApiJson),
            (Method::HEAD, Operation::OpenApiJson),
        ],
    },
    Endpoint {
        path: "/openapi.yaml",
        allow: "GET, HEAD",
        routes: &[
            (Method::GET, Operation::OpenApiYaml),
            (Method::HEAD, Operation::OpenApiYaml),
        ],
    },
    Endpoint {
        path: "/admin/routes",
        allow: "GET, HEAD",
        routes: &[
            (Method::GET, Operation::Routes),
            (Method::HEAD, Operation::Routes),
        ],
    },
    Endpoint {
        path: "/admin/routes/{name}/split",
        allow: "PUT, DELETE",
        routes: &[
            (Method::PUT, Operation::SetSplit),
            (Method::DELETE, Operation::ResetSplit),
        ],
    },
    Endpoint {
        path: "/admin/fleet",
        allow: "GET, HEAD",
        routes: &[
            (Method::GET, Operation::Fleet),
            (Method::HEAD, Operation::Fleet),
        ],
    },
    Endpoint {
        path: "/admin/rollouts",
        allow: "GET, HEAD, POST",
        routes: &[
            (Method::GET, Operation::Rollouts),
            (Method::HEAD, Operation::Rollouts),
            (Method::POST, Operation::StartRollout),
        ],
    },
    Endpoint {
        path: "/admin/rollouts/{route}/abort",
        allow: "POST",
        routes: &[(Method::POST, Operation::AbortRollout)],
    },
    Endpoint {
        path: "/admin/reload",
        allow: "POST",
        routes: &[(Method::POST, Operation::Reload)],
    },
];

/// The endpoint `path` names and its `{…}` segment, and what `method` on it does.
///
/// # Errors
/// No endpoint has this path (404), or it does not answer this method (405 with `Allow`).
fn operation<'p>(method: &Method, path: &'p str) -> Result<(Operation, &'p str), ClientError> {
    match route(&ENDPOINTS, method, path) {
        Ok((operation, parameter)) => Ok((*operation, parameter)),
        Err(Unrouted::NoPath) => Err(ClientError::NoRoute),
        Err(Unrouted::Method { allow }) => Err(ClientError::MethodNotAllowed { allow }),
    }
}

/// Largest admin request body read.
const MAX_BODY: usize = 64 * 1024;
/// Longest `?wait=` on a change.
const MAX_WAIT: Duration = Duration::from_secs(60);

/// What the admin endpoints act on.
#[derive(Debug)]
pub(crate) struct Admin {
    pub(crate) app: App,
    pub(crate) gateway: Gateway,
    pub(crate) metrics: PrometheusHandle,
    /// SHA-256 of `admin.token`: compared digest to digest, so the comparison's time
    /// says nothing about the token.
    pub(crate) token: Option<ring::digest::Digest>,
    /// The listener is reachable beyond loopback: reading `/admin/*` needs the token too.
    pub(crate) guard_reads: bool,
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
        let (operation, parameter) = operation(req.method(), &path)?;
        let rsp = match operation {
            Operation::Index => {
                let paths: Vec<&str> = ENDPOINTS.iter().map(|e| e.path).collect();
                reply(StatusCode::OK, &json!({ "endpoints": paths }))
            }
            Operation::Metrics => {
                self.app.record_gauges();
                self.gateway.router().record_gauges();
                crate::metrics::record_process();
                text(
                    self.metrics.render().into(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            }
            Operation::Livez => probe(true),
            Operation::Readyz => probe(self.gateway.is_ready()),
            Operation::OpenApiJson => {
                json_response(StatusCode::OK, Bytes::from_static(OPENAPI_JSON.as_bytes()))
            }
            Operation::OpenApiYaml => text(
                Bytes::from_static(OPENAPI_YAML.as_bytes()),
                "application/yaml",
            ),
            Operation::Routes => {
                self.authorize_read(&req)?;
                let mut body = describe(&self.gateway.router());
                body["fleet_revision"] = self.app.fleet().applied().revision.into();
                reply(StatusCode::OK, &body)
            }
            Operation::Fleet => {
                self.authorize_read(&req)?;
                self.fleet().await?
            }
            Operation::SetSplit => {
                self.authorize(&req)?;
                let name = parameter.to_owned();
                let wait = wait_of(req.uri())?;
                let body = read_body(req).await.map_err(ClientError::BadRequest)?;
                let weights = split_weights(&body).map_err(ClientError::BadRequest)?;
                self.change_split(&name, Some(&weights), wait).await?
            }
            Operation::ResetSplit => {
                self.authorize(&req)?;
                let wait = wait_of(req.uri())?;
                self.change_split(parameter, None, wait).await?
            }
            Operation::Rollouts => {
                self.authorize_read(&req)?;
                let rollouts = self
                    .app
                    .fleet()
                    .control()
                    .db()
                    .rollouts(None)
                    .await
                    .map_err(fleet_unavailable)?;
                reply(StatusCode::OK, &json!({ "rollouts": rollouts }))
            }
            Operation::StartRollout => {
                self.authorize(&req)?;
                let body = read_body(req).await.map_err(ClientError::BadRequest)?;
                let ask = rollout_ask(&body).map_err(ClientError::BadRequest)?;
                self.start_rollout(&ask).await?
            }
            Operation::AbortRollout => {
                self.authorize(&req)?;
                self.abort_rollout(parameter).await?
            }
            Operation::Reload => {
                self.authorize(&req)?;
                let reloaded =
                    self.reloader
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
        };
        Ok(rsp)
    }

    /// Lets a read through: anyone's on a loopback listener, else only with the token.
    ///
    /// # Errors
    /// The listener is reachable beyond loopback and the request lacks the token.
    fn authorize_read<B>(&self, req: &Request<B>) -> Result<(), ClientError> {
        if self.guard_reads {
            self.authorize(req)
        } else {
            Ok(())
        }
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

    /// Sets (or with `None` resets) the split of route `name` fleet-wide; with `wait`,
    /// waits until every live task has applied it. 200 when applied everywhere (or not
    /// waited for), 202 when some task had not applied it when the wait ended.
    ///
    /// # Errors
    /// No such route, no split on it, a group it does not have, weights that sum to 0,
    /// or PostgreSQL unreachable.
    async fn change_split(
        &self,
        name: &str,
        weights: Option<&BTreeMap<String, u32>>,
        wait: Option<Duration>,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        // What the change puts in force: the whole new split, or the file's weights.
        let (weights, now) = {
            let router = self.gateway.router();
            let split = split_named(&router, name)?;
            let weights = weights
                .map(|w| split.complete(w))
                .transpose()
                .map_err(|e| match e {
                    SplitError::UnknownGroup(..) => ClientError::NotFound(e.to_string()),
                    SplitError::ZeroSum => ClientError::BadRequest(e.to_string()),
                })?;
            let now = weights.clone().unwrap_or_else(|| split.file_weights());
            (weights, now)
        };
        let fleet = self.app.fleet();
        let committed = fleet
            .change(name, weights.as_ref())
            .await
            .map_err(fleet_unavailable)?
            .ok_or_else(|| {
                ClientError::Conflict(format!(
                    "a rollout is running on route {name} and would overwrite the change: \
                     POST /admin/rollouts/{name}/abort first, or wait for it to end"
                ))
            })?;
        tracing::info!(route = name, weights = ?weights, revision = committed.revision, "Split changed fleet-wide through the admin API.");
        let waited = match wait {
            Some(limit) => Some(
                fleet
                    .control()
                    .wait_applied(committed, limit)
                    .await
                    .map_err(fleet_unavailable)?,
            ),
            None => None,
        };
        let status = match &waited {
            Some(waited) if !waited.applied => StatusCode::ACCEPTED,
            _ => StatusCode::OK,
        };
        Ok(reply(
            status,
            &json!({
                "route": name,
                "split": now,
                "runtime": weights.is_some(),
                "revision": committed.revision,
                "committed_at": committed.committed_at,
                "wait": waited,
            }),
        ))
    }

    /// Starts a rollout and drives it from this task (another takes over if this one
    /// dies): 201 with the rollout.
    ///
    /// # Errors
    /// A bad ask, a rollout already running on the route, or PostgreSQL unreachable.
    async fn start_rollout(
        &self,
        ask: &RolloutAsk,
    ) -> Result<Response<ResponseBody>, GatewayError> {
        // Malformed is 400 whatever the route, so the contract's rules are checked first.
        let shape = ask.shape().map_err(ClientError::BadRequest)?;
        let plan = {
            let router = self.gateway.router();
            let split = split_named(&router, &ask.route)?;
            crate::control::plan(ask, shape, split, &split.weights()).map_err(|e| match e {
                PlanError::NoSuchGroup { .. } => ClientError::NotFound(e.to_string()),
                PlanError::NothingToMove { .. } => ClientError::Conflict(e.to_string()),
            })?
        };
        let fleet = self.app.fleet();
        let started = fleet
            .control()
            .start_rollout(&plan, fleet.id())
            .await
            .map_err(fleet_unavailable)?
            .ok_or_else(|| {
                ClientError::Conflict(format!(
                    "a rollout is already running on route {}: see GET /admin/rollouts",
                    ask.route
                ))
            })?;
        fleet.drive(started.id);
        tracing::info!(
            rollout = started.id,
            route = ask.route,
            to = ask.to,
            "Rollout started through the admin API."
        );
        Ok(reply(StatusCode::CREATED, &json!(started)))
    }

    /// Aborts the rollout running on `route`, the route back to 100 % of its previous
    /// group fleet-wide: 200 with the rollout and the change's revision.
    ///
    /// # Errors
    /// No rollout running on the route, or PostgreSQL unreachable.
    async fn abort_rollout(&self, route: &str) -> Result<Response<ResponseBody>, GatewayError> {
        let (rollout, committed) = self
            .app
            .fleet()
            .abort_rollout(route, "aborted through the admin API")
            .await
            .map_err(fleet_unavailable)?
            .ok_or_else(|| {
                ClientError::NotFound(format!("no rollout is running on route {route}"))
            })?;
        Ok(reply(
            StatusCode::OK,
            &json!({
                "rollout": rollout,
                "revision": committed.revision,
                "committed_at": committed.committed_at,
            }),
        ))
    }

    /// The live tasks, from their heartbeats.
    async fn fleet(&self) -> Result<Response<ResponseBody>, GatewayError> {
        let fleet = self.app.fleet();
        let control = fleet.control();
        let (snapshot, tasks) =
            tokio::try_join!(control.snapshot(), control.tasks()).map_err(fleet_unavailable)?;
        Ok(reply(
            StatusCode::OK,
            &json!({
                "revision": snapshot.revision,
                "task": { "id": fleet.id(), "applied_revision": fleet.applied().revision },
                "tasks": tasks,
                "overrides": snapshot.overrides,
            }),
        ))
    }
}

/// The split of route `name`.
fn split_named<'r>(
    router: &'r Router,
    name: &str,
) -> Result<&'r Arc<crate::proxy::Split>, ClientError> {
    match router.route_named(name).map(|r| &r.handler) {
        Some(Handler::Split(split)) => Ok(split),
        Some(_) => Err(ClientError::NotFound(format!("route {name} has no split"))),
        None => Err(ClientError::NotFound(format!("no route named {name}"))),
    }
}

/// Logs why the fleet state could not be reached; the client gets the plain 503.
fn fleet_unavailable(error: app_core::store::StoreError) -> GatewayError {
    tracing::warn!(error = %app_core::ErrorChain(&error), "Fleet state unreachable in PostgreSQL.");
    LocalError::FleetUnavailable.into()
}

/// The `wait` query parameter (`?wait=5s`): how long a change waits for every task.
fn wait_of(uri: &http::Uri) -> Result<Option<Duration>, ClientError> {
    let Some(value) = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("wait="))
    else {
        return Ok(None);
    };
    // Whole seconds, as the API contract's pattern says: what it allows is what is taken.
    let seconds = value
        .strip_suffix('s')
        .filter(|n| (1..=2).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u64>().ok());
    match seconds.map(Duration::from_secs) {
        Some(wait) if wait <= MAX_WAIT => Ok(Some(wait)),
        _ => Err(ClientError::BadRequest(format!(
            "wait must be whole seconds up to {}s, such as 5s, got {value:?}",
            MAX_WAIT.as_secs()
        ))),
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
                Handler::Split(split) => json!({
                    "split": split.weights(),
                    "file_split": split.file_weights(),
                }),
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

/// Reads a body of at most [`MAX_BODY`] bytes, or says why not.
async fn read_body<B>(req: Request<B>) -> Result<Bytes, String>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(format!(
            "cannot read the body (at most {MAX_BODY} bytes): {e}"
        )),
    }
}

/// A split's weights from its JSON body, or what is wrong with it. A weight is an integer
/// from 0 to 2^32−1, written `7` or `7.0` (JSON does not tell the two apart, nor does the
/// contract's `integer`); `7.5` is refused.
fn split_weights(body: &[u8]) -> Result<BTreeMap<String, u32>, String> {
    // serde's own message names Rust types ("expected a map"): only where it went wrong
    // is kept.
    let numbers: BTreeMap<String, serde_json::Number> =
        serde_json::from_slice(body).map_err(|e| {
            let what = match e.classify() {
                serde_json::error::Category::Data => {
                    "the body must be a JSON object of group names to integer weights"
                }
                _ => "the body is not valid JSON",
            };
            format!("{what} (line {}, column {})", e.line(), e.column())
        })?;
    numbers
        .into_iter()
        .map(|(group, number)| match weight(&number) {
            Some(weight) => Ok((group, weight)),
            None => Err(format!(
                "the weight of group {group} must be an integer from 0 to {}, not {number}",
                u32::MAX
            )),
        })
        .collect()
}

/// A rollout from its JSON body, or what is wrong with it (in the API's words, not
/// serde's).
fn rollout_ask(body: &[u8]) -> Result<RolloutAsk, String> {
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => {
                "the body must be a JSON object with exactly route, to, steps (integers), \
                 interval, max_error_rate and max_p99 (strings)"
            }
            _ => "the body is not valid JSON",
        };
        format!("{what} (line {}, column {})", e.line(), e.column())
    })
}

/// `number` as a weight, when it is a whole number in `u32`'s range.
fn weight(number: &serde_json::Number) -> Option<u32> {
    if let Some(n) = number.as_u64() {
        return u32::try_from(n).ok();
    }
    let x = number.as_f64()?;
    // Whole and in range, so the cast is exact.
    (x.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&x)).then_some(x as u32)
}

/// A 200 with `body` of `content_type`.
fn text(body: Bytes, content_type: &'static str) -> Response<ResponseBody> {
    let mut rsp = Response::new(Either::Left(Full::new(body)));
    rsp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    rsp
}

fn reply(status: StatusCode, body: &Value) -> Response<ResponseBody> {
    json_response(status, Bytes::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation: add a method to an endpoint without its `Allow`, and this fails.
    #[test]
    fn every_allow_lists_its_endpoints_methods() {
        for endpoint in &ENDPOINTS {
            let methods: Vec<&str> = endpoint.methods().map(Method::as_str).collect();
            assert_eq!(endpoint.allow, methods.join(", "), "{}", endpoint.path);
        }
    }

    /// Mutation: answer a wrong method on `/` with 404 (the old match's fall-through),
    /// and this fails.
    #[test]
    fn a_known_path_with_another_method_is_405_with_allow() {
        for (method, path, allow) in [
            (Method::POST, "/", "GET, HEAD"),
            (Method::DELETE, "/metrics", "GET, HEAD"),
            (Method::GET, "/admin/routes/web/split", "PUT, DELETE"),
            (Method::GET, "/admin/reload", "POST"),
        ] {
            match operation(&method, path) {
                Err(ClientError::MethodNotAllowed { allow: said }) => assert_eq!(said, allow),
                other => panic!("{method} {path}: {other:?}"),
            }
        }
        assert!(matches!(
            operation(&Method::GET, "/nope"),
            Err(ClientError::NoRoute)
        ));
        assert!(matches!(
            operation(&Method::PUT, "/admin/routes/web/split"),
            Ok((Operation::SetSplit, "web"))
        ));
    }

    /// Mutation: parse weights as `u32` again (schemathesis' `7033.0`), or let `7.5` round
    /// down, and this fails.
    #[test]
    fn integral_weights_are_accepted_and_others_refused_by_name() {
        let weights = split_weights(br#"{"blue": 7033.0, "green": 0, "red": 4294967295}"#);
        assert_eq!(
            weights,
            Ok(BTreeMap::from([
                ("blue".to_owned(), 7033),
                ("green".to_owned(), 0),
                ("red".to_owned(), u32::MAX),
            ]))
        );
        for (body, said) in [
            (
                r#"{"blue": 7.5}"#,
                "the weight of group blue must be an integer from 0 to 4294967295, not 7.5",
            ),
            (r#"{"blue": -1}"#, "not -1"),
            (r#"{"blue": 4294967296}"#, "not 4294967296"),
            (r#"{"blue": 1e10}"#, "not 10000000000.0"),
            (
                r#"{"blue": "1"}"#,
                "the body must be a JSON object of group names to integer weights",
            ),
            ("[1]", "the body must be a JSON object"),
            ("{", "the body is not valid JSON (line 1, column 1)"),
        ] {
            let refused = split_weights(body.as_bytes()).unwrap_err();
            assert!(refused.contains(said), "{body}: {refused}");
        }
    }
}
