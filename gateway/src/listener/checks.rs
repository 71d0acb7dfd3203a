//! What every request must be before any handler sees it, on every listener: one valid
//! `Host` (RFC 9112 §3.2, RFC 9113 §8.3.1), and not CONNECT; and a HEAD's answer without
//! its body.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use http_body_util::{Either, Full};

use crate::error::ClientError;
use crate::response::ResponseBody;

/// Refuses a request no handler may see: CONNECT (no route tunnels), and a `Host` that is
/// missing on HTTP/1.1, given twice, not a host with an optional port, or (HTTP/2) naming
/// another authority than `:authority`. The authority is what routes and what goes
/// upstream in `Host` and `X-Forwarded-Host`, so it must be exactly one plain name.
///
/// # Errors
/// The request is one of those.
pub(super) fn check_request<B>(req: &Request<B>) -> Result<(), ClientError> {
    if req.method() == Method::CONNECT {
        return Err(ClientError::ConnectRefused);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ClientError::BadHost("Host is given more than once"));
    }
    let authority = req.uri().authority().map(|a| a.as_str().as_bytes());
    match (req.version(), host, authority) {
        (Version::HTTP_11, None, _) => {
            return Err(ClientError::BadHost("HTTP/1.1 requires a Host header"));
        }
        (Version::HTTP_2, None, None) => {
            return Err(ClientError::BadHost(
                "the request names no authority (:authority or Host)",
            ));
        }
        (Version::HTTP_2, Some(host), Some(authority))
            if !host.as_bytes().eq_ignore_ascii_case(authority) =>
        {
            return Err(ClientError::BadHost(
                "Host names another authority than :authority",
            ));
        }
        _ => {}
    }
    let named = host.map(HeaderValue::as_bytes).into_iter().chain(authority);
    for value in named {
        if !is_host_and_port(value) {
            return Err(ClientError::BadHost(
                "Host must be a host name or IP address with an optional port",
            ));
        }
    }
    Ok(())
}

/// The bytes a host name may have: RFC 3986's unreserved characters. A table, looked up
/// once a byte, where the test of each class took a few comparisons.
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        table[b] = byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~');
        b += 1;
    }
    table
};

/// `host[:port]`: a name of letters, digits, `-`, `.`, `_` and `~` (RFC 3986's unreserved
/// characters: no user info, path, percent-encoding or spaces), an IPv4 address, or an
/// IPv6 address in brackets; a port of 1 to 5 digits up to 65535.
fn is_host_and_port(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(end) = memchr::memchr(b']', value) else {
            return false;
        };
        let (literal, rest) = value.split_at(end + 1);
        let inside = &literal[1..literal.len() - 1];
        let address = !inside.is_empty()
            && inside
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
        if !address {
            return false;
        }
        match rest {
            [] => (literal, None),
            [b':', port @ ..] => (literal, Some(port)),
            _ => return false,
        }
    } else {
        match memchr::memchr(b':', value) {
            Some(colon) => (&value[..colon], Some(&value[colon + 1..])),
            None => (value, None),
        }
    };
    let name = host.first() == Some(&b'[')
        || (!host.is_empty() && host.iter().all(|&b| NAME_BYTES[usize::from(b)]));
    // Folded digit by digit: through `str::parse` it cost as much as the rest of the
    // check.
    let port = port.is_none_or(|port| {
        (1..=5).contains(&port.len())
            && port
                .iter()
                .try_fold(0u32, |n, &b| {
                    b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
                })
                .is_some_and(|p| p <= 65_535)
    });
    name && port
}

/// The answer to a HEAD: the GET's status and headers, its `Content-Length`, and no body
/// (HTTP/1.1 would drop it anyway; HTTP/2 would send it). A streamed upstream answer is
/// left as it is: the upstream answered the HEAD itself.
pub(super) fn without_body(mut rsp: Response<ResponseBody>) -> Response<ResponseBody> {
    let Either::Left(whole) = rsp.body() else {
        return rsp;
    };
    let length = whole.size_hint().exact();
    let status = rsp.status();
    let has_length = !(status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED);
    if let Some(length) = length.filter(|_| has_length) {
        rsp.headers_mut()
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(length));
    }
    *rsp.body_mut() = Either::Left(Full::new(Bytes::new()));
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_names_or_addresses_with_an_optional_port() {
        for ok in [
            "a.test",
            "A.Test:8080",
            "127.0.0.1",
            "[::1]",
            "[::1]:443",
            "under_score.test",
            "x:65535",
        ] {
            assert!(is_host_and_port(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "a.test/../admin",
            "x@internal.test",
            "a.test:99999",
            "a.test:65536",
            "a.test:+80",
            "a.test:",
            "a.test:8x",
            ":80",
            "[::1",
            "[]",
            "[::1]x",
            "a b",
            "a%2e.test",
            "a.test:80:80",
        ] {
            assert!(!is_host_and_port(bad.as_bytes()), "{bad:?}");
        }
    }

    fn get(version: Version, uri: &str, hosts: &[&str]) -> Request<()> {
        let mut req = Request::get(uri).version(version);
        for host in hosts {
            req = req.header(header::HOST, *host);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn host_rules_follow_the_version() {
        const HTTP_10: Version = Version::HTTP_10;
        const HTTP_11: Version = Version::HTTP_11;
        const HTTP_2: Version = Version::HTTP_2;
        assert!(check_request(&get(HTTP_11, "/", &["a"])).is_ok());
        assert!(check_request(&get(HTTP_11, "/", &[])).is_err());
        assert!(check_request(&get(HTTP_11, "/", &["a", "a"])).is_err());
        assert!(check_request(&get(HTTP_10, "/", &[])).is_ok());
        assert!(check_request(&get(HTTP_10, "/", &["a", "b"])).is_err());
        assert!(check_request(&get(HTTP_2, "http://a.test/", &[])).is_ok());
        assert!(check_request(&get(HTTP_2, "http://a.test/", &["A.test"])).is_ok());
        assert!(check_request(&get(HTTP_2, "http://a.test/", &["b.test"])).is_err());
        assert!(check_request(&get(HTTP_2, "/", &[])).is_err());
        assert!(check_request(&get(HTTP_2, "http://x@a.test/", &[])).is_err());
    }
}
