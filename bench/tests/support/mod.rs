//! Shared by the loadgen tests: the upper-limit server in a thread of its own, and
//! running `loadgen` (the built binary) for its JSON summary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use bench::limit::{self, Stall};

/// `limit::serve` on 127.0.0.1:0, on a one-thread runtime of its own; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    pub stall: Stall,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stall = Stall::default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let serving = stall.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    () = limit::serve(listener, serving) => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            stall,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs loadgen against `addr` with `args`; returns its JSON summary.
pub fn loadgen(addr: SocketAddr, args: &[&str]) -> serde_json::Value {
    let json = std::env::temp_dir().join(format!("loadgen-{:016x}.json", fastrand::u64(..)));
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg(format!("http://{addr}/items/1"))
        .args(args)
        .arg("--quiet")
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    summary
}

/// `wrk`, which `scripts/services --wrk` installs.
pub fn wrk() -> PathBuf {
    std::env::var_os("TIERGATE_TEST_WRK")
        .map(PathBuf::from)
        .or_else(|| {
            ["/usr/bin/wrk", "/usr/local/bin/wrk"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        })
        .expect("wrk is not installed: run scripts/services --wrk (or apt-get install wrk)")
}
