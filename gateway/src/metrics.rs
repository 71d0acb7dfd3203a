//! Prometheus metrics: the process-wide recorder and the per-route request metrics.
//!
//! Names are `tiergate_*` in base units. Every histogram has explicit buckets: without
//! them the exporter renders summaries, which cannot be summed across tasks.

use std::sync::{Arc, OnceLock};

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
        process().describe();
        metrics::gauge!(
            "tiergate_build_info",
            "version" => env!("CARGO_PKG_VERSION"),
            "commit" => build_info::COMMIT,
            "rustc" => env!("TIERGATE_RUSTC")
        )
        .set(1.0);
        // Registered now, so that it reads 0 rather than missing while nothing is dropped
        // (or access lines are off).
        let _ = metrics::counter!("tiergate_access_log_dropped_total");
        let _ = metrics::counter!("tiergate_trace_spans_exported_total");
        let _ = metrics::counter!("tiergate_trace_spans_dropped_total");
        spawn_upkeep(handle.clone())?;
    }
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

/// The process's collector (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
/// `process_open_fds`, `process_start_time_seconds`, …).
fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Reads the process's CPU time, memory and file descriptors into their gauges; call
/// before rendering metrics so they are current.
pub fn record_process() {
    process().collect();
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
    metrics::describe_gauge!(
        "tiergate_build_info",
        "Always 1; the labels say which build runs (version, git commit, rustc version)."
    );
    metrics::describe_counter!(
        "tiergate_http_requests_total",
        "HTTP requests by route, status class and status code (`other` for uncommon codes)."
    );
    metrics::describe_counter!(
        "tiergate_http_shed_total",
        "Requests answered 503 at once because http.max_in_flight were in flight."
    );
    metrics::describe_counter!(
        "tiergate_access_log_dropped_total",
        "Access lines refused because the writer fell behind (stdout slow or stalled)."
    );
    metrics::describe_counter!(
        "tiergate_trace_spans_exported_total",
        "Spans the OTLP collector took (trace.otlp_endpoint)."
    );
    metrics::describe_counter!(
        "tiergate_trace_spans_dropped_total",
        "Spans dropped: the export queue was full, or the collector did not take their batch."
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

/// The status codes counted under a `code` label of their own: those the gateway and the
/// app answer with, and the common ones of upstreams. Any other is counted as `other`
/// within its class, so a route has at most this many series and five more.
const CODES: [(u16, &str); 42] = [
    (100, "100"),
    (101, "101"),
    (200, "200"),
    (201, "201"),
    (202, "202"),
    (204, "204"),
    (206, "206"),
    (301, "301"),
    (302, "302"),
    (303, "303"),
    (304, "304"),
    (307, "307"),
    (308, "308"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (406, "406"),
    (408, "408"),
    (409, "409"),
    (410, "410"),
    (411, "411"),
    (412, "412"),
    (413, "413"),
    (414, "414"),
    (415, "415"),
    (416, "416"),
    (421, "421"),
    (422, "422"),
    (425, "425"),
    (426, "426"),
    (428, "428"),
    (429, "429"),
    (431, "431"),
    (451, "451"),
    (500, "500"),
    (501, "501"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
    (505, "505"),
];

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The request metrics of one route. A status's counter is registered the first time the
/// route answers with it (so `/metrics` lists the codes seen, not every possible one);
/// from then on recording is an atomic add. Cheap to clone: the route table hands a
/// clone to every request.
#[derive(Debug, Clone)]
pub struct RouteMetrics {
    route: Arc<str>,
    /// One slot per entry of [`CODES`], then one `other` per class.
    requests: Arc<[OnceLock<Counter>]>,
    duration: Histogram,
}

impl RouteMetrics {
    /// Handles for the route named `route` (a bounded label: never the raw path).
    pub fn new(route: String) -> Self {
        let duration =
            metrics::histogram!("tiergate_http_request_duration_seconds", "route" => route.clone());
        Self {
            route: route.into(),
            requests: (0..CODES.len() + CLASSES.len())
                .map(|_| OnceLock::new())
                .collect(),
            duration,
        }
    }

    /// Counts one request with its status and duration.
    pub fn observe(&self, status: http::StatusCode, seconds: f64) {
        let code = status.as_u16();
        let class = usize::from(code / 100).clamp(1, 5) - 1;
        let (slot, label) = match CODES.binary_search_by_key(&code, |(c, _)| *c) {
            Ok(i) => (i, CODES[i].1),
            Err(_) => (CODES.len() + class, "other"),
        };
        self.requests[slot]
            .get_or_init(|| {
                metrics::counter!(
                    "tiergate_http_requests_total",
                    "route" => self.route.to_string(),
                    "status" => CLASSES[class],
                    "code" => label
                )
            })
            .increment(1);
        self.duration.record(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_are_sorted_and_each_label_is_its_code() {
        assert!(CODES.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(CODES.iter().all(|(code, label)| code.to_string() == *label));
    }
}
