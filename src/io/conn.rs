//! A TCP connection on the current executor's driver: one type for every server, the balancer
//! and the client, with the io_uring driver or the epoll one behind it (see
//! [`crate::io::driver`]).
//!
//! Reads and writes take the caller's `Vec` by `&mut`: a read appends into its spare capacity,
//! a write sends its contents, and either way the `Vec` comes back. Under io_uring the operation
//! owns the buffer while the kernel uses it, so a future dropped mid-operation can never leave
//! the kernel writing into freed memory (the buffer then stays with the orphaned operation, and
//! the caller's `Vec` is left empty). Dropping a read loses no bytes: ones that had arrived are
//! kept for the next read. Dropping a write may have sent part of it: callers that drop a write
//! close the connection.

use std::cell::Cell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use crate::io::driver::epoll::{Direction, Registration};
use crate::io::driver::{Driver, IoMode, uring};
use crate::io::time;

/// A connected stream socket (TCP, or the stop watcher's socketpair) owned by the current
/// executor.
pub struct Conn {
    inner: Inner,
}

enum Inner {
    Epoll(EpollConn),
    /// Closed through the ring when the connection drops.
    Uring(Rc<uring::Socket>),
}

struct EpollConn {
    // Declared first so the descriptor is closed (leaving the epoll set) before the registration
    // frees its slot.
    fd: OwnedFd,
    registration: Registration,
    /// A short read found the peer's FIN queued: the next read returns 0 without a call.
    at_eof: Cell<bool>,
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor stays open for as long as the connection (and so the borrow).
        unsafe { BorrowedFd::borrow_raw(self.fd()) }
    }
}

impl Conn {
    /// Wraps a connected (or connecting) non-blocking socket for the current executor's driver.
    pub fn new(fd: OwnedFd) -> io::Result<Conn> {
        let driver = Driver::current()?;
        Ok(Conn::with_driver(fd, driver))
    }

    fn with_driver(fd: OwnedFd, driver: Rc<Driver>) -> Conn {
        let inner = match driver.mode() {
            IoMode::Epoll => {
                let raw = fd.as_raw_fd();
                Inner::Epoll(EpollConn {
                    fd,
                    registration: Registration::new(raw),
                    at_eof: Cell::new(false),
                })
            }
            IoMode::Uring => {
                let raw = fd.into_raw_fd();
                Inner::Uring(uring::Socket::new(raw, driver))
            }
        };
        Conn { inner }
    }

    /// The socket's descriptor (for shutdown by a deadline and for socket options).
    pub fn fd(&self) -> RawFd {
        match &self.inner {
            Inner::Epoll(c) => c.fd.as_raw_fd(),
            Inner::Uring(s) => s.fd(),
        }
    }

    /// Reads into the spare capacity of `buf`, appending; `Ok(0)` means the peer closed (or the
    /// read side was shut down), or `buf` had no room.
    pub async fn read(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match &self.inner {
            Inner::Epoll(c) => c.read(buf).await,
            Inner::Uring(s) => s.read(buf).await,
        }
    }

    /// Reads like [`Conn::read`], and says whether the peer's end-of-file is known to come
    /// right after what was read (its FIN was queued behind the data): a relay can then pass
    /// both on in one segment. The epoll driver knows it from `EPOLLRDHUP`, with no extra call;
    /// the uring driver links a one-byte peek to the read.
    pub async fn read_probing(&self, buf: &mut Vec<u8>) -> io::Result<(usize, bool)> {
        match &self.inner {
            Inner::Epoll(c) => {
                let n = c.read(buf).await?;
                Ok((n, n == 0 || c.at_eof.get()))
            }
            Inner::Uring(s) => s.read_probing(buf).await,
        }
    }

    /// Writes all of `buf` (which comes back unchanged).
    pub async fn write_all(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        self.send_all(buf, 0).await
    }

    async fn send_all(&self, buf: &mut Vec<u8>, flags: libc::c_int) -> io::Result<()> {
        match &self.inner {
            Inner::Epoll(c) => c.send_all(buf, flags).await,
            Inner::Uring(s) => s.send_all(buf, flags).await,
        }
    }

    /// Writes all of `buf`, then sends a FIN riding on the last data segment. Each byte goes out
    /// with `MSG_MORE`, which holds the tail segment back until the `shutdown` that follows adds
    /// the FIN to it: the peer gets data and end-of-file in one packet (one receive, one wake-up)
    /// instead of two. The shutdown comes right after the send completes, so nothing stays held
    /// back. (A plain `shutdown(2)` on both drivers: io_uring's always runs on a worker thread.)
    pub async fn write_all_and_finish(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        self.send_all(buf, libc::MSG_MORE).await?;
        self.shutdown_write()
    }

