//! The outbox relay: it repeats steps 3 and 4 of the write order (fence, publish) for
//! writes whose writer could not, and after a Redis outage it is what makes L2
//! trustworthy again. Every instance runs one pass a second.
//!
//! # A normal pass
//!
//! Rows older than the grace (`older_than`; a writer completes its own in milliseconds)
//! were left behind: their writer crashed (R6), or met Redis failing. The pass claims them
//! in batches of a thousand and, per item, takes the newest version among them: it drops
//! the L1 copy here, fences a tombstone at that version into L2, publishes the
//! invalidation, and deletes the rows. Fences and publishes of a batch are each sent
//! together (see [`L2::fence_tombstones`](crate::cache::l2::L2::fence_tombstones)), so a
//! batch costs a few round trips rather than two per row: a backlog of ten thousand rows
//! is repaired in about a second, where one round trip per row took minutes.
//!
//! # Recovery: trusting L2 again
//!
//! While L2 is untrusted (a fence failed here, or the invalidation channel was lost),
//! reads skip it. A pass in that state is a *recovery*:
//!
//! 1. it pings Redis past the breaker, and stops there if Redis does not answer;
//! 2. it reads the distrust epoch `e`;
//! 3. it reads the *horizon* `h`: the newest outbox row committed now;
//! 4. it relays every row up to `h` (young ones too, after a short grace), until none is
//!    left up to `h`;
//! 5. it trusts L2 again, unless a distrust came after step 2 (the epoch moved).
//!
//! Why that is safe: L2 can be older than PostgreSQL for a key only through a write whose
//! fence did not land (a reader's fill cannot: the fence, the lease and the version
//! comparison refuse anything older than what L2 holds or what a writer fenced). Take
//! such a write `W`, committed at version `v`, its outbox row kept (a writer deletes its
//! row only after its fence and publish succeeded). Either
//!
//! - its fence failed on *this* instance after step 2: that failure moved the epoch, and
//!   step 5 does not trust; or
//! - its fence failed (here or elsewhere) before step 2, or its writer died: `W` committed
//!   before that, so before step 3 read the horizon, so its row is at or below `h` and
//!   step 4 fenced a tombstone at `v` (or a newer version) before step 5.
//!
//! What is left is a peer's fence failing *after* this recovery began — a Redis that
//! fails for one instance and not another. That is the case of any trusted instance at
//! any time, and is bounded as it always was: the failing peer distrusts its own L2 at
//! once, and any relay repairs the row after the grace. The recovery adds no interleaving
//! to the fill races (R1–R13): it only writes through the same fence, in the same order
//! (fence, then publish, then delete the row), and the watermark raised here first keeps
//! this instance from serving anything older meanwhile. Waiting for an *empty* outbox, as
//! before, asked for more than this and under a steady write load was never met: some
//! write is always between its commit and its fence.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Items, ServiceError};
use crate::cache::l2::{Invalidation, unix_micros};
use crate::hooks::Point;
use crate::store::{OutboxId, Pending};

/// Outbox rows one batch handles.
const BATCH: i64 = 1_000;
/// In a recovery, rows younger than this are left to their writers for the moment (a
/// writer at work completes its own in milliseconds; one that failed left it for good).
const RECOVERY_CLAIM_GRACE: Duration = Duration::from_millis(500);
/// How often a recovery looks again for rows it waits on (too young to claim yet, or held
/// by another instance's relay).
const RECOVERY_POLL: Duration = Duration::from_millis(100);
/// How long one recovery pass works before leaving the rest to the next pass.
const RECOVERY_LIMIT: Duration = Duration::from_secs(5);

/// One pass (see the module docs); returns how many rows it completed.
pub(super) async fn pass(items: &Items, older_than: Duration) -> Result<usize, ServiceError> {
    if items.l2.is_trusted() {
        Ok(repair(items, older_than, None).await?.rows)
    } else {
        recover(items, older_than).await
    }
}

/// What [`repair`] did.
struct Repaired {
    rows: usize,
    /// Whether Redis took every fence and publish (else the rest waits for the next pass).
    redis_answered: bool,
}

