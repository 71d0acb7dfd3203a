//! The access log: one JSON line per request on the public listeners, at a small
//! fraction of the request's cost.
//!
//! A request renders its line straight into its thread's shard of a set of buffers
//! (bytes appended, no allocation once a buffer has grown); a writer thread of its own
//! swaps the shards out and writes each batch to stdout with one call. Nothing on the
//! request path waits for stdout: when the writer falls behind (a slow pipe, a stalled
//! collector), a shard at its bound refuses the line, which is counted in
//! `tiergate_access_log_dropped_total`. [`AccessLog::close`] writes what is left at exit.
//!
//! Field names follow OpenTelemetry's HTTP semantic conventions where one exists
//! (`http.request.method`, `url.path`, `client.address`, …); docs/operations.md lists
//! them.

use std::cell::Cell;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};
use http_body::Body;
use metrics::Counter;

use crate::trace::{TRACEPARENT, TraceContext, hex_u64, hex_u128};

static X_AMZN_TRACE_ID: HeaderName = HeaderName::from_static("x-amzn-trace-id");
/// The request's id: the client's when it sent a usable one, else the gateway's own.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Bytes one shard holds before it refuses lines: about 1,500 lines of 350 bytes, a
/// tenth of a second of a busy worker's requests.
const SHARD_BYTES: usize = 512 * 1024;

/// How often the writer looks at the shards when nobody calls it sooner.
const WRITE_EVERY: Duration = Duration::from_millis(50);

/// `,"key":` for a literal key, as one constant: a line's keys are copied in one piece
/// each (four small copies per key showed in the profile).
macro_rules! key {
    ($key:literal) => {
        concat!(",\"", $key, "\":").as_bytes()
    };
}

