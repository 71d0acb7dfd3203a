//! One fleet, one switch (docs/fleet.md): the runtime routing state every task serves,
//! kept in PostgreSQL under one revision counter and spread over the Redis bus.
//!
//! - [`Control`] changes and reads the state; it needs only PostgreSQL and Redis, so the
//!   CLI uses it with no task running.
//! - [`Fleet`] is one task's copy: it applies changes in revision order only (an older
//!   or repeated revision is ignored; a gap makes it load the whole state), and every
//!   `fleet.poll_interval` it beats its heartbeat and reads the latest revision in one
//!   statement, so a change whose message was lost (Redis down, a subscriber cut off, a
//!   partition) arrives anyway. With PostgreSQL down it keeps the state it has.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::cache::l2::{L2, unix_micros};
use crate::health::BuildInfo;
use crate::rollout::{LEASE, since};
use crate::store::fleet::{Changer, Committed, Heartbeat, Snapshot, TaskRow, Weights};
use crate::store::rollout::{RolloutRow, Window};
use crate::store::{Database, StoreError};

/// The routes with a runtime split at one revision. A route not here serves its file
/// weights.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FleetState {
    pub revision: i64,
    pub splits: BTreeMap<String, Weights>,
}

impl From<Snapshot> for FleetState {
    fn from(snapshot: Snapshot) -> Self {
        Self {
            revision: snapshot.revision,
            splits: snapshot
                .overrides
                .into_iter()
                .map(|o| (o.route, o.weights))
                .collect(),
        }
    }
}

/// A change as it travels on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub revision: i64,
    pub route: String,
    /// `None`: reset to the file's weights.
    pub weights: Option<Weights>,
    /// When it was published, in microseconds since the Unix epoch (for the propagation
    /// histogram).
    pub sent_at_micros: u64,
}

/// Puts a state in force (the gateway's route table); called in revision order.
pub type Applier = Arc<dyn Fn(&FleetState) + Send + Sync>;

/// What a task counts as in flight, for its heartbeat.
pub type InFlight = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A group's responses so far on this task, by group name (for rollout reports).
pub type Tallies = Arc<dyn Fn(&str) -> Option<Window> + Send + Sync>;

/// How a wait for the fleet to apply a revision ended.
#[derive(Debug, Clone, Serialize)]
pub struct Waited {
    /// Every live task applied it.
    pub applied: bool,
    /// Live tasks when the wait ended.
    pub tasks: usize,
    /// The live tasks that had not applied it, with the revision they had.
    pub lagging: BTreeMap<String, i64>,
    /// From the commit to the last task's report of applying it (database clock), when
    /// every task did.
    pub propagation_ms: Option<f64>,
}

/// Changes and reads the fleet's state: PostgreSQL first, then the bus.
#[derive(Debug, Clone)]
pub struct Control {
    db: Database,
    l2: L2,
    channel: String,
}

impl Control {
    /// A control over `db` that publishes through `l2`.
    pub fn new(db: Database, l2: L2) -> Self {
        let channel = fleet_channel(l2.channel());
        Self { db, l2, channel }
    }

    /// The database the state lives in.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// Sets (or with `None` resets) route `route`'s split fleet-wide, then publishes the
    /// change. A failed publish is only logged: every task's poll finds the change
    /// within `fleet.poll_interval`. `None` when `by` may not change it now (an operator
    /// while a rollout runs on the route, a driver that lost its rollout).
    ///
    /// # Errors
    /// The database is unreachable: nothing changed.
    pub async fn set_split(
        &self,
        route: &str,
        weights: Option<&Weights>,
        by: Changer<'_>,
    ) -> Result<Option<(Committed, Change)>, StoreError> {
        let Some(committed) = self.db.fleet_set_split(route, weights, by).await? else {
            return Ok(None);
        };
        Ok(Some((
            committed,
            self.announce(committed, route, weights).await,
        )))
    }

