//! HTTP/1.x message framing for the balancer's HTTP mode: request and response heads tokenized
//! by `httparse`, the framing rules of RFC 9112 §6 applied strictly, hop-by-hop headers dropped
//! on the way through, and a scanner that checks the framing of a chunked body relayed verbatim.
//!
//! A proxy is where request smuggling lives: two parties that frame one message differently let
//! an attacker hide a request inside another. So a request with both `Content-Length` and
//! `Transfer-Encoding`, differing `Content-Length`s, a transfer coding other than a final
//! `chunked`, a malformed chunk size or extension, obsolete line folding or whitespace before a
//! header's colon is refused (400, then close), and a response framed ambiguously is a 502.

use std::time::Duration;

/// Most header fields a head may carry.
pub const MAX_HEADERS: usize = 100;

/// How a message's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked: up to and including the last chunk and the trailers.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// A request head, read and rewritten for the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Bytes the head took, blank line included.
    pub head_len: usize,
    /// `HEAD`: the response has no body whatever its headers say.
    pub is_head: bool,
    /// `GET` or `HEAD`: safe to send again on a fresh connection when a pooled one turned out
    /// to be closed before any response byte came.
    pub retryable: bool,
    /// The client asked to keep its connection (HTTP/1.1 by default, or `Connection:
    /// keep-alive` on HTTP/1.0).
    pub keep_alive: bool,
    /// The client speaks HTTP/1.0 (a kept connection must say `Connection: keep-alive`).
    pub http10: bool,
    /// How the request body ends.
    pub framing: Framing,
    /// `Expect: 100-continue`: the balancer answers 100 itself before reading the body.
    pub expect_continue: bool,
    /// `Upgrade` was asked for (not spoken in this mode).
    pub upgrade: bool,
}

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// Malformed or ambiguously framed: 400, then close.
    BadRequest,
    /// Over the size bound: 431, then close.
    TooLarge,
    /// An `Expect` other than `100-continue`: 417.
    ExpectationFailed,
}

/// Parses a request head at the start of `buf` and, once complete, writes the head to send to
/// the backend into `out` (cleared first): the request line in HTTP/1.1, the header fields but
/// the hop-by-hop ones (`Connection`, the fields it names, `Keep-Alive`, `Proxy-Connection`,
/// `TE`, `Upgrade`, `Expect`), and a `Host` for an HTTP/1.0 request without one. `Ok(None)`:
/// the head is not complete yet (and `buf` is under `max_head`).
pub fn parse_request(
    buf: &[u8],
    max_head: usize,
    default_host: &str,
    out: &mut Vec<u8>,
) -> Result<Option<Request>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let window = &buf[..buf.len().min(max_head)];
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= max_head => {
            return Err(RequestError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooLarge),
        Err(_) => return Err(RequestError::BadRequest),
    };
    let method = req.method.ok_or(RequestError::BadRequest)?;
    let path = req.path.ok_or(RequestError::BadRequest)?;
    let minor = req.version.ok_or(RequestError::BadRequest)?;
    let fields = Fields::read(req.headers).map_err(|_| RequestError::BadRequest)?;
    if minor == 1 && fields.host == 0 || fields.host > 1 {
        // RFC 9112 §3.2: exactly one Host in HTTP/1.1.
        return Err(RequestError::BadRequest);
    }
    let framing = match (fields.transfer_encoding, fields.content_length) {
        (Some(_), Some(_)) => return Err(RequestError::BadRequest),
        // Transfer codings arrived with HTTP/1.1; a 1.0 request carrying one is a smuggling
        // shape (RFC 9112 §6.1).
        (Some(_), None) if minor == 0 => return Err(RequestError::BadRequest),
        (Some(Coding::Chunked), None) => Framing::Chunked,
        (Some(Coding::Other), None) => return Err(RequestError::BadRequest),
        (None, Some(0)) | (None, None) => Framing::Empty,
        (None, Some(n)) => Framing::Length(n),
    };
    let expect_continue = match fields.expect {
        Expect::None => false,
        Expect::Continue => true,
        Expect::Other => return Err(RequestError::ExpectationFailed),
    };
    let keep_alive = if minor == 1 {
        !fields.connection_close
    } else {
        fields.connection_keep_alive && !fields.connection_close
    };
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut written = 0;
    for h in req.headers.iter() {
        if !fields.is_hop_by_hop(h.name) {
            write_field(out, h.name.as_bytes(), h.value);
            written += 1;
        }
    }
    if fields.host == 0 {
        write_field(out, b"Host", default_host.as_bytes());
        written += 1;
    }
    out.extend_from_slice(b"\r\n");
    // The rewrite can grow a head (a `Host` added, `: ` and CRLF for `:` and LF); what goes to
    // the backend keeps within the same bounds the balancer holds its clients to.
    if written > MAX_HEADERS || out.len() > max_head {
        return Err(RequestError::TooLarge);
    }
    Ok(Some(Request {
        head_len,
        is_head: method == "HEAD",
        retryable: method == "GET" || method == "HEAD",
        keep_alive,
        http10: minor == 0,
        framing,
        expect_continue,
        upgrade: fields.upgrade,
    }))
}

