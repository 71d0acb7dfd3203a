//! Scenarios: what the next request is. Each worker draws with its own random state
//! ([`Scenario::next`]); only the cold storm shares a counter, so no id is read twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::bail;
use bytes::Bytes;
use http::{Method, Uri};

/// The largest Zipf population: its table is 8 bytes per item.
pub const MAX_ZIPF_ITEMS: u64 = 10_000_000;

/// What to request.
#[derive(Debug, Clone)]
pub enum Scenario {
    /// The URL's own path and query, every time (proxy pass-through, static pages).
    Url(Uri),
    /// `GET /items/{id}` for one id: the L1-hit path (the URI parsed once).
    Hot(Uri),
    /// `GET /items/{id}`, ids Zipf-distributed over `first..first + table.len()`.
    Zipf { first: u64, table: Arc<ZipfTable> },
    /// Zipf reads, and `PUT /items/{id}` for a `write_ratio` share of the requests.
    Mix {
        first: u64,
        table: Arc<ZipfTable>,
        write_ratio: f64,
    },
    /// `GET /items/{id}` for `first, first + 1, …`: ids read once, each a cache miss.
    Cold { next: Arc<AtomicU64> },
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Call {
    /// The method.
    pub method: Method,
    /// Path and query (origin form).
    pub path: Uri,
    /// A JSON body for writes.
    pub body: Option<Bytes>,
}

impl Scenario {
    /// A short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Url(_) => "url",
            Self::Hot(_) => "hot",
            Self::Zipf { .. } => "zipf",
            Self::Mix { .. } => "mix",
            Self::Cold { .. } => "cold",
        }
    }

    /// The next request, drawn with `rng`.
    pub fn next(&self, rng: &mut fastrand::Rng) -> Call {
        let get = |path: Uri| Call {
            method: Method::GET,
            path,
            body: None,
        };
        match self {
            Self::Url(path) | Self::Hot(path) => get(path.clone()),
            Self::Zipf { first, table } => get(item(first + table.sample(rng))),
            Self::Mix {
                first,
                table,
                write_ratio,
            } => {
                let id = first + table.sample(rng);
                if rng.f64() < *write_ratio {
                    Call {
                        method: Method::PUT,
                        path: item(id),
                        body: Some(Bytes::from(format!(
                            r#"{{"name":"loadgen {:08x}"}}"#,
                            rng.u32(..)
                        ))),
                    }
                } else {
                    get(item(id))
                }
            }
            Self::Cold { next } => get(item(next.fetch_add(1, Ordering::Relaxed))),
        }
    }
}

/// `/items/{id}`: digits and a fixed prefix always make a valid URI path.
fn item(id: u64) -> Uri {
    Uri::try_from(format!("/items/{id}")).unwrap_or_else(|_| Uri::from_static("/items/0"))
}

/// `GET /items/{id}`.
pub fn hot(id: u64) -> Scenario {
    Scenario::Hot(item(id))
}

/// The cumulative distribution of Zipf(s) over ranks `0..n`; a draw is one binary search.
#[derive(Debug)]
pub struct ZipfTable {
    cdf: Vec<f64>,
}

impl ZipfTable {
    /// The table for `n` items with exponent `s` (1.0 is the classic Zipf; 0 is uniform).
    ///
    /// # Errors
    /// `n` is 0 or above [`MAX_ZIPF_ITEMS`], or `s` is negative or not finite.
    pub fn new(n: u64, s: f64) -> anyhow::Result<Self> {
        if n == 0 || n > MAX_ZIPF_ITEMS {
            bail!("--items must be between 1 and {MAX_ZIPF_ITEMS}, got {n}");
        }
        if !s.is_finite() || s < 0.0 {
            bail!("--zipf-s must be a finite number >= 0, got {s}");
        }
        let mut cdf = Vec::with_capacity(n as usize);
        let mut total = 0.0;
        for rank in 1..=n {
            total += (rank as f64).powf(-s);
            cdf.push(total);
        }
        for p in &mut cdf {
            *p /= total;
        }
        Ok(Self { cdf })
    }

    /// A rank in `0..n`; rank 0 is the most popular.
    pub fn sample(&self, rng: &mut fastrand::Rng) -> u64 {
        let u = rng.f64();
        let rank = self.cdf.partition_point(|&p| p < u);
        rank.min(self.cdf.len() - 1) as u64
    }

    /// The number of items.
    pub fn len(&self) -> u64 {
        self.cdf.len() as u64
    }

    /// Never true: a table has at least one item.
    pub fn is_empty(&self) -> bool {
        self.cdf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_low_ranks_and_stays_in_range() {
        let table = ZipfTable::new(1000, 1.0).unwrap();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[table.sample(&mut rng) as usize] += 1;
        }
        // Rank 1 has P = 1/H(1000) ≈ 13 %; rank 2 half of it.
        assert!((12_000..15_000).contains(&counts[0]), "{}", counts[0]);
        assert!(counts[0] > counts[1] && counts[1] > counts[9]);
    }

    #[test]
    fn zipf_rejects_bad_parameters() {
        assert!(ZipfTable::new(0, 1.0).is_err());
        assert!(ZipfTable::new(10, -1.0).is_err());
        assert!(ZipfTable::new(10, f64::NAN).is_err());
    }

    #[test]
    fn cold_ids_are_never_repeated() {
        let s = Scenario::Cold {
            next: Arc::new(AtomicU64::new(5)),
        };
        let mut rng = fastrand::Rng::new();
        assert_eq!(s.next(&mut rng).path, "/items/5");
        assert_eq!(s.next(&mut rng).path, "/items/6");
        assert_eq!(hot(42).next(&mut rng).path, "/items/42");
    }
}
