//! An upstream group: its targets, the balancer that picks one per request, the pool of
//! keep-alive connections to them, and its background work: active health checks and
//! resolving the targets' names again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use metrics::Counter;
use tiergate_config::{Balance, ProxySettings, UpstreamProtocol, UpstreamSettings};

use app_core::rollout::Tally;

use super::budget::RetryBudget;
use super::connector::CountingConnector;
use super::pool::Pool;
use super::target::Target;
use crate::shed::InFlight;

/// A group of interchangeable targets.
#[derive(Debug)]
pub struct Group {
    /// The group's name (routes, splits, metrics, admin API).
    pub name: String,
    /// As configured; a reload keeps the running group (pool, health) when it is equal.
    pub(crate) settings: UpstreamSettings,
    /// The `proxy` settings it was built with (retry budget); part of the same test.
    pub(crate) proxy: ProxySettings,
    pub(crate) targets: Vec<Arc<Target>>,
    next: AtomicUsize,
    /// The pool in use; replaced by a fresh one when a target's address changes.
    pool: ArcSwap<Pool>,
    /// Health checks go through a client of their own, so they never wait behind (or
    /// hold) a connection real traffic wants. It keeps no connection: each check
    /// connects anew, as an ALB's does, and so follows a changed DNS record at once.
    checker: Client<CountingConnector, Empty<Bytes>>,
    pub(crate) budget: RetryBudget,
    /// The group's own load-shedding bound (`max_in_flight`), apart from the app's.
    pub(crate) in_flight: InFlight,
    started: AtomicBool,
    pub(crate) metrics: GroupMetrics,
    /// Its answers through splits, for the rollouts that judge it.
    pub(crate) tally: Tally,
}

#[derive(Debug)]
pub(crate) struct GroupMetrics {
    pub(crate) requests: Counter,
    pub(crate) retries: Counter,
    pub(crate) retries_refused: Counter,
    pub(crate) no_target: Counter,
    /// Proxied requests that failed on the client's side, by kind: never a target's
    /// failure.
    pub(crate) client_malformed: Counter,
    pub(crate) client_aborted: Counter,
    pub(crate) client_upload_timeout: Counter,
}

impl Group {
    /// Builds the group (no connection is made until a request needs one).
    ///
    /// # Errors
    /// A target address is not a valid URI authority (validation rules that out).
    pub fn new(settings: &UpstreamSettings, proxy: &ProxySettings) -> Result<Self, http::Error> {
        let name = settings.name.as_str();
        let targets = settings
            .targets
            .iter()
            .map(|t| Target::new(name, t.address(), t.weight()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let pool = ArcSwap::from_pointee(Pool::new(settings)?);
        let checker = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .http2_only(settings.protocol == UpstreamProtocol::H2)
            .build(CountingConnector::new(
                name,
                std::iter::empty(),
                settings.connect_timeout,
            ));
        let label = |metric: &'static str| metrics::counter!(metric, "group" => name.to_owned());
        let client_error = |kind: &'static str| metrics::counter!("tiergate_upstream_client_errors_total", "group" => name.to_owned(), "kind" => kind);
        Ok(Self {
            name: name.to_owned(),
            settings: settings.clone(),
            proxy: proxy.clone(),
            targets,
            next: AtomicUsize::new(0),
            pool,
            checker,
            budget: RetryBudget::new(proxy),
            in_flight: InFlight::new(
                settings.max_in_flight,
                label("tiergate_upstream_shed_total"),
            ),
            started: AtomicBool::new(false),
            tally: Tally::default(),
            metrics: GroupMetrics {
                requests: label("tiergate_upstream_requests_total"),
                retries: label("tiergate_upstream_retries_total"),
                retries_refused: label("tiergate_upstream_retries_refused_total"),
                no_target: label("tiergate_upstream_no_target_total"),
                client_malformed: client_error("malformed"),
                client_aborted: client_error("aborted"),
                client_upload_timeout: client_error("upload_timeout"),
            },
        })
    }

    /// The pool in use now.
    pub(crate) fn pool(&self) -> arc_swap::Guard<Arc<Pool>> {
        self.pool.load()
    }

    /// Picks a target for one attempt, skipping those in `tried` (by index) while others
    /// remain. Only available targets (healthy, not ejected) are candidates; when none
    /// is, all are with `fail_open`, else there is no pick.
    pub(crate) fn pick(&self, tried: &[usize]) -> Option<usize> {
        let fresh = |i: &usize| !tried.contains(i);
        let available = |i: &usize| fresh(i) && self.targets[*i].available();
        if let Some(pick) = self.choose(available) {
            return Some(pick);
        }
        let any_available = self.targets.iter().any(|t| t.available());
        if any_available {
            // Every available target was tried: try them again rather than an
            // unavailable one.
            return self.choose(|i| self.targets[*i].available());
        }
        if self.settings.fail_open {
            self.choose(fresh).or_else(|| self.choose(|_| true))
        } else {
            None
        }
    }

    /// The balancer's choice among the targets `candidate` admits.
    fn choose(&self, candidate: impl Fn(&usize) -> bool) -> Option<usize> {
        let n = (0..self.targets.len()).filter(&candidate).count();
        let nth = |k: usize| (0..self.targets.len()).filter(&candidate).nth(k);
        match n {
            0 => None,
            1 => nth(0),
            _ => match self.settings.balance {
                Balance::RoundRobin => nth(self.next.fetch_add(1, Ordering::Relaxed) % n),
                Balance::Weighted => {
                    let total: u64 = (0..self.targets.len())
                        .filter(&candidate)
                        .map(|i| u64::from(self.targets[i].weight))
                        .sum();
                    let mut ticket = (self.next.fetch_add(1, Ordering::Relaxed) as u64) % total;
                    (0..self.targets.len()).filter(&candidate).find(|i| {
                        let w = u64::from(self.targets[*i].weight);
                        if ticket < w {
                            true
                        } else {
                            ticket -= w;
                            false
                        }
                    })
                }
                Balance::LeastOutstanding => {
                    let a = fastrand::usize(..n);
                    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                    let (a, b) = (nth(a)?, nth(b)?);
                    let load = |i: usize| self.targets[i].in_flight();
                    Some(if load(b) < load(a) { b } else { a })
                }
            },
        }
    }

    /// Starts the group's background work, once: the active health checks (with
    /// `health_check`), resolving the targets' names again (with `resolve_interval`) and
    /// closing idle connections past `idle_timeout`. All stop by themselves when the
    /// group is dropped, after a reload replaced it.
    pub fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::Relaxed) {
            return;
        }
        self.start_checks();
        self.start_resolving();
        self.start_reaping();
    }