/// Relays claimed batches (rows untouched for `older_than`, up to `up_to`) until one
/// comes back short or Redis fails.
async fn repair(
    items: &Items,
    older_than: Duration,
    up_to: Option<OutboxId>,
) -> Result<Repaired, ServiceError> {
    let mut rows = 0;
    loop {
        let batch = items.db.claim_outbox(older_than, BATCH, up_to).await?;
        if !relay(items, &batch).await? {
            return Ok(Repaired {
                rows,
                redis_answered: false,
            });
        }
        rows += batch.len();
        if batch.len() < BATCH as usize {
            return Ok(Repaired {
                rows,
                redis_answered: true,
            });
        }
    }
}

/// Steps 1–5 of the recovery (see the module docs).
async fn recover(items: &Items, older_than: Duration) -> Result<usize, ServiceError> {
    if !items.l2.probe().await {
        return Ok(0);
    }
    let epoch = items.l2.distrust_epoch();
    let horizon = items.db.outbox_horizon().await?;
    let mut rows = 0;
    if let Some(horizon) = horizon {
        let grace = older_than.min(RECOVERY_CLAIM_GRACE);
        let deadline = Instant::now() + RECOVERY_LIMIT;
        loop {
            let repaired = repair(items, grace, Some(horizon)).await?;
            rows += repaired.rows;
            if !repaired.redis_answered {
                return Ok(rows);
            }
            if !items.db.outbox_pending_up_to(horizon).await? {
                break;
            }
            if Instant::now() >= deadline {
                return Ok(rows);
            }
            tokio::time::sleep(RECOVERY_POLL).await;
        }
    }
    items.hooks.at(Point::BeforeTrust, 0).await;
    items.l2.trust_unless_distrusted_since(epoch);
    Ok(rows)
}

/// Repairs one batch: L1 here, then the fences, then the invalidations, then the rows.
/// Returns `false` when Redis failed (the rows stay, for a later pass).
async fn relay(items: &Items, batch: &[Pending]) -> Result<bool, ServiceError> {
    if batch.is_empty() {
        return Ok(true);
    }
    let newest = newest_per_item(batch.iter().map(|row| (row.item_id, row.version)));
    for &(id, version) in &newest {
        // Our own message is skipped by our bus: apply it here.
        items.l1.invalidate_version(id, version).await;
    }
    // A tombstone at the written version: whatever the write was, the next read goes to
    // PostgreSQL; a newer version already in L2 is left alone.
    if items.l2.fence_tombstones(&newest).await.is_err() {
        items.metrics.l2_write_error.increment(1);
        return Ok(false);
    }
    // Fenced before published, as every write: a peer woken by the message must find the
    // fence, not the old value.
    let invalidations: Vec<Invalidation> = newest
        .iter()
        .map(|&(id, version)| Invalidation {
            id,
            version,
            origin: items.origin,
            sent_at_micros: unix_micros(),
        })
        .collect();
    if items.l2.publish_all(&invalidations).await.is_err() {
        return Ok(false);
    }
    items
        .metrics
        .published
        .increment(invalidations.len() as u64);
    let done: Vec<OutboxId> = batch.iter().map(|row| row.outbox).collect();
    items.db.outbox_done(&done).await?;
    items.metrics.relayed.increment(batch.len() as u64);
    Ok(true)
}

/// Per item, the newest of the `(item, version)` writes: fencing and announcing it covers
/// the older ones (the fence refuses anything older; the watermark keeps the maximum).
fn newest_per_item(writes: impl ExactSizeIterator<Item = (i64, i64)>) -> Vec<(i64, i64)> {
    let mut newest: HashMap<i64, i64> = HashMap::with_capacity(writes.len());
    for (item, version) in writes {
        let newest = newest.entry(item).or_insert(version);
        *newest = (*newest).max(version);
    }
    newest.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_item_is_relayed_once_at_its_newest_version() {
        let writes = [(7, 2), (8, 1), (7, 4), (7, 3)];
        let mut newest = newest_per_item(writes.into_iter());
        newest.sort_unstable();
        assert_eq!(newest, [(7, 4), (8, 1)]);
    }
}