/// A response head, read and rewritten for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Bytes the head took, blank line included.
    pub head_len: usize,
    /// The status code.
    pub status: u16,
    /// How the response body ends.
    pub framing: Framing,
    /// The backend will keep the connection (HTTP/1.1 without `Connection: close`, or 1.0 with
    /// `keep-alive`), so it can go back to the pool once the body is done.
    pub reusable: bool,
    /// `Keep-Alive: timeout=N`: how long the backend keeps an idle connection.
    pub idle_timeout: Option<Duration>,
}

/// Why a response head was refused (a 502 for the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseError {
    /// Malformed, over the bound, or framed ambiguously.
    Bad,
}

/// How the balancer closes the client after a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientConnection {
    /// Closed after this response: `Connection: close`.
    Close,
    /// Kept, HTTP/1.1: nothing to say.
    Keep,
    /// Kept, HTTP/1.0: `Connection: keep-alive`.
    KeepHttp10,
}

/// Parses a response head at the start of `buf` for a request that was `HEAD` or not
/// (`is_head`) and, once complete, writes the head for the client into `out` (cleared first):
/// the status line in HTTP/1.1, the header fields but the hop-by-hop ones, and the balancer's
/// own `Connection` field (`client`). `Ok(None)`: not complete yet.
pub fn parse_response(
    buf: &[u8],
    max_head: usize,
    is_head: bool,
    client: ClientConnection,
    out: &mut Vec<u8>,
) -> Result<Option<Response>, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let window = &buf[..buf.len().min(max_head)];
    let head_len = match resp.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Ok(None),
        _ => return Err(ResponseError::Bad),
    };
    let status = resp.code.ok_or(ResponseError::Bad)?;
    // Three digits, the first 1 to 9 (httparse takes "020"): anything else is no status.
    if status < 100 {
        return Err(ResponseError::Bad);
    }
    let minor = resp.version.ok_or(ResponseError::Bad)?;
    let fields = Fields::read(resp.headers).map_err(|_| ResponseError::Bad)?;
    let no_body = is_head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = match (fields.transfer_encoding, fields.content_length) {
        // Both, or differing lengths (refused while reading them): ambiguous.
        (Some(_), Some(_)) => return Err(ResponseError::Bad),
        _ if no_body => Framing::Empty,
        (Some(Coding::Chunked), None) => Framing::Chunked,
        (Some(Coding::Other), None) => Framing::UntilClose,
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::UntilClose,
    };
    let reusable = framing != Framing::UntilClose
        && if minor == 1 {
            !fields.connection_close
        } else {
            fields.connection_keep_alive && !fields.connection_close
        };
    out.clear();
    // The status line as it came, only the version made 1.1: the code and the reason's bytes
    // (which may be obs-text) pass unchanged.
    // httparse skips empty lines before the status line (RFC 9112 §2.2 lets a recipient), so the
    // line is found after them; it starts with the 8 bytes `HTTP/1.x` httparse checked.
    let start = window
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .ok_or(ResponseError::Bad)?;
    let rest = &window[start..];
    let line_end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(ResponseError::Bad)?;
    let line = rest[..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&rest[..line_end]);
    let after_version = line.get(8..).ok_or(ResponseError::Bad)?;
    out.extend_from_slice(b"HTTP/1.1");
    out.extend_from_slice(after_version);
    out.extend_from_slice(b"\r\n");
    let mut written = 0;
    for h in resp.headers.iter() {
        if !fields.is_hop_by_hop(h.name) {
            write_field(out, h.name.as_bytes(), h.value);
            written += 1;
        }
    }
    let connection: &[u8] = match client {
        ClientConnection::Close => b"close",
        ClientConnection::KeepHttp10 => b"keep-alive",
        ClientConnection::Keep => b"",
    };
    if !connection.is_empty() {
        write_field(out, b"Connection", connection);
        written += 1;
    }
    out.extend_from_slice(b"\r\n");
    // As for requests: the client gets no head larger than the balancer itself would read.
    if written > MAX_HEADERS || out.len() > max_head {
        return Err(ResponseError::Bad);
    }
    Ok(Some(Response {
        head_len,
        status,
        framing,
        reusable,
        idle_timeout: fields.keep_alive_timeout,
    }))
}

