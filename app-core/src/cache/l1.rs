//! L1: the in-process tier (moka), bounded in bytes, guarded by a version watermark and
//! a flush stamp.
//!
//! Policy: an entry is fresh for `cache.l1_ttl` (±10 % jitter, so entries filled together
//! do not expire together), absent ids for a fifth of that, and for `cache.degraded_l1_ttl`
//! while invalidations may be lost. Past fresh, moka keeps it `cache.max_stale` longer, to
//! be served only if PostgreSQL cannot answer. Reads never extend a lifetime; the byte
//! bound evicts by moka's TinyLFU policy.
//!
//! moka does not cancel an in-flight fill when a key is invalidated or inserted: the older
//! fill lands afterwards. So a hit counts only if the entry is at least the newest version
//! this process knows for the key (the watermark, raised by local writes and received
//! invalidations) and its load started after the last flush.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use moka::Expiry;

use super::{Entry, Kind, Stamp, Tier};

/// The hasher of L1's tables, looked up on every hit: seeded per process (ids come from
/// clients, so collisions must not be chosen from outside), and a few instructions for an
/// integer where std's SipHash costs ~100.
type KeyHasher = foldhash::quality::RandomState;

/// How many keys the watermark may remember. Past it, L1 is flushed and the marks
/// forgotten together: with no older entry left, no mark is needed.
const WATERMARK_CAPACITY: usize = 200_000;

/// Lifetimes of L1 entries.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub ttl: Duration,
    pub degraded_ttl: Duration,
    pub max_stale: Duration,
    /// Age from which a hit also triggers one background refresh; zero turns it off.
    pub refresh_after: Duration,
}

/// The in-process tier. Cheap to clone: clones share the same caches.
#[derive(Debug, Clone)]
pub struct L1 {
    entries: moka::future::Cache<i64, Arc<Entry>, KeyHasher>,
    watermark: Arc<Watermark>,
    state: Arc<State>,
    policy: Policy,
}

#[derive(Debug)]
struct State {
    /// The origin of the flush stamps below.
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last flush; entries loaded before it are void.
    last_flush: AtomicU64,
    /// Invalidations may be lost (the subscriber is down): new entries live briefly.
    degraded: AtomicBool,
    /// Woken when `degraded` turns false.
    coherent: tokio::sync::Notify,
    /// Bumped by every write seen here (local or announced) and every flush: a cached
    /// list page is served only under the generation it was loaded in.
    generation: AtomicU64,
    /// Nanoseconds after `epoch` of the last generation bump.
    last_change: AtomicU64,
}

