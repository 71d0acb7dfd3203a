//! The settings of the reverse proxy: routes, upstream groups and how requests are
//! forwarded. `routes` and `upstreams` are arrays of tables, given whole by the file (the
//! environment does not set them); `tiergate` reloads them on SIGHUP and
//! `POST /admin/reload` without a restart.
//!
//! ```toml
//! [[routes]]                 # the app's own routes come first in the example…
//! name = "items"
//! path = "/items"
//! app = true
//!
//! [[routes]]                 # …and everything else is split between two groups
//! name = "web"
//! path = "/"
//! split = { blue = 100, green = 0 }
//!
//! [[upstreams]]
//! name = "blue"
//! targets = ["10.0.1.10:8080", { address = "10.0.1.11:8080", weight = 2 }]
//! [upstreams.health_check]
//! path = "/"
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Secret;

/// One route: which requests it matches, and what answers them.
///
/// A request is matched on its host first — exact names before `*.` wildcards (the
/// longest suffix first) before routes without a host — and then on its path, the
/// longest `path` prefix winning. A prefix matches whole segments: `/items` matches
/// `/items` and `/items/7`, never `/itemsx`. Exactly one of `app`, `upstream`, `split`
/// and `redirect` says what answers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Bounded label for logs and metrics, and the route's name in the admin API: 1 to
    /// 64 of `a-z`, `0-9`, `-`, `_`. Unique.
    pub name: String,
    /// Host to match, without port: exact (`api.example.com`) or a wildcard of one or
    /// more leading labels (`*.example.com`, which does not match `example.com`).
    /// Default: any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Path prefix to match, starting with `/`. Default `/` (everything).
    #[serde(default = "root")]
    pub path: String,
    /// Match only the exact `path`, nothing below it. Default `false`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub exact: bool,
    /// Answered by the in-process app (`/items`, `/health`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub app: bool,
    /// Forwarded to this upstream group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Forwarded to one of these groups, chosen per request by weight (blue/green and
    /// canary). The weights change at runtime through `PUT /admin/routes/{name}/split`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<BTreeMap<String, u32>>,
    /// With `split`: the cookie whose value pins a client to one group, so a user does
    /// not flip between versions from one request to the next. Default: none (each
    /// request is split on its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_cookie: Option<String>,
    /// Answered with a 308 to this URL prefix followed by the request's path and query,
    /// e.g. `https://new.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<String>,
    /// Replace the matched `path` prefix with this one before forwarding (e.g. `/`
    /// strips it: `/api/v1/x` on a route with `path = "/api"` goes up as `/v1/x`).
    /// Default: the path goes up unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_prefix: Option<String>,
}

