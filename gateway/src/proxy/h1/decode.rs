//! The response body, decoded by its framing from the connection's read buffer: data is
//! split off that buffer (no copy), so the buffer's memory is reused once the client's
//! side has sent it on.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::head::Framing;

/// The longest chunk-size line taken, extensions included.
const MAX_CHUNK_LINE: usize = 4096;

/// The most chunk-extension bytes taken over a whole body (hyper's limit too):
/// extensions carry nothing the proxy uses, and a stream of them is only work.
const MAX_EXTENSIONS: usize = 16 * 1024;

/// The largest trailer section taken, and its most fields (hyper's limits).
const MAX_TRAILERS: usize = 16 * 1024;
const MAX_TRAILER_FIELDS: usize = 100;

/// Why a response body is refused: the connection is closed, and the client's response
/// is cut (its head was already sent).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A chunk-size line that is not hex digits, optional blanks and extensions, CRLF;
    /// or a size past 64 bits.
    #[error("invalid chunk size line")]
    ChunkSize,
    /// A chunk's data not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    ChunkEnd,
    /// A chunk-size line, or all the body's chunk extensions, over their limit.
    #[error("chunk size line or extensions over their limit")]
    ChunkLineTooLong,
    /// A trailer section that is malformed or over its limits.
    #[error("invalid or oversized trailer section")]
    Trailers,
    /// The connection ended before the body did.
    #[error("the connection closed before the end of the response body")]
    Incomplete,
}

/// What [`Decoder::decode`] found.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// The chunked body's trailer fields; the body ends with them.
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// Read more into the buffer (or, at the end of the connection, call
    /// [`Decoder::decode_eof`]).
    NeedMore,
}

/// The body decoder of one response.
#[derive(Debug)]
pub(crate) struct Decoder {
    state: State,
    /// The body ends with the connection.
    close_delimited: bool,
    /// Chunk-extension bytes seen so far.
    extensions: usize,
    /// Bytes at the buffer's start already searched for the end of the line or trailer
    /// section being read: a line trickling in is not searched again from its start.
    scanned: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Bytes left of a chunk's data.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkDataEnd,
    /// After the last chunk: the trailer section.
    Trailers,
    /// Up to the end of the connection.
    Close,
    /// Complete.
    Done,
}

