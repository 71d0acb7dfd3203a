//! `limit-server` as the comparison runs it: a body of the asked size, and counts of
//! accepted connections and received requests on SIGUSR1 and at SIGTERM, which is how
//! `compare.sh` measures a proxy's upstream connection reuse.

// `pub` in support means "for the test"; a failed step should panic with its location.
#![allow(
    unreachable_pub,
    missing_debug_implementations,
    clippy::unwrap_used,
    dead_code
)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use support::loadgen;

fn kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn limit_server_serves_the_asked_body_and_counts_connections_and_requests() {
    let mut server = Command::new(env!("CARGO_BIN_EXE_limit-server"))
        .args(["127.0.0.1:0", "--body-bytes", "1024"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("limit-server: listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line}"))
        .parse()
        .unwrap();

    // One request by hand: the body is exactly 1 KiB.
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase().contains("content-length: 1024"),
        "{head}"
    );
    assert_eq!(body.len(), 1024);

    // Two keep-alive connections carrying 200 requests.
    let summary = loadgen(addr, &["-n", "200", "-c", "2", "-t", "1"]);
    assert_eq!(summary["requests"], 200, "{summary}");

    let pid = server.id();
    let mut stdout = BufReader::new(server.stdout.take().unwrap());
    kill(pid, "USR1");
    let mut now = String::new();
    stdout.read_line(&mut now).unwrap();
    assert_eq!(now.trim(), "connections=3 requests=201");
    kill(pid, "TERM");
    let mut last = String::new();
    stdout.read_line(&mut last).unwrap();
    assert_eq!(last.trim(), "connections=3 requests=201");
    assert!(server.wait().unwrap().success());
}
