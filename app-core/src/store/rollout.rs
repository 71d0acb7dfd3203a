//! The rollouts' tables (migration 4): each rollout's state machine, and what every task
//! saw of the target group during each step.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};

use super::fleet::Committed;
use super::{Database, StoreError};

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RolloutRow {
    pub id: i64,
    pub route: String,
    pub from_group: String,
    pub to_group: String,
    /// Percent of traffic to `to_group` at each step.
    pub steps: Vec<i32>,
    pub interval_ms: i64,
    pub max_error_rate: f64,
    pub max_p99_ms: f64,
    /// `running`, `succeeded`, `rolled_back` or `aborted`.
    pub state: String,
    pub step_index: i32,
    /// When the step's weights were put in force; `None` until they are.
    pub step_started_at: Option<DateTime<Utc>>,
    /// How long the step has run, by the database's clock.
    pub step_elapsed_ms: Option<f64>,
    pub reason: Option<String>,
    pub lease_holder: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a new rollout is asked to do.
#[derive(Debug, Clone)]
pub struct NewRollout<'a> {
    pub route: &'a str,
    pub from_group: &'a str,
    pub to_group: &'a str,
    pub steps: &'a [i32],
    pub interval: Duration,
    pub max_error_rate: f64,
    pub max_p99: Duration,
    /// Who drives it first.
    pub holder: &'a str,
    pub lease: Duration,
}

/// The target group's responses in one step, summed over the tasks that reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Window {
    pub requests: i64,
    pub errors: i64,
    pub buckets: Vec<i64>,
    pub tasks: i64,
}

const COLUMNS: &str = "id, route, from_group, to_group, steps, interval_ms, max_error_rate,
    max_p99_ms, state, step_index, step_started_at,
    extract(epoch FROM now() - step_started_at)::float8 * 1000, reason, lease_holder,
    started_at, finished_at";

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn row_to_rollout(row: &Row) -> Result<RolloutRow, tokio_postgres::Error> {
    Ok(RolloutRow {
        id: row.try_get(0)?,
        route: row.try_get(1)?,
        from_group: row.try_get(2)?,
        to_group: row.try_get(3)?,
        steps: row.try_get(4)?,
        interval_ms: row.try_get(5)?,
        max_error_rate: row.try_get(6)?,
        max_p99_ms: row.try_get(7)?,
        state: row.try_get(8)?,
        step_index: row.try_get(9)?,
        step_started_at: row.try_get(10)?,
        step_elapsed_ms: row.try_get(11)?,
        reason: row.try_get(12)?,
        lease_holder: row.try_get(13)?,
        started_at: row.try_get(14)?,
        finished_at: row.try_get(15)?,
    })
}

