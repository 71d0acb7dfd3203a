//! The load itself: N connections spread over T threads, each thread a current-thread
//! tokio runtime (as wrk runs one event loop per thread), so a connection's task and
//! the worker that uses it never wake each other across cores.
//!
//! Closed loop: each worker sends its next request as soon as the last one is answered.
//! Open loop: each worker has a schedule (`rate` shared evenly) and a request's latency
//! is counted from when the schedule *intended* to send it, not from when it went out.
//! A server that stalls then shows the stall in every request that should have gone out
//! during it (coordinated omission corrected, as wrk2 does), instead of in one sample.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::CONTENT_TYPE;
use http::uri::Authority;
use http::{HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::h1;
use crate::scenario::Scenario;
use crate::tls::{Handshake, Stream, Tls};

/// Latencies are recorded in microseconds, up to an hour, with 3 significant digits.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Workers publish their counts for the progress line every this many requests, so the
/// shared counters are not a contended cache line on every request.
const PUBLISH_EVERY: u64 = 64;

/// The wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, one request at a time per connection.
    Http1,
    /// HTTP/2 (h2c with prior knowledge, or `h2` by ALPN over TLS), `streams` requests
    /// at a time per connection.
    Http2,
}

/// When the run ends.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After this long (requests in flight then are still answered and counted).
    After(Duration),
    /// After this many requests in total.
    Requests(u64),
}

/// Everything one run needs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where to connect.
    pub addr: SocketAddr,
    /// `host[:port]` for `:authority` (HTTP/2).
    pub authority: Authority,
    /// The same, as the `Host` header (HTTP/1.1).
    pub host: HeaderValue,
    /// The wire protocol.
    pub protocol: Protocol,
    /// TLS over every connection (`https`), or plain TCP when `None`.
    pub tls: Option<Tls>,
    /// TCP connections (ignored with `new_conn`: every request opens its own).
    pub connections: usize,
    /// Concurrent requests per connection (HTTP/2 only; HTTP/1.1 is always 1).
    pub streams: usize,
    /// OS threads, each running its share of the connections.
    pub threads: usize,
    /// Open a new connection for every request (then `connections` workers do so).
    pub new_conn: bool,
    /// When to stop.
    pub stop: Stop,
    /// Open loop at this many requests per second in total; closed loop when `None`.
    pub rate: Option<f64>,
    /// What to request.
    pub scenario: Scenario,
    /// One request (connect included) that takes longer counts as an error.
    pub timeout: Duration,
    /// Print a progress line on stderr once a second.
    pub progress: bool,
}

/// What a run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Latency of every answered request, in µs.
    pub latency: Histogram<u64>,
    /// Requests answered (any status).
    pub answered: u64,
    /// Transport failures and timeouts, plus answers with status 5xx.
    pub errors: u64,
    /// Answers with a status outside 2xx and 3xx (5xx included).
    pub non_success: u64,
    /// From the first request to the last answer.
    pub elapsed: Duration,
    /// The first transport error, for the report.
    pub first_error: Option<String>,
    /// Connections opened (before the start and during the run).
    pub connects: u64,
    /// Full TLS handshakes completed.
    pub tls_full: u64,
    /// Resumed TLS handshakes completed.
    pub tls_resumed: u64,
}

impl Outcome {
    /// Answered requests per second.
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.answered as f64 / secs
        } else {
            0.0
        }
    }
}

/// Counters every worker publishes to, for the progress line and the request budget.
#[derive(Debug, Default)]
struct Shared {
    tickets: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    connects: AtomicU64,
    tls_full: AtomicU64,
    tls_resumed: AtomicU64,
}

/// Per-worker results, merged at the end.
#[derive(Debug)]
struct Tally {
    latency: Histogram<u64>,
    answered: u64,
    errors: u64,
    non_success: u64,
    unpublished: u64,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
                .context("latency histogram bounds")?,
            answered: 0,
            errors: 0,
            non_success: 0,
            unpublished: 0,
        })
    }

    /// Adds another task's counts to these.
    fn merge(&mut self, other: &Self) -> anyhow::Result<()> {
        self.latency
            .add(&other.latency)
            .context("merge latency histograms")?;
        self.answered += other.answered;
        self.errors += other.errors;
        self.non_success += other.non_success;
        Ok(())
    }

    fn count(&mut self, shared: &Shared, error: bool) {
        self.unpublished += 1;
        if error {
            self.errors += 1;
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.unpublished >= PUBLISH_EVERY {
            shared.done.fetch_add(self.unpublished, Ordering::Relaxed);
            self.unpublished = 0;
        }
    }
}

