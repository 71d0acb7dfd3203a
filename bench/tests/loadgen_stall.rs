//! Acceptance: a server that stalls for a second shows in open-loop percentiles
//! (latency counted from the intended send time) and hides in closed-loop ones (only
//! the one stalled request waits; the other connections carry on).

// `pub` in support means "for the test"; a failed step should panic with its location.
#![allow(
    unreachable_pub,
    missing_debug_implementations,
    clippy::unwrap_used,
    dead_code
)]

mod support;

use support::{Server, loadgen};

#[test]
fn open_loop_reports_a_one_second_stall_that_closed_loop_hides() {
    let server = Server::start();
    let common = ["-c", "4", "-t", "1", "-d", "3s"];

    // The first request of the run stalls: armed before loadgen connects.
    server.stall.arm();
    let closed = loadgen(server.addr, &common);
    server.stall.arm();
    let mut open_args = common.to_vec();
    open_args.extend(["--rate", "1000"]);
    let open = loadgen(server.addr, &open_args);
    eprintln!("closed: {closed}\nopen: {open}");

    let ms = |s: &serde_json::Value, k: &str| s[k].as_f64().unwrap();
    // Both runs met the stall …
    assert!(ms(&closed, "max_ms") >= 1000.0, "{closed}");
    assert!(ms(&open, "max_ms") >= 1000.0, "{open}");
    // … closed loop hides it: one request waited, thousands did not.
    assert!(ms(&closed, "p99_ms") < 100.0, "{closed}");
    // … open loop shows it: every request scheduled during the second waited.
    assert!(ms(&open, "p99_ms") >= 500.0, "{open}");
    assert!(ms(&open, "p90_ms") < ms(&open, "p99_ms"));
}
