//! The fleet's tables (migration 0003, docs/fleet.md): the runtime split of each route
//! under one revision counter, and the live tasks' heartbeats.
//!
//! Every change is one statement that bumps the counter and writes the route's row: the
//! counter's row lock queues concurrent changers, so revisions follow commit order, and a
//! snapshot that reads revision N holds exactly the changes up to N.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;

use super::{Database, StoreError};

/// A split's weights by group name.
pub type Weights = BTreeMap<String, u32>;

/// A change as committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The fleet revision the change made.
    pub revision: i64,
    /// When it committed, by the database's clock.
    pub committed_at: DateTime<Utc>,
}

/// One route's runtime split as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Override {
    pub route: String,
    pub weights: Weights,
    /// The revision that set it.
    pub revision: i64,
    pub changed_at: DateTime<Utc>,
}

/// The whole runtime state at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub revision: i64,
    /// The routes that have a runtime split; a route that was reset is not here.
    pub overrides: Vec<Override>,
}

/// What a task says of itself on each heartbeat.
#[derive(Debug, Clone)]
pub struct Heartbeat<'a> {
    pub id: &'a str,
    pub version: &'a str,
    pub commit: &'a str,
    pub colour: Option<&'a str>,
    /// How long the row stands for a live task without another heartbeat.
    pub ttl: Duration,
    pub applied_revision: i64,
    pub in_flight: u64,
}

/// A live task as its last heartbeat described it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TaskRow {
    pub id: String,
    pub version: String,
    pub commit: String,
    pub colour: Option<String>,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
    pub uptime_seconds: f64,
    pub applied_revision: i64,
    /// When it applied its latest revision (by the database's clock).
    pub applied_at: Option<DateTime<Utc>>,
    pub in_flight: i64,
}

/// Who changes a split, which decides whether the change may land.
#[derive(Debug, Clone, Copy)]
pub enum Changer<'a> {
    /// An operator (the admin API, the CLI): only while no rollout runs on the route,
    /// whose next step would silently overwrite the change.
    Operator,
    /// The driver of rollout `id`: only while the rollout runs and `holder` holds its
    /// lease. The statement locks the rollout's row, so an abort that commits first
    /// turns the change into nothing, and one that comes later waits for it.
    Rollout { id: i64, holder: &'a str },
}

/// Bumps the revision and writes route `$1`'s row (`$2`, NULL to reset) when the CTE
/// `allowed` that precedes it has a row.
const WRITE_SPLIT: &str = "bumped AS (
         UPDATE fleet_revision SET revision = revision + 1
         WHERE EXISTS (SELECT 1 FROM allowed) RETURNING revision
     )
     INSERT INTO fleet_splits (route, weights, revision, changed_at)
     SELECT $1, $2::jsonb, revision, clock_timestamp() FROM bumped
     ON CONFLICT (route) DO UPDATE SET weights = excluded.weights,
         revision = excluded.revision, changed_at = excluded.changed_at
     RETURNING revision, changed_at";