/// The access log of one server: cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// `log.access_sample`: the share of successful requests logged.
    sample: f64,
    shards: Box<[Mutex<Vec<u8>>]>,
    /// Lines refused because their shard was full.
    dropped: Counter,
    /// Set once a shard passed half its bound, so only one request wakes the writer.
    wanted: AtomicBool,
    /// The writer's wake-up call: `true` once it is to write everything and end.
    closing: Mutex<bool>,
    wake: Condvar,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl AccessLog {
    /// An access log written to stdout by a thread of its own, logging `sample` (0 to
    /// 1) of the successful requests and every failed one.
    ///
    /// # Errors
    /// The writer thread cannot be started.
    pub fn stdout(sample: f64) -> std::io::Result<Self> {
        Self::to(sample, std::io::stdout)
    }

    /// An access log written, a batch at a time, to what `open` returns for each batch
    /// (stdout in the server; a file or a sink in tests and benchmarks).
    ///
    /// # Errors
    /// The writer thread cannot be started.
    pub fn to<W: Write, F: Fn() -> W + Send + 'static>(
        sample: f64,
        open: F,
    ) -> std::io::Result<Self> {
        // One shard per thread that may serve, and a few more: a shard is rarely
        // contended by two requests at once.
        let count = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) + 2;
        let shared = Arc::new(Shared {
            sample,
            shards: (0..count).map(|_| Mutex::new(Vec::new())).collect(),
            dropped: metrics::counter!("tiergate_access_log_dropped_total"),
            wanted: AtomicBool::new(false),
            closing: Mutex::new(false),
            wake: Condvar::new(),
            writer: Mutex::new(None),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("access-log".to_owned())
                .spawn(move || shared.write_until_closed(open))?
        };
        *shared.writer.lock().unwrap_or_else(PoisonError::into_inner) = Some(writer);
        Ok(Self { shared })
    }

    /// Logs the request `req` answered as `rsp` says, unless it succeeded and is not in
    /// the sample.
    pub(crate) fn log(&self, req: &RequestFields, rsp: &ResponsePart<'_>) {
        let sample = self.shared.sample;
        if rsp.status < 400 && sample < 1.0 && fastrand::f64() >= sample {
            return;
        }
        self.append(|buf| render(buf, req, rsp));
    }

    /// Appends the line `render` writes (one JSON object, no newline) to this thread's
    /// shard, or counts it dropped when the shard is full.
    pub(crate) fn append(&self, render: impl FnOnce(&mut Vec<u8>)) {
        let shared = &*self.shared;
        let shard = &shared.shards[shard_index() % shared.shards.len()];
        let mut buf = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if buf.len() >= SHARD_BYTES {
            drop(buf);
            shared.dropped.increment(1);
            return;
        }
        render(&mut buf);
        buf.push(b'\n');
        let wake = buf.len() >= SHARD_BYTES / 2;
        drop(buf);
        if wake && !shared.wanted.swap(true, Ordering::AcqRel) {
            shared.wake.notify_one();
        }
    }

    /// Writes every line appended so far and stops the writer; lines appended later are
    /// not written. Blocks until the writer is done: call it off the async threads.
    pub fn close(&self) {
        *self
            .shared
            .closing
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_one();
        let writer = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

impl Shared {
    /// The writer thread: every [`WRITE_EVERY`], or sooner when a shard fills, moves each
    /// shard's lines out and writes them; after the last pass once closed, it ends.
    fn write_until_closed<W: Write>(&self, open: impl Fn() -> W) {
        let mut batch = Vec::new();
        loop {
            let closing = {
                let closing = self.closing.lock().unwrap_or_else(PoisonError::into_inner);
                let (closing, _) = self
                    .wake
                    .wait_timeout_while(closing, WRITE_EVERY, |closing| {
                        !*closing && !self.wanted.load(Ordering::Acquire)
                    })
                    .unwrap_or_else(PoisonError::into_inner);
                *closing
            };
            self.wanted.store(false, Ordering::Release);
            for shard in &self.shards {
                {
                    let mut buf = shard.lock().unwrap_or_else(PoisonError::into_inner);
                    if buf.is_empty() {
                        continue;
                    }
                    // The shard keeps the batch's old capacity: no allocation per pass.
                    std::mem::swap(&mut *buf, &mut batch);
                }
                // A write that fails (stdout closed) loses this batch; nothing to tell.
                let _ = open().write_all(&batch);
                batch.clear();
            }
            if closing {
                let _ = open().flush();
                return;
            }
        }
    }
}

/// The request's half of its access line, rendered as the request comes in (from
/// `,"target"` to `server.address`), so that the line keeps nothing of the request.
///
/// Copies, not clones of the request's URI and header values: those share the bytes of
/// the connection's read buffer, and hyper reads ahead on the connection while the
/// answer is made; a buffer still shared then is not reused but replaced, an allocation
/// and a copy per request (0.8 per request in the profile before this was a copy).
#[derive(Debug)]
pub(crate) struct RequestFields(Vec<u8>);

/// The request headers the gateway reads (the request id and the trace on every request,
/// the rest for the access line), found in one pass over the request's headers (a lookup
/// by name each cost about 190 instructions).
#[derive(Debug, Default)]
pub(crate) struct SeenHeaders<'a> {
    pub(crate) request_id: Option<&'a HeaderValue>,
    pub(crate) traceparent: Option<&'a HeaderValue>,
    host: Option<&'a HeaderValue>,
    user_agent: Option<&'a HeaderValue>,
    amzn_trace_id: Option<&'a HeaderValue>,
}

impl<'a> SeenHeaders<'a> {
    /// The first value of each in `headers`, as `HeaderMap::get` would find it.
    pub(crate) fn of(headers: &'a HeaderMap) -> Self {
        let mut seen = Self::default();
        for (name, value) in headers {
            let slot = if name == header::HOST {
                &mut seen.host
            } else if name == header::USER_AGENT {
                &mut seen.user_agent
            } else if name == X_AMZN_TRACE_ID {
                &mut seen.amzn_trace_id
            } else if name == TRACEPARENT {
                &mut seen.traceparent
            } else if name == X_REQUEST_ID {
                &mut seen.request_id
            } else {
                continue;
            };
            slot.get_or_insert(value);
        }
        seen
    }
}

