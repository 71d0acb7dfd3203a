//! The response head: parsed with `httparse`, its framing decided by RFC 9112 §6.3.

use std::mem::MaybeUninit;

use bytes::BytesMut;
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
}

/// Parses the response head at the start of `buf`, the response to a `HEAD` request if
/// `head_request`, and splits it off `buf` (its field values are slices of its bytes);
/// `None`: the head is not complete yet (read more), `buf` is left as it was.
///
/// # Errors
/// The head is malformed, over [`MAX_HEAD`] bytes, or frames its body ambiguously.
pub(crate) fn parse_head(
    buf: &mut BytesMut,
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
    // The values are cut from the head's own bytes, split off the read buffer, rather
    // than copied one allocation each. httparse's fields borrow the buffer until then,
    // so where each name and value lies is kept as offsets (under MAX_HEAD: 16 bits).
    let mut spans = [[0u16; 4]; MAX_FIELDS];
    let start = buf.as_ptr().addr();
    let offset = |at: *const u8| {
        at.addr()
            .checked_sub(start)
            .and_then(|at| u16::try_from(at).ok())
            .ok_or(HeadError::TooLarge)
    };
    for (span, field) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = field.name.as_bytes().as_ptr_range();
        let value = field.value.as_ptr_range();
        *span = [
            offset(name.start)?,
            offset(name.end)?,
            offset(value.start)?,
            offset(value.end)?,
        ];
    }
    let spans = &spans[..parsed.headers.len()];
    let head = buf.split_to(len).freeze();
    // The framing fields are read as the map is built: looking them up in it afterwards
    // cost more than building it.
    let mut said = FramingFields::default();
    for &[name_start, name_end, value_start, value_end] in spans {
        let name = &head[usize::from(name_start)..usize::from(name_end)];
        let name = HeaderName::from_bytes(name).map_err(|_| HeadError::BadField)?;
        let value = head.slice(usize::from(value_start)..usize::from(value_end));
        let value = HeaderValue::from_maybe_shared(value).map_err(|_| HeadError::BadField)?;
        said.read(&name, &value);
        headers.append(name, value);
    }
    let framing = said.framing(status, version, head_request)?;
    let keep_alive = said.keep_alive(version) && framing != Framing::Close;
    parts.headers = headers;
    Ok(Some(ResponseHead {
        parts,
        framing,
        keep_alive,
    }))
}

/// What a head's `Content-Length`, `Transfer-Encoding` and `Connection` fields say,
/// gathered one field at a time (a standard name compares as an integer).
#[derive(Debug, Default)]
struct FramingFields {
    has_length: bool,
    /// The one length the `Content-Length` values gave so far.
    length: Option<u64>,
    /// A `Content-Length` value that is not a number, or differs from another.
    bad_length: bool,
    has_encoding: bool,
    /// How many `chunked` codings came, and whether the last coding was one.
    chunked: usize,
    last_is_chunked: bool,
    /// A `Transfer-Encoding` value that is not visible ASCII.
    bad_encoding: bool,
    /// A `Connection` field listed `close`, or `keep-alive`.
    close: bool,
    keep_alive: bool,
}

impl FramingFields {
    fn read(&mut self, name: &HeaderName, value: &HeaderValue) {
        if *name == header::CONTENT_LENGTH {
            self.has_length = true;
            self.read_length(value.as_bytes());
        } else if *name == header::TRANSFER_ENCODING {
            self.has_encoding = true;
            self.read_encoding(value);
        } else if *name == header::CONNECTION {
            for token in value
                .as_bytes()
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
            {
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }

    /// Identical values repeated, on one line or several, are taken as RFC 9110 §8.6
    /// allows.
    fn read_length(&mut self, value: &[u8]) {
        for item in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = item.iter().try_fold(0u64, |n, &b| {
                let digit = b.is_ascii_digit().then(|| u64::from(b - b'0'))?;
                n.checked_mul(10)?.checked_add(digit)
            });
            match n {
                Some(n) if !item.is_empty() && self.length.is_none_or(|seen| seen == n) => {
                    self.length = Some(n);
                }
                _ => self.bad_length = true,
            }
        }
    }

    fn read_encoding(&mut self, value: &HeaderValue) {
        let Ok(value) = value.to_str() else {
            self.bad_encoding = true;
            return;
        };
        // Empty list elements are ignored (RFC 9110 §5.6.1.2).
        for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            self.last_is_chunked = coding.eq_ignore_ascii_case("chunked");
            self.chunked += usize::from(self.last_is_chunked);
        }
    }

