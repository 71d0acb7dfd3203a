//! The request head as it goes up. What every attempt of a request sends alike — the
//! request line, the client's fields, the fields the proxy sets once per request — is
//! written once, when the request is prepared ([`RequestStart`]); each attempt's head is
//! that text, then the attempt's own fields, `Via` and the body's framing
//! ([`encode_head`]).
//!
//! Written once, the start is the request's own bytes. The client's path and field
//! values, as hyper parses them, are slices of its connection's read buffer: held while
//! the request waited for the upstream, they left that buffer shared when hyper read
//! ahead on the connection, and hyper allocated a new one and copied into it (on about
//! four proxied requests in five).

use http::Method;
use http::header::{self, HeaderName, HeaderValue};
use http_body::Body;

use crate::proxy::body::AttemptBody;

/// The part of a request's HTTP/1.1 head that every attempt sends alike: the request
/// line and the fields that come before the attempt's own.
#[derive(Debug)]
pub(crate) struct RequestStart {
    text: Vec<u8>,
    /// The request is a `HEAD`: its response has no body, whatever its head says.
    head_request: bool,
    /// The fields include a `Content-Length`, which then frames the body.
    content_length: bool,
}

impl RequestStart {
    /// `method` to `path` (and query) with the `fields` they iterate, in their order
    /// (iterated twice: to size the text, then to write it). A `Transfer-Encoding`
    /// among them is dropped: the body's framing is the attempt's to write.
    pub(crate) fn new<'f, F>(method: &Method, path: &str, fields: impl Fn() -> F) -> Self
    where
        F: Iterator<Item = (&'f HeaderName, &'f HeaderValue)>,
    {
        // Sized once: grown field by field, a typical head was copied three times.
        let fields = || fields().filter(|(name, _)| *name != header::TRANSFER_ENCODING);
        let size = fields()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>()
            + method.as_str().len()
            + path.len()
            + " HTTP/1.1\r\n".len()
            + 1;
        let mut text = Vec::with_capacity(size);
        text.extend_from_slice(method.as_str().as_bytes());
        text.push(b' ');
        text.extend_from_slice(path.as_bytes());
        text.extend_from_slice(b" HTTP/1.1\r\n");
        let mut content_length = false;
        for (name, value) in fields() {
            content_length |= name == header::CONTENT_LENGTH;
            push_field(&mut text, name, value);
        }
        Self {
            text,
            head_request: method == Method::HEAD,
            content_length,
        }
    }

    pub(crate) fn head_request(&self) -> bool {
        self.head_request
    }
}

/// Writes an attempt's head into `out`: `start`, then the attempt's own `fields`; `true`:
/// the body goes chunked. The body is framed as hyper's client frames it: by the
/// request's own `Content-Length` if it has one, else by the body's exact size when
/// known, else chunked.
pub(super) fn encode_head<'f>(
    out: &mut Vec<u8>,
    start: &RequestStart,
    fields: impl Iterator<Item = (&'f HeaderName, &'f HeaderValue)>,
    body: &AttemptBody,
) -> bool {
    out.extend_from_slice(&start.text);
    for (name, value) in fields {
        push_field(out, name, value);
    }
    let mut chunked = false;
    if !body.is_end_stream() && !start.content_length {
        match body.size_hint().exact() {
            Some(len) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            None => {
                chunked = true;
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    chunked
}

fn push_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(method: &Method, fields: &[(&'static str, &'static str)]) -> (String, bool) {
        let fields: Vec<(HeaderName, HeaderValue)> = fields
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect();
        let start = RequestStart::new(method, "/a?b", || fields.iter().map(|(n, v)| (n, v)));
        let via = HeaderValue::from_static("1.1 tiergate");
        let mut out = Vec::new();
        let body = AttemptBody::empty();
        let chunked = encode_head(&mut out, &start, [(&header::VIA, &via)].into_iter(), &body);
        assert_eq!(start.text.capacity(), start.text.len(), "sized exactly");
        (String::from_utf8(out).unwrap(), chunked)
    }

    /// Mutation: writing `Transfer-Encoding` through, or the attempt's fields before the
    /// start's.
    #[test]
    fn the_start_then_the_attempt_fields_then_the_blank_line() {
        let (head, chunked) = written(
            &Method::GET,
            &[
                ("host", "shop.example"),
                ("transfer-encoding", "chunked"),
                ("x-forwarded-for", "10.0.0.1"),
            ],
        );
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\nhost: shop.example\r\nx-forwarded-for: 10.0.0.1\r\n\
             via: 1.1 tiergate\r\n\r\n"
        );
        assert!(!chunked, "no body");
    }

    #[test]
    fn a_head_request_and_a_content_length_are_remembered() {
        let start = RequestStart::new(&Method::HEAD, "/", std::iter::empty);
        assert!(start.head_request() && !start.content_length);
        let length = HeaderValue::from_static("3");
        let start = RequestStart::new(&Method::POST, "/", || {
            [(&header::CONTENT_LENGTH, &length)].into_iter()
        });
        assert!(!start.head_request() && start.content_length);
    }
}
