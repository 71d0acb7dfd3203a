//! The connection's IO with its clocks: idle and header-read while hyper waits for
//! bytes, and the write clock for a client that stopped reading (see the listener's
//! module docs for why hyper's own header timeout is off). It also writes the JSON
//! answer in place of hyper's bare one to a head hyper could not parse.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::Limits;
use super::head_scan::HeadScan;
use super::state::ConnState;
use crate::error::{ClientError, GatewayError};
use crate::timer;

/// The connection's IO with the idle and header-read clocks (see the module docs).
///
/// The clocks are checked only when the inner read is pending, which is exactly when
/// hyper waits for the client; they never run while a request is being answered (the
/// request deadline covers that).
pub(super) struct Guarded<S> {
    inner: S,
    state: Arc<ConnState>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// When the current head's first byte arrived plus the header timeout; `None` before
    /// the first head.
    head_deadline: Option<Instant>,
    /// The last time bytes moved either way, stamped as they move: the clocks are looked
    /// at when hyper next waits for bytes, which after an answer may be a while (see
    /// `ConnState::unclocked`).
    last_activity: Instant,
    sleep: Pin<Box<Sleep>>,
    /// Since when writing has made no progress (the client reads nothing: a full socket
    /// buffer), and the clock that ends it after `idle_timeout`.
    write_stalled: Option<Instant>,
    write_sleep: Pin<Box<Sleep>>,
    /// Known from ALPN, or sniffed from the first bytes (the HTTP/2 preface); HTTP/2 has
    /// no head-by-head reading, so only the idle clock applies to it.
    h2: Option<bool>,
    /// How many bytes of the preface have matched so far, while `h2` is undecided.
    sniffed: usize,
    /// The framing check of the head being read.
    scan: HeadScan,
    /// Our JSON answer being written in place of hyper's own to a head it refused.
    replacing: Option<Replacement>,
    max_header_bytes: usize,
    max_headers: usize,
    listener: &'static str,
}

/// A JSON answer written in place of hyper's bodiless one: hyper is told its bytes were
/// written once all of ours are.
struct Replacement {
    bytes: Vec<u8>,
    sent: usize,
    /// The length of hyper's answer.
    covers: usize,
}

/// The HTTP/2 connection preface's first bytes.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

impl<S> Guarded<S> {
    pub(super) fn new(
        inner: S,
        state: Arc<ConnState>,
        limits: &Limits,
        h2: Option<bool>,
        listener: &'static str,
    ) -> Self {
        let now = Instant::now();
        Self {
            inner,
            state,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            head_deadline: None,
            last_activity: now,
            sleep: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            write_stalled: None,
            write_sleep: Box::pin(tokio::time::sleep_until(now + limits.idle_timeout)),
            h2,
            sniffed: 0,
            scan: HeadScan::default(),
            replacing: None,
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            listener,
        }
    }

    fn on_read(&mut self, bytes: &[u8]) {
        let now = Instant::now();
        self.last_activity = now;
        if self.h2.is_none() {
            // Undecided counts as HTTP/1.1, so a head trickled in byte by byte ("P", "O"…)
            // is timed from its first byte.
            let expected = &H2_PREFACE[self.sniffed..];
            let n = bytes.len().min(expected.len());
            if bytes[..n] != expected[..n] {
                self.h2 = Some(false);
            } else {
                self.sniffed += n;
                if self.sniffed == H2_PREFACE.len() {
                    self.h2 = Some(true);
                    self.state.head_started.store(false, Ordering::Release);
                }
            }
        }
        if self.h2 == Some(true) || self.state.upgraded.load(Ordering::Acquire) {
            return;
        }
        if self.state.in_flight.load(Ordering::Acquire) == 0
            && !self.state.head_started.swap(true, Ordering::AcqRel)
        {
            self.head_deadline = Some(now + self.header_read_timeout);
            self.scan = HeadScan::default();
        }
        if self.state.head_started.load(Ordering::Acquire) && !self.scan.done {
            if let Some(fault) = self.scan.feed(bytes) {
                self.state.fault.store(fault as u8, Ordering::Release);
            }
        }
    }

