//! Pooled PostgreSQL connections through a failover: which errors mean "the database is
//! away, try again shortly", the connection that remembers it broke so the pool drops
//! it, and the one retry a read gets.
//!
//! An RDS or Aurora failover (or a `pg_terminate_backend`) ends every connection: a query
//! in flight gets SQLSTATE 57P01 `admin_shutdown` with severity FATAL and the server
//! closes the socket; idle connections are simply closed. The writer that comes back may
//! be a demoted one for a moment (25006 `read_only_sql_transaction`), or refuse
//! connections (57P03, 53300). None of that is a bug to answer 500 for: it is
//! [`Failure::Unavailable`], answered 503 with `Retry-After`.
//!
//! Reads are retried once on another connection: a read has no effect, so running it
//! twice is harmless, and after a failover the next connection usually works. Writes are
//! never retried here: a write whose connection broke may have committed, and running it
//! again could apply it twice (a second insert, a second version bump).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row};
use tokio_postgres_rustls::MakeRustlsConnect;

/// What an error from PostgreSQL or its connection means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection is gone (closed, reset, or ended by the server with FATAL): it must
    /// not be used again. The database may be failing over.
    Broken,
    /// The server refused for a passing reason (failover in progress, too many
    /// connections, a demoted writer, a statement timeout) and the connection is fine.
    Unavailable,
    /// The query itself failed (a constraint, a type, a bug): retrying will not help.
    Query,
}

impl Failure {
    /// Classifies `error` by SQLSTATE class and severity.
    pub(crate) fn of(error: &tokio_postgres::Error) -> Self {
        if error.is_closed() {
            return Self::Broken;
        }
        let Some(db) = error.as_db_error() else {
            // No server error: the socket failed (I/O, TLS), or the client did (a
            // parameter or row it could not convert). Only the former has an I/O cause.
            return if has_io_cause(error) {
                Self::Broken
            } else {
                Self::Query
            };
        };
        // FATAL and PANIC end the session: the server closes the connection after them.
        if matches!(db.severity(), "FATAL" | "PANIC") {
            return Self::Broken;
        }
        let code = db.code().code();
        match code.get(..2) {
            // 08: connection exception; 57: operator intervention (admin or crash
            // shutdown, cannot connect now, statement timeout); 53: insufficient resources
            // (too many connections); 58: system error (I/O on the server).
            Some("08" | "57" | "53" | "58") => Self::Unavailable,
            // 25006: a writer demoted to a replica by a failover refuses writes;
            // 40001/40P01: serialization failure, deadlock — the transaction was rolled
            // back and may simply be sent again.
            _ if matches!(code, "25006" | "40001" | "40P01") => Self::Unavailable,
            _ => Self::Query,
        }
    }
}

/// Whether a read that failed with `error` may be sent again on another connection: when
/// the connection broke or the server failed over (classes 08 and 57), but not after a
/// statement timeout (57014): the retry would double a slow query's load.
fn retries_a_read(error: &tokio_postgres::Error) -> bool {
    match Failure::of(error) {
        Failure::Broken => true,
        Failure::Unavailable => error.code().is_some_and(|code| {
            *code != SqlState::QUERY_CANCELED && matches!(code.code().get(..2), Some("08" | "57"))
        }),
        Failure::Query => false,
    }
}

fn has_io_cause(error: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// A client that remembers whether one of its queries found it broken, so the pool
/// drops it instead of handing it to the next request. (`Client::is_closed` says the same
/// a moment later, once the connection task has seen the socket close; the pool decides
/// when the connection is returned, which can be before.)
#[derive(Debug)]
pub(crate) struct PgConnection {
    client: Client,
    broken: AtomicBool,
}

type Params<'a> = [(&'a (dyn ToSql + Sync), Type)];

impl PgConnection {
    /// The rows of `sql` (see [`Client::query_typed`]).
    pub(crate) async fn query_typed(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        self.noting_breakage(self.client.query_typed(sql, params).await)
    }

    /// The row of `sql`, if any (see [`Client::query_typed_opt`]).
    pub(crate) async fn query_typed_opt(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        self.noting_breakage(self.client.query_typed_opt(sql, params).await)
    }

    /// The one row of `sql` (see [`Client::query_typed_one`]).
    pub(crate) async fn query_typed_one(
        &self,
        sql: &str,
        params: &Params<'_>,
    ) -> Result<Row, tokio_postgres::Error> {
        self.noting_breakage(self.client.query_typed_one(sql, params).await)
    }