impl RequestFields {
    /// The fields of `req` (whose headers `seen` has looked at) from `client`, with its
    /// request id and trace.
    pub(crate) fn of<B: Body>(
        req: &Request<B>,
        seen: &SeenHeaders<'_>,
        client: IpAddr,
        request_id: &HeaderValue,
        trace: Option<&TraceContext>,
    ) -> Self {
        let mut buf = SPARE.try_with(Cell::take).unwrap_or_default();
        if buf.capacity() == 0 {
            // Room for the usual half (about 350 bytes, 400 with an ALB's trace header;
            // more only for a long user agent or path), so it is rarely grown.
            buf.reserve(512);
        }
        buf.extend_from_slice(b",\"target\":\"access\"");
        // Made of letters, digits and `-_.` (`service::request_id`): nothing to escape.
        field_verbatim(&mut buf, key!("request_id"), request_id.as_bytes());
        if let Some(trace) = trace {
            field_verbatim(&mut buf, key!("trace_id"), &hex_u128(trace.trace_id));
            field_verbatim(&mut buf, key!("span_id"), &hex_u64(trace.span_id));
        }
        if let Some(id) = seen.amzn_trace_id {
            field_header(&mut buf, key!("amzn_trace_id"), id);
        }
        field_ip(&mut buf, key!("client.address"), client);
        if let Some(agent) = seen.user_agent {
            field_header(&mut buf, key!("user_agent.original"), agent);
        }
        let uri = req.uri();
        // A method is a token: nothing to escape.
        field_verbatim(
            &mut buf,
            key!("http.request.method"),
            req.method().as_str().as_bytes(),
        );
        field_str(&mut buf, key!("url.path"), uri.path().as_bytes());
        field_bool(&mut buf, key!("url.query_present"), uri.query().is_some());
        field_verbatim(
            &mut buf,
            key!("network.protocol.version"),
            protocol_version(req.version()).as_bytes(),
        );
        if let Some(host) = server_address(uri, seen.host) {
            field_str(&mut buf, key!("server.address"), host);
        }
        if let Some(size) = req.body().size_hint().exact() {
            field_u64(&mut buf, key!("http.request.body.size"), size);
        }
        Self(buf)
    }
}

thread_local! {
    /// A line's buffer, given back when the line is written: a request on this thread
    /// that starts after that reuses it instead of allocating (the allocation and the
    /// free were ~230 instructions of the line).
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

impl Drop for RequestFields {
    fn drop(&mut self) {
        // Beyond that, a rare line's buffer is not worth keeping.
        if self.0.capacity() <= 4096 {
            let mut buf = std::mem::take(&mut self.0);
            buf.clear();
            // Not after the thread's locals are gone (a future dropped at its exit).
            let _ = SPARE.try_with(|spare| spare.set(buf));
        }
    }
}

/// The HTTP version, as `network.protocol.version` writes it.
pub(crate) fn protocol_version(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// What the access line needs of the answer.
#[derive(Debug)]
pub(crate) struct ResponsePart<'a> {
    pub(crate) route: &'a str,
    pub(crate) status: u16,
    /// The `x-cache` header, for the app's answers.
    pub(crate) cache: Option<&'a HeaderValue>,
    /// The body's length, when known before it is sent.
    pub(crate) body_size: Option<u64>,
    /// The upstream group, and the target that answered (none when none did).
    pub(crate) upstream: Option<(&'a str, Option<&'a str>)>,
    /// From the request head to the response head.
    pub(crate) duration: Duration,
}

/// The client's address: the peer's, or behind trusted proxies the `X-Forwarded-For`
/// entry the outermost of them wrote (`trusted_hops` from the right; the leftmost when
/// there are fewer). An entry that is not an address leaves the peer's.
pub(crate) fn client_address(headers: &HeaderMap, peer: IpAddr, trusted_hops: u32) -> IpAddr {
    if trusted_hops == 0 {
        return peer;
    }
    let mut written = None;
    let mut seen = 0;
    'values: for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        for entry in text.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
            written = Some(entry);
            seen += 1;
            if seen == trusted_hops {
                break 'values;
            }
        }
    }
    written
        .and_then(|entry| {
            entry
                .parse::<IpAddr>()
                .or_else(|_| entry.parse::<SocketAddr>().map(|a| a.ip()))
                .ok()
        })
        .unwrap_or(peer)
}

