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

/// Whether any socket listens on `port` (IPv4 or IPv6). Asked of the kernel's sock_diag
/// netlink interface for listening sockets only, so the kernel walks its listening table and
/// not every connection: reading `/proc/net/tcp` instead took 5.2 s on a host with 130 000
/// sockets. When the question cannot be asked, a listener is assumed, so the caller fails fast
/// rather than waiting.
fn has_listener(port: u16) -> bool {
    [libc::AF_INET, libc::AF_INET6]
        .iter()
        .any(|&family| listening_ports(family as u8).map_or(true, |ports| ports.contains(&port)))
}

/// `struct inet_diag_sockid` (linux/inet_diag.h); ports are big-endian.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
struct InetDiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`, as far as the socket id.
#[repr(C)]
struct InetDiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: InetDiagSockId,
}

/// The local ports of every listening TCP socket of `family`, from one sock_diag dump.
fn listening_ports(family: u8) -> io::Result<Vec<u16>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const TCP_LISTEN: u32 = 10;
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned here.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    #[repr(C)]
    struct Request {
        header: libc::nlmsghdr,
        body: InetDiagReq,
    }
    let request = Request {
        header: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Request>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        body: InetDiagReq {
            family,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: 1 << TCP_LISTEN,
            id: InetDiagSockId::default(),
        },
    };
    // SAFETY: `request` is a plain struct of the length given; the kernel copies it.
    let sent = unsafe {
        libc::send(
            raw,
            (&request as *const Request).cast(),
            std::mem::size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ports = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    let header_len = std::mem::size_of::<libc::nlmsghdr>();
    loop {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n == 0 {
            return Ok(ports);
        }
        let mut at = 0;
        while at + header_len <= n {
            // SAFETY: bounds checked above; read_unaligned copes with any alignment.
            let header: libc::nlmsghdr =
                unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
            let len = header.nlmsg_len as usize;
            if len < header_len || at + len > n {
                return Ok(ports);
            }
            match header.nlmsg_type as libc::c_int {
                libc::NLMSG_DONE => return Ok(ports),
                libc::NLMSG_ERROR => {
                    return Err(io::Error::other("sock_diag refused the listener dump"));
                }
                _ if len >= header_len + std::mem::size_of::<InetDiagMsg>() => {
                    // SAFETY: the message holds at least an inet_diag_msg (checked above).
                    let msg: InetDiagMsg =
                        unsafe { std::ptr::read_unaligned(buf[at + header_len..].as_ptr().cast()) };
                    ports.push(u16::from_be(msg.id.sport));
                }
                _ => {}
            }
            // Messages are 4-byte aligned.
            at += (len + 3) & !3;
        }
    }
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
    fn listeners_are_found_by_sock_diag() {
        let l = bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(has_listener(l.local_addr().unwrap().port()));
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        assert!(has_listener(v6.local_addr().unwrap().port()));
    }

    /// A port held only by a connection (a client's ephemeral port) is not a listener, so a
    /// server waits for it to clear instead of failing.
    #[test]
    fn a_port_held_by_a_connection_is_not_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_served, _) = l.accept().unwrap();
        drop(l);
        assert!(!has_listener(client.local_addr().unwrap().port()));
    }

    #[test]
    fn a_port_in_use_is_refused_even_with_reuseport() {
        let first = bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        let err = bind_one(first.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("cannot listen on 127.0.0.1:"));
    }
}
