//! The retry budget: retries may add at most a set share of the traffic (plus a small
//! floor per second), so that when a whole group fails, retries do not multiply the load
//! on it — the failure mode that turns a blip into an outage.
//!
//! A token bucket in thousandths of a retry, lock-free: every request deposits the
//! share, every second deposits the floor, a retry withdraws one whole token. The bucket
//! is capped, so a long quiet spell does not bank a retry storm.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use tiergate_config::ProxySettings;

/// One token: a retry.
const TOKEN: i64 = 1000;

/// Seconds of deposits the bucket can hold.
const WINDOW_SECS: i64 = 10;

/// A group's retry budget.
#[derive(Debug)]
pub(crate) struct RetryBudget {
    /// Thousandths of a token deposited per request.
    per_request: i64,
    /// Thousandths of a token deposited per second.
    per_second: i64,
    tokens: AtomicI64,
    /// Whole seconds since `start` up to which the floor has been deposited.
    credited_secs: AtomicU64,
    start: Instant,
}

impl RetryBudget {
    pub(crate) fn new(settings: &ProxySettings) -> Self {
        let per_second = i64::from(settings.retry_budget_min_per_second) * TOKEN;
        Self {
            per_request: i64::from(settings.retry_budget_percent) * TOKEN / 100,
            per_second,
            // Start with one second's floor, so the first failures can be retried.
            tokens: AtomicI64::new(per_second),
            credited_secs: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Ten seconds of the floor, and at least 100 retries, which busy groups refill in a
    /// fraction of a second.
    fn cap(&self) -> i64 {
        (self.per_second * WINDOW_SECS).max(100 * TOKEN)
    }

    /// A request was sent: deposit its share.
    pub(crate) fn deposit(&self) {
        if self.per_request > 0 {
            let cap = self.cap();
            let before = self.tokens.fetch_add(self.per_request, Ordering::Relaxed);
            if before + self.per_request > cap {
                self.tokens.fetch_min(cap, Ordering::Relaxed);
            }
        }
    }

    /// Takes one retry from the budget, if there is one.
    pub(crate) fn withdraw(&self) -> bool {
        self.credit_floor();
        let before = self.tokens.fetch_sub(TOKEN, Ordering::Relaxed);
        if before >= TOKEN {
            true
        } else {
            self.tokens.fetch_add(TOKEN, Ordering::Relaxed);
            false
        }
    }

    /// Deposits the per-second floor for the whole seconds passed since last time.
    fn credit_floor(&self) {
        let now = self.start.elapsed().as_secs();
        let credited = self.credited_secs.load(Ordering::Relaxed);
        if now > credited
            && self
                .credited_secs
                .compare_exchange(credited, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let secs = i64::try_from(now - credited).unwrap_or(WINDOW_SECS);
            let add = self.per_second * secs.min(WINDOW_SECS);
            let before = self.tokens.fetch_add(add, Ordering::Relaxed);
            if before + add > self.cap() {
                self.tokens
                    .fetch_min(self.cap().max(before), Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(percent: u32, floor: u32) -> RetryBudget {
        RetryBudget::new(&ProxySettings {
            retry_budget_percent: percent,
            retry_budget_min_per_second: floor,
            ..ProxySettings::default()
        })
    }

    #[test]
    fn retries_are_a_share_of_requests() {
        let b = budget(20, 0);
        assert!(!b.withdraw(), "nothing deposited yet");
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20);
    }

    #[test]
    fn the_floor_allows_retries_without_traffic() {
        let b = budget(0, 3);
        let granted = (0..10).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 3);
    }
}
