//! Process-level start-up: the real `tiergate` binary with PostgreSQL unreachable at first
//! (its access lines: `access_log.rs`).

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::helpers::{Backends, closed_port, redis_url};

/// The binary under test, with a clean environment plus `vars`.
pub fn tiergate(vars: &[(&str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiergate"));
    cmd.env_clear()
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true);
    cmd
}

/// `url` with its host and port replaced by `127.0.0.1:port`; also returns the original
/// `host:port`.
fn redirect(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (auth, path) = rest.split_once('/').expect("a database path");
    let (userinfo, hostport) = match auth.rsplit_once('@') {
        Some((user, hostport)) => (format!("{user}@"), hostport),
        None => (String::new(), auth),
    };
    (
        format!("{scheme}://{userinfo}127.0.0.1:{port}/{path}"),
        hostport.to_owned(),
    )
}

/// Forwards every connection on `port` to `target`: PostgreSQL "coming back".
async fn forward(port: u16, target: String) {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the forwarder");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// Sends every stdout line of `child` to a channel.
pub fn lines(child: &mut Child) -> mpsc::UnboundedReceiver<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a log line whose message is `message`; returns it parsed.
pub async fn wait_for_log(
    rx: &mut mpsc::UnboundedReceiver<String>,
    message: &str,
) -> serde_json::Value {
    wait_for_log_where(rx, message, |_| true).await
}

/// Waits for a log line whose message is `message` and whose fields pass `also`.
pub async fn wait_for_log_where(
    rx: &mut mpsc::UnboundedReceiver<String>,
    message: &str,
    also: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    // The warnings and errors passed over, for the failure message: a process that
    // ends before the line says why in them (a busy port, a database that refused it).
    let mut passed = Vec::new();
    let wait = async {
        while let Some(line) = rx.recv().await {
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                if json["message"] == message && also(&json) {
                    return json;
                }
                if matches!(json["level"].as_str(), Some("WARN" | "ERROR")) {
                    passed.push(line);
                }
            }
        }
        panic!(
            "the process ended before logging {message:?}; its warnings and errors:\n{}",
            passed.join("\n")
        );
    };
    let found = tokio::time::timeout(Duration::from_secs(20), wait).await;
    found.unwrap_or_else(|_| {
        panic!(
            "no {message:?} log line within 20 s; warnings and errors:\n{}",
            passed.join("\n")
        )
    })
}

#[tokio::test]
async fn starts_while_postgres_is_unreachable_and_serves_once_it_is_back() {
    let backends = Backends::new().await;
    let port = closed_port();
    let (db_url, real_postgres) = redirect(&backends.db.url, port);
    let mut child = tiergate(&[
        ("DATABASE_URL", db_url),
        ("REDIS_URL", redis_url()),
        ("TIERGATE_REDIS__KEY_PREFIX", backends.redis.prefix.clone()),
        ("TIERGATE_LISTEN__HTTP", "127.0.0.1:0".into()),
        ("TIERGATE_LISTEN__ADMIN", "127.0.0.1:0".into()),
        ("TIERGATE_DATABASE__CHECKOUT_TIMEOUT", "200ms".into()),
        ("RUST_LOG", "info".into()),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("start tiergate");
    let mut log = lines(&mut child);

    let listening = wait_for_log(&mut log, "Listening.").await;
    let http = listening["http"].as_str().expect("http address").to_owned();
    let admin = listening["admin"]
        .as_str()
        .expect("admin address")
        .to_owned();
    // Two failed attempts prove it retries rather than exits.
    wait_for_log(&mut log, "Database not ready.").await;
    wait_for_log(&mut log, "Database not ready.").await;
    assert!(
        child.try_wait().expect("child status").is_none(),
        "still running"
    );

    let client = reqwest::Client::new();
    let status = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(status(format!("http://{admin}/livez")).await, 200);
    assert_eq!(status(format!("http://{admin}/readyz")).await, 503);
    assert_eq!(status(format!("http://{http}/items")).await, 503);

    forward(port, real_postgres).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(format!("http://{admin}/readyz")).await != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready within 20 s of PostgreSQL coming back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rsp = client
        .post(format!("http://{http}/items"))
        .header("content-type", "application/json")
        .body(r#"{"name":"late"}"#)
        .send()
        .await
        .expect("POST");
    assert_eq!(rsp.status(), 201);
    child.kill().await.expect("kill");
}
