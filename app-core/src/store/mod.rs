//! PostgreSQL: the writer pool, an optional reader pool, migrations and the item queries.
//!
//! Pools are built without connecting ([`bb8::Builder::build_unchecked`]) so the process
//! starts, binds and answers `/livez` while the database is still unreachable (RDS says
//! "available" before it accepts connections). A checkout waits at most
//! `database.checkout_timeout`, then the request gets 503 — never bb8's 30 s default.
//!
//! Queries go through `query_typed`: parameters carry their types, so each query is one
//! round trip (parse, bind and execute together) instead of a prepare and an execute.
//!
//! Through a failover (see the `connection` module): errors that mean "the database is
//! away" are [`StoreError::Unavailable`] (503), a broken connection leaves the pool, and
//! reads — never writes — are sent once more on another connection.

mod connection;
pub mod fleet;
mod migrate;
mod replica;
pub mod rollout;

use std::str::FromStr;
use std::time::{Duration, Instant};

use bb8_postgres::PostgresConnectionManager;
use chrono::{DateTime, Utc};
use tiergate_config::DatabaseSettings;
use tokio_postgres::Row;
use tokio_postgres::types::Type;
use tokio_postgres_rustls::MakeRustlsConnect;

use self::connection::{Failure, Manager, Pool, ReadAttempts};
use crate::model::{Item, ItemId};
use crate::tls::{SslMode, Verify};

use replica::{Answer, Reader};
pub use replica::{Moved, PROBE_INTERVAL, ReaderProbe, ReaderStats};

/// Why a store call failed, split by who can do something about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection within the checkout timeout, the connection broke, or the server
    /// is failing over or overloaded (see the `connection` module): retry later.
    #[error("database unavailable")]
    Unavailable(#[source] Option<tokio_postgres::Error>),
    /// The database answered with an error: a bug or a schema problem.
    #[error("database query failed")]
    Query(#[source] tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        match Failure::of(&e) {
            Failure::Broken | Failure::Unavailable => Self::Unavailable(Some(e)),
            Failure::Query => Self::Query(e),
        }
    }
}

impl From<bb8::RunError<tokio_postgres::Error>> for StoreError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        match e {
            bb8::RunError::User(e) => Self::Unavailable(Some(e)),
            bb8::RunError::TimedOut => Self::Unavailable(None),
        }
    }
}

/// A URL in the settings that PostgreSQL's client cannot use, or a TLS setting that
/// cannot be applied. The message names the setting, never the URL: URLs carry
/// passwords.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct InvalidUrl {
    setting: &'static str,
    reason: String,
}

/// An outbox row: the cache invalidation of one write, pending until done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxId(i64);

/// The result of a write, with the outbox row that stands for its invalidation.
#[derive(Debug)]
pub struct Written<T> {
    pub value: T,
    pub outbox: OutboxId,
}

/// An invalidation left behind by its writer.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    pub outbox: OutboxId,
    pub item_id: i64,
    pub version: i64,
}

/// Outcome of an update that may carry an `If-Match` precondition.
#[derive(Debug)]
pub enum UpdateOutcome {
    Updated(Written<Item>),
    NotFound,
    /// The row exists at this version, which the precondition did not name.
    VersionMismatch(i64),
}

/// The writer pool and, when configured, a reader (see the `replica` module) that
/// answers reads only when it can prove it is not behind.
#[derive(Debug, Clone)]
pub struct Database {
    writer: Pool,
    reader: Option<Reader>,
}

/// One item read (or its absence), and whether it is known to be current.
#[derive(Debug)]
pub struct ItemRead {
    pub item: Option<Item>,
    /// It holds every version the writer had committed when the read began: always for
    /// the writer's answers, and for a reader's that proved it had replayed that far.
    /// False only for a reader's answer while the writer could not be asked; such an
    /// answer must not be cached for long, nor in Redis.
    pub current: bool,
}

