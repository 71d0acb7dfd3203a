//! The items application: the part of Tiergate that answers `/items*` and `/health`.
//!
//! It knows HTTP requests and responses (`http` types) but nothing of sockets, TLS or
//! proxying; the gateway hosts it in process.
//!
//! # Layout
//! - [`model`]: `Item`, `ItemId`, validation of client input.
//! - [`store`]: PostgreSQL pools, migrations and queries.
//! - [`cache`]: the L1 (moka) and L2 (Redis) tiers, the invalidation bus, the breaker.
//! - [`fleet`]: the fleet's runtime routing state, shared through PostgreSQL and the bus.
//! - [`hooks`]: pause points that make cache races reproducible in tests.
//! - [`rollout`]: progressive rollouts of a split, judged and rolled back fleet-wide.
//! - [`service`]: the use cases over store and cache (read-through, write-then-fence).
//! - [`spans`]: the spans a traced request records below its own, for OTLP export.
//! - [`api`]: HTTP handlers and JSON errors.
//! - [`health`]: the `/health` report.
//! - `testing` (feature `testing`): test support shared by the crates' integration tests.
//! - [`tls`]: TLS client configurations for PostgreSQL (`sslmode`) and Redis.

pub mod api;
pub mod cache;
pub mod fleet;
pub mod health;
pub mod hooks;
pub mod model;
pub mod rollout;
pub mod service;
pub mod spans;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::Body;
use tiergate_config::Settings;

use crate::cache::breaker;
use crate::cache::bus::Bus;
use crate::cache::l1::{L1, Policy};
use crate::cache::l2::{InvalidRedisUrl, L2};
use crate::fleet::{Control, Fleet};
use crate::health::{BuildInfo, Gates, Probes, Report};
use crate::hooks::Hooks;
use crate::service::Items;
use crate::store::{Database, InvalidUrl, ReaderProbe, ReaderStats};

/// Outbox rows this old were left behind by their writer: the relay takes them over.
const OUTBOX_GRACE: Duration = Duration::from_secs(5);

