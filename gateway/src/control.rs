//! The fleet from the command line (`tiergate split …`, `tiergate fleet`): the same
//! operations as the admin API, straight on PostgreSQL and the Redis bus, so they work
//! from a pipeline or ECS Exec whether or not any task is running. They read the same
//! configuration as `serve` (file and environment: `DATABASE_URL`, `REDIS_URL`, …) and
//! check a change against its route table as a task would.
//!
//! Each prints one JSON document on stdout; logs go to stderr.

use std::collections::BTreeMap;
use std::time::Duration;

use app_core::cache::l2::L2;
use app_core::fleet::{Control, Waited};
use app_core::rollout::{Plan, parse_duration, parse_percent, rising_steps};
use app_core::store::Database;
use app_core::store::fleet::{Changer, Committed, Weights};
use serde_json::{Value, json};
use tiergate_config::Settings;

use crate::router::Router;

/// Why a command failed; the message is for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The arguments do not fit the configuration's route table.
    #[error("{0}")]
    Invalid(String),
    /// PostgreSQL cannot be reached or refused.
    #[error("the fleet state in PostgreSQL cannot be reached (database.url): {0}")]
    Database(String),
    /// The rollout ended without success (`rolled_back` on a breach, or `aborted`): why,
    /// and the rollout as it ended.
    #[error("the rollout ended {state}: {reason}")]
    Ended {
        state: String,
        reason: String,
        rollout: Value,
    },
    /// The change committed, but not every live task applied it within the wait.
    #[error("revision {revision} is committed, but these tasks had not applied it: {lagging:?}")]
    NotApplied {
        /// The change's revision.
        revision: i64,
        /// Task id → the revision it had.
        lagging: BTreeMap<String, i64>,
    },
}

/// A command's connections: PostgreSQL, and Redis to publish changes (best effort).
#[derive(Debug)]
pub struct Commands {
    control: Control,
    router: Router,
}

impl Commands {
    /// Connects as `settings` say; Redis gets `redis.connect_timeout` and is then left
    /// behind (tasks' polls carry a change that could not be published).
    ///
    /// # Errors
    /// A URL that does not parse, or a route table that cannot be built.
    pub async fn connect(settings: &Settings) -> Result<Self, ControlError> {
        let invalid = |e: &dyn std::fmt::Display| ControlError::Invalid(e.to_string());
        let db = Database::new(&settings.database).map_err(|e| invalid(&e))?;
        let l2 = L2::new(&settings.redis, settings.cache.l2_ttl).map_err(|e| invalid(&e))?;
        let router = Router::new(settings, None).map_err(|e| invalid(&e))?;
        l2.start_connecting();
        if !l2.wait_connected(settings.redis.connect_timeout).await {
            tracing::warn!(
                "Redis not reachable: changes are not published; every task's poll finds them."
            );
        }
        Ok(Self {
            control: Control::new(db, l2),
            router,
        })
    }

    /// `split show [ROUTE]`: each split route's file weights, runtime split and the
    /// weights in force fleet-wide.
    ///
    /// # Errors
    /// No such split route, or PostgreSQL unreachable.
    pub async fn split_show(&self, route: Option<&str>) -> Result<Value, ControlError> {
        if let Some(route) = route {
            self.split(route)?;
        }
        let snapshot = self.control.snapshot().await.map_err(database)?;
        let routes: Vec<Value> = self
            .router
            .splits()
            .filter(|(name, _)| route.is_none_or(|r| r == *name))
            .map(|(name, split)| {
                let runtime = snapshot.overrides.iter().find(|o| o.route == name);
                let file = split.file_weights();
                json!({
                    "route": name,
                    "file": file,
                    "runtime": runtime,
                    "in_force": runtime.map_or(&file, |r| &r.weights),
                })
            })
            .collect();
        Ok(json!({ "revision": snapshot.revision, "routes": routes }))
    }

    /// `split set ROUTE GROUP=WEIGHT…`: the route's runtime split, fleet-wide.
    ///
    /// # Errors
    /// Bad arguments, PostgreSQL unreachable, or tasks that had not applied it in `wait`.
    pub async fn split_set(
        &self,
        route: &str,
        weights: &[String],
        wait: Option<Duration>,
    ) -> Result<Value, ControlError> {
        let weights = parse_weights(weights)?;
        let complete = self
            .split(route)?
            .complete(&weights)
            .map_err(|e| ControlError::Invalid(format!("route {route}: {e}")))?;
        let (committed, _) = self
            .control
            .set_split(route, Some(&complete), Changer::Operator)
            .await
            .map_err(database)?
            .ok_or_else(|| rollout_running(route))?;
        self.report(route, Some(&complete), committed, wait).await
    }

    /// `split reset ROUTE`: the route back to its file weights, fleet-wide.
    ///
    /// # Errors
    /// No such split route, PostgreSQL unreachable, or tasks that had not applied it.
    pub async fn split_reset(
        &self,
        route: &str,
        wait: Option<Duration>,
    ) -> Result<Value, ControlError> {
        self.split(route)?;
        let (committed, _) = self
            .control
            .set_split(route, None, Changer::Operator)
            .await
            .map_err(database)?
            .ok_or_else(|| rollout_running(route))?;
        self.report(route, None, committed, wait).await
    }

