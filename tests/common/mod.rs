//! Shared test scaffolding: real servers started in-process on `127.0.0.1:0`, stopped on drop,
//! and a raw-socket HTTP client that shows exactly the bytes on the wire.
#![allow(dead_code, unused_macros)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ringlab::io::driver::IoMode;
use ringlab::io::listen;
use ringlab::io::placement::Executor;
use ringlab::io::shutdown::Shutdown;
use ringlab::lab::client::{BenchConfig, RequestSpec, Target};
use ringlab::lab::pacer::Arrival;
use ringlab::serve::backend::{self, BackendConfig, ListenerStats};
use ringlab::serve::balancer::{self, BalancerConfig, BalancerReport};

/// A child process a test started, killed (by its pid) and reaped when the test ends however it
/// ends, so a failed assertion never leaves a server running.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling a child this test started and has not reaped, by its pid.
        if matches!(self.0.try_wait(), Ok(None)) {
            unsafe { libc::kill(self.0.id() as i32, libc::SIGKILL) };
        }
        let _ = self.0.wait();
    }
}

thread_local! {
    /// The socket driver of the test running on this thread (see [`both_drivers`]).
    static DRIVER: std::cell::Cell<IoMode> = const { std::cell::Cell::new(IoMode::Uring) };
}

/// Runs `test` with `io` as the driver of every server and client the helpers here start.
pub fn with_driver(io: IoMode, test: impl FnOnce()) {
    DRIVER.with(|d| d.set(io));
    test();
}

/// The driver of the running test.
pub fn driver() -> IoMode {
    DRIVER.with(|d| d.get())
}

/// `--io DRIVER` for a `ringlab` child process, the running test's driver.
pub fn io_flag() -> [String; 2] {
    ["--io".to_string(), driver().to_string()]
}

/// Turns one test into two, `NAME::uring` and `NAME::epoll`, each running the body with that
/// socket driver: a driver that loses a byte, leaks a descriptor or stalls a drain fails.
macro_rules! both_drivers {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body() $body

            #[test]
            fn uring() {
                $crate::common::with_driver(ringlab::io::driver::IoMode::Uring, body);
            }

            #[test]
            fn epoll() {
                $crate::common::with_driver(ringlab::io::driver::IoMode::Epoll, body);
            }
        }
    };
}

/// A running in-process server; dropping it stops it.
pub struct Running<T> {
    /// Where it listens.
    pub addrs: Vec<SocketAddr>,
    /// Trips its graceful stop.
    pub shutdown: Shutdown,
    executors: Vec<Executor<std::io::Result<T>>>,
}

impl<T> Running<T> {
    /// The first (often only) address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Stops gracefully and returns each executor's report.
    pub fn stop(mut self) -> Vec<T> {
        self.shutdown.trigger();
        std::mem::take(&mut self.executors)
            .into_iter()
            .map(|ex| ex.join().unwrap().unwrap())
            .collect()
    }
}

impl<T> Drop for Running<T> {
    fn drop(&mut self) {
        self.shutdown.trigger();
        for ex in self.executors.drain(..) {
            let _ = ex.join();
        }
    }
}

/// Wraps servers started by hand.
pub fn running<T>(
    addrs: Vec<SocketAddr>,
    shutdown: Shutdown,
    executors: Vec<Executor<std::io::Result<T>>>,
) -> Running<T> {
    Running {
        addrs,
        shutdown,
        executors,
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// `n` listeners on one backend executor.
pub fn backend(n: usize) -> Running<Vec<ListenerStats>> {
    backend_with(n, BackendConfig::default())
}

/// `n` listeners on one backend executor with a given configuration (on the test's driver).
pub fn backend_with(n: usize, config: BackendConfig) -> Running<Vec<ListenerStats>> {
    let config = BackendConfig {
        io: driver(),
        ..config
    };
    let listeners: Vec<_> = (0..n)
        .map(|_| listen::bind_one(loopback()).unwrap())
        .collect();
    let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let shutdown = Shutdown::new();
    let ex = backend::spawn(listeners, None, config, shutdown.clone()).unwrap();
    Running {
        addrs,
        shutdown,
        executors: vec![ex],
    }
}

/// A balancer with one executor in front of `backends`.
pub fn balancer(backends: &[SocketAddr]) -> Running<BalancerReport> {
    balancer_with(BalancerConfig::new(backends.to_vec()), 1)
}

/// A balancer with `executors` executors sharing the port (on the test's driver).
pub fn balancer_with(config: BalancerConfig, executors: usize) -> Running<BalancerReport> {
    let config = BalancerConfig {
        io: driver(),
        ..config
    };
    let listeners = listen::bind_shared(loopback(), executors).unwrap();
    let addr = listeners[0].local_addr().unwrap();
    let shutdown = Shutdown::new();
    let cpus = vec![None; executors];
    let exs = balancer::spawn(listeners, &cpus, config, shutdown.clone()).unwrap();
    Running {
        addrs: vec![addr],
        shutdown,
        executors: exs,
    }
}

/// Sends `request` on a fresh connection and reads until the server closes.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

/// `GET /` as ab sends it (HTTP/1.0, no keep-alive).
pub fn get(addr: SocketAddr) -> Vec<u8> {
    exchange(
        addr,
        b"GET / HTTP/1.0\r\nHost: x\r\nUser-Agent: test\r\n\r\n",
    )
}

/// The `Server` header value of a response.
pub fn server_of(response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    text.lines()
        .find_map(|l| l.strip_prefix("Server: "))
        .unwrap_or_else(|| panic!("no Server header in {text:?}"))
        .trim()
        .to_string()
}

/// The `ringlab-PPPPP` id of a listener address.
pub fn id_of(addr: SocketAddr) -> String {
    format!("ringlab-{:05}", addr.port())
}

/// Runs an external program, failing the test with an install hint when it is missing.
pub fn require(program: &str, package: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "`{program}` is needed by this test: apt-get install -y {package} (.ci/run does this)"
    );
}

/// A closed-loop client configuration: `requests` at `concurrency`, new connection per request.
pub fn bench_config(addr: SocketAddr, requests: u64, concurrency: usize) -> BenchConfig {
    BenchConfig {
        target: Target::from_addr(addr),
        request: RequestSpec::default(),
        rate: None,
        arrival: Arrival::Fixed,
        requests,
        concurrency,
        keep_alive: false,
        time_limit: None,
        timeout: Duration::from_secs(10),
        cpus: vec![None],
        io: driver(),
        stop: None,
    }
}

/// Sends `request` on a fresh connection, reads to end-of-file, and returns the response with
/// the number of TCP segments this end received (from `TCP_INFO`: the SYN-ACK included).
pub fn exchange_counting_segments(addr: SocketAddr, request: &[u8]) -> (Vec<u8>, u32) {
    use std::os::fd::AsRawFd;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    // SAFETY: `info` is a plain C struct the kernel fills up to `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    (out, info.tcpi_segs_in)
}

/// Runs `cmd` to the end and returns its output, failing the test (with the command's stderr)
/// unless it exited 0.
pub fn succeeds(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?} failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
