//! The fault suite: the real `tiergate` binary under load while its dependencies fail as
//! they do in production, each test bounded in time and printing its figures.
//!
//! - Redis killed (`kill -9`) for 5 s under write load, then back: Redis is read again
//!   within 5 s of its return, no acknowledged write is lost, no read answers 5xx.
//! - The app's PostgreSQL backends terminated again and again under read/write load (what
//!   an RDS or Aurora failover does to every connection): no 500, every read answers,
//!   writes 503 at worst.
//! - The list-page walk (20,000 items of 200 four-byte characters, 4 clients paging with
//!   `limit=500` from every cursor): resident memory stays under `cache.l1_max_bytes` +
//!   64 MiB.
//! - 1,030 slow-body uploads (`POST /items`, a byte every 2 s), and 1,100 requests held by
//!   a slow upstream: L1-hit reads meanwhile answer 200 (≥ 99 %) with a p99 under 50 ms.
//!
//! Each test runs the app as a PostgreSQL role without superuser rights, created here, as
//! on RDS; Redis, when a test kills it, is a private `redis-server` on a port of its own.
//! They are `#[ignore]`d in the parallel run and run alone by `scripts/test`, so their
//! figures are not those of a machine busy with the other tests.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use app_core::testing::{
    RedisServer, TestDb, TestRedis, admin_database_url, clean_up_on_admin_database, connect, unique,
};
use tokio::process::Child;
use tokio::sync::{Mutex, mpsc};

use crate::startup::{lines, tiergate, wait_for_log};

/// A database of its own, owned by a login role of its own without superuser rights;
/// both are dropped at the end.
struct AppDatabase {
    db: Option<TestDb>,
    role: String,
    /// The app's URL: as the role, to the database.
    url: String,
}

impl AppDatabase {
    async fn create() -> Self {
        let db = TestDb::create().await;
        let role = unique("tiergate_app");
        let password = unique("pw");
        let admin = connect(&admin_database_url()).await;
        admin
            .batch_execute(&format!(
                "CREATE ROLE {role} LOGIN PASSWORD '{password}' NOSUPERUSER NOCREATEDB NOCREATEROLE;
                 ALTER DATABASE {} OWNER TO {role};",
                db.name
            ))
            .await
            .unwrap();
        let (scheme, rest) = db.url.split_once("://").unwrap();
        let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        let url = format!("{scheme}://{role}:{password}@{host_and_path}");
        Self {
            db: Some(db),
            role,
            url,
        }
    }

    fn db(&self) -> &TestDb {
        self.db.as_ref().unwrap()
    }

    /// Terminates every backend of the app's role; returns how many.
    async fn terminate_app_backends(&self, admin: &tokio_postgres::Client) -> i64 {
        admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = $1",
                &[&self.role],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn outbox_rows(&self) -> i64 {
        self.db()
            .client()
            .await
            .query_one("SELECT count(*) FROM cache_outbox", &[])
            .await
            .unwrap()
            .get(0)
    }
}

impl Drop for AppDatabase {
    fn drop(&mut self) {
        drop(self.db.take()); // the database first: the role owns it
        clean_up_on_admin_database(format!("DROP ROLE IF EXISTS {}", self.role));
    }
}

/// The binary, started with `vars` and waited for until ready.
struct Process {
    child: Child,
    http: SocketAddr,
    admin: SocketAddr,
    client: reqwest::Client,
    /// Kept so the log pipe is drained (a full pipe would block the app).
    _log: mpsc::UnboundedReceiver<String>,
}

impl Process {
    async fn start(db: &AppDatabase, redis_url: &str, prefix: &str, vars: &[(&str, &str)]) -> Self {
        let mut env = vec![
            ("DATABASE_URL", db.url.clone()),
            ("REDIS_URL", redis_url.to_owned()),
            ("TIERGATE_REDIS__KEY_PREFIX", prefix.to_owned()),
            ("TIERGATE_LISTEN__HTTP", "127.0.0.1:0".to_owned()),
            ("TIERGATE_LISTEN__ADMIN", "127.0.0.1:0".to_owned()),
            ("TIERGATE_DATABASE__POOL_MAX_SIZE", "8".to_owned()),
            ("RUST_LOG", "info,access=off".to_owned()),
        ];
        env.extend(vars.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let mut child = tiergate(&env)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start tiergate");
        let mut log = lines(&mut child);
        let listening = wait_for_log(&mut log, "Listening.").await;
        let address =
            |name: &str| -> SocketAddr { listening[name].as_str().unwrap().parse().unwrap() };
        let process = Self {
            http: address("http"),
            admin: address("admin"),
            child,
            client: reqwest::Client::new(),
            _log: log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = process
                .client
                .get(format!("http://{}/readyz", process.admin))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return process;
            }
            assert!(Instant::now() < deadline, "not ready within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Resident memory, from `/proc`.
    fn rss_bytes(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib * 1024
    }

    async fn metrics(&self) -> String {
        let rsp = self
            .client
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap();
        rsp.text().await.unwrap()
    }
}

/// The sum of every sample of `name` whose labels include all of `labels`.
fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let wanted = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            (rest.is_empty() || rest.starts_with('{'))
                .then_some(())
                .filter(|()| wanted)?;
            value.parse::<f64>().ok()
        })
        .sum()
}

/// Counts of answers by status, shared by load workers.
#[derive(Default)]
struct Statuses(std::sync::Mutex<HashMap<u16, u64>>);

impl Statuses {
    fn count(&self, status: u16) {
        *self.0.lock().unwrap().entry(status).or_default() += 1;
    }

