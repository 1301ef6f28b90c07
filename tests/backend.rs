//! The glommio backend and the threaded server, driven over real sockets.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use ringlab::serve::backend::BackendConfig;
use ringlab::serve::http;

/// Checks a 200 response is the lab's byte layout, with a Date that parses as now-ish.
fn assert_lab_response(resp: &[u8], id: &str) {
    assert_eq!(resp.len(), 122, "{:?}", String::from_utf8_lossy(resp));
    let text = std::str::from_utf8(resp).unwrap();
    let expected_head = format!("HTTP/1.1 200 OK\r\nServer: {id}\r\nDate: ");
    assert!(text.starts_with(&expected_head), "{text:?}");
    assert!(
        text.ends_with("GMT\r\nContent-Length: 5\r\nConnection: close\r\n\r\npong\n"),
        "{text:?}"
    );
    let date = &text[expected_head.len()..expected_head.len() + http::DATE_LEN];
    let now = http::now_fixdate();
    // Same day prefix as a freshly formatted date (the seconds may have ticked).
    assert_eq!(&date[..16], std::str::from_utf8(&now[..16]).unwrap());
}

both_drivers! {
fn backend_sends_the_lab_bytes() {
    let b = backend(1);
    assert_lab_response(&get(b.addr()), &id_of(b.addr()));
}
}

both_drivers! {
fn threaded_sends_the_same_bytes() {
    let listener = ringlab::io::listen::bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = ringlab::io::shutdown::Shutdown::new();
    let stopper = shutdown.clone();
    let server = std::thread::spawn(move || {
        ringlab::serve::threaded::serve(listener, BackendConfig::default(), stopper).unwrap()
    });
    assert_lab_response(&get(addr), &id_of(addr));
    let ka = keep_alive_round_trips(addr, 3);
    assert_eq!(ka, 3);
    shutdown.trigger();
    let stats = server.join().unwrap();
    assert_eq!(stats.ok, 4);
    assert_eq!(stats.connections, 2);
}
}

/// Sends `n` HTTP/1.1 requests on one connection; returns how many 200s came back on it.
fn keep_alive_round_trips(addr: std::net::SocketAddr, n: usize) -> usize {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut ok = 0;
    for i in 0..n {
        let last = i + 1 == n;
        let req = if last {
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        } else {
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        };
        s.write_all(req.as_bytes()).unwrap();
        let expect = if last { 122 } else { 127 };
        let mut resp = vec![0u8; expect];
        s.read_exact(&mut resp).unwrap();
        let head = http::parse_response_head(&resp, 0, 8192).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.keep_alive, !last);
        assert!(resp.ends_with(b"pong\n"));
        ok += 1;
    }
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "server sent more than asked: {rest:?}");
    ok
}

both_drivers! {
fn keep_alive_serves_several_requests_on_one_connection() {
    let b = backend(1);
    assert_eq!(keep_alive_round_trips(b.addr(), 5), 5);
    let stats = b.stop();
    assert_eq!(stats[0][0].connections, 1);
    assert_eq!(stats[0][0].ok, 5);
}
}