    fn noting_breakage<T>(
        &self,
        result: Result<T, tokio_postgres::Error>,
    ) -> Result<T, tokio_postgres::Error> {
        if let Err(error) = &result {
            if Failure::of(error) == Failure::Broken {
                self.broken.store(true, Ordering::Relaxed);
            }
        }
        result
    }

    fn is_broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed) || self.client.is_closed()
    }
}

/// For the queries that need the client itself (transactions, in migrations).
impl Deref for PgConnection {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl DerefMut for PgConnection {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// The pool of [`PgConnection`]s.
pub(crate) type Pool = bb8::Pool<Manager>;

/// bb8-postgres' manager with a check-out test that costs nothing: its own runs a query
/// before every checkout (a round trip per request); without any test, a connection the
/// server closed while it sat idle is handed out and fails its first query.
#[derive(Debug)]
pub(crate) struct Manager(pub(crate) PostgresConnectionManager<MakeRustlsConnect>);

impl bb8::ManageConnection for Manager {
    type Connection = PgConnection;
    type Error = tokio_postgres::Error;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        Ok(PgConnection {
            client: self.0.connect().await?,
            broken: AtomicBool::new(false),
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        if conn.is_broken() {
            // Fails at once with the "connection closed" error, without touching the
            // network (or, if only our mark says broken, costs the one round trip that
            // proves it).
            conn.client.simple_query("").await.map(drop)
        } else {
            Ok(())
        }
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.is_broken()
    }
}

/// The attempts of one read: whether the failure of one goes on to another connection.
///
/// A connection that turns out broken (closed, or ended by the server: a failover sends
/// FATAL 57P01 to every session at once, and a pooled connection may hold it unread) is
/// not counted as a try: the read goes on to the next, up to one per connection the pool
/// may hold plus a fresh one, so that after a failover it ends on a new connection rather
/// than on a 503. A read refused for a failover in progress without losing its connection
/// (classes 08 and 57) is sent once more. Each broken connection leaves the pool when it
/// is dropped (see [`PgConnection`]).
#[derive(Debug, Default)]
pub(crate) struct ReadAttempts {
    broken_skipped: u32,
    retried: bool,
}

impl ReadAttempts {
    /// Whether the read that failed with `error` on a connection from `pool` goes on.
    pub(crate) fn again(&mut self, pool: &Pool, error: &tokio_postgres::Error) -> bool {
        if Failure::of(error) == Failure::Broken && self.broken_skipped <= pool.config().max_size {
            self.broken_skipped += 1;
            tracing::debug!(%error, "Read met a broken connection; trying another.");
            true
        } else if !self.retried && retries_a_read(error) {
            self.retried = true;
            tracing::debug!(%error, "Read refused by a failover; retrying once.");
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Database;
    use tiergate_config::{DatabaseSettings, Secret};

    async fn connection_pool() -> Pool {
        let settings = DatabaseSettings {
            url: Secret::new(crate::testing::admin_database_url()),
            pool_max_size: 1,
            ..DatabaseSettings::default()
        };
        Database::new(&settings).expect("a valid URL").writer
    }

    /// Errors are told apart by who can act on them, on a real server.
    #[tokio::test]
    async fn errors_are_classified_by_what_the_caller_can_do() {
        let pool = connection_pool().await;
        let conn = pool.get().await.expect("a connection");
        let division = conn.query_typed("SELECT 1 / 0", &[]).await;
        assert_eq!(Failure::of(&division.unwrap_err()), Failure::Query);
        conn.batch_execute("SET statement_timeout = 1")
            .await
            .unwrap();
        let timeout = conn.query_typed("SELECT pg_sleep(1)", &[]).await;
        assert_eq!(Failure::of(&timeout.unwrap_err()), Failure::Unavailable);
        assert!(!conn.is_broken(), "a timeout leaves the connection usable");
    }

    /// A query whose session the server ends (FATAL 57P01, as a failover does) marks its
    /// connection broken at once, before the connection task may have seen the socket
    /// close — so the pool drops it when it is returned. Checked: with the mark removed
    /// from `noting_breakage`, `broken` stays false.
    #[tokio::test]
    async fn a_session_ended_by_the_server_marks_its_connection_broken_at_once() {
        let pool = connection_pool().await;
        let conn = pool.get().await.expect("a connection");
        let ended = conn
            .query_typed(
                "SELECT pg_terminate_backend(pg_backend_pid()), pg_sleep(5)",
                &[],
            )
            .await;
        assert_eq!(Failure::of(&ended.unwrap_err()), Failure::Broken);
        assert!(conn.broken.load(Ordering::Relaxed));
        drop(conn);
        assert_eq!(pool.state().connections, 0, "the pool dropped it");
    }
}
