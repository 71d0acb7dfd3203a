//! `limit-server`: the upper-limit peer of the comparison — a hyper server that answers
//! every request with a fixed JSON body (HTTP/1.1 and h2c on one port). Behind the
//! proxies it is the upstream; its counts say how often they reused connections.
//!
//! ```text
//! limit-server 127.0.0.1:8090 [--threads 1] [--body-bytes 1024]
//! kill -USR1 $pid   # prints "connections=N requests=M" (accepted, received so far)
//! kill $pid         # prints the same line, then exits
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use bench::limit::{self, Options, Stats};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// A minimal hyper server: the most requests/s any server here can reach.
#[derive(Debug, Parser)]
#[command(name = "limit-server", version = build_info::LONG_VERSION, about)]
struct Args {
    /// Address to listen on.
    listen: SocketAddr,
    /// Runtime worker threads.
    #[arg(short, long, default_value_t = 1)]
    threads: usize,
    /// Answer with a JSON body of this many bytes (at least 16) instead of an item's.
    #[arg(long)]
    body_bytes: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> anyhow::Result<()> {
        if args.threads == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        let mut options = Options::default();
        if let Some(len) = args.body_bytes {
            options.body = limit::body_of(len).context("--body-bytes")?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
            .context("build the tokio runtime")?;
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            if let Ok(addr) = listener.local_addr() {
                eprintln!("limit-server: listening on {addr}");
            }
            let stats = options.stats.clone();
            tokio::select! {
                () = limit::serve_with(listener, options) => Ok(()),
                done = report(&stats) => done,
            }
        })
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("limit-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the counts on every SIGUSR1; prints them once more and returns on SIGTERM or
/// SIGINT.
async fn report(stats: &Arc<Stats>) -> anyhow::Result<()> {
    let mut usr1 = signal(SignalKind::user_defined1()).context("install a SIGUSR1 handler")?;
    let mut term = signal(SignalKind::terminate()).context("install a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install a SIGINT handler")?;
    loop {
        tokio::select! {
            _ = usr1.recv() => println!("{}", stats.line()),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    println!("{}", stats.line());
    Ok(())
}
