//! A rolling deployment on loopback: two Tiergate "tasks" behind nginx standing in for
//! the ALB, replaced one by one under constant load, with zero failed requests.
//!
//! nginx plays the load balancer's part with four fixed upstream slots: two for the old
//! tasks and two for their replacements, which are put behind their slots only once
//! ready (see [`register`]). A slot with nothing behind it refuses
//! connections, which nginx treats as a failed attempt and retries on the next server
//! (`proxy_next_upstream error`), as an ALB skips an unhealthy target. `max_fails=0`:
//! nginx's passive health (a server benched for a while after one failure) benched every
//! slot at once in trial runs (two slots are always empty) and answered 502 "no live
//! upstreams", an artifact of nginx having no active health checks; an ALB has them.
//! What this test holds Tiergate to: no client request fails, and each old task finishes
//! every connection it accepted before it exits 0. nginx runs as a
//! child process (`master_process off`) with its own config in a temporary directory,
//! never as a system service. The test needs the `nginx` binary: `scripts/services
//! --nginx` (run by `scripts/test`) installs it. Every port the test names (the slots,
//! nginx's own) is held for the whole test by a [`Reserved`] socket: a port picked and
//! let go could be handed to anyone else in between.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket};
use tokio::process::{Child, Command};

use crate::helpers::{Backends, wait_for_more};
use crate::shutdown::Task;
use crate::startup::wait_for_log_where;

/// The nginx binary: `TIERGATE_TEST_NGINX`, else `nginx` on the PATH or in /usr/sbin
/// (not on a non-root user's PATH on Debian).
fn nginx_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TIERGATE_TEST_NGINX") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!(
            "nginx is needed for the rolling-deploy test: run scripts/services --nginx \
             (Debian: apt-get install nginx), or set TIERGATE_TEST_NGINX"
        )
    })
}

/// A loopback port held for the test: bound with `SO_REUSEADDR` but not listening.
/// Connecting to it is refused, as to an empty load-balancer slot; the kernel hands it
/// to no one else, neither to a `bind` to port 0 (another test's server, a new task's
/// listener) nor as the local port of an outgoing connection; and a server that sets
/// `SO_REUSEADDR` (Tiergate, nginx) can still bind and listen on it beside this socket.
/// `closed_port` lets its port go at once instead, and in one run something else took
/// an empty slot's port that way: `register` then failed with EADDRINUSE.
struct Reserved {
    addr: SocketAddr,
    socket: TcpSocket,
}

impl Reserved {
    fn new() -> Self {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind a port");
        let addr = socket.local_addr().expect("the reserved address");
        Self { addr, socket }
    }

    /// Starts listening on the port itself.
    fn listen(self) -> TcpListener {
        self.socket
            .listen(1024)
            .expect("listen on the reserved port")
    }
}

/// nginx with a generated config, stopped and its directory removed on drop.
pub struct Nginx {
    pub addr: SocketAddr,
    dir: PathBuf,
    _child: Child,
    /// nginx's port, held while nginx runs.
    _port: Reserved,
}

impl Nginx {
    pub async fn start(upstreams: &[SocketAddr]) -> Self {
        let dir = std::env::temp_dir().join(format!("tiergate-nginx-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let port = Reserved::new();
        let addr = port.addr;
        std::fs::write(dir.join("nginx.conf"), config(&dir, addr, upstreams)).unwrap();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start nginx");
        Self {
            addr,
            dir,
            _child: child,
            _port: port,
        }
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The child is killed by kill_on_drop; with master_process off it is all of nginx.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// "Registers" a ready task with the load balancer: forwards the slot nginx knows to the
/// task's own port. A new task is thereby reachable only once it is ready, as an ALB
/// routes to a target only once its health checks pass. Stops forwarding on drop.
fn register(slot: Reserved, task: SocketAddr) -> AbortOnDrop {
    let listener = slot.listen();
    AbortOnDrop(tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(task).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn config(dir: &Path, listen: SocketAddr, upstreams: &[SocketAddr]) -> String {
    let dir = dir.display();
    let servers: String = upstreams
        .iter()
        .map(|u| format!("        server {u} max_fails=0;\n"))
        .collect();
    format!(
        r#"daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream tasks {{
{servers}        keepalive 32;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://tasks;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Like an ALB: a refused or broken connection, or a target that is not (or
            # no longer) ready, is retried on another target.
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 0;
            proxy_connect_timeout 1s;
            proxy_read_timeout 10s;
        }}
    }}
}}
"#
    )
}

