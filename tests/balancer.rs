//! The round-robin balancer, driven over real sockets against real backends.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use ringlab::serve::balancer::BalancerConfig;

both_drivers! {
fn rotation_over_four_backends_is_exact() {
    let b = backend(4);
    let lb = balancer(&b.addrs);
    let order: Vec<String> = (0..5).map(|_| server_of(&get(lb.addr()))).collect();
    let expected: Vec<String> = [0, 1, 2, 3, 0].iter().map(|&i| id_of(b.addrs[i])).collect();
    assert_eq!(order, expected);
}
}

both_drivers! {
fn a_stopped_backend_is_skipped_without_failing_a_request() {
    // Four single-listener backends, so one can be stopped alone.
    let mut backends: Vec<_> = (0..4).map(|_| backend(1)).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let mut config = BalancerConfig::new(addrs.clone());
    // Long enough that the dead backend is not tried again during the test.
    config.health.cooldown = Duration::from_secs(60);
    let lb = balancer_with(config, 1);
    backends.remove(1).stop();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..100 {
        let resp = get(lb.addr());
        assert_eq!(resp.len(), 122, "{:?}", String::from_utf8_lossy(&resp));
        *seen.entry(server_of(&resp)).or_insert(0) += 1;
    }
    assert!(!seen.contains_key(&id_of(addrs[1])));
    assert_eq!(seen.values().sum::<i32>(), 100);
    let report = &lb.stop()[0];
    assert_eq!(report.backends[1].connections, 0);
    // Passive health: after three refused connects it is out of rotation, not tried per client.
    assert_eq!(report.backends[1].connect_failures, 3);
    assert_eq!(report.unserved, 0);
}
}

both_drivers! {
fn with_every_backend_down_the_client_is_closed_at_once() {
    let dead: Vec<SocketAddr> = (0..2)
        .map(|_| {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        })
        .collect();
    let lb = balancer(&dead);
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(lb.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut resp = Vec::new();
    // Closed with the request unread, so the kernel may report a reset instead of an end.
    match s.read_to_end(&mut resp) {
        Ok(_) => assert!(resp.is_empty()),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let report = &lb.stop()[0];
    assert_eq!(report.unserved, 1);
}
}

/// A plain echo server: returns every byte it reads, then half-closes when the client does.
fn echo_server() -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            s.write_all(&buf[..n]).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
    });
    (addr, handle)
}

both_drivers! {
fn megabytes_both_ways_arrive_byte_identical() {
    let (echo, server) = echo_server();
    let lb = balancer(&[echo]);
    // A pseudo-random payload, so a dropped or reordered chunk cannot go unnoticed.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let payload: Vec<u8> = (0..6 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut client = TcpStream::connect(lb.addr()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut writer = client.try_clone().unwrap();
    let to_send = payload.clone();
    let sender = std::thread::spawn(move || {
        writer.write_all(&to_send).unwrap();
        // Half-close: the balancer must pass it on, and still deliver the echo back.
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(payload.len());
    client.read_to_end(&mut back).unwrap();
    sender.join().unwrap();
    server.join().unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "payload changed in transit");
    let report = &lb.stop()[0];
    assert_eq!(report.backends[0].bytes_up, payload.len() as u64);
    assert_eq!(report.backends[0].bytes_down, payload.len() as u64);
}
}

both_drivers! {
fn idle_pairs_are_closed_by_the_idle_timeout() {
    let (echo, _server) = echo_server();
    let mut config = BalancerConfig::new(vec![echo]);
    config.idle_timeout = Duration::from_secs(1);
    let lb = balancer_with(config, 1);
    let mut client = TcpStream::connect(lb.addr()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"ping").unwrap();
    let mut four = [0u8; 4];
    client.read_exact(&mut four).unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    // The balancer closes the silent pair; the read sees the end (or a reset) instead of hanging.
    let _ = client.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    assert_eq!(lb.stop()[0].idle_closed, 1);
}
}

both_drivers! {
fn two_executors_share_the_port_and_count_accepts_per_core() {
    let b = backend(4);
    let lb = balancer_with(BalancerConfig::new(b.addrs.clone()), 2);
    for _ in 0..200 {
        assert_eq!(get(lb.addr()).len(), 122);
    }
    let reports = lb.stop();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports.iter().map(|r| r.accepted).sum::<u64>(), 200);
}
}

