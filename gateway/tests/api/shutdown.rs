//! Process-level shutdown, load shedding and the `healthcheck` subcommand: the real
//! `tiergate` binary, signalled as ECS signals it.

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::helpers::{Backends, TestApp, closed_port, redis_url};
use crate::startup::{lines, tiergate, wait_for_log, wait_for_log_where};

/// A `tiergate serve` process against a test's backends, on ports the OS picked.
pub struct Task {
    pub child: Child,
    pub log: mpsc::UnboundedReceiver<String>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// The "Listening." log line.
    pub listening: serde_json::Value,
}

impl Task {
    /// Starts the binary with `vars` on top of the backends' settings and waits for its
    /// "Listening." line (not for readiness).
    pub async fn start(backends: &Backends, vars: &[(&str, &str)]) -> Self {
        let mut env = vec![
            ("DATABASE_URL", backends.db.url.clone()),
            ("REDIS_URL", redis_url()),
            ("TIERGATE_REDIS__KEY_PREFIX", backends.redis.prefix.clone()),
            ("TIERGATE_LISTEN__HTTP", "127.0.0.1:0".into()),
            ("TIERGATE_LISTEN__ADMIN", "127.0.0.1:0".into()),
            ("RUST_LOG", "info,access=off".into()),
        ];
        env.extend(vars.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let mut child = tiergate(&env)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tiergate");
        let mut log = lines(&mut child);
        let listening = wait_for_log(&mut log, "Listening.").await;
        let addr = |key: &str| listening[key].as_str().unwrap().parse().unwrap();
        Self {
            http: addr("http"),
            admin: addr("admin"),
            listening,
            child,
            log,
        }
    }

    /// Starts the binary as [`Task::start`] does, and waits until it is ready and
    /// subscribed to the invalidation channel (so no write it should hear of is missed).
    pub async fn start_subscribed(backends: &Backends, vars: &[(&str, &str)]) -> Self {
        let mut task = Self::start(backends, vars).await;
        // These two come in either order.
        let mut pending = vec!["Invalidation channel subscribed.", "Database ready."];
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pending.is_empty() {
            let line = tokio::time::timeout_at(deadline.into(), task.log.recv())
                .await
                .expect("ready within 20 s")
                .expect("the process is running");
            pending.retain(|message| !line.contains(&format!("\"message\":\"{message}\"")));
        }
        task
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Creates an item named `name` through the API and returns its path.
    pub async fn create_item(&self, name: &str) -> String {
        let created = reqwest::Client::new()
            .post(self.url("/items"))
            .header("content-type", "application/json")
            .body(serde_json::json!({ "name": name }).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
        let item: serde_json::Value = created.json().await.unwrap();
        format!("/items/{}", item["item"]["id"])
    }

    /// Waits until `/readyz` says 200.
    pub async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rsp = client
                .get(format!("http://{}/readyz", self.admin))
                .send()
                .await;
            if rsp.is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(Instant::now() < deadline, "task not ready within 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` (`TERM`, `INT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("a running child");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// Waits for the process to exit, at most `limit`.
    pub async fn exit_within(&mut self, limit: Duration) -> ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the process did not exit within {limit:?}"))
            .expect("wait for the child")
    }
}

/// Starts the binary with this drain delay and shutdown timeout (not waiting for ready).
async fn start_with_shutdown(backends: &Backends, drain_delay: &str, timeout: &str) -> Task {
    let vars = [
        ("TIERGATE_SHUTDOWN__DRAIN_DELAY", drain_delay),
        ("TIERGATE_SHUTDOWN__TIMEOUT", timeout),
    ];
    Task::start(backends, &vars).await
}

/// Sends the head and the first `sent` bytes of a `POST /items` whose body is `body`,
/// leaving the rest for later: a request that stays in flight as long as the test likes.
async fn start_slow_post(addr: SocketAddr, body: &str, sent: usize) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /items HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..sent]).await.unwrap();
    stream
}

