//! The proxy's HTTP/1.1 upstream path against hyper's client, on a corpus of upstream
//! answers (`gateway/tests/corpus/upstream-responses/`, one raw answer per file, listed
//! in its `manifest.toml` with what RFC 9112 says of it).
//!
//! Each case runs twice, each time against a raw upstream of its own on loopback that
//! answers the case's first request with the file's bytes (then closes, when the manifest
//! says `close`) and any later request with a small `probe` answer:
//!
//! - through Tiergate: one group per case, `proxy.max_attempts = 1` (a retry would hide
//!   what one attempt did), no ejection; the client reads the answer, then asks for the
//!   probe on the same connection when the connection is still usable (else on a new
//!   one);
//! - directly with `hyper::client::conn::http1`, built as the proxy's pool built it before
//!   its own codec, its connection polled by the request as that pool polled it; the probe goes on the same
//!   connection when it is ready for another request (else, or when that send fails, on
//!   a new one, as the pool resends a request a stale connection did not take).
//!
//! The client-visible result is the status, the end-to-end headers (without the
//! hop-by-hop ones, `Via`, `Date` and `X-Request-Id`), the body (or that it was cut),
//! whether the client's connection stayed usable, and whether the upstream saw the probe
//! on the connection of the first request. hyper's result maps to the proxy's so:
//!
//! | hyper's client | the client of the proxy |
//! |---|---|
//! | an error before the head | 502 `bad_gateway`, connection usable, upstream connection not reused |
//! | a `101` to a request that asked for no upgrade | the same 502 (docs/proxy.md, Upgrades) |
//! | a head, then an error in the body | that head, then the connection cut (not usable) |
//! | a head and the whole body | the same, connection usable |
//! | a head, then an error before any body byte | the same, or the connection cut with no head (the server writes the head with the first bytes of the body) |
//! | a 304's `Content-Length` | not sent (the proxy's server, hyper's, leaves it out) |
//! | repeated identical `Content-Length` lines | one line |
//!
//! The proxy must give hyper's mapped result, except where the manifest says
//! `rfc9112 = "reject"` (RFC 9112 says the answer is invalid) or `"either"` (it lets a
//! recipient refuse it): there the proxy may instead refuse it, which is the 502 above.
//! Where hyper accepts what RFC 9112 rejects the manifest says `hyper = "lenient"`, and
//! the test checks that hyper still does, so that list stays true.

use std::collections::BTreeMap;
use std::fmt;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tiergate_config::{RouteSettings, Settings, UpstreamSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{Backends, TestApp};

/// The answer of the upstream to any request but a case's first.
const PROBE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nprobe";

/// Headers that are not end-to-end, or that the proxy sets itself.
const NOT_COMPARED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "via",
    "date",
    "x-request-id",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    #[serde(default = "get")]
    method: String,
    #[serde(default)]
    close: bool,
    rfc9112: Rfc9112,
    hyper: Option<Leniency>,
    why: String,
}

