//! The raw request head's check for ambiguous framing, fed as the bytes arrive.

/// Finds framing that hyper accepts but a request smuggler relies on: `Content-Length`
/// together with `Transfer-Encoding` (hyper lets chunked win and closes afterwards), and
/// `Content-Length` given twice (hyper accepts equal values). It reads the raw head as it
/// arrives, because hyper drops the extra headers before the service sees the request.
/// Heads pipelined behind another request are not scanned; hyper still frames them
/// safely.
#[derive(Debug, Default)]
pub(super) struct HeadScan {
    /// Bytes of the current line so far (without CR).
    line_len: usize,
    /// Still matching `content-length:` / `transfer-encoding:` at this line's start.
    cl: bool,
    te: bool,
    content_lengths: u32,
    transfer_encoding: bool,
    /// The blank line was seen: the rest is body.
    pub(super) done: bool,
}

impl HeadScan {
    const CL: &'static [u8] = b"content-length:";
    const TE: &'static [u8] = b"transfer-encoding:";

    /// Feeds head bytes; true once the head is known to be ambiguous.
    pub(super) fn feed(&mut self, bytes: &[u8]) -> bool {
        let mut at = 0;
        while let Some(&b) = bytes.get(at) {
            if self.done {
                break;
            }
            at += 1;
            match b {
                b'\n' => {
                    if self.line_len == 0 {
                        self.done = true;
                    }
                    self.line_len = 0;
                    continue;
                }
                b'\r' => continue,
                _ => {}
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
                self.transfer_encoding = true;
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
        self.content_lengths > 1 || (self.content_lengths > 0 && self.transfer_encoding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ambiguous(chunks: &[&str]) -> bool {
        let mut scan = HeadScan::default();
        chunks.iter().any(|c| scan.feed(c.as_bytes()))
    }

    #[test]
    fn head_scan_finds_the_same_split_anywhere() {
        let cookie = format!("Cookie: {}\r\n", "k=v; ".repeat(60));
        let heads = [
            (
                format!(
                    "POST / HTTP/1.1\r\n{cookie}Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
                ),
                true,
            ),
            (
                format!(
                    "POST / HTTP/1.1\r\nUser-Agent: x\r\n{cookie}content-length: 2\r\nCONTENT-LENGTH: 2\r\n\r\n"
                ),
                true,
            ),
            (
                format!(
                    "POST / HTTP/1.1\r\n{cookie}Content-Length: 3\r\nContent-Type: a/b\r\n\r\nContent-Length: 1\r\n"
                ),
                false,
            ),
            (
                format!(
                    "GET / HTTP/1.1\r\nX-Transfer-Encoding: chunked\r\n{cookie}Content-Length: 0\r\n\r\n"
                ),
                false,
            ),
        ];
        for (head, expected) in &heads {
            for split in 0..=head.len() {
                let (a, b) = head.as_bytes().split_at(split);
                let mut scan = HeadScan::default();
                let found = scan.feed(a) | scan.feed(b);
                assert_eq!(found, *expected, "split at {split} of {head:?}");
            }
        }
    }

    #[test]
    fn head_scan_flags_double_lengths_and_length_with_chunked() {
        assert!(ambiguous(&[
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        assert!(ambiguous(&[
            "POST / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\n",
            "content-len",
            "gth: 3\r\n\r\n"
        ]));
        assert!(ambiguous(&[
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"
        ]));
        assert!(!ambiguous(&[
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nX-Content-Length: 3\r\n\r\n"
        ]));
        assert!(!ambiguous(&[
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        // Body bytes after the blank line are not headers.
        assert!(!ambiguous(&[
            "POST / HTTP/1.1\r\nContent-Length: 19\r\n\r\nContent-Length: 1\r\n"
        ]));
    }
}
