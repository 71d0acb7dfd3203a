//! loadgen's HTTP/1.1 client: one request at a time on one connection (plain or TLS),
//! the request written from a reused buffer, the response head parsed with `httparse` and the body
//! skipped (content-length, chunked, or to the end of the connection).
//!
//! Why not hyper's client: its dispatch (a channel to the connection, a oneshot back,
//! a channel for the body) cost loadgen about a third of wrk's throughput on 2 cores,
//! and the acceptance bar is 10 %. HTTP/2 still goes through hyper.

use anyhow::{Context, bail};
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderValue, Method, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::tls::Stream;

/// Response heads with more headers than this are refused.
const MAX_HEADERS: usize = 64;
/// A response head larger than this is refused (a misbehaving server, not a benchmark).
const MAX_HEAD: usize = 64 << 10;

/// One HTTP/1.1 connection.
#[derive(Debug)]
pub struct Connection {
    io: Stream,
    buf: BytesMut,
    out: Vec<u8>,
    /// The server said `Connection: close`, or the body ran to the end of the stream.
    closed: bool,
}

/// How the body of a response ends.
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

impl Connection {
    /// Wraps a connected socket (TLS already handshaken).
    pub fn new(io: Stream) -> Self {
        Self {
            io,
            buf: BytesMut::with_capacity(16 << 10),
            out: Vec::with_capacity(512),
            closed: false,
        }
    }

    /// Whether the connection can carry another request.
    pub fn is_open(&self) -> bool {
        !self.closed
    }

    /// Sends one request and reads the whole answer; returns its status.
    ///
    /// # Errors
    /// The connection fails or closes early, or the answer is not valid HTTP/1.1.
    pub async fn call(
        &mut self,
        method: &Method,
        path: &Uri,
        host: &HeaderValue,
        body: Option<&Bytes>,
    ) -> anyhow::Result<u16> {
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(path.path().as_bytes());
        if let Some(query) = path.query() {
            out.push(b'?');
            out.extend_from_slice(query.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(body) = body {
            out.extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
            out.extend_from_slice(body.len().to_string().as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            out.extend_from_slice(body);
        } else {
            out.extend_from_slice(b"\r\n");
        }
        self.io.write_all(out).await.context("send the request")?;
        // TLS may keep records back until flushed; for TCP this does nothing.
        self.io.flush().await.context("send the request")?;

        let (status, framing) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut rsp = httparse::Response::new(&mut headers);
            match rsp.parse(&self.buf).context("parse the response head")? {
                httparse::Status::Complete(len) => {
                    let status = rsp.code.unwrap_or(0);
                    let mut framing = Framing::UntilClose;
                    for h in rsp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            let n = std::str::from_utf8(h.value)
                                .ok()
                                .and_then(|v| v.trim().parse().ok())
                                .context("a content-length that is not a number")?;
                            framing = Framing::Length(n);
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
                            && h.value.eq_ignore_ascii_case(b"chunked")
                        {
                            framing = Framing::Chunked;
                        } else if h.name.eq_ignore_ascii_case("connection")
                            && h.value.eq_ignore_ascii_case(b"close")
                        {
                            self.closed = true;
                        }
                    }
                    if method == Method::HEAD || status == 204 || status == 304 {
                        framing = Framing::Length(0);
                    }
                    self.buf.advance(len);
                    break (status, framing);
                }
                httparse::Status::Partial => {
                    if self.buf.len() > MAX_HEAD {
                        bail!("a response head over {MAX_HEAD} bytes");
                    }
                    self.fill().await?;
                }
            }
        };
        match framing {
            Framing::Length(n) => self.skip(n).await?,
            Framing::Chunked => self.skip_chunks().await?,
            Framing::UntilClose => {
                while self
                    .io
                    .read_buf(&mut self.buf)
                    .await
                    .context("read the body")?
                    > 0
                {
                    self.buf.clear();
                }
                self.closed = true;
            }
        }
        Ok(status)
    }

    /// Reads more into the buffer; the peer closing here is an error.
    async fn fill(&mut self) -> anyhow::Result<()> {
        if self
            .io
            .read_buf(&mut self.buf)
            .await
            .context("read the response")?
            == 0
        {
            self.closed = true;
            bail!("the server closed the connection");
        }
        Ok(())
    }

    async fn skip(&mut self, mut n: usize) -> anyhow::Result<()> {
        loop {
            let here = n.min(self.buf.len());
            self.buf.advance(here);
            n -= here;
            if n == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    /// A line ending in CRLF, without it (chunk sizes, trailers).
    async fn line(&mut self) -> anyhow::Result<BytesMut> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(at);
                self.buf.advance(2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                bail!("a chunk-size line over {MAX_HEAD} bytes");
            }
            self.fill().await?;
        }
    }

    async fn skip_chunks(&mut self) -> anyhow::Result<()> {
        loop {
            let line = self.line().await?;
            let size = line[..].split(|&b| b == b';').next().unwrap_or(&[]);
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .context("a chunk size that is not hex")?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line().await?.is_empty() {}
                return Ok(());
            }
            self.skip(size + 2).await?;
        }
    }
}
