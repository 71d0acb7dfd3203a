//! A randomized model test of the cache protocol (proptest): random interleavings of
//! reads and writes on two instances, with the test acting as the invalidation bus so it
//! can deliver, delay, drop and reorder messages, flush on "reconnect", and run the
//! outbox relay. Reads can be left paused at a pause point of their fill while other
//! operations run, so fills race writes, invalidations and flushes. In the first
//! property the instances read through a real streaming replica whose replay the test
//! pauses and resumes (replica lag). Against the real PostgreSQL and Redis.
//!
//! Invariants (`docs/cache-protocol.md`):
//! - a read on an instance never returns a version older than one that instance wrote or
//!   was told about before the read began;
//! - after quiescence (every message delivered, every instance that lost one flushed,
//!   as the bus does on a lag or reconnect), every instance reads exactly PostgreSQL's
//!   version, and Redis holds that version or nothing newer;
//! - (second property, short L1 TTL and a `Tick` that lets it pass) staleness is bounded
//!   in time: a read that starts after a write committed returns that write (or a newer
//!   one) once the L1 TTL (with its jitter) has passed since the commit, even when the
//!   invalidation was lost.
//!
//! - (first property) each instance reads a key from PostgreSQL at most once per time
//!   Redis lost it (the keys are created through the cache, so Redis has them from the
//!   start): the protocol's bound on fills per TTL window, the TTL being longer than the
//!   test and refresh-ahead off.
//!
//! Checked against mutations: with a reader's answer taken without its proof (`if true
//! || replayed >= writer_at` in `store::replica`, which is how reads went before the
//! proof), the first property failed: proptest shrank it to `[LaggedRead { writer: 0,
//! reader: 1, key: 0 }]`, "Redis holds v1 while PostgreSQL has v2 (trusted)": instance 1,
//! which had not received the invalidation, filled Redis with the lagging replica's
//! v1 after the fence was evicted (race R13). With the loader's Redis fill removed, the fills bound
//! failed ("instance 1 read key 1 from PostgreSQL 2 times; at most 1 expected"). With
//! the watermark check removed from `L1::is_current`, it
//! finds a stale read within the 48 cases. With the Lua fence's version comparison
//! removed it did not (a later write to the key usually repairs Redis before the
//! quiescence check); R1 in `races.rs` pins that guard.

#![allow(clippy::unwrap_used, unreachable_pub, missing_debug_implementations)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use app_core::cache::l1::Policy;
use app_core::hooks::Point;
use app_core::model::ItemId;
use app_core::service::Items;
use app_core::store::Database;
use app_core::testing::{self, Gate, Pauses, Replica, TestDb, TestRedis, settings};
use fred::prelude::*;
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use std::sync::Arc;
use tiergate_config::Secret;

const INSTANCES: usize = 2;
const KEYS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    Read {
        instance: usize,
        key: usize,
    },
    /// A read whose fill (if it needs one) stops at `point` until a `Resume`.
    StartRead {
        instance: usize,
        key: usize,
        point: Point,
    },
    /// Lets the oldest paused read finish.
    Resume,
    Write {
        instance: usize,
        key: usize,
    },
    /// Deliver the oldest pending message, or the newest (a reordering).
    Deliver {
        instance: usize,
        newest: bool,
    },
    /// Lose the oldest pending message.
    Drop {
        instance: usize,
    },
    /// Time passes: two thirds of the short L1 TTL (in the time-bound property only).
    Tick,
    /// A dense lost invalidation (time-bound property): `reader` caches the key, `writer`
    /// writes it, the message to `reader` is lost, `ticks` ticks pass, `reader` reads.
    Lost {
        reader: usize,
        writer: usize,
        key: usize,
        ticks: u8,
    },
    /// The subscriber reconnected: the bus flushes L1.
    Reconnect {
        instance: usize,
    },
    /// One outbox relay pass.
    Relay {
        instance: usize,
    },
    /// Redis drops the key (its TTL ran out, or it was evicted).
    EvictL2 {
        key: usize,
    },
    /// Replica lag begins: the replica stops replaying (nothing written from now on
    /// reaches it until `CatchUp`).
    Lag,
    /// The replica replays again and catches up.
    CatchUp,
    /// A dense lagged read (R13): replay pauses, `writer` writes the key, Redis evicts it
    /// (fence and all), `reader` drops its L1 copy without learning of the write (as a
    /// task started after it would) and reads. The replica stays behind.
    LaggedRead {
        writer: usize,
        reader: usize,
        key: usize,
    },
    /// A dense race, so the generator does not have to stumble on one: `reader` starts a
    /// read paused at `point`, `writer` writes the key, the invalidation is delivered to
    /// the reader (or not), `flush` says whether the reader's bus reconnects meanwhile,
    /// then the read resumes and the reader reads again.
    Race {
        reader: usize,
        writer: usize,
        key: usize,
        point: Point,
        deliver: bool,
        flush: bool,
    },
}