impl Decoder {
    /// Decodes the whole body from `buf` and then `pieces`, the connection's reads, whose
    /// end is the end of the connection: the body and its trailers, if any. What follows
    /// the body stays in `buf` and `pieces`.
    pub(crate) fn read_to_end<'a>(
        &mut self,
        buf: &mut BytesMut,
        pieces: &mut impl Iterator<Item = &'a [u8]>,
    ) -> Result<(BytesMut, Option<HeaderMap>), BodyError> {
        let mut body = BytesMut::new();
        let mut trailers = None;
        let mut eof = false;
        loop {
            let decoded = if eof {
                self.decode_eof(buf)?
            } else {
                self.decode(buf)?
            };
            match decoded {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::Trailers(fields) => trailers = Some(fields),
                Decoded::End => return Ok((body, trailers)),
                Decoded::NeedMore => match pieces.next() {
                    Some(piece) => buf.extend_from_slice(piece),
                    None => eof = true,
                },
            }
        }
    }

    pub(crate) fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Self {
            state,
            close_delimited: state == State::Close,
            extensions: 0,
            scanned: 0,
        }
    }

    /// Whether the body is complete.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the body's end is known from its framing, not from the connection's.
    pub(crate) fn delimited(&self) -> bool {
        !self.close_delimited
    }

    /// The exact number of body bytes left, when the framing says.
    pub(crate) fn left(&self) -> Option<u64> {
        match self.state {
            State::Done => Some(0),
            State::Length(left) => Some(left),
            _ => None,
        }
    }

    /// Decodes what `buf` holds next, taking it out of `buf`.
    ///
    /// # Errors
    /// The bytes break the body's framing.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(left) | State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()));
                    let left = left - n as u64;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkDataEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkDataEnd => {
                    let Some(end) = buf.get(..2) else {
                        return Ok(Decoded::NeedMore);
                    };
                    if end != b"\r\n" {
                        return Err(BodyError::ChunkEnd);
                    }
                    let _ = buf.split_to(2);
                    self.state = State::ChunkSize;
                }
                State::ChunkSize => {
                    let Some(size) = self.chunk_size(buf)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::Trailers => return self.trailers(buf),
            }
        }
    }

    /// Decodes what is left in `buf` once the connection has ended.
    ///
    /// # Errors
    /// The body's framing says it is not complete, or the bytes break it.
    pub(crate) fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        match self.decode(buf)? {
            Decoded::NeedMore if self.state == State::Close => {
                self.state = State::Done;
                Ok(Decoded::End)
            }
            Decoded::NeedMore => Err(BodyError::Incomplete),
            decoded => Ok(decoded),
        }
    }

    /// Reads a chunk-size line, `1*HEXDIG *(SP / HTAB) [";" extensions] CRLF`; `None`:
    /// not all of it is here yet.
    fn chunk_size(&mut self, buf: &mut BytesMut) -> Result<Option<u64>, BodyError> {
        let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
        let from = self.scanned.min(window.len());
        let Some(lf) = memchr::memchr(b'\n', &window[from..]).map(|at| from + at) else {
            if window.len() == MAX_CHUNK_LINE {
                return Err(BodyError::ChunkLineTooLong);
            }
            self.scanned = window.len();
            return Ok(None);
        };
        self.scanned = 0;
        let line = window
            .get(..lf)
            .and_then(|line| line.strip_suffix(b"\r"))
            .ok_or(BodyError::ChunkSize)?;
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let (hex, rest) = line.split_at(digits);
        if hex.is_empty() {
            return Err(BodyError::ChunkSize);
        }
        let mut size: u64 = 0;
        for &digit in hex {
            let value = match digit {
                b'0'..=b'9' => digit - b'0',
                b'a'..=b'f' => digit - b'a' + 10,
                _ => digit - b'A' + 10,
            };
            size = size
                .checked_mul(16)
                .and_then(|size| size.checked_add(u64::from(value)))
                .ok_or(BodyError::ChunkSize)?;
        }
        let blanks = rest
            .iter()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
        let rest = rest.get(blanks..).unwrap_or_default();
        if let Some(extensions) = rest.strip_prefix(b";") {
            // A CR inside an extension is where parsers disagree on the line's end.
            if extensions.contains(&b'\r') {
                return Err(BodyError::ChunkSize);
            }
            self.extensions += extensions.len();
            if self.extensions > MAX_EXTENSIONS {
                return Err(BodyError::ChunkLineTooLong);
            }
        } else if !rest.is_empty() {
            return Err(BodyError::ChunkSize);
        }
        let _ = buf.split_to(lf + 1);
        Ok(Some(size))
    }

    /// Reads the trailer section after the last chunk: passed on as trailer fields when
    /// there are any, as hyper's client does.
    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        if buf.starts_with(b"\r\n") {
            let _ = buf.split_to(2);
            self.state = State::Done;
            return Ok(Decoded::End);
        }
        if buf.len() < 2 {
            return Ok(Decoded::NeedMore);
        }
        let window = &buf[..buf.len().min(MAX_TRAILERS)];
        // The end may straddle what was searched before.
        let from = self.scanned.saturating_sub(3).min(window.len());
        let Some(end) = memchr::memmem::find(&window[from..], b"\r\n\r\n").map(|at| from + at)
        else {
            if window.len() == MAX_TRAILERS {
                return Err(BodyError::Trailers);
            }
            self.scanned = window.len();
            return Ok(Decoded::NeedMore);
        };
        self.scanned = 0;
        let section = buf.split_to(end + 4);
        let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILER_FIELDS];
        let Ok(httparse::Status::Complete((_, fields))) =
            httparse::parse_headers(&section, &mut fields)
        else {
            return Err(BodyError::Trailers);
        };
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for field in fields.iter() {
            let name =
                HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| BodyError::Trailers)?;
            let value = HeaderValue::from_bytes(field.value).map_err(|_| BodyError::Trailers)?;
            trailers.append(name, value);
        }
        self.state = State::Done;
        Ok(Decoded::Trailers(trailers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `raw` fed in pieces of `step` bytes, then the end of the connection:
    /// the body, and the trailers if any.
    fn decode(
        framing: Framing,
        raw: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<HeaderMap>), BodyError> {
        let (body, trailers) =
            Decoder::new(framing).read_to_end(&mut BytesMut::new(), &mut raw.chunks(step))?;
        Ok((body.to_vec(), trailers))
    }

    fn chunked(raw: &str) -> Result<Vec<u8>, BodyError> {
        // Every split of the input gives the same answer.
        let whole = decode(Framing::Chunked, raw.as_bytes(), raw.len().max(1)).map(|b| b.0);
        for step in 1..4 {
            assert_eq!(
                decode(Framing::Chunked, raw.as_bytes(), step).map(|b| b.0),
                whole,
                "{raw:?} by {step}"
            );
        }
        whole
    }

    #[test]
    fn a_length_body_ends_at_its_length_and_not_before() {
        assert_eq!(decode(Framing::Length(5), b"hello", 2).unwrap().0, b"hello");
        assert_eq!(
            decode(Framing::Length(5), b"hel", 2),
            Err(BodyError::Incomplete)
        );
        let mut buf = BytesMut::from(&b"hellothere"[..]);
        let mut decoder = Decoder::new(Framing::Length(5));
        assert!(matches!(decoder.decode(&mut buf), Ok(Decoded::Data(d)) if d == "hello"));
        assert!(matches!(decoder.decode(&mut buf), Ok(Decoded::End)));
        assert_eq!(buf, "there", "what follows is left in the buffer");
    }

    #[test]
    fn a_close_delimited_body_ends_with_the_connection() {
        assert_eq!(
            decode(Framing::Close, b"all of it", 4).unwrap().0,
            b"all of it"
        );
        let mut decoder = Decoder::new(Framing::Close);
        let _ = decoder.decode_eof(&mut BytesMut::new());
        assert!(!decoder.delimited(), "not even once ended");
    }

    #[test]
    fn chunked_bodies_are_decoded_with_extensions_and_blanks() {
        assert_eq!(
            chunked("5\r\nhello\r\n6 ;ext=1\r\n world\r\n0\r\n\r\n").unwrap(),
            b"hello world"
        );
        assert_eq!(
            chunked("00A\r\n0123456789\r\n0\r\n\r\n").unwrap(),
            b"0123456789"
        );
    }

    #[test]
    fn trailers_are_passed_on() {
        let (body, trailers) =
            decode(Framing::Chunked, b"2\r\nok\r\n0\r\nx-sum: 1\r\n\r\n", 3).unwrap();
        assert_eq!(body, b"ok");
        assert_eq!(trailers.unwrap()["x-sum"], "1");
    }

    #[test]
    fn invalid_chunk_sizes_are_refused() {
        for raw in [
            "x\r\n",
            "\r\n",
            "-1\r\n",
            "5 5\r\nhello\r\n",
            "5\nhello",
            "5;a\rb\r\nhello",
            "1ffffffffffffffff\r\n",
            "+5\r\n",
        ] {
            assert_eq!(chunked(raw), Err(BodyError::ChunkSize), "{raw:?}");
        }
    }

    #[test]
    fn chunk_data_must_end_in_crlf() {
        assert_eq!(chunked("2\r\nokxx0\r\n\r\n"), Err(BodyError::ChunkEnd));
        assert_eq!(chunked("2\r\nok\n0\r\n\r\n"), Err(BodyError::ChunkEnd));
    }

    #[test]
    fn over_long_chunk_lines_and_extensions_are_refused() {
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(chunked(&long), Err(BodyError::ChunkLineTooLong));
        let chunk = format!("1;{}\r\na\r\n", "e".repeat(MAX_CHUNK_LINE / 2));
        let many = chunk.repeat(MAX_EXTENSIONS / (MAX_CHUNK_LINE / 2) + 1);
        assert_eq!(chunked(&many), Err(BodyError::ChunkLineTooLong));
    }

    #[test]
    fn oversized_or_malformed_trailers_are_refused() {
        let big = format!("0\r\nx: {}\r\n\r\n", "v".repeat(MAX_TRAILERS));
        assert_eq!(chunked(&big), Err(BodyError::Trailers));
        assert_eq!(chunked("0\r\nno colon\r\n\r\n"), Err(BodyError::Trailers));
    }

    #[test]
    fn a_chunked_body_cut_short_is_incomplete() {
        for raw in [
            "5\r\nhel",
            "5\r\nhello\r\n",
            "0\r\n",
            "5\r\nhello\r\n0\r\nx: 1\r\n",
        ] {
            assert_eq!(chunked(raw), Err(BodyError::Incomplete), "{raw:?}");
        }
    }
}
