//! Progressive rollouts with automatic rollback (docs/fleet.md#rollouts): a route's
//! traffic moved to a target group step by step (5 %, 25 %, …), each step judged on
//! what every task saw of the target group during it, and the route returned to 100 %
//! of the previous group on a breach.
//!
//! The state machine lives in PostgreSQL (`fleet_rollouts`) and is driven by whoever
//! holds its lease: the CLI or task that started it, or, when that driver dies, any
//! task, which resumes from the stored step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::fleet::Control;
use crate::store::StoreError;
use crate::store::fleet::{Changer, Weights};
use crate::store::rollout::{NewRollout, RolloutRow, Window};

/// Upper bounds of the latency buckets, in milliseconds; one more bucket counts the rest.
pub const BUCKET_BOUNDS_MS: [f64; 11] = [
    5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// One group's responses, counted since the process started (a step's share is the
/// difference between two reads).
#[derive(Debug, Default)]
pub struct Tally {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKET_BOUNDS_MS.len() + 1],
}

impl Tally {
    /// Counts one response: `error` for a 5xx (the group's or the gateway's for it).
    pub fn observe(&self, error: bool, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ms = elapsed.as_secs_f64() * 1000.0;
        let bucket = BUCKET_BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(BUCKET_BOUNDS_MS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub fn read(&self) -> Window {
        let count = |a: &AtomicU64| i64::try_from(a.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
        Window {
            requests: count(&self.requests),
            errors: count(&self.errors),
            buckets: self.buckets.iter().map(count).collect(),
            tasks: 1,
        }
    }
}

/// `later - earlier`, per count (0 where a group was rebuilt and counts restarted).
pub fn since(later: &Window, earlier: &Window) -> Window {
    Window {
        requests: (later.requests - earlier.requests).max(0),
        errors: (later.errors - earlier.errors).max(0),
        buckets: later
            .buckets
            .iter()
            .zip(earlier.buckets.iter().chain(std::iter::repeat(&0)))
            .map(|(l, e)| (l - e).max(0))
            .collect(),
        tasks: 1,
    }
}

/// The 99th percentile's bucket bound in milliseconds (infinite past the last bound), or
/// `None` for an empty window.
pub fn p99_bound_ms(window: &Window) -> Option<f64> {
    let total: i64 = window.buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bound under which at least 99 % of the responses fell.
    let needed = total - total / 100;
    let mut seen = 0;
    for (i, n) in window.buckets.iter().enumerate() {
        seen += n;
        if seen >= needed {
            return Some(BUCKET_BOUNDS_MS.get(i).copied().unwrap_or(f64::INFINITY));
        }
    }
    Some(f64::INFINITY)
}

/// Why a step's window breaches the rollout's limits, if it does.
pub fn breach(rollout: &RolloutRow, window: &Window) -> Option<String> {
    if window.requests == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)]
    // request counts far below 2^53
    let rate = window.errors as f64 / window.requests as f64;
    let step = rollout
        .steps
        .get(usize::try_from(rollout.step_index).unwrap_or(0));
    if rate > rollout.max_error_rate {
        return Some(format!(
            "step {} ({}% to {}): {} of {} requests answered 5xx ({:.2}%, limit {:.2}%)",
            rollout.step_index + 1,
            step.copied().unwrap_or(0),
            rollout.to_group,
            window.errors,
            window.requests,
            rate * 100.0,
            rollout.max_error_rate * 100.0
        ));
    }
    match p99_bound_ms(window) {
        Some(p99) if p99 > rollout.max_p99_ms => Some(format!(
            "step {} ({}% to {}): p99 latency above {} ms over {} requests (limit {} ms)",
            rollout.step_index + 1,
            step.copied().unwrap_or(0),
            rollout.to_group,
            BUCKET_BOUNDS_MS
                .iter()
                .rev()
                .find(|b| **b < p99)
                .copied()
                .unwrap_or(0.0),
            window.requests,
            rollout.max_p99_ms
        )),
        _ => None,
    }
}

/// A rollout as asked for, checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub route: String,
    pub from: String,
    pub to: String,
    pub steps: Vec<i32>,
    pub interval: Duration,
    pub max_error_rate: f64,
    pub max_p99: Duration,
}

/// A percentage such as `1%` or `0.5%`, as a fraction: a number from 0 to 100 with at
/// most two decimals, then `%`. Exactly the API contract's pattern
/// `^(100(\.00?)?|[1-9]?[0-9](\.[0-9]{1,2})?)%$`, so what the contract allows is accepted
/// and nothing else.
///
/// # Errors
/// Anything else, for the operator.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    let refuse = || format!("{text:?} is not a percentage from 0% to 100% (1%, 0.5%)");
    let number = text.strip_suffix('%').ok_or_else(refuse)?;
    let (whole, decimals) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let well_formed = digits(whole)
        && digits(decimals)
        && (1..=3).contains(&whole.len())
        && (whole.len() == 1 || !whole.starts_with('0'))
        && decimals.len() <= 2
        && (number.len() == whole.len() || !decimals.is_empty());
    let value = number.parse::<f64>().ok().filter(|_| well_formed);
    value
        .filter(|n| (0.0..=100.0).contains(n))
        .map(|n| n / 100.0)
        .ok_or_else(refuse)
}