/// The operations of the time-bound property: those of [`op`], `Tick` and `Lost`.
fn op_with_time() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => op(),
        2 => Just(Op::Tick),
        1 => (0..INSTANCES, 0..INSTANCES, 0..KEYS, 1..4u8).prop_map(|(reader, writer, key, ticks)| Op::Lost { reader, writer, key, ticks }),
    ]
}

/// The operations of the first property: those of [`op`] and replica lag.
fn op_with_lag() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => op(),
        1 => Just(Op::Lag),
        1 => Just(Op::CatchUp),
        1 => (0..INSTANCES, 0..INSTANCES, 0..KEYS).prop_map(|(writer, reader, key)| Op::LaggedRead { writer, reader, key }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let instance = 0..INSTANCES;
    let key = 0..KEYS;
    let point = || {
        prop_oneof![
            Just(Point::AfterDbRead),
            Just(Point::BeforeL2Fill),
            Just(Point::BeforeL1Insert)
        ]
    };
    prop_oneof![
        4 => (instance.clone(), key.clone()).prop_map(|(instance, key)| Op::Read { instance, key }),
        3 => (instance.clone(), key.clone(), point()).prop_map(|(instance, key, point)| Op::StartRead { instance, key, point }),
        3 => Just(Op::Resume),
        3 => (instance.clone(), key.clone()).prop_map(|(instance, key)| Op::Write { instance, key }),
        3 => (instance.clone(), any::<bool>()).prop_map(|(instance, newest)| Op::Deliver { instance, newest }),
        1 => instance.clone().prop_map(|instance| Op::Drop { instance }),
        1 => instance.clone().prop_map(|instance| Op::Reconnect { instance }),
        1 => instance.clone().prop_map(|instance| Op::Relay { instance }),
        1 => key.clone().prop_map(|key| Op::EvictL2 { key }),
        2 => (instance.clone(), instance, key, point(), any::<bool>(), any::<bool>()).prop_map(
            |(reader, writer, key, point, deliver, flush)| Op::Race { reader, writer, key, point, deliver, flush }
        ),
    ]
}

/// A read left paused in its fill.
struct Paused {
    instance: usize,
    key: usize,
    floor: i64,
    started: Instant,
    gate: Arc<Gate>,
    read: tokio::task::JoinHandle<i64>,
}

struct World<'a> {
    instances: Vec<Items>,
    /// The replica the instances read through, if any.
    replica: Option<&'a Replica>,
    /// Whether the replica's replay is paused.
    lagging: bool,
    /// A plain client, to evict keys.
    redis: fred::clients::Client,
    pauses: Vec<Arc<Pauses>>,
    paused: VecDeque<Paused>,
    ids: Vec<ItemId>,
    /// Messages on their way to each instance: (key index, version).
    pending: Vec<VecDeque<(usize, i64)>>,
    /// Whether an instance lost a message since its last flush.
    lost: Vec<bool>,
    /// The newest version each instance wrote or was told about, per key.
    known: Vec<Vec<i64>>,
    /// Per key, each committed version with the time its write returned.
    commits: Vec<Vec<(i64, Instant)>>,
    /// Whether reads are held to [`STALENESS_BOUND`].
    time_bound: bool,
    /// Per key, how often Redis lost it (`EvictL2`, and each `Race`).
    evictions: Vec<usize>,
}

/// The L1 TTL of the time-bound property; the other property's never runs out.
const SHORT_TTL: Duration = Duration::from_millis(300);

/// How long past a commit an older version may still be read: the TTL with its 10 %
/// jitter, plus the writer's own steps between commit and fence (a read in that gap can
/// still fill L1 from the old Redis entry) and scheduling slack.
const STALENESS_BOUND: Duration = Duration::from_millis(300 * 11 / 10 + 150);

/// How long a read waits for the paused replica before the writer answers.
const REPLICA_MAX_LAG: Duration = Duration::from_millis(50);

