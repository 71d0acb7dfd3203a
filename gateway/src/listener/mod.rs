//! Listeners: TCP (or TLS) connections served by hyper, HTTP/1.1 and HTTP/2 on one port
//! (ALPN over TLS; by prior knowledge over plain TCP).
//!
//! Every listener is hardened the same way:
//! - **Connection cap.** A semaphore permit is taken *before* `accept` and held by the
//!   connection's task, so at `listen.max_connections` the loop stops accepting and new
//!   connections wait in the kernel's backlog instead of crashing anything.
//! - **TLS handshake timeout**, then ALPN picks the protocol.
//! - **Header-read timeout that spares idle keep-alives.** hyper's own
//!   `header_read_timeout` starts when hyper *waits* for a head, so it also closes idle
//!   keep-alive connections (30 s by default: under the ALB's 60 s idle timeout, which
//!   turns into 502s). It is off; the guarded IO wraps the connection instead and runs
//!   one of two clocks while hyper waits for bytes: `http.idle_timeout` while no request
//!   is under way, `http.header_read_timeout` from the first byte of a request head until
//!   hyper hands the parsed request to the service.
//! - **Slow readers.** Writes that make no progress for `http.idle_timeout` end the
//!   connection.
//! - **Framing**: `Content-Length` with `Transfer-Encoding` or twice, and any
//!   `Transfer-Encoding` but one `chunked`, last, are answered 400 (501 for a coding
//!   other than chunked) and the connection closed.
//! - **Host**: exactly one, a host with an optional port, required on HTTP/1.1, agreeing
//!   with `:authority` on HTTP/2; CONNECT is refused (501).
//! - **Errors in JSON**, hyper's own too: hyper answers a head it cannot parse with a
//!   bare 400, 414 or 431, which the guarded IO replaces with the JSON answer as it is
//!   written.
//! - **HEAD** is answered without the body, with the GET's length.
//! - Head size and header count limits (431 from hyper), HTTP/2 stream and header-list
//!   limits; h2's reset-flood protection stays at its defaults.
//! - A failed `accept` (EMFILE and the like) backs off instead of spinning.
//!
//! Shutdown runs in two phases (draining, then closing), described in `drain`.
//!
//! # Layout
//! - `accept`: the accept loop of one listener, and taking in the backlog at close.
//! - `drain`: the shutdown phase as the loops and connections see it.
//! - `connection`: one connection: TLS handshake, hyper, answering the drain.
//! - `state`: what a connection's service and its IO tell each other.
//! - `guarded`: the connection's IO with the idle, header-read and write clocks, and
//!   the JSON answer in place of hyper's refusals.
//! - `head_scan`: the raw request head's framing checks.
//! - `checks`: what every request must be before a handler sees it; HEAD's answer.

mod accept;
mod checks;
mod connection;
mod drain;
mod guarded;
mod head_scan;
mod state;

use std::net::SocketAddr;
use std::time::Duration;

use tiergate_config::Settings;
use tokio_rustls::TlsAcceptor;

pub(crate) use accept::serve;
pub(crate) use drain::{Drain, DrainControl, Phase};

/// The connection limits of a listener, from `listen.*` and `http.*`.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// From the first byte of a request head to the parsed request.
    pub header_read_timeout: Duration,
    /// Idle time allowed between requests.
    pub idle_timeout: Duration,
    /// Largest HTTP/1.1 head (hyper's read buffer).
    pub max_header_bytes: usize,
    /// Most HTTP/1.1 header lines.
    pub max_headers: usize,
    /// HTTP/2 concurrent streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 decoded header list size.
    pub h2_max_header_list_bytes: u32,
}

impl Limits {
    /// The limits the settings ask for.
    pub fn new(settings: &Settings) -> Self {
        Self {
            max_connections: settings.listen.max_connections,
            header_read_timeout: settings.http.header_read_timeout,
            idle_timeout: settings.http.idle_timeout,
            max_header_bytes: settings.http.max_header_bytes,
            max_headers: settings.http.max_headers,
            h2_max_concurrent_streams: settings.http.h2_max_concurrent_streams,
            h2_max_header_list_bytes: settings.http.h2_max_header_list_bytes,
        }
    }
}

/// The client end of a connection, as the request path needs it.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The client's address (the load balancer's, behind one).
    pub addr: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The listener's port.
    pub local_port: u16,
}

/// Plain TCP, or TLS with a handshake deadline.
#[derive(Clone)]
pub(crate) enum Transport {
    Plain,
    Tls {
        acceptor: TlsAcceptor,
        handshake_timeout: Duration,
    },
}