impl L1 {
    /// An empty tier holding at most `max_bytes` (approximately). It starts degraded:
    /// until the invalidation channel is up, nothing tells it about peers' writes.
    pub fn new(max_bytes: u64, policy: Policy) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_id: &i64, entry: &Arc<Entry>| entry.weight())
            .expire_after(KeepUntilStale {
                max_stale: policy.max_stale,
            })
            .build_with_hasher(KeyHasher::default());
        // Marks outlive every entry (fresh + stale, jitter included) they guard against.
        let keep_for = (policy.ttl.mul_f64(1.1) + policy.max_stale).saturating_mul(2);
        let watermark = Arc::new(Watermark {
            marks: DashMap::with_hasher(KeyHasher::default()),
            keep_for,
        });
        let state = Arc::new(State {
            epoch: Instant::now(),
            last_flush: AtomicU64::new(0),
            degraded: AtomicBool::new(true),
            coherent: tokio::sync::Notify::new(),
            generation: AtomicU64::new(0),
            last_change: AtomicU64::new(0),
        });
        Self {
            entries,
            watermark,
            state,
            policy,
        }
    }

    /// The stamp of an entry whose load started at `loaded_at`.
    pub fn stamp(&self, origin: Tier, loaded_at: Instant, kind: Kind) -> Stamp {
        Self::stamp_within(self.ttl_now(), origin, loaded_at, kind)
    }

    /// The stamp of an entry that may be older than PostgreSQL (a replica's answer that
    /// could not be checked against the writer): fresh only for `degraded_ttl`, like the
    /// entries made while invalidations may be lost.
    pub fn unverified_stamp(&self, origin: Tier, loaded_at: Instant, kind: Kind) -> Stamp {
        let base = self.policy.degraded_ttl.min(self.policy.ttl);
        Self::stamp_within(base, origin, loaded_at, kind)
    }

    fn stamp_within(base: Duration, origin: Tier, loaded_at: Instant, kind: Kind) -> Stamp {
        let base = match kind {
            Kind::Value => base,
            Kind::Absent => base / 5,
        };
        Stamp {
            origin,
            loaded_at,
            fresh_for: base.mul_f64(0.9 + fastrand::f64() * 0.2),
        }
    }

    /// The entry for `id` if it is current (see [`L1::is_current`]). It may be past
    /// fresh: the caller decides (see `service`). A superseded entry is removed, so the
    /// caller's next step reloads it.
    pub async fn get(&self, id: i64) -> Option<Arc<Entry>> {
        let entry = self.entries.get(&id).await?;
        if self.is_current(id, &entry) {
            return Some(entry);
        }
        // Boxed: moka's invalidation future is large, and the hit path above would carry
        // its size (copied on every request) for nothing.
        Box::pin(self.entries.invalidate(&id)).await;
        None
    }

    /// Whether `entry` is at least as new as anything this process knows of `id`, and
    /// its load started after the last flush.
    pub fn is_current(&self, id: i64, entry: &Entry) -> bool {
        let since_epoch = entry
            .stamp
            .loaded_at
            .saturating_duration_since(self.state.epoch);
        let loaded = u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX);
        loaded >= self.state.last_flush.load(Ordering::Acquire)
            && self
                .watermark
                .get(id)
                .is_none_or(|(mark, _)| entry.version >= mark)
    }

    /// Whether a hit of this age should also start a background refresh.
    pub fn wants_refresh(&self, entry: &Entry, age: Duration) -> bool {
        !self.policy.refresh_after.is_zero()
            && age >= self.policy.refresh_after.min(entry.stamp.fresh_for)
    }

    /// The newest version of `id` this process knows of, if it remembers one.
    pub fn watermark(&self, id: i64) -> Option<i64> {
        self.watermark.get(id).map(|(version, _)| version)
    }

    /// Whether `id` was written (here or, as far as invalidations tell, anywhere) within
    /// `window`.
    pub fn written_within(&self, id: i64, window: Duration) -> bool {
        self.watermark
            .get(id)
            .is_some_and(|(_, raised)| raised.elapsed() < window)
    }

    /// Raises the watermark of `id` to `version` (never lowers it).
    pub fn observe_version(&self, id: i64, version: i64) {
        self.watermark.raise(id, version);
    }

    /// Records a write made by this process: the watermark first, so an in-flight older
    /// fill cannot be served after this, then the new entry (read-your-writes).
    pub async fn insert_written(&self, id: i64, entry: Arc<Entry>) {
        self.observe_version(id, entry.version);
        self.bump_generation();
        self.entries.insert(id, entry).await;
    }

    /// Inserts a background refresh's result, unless it is already superseded.
    pub async fn insert_refreshed(&self, id: i64, entry: Arc<Entry>) {
        if self.is_current(id, &entry) {
            self.entries.insert(id, entry).await;
        }
    }

    /// The entry for `id`, loading it with `load` on a miss. Concurrent callers for one id
    /// share a single `load` (moka's `try_get_with`): this is the single flight. If the
    /// caller running `load` is cancelled, a waiting caller takes over. Every fill must
    /// come through here; moka coalesces only calls with the same error type.
    ///
    /// # Errors
    /// The loader's error, shared by every caller that waited on it.
    pub async fn get_or_load<F, E>(&self, id: i64, load: F) -> Result<Arc<Entry>, Arc<E>>
    where
        F: Future<Output = Result<Arc<Entry>, E>>,
        E: Send + Sync + 'static,
    {
        self.entries.try_get_with(id, load).await
    }

    /// Drops one entry and raises its watermark: an invalidation from a peer.
    pub async fn invalidate_version(&self, id: i64, version: i64) {
        self.observe_version(id, version);
        self.bump_generation();
        self.entries.invalidate(&id).await;
    }

    /// Drops one entry.
    pub async fn invalidate(&self, id: i64) {
        self.entries.invalidate(&id).await;
    }

    /// Voids every entry, including fills still in flight (they started before now).
    /// For when invalidations may have been lost.
    pub fn flush(&self) {
        let since_epoch = self.state.epoch.elapsed();
        let now = u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX);
        self.state.last_flush.fetch_max(now, Ordering::AcqRel);
        self.bump_generation();
        self.entries.invalidate_all();
    }

    /// The list generation: it moves on every write seen here and every flush.
    pub fn generation(&self) -> u64 {
        self.state.generation.load(Ordering::Acquire)
    }

    /// Whether any write was seen here within `window` (replica lag for list reads).
    pub fn changed_within(&self, window: Duration) -> bool {
        let last = Duration::from_nanos(self.state.last_change.load(Ordering::Acquire));
        self.state.generation.load(Ordering::Acquire) > 0
            && self.state.epoch.elapsed().saturating_sub(last) < window
    }

    /// How long an entry made now stays fresh, before jitter.
    pub fn ttl_now(&self) -> Duration {
        if self.state.degraded.load(Ordering::Relaxed) {
            self.policy.degraded_ttl.min(self.policy.ttl)
        } else {
            self.policy.ttl
        }
    }

    fn bump_generation(&self) {
        let now = u64::try_from(self.state.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.state.last_change.fetch_max(now, Ordering::AcqRel);
        self.state.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks whether invalidations may be lost right now.
    pub fn set_degraded(&self, degraded: bool) {
        self.state.degraded.store(degraded, Ordering::Release);
        if !degraded {
            self.state.coherent.notify_waiters();
        }
    }

    /// Waits until invalidations are received (not degraded), at most `timeout`;
    /// returns whether they are.
    pub async fn wait_coherent(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the check, so a wake-up in between is not missed.
            let woken = self.state.coherent.notified();
            if !self.is_degraded() {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return false;
            }
        }
    }

    /// Whether invalidations may be lost right now.
    pub fn is_degraded(&self) -> bool {
        self.state.degraded.load(Ordering::Relaxed)
    }

    /// Entries and weighted bytes held, for the gauges. Approximate until moka has run
    /// its pending maintenance.
    pub fn usage(&self) -> (u64, u64) {
        (self.entries.entry_count(), self.entries.weighted_size())
    }

    /// Runs moka's pending housekeeping (evictions, expirations) now and forgets expired
    /// marks; call about once a second so the gauges and the bounds stay close to the truth.
    pub async fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks().await;
        if self.watermark.sweep() > WATERMARK_CAPACITY {
            // Flush first: once no entry older than a mark is left, the marks can go.
            self.flush();
            self.watermark.marks.clear();
            tracing::warn!("L1 flushed: more recently written keys than the watermark keeps.");
        }
    }
}

