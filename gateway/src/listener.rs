//! Accept loops: TCP connections served by hyper, HTTP/1.1 and HTTP/2 (h2c by prior
//! knowledge) on one port.
//!
//! On stop, a loop closes its listening socket first (new connections are refused),
//! then asks every open connection to finish: HTTP/1.1 closes after the response in
//! flight, HTTP/2 sends GOAWAY. Connections still open after the grace period are
//! dropped.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How long to pause after a failed `accept` (EMFILE and the like): long enough not to
/// spin on a full descriptor table, short enough to recover quickly.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `listener` with `handler` until `stop` turns true, then drains for at most
/// `grace`.
pub(crate) async fn serve<H, Fut>(
    name: &'static str,
    listener: TcpListener,
    handler: H,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper needs a timer for its header-read timeout (slow-loris protection).
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();

    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(error) => {
                tracing::warn!(listener = name, %error, "Accept failed; backing off.");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Responses are small and written whole: send them without waiting for more.
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let response = handler(req);
            async move { Ok::<_, Infallible>(response.await) }
        });
        let connection = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(listener = name, error = %error, "Connection ended with an error.");
            }
        });
    }

    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = name, "All connections drained."),
        () = tokio::time::sleep(grace) => tracing::warn!(listener = name, "Drain deadline passed; dropping open connections."),
    }
}