/// The host a request names, without its port: the URI's (HTTP/2) or `Host`'s.
pub(crate) fn server_address<'a>(uri: &'a Uri, host: Option<&'a HeaderValue>) -> Option<&'a [u8]> {
    if let Some(authority) = uri.authority() {
        return Some(authority.host().as_bytes());
    }
    let raw = host?.as_bytes();
    let digits = raw.iter().rev().take_while(|b| b.is_ascii_digit()).count();
    let host = match raw.len().checked_sub(digits + 1) {
        // `name:8080` or `[::1]:8080`; a bare IPv6 literal has no port to strip.
        Some(colon) if raw[colon] == b':' => {
            let before = &raw[..colon];
            if before.ends_with(b"]") || !before.contains(&b':') {
                before
            } else {
                raw
            }
        }
        _ => raw,
    };
    Some(host)
}

/// One access line, as a JSON object (without its newline).
fn render(buf: &mut Vec<u8>, req: &RequestFields, rsp: &ResponsePart<'_>) {
    buf.push(b'{');
    field_timestamp(buf, b"\"timestamp\":", SystemTime::now());
    buf.extend_from_slice(&req.0);
    field_str(buf, key!("route"), rsp.route.as_bytes());
    field_u64(
        buf,
        key!("http.response.status_code"),
        u64::from(rsp.status),
    );
    if let Some(size) = rsp.body_size {
        field_u64(buf, key!("http.response.body.size"), size);
    }
    if let Some(cache) = rsp.cache {
        field_header(buf, key!("cache"), cache);
    }
    if let Some((group, target)) = rsp.upstream {
        field_str(buf, key!("upstream.group"), group.as_bytes());
        if let Some(target) = target {
            field_str(buf, key!("upstream.target"), target.as_bytes());
        }
    }
    let micros = u64::try_from(rsp.duration.as_micros()).unwrap_or(u64::MAX);
    field_u64(buf, key!("duration_us"), micros);
    buf.push(b'}');
}

/// This thread's shard: threads take the next index when they first log.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|index| *index)
}

/// Appends `"key":` and `value` as a JSON string.
#[inline]
pub(crate) fn field_str(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    buf.extend_from_slice(key);
    buf.push(b'"');
    escaped(buf, value);
    buf.push(b'"');
}

/// Appends `"key":` and `value`, which has nothing to escape, as a JSON string.
#[inline]
fn field_verbatim(buf: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    buf.extend_from_slice(key);
    buf.push(b'"');
    buf.extend_from_slice(value);
    buf.push(b'"');
}

/// Appends `"key":` and `value` as a JSON number.
#[inline]
pub(crate) fn field_u64(buf: &mut Vec<u8>, key: &[u8], value: u64) {
    buf.extend_from_slice(key);
    buf.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// Appends `"key":` and `value` as `true` or `false`.
#[inline]
pub(crate) fn field_bool(buf: &mut Vec<u8>, key: &[u8], value: bool) {
    buf.extend_from_slice(key);
    buf.extend_from_slice(if value { b"true" } else { b"false" });
}

/// Appends `"key":` and `ip` as a JSON string.
pub(crate) fn field_ip(buf: &mut Vec<u8>, key: &[u8], ip: IpAddr) {
    buf.extend_from_slice(key);
    buf.push(b'"');
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf.push(b'.');
                }
                buf.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        // Rare behind an ALB; `fmt` writes straight into the buffer.
        IpAddr::V6(v6) => {
            let _ = write!(buf, "{v6}");
        }
    }
    buf.push(b'"');
}