/// A client connection.
enum Conn {
    /// loadgen's own HTTP/1.1 client (see [`crate::h1`]).
    H1(h1::Connection),
    /// HTTP/2 connections are shared by several workers, so they run in a task of their own.
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    /// Connects (and handshakes TLS), counting both in `shared`.
    async fn open(plan: &Plan, shared: &Shared) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(plan.addr)
            .await
            .with_context(|| format!("connect to {}", plan.addr))?;
        tcp.set_nodelay(true).context("set TCP_NODELAY")?;
        shared.connects.fetch_add(1, Ordering::Relaxed);
        let io = match &plan.tls {
            None => Stream::Tcp(tcp),
            Some(tls) => {
                let (io, kind) = tls.connect(tcp).await?;
                let counter = match kind {
                    Handshake::Full => &shared.tls_full,
                    Handshake::Resumed => &shared.tls_resumed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                io
            }
        };
        Ok(match plan.protocol {
            Protocol::Http1 => Self::H1(h1::Connection::new(io)),
            Protocol::Http2 => {
                let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await
                    .context("HTTP/2 handshake")?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Self::H2(send)
            }
        })
    }

    fn share(&self) -> Option<Self> {
        match self {
            Self::H1(_) => None,
            Self::H2(send) => Some(Self::H2(send.clone())),
        }
    }

    /// Sends an HTTP/2 request and reads the whole answer; returns its status.
    async fn call_h2(
        send: &mut http2::SendRequest<Full<Bytes>>,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<u16> {
        send.ready().await?;
        read(send.send_request(req).await?).await
    }
}

/// Reads the whole answer; returns its status.
async fn read(rsp: http::Response<hyper::body::Incoming>) -> anyhow::Result<u16> {
    let status = rsp.status().as_u16();
    rsp.into_body().collect().await?;
    Ok(status)
}

/// Runs `plan` to the end and merges what every worker measured.
///
/// # Errors
/// A thread cannot be started, or no connection could be opened before the start.
pub fn run(plan: Plan) -> anyhow::Result<Outcome> {
    let plan = Arc::new(plan);
    let threads = plan.threads.clamp(1, plan.connections.max(1));
    let shared = Arc::new(Shared::default());
    // Everyone connects first, then all start together, as wrk does.
    let barrier = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::with_capacity(threads);
    for t in 0..threads {
        // Connections t, t + threads, … belong to thread t.
        let mine: Vec<usize> = (t..plan.connections).step_by(threads).collect();
        let (plan, shared, barrier) = (plan.clone(), shared.clone(), barrier.clone());
        let handle = std::thread::Builder::new()
            .name(format!("loadgen-{t}"))
            .spawn(move || thread_main(&plan, &shared, &barrier, &mine))
            .context("start a load thread")?;
        handles.push(handle);
    }
    barrier.wait();
    let started = std::time::Instant::now();
    let mut last_done = 0;
    let mut last_tick = started;
    let mut results = Vec::with_capacity(threads);
    for handle in handles {
        // A ticker: wake once a second to print progress until this thread is done.
        while plan.progress && !handle.is_finished() {
            std::thread::park_timeout(Duration::from_millis(100));
            if last_tick.elapsed() >= Duration::from_secs(1) {
                let done = shared.done.load(Ordering::Relaxed);
                let secs = last_tick.elapsed().as_secs_f64();
                eprint!(
                    "\r{:>6.1} s  {:>10} requests  {:>10.0} req/s  {} errors   ",
                    started.elapsed().as_secs_f64(),
                    done,
                    (done - last_done) as f64 / secs,
                    shared.errors.load(Ordering::Relaxed)
                );
                last_done = done;
                last_tick = std::time::Instant::now();
            }
        }
        let result = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
        results.push(result?);
    }
    if plan.progress {
        eprintln!();
    }
    let mut total = Tally::new()?;
    let mut elapsed = Duration::ZERO;
    for (tally, took) in results {
        total.merge(&tally)?;
        elapsed = elapsed.max(took);
    }
    let first_error = shared
        .first_error
        .lock()
        .map(|e| e.clone())
        .unwrap_or_default();
    Ok(Outcome {
        latency: total.latency,
        answered: total.answered,
        errors: total.errors,
        non_success: total.non_success,
        elapsed,
        first_error,
        connects: shared.connects.load(Ordering::Relaxed),
        tls_full: shared.tls_full.load(Ordering::Relaxed),
        tls_resumed: shared.tls_resumed.load(Ordering::Relaxed),
    })
}

fn thread_main(
    plan: &Arc<Plan>,
    shared: &Arc<Shared>,
    barrier: &Barrier,
    mine: &[usize],
) -> anyhow::Result<(Tally, Duration)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            barrier.wait();
            return Err(e).context("build a tokio runtime");
        }
    };
    let local = tokio::task::LocalSet::new();
    // Connect before the start line; a failure here is reported by the first request.
    let conns: Vec<Option<Conn>> = local.block_on(&runtime, async {
        let mut conns = Vec::new();
        for _ in mine {
            if plan.new_conn {
                conns.push(None);
                continue;
            }
            let first = Conn::open(plan, shared).await.ok();
            for _ in 1..streams(plan) {
                conns.push(first.as_ref().and_then(Conn::share));
            }
            conns.push(first);
        }
        conns
    });
    barrier.wait();
    let start = Instant::now();
    let workers_total = plan.connections * streams(plan);
    let tallies = local.block_on(&runtime, async {
        let mut tasks = Vec::new();
        for (slot, conn) in conns.into_iter().enumerate() {
            // Global worker index, for spreading open-loop schedules evenly.
            let index = mine[slot / streams(plan)] * streams(plan) + slot % streams(plan);
            let (plan, shared) = (plan.clone(), shared.clone());
            tasks.push(tokio::task::spawn_local(async move {
                worker(&plan, &shared, conn, start, index, workers_total).await
            }));
        }
        let mut tallies = Vec::new();
        for task in tasks {
            tallies.push(task.await);
        }
        tallies
    });
    let took = start.elapsed();
    let mut total = Tally::new()?;
    for tally in tallies {
        let tally = tally.context("a load task failed")??;
        total.merge(&tally)?;
    }
    Ok((total, took))
}

