//! The built-in client (`ringlab bench`) against real servers, checked against real ab.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use common::*;
use ringlab::lab::client::{self, BenchResult};

/// Runs ab and returns (complete, failed, total transferred, the Failed breakdown line).
fn ab(args: &[&str], url: &str) -> (u64, u64, u64, String) {
    require("ab", "apache2-utils");
    let out = Command::new("ab").args(args).arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "ab failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let num = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let breakdown = text
        .lines()
        .find(|l| l.trim_start().starts_with("(Connect:"))
        .unwrap_or("")
        .trim()
        .to_string();
    (
        num("Complete requests:"),
        num("Failed requests:"),
        num("Total transferred:"),
        breakdown,
    )
}

fn breakdown(r: &BenchResult) -> String {
    let f = &r.failed;
    if f.total() == 0 {
        return String::new();
    }
    format!(
        "(Connect: {}, Receive: {}, Length: {}, Exceptions: {})",
        f.connect, f.receive, f.length, f.exceptions
    )
}

both_drivers! {
fn counts_bytes_and_backends_exactly() {
    let b = backend(4);
    let lb = balancer(&b.addrs);
    let r = client::run(bench_config(lb.addr(), 400, 3)).unwrap();
    assert_eq!(r.complete, 400);
    assert_eq!(r.failed.total(), 0);
    assert_eq!(r.non_2xx, 0);
    assert_eq!(r.total_bytes, 400 * 122);
    assert_eq!(r.html_bytes, 400 * 5);
    assert_eq!(r.document_length, 5);
    let spread: Vec<u64> = r.backends.iter().map(|b| b.1).collect();
    assert_eq!(spread, [100, 100, 100, 100]);
    assert!(r.latency_us.p50 > 0 && r.latency_us.p50 <= r.latency_us.p99);
    assert!(r.latency_us.p99 <= r.latency_us.max);
    assert!(r.requests_per_sec() > 0.0);
}
}

both_drivers! {
fn agrees_with_ab_on_the_same_target() {
    let b = backend(1);
    let url = format!("http://{}/", b.addr());
    let (complete, failed, total, _) = ab(&["-q", "-n", "300", "-c", "3"], &url);
    let r = client::run(bench_config(b.addr(), 300, 3)).unwrap();
    assert_eq!(
        (r.complete, r.failed.total(), r.total_bytes),
        (complete, failed, total)
    );
}
}

both_drivers! {
fn keep_alive_reuses_connections_like_ab_k() {
    let b = backend(1);
    let url = format!("http://{}/", b.addr());
    let (complete, failed, total, _) = ab(&["-q", "-k", "-n", "200", "-c", "2"], &url);
    let mut cfg = bench_config(b.addr(), 200, 2);
    cfg.keep_alive = true;
    let r = client::run(cfg).unwrap();
    assert_eq!(
        (r.complete, r.failed.total(), r.total_bytes),
        (complete, failed, total)
    );
    // As ab counts them: every response that kept its connection open (ab -k says 200 here).
    assert_eq!(r.keep_alive_requests, 200);
    let stats = b.stop();
    // 200 requests over two connections (ab's two plus ours).
    assert_eq!(stats[0][0].connections, 4);
}
}

/// A server whose response bodies alternate between 5 and 10 bytes, and which closes every
/// third connection without answering: ab calls both "Length" failures.
fn flaky_server(connections: usize) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        for i in 0..connections {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            if i % 3 == 2 {
                continue; // close without a response
            }
            let body: &[u8] = if i % 2 == 0 {
                b"pong\n"
            } else {
                b"pong pong\n"
            };
            let head = format!(
                "HTTP/1.0 200 OK\r\nServer: flaky\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(body);
        }
    });
    (addr, handle)
}

both_drivers! {
fn length_failures_are_classified_as_ab_does() {
    let n = 30;
    let (addr, server) = flaky_server(n);
    let url = format!("http://{addr}/");
    let (complete, failed, total, ab_breakdown) = ab(&["-q", "-n", &n.to_string()], &url);
    server.join().unwrap();

    let (addr, server) = flaky_server(n);
    let r = client::run(bench_config(addr, n as u64, 1)).unwrap();
    server.join().unwrap();
    // 10 connections closed unanswered, and 10 of the 20 answers have the other body length.
    assert_eq!(r.failed.length, 20, "{:?}", r.failed);
    assert_eq!(
        (r.complete, r.failed.total(), r.total_bytes, breakdown(&r)),
        (complete, failed, total, ab_breakdown)
    );
}
}

