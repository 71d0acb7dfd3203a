//! Listener hardening, spoken over raw sockets: slowloris against idle keep-alive, head
//! limits, ambiguous framing, the connection cap, HTTP/2 rapid reset.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tiergate_config::{RouteSettings, Settings, UpstreamSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::helpers::TestApp;
use crate::raw::{exchange, read_raw};
use crate::upstream::Upstream;

const GET: &[u8] = b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n";

/// Waits for the server to close: EOF or a reset, within `within`. Returns when.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Instant {
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return Instant::now(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("still open after {within:?}"),
        }
    }
}

fn settings() -> Settings {
    let mut settings = Settings::for_tests();
    settings.http.header_read_timeout = Duration::from_millis(300);
    settings.http.idle_timeout = Duration::from_secs(2);
    settings
}

#[tokio::test]
async fn slowloris_is_cut_at_the_header_timeout_while_an_idle_keep_alive_survives() {
    let app = TestApp::start_unready(settings()).await;

    // An idle keep-alive connection outlives several header timeouts…
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(GET).await.unwrap();
    assert_eq!(read_raw(&mut idle, false).await.status, 200);

    // …while a client trickling a head is cut at the header timeout.
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET /livez HTTP/1.1\r\n").await.unwrap();
    let trickle = async {
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow
                .write_all(format!("x-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    };
    let cut = tokio::time::timeout(Duration::from_secs(3), trickle).await;
    assert!(cut.is_ok(), "the trickling client was never cut");
    let lasted = started.elapsed();
    assert!(
        lasted >= Duration::from_millis(250) && lasted < Duration::from_millis(1500),
        "cut after {lasted:?}, the header timeout is 300 ms"
    );

    // The idle connection has now been idle for well over the header timeout.
    assert!(Instant::now() > started + Duration::from_millis(300));
    idle.write_all(GET).await.unwrap();
    assert_eq!(read_raw(&mut idle, false).await.status, 200);

    // And it is closed once idle for `idle_timeout` (2 s), not before.
    let last = Instant::now();
    let closed = closed_within(&mut idle, Duration::from_secs(5)).await;
    let idle_for = closed - last;
    assert!(
        idle_for >= Duration::from_millis(1800),
        "closed after {idle_for:?} idle"
    );
    app.stop().await;
}

/// An HTTP/2 connection to `app` by prior knowledge (h2c), and the task that drives it.
async fn h2c(app: &TestApp) -> (SendRequest<Empty<Bytes>>, JoinHandle<hyper::Result<()>>) {
    let tcp = TcpStream::connect(app.addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    (send, tokio::spawn(conn))
}

/// A GET of `path` from `app`, for an HTTP/2 connection.
fn h2_get(app: &TestApp, path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(format!("http://{}{path}", app.addr))
        .body(Empty::<Bytes>::new())
        .unwrap()
}

/// `settings()` with the route `/` to `upstream`.
fn proxied_to(upstream: &Upstream) -> Settings {
    let mut settings = settings();
    settings.routes = vec![RouteSettings::upstream("up", "/", "up")];
    settings.upstreams = vec![UpstreamSettings::new("up", &[&upstream.target()])];
    settings.upstreams[0].response_timeout = Duration::from_secs(10);
    settings
}

/// A body that streams for longer than the idle timeout is not idle. Mutation: stamp no
/// activity when bytes are written (`Guarded::after_write`), and the call back of
/// `Connection::serve` finds the connection idle since the request and cuts the body.
#[tokio::test]
async fn a_body_streaming_for_longer_than_the_idle_timeout_is_not_cut() {
    let upstream = Upstream::start("drip").await;
    let app = TestApp::start_unready(proxied_to(&upstream)).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    // A byte every 100 ms, for longer than this test reads.
    stream
        .write_all(b"GET /drip/100 HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // 3 s: longer than `idle_timeout` (2 s).
    let until = started + Duration::from_secs(3);
    let mut chunk = [0u8; 4096];
    let mut received = 0;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => panic!("cut after {:?}", started.elapsed()),
            Ok(Ok(n)) => received += n,
            Err(_) => break,
        }
    }
    assert!(received > 20, "{received} bytes in 3 s");
    // Not left for the drain to wait on.
    drop(stream);
    app.stop().await;
}

/// An answer that takes longer than the idle timeout: the clock runs from when it went
/// out. Over HTTP/2, whose connection reads on when a stream ends, before it writes the
/// answer (an HTTP/1.1 connection waits for the call back of `Connection::serve`, which
/// the slowloris test covers). Mutation: count no activity at the end of the requests
/// (`requests_ended` in `Guarded::deadline`), and the connection closes before the
/// answer goes out.
#[tokio::test]
async fn the_idle_clock_runs_from_the_answer_not_from_the_request() {
    let upstream = Upstream::start("slow").await;
    let app = TestApp::start_unready(proxied_to(&upstream)).await;
    let (mut send, conn) = h2c(&app).await;
    // 2.5 s: longer than `idle_timeout` (2 s).
    let slow_get = h2_get(&app, "/slow/2500");
    assert_eq!(send.send_request(slow_get).await.unwrap().status(), 200);
    let answered = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "still open 5 s after the answer");
    let idle_for = answered.elapsed();
    assert!(
        idle_for >= Duration::from_millis(1800),
        "closed {idle_for:?} after the answer"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_head_that_stops_midway_is_cut_and_one_byte_at_a_time_is_too() {
    let app = TestApp::start_unready(settings()).await;
    // One byte, then nothing: the clock starts at the first byte.
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(b"G").await.unwrap();
    let sent = Instant::now();
    let closed = closed_within(&mut stream, Duration::from_secs(3)).await;
    assert!(closed - sent < Duration::from_millis(1500));
    app.stop().await;
}

#[tokio::test]
async fn oversized_heads_and_too_many_headers_get_431() {
    let app = TestApp::start_unready(settings()).await;
    let big = format!(
        "GET /livez HTTP/1.1\r\nHost: t\r\nx-big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let (rsp, closed) = exchange(app.addr, big.as_bytes()).await;
    assert_eq!(rsp.status, 431, "{rsp:?}");
    assert!(closed);

    let many: String = (0..150).map(|i| format!("x-{i}: y\r\n")).collect();
    let many = format!("GET /livez HTTP/1.1\r\nHost: t\r\n{many}\r\n");
    let (rsp, closed) = exchange(app.addr, many.as_bytes()).await;
    assert_eq!(rsp.status, 431, "{rsp:?}");
    assert!(closed);

    // Just under both limits is fine.
    let ok = format!(
        "GET /livez HTTP/1.1\r\nHost: t\r\nx-big: {}\r\n\r\n",
        "a".repeat(8_000)
    );
    let (rsp, _) = exchange(app.addr, ok.as_bytes()).await;
    assert_eq!(rsp.status, 200, "{rsp:?}");
    app.stop().await;
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_the_connection_closed() {
    let app = TestApp::start_unready(settings()).await;
    let cases: &[(&str, &str)] = &[
        (
            "content-length and transfer-encoding",
            "POST /livez HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "transfer-encoding and content-length",
            "POST /livez HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        ),
        (
            "two different content-lengths",
            "POST /livez HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        (
            "two equal content-lengths",
            "POST /livez HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        ),
        (
            "a content-length list",
            "POST /livez HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 3\r\n\r\nabc",
        ),
        (
            "obs-fold",
            "GET /livez HTTP/1.1\r\nHost: t\r\nX-Folded: a\r\n b\r\n\r\n",
        ),
        (
            "a transfer-encoding other than chunked",
            "POST /livez HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
        ),
        (
            "a space before the colon",
            "GET /livez HTTP/1.1\r\nHost: t\r\nContent-Length : 0\r\n\r\n",
        ),
    ];
    let mut wrong = Vec::new();
    for (name, request) in cases {
        let (rsp, closed) = exchange(app.addr, request.as_bytes()).await;
        if rsp.status != 400 || !closed {
            wrong.push(format!("{name}: {} closed={closed}", rsp.status));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    app.stop().await;
}

#[tokio::test]
async fn beyond_the_connection_cap_new_connections_wait_until_one_closes() {
    let mut settings = settings();
    settings.listen.max_connections = 2;
    settings.http.idle_timeout = Duration::from_secs(30);
    let app = TestApp::start_unready(settings).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        assert_eq!(read_raw(&mut stream, false).await.status, 200);
        held.push(stream);
    }
    // The third connects (the kernel's backlog) but is not served…
    let mut third = TcpStream::connect(app.addr).await.unwrap();
    third.write_all(GET).await.unwrap();
    let mut chunk = [0u8; 64];
    let waited = tokio::time::timeout(Duration::from_millis(300), third.read(&mut chunk)).await;
    assert!(waited.is_err(), "served beyond the cap");
    // …until one of the two closes.
    drop(held.pop());
    assert_eq!(read_raw(&mut third, false).await.status, 200);
    // The server is fine throughout.
    let rsp = app.metrics().await;
    assert!(
        rsp.contains("tiergate_listener_saturated_total{listener=\"http\"}"),
        "{rsp}"
    );
    app.stop().await;
}

#[tokio::test]
async fn http2_connections_have_only_the_idle_clock() {
    // h2c by prior knowledge: the listener tells HTTP/2 from the preface's bytes.
    let app = TestApp::start_unready(settings()).await;
    let (mut send, conn) = h2c(&app).await;
    let get = || h2_get(&app, "/livez");
    assert_eq!(send.send_request(get()).await.unwrap().status(), 200);
    // Idle for three header timeouts: still open (the header clock is HTTP/1.1's).
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(send.send_request(get()).await.unwrap().status(), 200);
    // Closed by the server once idle for `idle_timeout` (2 s).
    let idle_since = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "still open 5 s after going idle");
    assert!(idle_since.elapsed() >= Duration::from_millis(1800));
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_the_idle_timeout() {
    let mut settings = settings();
    settings.http.idle_timeout = Duration::from_secs(1);
    let app = TestApp::start_unready(settings).await;
    // A small receive buffer: loopback autotuning would otherwise hold every answer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let stream = socket.connect(app.addr).await.unwrap();
    let (mut rx, mut tx) = stream.into_split();
    // Pipelined requests whose answers (~17 MB) overflow both socket buffers while this
    // client reads nothing, so the server's writes stop making progress.
    let writer = tokio::spawn(async move {
        let batch = GET.repeat(1000);
        for _ in 0..100 {
            if tx.write_all(&batch).await.is_err() {
                return false;
            }
        }
        true
    });
    // Read nothing until the server reports giving up on a stalled write (the counter
    // is this test's alone). A loaded machine takes a while to answer enough requests to
    // fill the buffers, hence the long deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = app.metrics().await;
        if metrics.contains(r#"reason="write_timeout""#) {
            break;
        }
        assert!(Instant::now() < deadline, "no write timeout within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.abort();
    // What the server did send before it gave up, then the end of the stream.
    let mut total = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    let read_all = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(read_all.is_ok(), "the connection was never closed");
    // Each answer is about 170 bytes; the socket buffers hold a fraction of 100,000.
    assert!(
        total < 100_000 * 150,
        "the server answered {total} bytes: it never gave up"
    );
    app.stop().await;
}

/// CPU time (user + system) the process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc stat");
    let after_name = stat.rsplit_once(')').expect("a stat line").1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Checked against a listener without the backoff (`yield_now` instead of the sleep): it
/// used 129 ticks of CPU in the second and the test failed.
#[tokio::test]
async fn out_of_file_descriptors_the_listener_backs_off_instead_of_spinning() {
    use crate::startup::{lines, wait_for_log};
    let backends = crate::helpers::Backends::new().await;
    let env = [
        ("DATABASE_URL", backends.db.url.clone()),
        ("REDIS_URL", crate::helpers::redis_url()),
        ("TIERGATE_REDIS__KEY_PREFIX", backends.redis.prefix.clone()),
        ("TIERGATE_LISTEN__HTTP", "127.0.0.1:0".into()),
        ("TIERGATE_LISTEN__ADMIN", "127.0.0.1:0".into()),
        ("RUST_LOG", "info,access=off".into()),
    ];
    // A file-descriptor limit the test can reach: bash lowers it, then becomes tiergate.
    let mut child = tokio::process::Command::new("bash")
        .args([
            "-c",
            "ulimit -n 96 && exec \"$0\"",
            env!("CARGO_BIN_EXE_tiergate"),
        ])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start tiergate");
    let pid = child.id().expect("a pid");
    let mut log = lines(&mut child);
    let listening = wait_for_log(&mut log, "Listening.").await;
    let addr: SocketAddr = listening["http"].as_str().unwrap().parse().unwrap();

    // More connections than descriptors left: accept starts failing with EMFILE.
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(stream) = TcpStream::connect(addr).await {
            held.push(stream);
        }
    }
    wait_for_log(&mut log, "Accept failed; backing off.").await;
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    // A spinning accept loop would use the whole second (100 ticks).
    assert!(
        used < 30,
        "{used} ticks of CPU in one second while out of descriptors"
    );

    drop(held);
    let rsp = reqwest::get(format!("http://{addr}/livez"))
        .await
        .expect("served again");
    assert_eq!(rsp.status(), 200);
    assert!(
        child.try_wait().expect("child state").is_none(),
        "still running"
    );
}

/// One HTTP/2 frame: length, type, flags, stream id, payload (RFC 9113 §4.1).
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test]
async fn an_http2_rapid_reset_flood_gets_goaway_enhance_your_calm() {
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const END_STREAM_AND_HEADERS: u8 = 0x5;
    const CANCEL: u32 = 0x8;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    // `GET /` over http by HPACK's static table: :method GET, :scheme http, :path /.
    const GET_SLASH: &[u8] = &[0x82, 0x86, 0x84];

    let app = TestApp::start_unready(settings()).await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    // CVE-2023-44487: each request cancelled as soon as it is sent, all in one write,
    // so the server's stream count never grows while its work does.
    let mut flood = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    flood.extend(h2_frame(SETTINGS, 0, 0, &[]));
    for i in 0..1_000u32 {
        let stream = 2 * i + 1;
        flood.extend(h2_frame(HEADERS, END_STREAM_AND_HEADERS, stream, GET_SLASH));
        flood.extend(h2_frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
    }
    // The server may close while the flood is still being written.
    let _ = tcp.write_all(&flood).await;

    // Read frames until GOAWAY; the connection must then end.
    let mut buf = Vec::new();
    let goaway = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..9 + len).collect();
                if frame[3] == GOAWAY {
                    return u32::from_be_bytes(frame[13..17].try_into().unwrap());
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = tcp.read(&mut chunk).await.unwrap_or(0);
            assert!(n > 0, "closed without GOAWAY");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("GOAWAY within 5 s");
    assert_eq!(goaway, ENHANCE_YOUR_CALM, "GOAWAY's error code");
    closed_within(&mut tcp, Duration::from_secs(5)).await;
    // The listener still serves everyone else.
    let (rsp, _) = exchange(app.addr, GET).await;
    assert_eq!(rsp.status, 200, "{rsp:?}");
    app.stop().await;
}
