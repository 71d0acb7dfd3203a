//! Shared by the loadgen tests: the upper-limit server in a thread of its own, a TLS
//! server with a certificate made at run time, and running `loadgen` (the built binary)
//! for its JSON summary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bench::limit::{self, Stall};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::HandshakeKind;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// A server future on 127.0.0.1:0, on a one-thread runtime in a thread of its own;
/// stopped (and the thread joined) when dropped.
pub struct Background {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    pub fn serve<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    () = serve(listener) => {}
                    _ = stopped => {}
                }
            });
        });
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `limit::serve` in the background; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    pub stall: Stall,
    _background: Background,
}

impl Server {
    pub fn start() -> Self {
        let stall = Stall::default();
        let serving = stall.clone();
        let background = Background::serve(move |listener| limit::serve(listener, serving));
        Self {
            addr: background.addr,
            stall,
            _background: background,
        }
    }
}

/// Runs loadgen against `addr` with `args`; returns its JSON summary.
pub fn loadgen(addr: SocketAddr, args: &[&str]) -> serde_json::Value {
    loadgen_url(&format!("http://{addr}/items/1"), args)
}

/// Runs loadgen against `url` with `args`; returns its JSON summary.
pub fn loadgen_url(url: &str, args: &[&str]) -> serde_json::Value {
    let (out, summary) = loadgen_output(url, args);
    assert!(
        out.status.success(),
        "loadgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    summary.unwrap()
}

/// Runs loadgen against `url` with `args`, successful or not: its output and, when it
/// wrote one, its JSON summary.
pub fn loadgen_output(url: &str, args: &[&str]) -> (Output, Option<serde_json::Value>) {
    let json = std::env::temp_dir().join(format!("loadgen-{:016x}.json", fastrand::u64(..)));
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg(url)
        .args(args)
        .arg("--quiet")
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let summary = std::fs::read(&json)
        .ok()
        .map(|bytes| serde_json::from_slice(&bytes).unwrap());
    let _ = std::fs::remove_file(&json);
    (out, summary)
}

/// What a [`TlsServer`] counted.
#[derive(Default)]
pub struct TlsCounts {
    /// Full handshakes completed.
    pub full: AtomicU64,
    /// Resumed handshakes completed.
    pub resumed: AtomicU64,
    /// Connections whose client and server agreed on `h2` by ALPN.
    pub h2: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
}

/// An HTTPS server (HTTP/1.1 and h2 by ALPN, rustls, ring) on 127.0.0.1:0 with a
/// self-signed certificate for `127.0.0.1` and `localhost` made at start; it answers
/// every request with `limit::BODY` and counts handshakes. Stops when dropped.
pub struct TlsServer {
    pub addr: SocketAddr,
    /// The certificate, PEM, in a file of its own (for `--ca`).
    pub ca: PathBuf,
    pub counts: Arc<TlsCounts>,
    _background: Background,
}

impl TlsServer {
    pub fn start() -> Self {
        let made = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .unwrap();
        let ca = std::env::temp_dir().join(format!("loadgen-ca-{:016x}.pem", fastrand::u64(..)));
        std::fs::write(&ca, made.cert.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(made.cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let counts = Arc::new(TlsCounts::default());
        let counting = counts.clone();
        let background = Background::serve(move |listener| serve_tls(listener, acceptor, counting));
        Self {
            addr: background.addr,
            ca,
            counts,
            _background: background,
        }
    }

    pub fn full(&self) -> u64 {
        self.counts.full.load(Ordering::SeqCst)
    }

    pub fn resumed(&self) -> u64 {
        self.counts.resumed.load(Ordering::SeqCst)
    }

    pub fn h2(&self) -> u64 {
        self.counts.h2.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> u64 {
        self.counts.requests.load(Ordering::SeqCst)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.ca);
    }
}

async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    counts: Arc<TlsCounts>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, counts) = (acceptor.clone(), counts.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let session = tls.get_ref().1;
            match session.handshake_kind() {
                Some(HandshakeKind::Resumed) => counts.resumed.fetch_add(1, Ordering::SeqCst),
                _ => counts.full.fetch_add(1, Ordering::SeqCst),
            };
            if session.alpn_protocol() == Some(b"h2") {
                counts.h2.fetch_add(1, Ordering::SeqCst);
            }
            let service = service_fn(move |_req: Request<Incoming>| {
                counts.requests.fetch_add(1, Ordering::SeqCst);
                async {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                        limit::BODY,
                    ))))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
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
