//! HTTP/1.1 spoken over raw sockets, for tests where the bytes matter: one response read
//! exactly (never a byte of the next), and whether the server then closes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response as it came over the wire.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) status: u16,
    /// Names in lower case.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Raw {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, asserting the content type and an `error` code and message.
    pub(crate) fn error(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "a JSON error: {self:?}"
        );
        let body: Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("a JSON body ({e}): {self:?}"));
        assert!(body["error"].is_string(), "an error code in {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "a message in {body}"
        );
        body
    }
}

/// Reads one response: its head, then `content-length` bytes of body unless `head_only`
/// (the answer to a HEAD). Panics past 5 s.
pub(crate) async fn read_raw(stream: &mut TcpStream, head_only: bool) -> Raw {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            let len: usize = if head_only || status < 200 {
                0
            } else {
                headers
                    .iter()
                    .find(|(n, _)| n == "content-length")
                    .map_or(0, |(_, v)| v.parse().unwrap())
            };
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                // What follows belongs to the next response: left unread here.
                assert!(
                    buf.len() == end + 4 + len,
                    "bytes after the response: {:?}",
                    String::from_utf8_lossy(&buf[end + 4 + len..])
                );
                return Raw {
                    status,
                    headers,
                    body,
                };
            }
        }
        let mut chunk = [0u8; 1];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut chunk))
            .await
            .expect("a response within 5 s")
            .expect("read");
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether the server closes the connection within 3 s (EOF or reset).
pub(crate) async fn closes(stream: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 1024];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), stream.read(&mut chunk)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Sends `request` on a new connection; returns the response and whether the server then
/// closed the connection.
pub(crate) async fn exchange(addr: SocketAddr, request: &[u8]) -> (Raw, bool) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let rsp = read_raw(&mut stream, false).await;
    let closed = closes(&mut stream).await;
    (rsp, closed)
}