/// Settings that parse but cannot be used (a URL the clients refuse).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Database(#[from] InvalidUrl),
    #[error(transparent)]
    Redis(#[from] InvalidRedisUrl),
    #[error("cannot build the Redis subscriber")]
    Subscriber(#[source] fred::error::Error),
}

/// The application: cheap to clone, shared by every connection.
#[derive(Debug, Clone)]
pub struct App {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    items: Items,
    fleet: Fleet,
    /// Taken by [`App::start`], which runs it.
    bus: std::sync::Mutex<Option<Bus>>,
    subscriber: fred::clients::SubscriberClient,
    build: BuildInfo,
    deployment: Option<String>,
    max_body_bytes: usize,
    require_cache: bool,
    /// The last probes behind `/health`, shared by the requests within `health.max_age`.
    probes: Probes,
    migrate_on_start: bool,
    redis_connect_timeout: Duration,
    /// Set by the first [`App::start`].
    started: AtomicBool,
    /// Set once the schema is in place; until then item requests get 503.
    ready: AtomicBool,
    /// Set when shutdown begins; `/health` turns 503 at once.
    draining: AtomicBool,
}

impl App {
    /// Builds the app without touching the network: pools connect on demand, Redis when
    /// [`App::start`] runs (which also prepares the database).
    ///
    /// # Errors
    /// A database or Redis URL that does not parse.
    pub fn new(settings: &Settings, build: BuildInfo) -> Result<Self, BuildError> {
        let cache = &settings.cache;
        let db = Database::new(&settings.database)?;
        let policy = Policy {
            ttl: cache.l1_ttl,
            degraded_ttl: cache.degraded_l1_ttl,
            max_stale: cache.max_stale,
            refresh_after: cache.refresh_after,
        };
        let l1 = L1::new(cache.l1_max_bytes, policy);
        let l2 = L2::new(&settings.redis, cache.l2_ttl)?;
        if db.reader_stats().is_some() {
            describe_reader_metrics();
        }
        let items = Items::new(db.clone(), l1.clone(), l2.clone(), cache, Hooks::default());
        let fleet = Fleet::new(
            Control::new(db, l2.clone()),
            format!("{:016x}", items.origin()),
            build,
            settings.deployment.color.clone(),
            &settings.fleet,
        );
        let bus =
            Bus::new(&l2, l1, items.origin(), fleet.clone()).map_err(BuildError::Subscriber)?;
        let inner = Inner {
            items,
            fleet,
            subscriber: bus.subscriber(),
            bus: std::sync::Mutex::new(Some(bus)),
            build,
            deployment: settings.deployment.color.clone(),
            max_body_bytes: usize::try_from(settings.http.max_body_bytes).unwrap_or(usize::MAX),
            require_cache: settings.health.require_cache,
            probes: Probes::new(settings.health.max_age),
            migrate_on_start: settings.database.migrate_on_start,
            redis_connect_timeout: settings.redis.connect_timeout,
            started: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Spawns the background work: connecting Redis, the invalidation bus, preparing the
    /// database (migrating, or waiting for someone else to) with backoff until it
    /// succeeds, and once a second (and whenever Redis reconnects) L1 housekeeping and the
    /// outbox relay. The tasks end when the app is closed or its last clone dropped. Later
    /// calls do nothing.
    pub fn start(&self) {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return;
        }
        self.inner.items.l2().start_connecting();
        let bus = self.inner.bus.lock().ok().and_then(|mut bus| bus.take());
        if let Some(bus) = bus {
            tokio::spawn(bus.run());
        }
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(prepare_database(weak.clone()));
        if self.inner.items.db().reader_stats().is_some() {
            tokio::spawn(watch_reader(weak.clone()));
        }
        let mut reconnections = self.inner.items.l2().reconnections();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                // Also at once when Redis is back, so that the relay's recovery makes it
                // trusted again without waiting for the tick.
                tokio::select! {
                    _ = tick.tick() => {}
                    Ok(_) = reconnections.recv() => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                inner.items.l1().run_pending_tasks().await;
                if inner.ready.load(Ordering::Acquire) {
                    if let Err(error) = inner.items.relay_outbox(OUTBOX_GRACE).await {
                        tracing::debug!(error = %ErrorChain(&error), "Outbox relay pass failed.");
                    }
                }
            }
        });
    }

    /// This task's copy of the fleet state.
    pub fn fleet(&self) -> &Fleet {
        &self.inner.fleet
    }

    /// Starts answering one request for `/items*` or `/health` (see [`api::Answer`]).
    pub fn handle<B>(&self, req: Request<B>) -> api::Answer
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        api::handle(self, req)
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

    /// Whether a shutdown began (`/readyz` fails from then on).
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Whether the schema is in place, so item requests can be served. Stays true while
    /// draining: the load balancer keeps routing here until it sees readiness fail, and
    /// those requests must still get their answers.
    pub(crate) fn serves_items(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// Marks the app as draining: `/readyz` and `/health` answer 503 from now on, so the
    /// load balancer stops sending new traffic. Item requests are still served.
    pub fn begin_shutdown(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// Grades the backing services' probes, at most `health.max_age` old (probing again
    /// when they are older).
    pub async fn health(&self) -> Report {
        let inner = &self.inner;
        let gates = Gates {
            ready: inner.ready.load(Ordering::Acquire),
            draining: inner.draining.load(Ordering::Acquire),
            require_cache: inner.require_cache,
        };
        let deployment = inner.deployment.clone();
        health::check(&inner.items, &inner.probes, inner.build, deployment, gates).await
    }

    /// Sets the pool, L1, breaker and trust gauges; call before rendering metrics so they
    /// are current.
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
        if let Some(reader) = self.inner.items.db().reader_stats() {
            record_reader(&reader);
        }
        let (entries, bytes) = self.inner.items.l1().usage();
        #[allow(clippy::cast_precision_loss)]
        // gauges are f64; counts this large are not exact anyway
        {
            metrics::gauge!("tiergate_cache_l1_entries").set(entries as f64);
            metrics::gauge!("tiergate_cache_l1_bytes").set(bytes as f64);
        }
        // Open and half-open alike: either way reads are skipping Redis right now.
        let skipping = self.inner.items.l2().breaker_state() != breaker::State::Closed;
        metrics::gauge!("tiergate_cache_l2_breaker_open").set(if skipping { 1.0 } else { 0.0 });
        // Redis may have missed writes: reads skip it until the relay's recovery is done.
        let untrusted = !self.inner.items.l2().is_trusted();
        metrics::gauge!("tiergate_cache_l2_untrusted").set(if untrusted { 1.0 } else { 0.0 });
    }

    /// Closes the Redis connections (which ends the bus); pools close when the last
    /// clone is dropped. An app never started has none.
    pub async fn close(&self) {
        if !self.inner.started.load(Ordering::Acquire) {
            return;
        }
        let _ = fred::interfaces::ClientLike::quit(&self.inner.subscriber).await;
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
/// to `redis.connect_timeout` to connect (and the bus to subscribe) before declaring the
/// app ready.
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
        // The fleet state before readiness: the first request a task serves follows the
        // switches made before it started.
        let outcome = match outcome {
            Ok(true) => inner.fleet.load().await.map(|()| true),
            other => other,
        };
        match outcome {
            Ok(true) => {
                // Redis gets a moment, so the first requests can use it and the first
                // L1 entries are not voided by the bus's flush on subscribing.
                let timeout = inner.redis_connect_timeout;
                let items = &inner.items;
                let (connected, coherent) = tokio::join!(
                    items.l2().wait_connected(timeout),
                    items.l1().wait_coherent(timeout)
                );
                if !(connected && coherent) {
                    tracing::warn!(
                        "Redis not reachable; serving from L1 and PostgreSQL until it is."
                    );
                }
                tokio::spawn(inner.fleet.clone().run(app.clone()));
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

/// Measures the reader's lag every [`store::PROBE_INTERVAL`] (see the `store::replica`
/// module) until the app is dropped.
async fn watch_reader(app: Weak<Inner>) {
    let mut probe = ReaderProbe::default();
    let mut tick = tokio::time::interval(store::PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = app.upgrade() else { return };
        inner.items.db().probe_reader(&mut probe).await;
    }
}

fn describe_reader_metrics() {
    metrics::describe_gauge!(
        "tiergate_db_reader_lag_seconds",
        metrics::Unit::Seconds,
        "How far the reader is behind the writer, as last measured."
    );
    metrics::describe_gauge!(
        "tiergate_db_reader_up",
        "1 while the reader answers (and reports a replay position), else 0."
    );
    metrics::describe_counter!(
        "tiergate_db_reader_reads_total",
        "Item reads the reader answered, proven current."
    );
    metrics::describe_counter!(
        "tiergate_db_reads_moved_to_writer_total",
        "Reads sent to the writer instead of the reader, by reason (lagging, down, behind, no_position)."
    );
}

/// The reader's gauges, and its counters set to their totals.
fn record_reader(reader: &ReaderStats) {
    metrics::gauge!("tiergate_db_reader_lag_seconds").set(reader.lag.as_secs_f64());
    metrics::gauge!("tiergate_db_reader_up").set(if reader.up { 1.0 } else { 0.0 });
    metrics::counter!("tiergate_db_reader_reads_total").absolute(reader.answered);
    for (reason, count) in reader.moved {
        metrics::counter!("tiergate_db_reads_moved_to_writer_total", "reason" => reason.label())
            .absolute(count);
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