fn get() -> String {
    "GET".to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Rfc9112 {
    Accept,
    Reject,
    Either,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Leniency {
    Lenient,
}

/// What the client of the proxy sees of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    answer: Answer,
    client_usable: bool,
    upstream_reused: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// The proxy's own 502 `bad_gateway`.
    BadGateway,
    /// The connection closed before a head.
    Cut,
    Response {
        status: u16,
        headers: BTreeMap<String, Vec<String>>,
        /// `None`: the connection was cut in the body.
        body: Option<Bytes>,
    },
}

impl Outcome {
    /// The proxy refusing the answer: 502, the upstream connection closed.
    const REFUSED: Outcome = Outcome {
        answer: Answer::BadGateway,
        client_usable: true,
        upstream_reused: false,
    };
}

impl Outcome {
    /// Whether this, the proxy's outcome, is `hyper`'s: the same, or cut before a head
    /// where hyper's body was cut.
    fn answers_as(&self, hyper: &Outcome) -> bool {
        let cut_early = self.answer == Answer::Cut
            && matches!(hyper.answer, Answer::Response { body: None, .. })
            && (self.client_usable, self.upstream_reused)
                == (hyper.client_usable, hyper.upstream_reused);
        self == hyper || cut_early
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.answer {
            Answer::BadGateway => write!(f, "502 bad_gateway")?,
            Answer::Cut => write!(f, "cut before a head")?,
            Answer::Response {
                status,
                headers,
                body,
            } => {
                write!(f, "{status} {headers:?} ")?;
                match body {
                    Some(body) => write!(f, "body {body:?}")?,
                    None => write!(f, "cut")?,
                }
            }
        }
        write!(
            f,
            ", client connection {}, upstream connection {}",
            if self.client_usable { "usable" } else { "cut" },
            if self.upstream_reused {
                "reused"
            } else {
                "new"
            }
        )
    }
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/upstream-responses")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(corpus_dir().join("manifest.toml")).unwrap();
    toml::from_str(&text).unwrap()
}

/// A raw HTTP/1.1 upstream: the first request it reads gets `answer` (and the connection
/// closed after it when `close`), every later one [`PROBE`]. It records, per request,
/// the number of the connection it came on.
struct RawUpstream {
    addr: SocketAddr,
    /// (connection number, whether it was a probe) per request, in order.
    seen: Arc<Mutex<Vec<(usize, bool)>>>,
    server: tokio::task::AbortHandle,
}

impl RawUpstream {
    async fn start(answer: Bytes, close: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<(usize, bool)>>> = Arc::default();
        let log = seen.clone();
        let server = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            for number in 0.. {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections.spawn(serve(stream, number, answer.clone(), close, log.clone()));
            }
        })
        .abort_handle();
        Self { addr, seen, server }
    }

    /// Whether the probe came on the connection of the case's request.
    fn reused(&self) -> bool {
        let seen = self.seen.lock().unwrap();
        let first = seen.iter().find(|(_, probe)| !probe).map(|(conn, _)| conn);
        let probe = seen.iter().find(|(_, probe)| *probe).map(|(conn, _)| conn);
        first.is_some() && first == probe
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    number: usize,
    answer: Bytes,
    close: bool,
    seen: Arc<Mutex<Vec<(usize, bool)>>>,
) {
    let mut buf = Vec::new();
    loop {
        let head = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break buf.drain(..end + 4).collect::<Vec<u8>>();
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let probe = line.windows(7).any(|w| w == b"/probe ");
        let first = {
            let mut seen = seen.lock().unwrap();
            let first = !seen.iter().any(|(_, probe)| !probe);
            seen.push((number, probe));
            first
        };
        if probe || !first {
            if stream.write_all(PROBE).await.is_err() {
                return;
            }
            continue;
        }
        if stream.write_all(&answer).await.is_err() || close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

type Connection = http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>;

/// One client connection, polled by whatever request uses it (as the proxy's pool does).
struct Client {
    sender: http1::SendRequest<Empty<Bytes>>,
    conn: Option<Pin<Box<Connection>>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .unwrap();
        Self {
            sender,
            conn: Some(Box::pin(conn)),
        }
    }

    /// Runs `fut` while polling the connection.
    async fn driving<T>(
        conn: &mut Option<Pin<Box<Connection>>>,
        fut: impl Future<Output = T>,
    ) -> T {
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            if let Some(driver) = conn.as_mut()
                && driver.as_mut().poll(cx).is_ready()
            {
                *conn = None;
            }
            fut.as_mut().poll(cx)
        })
        .await
    }

    /// Whether the connection takes another request now: polled once, as the pool does
    /// before it gives a connection back.
    async fn ready(&mut self) -> bool {
        let conn = &mut self.conn;
        poll_fn(|cx| {
            if let Some(driver) = conn.as_mut()
                && driver.as_mut().poll(cx).is_ready()
            {
                *conn = None;
            }
            Poll::Ready(())
        })
        .await;
        self.conn.is_some() && self.sender.is_ready()
    }

    /// Sends one request; `Err` when hyper failed before the head.
    async fn send(
        &mut self,
        method: &Method,
        path: &str,
    ) -> Result<(u16, Headers, Option<Bytes>), hyper::Error> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "differential.test")
            .body(Empty::new())
            .unwrap();
        let rsp = Self::driving(&mut self.conn, self.sender.send_request(req)).await?;
        let status = rsp.status().as_u16();
        let headers = end_to_end(rsp.headers());
        let body = Self::driving(&mut self.conn, rsp.into_body().collect()).await;
        Ok((status, headers, body.ok().map(|b| b.to_bytes())))
    }
}