    fn of(&self, status: u16) -> u64 {
        self.0.lock().unwrap().get(&status).copied().unwrap_or(0)
    }

    fn server_errors(&self) -> u64 {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(s, _)| **s >= 500)
            .map(|(_, n)| n)
            .sum()
    }

    fn total(&self) -> u64 {
        self.0.lock().unwrap().values().sum()
    }

    fn summary(&self) -> String {
        let mut counts: Vec<_> = self.0.lock().unwrap().clone().into_iter().collect();
        counts.sort_unstable();
        format!("{counts:?}")
    }
}

/// `workers` loops running `step` until `stop` is set.
fn spawn_workers<F, Fut>(
    workers: usize,
    stop: &Arc<AtomicBool>,
    step: F,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    (0..workers)
        .map(|worker| {
            let (stop, step) = (stop.clone(), step.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    step(worker).await;
                }
            })
        })
        .collect()
}

async fn stop_workers(stop: &AtomicBool, workers: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
}

/// Inserts `n` items named `name` straight into PostgreSQL; returns their ids.
async fn insert_items(db: &TestDb, n: i64, name: &str) -> Vec<i64> {
    db.client()
        .await
        .query(
            "INSERT INTO items (name) SELECT $2 FROM generate_series(1, $1::bigint) RETURNING id",
            &[&n, &name],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// How Redis fails in test (a).
#[derive(Debug, Clone, Copy)]
enum RedisOutage {
    /// `kill -9`, and a new server on the same port (empty) after the outage.
    Killed,
    /// `SIGSTOP`, then `SIGCONT`: connections stay open, commands time out, and what Redis
    /// held is still there afterwards (stale for the keys written meanwhile).
    Frozen,
}

/// (a) Redis `kill -9` for 5 s under write and read load, then back (empty). Checked
/// against the code before the recovery: "Redis not read within 15 s of its return" (the
/// relay drained 100 rows a second, and trusted Redis only once the outbox was empty).
#[tokio::test]
#[ignore = "fault suite: run alone by scripts/test"]
async fn fault_redis_killed_for_5_s_under_write_load_is_read_again_within_5_s_of_its_return() {
    redis_outage_under_write_load(RedisOutage::Killed).await;
}

/// (a') The same with Redis frozen (`SIGSTOP`/`SIGCONT`) for 5 s.
#[tokio::test]
#[ignore = "fault suite: run alone by scripts/test"]
async fn fault_redis_frozen_for_5_s_under_write_load_is_read_again_within_5_s_of_its_return() {
    redis_outage_under_write_load(RedisOutage::Frozen).await;
}

async fn redis_outage_under_write_load(outage: RedisOutage) {
    const OUTAGE: Duration = Duration::from_secs(5);
    let db = AppDatabase::create().await;
    let redis = RedisServer::start();
    let prefix = TestRedis::new();
    let app = Arc::new(Process::start(&db, &redis.url(), &prefix.prefix, &[]).await);
    // A second instance that only reads: its watermark knows nothing of the writes, so a
    // stale Redis would show through it.
    let peer = Arc::new(Process::start(&db, &redis.url(), &prefix.prefix, &[]).await);
    let readable = Arc::new(insert_items(db.db(), 5_000, "read me").await);
    let load = MixedLoad::start(&app, &peer, &readable);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_outage = load.acknowledged_writes();
    let redis = redis_outage(redis, outage, OUTAGE).await;
    let in_outage = load.acknowledged_writes() - before_outage;
    let backlog = db.outbox_rows().await;
    let redis = redis.come_back();
    let returned = Instant::now();
    let resumed = futures_util::future::join_all(
        [&app, &peer].map(|instance| redis_read_again(instance, returned)),
    )
    .await;
    // A while more under load with Redis back, then the tallies.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (skipped, untrusted) = l2_skips(&[&app, &peer]).await;
    let (acknowledged, reads, writes) = load.stop().await;
    let lost = unreadable_writes(&[&peer, &app], &acknowledged).await;

    println!(
        "redis {outage:?} for {OUTAGE:?}: {in_outage} writes acknowledged during the outage, \
         {backlog} outbox rows at its return; Redis read again {:?} (writer) and {:?} (peer) \
         after its return; {} items written and acknowledged in all, {} lost (read through \
         both); reads {} (l2 lookups skipped in all: {skipped}); writes {}; outbox rows at \
         the end: {}",
        resumed[0],
        resumed[1],
        acknowledged.len(),
        lost.len(),
        reads.summary(),
        writes.summary(),
        db.outbox_rows().await,
    );
    assert!(in_outage > 0, "the outage was under write load");
    assert_eq!(
        untrusted, 0.0,
        "tiergate_cache_l2_untrusted says Redis is still skipped"
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes not readable, (id, acknowledged, served): {lost:?}"
    );
    assert_eq!(
        reads.server_errors(),
        0,
        "reads answered 5xx: {}",
        reads.summary()
    );
    let slowest = resumed.iter().max().copied().unwrap_or_default();
    assert!(
        slowest <= Duration::from_secs(5),
        "Redis read again only {resumed:?} after its return"
    );
    drop(redis);
}

/// Redis during and after an outage.
enum OutRedis {
    /// Killed: a new server is started on `port` when the outage ends.
    Killed { port: u16 },
    /// Frozen: thawed when the outage ends.
    Frozen(RedisServer),
}

impl OutRedis {
    /// Ends the outage: a new (empty) server, or the frozen one thawed.
    fn come_back(self) -> RedisServer {
        match self {
            Self::Killed { port } => RedisServer::start_on(port),
            Self::Frozen(server) => {
                server.thaw();
                server
            }
        }
    }
}

/// Takes Redis away as `outage` says, for `lasting`.
async fn redis_outage(redis: RedisServer, outage: RedisOutage, lasting: Duration) -> OutRedis {
    let out = match outage {
        RedisOutage::Killed => {
            let port = redis.port;
            redis.stop(); // SIGKILL
            OutRedis::Killed { port }
        }
        RedisOutage::Frozen => {
            redis.freeze();
            OutRedis::Frozen(redis)
        }
    };
    tokio::time::sleep(lasting).await;
    out
}

/// How long after `returned` the instance first asked Redis again (an L2 hit or miss
/// counted, not a skip); fails the test past 15 s.
async fn redis_read_again(instance: &Process, returned: Instant) -> Duration {
    let lookups = |m: &str| {
        ["hit", "miss"]
            .iter()
            .map(|result| {
                metric(
                    m,
                    "tiergate_cache_requests_total",
                    &[("tier", "l2"), ("result", result)],
                )
            })
            .sum::<f64>()
    };
    let at_return = lookups(&instance.metrics().await);
    loop {
        if lookups(&instance.metrics().await) > at_return {
            return returned.elapsed();
        }
        assert!(
            returned.elapsed() < Duration::from_secs(15),
            "Redis not read within 15 s of its return"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// L2 lookups skipped in all, and the `tiergate_cache_l2_untrusted` gauges summed.
async fn l2_skips(instances: &[&Process]) -> (f64, f64) {
    let (mut skipped, mut untrusted) = (0.0, 0.0);
    for instance in instances {
        let metrics = instance.metrics().await;
        skipped += metric(
            &metrics,
            "tiergate_cache_requests_total",
            &[("tier", "l2"), ("result", "skipped")],
        );
        untrusted += metric(&metrics, "tiergate_cache_l2_untrusted", &[]);
    }
    (skipped, untrusted)
}

/// Writes `(id, newest acknowledged version)` that an instance does not serve at that
/// version or newer: `(id, acknowledged, served)`.
async fn unreadable_writes(
    instances: &[&Process],
    acknowledged: &[(i64, i64)],
) -> Vec<(i64, i64, Option<i64>)> {
    let mut lost = Vec::new();
    for instance in instances {
        for chunk in acknowledged.chunks(32) {
            let served = chunk.iter().map(|(id, _)| served_version(instance, *id));
            let served = futures_util::future::join_all(served).await;
            for ((id, version), served) in chunk.iter().zip(served) {
                if served.is_none_or(|v| v < *version) {
                    lost.push((*id, *version, served));
                }
            }
        }
    }
    lost
}

/// Test (a)'s load: 8 writers on the first instance (creates, and updates of the items
/// being read, whose older versions Redis may still hold after the outage), 4 readers of
/// those items across both instances.
struct MixedLoad {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    /// The newest version acknowledged for each item written.
    acknowledged: Arc<Mutex<HashMap<i64, i64>>>,
    writes: Arc<Statuses>,
    reads: Arc<Statuses>,
}

impl MixedLoad {
    fn start(app: &Arc<Process>, peer: &Arc<Process>, readable: &Arc<Vec<i64>>) -> Self {
        let load = Self {
            stop: Arc::new(AtomicBool::new(false)),
            workers: Vec::new(),
            acknowledged: Arc::new(Mutex::new(HashMap::new())),
            writes: Arc::new(Statuses::default()),
            reads: Arc::new(Statuses::default()),
        };
        let mut workers = spawn_workers(8, &load.stop, {
            let (app, readable) = (app.clone(), readable.clone());
            let (acknowledged, writes) = (load.acknowledged.clone(), load.writes.clone());
            move |worker| {
                let (app, readable) = (app.clone(), readable.clone());
                let (acknowledged, writes) = (acknowledged.clone(), writes.clone());
                async move { write_once(&app, worker, &readable, &acknowledged, &writes).await }
            }
        });
        workers.extend(spawn_workers(4, &load.stop, {
            let (app, peer, readable) = (app.clone(), peer.clone(), readable.clone());
            let reads = load.reads.clone();
            move |worker| {
                let instance = if worker % 2 == 0 {
                    app.clone()
                } else {
                    peer.clone()
                };
                let (readable, reads) = (readable.clone(), reads.clone());
                async move {
                    let id = readable[fastrand::usize(..readable.len())];
                    reads.count(served_status(&instance, id).await);
                }
            }
        }));
        Self { workers, ..load }
    }

    /// Writes answered 200 or 201 so far.
    fn acknowledged_writes(&self) -> u64 {
        self.writes.of(200) + self.writes.of(201)
    }

    /// Stops the workers; returns the acknowledged writes and the tallies.
    async fn stop(self) -> (Vec<(i64, i64)>, Arc<Statuses>, Arc<Statuses>) {
        stop_workers(&self.stop, self.workers).await;
        let acknowledged = self.acknowledged.lock().await.clone().into_iter().collect();
        (acknowledged, self.reads, self.writes)
    }
}

/// One write of worker `worker`: a create, or (odd workers) an update of a readable item.
async fn write_once(
    app: &Process,
    worker: usize,
    readable: &[i64],
    acknowledged: &Mutex<HashMap<i64, i64>>,
    writes: &Statuses,
) {
    let request = if worker % 2 == 0 {
        app.client.post(app.url("/items"))
    } else {
        let id = readable[fastrand::usize(..readable.len())];
        app.client.put(app.url(&format!("/items/{id}")))
    };
    let rsp = request
        .header("content-type", "application/json")
        .body(format!(r#"{{"name":"written by {worker}"}}"#))
        .send()
        .await;
    let Ok(rsp) = rsp else { return writes.count(0) };
    let status = rsp.status().as_u16();
    writes.count(status);
    if status == 200 || status == 201 {
        let item: serde_json::Value = rsp.json().await.unwrap();
        let id = item["item"]["id"].as_i64().unwrap();
        let version = item["item"]["version"].as_i64().unwrap();
        let mut acknowledged = acknowledged.lock().await;
        let newest = acknowledged.entry(id).or_default();
        *newest = (*newest).max(version);
    }
}

/// The status `GET /items/{id}` answers (0 when there is no answer).
async fn served_status(instance: &Process, id: i64) -> u16 {
    let rsp = instance
        .client
        .get(instance.url(&format!("/items/{id}")))
        .send()
        .await;
    rsp.map_or(0, |r| r.status().as_u16())
}

/// The version of `id` the app serves, if it serves the item.
async fn served_version(app: &Process, id: i64) -> Option<i64> {
    let rsp = app
        .client
        .get(app.url(&format!("/items/{id}")))
        .send()
        .await
        .ok()?;
    if rsp.status() != 200 {
        return None;
    }
    rsp.json::<serde_json::Value>().await.ok()?["item"]["version"].as_i64()
}

/// (b) The app's backends terminated every 250 ms for 10 s under read and write load.
#[tokio::test]
#[ignore = "fault suite: run alone by scripts/test"]
async fn fault_terminated_postgres_backends_never_answer_500_and_reads_succeed() {
    let db = AppDatabase::create().await;
    let prefix = TestRedis::new();
    let app =
        Arc::new(Process::start(&db, &crate::helpers::redis_url(), &prefix.prefix, &[]).await);
    let ids = Arc::new(insert_items(db.db(), 2_000, "failover").await);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(Statuses::default());
    let writes = Arc::new(Statuses::default());
    let statuses = |rsp: Result<reqwest::Response, reqwest::Error>, to: &Statuses| {
        to.count(rsp.map_or(0, |r| r.status().as_u16()));
    };
    let mut workers = spawn_workers(4, &stop, {
        let (app, ids, reads) = (app.clone(), ids.clone(), reads.clone());
        move |worker| {
            let (app, ids, reads) = (app.clone(), ids.clone(), reads.clone());
            async move {
                // Pages miss their cache after every write: they read PostgreSQL.
                let id = ids[fastrand::usize(..ids.len())];
                let path = if worker % 2 == 0 {
                    format!("/items/{id}")
                } else {
                    format!("/items?limit=20&after={id}")
                };
                statuses(app.client.get(app.url(&path)).send().await, &reads);
            }
        }
    });
    workers.extend(spawn_workers(4, &stop, {
        let (app, ids, writes) = (app.clone(), ids.clone(), writes.clone());
        move |worker| {
            let (app, ids, writes) = (app.clone(), ids.clone(), writes.clone());
            async move {
                let request = if worker % 2 == 0 {
                    app.client.post(app.url("/items"))
                } else {
                    let id = ids[fastrand::usize(..ids.len())];
                    app.client.put(app.url(&format!("/items/{id}")))
                };
                let rsp = request
                    .header("content-type", "application/json")
                    .body(r#"{"name":"through a failover"}"#)
                    .send()
                    .await;
                statuses(rsp, &writes);
            }
        }
    }));

    let admin = db.db().client().await;
    let started = Instant::now();
    let mut terminated = 0;
    while started.elapsed() < Duration::from_secs(10) {
        terminated += db.terminate_app_backends(&admin).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop_workers(&stop, workers).await;
    // Afterwards, both work at once.
    let after = app
        .client
        .post(app.url("/items"))
        .header("content-type", "application/json")
        .body(r#"{"name":"after"}"#)
        .send()
        .await
        .unwrap();
    println!(
        "pg_terminate_backend every 250 ms for 10 s: {terminated} backends terminated; \
         reads {} ; writes {}",
        reads.summary(),
        writes.summary()
    );
    assert_eq!(after.status(), 201);
    assert!(terminated > 0);
    assert_eq!(reads.of(500) + writes.of(500), 0, "500s");
    assert_eq!(reads.of(200), reads.total(), "every read answered 200");
    let writes_ok = writes.of(200) + writes.of(201) + writes.of(503);
    assert_eq!(writes_ok, writes.total(), "writes: 200, 201 or 503 only");
    assert!(writes.of(200) + writes.of(201) > 0, "writes went through");
}

/// (c) The list-page walk of issue 21: 20,000 items of 200 four-byte characters, 4 clients
/// paging with `limit=500` from every cursor (each page distinct, ~450 KB), for 10 s.
/// Checked against the code before: resident memory passed 128 MiB after 47 pages
/// (2.6 s), with the L1 gauge at 0; with pages in the budget but each page's JSON grown by
/// doubling (as much again in freed buffers per load), it still reached 137 MiB; and with
/// moka's evictions left to its batches (every 64 writes or 300 ms: a bound passed by as
/// much again for pages of 450 KB), 128–142 MiB once the machine was quiet enough to load
/// 80–150 pages a second.
#[tokio::test]
#[ignore = "fault suite: run alone by scripts/test"]
async fn fault_the_list_page_walk_stays_within_the_l1_budget_plus_64_mib() {
    const L1_MAX_BYTES: u64 = 64 << 20;
    const HEADROOM: u64 = 64 << 20;
    let db = AppDatabase::create().await;
    let prefix = TestRedis::new();
    let budget = L1_MAX_BYTES.to_string();
    let app = Arc::new(
        Process::start(
            &db,
            &crate::helpers::redis_url(),
            &prefix.prefix,
            &[("TIERGATE_CACHE__L1_MAX_BYTES", &budget)],
        )
        .await,
    );
    insert_items(db.db(), 20_000, &"𝄞".repeat(200)).await;
    let at_start = app.rss_bytes();

    let stop = Arc::new(AtomicBool::new(false));
    let pages = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(Statuses::default());
    let next_cursor = Arc::new(AtomicU64::new(0));
    let workers = spawn_workers(4, &stop, {
        let (app, pages, statuses, next_cursor) = (
            app.clone(),
            pages.clone(),
            statuses.clone(),
            next_cursor.clone(),
        );
        move |_| {
            let (app, pages, statuses, next_cursor) = (
                app.clone(),
                pages.clone(),
                statuses.clone(),
                next_cursor.clone(),
            );
            async move {
                let after = next_cursor.fetch_add(1, Ordering::Relaxed) % 20_000;
                let url = app.url(&format!("/items?limit=500&after={after}"));
                match app.client.get(url).send().await {
                    Ok(rsp) => {
                        statuses.count(rsp.status().as_u16());
                        let _ = rsp.bytes().await;
                        pages.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => statuses.count(0),
                }
            }
        }
    });
    let started = Instant::now();
    let mut peak = at_start;
    while started.elapsed() < Duration::from_secs(10) && peak < L1_MAX_BYTES + HEADROOM {
        peak = peak.max(app.rss_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_workers(&stop, workers).await;
    peak = peak.max(app.rss_bytes());
    let l1_bytes = metric(&app.metrics().await, "tiergate_cache_l1_bytes", &[]);
    let mib = |b: u64| b / (1 << 20);
    println!(
        "list-page walk: {} pages of ~450 KB in {:?}, answers {}; resident {} MiB at start, \
         peak {} MiB (bound {} MiB); tiergate_cache_l1_bytes {l1_bytes}",
        pages.load(Ordering::Relaxed),
        started.elapsed(),
        statuses.summary(),
        mib(at_start),
        mib(peak),
        mib(L1_MAX_BYTES + HEADROOM),
    );
    assert_eq!(
        statuses.of(200),
        statuses.total(),
        "every page answered 200"
    );
    assert!(
        peak < L1_MAX_BYTES + HEADROOM,
        "resident memory reached {} MiB",
        mib(peak)
    );
    #[allow(clippy::cast_precision_loss)]
    let within = l1_bytes > 0.0 && l1_bytes <= L1_MAX_BYTES as f64;
    assert!(within, "tiergate_cache_l1_bytes is {l1_bytes}");
}

/// Raises this process's soft limit of open files to at least `wanted` (within the hard
/// limit), so a test holding a thousand connections, and the server it starts (which
/// inherits the limit), do not run out.
fn raise_open_files_limit(wanted: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current >= wanted {
        return;
    }
    let hard = limit.maximum.unwrap_or(u64::MAX);
    assert!(
        hard >= wanted,
        "the hard limit of open files is {hard}; this test needs {wanted}"
    );
    limit.current = Some(wanted);
    setrlimit(Resource::Nofile, limit).expect("raise RLIMIT_NOFILE");
}

/// What ordinary reads saw: how many answered 200 of how many, and latency percentiles.
struct Reads {
    ok: u64,
    total: u64,
    latencies: Vec<Duration>,
}

impl Reads {
    fn percentile(&self, p: f64) -> Duration {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let at = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies.get(at).copied().unwrap_or_default()
    }

    fn summary(&self) -> String {
        #[allow(clippy::cast_precision_loss)]
        let share = self.ok as f64 * 100.0 / self.total.max(1) as f64;
        format!(
            "{} of {} answered 200 ({share:.2} %), p50 {:?}, p99 {:?}, max {:?}",
            self.ok,
            self.total,
            self.percentile(0.50),
            self.percentile(0.99),
            self.latencies.last().copied().unwrap_or_default()
        )
    }

    /// At least 99 % answered 200, with a p99 under 50 ms.
    fn assert_served(&self) {
        assert!(
            self.total > 0 && self.ok * 100 >= self.total * 99,
            "{}",
            self.summary()
        );
        assert!(
            self.percentile(0.99) < Duration::from_millis(50),
            "{}",
            self.summary()
        );
    }
}

/// `workers` clients reading `url` over keep-alive connections for `lasting`.
async fn read_for(url: &str, workers: usize, lasting: Duration) -> Reads {
    let until = Instant::now() + lasting;
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            let (client, url) = (reqwest::Client::new(), url.to_owned());
            tokio::spawn(async move {
                let (mut ok, mut total, mut latencies) = (0, 0, Vec::new());
                while Instant::now() < until {
                    let sent = Instant::now();
                    let status = match client.get(&url).send().await {
                        Ok(rsp) => {
                            let status = rsp.status();
                            let _ = rsp.bytes().await;
                            status.as_u16()
                        }
                        Err(_) => 0,
                    };
                    latencies.push(sent.elapsed());
                    total += 1;
                    ok += u64::from(status == 200);
                }
                (ok, total, latencies)
            })
        })
        .collect();
    let mut reads = Reads {
        ok: 0,
        total: 0,
        latencies: Vec::new(),
    };
    for task in tasks {
        let (ok, total, latencies) = task.await.unwrap();
        reads.ok += ok;
        reads.total += total;
        reads.latencies.extend(latencies);
    }
    reads.latencies.sort_unstable();
    reads
}

/// Reads one response head (to its blank line) and returns its status; 0 if the
/// connection ends first.
async fn read_status(stream: &mut tokio::net::TcpStream) -> u16 {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return 0,
        }
    }
    String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// (e) 1,030 clients each start `POST /items` with `Content-Length: 60000` and then send
/// a byte every 2 s (the tester's attack: one slow client machine), while 8 clients read
/// an item L1 holds for 5 s. Each upload is seen being read (`100 Continue`) before the
/// reads start. Checked against the code that took the permit before the body was in:
/// 1,024 uploads held every permit of `http.max_in_flight` and the reads answered 503.
#[tokio::test]
#[ignore = "fault suite: run alone by scripts/test"]
async fn fault_1000_slow_request_bodies_leave_l1_hit_gets_at_99_percent_200_under_50_ms() {
    const UPLOADS: usize = 1_030;
    raise_open_files_limit(4 * UPLOADS as u64 + 1024);
    let db = AppDatabase::create().await;
    let prefix = TestRedis::new();
    let app = Process::start(
        &db,
        &crate::helpers::redis_url(),
        &prefix.prefix,
        // Longer than the test: the uploads are never cut while the reads run.
        &[("TIERGATE_HTTP__BODY_READ_TIMEOUT", "60s")],
    )
    .await;
    let id = insert_items(db.db(), 1, "hat").await[0];
    let item = app.url(&format!("/items/{id}"));
    assert_eq!(app.client.get(&item).send().await.unwrap().status(), 200);

    let stop = Arc::new(AtomicBool::new(false));
    let (read, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut uploads = tokio::task::JoinSet::new();
    for _ in 0..UPLOADS {
        let (addr, stop, read, refused) = (app.http, stop.clone(), read.clone(), refused.clone());
        uploads.spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                refused.fetch_add(1, Ordering::Relaxed);
                return;
            };
            let head = b"POST /items HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                         Content-Length: 60000\r\nExpect: 100-continue\r\n\r\n";
            if stream.write_all(head).await.is_err() || read_status(&mut stream).await != 100 {
                refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            read.fetch_add(1, Ordering::Relaxed);
            while !stop.load(Ordering::Relaxed) {
                if stream.write_all(b" ").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while read.load(Ordering::Relaxed) + refused.load(Ordering::Relaxed) < UPLOADS as u64 {
        assert!(
            Instant::now() < deadline,
            "the uploads did not all start in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let reads = read_for(&item, 8, Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    println!(
        "slow bodies: {} of {UPLOADS} uploads being read, {} refused; L1-hit GETs meanwhile: {}",
        read.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
        reads.summary()
    );
    uploads.abort_all();
    assert_eq!(
        read.load(Ordering::Relaxed),
        UPLOADS as u64,
        "every upload is read"
    );
    reads.assert_served();
}

/// (f) 1,100 requests held by a slow upstream (30 s) at once, while 8 clients read an
/// item L1 holds for 5 s. Checked against one budget for both (`http.max_in_flight`
/// counting proxied requests): the upstream held 1,024 and `/items` answered 503.
#[tokio::test]
#[ignore = "fault suite: run alone by scripts/test"]
async fn fault_1100_requests_to_a_slow_upstream_leave_items_at_99_percent_200_under_50_ms() {
    const HELD: usize = 1_100;
    raise_open_files_limit(4 * HELD as u64 + 1024);
    let upstream = crate::upstream::Upstream::slow("slow", Duration::from_secs(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tiergate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[routes]]
name = "items"
path = "/items"
app = true

[[routes]]
name = "slow"
path = "/slow"
upstream = "slow"

[[upstreams]]
name = "slow"
targets = ["{}"]
response_timeout = "60s"
request_timeout = "60s"
"#,
            upstream.target()
        ),
    )
    .unwrap();
    let db = AppDatabase::create().await;
    let prefix = TestRedis::new();
    let config = config.to_string_lossy().into_owned();
    let app = Process::start(
        &db,
        &crate::helpers::redis_url(),
        &prefix.prefix,
        &[("TIERGATE_CONFIG", &config)],
    )
    .await;
    let id = insert_items(db.db(), 1, "hat").await[0];
    let item = app.url(&format!("/items/{id}"));
    assert_eq!(app.client.get(&item).send().await.unwrap().status(), 200);

    let answered = Arc::new(Statuses::default());
    let mut held = tokio::task::JoinSet::new();
    let client = reqwest::Client::new();
    for _ in 0..HELD {
        let (client, url, answered) = (client.clone(), app.url("/slow/x"), answered.clone());
        held.spawn(async move {
            match client.get(url).send().await {
                Ok(rsp) => answered.count(rsp.status().as_u16()),
                Err(_) => answered.count(0),
            }
        });
    }
    // Every request is either held by the upstream or already answered.
    let deadline = Instant::now() + Duration::from_secs(30);
    while upstream.in_flight() + usize::try_from(answered.total()).unwrap() < HELD {
        assert!(
            Instant::now() < deadline,
            "{} held and {} answered after 30 s",
            upstream.in_flight(),
            answered.total()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let reads = read_for(&item, 8, Duration::from_secs(5)).await;
    println!(
        "slow upstream: {} of {HELD} requests held by it, the rest answered {}; \
         L1-hit GETs meanwhile: {}",
        upstream.in_flight(),
        answered.summary(),
        reads.summary()
    );
    held.abort_all();
    reads.assert_served();
}
