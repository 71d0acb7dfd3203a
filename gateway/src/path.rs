//! Request paths normalised before routing, so that a route, its `rewrite_prefix` and
//! the upstream behind it all read the same path (RFC 3986 §6.2.2):
//!
//! 1. percent-encoded unreserved characters are decoded (`%2e` is a dot, `%7E` a tilde,
//!    `%70` a `p`): they mean the same encoded or not, and an upstream that decodes them
//!    would otherwise see a path the router did not. Other escapes stay as they are,
//!    their hex digits in upper case;
//! 2. dot segments are removed (§5.2.4): `/a/./b/../c` is `/a/c`.
//!
//! What cannot be normalised safely is refused: a `..` that climbs above the root (as
//! nginx does), an encoded slash or backslash (`%2F`, `%5C`: one segment to the router,
//! a separator to many upstreams; Envoy's `REJECT_REQUEST` for escaped slashes), and a
//! `%` not followed by two hex digits. Slashes are not merged: `//` is a segment some
//! APIs use. The query is never touched.

use std::borrow::Cow;

use http::Uri;
use http::uri::PathAndQuery;
use percent_encoding::percent_decode;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UnsafePath {
    /// A `..` would climb above the root.
    #[error("`..` climbs above the root")]
    AboveRoot,
    /// `%2F` or `%5C`.
    #[error("an encoded slash or backslash (%2F, %5C)")]
    EncodedSeparator,
    /// A `%` without two hex digits after it.
    #[error("a % is not followed by two hex digits")]
    BadEscape,
}

/// The request URI with its path normalised; `None` when it already was.
///
/// # Errors
/// The path cannot be normalised safely.
pub fn normalise_uri(uri: &Uri) -> Result<Option<Uri>, UnsafePath> {
    let path = uri.path();
    let Cow::Owned(normal) = normalise(path)? else {
        return Ok(None);
    };
    let with_query = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    // Decoded unreserved characters and removed segments leave a valid path.
    parts.path_and_query =
        Some(PathAndQuery::try_from(with_query).map_err(|_| UnsafePath::BadEscape)?);
    Uri::from_parts(parts)
        .map(Some)
        .map_err(|_| UnsafePath::BadEscape)
}

/// `path` normalised, borrowed when it already was (the common case costs one scan and
/// no copy).
///
/// # Errors
/// The path cannot be normalised safely.
pub fn normalise(path: &str) -> Result<Cow<'_, str>, UnsafePath> {
    // `*` (OPTIONS) and the empty path of CONNECT have no segments.
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = if memchr::memchr(b'%', path.as_bytes()).is_some() {
        Cow::Owned(decode_unreserved(path)?)
    } else {
        Cow::Borrowed(path)
    };
    if !has_dot_segment(&decoded) {
        return Ok(if decoded == path {
            Cow::Borrowed(path)
        } else {
            decoded
        });
    }
    remove_dot_segments(&decoded).map(Cow::Owned)
}

/// Whether a segment of the absolute `path` is `.` or `..`: a look at each dot, not at
/// each segment (most paths have no dot at all).
fn has_dot_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    memchr::memchr_iter(b'.', bytes).any(|at| {
        at > 0
            && bytes[at - 1] == b'/'
            && matches!(
                &bytes[at + 1..],
                [] | [b'/', ..] | [b'.'] | [b'.', b'/', ..]
            )
    })
}