/// A step's interval or a latency limit such as `30s` or `500ms`: a whole number above 0
/// of at most six digits, then `ms`, `s`, `m` or `h`. Exactly the API contract's pattern
/// `^[1-9][0-9]{0,5}(ms|s|m|h)$`.
///
/// # Errors
/// Anything else, naming `what`.
pub fn parse_duration(what: &str, text: &str) -> Result<Duration, String> {
    let digits_end = text
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let count = Some(number)
        .filter(|n| (1..=6).contains(&n.len()) && !n.starts_with('0'))
        .and_then(|n| n.parse::<u64>().ok());
    let duration = match (count, unit) {
        (Some(n), "ms") => Some(Duration::from_millis(n)),
        (Some(n), "s") => Some(Duration::from_secs(n)),
        (Some(n), "m") => Some(Duration::from_secs(n * 60)),
        (Some(n), "h") => Some(Duration::from_secs(n * 3600)),
        _ => None,
    };
    duration.ok_or_else(|| {
        format!(
            "{what} must be a whole number above 0 then ms, s, m or h (30s, 500ms), got {text:?}"
        )
    })
}

/// The steps in the order they run: percentages from 1 to 100, each once, 100 among
/// them; given in any order, run rising.
///
/// # Errors
/// A step outside 1..=100, a step twice, or no step of 100.
pub fn rising_steps(steps: &[i32]) -> Result<Vec<i32>, String> {
    let mut rising = steps.to_vec();
    rising.sort_unstable();
    let unique = rising.windows(2).all(|w| w[0] < w[1]);
    if !unique || rising.iter().any(|s| !(1..=100).contains(s)) || rising.last() != Some(&100) {
        return Err(format!(
            "steps must be percentages from 1 to 100, each once, 100 among them (5,25,50,100), got {steps:?}"
        ));
    }
    Ok(rising)
}

/// The weights of a step: `percent` to the target, the rest to the previous group.
pub fn step_weights(rollout: &RolloutRow, percent: i32) -> Weights {
    let to = u32::try_from(percent.clamp(0, 100)).unwrap_or(0);
    Weights::from([
        (rollout.from_group.clone(), 100 - to),
        (rollout.to_group.clone(), to),
    ])
}

