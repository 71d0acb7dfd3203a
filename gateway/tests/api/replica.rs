//! Read replicas end to end: real `tiergate` processes reading through a real streaming
//! replica of the test PostgreSQL, whose replay the test pauses (standing for lag) and
//! which it stops (a reader outage). Each test owns its replica: pausing or stopping a
//! shared one would disturb every other test reading through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use app_core::testing::Replica;
use fred::prelude::*;

use crate::helpers::{Backends, json_body, redis_url};
use crate::shutdown::Task;

/// A task with default settings (but those in `vars`) reading through `replica`.
async fn start_task(backends: &Backends, replica: &Replica, vars: &[(&str, &str)]) -> Task {
    let reader_url = replica.url(&backends.db);
    let mut all = vec![("DATABASE_READER_URL", reader_url.as_str())];
    all.extend_from_slice(vars);
    Task::start_subscribed(backends, &all).await
}

/// The version a task serves for `id`, and where from (`source`).
async fn read(client: &reqwest::Client, task: &Task, id: i64) -> (i64, String) {
    let rsp = client
        .get(task.url(&format!("/items/{id}")))
        .send()
        .await
        .expect("GET");
    assert_eq!(rsp.status(), 200);
    let body = json_body(rsp).await;
    let version = body["item"]["version"].as_i64().expect("a version");
    (
        version,
        body["source"].as_str().unwrap_or_default().to_owned(),
    )
}

async fn write(client: &reqwest::Client, task: &Task, id: Option<i64>, name: &str) -> (i64, i64) {
    let body = serde_json::json!({ "name": name }).to_string();
    let request = match id {
        Some(id) => client.put(task.url(&format!("/items/{id}"))),
        None => client.post(task.url("/items")),
    };
    let rsp = request
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("write");
    assert!(rsp.status().is_success(), "write: {}", rsp.status());
    let item = json_body(rsp).await["item"].clone();
    (
        item["id"].as_i64().expect("an id"),
        item["version"].as_i64().expect("a version"),
    )
}

async fn redis_client() -> Client {
    let client = Builder::from_config(Config::from_url(&redis_url()).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    client
}

/// Every version Redis holds for one key, sampled about once a millisecond from when it
/// starts until it is stopped.
struct RedisWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Option<i64>>>,
}

impl RedisWatch {
    fn start(client: Client, key: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let version: Option<i64> = client.hget(&key, "ver").await.unwrap();
                    if seen.last() != Some(&version) {
                        seen.push(version);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                seen
            }
        });
        Self { stop, task }
    }

    /// The versions seen, in order, each run of equal samples once.
    async fn stop(self) -> Vec<Option<i64>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// The scenario with the default settings. Tasks A and B read through a
/// replica; replay pauses; A updates item 1 → 2; Redis evicts the key; a new task C,
/// which never saw the invalidation, reads it; replay resumes; a task D starts.
///
/// The promise: a read that starts after the write was acknowledged never returns v1
/// while a replica lags, and so never fills Redis with it — at once, not after any TTL.
/// A reads its own write; C and D read v2 on their first read (C's miss waits at most
/// `database.reader_max_lag`, 500 ms, for the replica, then the writer answers); B
/// reads v2 as soon as the invalidation reaches it (milliseconds; 1 s allowed here).
/// Redis holds nothing older than v2 from the eviction on.
///
/// Checked: with the reader's proof accepting any replay position (`if true || replayed
/// >= writer_at` in `store::replica`), C serves v1 and fills Redis with it, and after
/// replay resumed C and D still serve v1 from the cache — the bug as the issue found it.
#[tokio::test]
async fn a_lagging_replica_never_puts_an_old_version_back_into_redis() {
    let replica = Replica::start(env!("CARGO_TARGET_TMPDIR")).await;
    let backends = Backends::new().await;
    let (a, b) = tokio::join!(
        start_task(&backends, &replica, &[]),
        start_task(&backends, &replica, &[])
    );
    replica.catch_up().await;
    let client = reqwest::Client::new();
    let (id, _) = write(&client, &a, None, "r9").await;
    replica.catch_up().await;
    for task in [&a, &b] {
        assert_eq!(read(&client, task, id).await.0, 1, "every task caches v1");
    }

    replica.pause_replay().await;
    assert_eq!(write(&client, &a, Some(id), "r9-new").await.1, 2);
    let redis = redis_client().await;
    let key = format!("{}:c1:item:{id}", backends.redis.prefix);
    let _: i64 = redis.del(&key).await.unwrap(); // evicted, fence and all
    let watch = RedisWatch::start(redis.clone(), key.clone());

    let c = start_task(&backends, &replica, &[]).await;
    let started = Instant::now();
    assert_eq!(
        read(&client, &c, id).await.0,
        2,
        "a new task does not serve the lagging replica's v1"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "C waited {:?}",
        started.elapsed()
    );
    assert_eq!(read(&client, &a, id).await.0, 2, "A reads its write");
    let deadline = Instant::now() + Duration::from_secs(1);
    while read(&client, &b, id).await.0 != 2 {
        assert!(
            Instant::now() < deadline,
            "B still serves v1 1 s after the write"
        );
    }

    replica.resume_replay().await;
    replica.catch_up().await;
    let d = start_task(&backends, &replica, &[]).await;
    for (name, task) in [("A", &a), ("B", &b), ("C", &c), ("D", &d)] {
        assert_eq!(
            read(&client, task, id).await.0,
            2,
            "{name} after replay resumed"
        );
    }
    let seen = watch.stop().await;
    assert!(
        seen.iter().all(|version| version.is_none_or(|v| v >= 2)),
        "Redis held an older version after the fence was evicted: {seen:?}"
    );
    let held: Option<i64> = redis.hget(&key, "ver").await.unwrap();
    assert_eq!(held, Some(2));
}

