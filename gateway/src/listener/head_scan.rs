//! The raw request head's checks, fed as the bytes arrive: framing hyper would accept but
//! a request smuggler relies on, and what a refusal of hyper's own needs to be told in
//! words (how many header lines the head had).

use crate::error::ClientError;

/// Why a head's framing is refused. Stored in the connection's state as its `u8`
/// (0: none), so the service learns it without a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum HeadFault {
    /// `Content-Length` with `Transfer-Encoding`, or `Content-Length` twice.
    AmbiguousLength = 1,
    /// `Transfer-Encoding` on more than one line.
    TransferEncodingTwice,
    /// A `Transfer-Encoding` value that is not a plain list of codings: a tab, an empty
    /// element, a character no coding name has.
    TransferEncodingSyntax,
    /// `chunked` applied more than once.
    ChunkedTwice,
    /// `chunked` missing, or not the last coding: the body's end cannot be found.
    ChunkedNotLast,
    /// A coding other than `chunked` (`gzip, chunked`): not supported.
    UnsupportedCoding,
}

impl HeadFault {
    /// The fault stored as `code` (`HeadFault as u8`), if any.
    pub(crate) fn from_code(code: u8) -> Option<Self> {
        [
            Self::AmbiguousLength,
            Self::TransferEncodingTwice,
            Self::TransferEncodingSyntax,
            Self::ChunkedTwice,
            Self::ChunkedNotLast,
            Self::UnsupportedCoding,
        ]
        .into_iter()
        .find(|fault| *fault as u8 == code)
    }
}

impl From<HeadFault> for ClientError {
    fn from(fault: HeadFault) -> Self {
        let why = match fault {
            HeadFault::AmbiguousLength => return Self::AmbiguousFraming,
            HeadFault::UnsupportedCoding => return Self::UnsupportedTransferCoding,
            HeadFault::TransferEncodingTwice => "is given more than once",
            HeadFault::TransferEncodingSyntax => {
                "must be codings separated by commas (and spaces, not tabs)"
            }
            HeadFault::ChunkedTwice => "applies chunked more than once",
            HeadFault::ChunkedNotLast => "must end with chunked, or the body's end is unknown",
        };
        Self::BadTransferEncoding { why }
    }
}

/// Reads one raw head as it arrives, because hyper drops or merges what it finds
/// ambiguous before the service sees the request (extra `Content-Length`s, whitespace
/// around a coding): `Content-Length` with `Transfer-Encoding` (hyper lets chunked win),
/// `Content-Length` twice (hyper accepts equal values), and `Transfer-Encoding` other than
/// one `chunked`, last, on one line (RFC 9112 §6.1). Heads pipelined behind another
/// request are not scanned; hyper still frames them safely.
#[derive(Debug, Default)]
pub(super) struct HeadScan {
    /// Bytes of the current line so far (without CR).
    line_len: usize,
    /// Still matching `content-length:` / `transfer-encoding:` at this line's start.
    cl: bool,
    te: bool,
    content_lengths: u32,
    transfer_encodings: u32,
    /// The value of the `Transfer-Encoding` line being read.
    te_value: Option<Codings>,
    /// What every `Transfer-Encoding` line said, together.
    codings: Codings,
    /// Lines ended so far, the request line included.
    lines: usize,
    /// The blank line was seen: the rest is body.
    pub(super) done: bool,
}

/// A `Transfer-Encoding` list as it is read: `coding *( OWS "," OWS coding )`, where OWS
/// is spaces only (a tab is refused: some parsers skip it and others do not).
#[derive(Debug, Default, Clone, Copy)]
struct Codings {
    count: u32,
    chunked: u32,
    last_is_chunked: bool,
    /// Bytes of the coding being read; 0 between codings.
    token_len: usize,
    /// The coding being read spells `chunked` so far.
    spells_chunked: bool,
    /// A space ended the coding being read: only `,` or the line's end may follow.
    ended: bool,
    malformed: bool,
}

const CHUNKED: &[u8] = b"chunked";

impl Codings {
    fn feed(&mut self, b: u8) {
        match b {
            b' ' => self.ended = self.token_len > 0,
            b',' => self.finish_coding(),
            _ if is_tchar(b) => {
                self.malformed |= self.ended;
                let i = self.token_len;
                self.spells_chunked = (i == 0 || self.spells_chunked)
                    && CHUNKED.get(i) == Some(&b.to_ascii_lowercase());
                self.token_len += 1;
            }
            _ => self.malformed = true,
        }
    }

