//! A TCP connection that does its I/O with plain non-blocking system calls and waits, only after
//! one returned `EAGAIN`, on the executor's epoll set (see [`crate::io::readiness`]).
//!
//! Each wait used to arm an io_uring poll through a glommio stream; the profile showed the ring
//! operations and, worse, a reschedule IPI for most of them (io_uring's task work), where nginx
//! and HAProxy on epoll take almost none. Now a socket is added to the epoll set on its first
//! wait, once, and every later wait is a waker store.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};

use crate::io::readiness::{Direction, Registration};

/// A connected stream socket (TCP, or the stop watcher's socketpair) owned by the current
/// executor.
pub struct Conn {
    // Declared first so the descriptor is closed (leaving the epoll set) before the registration
    // frees its slot.
    fd: OwnedFd,
    registration: Registration,
    /// A short read found the peer's FIN queued: the next read returns 0 without a call.
    at_eof: Cell<bool>,
}

impl AsFd for Conn {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Conn {
    /// Wraps a connected (or connecting) non-blocking socket.
    pub fn new(fd: OwnedFd) -> Conn {
        let raw = fd.as_raw_fd();
        Conn {
            fd,
            registration: Registration::new(raw),
            at_eof: Cell::new(false),
        }
    }

    /// The socket's descriptor (for shutdown by a deadline and for socket options).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads into `buf`; 0 means the peer closed (or the read side was shut down).
    ///
    /// A read that comes back short drained the socket, so the next one waits for an event
    /// before calling `recv` (no `EAGAIN` round trip), unless the peer's FIN is known to be
    /// queued, in which case the next read returns 0 at once.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.at_eof.get() {
                return Ok(0);
            }
            if self.registration.ready(Direction::Read) {
                match try_recv(self.fd(), buf) {
                    Some(Ok(n)) => {
                        if n > 0 && n < buf.len() {
                            if self.registration.peer_closed() {
                                self.at_eof.set(true);
                            } else if !self.registration.hung_up() {
                                self.registration.clear(Direction::Read);
                            }
                        }
                        return Ok(n);
                    }
                    Some(Err(e)) => return Err(e),
                    None => self.registration.clear(Direction::Read),
                }
            }
            self.registration.wait(Direction::Read).await?;
        }
    }

    /// Whether the peer's end-of-file is known to be next: the last read was short and the FIN
    /// was already queued behind it.
    pub fn eof_pending(&self) -> bool {
        self.at_eof.get()
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        self.send_all(buf, 0).await
    }

    /// Sends all of `buf` with `flags`, waiting for room when the send buffer is full.
    async fn send_all(&self, mut buf: &[u8], flags: libc::c_int) -> io::Result<()> {
        while !buf.is_empty() {
            match send(self.fd(), buf, flags) {
                Some(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Some(Ok(n)) => buf = &buf[n..],
                Some(Err(e)) => return Err(e),
                None => self.registration.wait_drained(Direction::Write).await?,
            }
        }
        Ok(())
    }

    /// Writes all of `buf`, then sends a FIN riding on the last data segment. Each byte goes out
    /// with `MSG_MORE`, which holds the tail segment back until the `shutdown` that follows adds
    /// the FIN to it: the peer gets data and end-of-file in one packet (one receive, one wake-up)
    /// instead of two. The shutdown comes right after the send, so nothing stays held back.
    pub async fn write_all_and_finish(&self, buf: &[u8]) -> io::Result<()> {
        self.send_all(buf, libc::MSG_MORE).await?;
        self.shutdown_write()
    }

    /// Records that nothing can be readable yet (a connection that has not sent its first
    /// request), so the first read waits for an event instead of calling `recv` for `EAGAIN`.
    pub fn expect_nothing_yet(&self) {
        self.registration.clear(Direction::Read);
    }

    /// Sends a FIN: the peer reads end-of-file, and can still send to us.
    pub fn shutdown_write(&self) -> io::Result<()> {
        shutdown(self.fd(), libc::SHUT_WR)
    }
}

/// Shuts a socket down (`libc::SHUT_RD`, `SHUT_WR` or `SHUT_RDWR`).
pub fn shutdown(fd: RawFd, how: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor the caller keeps open.
    if unsafe { libc::shutdown(fd, how) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One non-blocking `recv`: `None` when it would block.
fn try_recv(fd: RawFd, buf: &mut [u8]) -> Option<io::Result<usize>> {
    // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is open while the caller holds it.
    nonblocking(|| unsafe {
        libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
    })
}

/// One non-blocking `send` with `flags` (`MSG_MORE`, or 0), never raising SIGPIPE: `None` when
/// it would block.
fn send(fd: RawFd, buf: &[u8], flags: libc::c_int) -> Option<io::Result<usize>> {
    let flags = flags | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is open while the caller holds it.
    nonblocking(|| unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) })
}

/// Runs a non-blocking syscall, retrying on EINTR: `None` for EAGAIN, else its result.
fn nonblocking(mut call: impl FnMut() -> isize) -> Option<io::Result<usize>> {
    loop {
        let n = call();
        if n >= 0 {
            return Some(Ok(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return None,
            io::ErrorKind::Interrupted => continue,
            _ => return Some(Err(err)),
        }
    }
}

/// Connects to `addr` with one non-blocking `connect(2)` instead of an io_uring connect linked to
/// a timeout (two ring operations and a wake-up). On loopback the handshake completes inside the
/// call, so the zero-length `send` that follows answers at once: 0 when connected, the connect's
/// error (refused) otherwise. Only a handshake still in flight waits, bounded by `timeout`.
pub async fn connect(addr: std::net::SocketAddr, timeout: std::time::Duration) -> io::Result<Conn> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let socket = socket2::Socket::new(
        domain,
        socket2::Type::STREAM.nonblocking().cloexec(),
        Some(socket2::Protocol::TCP),
    )?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let conn = Conn::new(OwnedFd::from(socket));
    // A zero-length send on a socket still connecting gets EAGAIN; once connected it returns 0,
    // and after a failed handshake it returns the connect's error.
    // Nothing can arrive before the request is sent.
    conn.expect_nothing_yet();
    if let Some(done) = send(conn.fd(), &[], 0) {
        return done.map(|_| conn);
    }
    // Still in flight: only now is a timer armed.
    let handshake = async {
        loop {
            match send(conn.fd(), &[], 0) {
                Some(done) => return done.map(|_| ()),
                None => conn.registration.wait_drained(Direction::Write).await?,
            }
        }
    };
    let expired = async {
        glommio::timer::sleep(timeout).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out"),
        ))
    };
    futures_lite::future::or(handshake, expired).await?;
    Ok(conn)
}
