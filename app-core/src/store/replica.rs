//! The reader endpoint (a streaming replica): when it may answer, and the proof that its
//! answer is as new as the writer's would have been.
//!
//! # Why an answer needs a proof
//!
//! Redis may evict a writer's fence. A task that never saw the write (it started later,
//! or lost the invalidation) then misses L2, takes a lease on the missing key, and reads
//! a replica that has not replayed the write yet: without a proof it would fill Redis
//! with the old row under its lease, and every task would serve it until the L2 TTL ran
//! out. Neither Redis nor the task can tell; only the database can.
//!
//! So a reader's answer counts only when the reader shows it had replayed everything the
//! writer had committed when the read began:
//!
//! 1. after the lease is taken, the writer's WAL insert position is read
//!    ([`Reader::writer_position`]). Every commit acknowledged before that moment ends at
//!    or below it;
//! 2. on one reader connection, `pg_last_wal_replay_lsn()` runs first, then the item's
//!    query, as two statements (pipelined: one round trip). The item query's snapshot
//!    is taken after the replay position was read, and a standby makes a commit visible
//!    before it moves that position past the commit's record, so the row holds every
//!    commit below that position;
//! 3. the answer counts if that position is at least the writer's. Otherwise the reader
//!    gets until `database.reader_max_lag` after the read began to catch up (polled),
//!    then the writer answers.
//!
//! A counted answer holds every version committed before the read began, exactly like
//! the writer's; a fill from it is as safe as one from the writer, and the lease and the
//! fence then guard against what is committed after (see `cache::l2`). "No such id" goes
//! through the same check, so a replica that has not replayed an insert cannot make an
//! absence look final.
//!
//! When the writer cannot be asked (it is down, a failover is under way) the reader's
//! answer is served *unverified*: the caller keeps it briefly in L1 and never in Redis.
//!
//! # Cost
//!
//! One writer query per miss, shared: at most one is in flight, and every miss that began
//! before it was sent uses its answer. And the wait for the replica, about its lag, when
//! writes are under way.
//!
//! # Health
//!
//! A monitor ([`Reader::probe`], every [`PROBE_INTERVAL`], on a connection of its own)
//! measures the lag as how long ago the writer was first seen past the replica's replay
//! position, and exports it. While the lag exceeds `database.reader_max_lag`, or the
//! reader is down, or it cannot report a replay position (a server that is not a
//! standby: Aurora's shared-storage replicas are reported to refuse these functions),
//! reads go to the writer, counted by reason. A failed reader read goes to the writer at
//! once and marks the reader down; the monitor brings it back when it answers again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::types::{PgLsn, Type};

use super::{ITEM_COLUMNS, Pool, StoreError, item_from_row, retry_read};
use crate::model::{Item, ItemId};

/// How often the monitor measures the reader's lag.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long the monitor waits for the reader to answer before calling it down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest pause between two checks of a reader that is catching up.
const MAX_POLL: Duration = Duration::from_millis(16);
/// Writer positions the monitor remembers: at [`PROBE_INTERVAL`], about 17 minutes, so
/// a lag up to that long is measured exactly and a longer one as at least that.
const HISTORY: usize = 4096;

const REPLAYED_SQL: &str = "SELECT pg_last_wal_replay_lsn()";
/// The writer's insert position, with what is needed to see whether it stands just past
/// a page header (see [`end_of_inserted_wal`]).
const INSERTED_SQL: &str = "SELECT lsn, (pg_walfile_name_offset(lsn)).file_offset::int8, \
     current_setting('wal_block_size')::int8 FROM pg_current_wal_insert_lsn() AS lsn";

/// Why a read went to the writer instead of the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// The measured lag was above `database.reader_max_lag`.
    Lagging,
    /// The reader did not answer (refused, unreachable, or failed the read).
    Down,
    /// The reader answered but did not catch up with the writer within
    /// `database.reader_max_lag`.
    Behind,
    /// The reader reports no replay position, so none of its answers can be proven.
    NoPosition,
}

impl Moved {
    const ALL: [Self; 4] = [Self::Lagging, Self::Down, Self::Behind, Self::NoPosition];

    /// The `reason` label of the moved-reads counter.
    pub fn label(self) -> &'static str {
        match self {
            Self::Lagging => "lagging",
            Self::Down => "down",
            Self::Behind => "behind",
            Self::NoPosition => "no_position",
        }
    }
}

