//! `cargo bench --bench heads`: the request-head parsers side by side, on speed and strictness.
//! The lab server's own parser (`serve::http::parse_request_head`, which reads only what the
//! server routes on) against `httparse` (which tokenizes every field, as the HTTP mode needs),
//! and the HTTP mode's whole step (`serve::h1::parse_request`: httparse, the framing rules and
//! the rewritten head for the backend). Medians of repeated timed loops; compare as ratios.

use std::hint::black_box;
use std::time::Instant;

use ringlab::serve::{h1, http};

const HEADS: [(&str, &[u8]); 3] = [
    (
        "ab (the lab's request)",
        b"GET / HTTP/1.0\r\nHost: 127.0.0.1:44444\r\nUser-Agent: ApacheBench/2.3\r\nAccept: */*\r\n\r\n",
    ),
    (
        "wrk, Connection: close",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:44444\r\nConnection: close\r\n\r\n",
    ),
    (
        "a browser's GET (12 fields)",
        b"GET /search?q=io_uring&lang=en HTTP/1.1\r\nHost: example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\nReferer: https://example.com/\r\nConnection: keep-alive\r\nCookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\nUpgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\nPriority: u=0, i\r\n\r\n",
    ),
];

/// Nanoseconds per call of `f`, median of 9 loops of `n` calls.
fn time(n: u32, mut f: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..9)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            start.elapsed().as_nanos() as f64 / f64::from(n)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[4]
}

fn main() {
    // `cargo test --all-targets` runs benches in test mode: a token loop then.
    let n = if std::env::args().any(|a| a == "--bench") {
        200_000
    } else {
        100
    };
    println!(
        "{:<30} {:>12} {:>12} {:>14}",
        "head", "own ns", "httparse ns", "h1 (proxy) ns"
    );
    for (name, head) in HEADS {
        let own = time(n, || {
            black_box(http::parse_request_head(black_box(head), 0, 8192).ok());
        });
        let tokenized = time(n, || {
            let mut fields = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut fields);
            black_box(req.parse(black_box(head)).ok());
        });
        let mut out = Vec::with_capacity(2048);
        let proxy = time(n, || {
            black_box(h1::parse_request(black_box(head), 8192, "127.0.0.1:9002", &mut out).ok());
        });
        println!("{name:<30} {own:>12.0} {tokenized:>12.0} {proxy:>14.0}");
    }
    println!();
    println!("Strictness: which refuses what (R = refused, a = accepted)");
    let shapes: [(&str, &[u8]); 7] = [
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n"),
        ("space before colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
        ("NUL in a value", b"GET / HTTP/1.1\r\nHost: x\0y\r\n\r\n"),
        ("bare LF line ends", b"GET / HTTP/1.1\nHost: x\n\n"),
        ("HTTP/1.2", b"GET / HTTP/1.2\r\nHost: x\r\n\r\n"),
        ("two spaces after method", b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("CL and TE", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ];
    println!(
        "{:<26} {:>5} {:>9} {:>11}",
        "shape", "own", "httparse", "h1 (proxy)"
    );
    let mark = |refused: bool| if refused { "R" } else { "a" };
    for (name, head) in shapes {
        let own = !matches!(http::parse_request_head(head, 0, 8192), Ok(Some(_)));
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let tokenized = !matches!(
            httparse::Request::new(&mut fields).parse(head),
            Ok(httparse::Status::Complete(_))
        );
        let mut out = Vec::new();
        let proxy = !matches!(h1::parse_request(head, 8192, "x", &mut out), Ok(Some(_)));
        println!(
            "{name:<26} {:>5} {:>9} {:>11}",
            mark(own),
            mark(tokenized),
            mark(proxy)
        );
    }
}
