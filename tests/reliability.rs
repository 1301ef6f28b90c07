//! Bad days, at small scale: backends that die, come back or never answer; clients that are
//! slow, hostile or too many; stops under load. The heavy versions live in scripts/.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use ringlab::lab::client;
use ringlab::serve::backend::BackendConfig;
use ringlab::serve::balancer::BalancerConfig;

/// A backend on a fixed address (for restarting it on the same port).
fn backend_at(addr: SocketAddr) -> Running<Vec<ringlab::serve::backend::ListenerStats>> {
    let listener = ringlab::io::listen::bind_one(addr).unwrap();
    let shutdown = ringlab::io::shutdown::Shutdown::new();
    let ex = ringlab::serve::backend::spawn(
        vec![listener],
        None,
        BackendConfig::default(),
        shutdown.clone(),
    )
    .unwrap();
    common::running(vec![addr], shutdown, vec![ex])
}

both_drivers! {
fn a_restarted_backend_comes_back_into_rotation() {
    let mut backends: Vec<_> = (0..2).map(|_| backend(1)).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let mut config = BalancerConfig::new(addrs.clone());
    config.health.cooldown = Duration::from_millis(200);
    let lb = balancer_with(config, 1);
    backends.remove(1).stop();
    for _ in 0..20 {
        assert_eq!(get(lb.addr()).len(), 122);
    }
    let _back = backend_at(addrs[1]);
    std::thread::sleep(Duration::from_millis(300));
    let answered: Vec<String> = (0..20).map(|_| server_of(&get(lb.addr()))).collect();
    let from_restarted = answered.iter().filter(|s| **s == id_of(addrs[1])).count();
    assert!(from_restarted >= 9, "{answered:?}");
}
}

both_drivers! {
fn the_active_probe_takes_a_dead_backend_out_before_any_client_meets_it() {
    let mut backends: Vec<_> = (0..2).map(|_| backend(1)).collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr()).collect();
    let mut config = BalancerConfig::new(addrs.clone());
    config.health.fail_threshold = 1;
    config.health.cooldown = Duration::from_secs(60);
    config.health_interval = Some(Duration::from_millis(50));
    let lb = balancer_with(config, 1);
    backends.remove(1).stop();
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..10 {
        assert_eq!(get(lb.addr()).len(), 122);
    }
    let report = &lb.stop()[0];
    assert_eq!(report.backends[1].connect_failures, 0, "{report:?}");
    assert_eq!(report.backends[0].connections, 10);
}
}

/// A backend that takes connections and closes them without a byte, as a crashing server does.
fn black_hole() -> (SocketAddr, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf);
                    // Reset: the request is read, nothing is answered.
                    socket2::SockRef::from(&s)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    (addr, stop)
}

both_drivers! {
fn retry_unanswered_replays_the_request_to_the_next_backend() {
    let good = backend(1);
    let (hole, stop) = black_hole();
    let mut config = BalancerConfig::new(vec![hole, good.addr()]);
    config.retry_unanswered = Some(64 * 1024);
    // Keep the black hole in rotation: it accepts connects, so only replay can save these.
    config.health.fail_threshold = u32::MAX;
    let lb = balancer_with(config, 1);
    for _ in 0..20 {
        let resp = get(lb.addr());
        assert_eq!(resp.len(), 122, "{:?}", String::from_utf8_lossy(&resp));
    }
    let report = &lb.stop()[0];
    assert_eq!(report.retried, 10, "{report:?}");
    assert_eq!(report.backends[0].unanswered, 10);
    stop.store(true, Ordering::Relaxed);
}
}

