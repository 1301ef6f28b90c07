//! The open-loop client (`bench --rate`) against real servers: the pace it keeps, a server stall
//! charged to every request scheduled during it (and not in the uncorrected numbers), the
//! `.hgrm` spectrum it writes, and the request shapes ab users reach for (-m, -i, -H, -p).

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{backend, bench_config};
use ringlab::lab::client::{self, RequestSpec};
use ringlab::lab::pacer::Arrival;

/// A one-thread server answering each connection in turn; before answering request number
/// `stall_at` (counting from 0) it sleeps `stall`, so nothing else is answered meanwhile. Every
/// request's bytes are kept. Runs until the test process ends.
fn sequential_server(
    stall_at: Option<usize>,
    stall: Duration,
) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    thread::spawn(move || {
        for (i, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // The head, then a body by Content-Length if the head announces one.
            let complete = |r: &[u8]| {
                let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n") else {
                    return false;
                };
                let head = String::from_utf8_lossy(&r[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap_or(0));
                r.len() >= end + 4 + length
            };
            while !complete(&request) {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head_only = request.starts_with(b"HEAD ");
            kept.lock().unwrap().push(request);
            if Some(i) == stall_at {
                thread::sleep(stall);
            }
            let answer: &[u8] = if head_only {
                b"HTTP/1.0 200 OK\r\nServer: seq\r\nContent-Length: 5\r\n\r\n"
            } else {
                b"HTTP/1.0 200 OK\r\nServer: seq\r\nContent-Length: 5\r\n\r\nhello"
            };
            let _ = conn.write_all(answer);
        }
    });
    (addr, seen)
}

