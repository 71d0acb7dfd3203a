//! Test support shared by the crates' integration tests (feature `testing`): a database
//! and a Redis key prefix of their own per test, pause points, and counting queries from
//! PostgreSQL's side.
//!
//! Tests use the real PostgreSQL and Redis named by `TIERGATE_TEST_DATABASE_URL` (a role
//! that may create databases) and `TIERGATE_TEST_REDIS_URL`; `scripts/test` sets both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fred::prelude::*;
use tiergate_config::{Secret, Settings};
use tokio::sync::Notify;
use tokio_postgres::NoTls;

use crate::cache::l1::{L1, Policy};
use crate::cache::l2::L2;
use crate::hooks::{Hooks, Point};
use crate::service::Items;
use crate::store::Database;

/// A PostgreSQL URL with rights to create databases.
pub fn admin_database_url() -> String {
    std::env::var("TIERGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The Redis the tests use.
pub fn redis_url() -> String {
    std::env::var("TIERGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

/// Connects a plain client (its connection task runs on the current runtime).
///
/// # Panics
/// When PostgreSQL is unreachable: a test cannot go on.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// A database of its own, dropped (with its connections) when the value is dropped.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates an empty database.
    ///
    /// # Panics
    /// When PostgreSQL refuses.
    pub async fn create() -> Self {
        let name = unique("tiergate_test");
        let admin = admin_database_url();
        let client = connect(&admin).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// A client connected to this database, for set-up and checks from PostgreSQL's side.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Inserts an item behind the app's back (every cache tier is cold for it); returns
    /// its id.
    ///
    /// # Panics
    /// When PostgreSQL refuses (not migrated yet, for one).
    pub async fn insert_item(&self, name: &str) -> i64 {
        let client = self.client().await;
        let row = client
            .query_one(
                "INSERT INTO items (name) VALUES ($1) RETURNING id",
                &[&name],
            )
            .await
            .expect("insert an item");
        row.get(0)
    }

    /// Scans of the `items` table as PostgreSQL counts them: the number of queries that
    /// read it (see [`TestDb::publish_statistics`]).
    ///
    /// # Panics
    /// When PostgreSQL refuses, or the backends do not exit within 10 s.
    pub async fn items_table_scans(&self) -> i64 {
        self.publish_statistics().await;
        let client = self.client().await;
        client
            .query_one(
                "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'items'",
                &[],
            )
            .await
            .expect("read table statistics")
            .get(0)
    }

    /// Transactions committed in this database as PostgreSQL counts them (every query
    /// outside an explicit transaction is one), read from another database so that the
    /// reading is not counted (see [`TestDb::publish_statistics`]).
    ///
    /// # Panics
    /// When PostgreSQL refuses, or the backends do not exit within 10 s.
    pub async fn committed_transactions(&self) -> i64 {
        self.publish_statistics().await;
        let client = connect(&admin_database_url()).await;
        client
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
                &[&self.name],
            )
            .await
            .expect("read database statistics")
            .get(0)
    }

    /// Backends publish their statistics when they exit (otherwise up to seconds
    /// later), so this ends every connection to the database (pools reconnect on
    /// demand) and waits until they are gone.
    async fn publish_statistics(&self) {
        let client = connect(&admin_database_url()).await;
        let others = "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()";
        client
            .execute(
                &format!("SELECT pg_terminate_backend(pid) {others}"),
                &[&self.name],
            )
            .await
            .expect("terminate backends");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left: i64 = client
                .query_one(&format!("SELECT count(*) {others}"), &[&self.name])
                .await
                .expect("count backends")
                .get(0);
            if left == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "backends did not exit");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        clean_up_on_admin_database(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

/// Runs `statement` on the admin database from a `Drop`, which cannot await (its error is
/// ignored: a cleanup that fails leaves a name no other test uses).
pub fn clean_up_on_admin_database(statement: String) {
    block_on_own_thread(async move {
        let client = connect(&admin_database_url()).await;
        let _ = client.batch_execute(&statement).await;
    });
}

/// Runs `cleanup` to its end on a runtime of its own, on a thread of its own: the
/// dropping thread may be inside a runtime already. Without a runtime it is skipped.
fn block_on_own_thread(cleanup: impl Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(cleanup);
        }
    })
    .join();
}

/// A Redis key prefix of its own; its keys are deleted when the value is dropped.
#[derive(Debug)]
pub struct TestRedis {
    pub prefix: String,
}

impl TestRedis {
    /// A fresh prefix.
    pub fn new() -> Self {
        Self {
            prefix: unique("test"),
        }
    }
}

impl Default for TestRedis {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let pattern = format!("{}:*", self.prefix);
        block_on_own_thread(async move {
            let Ok(config) = Config::from_url(&redis_url()) else {
                return;
            };
            let Ok(client) = Builder::from_config(config).build() else {
                return;
            };
            if client.init().await.is_err() {
                return;
            }
            // Test prefixes hold a handful of keys: KEYS is fine here, never in the app.
            let _: Result<i64, _> = client
                .eval(
                    "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end return 0",
                    Vec::<String>::new(),
                    vec![pattern],
                )
                .await;
            let _ = client.quit().await;
        });
    }
}

/// Settings for an instance on port 0 against these backends, migrating at start.
pub fn settings(db: &TestDb, redis: &TestRedis) -> Settings {
    let mut settings = Settings::for_tests();
    settings.database.url = Secret::new(db.url.clone());
    settings.database.migrate_on_start = true;
    settings.redis.url = Secret::new(redis_url());
    settings.redis.key_prefix = redis.prefix.clone();
    settings
}

/// An L1 policy: entries live `ttl`, degraded or not; a stale one serves `max_stale` longer
/// while the backends fail; no background refresh.
pub fn policy(ttl: Duration, max_stale: Duration) -> Policy {
    Policy {
        ttl,
        degraded_ttl: ttl,
        max_stale,
        refresh_after: Duration::ZERO,
    }
}

/// Starts `app`'s background work and waits until it is ready.
///
/// # Panics
/// When it is not ready within 30 s.
pub async fn start_ready(app: &crate::App) {
    app.start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !app.is_ready() {
        assert!(
            Instant::now() < deadline,
            "the app was not ready within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One "task" of the items service over `settings`: an L1 of its own with `policy`
/// (not degraded: tests that need the bus start one), the database and Redis the
/// settings name. Connects nothing yet; it does not migrate.
///
/// # Panics
/// When a URL in the settings does not parse.
pub fn items(settings: &Settings, policy: Policy, hooks: Hooks) -> Items {
    let database = Database::new(&settings.database).expect("database settings");
    let l1 = L1::new(16 << 20, policy);
    l1.set_degraded(false);
    let l2 = L2::connect(&settings.redis, settings.cache.l2_ttl).expect("redis settings");
    Items::new(database, l1, l2, &settings.cache, hooks)
}

/// One-shot pauses at [`Point`]s, armed by a test: the first operation to reach an armed
/// point for its key waits there until the test releases it. Points not armed, and later
/// arrivals, pass straight through.
#[derive(Debug, Default)]
pub struct Pauses {
    armed: Mutex<HashMap<(Point, i64), Arc<Gate>>>,
    /// How often each point was passed, by id.
    passed: Mutex<HashMap<(Point, i64), usize>>,
}

/// One armed pause.
#[derive(Debug, Default)]
pub struct Gate {
    arrived: Notify,
    release: Notify,
}

impl Gate {
    /// Waits until an operation has reached the point and is paused there.
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    /// Lets the paused operation go on (or the next one to arrive, if none is there yet).
    pub fn release(&self) {
        self.release.notify_one();
    }
}

impl Pauses {
    /// No pause armed yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Arms a pause at `point` for `id`.
    ///
    /// # Panics
    /// When a test panicked while holding the lock.
    pub fn arm(&self, point: Point, id: i64) -> Arc<Gate> {
        let gate = Arc::new(Gate::default());
        self.armed
            .lock()
            .expect("pauses lock")
            .insert((point, id), Arc::clone(&gate));
        gate
    }

    /// Disarms a pause no operation reached.
    ///
    /// # Panics
    /// When a test panicked while holding the lock.
    pub fn disarm(&self, point: Point, id: i64) {
        self.armed.lock().expect("pauses lock").remove(&(point, id));
    }

    /// How many operations have passed `point` for `id` (paused or not).
    ///
    /// # Panics
    /// When a test panicked while holding the lock.
    pub fn passed(&self, point: Point, id: i64) -> usize {
        let passed = self.passed.lock().expect("pauses lock");
        passed.get(&(point, id)).copied().unwrap_or(0)
    }

    /// Hooks that count every point passed and pause at the armed ones.
    pub fn hooks(self: &Arc<Self>) -> Hooks {
        let pauses = Arc::clone(self);
        Hooks::new(move |point, id| {
            if let Ok(mut passed) = pauses.passed.lock() {
                *passed.entry((point, id)).or_default() += 1;
            }
            let gate = pauses
                .armed
                .lock()
                .ok()
                .and_then(|mut armed| armed.remove(&(point, id)));
            async move {
                if let Some(gate) = gate {
                    gate.arrived.notify_one();
                    gate.release.notified().await;
                }
            }
        })
    }
}

/// A private `redis-server` on a free loopback port, for tests that kill or restart
/// Redis (the shared one serves every other test). Stopped when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    ///
    /// # Panics
    /// When `redis-server` is not installed or does not start within 10 s.
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::start_on(port)
    }

    /// Starts one on `port` (e.g. again, after [`RedisServer::stop`]).
    ///
    /// # Panics
    /// When `redis-server` is not installed or does not start within 10 s.
    pub fn start_on(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, port }
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would) and waits for it to exit.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the server (`SIGSTOP`): connections stay open and nothing answers, as a
    /// Redis that hangs.
    ///
    /// # Panics
    /// When the signal cannot be sent.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Lets a frozen server go on (`SIGCONT`).
    ///
    /// # Panics
    /// When the signal cannot be sent.
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// Sends `SIG{name}` with the shell's `kill` builtin (a fresh Debian has no `procps`).
    fn signal(&self, name: &str) {
        let sent = std::process::Command::new("sh")
            .args(["-c", &format!("kill -{name} {}", self.child.id())])
            .status()
            .expect("run sh");
        assert!(sent.success(), "kill -{name} failed");
    }
}

/// A Redis cluster of three masters on loopback, for the cluster-mode paths (sharded
/// pub/sub). Stopped, and its node files removed, on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<std::process::Child>,
    ports: Vec<u16>,
}