async fn instance(
    db: &TestDb,
    redis: &TestRedis,
    replica: Option<&Replica>,
    pauses: &Arc<Pauses>,
    ttl: Duration,
) -> Items {
    let long = Duration::from_secs(600);
    let policy = Policy {
        ttl,
        degraded_ttl: ttl.min(long),
        max_stale: long,
        refresh_after: Duration::ZERO,
    };
    let mut settings = settings(db, redis);
    if let Some(replica) = replica {
        settings.database.reader_url = Some(Secret::new(replica.url(db)));
        settings.database.reader_max_lag = REPLICA_MAX_LAG;
    }
    let items = testing::items(&settings, policy, pauses.hooks());
    assert!(items.l2().wait_connected(Duration::from_secs(5)).await);
    items
}

impl<'a> World<'a> {
    async fn new(
        db: &TestDb,
        redis: &TestRedis,
        replica: Option<&'a Replica>,
        ttl: Duration,
    ) -> Self {
        if let Some(replica) = replica {
            // A failed case may have left replay paused; this one's database must be there.
            replica.resume_replay().await;
            replica.catch_up().await;
        }
        let mut instances = Vec::new();
        let pauses: Vec<_> = (0..INSTANCES).map(|_| Pauses::new()).collect();
        for pause in &pauses {
            instances.push(instance(db, redis, replica, pause, ttl).await);
        }
        let mut ids = Vec::new();
        for key in 0..KEYS {
            let (id, _) = instances[0].create(&format!("k{key}")).await.unwrap();
            ids.push(id);
        }
        let config =
            fred::types::config::Config::from_url(&app_core::testing::redis_url()).unwrap();
        let client = fred::types::Builder::from_config(config).build().unwrap();
        client.init().await.unwrap();
        Self {
            instances,
            replica,
            lagging: false,
            redis: client,
            pauses,
            paused: VecDeque::new(),
            ids,
            pending: vec![VecDeque::new(); INSTANCES],
            lost: vec![false; INSTANCES],
            known: vec![vec![1; KEYS]; INSTANCES],
            commits: vec![vec![(1, Instant::now())]; KEYS],
            time_bound: ttl == SHORT_TTL,
            evictions: vec![0; KEYS],
        }
    }

    /// The protocol's bound on fills: with an L1 TTL longer than the test, each instance
    /// reads a key from PostgreSQL at most once each time Redis lost the key (creates
    /// and writes fence it into Redis). Invalidations, flushes and writes cost no
    /// PostgreSQL read: the next L1 miss finds the new version in Redis.
    fn check_fills(&self) {
        if self.time_bound {
            return;
        }
        for (key, id) in self.ids.iter().enumerate() {
            for (instance, pauses) in self.pauses.iter().enumerate() {
                let reads = pauses.passed(Point::AfterDbRead, id.get());
                let allowed = self.evictions[key];
                assert!(
                    reads <= allowed,
                    "instance {instance} read key {key} from PostgreSQL {reads} times; at most {allowed} expected (Redis lost it {} times)",
                    self.evictions[key]
                );
            }
        }
    }

