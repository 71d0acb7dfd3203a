//! The item use cases over the store and the cache tiers: get, list, create, update, delete.
//!
//! Reads go L1 → (single flight) L2 → PostgreSQL and fill the faster tiers on the way
//! back. Writes go to PostgreSQL first, then record the new version in L1 (this
//! process reads its own write at once) and fence it into L2, so no reader can put an
//! older copy back. A Redis failure is a miss, never a failed request.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metrics::Counter;

use crate::cache::l1::L1;
use crate::cache::l2::{L2, Stored};
use crate::cache::{Entry, Kind, Tier};
use crate::model::{Item, ItemId};
use crate::store::{Database, StoreError, UpdateOutcome};

/// Why a use case failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not encode an item as JSON")]
    Encode(#[from] serde_json::Error),
}

/// The answer to a read: the entry (value or absent) and the tier that had it.
#[derive(Debug)]
pub struct Lookup {
    pub entry: Arc<Entry>,
    pub tier: Tier,
}

/// The outcome of an update.
#[derive(Debug)]
pub enum Updated {
    Done(Arc<Entry>),
    NotFound,
    /// The `If-Match` precondition failed; the item is at this version.
    Conflict(i64),
}

/// The items use cases. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Items {
    db: Database,
    l1: L1,
    l2: L2,
    /// Redis TTL of an absent id: short, so an id created elsewhere shows up soon.
    negative_ttl: Duration,
    metrics: CacheMetrics,
}

impl Items {
    /// The use cases over these tiers.
    pub fn new(db: Database, l1: L1, l2: L2, negative_ttl: Duration) -> Self {
        Self {
            db,
            l1,
            l2,
            negative_ttl,
            metrics: CacheMetrics::new(),
        }
    }

    /// The database, for health checks and start-up.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// The L1 tier, for maintenance and gauges.
    pub fn l1(&self) -> &L1 {
        &self.l1
    }

    /// The L2 tier, for health checks.
    pub fn l2(&self) -> &L2 {
        &self.l2
    }

    /// Reads one item (or learns that it does not exist) through the cache chain.
    ///
    /// # Errors
    /// PostgreSQL was needed and failed; shared by every caller of the same flight.
    pub async fn get(&self, id: ItemId) -> Result<Lookup, Arc<ServiceError>> {
        let key = id.get();
        if let Some(entry) = self.l1.get(key).await {
            self.metrics.l1_hit.increment(1);
            return Ok(Lookup {
                entry,
                tier: Tier::L1,
            });
        }
        self.metrics.l1_miss.increment(1);
        let entry = self.l1.get_or_load(key, self.load(id)).await?;
        if self.l1.is_current(key, &entry) {
            let tier = entry.origin;
            return Ok(Lookup { entry, tier });
        }
        // Superseded: a newer version was written here while this load ran (moka still
        // inserted the old one; the next read drops it). Answer from the writer, uncached.
        self.metrics.l1_superseded.increment(1);
        let latest = self
            .db
            .get_latest(id)
            .await
            .map_err(|e| Arc::new(e.into()))?;
        let entry = match latest {
            Some(item) => Arc::new(entry_of(&item).map_err(|e| Arc::new(e.into()))?),
            None => Arc::new(Entry::absent(entry.version, Tier::Database)),
        };
        Ok(Lookup {
            entry,
            tier: Tier::Database,
        })
    }

    /// The single loader behind an L1 miss: L2, then PostgreSQL with a fenced L2 fill.
    async fn load(&self, id: ItemId) -> Result<Arc<Entry>, ServiceError> {
        let key = id.get();
        let mut deleted_at = None;
        match self.l2.get(key).await {
            Ok(Some((version, Stored::Value(json)))) => {
                self.metrics.l2_hit.increment(1);
                return Ok(Arc::new(Entry::value(version, &json, Tier::L2)));
            }
            Ok(Some((version, Stored::Absent))) => {
                self.metrics.l2_hit.increment(1);
                return Ok(Arc::new(Entry::absent(version, Tier::L2)));
            }
            // A tombstone says "deleted at this version"; PostgreSQL confirms it, and the
            // fill below may replace it with what it read.
            Ok(Some((version, Stored::Tombstone))) => {
                self.metrics.l2_miss.increment(1);
                deleted_at = Some(version);
            }
            Ok(None) => self.metrics.l2_miss.increment(1),
            Err(error) => {
                self.metrics.l2_error.increment(1);
                tracing::debug!(%error, "L2 read failed; reading PostgreSQL.");
            }
        }
        let (entry, stored, ttl) = match self.db.get(id).await? {
            Some(item) => {
                let entry = entry_of(&item)?;
                let stored = Stored::Value(entry.item_json());
                (entry, stored, None)
            }
            None => {
                // Ids are never reused, so "absent" is final: it is at least as new as any
                // version of this id known here.
                let known = deleted_at
                    .unwrap_or(0)
                    .max(self.l1.watermark(key).unwrap_or(0));
                (
                    Entry::absent(known, Tier::Database),
                    Stored::Absent,
                    Some(self.negative_ttl),
                )
            }
        };
        self.fill_l2(key, entry.version, &stored, ttl).await;
        Ok(Arc::new(entry))
    }

