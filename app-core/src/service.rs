//! The item use cases over the store and the cache tiers: get, list, create, update,
//! delete, and the outbox relay.
//!
//! Reads go L1 → (single flight) L2 → PostgreSQL and fill the faster tiers on the way
//! back. Writes follow the order of `docs/cache-protocol.md`:
//!
//! 1. PostgreSQL: the change and its outbox row, in one statement;
//! 2. L1 here: watermark, then the new entry (this instance reads its write at once);
//! 3. L2: fence the new version, so no reader can put an older copy back;
//! 4. publish the invalidation, so peers drop their L1 copies;
//! 5. delete the outbox row.
//!
//! The fence precedes the publish, or a peer woken by the message could re-read the old
//! L2 value and keep it. A writer that dies between 1 and 5, or meets a Redis outage,
//! leaves its outbox row; the relay of any instance repeats 3 and 4 for it.

mod relay;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use metrics::Counter;
use tiergate_config::CacheSettings;

use crate::cache::l1::L1;
use crate::cache::l2::{Filler, Invalidation, L2, Stored, unix_micros};
use crate::cache::pages::Page;
use crate::cache::{Entry, Kind, Tier};
use crate::hooks::{Hooks, Point};
use crate::model::{Item, ItemId};
use crate::spans::{self, ChildSpan};
use crate::store::{Database, ItemRead, OutboxId, StoreError, UpdateOutcome};

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

/// A list page to serve and the tier that had it.
#[derive(Debug)]
pub struct PageAnswer {
    pub body: Bytes,
    pub tier: Tier,
}

/// The JSON of a list page; `source` must stay the first field (see `cache::pages`).
#[derive(serde::Serialize)]
struct PageJson<'a> {
    source: &'static str,
    count: usize,
    items: &'a [Item],
    next_after: Option<i64>,
}

/// Enough bytes for the JSON of a page of `items`, unless names need escaping: per item
/// its name and, generously, its other fields (id, two RFC 3339 times, version, keys).
fn page_capacity(items: &[Item]) -> usize {
    const PER_ITEM: usize = 160;
    const ENVELOPE: usize = 96;
    ENVELOPE + items.iter().map(|i| i.name.len() + PER_ITEM).sum::<usize>()
}

/// The outcome of an update.
#[derive(Debug)]
pub enum Updated {
    Done(Arc<Entry>),
    NotFound,
    /// The `If-Match` precondition failed; the item is at this version.
    Conflict(i64),
}

/// The items use cases of one instance. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Items {
    db: Database,
    l1: L1,
    l2: L2,
    hooks: Hooks,
    /// This instance on the invalidation channel: its own messages are skipped.
    origin: u64,
    negative_ttl: Duration,
    recent_write_window: Duration,
    /// Keys with a background refresh in flight: one per key.
    refreshing: Arc<DashMap<i64, ()>>,
    metrics: CacheMetrics,
}

impl Items {
    /// The use cases over these tiers, as one instance with a random origin id.
    pub fn new(db: Database, l1: L1, l2: L2, settings: &CacheSettings, hooks: Hooks) -> Self {
        Self {
            db,
            l1,
            l2,
            hooks,
            origin: fastrand::u64(..),
            negative_ttl: settings.negative_ttl,
            recent_write_window: settings.recent_write_window,
            refreshing: Arc::new(DashMap::new()),
            metrics: CacheMetrics::new(),
        }
    }

    /// The database, for health checks and start-up.
    pub fn db(&self) -> &Database {
        &self.db
    }

    /// The L1 tier, for maintenance, gauges and the bus.
    pub fn l1(&self) -> &L1 {
        &self.l1
    }

    /// The L2 tier, for health checks and the bus.
    pub fn l2(&self) -> &L2 {
        &self.l2
    }

