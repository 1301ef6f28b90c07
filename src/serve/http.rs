//! HTTP/1.x wire pieces shared by every server and the client: the bounded request-head parser,
//! the byte-exact lab responses with their once-a-second `Date`, and the response-head parser.
//!
//! Everything here is synchronous and allocation-free per request, so the glommio backend, the
//! thread-per-connection server and the benchmark client all speak exactly the same bytes.

use std::time::{SystemTime, UNIX_EPOCH};

/// Default bound on a request head (request line plus headers), in bytes.
pub const DEFAULT_MAX_HEAD: usize = 8192;

/// Length of an IMF-fixdate such as `Sat, 28 Nov 2026 01:02:34 GMT`.
pub const DATE_LEN: usize = 29;

/// Width of the `Server` header value: `ringlab-` plus a zero-padded five-digit port, so every
/// listener's responses have the same length and a client can still tell them apart.
pub const SERVER_ID_LEN: usize = 13;

/// The body of the lab's `GET /` response. With the head it makes the 122 bytes the original lab
/// transferred per request.
pub const OK_BODY: &[u8] = b"pong\n";

/// What a well-formed request head asked for, as far as these servers care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead {
    /// Which response this request gets.
    pub route: Route,
    /// `HEAD` asks for the response head without the body.
    pub head_only: bool,
    /// The connection may serve another request after this one.
    pub keep_alive: bool,
    /// The request carries a body (`Content-Length` > 0 or any `Transfer-Encoding`). The servers
    /// do not read bodies, so they answer and close instead of misreading it as the next request.
    pub has_body: bool,
    /// Bytes of the buffer taken by the head, blank line included.
    pub len: usize,
}

/// The response a request is routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /` or `HEAD /` (any query string): the lab's 200 response.
    Ok,
    /// Any other path.
    NotFound,
    /// A method other than `GET` or `HEAD`.
    MethodNotAllowed,
}

/// Why a request head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// The request line or a header line is malformed: answer 400 and close.
    BadRequest,
    /// The head did not end within the size bound: answer 431 and close.
    TooLarge,
}

/// Parses a request head at the start of `buf`.
///
/// Returns `Ok(None)` while the blank line that ends the head has not arrived and `buf` is still
/// under `max_head` bytes. `scan_from` lets a caller that re-parses after each read skip bytes it
/// already searched, so a client trickling one byte at a time costs linear, not quadratic, work.
pub fn parse_request_head(
    buf: &[u8],
    scan_from: usize,
    max_head: usize,
) -> Result<Option<RequestHead>, HeadError> {
    let window = &buf[..buf.len().min(max_head)];
    let Some(len) = find_head_end(window, scan_from) else {
        return if buf.len() >= max_head {
            Err(HeadError::TooLarge)
        } else {
            Ok(None)
        };
    };
    parse_complete_head(&buf[..len]).map(Some)
}

/// Finds the end of a head (just past `\r\n\r\n`, or a bare `\n\n`), searching from a little
/// before `from` so a terminator split across reads is still found.
fn find_head_end(buf: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3);
    let mut i = start;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if i >= 1 && buf[i - 1] == b'\n' {
                return Some(i + 1);
            }
            if i >= 2 && buf[i - 1] == b'\r' && buf[i - 2] == b'\n' {
                return Some(i + 1);
            }
        }
        i += 1;
    }
    None
}

fn parse_complete_head(head: &[u8]) -> Result<RequestHead, HeadError> {
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let request_line = lines.next().ok_or(HeadError::BadRequest)?;
    let (method, target, minor) = parse_request_line(request_line)?;

    let mut keep_alive = minor == 1;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let (name, value) = split_header(line)?;
        if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = trim(token);
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_decimal(value).ok_or(HeadError::BadRequest)?;
            // Two different lengths is the classic request-smuggling shape: refuse it.
            if content_length.is_some_and(|old| old != n) {
                return Err(HeadError::BadRequest);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = true;
        }
    }

    let head_only = method == b"HEAD";
    let route = if method != b"GET" && !head_only {
        Route::MethodNotAllowed
    } else if is_root(target) {
        Route::Ok
    } else {
        Route::NotFound
    };
    Ok(RequestHead {
        route,
        head_only,
        keep_alive,
        has_body: chunked || content_length.unwrap_or(0) > 0,
        len: head.len(),
    })
}