    fn start_reaping(self: &Arc<Self>) {
        let Some(every) = self.pool().reap_every() else {
            return;
        };
        let group: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(group) = group.upgrade() else {
                    return;
                };
                group.pool().reap();
            }
        });
    }

    fn start_resolving(self: &Arc<Self>) {
        let interval = self.settings.resolve_interval;
        let names: Vec<String> = self
            .targets
            .iter()
            .filter(|t| t.authority.host().parse::<std::net::IpAddr>().is_err())
            .map(|t| t.address.clone())
            .collect();
        if interval.is_zero() || names.is_empty() {
            return;
        }
        let group: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut known = resolve(&names).await;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = resolve(&names).await;
                let Some(group) = group.upgrade() else {
                    return;
                };
                // A name that does not resolve now keeps its old addresses: a DNS blip
                // is no reason to drop good connections.
                let changed: Vec<&String> = now
                    .iter()
                    .filter(|(name, addrs)| known.get(*name).is_some_and(|old| old != *addrs))
                    .map(|(name, _)| name)
                    .collect();
                if !changed.is_empty() {
                    tracing::info!(group = group.name, targets = ?changed, "Target addresses changed; new requests use a fresh pool.");
                    group.renew_pool();
                }
                known.extend(now);
            }
        });
    }

    /// Puts a fresh pool in force: requests from now on connect anew; connections of the
    /// old pool close once the requests using them end.
    pub(crate) fn renew_pool(&self) {
        match Pool::new(&self.settings) {
            Ok(pool) => self.pool.store(Arc::new(pool)),
            // The same settings built the group's first pool.
            Err(error) => tracing::error!(group = self.name, %error, "Cannot renew the pool."),
        }
    }

    fn start_checks(self: &Arc<Self>) {
        let Some(check) = self.settings.health_check.clone() else {
            return;
        };
        let group: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(check.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(group) = group.upgrade() else {
                    return;
                };
                let checks = group.targets.iter().map(|target| {
                    let group = &group;
                    let check = &check;
                    async move {
                        let passed = group.check_once(target, &check.path, check.timeout).await;
                        target.record_check(
                            passed,
                            check.healthy_threshold,
                            check.unhealthy_threshold,
                        );
                    }
                });
                futures_util::future::join_all(checks).await;
            }
        });
    }

    /// One `GET path` to `target`: a 2xx or 3xx within `timeout` passes.
    async fn check_once(&self, target: &Target, path: &str, timeout: std::time::Duration) -> bool {
        let uri = Uri::builder()
            .scheme("http")
            .authority(target.authority.clone())
            .path_and_query(path)
            .build();
        let Ok(uri) = uri else {
            return false;
        };
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert(http::header::HOST, target.host.clone());
        req.headers_mut().insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("tiergate-health-check"),
        );
        match tokio::time::timeout(timeout, self.checker.request(req)).await {
            Ok(Ok(rsp)) => rsp.status().is_success() || rsp.status().is_redirection(),
            _ => false,
        }
    }

    /// Sets the gauges kept off the request path.
    pub(crate) fn record_gauges(&self) {
        for target in &self.targets {
            #[allow(clippy::cast_precision_loss)] // counts far below 2^52
            target.metrics.in_flight.set(target.in_flight() as f64);
        }
    }
}