fn streams(plan: &Plan) -> usize {
    match plan.protocol {
        Protocol::Http1 => 1,
        Protocol::Http2 => plan.streams.max(1),
    }
}

async fn worker(
    plan: &Plan,
    shared: &Shared,
    mut conn: Option<Conn>,
    start: Instant,
    index: usize,
    workers: usize,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let mut rng = fastrand::Rng::new();
    // Open loop: this worker's share of the rate, offset so workers interleave.
    let interval = plan
        .rate
        .map(|rate| Duration::from_secs_f64(workers as f64 / rate));
    let offset = interval.map_or(Duration::ZERO, |i| i.mul_f64(index as f64 / workers as f64));
    let mut k: u32 = 0;
    loop {
        let intended = interval.map(|i| start + offset + i * k);
        k = k.saturating_add(1);
        match plan.stop {
            Stop::After(d) => {
                let now_or_intended = intended.unwrap_or_else(Instant::now);
                if now_or_intended >= start + d {
                    break;
                }
            }
            Stop::Requests(n) => {
                if shared.tickets.fetch_add(1, Ordering::Relaxed) >= n {
                    break;
                }
            }
        }
        if let Some(at) = intended {
            tokio::time::sleep_until(at).await;
        }
        let sent = Instant::now();
        let from = intended.unwrap_or(sent);
        let result =
            tokio::time::timeout(plan.timeout, call(plan, shared, &mut rng, &mut conn)).await;
        let latency = from.elapsed();
        let error = match result {
            Ok(Ok(status)) => {
                tally.answered += 1;
                let us = u64::try_from(latency.as_micros()).unwrap_or(MAX_LATENCY_US);
                tally.latency.saturating_record(us.max(1));
                if !(200..400).contains(&status) {
                    tally.non_success += 1;
                }
                status >= 500
            }
            Ok(Err(e)) => {
                note_error(shared, format!("{e:#}"));
                conn = None;
                true
            }
            Err(_) => {
                note_error(
                    shared,
                    format!(
                        "no answer within {}",
                        humantime::format_duration(plan.timeout)
                    ),
                );
                conn = None;
                true
            }
        };
        tally.count(shared, error);
        if plan.new_conn {
            conn = None;
        }
    }
    shared.done.fetch_add(tally.unpublished, Ordering::Relaxed);
    Ok(tally)
}

fn note_error(shared: &Shared, message: String) {
    if let Ok(mut first) = shared.first_error.lock() {
        first.get_or_insert(message);
    }
}

/// One request on `conn`, opening a connection first when there is none.
async fn call(
    plan: &Plan,
    shared: &Shared,
    rng: &mut fastrand::Rng,
    conn: &mut Option<Conn>,
) -> anyhow::Result<u16> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(Conn::open(plan, shared).await?),
    };
    let next = plan.scenario.next(rng);
    let send = match c {
        Conn::H1(h1) => {
            let status = h1
                .call(&next.method, &next.path, &plan.host, next.body.as_ref())
                .await;
            if !h1.is_open() {
                *conn = None;
            }
            return status;
        }
        Conn::H2(send) => send,
    };
    let mut req = Request::new(Full::new(next.body.clone().unwrap_or_default()));
    *req.method_mut() = next.method;
    let mut parts = next.path.into_parts();
    parts.scheme = Some(if plan.tls.is_some() {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    parts.authority = Some(plan.authority.clone());
    *req.uri_mut() = Uri::from_parts(parts).context("build the request URI")?;
    if next.body.is_some() {
        req.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    Conn::call_h2(send, req).await
}
