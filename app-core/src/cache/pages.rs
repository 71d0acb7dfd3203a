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

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

const CACHED_PREFIX: &[u8] = br#"{"source":"cache","#;
const DATABASE_PREFIX: &[u8] = br#"{"source":"database","#;

/// One page as served from cache.
#[derive(Debug)]
pub struct Page {
    generation: u64,
    loaded_at: Instant,
    /// `{"source":"cache",…}`: built once, cloned on every hit.
    body: Bytes,
    /// What it holds, for the byte bound: the body's allocation (not only its length),
    /// and the page, its key, moka's node and the `Arc` around them.
    weight: u32,
}

impl Page {
    /// A page loaded in `generation`, from its JSON body written with `"source":"cache"`
    /// as the first field.
    pub fn new(generation: u64, loaded_at: Instant, body: Vec<u8>) -> Self {
        const OVERHEAD: usize = 160;
        Self {
            generation,
            loaded_at,
            weight: u32::try_from(body.capacity() + OVERHEAD).unwrap_or(u32::MAX),
            body: Bytes::from(body),
        }
    }

    /// The body for a read answered from cache.
    pub fn cached_body(&self) -> Bytes {
        self.body.clone()
    }

    /// The body for the read that loaded it from PostgreSQL.
    pub fn database_body(&self) -> Bytes {
        let rest = self.body.get(CACHED_PREFIX.len()..).unwrap_or_default();
        let mut body = BytesMut::with_capacity(DATABASE_PREFIX.len() + rest.len());
        body.put_slice(DATABASE_PREFIX);
        body.put_slice(rest);
        body.freeze()
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

    /// Keeps a page.
    pub async fn insert(&self, after: i64, limit: u16, page: Arc<Page>) {
        self.pages.insert((after, limit), page).await;
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
        let body = br#"{"source":"cache","count":0,"items":[],"next_after":null}"#.to_vec();
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

    /// Checked: without the weigher (a bound in pages, as before) all 64 pages of 16 KiB
    /// were kept, 1 MiB in a budget of 256 KiB.
    #[tokio::test]
    async fn pages_are_held_within_their_byte_budget() {
        const BUDGET: u64 = 256 << 10;
        let pages = Pages::new(BUDGET, Duration::from_secs(60));
        let mut body = br#"{"source":"cache","items":""#.to_vec();
        body.resize(16 << 10, b'x');
        for after in 0..64 {
            let page = Arc::new(Page::new(1, Instant::now(), body.clone()));
            pages.insert(after, 500, page).await;
        }
        pages.run_pending_tasks().await;
        let (count, weighed) = pages.usage();
        let held = count * (16 << 10);
        assert!(held <= BUDGET, "{count} pages of 16 KiB held");
        assert!(count >= 8, "the budget holds pages: {count}");
        assert!(weighed >= held, "the weight counts at least the bodies");
    }

    #[test]
    fn the_database_body_names_its_source() {
        let body = br#"{"source":"cache","count":0}"#.to_vec();
        let page = Page::new(1, Instant::now(), body);
        assert_eq!(
            &page.database_body()[..],
            br#"{"source":"database","count":0}"#
        );
    }
}