impl Database {
    /// Sets route `route`'s runtime split to `weights`, or with `None` resets it to the
    /// file's weights: one statement that bumps the fleet revision. `None` when `by` may
    /// not change it now (see [`Changer`]).
    ///
    /// # Errors
    /// The database is unreachable, or the schema lacks the fleet tables.
    pub async fn fleet_set_split(
        &self,
        route: &str,
        weights: Option<&Weights>,
        by: Changer<'_>,
    ) -> Result<Option<Committed>, StoreError> {
        let weights = weights.map(|w| {
            let map = w
                .iter()
                .map(|(group, weight)| (group.clone(), serde_json::Value::from(*weight)))
                .collect::<serde_json::Map<_, _>>();
            serde_json::Value::Object(map).to_string()
        });
        let conn = self.writer.get().await?;
        let row = match by {
            Changer::Operator => {
                let sql = format!(
                    "WITH allowed AS (
                         SELECT WHERE NOT EXISTS (
                             SELECT 1 FROM fleet_rollouts WHERE route = $1 AND state = 'running'
                         )
                     ), {WRITE_SPLIT}"
                );
                conn.query_typed_opt(&sql, &[(&route, Type::TEXT), (&weights, Type::TEXT)])
                    .await?
            }
            Changer::Rollout { id, holder } => {
                let sql = format!(
                    "WITH allowed AS (
                         SELECT 1 FROM fleet_rollouts
                         WHERE id = $3 AND state = 'running' AND lease_holder = $4
                         FOR UPDATE
                     ), {WRITE_SPLIT}"
                );
                conn.query_typed_opt(
                    &sql,
                    &[
                        (&route, Type::TEXT),
                        (&weights, Type::TEXT),
                        (&id, Type::INT8),
                        (&holder, Type::TEXT),
                    ],
                )
                .await?
            }
        };
        let committed = row.map(|row| {
            Ok::<_, tokio_postgres::Error>(Committed {
                revision: row.try_get(0)?,
                committed_at: row.try_get(1)?,
            })
        });
        Ok(committed.transpose()?)
    }

    /// The runtime state, read in one snapshot.
    ///
    /// # Errors
    /// The database is unreachable, or the schema lacks the fleet tables.
    pub async fn fleet_snapshot(&self) -> Result<Snapshot, StoreError> {
        let conn = self.writer.get().await?;
        let rows = conn
            .query_typed(
                "SELECT r.revision, s.route, s.weights::text, s.revision, s.changed_at
                 FROM fleet_revision r LEFT JOIN fleet_splits s ON s.weights IS NOT NULL
                 ORDER BY s.route",
                &[],
            )
            .await?;
        let mut snapshot = Snapshot::default();
        for row in rows {
            snapshot.revision = row.try_get(0)?;
            let Some(route) = row.try_get::<_, Option<String>>(1)? else {
                continue;
            };
            let text: String = row.try_get(2)?;
            match serde_json::from_str::<Weights>(&text) {
                Ok(weights) => snapshot.overrides.push(Override {
                    route,
                    weights,
                    revision: row.try_get(3)?,
                    changed_at: row.try_get(4)?,
                }),
                // Not written by Tiergate: the route keeps its file weights.
                Err(error) => {
                    tracing::warn!(route, %error, "Ignored a malformed runtime split in fleet_splits.");
                }
            }
        }
        Ok(snapshot)
    }

    /// Records a heartbeat (and drops the rows of tasks that stopped beating); returns the
    /// fleet revision, read in the same statement.
    ///
    /// # Errors
    /// The database is unreachable, or the schema lacks the fleet tables.
    pub async fn fleet_heartbeat(&self, beat: &Heartbeat<'_>) -> Result<i64, StoreError> {
        let ttl_ms = i64::try_from(beat.ttl.as_millis()).unwrap_or(i64::MAX);
        let in_flight = i64::try_from(beat.in_flight).unwrap_or(i64::MAX);
        let conn = self.writer.get().await?;
        let row = conn
            .query_typed_one(
                "WITH gone AS (
                     DELETE FROM fleet_tasks WHERE expires_at < now() AND id <> $1
                 ), beat AS (
                     INSERT INTO fleet_tasks AS t (id, version, commit, colour, started_at,
                         seen_at, expires_at, applied_revision, applied_at, in_flight)
                     VALUES ($1, $2, $3, $4, now(), now(),
                         now() + $5 * interval '1 millisecond', $6, clock_timestamp(), $7)
                     ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at,
                         expires_at = excluded.expires_at, colour = excluded.colour,
                         in_flight = excluded.in_flight,
                         applied_revision = greatest(t.applied_revision, excluded.applied_revision),
                         applied_at = CASE WHEN excluded.applied_revision > t.applied_revision
                             THEN excluded.applied_at ELSE t.applied_at END
                 )
                 SELECT revision FROM fleet_revision",
                &[
                    (&beat.id, Type::TEXT),
                    (&beat.version, Type::TEXT),
                    (&beat.commit, Type::TEXT),
                    (&beat.colour, Type::TEXT),
                    (&ttl_ms, Type::INT8),
                    (&beat.applied_revision, Type::INT8),
                    (&in_flight, Type::INT8),
                ],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// The tasks whose heartbeat has not expired, oldest first.
    ///
    /// # Errors
    /// The database is unreachable, or the schema lacks the fleet tables.
    pub async fn fleet_tasks(&self) -> Result<Vec<TaskRow>, StoreError> {
        let conn = self.writer.get().await?;
        let rows = conn
            .query_typed(
                "SELECT id, version, commit, colour, started_at, seen_at,
                     extract(epoch FROM now() - started_at)::float8,
                     applied_revision, applied_at, in_flight
                 FROM fleet_tasks WHERE expires_at > now() ORDER BY started_at, id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(TaskRow {
                    id: row.try_get(0)?,
                    version: row.try_get(1)?,
                    commit: row.try_get(2)?,
                    colour: row.try_get(3)?,
                    started_at: row.try_get(4)?,
                    seen_at: row.try_get(5)?,
                    uptime_seconds: row.try_get(6)?,
                    applied_revision: row.try_get(7)?,
                    applied_at: row.try_get(8)?,
                    in_flight: row.try_get(9)?,
                })
            })
            .collect()
    }
}