    /// The deadline that applies while hyper waits for bytes, and whether it is the
    /// header one; none while a request is in flight (its own deadline covers it).
    /// `requests_ended`: the last wait was during requests that have ended since, and
    /// nothing has counted their end yet (see `ConnState::unclocked`).
    fn deadline(&mut self, requests_ended: bool) -> Option<(Instant, bool)> {
        if self.state.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        if requests_ended {
            // An end is activity: an HTTP/2 connection reads before it writes the answer.
            self.last_activity = Instant::now();
        }
        match self.head_deadline {
            Some(at)
                if self.h2 != Some(true) && self.state.head_started.load(Ordering::Acquire) =>
            {
                Some((at, true))
            }
            _ => Some((self.last_activity + self.idle_timeout, false)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        if let Poll::Ready(result) = Pin::new(&mut this.inner).poll_read(cx, buf) {
            if result.is_ok() && buf.filled().len() > before {
                this.on_read(&buf.filled()[before..]);
            }
            return Poll::Ready(result);
        }
        if this.h2 == Some(true) {
            this.state.reader.register(cx.waker());
        }
        // Raised before `deadline` looks at the requests in flight (see `InFlight`).
        let requests_ended = this.state.unclocked.swap(true, Ordering::SeqCst);
        let Some((deadline, header)) = this.deadline(requests_ended) else {
            return Poll::Pending;
        };
        this.state.unclocked.store(false, Ordering::Relaxed);
        ready!(timer::poll_deadline(&mut this.sleep, deadline, cx));
        if header {
            metrics::counter!("tiergate_connections_rejected_total", "listener" => this.listener, "reason" => "header_timeout").increment(1);
            tracing::debug!(
                listener = this.listener,
                "Request head not received in time; closing."
            );
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received within http.header_read_timeout",
            )))
        } else {
            // End of stream: hyper closes an idle connection quietly.
            Poll::Ready(Ok(()))
        }
    }
}