impl RedisCluster {
    /// Starts the nodes, joins them into a cluster and waits until it serves.
    ///
    /// # Panics
    /// When `redis-server` or `redis-cli` is missing or the cluster is not up in 20 s.
    pub fn start() -> Self {
        let ports: Vec<u16> = (0..3)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .expect("a free port")
                    .port()
            })
            .collect();
        let nodes = ports
            .iter()
            .map(|port| {
                std::process::Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args([
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--cluster-enabled",
                        "yes",
                    ])
                    .args(["--cluster-config-file", &Self::node_file(*port)])
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("start redis-server")
            })
            .collect();
        let cluster = Self { nodes, ports };
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in &cluster.ports {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let addresses: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let created = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(created.success(), "redis-cli --cluster create failed");
        // Up means every node says so and all agree on who owns which slots: while the
        // nodes still gossip, a publisher and a subscriber may route the same channel to
        // different nodes, and a sharded message stays on the node it was sent to.
        while !cluster.converged() {
            assert!(Instant::now() < deadline, "the cluster did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    fn converged(&self) -> bool {
        let ask = |port: u16, what: &str| {
            std::process::Command::new("redis-cli")
                .args(["-p", &port.to_string(), "cluster", what])
                .output()
                .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
                .unwrap_or_default()
        };
        let all_ok = self.ports.iter().all(|port| {
            let info = ask(*port, "info");
            info.contains("cluster_state:ok")
                && info.contains("cluster_slots_ok:16384")
                && info.contains(&format!("cluster_known_nodes:{}", self.ports.len()))
        });
        let maps: Vec<String> = self.ports.iter().map(|port| ask(*port, "slots")).collect();
        all_ok && maps.iter().all(|map| !map.is_empty() && *map == maps[0])
    }

    fn node_file(port: u16) -> String {
        std::env::temp_dir()
            .join(format!("tiergate-cluster-{port}.conf"))
            .display()
            .to_string()
    }

    /// `redis-cluster://` with every node, as `redis.url` takes it.
    pub fn url(&self) -> String {
        let first = self.ports[0];
        let others: Vec<String> = self.ports[1..]
            .iter()
            .map(|p| format!("node=127.0.0.1:{p}"))
            .collect();
        format!("redis-cluster://127.0.0.1:{first}?{}", others.join("&"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
        for port in &self.ports {
            let _ = std::fs::remove_file(Self::node_file(*port));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A streaming replica of the test PostgreSQL, made by `scripts/pg-replica`.
///
/// A replica replays every database of its primary, so tests that only read through it
/// can share one: [`Replica::shared`], the one `scripts/services --replica` runs. A test
/// that pauses replay (standing for lag) or stops the replica (an outage) would disturb
/// every other test reading it, so it owns one: [`Replica::start`], on a free port and in
/// a directory of its own, removed when dropped.
#[derive(Debug)]
pub struct Replica {
    /// A URL of the replica with some database, as the environment gave it.
    base_url: String,
    /// The data directory of a replica this value owns; `None` for the shared one.
    dir: Option<std::path::PathBuf>,
}

const PG_REPLICA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/pg-replica");

/// Runs `scripts/pg-replica` with `args` against the test PostgreSQL.
fn pg_replica(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(PG_REPLICA)
        .args(args)
        .env("TIERGATE_PG_PRIMARY_URL", admin_database_url())
        .output()
        .map_err(|e| format!("cannot run {PG_REPLICA}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "scripts/pg-replica {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Replica {
    /// The shared replica, at `TIERGATE_TEST_REPLICA_URL` (`scripts/test` sets it; default
    /// `postgres://postgres:postgres@127.0.0.1:5433/postgres`). Never pause or stop it.
    pub fn shared() -> Self {
        Self {
            base_url: std::env::var("TIERGATE_TEST_REPLICA_URL").unwrap_or_else(|_| {
                "postgres://postgres:postgres@127.0.0.1:5433/postgres".to_owned()
            }),
            dir: None,
        }
    }

    /// Makes and starts a replica of its own in a new directory under `parent` (a test
    /// passes `env!("CARGO_TARGET_TMPDIR")`), and waits until it answers. Takes a few
    /// seconds: it copies the whole primary.
    ///
    /// # Panics
    /// When the replica cannot be made (the message says why).
    pub async fn start(parent: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::path::Path::new(parent).join(unique("replica"));
        let replica = Self {
            base_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir: Some(dir),
        };
        replica
            .run(&["start", &replica.dir_arg(), &port.to_string()])
            .await;
        replica
    }

    fn dir_arg(&self) -> String {
        self.dir
            .as_ref()
            .expect("only a replica of its own can be started and stopped")
            .display()
            .to_string()
    }

    async fn run(&self, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let outcome = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            pg_replica(&args)
        })
        .await
        .expect("scripts/pg-replica ran");
        if let Err(message) = outcome {
            panic!("{message}");
        }
    }

    /// The port it listens on.
    ///
    /// # Panics
    /// When the URL names no port.
    pub fn port(&self) -> u16 {
        let authority = self.base_url.split('/').nth(2).unwrap_or_default();
        authority
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .expect("a replica URL with a port")
    }

    /// The URL of `db` on the replica. Call [`Replica::catch_up`] first after creating
    /// or migrating the database.
    pub fn url(&self, db: &TestDb) -> String {
        let base = self
            .base_url
            .rsplit_once('/')
            .map_or(self.base_url.as_str(), |(base, _)| base);
        format!("{base}/{}", db.name)
    }

    async fn admin(&self) -> tokio_postgres::Client {
        match tokio_postgres::connect(&self.base_url, NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                client
            }
            Err(error) if self.dir.is_none() => panic!(
                "the shared replica does not answer ({error}); start it with `scripts/services --replica`, or set TIERGATE_TEST_REPLICA_URL"
            ),
            Err(error) => panic!("the replica does not answer: {error}"),
        }
    }

    /// Waits until the replica has replayed everything the primary has flushed now.
    ///
    /// # Panics
    /// When it has not within 60 s.
    pub async fn catch_up(&self) {
        let primary = connect(&admin_database_url()).await;
        let flushed: tokio_postgres::types::PgLsn = primary
            .query_one("SELECT pg_current_wal_flush_lsn()", &[])
            .await
            .expect("the primary's WAL position")
            .get(0);
        let replica = self.admin().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let replayed: Option<tokio_postgres::types::PgLsn> = replica
                .query_one("SELECT pg_last_wal_replay_lsn()", &[])
                .await
                .expect("the replica's replay position")
                .get(0);
            if replayed.is_some_and(|r| r >= flushed) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica did not catch up within 60 s (is its replay paused?)"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Pauses replay: from now on the replica falls behind every write (lag).
    ///
    /// # Panics
    /// On the shared replica, or when PostgreSQL refuses.
    pub async fn pause_replay(&self) {
        assert!(self.dir.is_some(), "never pause the shared replica");
        let replica = self.admin().await;
        replica
            .execute("SELECT pg_wal_replay_pause()", &[])
            .await
            .expect("pause replay");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state: String = replica
                .query_one("SELECT pg_get_wal_replay_pause_state()", &[])
                .await
                .expect("replay pause state")
                .get(0);
            if state == "paused" {
                return;
            }
            assert!(Instant::now() < deadline, "replay did not pause");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resumes replay (it catches up on its own; [`Replica::catch_up`] waits for it).
    ///
    /// # Panics
    /// When PostgreSQL refuses.
    pub async fn resume_replay(&self) {
        self.admin()
            .await
            .execute("SELECT pg_wal_replay_resume()", &[])
            .await
            .expect("resume replay");
    }

    /// Stops the replica (fast shutdown: connections are cut), as an outage would.
    ///
    /// # Panics
    /// On the shared replica, or when it cannot be stopped.
    pub async fn stop(&self) {
        self.run(&["stop", &self.dir_arg()]).await;
    }

    /// Starts a stopped replica again, on its port, with its data.
    ///
    /// # Panics
    /// On the shared replica, or when it does not come back.
    pub async fn restart(&self) {
        self.run(&["start", &self.dir_arg(), &self.port().to_string()])
            .await;
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            if let Err(message) = pg_replica(&["remove", &dir.display().to_string()]) {
                eprintln!("{message}");
            }
        }
    }
}
