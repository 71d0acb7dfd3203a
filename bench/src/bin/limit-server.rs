//! `limit-server`: the upper-limit peer of the comparison — a hyper server that answers
//! every request with a fixed JSON body (HTTP/1.1 and h2c on one port).
//!
//! ```text
//! limit-server 127.0.0.1:8090 [--threads 1]
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// A minimal hyper server: the most requests/s any server here can reach.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    listen: SocketAddr,
    /// Runtime worker threads.
    #[arg(short, long, default_value_t = 1)]
    threads: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let run = || -> anyhow::Result<()> {
        if args.threads == 0 {
            anyhow::bail!("--threads must be at least 1");
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
            bench::limit::serve(listener, bench::limit::Stall::default()).await;
            Ok(())
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