impl Database {
    /// Starts a rollout, leased to `holder`; `None` when one is already running on the
    /// route.
    ///
    /// # Errors
    /// The database is unreachable, or the schema lacks the rollout tables.
    pub async fn rollout_create(
        &self,
        new: &NewRollout<'_>,
    ) -> Result<Option<RolloutRow>, StoreError> {
        let sql = format!(
            "INSERT INTO fleet_rollouts (route, from_group, to_group, steps, interval_ms,
                 max_error_rate, max_p99_ms, lease_holder, lease_expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now() + $9 * interval '1 millisecond')
             ON CONFLICT (route) WHERE state = 'running' DO NOTHING
             RETURNING {COLUMNS}"
        );
        let max_p99_ms = new.max_p99.as_secs_f64() * 1000.0;
        self.rollout_returned(
            &sql,
            &[
                (&new.route, Type::TEXT),
                (&new.from_group, Type::TEXT),
                (&new.to_group, Type::TEXT),
                (&new.steps, Type::INT4_ARRAY),
                (&ms(new.interval), Type::INT8),
                (&new.max_error_rate, Type::FLOAT8),
                (&max_p99_ms, Type::FLOAT8),
                (&new.holder, Type::TEXT),
                (&ms(new.lease), Type::INT8),
            ],
        )
        .await
    }

    /// Takes or renews the lease of running rollout `id` for `holder`: `None` when another
    /// holder's lease is still good or the rollout is over.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn rollout_claim(
        &self,
        id: i64,
        holder: &str,
        lease: Duration,
    ) -> Result<Option<RolloutRow>, StoreError> {
        let sql = format!(
            "UPDATE fleet_rollouts SET lease_holder = $2,
                 lease_expires_at = now() + $3 * interval '1 millisecond'
             WHERE id = $1 AND state = 'running'
                 AND (lease_holder = $2 OR lease_expires_at IS NULL OR lease_expires_at < now())
             RETURNING {COLUMNS}"
        );
        self.rollout_returned(
            &sql,
            &[
                (&id, Type::INT8),
                (&holder, Type::TEXT),
                (&ms(lease), Type::INT8),
            ],
        )
        .await
    }

    /// Moves running rollout `id` on, if `holder` holds its lease: `Some(step)` starts
    /// step `step` (its weights not yet in force), `None` marks the current step's
    /// weights as in force from now.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn rollout_step(
        &self,
        id: i64,
        holder: &str,
        next: Option<i32>,
    ) -> Result<bool, StoreError> {
        let conn = self.writer.get().await?;
        let updated = conn
            .query_typed_opt(
                "UPDATE fleet_rollouts SET
                     step_index = coalesce($3, step_index),
                     step_started_at = CASE WHEN $3 IS NULL THEN now() END
                 WHERE id = $1 AND state = 'running' AND lease_holder = $2
                 RETURNING id",
                &[
                    (&id, Type::INT8),
                    (&holder, Type::TEXT),
                    (&next, Type::INT4),
                ],
            )
            .await?;
        Ok(updated.is_some())
    }

    /// Ends running rollout `id` in `state`, with `reason`, if `holder` holds its lease.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn rollout_finish(
        &self,
        id: i64,
        holder: &str,
        state: &str,
        reason: &str,
    ) -> Result<Option<RolloutRow>, StoreError> {
        let sql = format!(
            "UPDATE fleet_rollouts SET state = $3, reason = $4, finished_at = now(),
                 lease_holder = NULL, lease_expires_at = NULL
             WHERE id = $1 AND state = 'running' AND lease_holder = $2
             RETURNING {COLUMNS}"
        );
        self.rollout_returned(
            &sql,
            &[
                (&id, Type::INT8),
                (&holder, Type::TEXT),
                (&state, Type::TEXT),
                (&reason, Type::TEXT),
            ],
        )
        .await
    }

    /// Runs `sql`, a statement `RETURNING {COLUMNS}` of at most one row, on the writer.
    async fn rollout_returned(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<RolloutRow>, StoreError> {
        let conn = self.writer.get().await?;
        let row = conn.query_typed_opt(sql, params).await?;
        Ok(row.as_ref().map(row_to_rollout).transpose()?)
    }

    /// The rollouts running now (one per route at most).
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn rollouts_running(&self) -> Result<Vec<RolloutRow>, StoreError> {
        let conn = self.writer.get().await?;
        let sql = format!("SELECT {COLUMNS} FROM fleet_rollouts WHERE state = 'running'");
        let rows = conn.query_typed(&sql, &[]).await?;
        Ok(rows.iter().map(row_to_rollout).collect::<Result<_, _>>()?)
    }

    /// The rollouts, newest first: of `route` only when given; at most 50.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn rollouts(&self, route: Option<&str>) -> Result<Vec<RolloutRow>, StoreError> {
        let conn = self.writer.get().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM fleet_rollouts WHERE $1::text IS NULL OR route = $1
             ORDER BY id DESC LIMIT 50"
        );
        let rows = conn.query_typed(&sql, &[(&route, Type::TEXT)]).await?;
        Ok(rows.iter().map(row_to_rollout).collect::<Result<_, _>>()?)
    }

    /// Records what task `task_id` saw of the target group in a step so far.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn rollout_report(
        &self,
        rollout_id: i64,
        step_index: i32,
        task_id: &str,
        window: &Window,
    ) -> Result<(), StoreError> {
        let conn = self.writer.get().await?;
        conn.query_typed(
            "INSERT INTO fleet_rollout_reports (rollout_id, step_index, task_id, requests,
                 errors, buckets)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (rollout_id, step_index, task_id) DO UPDATE SET
                 requests = excluded.requests, errors = excluded.errors,
                 buckets = excluded.buckets, reported_at = now()",
            &[
                (&rollout_id, Type::INT8),
                (&step_index, Type::INT4),
                (&task_id, Type::TEXT),
                (&window.requests, Type::INT8),
                (&window.errors, Type::INT8),
                (&window.buckets, Type::INT8_ARRAY),
            ],
        )
        .await?;
        Ok(())
    }

    /// The step's reports, summed over the tasks.
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn rollout_window(
        &self,
        rollout_id: i64,
        step_index: i32,
    ) -> Result<Window, StoreError> {
        let conn = self.writer.get().await?;
        let rows = conn
            .query_typed(
                "SELECT requests, errors, buckets FROM fleet_rollout_reports
                 WHERE rollout_id = $1 AND step_index = $2",
                &[(&rollout_id, Type::INT8), (&step_index, Type::INT4)],
            )
            .await?;
        let mut window = Window::default();
        for row in rows {
            window.tasks += 1;
            window.requests += row.try_get::<_, i64>(0)?;
            window.errors += row.try_get::<_, i64>(1)?;
            let buckets: Vec<i64> = row.try_get(2)?;
            if window.buckets.len() < buckets.len() {
                window.buckets.resize(buckets.len(), 0);
            }
            for (sum, n) in window.buckets.iter_mut().zip(buckets) {
                *sum += n;
            }
        }
        Ok(window)
    }

    /// Ends the rollout running on `route` as `aborted` with `reason` and, in the same
    /// statement, returns the route to 100 % of its previous group: `None` when none runs.
    /// Whoever drove it finds it over at its next look; a step it was putting in force
    /// at that moment either lands first (and is undone here) or not at all (see
    /// [`Changer::Rollout`](super::fleet::Changer::Rollout)).
    ///
    /// # Errors
    /// The database is unreachable.
    pub async fn rollout_abort(
        &self,
        route: &str,
        reason: &str,
    ) -> Result<Option<(RolloutRow, Committed)>, StoreError> {
        let conn = self.writer.get().await?;
        let sql = format!(
            "WITH aborted AS (
                 UPDATE fleet_rollouts SET state = 'aborted', reason = $2, finished_at = now(),
                     lease_holder = NULL, lease_expires_at = NULL
                 WHERE route = $1 AND state = 'running'
                 RETURNING {COLUMNS}
             ), bumped AS (
                 UPDATE fleet_revision SET revision = revision + 1
                 WHERE EXISTS (SELECT 1 FROM aborted) RETURNING revision
             ), split AS (
                 INSERT INTO fleet_splits (route, weights, revision, changed_at)
                 SELECT a.route, jsonb_build_object(a.from_group, 100, a.to_group, 0),
                     b.revision, clock_timestamp()
                 FROM aborted a, bumped b
                 ON CONFLICT (route) DO UPDATE SET weights = excluded.weights,
                     revision = excluded.revision, changed_at = excluded.changed_at
                 RETURNING revision, changed_at
             )
             SELECT a.*, s.revision, s.changed_at FROM aborted a, split s"
        );
        let row = conn
            .query_typed_opt(&sql, &[(&route, Type::TEXT), (&reason, Type::TEXT)])
            .await?;
        let Some(row) = row else { return Ok(None) };
        let rollout = row_to_rollout(&row)?;
        let committed = Committed {
            revision: row.try_get(16)?,
            committed_at: row.try_get(17)?,
        };
        Ok(Some((rollout, committed)))
    }
}