/// What the monitor and the reads found out about the reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    Up = 0,
    Down = 1,
    NoPosition = 2,
}

impl Status {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => Self::Up,
            2 => Self::NoPosition,
            _ => Self::Down,
        }
    }
}

/// The reader's health and counts, for the metrics and for tests.
#[derive(Debug, Clone, Copy)]
pub struct ReaderStats {
    /// The reader answered its last probe or read.
    pub up: bool,
    /// The last measured lag.
    pub lag: Duration,
    /// Item reads the reader answered (proven current).
    pub answered: u64,
    /// Reads sent to the writer instead, by reason (in [`Moved`] order).
    pub moved: [(Moved, u64); 4],
}

impl ReaderStats {
    /// Reads moved to the writer for `reason`.
    pub fn moved(&self, reason: Moved) -> u64 {
        self.moved
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

/// A writer WAL position and when the query that read it was sent.
#[derive(Debug, Clone, Copy)]
struct Position {
    lsn: u64,
    sent: Instant,
}

/// Why the writer gave no position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoWriterPosition {
    /// It could not be reached (or its pool had no connection in time).
    Unavailable,
    /// It refused the query: it keeps no WAL position we can compare (not PostgreSQL's
    /// own replication, as on Aurora), so no reader answer can ever be proven.
    Unsupported,
}

/// The last attempt to read the writer's position: when it was sent, and its outcome.
type Attempt = (Instant, Result<u64, NoWriterPosition>);

/// The reader pool and what is known of the replica behind it. Cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Reader {
    pool: Pool,
    max_lag: Duration,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    status: AtomicU8,
    lag_micros: AtomicU64,
    answered: AtomicU64,
    moved: [AtomicU64; 4],
    /// The last attempt to read the writer's position; held while the next one runs, so
    /// concurrent misses share one query (see [`Reader::writer_position`]).
    writer_position: tokio::sync::Mutex<Option<Attempt>>,
}

/// Where an item read goes after the reader had its say.
#[derive(Debug)]
pub(super) enum Answer {
    /// The reader proved its answer current.
    Current(Option<Item>),
    /// The reader answered, but the writer could not be asked for its position.
    Unverified(Option<Item>),
    /// The writer must answer.
    Writer,
}

/// Why one attempt at the reader failed.
enum Failure {
    Down,
    Behind,
    NoPosition,
}

impl Reader {
    pub(super) fn new(pool: Pool, max_lag: Duration) -> Self {
        Self {
            pool,
            max_lag,
            shared: Arc::new(Shared {
                status: AtomicU8::new(Status::Up as u8),
                lag_micros: AtomicU64::new(0),
                answered: AtomicU64::new(0),
                moved: Default::default(),
                writer_position: tokio::sync::Mutex::new(None),
            }),
        }
    }