#[tokio::test]
async fn rolling_deploy_behind_a_proxy_loses_no_request() {
    let backends = Backends::new().await;
    // The old tasks bind their slots beside the reservations, which are held to the end:
    // a slot must go on refusing once its task is gone. The new tasks' slots are handed
    // over as they register.
    let mut reserved: Vec<Reserved> = (0..4).map(|_| Reserved::new()).collect();
    let slots: Vec<SocketAddr> = reserved.iter().map(|r| r.addr).collect();
    let mut empty_slots = reserved.split_off(2).into_iter();
    let start_task = |listen: SocketAddr, color: &'static str| {
        let backends = &backends;
        async move {
            let listen = listen.to_string();
            let task = Task::start(
                backends,
                &[
                    ("TIERGATE_LISTEN__HTTP", &listen),
                    ("TIERGATE_SHUTDOWN__DRAIN_DELAY", "1s"),
                    ("TIERGATE_SHUTDOWN__TIMEOUT", "10s"),
                    ("DEPLOYMENT_COLOR", color),
                ],
            )
            .await;
            task.wait_ready().await;
            task
        }
    };
    let mut old = vec![
        start_task(slots[0], "blue").await,
        start_task(slots[1], "blue").await,
    ];
    let nginx = Nginx::start(&slots).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let front = format!("http://{}", nginx.addr);

    // nginx is up once an item can be created through it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let created = client
            .post(format!("{front}/items"))
            .header("content-type", "application/json")
            .body(r#"{"name":"rolling"}"#)
            .send()
            .await;
        if let Ok(rsp) = created {
            if rsp.status() == 201 {
                let item: serde_json::Value = rsp.json().await.unwrap();
                break item["item"]["id"].clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "nginx did not come up: {}",
            nginx.error_log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Constant load: four clients on keep-alive connections to nginx, bounded in time.
    let running = Arc::new(AtomicBool::new(true));
    let ok = Arc::new(AtomicU64::new(0));
    let load_deadline = Instant::now() + Duration::from_secs(60);
    let mut workers = Vec::new();
    // Workers: /health, two on an item, and one creating items. nginx never retries a
    // POST once it has been sent, so a POST cut off by a closing task fails here.
    for n in 0..4 {
        let (client, running, ok) = (client.clone(), running.clone(), ok.clone());
        let (url, post) = match n {
            0 => (format!("{front}/health"), false),
            3 => (format!("{front}/items"), true),
            _ => (format!("{front}/items/{id}"), false),
        };
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while running.load(Ordering::Relaxed) && Instant::now() < load_deadline {
                let request = if post {
                    client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(r#"{"name":"under load"}"#)
                } else {
                    client.get(&url)
                };
                match request.send().await {
                    Ok(rsp) if rsp.status().is_success() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(rsp) => failures.push(format!(
                        "{url}: status {}: {}",
                        rsp.status(),
                        rsp.text().await.unwrap_or_default()
                    )),
                    Err(e) => failures.push(format!("{url}: {e:?}")),
                }
            }
            failures
        }));
    }
    wait_for_more(&ok, 200).await;

    // Replace the tasks one at a time: start the new one, wait until it is ready, then
    // SIGTERM the old one and wait for it to exit cleanly, all under load.
    let mut new = Vec::new();
    let mut registrations = Vec::new();
    for i in 0..2 {
        let task = start_task(SocketAddr::from(([127, 0, 0, 1], 0)), "green").await;
        let slot = empty_slots.next().expect("a slot for each new task");
        registrations.push(register(slot, task.http));
        new.push(task);
        let mut retiring = old.remove(0);
        retiring.signal("TERM");
        // Every request it had accepted finished: it did not exit on the deadline.
        wait_for_log_where(&mut retiring.log, "All connections drained.", |l| {
            l["listener"] == "http"
        })
        .await;
        let status = retiring.exit_within(Duration::from_secs(15)).await;
        assert_eq!(status.code(), Some(0), "old task {i} exits 0");
        wait_for_more(&ok, 200).await;
    }

    running.store(false, Ordering::Relaxed);
    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(worker.await.unwrap());
    }
    let served = ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:#?}\nnginx: {}",
        failures.len(),
        served + failures.len() as u64,
        nginx.error_log()
    );
    // Only the new tasks answer now.
    let health: serde_json::Value = client
        .get(format!("{front}/health"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["deployment"], "green");
    // What the stand-in load balancer had to retry elsewhere: refused connects (empty
    // slots, closed listeners) and resets (connections caught as a listener closed).
    let log = nginx.error_log();
    let count = |what: &str| log.lines().filter(|l| l.contains(what)).count();
    eprintln!(
        "rolling deploy: {served} requests served, none failed; nginx retried {} refused \
         connects and {} resets",
        count("Connection refused"),
        count("reset by peer") + count("prematurely closed")
    );
    drop(registrations);
    drop(reserved);
    for mut task in new {
        task.signal("TERM");
        task.exit_within(Duration::from_secs(15)).await;
    }
}

/// What the slots rely on, without nginx: a reserved port is held (a socket that binds
/// it without `SO_REUSEADDR` is refused, where a port from `closed_port` is free for
/// anyone), refuses connections while empty, can be served by a task that binds it
/// beside the reservation, refuses again once that task is gone, and listens when
/// registered.
#[tokio::test]
async fn a_reserved_slot_is_held_and_refuses_until_served() {
    let squat = |addr: SocketAddr| {
        let socket = TcpSocket::new_v4().expect("a socket");
        socket.bind(addr).map(|()| socket)
    };
    let slot = Reserved::new();
    let addr = slot.addr;
    assert!(squat(addr).is_err(), "the reserved port is held");
    let refused = |r: std::io::Result<tokio::net::TcpStream>| {
        r.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    assert!(refused(tokio::net::TcpStream::connect(addr).await), "empty");

    // A task binds the slot beside the reservation, as Tiergate's listener does.
    let task = TcpListener::bind(addr)
        .await
        .expect("a task binds the slot");
    let (_client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), task.accept());
    accepted.expect("the task is reachable");
    drop(task);
    assert!(
        refused(tokio::net::TcpStream::connect(addr).await),
        "task gone"
    );
    assert!(squat(addr).is_err(), "still held");

    let listener = slot.listen();
    let (_client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    accepted.expect("registered");
}