both_drivers! {
fn without_retry_an_unanswered_request_fails_and_nothing_is_replayed() {
    let good = backend(1);
    let (hole, stop) = black_hole();
    let lb = balancer(&[hole, good.addr()]);
    let empty = (0..10)
        .filter(|_| {
            let mut s = TcpStream::connect(lb.addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            out.is_empty()
        })
        .count();
    assert_eq!(empty, 5);
    assert_eq!(lb.stop()[0].retried, 0);
    stop.store(true, Ordering::Relaxed);
}
}

both_drivers! {
fn a_request_larger_than_the_retry_buffer_is_not_replayed() {
    let good = backend(1);
    let (hole, stop) = black_hole();
    let mut config = BalancerConfig::new(vec![hole, good.addr()]);
    config.retry_unanswered = Some(16);
    config.health.fail_threshold = u32::MAX;
    let lb = balancer_with(config, 1);
    let mut s = TcpStream::connect(lb.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\nX-Long-Enough: to overflow\r\n\r\n")
        .unwrap();
    let mut resp = Vec::new();
    // The black hole resets, and the balancer passes that on as a reset: nothing is answered.
    let end = s.read_to_end(&mut resp);
    assert!(
        end.is_ok() || end.unwrap_err().kind() == std::io::ErrorKind::ConnectionReset,
        "the client neither got an end nor a reset"
    );
    assert!(resp.is_empty());
    let report = &lb.stop()[0];
    assert_eq!(report.retried, 0);
    assert_eq!(report.backends[0].backend_resets, 1, "{report:?}");
    stop.store(true, Ordering::Relaxed);
}
}

both_drivers! {
fn with_every_backend_down_the_balancer_stays_up_and_recovers() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = BalancerConfig::new(vec![port]);
    config.health.cooldown = Duration::from_millis(100);
    let lb = balancer_with(config, 1);
    for _ in 0..5 {
        let started = Instant::now();
        let mut s = TcpStream::connect(lb.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        assert!(out.is_empty() && started.elapsed() < Duration::from_secs(1));
    }
    let _up = backend_at(port);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(get(lb.addr()).len(), 122);
    let report = &lb.stop()[0];
    assert_eq!(report.unserved, 5);
}
}

both_drivers! {
fn the_connection_cap_holds_new_clients_in_the_backlog_until_a_place_frees() {
    // An echo backend that serves any number of connections at once.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut config = BalancerConfig::new(vec![echo]);
    config.max_conns = 1;
    let lb = balancer_with(config, 1);
    let mut first = TcpStream::connect(lb.addr()).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    first.write_all(b"a").unwrap();
    let mut one = [0u8; 1];
    first.read_exact(&mut one).unwrap();
    // The second client completes its TCP handshake (the kernel queues it) but is not served.
    let mut second = TcpStream::connect(lb.addr()).unwrap();
    second.write_all(b"b").unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(second.read_exact(&mut one).is_err(), "served past the cap");
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    second.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"b");
}
}

/// A closed-loop load that runs until told to stop.
fn endless_load(
    addr: SocketAddr,
) -> (
    std::thread::JoinHandle<std::io::Result<client::BenchResult>>,
    ringlab::io::shutdown::Shutdown,
) {
    let stop = ringlab::io::shutdown::Shutdown::new();
    let mut config = bench_config(addr, u64::MAX, 8);
    config.stop = Some(stop.clone());
    (std::thread::spawn(move || client::run(config)), stop)
}

/// Runs a closed-loop load against `addr`, calls `stop_server` mid-run, and checks that every
/// connection the server had accepted got its answer: after the stop new connects are refused
/// (Connect failures), and nothing accepted was reset or cut short. Returns (answered, `stop_server`'s
/// count of what it served).
fn stop_under_load(addr: SocketAddr, stop_server: impl FnOnce() -> u64) -> (u64, u64) {
    let (load, stop_load) = endless_load(addr);
    std::thread::sleep(Duration::from_millis(300));
    let served = stop_server();
    stop_load.trigger();
    let r = load.join().unwrap().unwrap();
    assert!(r.complete > 100, "{r:?}");
    assert_eq!(
        r.failed.receive + r.failed.length + r.failed.exceptions,
        0,
        "{:?}: {:?}",
        r.failed,
        r.first_error
    );
    (r.complete - r.failed.connect, served)
}

both_drivers! {
fn a_backend_stopped_under_load_resets_nobody_it_accepted() {
    let b = backend(1);
    let (answered, served) = stop_under_load(b.addr(), || b.stop()[0][0].ok);
    assert_eq!(served, answered);
}
}

both_drivers! {
fn the_balancer_stopped_under_load_resets_nobody_it_accepted() {
    let b = backend(2);
    let lb = balancer(&b.addrs);
    let (answered, relayed) = stop_under_load(lb.addr(), || {
        lb.stop()[0].backends.iter().map(|b| b.connections).sum()
    });
    assert_eq!(relayed, answered);
}
}

both_drivers! {
fn slow_and_hostile_clients_do_not_slow_anyone_else() {
    let b = backend_with(
        1,
        BackendConfig {
            head_timeout: Duration::from_millis(500),
            ..BackendConfig::default()
        },
    );
    let addr = b.addr();
    let done = Arc::new(AtomicBool::new(false));
    let mut pests = Vec::new();
    // Slow loris: a byte every 50 ms, never finishing the head.
    for _ in 0..20 {
        let done = done.clone();
        pests.push(std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let Ok(mut s) = TcpStream::connect(addr) else {
                    return;
                };
                for b in b"GET / HTTP/1.1\r\nX: ".iter().cycle() {
                    if done.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }));
    }
    // Garbage, early resets and half-open connections, as fast as they go.
    {
        let done = done.clone();
        pests.push(std::thread::spawn(move || {
            let mut i = 0u32;
            while !done.load(Ordering::Relaxed) {
                i += 1;
                let Ok(mut s) = TcpStream::connect(addr) else {
                    continue;
                };
                match i % 3 {
                    0 => {
                        let _ = s.write_all(&[0xff, 0x00, 0x13, 0x37, b'\r', b'\n', b'\r', b'\n']);
                    }
                    1 => {
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    }
                    _ => {
                        let _ = s.write_all(b"GET / HT");
                        let _ = s.shutdown(Shutdown::Write);
                    }
                }
            }
        }));
    }
    // One more slow client, watched: the server must cut it off with a 408.
    let mut watched = TcpStream::connect(addr).unwrap();
    watched.write_all(b"GET / HTTP/1.1\r\nX: ").unwrap();
    let pests_started = Instant::now();
    std::thread::sleep(Duration::from_millis(200));
    let r = client::run(bench_config(addr, 2000, 4)).unwrap();
    // Keep the slow clients going past their head timeout (500 ms, checked every 125 ms).
    let past_timeout = Duration::from_millis(900);
    std::thread::sleep(past_timeout.saturating_sub(pests_started.elapsed()));
    done.store(true, Ordering::Relaxed);
    for p in pests {
        p.join().unwrap();
    }
    assert_eq!(r.complete, 2000);
    assert_eq!(r.failed.total(), 0, "{:?}", r.failed);
    assert_eq!(get(addr).len(), 122);
    watched
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut cut_off = Vec::new();
    let _ = watched.read_to_end(&mut cut_off);
    assert!(cut_off.starts_with(b"HTTP/1.1 408 "), "{cut_off:?}");
    let stats = &b.stop()[0][0];
    assert!(
        stats.refused > 0,
        "the garbage was never refused: {stats:?}"
    );
}
}

