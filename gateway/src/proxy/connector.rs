//! The TCP connector of a group's pool, counting connections per target: how many were
//! made and how many are open. With the group's request count that gives the connection
//! reuse ratio, the figure that tells a pool working from one reconnecting every time.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use metrics::{Counter, Gauge};
use tokio::net::TcpStream;

/// Connects to a group's targets and counts the connections.
#[derive(Debug, Clone)]
pub(crate) struct CountingConnector {
    inner: HttpConnector,
    /// By target authority (`host:port`), fixed when the group is built.
    counters: Arc<HashMap<String, ConnectionMetrics>>,
}

#[derive(Debug, Clone)]
struct ConnectionMetrics {
    created: Counter,
    open: Gauge,
}

impl CountingConnector {
    pub(crate) fn new<'a>(
        group: &str,
        targets: impl Iterator<Item = &'a str>,
        connect_timeout: Duration,
    ) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_connect_timeout(Some(connect_timeout));
        // Requests are forwarded as soon as they are read; do not hold small writes back.
        inner.set_nodelay(true);
        let counters = targets
            .map(|target| {
                let labels = [("group", group.to_owned()), ("target", target.to_owned())];
                let metrics = ConnectionMetrics {
                    created: metrics::counter!(
                        "tiergate_upstream_connections_created_total",
                        &labels
                    ),
                    open: metrics::gauge!("tiergate_upstream_connections_open", &labels),
                };
                (target.to_owned(), metrics)
            })
            .collect();
        Self {
            inner,
            counters: Arc::new(counters),
        }
    }
}

impl tower_service::Service<Uri> for CountingConnector {
    type Response = CountedConnection;
    type Error = <HttpConnector as tower_service::Service<Uri>>::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<CountedConnection, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let metrics = uri
            .authority()
            .and_then(|a| self.counters.get(a.as_str()))
            .cloned();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let io = connecting.await?;
            if let Some(m) = &metrics {
                m.created.increment(1);
                m.open.increment(1.0);
            }
            Ok(CountedConnection {
                io,
                open: metrics.map(|m| m.open),
            })
        })
    }
}

/// A connection that counts itself out of `tiergate_upstream_connections_open` when it
/// closes.
#[derive(Debug)]
pub(crate) struct CountedConnection {
    io: TokioIo<TcpStream>,
    open: Option<Gauge>,
}

impl CountedConnection {
    /// The socket, for the proxy's own HTTP/1.1 codec (`h1`), which reads and writes it
    /// directly rather than through hyper's I/O traits.
    pub(crate) fn stream(&mut self) -> &mut TcpStream {
        self.io.inner_mut()
    }
}

impl Drop for CountedConnection {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.decrement(1.0);
        }
    }
}

impl Connection for CountedConnection {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl Read for CountedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl Write for CountedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}