impl<S> Guarded<S> {
    /// Passes a write's outcome through, keeping the clocks: bytes written count as
    /// activity; no progress for `idle_timeout` (a client that stopped reading) fails the
    /// connection.
    fn after_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
        progress: impl FnOnce(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(Ok(value)) => {
                self.write_stalled = None;
                // Only bytes count as activity: hyper and h2 flush on every poll, and
                // a flush with nothing to send must not keep an idle connection alive.
                if progress(&value) {
                    self.last_activity = Instant::now();
                }
                Poll::Ready(Ok(value))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let since = *self.write_stalled.get_or_insert_with(Instant::now);
                let deadline = since + self.idle_timeout;
                if self.write_sleep.deadline() != deadline {
                    self.write_sleep.as_mut().reset(deadline);
                }
                ready!(self.write_sleep.as_mut().poll(cx));
                metrics::counter!("tiergate_connections_rejected_total", "listener" => self.listener, "reason" => "write_timeout").increment(1);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client read nothing for http.idle_timeout",
                )))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Guarded<S> {
    /// Whether hyper may be answering a head itself: one arrived, and the service has not
    /// been called for it (hyper calls it for every head it can parse).
    fn head_unanswered(&self) -> bool {
        self.h2 != Some(true)
            && self.state.head_started.load(Ordering::Acquire)
            && self.state.in_flight.load(Ordering::Acquire) == 0
    }

    /// The client's words for why hyper refused the head with `status`, from what the
    /// scan saw of it.
    fn refusal(&self, status: u16) -> GatewayError {
        let refused = match status {
            431 if self.scan.header_lines() > self.max_headers => ClientError::TooManyHeaders {
                limit: self.max_headers,
            },
            431 => ClientError::HeadTooLarge {
                limit: self.max_header_bytes,
            },
            414 => ClientError::UriTooLong,
            _ => self
                .scan
                .fault()
                .map_or(ClientError::MalformedHead, ClientError::from),
        };
        refused.into()
    }

    /// Writes our answer in place of hyper's own to a head it refused (a bare status
    /// line: hyper has no way to give it a body); `None` when `buf` holds no such answer.
    /// What precedes it in `buf` (the end of an earlier response) is written first.
    fn poll_replace(
        &mut self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Option<Poll<io::Result<usize>>> {
        if self.replacing.is_none() {
            if !self.head_unanswered() {
                return None;
            }
            let (at, status) = hyper_refusal(buf)?;
            if at > 0 {
                let result = Pin::new(&mut self.inner).poll_write(cx, &buf[..at]);
                return Some(self.after_write(cx, result, |n| *n > 0));
            }
            self.replacing = Some(Replacement {
                bytes: self.refusal(status).into_http1_bytes(),
                sent: 0,
                covers: buf.len(),
            });
        }
        let mut replacing = self.replacing.take()?;
        while replacing.sent < replacing.bytes.len() {
            let result =
                Pin::new(&mut self.inner).poll_write(cx, &replacing.bytes[replacing.sent..]);
            match self.after_write(cx, result, |n| *n > 0) {
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => replacing.sent += n,
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => {
                    self.replacing = Some(replacing);
                    return Some(Poll::Pending);
                }
            }
        }
        Some(Poll::Ready(Ok(replacing.covers)))
    }
}

/// Longer than any answer hyper writes to a head it refused (a status line, a length
/// and a date: about 90 bytes).
const REFUSAL_MAX_LEN: usize = 256;

/// hyper's own answer to a head it could not parse, at the end of `buf`: where it starts
/// and its status. It is a status line of 400, 414 or 431, `content-length: 0` and a
/// date, and nothing after it: hyper closes the connection once it is written.
fn hyper_refusal(buf: &[u8]) -> Option<(usize, u16)> {
    // Short, and last: a bounded look at the end, so bytes streamed to a client that
    // already sent its next head cost next to nothing to rule out.
    if !buf.ends_with(b"\r\n\r\n") {
        return None;
    }
    let from = buf.len().saturating_sub(REFUSAL_MAX_LEN);
    let at = from + memchr::memmem::rfind(&buf[from..], b"HTTP/1.1 ")?;
    let answer = &buf[at..];
    let status = match answer.get(9..13)? {
        b"400 " => 400,
        b"414 " => 414,
        b"431 " => 431,
        _ => return None,
    };
    let head = answer.strip_suffix(b"\r\n\r\n")?;
    let mut lines = head.split(|b| *b == b'\n').skip(1);
    let only_length_and_date = lines.all(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.eq_ignore_ascii_case(b"content-length: 0")
            || line.eq_ignore_ascii_case(b"connection: close")
            || line
                .get(..6)
                .is_some_and(|name| name.eq_ignore_ascii_case(b"date: "))
    });
    only_length_and_date.then_some((at, status))
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(replaced) = this.poll_replace(cx, buf) {
            return replaced;
        }
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, result, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // hyper writes flat (`writev(false)`); should it ever write vectored, a refusal of
        // its own is still found, one buffer at a time.
        if this.replacing.is_some() || this.head_unanswered() {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return self.poll_write(cx, first);
        }
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, result, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        this.after_write(cx, result, |()| false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation: accept any status, or any header line, and the last two cases match.
    #[test]
    fn hypers_refusal_is_found_at_the_end_and_nothing_else_is() {
        let refusal = "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Mon, 07 Dec 2026 09:29:26 GMT\r\n\r\n";
        assert_eq!(hyper_refusal(refusal.as_bytes()), Some((0, 431)));
        let after_a_body = format!("{}{refusal}", "x".repeat(10_000));
        assert_eq!(hyper_refusal(after_a_body.as_bytes()), Some((10_000, 431)));
        let closing = "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(hyper_refusal(closing.as_bytes()), Some((0, 400)));
        for other in [
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nmore",
        ] {
            assert_eq!(hyper_refusal(other.as_bytes()), None, "{other:?}");
        }
    }
}
