//! One HTTP/1.1 connection to a target, driven by the request using it: the request
//! head is written from the request's parts into a buffer the connection keeps, the
//! request body streamed after it, and the response read into a buffer the connection
//! keeps too (head and body are split off it without a copy). No task of its own: every
//! method is a poll the request's task makes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http_body::{Body, Frame};
use tokio::net::TcpStream;

use super::decode::{Decoded, Decoder};
use super::head::{self, ResponseHead};
use super::request::{RequestStart, encode_head};
use super::{HeadError, ResponseError};
use crate::proxy::body::{AttemptBody, BoxError};
use crate::proxy::connector::CountedConnection;

/// How much the read buffer grows by when it is full.
const READ_CHUNK: usize = 8 * 1024;

/// Why an exchange on the connection failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error(transparent)]
    Response(#[from] ResponseError),
    /// The client's request body failed (its state says how).
    #[error("the request body failed")]
    Upload(#[source] BoxError),
}

impl From<HeadError> for ExchangeError {
    fn from(error: HeadError) -> Self {
        Self::Response(error.into())
    }
}

/// A native HTTP/1.1 connection.
#[derive(Debug)]
pub(crate) struct Connection {
    io: CountedConnection,
    /// What is still to be written, from `written` on; kept (empty) between requests.
    out: Vec<u8>,
    written: usize,
    /// Whether any byte of the current request was written.
    started: bool,
    /// The request body still being sent, and whether it goes chunked.
    upload: Option<(AttemptBody, bool)>,
    /// The write side failed: the upstream closed it, or stopped reading.
    write_failed: bool,
    input: BytesMut,
    head_request: bool,
    /// The response being read: its decoder once the head has come.
    decoder: Option<Decoder>,
    keep_alive: bool,
}

impl Connection {
    pub(crate) fn new(io: CountedConnection) -> Self {
        Self {
            io,
            out: Vec::with_capacity(1024),
            written: 0,
            started: false,
            upload: None,
            write_failed: false,
            input: BytesMut::with_capacity(READ_CHUNK),
            head_request: false,
            decoder: None,
            keep_alive: true,
        }
    }

    /// Starts a request: its head (the request's `start`, then the attempt's own
    /// `fields`) goes into the write buffer, the body follows as it comes.
    pub(crate) fn start<'f>(
        &mut self,
        start: &RequestStart,
        fields: impl Iterator<Item = (&'f HeaderName, &'f HeaderValue)>,
        body: AttemptBody,
    ) {
        self.out.clear();
        self.written = 0;
        self.started = false;
        self.decoder = None;
        self.head_request = start.head_request();
        let chunked = encode_head(&mut self.out, start, fields, &body);
        self.upload = (!body.is_end_stream()).then_some((body, chunked));
    }

    /// The request body back, when no byte of the request was written: the request can
    /// go out on another connection.
    pub(crate) fn take_unsent(&mut self) -> Option<AttemptBody> {
        if self.started {
            return None;
        }
        self.upload.take().map(|(body, _)| body)
    }

    /// Sends what it can of the request and reads until the response head: interim
    /// `1xx` heads are skipped (not `101`), as hyper's client skips them.
    pub(crate) fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<ResponseHead, ExchangeError>> {
        loop {
            self.poll_upload(cx)?;
            if let Some(head) = head::parse_head(&mut self.input, self.head_request)? {
                if head.parts.status.is_informational() && head.parts.status != 101 {
                    continue;
                }
                self.keep_alive = head.keep_alive;
                self.decoder = Some(Decoder::new(head.framing));
                return Poll::Ready(Ok(head));
            }
            if ready!(self.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(HeadError::Incomplete.into()));
            }
        }
    }

    /// The next frame of the response body; `None` at its end.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeError>>> {
        if let Err(error) = self.poll_upload(cx) {
            return Poll::Ready(Some(Err(error)));
        }
        let Some(decoder) = &mut self.decoder else {
            return Poll::Ready(None);
        };
        let mut eof = false;
        loop {
            let decoded = if eof {
                decoder.decode_eof(&mut self.input)
            } else {
                decoder.decode(&mut self.input)
            };
            let frame = match decoded {
                Ok(Decoded::Data(data)) => Frame::data(data),
                Ok(Decoded::Trailers(trailers)) => Frame::trailers(trailers),
                Ok(Decoded::End) => return Poll::Ready(None),
                Ok(Decoded::NeedMore) => {
                    match ready!(Self::fill(&mut self.io, &mut self.input, cx)) {
                        Ok(0) => eof = true,
                        Ok(_) => {}
                        Err(error) => return Poll::Ready(Some(Err(error.into()))),
                    }
                    continue;
                }
                Err(error) => return Poll::Ready(Some(Err(ResponseError::from(error).into()))),
            };
            return Poll::Ready(Some(Ok(frame)));
        }
    }

    /// Whether the response body is complete.
    pub(crate) fn body_done(&self) -> bool {
        self.decoder.as_ref().is_none_or(Decoder::is_done)
    }

    /// The exact length of what is left of the body, when its framing says.
    pub(crate) fn body_left(&self) -> Option<u64> {
        self.decoder.as_ref().map_or(Some(0), Decoder::left)
    }

    /// Whether the connection can carry the next request: the exchange ended cleanly by
    /// its framing, the upstream did not ask to close, and nothing unasked came after.
    pub(crate) fn reusable(&self) -> bool {
        self.keep_alive
            && !self.write_failed
            && self.upload.is_none()
            && self.written == self.out.len()
            && self
                .decoder
                .as_ref()
                .is_none_or(|d| d.is_done() && d.delimited())
            && self.input.is_empty()
    }

    /// Whether the socket is marked readable, without reading it.
    #[cfg(test)]
    pub(crate) fn marked_readable(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.io.stream().poll_read_ready(&mut cx).is_ready()
    }

    /// Whether an idle connection is still open: one look, without waiting, at what the
    /// target sent while it sat idle (an end of stream: it closed it; anything else is a
    /// response nobody asked for).
    pub(crate) fn alive(&mut self, cx: &mut Context<'_>) -> bool {
        let stream = self.io.stream();
        match stream.poll_read_ready(cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Writes what is pending and takes more of the request body while it comes. A
    /// write failure is not an error here: the upstream may have answered before it
    /// stopped reading, and that answer is still read.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), ExchangeError> {
        loop {
            if self.write_failed {
                // The body stays: unsent, it can go out on another connection.
                return Ok(());
            }
            if self.written < self.out.len() {
                match poll_write(self.io.stream(), &self.out[self.written..], cx) {
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        self.started = true;
                        continue;
                    }
                    Poll::Ready(Err(error)) => {
                        tracing::debug!(%error, "Upstream connection stopped taking the request.");
                        self.write_failed = true;
                        continue;
                    }
                    Poll::Pending => return Ok(()),
                }
            }
            self.out.clear();
            self.written = 0;
            let Some((body, chunked)) = &mut self.upload else {
                return Ok(());
            };
            let chunked = *chunked;
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Some(Err(error))) => {
                    self.upload = None;
                    self.write_failed = true;
                    return Err(ExchangeError::Upload(error));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    // Request trailers are not sent, as hyper's client sends none on a
                    // body it was not told would carry them.
                    if let Ok(data) = frame.into_data() {
                        if chunked && !data.is_empty() {
                            chunk_size_line(&mut self.out, data.len());
                            self.out.extend_from_slice(&data);
                            self.out.extend_from_slice(b"\r\n");
                        } else if !chunked {
                            self.out.extend_from_slice(&data);
                        }
                    }
                    let ended = self
                        .upload
                        .as_ref()
                        .is_some_and(|(body, _)| body.is_end_stream());
                    if ended {
                        self.end_upload(chunked);
                    }
                }
                Poll::Ready(None) => self.end_upload(chunked),
            }
        }
    }

    fn end_upload(&mut self, chunked: bool) {
        self.upload = None;
        if chunked {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        Self::fill(&mut self.io, &mut self.input, cx)
    }

    /// Reads what the upstream sent into `input`; `0`: it closed the connection.
    fn fill(
        io: &mut CountedConnection,
        input: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if input.capacity() - input.len() < READ_CHUNK / 2 {
            // Reclaims the buffer's memory when the body bytes split off it were sent.
            input.reserve(READ_CHUNK);
        }
        // Through `AsyncRead`, not `try_read_buf`: a read that leaves room in the buffer
        // has drained the socket, and tokio then marks it not readable. Otherwise it
        // stays readable, and the look at the idle connection when it is next taken
        // (`alive`) cost a read that found nothing, a system call per request.
        tokio_util::io::poll_read_buf(Pin::new(io.stream()), cx, input)
    }
}

fn poll_write(
    stream: &mut TcpStream,
    bytes: &[u8],
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_write(bytes) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            written => return Poll::Ready(written),
        }
    }
}

/// Appends `len` in hex, a chunk's size line.
fn chunk_size_line(out: &mut Vec<u8>, len: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - len.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        out.push(HEX[(len >> (i * 4)) & 0xf]);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_written_in_hex() {
        for (len, hex) in [
            (1, "1"),
            (15, "f"),
            (16, "10"),
            (4096, "1000"),
            (0x1a2b3, "1a2b3"),
        ] {
            let mut out = Vec::new();
            chunk_size_line(&mut out, len);
            assert_eq!(out, format!("{hex}\r\n").as_bytes());
        }
    }
}
