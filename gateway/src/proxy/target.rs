//! One target of an upstream group and what is known about it: requests in flight (for
//! the balancer), the active checks' verdict, and passive ejection.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderValue;
use http::uri::Authority;
use metrics::{Counter, Gauge, Histogram};
use tiergate_config::OutlierSettings;

/// A target: `host:port` of a group.
#[derive(Debug)]
pub struct Target {
    /// `host:port` as configured (a metric label and the admin API's name for it).
    pub address: String,
    /// The same, as the authority of the URIs sent to it.
    pub(crate) authority: Authority,
    /// The same, as the `Host` header `host_header = "target"` sends.
    pub(crate) host: HeaderValue,
    /// Share of the traffic under `balance = "weighted"`.
    pub weight: u32,
    in_flight: AtomicUsize,
    /// The active checks' verdict; `true` until checks say otherwise (and always `true`
    /// without checks).
    healthy: AtomicBool,
    /// Consecutive passed (positive) or failed (negative) checks since the last change.
    check_streak: AtomicU32,
    failures: AtomicU32,
    ejections: AtomicU32,
    /// Milliseconds since [`epoch`] until which the target is ejected; 0: not ejected.
    ejected_until: AtomicU64,
    pub(crate) metrics: TargetMetrics,
}

/// A request in flight to a target, counted until the response body ends or is dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Target>);