both_drivers! {
fn a_reset_is_a_receive_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for i in 0..4 {
            let (s, _) = listener.accept().unwrap();
            let mut s = s;
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            if i == 0 {
                s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .unwrap();
            } else {
                // SO_LINGER with a zero timeout makes close() send a reset.
                let sock = socket2::SockRef::from(&s);
                sock.set_linger(Some(Duration::ZERO)).unwrap();
            }
        }
    });
    let r = client::run(bench_config(addr, 4, 1)).unwrap();
    server.join().unwrap();
    assert_eq!(r.complete, 4);
    assert_eq!(r.failed.receive, 3, "{:?}", r.failed);
}
}

both_drivers! {
fn non_2xx_responses_are_counted_not_failed() {
    let b = backend(1);
    let mut cfg = bench_config(b.addr(), 20, 2);
    cfg.target.path = "/missing".into();
    let r = client::run(cfg).unwrap();
    assert_eq!(r.non_2xx, 20);
    assert_eq!(r.failed.total(), 0);
}
}

both_drivers! {
fn a_dead_target_is_an_error_not_a_table_of_zeros() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let err = client::run(bench_config(port, 100, 2)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("did not answer"), "{msg}");
    assert!(msg.contains("refused"), "{msg}");
}
}

both_drivers! {
fn the_time_limit_stops_the_run() {
    let b = backend(1);
    let mut cfg = bench_config(b.addr(), u64::MAX, 2);
    cfg.time_limit = Some(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let r = client::run(cfg).unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(r.complete > 0);
    assert_eq!(r.failed.total(), 0);
}
}

fn ringlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringlab"))
}

both_drivers! {
fn json_output_carries_every_number() {
    let b = backend(1);
    let out = ringlab()
        .args(["bench", "-n", "50", "-c", "2", "--format", "json"])
        .args(io_flag())
        .arg(format!("http://{}/", b.addr()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["complete"], 50);
    assert_eq!(v["failed_total"], 0);
    assert_eq!(v["total_bytes"], 50 * 122);
    assert_eq!(v["html_bytes"], 250);
    for key in [
        "requests_per_sec",
        "time_per_request_ms",
        "time_per_request_all_ms",
        "transfer_rate_kbps",
        "elapsed_secs",
    ] {
        assert!(v[key].as_f64().unwrap() > 0.0, "{key}");
    }
    for key in ["connect", "receive", "length", "exceptions"] {
        assert_eq!(v["failed"][key], 0, "{key}");
    }
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_us"][key].as_u64().unwrap() > 0, "{key}");
    }
    for row in ["connect_ms", "processing_ms", "waiting_ms", "total_ms"] {
        for key in ["min", "mean", "sd", "median", "max"] {
            assert!(v[row][key].is_number(), "{row}.{key}");
        }
    }
}
}

both_drivers! {
fn text_and_markdown_read_like_the_lab() {
    let b = backend(1);
    let url = format!("http://{}/", b.addr());
    let text = ringlab()
        .args(["bench", "-n", "20", &url])
        .args(io_flag())
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    for line in [
        "Complete requests:      20",
        "Failed requests:        0",
        "Total transferred:      2440 bytes",
        "Requests per second:",
        "Connection Times (ms)",
    ] {
        assert!(text.contains(line), "{line:?} missing from\n{text}");
    }
    let md = ringlab()
        .args(["bench", "-n", "20", "--format", "markdown", &url])
        .args(io_flag())
        .output()
        .unwrap();
    let md = String::from_utf8(md.stdout).unwrap();
    assert!(md.starts_with("| No Test | Concurrency Level | Time taken for test |"));
    assert!(md.contains("| 1 | 1 | "));
    assert!(md.contains("| 20 | 0 | 2440 bytes |"));
}
}

both_drivers! {
fn the_cli_fails_cleanly_on_a_dead_target_and_a_bad_url() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = ringlab()
        .args(["bench", "-n", "5", &format!("http://127.0.0.1:{port}/")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("did not answer"), "{err}");
    let out = ringlab().args(["bench", "ftp://x/"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stderr).unwrap().contains("http://"));
}
}
