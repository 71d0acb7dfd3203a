//! Test harness: a throw-away database and Redis prefix per test, the server started on
//! port 0 in process (or the real binary, for process-level behaviour).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fred::prelude::*;
use tiergate_config::{Secret, Settings};
use tokio::sync::oneshot;
use tokio_postgres::NoTls;

/// A PostgreSQL URL with rights to create databases (its database is only used to run
/// `CREATE DATABASE`).
pub fn admin_database_url() -> String {
    std::env::var("TIERGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("TIERGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

/// A port on loopback where nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// A database of its own, dropped (with its connections) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
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

    /// A client connected to this test's database, for set-up and checks from
    /// PostgreSQL's side.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async context guarantees: use a runtime of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let client = connect(&admin_database_url()).await;
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Deletes every key under a prefix when dropped.
pub struct TestRedis {
    pub prefix: String,
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let pattern = format!("{}:*", self.prefix);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async {
                let Ok(config) = Config::from_url(&redis_url()) else { return };
                let Ok(client) = Builder::from_config(config).build() else { return };
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
        })
        .join();
    }
}

/// A server running in this test's runtime.
pub struct TestApp {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTPS listener, when the settings asked for one.
    pub https: Option<SocketAddr>,
    /// Its certificates.
    pub certs: Option<std::sync::Arc<gateway::tls::CertStore>>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// A database and a Redis prefix for one test, shared by the servers it starts.
pub struct Backends {
    pub db: TestDb,
    pub redis: TestRedis,
}

impl Backends {
    pub async fn new() -> Self {
        Self {
            db: TestDb::create().await,
            redis: TestRedis {
                prefix: unique("test"),
            },
        }
    }

    /// Settings for a server on port 0 against these backends.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::for_tests();
        settings.database.url = Secret::new(self.db.url.clone());
        settings.database.migrate_on_start = true;
        settings.redis.url = Secret::new(redis_url());
        settings.redis.key_prefix = self.redis.prefix.clone();
        settings
    }
}

impl TestApp {
    /// Starts a server with `settings` and waits until `/readyz` says 200.
    pub async fn start(settings: Settings) -> Self {
        let app = Self::start_unready(settings).await;
        app.wait_ready().await;
        app
    }

    /// Starts a server without waiting for readiness.
    pub async fn start_unready(settings: Settings) -> Self {
        let server = gateway::Server::bind(&settings)
            .await
            .expect("bind the server");
        let addr = server.http_addr().expect("http addr");
        let admin = server.admin_addr().expect("admin addr");
        let https = server.https_addr().expect("https addr");
        let certs = server.cert_store();
        let (stop, stopped) = oneshot::channel();
        let server = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            admin,
            https,
            certs,
            client: reqwest::Client::new(),
            stop: Some(stop),
            server: Some(server),
        }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rsp = self
                .client
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await;
            if rsp.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "server not ready within 15 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn post_json(&self, path: &str, body: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("POST")
    }

    /// Creates an item through the API and returns its JSON.
    pub async fn create(&self, name: &str) -> serde_json::Value {
        let rsp = self
            .post_json("/items", &serde_json::json!({ "name": name }).to_string())
            .await;
        assert_eq!(rsp.status(), 201);
        rsp.json::<serde_json::Value>().await.expect("json")["item"].clone()
    }

    /// Stops the server and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

/// The response body as JSON, asserting the content type says so.
pub async fn json_body(rsp: reqwest::Response) -> serde_json::Value {
    let content_type = rsp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(content_type, "application/json", "a JSON content type");
    rsp.json().await.expect("a JSON body")
}

/// Asserts an error response: the status, and a JSON body with this `error` code and a
/// non-empty message.
pub async fn assert_error(rsp: reqwest::Response, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(rsp.status(), status, "status");
    let body = json_body(rsp).await;
    assert_eq!(body["error"], code, "error code in {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a message in {body}"
    );
    body
}