    /// Aborts the rollout running on `route`, returning the route to 100 % of its
    /// previous group, and publishes that change; `None` when none runs.
    ///
    /// # Errors
    /// The database is unreachable: nothing changed.
    pub async fn abort_rollout(
        &self,
        route: &str,
        reason: &str,
    ) -> Result<Option<(RolloutRow, Committed, Change)>, StoreError> {
        let Some((rollout, committed)) = self.db.rollout_abort(route, reason).await? else {
            return Ok(None);
        };
        let back = crate::rollout::step_weights(&rollout, 0);
        let change = self.announce(committed, route, Some(&back)).await;
        metrics::counter!("tiergate_fleet_rollouts_total", "outcome" => "aborted").increment(1);
        tracing::warn!(rollout = rollout.id, route, reason, "Rollout aborted.");
        Ok(Some((rollout, committed, change)))
    }

    /// Publishes a committed change to every task.
    async fn announce(
        &self,
        committed: Committed,
        route: &str,
        weights: Option<&Weights>,
    ) -> Change {
        let change = Change {
            revision: committed.revision,
            route: route.to_owned(),
            weights: weights.cloned(),
            sent_at_micros: unix_micros(),
        };
        self.publish(&change).await;
        change
    }

    async fn publish(&self, change: &Change) {
        let message = match serde_json::to_string(change) {
            Ok(message) => message,
            Err(error) => {
                tracing::warn!(%error, "Cannot encode a fleet change; the poll carries it.");
                return;
            }
        };
        if let Err(error) = self.l2.publish_on(&self.channel, message).await {
            tracing::warn!(
                revision = change.revision,
                %error,
                "Fleet change not published; every task's poll finds it instead."
            );
        }
    }

