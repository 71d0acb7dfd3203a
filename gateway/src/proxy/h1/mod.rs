//! The HTTP/1.1 upstream codec: the proxy's own, over `httparse`, for HTTP/1.1 groups.
//!
//! - `head`: the response head, parsed with `httparse`, and its framing decided by
//!   RFC 9112 §6.3, strictly: what a lenient parser would guess at (`Content-Length`
//!   with `Transfer-Encoding`, differing `Content-Length`s) is an error, and the
//!   connection it came on is closed, never reused.
//! - `decode`: the response body by its framing (length, chunked, to the end of the
//!   connection), cut from the connection's read buffer without a copy.
//! - `request`: the request head, written once per request for all its attempts
//!   (`RequestStart`), and each attempt's fields after it.
//!
//! The codec does no I/O: it works on the bytes the connection read so far, and says
//! when it needs more. [`decode_response`] runs both over a whole response at once, for
//! the fuzz targets and the differential test.

mod conn;
mod decode;
mod head;
mod request;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;

pub(crate) use conn::Connection;
pub use decode::BodyError;
use decode::Decoder;
pub use head::HeadError;
use head::parse_head;
pub(crate) use request::RequestStart;

/// Why a response from an upstream is refused: its head or its body breaks HTTP/1.1's
/// framing rules. The connection it came on is closed; the client gets a 502 if the head
/// was refused, a cut response if the body was.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    /// The head is malformed, too large or frames its body ambiguously.
    #[error(transparent)]
    Head(#[from] HeadError),
    /// The body breaks its framing, or the connection ended before its end.
    #[error(transparent)]
    Body(#[from] BodyError),
}

/// A whole response as the proxy's codec reads it (see [`decode_response`]).
#[derive(Debug)]
pub struct DecodedResponse {
    /// The final head (interim `1xx` heads skipped, as the proxy skips them).
    pub head: http::response::Parts,
    /// The body, de-chunked.
    pub body: Bytes,
    /// The chunked body's trailer fields, if it had any.
    pub trailers: Option<HeaderMap>,
    /// Whether the connection could carry another request after this response: the
    /// upstream did not ask to close it, the body's end was found in its framing, and
    /// no byte followed it.
    pub reusable: bool,
    /// How many interim (`1xx`) heads came before the final one.
    pub interim: usize,
}

/// Reads `input`, all an upstream sent on a connection before closing it, as the
/// response to a request (`head_request`: a `HEAD`, whose response has no body), fed to
/// the codec `feed` bytes at a time (`0`: all at once) as the connection would read it.
///
/// The entry point of the fuzz targets and of the differential test: the same code the
/// proxy runs, without the sockets. It never panics, whatever the bytes.
///
/// # Errors
/// The response breaks HTTP/1.1's framing, or `input` ends before the response does.
#[doc(hidden)]
pub fn decode_response(
    input: &[u8],
    head_request: bool,
    feed: usize,
) -> Result<DecodedResponse, ResponseError> {
    let step = if feed == 0 { input.len().max(1) } else { feed };
    let mut pieces = input.chunks(step);
    let mut buf = BytesMut::new();
    let mut interim = 0;
    let head = loop {
        match parse_head(&mut buf, head_request)? {
            Some(head) if head.parts.status.is_informational() && head.parts.status != 101 => {
                interim += 1;
            }
            Some(head) => break head,
            None => match pieces.next() {
                Some(piece) => buf.extend_from_slice(piece),
                None => return Err(HeadError::Incomplete.into()),
            },
        }
    };
    let mut decoder = Decoder::new(head.framing);
    let (body, trailers) = decoder.read_to_end(&mut buf, &mut pieces)?;
    let rest_empty = buf.is_empty() && pieces.all(<[u8]>::is_empty);
    Ok(DecodedResponse {
        reusable: head.keep_alive && decoder.delimited() && rest_empty,
        head: head.parts,
        body: body.freeze(),
        trailers,
        interim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_response_is_read_past_interim_heads_in_any_pieces() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
        for feed in [0, 1, 7] {
            let rsp = decode_response(raw, false, feed).unwrap();
            assert_eq!((rsp.head.status.as_u16(), rsp.interim), (200, 1));
            assert_eq!(rsp.body, "ok");
            assert!(rsp.reusable, "by {feed}");
        }
    }

    #[test]
    fn a_connection_is_reusable_only_when_the_body_ends_by_its_framing_and_nothing_follows() {
        let reusable = |raw: &[u8]| decode_response(raw, false, 0).unwrap().reusable;
        assert!(!reusable(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"
        ));
        assert!(!reusable(b"HTTP/1.1 200 OK\r\n\r\nto the end"));
        assert!(!reusable(
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        ));
        assert!(reusable(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"));
    }

    #[test]
    fn a_response_cut_short_is_an_error() {
        assert!(matches!(
            decode_response(b"HTTP/1.1 200 OK\r\n", false, 0),
            Err(ResponseError::Head(HeadError::Incomplete))
        ));
        let short = decode_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nok", false, 0);
        assert!(matches!(
            short,
            Err(ResponseError::Body(BodyError::Incomplete))
        ));
    }
}
