//! Cached list pages (`GET /items?after=&limit=`), in process, as part of L1.
//!
//! A page depends on every item after its cursor, so no single key invalidates it.
//! Instead each page carries the L1 *generation* it was loaded in, and the generation
//! moves on every write this instance sees (its own, or a peer's invalidation) and on
//! every flush. A page is served only under its own generation, so no write leaves a
//! stale page behind; between writes, repeated page reads cost no query.
//!
//! Pages are bounded in bytes, within L1's budget (`cache.l1_max_bytes`; see
//! [`super::l1::L1::new`] for the share): a client can ask for a page at every cursor, and
//! at `limit=500` a page of long names is half a megabyte, so a bound in pages would be no
//! bound on memory.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

const CACHED_PREFIX: &[u8] = br#"{"source":"cache","#;
const DATABASE_PREFIX: &[u8] = br#"{"source":"database","#;

/// One page as served from cache.
#[derive(Debug)]
pub struct Page {
    generation: u64,
    loaded_at: Instant,
    /// The JSON body: `{"source":"database",…}` as loaded (the answer of the read that
    /// loaded it, sent without a copy), replaced by `{"source":"cache",…}` at the first
    /// hit and cloned on every hit after. A page never hit again — every page of a client
    /// paging from every cursor — never costs the second buffer.
    body: Mutex<Bytes>,
    /// What it holds, for the byte bound: the body's allocation (not only its length),
    /// and the page, its key, moka's node and the `Arc` around them.
    weight: u32,
}

impl Page {
    /// A page loaded in `generation`, from its JSON body written with
    /// `"source":"database"` as the first field.
    pub fn new(generation: u64, loaded_at: Instant, body: Vec<u8>) -> Self {
        const OVERHEAD: usize = 160;
        Self {
            generation,
            loaded_at,
            weight: u32::try_from(body.capacity() + OVERHEAD).unwrap_or(u32::MAX),
            body: Mutex::new(Bytes::from(body)),
        }
    }

    /// The body for a read answered from cache.
    pub fn cached_body(&self) -> Bytes {
        let mut body = self.body.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rest) = body.strip_prefix(DATABASE_PREFIX) {
            let mut cached = BytesMut::with_capacity(CACHED_PREFIX.len() + rest.len());
            cached.put_slice(CACHED_PREFIX);
            cached.put_slice(rest);
            *body = cached.freeze();
        }
        body.clone()
    }

    /// The body for the read that loaded it from PostgreSQL: call before any hit.
    pub fn database_body(&self) -> Bytes {
        self.body
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The page cache: bounded in bytes, each page valid for its generation and `ttl`.
#[derive(Debug, Clone)]
pub struct Pages {
    pages: moka::future::Cache<(i64, u16), Arc<Page>>,
    ttl: Duration,
}

impl Pages {
    /// Pages holding at most `max_bytes` (approximately; a page larger than that is not
    /// kept), each served for at most `ttl`.
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        Self {
            pages: moka::future::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_cursor: &(i64, u16), page: &Arc<Page>| page.weight)
                .time_to_live(ttl)
                .build(),
            ttl,
        }
    }

    /// The page at this cursor, if it was loaded in `generation` and is young enough.
    pub async fn get(
        &self,
        after: i64,
        limit: u16,
        generation: u64,
        max_age: Duration,
    ) -> Option<Arc<Page>> {
        let page = self.pages.get(&(after, limit)).await?;
        (page.generation == generation && page.loaded_at.elapsed() < max_age.min(self.ttl))
            .then_some(page)
    }

    /// Keeps a page, and evicts at once what the bound no longer admits: moka applies
    /// inserts and evictions in batches (every 64 writes or 300 ms), which for pages of
    /// half a megabyte would let the cache pass its bound by as much again. A page load
    /// costs a query; this costs little next to it.
    pub async fn insert(&self, after: i64, limit: u16, page: Arc<Page>) {
        self.pages.insert((after, limit), page).await;
        self.pages.run_pending_tasks().await;
    }

    /// Pages and weighted bytes held. Approximate until moka has run its maintenance.
    pub fn usage(&self) -> (u64, u64) {
        (self.pages.entry_count(), self.pages.weighted_size())
    }

    /// Runs moka's pending housekeeping (evictions, expirations) now.
    pub async fn run_pending_tasks(&self) {
        self.pages.run_pending_tasks().await;
    }

    /// Drops every page (with the generation moved on, none could be served anyway).
    pub fn clear(&self) {
        self.pages.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_page_is_served_only_under_its_generation() {
        let pages = Pages::new(1 << 20, Duration::from_secs(60));
        let body = br#"{"source":"database","count":0,"items":[],"next_after":null}"#.to_vec();
        pages
            .insert(0, 50, Arc::new(Page::new(7, Instant::now(), body)))
            .await;
        assert!(pages.get(0, 50, 7, Duration::from_secs(60)).await.is_some());
        assert!(
            pages.get(0, 50, 8, Duration::from_secs(60)).await.is_none(),
            "a write moved the generation"
        );
        assert!(
            pages.get(0, 10, 7, Duration::from_secs(60)).await.is_none(),
            "another cursor"
        );
    }

    /// The bound holds after every insert, not only after moka's periodic maintenance.
    /// Checked: without the weigher (a bound in pages, as before) all 64 pages of 16 KiB
    /// were kept, 1 MiB in a budget of 256 KiB; without the maintenance in `insert`, the
    /// map still held more than the budget when the last insert returned.
    #[tokio::test]
    async fn pages_are_held_within_their_byte_budget() {
        const BUDGET: u64 = 256 << 10;
        let pages = Pages::new(BUDGET, Duration::from_secs(60));
        let mut body = br#"{"source":"database","items":""#.to_vec();
        body.resize(16 << 10, b'x');
        for after in 0..64 {
            let page = Arc::new(Page::new(1, Instant::now(), body.clone()));
            pages.insert(after, 500, page).await;
        }
        // What the map holds now, whether or not moka has counted it yet.
        let count = pages.pages.iter().count() as u64;
        let held = count * (16 << 10);
        assert!(held <= BUDGET, "{count} pages of 16 KiB held");
        assert!(count >= 8, "the budget holds pages: {count}");
        let (_, weighed) = pages.usage();
        assert!(weighed >= held, "the weight counts at least the bodies");
    }

    #[test]
    fn each_body_names_its_source() {
        let body = br#"{"source":"database","count":0}"#.to_vec();
        let page = Page::new(1, Instant::now(), body);
        assert_eq!(
            &page.database_body()[..],
            br#"{"source":"database","count":0}"#
        );
        for _ in 0..2 {
            assert_eq!(&page.cached_body()[..], br#"{"source":"cache","count":0}"#);
        }
    }
}