/// Sends the rest of the body and reads the response (head and `Content-Length` body).
async fn finish_slow_post(mut stream: TcpStream, body: &str, sent: usize) -> String {
    stream.write_all(&body.as_bytes()[sent..]).await.unwrap();
    let read = async {
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.expect("read the response");
            assert!(
                n > 0,
                "closed mid-response: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .expect("a content-length");
                if rest.len() >= length {
                    return text;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the response within 10 s")
}

#[tokio::test]
async fn sigterm_under_keep_alive_load_loses_no_request_and_exits_in_time() {
    sigterm_under_keep_alive_load(None).await;
}

/// The same on tokio's single-threaded scheduler, where the signal, the listeners and
/// the requests all take turns on one thread.
#[tokio::test]
async fn on_one_worker_thread_sigterm_under_load_loses_no_request_and_exits_in_time() {
    let task = sigterm_under_keep_alive_load(Some("1")).await;
    assert_eq!(task.listening["worker_threads"], 1);
}

/// Returns the exited task.
async fn sigterm_under_keep_alive_load(worker_threads: Option<&str>) -> Task {
    let backends = Backends::new().await;
    let mut vars = vec![
        ("TIERGATE_SHUTDOWN__DRAIN_DELAY", "2s"),
        ("TIERGATE_SHUTDOWN__TIMEOUT", "6s"),
    ];
    vars.extend(worker_threads.map(|n| ("TIERGATE_RUNTIME__WORKER_THREADS", n)));
    let mut task = Task::start(&backends, &vars).await;
    task.wait_ready().await;
    let client = reqwest::Client::new();
    let item = task.url(&task.create_item("steady").await);

    // The load balancer's part: send until the readiness probe fails, as an ALB stops
    // routing to a target whose health check fails.
    let routing = Arc::new(AtomicBool::new(true));
    let (ok, closes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (client, item) = (client.clone(), item.clone());
        let (routing, ok, closes) = (routing.clone(), ok.clone(), closes.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while routing.load(Ordering::Relaxed) {
                match client.get(&item).send().await {
                    Ok(rsp) if rsp.status() == 200 => {
                        if rsp
                            .headers()
                            .get("connection")
                            .is_some_and(|v| v == "close")
                        {
                            closes.fetch_add(1, Ordering::Relaxed);
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(rsp) => failures.push(format!("status {}", rsp.status())),
                    Err(e) => failures.push(format!("{e:?}")),
                }
            }
            failures
        }));
    }
    // Some load on warm keep-alive connections before the signal.
    let deadline = Instant::now() + Duration::from_secs(10);
    while ok.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "no load got through");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    task.signal("TERM");
    let signalled = Instant::now();
    let probe = format!("http://{}/readyz", task.admin);
    loop {
        let status = client.get(&probe).send().await.map(|r| r.status());
        if status.as_ref().is_ok_and(|s| *s == 503) {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(2),
            "readyz still {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While draining, every answer asks the client to close its connection.
    let during = client.get(&item).send().await.unwrap();
    assert_eq!(
        during.status(),
        200,
        "items are still served while draining"
    );
    assert_eq!(during.headers()["connection"], "close");
    routing.store(false, Ordering::Relaxed);

    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.unwrap());
    }
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    let status = task.exit_within(Duration::from_secs(8)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "a graceful shutdown exits 0");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "exit after the drain delay and before the deadline, took {took:?}"
    );
    task
}

#[tokio::test]
async fn a_request_longer_than_the_drain_delay_gets_its_answer_and_new_connections_are_refused() {
    let backends = Backends::new().await;
    let mut task = start_with_shutdown(&backends, "300ms", "15s").await;
    task.wait_ready().await;
    let body = r#"{"name":"slow but sure"}"#;
    let stream = start_slow_post(task.http, body, 5).await;

    task.signal("TERM");
    // The drain delay passes with the request still in flight; the listener closes.
    wait_for_log_where(&mut task.log, "Stopped accepting.", |l| {
        l["listener"] == "http"
    })
    .await;
    let refused = TcpStream::connect(task.http).await;
    assert!(
        refused.is_err(),
        "a new connection after stop-accepting must be refused"
    );

    let response = finish_slow_post(stream, body, 5).await;
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{response}"
    );
    assert!(response.contains("slow but sure"), "{response}");
    let status = task.exit_within(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn a_request_stuck_past_the_timeout_is_dropped_and_the_process_exits_on_time() {
    let backends = Backends::new().await;
    let mut task = start_with_shutdown(&backends, "200ms", "1500ms").await;
    task.wait_ready().await;
    // A body that never completes: only the deadline ends this request.
    let _stuck = start_slow_post(task.http, r#"{"name":"never"}"#, 3).await;
    task.signal("TERM");
    let signalled = Instant::now();
    wait_for_log_where(
        &mut task.log,
        "Shutdown deadline passed; dropping open connections.",
        |l| l["listener"] == "http",
    )
    .await;
    let status = task.exit_within(Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(4),
        "exit at the deadline, well before a SIGKILL would come: {took:?}"
    );
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let backends = Backends::new().await;
    let mut task = start_with_shutdown(&backends, "20s", "25s").await;
    task.signal("TERM");
    wait_for_log(
        &mut task.log,
        "Draining: readiness is 503; still serving, with Connection: close.",
    )
    .await;
    let second = Instant::now();
    task.signal("INT");
    let status = task.exit_within(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(130));
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "{:?}",
        second.elapsed()
    );
}

/// Runs `tiergate healthcheck ARGS` with `vars` and returns its exit code.
async fn healthcheck(args: &[&str], vars: &[(&str, String)]) -> i32 {
    let output = tiergate(vars)
        .arg("healthcheck")
        .args(args)
        .output()
        .await
        .expect("run tiergate healthcheck");
    output.status.code().expect("an exit code")
}

#[tokio::test]
async fn healthcheck_exit_codes_for_up_down_and_unready() {
    // Down: nothing listens.
    let closed = closed_port();
    let admin = |addr: String| vec![("TIERGATE_LISTEN__ADMIN", addr)];
    assert_eq!(
        healthcheck(&[], &admin(format!("127.0.0.1:{closed}"))).await,
        1
    );
    assert_eq!(
        healthcheck(&["--url", &format!("http://127.0.0.1:{closed}/livez")], &[]).await,
        1
    );

    // Hung: accepts but never answers; the timeout bounds it.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung_url = format!("http://{}/livez", hung.local_addr().unwrap());
    let started = Instant::now();
    assert_eq!(
        healthcheck(&["--url", &hung_url, "--timeout", "300ms"], &[]).await,
        1
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // Unready: PostgreSQL unreachable. Alive (the container must not be replaced over a
    // database outage), but not ready.
    let mut settings = Backends::new().await.settings();
    settings.database.url = tiergate_config::Secret::new(format!(
        "postgres://postgres@127.0.0.1:{}/none",
        closed_port()
    ));
    let unready = TestApp::start_unready(settings).await;
    let addr = unready.admin.to_string();
    assert_eq!(healthcheck(&[], &admin(addr.clone())).await, 0);
    assert_eq!(
        healthcheck(&["--url", &format!("http://{addr}/readyz")], &[]).await,
        1
    );
    unready.stop().await;

    // Up and ready; an admin address of 0.0.0.0 is probed on loopback. (Beyond loopback
    // the admin listener needs a token, or the configuration is invalid: exit 1.)
    let backends = Backends::new().await;
    let up = TestApp::start(backends.settings()).await;
    let port = up.admin.port();
    let mut exposed = admin(format!("0.0.0.0:{port}"));
    assert_eq!(healthcheck(&[], &exposed).await, 1, "no admin.token");
    exposed.push((
        "TIERGATE_ADMIN__TOKEN",
        crate::helpers::ADMIN_TOKEN.to_owned(),
    ));
    assert_eq!(healthcheck(&[], &exposed).await, 0);
    assert_eq!(
        healthcheck(&["--url", &format!("http://127.0.0.1:{port}/readyz")], &[]).await,
        0
    );
    up.stop().await;
}

/// The only place is held by a request the app is working on: a `PUT` waiting for a row
/// lock this test holds (a body still arriving holds none, see
/// `front::slow_request_bodies_hold_no_load_shedding_permit`).
#[tokio::test]
async fn load_shedding_answers_503_with_retry_after_beyond_the_bound() {
    let backends = Backends::new().await;
    let mut settings = backends.settings();
    settings.http.max_in_flight = 1;
    let app = TestApp::start(settings).await;
    let id = app.create("holder").await["id"].as_i64().unwrap();

    let db = backends.db.client().await;
    db.batch_execute(&format!(
        "BEGIN; SELECT id FROM items WHERE id = {id} FOR UPDATE"
    ))
    .await
    .unwrap();
    let holder = {
        let (client, url) = (app.client.clone(), app.url(&format!("/items/{id}")));
        tokio::spawn(async move {
            client
                .put(url)
                .header("content-type", "application/json")
                .body(r#"{"name":"held"}"#)
                .send()
                .await
                .map(|r| r.status())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let shed = loop {
        let rsp = app.get(&format!("/items/{id}")).await;
        if rsp.status() == 503 {
            break rsp;
        }
        assert!(Instant::now() < deadline, "never shed: {}", rsp.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(shed.headers()["retry-after"], "1");
    crate::helpers::assert_error(shed, 503, "overloaded").await;
    // Health checks are never shed.
    assert_eq!(app.get("/health").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);

    db.batch_execute("COMMIT").await.unwrap();
    assert_eq!(holder.await.unwrap().unwrap(), 200);
    assert_eq!(app.get(&format!("/items/{id}")).await.status(), 200);

    let metrics = app.metrics().await;
    let shed_total = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tiergate_http_shed_total "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(shed_total.is_some_and(|n| n >= 1.0), "{metrics}");
    app.stop().await;
}

/// A minimal HTTP/2 client over prior knowledge: enough to send one GET and watch the
/// frames that come back (the test needs to see GOAWAY, which no HTTP client exposes).
struct RawH2 {
    stream: TcpStream,
}

impl RawH2 {
    const HEADERS: u8 = 0x1;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;

    async fn connect(addr: SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let mut h2 = Self { stream };
        h2.send(Self::SETTINGS, 0, 0, &[]).await;
        h2
    }

    async fn send(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags];
        frame.extend_from_slice(&stream_id.to_be_bytes());
        frame.extend_from_slice(payload);
        self.stream.write_all(&frame).await.unwrap();
    }

    /// `GET path` on `stream_id`, END_STREAM | END_HEADERS, HPACK without indexing.
    async fn get(&mut self, stream_id: u32, authority: &str, path: &str) {
        // :method GET (static 2), :scheme http (static 6), then :path and :authority as
        // literals with indexed names 4 and 1.
        let mut block = vec![0x82, 0x86, 0x04, u8::try_from(path.len()).unwrap()];
        block.extend_from_slice(path.as_bytes());
        block.extend([0x01, u8::try_from(authority.len()).unwrap()]);
        block.extend_from_slice(authority.as_bytes());
        self.send(Self::HEADERS, 0x1 | 0x4, stream_id, &block).await;
    }

    /// The next frame's type, flags and stream id; acknowledges the server's SETTINGS.
    async fn next_frame(&mut self) -> (u8, u8, u32) {
        let mut head = [0u8; 9];
        self.stream.read_exact(&mut head).await.expect("a frame");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload).await.unwrap();
        let (kind, flags) = (head[3], head[4]);
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if kind == Self::SETTINGS && flags & 0x1 == 0 {
            self.send(Self::SETTINGS, 0x1, 0, &[]).await;
        }
        (kind, flags, id)
    }

    /// Reads frames until one of `kind` arrives.
    async fn wait_for(&mut self, kind: u8) -> (u8, u8, u32) {
        loop {
            let frame = self.next_frame().await;
            if frame.0 == kind {
                return frame;
            }
        }
    }
}

#[tokio::test]
async fn http2_connections_get_goaway_while_draining() {
    let backends = Backends::new().await;
    let mut task = start_with_shutdown(&backends, "20s", "25s").await;
    let authority = task.http.to_string();
    let mut h2 = RawH2::connect(task.http).await;
    h2.get(1, &authority, "/livez").await;
    let (_, _, id) = h2.wait_for(RawH2::HEADERS).await;
    assert_eq!(id, 1, "the answer to the request before the signal");

    task.signal("TERM");
    wait_for_log(
        &mut task.log,
        "Draining: readiness is 503; still serving, with Connection: close.",
    )
    .await;
    // GOAWAY comes in the drain phase, long before the listeners close at 20 s.
    let goaway = tokio::time::timeout(Duration::from_secs(5), h2.wait_for(RawH2::GOAWAY)).await;
    assert!(goaway.is_ok(), "no GOAWAY within 5 s of the drain starting");
    // Still serving new connections meanwhile.
    let rsp = reqwest::get(task.url("/livez")).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["connection"], "close");
    task.signal("TERM");
    task.exit_within(Duration::from_secs(5)).await;
}