/// Splits `METHOD SP target SP HTTP/1.x`, returning the minor version.
fn parse_request_line(line: &[u8]) -> Result<(&[u8], &[u8], u8), HeadError> {
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().ok_or(HeadError::BadRequest)?;
    let target = parts.next().ok_or(HeadError::BadRequest)?;
    let version = parts.next().ok_or(HeadError::BadRequest)?;
    if parts.next().is_some() || method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(HeadError::BadRequest);
    }
    if target.is_empty() || !target.iter().all(|&b| b.is_ascii_graphic()) {
        return Err(HeadError::BadRequest);
    }
    let minor = match version {
        b"HTTP/1.0" => 0,
        b"HTTP/1.1" => 1,
        _ => return Err(HeadError::BadRequest),
    };
    Ok((method, target, minor))
}

fn split_header(line: &[u8]) -> Result<(&[u8], &[u8]), HeadError> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(HeadError::BadRequest)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    // An empty name, or whitespace before the colon (which also catches obsolete line folding),
    // is malformed.
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(HeadError::BadRequest);
    }
    if value.iter().any(|&b| b == 0 || b == b'\r') {
        return Err(HeadError::BadRequest);
    }
    Ok((name, trim(value)))
}

/// `/`, `/?query`, or the absolute form `http://host/` and `http://host`.
fn is_root(target: &[u8]) -> bool {
    let path = if let Some(rest) = target
        .strip_prefix(b"http://")
        .or_else(|| target.strip_prefix(b"https://"))
    {
        match rest.iter().position(|&b| b == b'/' || b == b'?') {
            Some(i) => &rest[i..],
            None => return true,
        }
    } else {
        target
    };
    let path = match path.iter().position(|&b| b == b'?') {
        Some(i) => &path[..i],
        None => path,
    };
    path == b"/" || path.is_empty()
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
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

/// Parses a non-empty run of ASCII digits that fits in a `u64`.
pub fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
    })
}

/// Formats a Unix time as an IMF-fixdate (`Sat, 28 Nov 2026 01:02:34 GMT`), the only `Date`
/// format RFC 9110 lets a server send.
pub fn imf_fixdate(unix_secs: u64) -> [u8; DATE_LEN] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    put2(&mut out[5..7], day as u64);
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    let year = year as u64;
    put2(&mut out[12..14], year / 100);
    put2(&mut out[14..16], year % 100);
    put2(&mut out[17..19], secs / 3600);
    put2(&mut out[20..22], secs / 60 % 60);
    put2(&mut out[23..25], secs % 60);
    out
}

fn put2(dst: &mut [u8], v: u64) {
    dst[0] = b'0' + (v / 10 % 10) as u8;
    dst[1] = b'0' + (v % 10) as u8;
}

/// Converts days since 1970-01-01 into a proleptic Gregorian (year, month, day), using the
/// era-based method (400-year cycles of 146 097 days) so no table or loop is needed.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The current time as an IMF-fixdate.
pub fn now_fixdate() -> [u8; DATE_LEN] {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    imf_fixdate(secs)
}

/// The fixed-width `Server` value for a listener on `port`, e.g. `ringlab-09002`.
pub fn server_id(port: u16) -> [u8; SERVER_ID_LEN] {
    let mut id = *b"ringlab-00000";
    let mut p = port;
    for slot in id[8..].iter_mut().rev() {
        *slot = b'0' + (p % 10) as u8;
        p /= 10;
    }
    id
}

/// How long a server keeps reading (and discarding) after a closing response, so the close does
/// not reset a response the client has not read yet.
pub const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Most bytes a server discards while lingering before it closes anyway.
pub const LINGER_BYTES: usize = 64 * 1024;

/// What a server sends for a parsed (or refused) head, and what happens to the connection after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The response.
    pub kind: Kind,
    /// Buffered bytes this request used; the rest belong to the next (pipelined) request.
    pub consumed: usize,
    /// Bytes the server will not read remain (a body, the rest of a refused head): close with a
    /// lingering read, because a plain close would answer them with a reset that can destroy the
    /// response before the client reads it.
    pub linger: bool,
}