type Headers = BTreeMap<String, Vec<String>>;

/// The headers compared: every one not in [`NOT_COMPARED`] nor named by `Connection`.
fn end_to_end(headers: &http::HeaderMap) -> Headers {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = Headers::new();
    for (name, value) in headers {
        let name = name.as_str();
        if NOT_COMPARED.contains(&name) || named.iter().any(|n| n == name) {
            continue;
        }
        out.entry(name.to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    out
}

/// The case through hyper's client directly, mapped as the proxy maps it.
async fn direct(case: &Case, answer: Bytes) -> Outcome {
    let upstream = RawUpstream::start(answer, case.close).await;
    let method = Method::from_bytes(case.method.as_bytes()).unwrap();
    let mut client = Client::connect(upstream.addr).await;
    let path = format!("/{}", case.name);
    let result = client.send(&method, &path).await;
    let (answer, client_usable) = match result {
        Err(_) => (Answer::BadGateway, true),
        Ok((101, ..)) => (Answer::BadGateway, true),
        Ok((status, mut headers, body)) => {
            // The proxy's server (hyper's) sends no `Content-Length` with a 304, and one
            // line for repeated identical ones.
            if status == 304 {
                headers.remove("content-length");
            }
            if let Some(lengths) = headers.get_mut("content-length") {
                lengths.dedup();
            }
            let usable = body.is_some();
            let answer = Answer::Response {
                status,
                headers,
                body,
            };
            (answer, usable)
        }
    };
    let probe = format!("{path}/probe");
    let complete = matches!(&answer, Answer::Response { body: Some(_), .. });
    let sent_on_same =
        complete && client.ready().await && client.send(&Method::GET, &probe).await.is_ok();
    if !sent_on_same {
        let (status, _, body) = Client::connect(upstream.addr)
            .await
            .send(&Method::GET, &probe)
            .await
            .unwrap();
        assert_eq!((status, body.as_deref()), (200, Some(&b"probe"[..])));
    }
    Outcome {
        answer,
        client_usable,
        upstream_reused: upstream.reused(),
    }
}

/// The case through the proxy: `app` routes `/{name}` to `upstream`.
async fn proxied(case: &Case, app: &TestApp, upstream: &RawUpstream) -> Outcome {
    let method = Method::from_bytes(case.method.as_bytes()).unwrap();
    let mut client = Client::connect(app.addr).await;
    let path = format!("/{}", case.name);
    let (answer, complete) = match client.send(&method, &path).await {
        // The server writes a head with the body's first bytes: a body that fails
        // before any leaves the client with no head, only the cut.
        Err(_) => (Answer::Cut, false),
        Ok((502, _, Some(body))) if body.starts_with(br#"{"error":"bad_gateway""#) => {
            (Answer::BadGateway, true)
        }
        Ok((status, headers, body)) => {
            let complete = body.is_some();
            let answer = Answer::Response {
                status,
                headers,
                body,
            };
            (answer, complete)
        }
    };
    let probe = format!("{path}/probe");
    let mut client_usable = false;
    if complete && client.ready().await {
        let (status, _, body) = client.send(&Method::GET, &probe).await.unwrap();
        assert_eq!(
            (status, body.as_deref()),
            (200, Some(&b"probe"[..])),
            "{}",
            case.name
        );
        client_usable = true;
    } else {
        let (status, _, body) = Client::connect(app.addr)
            .await
            .send(&Method::GET, &probe)
            .await
            .unwrap();
        assert_eq!(
            (status, body.as_deref()),
            (200, Some(&b"probe"[..])),
            "{}",
            case.name
        );
    }
    Outcome {
        answer,
        client_usable,
        upstream_reused: upstream.reused(),
    }
}

/// Settings routing `/{name}` of every case to a group of its own over its upstream.
fn settings(backends: &Backends, cases: &[(&Case, &RawUpstream)]) -> Settings {
    let mut settings = backends.settings();
    settings.proxy.max_attempts = 1;
    settings.routes.clear();
    settings.upstreams.clear();
    for (case, upstream) in cases {
        let mut group = UpstreamSettings::new(&case.name, &[&upstream.addr.to_string()]);
        group.outlier.consecutive_failures = 0;
        group.response_timeout = Duration::from_secs(5);
        group.request_timeout = Duration::from_secs(10);
        settings.upstreams.push(group);
        settings.routes.push(RouteSettings::upstream(
            &case.name,
            &format!("/{}", case.name),
            &case.name,
        ));
    }
    settings
}

/// The corpus and its manifest list the same cases, each once.
#[test]
fn the_manifest_lists_every_corpus_file_once() {
    let mut files: Vec<String> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".http").map(str::to_owned))
        .collect();
    files.sort();
    let mut listed: Vec<String> = manifest().case.into_iter().map(|c| c.name).collect();
    listed.sort();
    assert_eq!(files, listed);
}

