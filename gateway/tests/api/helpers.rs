//! Test harness: a throw-away database and Redis prefix per test, the server started on
//! port 0 in process (or the real binary, for process-level behaviour).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gateway::reload::ConfigSource;
use tiergate_config::Settings;
use tokio::sync::oneshot;

pub use app_core::testing::{TestDb, TestRedis, redis_url};

/// The admin token of tests that call the mutating admin endpoints
/// (`settings.admin.token = Some(ADMIN_TOKEN.into())`).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// A port on loopback where nothing listens (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
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
            redis: TestRedis::new(),
        }
    }

    /// Settings for a server on port 0 against these backends.
    pub fn settings(&self) -> Settings {
        app_core::testing::settings(&self.db, &self.redis)
    }
}

impl TestApp {
    /// Starts a server with `settings` and waits until `/readyz` says 200.
    pub async fn start(settings: Settings) -> Self {
        let app = Self::start_unready(settings).await;
        app.wait_ready().await;
        app
    }

    /// Starts a server that reloads its configuration from `source`, and waits until
    /// it is ready.
    pub async fn start_with_source(settings: Settings, source: ConfigSource) -> Self {
        let server = gateway::Server::bind(&settings)
            .await
            .expect("bind the server")
            .with_config_source(source);
        let app = Self::run(server);
        app.wait_ready().await;
        app
    }

    /// Starts a server without waiting for readiness.
    pub async fn start_unready(settings: Settings) -> Self {
        let server = gateway::Server::bind(&settings)
            .await
            .expect("bind the server");
        Self::run(server)
    }

    fn run(server: gateway::Server) -> Self {
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

    /// The Prometheus text of the admin listener.
    pub async fn metrics(&self) -> String {
        let rsp = self
            .client
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await;
        rsp.expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
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

    /// `POST /admin/reload` with [`ADMIN_TOKEN`].
    pub async fn reload(&self) -> reqwest::Response {
        self.client
            .post(format!("http://{}/admin/reload", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
    }

    /// Signals the server to shut down, without waiting: it is draining from now on.
    pub fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
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

/// Waits until `counter` has grown by `n` from now; fails the test after 10 s.
pub async fn wait_for_more(counter: &AtomicU64, n: u64) {
    let target = counter.load(Ordering::Relaxed) + n;
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter.load(Ordering::Relaxed) < target {
        assert!(Instant::now() < deadline, "the load stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// GET load in the background: `workers` loops requesting one URL until stopped,
/// counting the 200s and everything else.
pub struct GetLoad {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl GetLoad {
    pub fn start(client: &reqwest::Client, url: &str, workers: usize) -> Self {
        let load = Self {
            stop: Arc::new(AtomicBool::new(false)),
            answered: Arc::new(AtomicU64::new(0)),
            failed: Arc::new(AtomicU64::new(0)),
            workers: Vec::new(),
        };
        let workers = (0..workers)
            .map(|_| {
                let (client, url) = (client.clone(), url.to_owned());
                let (stop, answered, failed) = (
                    load.stop.clone(),
                    load.answered.clone(),
                    load.failed.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match client.get(&url).send().await {
                            Ok(rsp) if rsp.status() == 200 => {
                                answered.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Self { workers, ..load }
    }

    /// Waits until `n` more requests were answered.
    pub async fn more(&self, n: u64) {
        wait_for_more(&self.answered, n).await;
    }

    /// Requests that did not get a 200 so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stops the workers; returns (answered, failed).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.expect("a load worker");
        }
        (
            self.answered.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