    /// The state in PostgreSQL.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.db.fleet_snapshot().await
    }

    /// The live tasks.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn tasks(&self) -> Result<Vec<TaskRow>, StoreError> {
        self.db.fleet_tasks().await
    }

    /// Waits until every live task reports `revision` applied, at most `timeout`.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn wait_applied(
        &self,
        committed: Committed,
        timeout: Duration,
    ) -> Result<Waited, StoreError> {
        let deadline = Instant::now() + timeout;
        loop {
            let tasks = self.db.fleet_tasks().await?;
            let lagging: BTreeMap<String, i64> = tasks
                .iter()
                .filter(|t| t.applied_revision < committed.revision)
                .map(|t| (t.id.clone(), t.applied_revision))
                .collect();
            if lagging.is_empty() || Instant::now() >= deadline {
                let propagation_ms = lagging
                    .is_empty()
                    .then(|| tasks.iter().filter_map(|t| t.applied_at).max())
                    .flatten()
                    .map(|last| {
                        let micros = (last - committed.committed_at)
                            .num_microseconds()
                            .unwrap_or(0)
                            .max(0);
                        #[allow(clippy::cast_precision_loss)]
                        // a wait is seconds long: exact in an f64
                        let ms = micros as f64 / 1e3;
                        ms
                    });
                return Ok(Waited {
                    applied: lagging.is_empty(),
                    tasks: tasks.len(),
                    lagging,
                    propagation_ms,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// The fleet channel beside the invalidation channel `{prefix}:c1:invalidations`.
pub(crate) fn fleet_channel(invalidations: &str) -> String {
    match invalidations.strip_suffix(":invalidations") {
        Some(base) => format!("{base}:fleet"),
        None => format!("{invalidations}:fleet"),
    }
}

/// One task's copy of the fleet state.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<Inner>,
}

struct Inner {
    control: Control,
    id: String,
    build: BuildInfo,
    colour: Option<String>,
    poll_interval: Duration,
    task_ttl: Duration,
    /// The state in force; its lock also orders the applier's calls.
    applied: Mutex<FleetState>,
    /// Set once the whole state has been loaded from PostgreSQL.
    loaded: AtomicBool,
    applier: OnceLock<Applier>,
    in_flight: OnceLock<InFlight>,
    tallies: OnceLock<Tallies>,
    /// Per running rollout step: the target group's counts when this task first saw it.
    baselines: Mutex<HashMap<(i64, i32), Window>>,
    /// The rollouts this task drives.
    driving: Mutex<HashSet<i64>>,
    /// Wakes the poll at once: a gap in the revisions, the bus back after an outage.
    repair: Notify,
    /// Wakes the heartbeat at once: a revision was applied, and waiters want to know.
    applied_news: Notify,
    metrics: FleetMetrics,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("id", &self.inner.id)
            .field("applied", &self.applied().revision)
            .finish_non_exhaustive()
    }
}

/// Where a task's applied state came from, for the log and metrics.
#[derive(Debug, Clone, Copy)]
enum Source {
    Bus,
    Local,
    Poll,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Self::Bus => "bus",
            Self::Local => "local",
            Self::Poll => "poll",
        }
    }
}

impl Fleet {
    /// A task's copy, empty until [`Fleet::load`] succeeds.
    pub fn new(
        control: Control,
        id: String,
        build: BuildInfo,
        colour: Option<String>,
        settings: &tiergate_config::FleetSettings,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                control,
                id,
                build,
                colour,
                poll_interval: settings.poll_interval,
                task_ttl: settings.task_ttl,
                applied: Mutex::new(FleetState::default()),
                loaded: AtomicBool::new(false),
                applier: OnceLock::new(),
                in_flight: OnceLock::new(),
                tallies: OnceLock::new(),
                baselines: Mutex::new(HashMap::new()),
                driving: Mutex::new(HashSet::new()),
                repair: Notify::new(),
                applied_news: Notify::new(),
                metrics: FleetMetrics::new(),
            }),
        }
    }

    /// The control over the fleet's state.
    pub fn control(&self) -> &Control {
        &self.inner.control
    }

    /// This task's id in the fleet.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Sets what puts each new state in force; the first call wins. It is called at
    /// once with the state now.
    pub fn set_applier(&self, applier: Applier) {
        let applied = self.lock();
        if self.inner.applier.set(applier.clone()).is_ok() {
            applier(&applied);
        }
    }

    /// Sets what counts the requests in flight; the first call wins.
    pub fn set_in_flight(&self, in_flight: InFlight) {
        let _ = self.inner.in_flight.set(in_flight);
    }

    /// Sets what counts each group's responses; the first call wins.
    pub fn set_tallies(&self, tallies: Tallies) {
        let _ = self.inner.tallies.set(tallies);
    }

    /// Drives rollout `id` from this task, in the background, until it ends or another
    /// driver holds it.
    pub fn drive(&self, id: i64) {
        let fresh = self
            .inner
            .driving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id);
        if !fresh {
            return;
        }
        let fleet = self.clone();
        tokio::spawn(async move {
            let control = &fleet.inner.control;
            if let Err(error) = control.drive_rollout(id, &fleet.inner.id).await {
                tracing::warn!(rollout = id, error = %crate::ErrorChain(&error), "Rollout driver stopped; another one resumes it once the lease lapses.");
            }
            fleet
                .inner
                .driving
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    }

    /// Reports what this task saw of each running rollout's target group during its
    /// step, and takes over a rollout whose driver's lease lapsed.
    async fn watch_rollouts(&self) -> Result<(), StoreError> {
        let db = self.inner.control.db();
        let running = db.rollouts_running().await?;
        let now: Vec<(i64, i32, Window)> = {
            let tallies = self.inner.tallies.get();
            let mut baselines = self
                .inner
                .baselines
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            baselines.retain(|(id, step), _| {
                running.iter().any(|r| r.id == *id && r.step_index == *step)
            });
            running
                .iter()
                .filter(|r| r.step_started_at.is_some())
                .filter_map(|r| {
                    let counts = tallies.and_then(|t| t(&r.to_group))?;
                    let base = baselines
                        .entry((r.id, r.step_index))
                        .or_insert_with(|| counts.clone());
                    Some((r.id, r.step_index, since(&counts, base)))
                })
                .collect()
        };
        for (id, step, window) in now {
            db.rollout_report(id, step, &self.inner.id, &window).await?;
        }
        for rollout in running {
            if db
                .rollout_claim(rollout.id, &self.inner.id, LEASE)
                .await?
                .is_some()
            {
                self.drive(rollout.id);
            }
        }
        Ok(())
    }

    /// The state in force.
    pub fn applied(&self) -> FleetState {
        self.lock().clone()
    }

    /// Runs `f` on the state in force while no change can be applied: a new route table
    /// built and put in force inside `f` misses none.
    pub fn with_applied<R>(&self, f: impl FnOnce(&FleetState) -> R) -> R {
        f(&self.lock())
    }

    /// Whether the whole state was loaded from PostgreSQL at least once.
    pub fn is_loaded(&self) -> bool {
        self.inner.loaded.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FleetState> {
        self.inner
            .applied
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes route `route`'s split fleet-wide, as an operator, and applies it here
    /// before returning; `None` while a rollout runs on the route.
    ///
    /// # Errors
    /// The database is unreachable: nothing changed anywhere.
    pub async fn change(
        &self,
        route: &str,
        weights: Option<&Weights>,
    ) -> Result<Option<Committed>, StoreError> {
        let changed = self
            .inner
            .control
            .set_split(route, weights, Changer::Operator)
            .await?;
        Ok(changed.map(|(committed, change)| {
            self.apply_change(&change, Source::Local);
            committed
        }))
    }

    /// Aborts the rollout running on `route` (see [`Control::abort_rollout`]) and applies
    /// the route's return here before returning; `None` when none runs.
    ///
    /// # Errors
    /// The database is unreachable: nothing changed anywhere.
    pub async fn abort_rollout(
        &self,
        route: &str,
        reason: &str,
    ) -> Result<Option<(RolloutRow, Committed)>, StoreError> {
        let aborted = self.inner.control.abort_rollout(route, reason).await?;
        Ok(aborted.map(|(rollout, committed, change)| {
            self.apply_change(&change, Source::Local);
            (rollout, committed)
        }))
    }

    /// A message from the fleet channel.
    pub fn receive(&self, message: &str) {
        match serde_json::from_str::<Change>(message) {
            Ok(change) => {
                let latency = unix_micros().saturating_sub(change.sent_at_micros);
                #[allow(clippy::cast_precision_loss)]
                // microseconds fit an f64 exactly far beyond any latency
                self.inner.metrics.propagation.record(latency as f64 / 1e6);
                self.apply_change(&change, Source::Bus);
            }
            Err(error) => tracing::debug!(%error, "Ignored a malformed fleet message."),
        }
    }

    /// Messages may have been lost (the bus reconnected): read the revision now.
    pub fn repair(&self) {
        self.inner.repair.notify_one();
    }

    /// Applies one change if it is the next revision; an older or repeated one is
    /// ignored, and a gap loads the whole state instead.
    fn apply_change(&self, change: &Change, source: Source) {
        let mut applied = self.lock();
        if change.revision <= applied.revision && self.is_loaded() {
            return;
        }
        if change.revision != applied.revision + 1 || !self.is_loaded() {
            drop(applied);
            self.repair();
            return;
        }
        match &change.weights {
            Some(weights) => applied.splits.insert(change.route.clone(), weights.clone()),
            None => applied.splits.remove(&change.route),
        };
        applied.revision = change.revision;
        tracing::info!(
            revision = change.revision,
            route = change.route,
            weights = ?change.weights,
            source = source.label(),
            "Fleet change applied."
        );
        self.put_in_force(&applied, source);
    }

    /// Puts a whole state in force if it is newer than the one in force.
    fn apply_state(&self, state: FleetState, source: Source) {
        let mut applied = self.lock();
        if state.revision <= applied.revision && self.is_loaded() {
            return;
        }
        let first = !self.inner.loaded.swap(true, Ordering::AcqRel);
        if *applied != state || first {
            tracing::info!(
                revision = state.revision,
                from_revision = applied.revision,
                splits = ?state.splits,
                source = source.label(),
                "Fleet state applied."
            );
        }
        *applied = state;
        self.put_in_force(&applied, source);
    }

    fn put_in_force(&self, state: &FleetState, source: Source) {
        if let Some(applier) = self.inner.applier.get() {
            applier(state);
        }
        #[allow(clippy::cast_precision_loss)]
        // revisions stay far below 2^53
        self.inner.metrics.revision.set(state.revision as f64);
        metrics::counter!("tiergate_fleet_applied_total", "source" => source.label()).increment(1);
        self.inner.applied_news.notify_one();
    }

    /// Loads the whole state from PostgreSQL and puts it in force if it is newer.
    ///
    /// # Errors
    /// The database is unreachable: the state in force stays.
    pub async fn load(&self) -> Result<(), StoreError> {
        let snapshot = self.inner.control.snapshot().await?;
        self.apply_state(snapshot.into(), Source::Poll);
        Ok(())
    }

    /// Beats the heartbeat; returns the fleet revision.
    async fn beat(&self) -> Result<i64, StoreError> {
        let inner = &self.inner;
        let in_flight = inner.in_flight.get().map_or(0, |count| count());
        let beat = Heartbeat {
            id: &inner.id,
            version: inner.build.version,
            commit: inner.build.commit,
            colour: inner.colour.as_deref(),
            ttl: inner.task_ttl,
            applied_revision: self.applied().revision,
            in_flight,
        };
        inner.control.db.fleet_heartbeat(&beat).await
    }

    /// Every `fleet.poll_interval`, or at once when woken: the heartbeat, and a load
    /// when PostgreSQL has a newer revision than the one in force. Ends when the last
    /// other clone is dropped.
    pub(crate) async fn run(self, app: std::sync::Weak<crate::Inner>) {
        let fleet = self;
        let mut tick = tokio::time::interval(fleet.inner.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = fleet.inner.repair.notified() => {}
                () = fleet.inner.applied_news.notified() => {}
            }
            if app.strong_count() == 0 {
                return;
            }
            match fleet.beat().await {
                Ok(revision) if revision > fleet.applied().revision => {
                    fleet.inner.metrics.repairs.increment(1);
                    if let Err(error) = fleet.load().await {
                        tracing::warn!(error = %crate::ErrorChain(&error), "Fleet state not loaded; the state in force stays.");
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %crate::ErrorChain(&error), "Fleet heartbeat failed; the state in force stays.");
                }
            }
            if let Err(error) = fleet.watch_rollouts().await {
                tracing::warn!(error = %crate::ErrorChain(&error), "Rollout reports not sent.");
            }
        }
    }
}

struct FleetMetrics {
    revision: Gauge,
    propagation: Histogram,
    repairs: Counter,
}

impl FleetMetrics {
    fn new() -> Self {
        metrics::describe_gauge!(
            "tiergate_fleet_revision_applied",
            "The fleet revision this task has in force."
        );
        metrics::describe_histogram!(
            "tiergate_fleet_propagation_seconds",
            metrics::Unit::Seconds,
            "From the publish of a fleet change to its arrival here over the bus."
        );
        metrics::describe_counter!(
            "tiergate_fleet_applied_total",
            "Fleet changes and states put in force, by source (bus, local, poll)."
        );
        crate::rollout::describe_metrics();
        metrics::describe_counter!(
            "tiergate_fleet_repairs_total",
            "Polls that found a newer revision than the one in force (a lost or late message)."
        );
        Self {
            revision: metrics::gauge!("tiergate_fleet_revision_applied"),
            propagation: metrics::histogram!("tiergate_fleet_propagation_seconds"),
            repairs: metrics::counter!("tiergate_fleet_repairs_total"),
        }
    }
}