impl Reply {
    /// The reply to `parsed`, read from `filled` buffered bytes. The servers do not read request
    /// bodies, so a request with one ends the connection rather than having its body parsed as
    /// the next request; `stopping` (a graceful stop) ends it too.
    pub fn to(parsed: Result<RequestHead, HeadError>, filled: usize, stopping: bool) -> Reply {
        match parsed {
            Ok(head) => {
                let keep = head.keep_alive && !head.has_body && !stopping;
                Reply {
                    kind: Kind::for_request(&head, keep),
                    consumed: head.len,
                    linger: head.has_body || (!keep && head.len < filled),
                }
            }
            Err(err) => Reply {
                kind: Kind::for_error(err),
                consumed: filled,
                linger: true,
            },
        }
    }
}

/// Every response a server sends, pre-built for one listener and one `Date` second.
///
/// Building them once a second (not per request) keeps formatting and allocation off the hot path:
/// a request costs a parse and one `send` of a slice from here.
#[derive(Debug, Clone)]
pub struct Responses {
    bytes: Vec<u8>,
    spans: [(usize, usize); Kind::COUNT],
}

/// The distinct responses, indexed into [`Responses`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 200 with `Connection: close` (the lab's 122 bytes).
    OkClose,
    /// 200 with `Connection: keep-alive`.
    OkKeepAlive,
    /// 200 head only (answer to `HEAD /`), closing.
    OkHeadClose,
    /// 200 head only, keep-alive.
    OkHeadKeepAlive,
    /// 404, closing.
    NotFoundClose,
    /// 404, keep-alive.
    NotFoundKeepAlive,
    /// 405 with `Allow: GET, HEAD`, closing.
    MethodNotAllowed,
    /// 400, always closing.
    BadRequest,
    /// 431, always closing.
    TooLarge,
    /// 408 after a head timeout, always closing.
    Timeout,
}

impl Kind {
    const COUNT: usize = 10;
    const ALL: [Kind; Kind::COUNT] = [
        Kind::OkClose,
        Kind::OkKeepAlive,
        Kind::OkHeadClose,
        Kind::OkHeadKeepAlive,
        Kind::NotFoundClose,
        Kind::NotFoundKeepAlive,
        Kind::MethodNotAllowed,
        Kind::BadRequest,
        Kind::TooLarge,
        Kind::Timeout,
    ];

    /// The response for a parsed request; `keep_alive` is whether the connection stays open.
    pub fn for_request(head: &RequestHead, keep_alive: bool) -> Kind {
        match (head.route, head.head_only, keep_alive) {
            (Route::Ok, false, false) => Kind::OkClose,
            (Route::Ok, false, true) => Kind::OkKeepAlive,
            (Route::Ok, true, false) => Kind::OkHeadClose,
            (Route::Ok, true, true) => Kind::OkHeadKeepAlive,
            (Route::NotFound, _, false) => Kind::NotFoundClose,
            (Route::NotFound, _, true) => Kind::NotFoundKeepAlive,
            (Route::MethodNotAllowed, _, _) => Kind::MethodNotAllowed,
        }
    }

    /// The response to a refused head.
    pub fn for_error(err: HeadError) -> Kind {
        match err {
            HeadError::BadRequest => Kind::BadRequest,
            HeadError::TooLarge => Kind::TooLarge,
        }
    }

    /// Whether the connection closes after this response whatever the request asked.
    pub fn closes(self) -> bool {
        !matches!(
            self,
            Kind::OkKeepAlive | Kind::OkHeadKeepAlive | Kind::NotFoundKeepAlive
        )
    }

    /// The HTTP status code.
    pub fn status(self) -> u16 {
        match self {
            Kind::OkClose | Kind::OkKeepAlive | Kind::OkHeadClose | Kind::OkHeadKeepAlive => 200,
            Kind::NotFoundClose | Kind::NotFoundKeepAlive => 404,
            Kind::MethodNotAllowed => 405,
            Kind::BadRequest => 400,
            Kind::TooLarge => 431,
            Kind::Timeout => 408,
        }
    }

    fn parts(self) -> (&'static str, &'static str, &'static [u8], bool) {
        // (status line, extra header, body, send body)
        match self {
            Kind::OkClose | Kind::OkKeepAlive => ("200 OK", "", OK_BODY, true),
            Kind::OkHeadClose | Kind::OkHeadKeepAlive => ("200 OK", "", OK_BODY, false),
            Kind::NotFoundClose | Kind::NotFoundKeepAlive => {
                ("404 Not Found", "", b"not found\n", true)
            }
            Kind::MethodNotAllowed => (
                "405 Method Not Allowed",
                "Allow: GET, HEAD\r\n",
                b"method not allowed\n",
                true,
            ),
            Kind::BadRequest => ("400 Bad Request", "", b"bad request\n", true),
            Kind::TooLarge => (
                "431 Request Header Fields Too Large",
                "",
                b"request head too large\n",
                true,
            ),
            Kind::Timeout => ("408 Request Timeout", "", b"request timeout\n", true),
        }
    }
}

