//! Benchmarks of Tiergate's hot paths (`benches/`) and `loadgen`, the load-test harness
//! (`src/bin/loadgen.rs`), which measures a running server over real sockets and imports
//! nothing from `gateway`.
//!
//! # Layout
//! - [`scenario`]: which request comes next (hot id, Zipf, read/write mix, cold ids, a URL).
//! - [`load`]: connections, closed- and open-loop drivers, latency histograms.
//! - [`h1`]: loadgen's own HTTP/1.1 client (hyper's costs too much per request).
//! - [`tls`]: the rustls client for `https` and the plain-or-TLS socket.
//! - [`limit`]: the upper-limit server (a fixed answer), for tests and comparisons.
//! - [`report`]: the markdown table, JSON and the SVG percentile plot.

pub mod h1;
pub mod limit;
pub mod load;
pub mod report;
pub mod scenario;
pub mod tls;