/// The newest version seen per key, and when it was raised. A sharded map: a hit reads
/// one shard under a brief read lock, never a global one.
#[derive(Debug)]
struct Watermark {
    marks: DashMap<i64, (i64, Instant), KeyHasher>,
    /// A mark older than this guards nothing: every entry it could reject has expired.
    keep_for: Duration,
}

impl Watermark {
    fn get(&self, id: i64) -> Option<(i64, Instant)> {
        self.marks.get(&id).map(|mark| *mark)
    }

    fn raise(&self, id: i64, version: i64) {
        let now = Instant::now();
        self.marks
            .entry(id)
            .and_modify(|mark| {
                if version >= mark.0 {
                    *mark = (version.max(mark.0), now);
                }
            })
            .or_insert((version, now));
    }

    /// Forgets expired marks; returns how many remain.
    fn sweep(&self) -> usize {
        let now = Instant::now();
        self.marks
            .retain(|_, mark| now.duration_since(mark.1) < self.keep_for);
        self.marks.len()
    }
}

/// Keeps an entry until it is past fresh *and* past the stale allowance, counted from
/// when its load started: re-inserting an entry never extends its life.
#[derive(Debug)]
struct KeepUntilStale {
    max_stale: Duration,
}

impl KeepUntilStale {
    fn remaining(&self, entry: &Entry, now: Instant) -> Duration {
        let deadline = entry.stamp.loaded_at + entry.stamp.fresh_for + self.max_stale;
        deadline.saturating_duration_since(now)
    }
}

