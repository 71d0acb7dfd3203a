//! `GET /health`: the status of the task and of each backing service, for the ALB and
//! for people.
//!
//! PostgreSQL down → `unhealthy` (503). Redis down → `degraded` with 200 by default: the
//! app still serves from L1 and PostgreSQL, and pulling every task out of the load
//! balancer because the cache blinked would turn a cache outage into a full outage.
//! `health.require_cache = true` makes it 503 for those who want the strict behaviour.

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::service::Items;

/// Build facts shown in `/health`.
#[derive(Debug, Clone, Copy)]
pub struct BuildInfo {
    pub version: &'static str,
    /// The git commit the binary was built from, `unknown` outside git.
    pub commit: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Healthy,
    Degraded,
    Unhealthy,
}

/// The `/health` body.
#[derive(Debug, Serialize)]
pub struct Report {
    pub status: Status,
    pub version: &'static str,
    pub commit: &'static str,
    pub deployment: Option<String>,
    /// How long ago PostgreSQL and Redis were probed, in whole milliseconds: the probes
    /// are shared by every request within `health.max_age`.
    pub age_ms: u64,
    pub services: Services,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Services {
    pub database: DatabaseHealth,
    pub cache: CacheHealth,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct DatabaseHealth {
    pub connected: bool,
    pub latency_ms: Option<f64>,
    pub time: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CacheHealth {
    pub connected: bool,
    pub latency_ms: Option<f64>,
}

/// Why the app cannot serve even though its dependencies answer.
#[derive(Debug, Clone, Copy)]
pub struct Gates {
    /// Start-up has not finished (migrations pending).
    pub ready: bool,
    /// A shutdown began: the load balancer must stop sending traffic.
    pub draining: bool,
    pub require_cache: bool,
}

/// The last probes of PostgreSQL and Redis, shared by every `/health` request until
/// they are `max_age` old; then the first request to find them stale probes again while
/// the others wait for its result. The gates are read on every request, so draining
/// still shows at once.
#[derive(Debug)]
pub(crate) struct Probes {
    max_age: Duration,
    last: std::sync::Mutex<Option<Probed>>,
    /// Held while a probe is under way: one at a time.
    probing: tokio::sync::Mutex<()>,
}

/// One round of probes and when it finished.
#[derive(Debug, Clone, Copy)]
struct Probed {
    at: Instant,
    services: Services,
}

impl Probes {
    pub(crate) fn new(max_age: Duration) -> Self {
        Self {
            max_age,
            last: std::sync::Mutex::new(None),
            probing: tokio::sync::Mutex::new(()),
        }
    }

    /// The last probes if they are fresh enough.
    fn fresh(&self) -> Option<Probed> {
        let last = *self.last.lock().unwrap_or_else(PoisonError::into_inner);
        last.filter(|probed| probed.at.elapsed() < self.max_age)
    }

    /// Fresh probes: the last ones, or new ones made by this caller or by the caller
    /// already making them.
    async fn get(&self, items: &Items) -> Probed {
        if let Some(probed) = self.fresh() {
            return probed;
        }
        let _probing = self.probing.lock().await;
        // Whoever held the lock before may have just probed.
        if let Some(probed) = self.fresh() {
            return probed;
        }
        let probed = Probed {
            services: probe(items).await,
            at: Instant::now(),
        };
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(probed);
        probed
    }
}

/// Probes PostgreSQL and Redis concurrently.
async fn probe(items: &Items) -> Services {
    let (db, cache) = tokio::join!(items.db().ping(), items.l2().ping());
    let database = match db {
        Ok((latency, time)) => DatabaseHealth {
            connected: true,
            latency_ms: Some(millis(latency)),
            time: Some(time),
        },
        Err(_) => DatabaseHealth {
            connected: false,
            latency_ms: None,
            time: None,
        },
    };
    let cache = match cache {
        Ok(latency) => CacheHealth {
            connected: true,
            latency_ms: Some(millis(latency)),
        },
        Err(_) => CacheHealth {
            connected: false,
            latency_ms: None,
        },
    };
    Services { database, cache }
}

/// Grades fresh probes of PostgreSQL and Redis (see [`Probes`]) with the gates.
pub(crate) async fn check(
    items: &Items,
    probes: &Probes,
    build: BuildInfo,
    deployment: Option<String>,
    gates: Gates,
) -> Report {
    let Probed { at, services } = probes.get(items).await;
    let Services { database, cache } = services;
    let status = if !database.connected || !gates.ready || gates.draining {
        Status::Unhealthy
    } else if !cache.connected {
        if gates.require_cache {
            Status::Unhealthy
        } else {
            Status::Degraded
        }
    } else {
        Status::Healthy
    };
    Report {
        status,
        version: build.version,
        commit: build.commit,
        deployment,
        age_ms: u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX),
        services,
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
