//! The balancer's HTTP mode (`--mode http`) over real sockets: pooled keep-alive backend
//! connections, HTTP/1.0 and 1.1 clients, bodies both ways, the pool's retry rule, 502/503/504,
//! pipelining, smuggling shapes, the policies, and real ab, curl and wrk through it.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ringlab::serve::backend::{BackendConfig, Delay};
use ringlab::serve::balancer::{BalancerConfig, Mode};
use ringlab::serve::policy::Policy;

/// An HTTP-mode balancer in front of `backends`.
fn http_lb(backends: &[SocketAddr]) -> Running<ringlab::serve::balancer::BalancerReport> {
    http_lb_with(BalancerConfig::new(backends.to_vec()))
}

fn http_lb_with(config: BalancerConfig) -> Running<ringlab::serve::balancer::BalancerReport> {
    balancer_with(
        BalancerConfig {
            mode: Mode::Http,
            ..config
        },
        1,
    )
}

/// Reads responses until the connection ends or `count` complete responses (by Content-Length
/// or chunked) came; returns their heads and bodies.
fn responses(s: &mut TcpStream, count: usize) -> Vec<(String, Vec<u8>)> {
    responses_skipping_bodies(s, count, &[])
}

/// As [`responses`], for responses to HEAD requests at the positions in `head_only` (no body
/// follows their heads, whatever the headers say).
fn responses_skipping_bodies(
    s: &mut TcpStream,
    count: usize,
    head_only: &[usize],
) -> Vec<(String, Vec<u8>)> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut out = Vec::new();
    while out.len() < count {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return out;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let body = match header(&head, "content-length") {
            _ if head_only.contains(&out.len()) => Vec::new(),
            Some(n) => {
                let mut body = vec![0u8; n.parse().unwrap()];
                r.read_exact(&mut body).unwrap();
                body
            }
            None if header(&head, "transfer-encoding").is_some() => read_chunked(&mut r),
            None => Vec::new(),
        };
        out.push((head, body));
    }
    out
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

fn read_chunked(r: &mut impl BufRead) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        r.read_line(&mut size).unwrap();
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
        if n == 0 {
            let mut end = String::new();
            r.read_line(&mut end).unwrap();
            return body;
        }
        let mut chunk = vec![0u8; n + 2];
        r.read_exact(&mut chunk).unwrap();
        body.extend_from_slice(&chunk[..n]);
    }
}

