//! Schema migrations, embedded in the binary and applied in order under an advisory lock.
//!
//! Ten tasks starting at once all call [`migrate`]; the transaction-scoped advisory lock
//! makes them queue, and each one after the first finds nothing left to do. DDL is
//! transactional in PostgreSQL, so a migration that fails leaves no half-applied schema.

use tokio_postgres::Client;

/// Every migration, in order. The number is the version recorded once applied; never
/// renumber or edit one that has shipped, add a new one instead.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "items", include_str!("../../migrations/0001_items.sql")),
    (
        2,
        "cache_outbox",
        include_str!("../../migrations/0002_cache_outbox.sql"),
    ),
    (3, "fleet", include_str!("../../migrations/0003_fleet.sql")),
    (
        4,
        "rollouts",
        include_str!("../../migrations/0004_rollouts.sql"),
    ),
];

/// Arbitrary but fixed: the key of the advisory lock that serializes migrators.
const LOCK_KEY: i64 = 0x7469_6572_6761_7465; // "tiergate"

/// The newest schema version this binary knows.
pub(crate) fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies every pending migration in one transaction; returns how many were applied.
pub(crate) async fn migrate(client: &mut Client) -> Result<usize, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tiergate_schema_migrations (
             version    integer PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM tiergate_schema_migrations",
            &[],
        )
        .await?
        .get(0);
    let mut applied = 0;
    for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO tiergate_schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tracing::info!(version, name, "Applied migration.");
        applied += 1;
    }
    tx.commit().await?;
    Ok(applied)
}

/// The schema version the database is at, 0 when never migrated.
pub(crate) async fn current_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let exists: bool = client
        .query_one(
            "SELECT to_regclass('tiergate_schema_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM tiergate_schema_migrations",
            &[],
        )
        .await?
        .get(0))
}
