//! A rollout and everyone else who changes its route's split, at the database: an
//! operator cannot change the route under a running rollout (its next step would undo the
//! change), only the lease holder drives it, and an abort that races the driver's step
//! always ends with the route back on the previous group, whichever commits first.
//!
//! The races are made deterministic with PostgreSQL's own row locks: a blocker holds the
//! rollout's row, the two contenders queue behind it in a known order (seen waiting in
//! `pg_stat_activity`), and the blocker lets go.

#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

use std::time::{Duration, Instant};

use app_core::store::Database;
use app_core::store::fleet::{Changer, Committed, Weights};
use app_core::store::rollout::{NewRollout, RolloutRow};
use app_core::testing::{TestDb, TestRedis, settings};
use tokio::task::JoinHandle;

fn weights(blue: u32, green: u32) -> Weights {
    Weights::from([("blue".to_owned(), blue), ("green".to_owned(), green)])
}

/// A migrated database with a rollout of `web` from blue to green, leased to `driver`.
async fn running_rollout() -> (TestDb, Database, RolloutRow) {
    let db = TestDb::create().await;
    let database = Database::new(&settings(&db, &TestRedis::new()).database).unwrap();
    database.migrate().await.unwrap();
    let rollout = database
        .rollout_create(&NewRollout {
            route: "web",
            from_group: "blue",
            to_group: "green",
            steps: &[5, 100],
            interval: Duration::from_secs(30),
            max_error_rate: 0.01,
            max_p99: Duration::from_millis(500),
            holder: "driver",
            lease: Duration::from_secs(60),
        })
        .await
        .unwrap()
        .unwrap();
    (db, database, rollout)
}

/// The route's split as stored.
async fn stored_split(db: &TestDb) -> serde_json::Value {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT weights::text FROM fleet_splits WHERE route = 'web'",
            &[],
        )
        .await
        .unwrap();
    serde_json::from_str(row.get(0)).unwrap()
}

/// Waits until `count` statements of this database wait for a lock; fails if `racer`
/// ends first (it did not wait for the lock at all) or after 10 s.
async fn until_waiting<T>(db: &TestDb, count: i64, racer: &JoinHandle<T>) {
    let observer = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting >= count {
            return;
        }
        assert!(
            !racer.is_finished(),
            "a statement that should wait for the rollout's row lock went through"
        );
        assert!(Instant::now() < deadline, "{waiting} of {count} waiting");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn only_the_lease_holder_changes_a_route_while_its_rollout_runs() {
    let (db, database, rollout) = running_rollout().await;
    let operator = database
        .fleet_set_split("web", Some(&weights(50, 50)), Changer::Operator)
        .await
        .unwrap();
    assert_eq!(
        operator, None,
        "an operator's change under a running rollout"
    );
    let stranger = Changer::Rollout {
        id: rollout.id,
        holder: "someone-else",
    };
    let stranger = database
        .fleet_set_split("web", Some(&weights(0, 100)), stranger)
        .await
        .unwrap();
    assert_eq!(stranger, None, "a driver without the lease");
    let driver = Changer::Rollout {
        id: rollout.id,
        holder: "driver",
    };
    let step = database
        .fleet_set_split("web", Some(&weights(95, 5)), driver)
        .await
        .unwrap();
    assert!(step.is_some());
    assert_eq!(
        stored_split(&db).await,
        serde_json::json!({"blue": 95, "green": 5})
    );

    let (aborted, _) = database
        .rollout_abort("web", "test")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (aborted.id, aborted.state.as_str()),
        (rollout.id, "aborted")
    );
    assert_eq!(
        stored_split(&db).await,
        serde_json::json!({"blue": 100, "green": 0})
    );
    assert_eq!(database.rollout_abort("web", "again").await.unwrap(), None);
    let operator = database
        .fleet_set_split("web", None, Changer::Operator)
        .await
        .unwrap();
    assert!(operator.is_some(), "the route is the operator's again");
}

/// Which of the abort and the driver's step takes the rollout's row lock first.
#[derive(Clone, Copy, Debug)]
enum First {
    Abort,
    Step,
}

/// The abort and the driver's step queue behind a blocker in the order `first`; returns
/// what the step committed (if anything) and the abort's commit.
async fn race(first: First) -> (TestDb, Option<Committed>, Committed) {
    let (db, database, rollout) = running_rollout().await;
    let mut blocker = db.client().await;
    let holding = blocker.transaction().await.unwrap();
    holding
        .execute(
            "SELECT 1 FROM fleet_rollouts WHERE id = $1 FOR UPDATE",
            &[&rollout.id],
        )
        .await
        .unwrap();

    let abort = {
        let database = database.clone();
        move || tokio::spawn(async move { database.rollout_abort("web", "race").await })
    };
    let step = {
        let database = database.clone();
        move || {
            tokio::spawn(async move {
                let driver = Changer::Rollout {
                    id: rollout.id,
                    holder: "driver",
                };
                database
                    .fleet_set_split("web", Some(&weights(95, 5)), driver)
                    .await
            })
        }
    };
    let (aborted, stepped) = match first {
        First::Abort => {
            let aborted = abort();
            until_waiting(&db, 1, &aborted).await;
            let stepped = step();
            until_waiting(&db, 2, &stepped).await;
            (aborted, stepped)
        }
        First::Step => {
            let stepped = step();
            until_waiting(&db, 1, &stepped).await;
            let aborted = abort();
            until_waiting(&db, 2, &aborted).await;
            (aborted, stepped)
        }
    };
    holding.commit().await.unwrap();
    let (_, committed) = aborted.await.unwrap().unwrap().unwrap();
    let stepped = stepped.await.unwrap().unwrap();
    (db, stepped, committed)
}

#[tokio::test]
async fn an_abort_that_locks_first_turns_the_drivers_step_into_nothing() {
    let (db, stepped, _) = race(First::Abort).await;
    assert_eq!(stepped, None, "the step landed after the abort");
    assert_eq!(
        stored_split(&db).await,
        serde_json::json!({"blue": 100, "green": 0})
    );
}

#[tokio::test]
async fn a_step_that_locks_first_is_undone_by_the_abort_behind_it() {
    let (db, stepped, aborted) = race(First::Step).await;
    let stepped = stepped.expect("the step held the lock first and lands");
    assert!(aborted.revision > stepped.revision);
    assert_eq!(
        stored_split(&db).await,
        serde_json::json!({"blue": 100, "green": 0})
    );
}
