//! Property tests for the two parsers that face the network: the server's request-head parser and
//! the client's response-head parser. Generated inputs (a fixed-seed generator, so failures
//! reproduce) check that nothing panics, that valid heads round-trip, and that feeding a head in
//! pieces gives the same answer as feeding it whole. `fuzz/` runs the same parsers under libFuzzer.

use ringlab::serve::http::{self, HeadError, Route};

/// xorshift64*: small, fast, and deterministic for a given seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A random valid request head and what the parser should make of it.
fn valid_request(rng: &mut Rng) -> (Vec<u8>, Route, bool, bool) {
    let method = rng.pick(&["GET", "HEAD", "POST", "PUT", "OPTIONS"]);
    let path = rng.pick(&["/", "/?a=1", "/index.html", "/a/b?c=d", "http://h:1/", "/x"]);
    let minor = rng.below(2);
    let mut head = format!("{method} {path} HTTP/1.{minor}\r\n");
    let mut keep_alive = minor == 1;
    let mut body = false;
    for _ in 0..rng.below(6) {
        match rng.below(5) {
            0 => {
                let v = rng.pick(&["close", "keep-alive", "Keep-Alive", "upgrade, close"]);
                head.push_str(&format!("Connection: {v}\r\n"));
                keep_alive = !v.to_ascii_lowercase().contains("close");
            }
            1 if !head.contains("Content-Length") => {
                let n = rng.below(3);
                head.push_str(&format!("Content-Length: {n}\r\n"));
                body |= n > 0;
            }
            _ => {
                let name = rng.pick(&["Host", "User-Agent", "Accept", "X-Thing", "Cookie"]);
                let value = rng.pick(&["a", "text/html, */*", "  spaced  ", "", "x=1; y=2"]);
                head.push_str(&format!("{name}:{value}\r\n"));
            }
        }
    }
    head.push_str("\r\n");
    let route = match (method, path) {
        ("GET" | "HEAD", "/" | "/?a=1" | "http://h:1/") => Route::Ok,
        ("GET" | "HEAD", _) => Route::NotFound,
        _ => Route::MethodNotAllowed,
    };
    (head.into_bytes(), route, keep_alive, body)
}

#[test]
fn valid_requests_parse_as_generated() {
    let mut rng = Rng(0x5eed_1234);
    for _ in 0..20_000 {
        let (head, route, keep_alive, body) = valid_request(&mut rng);
        let parsed = http::parse_request_head(&head, 0, http::DEFAULT_MAX_HEAD)
            .unwrap_or_else(|e| panic!("{e:?} for {:?}", String::from_utf8_lossy(&head)))
            .expect("complete head");
        let text = String::from_utf8_lossy(&head);
        assert_eq!(parsed.len, head.len(), "{text:?}");
        assert_eq!(parsed.route, route, "{text:?}");
        assert_eq!(parsed.keep_alive, keep_alive, "{text:?}");
        assert_eq!(parsed.has_body, body, "{text:?}");
    }
}

#[test]
fn pieces_parse_like_the_whole() {
    let mut rng = Rng(0xfeed_beef);
    for _ in 0..5_000 {
        let (mut head, ..) = valid_request(&mut rng);
        // Trailing bytes (a pipelined request) must not change the answer.
        head.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let whole = http::parse_request_head(&head, 0, http::DEFAULT_MAX_HEAD);
        let mut scanned = 0;
        let mut pieces = None;
        let mut end = 0;
        while end < head.len() {
            end = (end + 1 + rng.below(7)).min(head.len());
            match http::parse_request_head(&head[..end], scanned, http::DEFAULT_MAX_HEAD) {
                Ok(None) => scanned = end,
                done => {
                    pieces = Some(done);
                    break;
                }
            }
        }
        assert_eq!(pieces, Some(whole), "{:?}", String::from_utf8_lossy(&head));
    }
}

#[test]
fn arbitrary_bytes_never_panic_and_respect_the_bound() {
    let mut rng = Rng(0xdead_10cc);
    for _ in 0..50_000 {
        let len = rng.below(300);
        let mut input = rng.bytes(len);
        // Sprinkle line ends so the parser gets past the terminator search often.
        for _ in 0..rng.below(4) {
            let at = rng.below(input.len() + 1);
            input.splice(at..at, b"\r\n\r\n".iter().copied());
        }
        let max = 1 + rng.below(256);
        match http::parse_request_head(&input, 0, max) {
            Ok(Some(h)) => assert!(h.len <= max && h.len <= input.len()),
            Ok(None) => assert!(input.len() < max),
            Err(HeadError::TooLarge) => assert!(input.len() >= max),
            Err(HeadError::BadRequest) => {}
        }
        let _ = http::parse_response_head(&input, 0, max);
    }
}

#[test]
fn mutated_requests_never_panic() {
    let mut rng = Rng(0x0bad_cafe);
    for _ in 0..50_000 {
        let (mut head, ..) = valid_request(&mut rng);
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(head.len());
            match rng.below(3) {
                0 => head[at] = rng.next() as u8,
                1 => {
                    head.remove(at);
                }
                _ => head.insert(at, rng.next() as u8),
            }
        }
        let _ = http::parse_request_head(&head, 0, http::DEFAULT_MAX_HEAD);
    }
}

#[test]
fn generated_responses_round_trip() {
    let mut rng = Rng(0x7e57_0001);
    for _ in 0..20_000 {
        let status = [200u16, 204, 301, 404, 431, 500, 503][rng.below(7)];
        let minor = rng.below(2);
        let cl = rng.below(100_000);
        let mut head = format!("HTTP/1.{minor} {status} Whatever\r\n");
        let server = rng.pick(&["ringlab-09002", "nginx/1.22.1", "x"]);
        let close = rng.below(2) == 0;
        for i in 0..4 {
            match (i + rng.below(4)) % 4 {
                0 => head.push_str(&format!("Server: {server}\r\n")),
                1 => head.push_str(&format!("Content-Length: {cl}\r\n")),
                2 if close => head.push_str("Connection: close\r\n"),
                _ => head.push_str("Date: Sat, 28 Nov 2026 01:02:34 GMT\r\n"),
            }
        }
        head.push_str("\r\n");
        let bytes = head.as_bytes();
        let parsed = http::parse_response_head(bytes, 0, 8192).unwrap().unwrap();
        assert_eq!(parsed.status, status);
        assert_eq!(parsed.len, bytes.len());
        if head.contains("Content-Length") {
            assert_eq!(parsed.content_length, Some(cl as u64));
        }
        if head.contains("Server: ") {
            let (s, e) = parsed.server.unwrap();
            assert_eq!(&bytes[s..e], server.as_bytes());
        }
        assert_eq!(
            parsed.keep_alive,
            minor == 1 && !(close && head.contains("Connection"))
        );
    }
}