both_drivers! {
fn ab_through_the_balancer_moves_the_labs_bytes() {
    require("ab", "apache2-utils");
    let b = backend(4);
    let lb = balancer(&b.addrs);
    let out = std::process::Command::new("ab")
        .args(["-n", "1000", "-c", "5", "-q"])
        .arg(format!("http://{}/", lb.addr()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ab failed: {text}");
    let field = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("Complete requests:"), "1000");
    assert_eq!(field("Failed requests:"), "0");
    assert_eq!(field("Total transferred:"), "122000 bytes");
    drop(lb);
    // Responses per backend, not connections: ab may open one spare connection it never uses.
    let per_backend: Vec<u64> = b.stop()[0].iter().map(|s| s.ok).collect();
    assert_eq!(per_backend, [250, 250, 250, 250]);
}
}

both_drivers! {
/// When a backend answers and closes, the balancer passes the answer and the end-of-file on
/// together: the client receives SYN-ACK, the ACK of its request and one data+FIN segment.
fn answer_and_fin_are_relayed_in_one_segment() {
    let be = backend(1);
    let lb = balancer(&[be.addr()]);
    for _ in 0..3 {
        let (resp, segments) = exchange_counting_segments(lb.addr(), b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(resp.len(), 122, "{:?}", String::from_utf8_lossy(&resp));
        assert!(
            segments <= 3,
            "{segments} segments received, expected at most 3"
        );
    }
}
}

both_drivers! {
/// A wildcard listener whose backend turns out to be itself (an address the start-up check
/// could not know about, stood in for here by calling `serve` without that check): the loop is
/// seen on the first connection that arrives from the balancer, refused, and the backend leaves
/// the rotation, instead of each connection making another until the cap.
fn a_connection_from_the_balancer_itself_is_refused_at_run_time() {
    let listener = ringlab::io::listen::bind_one("0.0.0.0:0".parse().unwrap()).unwrap();
    let port = listener.local_addr().unwrap().port();
    let itself: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut config = BalancerConfig::new(vec![itself]);
    config.health.cooldown = Duration::from_secs(60);
    let shutdown = ringlab::io::shutdown::Shutdown::new();
    let common = ringlab::serve::balancer::Common::new(&config, false);
    let stop = shutdown.clone();
    let ex = ringlab::io::placement::spawn_pinned("lb-loop", None, driver(), move || {
        ringlab::serve::balancer::serve(listener, config, common, false, stop)
    })
    .unwrap();
    let lb = running(vec![itself], shutdown, vec![ex]);
    for _ in 0..3 {
        let mut s = TcpStream::connect(itself).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty());
    }
    let report = &lb.stop()[0];
    assert!(report.self_loops >= 1, "{report:?}");
    // Three clients, each with at most a loop connection or two, not thousands.
    assert!(report.accepted <= 9, "{report:?}");
}
}

both_drivers! {
/// Pairs still open when the drain deadline passes are reset, not closed: a client in the middle
/// of an answer must not read a clean end.
fn pairs_still_open_at_the_drain_deadline_are_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stalled = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf);
        s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhalf").unwrap();
        std::thread::sleep(Duration::from_secs(10));
    });
    let mut config = BalancerConfig::new(vec![stalled]);
    config.drain_timeout = Duration::from_millis(200);
    let lb = balancer_with(config, 1);
    let mut client = TcpStream::connect(lb.addr()).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut half = [0u8; 23];
    client.read_exact(&mut half).unwrap();
    lb.shutdown.trigger();
    let mut rest = Vec::new();
    let end = client.read_to_end(&mut rest);
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    assert!(lb.stop()[0].idle_closed >= 1);
}
}
