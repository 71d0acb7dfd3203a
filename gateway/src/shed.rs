//! Load shedding: bounds on the requests worked on at once, one for the app
//! (`http.max_in_flight`) and one per upstream group (`upstreams.max_in_flight`), so a
//! slow upstream cannot take the app's places, nor the app a group's.

use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::Counter;

/// One load-shedding bound: a counter, not a semaphore. Nothing ever waits for a place,
/// and giving a tokio semaphore's permit back takes its waiter lock, on every request.
#[derive(Debug)]
pub(crate) struct InFlight {
    taken: AtomicUsize,
    max: usize,
    /// Requests refused for want of a place.
    shed: Counter,
}

impl InFlight {
    /// A bound of `max` places; each refusal is counted in `shed`.
    pub(crate) fn new(max: u32, shed: Counter) -> Self {
        Self {
            taken: AtomicUsize::new(0),
            max: usize::try_from(max).unwrap_or(usize::MAX),
            shed,
        }
    }

    /// A place, given back when the permit drops; `None` (and counted) when every place
    /// is taken.
    pub(crate) fn try_acquire(&self) -> Option<Permit<'_>> {
        let taken = self
            .taken
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            });
        match taken {
            Ok(_) => Some(Permit(&self.taken)),
            Err(_) => {
                self.shed.increment(1);
                None
            }
        }
    }
}

/// One request's place under a bound, given back on drop.
#[derive(Debug)]
pub(crate) struct Permit<'a>(&'a AtomicUsize);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_bound_the_requests_in_flight_and_come_back_on_drop() {
        let bound = InFlight::new(2, Counter::noop());
        let first = bound.try_acquire();
        let second = bound.try_acquire();
        assert!(first.is_some() && second.is_some());
        assert!(bound.try_acquire().is_none());
        drop(first);
        assert!(bound.try_acquire().is_some());
        drop(second);
        assert_eq!(bound.taken.load(Ordering::Relaxed), 0);
    }
}
