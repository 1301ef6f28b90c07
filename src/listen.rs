//! Binding listening sockets before any server starts, so servers (and tests) take listeners that
//! already exist, and a port in use is one clear error at start-up.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Listen backlog. Large enough that a burst from a closed-loop client at high concurrency queues
/// in the kernel instead of being refused; the kernel caps it at `net.core.somaxconn`.
pub const BACKLOG: i32 = 4096;

/// Binds one listener on `addr` and returns it with `count - 1` duplicates, one per executor:
/// the executors share a single accept queue, and whichever has time takes the next connection.
///
/// Measured on the lab's 2-core VM, with one balancer executor per core and the backends and the
/// client on the second core: `SO_REUSEPORT`'s per-executor queues hash connections evenly, so
/// the executor that shares its core gets as many as the free one, and the pair ran at 7.8k req/s
/// (HAProxy, whose threads share one queue, 8.3k). With one shared queue: 9.4k, at less CPU per
/// request, though both executors sometimes race for the same connection.
///
/// The socket still sets `SO_REUSEPORT` (a restarted server can bind while old connections linger)
/// and so would let a second process silently share a port that is already serving, so a plain
/// bind probes the address first: a port in use is refused here, with a message that names it.
/// Port 0 binds a free port.
pub fn bind_shared(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    if addr.port() != 0 {
        probe_free_or_wait(addr)?;
    }
    let listener = bind_reuseport(addr).map_err(|e| explain(addr, e))?;
    let mut listeners = Vec::with_capacity(count.max(1));
    for _ in 1..count.max(1) {
        listeners.push(listener.try_clone()?);
    }
    listeners.push(listener);
    Ok(listeners)
}

/// Binds one listener on `addr` (port in use is an error, as with [`bind_shared`]).
pub fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    bind_shared(addr, 1).map(|mut v| v.remove(0))
}

/// How long a closed connection can hold a port in TIME_WAIT on Linux (fixed at 60 s).
const TIME_WAIT: Duration = Duration::from_secs(61);

/// Probes `addr`; if it is taken only by TIME_WAIT leftovers of outgoing connections (heavy
/// loopback benchmarking hands fixed lab ports such as 44444 out as ephemeral client ports), waits
/// for them to expire instead of failing. A live listener fails at once.
fn probe_free_or_wait(addr: SocketAddr) -> io::Result<()> {
    let deadline = Instant::now() + TIME_WAIT;
    let mut told = false;
    loop {
        match probe_free(addr) {
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse
                    && !has_listener(addr.port())
                    && Instant::now() < deadline =>
            {
                if !told {
                    eprintln!(
                        "ringlab: {addr} is held by closed connections in TIME_WAIT; waiting up to \
                         60 s for them to clear. To keep lab ports out of the ephemeral range: \
                         sysctl -w net.ipv4.ip_local_reserved_ports=9002-9005,44444,45000,46000"
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

/// Whether any socket listens on `port` (IPv4 or IPv6), from `/proc/net/tcp*`.
fn has_listener(port: u16) -> bool {
    const LISTEN: &str = "0A";
    let wanted = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|path| {
        std::fs::read_to_string(path)
            .map(|table| {
                table.lines().skip(1).any(|line| {
                    let mut cols = line.split_whitespace();
                    let local = cols.nth(1).unwrap_or("");
                    let state = cols.nth(1).unwrap_or("");
                    state == LISTEN && local.ends_with(&wanted)
                })
            })
            // Unknown: assume a listener, so the caller fails fast rather than waiting.
            .unwrap_or(true)
    })
}

fn probe_free(addr: SocketAddr) -> io::Result<()> {
    let probe = new_socket(addr)?;
    // SO_REUSEADDR lets the probe pass over TIME_WAIT leftovers of an earlier run, but not over a
    // live listener; without SO_REUSEPORT it also cannot join another process's listener group.
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|e| explain(addr, e))
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = new_socket(addr)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    Socket::new(domain, Type::STREAM.cloexec(), Some(Protocol::TCP))
}

fn explain(addr: SocketAddr, err: io::Error) -> io::Error {
    let hint = match err.kind() {
        io::ErrorKind::AddrInUse => {
            " (another server is listening there; stop it or pick another port)"
        }
        io::ErrorKind::AddrNotAvailable => " (that address is not on this machine)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    };
    io::Error::new(err.kind(), format!("cannot listen on {addr}: {err}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's identity of the socket behind a descriptor.
    fn cookie(l: &TcpListener) -> u64 {
        use std::os::fd::AsRawFd;
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: `cookie` is a u64 the kernel fills; `len` says so.
        let rc = unsafe {
            libc::getsockopt(
                l.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        cookie
    }

    #[test]
    fn shared_listeners_are_one_socket_and_one_queue() {
        let ls = bind_shared("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(ls.len(), 3);
        let port = ls[0].local_addr().unwrap().port();
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
        assert!(ls.iter().all(|l| cookie(l) == cookie(&ls[0])));
    }

    #[test]
    fn listeners_are_found_in_proc() {
        let l = bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(has_listener(l.local_addr().unwrap().port()));
    }

    #[test]
    fn a_port_in_use_is_refused_even_with_reuseport() {
        let first = bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = bind_one(first.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("cannot listen on 127.0.0.1:"));
    }
}
