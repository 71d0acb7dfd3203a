//! `loadgen`: an HTTP load generator for Tiergate and its peers.
//!
//! It measures the deployed artifact over real sockets and imports nothing from
//! `gateway`. Closed loop (`--rate` unset) finds the most a server answers; open loop
//! (`--rate`) holds a fixed request rate and counts each latency from the intended send
//! time, so a stall shows in the percentiles instead of hiding behind waiting clients.
//!
//! ```text
//! loadgen http://127.0.0.1:8080/items/1 -c 32 -d 10s
//! loadgen http://127.0.0.1:8080 --scenario zipf --items 10000 --rate 20000 --json out.json --svg out.svg
//! loadgen https://127.0.0.1:8443/livez --ca cert.pem --http2 --streams 8
//! loadgen https://127.0.0.1:8443/livez --insecure --new-conn   # a full handshake per request
//! ```

use std::io::IsTerminal;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context, bail};
use bench::load::{self, Plan, Protocol, Stop};
use bench::report::{self, Summary};
use bench::scenario::{self, Scenario, ZipfTable};
use bench::tls::{Tls, Trust};
use clap::{Parser, ValueEnum};
use http::{HeaderValue, Uri};

/// Load an HTTP server and report requests/s and latency percentiles.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version = build_info::LONG_VERSION, about)]
struct Args {
    /// Target URL (http:// or https://host:port/path). With `--scenario url` its path is
    /// requested.
    url: String,
    /// TCP connections.
    #[arg(short, long, default_value_t = 16)]
    connections: usize,
    /// Threads (each runs its share of the connections). Default: one per core.
    #[arg(short, long)]
    threads: Option<usize>,
    /// How long to run, e.g. `10s`, `1m`.
    #[arg(short, long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Stop after this many requests instead of after `--duration`.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Open loop: this many requests per second in total (coordinated-omission corrected).
    #[arg(short, long)]
    rate: Option<f64>,
    /// HTTP/2 instead of HTTP/1.1: h2c with prior knowledge, or `h2` by ALPN with TLS.
    #[arg(long)]
    http2: bool,
    /// TLS to the server (implied by an https:// URL). The server's certificate must be
    /// for the URL's host and signed by `--ca`, or by the system's CA bundle.
    #[arg(long)]
    tls: bool,
    /// Trust the certificates in this PEM file (e.g. a self-signed one) for `--tls`.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    ca: Option<PathBuf>,
    /// Accept any server certificate for `--tls` (a self-signed one, any name).
    #[arg(short = 'k', long)]
    insecure: bool,
    /// Allow TLS session resumption. Off by default, so `--new-conn` pays a full
    /// handshake for every request.
    #[arg(long)]
    resume: bool,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Open a new TCP connection (and TLS session) for every request.
    #[arg(long)]
    new_conn: bool,
    /// What to request.
    #[arg(short, long, value_enum, default_value_t = Kind::Url)]
    scenario: Kind,
    /// The id for `hot`.
    #[arg(long, default_value_t = 1)]
    id: u64,
    /// The first id for `zipf`, `mix` and `cold`.
    #[arg(long, default_value_t = 1)]
    first_id: u64,
    /// How many ids `zipf` and `mix` draw from.
    #[arg(long, default_value_t = 1000)]
    items: u64,
    /// Zipf exponent (1.0 classic; 0 uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf_s: f64,
    /// Share of `mix` requests that are writes (`PUT /items/{id}`), 0 to 1.
    #[arg(long, default_value_t = 0.1)]
    write_ratio: f64,
    /// A request that takes longer counts as an error.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Label of the run in the table and plot (default: the scenario).
    #[arg(long)]
    label: Option<String>,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a latency-by-percentile plot (SVG) here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress line.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    /// The URL's path, every request (proxy pass-through, static pages).
    Url,
    /// `GET /items/{--id}`.
    Hot,
    /// `GET /items/{id}`, Zipf over `--items` ids from `--first-id`.
    Zipf,
    /// Zipf reads plus `PUT /items/{id}` for `--write-ratio` of the requests.
    Mix,
    /// `GET /items/{id}` for ids `--first-id`, +1, …: each read once (a miss storm).
    Cold,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let plan = plan(&args)?;
    let mode = match plan.rate {
        Some(rate) => format!("open@{rate}/s"),
        None => "closed".to_owned(),
    };
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| plan.scenario.name().to_owned());
    let (protocol, tls, connections) = (plan.protocol, plan.tls.is_some(), plan.connections);
    let outcome = load::run(plan)?;
    let summary = Summary::new(&label, mode, protocol, tls, connections, &outcome);
    print!("{}", report::markdown(std::slice::from_ref(&summary)));
    if let Some(e) = &summary.first_error {
        eprintln!("loadgen: first error: {e}");
    }
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&summary).context("encode the JSON summary")?;
        std::fs::write(path, json + "\n")
            .with_context(|| format!("cannot write --json {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, report::svg(std::slice::from_ref(&summary)))
            .with_context(|| format!("cannot write --svg {}", path.display()))?;
    }
    // Scripts must not mistake a run against a dead server for a measurement.
    if summary.requests == 0 {
        bail!("no request was answered");
    }
    Ok(())
}

