//! A TCP connection that does its I/O with plain non-blocking system calls and asks io_uring
//! (through glommio) only to wait, and only when waiting is really needed.
//!
//! Measured on this lab's 2-core VM: glommio's stream arms an io_uring poll when it is created and
//! again after every short read, and each poll that completes from the other CPU makes the kernel
//! interrupt this one (a reschedule IPI, to run io_uring's task work): 1.7 IPIs per proxied
//! connection on the balancer's core, against almost none for nginx and HAProxy on epoll. So:
//!
//! - reads and writes are one `recv`/`send` with `MSG_DONTWAIT`, no poll armed;
//! - on `EAGAIN` a read first yields to the executor's other tasks a few times and retries: under
//!   load the bytes usually arrive meanwhile, and a retry costs one cheap syscall;
//! - only then does it wait, on a throwaway glommio stream over a `dup` of the socket, whose one
//!   creation poll is exactly the wait wanted (no early re-arm after the read).

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// Retries of a read that would block, each after letting the executor's other tasks run, before
/// arming a poll. Under load the bytes usually arrive within one or two.
pub const RETRIES_BEFORE_WAIT: usize = 2;

/// A connected TCP socket owned by the current executor.
pub struct Conn {
    fd: OwnedFd,
}

impl Conn {
    /// Wraps a connected socket.
    pub fn new(fd: OwnedFd) -> Conn {
        Conn { fd }
    }

    /// Takes over the socket of a glommio stream (the slow accept path hands those out).
    pub fn from_stream(stream: TcpStream) -> Conn {
        // glommio's stream has no `into_raw_fd`: keep a duplicate and let the stream close its
        // own descriptor. Its creation poll, never submitted, is dropped without a kernel call.
        // SAFETY: dup of a live descriptor; on failure (-1) the error surfaces on first use.
        let fd = unsafe { libc::dup(stream.as_raw_fd()) };
        drop(stream);
        // SAFETY: a fresh descriptor from `dup`, owned from here on.
        Conn::new(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// The socket's descriptor (for shutdown by a deadline and for socket options).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads into `buf`; 0 means the peer closed (or the read side was shut down).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            for attempt in 0..=RETRIES_BEFORE_WAIT {
                if let Some(done) = try_recv(self.fd(), buf) {
                    return done;
                }
                if attempt < RETRIES_BEFORE_WAIT {
                    glommio::executor().yield_now().await;
                }
            }
            self.wait_readable().await?;
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = match try_send(self.fd(), buf) {
                Some(r) => r?,
                // The socket buffer is full: let glommio wait for room and send.
                None => {
                    let mut waiter = self.waiter()?;
                    poll_fn(|cx| Pin::new(&mut waiter).poll_write(cx, buf)).await?
                }
            };
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Sends a FIN: the peer reads end-of-file, and can still send to us.
    pub fn shutdown_write(&self) -> io::Result<()> {
        shutdown(self.fd(), libc::SHUT_WR)
    }

    /// Waits until the socket is readable (data, end-of-file, an error, or a shutdown).
    async fn wait_readable(&self) -> io::Result<()> {
        let mut waiter = self.waiter()?;
        // The waiter's creation poll is pending, so an empty read waits for it, then returns 0
        // without reading (and without glommio arming a further poll).
        poll_fn(|cx| Pin::new(&mut waiter).poll_read(cx, &mut [])).await?;
        Ok(())
    }

    /// A throwaway glommio stream over a duplicate of the socket.
    fn waiter(&self) -> io::Result<TcpStream> {
        let dup = self.fd.try_clone()?;
        // SAFETY: `dup` is a fresh descriptor of this socket; ownership moves into the stream.
        Ok(unsafe { TcpStream::from_raw_fd(dup.into_raw_fd()) })
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
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is open while the caller holds it.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
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

/// One non-blocking `send` (never raising SIGPIPE): `None` when it would block.
fn try_send(fd: RawFd, buf: &[u8]) -> Option<io::Result<usize>> {
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes; `fd` is open while the caller holds it.
        let n = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
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
    if let Some(done) = try_send(conn.fd(), &[]) {
        done?;
        return Ok(conn);
    }
    let mut waiter = conn.waiter()?;
    waiter.set_write_timeout(Some(timeout))?;
    // A zero-length write on a socket still connecting gets EAGAIN, so glommio waits for
    // writability, then sends nothing.
    match poll_fn(|cx| Pin::new(&mut waiter).poll_write(cx, &[])).await {
        Ok(_) => Ok(conn),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {addr} timed out"),
        )),
        Err(e) => Err(e),
    }
}
