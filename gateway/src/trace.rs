//! W3C Trace Context: a request's `traceparent` is continued (the same trace, a span of
//! our own), or a trace is started for a request without a valid one
//! (`proxy.start_traces`); upstreams get our span as their parent, and the access line
//! the trace and span ids. A malformed `traceparent` is ignored, never an error.

use http::header::{HeaderName, HeaderValue};

pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The trace a request belongs to, and its span in it (this gateway's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceContext {
    pub(crate) trace_id: u128,
    pub(crate) span_id: u64,
    /// The caller's span (0 for a trace started here).
    pub(crate) parent_id: u64,
    /// The trace flags (bit 0: sampled), as the caller sent them; 0 for a trace started
    /// here (nothing records it).
    flags: u8,
    /// Whether the trace came from the request (its `tracestate` then goes on with it).
    pub(crate) continued: bool,
}

impl TraceContext {
    /// The trace of a request whose `traceparent` is `traceparent`, continued with a new
    /// span, or a new trace when it has no valid one and `start` says to start one.
    pub(crate) fn from_traceparent(traceparent: Option<&HeaderValue>, start: bool) -> Option<Self> {
        let span_id = fastrand::u64(1..);
        match traceparent.and_then(parse) {
            Some((trace_id, parent_id, flags)) => Some(Self {
                trace_id,
                span_id,
                parent_id,
                flags,
                continued: true,
            }),
            None if start => Some(Self {
                trace_id: fastrand::u128(1..),
                span_id,
                parent_id: 0,
                flags: 0,
                continued: false,
            }),
            None => None,
        }
    }

    /// Whether the trace is sampled (flag bit 0): its spans are exported.
    pub(crate) fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Marks a trace started here sampled, for the upstreams: their spans belong in it.
    pub(crate) fn mark_sampled(&mut self) {
        self.flags |= 1;
    }

    /// The same trace with `span_id` as the span upstreams see as their parent (an
    /// upstream attempt's).
    pub(crate) fn with_span(self, span_id: u64) -> Self {
        Self { span_id, ..self }
    }

    /// The `traceparent` for an upstream: this trace, this gateway's span as the parent.
    pub(crate) fn traceparent(&self) -> HeaderValue {
        let mut text = [0u8; 55];
        text[..3].copy_from_slice(b"00-");
        text[3..35].copy_from_slice(&hex_u128(self.trace_id));
        text[35] = b'-';
        text[36..52].copy_from_slice(&hex_u64(self.span_id));
        text[52] = b'-';
        text[53..55].copy_from_slice(&hex_u64(u64::from(self.flags))[14..]);
        HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static(""))
    }
}

/// The 16 lower-case hex digits of `n`, eight at a time: each nibble spread into a
/// byte of its own, then made a digit with no branch (a table lookup per byte cost
/// twice as much, on every access line and proxied request).
pub(crate) fn hex_u64(n: u64) -> [u8; 16] {
    let digits = |half: u64| {
        let mut v = half;
        v = (v | v << 16) & 0x0000_ffff_0000_ffff;
        v = (v | v << 8) & 0x00ff_00ff_00ff_00ff;
        v = (v | v << 4) & 0x0f0f_0f0f_0f0f_0f0f;
        // 1 in each byte whose nibble is 10 or more, which then needs
        // b'a' - b'0' - 10 = 0x27 more.
        let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        (v + 0x3030_3030_3030_3030 + letters * 0x27).to_be_bytes()
    };
    let mut out = [0; 16];
    out[..8].copy_from_slice(&digits(n >> 32));
    out[8..].copy_from_slice(&digits(n & 0xffff_ffff));
    out
}

/// The 32 lower-case hex digits of `n`.
pub(crate) fn hex_u128(n: u128) -> [u8; 32] {
    let mut out = [0; 32];
    // The halves of a u128, by design of the cast.
    #[allow(clippy::cast_possible_truncation)]
    let (high, low) = ((n >> 64) as u64, n as u64);
    out[..16].copy_from_slice(&hex_u64(high));
    out[16..].copy_from_slice(&hex_u64(low));
    out
}

/// The trace id, parent id and flags of a valid `traceparent`: `00-` 32 hex digits `-` 16 hex
/// digits `-` 2 hex digits, lower case, neither id all zeros. A later version is read
/// as version 00 is (its first 55 characters; more only after a `-`), as the
/// specification asks; version `ff` is invalid.
fn parse(value: &HeaderValue) -> Option<(u128, u64, u8)> {
    let text = value.as_bytes();
    if text.len() < 55 || (text.len() > 55 && (text.starts_with(b"00") || text[55] != b'-')) {
        return None;
    }
    let version = field(&text[0..2])?;
    if version == 0xff || text[2] != b'-' || text[35] != b'-' || text[52] != b'-' {
        return None;
    }
    let trace_id = field(&text[3..35])?;
    let parent_id = field(&text[36..52])?;
    let flags = u8::try_from(field(&text[53..55])?).ok()?;
    let parent_id = u64::try_from(parent_id).ok()?;
    (trace_id != 0 && parent_id != 0).then_some((trace_id, parent_id, flags))
}

/// A run of lower-case hex digits as a number.
fn field(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(n << 4 | u128::from(v))
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;

    use super::*;

    /// The trace of a request with `headers`, as the gateway finds it.
    fn of(headers: &HeaderMap, start: bool) -> Option<TraceContext> {
        TraceContext::from_traceparent(headers.get(&TRACEPARENT), start)
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(traceparent: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(&TRACEPARENT, HeaderValue::from_str(traceparent).unwrap());
        headers
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let trace = of(&headers(VALID), true).unwrap();
        assert_eq!(trace.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert!(trace.continued);
        assert_ne!(trace.span_id, 0x00f0_67aa_0ba9_02b7);
        assert_eq!(trace.parent_id, 0x00f0_67aa_0ba9_02b7);
        let sent = trace.traceparent();
        let sent = sent.to_str().unwrap();
        assert!(
            sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{sent}"
        );
        assert!(sent.ends_with("-01"), "{sent}");
        assert_eq!(
            parse(&HeaderValue::from_str(sent).unwrap()),
            Some((trace.trace_id, trace.span_id, 1))
        );
        // A later version with more fields is read as far as version 00 goes.
        let later = format!("cc{}-what-comes-next", &VALID[2..]);
        assert!(of(&headers(&later), false).is_some());
    }

    #[test]
    fn hex_digits_are_those_of_the_formatter() {
        let values = [
            0,
            1,
            9,
            10,
            0xf,
            0x10,
            0x0123_4567_89ab_cdef,
            u64::MAX - 1,
            u64::MAX,
        ];
        for n in values
            .into_iter()
            .chain((0..1000).map(|_| fastrand::u64(..)))
        {
            assert_eq!(hex_u64(n), format!("{n:016x}").as_bytes(), "{n:#x}");
        }
        let wide = 0x0011_2233_4455_6677_8899_aabb_ccdd_eeff_u128;
        assert_eq!(hex_u128(wide), format!("{wide:032x}").as_bytes());
    }

    #[test]
    fn a_malformed_traceparent_is_ignored() {
        let malformed = [
            "",
            "garbage",
            &VALID[..54],
            &format!("{VALID}-extra"),
            &VALID.to_uppercase(),
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        for value in malformed {
            assert_eq!(of(&headers(value), false), None, "{value:?}");
            let started = of(&headers(value), true).unwrap();
            assert!(!started.continued, "{value:?}");
        }
        assert_eq!(of(&HeaderMap::new(), false), None);
    }
}