/// The value of one series in Prometheus text, 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(client: &reqwest::Client, task: &Task) -> String {
    let rsp = client
        .get(format!("http://{}/metrics", task.admin))
        .send()
        .await
        .expect("GET /metrics");
    rsp.text().await.expect("metrics text")
}

const ANSWERED: &str = "tiergate_db_reader_reads_total";

fn moved(reason: &str) -> String {
    format!("tiergate_db_reads_moved_to_writer_total{{reason=\"{reason}\"}}")
}

/// Waits until the series has grown by at least `by`; fails after `within`.
async fn wait_for_growth(
    client: &reqwest::Client,
    task: &Task,
    series: &str,
    by: f64,
    within: Duration,
) {
    let from = metric(&metrics(client, task).await, series);
    let deadline = Instant::now() + within;
    loop {
        let now = metric(&metrics(client, task).await, series);
        if now >= from + by {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} went from {from} to {now} in {within:?}, expected +{by}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads of `ids` by `workers` loops until stopped, counting what did not get a 200.
struct ReadLoad {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl ReadLoad {
    fn start(client: &reqwest::Client, task: &Task, ids: &[i64], workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let urls: Arc<Vec<String>> = Arc::new(
            ids.iter()
                .map(|id| task.url(&format!("/items/{id}")))
                .collect(),
        );
        let workers = (0..workers)
            .map(|worker| {
                let (client, urls) = (client.clone(), urls.clone());
                let (stop, failed) = (stop.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut next = worker;
                    while !stop.load(Ordering::Relaxed) {
                        let url = &urls[next % urls.len()];
                        next += 1;
                        match client.get(url).send().await {
                            Ok(rsp) if rsp.status() == 200 => {}
                            _ => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            failed,
            workers,
        }
    }

    /// Stops the load; returns how many reads failed.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.unwrap();
        }
        self.failed.load(Ordering::Relaxed)
    }
}

/// Under steady read load that reaches the database (L1 and L2 live 1 s), the replica is
/// stopped for 5 s and started again, then its replay is paused: no read fails (nor a
/// list page); while it is down, reads go to the writer (counted `down`); once it is
/// back, reads return to it by themselves; while its lag exceeds
/// `database.reader_max_lag` (300 ms here), reads go to the writer (counted `lagging`)
/// and `tiergate_db_reader_lag_seconds` shows the lag.
///
/// Checked: with `Reader::get` failing the read instead of moving it to the writer when
/// the reader is down (`Failure::Down => return Err(StoreError::Unavailable(None))`),
/// reads fail during the outage.
#[tokio::test]
async fn a_reader_outage_fails_no_read_and_lag_moves_reads_to_the_writer() {
    let replica = Replica::start(env!("CARGO_TARGET_TMPDIR")).await;
    let backends = Backends::new().await;
    let vars = [
        ("TIERGATE_CACHE__L1_TTL", "1s"),
        ("TIERGATE_CACHE__L2_TTL", "1s"),
        ("TIERGATE_CACHE__REFRESH_AFTER", "0s"),
        // No stale entry to fall back on: a read the database fails is a failed read.
        ("TIERGATE_CACHE__MAX_STALE", "0s"),
        ("TIERGATE_DATABASE__READER_MAX_LAG", "300ms"),
    ];
    let task = start_task(&backends, &replica, &vars).await;
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 0..40 {
        ids.push(write(&client, &task, None, &format!("item {n}")).await.0);
    }
    replica.catch_up().await;
    let load = ReadLoad::start(&client, &task, &ids, 4);
    let within = Duration::from_secs(15);
    wait_for_growth(&client, &task, ANSWERED, 20.0, within).await;

    replica.stop().await;
    wait_for_growth(&client, &task, &moved("down"), 1.0, within).await;
    tokio::time::sleep(Duration::from_secs(5)).await; // the outage lasts 5 s
    let page = client
        .get(task.url("/items?limit=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200, "a list page while the replica is down");
    let text = metrics(&client, &task).await;
    assert_eq!(
        metric(&text, "tiergate_db_reader_up"),
        0.0,
        "down while stopped"
    );
    replica.restart().await;
    wait_for_growth(&client, &task, ANSWERED, 20.0, within).await;
    assert_eq!(
        metric(&metrics(&client, &task).await, "tiergate_db_reader_up"),
        1.0
    );

    replica.pause_replay().await;
    // A write the replica does not replay puts the writer ahead of it.
    write(&client, &task, Some(ids[0]), "moved on").await;
    wait_for_growth(&client, &task, &moved("lagging"), 20.0, within).await;
    let lag = metric(
        &metrics(&client, &task).await,
        "tiergate_db_reader_lag_seconds",
    );
    assert!(lag > 0.3, "lag {lag} s while replay is paused");
    replica.resume_replay().await;
    wait_for_growth(&client, &task, ANSWERED, 20.0, within).await;

    assert_eq!(load.stop().await, 0, "reads failed");
}