    /// Fails when a read of `key` that started at `started` returned `version` although
    /// a newer version had committed more than [`STALENESS_BOUND`] before.
    fn check_staleness(&self, key: usize, started: Instant, version: i64) {
        if !self.time_bound {
            return;
        }
        let missed = self.commits[key]
            .iter()
            .filter(|(v, at)| *v > version && *at <= started)
            .map(|(_, at)| *at)
            .min();
        if let Some(committed) = missed {
            let stale_for = started - committed;
            assert!(
                stale_for <= STALENESS_BOUND,
                "key {key}: read v{version} {stale_for:?} after a newer version committed (bound {STALENESS_BOUND:?})"
            );
        }
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            // A read of a key whose fill is paused on that instance would join the paused
            // flight and wait for the Resume this sequential driver cannot reach yet.
            Op::Read { instance, key } | Op::StartRead { instance, key, .. }
                if self.is_paused(instance, key) => {}
            Op::StartRead {
                instance,
                key,
                point,
            } => {
                let floor = self.known[instance][key];
                let started = Instant::now();
                let id = self.ids[key];
                let gate = self.pauses[instance].arm(point, id.get());
                let items = self.instances[instance].clone();
                let mut read =
                    tokio::spawn(async move { items.get(id).await.unwrap().entry.version });
                tokio::select! {
                    () = gate.arrived() => self.paused.push_back(Paused { instance, key, floor, started, gate, read }),
                    version = &mut read => {
                        // Served without a fill (an L1 hit): nothing to pause.
                        self.pauses[instance].disarm(point, id.get());
                        let version = version.unwrap();
                        assert!(version >= floor, "{op:?}: read v{version}, but v{floor} was known before the read");
                        self.check_staleness(key, started, version);
                    }
                }
            }
            Op::Resume => self.resume_oldest().await,
            Op::Lag => {
                if let Some(replica) = self.replica.filter(|_| !self.lagging) {
                    replica.pause_replay().await;
                    self.lagging = true;
                }
            }
            Op::CatchUp => self.catch_up().await,
            Op::LaggedRead {
                writer,
                reader,
                key,
            } => {
                Box::pin(self.apply(&Op::Lag)).await;
                Box::pin(self.apply(&Op::Write {
                    instance: writer,
                    key,
                }))
                .await;
                Box::pin(self.apply(&Op::EvictL2 { key })).await;
                self.instances[reader]
                    .l1()
                    .invalidate(self.ids[key].get())
                    .await;
                Box::pin(self.apply(&Op::Read {
                    instance: reader,
                    key,
                }))
                .await;
            }
            Op::Lost {
                reader,
                writer,
                key,
                ticks,
            } => {
                Box::pin(self.apply(&Op::Read {
                    instance: reader,
                    key,
                }))
                .await;
                Box::pin(self.apply(&Op::Write {
                    instance: writer,
                    key,
                }))
                .await;
                if reader != writer && self.pending[reader].pop_back().is_some() {
                    self.lost[reader] = true;
                }
                for _ in 0..ticks {
                    Box::pin(self.apply(&Op::Tick)).await;
                }
                Box::pin(self.apply(&Op::Read {
                    instance: reader,
                    key,
                }))
                .await;
            }
            Op::Race {
                reader,
                writer,
                key,
                point,
                deliver,
                flush,
            } => {
                // The key must miss in the reader's L1 and in Redis for its read to fill
                // from PostgreSQL, where the pause points are.
                self.instances[reader]
                    .l1()
                    .invalidate(self.ids[key].get())
                    .await;
                Box::pin(self.apply(&Op::EvictL2 { key })).await;
                Box::pin(self.apply(&Op::StartRead {
                    instance: reader,
                    key,
                    point,
                }))
                .await;
                Box::pin(self.apply(&Op::Write {
                    instance: writer,
                    key,
                }))
                .await;
                if deliver {
                    Box::pin(self.apply(&Op::Deliver {
                        instance: reader,
                        newest: true,
                    }))
                    .await;
                }
                if flush {
                    Box::pin(self.apply(&Op::Reconnect { instance: reader })).await;
                }
                while !self.paused.is_empty() {
                    self.resume_oldest().await;
                }
                Box::pin(self.apply(&Op::Read {
                    instance: reader,
                    key,
                }))
                .await;
            }
            Op::Read { instance, key } => {
                let floor = self.known[instance][key];
                let started = Instant::now();
                let version = self.instances[instance]
                    .get(self.ids[key])
                    .await
                    .unwrap()
                    .entry
                    .version;
                assert!(
                    version >= floor,
                    "{op:?}: read v{version}, but v{floor} was known before the read"
                );
                self.check_staleness(key, started, version);
            }
            // Two thirds of the TTL: a few ticks in a row sample the time after a commit
            // finely enough to see an entry outlive its TTL.
            Op::Tick => tokio::time::sleep(SHORT_TTL * 2 / 3).await,
            Op::Write { instance, key } => {
                let entry = match self.instances[instance]
                    .update(self.ids[key], "w", None)
                    .await
                    .unwrap()
                {
                    app_core::service::Updated::Done(entry) => entry,
                    other => panic!("{op:?}: {other:?}"),
                };
                let known = &mut self.known[instance][key];
                *known = (*known).max(entry.version);
                self.commits[key].push((entry.version, Instant::now()));
                for (other, queue) in self.pending.iter_mut().enumerate() {
                    if other != instance {
                        queue.push_back((key, entry.version));
                    }
                }
            }
            Op::Deliver { instance, newest } => {
                let queue = &mut self.pending[instance];
                let message = if newest {
                    queue.pop_back()
                } else {
                    queue.pop_front()
                };
                if let Some((key, version)) = message {
                    self.deliver(instance, key, version).await;
                }
            }
            Op::Drop { instance } => {
                if self.pending[instance].pop_front().is_some() {
                    self.lost[instance] = true;
                }
            }
            Op::Reconnect { instance } => {
                self.instances[instance].l1().flush();
                self.lost[instance] = false;
            }
            Op::EvictL2 { key } => {
                self.evictions[key] += 1;
                let l2 = self.instances[0].l2();
                let _: i64 = self.redis.del(l2.key(self.ids[key].get())).await.unwrap();
            }
            Op::Relay { instance } => {
                self.instances[instance]
                    .relay_outbox(Duration::ZERO)
                    .await
                    .unwrap();
            }
        }
    }

    fn is_paused(&self, instance: usize, key: usize) -> bool {
        self.paused
            .iter()
            .any(|p| p.instance == instance && p.key == key)
    }

    async fn resume_oldest(&mut self) {
        if let Some(paused) = self.paused.pop_front() {
            paused.gate.release();
            let version = paused.read.await.unwrap();
            let (instance, key, floor) = (paused.instance, paused.key, paused.floor);
            assert!(
                version >= floor,
                "paused read on {instance}/{key}: v{version}, but v{floor} was known before it"
            );
            self.check_staleness(key, paused.started, version);
        }
    }

    async fn deliver(&mut self, instance: usize, key: usize, version: i64) {
        self.instances[instance]
            .l1()
            .invalidate_version(self.ids[key].get(), version)
            .await;
        let known = &mut self.known[instance][key];
        *known = (*known).max(version);
    }

    async fn catch_up(&mut self) {
        if let Some(replica) = self.replica.filter(|_| self.lagging) {
            replica.resume_replay().await;
            replica.catch_up().await;
            self.lagging = false;
        }
    }

    async fn quiesce_and_check(&mut self, db: &TestDb) {
        while !self.paused.is_empty() {
            self.resume_oldest().await;
        }
        self.catch_up().await;
        for instance in 0..INSTANCES {
            while let Some((key, version)) = self.pending[instance].pop_front() {
                self.deliver(instance, key, version).await;
            }
            if self.lost[instance] {
                self.instances[instance].l1().flush();
            }
        }
        let client = db.client().await;
        for (key, id) in self.ids.iter().enumerate() {
            let truth: i64 = client
                .query_one("SELECT version FROM items WHERE id = $1", &[&id.get()])
                .await
                .unwrap()
                .get(0);
            for (instance, items) in self.instances.iter().enumerate() {
                let version = items.get(*id).await.unwrap().entry.version;
                assert_eq!(
                    version, truth,
                    "instance {instance}, key {key} after quiescence"
                );
            }
            if let Some((in_l2, _)) = self.instances[0].l2().get(id.get()).await.unwrap() {
                assert!(
                    in_l2 <= truth,
                    "Redis holds v{in_l2}, newer than PostgreSQL's v{truth}"
                );
                assert!(
                    in_l2 == truth || !self.instances[0].l2().is_trusted(),
                    "Redis holds v{in_l2} while PostgreSQL has v{truth} (trusted)"
                );
            }
        }
    }
}

