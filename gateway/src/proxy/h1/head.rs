//! The response head: parsed with `httparse`, its framing decided by RFC 9112 §6.3.

use std::mem::MaybeUninit;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};

/// The most header fields a response head may have (hyper's default too).
const MAX_FIELDS: usize = 100;

/// The fields the proxy adds to a response on its way down.
const ADDED_ON_THE_WAY_DOWN: usize = 2;

/// The largest response head taken, in bytes: a head still incomplete at this size is
/// refused rather than buffered without end.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

/// Why a response head is refused.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// Not a valid HTTP/1.x response head.
    #[error("malformed response head: {0}")]
    Malformed(#[from] httparse::Error),
    /// A field name or value `http` refuses.
    #[error("malformed response header field")]
    BadField,
    /// The head grew past the limit before its end.
    #[error("response head over {MAX_HEAD} bytes")]
    TooLarge,
    /// The connection ended before the head did.
    #[error("the connection closed before a complete response head")]
    Incomplete,
    /// `Content-Length` and `Transfer-Encoding` together (RFC 9112 §6.3, rule 3): a
    /// request smuggler's tool, never guessed at.
    #[error("response has both Content-Length and Transfer-Encoding")]
    LengthAndEncoding,
    /// `Content-Length` values that differ, or one that is not a number.
    #[error("response has an invalid or ambiguous Content-Length")]
    BadLength,
    /// `chunked` applied twice, or `Transfer-Encoding` in an HTTP/1.0 response.
    #[error("response has an invalid Transfer-Encoding")]
    BadEncoding,
}

/// How the body of a response is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body: a response to `HEAD`, a `1xx`, `204` or `304`.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
    /// Up to the end of the connection: no length, or a `Transfer-Encoding` that does
    /// not end in `chunked`.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub(crate) parts: http::response::Parts,
    pub(crate) framing: Framing,
    /// The upstream lets the connection carry another request (HTTP/1.1 without
    /// `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`).
    pub(crate) keep_alive: bool,
    /// The head's length in bytes, blank line included.
    pub(crate) len: usize,
}

/// Parses the response head at the start of `buf`, the response to a `HEAD` request if
/// `head_request`; `None`: the head is not complete yet (read more).
///
/// # Errors
/// The head is malformed, over [`MAX_HEAD`] bytes, or frames its body ambiguously.
pub(crate) fn parse_head(
    buf: &[u8],
    head_request: bool,
) -> Result<Option<ResponseHead>, HeadError> {
    // Left uninitialised for httparse to fill: writing 100 empty fields first was a
    // 3 KiB copy per response.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut parsed = httparse::Response::new(&mut []);
    let parsing = httparse::ParserConfig::default();
    let len = match parsing.parse_response_with_uninit_headers(&mut parsed, buf, &mut fields)? {
        httparse::Status::Complete(len) if len <= MAX_HEAD => len,
        httparse::Status::Partial if buf.len() < MAX_HEAD => return Ok(None),
        _ => return Err(HeadError::TooLarge),
    };
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(HeadError::Malformed(httparse::Error::Status))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    let reason = parsed.reason.unwrap_or_default();
    // A reason of the upstream's own is passed down, as hyper's client and server do.
    if Some(reason) != status.canonical_reason() {
        if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason.as_bytes()) {
            parts.extensions.insert(reason);
        }
    }
    // Room for the two fields the proxy adds (`Via`, `X-Request-Id`): a map filled to
    // its capacity grows, and rehashes, at the first of them.
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + ADDED_ON_THE_WAY_DOWN);
    for field in parsed.headers.iter() {
        let name =
            HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| HeadError::BadField)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| HeadError::BadField)?;
        headers.append(name, value);
    }
    let framing = framing(status, version, &headers, head_request)?;
    let keep_alive = keep_alive(version, &headers) && framing != Framing::Close;
    parts.headers = headers;
    Ok(Some(ResponseHead {
        parts,
        framing,
        keep_alive,
        len,
    }))
}

/// RFC 9112 §6.3, for a response: how its body is delimited.
fn framing(
    status: StatusCode,
    version: Version,
    headers: &HeaderMap,
    head_request: bool,
) -> Result<Framing, HeadError> {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    let has_length = headers.contains_key(header::CONTENT_LENGTH);
    if headers.contains_key(header::TRANSFER_ENCODING) {
        if has_length {
            return Err(HeadError::LengthAndEncoding);
        }
        if version == Version::HTTP_10 {
            return Err(HeadError::BadEncoding);
        }
        return encoding(headers);
    }
    if !has_length {
        return Ok(Framing::Close);
    }
    content_length(headers).map(Framing::Length)
}

/// The framing `Transfer-Encoding` gives: chunked when it is the last coding (once),
/// else to the end of the connection (RFC 9112 §6.3, rule 4).
fn encoding(headers: &HeaderMap) -> Result<Framing, HeadError> {
    let mut chunked = 0;
    let mut last_is_chunked = false;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let value = value.to_str().map_err(|_| HeadError::BadEncoding)?;
        // Empty list elements are ignored (RFC 9110 §5.6.1.2).
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            last_is_chunked = coding.eq_ignore_ascii_case("chunked");
            chunked += usize::from(last_is_chunked);
        }
    }
    match (chunked, last_is_chunked) {
        // §6.1: a sender must not apply chunked twice; which layer ends the body is
        // where parsers disagree.
        (2.., _) => Err(HeadError::BadEncoding),
        (_, true) => Ok(Framing::Chunked),
        (_, false) => Ok(Framing::Close),
    }
}