/// Appends `"key":` and a header's value as a JSON string.
#[inline]
pub(crate) fn field_header(buf: &mut Vec<u8>, key: &[u8], value: &HeaderValue) {
    field_str(buf, key, value.as_bytes());
}

/// `value` escaped for a JSON string. Bytes the client sent may be anything: quotes,
/// backslashes and control characters are escaped, and when `value` is not UTF-8 its
/// bytes from 0x80 up are written as the code points of the same number (as Latin-1
/// would read them), so the line stays valid JSON and nothing is lost.
fn escaped(buf: &mut Vec<u8>, value: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Nearly every value: printable ASCII without a quote or backslash, copied whole
    // (a check for UTF-8 and a byte-by-byte copy were a tenth of the line's cost).
    if is_plain(value) {
        buf.extend_from_slice(value);
        return;
    }
    let utf8 = std::str::from_utf8(value).is_ok();
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        let plain = b >= 0x20 && b != b'"' && b != b'\\' && (b < 0x80 || utf8);
        if plain {
            continue;
        }
        buf.extend_from_slice(&value[start..i]);
        start = i + 1;
        match b {
            b'"' => buf.extend_from_slice(b"\\\""),
            b'\\' => buf.extend_from_slice(b"\\\\"),
            b'\n' => buf.extend_from_slice(b"\\n"),
            b'\r' => buf.extend_from_slice(b"\\r"),
            b'\t' => buf.extend_from_slice(b"\\t"),
            _ => buf.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]),
        }
    }
    buf.extend_from_slice(&value[start..]);
}

/// Whether `value` is all printable ASCII without a quote or a backslash: nothing in
/// it to escape. Eight bytes at a time, with the bit tricks of "Bit Twiddling Hacks"
/// (a byte at a time was a tenth of the line's cost).
fn is_plain(value: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // Whether some byte of `x` is below `n` (n at most 0x80).
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS != 0;
    let has = |x: u64, b: u8| below(x ^ (ONES * u64::from(b)), 1);
    let plain = |x: u64| {
        // Control characters, DEL and up, `"` and `\`.
        !(below(x, 0x20) || x & HIGHS != 0 || has(x, 0x7f) || has(x, b'"') || has(x, b'\\'))
    };
    let word = |at: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&value[at..at + 8]);
        u64::from_ne_bytes(word)
    };
    match value.len().checked_sub(8) {
        // The last word overlaps the one before: no byte-by-byte tail.
        Some(last) => (0..last).step_by(8).all(|at| plain(word(at))) && plain(word(last)),
        None => value
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'),
    }
}

/// Appends `key` and `at` as `"2026-12-07T09:20:01.123456Z"` (UTC, microseconds). The
/// text up to the second is kept per thread and made again only when the second changes.
pub(crate) fn field_timestamp(buf: &mut Vec<u8>, key: &[u8], at: SystemTime) {
    thread_local! {
        static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    }
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    buf.extend_from_slice(key);
    buf.push(b'"');
    let second = SECOND.with(|cached| match cached.get() {
        (at, text) if at == secs => text,
        _ => {
            let text = second_text(secs);
            cached.set((secs, text));
            text
        }
    });
    buf.extend_from_slice(&second);
    let mut micros = *b"000000Z\"";
    let mut n = since.subsec_micros();
    for digit in micros[..6].iter_mut().rev() {
        *digit = b'0' + u8::try_from(n % 10).unwrap_or(0);
        n /= 10;
    }
    buf.extend_from_slice(&micros);
}

/// `2026-12-07T09:20:01.` for the second `secs` since the epoch.
fn second_text(secs: u64) -> [u8; 20] {
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    let mut text = [0u8; 20];
    let fields = [
        (year, 4, b'-'),
        (month, 2, b'-'),
        (day, 2, b'T'),
        (of_day / 3600, 2, b':'),
        (of_day / 60 % 60, 2, b':'),
        (of_day % 60, 2, b'.'),
    ];
    let mut at = 0;
    for (mut n, width, after) in fields {
        for digit in text[at..at + width].iter_mut().rev() {
            *digit = b'0' + u8::try_from(n % 10).unwrap_or(0);
            n /= 10;
        }
        text[at + width] = after;
        at += width + 1;
    }
    text
}