/// The first property. Written out rather than in `proptest!`, so that one replica
/// serves every case and is removed at the end (a replica is a copy of the whole
/// PostgreSQL: seconds to make).
#[test]
fn random_interleavings_keep_the_cache_coherent() {
    let replica = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(Replica::start(env!("CARGO_TARGET_TMPDIR")));
    let config = ProptestConfig {
        cases: 48,
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    let ops = proptest::collection::vec(op_with_lag(), 1..40);
    let outcome = TestRunner::new(config).run(&ops, |ops| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let db = TestDb::create().await;
            Database::new(&settings(&db, &TestRedis::new()).database)
                .unwrap()
                .migrate()
                .await
                .unwrap();
            let redis = TestRedis::new();
            let mut world = World::new(&db, &redis, Some(&replica), Duration::from_secs(600)).await;
            for op in &ops {
                world.apply(op).await;
            }
            world.quiesce_and_check(&db).await;
            world.check_fills();
        });
        Ok(())
    });
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Checked against a mutation: with `Items::get` serving an L1 hit whatever its age
    /// (`if true || age < fresh_for`), it failed with "key 1: read v3 604 ms after a
    /// newer version committed (bound 480 ms)".
    #[test]
    fn lost_invalidations_leave_reads_stale_no_longer_than_the_l1_ttl(ops in proptest::collection::vec(op_with_time(), 1..30)) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let db = TestDb::create().await;
            Database::new(&settings(&db, &TestRedis::new()).database).unwrap().migrate().await.unwrap();
            let redis = TestRedis::new();
            let mut world = World::new(&db, &redis, None, SHORT_TTL).await;
            for op in &ops {
                world.apply(op).await;
            }
            world.quiesce_and_check(&db).await;
        });
    }
}