fn plan(args: &Args) -> anyhow::Result<Plan> {
    let uri: Uri = args
        .url
        .parse()
        .with_context(|| format!("URL '{}' does not parse", args.url))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => bail!("URL '{}' must start with http:// or https://", args.url),
    };
    let tls = https || args.tls;
    if !tls && (args.ca.is_some() || args.insecure || args.resume) {
        bail!("--ca, --insecure and --resume need --tls or an https:// URL");
    }
    let Some(authority) = uri.authority() else {
        bail!("URL '{}' has no host", args.url);
    };
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addr = (authority.host(), port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", authority.host()))?
        .next()
        .with_context(|| format!("{} resolves to no address", authority.host()))?;
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if args.streams == 0 {
        bail!("--streams must be at least 1");
    }
    if args.streams > 1 && !args.http2 {
        bail!("--streams needs --http2 (HTTP/1.1 sends one request at a time per connection)");
    }
    if let Some(rate) = args.rate
        && !(rate.is_finite() && rate > 0.0)
    {
        bail!("--rate must be a positive number of requests per second, got {rate}");
    }
    if args.requests == Some(0) {
        bail!("--requests must be at least 1");
    }
    if args.duration.is_zero() && args.requests.is_none() {
        bail!("--duration must be longer than 0");
    }
    if !(0.0..=1.0).contains(&args.write_ratio) {
        bail!(
            "--write-ratio must be between 0 and 1, got {}",
            args.write_ratio
        );
    }
    let scenario = match args.scenario {
        Kind::Url => Scenario::Url(match uri.path_and_query() {
            Some(path) => Uri::from(path.clone()),
            None => Uri::from_static("/"),
        }),
        Kind::Hot => scenario::hot(args.id),
        Kind::Zipf => Scenario::Zipf {
            first: args.first_id,
            table: Arc::new(ZipfTable::new(args.items, args.zipf_s)?),
        },
        Kind::Mix => Scenario::Mix {
            first: args.first_id,
            table: Arc::new(ZipfTable::new(args.items, args.zipf_s)?),
            write_ratio: args.write_ratio,
        },
        Kind::Cold => Scenario::Cold {
            next: Arc::new(AtomicU64::new(args.first_id)),
        },
    };
    let tls = if tls {
        let trust = match (&args.ca, args.insecure) {
            (Some(path), _) => Trust::Ca(path),
            (None, true) => Trust::Insecure,
            (None, false) => Trust::System,
        };
        let alpn: &'static [u8] = if args.http2 { b"h2" } else { b"http/1.1" };
        Some(Tls::new(authority.host(), trust, alpn, args.resume)?)
    } else {
        None
    };
    let threads = match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => t,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    Ok(Plan {
        addr,
        host: HeaderValue::from_str(authority.as_str())
            .with_context(|| format!("'{authority}' is not a valid Host header"))?,
        authority: authority.clone(),
        protocol: if args.http2 {
            Protocol::Http2
        } else {
            Protocol::Http1
        },
        tls,
        connections: args.connections,
        streams: args.streams,
        threads,
        new_conn: args.new_conn,
        stop: args
            .requests
            .map_or(Stop::After(args.duration), Stop::Requests),
        rate: args.rate,
        scenario,
        timeout: args.timeout,
        progress: !args.quiet && std::io::stderr().is_terminal(),
    })
}