    /// A page of items straight from PostgreSQL, and whether more follow.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn list(&self, after: i64, limit: u16) -> Result<(Vec<Item>, bool), ServiceError> {
        // One extra row tells whether another page follows, without a COUNT.
        let mut items = self.db.list(after, i64::from(limit) + 1).await?;
        let more = items.len() > usize::from(limit);
        items.truncate(usize::from(limit));
        Ok((items, more))
    }

    /// Creates an item; returns its new id and entry.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn create(&self, name: &str) -> Result<(ItemId, Arc<Entry>), ServiceError> {
        let item = self.db.create(name).await?;
        let entry = Arc::new(entry_of(&item)?);
        self.after_write(item.id, &entry).await;
        Ok((ItemId::from(item.id), entry))
    }

    /// Renames an item; with `expected`, only if it is at one of those versions.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn update(
        &self,
        id: ItemId,
        name: &str,
        expected: Option<&[i64]>,
    ) -> Result<Updated, ServiceError> {
        match self.db.update(id, name, expected).await? {
            UpdateOutcome::Updated(item) => {
                let entry = Arc::new(entry_of(&item)?);
                self.after_write(item.id, &entry).await;
                Ok(Updated::Done(entry))
            }
            UpdateOutcome::NotFound => Ok(Updated::NotFound),
            UpdateOutcome::VersionMismatch(version) => Ok(Updated::Conflict(version)),
        }
    }

    /// Deletes an item; `false` when there was none. The deletion is recorded one version
    /// above the last, as a tombstone, so no older fill can bring the item back.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn delete(&self, id: ItemId) -> Result<bool, ServiceError> {
        let Some(last) = self.db.delete(id).await? else {
            return Ok(false);
        };
        let entry = Arc::new(Entry::absent(last + 1, Tier::Database));
        self.after_write(id.get(), &entry).await;
        Ok(true)
    }

    /// After a commit: L1 first (read-your-writes), then the fenced L2 write.
    async fn after_write(&self, key: i64, entry: &Arc<Entry>) {
        self.l1.insert_written(key, Arc::clone(entry)).await;
        let stored = match entry.kind {
            Kind::Value => Stored::Value(entry.item_json()),
            Kind::Absent => Stored::Tombstone,
        };
        self.fill_l2(key, entry.version, &stored, None).await;
    }

    async fn fill_l2(&self, key: i64, version: i64, stored: &Stored, ttl: Option<Duration>) {
        match self.l2.fill(key, version, stored, ttl).await {
            Ok(true) => self.metrics.l2_written.increment(1),
            Ok(false) => self.metrics.l2_fenced.increment(1),
            Err(error) => {
                self.metrics.l2_write_error.increment(1);
                tracing::debug!(%error, "L2 write failed.");
            }
        }
    }
}

/// The cache entry of an item read from PostgreSQL.
fn entry_of(item: &Item) -> Result<Entry, serde_json::Error> {
    let json = Bytes::from(serde_json::to_vec(item)?);
    Ok(Entry::value(item.version, &json, Tier::Database))
}

/// Counter handles, registered once: an increment on the hot path is one atomic add,
/// not a registry lookup.
#[derive(Clone)]
struct CacheMetrics {
    l1_hit: Counter,
    l1_miss: Counter,
    l1_superseded: Counter,
    l2_hit: Counter,
    l2_miss: Counter,
    l2_error: Counter,
    l2_written: Counter,
    l2_fenced: Counter,
    l2_write_error: Counter,
}

impl std::fmt::Debug for CacheMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheMetrics")
    }
}

impl CacheMetrics {
    fn new() -> Self {
        const LOOKUPS: &str = "tiergate_cache_requests_total";
        const WRITES: &str = "tiergate_cache_l2_writes_total";
        metrics::describe_counter!(LOOKUPS, "Cache lookups by tier and result.");
        metrics::describe_counter!(
            WRITES,
            "Fenced L2 writes by result (written, fenced off by a newer version, error)."
        );
        let lookup = |tier: &'static str, result: &'static str| metrics::counter!(LOOKUPS, "tier" => tier, "result" => result);
        let write = |result: &'static str| metrics::counter!(WRITES, "result" => result);
        Self {
            l1_hit: lookup("l1", "hit"),
            l1_miss: lookup("l1", "miss"),
            l1_superseded: lookup("l1", "stale"),
            l2_hit: lookup("l2", "hit"),
            l2_miss: lookup("l2", "miss"),
            l2_error: lookup("l2", "error"),
            l2_written: write("written"),
            l2_fenced: write("fenced"),
            l2_write_error: write("error"),
        }
    }
}
