//! `GET /health`: the status of the task and of each backing service, for the ALB and
//! for people.
//!
//! PostgreSQL down → `unhealthy` (503). Redis down → `degraded` with 200 by default: the
//! app still serves from L1 and PostgreSQL, and pulling every task out of the load
//! balancer because the cache blinked would turn a cache outage into a full outage.
//! `health.require_cache = true` makes it 503 for those who want the strict behaviour.

use std::time::Duration;

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
    pub services: Services,
}

#[derive(Debug, Serialize)]
pub struct Services {
    pub database: DatabaseHealth,
    pub cache: CacheHealth,
}

#[derive(Debug, Serialize)]
pub struct DatabaseHealth {
    pub connected: bool,
    pub latency_ms: Option<f64>,
    pub time: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize)]
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

/// Probes PostgreSQL and Redis concurrently and grades the result.
pub async fn check(
    items: &Items,
    build: BuildInfo,
    deployment: Option<String>,
    gates: Gates,
) -> Report {
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
        services: Services { database, cache },
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