    /// This instance's id on the invalidation channel.
    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// Reads one item (or learns that it does not exist) through the cache chain.
    ///
    /// A fresh L1 hit is served at once (and refreshed in the background when it nears
    /// its end). An entry past fresh is reloaded; if PostgreSQL cannot answer, it is
    /// still served, up to `cache.max_stale`.
    ///
    /// # Errors
    /// PostgreSQL was needed and failed; shared by every caller of the same flight.
    pub async fn get(&self, id: ItemId) -> Result<Lookup, Arc<ServiceError>> {
        let key = id.get();
        let mut stale = None;
        let looked = spans::start();
        let found = self.l1.get(key).await;
        spans::record(looked, |at| {
            ChildSpan::internal("tiergate.cache.l1", at).with("tiergate.cache.hit", found.is_some())
        });
        if let Some(entry) = found {
            let age = entry.age(Instant::now());
            if age < entry.stamp.fresh_for {
                self.metrics.l1_hit.increment(1);
                if self.l1.wants_refresh(&entry, age) {
                    self.refresh(id);
                }
                return Ok(Lookup {
                    entry,
                    tier: Tier::L1,
                });
            }
            // Past fresh: reload through the flight, keeping this copy as the fallback.
            stale = Some(entry);
        }
        // Boxed: the miss path (single flight, Redis, PostgreSQL) is a future of several
        // KiB, and an inline one would make every caller's future that big — the hit
        // path above would pay for copying it on each request.
        Box::pin(self.get_missed(id, stale)).await
    }

    /// The rest of [`Self::get`] after an L1 miss (or a stale hit, kept as `stale`).
    async fn get_missed(
        &self,
        id: ItemId,
        stale: Option<Arc<Entry>>,
    ) -> Result<Lookup, Arc<ServiceError>> {
        let key = id.get();
        if stale.is_some() {
            self.l1.invalidate(key).await;
        }
        self.metrics.l1_miss.increment(1);
        let mut retried = false;
        let entry = loop {
            let entry = self
                .l1
                .get_or_load(key, self.load(id, stale.clone()))
                .await?;
            if stale.as_ref().is_some_and(|s| Arc::ptr_eq(s, &entry)) {
                self.metrics.stale_served.increment(1);
                return Ok(Lookup {
                    entry,
                    tier: Tier::L1,
                });
            }
            if self.l1.is_current(key, &entry) {
                let tier = entry.stamp.origin;
                return Ok(Lookup { entry, tier });
            }
            // Superseded while loading (a newer version was written or announced, or L1
            // was flushed), and moka inserted it anyway. Once more through the flight, so
            // a herd stays one query: `L1::get` drops the superseded entry, or finds what
            // another flight has put there since.
            self.metrics.l1_superseded.increment(1);
            if retried {
                break entry;
            }
            retried = true;
            if let Some(current) = self.l1.get(key).await {
                return Ok(Lookup {
                    entry: current,
                    tier: Tier::L1,
                });
            }
        };
        // Superseded twice: the key churns. Answer from the writer, uncached.
        let started = Instant::now();
        let latest = self
            .db
            .get_latest(id)
            .await
            .map_err(|e| Arc::new(e.into()))?;
        let entry = match latest {
            Some(item) => self
                .entry_of(&item, Tier::Database, started)
                .map_err(|e| Arc::new(e.into()))?,
            None => Entry::absent(
                entry.version,
                self.l1.stamp(Tier::Database, started, Kind::Absent),
            ),
        };
        Ok(Lookup {
            entry: Arc::new(entry),
            tier: Tier::Database,
        })
    }