    /// `rollout ROUTE --to GROUP …`: starts a rollout and drives it here to its end;
    /// the answer is the rollout as it ended.
    ///
    /// # Errors
    /// Bad arguments, a rollout already running on the route, PostgreSQL unreachable,
    /// or a rollout that rolled back (its reason).
    pub async fn rollout(&self, ask: &RolloutAsk) -> Result<Value, ControlError> {
        let shape = ask.shape().map_err(ControlError::Invalid)?;
        let snapshot = self.control.snapshot().await.map_err(database)?;
        let split = self.split(&ask.route)?;
        let in_force = snapshot
            .overrides
            .iter()
            .find(|o| o.route == ask.route)
            .map_or_else(|| split.file_weights(), |o| o.weights.clone());
        let plan =
            plan(ask, shape, split, &in_force).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let holder = format!("cli-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let Some(started) = self
            .control
            .start_rollout(&plan, &holder)
            .await
            .map_err(database)?
        else {
            return Err(ControlError::Invalid(format!(
                "a rollout is already running on route {}: see `tiergate rollout status {}`",
                ask.route, ask.route
            )));
        };
        let ended = self
            .control
            .drive_rollout(started.id, &holder)
            .await
            .map_err(database)?;
        let answer = json!(ended);
        match ended {
            Some(r) if r.state != "succeeded" => Err(ControlError::Ended {
                state: r.state,
                reason: r.reason.unwrap_or_default(),
                rollout: answer,
            }),
            _ => Ok(answer),
        }
    }

    /// `rollout abort ROUTE`: ends the rollout running on the route and sends the route
    /// back to 100 % of its previous group, fleet-wide; the answer is the aborted rollout.
    ///
    /// # Errors
    /// No rollout running on the route, or PostgreSQL unreachable.
    pub async fn rollout_abort(&self, route: &str) -> Result<Value, ControlError> {
        let reason = "aborted from the command line";
        match self
            .control
            .abort_rollout(route, reason)
            .await
            .map_err(database)?
        {
            Some((rollout, committed, _)) => Ok(json!({
                "rollout": rollout,
                "revision": committed.revision,
                "committed_at": committed.committed_at,
            })),
            None => Err(ControlError::Invalid(format!(
                "no rollout is running on route {route}: see `tiergate rollout status {route}`"
            ))),
        }
    }

    /// `rollout status ROUTE`: the route's latest rollouts, newest first.
    ///
    /// # Errors
    /// PostgreSQL unreachable.
    pub async fn rollout_status(&self, route: &str) -> Result<Value, ControlError> {
        let rollouts = self
            .control
            .db()
            .rollouts(Some(route))
            .await
            .map_err(database)?;
        Ok(json!({ "route": route, "rollouts": rollouts }))
    }

    /// `fleet`: the live tasks.
    ///
    /// # Errors
    /// PostgreSQL unreachable.
    pub async fn fleet(&self) -> Result<Value, ControlError> {
        let snapshot = self.control.snapshot().await.map_err(database)?;
        let tasks = self.control.tasks().await.map_err(database)?;
        Ok(json!({ "revision": snapshot.revision, "tasks": tasks }))
    }

    async fn report(
        &self,
        route: &str,
        weights: Option<&Weights>,
        committed: Committed,
        wait: Option<Duration>,
    ) -> Result<Value, ControlError> {
        let waited: Option<Waited> = match wait {
            Some(limit) => Some(
                self.control
                    .wait_applied(committed, limit)
                    .await
                    .map_err(database)?,
            ),
            None => None,
        };
        if let Some(waited) = waited.as_ref().filter(|w| !w.applied) {
            return Err(ControlError::NotApplied {
                revision: committed.revision,
                lagging: waited.lagging.clone(),
            });
        }
        Ok(json!({
            "route": route,
            "runtime": weights,
            "revision": committed.revision,
            "committed_at": committed.committed_at,
            "wait": waited,
        }))
    }

    fn split(&self, route: &str) -> Result<&crate::proxy::Split, ControlError> {
        self.router
            .splits()
            .find(|(name, _)| *name == route)
            .map(|(_, split)| split.as_ref())
            .ok_or_else(|| {
                let names: Vec<&str> = self.router.splits().map(|(name, _)| name).collect();
                ControlError::Invalid(format!(
                    "the configuration has no split route {route:?}; its split routes are: {}",
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    }
                ))
            })
    }
}

/// A rollout as asked for, by the CLI or `POST /admin/rollouts`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutAsk {
    /// The split route.
    pub route: String,
    /// The group to move the traffic to.
    pub to: String,
    /// Percent to `to` at each step: each once, 100 among them, run rising.
    #[serde(deserialize_with = "whole_numbers")]
    pub steps: Vec<i32>,
    /// How long each step runs before the next (`30s`).
    pub interval: String,
    /// Largest share of 5xx answers from `to` in a step (`1%`).
    pub max_error_rate: String,
    /// Largest p99 latency of `to` in a step (`500ms`).
    pub max_p99: String,
}

