//! A circuit breaker for Redis: after `failures` consecutive errors, skip Redis for
//! `open_for`, then let one call through as a probe; its success closes the breaker, its
//! failure opens it again.
//!
//! Without it, a Redis that hangs (rather than refuses) costs every request a command
//! timeout; with it, reads go straight to the next tier while Redis is sick.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The breaker's state, as the gauge reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

/// Lock-free: the hot path reads one atomic when the breaker is closed.
#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    open_for: Duration,
    epoch: Instant,
    consecutive: AtomicU32,
    /// Nanoseconds after `epoch` until which the breaker is open; 0 when closed.
    open_until: AtomicU64,
    /// Set while the one probe of a half-open breaker is in flight.
    probing: AtomicBool,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(failures: u32, open_for: Duration) -> Self {
        Self {
            failures: failures.max(1),
            open_for,
            epoch: Instant::now(),
            consecutive: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// Whether a call may go to Redis now. A `true` from a half-open breaker makes the
    /// caller the probe: it must report its outcome.
    pub fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        if self.now() < until {
            return false;
        }
        // Half-open: exactly one caller wins the probe.
        !self.probing.swap(true, Ordering::AcqRel)
    }

    /// Reports a successful call: closes the breaker.
    pub fn success(&self) {
        self.consecutive.store(0, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("Redis answers again: circuit breaker closed.");
        }
        self.probing.store(false, Ordering::Release);
    }

    /// Reports a failed call: opens the breaker at the threshold, or again after a
    /// failed probe. Returns whether this call opened it.
    pub fn failure(&self) -> bool {
        let n = self
            .consecutive
            .fetch_add(1, Ordering::AcqRel)
            .saturating_add(1);
        let was_probe = self.probing.swap(false, Ordering::AcqRel);
        if n >= self.failures || was_probe {
            let until = self
                .now()
                .saturating_add(u64::try_from(self.open_for.as_nanos()).unwrap_or(u64::MAX));
            let previous = self.open_until.swap(until.max(1), Ordering::AcqRel);
            if previous == 0 {
                tracing::warn!(
                    failures = n,
                    open_for_ms = self.open_for.as_millis(),
                    "Redis failing: circuit breaker open."
                );
                return true;
            }
        }
        false
    }

    /// The current state.
    pub fn state(&self) -> State {
        match self.open_until.load(Ordering::Acquire) {
            0 => State::Closed,
            until if self.now() < until => State::Open,
            _ => State::HalfOpen,
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_at_the_threshold_and_one_probe_closes_it() {
        let breaker = Breaker::new(3, Duration::ZERO);
        assert!(!breaker.failure() && !breaker.failure());
        assert_eq!(breaker.state(), State::Closed);
        assert!(breaker.failure(), "the third failure opens it");
        // open_for is zero: it is half-open at once; exactly one probe is let through.
        assert!(breaker.allow());
        assert!(!breaker.allow(), "only one probe at a time");
        breaker.success();
        assert_eq!(breaker.state(), State::Closed);
        assert!(breaker.allow() && breaker.allow());
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let breaker = Breaker::new(1, Duration::from_secs(60));
        breaker.failure();
        assert!(!breaker.allow(), "open: no calls");
        assert_eq!(breaker.state(), State::Open);
    }

    #[test]
    fn a_success_resets_the_count() {
        let breaker = Breaker::new(2, Duration::from_secs(60));
        breaker.failure();
        breaker.success();
        breaker.failure();
        assert_eq!(breaker.state(), State::Closed);
    }
}