    /// The single loader behind an L1 miss: L2, then PostgreSQL with a fenced L2 fill.
    /// `stale` is served instead if PostgreSQL is unavailable.
    async fn load(
        &self,
        id: ItemId,
        stale: Option<Arc<Entry>>,
    ) -> Result<Arc<Entry>, ServiceError> {
        let started = Instant::now();
        let key = id.get();
        let mut deleted_at = None;
        // Taken at a miss: the fill below lands only if no writer, and no eviction of
        // the writer's fence, came in between.
        let mut lease = None;
        if self.l2.is_trusted() {
            let looked = spans::start();
            let found = self.l2.get(key).await;
            spans::record(looked, |at| {
                ChildSpan::client("tiergate.cache.l2", at)
                    .with("db.system.name", "redis")
                    .with("tiergate.cache.hit", matches!(found, Ok(Some(_))))
                    .failed(found.is_err())
            });
            match found {
                Ok(Some((version, Stored::Value(json)))) => {
                    self.metrics.l2_hit.increment(1);
                    let stamp = self.l1.stamp(Tier::L2, started, Kind::Value);
                    return Ok(Arc::new(Entry::value(version, &json, stamp)));
                }
                Ok(Some((version, Stored::Absent))) => {
                    self.metrics.l2_hit.increment(1);
                    return Ok(Arc::new(Entry::absent(
                        version,
                        self.l1.stamp(Tier::L2, started, Kind::Absent),
                    )));
                }
                // A tombstone says "changed or deleted at this version": PostgreSQL tells
                // which, and the fill below replaces it with what it read.
                Ok(Some((version, Stored::Tombstone))) => {
                    self.metrics.l2_miss.increment(1);
                    deleted_at = Some(version);
                }
                Ok(None) => {
                    self.metrics.l2_miss.increment(1);
                    lease = self.l2.lease(key).await.ok().flatten();
                }
                Err(error) => {
                    self.metrics.l2_error.increment(1);
                    tracing::debug!(%error, "L2 read failed; reading PostgreSQL.");
                }
            }
        } else {
            self.metrics.l2_skipped.increment(1);
        }

        let queried = spans::start();
        let read = self.read_database(id).await;
        spans::record(queried, |at| {
            ChildSpan::client("SELECT items", at)
                .with("db.system.name", "postgresql")
                .with("db.operation.name", "SELECT")
                .with("db.collection.name", "items")
                .failed(read.is_err())
        });
        let read = match read {
            Ok(read) => read,
            Err(StoreError::Unavailable(cause)) => {
                if let Some(stale) = stale {
                    tracing::warn!("PostgreSQL unavailable: serving a stale cache entry.");
                    return Ok(stale);
                }
                return Err(StoreError::Unavailable(cause).into());
            }
            Err(e) => return Err(e.into()),
        };
        self.hooks.at(Point::AfterDbRead, key).await;

        // An answer not known to be current may be older than PostgreSQL: it lives
        // briefly in L1 and never reaches Redis.
        let stamp = |kind| {
            if read.current {
                self.l1.stamp(Tier::Database, started, kind)
            } else {
                self.l1.unverified_stamp(Tier::Database, started, kind)
            }
        };
        let (entry, stored, ttl) = match read.item {
            Some(item) => {
                let json = Bytes::from(serde_json::to_vec(&item)?);
                let entry = Entry::value(item.version, &json, stamp(Kind::Value));
                (entry, Stored::Value(json), None)
            }
            None => {
                // Ids are never reused, so a current "absent" is final: it is at least as
                // new as any version of this id known here.
                let known = deleted_at
                    .unwrap_or(0)
                    .max(self.l1.watermark(key).unwrap_or(0));
                (
                    Entry::absent(known, stamp(Kind::Absent)),
                    Stored::Absent,
                    Some(self.negative_ttl),
                )
            }
        };
        self.hooks.at(Point::BeforeL2Fill, key).await;
        if read.current {
            self.fill_l2(key, entry.version, &stored, ttl, Filler::Reader(lease))
                .await;
        }
        self.hooks.at(Point::BeforeL1Insert, key).await;
        Ok(Arc::new(entry))
    }

    /// PostgreSQL's answer for a miss of `id`, as of no earlier than now (see
    /// [`Database::get`]). Keys written recently go to the writer at once, which saves
    /// waiting for a replica that has likely not replayed the write yet (R8); an
    /// unverified reader answer older than a version announced here is read again from
    /// the writer.
    async fn read_database(&self, id: ItemId) -> Result<ItemRead, StoreError> {
        let key = id.get();
        let from_writer = || async {
            Ok(ItemRead {
                item: self.db.get_latest(id).await?,
                current: true,
            })
        };
        if self.l1.written_within(key, self.recent_write_window) {
            return from_writer().await;
        }
        let read = self.db.get(id).await?;
        match &read.item {
            Some(item) if item.version < self.l1.watermark(key).unwrap_or(0) => from_writer().await,
            _ => Ok(read),
        }
    }