/// The corrected latency percentile `q` that a stall predicts: requests arrive every 1/`rate`,
/// one server answers them in order taking `service` each, and request `stall_at` holds it
/// `stall` longer. Each latency is its finish minus its intended start.
fn expected_percentile(
    n: usize,
    rate: f64,
    service: f64,
    stall_at: usize,
    stall: f64,
    q: f64,
) -> f64 {
    let mut free = 0.0f64;
    let mut latencies: Vec<f64> = (0..n)
        .map(|i| {
            let arrive = i as f64 / rate;
            let extra = if i == stall_at { stall } else { 0.0 };
            free = free.max(arrive) + service + extra;
            free - arrive
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    latencies[((q * n as f64).ceil() as usize).clamp(1, n) - 1]
}

both_drivers! {
    fn a_stall_is_charged_to_every_request_scheduled_during_it() {
        let stall = Duration::from_millis(100);
        let (n, rate, stall_at, c) = (2000usize, 2000.0, 1000usize, 5usize);
        let (addr, _) = sequential_server(Some(stall_at), stall);
        let mut config = bench_config(addr, n as u64, c);
        config.rate = Some(rate);
        let r = client::run(config).unwrap();
        assert_eq!(r.failed.total(), 0);
        let ol = r.open_loop.as_ref().expect("open-loop numbers");
        // The service time as the run itself saw it, from its uncorrected median.
        let service = ol.uncorrected_us.p50 as f64 / 1e6;
        for (q, measured) in [(0.95, r.histogram.value_at_quantile(0.95)), (0.99, r.latency_us.p99)] {
            let want = expected_percentile(n, rate, service, stall_at, stall.as_secs_f64(), q) * 1e6;
            let got = measured as f64;
            assert!(
                (got - want).abs() <= 0.1 * want + 3000.0,
                "corrected p{}: measured {got:.0} us, the stall predicts {want:.0} us",
                q * 100.0
            );
        }
        // Uncorrected, only the few requests in flight during the stall (at most -c) saw it:
        // far fewer than 1% of them, so its p99 stays small.
        assert!(
            (ol.uncorrected_us.p99 as f64) < 0.2 * r.latency_us.p99 as f64,
            "uncorrected p99 {} us vs corrected {} us",
            ol.uncorrected_us.p99,
            r.latency_us.p99
        );
        assert!(ol.late_waiting_for_connection > 100, "{ol:?}");
    }
}

both_drivers! {
    fn a_paced_run_achieves_the_offered_rate_when_the_server_keeps_up() {
        let lab = backend(1);
        for arrival in [Arrival::Fixed, Arrival::Poisson] {
            let mut config = bench_config(lab.addrs[0], 3000, 20);
            config.rate = Some(3000.0);
            config.arrival = arrival;
            let r = client::run(config).unwrap();
            let ol = r.open_loop.as_ref().unwrap();
            let achieved = r.requests_per_sec();
            // Poisson arrivals end where their random sum ends: allow its spread (1/sqrt(n)).
            let tolerance = if arrival == Arrival::Fixed { 0.01 } else { 0.06 };
            assert!(
                (achieved / 3000.0 - 1.0).abs() <= tolerance,
                "{arrival:?}: achieved {achieved:.1} of 3000 req/s"
            );
            assert_eq!(r.complete, 3000);
            assert_eq!(r.failed.total(), 0);
            assert!(!ol.client_bound);
            assert_eq!(ol.offered_rate, 3000.0);
        }
    }
}

both_drivers! {
    fn the_request_carries_method_headers_and_body_as_asked() {
        let (addr, seen) = sequential_server(None, Duration::ZERO);
        let mut config = bench_config(addr, 2, 1);
        config.request = RequestSpec {
            method: "PUT".into(),
            headers: vec![
                ("X-Lab".into(), "ringlab".into()),
                ("Host".into(), "example.test".into()),
            ],
            body: Some(b"a=1&b=2".to_vec()),
            content_type: "application/x-www-form-urlencoded".into(),
        };
        let r = client::run(config).unwrap();
        assert_eq!((r.complete, r.failed.total()), (2, 0));
        let seen = seen.lock().unwrap();
        let text = String::from_utf8_lossy(&seen[0]).into_owned();
        assert!(text.starts_with("PUT / HTTP/1.0\r\n"), "{text}");
        assert!(text.contains("\r\nX-Lab: ringlab\r\n"), "{text}");
        // The given Host replaces the default one.
        assert_eq!(text.matches("Host:").count(), 1, "{text}");
        assert!(text.contains("\r\nHost: example.test\r\n"), "{text}");
        assert!(text.contains("\r\nContent-Length: 7\r\n"), "{text}");
        assert!(text.contains("\r\nContent-Type: application/x-www-form-urlencoded\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\na=1&b=2"), "{text}");

        // HEAD: the answer's Content-Length announces a body that never comes, and none is read.
        let (addr, _) = sequential_server(None, Duration::ZERO);
        let mut config = bench_config(addr, 3, 1);
        config.request.method = "HEAD".into();
        let r = client::run(config).unwrap();
        assert_eq!((r.complete, r.failed.total(), r.html_bytes), (3, 0, 0));
    }
}

#[test]
fn latency_out_writes_a_percentile_spectrum_with_its_header_and_columns() {
    let lab = backend(1);
    let dir = tempfile::tempdir().unwrap();
    let hgrm = dir.path().join("run.hgrm");
    let out = common::succeeds(
        std::process::Command::new(env!("CARGO_BIN_EXE_ringlab"))
            .args([
                "bench",
                "--rate",
                "2k",
                "-n",
                "1000",
                "-c",
                "10",
                "--latency-out",
            ])
            .arg(&hgrm)
            .arg(format!("http://{}/", lab.addrs[0])),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for field in [
        "Offered rate:",
        "Achieved rate:",
        "Complete requests:      1000",
        "coordinated omission corrected",
    ] {
        assert!(stdout.contains(field), "no '{field}' in:\n{stdout}");
    }
    let text = std::fs::read_to_string(&hgrm).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
        ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    );
    let rows: Vec<(f64, f64, u64)> = lines
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() == 3 || f.len() == 4, "row '{l}'");
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert!(rows.len() > 10);
    assert!(
        rows.windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1 && w[0].2 <= w[1].2)
    );
    assert_eq!(rows.last().unwrap().1, 1.0);
    assert_eq!(rows.last().unwrap().2, 1000);
    assert!(text.contains("#[Max     ="), "{text}");
    assert!(text.contains("Total count    =         1000]"), "{text}");
}
