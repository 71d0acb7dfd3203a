//! Arbitrary bytes as an upstream's whole answer to the proxy's own HTTP/1.1 codec
//! (`gateway::proxy::h1::decode_response`), for a GET and for a HEAD, fed at once and
//! in pieces. Per input it asserts:
//!
//! - nothing panics;
//! - the pieces the bytes arrive in change nothing: the same answer or the same refusal;
//! - an accepted answer is framed as RFC 9112 says: a final status (or 101), no body for
//!   HEAD, 1xx, 204 or 304; otherwise never `Content-Length` together with
//!   `Transfer-Encoding`, and as many body bytes as its `Content-Length` says.
//!
//! Seeds: `gateway/tests/corpus/upstream-responses/` (scripts/fuzz passes them in).
#![no_main]

use gateway::proxy::h1::{DecodedResponse, decode_response};
use http::{StatusCode, header};
use libfuzzer_sys::fuzz_target;

/// The piece sizes tried besides the whole input at once: a byte at a time, and an odd
/// size that splits every line somewhere.
const FEEDS: [usize; 2] = [1, 7];

fn check(input: &[u8], head_request: bool) {
    let whole = decode_response(input, head_request, 0);
    for feed in FEEDS {
        let fed = decode_response(input, head_request, feed);
        match (&whole, &fed) {
            (Ok(a), Ok(b)) => assert!(
                same(a, b),
                "fed {feed} bytes at a time, the answer differs: {a:?} / {b:?}"
            ),
            (Err(_), Err(_)) => {}
            _ => panic!("fed {feed} bytes at a time: {fed:?}, at once: {whole:?}"),
        }
    }
    if let Ok(rsp) = whole {
        framed_as_rfc_9112_says(&rsp, head_request);
    }
}

fn same(a: &DecodedResponse, b: &DecodedResponse) -> bool {
    a.head.status == b.head.status
        && a.head.version == b.head.version
        && a.head.headers == b.head.headers
        && a.body == b.body
        && a.trailers == b.trailers
        && a.reusable == b.reusable
        && a.interim == b.interim
}

fn framed_as_rfc_9112_says(rsp: &DecodedResponse, head_request: bool) {
    let status = rsp.head.status;
    let headers = &rsp.head.headers;
    assert!(
        !status.is_informational() || status == StatusCode::SWITCHING_PROTOCOLS,
        "an interim {status} returned as the final answer"
    );
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if bodiless {
        assert!(
            rsp.body.is_empty(),
            "a body for a {status} (HEAD: {head_request})"
        );
        return;
    }
    // Only where a body follows: the head of one that has none ends at its empty line,
    // whatever its framing fields say (RFC 9112 6.3, rule 1).
    assert!(
        !(headers.contains_key(header::CONTENT_LENGTH)
            && headers.contains_key(header::TRANSFER_ENCODING)),
        "accepted with both Content-Length and Transfer-Encoding"
    );
    if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        let text = length.to_str().expect("an accepted Content-Length is text");
        let first = text.split(',').next().unwrap_or_default().trim();
        let length: usize = first
            .parse()
            .expect("an accepted Content-Length is a number");
        assert_eq!(
            rsp.body.len(),
            length,
            "body length against Content-Length {text}"
        );
    }
}

fuzz_target!(|input: &[u8]| {
    check(input, false);
    check(input, true);
});
