//! loadgen over TLS against a local HTTPS server whose certificate is made at run time:
//! requests succeed over HTTP/1.1 and h2 (ALPN), a keep-alive run handshakes once per
//! connection, `--new-conn` pays one full handshake per request (counted by loadgen and,
//! independently, by the server), and an untrusted certificate is refused.

// `pub` in support means "for the test"; a failed step should panic with its location.
#![allow(
    unreachable_pub,
    missing_debug_implementations,
    clippy::unwrap_used,
    dead_code
)]

mod support;

use support::{TlsServer, loadgen_output, loadgen_url};

fn url(server: &TlsServer) -> String {
    format!("https://127.0.0.1:{}/items/1", server.addr.port())
}

#[test]
fn new_conn_over_tls_makes_one_full_handshake_per_request() {
    let server = TlsServer::start();
    let summary = loadgen_url(
        &url(&server),
        &[
            "--insecure",
            "--new-conn",
            "-n",
            "300",
            "-c",
            "4",
            "-t",
            "1",
        ],
    );
    eprintln!("{summary}");
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["tls"], true, "{summary}");
    assert_eq!(summary["requests"], 300, "{summary}");
    assert_eq!(summary["connects"], 300, "{summary}");
    assert_eq!(summary["tls_handshakes"], 300, "{summary}");
    assert_eq!(summary["tls_resumed"], 0, "{summary}");
    // The server saw the same: every request a full handshake, none resumed.
    assert_eq!(server.requests(), 300);
    assert_eq!(server.full(), 300);
    assert_eq!(server.resumed(), 0);
}

#[test]
fn resume_lets_new_connections_skip_the_full_handshake() {
    let server = TlsServer::start();
    let ca = server.ca.to_str().unwrap();
    let summary = loadgen_url(
        &url(&server),
        &["--ca", ca, "--resume", "--new-conn", "-n", "100", "-c", "1"],
    );
    assert_eq!(summary["errors"], 0, "{summary}");
    assert_eq!(summary["requests"], 100, "{summary}");
    let full = summary["tls_handshakes"].as_u64().unwrap();
    let resumed = summary["tls_resumed"].as_u64().unwrap();
    assert_eq!(full + resumed, 100, "{summary}");
    assert!(
        resumed >= 90,
        "only {resumed} of 100 handshakes resumed: {summary}"
    );
    assert_eq!(server.resumed(), resumed);
}

#[test]
fn keep_alive_over_tls_handshakes_once_per_connection_in_h1_and_h2() {
    let server = TlsServer::start();
    let ca = server.ca.to_str().unwrap();

    let h1 = loadgen_url(
        &url(&server),
        &["--ca", ca, "-n", "2000", "-c", "4", "-t", "1"],
    );
    assert_eq!(h1["errors"], 0, "{h1}");
    assert_eq!(h1["protocol"], "http1", "{h1}");
    assert_eq!(h1["requests"], 2000, "{h1}");
    assert_eq!(h1["tls_handshakes"], 4, "{h1}");
    assert_eq!(server.full(), 4);
    assert_eq!(server.h2(), 0, "HTTP/1.1 runs must not negotiate h2");

    let h2 = loadgen_url(
        &url(&server),
        &[
            "--ca",
            ca,
            "--http2",
            "--streams",
            "4",
            "-n",
            "1000",
            "-c",
            "2",
            "-t",
            "1",
        ],
    );
    assert_eq!(h2["errors"], 0, "{h2}");
    assert_eq!(h2["protocol"], "http2", "{h2}");
    assert_eq!(h2["requests"], 1000, "{h2}");
    assert_eq!(h2["tls_handshakes"], 2, "{h2}");
    assert_eq!(server.h2(), 2, "both h2 connections agreed on h2 by ALPN");
    assert_eq!(server.requests(), 3000);
}

#[test]
fn an_untrusted_certificate_is_refused_without_ca_or_insecure() {
    let server = TlsServer::start();
    // The system's bundle does not hold the certificate made a moment ago.
    let (out, summary) = loadgen_output(&url(&server), &["-n", "10", "-c", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "loadgen trusted a self-signed certificate: {stderr}"
    );
    assert!(
        stderr.contains("certificate") || stderr.contains("no trusted"),
        "{stderr}"
    );
    if let Some(summary) = summary {
        assert_eq!(summary["requests"], 0, "{summary}");
    }
    assert_eq!(server.requests(), 0);
}