/// How often a driver looks at its rollout: often enough to roll back within a small
/// part of a step.
fn tick(interval: Duration) -> Duration {
    (interval / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// How long a driver's lease lasts without renewal: a few missed renewals, not a dead
/// driver for long.
pub const LEASE: Duration = Duration::from_secs(5);

impl Control {
    /// Starts `plan`, driven by `holder`; `None` when a rollout already runs on the
    /// route.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn start_rollout(
        &self,
        plan: &Plan,
        holder: &str,
    ) -> Result<Option<RolloutRow>, StoreError> {
        self.db()
            .rollout_create(&NewRollout {
                route: &plan.route,
                from_group: &plan.from,
                to_group: &plan.to,
                steps: &plan.steps,
                interval: plan.interval,
                max_error_rate: plan.max_error_rate,
                max_p99: plan.max_p99,
                holder,
                lease: LEASE,
            })
            .await
    }

    /// Drives rollout `id` as `holder` until it ends or another holder has it; returns
    /// its row as last seen.
    ///
    /// # Errors
    /// The database is unreachable (the lease then lapses and another driver resumes).
    pub async fn drive_rollout(
        &self,
        id: i64,
        holder: &str,
    ) -> Result<Option<RolloutRow>, StoreError> {
        loop {
            let Some(rollout) = self.db().rollout_claim(id, holder, LEASE).await? else {
                return Ok(self
                    .db()
                    .rollouts(None)
                    .await?
                    .into_iter()
                    .find(|r| r.id == id));
            };
            let interval = Duration::from_millis(u64::try_from(rollout.interval_ms).unwrap_or(0));
            if let Some(ended) = self.drive_once(&rollout, holder, interval).await? {
                return Ok(Some(ended));
            }
            tokio::time::sleep(tick(interval)).await;
        }
    }

    /// One look at a running rollout: put the step in force, roll back on a breach, or
    /// move on when the step has run its interval. `Some` once it has ended.
    async fn drive_once(
        &self,
        rollout: &RolloutRow,
        holder: &str,
        interval: Duration,
    ) -> Result<Option<RolloutRow>, StoreError> {
        let index = usize::try_from(rollout.step_index).unwrap_or(0);
        let percent = rollout.steps.get(index).copied().unwrap_or(100);
        let by = Changer::Rollout {
            id: rollout.id,
            holder,
        };
        if rollout.step_started_at.is_none() {
            let weights = step_weights(rollout, percent);
            if self
                .set_split(&rollout.route, Some(&weights), by)
                .await?
                .is_none()
            {
                // Aborted, or another driver has it: the next claim tells.
                return Ok(None);
            }
            self.db().rollout_step(rollout.id, holder, None).await?;
            record_step();
            tracing::info!(
                rollout = rollout.id,
                route = rollout.route,
                step = index + 1,
                percent,
                to = rollout.to_group,
                "Rollout step in force."
            );
            return Ok(None);
        }
        let window = self
            .db()
            .rollout_window(rollout.id, rollout.step_index)
            .await?;
        if let Some(reason) = breach(rollout, &window) {
            let back = step_weights(rollout, 0);
            if self
                .set_split(&rollout.route, Some(&back), by)
                .await?
                .is_none()
            {
                return Ok(None);
            }
            tracing::warn!(
                rollout = rollout.id,
                route = rollout.route,
                reason,
                "Rollout rolled back."
            );
            record_step();
            return self.finish(rollout, holder, "rolled_back", &reason).await;
        }
        let elapsed =
            Duration::from_secs_f64(rollout.step_elapsed_ms.unwrap_or(0.0).max(0.0) / 1000.0);
        if elapsed < interval {
            return Ok(None);
        }
        if index + 1 >= rollout.steps.len() {
            let reason = format!(
                "every step healthy; the last over {} requests to {}",
                window.requests, rollout.to_group
            );
            tracing::info!(
                rollout = rollout.id,
                route = rollout.route,
                "Rollout succeeded."
            );
            return self.finish(rollout, holder, "succeeded", &reason).await;
        }
        let next = i32::try_from(index + 1).unwrap_or(i32::MAX);
        self.db()
            .rollout_step(rollout.id, holder, Some(next))
            .await?;
        Ok(None)
    }

    async fn finish(
        &self,
        rollout: &RolloutRow,
        holder: &str,
        state: &'static str,
        reason: &str,
    ) -> Result<Option<RolloutRow>, StoreError> {
        metrics::counter!("tiergate_fleet_rollouts_total", "outcome" => state).increment(1);
        let ended = self
            .db()
            .rollout_finish(rollout.id, holder, state, reason)
            .await?;
        Ok(ended)
    }
}

fn record_step() {
    metrics::counter!("tiergate_fleet_rollout_steps_total").increment(1);
}

/// Describes the rollout metrics and serves them from the start, at 0.
pub(crate) fn describe_metrics() {
    metrics::describe_counter!(
        "tiergate_fleet_rollout_steps_total",
        "Rollout steps (and rollbacks) a driver here put in force."
    );
    metrics::describe_counter!(
        "tiergate_fleet_rollouts_total",
        "Rollouts that ended here, by outcome (succeeded, rolled_back by its driver; aborted by the task or CLI that aborted it)."
    );
    metrics::counter!("tiergate_fleet_rollout_steps_total").increment(0);
    for outcome in ["succeeded", "rolled_back", "aborted"] {
        metrics::counter!("tiergate_fleet_rollouts_total", "outcome" => outcome).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_p99_bound_and_the_breach_follow_the_window() {
        let tally = Tally::default();
        for _ in 0..99 {
            tally.observe(false, Duration::from_millis(3));
        }
        tally.observe(true, Duration::from_millis(700));
        let window = tally.read();
        assert_eq!(p99_bound_ms(&window), Some(5.0));
        tally.observe(false, Duration::from_millis(700));
        let later = since(&tally.read(), &Window::default());
        assert_eq!(p99_bound_ms(&later), Some(1000.0));
    }

    #[test]
    fn percentages_are_the_contracts_and_nothing_else() {
        for (text, value) in [("1%", 0.01), ("0.5%", 0.005), ("0%", 0.0), ("100%", 1.0)] {
            assert_eq!(parse_percent(text), Ok(value), "{text}");
        }
        assert!(parse_percent("99.99%").is_ok_and(|f| (f - 0.9999).abs() < 1e-12));
        assert_eq!(parse_percent("100.00%"), Ok(1.0));
        for text in [
            "1", "100.5%", "101%", "01%", "1.%", ".5%", "1.234%", "-1%", "1e1%", " 1%", "1 %",
        ] {
            assert!(parse_percent(text).is_err(), "{text}");
        }
    }

    #[test]
    fn durations_are_the_contracts_and_nothing_else() {
        assert_eq!(
            parse_duration("interval", "30s"),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(
            parse_duration("max_p99", "500ms"),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("interval", "2m"),
            Ok(Duration::from_secs(120))
        );
        assert_eq!(
            parse_duration("interval", "999999h"),
            Ok(Duration::from_secs(999_999 * 3600))
        );
        for text in [
            "0s", "05s", "1000000s", "30", "s", "1.5s", "1m30s", "30 s", "30sec", "+3s", "",
        ] {
            assert!(parse_duration("interval", text).is_err(), "{text}");
        }
    }

    #[test]
    fn steps_run_rising_whatever_their_order() {
        assert_eq!(rising_steps(&[5, 25, 50, 100]), Ok(vec![5, 25, 50, 100]));
        assert_eq!(rising_steps(&[100, 50, 25]), Ok(vec![25, 50, 100]));
        assert_eq!(rising_steps(&[100]), Ok(vec![100]));
        for steps in [&[][..], &[5, 25], &[25, 25, 100], &[0, 100], &[100, 101]] {
            assert!(rising_steps(steps).is_err(), "{steps:?}");
        }
    }
}