fn root() -> String {
    "/".to_owned()
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's `skip_serializing_if` passes a reference
fn is_false(b: &bool) -> bool {
    !*b
}

impl RouteSettings {
    /// A route to the app.
    pub fn app(name: &str, path: &str, exact: bool) -> Self {
        Self {
            name: name.to_owned(),
            host: None,
            path: path.to_owned(),
            exact,
            app: true,
            upstream: None,
            split: None,
            sticky_cookie: None,
            redirect: None,
            rewrite_prefix: None,
        }
    }

    /// A route that forwards everything under `path` to the group `upstream`.
    pub fn upstream(name: &str, path: &str, upstream: &str) -> Self {
        Self {
            app: false,
            upstream: Some(upstream.to_owned()),
            ..Self::app(name, path, false)
        }
    }

    /// The built-in table: `/items` and `/health` to the app, nothing else. Configuring
    /// `routes` replaces it, so a configuration that proxies keeps the app's routes only
    /// when it lists them.
    pub fn defaults() -> Vec<Self> {
        vec![
            Self::app("items", "/items", false),
            Self::app("health", "/health", true),
        ]
    }
}

/// An upstream group: interchangeable targets behind one balancer and one pool of
/// keep-alive connections (what an ALB calls a target group).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// The group's name, used by routes and splits, in metrics and the admin API: 1 to 64
    /// of `a-z`, `0-9`, `-`, `_`. Unique.
    pub name: String,
    /// `"host:port"`, or `{ address = "host:port", weight = 3 }`. Names are resolved
    /// when a connection is made, and again every `resolve_interval`. At least one.
    pub targets: Vec<TargetSettings>,
    /// How often target names are resolved again. When an address changed, requests
    /// move to a fresh pool, so kept-alive connections to the old address are not used
    /// again (those in use finish). `0s`: only when connecting. Default 30s.
    #[serde(default = "default_resolve_interval", with = "humantime_serde")]
    pub resolve_interval: Duration,
    /// How a target is picked. Default `least_outstanding`.
    #[serde(default)]
    pub balance: Balance,
    /// HTTP version spoken to the targets: `"http1"` (keep-alive HTTP/1.1) or `"h2"`
    /// (HTTP/2 without TLS, prior knowledge). Default `"http1"`.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// The `Host` sent up: `"preserve"` the client's, or `"target"` (the target's
    /// `host:port`). Default `"preserve"`.
    #[serde(default)]
    pub host_header: HostHeader,
    /// Limit for a TCP connect to a target; a failed connect is retried on another
    /// target. Default 2s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Limit from sending the request to the response head; past it: 504. Default 30s.
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Limit for the whole exchange, bodies included; past it: 504 before the response
    /// head, a cut response after it. Default 60s.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long an unused keep-alive connection to a target is kept. Keep it below the
    /// targets' own keep-alive timeout, or a request may meet a connection the target has
    /// just closed. Default 30s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most idle connections kept per target. Default 256.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_target: usize,
    /// Most connections open at once to one target (HTTP/1.1 groups), so a burst cannot
    /// open more than the target can take. A request that finds them all busy waits up to
    /// `connect_timeout` for one to come free, then tries another target or gets 503
    /// `upstream_saturated`. `0` (default): no limit, as nginx's and HAProxy's defaults.
    #[serde(default)]
    pub max_connections_per_target: usize,
    /// Requests forwarded to the group at once (load shedding, as `http.max_in_flight`
    /// for the app, whose budget it never touches): one more gets 503 `overloaded` with
    /// `Retry-After` at once, and no target is blamed. At least 1. Default 1024.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Active health checks; none by default (then only passive ejection judges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSettings>,
    /// Passive outlier ejection.
    #[serde(default)]
    pub outlier: OutlierSettings,
    /// When no target is healthy: `true` sends to all of them anyway (as an ALB does:
    /// the checks may be what is broken), `false` answers 503. Default `true`.
    #[serde(default = "yes")]
    pub fail_open: bool,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_resolve_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_max_in_flight() -> u32 {
    1024
}
fn default_max_idle() -> usize {
    256
}
fn yes() -> bool {
    true
}

impl UpstreamSettings {
    /// A group of `targets` with every other setting at its default.
    pub fn new(name: &str, targets: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            targets: targets
                .iter()
                .map(|a| TargetSettings::Address((*a).to_owned()))
                .collect(),
            balance: Balance::default(),
            protocol: UpstreamProtocol::default(),
            host_header: HostHeader::default(),
            connect_timeout: default_connect_timeout(),
            response_timeout: default_response_timeout(),
            request_timeout: default_request_timeout(),
            idle_timeout: default_idle_timeout(),
            max_idle_per_target: default_max_idle(),
            max_connections_per_target: 0,
            max_in_flight: default_max_in_flight(),
            resolve_interval: default_resolve_interval(),
            health_check: None,
            outlier: OutlierSettings::default(),
            fail_open: true,
        }
    }
}

/// One target of a group.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a \"host:port\" string or a table { address = \"host:port\", weight = N }"
)]
pub enum TargetSettings {
    /// `"host:port"`, weight 1.
    Address(String),
    /// With a weight (used by `balance = "weighted"`).
    Weighted {
        /// `host:port`.
        address: String,
        /// Share of the traffic relative to the others. At least 1.
        weight: u32,
    },
}