    /// RFC 9112 §6.3, for a response: how its body is delimited.
    fn framing(
        &self,
        status: StatusCode,
        version: Version,
        head_request: bool,
    ) -> Result<Framing, HeadError> {
        if head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return Ok(Framing::Empty);
        }
        if self.has_encoding {
            if self.has_length {
                return Err(HeadError::LengthAndEncoding);
            }
            // §6.1: a sender must not apply chunked twice; which layer ends the body is
            // where parsers disagree.
            if version == Version::HTTP_10 || self.bad_encoding || self.chunked > 1 {
                return Err(HeadError::BadEncoding);
            }
            // Chunked when it is the last coding, else to the end of the connection
            // (rule 4).
            return Ok(if self.last_is_chunked {
                Framing::Chunked
            } else {
                Framing::Close
            });
        }
        match (self.has_length, self.length) {
            (false, _) => Ok(Framing::Close),
            (true, Some(length)) if !self.bad_length => Ok(Framing::Length(length)),
            (true, _) => Err(HeadError::BadLength),
        }
    }

    /// Whether the connection may carry another request after this response.
    fn keep_alive(&self, version: Version) -> bool {
        !self.close && (version == Version::HTTP_11 || self.keep_alive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], head_request: bool) -> Result<Option<ResponseHead>, HeadError> {
        parse_head(&mut BytesMut::from(raw), head_request)
    }

    fn head(raw: &str) -> Result<ResponseHead, HeadError> {
        parse(raw.as_bytes(), false).map(|head| head.expect("complete"))
    }

    fn framing_of(raw: &str) -> Result<Framing, HeadError> {
        head(raw).map(|head| head.framing)
    }

    #[test]
    fn an_incomplete_head_asks_for_more_and_leaves_the_buffer_alone() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(parse_head(&mut buf, false).unwrap().is_none());
        assert_eq!(buf, &b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
    }

    #[test]
    fn a_head_growing_past_the_limit_is_refused() {
        let mut raw = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
        raw.resize(MAX_HEAD, b'a');
        assert!(matches!(parse(&raw, false), Err(HeadError::TooLarge)));
    }

    #[test]
    fn content_length_frames_the_body() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nbody"[..]);
        let head = parse_head(&mut buf, false).unwrap().unwrap();
        assert_eq!(head.framing, Framing::Length(12));
        assert!(head.keep_alive);
        assert_eq!(buf, &b"body"[..], "the head split off up to the blank line");
    }

    /// Mutation: a value copied (`HeaderValue::from_bytes`) rather than cut from the
    /// head's bytes.
    #[test]
    fn values_are_slices_of_the_read_buffer_not_copies() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nX-A: one\r\nx-b:\r\nX-A:  two \r\n\r\n"[..]);
        let read = buf.as_ptr_range();
        let head = parse_head(&mut buf, false).unwrap().unwrap();
        let values: Vec<_> = head.parts.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["one", "two"]);
        assert_eq!(head.parts.headers["x-b"], "");
        for value in values {
            assert!(read.contains(&value.as_bytes().as_ptr()), "{value:?}");
        }
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
        let to_head = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true);
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

    /// Mutation: `close` overwritten (`=`) rather than accumulated (`|=`) per token, as
    /// the fields are read one at a time now.
    #[test]
    fn a_close_in_any_connection_field_ends_the_connection() {
        for fields in [
            "Connection: close\r\nConnection: keep-alive",
            "CONNECTION: keep-alive\r\nconnection: Close",
            "Connection: close, keep-alive",
        ] {
            let raw = format!("HTTP/1.0 200 OK\r\n{fields}\r\nContent-Length: 0\r\n\r\n");
            assert!(!head(&raw).unwrap().keep_alive, "{fields}");
        }
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