impl Responses {
    /// Builds every response for the listener identified by `server_id`, dated `date`.
    pub fn new(server_id: &[u8; SERVER_ID_LEN], date: &[u8; DATE_LEN]) -> Responses {
        let mut bytes = Vec::with_capacity(2048);
        let mut spans = [(0, 0); Kind::COUNT];
        for kind in Kind::ALL {
            let start = bytes.len();
            let (status, extra, body, send_body) = kind.parts();
            let connection = if kind.closes() { "close" } else { "keep-alive" };
            bytes.extend_from_slice(b"HTTP/1.1 ");
            bytes.extend_from_slice(status.as_bytes());
            bytes.extend_from_slice(b"\r\nServer: ");
            bytes.extend_from_slice(server_id);
            bytes.extend_from_slice(b"\r\nDate: ");
            bytes.extend_from_slice(date);
            bytes.extend_from_slice(b"\r\nContent-Length: ");
            bytes.extend_from_slice(body.len().to_string().as_bytes());
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(extra.as_bytes());
            bytes.extend_from_slice(b"Connection: ");
            bytes.extend_from_slice(connection.as_bytes());
            bytes.extend_from_slice(b"\r\n\r\n");
            if send_body {
                bytes.extend_from_slice(body);
            }
            spans[kind as usize] = (start, bytes.len());
        }
        Responses { bytes, spans }
    }

    /// The exact bytes of one response.
    pub fn get(&self, kind: Kind) -> &[u8] {
        let (start, end) = self.spans[kind as usize];
        &self.bytes[start..end]
    }
}

/// What a client needs from a response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// `Content-Length`, when present.
    pub content_length: Option<u64>,
    /// Whether the server will keep the connection open after this response.
    pub keep_alive: bool,
    /// Bytes taken by the head, blank line included.
    pub len: usize,
    /// Where the `Server` value sits in the buffer, so a caller can tally which backend answered
    /// without copying it.
    pub server: Option<(usize, usize)>,
}

/// Why a response head could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseError {
    /// Not an HTTP/1.x status line or a malformed header.
    Malformed,
    /// No end of head within the bound.
    TooLarge,
}