/// Year, month and day of the `days`-th day since 1970-01-01 (proleptic Gregorian),
/// by the era arithmetic of H. Hinnant's `civil_from_days`, for days after 1970.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(render: impl FnOnce(&mut Vec<u8>)) -> serde_json::Value {
        let mut buf = br#"{"_":0"#.to_vec();
        render(&mut buf);
        buf.push(b'}');
        serde_json::from_slice(&buf).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&buf));
        })
    }

    #[test]
    fn what_a_client_sends_stays_valid_json_and_intact() {
        let nasty: &[u8] = b"a\"b\\c\n\x01\x7f";
        let line = rendered(|buf| {
            field_str(buf, key!("url.path"), nasty);
            field_str(
                buf,
                key!("user_agent.original"),
                "caf\u{e9} \u{1f980}".as_bytes(),
            );
            field_str(buf, key!("server.address"), b"bad\xffhost");
        });
        assert_eq!(line["url.path"], "a\"b\\c\n\u{1}\u{7f}");
        assert_eq!(line["user_agent.original"], "caf\u{e9} \u{1f980}");
        assert_eq!(line["server.address"], "bad\u{ff}host");
    }

    /// Every byte value, at every place of a value long enough for two words and a
    /// remainder, against the check a byte at a time.
    #[test]
    fn a_byte_to_escape_is_found_wherever_it_is() {
        let plain = |b: u8| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\';
        for len in [0, 1, 7, 8, 9, 16, 19] {
            for at in 0..len {
                for b in 0..=u8::MAX {
                    let mut value = vec![b'a'; len];
                    value[at] = b;
                    assert_eq!(is_plain(&value), plain(b), "byte {b:#x} at {at} of {len}");
                }
            }
        }
        assert!(is_plain(b""));
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let cases = [
            (0, "1970-01-01T00:00:00.000000Z"),
            (951_782_400_000_007, "2000-02-29T00:00:00.000007Z"),
            (1_796_635_201_123_456, "2026-12-07T09:20:01.123456Z"),
            (4_107_542_399_999_999, "2100-02-28T23:59:59.999999Z"),
        ];
        for (micros, want) in cases {
            let at = UNIX_EPOCH + Duration::from_micros(micros);
            let line = rendered(|buf| field_timestamp(buf, key!("timestamp"), at));
            assert_eq!(line["timestamp"], want, "{micros}");
        }
    }

    /// The second is kept per thread: a line in the next second, or one in an earlier
    /// second (the clock stepped back), gets its own.
    #[test]
    fn a_timestamp_in_another_second_is_not_the_kept_one() {
        let base = 1_796_635_201;
        let cases = [
            (base, 999_999, "2026-12-07T09:20:01.999999Z"),
            (base + 1, 0, "2026-12-07T09:20:02.000000Z"),
            (base + 1, 42, "2026-12-07T09:20:02.000042Z"),
            (base, 500_000, "2026-12-07T09:20:01.500000Z"),
            (base + 86_400, 1, "2026-12-08T09:20:01.000001Z"),
        ];
        for (secs, micros, want) in cases {
            let at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
            let line = rendered(|buf| field_timestamp(buf, key!("timestamp"), at));
            assert_eq!(line["timestamp"], want, "{secs}.{micros}");
        }
    }

    #[test]
    fn numbers_addresses_and_flags_render_as_json_values() {
        let line = rendered(|buf| {
            field_u64(buf, key!("duration_us"), 212);
            field_bool(buf, key!("url.query_present"), true);
            field_ip(buf, key!("client.address"), IpAddr::from([203, 0, 113, 9]));
            field_ip(buf, key!("v6"), "2001:db8::1".parse().unwrap());
        });
        assert_eq!(line["duration_us"], 212);
        assert_eq!(line["url.query_present"], true);
        assert_eq!(line["client.address"], "203.0.113.9");
        assert_eq!(line["v6"], "2001:db8::1");
    }

    #[test]
    fn the_client_is_the_address_the_outermost_trusted_proxy_saw() {
        let peer = IpAddr::from([10, 0, 0, 2]);
        let mut headers = HeaderMap::new();
        headers.append(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("3.3.3.3"));
        let client = |headers: &HeaderMap, hops| client_address(headers, peer, hops).to_string();
        assert_eq!(client(&headers, 0), "10.0.0.2");
        assert_eq!(client(&headers, 1), "3.3.3.3");
        assert_eq!(client(&headers, 2), "2.2.2.2");
        assert_eq!(client(&headers, 5), "1.1.1.1");
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("not-an-ip"));
        assert_eq!(client(&headers, 1), "10.0.0.2");
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("4.4.4.4:5050"));
        assert_eq!(client(&headers, 1), "4.4.4.4");
    }

    #[test]
    fn the_server_address_is_the_host_without_its_port() {
        let plain: Uri = "/x".parse().unwrap();
        let host = |h: &'static str| {
            let value = HeaderValue::from_static(h);
            server_address(&plain, Some(&value)).map(<[u8]>::to_vec)
        };
        assert_eq!(host("api.example.com:8080").unwrap(), b"api.example.com");
        assert_eq!(host("api.example.com").unwrap(), b"api.example.com");
        assert_eq!(host("[::1]:8080").unwrap(), b"[::1]");
        assert_eq!(host("::1").unwrap(), b"::1");
        let absolute: Uri = "http://h2.example.com:443/x".parse().unwrap();
        assert_eq!(server_address(&absolute, None).unwrap(), b"h2.example.com");
    }

    /// A writer that cannot write (stdout nobody reads) never blocks a request: the
    /// shard fills to its bound, then lines are refused and counted, and memory stays
    /// bounded.
    #[test]
    fn a_stuck_writer_drops_lines_instead_of_blocking_or_growing() {
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let stuck = Mutex::new(stuck);
        let log = AccessLog::to(1.0, move || {
            // Blocks every batch until the test ends.
            let _ = stuck.lock().unwrap().recv();
            std::io::sink()
        })
        .unwrap();
        let line = [b'x'; 300];
        let started = std::time::Instant::now();
        let mut refused = 0;
        for _ in 0..20_000 {
            let before = log
                .shared
                .shards
                .iter()
                .map(|s| s.lock().unwrap().len())
                .sum::<usize>();
            log.append(|buf| buf.extend_from_slice(&line));
            let after = log
                .shared
                .shards
                .iter()
                .map(|s| s.lock().unwrap().len())
                .sum::<usize>();
            refused += usize::from(after == before);
        }
        assert!(started.elapsed() < Duration::from_secs(5), "appends waited");
        assert!(refused > 10_000, "only {refused} refused");
        let held: usize = log
            .shared
            .shards
            .iter()
            .map(|s| s.lock().unwrap().len())
            .sum();
        assert!(
            held <= log.shared.shards.len() * (SHARD_BYTES + 301),
            "{held} bytes held"
        );
        drop(release);
        log.close();
    }

    /// Every line appended before `close` is written, in one piece.
    #[test]
    fn close_writes_every_line_appended_before_it() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = {
            let out = out.clone();
            move || SharedSink(out.clone())
        };
        let log = AccessLog::to(1.0, sink).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        log.append(|buf| {
                            buf.extend_from_slice(br#"{"_":0"#);
                            field_u64(buf, key!("t"), t);
                            field_u64(buf, key!("i"), i);
                            buf.push(b'}');
                        });
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        log.close();
        let out = out.lock().unwrap();
        let lines: Vec<serde_json::Value> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 4000);
    }

    struct SharedSink(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedSink {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