/// The one length every `Content-Length` value gives (identical values repeated, on
/// one line or several, are taken as RFC 9110 §8.6 allows).
fn content_length(headers: &HeaderMap) -> Result<u64, HeadError> {
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::BadLength);
            }
            let n = std::str::from_utf8(item)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(HeadError::BadLength)?;
            if length.is_some_and(|seen| seen != n) {
                return Err(HeadError::BadLength);
            }
            length = Some(n);
        }
    }
    length.ok_or(HeadError::BadLength)
}

/// Whether the connection may carry another request after this response.
fn keep_alive(version: Version, headers: &HeaderMap) -> bool {
    let mut keep = version == Version::HTTP_11;
    for value in headers.get_all(header::CONNECTION) {
        for token in value
            .as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
        {
            if token.eq_ignore_ascii_case(b"close") {
                return false;
            }
            keep |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<ResponseHead, HeadError> {
        parse_head(raw.as_bytes(), false).map(|head| head.expect("complete"))
    }

    fn framing_of(raw: &str) -> Result<Framing, HeadError> {
        head(raw).map(|head| head.framing)
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-le", false)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_head_growing_past_the_limit_is_refused() {
        let mut raw = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        raw.resize(MAX_HEAD, b'a');
        assert!(matches!(parse_head(&raw, false), Err(HeadError::TooLarge)));
    }

    #[test]
    fn content_length_frames_the_body() {
        let head = head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nbody").unwrap();
        assert_eq!(head.framing, Framing::Length(12));
        assert!(head.keep_alive);
        assert_eq!(head.len, 39, "up to the blank line");
    }

    #[test]
    fn content_length_with_transfer_encoding_is_refused() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(framing_of(raw), Err(HeadError::LengthAndEncoding)));
    }

    #[test]
    fn differing_content_lengths_are_refused_and_equal_ones_taken() {
        let two = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(matches!(framing_of(two), Err(HeadError::BadLength)));
        let listed = "HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n";
        assert!(matches!(framing_of(listed), Err(HeadError::BadLength)));
        let same = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(framing_of(same).unwrap(), Framing::Length(3));
    }

    #[test]
    fn a_content_length_that_is_not_a_number_is_refused() {
        for bad in ["-1", "+3", "3x", "", "0x10", "99999999999999999999999"] {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(
                matches!(framing_of(&raw), Err(HeadError::BadLength)),
                "{bad}"
            );
        }
    }

    #[test]
    fn transfer_encoding_ending_in_chunked_is_chunked_else_close_delimited() {
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n";
        assert_eq!(framing_of(chunked).unwrap(), Framing::Chunked);
        let gzip = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
        let head = head(gzip).unwrap();
        assert_eq!(head.framing, Framing::Close);
        assert!(
            !head.keep_alive,
            "a close-delimited body ends the connection"
        );
    }

    #[test]
    fn chunked_twice_is_refused() {
        for te in ["chunked, chunked", "chunked\r\nTransfer-Encoding: chunked"] {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n");
            assert!(
                matches!(framing_of(&raw), Err(HeadError::BadEncoding)),
                "{te}"
            );
        }
    }

    #[test]
    fn transfer_encoding_in_http_1_0_is_refused() {
        let raw = "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(matches!(framing_of(raw), Err(HeadError::BadEncoding)));
    }

    #[test]
    fn no_length_is_close_delimited() {
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\n\r\n").unwrap(),
            Framing::Close
        );
    }

    #[test]
    fn head_1xx_204_and_304_have_no_body_whatever_the_head_says() {
        for status in ["100 Continue", "204 No Content", "304 Not Modified"] {
            let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n");
            assert_eq!(framing_of(&raw).unwrap(), Framing::Empty, "{status}");
        }
        let to_head = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
        assert_eq!(to_head.unwrap().unwrap().framing, Framing::Empty);
    }

    #[test]
    fn connection_close_and_http_1_0_end_the_connection() {
        let close = "HTTP/1.1 200 OK\r\nConnection: foo, Close\r\nContent-Length: 0\r\n\r\n";
        assert!(!head(close).unwrap().keep_alive);
        let old = "HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert!(!head(old).unwrap().keep_alive);
        let kept = "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
        assert!(head(kept).unwrap().keep_alive);
    }

    #[test]
    fn a_reason_of_its_own_is_kept() {
        let own = head("HTTP/1.1 200 Fine\r\n\r\n").unwrap();
        let reason = own.parts.extensions.get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Fine"[..]));
        let canonical = head("HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert!(
            canonical
                .parts
                .extensions
                .get::<hyper::ext::ReasonPhrase>()
                .is_none()
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        for raw in [
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nbad name: x\r\n\r\n",
        ] {
            assert!(matches!(head(raw), Err(HeadError::Malformed(_))), "{raw:?}");
        }
    }
}