/// A stand-in HTTP/1.1 backend: keep-alive, reads bodies by Content-Length or chunked, and
/// answers with the request body echoed (chunked when the request carried `X-Reply: chunked`).
/// `behave` may answer differently; it returns false to use the echo. Counts requests by method.
fn stand_in(
    behave: impl Fn(&str, &mut TcpStream) -> bool + Send + Sync + 'static,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let behave = Arc::new(behave);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let (log, behave) = (log.clone(), behave.clone());
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                loop {
                    let mut head = String::new();
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        head.push_str(&line);
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let method = head.split(' ').next().unwrap_or("").to_string();
                    log.lock().unwrap().push(method.clone());
                    let body = match header(&head, "content-length") {
                        Some(n) => {
                            let mut b = vec![0u8; n.parse().unwrap()];
                            r.read_exact(&mut b).unwrap();
                            b
                        }
                        None if header(&head, "transfer-encoding").is_some() => {
                            read_chunked(&mut r)
                        }
                        None => Vec::new(),
                    };
                    if behave(&head, &mut w) {
                        continue;
                    }
                    let reply = if header(&head, "x-reply").as_deref() == Some("chunked") {
                        let mut r =
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                        for part in body.chunks(7) {
                            r.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                            r.extend_from_slice(part);
                            r.extend_from_slice(b"\r\n");
                        }
                        r.extend_from_slice(b"0\r\n\r\n");
                        r
                    } else {
                        let mut r =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                                .into_bytes();
                        r.extend_from_slice(&body);
                        r
                    };
                    if w.write_all(&reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

both_drivers! {
/// New client connections, one request each, reuse pooled backend connections: the backends
/// accept far fewer connections than they answer requests.
fn keep_alive_backend_connections_are_pooled_and_reused() {
    let b = backend(4);
    let lb = http_lb(&b.addrs);
    let r = ringlab::lab::client::run(bench_config(lb.addr(), 400, 1)).unwrap();
    assert_eq!((r.complete, r.failed.total()), (400, 0));
    assert_eq!(r.total_bytes, 400 * 122, "the lab's 122 bytes per response");
    assert_eq!(r.backends.iter().map(|b| b.1).collect::<Vec<_>>(), [100; 4]);
    let report = &lb.stop()[0];
    assert!(report.http.pooled >= 390, "{:?}", report.http);
    let accepted: u64 = b.stop()[0].iter().map(|s| s.connections).sum();
    assert!(accepted <= 8, "{accepted} backend connections for 400 requests");
}
}

both_drivers! {
/// HTTP/1.0 without keep-alive is closed after its response; 1.0 with keep-alive and 1.1 stay
/// open; the Connection field is the balancer's own on each side.
fn http10_and_http11_clients_get_their_own_connection_handling() {
    let b = backend(1);
    let lb = http_lb(&b.addrs);
    let mut s = TcpStream::connect(lb.addr()).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let got = responses(&mut s, 2);
    assert_eq!(got.len(), 1, "closed after one");
    assert_eq!(header(&got[0].0, "connection").as_deref(), Some("close"));
    assert_eq!(got[0].0.len() + got[0].1.len(), 122);

    let mut s = TcpStream::connect(lb.addr()).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
    let first = responses(&mut s, 1);
    assert_eq!(header(&first[0].0, "connection").as_deref(), Some("keep-alive"));
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let second = responses(&mut s, 1);
    assert!(second[0].0.starts_with("HTTP/1.1 200 "), "{second:?}");
    assert_eq!(header(&second[0].0, "connection"), None);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let last = responses(&mut s, 2);
    assert_eq!(last.len(), 1);
    assert_eq!(header(&last[0].0, "connection").as_deref(), Some("close"));
}
}

both_drivers! {
/// Request bodies by Content-Length and chunked reach the backend, and chunked and
/// Content-Length responses reach the client, byte for byte.
fn bodies_pass_both_ways_by_length_and_chunked() {
    let (echo, _) = stand_in(|_, _| false);
    let lb = http_lb(&[echo]);
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut s = TcpStream::connect(lb.addr()).unwrap();
    let mut req = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    req.extend_from_slice(&payload);
    s.write_all(&req).unwrap();
    assert_eq!(responses(&mut s, 1)[0].1, payload);

    // Chunked both ways, sent in pieces so the body streams through.
    s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Reply: chunked\r\n\r\n")
        .unwrap();
    for part in payload.chunks(4096) {
        s.write_all(format!("{:x}\r\n", part.len()).as_bytes()).unwrap();
        s.write_all(part).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let got = responses(&mut s, 1);
    assert_eq!(header(&got[0].0, "transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(got[0].1, payload);
}
}

both_drivers! {
/// A pooled connection its backend closed while idle: a GET sent on it is sent again on a fresh
/// connection and answered; a POST never goes on a pooled connection, and a POST its backend
/// drops is a 502, sent once.
fn a_pooled_connection_closed_by_its_backend_is_retried_for_get_not_for_post() {
    // Answers, then closes the connection a moment later (as a backend's idle timeout does),
    // without saying so.
    let (addr, seen) = stand_in(|head, w| {
        if head.starts_with("POST") {
            // Takes the request and drops the connection without a byte.
            let _ = w.shutdown(std::net::Shutdown::Both);
            return true;
        }
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let w = w.try_clone().unwrap();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = w.shutdown(std::net::Shutdown::Both);
        });
        true
    });
    let lb = http_lb(&[addr]);
    for _ in 0..3 {
        assert!(get(lb.addr()).ends_with(b"ok"));
        std::thread::sleep(Duration::from_millis(150));
    }
    let resp = exchange(
        lb.addr(),
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    );
    assert!(resp.starts_with(b"HTTP/1.1 502 "), "{:?}", String::from_utf8_lossy(&resp));
    let report = &lb.stop()[0];
    assert!(report.http.retried >= 2, "{:?}", report.http);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.iter().filter(|m| *m == "POST").count(), 1, "{seen:?}");
}
}

both_drivers! {
/// A broken response is a 502, a backend that does not answer in time a 504, and with nothing
/// reachable a 503.
fn broken_silent_and_missing_backends_get_502_504_and_503() {
    let (garbage, _) = stand_in(|_, w| {
        let _ = w.write_all(b"NOT HTTP AT ALL\r\n\r\n");
        true
    });
    let lb = http_lb(&[garbage]);
    let resp = get(lb.addr());
    assert!(resp.starts_with(b"HTTP/1.1 502 "), "{:?}", String::from_utf8_lossy(&resp));
    drop(lb);

    let (silent, _) = stand_in(|_, _| {
        std::thread::sleep(Duration::from_secs(3));
        true
    });
    let mut config = BalancerConfig::new(vec![silent]);
    config.response_timeout = Duration::from_millis(300);
    let lb = http_lb_with(config);
    let started = Instant::now();
    let resp = get(lb.addr());
    assert!(resp.starts_with(b"HTTP/1.1 504 "), "{:?}", String::from_utf8_lossy(&resp));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(lb.stop()[0].http.gateway_timeout, 1);

    let nobody = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let lb = http_lb(&[nobody]);
    assert!(get(lb.addr()).starts_with(b"HTTP/1.1 503 "));
}
}

both_drivers! {
/// Pipelined requests are answered in order, each by the backend the rotation chose.
fn pipelined_requests_are_answered_in_order() {
    let b = backend(2);
    let lb = http_lb(&b.addrs);
    let mut s = TcpStream::connect(lb.addr()).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /missing HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let got = responses_skipping_bodies(&mut s, 5, &[2]);
    let statuses: Vec<&str> = got.iter().map(|(h, _)| &h[9..12]).collect();
    assert_eq!(statuses, ["200", "404", "200", "200"]);
    assert!(got[2].1.is_empty(), "a HEAD response has no body");
    let servers: Vec<String> = got.iter().map(|(h, _)| header(h, "server").unwrap()).collect();
    assert_eq!(servers[0], servers[2]);
    assert_ne!(servers[0], servers[1]);
}
}

both_drivers! {
/// The request-smuggling shapes are refused with 400 and a close, never passed on.
fn smuggling_shapes_are_refused_with_400() {
    let (addr, seen) = stand_in(|_, _| false);
    let lb = http_lb(&[addr]);
    for bad in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        // HTTP/2 with prior knowledge is not spoken: its preface is no HTTP/1 request.
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ] {
        let resp = exchange(lb.addr(), bad);
        assert!(
            resp.starts_with(b"HTTP/1.1 400 "),
            "{:?} -> {:?}",
            String::from_utf8_lossy(bad),
            String::from_utf8_lossy(&resp)
        );
    }
    // A malformed chunk size: the head passed, the body is refused mid-way.
    let resp = exchange(
        lb.addr(),
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    );
    assert!(resp.starts_with(b"HTTP/1.1 400 "), "{:?}", String::from_utf8_lossy(&resp));
    assert!(
        seen.lock().unwrap().is_empty(),
        "a refused request reached the backend"
    );
}
}

both_drivers! {
/// `Expect: 100-continue` is answered by the balancer, and Upgrade gets a clear 501.
fn expect_continue_is_answered_and_upgrade_is_refused_clearly() {
    let (echo, _) = stand_in(|_, _| false);
    let lb = http_lb(&[echo]);
    let mut s = TcpStream::connect(lb.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").unwrap();
    assert_eq!(responses(&mut s, 1)[0].1, b"hello");

    let resp = exchange(
        lb.addr(),
        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert!(resp.starts_with(b"HTTP/1.1 501 "), "{:?}", String::from_utf8_lossy(&resp));
    assert!(String::from_utf8_lossy(&resp).contains("--mode tcp"));
}
}

/// Four backends, one slow: the requests each policy sends to each, at `c` in flight.
fn spread_with_one_slow(policy: Policy, c: usize, n: u64) -> (Vec<u64>, u64) {
    let fast = backend(3);
    let slow = backend_with(
        1,
        BackendConfig {
            delay: Delay::Fixed(Duration::from_millis(20)),
            ..BackendConfig::default()
        },
    );
    let mut addrs = fast.addrs.clone();
    addrs.push(slow.addr());
    let mut config = BalancerConfig::new(addrs.clone());
    config.policy = policy;
    let lb = http_lb_with(config);
    let r = ringlab::lab::client::run(bench_config(lb.addr(), n, c)).unwrap();
    assert_eq!(r.failed.total(), 0);
    let per = addrs
        .iter()
        .map(|a| {
            r.backends
                .iter()
                .find(|(name, _)| *name == id_of(*a))
                .map_or(0, |b| b.1)
        })
        .collect();
    (per, r.latency_us.p99)
}

both_drivers! {
/// Round robin sends the slow backend its quarter; least-conn and p2c send it far less, because
/// its requests stay in flight longer.
fn least_conn_and_p2c_route_around_a_slow_backend() {
    let (rr, _) = spread_with_one_slow(Policy::RoundRobin, 8, 400);
    assert_eq!(rr[3], 100, "{rr:?}");
    for policy in [Policy::LeastConn, Policy::P2c] {
        let (spread, _) = spread_with_one_slow(policy, 8, 400);
        assert!(spread[3] < 40, "{policy}: {spread:?}");
    }
}
}

both_drivers! {
/// Real ab, curl and wrk through the HTTP mode.
fn ab_curl_and_wrk_through_the_http_mode() {
    require("ab", "apache2-utils");
    require("curl", "curl");
    let b = backend(4);
    let lb = http_lb(&b.addrs);
    let url = format!("http://{}/", lb.addr());
    let out = std::process::Command::new("ab")
        .args(["-q", "-n", "400", "-c", "5", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Complete requests:      400"), "{text}");
    assert!(text.contains("Failed requests:        0"), "{text}");
    assert!(text.contains("Total transferred:      48800 bytes"), "{text}");
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &url])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    if std::process::Command::new("sh")
        .args(["-c", "command -v wrk"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        let out = std::process::Command::new("wrk")
            .args(["-t1", "-c8", "-d1s", &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("Socket errors"), "{text}");
        assert!(!text.contains("Non-2xx"), "{text}");
    }
}
}