impl TargetSettings {
    /// `host:port`.
    pub fn address(&self) -> &str {
        match self {
            Self::Address(a) | Self::Weighted { address: a, .. } => a,
        }
    }

    /// The weight; 1 when not given.
    pub fn weight(&self) -> u32 {
        match self {
            Self::Address(_) => 1,
            Self::Weighted { weight, .. } => *weight,
        }
    }
}

/// How a group picks a target for a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each target in turn.
    RoundRobin,
    /// In proportion to the targets' weights.
    Weighted,
    /// The one with fewer requests in flight of two picked at random ("power of two
    /// choices"): adapts to slow targets without the herd behaviour of always picking
    /// the global minimum.
    #[default]
    LeastOutstanding,
}

/// The HTTP version spoken to a group's targets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over plain TCP (prior knowledge).
    H2,
}

/// The `Host` header sent to a target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostHeader {
    /// The client's.
    #[default]
    Preserve,
    /// The target's `host:port`.
    Target,
}

/// Active health checks of a group, like an ALB target group's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckSettings {
    /// Path requested with `GET`; any 2xx or 3xx is healthy. Default `/`.
    pub path: String,
    /// Time between checks of a target. Default 5s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Limit of one check. Less than `interval`. Default 2s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passed checks that make an unhealthy target healthy. Default 2.
    pub healthy_threshold: u32,
    /// Consecutive failed checks that make a healthy target unhealthy. Default 2.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckSettings {
    fn default() -> Self {
        Self {
            path: "/".to_owned(),
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        }
    }
}

/// Passive outlier ejection: a target that keeps failing real requests is taken out of
/// rotation for a while, before the active checks (if any) notice.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierSettings {
    /// Consecutive failures (failed connects, broken exchanges, 5xx answers) that eject a
    /// target; `0` turns ejection off. Default 5.
    pub consecutive_failures: u32,
    /// How long the first ejection lasts; each further ejection in a row doubles it.
    /// Default 5s.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// The longest an ejection lasts. Default 60s.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
        }
    }
}

/// How requests are forwarded, for every upstream group.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// Proxies in front of Tiergate whose `X-Forwarded-*` headers are believed, counted
    /// from the right of `X-Forwarded-For`: 1 behind an ALB, 0 when clients connect
    /// directly. Untrusted entries are dropped before forwarding, so a client cannot
    /// forge its address. Default 0.
    pub trusted_hops: u32,
    /// Also send RFC 7239 `Forwarded`. Default `false`.
    pub forwarded_header: bool,
    /// Retries allowed on top of requests, as a percentage of the requests of the last
    /// ten seconds (a retry budget: retries never multiply an outage). Default 20.
    pub retry_budget_percent: u32,
    /// Retries allowed per second whatever the traffic, so a quiet service can still
    /// retry. Default 10.
    pub retry_budget_min_per_second: u32,
    /// Most attempts of one request, the first included. At least 1. Default 3.
    pub max_attempts: u32,
    /// Start a W3C trace for a request without a valid `traceparent`: upstreams get a
    /// `traceparent` naming this gateway's span, and the access line the trace's ids (a
    /// valid incoming one is always continued). Default `true`.
    pub start_traces: bool,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            trusted_hops: 0,
            forwarded_header: false,
            retry_budget_percent: 20,
            retry_budget_min_per_second: 10,
            max_attempts: 3,
            start_traces: true,
        }
    }
}

/// The admin API's access.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Bearer token of the mutating admin endpoints (`PUT /admin/routes/{name}/split`,
    /// `POST /admin/reload`); without one they answer 403. At least 16 characters.
    /// Prefer `TIERGATE_ADMIN__TOKEN` or `TIERGATE_ADMIN__TOKEN_FILE` to the file.
    pub token: Option<Secret>,
}
