//! `tiergate healthcheck`: one HTTP/1.1 GET to a local probe, for container health checks
//! in images that have no curl (distroless). Uses hyper's own client connection, so the
//! binary carries no HTTP client library.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a probe gave no status.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The URL is not `http://host[:port]/path`.
    #[error("unsupported URL {0:?}: expected http://HOST[:PORT]/PATH")]
    Url(String),
    /// No answer within the limit.
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// Connecting or speaking HTTP failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server's answer was not HTTP.
    #[error("{0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built from the URL.
    #[error("{0}")]
    Request(#[from] http::Error),
}

/// The `/livez` URL of an admin listener bound to `admin`. An unspecified address
/// (`0.0.0.0`, `[::]`) is probed on loopback, where the listener also answers.
pub fn livez_url(admin: SocketAddr) -> String {
    let ip = match admin.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/livez", SocketAddr::new(ip, admin.port()))
}

/// GETs `url` and returns the status; the whole exchange is bounded by `timeout`.
///
/// # Errors
/// A URL that is not plain `http://`, no answer in time, or a connection or protocol
/// failure.
pub async fn probe(url: &str, timeout: Duration) -> Result<StatusCode, ProbeError> {
    let bad = || ProbeError::Url(url.to_owned());
    let uri: Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let exchange = async {
        let stream = TcpStream::connect((host, port)).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(header::HOST, authority.as_str())
            .header(header::USER_AGENT, "tiergate-healthcheck")
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        Ok::<_, ProbeError>(response.status())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_admin_addresses_are_probed_on_loopback() {
        let url = |a: &str| livez_url(a.parse().unwrap());
        assert_eq!(url("0.0.0.0:9090"), "http://127.0.0.1:9090/livez");
        assert_eq!(url("[::]:9090"), "http://[::1]:9090/livez");
        assert_eq!(url("10.0.0.7:9191"), "http://10.0.0.7:9191/livez");
    }

    #[tokio::test]
    async fn only_plain_http_urls_are_probed() {
        for url in [
            "https://127.0.0.1/livez",
            "127.0.0.1:9090",
            "http:///x",
            "::",
        ] {
            let err = probe(url, Duration::from_secs(1)).await.unwrap_err();
            assert!(matches!(err, ProbeError::Url(_)), "{url}: {err}");
        }
    }
}