/// Every corpus answer through the proxy gives hyper's mapped result, or, where RFC 9112
/// lets it, the 502 of a refused answer.
///
/// Mutations that make it fail: forwarding the bytes after a 204 or a complete body as
/// the next answer (`extra-response-after-body`); giving a connection whose body was cut
/// back to the pool (`closed-mid-body-*`); stripping `Content-Length` from HEAD answers;
/// answering an upstream 5xx with the proxy's own 502 (`server-error-503`).
#[tokio::test]
async fn every_corpus_answer_reaches_the_client_as_hyper_or_rfc_9112_says() {
    let backends = Backends::new().await;
    let manifest = manifest();
    let mut upstreams = Vec::new();
    for case in &manifest.case {
        let answer =
            Bytes::from(std::fs::read(corpus_dir().join(format!("{}.http", case.name))).unwrap());
        upstreams.push((RawUpstream::start(answer.clone(), case.close).await, answer));
    }
    let routed: Vec<(&Case, &RawUpstream)> = manifest
        .case
        .iter()
        .zip(upstreams.iter().map(|(u, _)| u))
        .collect();
    let app = TestApp::start(settings(&backends, &routed)).await;
    let mut failures = Vec::new();
    for (case, (upstream, answer)) in manifest.case.iter().zip(&upstreams) {
        let hyper = direct(case, answer.clone()).await;
        let proxy = proxied(case, &app, upstream).await;
        let refusable = case.rfc9112 != Rfc9112::Accept;
        let agrees = proxy.answers_as(&hyper) || (refusable && proxy == Outcome::REFUSED);
        let lenient = case.rfc9112 == Rfc9112::Reject
            && matches!(hyper.answer, Answer::Response { body: Some(_), .. });
        println!(
            "{:<40} hyper: {hyper}\n{:<40} proxy: {proxy}",
            case.name, ""
        );
        if !agrees {
            failures.push(format!(
                "{}: proxy {proxy}, hyper {hyper} ({})",
                case.name, case.why
            ));
        }
        if lenient != (case.hyper == Some(Leniency::Lenient)) {
            failures.push(format!(
                "{}: the manifest says hyper is {}lenient, it {}",
                case.name,
                if lenient { "not " } else { "" },
                if lenient { "accepts it" } else { "refuses it" }
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    app.stop().await;
}