/// The addresses each name resolves to now (sorted); names that do not resolve are
/// left out.
async fn resolve(names: &[String]) -> HashMap<String, Vec<SocketAddr>> {
    let mut out = HashMap::new();
    for name in names {
        if let Ok(addrs) = tokio::net::lookup_host(name.as_str()).await {
            let mut addrs: Vec<SocketAddr> = addrs.collect();
            addrs.sort();
            out.insert(name.clone(), addrs);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::UpstreamBody;
    use crate::proxy::body::AttemptBody;
    use tiergate_config::TargetSettings;

    fn group(balance: Balance, targets: &[(&str, u32)]) -> Group {
        let mut settings = UpstreamSettings::new("g", &[]);
        settings.balance = balance;
        settings.targets = targets
            .iter()
            .map(|(a, w)| TargetSettings::Weighted {
                address: (*a).to_owned(),
                weight: *w,
            })
            .collect();
        Group::new(&settings, &ProxySettings::default()).unwrap()
    }

    fn spread(g: &Group, n: usize) -> Vec<usize> {
        let mut counts = vec![0; g.targets.len()];
        for _ in 0..n {
            counts[g.pick(&[]).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_takes_turns() {
        let g = group(Balance::RoundRobin, &[("a:1", 1), ("b:1", 1), ("c:1", 1)]);
        assert_eq!(spread(&g, 300), [100, 100, 100]);
    }

    #[test]
    fn weighted_follows_the_weights() {
        let g = group(Balance::Weighted, &[("a:1", 3), ("b:1", 1)]);
        assert_eq!(spread(&g, 400), [300, 100]);
    }

    #[test]
    fn least_outstanding_avoids_the_busy_target() {
        let g = group(Balance::LeastOutstanding, &[("a:1", 1), ("b:1", 1)]);
        let _busy = g.targets[0].start_request();
        assert_eq!(spread(&g, 100), [0, 100]);
    }

    #[test]
    fn a_retry_goes_elsewhere_and_unavailable_targets_are_skipped() {
        let g = group(Balance::RoundRobin, &[("a:1", 1), ("b:1", 1)]);
        for _ in 0..10 {
            let first = g.pick(&[]).unwrap();
            assert_ne!(g.pick(&[first]), Some(first));
        }
        for _ in 0..2 {
            g.targets[0].record_check(false, 1, 1);
        }
        assert_eq!(spread(&g, 10), [0, 10]);
        assert_eq!(g.pick(&[1]), Some(1), "only b is available: try it again");
    }

    #[tokio::test]
    async fn a_renewed_pool_connects_anew() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A minimal HTTP/1.1 upstream that counts the connections it accepts.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                });
            }
        });
        let group = group(Balance::RoundRobin, &[(&addr, 1)]);
        let get = || async {
            let root = super::super::headers::Outgoing::bare(&http::Method::GET, "/");
            let head = root.head();
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            let clock =
                &mut super::super::pool::HeadClock::new(deadline, std::time::Duration::MAX, None);
            let (rsp, lease) = group
                .pool()
                .send(0, &head, AttemptBody::empty(), clock)
                .await
                .unwrap();
            let body = UpstreamBody::new(
                rsp.into_body(),
                lease,
                deadline,
                group.targets[0].start_request(),
            );
            http_body_util::BodyExt::collect(body).await.unwrap();
        };
        get().await;
        get().await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "kept alive");
        group.renew_pool();
        get().await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the fresh pool connected"
        );
    }

    #[test]
    fn all_unhealthy_fails_open_or_not_as_configured() {
        let mut g = group(Balance::RoundRobin, &[("a:1", 1), ("b:1", 1)]);
        for t in &g.targets {
            t.record_check(false, 1, 1);
        }
        assert!(g.pick(&[]).is_some());
        g.settings.fail_open = false;
        assert_eq!(g.pick(&[]), None);
    }
}