impl Expiry<i64, Arc<Entry>> for KeepUntilStale {
    fn expire_after_create(&self, _id: &i64, entry: &Arc<Entry>, now: Instant) -> Option<Duration> {
        Some(self.remaining(entry, now))
    }

    fn expire_after_update(
        &self,
        _id: &i64,
        entry: &Arc<Entry>,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.remaining(entry, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l1() -> L1 {
        let ttl = Duration::from_secs(60);
        L1::new(
            1 << 20,
            Policy {
                ttl,
                degraded_ttl: ttl,
                max_stale: ttl,
                refresh_after: ttl,
            },
        )
    }

    fn value(l1: &L1, version: i64, loaded_at: Instant) -> Arc<Entry> {
        Arc::new(Entry::value(
            version,
            b"{}",
            l1.stamp(Tier::Database, loaded_at, Kind::Value),
        ))
    }

    #[tokio::test]
    async fn an_entry_older_than_the_watermark_is_not_served() {
        let l1 = l1();
        l1.get_or_load(7, async { Ok::<_, ()>(value(&l1, 1, Instant::now())) })
            .await
            .unwrap();
        assert_eq!(l1.get(7).await.map(|e| e.version), Some(1));

        l1.observe_version(7, 2);
        assert!(
            l1.get(7).await.is_none(),
            "v1 must not be served once v2 is known"
        );
    }

    #[tokio::test]
    async fn the_watermark_never_goes_down() {
        let l1 = l1();
        l1.observe_version(7, 5);
        l1.observe_version(7, 3);
        assert!(!l1.is_current(7, &value(&l1, 4, Instant::now())));
        assert!(l1.is_current(7, &value(&l1, 5, Instant::now())));
    }

    /// R3 in `docs/cache-protocol.md`: the older fill is inserted last, but the watermark
    /// set by the write makes the next read drop it. Without `observe_version` in
    /// `insert_written`, v1 is served (checked by removing it).
    #[tokio::test]
    async fn a_local_write_wins_over_an_older_fill_that_lands_after_it() {
        let l1 = l1();
        let started = Instant::now();
        l1.insert_written(9, value(&l1, 2, Instant::now())).await;
        l1.entries.insert(9, value(&l1, 1, started)).await; // the in-flight fill of v1 lands
        assert!(l1.get(9).await.is_none());
    }

    /// R7 in `docs/cache-protocol.md`: a fill that started before a flush is void, however
    /// late it lands. Without the `last_flush` comparison in `is_current` it is served
    /// (checked).
    #[tokio::test]
    async fn a_fill_started_before_a_flush_is_not_served() {
        let l1 = l1();
        let started = Instant::now();
        l1.flush();
        l1.entries.insert(3, value(&l1, 1, started)).await;
        assert!(l1.get(3).await.is_none());
        l1.entries.insert(3, value(&l1, 1, Instant::now())).await;
        assert!(
            l1.get(3).await.is_some(),
            "a fill started after the flush is fine"
        );
    }

    #[tokio::test]
    async fn degraded_entries_get_the_short_lifetime() {
        let ttl = Duration::from_secs(60);
        let l1 = L1::new(
            1 << 20,
            Policy {
                ttl,
                degraded_ttl: Duration::from_secs(2),
                max_stale: ttl,
                refresh_after: ttl,
            },
        );
        assert!(
            l1.stamp(Tier::L2, Instant::now(), Kind::Value).fresh_for
                <= Duration::from_millis(2200)
        );
        l1.set_degraded(false);
        assert!(
            l1.stamp(Tier::L2, Instant::now(), Kind::Value).fresh_for >= Duration::from_secs(54)
        );
    }
}