/// Parses a response head at the start of `buf`; `Ok(None)` means more bytes are needed.
/// `keep_alive` starts from the response's HTTP version default and follows its `Connection`
/// header.
pub fn parse_response_head(
    buf: &[u8],
    scan_from: usize,
    max_head: usize,
) -> Result<Option<ResponseHead>, ResponseError> {
    let window = &buf[..buf.len().min(max_head)];
    let Some(len) = find_head_end(window, scan_from) else {
        return if buf.len() >= max_head {
            Err(ResponseError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let head = &buf[..len];
    let mut lines = head.split(|&b| b == b'\n');
    let status_line = lines.next().unwrap_or_default();
    let status_line = status_line.strip_suffix(b"\r").unwrap_or(status_line);
    let (minor, status) = match status_line {
        [
            b'H',
            b'T',
            b'T',
            b'P',
            b'/',
            b'1',
            b'.',
            minor @ (b'0' | b'1'),
            b' ',
            d0,
            d1,
            d2,
            rest @ ..,
        ] if rest.is_empty() || rest[0] == b' ' => {
            let status = parse_decimal(&[*d0, *d1, *d2]).ok_or(ResponseError::Malformed)? as u16;
            (*minor - b'0', status)
        }
        _ => return Err(ResponseError::Malformed),
    };
    let mut keep_alive = minor == 1;
    let mut content_length = None;
    let mut server = None;
    for raw in lines {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            break;
        }
        let (name, value) = split_header(line).map_err(|_| ResponseError::Malformed)?;
        if name.eq_ignore_ascii_case(b"content-length") {
            content_length = Some(parse_decimal(value).ok_or(ResponseError::Malformed)?);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',') {
                let token = trim(token);
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"server") {
            // `value` is a sub-slice of `buf`, so its offset is the pointer difference.
            let value_start = value.as_ptr() as usize - buf.as_ptr() as usize;
            server = Some((value_start, value_start + value.len()));
        }
    }
    Ok(Some(ResponseHead {
        status,
        content_length,
        keep_alive,
        len,
        server,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_response_is_exactly_122_bytes() {
        let r = Responses::new(&server_id(9002), &imf_fixdate(0));
        assert_eq!(r.get(Kind::OkClose).len(), 122);
        let text = std::str::from_utf8(r.get(Kind::OkClose)).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nServer: ringlab-09002\r\n"));
        assert!(text.contains("\r\nContent-Length: 5\r\nConnection: close\r\n\r\npong\n"));
    }

    #[test]
    fn every_port_gives_the_same_length() {
        let date = imf_fixdate(1_700_000_000);
        for port in [0, 1, 80, 9002, 44444, 65535] {
            assert_eq!(
                Responses::new(&server_id(port), &date)
                    .get(Kind::OkClose)
                    .len(),
                122
            );
        }
    }

    #[test]
    fn fixdate_matches_known_instants() {
        assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&imf_fixdate(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(
            &imf_fixdate(1_795_827_754),
            b"Sat, 28 Nov 2026 01:02:34 GMT"
        );
    }

    #[test]
    fn parses_lab_request() {
        let req = b"GET / HTTP/1.0\r\nHost: 127.0.0.1:44444\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n";
        let head = parse_request_head(req, 0, DEFAULT_MAX_HEAD)
            .unwrap()
            .unwrap();
        assert_eq!(head.route, Route::Ok);
        assert!(!head.keep_alive);
        assert!(!head.has_body);
        assert_eq!(head.len, req.len());
    }

    #[test]
    fn keep_alive_defaults_follow_the_version() {
        let p = |r: &[u8]| parse_request_head(r, 0, 8192).unwrap().unwrap().keep_alive;
        assert!(p(b"GET / HTTP/1.1\r\n\r\n"));
        assert!(!p(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!p(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(p(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn partial_heads_wait_and_oversize_heads_fail() {
        assert_eq!(parse_request_head(b"GET / HTTP/1.1\r\n", 0, 64), Ok(None));
        assert_eq!(
            parse_request_head(&[b'a'; 64], 0, 64),
            Err(HeadError::TooLarge)
        );
    }

    #[test]
    fn malformed_heads_are_bad_requests() {
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"G(T / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nNo colon\r\n\r\n",
            b"GET / HTTP/1.1\r\n folded: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"\x00\x01\x02\r\n\r\n",
        ] {
            assert_eq!(
                parse_request_head(bad, 0, 8192),
                Err(HeadError::BadRequest),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn routes() {
        let route = |r: &[u8]| parse_request_head(r, 0, 8192).unwrap().unwrap().route;
        assert_eq!(route(b"GET /?x=1 HTTP/1.1\r\n\r\n"), Route::Ok);
        assert_eq!(route(b"GET http://h:1/ HTTP/1.1\r\n\r\n"), Route::Ok);
        assert_eq!(route(b"GET /nope HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST / HTTP/1.1\r\n\r\n"), Route::MethodNotAllowed);
    }

    #[test]
    fn split_terminator_is_found_with_scan_offset() {
        let full = b"GET / HTTP/1.1\r\n\r\n";
        let mut scanned = 0;
        for end in 1..=full.len() {
            match parse_request_head(&full[..end], scanned, 8192).unwrap() {
                Some(h) => {
                    assert_eq!(end, full.len());
                    assert_eq!(h.len, full.len());
                    return;
                }
                None => scanned = end,
            }
        }
        panic!("head never completed");
    }

    #[test]
    fn response_parser_reads_our_responses() {
        let r = Responses::new(&server_id(9003), &now_fixdate());
        let bytes = r.get(Kind::OkClose);
        let head = parse_response_head(bytes, 0, 8192).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.content_length, Some(5));
        assert!(!head.keep_alive);
        assert_eq!(head.len + 5, bytes.len());
        let (s, e) = head.server.unwrap();
        assert_eq!(&bytes[s..e], b"ringlab-09003");
        let ka = parse_response_head(r.get(Kind::OkKeepAlive), 0, 8192)
            .unwrap()
            .unwrap();
        assert!(ka.keep_alive);
    }
}