    /// Reloads `id` in the background, once per key at a time, while the current entry is
    /// still served: hot keys never all expire at once and no reader waits for them.
    fn refresh(&self, id: ItemId) {
        let key = id.get();
        if self.refreshing.insert(key, ()).is_some() {
            return;
        }
        self.metrics.refreshes.increment(1);
        let items = self.clone();
        tokio::spawn(async move {
            if let Ok(entry) = items.load(id, None).await {
                items.l1.insert_refreshed(key, entry).await;
            }
            items.refreshing.remove(&key);
        });
    }

    /// A page of items, `limit` after the id `after`, as the JSON body to serve: from the
    /// page cache when nothing was written since it was loaded, else from PostgreSQL.
    ///
    /// # Errors
    /// When PostgreSQL fails or a page cannot be encoded.
    pub async fn list(&self, after: i64, limit: u16) -> Result<PageAnswer, ServiceError> {
        let generation = self.l1.generation();
        if let Some(page) = self
            .l1
            .pages()
            .get(after, limit, generation, self.l1.ttl_now())
            .await
        {
            self.metrics.page_hit.increment(1);
            return Ok(PageAnswer {
                body: page.cached_body(),
                tier: Tier::L1,
            });
        }
        self.metrics.page_miss.increment(1);
        let started = Instant::now();
        let latest = self.l1.changed_within(self.recent_write_window);
        // One extra row tells whether another page follows, without a COUNT.
        let mut items = self.db.list(after, i64::from(limit) + 1, latest).await?;
        let more = items.len() > usize::from(limit);
        items.truncate(usize::from(limit));
        let next_after = if more {
            items.last().map(|i| i.id)
        } else {
            None
        };
        let json = PageJson {
            source: Tier::Database.source(),
            count: items.len(),
            items: &items,
            next_after,
        };
        // Sized up front: grown by doubling, a page of 500 long names would leave as much
        // again in freed buffers on every load.
        let mut body = Vec::with_capacity(page_capacity(&items));
        serde_json::to_writer(&mut body, &json)?;
        // Loaded under the generation read *before* the query: a write during it has
        // moved the generation on, so this page is never served.
        let page = Arc::new(Page::new(generation, started, body));
        self.l1
            .pages()
            .insert(after, limit, Arc::clone(&page))
            .await;
        Ok(PageAnswer {
            body: page.database_body(),
            tier: Tier::Database,
        })
    }

    /// Creates an item; returns its new id and entry.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn create(&self, name: &str) -> Result<(ItemId, Arc<Entry>), ServiceError> {
        let written = self.db.create(name).await?;
        let item = written.value;
        let entry = Arc::new(self.entry_of(&item, Tier::Database, Instant::now())?);
        self.after_commit(item.id, &entry, written.outbox).await;
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
            UpdateOutcome::Updated(written) => {
                let item = written.value;
                let entry = Arc::new(self.entry_of(&item, Tier::Database, Instant::now())?);
                self.after_commit(item.id, &entry, written.outbox).await;
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
        let Some(written) = self.db.delete(id).await? else {
            return Ok(false);
        };
        let stamp = self.l1.stamp(Tier::Database, Instant::now(), Kind::Absent);
        let entry = Arc::new(Entry::absent(written.value, stamp));
        self.after_commit(id.get(), &entry, written.outbox).await;
        Ok(true)
    }

    /// Steps 2–5 of the write order (see the module docs).
    async fn after_commit(&self, key: i64, entry: &Arc<Entry>, outbox: OutboxId) {
        self.hooks.at(Point::AfterCommit, key).await;
        self.l1.insert_written(key, Arc::clone(entry)).await;
        let stored = match entry.kind {
            Kind::Value => Stored::Value(entry.item_json()),
            Kind::Absent => Stored::Tombstone,
        };
        let fenced = self
            .fill_l2(key, entry.version, &stored, None, Filler::Writer)
            .await;
        self.hooks.at(Point::BeforePublish, key).await;
        if fenced && self.publish(key, entry.version).await {
            // Not awaited: the client has its answer; a failure leaves the row to the relay.
            let db = self.db.clone();
            tokio::spawn(async move {
                if let Err(error) = db.outbox_done(&[outbox]).await {
                    tracing::debug!(error = %crate::ErrorChain(&error), "Outbox row left to the relay.");
                }
            });
        }
    }

