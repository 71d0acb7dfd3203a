//! L1: the in-process tier (moka), bounded in bytes, with a version watermark.
//!
//! Policy: an entry lives for `cache.l1_ttl` (±10 % jitter, so entries filled together do
//! not expire together), absent entries for a fifth of that; reads never extend a TTL.
//! The byte bound evicts by moka's TinyLFU policy.
//!
//! moka does not cancel an in-flight fill when a key is invalidated or inserted: the
//! older fill lands afterwards. So every hit is checked against a watermark, the newest
//! version this process has written or been told about for that key; an entry older
//! than its watermark is dropped and reloaded instead of served.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use moka::Expiry;

use super::{Entry, Kind};

/// How many keys the watermark may remember. Past it, L1 is flushed and the marks
/// forgotten together: with no older entry left, no mark is needed.
const WATERMARK_CAPACITY: usize = 200_000;

/// The in-process tier. Cheap to clone: clones share the same caches.
#[derive(Debug, Clone)]
pub struct L1 {
    entries: moka::future::Cache<i64, Arc<Entry>>,
    watermark: Arc<Watermark>,
}

impl L1 {
    /// An empty tier holding at most `max_bytes` (approximately) for `ttl` per entry.
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_id: &i64, entry: &Arc<Entry>| entry.weight())
            .expire_after(JitteredTtl { ttl })
            .build();
        // Twice the L1 TTL: outlives every entry (TTL + 10 % jitter) a mark guards against.
        let watermark = Arc::new(Watermark {
            marks: DashMap::new(),
            keep_for: ttl.saturating_mul(2),
        });
        Self { entries, watermark }
    }

    /// The entry for `id` if there is one at or above the watermark. A superseded entry
    /// is removed, so the caller's next step reloads it.
    pub async fn get(&self, id: i64) -> Option<Arc<Entry>> {
        let entry = self.entries.get(&id).await?;
        if self.is_current(id, &entry) {
            return Some(entry);
        }
        self.entries.invalidate(&id).await;
        None
    }

    /// Whether `entry` is at least as new as anything this process knows of `id`.
    pub fn is_current(&self, id: i64, entry: &Entry) -> bool {
        self.watermark
            .get(id)
            .is_none_or(|mark| entry.version >= mark)
    }

    /// The newest version of `id` this process knows of, if it remembers one.
    pub fn watermark(&self, id: i64) -> Option<i64> {
        self.watermark.get(id)
    }

    /// Raises the watermark of `id` to `version` (never lowers it).
    pub fn observe_version(&self, id: i64, version: i64) {
        self.watermark.raise(id, version);
    }

    /// Records a write made by this process: the watermark first, so an in-flight older
    /// fill cannot be served after this, then the new entry (read-your-writes).
    pub async fn insert_written(&self, id: i64, entry: Arc<Entry>) {
        self.observe_version(id, entry.version);
        self.entries.insert(id, entry).await;
    }

    /// The entry for `id`, loading it with `load` on a miss. Concurrent callers for one id
    /// share a single `load` (moka's `try_get_with`): this is the single flight. Every fill
    /// must come through here; moka coalesces only calls with the same error type.
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

    /// Drops one entry.
    pub async fn invalidate(&self, id: i64) {
        self.entries.invalidate(&id).await;
    }

    /// Entries and weighted bytes held, for the gauges. Approximate until moka has run
    /// its pending maintenance.
    pub fn usage(&self) -> (u64, u64) {
        (self.entries.entry_count(), self.entries.weighted_size())
    }

    /// Runs moka's pending housekeeping (evictions, expirations) now; call about once a
    /// second so the gauges and the byte bound stay close to the truth.
    pub async fn run_pending_tasks(&self) {
        self.entries.run_pending_tasks().await;
        if self.watermark.sweep() > WATERMARK_CAPACITY {
            // Flush first: once no entry older than a mark is left, the marks can go.
            self.entries.invalidate_all();
            self.watermark.marks.clear();
            tracing::warn!("L1 flushed: more recently written keys than the watermark keeps.");
        }
    }
}

/// The newest version seen per key, and when it was raised. A sharded map: a hit reads
/// one shard under a brief read lock, never a global one.
#[derive(Debug)]
struct Watermark {
    marks: DashMap<i64, (i64, Instant)>,
    /// A mark older than this guards nothing: every entry it could reject has expired.
    keep_for: Duration,
}

impl Watermark {
    fn get(&self, id: i64) -> Option<i64> {
        self.marks.get(&id).map(|mark| mark.0)
    }

    fn raise(&self, id: i64, version: i64) {
        let now = Instant::now();
        self.marks
            .entry(id)
            .and_modify(|mark| {
                if version > mark.0 {
                    *mark = (version, now);
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

/// Per-entry TTL: the configured TTL with ±10 % jitter; a fifth of it for absent ids.
#[derive(Debug)]
struct JitteredTtl {
    ttl: Duration,
}

impl Expiry<i64, Arc<Entry>> for JitteredTtl {
    fn expire_after_create(
        &self,
        _id: &i64,
        entry: &Arc<Entry>,
        _now: Instant,
    ) -> Option<Duration> {
        let base = match entry.kind {
            Kind::Value => self.ttl,
            Kind::Absent => self.ttl / 5,
        };
        Some(base.mul_f64(0.9 + fastrand::f64() * 0.2))
    }

    fn expire_after_update(
        &self,
        id: &i64,
        entry: &Arc<Entry>,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        // A replaced entry is a new fact: it gets a fresh TTL of its own kind.
        self.expire_after_create(id, entry, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Tier;

    fn value(version: i64) -> Arc<Entry> {
        Arc::new(Entry::value(version, b"{}", Tier::Database))
    }

    #[tokio::test]
    async fn an_entry_older_than_the_watermark_is_not_served() {
        let l1 = L1::new(1 << 20, Duration::from_secs(60));
        l1.get_or_load(7, async { Ok::<_, ()>(value(1)) })
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
        let l1 = L1::new(1 << 20, Duration::from_secs(60));
        l1.observe_version(7, 5);
        l1.observe_version(7, 3);
        assert!(!l1.is_current(7, &value(4)));
        assert!(l1.is_current(7, &value(5)));
    }

    #[tokio::test]
    async fn a_local_write_wins_over_an_older_fill_that_lands_after_it() {
        // R3 of CACHE.md: the older fill is inserted last, but the watermark set by the
        // write makes the next read drop it.
        let l1 = L1::new(1 << 20, Duration::from_secs(60));
        l1.insert_written(9, value(2)).await;
        l1.entries.insert(9, value(1)).await; // the in-flight fill of v1 lands
        assert!(l1.get(9).await.is_none());
    }
}