    pub(super) fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Reads one item from the reader if it can prove the answer current (see the module
    /// docs); otherwise says the writer must answer.
    ///
    /// # Errors
    /// The writer could not be asked for its position and the reader failed too.
    pub(super) async fn get(&self, writer: &Pool, id: ItemId) -> Result<Answer, StoreError> {
        if let Some(reason) = self.avoided() {
            self.count_moved(reason);
            return Ok(Answer::Writer);
        }
        let began = Instant::now();
        let writer_at = match self.writer_position(writer, began).await {
            Ok(position) => position.lsn,
            Err(NoWriterPosition::Unavailable) => return self.get_unverified(id).await,
            Err(NoWriterPosition::Unsupported) => {
                self.set_status(Status::NoPosition);
                self.count_moved(Moved::NoPosition);
                return Ok(Answer::Writer);
            }
        };
        // The wait is counted from here: a slow writer must not eat the reader's time.
        match self
            .get_caught_up(id, writer_at, Instant::now() + self.max_lag)
            .await
        {
            Ok(item) => {
                self.shared.answered.fetch_add(1, Ordering::Relaxed);
                Ok(Answer::Current(item))
            }
            Err(failure) => {
                let reason = match failure {
                    Failure::Down => {
                        self.set_status(Status::Down);
                        Moved::Down
                    }
                    Failure::NoPosition => {
                        self.set_status(Status::NoPosition);
                        Moved::NoPosition
                    }
                    Failure::Behind => Moved::Behind,
                };
                self.count_moved(reason);
                Ok(Answer::Writer)
            }
        }
    }

    /// The reader's answer when the writer cannot tell its position: served, but not
    /// proven (the caller does not put it in Redis).
    async fn get_unverified(&self, id: ItemId) -> Result<Answer, StoreError> {
        match tokio::time::timeout(self.max_lag, self.get_row(id)).await {
            Ok(Ok(item)) => Ok(Answer::Unverified(item)),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(StoreError::Unavailable(None)),
        }
    }

    async fn get_row(&self, id: ItemId) -> Result<Option<Item>, StoreError> {
        let sql = format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = $1");
        let conn = self.pool.get().await?;
        let row = conn
            .query_typed_opt(&sql, &[(&id.get(), Type::INT8)])
            .await?;
        row.as_ref().map(item_from_row).transpose()
    }

    /// Reads the item from the reader once the reader has replayed up to `writer_at`,
    /// polling until `deadline`.
    async fn get_caught_up(
        &self,
        id: ItemId,
        writer_at: u64,
        deadline: Instant,
    ) -> Result<Option<Item>, Failure> {
        let mut answered = false;
        let polled = tokio::time::timeout_at(
            deadline.into(),
            self.poll_caught_up(id, writer_at, &mut answered),
        )
        .await;
        match polled {
            Ok(result) => result,
            // Timed out: still catching up, or never answered at all.
            Err(_) if answered => Err(Failure::Behind),
            Err(_) => Err(Failure::Down),
        }
    }

    async fn poll_caught_up(
        &self,
        id: ItemId,
        writer_at: u64,
        answered: &mut bool,
    ) -> Result<Option<Item>, Failure> {
        let sql = format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = $1");
        let mut pause = Duration::from_millis(1);
        let mut attempt = 0;
        loop {
            let conn = self.pool.get().await.map_err(|_| Failure::Down)?;
            let params: [(&(dyn tokio_postgres::types::ToSql + Sync), Type); 1] =
                [(&id.get(), Type::INT8)];
            // Biased: the replay position is sent, and so runs, before the item query,
            // whose snapshot must not be older than that position.
            let (replayed, row) = tokio::join!(
                biased;
                conn.query_typed_one(REPLAYED_SQL, &[]),
                conn.query_typed_opt(&sql, &params),
            );
            let (replayed, row) = match (replayed, row) {
                (Ok(replayed), Ok(row)) => (replayed, row),
                (Err(error), _) | (_, Err(error)) => {
                    if retry_read(&self.pool, &error, attempt) {
                        attempt += 1;
                        continue;
                    }
                    return Err(failure_of(&error));
                }
            };
            *answered = true;
            let replayed: Option<PgLsn> = replayed.try_get(0).map_err(|_| Failure::NoPosition)?;
            let Some(replayed) = replayed else {
                return Err(Failure::NoPosition);
            };
            if u64::from(replayed) >= writer_at {
                return row
                    .as_ref()
                    .map(item_from_row)
                    .transpose()
                    .map_err(|_| Failure::Down);
            }
            drop(conn);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// Whether a list page may come from the reader now (no proof: pages live only in
    /// this task's L1, under its list generation); counts the read as moved when not.
    pub(super) fn may_list(&self) -> bool {
        match self.avoided() {
            Some(reason) => {
                self.count_moved(reason);
                false
            }
            None => true,
        }
    }

    /// A list read on the reader failed: the writer answers it, and the reader is down
    /// until the monitor hears from it.
    pub(super) fn list_failed(&self) {
        self.set_status(Status::Down);
        self.count_moved(Moved::Down);
    }

    /// The most a list read on the reader may take before the writer answers instead.
    pub(super) fn max_lag(&self) -> Duration {
        self.max_lag
    }

    /// The writer's WAL position, read by a query sent no earlier than `asked`. One
    /// query at a time: a caller waits for the one in flight, and if that one was sent
    /// after it asked, uses its outcome (a failure too, so callers do not queue up for a
    /// writer that is down); so however many misses run at once, the writer sees about
    /// one such query per round trip.
    async fn writer_position(
        &self,
        writer: &Pool,
        asked: Instant,
    ) -> Result<Position, NoWriterPosition> {
        let mut last = self.shared.writer_position.lock().await;
        if let Some((sent, outcome)) = *last {
            if sent >= asked {
                return outcome.map(|lsn| Position { lsn, sent });
            }
        }
        let sent = Instant::now();
        let outcome = match read_writer_position(writer).await {
            Ok(lsn) => Ok(lsn),
            Err(StoreError::Unavailable(_)) => Err(NoWriterPosition::Unavailable),
            Err(StoreError::Query(error)) => {
                tracing::debug!(%error, "The writer gives no WAL position.");
                Err(NoWriterPosition::Unsupported)
            }
        };
        *last = Some((sent, outcome));
        outcome.map(|lsn| Position { lsn, sent })
    }

    /// One round of the monitor: the writer's position, then the reader's replay
    /// position on the probe's own connection, and from both the lag.
    pub(super) async fn probe(&self, writer: &Pool, probe: &mut ReaderProbe) {
        match self.writer_position(writer, Instant::now()).await {
            Ok(position) => probe.remember(position),
            // The lag is measured again once the writer answers.
            Err(NoWriterPosition::Unavailable) => {}
            Err(NoWriterPosition::Unsupported) => {
                self.set_status(Status::NoPosition);
                return;
            }
        }
        let status = match tokio::time::timeout(PROBE_TIMEOUT, probe.replayed(&self.pool)).await {
            Ok(Ok(Some(replayed))) => {
                let lag = probe.lag(replayed, Instant::now());
                let micros = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
                let before = self.shared.lag_micros.swap(micros, Ordering::AcqRel);
                let limit = u64::try_from(self.max_lag.as_micros()).unwrap_or(u64::MAX);
                if (before > limit) != (micros > limit) {
                    if micros > limit {
                        tracing::warn!(
                            lag_ms = lag.as_millis(),
                            "Reader lags beyond database.reader_max_lag: reads go to the writer."
                        );
                    } else {
                        tracing::info!(
                            lag_ms = lag.as_millis(),
                            "Reader caught up: reads go to it again."
                        );
                    }
                }
                Status::Up
            }
            Ok(Ok(None)) => Status::NoPosition,
            Ok(Err(error)) => {
                tracing::debug!(%error, "Reader lag probe failed.");
                probe.conn = None;
                Status::Down
            }
            Err(_) => {
                probe.conn = None;
                Status::Down
            }
        };
        self.set_status(status);
    }

    /// The reader's health and counts.
    pub(super) fn stats(&self) -> ReaderStats {
        let shared = &self.shared;
        ReaderStats {
            up: self.status() == Status::Up,
            lag: Duration::from_micros(shared.lag_micros.load(Ordering::Acquire)),
            answered: shared.answered.load(Ordering::Relaxed),
            moved: Moved::ALL.map(|reason| {
                (
                    reason,
                    shared.moved[reason as usize].load(Ordering::Relaxed),
                )
            }),
        }
    }

    /// Why reads must skip the reader now, if they must.
    fn avoided(&self) -> Option<Moved> {
        match self.status() {
            Status::Down => Some(Moved::Down),
            Status::NoPosition => Some(Moved::NoPosition),
            Status::Up => {
                let lag = Duration::from_micros(self.shared.lag_micros.load(Ordering::Acquire));
                (lag > self.max_lag).then_some(Moved::Lagging)
            }
        }
    }

    fn status(&self) -> Status {
        Status::from_u8(self.shared.status.load(Ordering::Acquire))
    }

    fn set_status(&self, status: Status) {
        let before = Status::from_u8(self.shared.status.swap(status as u8, Ordering::AcqRel));
        if before != status {
            match status {
                Status::Up => tracing::info!("Reader answers again: reads go to it."),
                Status::Down => {
                    tracing::warn!("Reader down: reads go to the writer until it answers.")
                }
                Status::NoPosition => tracing::warn!(
                    "Reader reports no replay position: its answers cannot be proven current, reads go to the writer."
                ),
            }
        }
    }

    fn count_moved(&self, reason: Moved) {
        self.shared.moved[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The writer's WAL insert position, as [`end_of_inserted_wal`] reads it.
async fn read_writer_position(writer: &Pool) -> Result<u64, StoreError> {
    let conn = writer.get().await?;
    let row = conn.query_typed_one(INSERTED_SQL, &[]).await?;
    let lsn: PgLsn = row.try_get(0).map_err(StoreError::Query)?;
    let segment_offset: i64 = row.try_get(1).map_err(StoreError::Query)?;
    let block_size: i64 = row.try_get(2).map_err(StoreError::Query)?;
    Ok(end_of_inserted_wal(
        u64::from(lsn),
        u64::try_from(segment_offset).unwrap_or(0),
        u64::try_from(block_size).unwrap_or(0),
    ))
}

/// The end of the WAL the writer has inserted, as a replay position would show it.
/// `pg_current_wal_insert_lsn()` points past the page header when the insert position is
/// at the start of a page (24 bytes) or of a segment (40), where no replay position can
/// ever be (it stops at the end of the last record, before the header): without this, an
/// idle writer could stand there and no reader would ever catch up.
fn end_of_inserted_wal(lsn: u64, segment_offset: u64, block_size: u64) -> u64 {
    const SHORT_HEADER: u64 = 24;
    const LONG_HEADER: u64 = 40;
    if segment_offset == LONG_HEADER {
        lsn - LONG_HEADER
    } else if block_size > 0 && lsn % block_size == SHORT_HEADER {
        lsn - SHORT_HEADER
    } else {
        lsn
    }
}

/// How a reader error is judged: a server that lacks the replay-position function (or
/// refuses it) can never prove an answer; anything else is the reader failing.
fn failure_of(error: &tokio_postgres::Error) -> Failure {
    match error.code() {
        Some(code)
            if *code == SqlState::FEATURE_NOT_SUPPORTED
                || *code == SqlState::UNDEFINED_FUNCTION =>
        {
            Failure::NoPosition
        }
        _ => Failure::Down,
    }
}

/// The monitor's state between rounds: a connection to the reader of its own (so a busy
/// pool does not read as a lagging reader), and recent writer positions.
#[derive(Debug, Default)]
pub struct ReaderProbe {
    conn: Option<tokio_postgres::Client>,
    /// Writer positions by time, oldest first.
    history: VecDeque<Position>,
}

impl ReaderProbe {
    async fn replayed(&mut self, pool: &Pool) -> Result<Option<u64>, tokio_postgres::Error> {
        let conn = match self.conn.take() {
            Some(conn) if !conn.is_closed() => conn,
            _ => pool.dedicated_connection().await?,
        };
        let row = conn.query_typed_one(REPLAYED_SQL, &[]).await?;
        let replayed: Option<PgLsn> = row.try_get(0)?;
        self.conn = Some(conn);
        Ok(replayed.map(u64::from))
    }

    fn remember(&mut self, position: Position) {
        if self
            .history
            .back()
            .is_some_and(|last| last.sent >= position.sent)
        {
            return;
        }
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(position);
    }

    /// How long the replica has been behind: since the first remembered moment the
    /// writer was past `replayed`. Positions it no longer needs are forgotten.
    fn lag(&mut self, replayed: u64, now: Instant) -> Duration {
        while self.history.len() > 1 && self.history[1].lsn <= replayed {
            self.history.pop_front();
        }
        self.history
            .iter()
            .find(|position| position.lsn > replayed)
            .map_or(Duration::ZERO, |position| {
                now.saturating_duration_since(position.sent)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_insert_position_after_a_page_header_counts_as_the_page_start() {
        let page = 8192;
        let segment = 16 << 20;
        assert_eq!(
            end_of_inserted_wal(3 * page + 24, 3 * page + 24, page),
            3 * page
        );
        assert_eq!(end_of_inserted_wal(segment + 40, 40, page), segment);
        assert_eq!(
            end_of_inserted_wal(3 * page + 48, 3 * page + 48, page),
            3 * page + 48
        );
        // 40 bytes into a page that does not start a segment is after a record's tail.
        assert_eq!(
            end_of_inserted_wal(3 * page + 40, 3 * page + 40, page),
            3 * page + 40
        );
    }

    #[test]
    fn the_lag_runs_from_the_first_time_the_writer_was_seen_past_the_replica() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let probe = || {
            let mut probe = ReaderProbe::default();
            for (ms, lsn) in [(0, 100), (250, 100), (500, 200), (750, 300)] {
                probe.remember(Position { lsn, sent: at(ms) });
            }
            probe
        };
        assert_eq!(probe().lag(300, at(1000)), Duration::ZERO, "caught up");
        assert_eq!(probe().lag(100, at(1000)), Duration::from_millis(500));
        let mut behind = probe();
        assert_eq!(behind.lag(250, at(1000)), Duration::from_millis(250));
        assert_eq!(
            behind.history.len(),
            2,
            "positions the replica has passed are forgotten"
        );
    }
}