    /// One pass of the outbox relay (see the `relay` module): repairs invalidations left
    /// `older_than` by their writer (crashed, or met a Redis outage) and, while L2 is
    /// untrusted, recovers it. Returns how many outbox rows it completed.
    ///
    /// # Errors
    /// When PostgreSQL fails.
    pub async fn relay_outbox(&self, older_than: Duration) -> Result<usize, ServiceError> {
        relay::pass(self, older_than).await
    }

    /// Fences `stored` into L2; `true` when L2 now holds this version or a newer one.
    async fn fill_l2(
        &self,
        key: i64,
        version: i64,
        stored: &Stored,
        ttl: Option<Duration>,
        by: Filler,
    ) -> bool {
        match self.l2.fill(key, version, stored, ttl, by).await {
            Ok(true) => {
                self.metrics.l2_written.increment(1);
                true
            }
            Ok(false) => {
                self.metrics.l2_fenced.increment(1);
                true
            }
            Err(error) => {
                self.metrics.l2_write_error.increment(1);
                tracing::debug!(%error, "L2 write failed.");
                false
            }
        }
    }

    async fn publish(&self, key: i64, version: i64) -> bool {
        let invalidation = Invalidation {
            id: key,
            version,
            origin: self.origin,
            sent_at_micros: unix_micros(),
        };
        match self.l2.publish(&invalidation).await {
            Ok(()) => {
                self.metrics.published.increment(1);
                true
            }
            Err(error) => {
                tracing::debug!(%error, "Publishing an invalidation failed.");
                false
            }
        }
    }

    /// The cache entry of an item read from PostgreSQL.
    fn entry_of(
        &self,
        item: &Item,
        origin: Tier,
        started: Instant,
    ) -> Result<Entry, serde_json::Error> {
        let json = Bytes::from(serde_json::to_vec(item)?);
        Ok(Entry::value(
            item.version,
            &json,
            self.l1.stamp(origin, started, Kind::Value),
        ))
    }
}

/// Counter handles, registered once: an increment on the hot path is one atomic add,
/// not a registry lookup.
#[derive(Clone)]
struct CacheMetrics {
    l1_hit: Counter,
    l1_miss: Counter,
    l1_superseded: Counter,
    stale_served: Counter,
    refreshes: Counter,
    l2_hit: Counter,
    l2_miss: Counter,
    l2_error: Counter,
    l2_skipped: Counter,
    l2_written: Counter,
    l2_fenced: Counter,
    l2_write_error: Counter,
    published: Counter,
    relayed: Counter,
    page_hit: Counter,
    page_miss: Counter,
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
        metrics::describe_counter!(
            "tiergate_cache_invalidations_sent_total",
            "Invalidations published."
        );
        metrics::describe_counter!(
            "tiergate_cache_outbox_relayed_total",
            "Invalidations completed by the outbox relay."
        );
        metrics::describe_gauge!(
            "tiergate_cache_l2_untrusted",
            "1 while Redis may have missed writes, so reads skip it until the outbox relay has repaired them; else 0."
        );
        metrics::describe_counter!(
            "tiergate_cache_refreshes_total",
            "Background refreshes of entries near their end."
        );
        let lookup = |tier: &'static str, result: &'static str| metrics::counter!(LOOKUPS, "tier" => tier, "result" => result);
        let write = |result: &'static str| metrics::counter!(WRITES, "result" => result);
        Self {
            l1_hit: lookup("l1", "hit"),
            l1_miss: lookup("l1", "miss"),
            l1_superseded: lookup("l1", "rejected"),
            stale_served: lookup("l1", "stale"),
            refreshes: metrics::counter!("tiergate_cache_refreshes_total"),
            l2_hit: lookup("l2", "hit"),
            l2_miss: lookup("l2", "miss"),
            l2_error: lookup("l2", "error"),
            l2_skipped: lookup("l2", "skipped"),
            l2_written: write("written"),
            l2_fenced: write("fenced"),
            l2_write_error: write("error"),
            published: metrics::counter!("tiergate_cache_invalidations_sent_total"),
            relayed: metrics::counter!("tiergate_cache_outbox_relayed_total"),
            page_hit: lookup("pages", "hit"),
            page_miss: lookup("pages", "miss"),
        }
    }
}