both_drivers! {
fn pipelined_requests_are_answered_in_order() {
    let b = backend(1);
    let resp = exchange(
        b.addr(),
        b"GET / HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let text = String::from_utf8_lossy(&resp);
    let statuses: Vec<&str> = text.matches("HTTP/1.1 ").collect();
    assert_eq!(statuses.len(), 3, "{text}");
    let order: Vec<_> = text.split("HTTP/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(order, ["200", "404", "200"]);
}
}

both_drivers! {
fn keep_alive_http_1_0_as_ab_k_sends_it() {
    let b = backend(1);
    let mut s = TcpStream::connect(b.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap();
        let mut resp = [0u8; 127];
        s.read_exact(&mut resp).unwrap();
        assert!(String::from_utf8_lossy(&resp).contains("Connection: keep-alive"));
    }
}
}

both_drivers! {
fn malformed_request_line_gets_400_and_close() {
    let b = backend(1);
    for bad in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    ] {
        let resp = exchange(b.addr(), bad);
        assert!(
            resp.starts_with(b"HTTP/1.1 400 Bad Request\r\n"),
            "{:?} -> {:?}",
            String::from_utf8_lossy(bad),
            String::from_utf8_lossy(&resp)
        );
    }
    // The server is still serving everyone else.
    assert_eq!(get(b.addr()).len(), 122);
    let stats = b.stop();
    assert_eq!(stats[0][0].refused, 4);
}
}

both_drivers! {
fn oversize_head_gets_431_and_close() {
    let b = backend_with(
        1,
        BackendConfig {
            max_head: 1024,
            ..BackendConfig::default()
        },
    );
    let mut req = b"GET / HTTP/1.1\r\nX-Filler: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 4000));
    req.extend_from_slice(b"\r\n\r\n");
    let resp = exchange(b.addr(), &req);
    assert!(
        resp.starts_with(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{:?}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(get(b.addr()).len(), 122);
}
}

both_drivers! {
fn slow_partial_head_gets_408_after_the_head_timeout() {
    let b = backend_with(
        1,
        BackendConfig {
            head_timeout: Duration::from_millis(300),
            ..BackendConfig::default()
        },
    );
    let started = Instant::now();
    let resp = exchange(b.addr(), b"GET / HTTP/1.1\r\nHost: x");
    assert!(resp.starts_with(b"HTTP/1.1 408 "), "{resp:?}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
}
}

both_drivers! {
fn unknown_path_is_404_and_post_is_405() {
    let b = backend(1);
    let resp = exchange(b.addr(), b"GET /missing HTTP/1.0\r\n\r\n");
    assert!(resp.starts_with(b"HTTP/1.1 404 Not Found\r\n"));
    let resp = exchange(b.addr(), b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc");
    assert!(resp.starts_with(b"HTTP/1.1 405 Method Not Allowed\r\n"));
    assert!(String::from_utf8_lossy(&resp).contains("Allow: GET, HEAD\r\n"));
}
}

both_drivers! {
fn head_request_gets_headers_only() {
    let b = backend(1);
    let resp = exchange(b.addr(), b"HEAD / HTTP/1.0\r\n\r\n");
    assert!(resp.starts_with(b"HTTP/1.1 200 OK\r\n"));
    assert!(resp.ends_with(b"Content-Length: 5\r\nConnection: close\r\n\r\n"));
}
}

both_drivers! {
fn one_executor_serves_several_listeners_with_their_own_ids() {
    let b = backend(3);
    for &addr in &b.addrs {
        assert_eq!(server_of(&get(addr)), id_of(addr));
    }
}
}

both_drivers! {
fn graceful_stop_finishes_a_request_in_progress() {
    let b = backend(1);
    let mut s = TcpStream::connect(b.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n").unwrap();
    // Let the server accept and start reading before the stop.
    std::thread::sleep(Duration::from_millis(100));
    b.shutdown.trigger();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b"\r\n").unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    assert_eq!(resp.len(), 122);
    let stats = b.stop();
    assert_eq!(stats[0][0].ok, 1);
}
}

both_drivers! {
fn curl_gets_200_and_404() {
    require("curl", "curl");
    let b = backend(1);
    let status = |path: &str| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("http://{}{path}", b.addr()))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(status("/"), "200");
    assert_eq!(status("/nope"), "404");
}
}

both_drivers! {
/// A response that closes the connection carries the FIN in its last segment: the client
/// receives SYN-ACK, the ACK of its request and one data+FIN segment, not a fourth for the FIN.
fn closing_response_and_fin_arrive_in_one_segment() {
    let server = common::backend(1);
    for _ in 0..3 {
        let (resp, segments) =
            common::exchange_counting_segments(server.addr(), b"GET / HTTP/1.0\r\n\r\n");
        assert_lab_response(&resp, &common::id_of(server.addr()));
        assert!(
            segments <= 3,
            "{segments} segments received, expected at most 3"
        );
    }
}
}