/// Decodes the escapes of unreserved characters (ALPHA, DIGIT, `-._~`); refuses an
/// encoded separator and a malformed escape.
fn decode_unreserved(path: &str) -> Result<String, UnsafePath> {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest
            .get(at..at + 3)
            .filter(|e| e.bytes().skip(1).all(|b| b.is_ascii_hexdigit()))
            .ok_or(UnsafePath::BadEscape)?;
        let byte = percent_decode(escape.as_bytes())
            .next()
            .ok_or(UnsafePath::BadEscape)?;
        match byte {
            b'/' | b'\\' => return Err(UnsafePath::EncodedSeparator),
            b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                out.push(char::from(b));
            }
            _ => out.push_str(&escape.to_ascii_uppercase()),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// RFC 3986 §5.2.4 over the segments of an absolute path, except that a `..` with no
/// segment left to remove is refused rather than dropped.
fn remove_dot_segments(path: &str) -> Result<String, UnsafePath> {
    let segments: Vec<&str> = path[1..].split('/').collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let dots = match *segment {
            "." => true,
            ".." => {
                out.pop().ok_or(UnsafePath::AboveRoot)?;
                true
            }
            kept => {
                out.push(kept);
                false
            }
        };
        // `/a/b/..` is `/a/`: a final dot segment leaves its slash.
        if dots && i + 1 == segments.len() {
            out.push("");
        }
    }
    Ok(format!("/{}", out.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal(path: &str) -> Result<String, UnsafePath> {
        normalise(path).map(Cow::into_owned)
    }

    #[test]
    fn dot_segments_are_removed_as_rfc_3986_says() {
        for (path, expected) in [
            ("/", "/"),
            ("/a/b/c", "/a/b/c"),
            ("/a/./b", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("/a//../b", "/a/b"),
            ("/a/.b/..c/", "/a/.b/..c/"),
            ("/.well-known/x", "/.well-known/x"),
            ("/a./b../.../c.d", "/a./b../.../c.d"),
            ("/a/b/..", "/a/"),
        ] {
            assert_eq!(normal(path).as_deref(), Ok(expected), "{path}");
        }
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_kept_in_upper_case() {
        for (path, expected) in [
            ("/%2e%2e/x", Err(UnsafePath::AboveRoot)),
            ("/a/%2E%2e/x", Ok("/x")),
            ("/a/%2e/x", Ok("/a/x")),
            ("/%7Euser/%41-%5f", Ok("/~user/A-_")),
            ("/a%3bb/%c3%a9", Ok("/a%3Bb/%C3%A9")),
            ("/a%20b", Ok("/a%20b")),
        ] {
            assert_eq!(
                normal(path).as_deref(),
                expected.map(str::to_owned).as_deref(),
                "{path}"
            );
        }
    }

    #[test]
    fn what_cannot_be_normalised_safely_is_refused() {
        for (path, why) in [
            ("/..", UnsafePath::AboveRoot),
            ("/a/../..", UnsafePath::AboveRoot),
            ("/a/../../b", UnsafePath::AboveRoot),
            ("/a%2fb", UnsafePath::EncodedSeparator),
            ("/a%2F..", UnsafePath::EncodedSeparator),
            ("/a%5cb", UnsafePath::EncodedSeparator),
            ("/a%5C", UnsafePath::EncodedSeparator),
            ("/a%", UnsafePath::BadEscape),
            ("/a%2", UnsafePath::BadEscape),
            ("/a%zz", UnsafePath::BadEscape),
        ] {
            assert_eq!(normal(path), Err(why), "{path}");
        }
    }

    #[test]
    fn a_normal_path_is_borrowed_and_the_query_is_kept_whole() {
        assert!(matches!(normalise("/items/7"), Ok(Cow::Borrowed(_))));
        // Dots that open no `.` or `..` segment leave it as it is (mutation: a dot
        // counts without the slash before it, and the path is rebuilt).
        assert!(matches!(normalise("/a./b../.../c.d"), Ok(Cow::Borrowed(_))));
        assert!(matches!(normalise("*"), Ok(Cow::Borrowed("*"))));
        let uri: Uri = "/a/./b?x=/../y&z=%2f".parse().unwrap();
        let normal = normalise_uri(&uri).unwrap().unwrap();
        assert_eq!(normal, "/a/b?x=/../y&z=%2f");
        let absolute: Uri = "http://h.example/a/../b".parse().unwrap();
        assert_eq!(
            normalise_uri(&absolute).unwrap().unwrap(),
            "http://h.example/b"
        );
        assert_eq!(normalise_uri(&"/plain?q".parse().unwrap()), Ok(None));
    }
}
