//! The cache tiers in front of PostgreSQL: [`l1`] in process (moka), [`l2`] shared (Redis).
//!
//! Both tiers hold *versioned* entries: an item's bytes at a version, or the knowledge
//! that an id holds nothing. Versions are what keep the chain correct when fills and
//! writes race (see `docs/cache-protocol.md`): a fill never replaces a newer version in Redis
//! (a Lua fence), and an L1 entry older than the newest version this process has seen
//! is not served (the watermark).

pub mod breaker;
pub mod bus;
pub mod l1;
pub mod l2;
pub mod pages;

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderValue;

/// Which tier answered a read: the `x-cache` header and the `source` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    L1,
    L2,
    Database,
}

impl Tier {
    /// The value of the `x-cache` response header.
    pub fn header(self) -> &'static str {
        match self {
            Self::L1 => "l1",
            Self::L2 => "l2",
            Self::Database => "miss",
        }
    }

    /// The `source` field of the JSON body, as the Express and Flask services name it.
    pub fn source(self) -> &'static str {
        match self {
            Self::L1 | Self::L2 => "cache",
            Self::Database => "database",
        }
    }
}

/// What a cache entry says about an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The item exists; the entry holds its JSON.
    Value,
    /// No item has this id (never created, or deleted).
    Absent,
}

/// Where an entry came from and how long it stays fresh.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// The tier this entry was loaded from, for the request that loaded it.
    pub origin: Tier,
    /// When the load *started*: a load that began before an L1 flush must not be
    /// served after it (race R7 in `docs/cache-protocol.md`), however late it finishes.
    pub loaded_at: Instant,
    /// Age up to which the entry is served as is (jittered per entry).
    pub fresh_for: Duration,
}

/// One cached item at one version, ready to serve.
///
/// The body is the whole `GET /items/{id}` response as served from cache
/// (`{"source":"cache","item":…}`), built once when the entry is made, so an L1 hit
/// clones two reference-counted buffers and allocates nothing else.
#[derive(Debug)]
pub struct Entry {
    pub version: i64,
    pub kind: Kind,
    pub stamp: Stamp,
    body: Bytes,
    etag: HeaderValue,
}

const CACHED_PREFIX: &[u8] = br#"{"source":"cache","item":"#;
const DATABASE_PREFIX: &[u8] = br#"{"source":"database","item":"#;

impl Entry {
    /// An existing item at `version`, from its JSON.
    pub fn value(version: i64, item_json: &[u8], stamp: Stamp) -> Self {
        let mut body = BytesMut::with_capacity(CACHED_PREFIX.len() + item_json.len() + 1);
        body.put_slice(CACHED_PREFIX);
        body.put_slice(item_json);
        body.put_u8(b'}');
        Self {
            version,
            kind: Kind::Value,
            stamp,
            body: body.freeze(),
            etag: etag(version),
        }
    }

    /// No item at this id, as known at `version` (0 when it never existed).
    pub fn absent(version: i64, stamp: Stamp) -> Self {
        Self {
            version,
            kind: Kind::Absent,
            stamp,
            body: Bytes::new(),
            etag: etag(version),
        }
    }

    /// How long ago the load that made this entry started.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stamp.loaded_at)
    }

    /// The item's JSON (empty for an absent entry): a view into the body, not a copy.
    pub fn item_json(&self) -> Bytes {
        match self.kind {
            Kind::Value => self.body.slice(CACHED_PREFIX.len()..self.body.len() - 1),
            Kind::Absent => Bytes::new(),
        }
    }

    /// The response body for a read answered by `tier`.
    pub fn body(&self, tier: Tier) -> Bytes {
        match tier {
            Tier::L1 | Tier::L2 => self.body.clone(),
            Tier::Database => {
                let item = self.item_json();
                let mut body = BytesMut::with_capacity(DATABASE_PREFIX.len() + item.len() + 1);
                body.put_slice(DATABASE_PREFIX);
                body.put_slice(&item);
                body.put_u8(b'}');
                body.freeze()
            }
        }
    }

    /// The strong ETag, `"<version>"`.
    pub fn etag(&self) -> &HeaderValue {
        &self.etag
    }

    /// Approximate memory held, for the L1 byte bound.
    pub(crate) fn weight(&self) -> u32 {
        const OVERHEAD: usize = 128; // entry, key, moka's node, the Arc
        u32::try_from(self.body.len() + OVERHEAD).unwrap_or(u32::MAX)
    }
}

/// The ETag of a version: a quoted decimal, always a valid header value.
pub fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(format!("\"{version}\"")))
        .unwrap_or(HeaderValue::from_static("\"0\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_body_wraps_the_item_json_for_each_source() {
        let stamp = Stamp {
            origin: Tier::Database,
            loaded_at: Instant::now(),
            fresh_for: Duration::from_secs(1),
        };
        let e = Entry::value(3, br#"{"id":1}"#, stamp);
        assert_eq!(
            &e.body(Tier::L1)[..],
            br#"{"source":"cache","item":{"id":1}}"#
        );
        assert_eq!(
            &e.body(Tier::Database)[..],
            br#"{"source":"database","item":{"id":1}}"#
        );
        assert_eq!(&e.item_json()[..], br#"{"id":1}"#);
        assert_eq!(e.etag(), "\"3\"");
    }
}