/// How many connections a pool holds and how many are idle, for the pool gauges.
#[derive(Debug, Clone, Copy)]
pub struct PoolState {
    pub connections: u32,
    pub idle: u32,
}

const ITEM_COLUMNS: &str = "id, name, created_at, updated_at, version";

impl Database {
    /// Builds the pools without connecting.
    ///
    /// # Errors
    /// [`InvalidUrl`] when a URL does not parse.
    pub fn new(settings: &DatabaseSettings) -> Result<Self, InvalidUrl> {
        let writer = build_pool(settings, settings.url.expose(), "database.url")?;
        let reader = match &settings.reader_url {
            Some(url) => Some(Reader::new(
                build_pool(settings, url.expose(), "database.reader_url")?,
                settings.reader_max_lag,
            )),
            None => None,
        };
        Ok(Self { writer, reader })
    }

    /// Applies pending migrations (see the `migrate` module); returns how many ran.
    ///
    /// # Errors
    /// When the database is unreachable or a migration fails.
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        let mut conn = self.writer.get().await?;
        Ok(migrate::migrate(&mut conn).await?)
    }

    /// Whether the schema is at the version this binary needs.
    ///
    /// # Errors
    /// When the database is unreachable.
    pub async fn schema_is_current(&self) -> Result<bool, StoreError> {
        let conn = self.writer.get().await?;
        Ok(migrate::current_version(&conn).await? >= migrate::latest_version())
    }

    /// One round trip to the writer: its clock and how long the round trip took.
    ///
    /// # Errors
    /// When the database is unreachable.
    pub async fn ping(&self) -> Result<(Duration, DateTime<Utc>), StoreError> {
        let started = Instant::now();
        let conn = self.writer.get().await?;
        let row = conn.query_typed_one("SELECT now()", &[]).await?;
        Ok((started.elapsed(), row.try_get(0)?))
    }

    /// Opens one connection to the writer outside the pool and closes it: the pool only
    /// says "timed out" when connecting fails, this says why (a refused certificate, a
    /// wrong password).
    ///
    /// # Errors
    /// Why the connection could not be made.
    pub async fn check_connect(&self) -> Result<(), StoreError> {
        let conn = self
            .writer
            .dedicated_connection()
            .await
            .map_err(|e| StoreError::Unavailable(Some(e)))?;
        drop(conn);
        Ok(())
    }

    /// Reads one item as of no earlier than this call: from the reader when it proves it
    /// has replayed everything the writer had committed by then, else from the writer.
    /// A read the reader cannot answer goes to the writer; it never fails on the
    /// reader's account.
    ///
    /// # Errors
    /// When the database is unreachable or the query fails.
    pub async fn get(&self, id: ItemId) -> Result<ItemRead, StoreError> {
        let answer = match &self.reader {
            Some(reader) => reader.get(&self.writer, id).await?,
            None => Answer::Writer,
        };
        match answer {
            Answer::Current(item) => Ok(ItemRead {
                item,
                current: true,
            }),
            Answer::Unverified(item) => Ok(ItemRead {
                item,
                current: false,
            }),
            Answer::Writer => Ok(ItemRead {
                item: self.get_latest(id).await?,
                current: true,
            }),
        }
    }

    /// Reads one item from the writer: for reads that must see the latest commit.
    ///
    /// # Errors
    /// When the database is unreachable or the query fails.
    pub async fn get_latest(&self, id: ItemId) -> Result<Option<Item>, StoreError> {
        self.get_from(&self.writer, id).await
    }

    async fn get_from(&self, pool: &Pool, id: ItemId) -> Result<Option<Item>, StoreError> {
        let sql = format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = $1");
        let mut attempts = ReadAttempts::default();
        loop {
            let conn = pool.get().await?;
            match conn.query_typed_opt(&sql, &[(&id.get(), Type::INT8)]).await {
                Err(e) if attempts.again(pool, &e) => {}
                row => return row?.as_ref().map(item_from_row).transpose(),
            }
        }
    }

    /// A page of items in id order, after `after` (keyset pagination: stable under
    /// concurrent inserts, and as cheap for page 1,000 as for page 1); from the writer
    /// when `latest`, else from the reader when there is one and it is neither down nor
    /// lagging beyond `database.reader_max_lag`. A page the reader cannot give within
    /// that time comes from the writer.
    ///
    /// # Errors
    /// When the database is unreachable or the query fails.
    pub async fn list(
        &self,
        after: i64,
        limit: i64,
        latest: bool,
    ) -> Result<Vec<Item>, StoreError> {
        if let Some(reader) = self.reader.as_ref().filter(|r| !latest && r.may_list()) {
            let attempt = self.list_from(reader.pool(), after, limit);
            match tokio::time::timeout(reader.max_lag(), attempt).await {
                Ok(Ok(items)) => return Ok(items),
                _ => reader.list_failed(),
            }
        }
        self.list_from(&self.writer, after, limit).await
    }

    async fn list_from(
        &self,
        pool: &Pool,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Item>, StoreError> {
        let sql = format!("SELECT {ITEM_COLUMNS} FROM items WHERE id > $1 ORDER BY id LIMIT $2");
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 2] =
            [(&after, Type::INT8), (&limit, Type::INT8)];
        let mut attempts = ReadAttempts::default();
        loop {
            let conn = pool.get().await?;
            match conn.query_typed(&sql, &params).await {
                Err(e) if attempts.again(pool, &e) => {}
                rows => return rows?.iter().map(item_from_row).collect(),
            }
        }
    }

    /// Inserts an item at version 1, with its outbox row, in one statement.
    ///
    /// # Errors
    /// When the database is unreachable or the insert fails.
    pub async fn create(&self, name: &str) -> Result<Written<Item>, StoreError> {
        let conn = self.writer.get().await?;
        let sql = format!(
            "WITH created AS (INSERT INTO items (name) VALUES ($1) RETURNING {ITEM_COLUMNS}),
                  queued AS (INSERT INTO cache_outbox (item_id, version)
                             SELECT id, version FROM created RETURNING id)
             SELECT created.*, queued.id FROM created, queued"
        );
        let row = conn.query_typed_one(&sql, &[(&name, Type::TEXT)]).await?;
        written_item(&row)
    }

    /// Renames an item and bumps its version, with its outbox row, in one statement;
    /// with `expected` set, only when the row is still at one of those versions
    /// (`If-Match`).
    ///
    /// # Errors
    /// When the database is unreachable or the update fails.
    pub async fn update(
        &self,
        id: ItemId,
        name: &str,
        expected: Option<&[i64]>,
    ) -> Result<UpdateOutcome, StoreError> {
        let conn = self.writer.get().await?;
        let sql = format!(
            "WITH changed AS (UPDATE items SET name = $2, updated_at = now(), version = version + 1
                              WHERE id = $1 AND ($3::bigint[] IS NULL OR version = ANY($3))
                              RETURNING {ITEM_COLUMNS}),
                  queued AS (INSERT INTO cache_outbox (item_id, version)
                             SELECT id, version FROM changed RETURNING id)
             SELECT changed.*, queued.id FROM changed, queued"
        );
        let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 3] = [
            (&id.get(), Type::INT8),
            (&name, Type::TEXT),
            (&expected, Type::INT8_ARRAY),
        ];
        if let Some(row) = conn.query_typed_opt(&sql, &params).await? {
            return Ok(UpdateOutcome::Updated(written_item(&row)?));
        }
        // Nothing matched: tell a missing row from a failed precondition.
        let current = conn
            .query_typed_opt(
                "SELECT version FROM items WHERE id = $1",
                &[(&id.get(), Type::INT8)],
            )
            .await?;
        Ok(match current {
            Some(row) => UpdateOutcome::VersionMismatch(row.try_get(0)?),
            None => UpdateOutcome::NotFound,
        })
    }

    /// Deletes an item, with its outbox row, in one statement. Returns the tombstone
    /// version (one above the last), `None` when there was no such item.
    ///
    /// # Errors
    /// When the database is unreachable or the delete fails.
    pub async fn delete(&self, id: ItemId) -> Result<Option<Written<i64>>, StoreError> {
        let conn = self.writer.get().await?;
        let row = conn
            .query_typed_opt(
                "WITH gone AS (DELETE FROM items WHERE id = $1 RETURNING id, version),
                      queued AS (INSERT INTO cache_outbox (item_id, version)
                                 SELECT id, version + 1 FROM gone RETURNING id, version)
                 SELECT queued.version, queued.id FROM queued",
                &[(&id.get(), Type::INT8)],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(Written {
            value: row.try_get(0)?,
            outbox: OutboxId(row.try_get(1)?),
        }))
    }

    /// Deletes outbox rows whose invalidation is done.
    ///
    /// # Errors
    /// When the database is unreachable.
    pub async fn outbox_done(&self, ids: &[OutboxId]) -> Result<(), StoreError> {
        let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
        let conn = self.writer.get().await?;
        conn.query_typed(
            "DELETE FROM cache_outbox WHERE id = ANY($1)",
            &[(&ids, Type::INT8_ARRAY)],
        )
        .await?;
        Ok(())
    }

    /// Claims up to `limit` outbox rows not touched for `older_than` (their writer crashed
    /// or met a Redis outage), only rows up to `up_to` when given, oldest first: claiming
    /// stamps them, so relays on other instances skip them for as long, and a relay that
    /// dies leaves them to the next.
    ///
    /// # Errors
    /// When the database is unreachable.
    pub async fn claim_outbox(
        &self,
        older_than: Duration,
        limit: i64,
        up_to: Option<OutboxId>,
    ) -> Result<Vec<Pending>, StoreError> {
        let conn = self.writer.get().await?;
        let up_to = up_to.map(|id| id.0);
        let rows = conn
            .query_typed(
                "UPDATE cache_outbox SET claimed_at = now()
                 WHERE id IN (SELECT id FROM cache_outbox
                              WHERE claimed_at < now() - make_interval(secs => $1)
                                AND ($3::bigint IS NULL OR id <= $3)
                              ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
                 RETURNING id, item_id, version",
                &[
                    (&older_than.as_secs_f64(), Type::FLOAT8),
                    (&limit, Type::INT8),
                    (&up_to, Type::INT8),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Pending {
                    outbox: OutboxId(row.try_get(0)?),
                    item_id: row.try_get(1)?,
                    version: row.try_get(2)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(StoreError::Query)
    }

    /// The newest outbox row committed now, if there is any: every invalidation pending at
    /// this moment is at or below it (ids grow with each insert).
    ///
    /// # Errors
    /// When the database is unreachable.
    pub async fn outbox_horizon(&self) -> Result<Option<OutboxId>, StoreError> {
        let conn = self.writer.get().await?;
        let row = conn
            .query_typed_one("SELECT max(id) FROM cache_outbox", &[])
            .await?;
        Ok(row.try_get::<_, Option<i64>>(0)?.map(OutboxId))
    }

    /// Whether any invalidation at or below `horizon` is still pending.
    ///
    /// # Errors
    /// When the database is unreachable.
    pub async fn outbox_pending_up_to(&self, horizon: OutboxId) -> Result<bool, StoreError> {
        let conn = self.writer.get().await?;
        let row = conn
            .query_typed_one(
                "SELECT EXISTS (SELECT 1 FROM cache_outbox WHERE id <= $1)",
                &[(&horizon.0, Type::INT8)],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Connection counts of the writer and, when configured, the reader pool.
    pub fn pool_states(&self) -> (PoolState, Option<PoolState>) {
        let state = |pool: &Pool| {
            let s = pool.state();
            PoolState {
                connections: s.connections,
                idle: s.idle_connections,
            }
        };
        (
            state(&self.writer),
            self.reader.as_ref().map(|r| state(r.pool())),
        )
    }

    /// The reader's health and counts, when there is a reader.
    pub fn reader_stats(&self) -> Option<ReaderStats> {
        self.reader.as_ref().map(Reader::stats)
    }

    /// One round of the reader monitor (see the `replica` module); call it every
    /// [`PROBE_INTERVAL`] with the same `probe`. Does nothing without a reader.
    pub async fn probe_reader(&self, probe: &mut ReaderProbe) {
        if let Some(reader) = &self.reader {
            reader.probe(&self.writer, probe).await;
        }
    }
}

fn build_pool(
    settings: &DatabaseSettings,
    url: &str,
    setting: &'static str,
) -> Result<Pool, InvalidUrl> {
    let invalid = |reason: &str| InvalidUrl {
        setting,
        reason: reason.to_owned(),
    };
    let (mode, url) = SslMode::split_url(url).ok_or_else(|| {
        invalid("sslmode must be disable, prefer, require, verify-ca or verify-full")
    })?;
    let mut config = tokio_postgres::Config::from_str(&url)
        .map_err(|_| invalid("not a valid PostgreSQL connection URL"))?;
    let ca_file = settings.ca_file.as_deref();
    let verify = match mode {
        SslMode::Disable | SslMode::Prefer => Verify::Nothing,
        SslMode::Require if ca_file.is_none() => Verify::Nothing,
        SslMode::Require | SslMode::VerifyCa => Verify::Chain,
        SslMode::VerifyFull => Verify::ChainAndName,
    };
    let tls = crate::tls::client_config(ca_file, verify).map_err(|reason| InvalidUrl {
        setting: "database.ca_file",
        reason,
    })?;
    config.connect_timeout(settings.connect_timeout);
    config.application_name("tiergate");
    // A runaway query must not hold a pooled connection for ever.
    config.options(format!(
        "-c statement_timeout={}",
        settings.statement_timeout.as_millis()
    ));
    let manager = Manager(PostgresConnectionManager::new(
        config,
        MakeRustlsConnect::new(tls),
    ));
    Ok(bb8::Pool::builder()
        .max_size(settings.pool_max_size)
        .connection_timeout(settings.checkout_timeout)
        // The check is `Manager::is_valid`: no round trip.
        .test_on_check_out(true)
        .error_sink(Box::new(LogErrors))
        .build_unchecked(manager))
}

/// bb8's sink for errors of background connection attempts: log them, they never
/// reach a request.
#[derive(Debug, Clone, Copy)]
struct LogErrors;

impl bb8::ErrorSink<tokio_postgres::Error> for LogErrors {
    fn sink(&self, error: tokio_postgres::Error) {
        tracing::warn!(%error, "PostgreSQL connection failed.");
    }

    fn boxed_clone(&self) -> Box<dyn bb8::ErrorSink<tokio_postgres::Error>> {
        Box::new(*self)
    }
}

/// A row of `ITEM_COLUMNS` followed by the outbox id.
fn written_item(row: &Row) -> Result<Written<Item>, StoreError> {
    let outbox = row.try_get(5).map_err(StoreError::Query)?;
    Ok(Written {
        value: item_from_row(row)?,
        outbox: OutboxId(outbox),
    })
}

/// A row of `ITEM_COLUMNS`. A column of the wrong type is a schema bug, not an outage.
fn item_from_row(row: &Row) -> Result<Item, StoreError> {
    let item = || -> Result<Item, tokio_postgres::Error> {
        Ok(Item {
            id: row.try_get(0)?,
            name: row.try_get(1)?,
            created_at: row.try_get(2)?,
            updated_at: row.try_get(3)?,
            version: row.try_get(4)?,
        })
    };
    item().map_err(StoreError::Query)
}
