//! Cached list pages (`GET /items?after=&limit=`), in process.
//!
//! A page depends on every item after its cursor, so no single key invalidates it.
//! Instead each page carries the L1 *generation* it was loaded in, and the generation
//! moves on every write this instance sees (its own, or a peer's invalidation) and on
//! every flush. A page is served only under its own generation, so no write leaves a
//! stale page behind; between writes, repeated page reads cost no query.

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
}

impl Page {
    /// A page loaded in `generation`, from its JSON body written with `"source":"cache"`
    /// as the first field.
    pub fn new(generation: u64, loaded_at: Instant, body: Bytes) -> Self {
        Self {
            generation,
            loaded_at,
            body,
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

/// The page cache: bounded in count, each page valid for its generation and `ttl`.
#[derive(Debug, Clone)]
pub struct Pages {
    pages: moka::future::Cache<(i64, u16), Arc<Page>>,
    ttl: Duration,
}

impl Pages {
    /// At most `capacity` pages, each served for at most `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Self {
            pages: moka::future::Cache::builder()
                .max_capacity(capacity)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_page_is_served_only_under_its_generation() {
        let pages = Pages::new(10, Duration::from_secs(60));
        let body =
            Bytes::from_static(br#"{"source":"cache","count":0,"items":[],"next_after":null}"#);
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

    #[test]
    fn the_database_body_names_its_source() {
        let body = Bytes::from_static(br#"{"source":"cache","count":0}"#);
        let page = Page::new(1, Instant::now(), body);
        assert_eq!(
            &page.database_body()[..],
            br#"{"source":"database","count":0}"#
        );
    }
}
