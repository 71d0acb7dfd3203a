//! Prometheus metrics: the process-wide recorder and the per-route request metrics.
//!
//! Names are `tiergate_*` in base units. Every histogram has explicit buckets: without
//! them the exporter renders summaries, which cannot be summed across tasks.

use std::sync::OnceLock;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Request latency buckets, in seconds: from an L1 hit to a slow upstream.
const DURATION_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// As the exporter's own upkeep task would, had it its own listener.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global recorder on first call and returns the handle that renders it.
/// Later calls (several servers in one test process) share the first recorder.
///
/// # Errors
/// The buckets are refused, or another recorder was installed by someone else.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), DURATION_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    if HANDLE.set(handle.clone()).is_ok() {
        metrics::set_global_recorder(recorder)?;
        describe();
        spawn_upkeep(handle.clone())?;
    }
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

/// Folds the histograms' recorded samples into their buckets every few seconds. The
/// recorder keeps every sample until then (or until a scrape): without this, an instance
/// nobody scrapes grew by about 20 bytes per request.
fn spawn_upkeep(handle: PrometheusHandle) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        })?;
    Ok(())
}

fn describe() {
    metrics::describe_counter!(
        "tiergate_http_requests_total",
        "HTTP requests by route and status class."
    );
    metrics::describe_counter!(
        "tiergate_http_shed_total",
        "Requests answered 503 at once because http.max_in_flight were in flight."
    );
    metrics::describe_counter!(
        "tiergate_access_log_dropped_total",
        "Access lines refused because the writer fell behind (stdout slow or stalled)."
    );
    metrics::describe_histogram!(
        "tiergate_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from request head to response head, by route."
    );
    metrics::describe_counter!(
        "tiergate_upstream_requests_total",
        "Requests forwarded to an upstream group (retries not counted again)."
    );
    metrics::describe_counter!(
        "tiergate_upstream_responses_total",
        "Upstream responses by group, target and status class."
    );
    metrics::describe_histogram!(
        "tiergate_upstream_response_duration_seconds",
        metrics::Unit::Seconds,
        "Time from sending to an upstream target to its response head."
    );
    metrics::describe_counter!(
        "tiergate_upstream_errors_total",
        "Failed upstream attempts by group, target and kind (connect, exchange, timeout, saturated)."
    );
    metrics::describe_counter!(
        "tiergate_upstream_retries_total",
        "Attempts repeated on another target, by group."
    );
    metrics::describe_counter!(
        "tiergate_upstream_retries_refused_total",
        "Retries the retry budget refused, by group."
    );
    metrics::describe_counter!(
        "tiergate_upstream_no_target_total",
        "Requests answered 503 because no target was healthy and fail_open is off."
    );
    metrics::describe_counter!(
        "tiergate_upstream_ejections_total",
        "Passive ejections of a target after consecutive failures."
    );
    metrics::describe_gauge!(
        "tiergate_upstream_target_healthy",
        "1 while the active health checks find a target healthy, else 0."
    );
    metrics::describe_gauge!(
        "tiergate_upstream_requests_in_flight",
        "Requests in flight to a target (connections in use, for HTTP/1.1), at scrape time."
    );
    metrics::describe_counter!(
        "tiergate_upstream_connections_created_total",
        "Connections opened to a target; with the requests, the pool's reuse ratio."
    );
    metrics::describe_gauge!(
        "tiergate_upstream_connections_open",
        "Connections open to a target (in use and idle)."
    );
    metrics::describe_gauge!(
        "tiergate_db_pool_connections",
        "PostgreSQL pool connections by pool and state."
    );
    metrics::describe_gauge!(
        "tiergate_cache_l1_entries",
        "Entries in the in-process cache."
    );
    metrics::describe_gauge!(
        "tiergate_cache_l1_bytes",
        "Approximate bytes held by the in-process cache."
    );
    metrics::describe_gauge!(
        "tiergate_cache_l2_breaker_open",
        "1 while the Redis circuit breaker is open (or letting its one probe through), so reads skip Redis; else 0."
    );
}

/// The request metrics of one route, registered once: recording is atomic adds.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    /// Indexed by status class: 1xx … 5xx.
    requests: [Counter; 5],
    duration: Histogram,
}

impl RouteMetrics {
    /// Handles for the route named `route` (a bounded label: never the raw path).
    pub fn new(route: String) -> Self {
        let class = |c: &'static str| metrics::counter!("tiergate_http_requests_total", "route" => route.clone(), "status" => c);
        Self {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: metrics::histogram!("tiergate_http_request_duration_seconds", "route" => route.clone()),
        }
    }

    /// Counts one request with its status and duration.
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.requests[class].increment(1);
        self.duration.record(seconds);
    }
}