impl InFlight {
    pub(crate) fn target(&self) -> &Arc<Target> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Target {
    pub(crate) fn new(group: &str, address: &str, weight: u32) -> Result<Self, http::Error> {
        let authority: Authority = address.parse().map_err(http::Error::from)?;
        let host = HeaderValue::from_str(address).map_err(http::Error::from)?;
        Ok(Self {
            address: address.to_owned(),
            authority,
            host,
            weight,
            in_flight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            check_streak: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            metrics: TargetMetrics::new(group, address),
        })
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// The active checks' verdict.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Whether passive ejection holds it out of rotation now.
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Whether it gets traffic: healthy and not ejected.
    pub fn available(&self) -> bool {
        self.healthy() && !self.ejected()
    }

    /// A real request succeeded: the failure streak ends.
    pub(crate) fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 && !self.ejected() {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A real request failed (connect, broken exchange, 5xx). At `consecutive_failures`
    /// in a row the target is ejected, each time in a row for twice as long.
    pub(crate) fn record_failure(&self, outlier: &OutlierSettings) {
        if outlier.consecutive_failures == 0 {
            return;
        }
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < outlier.consecutive_failures || self.ejected() {
            return;
        }
        self.failures.store(0, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed);
        let factor = 1u32 << n.min(16);
        let time = outlier
            .base_ejection
            .saturating_mul(factor)
            .min(outlier.max_ejection);
        let until = now_ms() + u64::try_from(time.as_millis()).unwrap_or(u64::MAX / 2);
        self.ejected_until.store(until.max(1), Ordering::Relaxed);
        self.metrics.ejections.increment(1);
        tracing::warn!(
            target = self.address,
            failures,
            ejection_ms = time.as_millis(),
            "Target ejected after consecutive failures."
        );
    }

    /// One active check's result; flips the verdict after `threshold` in a row.
    pub(crate) fn record_check(
        &self,
        passed: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) {
        let healthy = self.healthy();
        if passed == healthy {
            self.check_streak.store(0, Ordering::Relaxed);
            return;
        }
        let streak = self.check_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = if passed {
            healthy_threshold
        } else {
            unhealthy_threshold
        };
        if streak >= threshold {
            self.check_streak.store(0, Ordering::Relaxed);
            self.healthy.store(passed, Ordering::Relaxed);
            if passed {
                // Back in service: the passive record starts afresh too.
                self.ejected_until.store(0, Ordering::Relaxed);
                self.ejections.store(0, Ordering::Relaxed);
                self.failures.store(0, Ordering::Relaxed);
            }
            self.metrics.healthy.set(if passed { 1.0 } else { 0.0 });
            tracing::info!(
                target = self.address,
                healthy = passed,
                "Target health changed."
            );
        }
    }
}

/// Milliseconds since the first call, on the monotonic clock (never 0 after the first
/// millisecond, so 0 can mean "not ejected").
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - Duration::from_millis(1));
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
}

/// A target's metrics, registered once per (group, target).
#[derive(Debug)]
pub(crate) struct TargetMetrics {
    /// By status class 1xx … 5xx.
    pub(crate) responses: [Counter; 5],
    /// Time to the response head.
    pub(crate) duration: Histogram,
    pub(crate) connect_errors: Counter,
    pub(crate) exchange_errors: Counter,
    pub(crate) timeouts: Counter,
    /// No connection came free under `max_connections_per_target`.
    pub(crate) saturated: Counter,
    pub(crate) ejections: Counter,
    /// Response bodies cut at `request_timeout`, by the side that was waited on.
    pub(crate) cut_client: Counter,
    pub(crate) cut_upstream: Counter,
    pub(crate) healthy: Gauge,
    /// Set from the counter when metrics are scraped, not per request.
    pub(crate) in_flight: Gauge,
}

impl TargetMetrics {
    fn new(group: &str, target: &str) -> Self {
        let labels = [("group", group.to_owned()), ("target", target.to_owned())];
        let class = |c: &'static str| {
            let mut labels = labels.to_vec();
            labels.push(("status", c.to_owned()));
            metrics::counter!("tiergate_upstream_responses_total", &labels)
        };
        let error = |kind: &'static str| {
            let mut labels = labels.to_vec();
            labels.push(("kind", kind.to_owned()));
            metrics::counter!("tiergate_upstream_errors_total", &labels)
        };
        let cut = |side: &'static str| {
            let mut labels = labels.to_vec();
            labels.push(("side", side.to_owned()));
            metrics::counter!("tiergate_upstream_responses_cut_total", &labels)
        };
        let healthy = metrics::gauge!("tiergate_upstream_target_healthy", &labels);
        healthy.set(1.0);
        Self {
            responses: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: metrics::histogram!("tiergate_upstream_response_duration_seconds", &labels),
            connect_errors: error("connect"),
            exchange_errors: error("exchange"),
            timeouts: error("timeout"),
            saturated: error("saturated"),
            ejections: metrics::counter!("tiergate_upstream_ejections_total", &labels),
            cut_client: cut("client"),
            cut_upstream: cut("upstream"),
            healthy,
            in_flight: metrics::gauge!("tiergate_upstream_requests_in_flight", &labels),
        }
    }

    pub(crate) fn response(&self, status: http::StatusCode, seconds: f64) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.responses[class].increment(1);
        self.duration.record(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier(failures: u32) -> OutlierSettings {
        OutlierSettings {
            consecutive_failures: failures,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
        }
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_breaks_the_streak() {
        let t = Target::new("g", "127.0.0.1:1", 1).unwrap();
        let o = outlier(3);
        t.record_failure(&o);
        t.record_failure(&o);
        t.record_success();
        t.record_failure(&o);
        t.record_failure(&o);
        assert!(t.available());
        t.record_failure(&o);
        assert!(t.ejected() && !t.available());
        assert!(!Target::new("g", "127.0.0.1:1", 1).unwrap().ejected());
    }

    #[test]
    fn zero_consecutive_failures_never_ejects() {
        let t = Target::new("g", "127.0.0.1:1", 1).unwrap();
        for _ in 0..100 {
            t.record_failure(&outlier(0));
        }
        assert!(t.available());
    }

    #[test]
    fn checks_flip_the_verdict_only_after_the_threshold_in_a_row() {
        let t = Target::new("g", "127.0.0.1:1", 1).unwrap();
        t.record_check(false, 2, 3);
        t.record_check(false, 2, 3);
        t.record_check(true, 2, 3);
        t.record_check(false, 2, 3);
        t.record_check(false, 2, 3);
        assert!(t.healthy());
        t.record_check(false, 2, 3);
        assert!(!t.healthy());
        t.record_check(true, 2, 3);
        assert!(!t.healthy());
        t.record_check(true, 2, 3);
        assert!(t.healthy());
    }
}