    /// Writes all of `buf` with the FIN riding on its last segment, like
    /// [`Conn::write_all_and_finish`], and closes the connection. On the uring driver the send
    /// and the close are one chain queued at once and the caller does not wait for either (the
    /// result is `Ok` unless queuing failed); use it when nothing would be done differently if
    /// the send failed, and nothing more is to be read (a close with unread bytes resets).
    pub async fn write_all_and_close(self, buf: &mut Vec<u8>) -> io::Result<()> {
        match &self.inner {
            Inner::Epoll(_) => self.write_all_and_finish(buf).await,
            Inner::Uring(socket) => {
                socket.send_and_close(std::mem::take(buf));
                Ok(())
            }
        }
    }

    /// Records that nothing can be readable yet (a connection that has not sent its first
    /// request), so the first read waits for an event instead of calling `recv` for `EAGAIN`.
    pub fn expect_nothing_yet(&self) {
        if let Inner::Epoll(c) = &self.inner {
            c.registration.clear(Direction::Read);
        }
    }

    /// Sends a FIN: the peer reads end-of-file, and can still send to us.
    pub fn shutdown_write(&self) -> io::Result<()> {
        shutdown(self.fd(), libc::SHUT_WR)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Inner::Uring(socket) = &self.inner {
            socket.close();
        }
    }
}

impl EpollConn {
    /// A read that comes back short drained the socket, so the next one waits for an event
    /// before calling `recv` (no `EAGAIN` round trip), unless the peer's FIN is known to be
    /// queued, in which case the next read returns 0 at once.
    async fn read(&self, buf: &mut Vec<u8>) -> io::Result<usize> {
        let room = buf.capacity() - buf.len();
        if room == 0 {
            return Ok(0);
        }
        loop {
            if self.at_eof.get() {
                return Ok(0);
            }
            if self.registration.ready(Direction::Read) {
                match try_recv(self.fd.as_raw_fd(), buf) {
                    Some(Ok(n)) => {
                        if n > 0 && n < room {
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

    /// Sends all of `buf` with `flags`, waiting for room when the send buffer is full.
    async fn send_all(&self, buf: &[u8], flags: libc::c_int) -> io::Result<()> {
        let mut rest = buf;
        while !rest.is_empty() {
            match send(self.fd.as_raw_fd(), rest, flags) {
                Some(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Some(Ok(n)) => rest = &rest[n..],
                Some(Err(e)) => return Err(e),
                None => self.registration.wait_drained(Direction::Write).await?,
            }
        }
        Ok(())
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

/// One non-blocking `recv` into the spare capacity of `buf`: `None` when it would block.
fn try_recv(fd: RawFd, buf: &mut Vec<u8>) -> Option<io::Result<usize>> {
    let len = buf.len();
    let room = buf.capacity() - len;
    // SAFETY: the pointer and length describe `buf`'s spare capacity; `fd` is open while the
    // caller holds it.
    let got = nonblocking(|| unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().add(len).cast(),
            room,
            libc::MSG_DONTWAIT,
        )
    });
    if let Some(Ok(n)) = got {
        // SAFETY: the kernel initialised `n` bytes of the spare capacity.
        unsafe { buf.set_len(len + n) };
    }
    got
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

/// Connects to `addr`, giving up after `timeout`.
///
/// On the uring driver the connect is a ring operation (its timeout one of the executor's own
/// timers, not a second ring operation). On the epoll driver it is one non-blocking
/// `connect(2)`: on loopback the handshake completes inside the call, so the zero-length `send`
/// that follows answers at once (0 when connected, the connect's error otherwise), and only a
/// handshake still in flight waits.
pub async fn connect(addr: std::net::SocketAddr, timeout: Duration) -> io::Result<Conn> {
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
    let driver = Driver::current()?;
    let expired = async {
        time::sleep(timeout).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out"),
        ))
    };
    if driver.mode() == IoMode::Uring {
        let conn = Conn::with_driver(OwnedFd::from(socket), driver);
        let Inner::Uring(socket) = &conn.inner else {
            unreachable!("a uring driver makes uring sockets");
        };
        futures_lite::future::or(socket.connect(&addr.into()), expired).await?;
        return Ok(conn);
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let conn = Conn::with_driver(OwnedFd::from(socket), driver);
    let Inner::Epoll(c) = &conn.inner else {
        unreachable!("an epoll driver makes epoll sockets");
    };
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
                None => c.registration.wait_drained(Direction::Write).await?,
            }
        }
    };
    futures_lite::future::or(handshake, expired).await?;
    Ok(conn)
}
