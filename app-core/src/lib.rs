//! The items application: the part of Tiergate that answers `/items*` and `/health`.
//!
//! It knows HTTP requests and responses (`http` types) but nothing of sockets, TLS or
//! proxying; the gateway hosts it in process.
//!
//! # Layout
//! - [`model`]: `Item`, `ItemId`, validation of client input.
//! - [`store`]: PostgreSQL pools, migrations and queries.
//! - [`cache`]: the L1 (moka) and L2 (Redis) tiers.
//! - [`service`]: the use cases over store and cache (read-through, write-then-fence).
//! - [`api`]: HTTP handlers and JSON errors.
//! - [`health`]: the `/health` report.
//! - [`tls`]: TLS client configurations for PostgreSQL (`sslmode`) and Redis.

pub mod api;
pub mod cache;
pub mod health;
pub mod model;
pub mod service;
pub mod store;
pub mod tls;

use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tiergate_config::Settings;

use crate::api::ApiBody;
use crate::cache::l1::L1;
use crate::cache::l2::{InvalidRedisUrl, L2};
use crate::health::{BuildInfo, Gates, Report};
use crate::service::Items;
use crate::store::{Database, InvalidUrl};

/// Settings that parse but cannot be used (a URL the clients refuse).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Database(#[from] InvalidUrl),
    #[error(transparent)]
    Redis(#[from] InvalidRedisUrl),
}

/// The application: cheap to clone, shared by every connection.
#[derive(Debug, Clone)]
pub struct App {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    items: Items,
    build: BuildInfo,
    deployment: Option<String>,
    max_body_bytes: usize,
    require_cache: bool,
    migrate_on_start: bool,
    redis_connect_timeout: Duration,
    /// Set once the schema is in place; until then item requests get 503.
    ready: AtomicBool,
    /// Set when shutdown begins; `/health` turns 503 at once.
    draining: AtomicBool,
}

impl App {
    /// Builds the app without touching the network: pools connect on demand and Redis
    /// connects in the background. Call [`App::start`] to prepare the database.
    ///
    /// # Errors
    /// A database or Redis URL that does not parse.
    pub fn new(settings: &Settings, build: BuildInfo) -> Result<Self, BuildError> {
        let db = Database::new(&settings.database)?;
        let l1 = L1::new(settings.cache.l1_max_bytes, settings.cache.l1_ttl);
        let l2 = L2::connect(&settings.redis, settings.cache.l2_ttl)?;
        let negative_ttl = (settings.cache.l2_ttl / 6).max(Duration::from_secs(1));
        let inner = Inner {
            items: Items::new(db, l1, l2, negative_ttl),
            build,
            deployment: settings.deployment.color.clone(),
            max_body_bytes: usize::try_from(settings.http.max_body_bytes).unwrap_or(usize::MAX),
            require_cache: settings.health.require_cache,
            migrate_on_start: settings.database.migrate_on_start,
            redis_connect_timeout: settings.redis.connect_timeout,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Spawns the background work: preparing the database (migrating, or waiting for
    /// someone else to) with backoff until it succeeds, and L1 housekeeping. The tasks
    /// end when the last clone of the app is dropped.
    pub fn start(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(prepare_database(weak.clone()));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                inner.items.l1().run_pending_tasks().await;
            }
        });
    }

    /// Answers one request for `/items*` or `/health`.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ApiBody>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        api::handle(self, req).await
    }

    /// Whether the app can serve items: the schema is in place and no shutdown began.
    pub fn is_ready(&self) -> bool {
        self.unready_reason().is_none()
    }

    /// Why the app cannot serve items now, if it cannot.
    pub fn unready_reason(&self) -> Option<&'static str> {
        if self.inner.draining.load(Ordering::Acquire) {
            Some("the service is shutting down; retry on another instance")
        } else if !self.inner.ready.load(Ordering::Acquire) {
            Some("the service is starting: the database is not ready yet")
        } else {
            None
        }
    }

    /// Marks the app as draining: `/readyz` and `/health` answer 503 from now on, so the
    /// load balancer stops sending new traffic while in-flight requests finish.
    pub fn begin_shutdown(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// Probes the backing services and grades the result.
    pub async fn health(&self) -> Report {
        let inner = &self.inner;
        let gates = Gates {
            ready: inner.ready.load(Ordering::Acquire),
            draining: inner.draining.load(Ordering::Acquire),
            require_cache: inner.require_cache,
        };
        health::check(&inner.items, inner.build, inner.deployment.clone(), gates).await
    }

    /// Sets the pool and L1 gauges; call before rendering metrics so they are current.
    pub fn record_gauges(&self) {
        let (writer, reader) = self.inner.items.db().pool_states();
        for (pool, state) in [("writer", Some(writer)), ("reader", reader)] {
            let Some(state) = state else { continue };
            let in_use = state.connections.saturating_sub(state.idle);
            metrics::gauge!("tiergate_db_pool_connections", "pool" => pool, "state" => "idle")
                .set(state.idle);
            metrics::gauge!("tiergate_db_pool_connections", "pool" => pool, "state" => "in_use")
                .set(in_use);
        }
        let (entries, bytes) = self.inner.items.l1().usage();
        #[allow(clippy::cast_precision_loss)]
        // gauges are f64; counts this large are not exact anyway
        {
            metrics::gauge!("tiergate_cache_l1_entries").set(entries as f64);
            metrics::gauge!("tiergate_cache_l1_bytes").set(bytes as f64);
        }
    }

    /// Closes the Redis connection; pools close when the last clone is dropped.
    pub async fn close(&self) {
        self.inner.items.l2().quit().await;
    }

    fn items(&self) -> &Items {
        &self.inner.items
    }

    fn max_body_bytes(&self) -> usize {
        self.inner.max_body_bytes
    }
}

/// Gets the schema in place, retrying with backoff (100 ms doubling to 5 s, jittered)
/// while PostgreSQL is unreachable: the process never exits over it. Then gives Redis up
/// to `redis.connect_timeout` to connect before declaring the app ready.
async fn prepare_database(app: Weak<Inner>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let Some(inner) = app.upgrade() else { return };
        let db = inner.items.db();
        let outcome = if inner.migrate_on_start {
            db.migrate().await.map(|_| true)
        } else {
            db.schema_is_current().await
        };
        match outcome {
            Ok(true) => {
                if !inner
                    .items
                    .l2()
                    .wait_connected(inner.redis_connect_timeout)
                    .await
                {
                    tracing::warn!(
                        "Redis not reachable; serving from L1 and PostgreSQL until it is."
                    );
                }
                inner.ready.store(true, Ordering::Release);
                tracing::info!("Database ready.");
                return;
            }
            Ok(false) => {
                tracing::warn!("Database schema is older than this binary; run `tiergate migrate`.")
            }
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), retry_in_ms = delay.as_millis(), "Database not ready.")
            }
        }
        drop(inner);
        tokio::time::sleep(delay.mul_f64(0.8 + fastrand::f64() * 0.4)).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// Displays an error with its sources, `outer: inner: innermost`, for logs.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a dyn StdError);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}