    /// A `,` or the line's end: the coding read so far is complete (an empty one is
    /// refused: nginx takes only `chunked` itself, and a lenient list is where parsers
    /// disagree).
    fn finish_coding(&mut self) {
        self.malformed |= self.token_len == 0;
        let chunked = self.spells_chunked && self.token_len == CHUNKED.len();
        self.count += 1;
        self.chunked += u32::from(chunked);
        self.last_is_chunked = chunked;
        self.token_len = 0;
        self.spells_chunked = false;
        self.ended = false;
    }

    /// Adds the codings of another line after these.
    fn then(&mut self, line: Self) {
        self.count += line.count;
        self.chunked += line.chunked;
        self.last_is_chunked = line.last_is_chunked;
        self.malformed |= line.malformed;
    }
}

/// A character of an RFC 9110 token (a coding's name).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl HeadScan {
    const CL: &'static [u8] = b"content-length:";
    const TE: &'static [u8] = b"transfer-encoding:";

    /// Feeds head bytes; at the blank line, says what is wrong with the head's framing,
    /// if anything.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> Option<HeadFault> {
        let mut at = 0;
        while let Some(&b) = bytes.get(at) {
            if self.done {
                break;
            }
            at += 1;
            match b {
                b'\n' => {
                    if let Some(mut line) = self.te_value.take() {
                        line.finish_coding();
                        self.codings.then(line);
                    }
                    if self.line_len == 0 {
                        self.done = true;
                        return self.fault();
                    }
                    self.lines += 1;
                    self.line_len = 0;
                    continue;
                }
                b'\r' => continue,
                _ => {}
            }
            if let Some(value) = &mut self.te_value {
                value.feed(b);
                continue;
            }
            if self.line_len == 0 {
                self.cl = true;
                self.te = true;
            }
            let lower = b.to_ascii_lowercase();
            let i = self.line_len;
            if self.cl && Self::CL.get(i) != Some(&lower) {
                self.cl = false;
            } else if self.cl && i + 1 == Self::CL.len() {
                self.content_lengths += 1;
            }
            if self.te && Self::TE.get(i) != Some(&lower) {
                self.te = false;
            } else if self.te && i + 1 == Self::TE.len() {
                self.transfer_encodings += 1;
                self.te_value = Some(Codings::default());
            }
            self.line_len += 1;
            // Neither name can match any more: skip to the line's end in one search
            // rather than a byte at a time (cookies and user agents are most of a head).
            if !self.cl && !self.te {
                match bytes.get(at..).and_then(|rest| memchr::memchr(b'\n', rest)) {
                    Some(n) => at += n,
                    None => break,
                }
            }
        }
        None
    }

    /// What is wrong with the framing of the head read so far, if anything.
    pub(super) fn fault(&self) -> Option<HeadFault> {
        let codings = &self.codings;
        if self.content_lengths > 1 || (self.content_lengths > 0 && self.transfer_encodings > 0) {
            Some(HeadFault::AmbiguousLength)
        } else if self.transfer_encodings == 0 {
            None
        } else if self.transfer_encodings > 1 {
            Some(HeadFault::TransferEncodingTwice)
        } else if codings.malformed {
            Some(HeadFault::TransferEncodingSyntax)
        } else if codings.chunked > 1 {
            Some(HeadFault::ChunkedTwice)
        } else if !codings.last_is_chunked {
            Some(HeadFault::ChunkedNotLast)
        } else if codings.count > 1 {
            Some(HeadFault::UnsupportedCoding)
        } else {
            None
        }
    }

    /// Header lines ended so far (the request line not counted).
    pub(super) fn header_lines(&self) -> usize {
        self.lines.saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(chunks: &[&str]) -> Option<HeadFault> {
        let mut scan = HeadScan::default();
        chunks
            .iter()
            .fold(None, |found, c| found.or(scan.feed(c.as_bytes())))
    }

    #[test]
    fn head_scan_finds_the_same_split_anywhere() {
        let cookie = format!("Cookie: {}\r\n", "k=v; ".repeat(60));
        let heads = [
            (
                format!(
                    "POST / HTTP/1.1\r\n{cookie}Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
                ),
                Some(HeadFault::AmbiguousLength),
            ),
            (
                format!(
                    "POST / HTTP/1.1\r\nUser-Agent: x\r\n{cookie}content-length: 2\r\nCONTENT-LENGTH: 2\r\n\r\n"
                ),
                Some(HeadFault::AmbiguousLength),
            ),
            (
                format!(
                    "POST / HTTP/1.1\r\n{cookie}Content-Length: 3\r\nContent-Type: a/b\r\n\r\nContent-Length: 1\r\n"
                ),
                None,
            ),
            (
                format!(
                    "GET / HTTP/1.1\r\nX-Transfer-Encoding: chunked\r\n{cookie}Content-Length: 0\r\n\r\n"
                ),
                None,
            ),
            (
                format!("POST / HTTP/1.1\r\n{cookie}Transfer-Encoding: gzip, CHUNKED\r\n\r\n"),
                Some(HeadFault::UnsupportedCoding),
            ),
            (
                format!("POST / HTTP/1.1\r\nTransfer-Encoding:  chunked \r\n{cookie}\r\n"),
                None,
            ),
        ];
        for (head, expected) in &heads {
            for split in 0..=head.len() {
                let (a, b) = head.as_bytes().split_at(split);
                let mut scan = HeadScan::default();
                let first = scan.feed(a);
                let found = first.or(scan.feed(b));
                assert_eq!(found, *expected, "split at {split} of {head:?}");
            }
        }
    }

    #[test]
    fn head_scan_flags_double_lengths_and_length_with_chunked() {
        let ambiguous = Some(HeadFault::AmbiguousLength);
        assert_eq!(
            fault(&["POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"]),
            ambiguous
        );
        assert_eq!(
            fault(&[
                "POST / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\n",
                "content-len",
                "gth: 3\r\n\r\n"
            ]),
            ambiguous
        );
        assert_eq!(
            fault(&["POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"]),
            ambiguous
        );
        assert_eq!(
            fault(&["POST / HTTP/1.1\r\nContent-Length: 3\r\nX-Content-Length: 3\r\n\r\n"]),
            None
        );
        assert_eq!(
            fault(&["POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"]),
            None
        );
        // Body bytes after the blank line are not headers.
        assert_eq!(
            fault(&["POST / HTTP/1.1\r\nContent-Length: 19\r\n\r\nContent-Length: 1\r\n"]),
            None
        );
    }

    /// Mutation: accept a tab as whitespace, or count `chunked, chunked` as one, and this
    /// fails.
    #[test]
    fn transfer_encoding_is_one_chunked_last_on_one_line() {
        let te = |value: &str| {
            fault(&[&format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding:{value}\r\n\r\n"
            )])
        };
        assert_eq!(te(" chunked"), None);
        assert_eq!(te("chunked"), None);
        assert_eq!(te(" Chunked  "), None);
        assert_eq!(te(" gzip, chunked"), Some(HeadFault::UnsupportedCoding));
        assert_eq!(te(" identity ,chunked"), Some(HeadFault::UnsupportedCoding));
        assert_eq!(te(" chunked, chunked"), Some(HeadFault::ChunkedTwice));
        assert_eq!(te(" chunked, gzip"), Some(HeadFault::ChunkedNotLast));
        assert_eq!(te(" gzip"), Some(HeadFault::ChunkedNotLast));
        assert_eq!(te(" chunkedx"), Some(HeadFault::ChunkedNotLast));
        assert_eq!(te(" chunk"), Some(HeadFault::ChunkedNotLast));
        assert_eq!(te("\tchunked"), Some(HeadFault::TransferEncodingSyntax));
        assert_eq!(te(" ,chunked"), Some(HeadFault::TransferEncodingSyntax));
        assert_eq!(te(" chunked,"), Some(HeadFault::TransferEncodingSyntax));
        assert_eq!(te(""), Some(HeadFault::TransferEncodingSyntax));
        assert_eq!(te(" chun ked"), Some(HeadFault::TransferEncodingSyntax));
        assert_eq!(te(" \"chunked\""), Some(HeadFault::TransferEncodingSyntax));
        assert_eq!(
            fault(&[
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
            ]),
            Some(HeadFault::TransferEncodingTwice)
        );
        for fault in [
            HeadFault::AmbiguousLength,
            HeadFault::UnsupportedCoding,
            HeadFault::ChunkedNotLast,
        ] {
            assert_eq!(HeadFault::from_code(fault as u8), Some(fault));
        }
        assert_eq!(HeadFault::from_code(0), None);
    }

    #[test]
    fn header_lines_are_counted_without_the_request_line() {
        let mut scan = HeadScan::default();
        assert_eq!(scan.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n"), None);
        assert_eq!(scan.header_lines(), 2);
    }
}