/// Appends one header field line, in the canonical `name: value` CRLF form.
fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    /// The final (and only accepted) coding is `chunked`.
    Chunked,
    /// Anything else.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    None,
    Continue,
    Other,
}

/// What the framing and connection handling need from the header fields, read in one pass.
struct Fields<'a> {
    content_length: Option<u64>,
    transfer_encoding: Option<Coding>,
    connection_close: bool,
    connection_keep_alive: bool,
    /// Field names the `Connection` field lists (also hop-by-hop).
    connection_names: Vec<&'a [u8]>,
    keep_alive_timeout: Option<Duration>,
    host: usize,
    expect: Expect,
    upgrade: bool,
}

struct Ambiguous;

impl<'a> Fields<'a> {
    fn read(headers: &[httparse::Header<'a>]) -> Result<Fields<'a>, Ambiguous> {
        let mut f = Fields {
            content_length: None,
            transfer_encoding: None,
            connection_close: false,
            connection_keep_alive: false,
            connection_names: Vec::new(),
            keep_alive_timeout: None,
            host: 0,
            expect: Expect::None,
            upgrade: false,
        };
        for h in headers {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                // A list ("5, 5") or repeated fields must all agree (RFC 9110 §8.6).
                for part in h.value.split(|&b| b == b',') {
                    let n = crate::serve::http::parse_decimal(trim(part)).ok_or(Ambiguous)?;
                    if f.content_length.is_some_and(|old| old != n) {
                        return Err(Ambiguous);
                    }
                    f.content_length = Some(n);
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                // Several fields join into one list; chunked must come last, and only once
                // (RFC 9112 §6.1): any coding after a chunked one is ambiguous.
                for coding in h.value.split(|&b| b == b',').map(trim) {
                    if coding.is_empty() {
                        continue;
                    }
                    if f.transfer_encoding == Some(Coding::Chunked) {
                        return Err(Ambiguous);
                    }
                    f.transfer_encoding = Some(if coding.eq_ignore_ascii_case(b"chunked") {
                        Coding::Chunked
                    } else {
                        Coding::Other
                    });
                }
                if f.transfer_encoding.is_none() {
                    return Err(Ambiguous);
                }
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in h.value.split(|&b| b == b',').map(trim) {
                    if token.eq_ignore_ascii_case(b"close") {
                        f.connection_close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        f.connection_keep_alive = true;
                    } else if !token.is_empty() {
                        f.connection_names.push(token);
                    }
                }
            } else if name.eq_ignore_ascii_case(b"keep-alive") {
                f.keep_alive_timeout = keep_alive_timeout(h.value);
            } else if name.eq_ignore_ascii_case(b"host") {
                f.host += 1;
            } else if name.eq_ignore_ascii_case(b"expect") {
                f.expect = if trim(h.value).eq_ignore_ascii_case(b"100-continue") {
                    Expect::Continue
                } else {
                    Expect::Other
                };
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                f.upgrade = true;
            }
        }
        Ok(f)
    }

    /// Fields that concern one connection only and are not passed on.
    fn is_hop_by_hop(&self, name: &str) -> bool {
        const HOP: [&str; 7] = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
            "expect",
            "trailer",
        ];
        HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
            || self
                .connection_names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// `timeout=N` of a `Keep-Alive` field.
fn keep_alive_timeout(value: &[u8]) -> Option<Duration> {
    value.split(|&b| b == b',').map(trim).find_map(|p| {
        let (k, v) = p.split_at(p.iter().position(|&b| b == b'=')?);
        let secs = crate::serve::http::parse_decimal(trim(&v[1..]))?;
        trim(k)
            .eq_ignore_ascii_case(b"timeout")
            .then(|| Duration::from_secs(secs))
    })
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Checks the framing of a chunked body as it streams through, without changing a byte: it
/// says where the body ends (after the last chunk and the trailers), and refuses a malformed
/// chunk size, extension or line ending. Chunk data is not looked at.
#[derive(Debug, Clone, Default)]
pub struct ChunkScanner {
    state: ChunkState,
    /// Bytes of the current size line or trailer section, bounded.
    line: usize,
    /// Hex digits of the current size.
    digits: u8,
    /// The size read so far.
    current_size: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum ChunkState {
    /// Reading the chunk size's hex digits.
    #[default]
    Size,
    /// After a size digit run: optional whitespace, then `;` (an extension) or CR.
    SizeEnd,
    /// Inside a chunk extension, up to CR.
    Extension,
    /// After the size line's CR: LF.
    SizeLf {
        size: u64,
    },
    /// Chunk data left.
    Data(u64),
    /// After the data: CR, then LF.
    DataCr,
    DataLf,
    /// After the last chunk: a trailer line, or the final CRLF.
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

/// A chunked body the scanner refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkError;

/// Bound on a size line (digits and extensions) and on the trailer section.
const MAX_CHUNK_LINE: usize = 4096;

impl ChunkScanner {
    /// A scanner at the start of a body.
    pub fn new() -> ChunkScanner {
        ChunkScanner::default()
    }

    /// Whether the body has ended.
    pub fn done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Scans `data`, the body's next bytes. Returns how many of them belong to the body: all of
    /// them, or fewer when the body ends inside `data` (the rest is the next message).
    pub fn scan(&mut self, data: &[u8]) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                ChunkState::Done => return Ok(i),
                ChunkState::Data(left) => {
                    let take = (data.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataCr
                    } else {
                        ChunkState::Data(left)
                    };
                    continue;
                }
                ChunkState::Size => {
                    if let Some(d) = hex(b) {
                        self.digits += 1;
                        // 16 hex digits fill a u64; more (even leading zeros) is refused.
                        if self.digits > 16 {
                            return Err(ChunkError);
                        }
                        self.current_size = (self.current_size << 4) | u64::from(d);
                    } else if self.digits == 0 {
                        return Err(ChunkError);
                    } else {
                        self.state = ChunkState::SizeEnd;
                        continue;
                    }
                }
                ChunkState::SizeEnd => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = ChunkState::Extension,
                    b'\r' => {
                        self.state = ChunkState::SizeLf {
                            size: self.current_size,
                        }
                    }
                    _ => return Err(ChunkError),
                },
                ChunkState::Extension => match b {
                    b'\r' => {
                        self.state = ChunkState::SizeLf {
                            size: self.current_size,
                        }
                    }
                    // Token, quoted-string and separators of chunk-ext; no control bytes.
                    b'\t' | b' '..=b'~' | 0x80..=0xff => {}
                    _ => return Err(ChunkError),
                },
                ChunkState::SizeLf { size } => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.line = 0;
                    self.digits = 0;
                    self.current_size = 0;
                    self.state = if size == 0 {
                        ChunkState::TrailerStart
                    } else {
                        ChunkState::Data(size)
                    };
                    i += 1;
                    continue;
                }
                ChunkState::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::DataLf;
                }
                ChunkState::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::Size;
                    i += 1;
                    continue;
                }
                ChunkState::TrailerStart => match b {
                    b'\r' => self.state = ChunkState::FinalLf,
                    // A trailer field line: must not start with whitespace (no folding).
                    b' ' | b'\t' | b'\n' => return Err(ChunkError),
                    _ => self.state = ChunkState::Trailer,
                },
                ChunkState::Trailer => match b {
                    b'\r' => self.state = ChunkState::TrailerLf,
                    b'\t' | b' '..=b'~' | 0x80..=0xff => {}
                    _ => return Err(ChunkError),
                },
                ChunkState::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::TrailerStart;
                }
                ChunkState::FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkError);
                    }
                    self.state = ChunkState::Done;
                    return Ok(i + 1);
                }
            }
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return Err(ChunkError);
            }
            i += 1;
        }
        Ok(data.len())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(head: &[u8]) -> (Result<Option<Request>, RequestError>, String) {
        let mut out = Vec::new();
        let r = parse_request(head, 8192, "10.0.0.1:9002", &mut out);
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn the_forwarded_head_drops_hop_by_hop_fields_and_speaks_http11() {
        let (r, out) = request(
            b"GET /a?b HTTP/1.0\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nAccept: */*\r\n\r\n",
        );
        let r = r.unwrap().unwrap();
        assert!(r.keep_alive && r.http10 && r.retryable);
        assert_eq!(r.framing, Framing::Empty);
        assert_eq!(
            out,
            "GET /a?b HTTP/1.1\r\nAccept: */*\r\nHost: 10.0.0.1:9002\r\n\r\n"
        );
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |h: &[u8]| request(h).0.map(|r| r.map(|r| r.framing));
        assert_eq!(
            framing(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"),
            Ok(Some(Framing::Length(5)))
        );
        assert_eq!(
            framing(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Ok(Some(Framing::Chunked))
        );
        assert_eq!(
            framing(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Some(Framing::Length(5)))
        );
        for bad in [
            &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        ] {
            assert_eq!(framing(bad), Err(RequestError::BadRequest), "{bad:?}");
        }
        assert_eq!(
            framing(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\n\r\n"),
            Err(RequestError::ExpectationFailed)
        );
    }

    #[test]
    fn responses_are_framed_for_the_request_and_get_our_connection_field() {
        let mut out = Vec::new();
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive\r\nKeep-Alive: timeout=4\r\n\r\nabc";
        let r = parse_response(head, 8192, false, ClientConnection::Close, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(r.framing, Framing::Length(3));
        assert!(r.reusable);
        assert_eq!(r.idle_timeout, Some(Duration::from_secs(4)));
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        let r = parse_response(head, 8192, true, ClientConnection::Keep, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(r.framing, Framing::Empty, "no body after HEAD");
        let until_close = parse_response(
            b"HTTP/1.0 200 OK\r\n\r\n",
            8192,
            false,
            ClientConnection::Keep,
            &mut out,
        )
        .unwrap()
        .unwrap();
        assert_eq!(until_close.framing, Framing::UntilClose);
        assert!(!until_close.reusable);
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                8192,
                false,
                ClientConnection::Keep,
                &mut out
            )
            .is_err()
        );
    }

    #[test]
    fn status_lines_found_by_fuzzing_are_refused_or_passed_byte_for_byte() {
        let mut out = Vec::new();
        let mut parse =
            |head: &[u8]| parse_response(head, 8192, false, ClientConnection::Keep, &mut out);
        // httparse reads "020" as 20: no valid status, so no response to forward.
        assert!(parse(b"HTTP/1.1 020 OK\r\nContent-Length: 0\r\n\r\n").is_err());
        // An empty line before the status line is skipped, not sliced into.
        let r = parse(b"\nHTTP/1.0 200 \xc2OK\r\nContent-Length: 2\r\n\r\nok")
            .unwrap()
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            &out[..],
            &b"HTTP/1.1 200 \xc2OK\r\nContent-Length: 2\r\n\r\n"[..]
        );
    }

    #[test]
    fn a_head_the_rewrite_would_grow_past_the_bounds_is_refused() {
        // 100 fields in LF-only form fit 8 KiB; with a Host added there are 101.
        let mut head = b"GET / HTTP/1.0\n".to_vec();
        for i in 0..MAX_HEADERS {
            head.extend_from_slice(format!("X-{i}:1\n").as_bytes());
        }
        head.extend_from_slice(b"\n");
        assert_eq!(request(&head).0, Err(RequestError::TooLarge));
        // Bare `:` and LF grow by three bytes a field: over `max_head` once rewritten.
        let mut out = Vec::new();
        let mut small = b"GET / HTTP/1.1\nHost:x\n".to_vec();
        for _ in 0..40 {
            small.extend_from_slice(b"A:b\n");
        }
        small.extend_from_slice(b"\n");
        assert!(parse_request(&small, small.len() + 20, "h", &mut out).is_err());
        assert!(
            parse_request(&small, 8192, "h", &mut out)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn the_chunk_scanner_finds_the_end_across_any_split() {
        let body = b"5;ext=\"x\"\r\nhello\r\n0\r\nTrailer: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..=body.len() {
            let mut scanner = ChunkScanner::new();
            let a = scanner.scan(&body[..split]).unwrap();
            let b = scanner.scan(&body[split..]).unwrap();
            assert_eq!(a + b, end, "split at {split}");
            assert!(scanner.done());
        }
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"5\nhello\r\n",
            b"11111111111111111\r\n",
            b"0\r\n Folded: trailer\r\n\r\n",
        ] {
            assert!(ChunkScanner::new().scan(bad).is_err(), "{bad:?}");
        }
    }
}