/// Integers as JSON may write them: `25` or `25.0` (the API contract's `integer` does not
/// tell them apart); `25.5` is refused.
fn whole_numbers<'de, D: serde::Deserializer<'de>>(from: D) -> Result<Vec<i32>, D::Error> {
    let numbers: Vec<serde_json::Number> = serde::Deserialize::deserialize(from)?;
    numbers
        .iter()
        .map(|n| {
            let whole = n.as_i64().or_else(|| {
                let x = n.as_f64()?;
                // Whole and in i32's range, so the cast is exact.
                (x.fract() == 0.0 && x.abs() <= f64::from(i32::MAX)).then_some(x as i64)
            });
            whole
                .and_then(|w| i32::try_from(w).ok())
                .ok_or_else(|| serde::de::Error::custom(format!("step {n} is not an integer")))
        })
        .collect()
}

/// What a rollout asks for, each part well formed; the route is not looked at yet.
#[derive(Debug)]
pub struct Shape {
    steps: Vec<i32>,
    interval: std::time::Duration,
    max_error_rate: f64,
    max_p99: std::time::Duration,
}

impl RolloutAsk {
    /// The ask's own rules (the API contract's): steps, durations and percentage.
    ///
    /// # Errors
    /// The first part that is not well formed, for the operator.
    pub fn shape(&self) -> Result<Shape, String> {
        Ok(Shape {
            steps: rising_steps(&self.steps)?,
            interval: parse_duration("interval", &self.interval)?,
            max_error_rate: parse_percent(&self.max_error_rate)?,
            max_p99: parse_duration("max_p99", &self.max_p99)?,
        })
    }
}

/// Why a well-formed rollout cannot start on the route.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `to` is not one of the route's groups.
    #[error("route {route} has no group {to:?}; its groups are: {groups}")]
    NoSuchGroup {
        route: String,
        to: String,
        groups: String,
    },
    /// Everything already goes to `to`: there is nothing to move.
    #[error("route {route} already sends everything to {to}")]
    NothingToMove { route: String, to: String },
}

/// The plan for `ask` on the route's split; the previous group is the one with the most
/// weight `in_force` other than the target.
///
/// # Errors
/// Why the rollout cannot be done on this route, for the operator.
pub fn plan(
    ask: &RolloutAsk,
    shape: Shape,
    split: &crate::proxy::Split,
    in_force: &Weights,
) -> Result<Plan, PlanError> {
    let file = split.file_weights();
    if !file.contains_key(&ask.to) {
        let groups: Vec<&str> = file.keys().map(String::as_str).collect();
        return Err(PlanError::NoSuchGroup {
            route: ask.route.clone(),
            to: ask.to.clone(),
            groups: groups.join(", "),
        });
    }
    let from = in_force
        .iter()
        .filter(|(group, weight)| **group != ask.to && **weight > 0)
        .max_by_key(|(_, weight)| **weight)
        .map(|(group, _)| group.clone())
        .ok_or_else(|| PlanError::NothingToMove {
            route: ask.route.clone(),
            to: ask.to.clone(),
        })?;
    Ok(Plan {
        route: ask.route.clone(),
        from,
        to: ask.to.clone(),
        steps: shape.steps,
        interval: shape.interval,
        max_error_rate: shape.max_error_rate,
        max_p99: shape.max_p99,
    })
}

fn rollout_running(route: &str) -> ControlError {
    ControlError::Invalid(format!(
        "a rollout is running on route {route} and would overwrite the change: \
         `tiergate rollout abort {route}` first, or wait for it to end"
    ))
}

fn database(error: app_core::store::StoreError) -> ControlError {
    ControlError::Database(app_core::ErrorChain(&error).to_string())
}

/// `GROUP=WEIGHT` arguments as a map.
///
/// # Errors
/// An argument that is not `GROUP=WEIGHT` with a non-negative integer weight, or a group
/// named twice.
pub fn parse_weights(args: &[String]) -> Result<Weights, ControlError> {
    let mut weights = Weights::new();
    for arg in args {
        let parsed = arg
            .split_once('=')
            .and_then(|(group, weight)| Some((group, weight.parse::<u32>().ok()?)));
        let Some((group, weight)) = parsed else {
            return Err(ControlError::Invalid(format!(
                "{arg:?} is not GROUP=WEIGHT with a non-negative integer weight (blue=0 green=100)"
            )));
        };
        if weights.insert(group.to_owned(), weight).is_some() {
            return Err(ControlError::Invalid(format!(
                "group {group} is named twice"
            )));
        }
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_from_group_equals_weight() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let parsed = parse_weights(&args(&["blue=0", "green=100"])).unwrap();
        assert_eq!(parsed["green"], 100);
        for bad in [
            &["blue"][..],
            &["blue=-1"],
            &["blue=x"],
            &["blue=1", "blue=2"],
        ] {
            assert!(parse_weights(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