both_drivers! {
fn a_thousand_idle_connections_do_not_fail_anyone() {
    // Both ends live in this process: two descriptors per idle connection.
    let n = (ringlab::io::limits::raise_nofile().saturating_sub(300) / 2).min(1000);
    assert!(n >= 400, "descriptor limit too low for this test");
    let b = backend(1);
    let idle: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(b.addr()).unwrap())
        .collect();
    let r = client::run(bench_config(b.addr(), 1000, 4)).unwrap();
    assert_eq!((r.complete, r.failed.total()), (1000, 0));
    drop(idle);
}
}

both_drivers! {
fn running_out_of_descriptors_pauses_accepting_and_recovers() {
    // A real server process with a tiny descriptor limit, so the test process keeps its own.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 48 && exec {} backend --listen {addr} --max-conns 1000 --io {}",
            env!("CARGO_BIN_EXE_ringlab"),
            driver()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Hold more connections than the server has descriptors.
    let hogs: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(hogs);
    std::thread::sleep(Duration::from_millis(300));
    let resp = get(addr);
    // SAFETY: signalling the child this test started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(resp.len(), 122);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("accept paused"), "{err}");
}
}

both_drivers! {
fn a_client_that_closes_without_sending_is_not_replayed() {
    let b = backend(2);
    let mut config = BalancerConfig::new(b.addrs.clone());
    config.retry_unanswered = Some(1024);
    let lb = balancer_with(config, 1);
    for _ in 0..4 {
        drop(TcpStream::connect(lb.addr()).unwrap());
    }
    assert_eq!(get(lb.addr()).len(), 122);
    let report = &lb.stop()[0];
    assert_eq!(report.retried, 0, "{report:?}");
}
}
