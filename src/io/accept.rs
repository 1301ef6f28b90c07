//! The accept loop every glommio server here shares: it stops when told, backs off instead of
//! spinning when the process runs out of descriptors or memory, and on a graceful stop hands over
//! the connections already queued in the kernel backlog instead of resetting them.

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::sync::{Gate, Semaphore, StaticPermit};

use crate::io::conn::Conn;
use crate::io::driver::epoll::{Direction, Registration};
use crate::io::driver::{self, Driver, IoMode, uring};
use crate::io::shutdown::LocalStop;
use crate::io::time;

/// How long to pause accepting after the process or system runs out of a resource. Short enough
/// to recover quickly once connections close, long enough not to burn the core on a full table.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts on `listener` (bound elsewhere, adopted by the current executor) until `stop` fires,
/// calling `on_conn` for each connection, including those still in the backlog when the stop
/// comes. Returns how many connections were accepted.
///
/// On the uring driver one multishot accept takes every connection (the prototype found that it
/// carries most of io_uring's gain over epoll for one request per connection). On the epoll
/// driver each is one non-blocking `accept4` after the listener's level-triggered event (a
/// failed `accept4` is not cheap: the kernel allocates the new socket, its file and its inode
/// before it finds the queue empty). Neither waits in a way a stop could cancel after the kernel
/// had completed an accept: that would orphan a connection (a test caught a client left hanging
/// that way), so connections the kernel accepted for us before the stop are served.
pub async fn run(
    listener: std::net::TcpListener,
    stop: &LocalStop,
    limit: &Rc<Semaphore>,
    mut on_conn: impl FnMut(Conn, Slot),
) -> u64 {
    let fd = listener.as_raw_fd();
    let mut accepted = 0u64;
    let mut stopped = std::pin::pin!(stop.stopped());
    let mut last_report: Option<Instant> = None;
    // Non-blocking for good: the drain below (and the epoll driver) use non-blocking `accept4`.
    if let Err(err) = listener.set_nonblocking(true) {
        eprintln!("ringlab: cannot make the listener non-blocking: {err}");
        return 0;
    }
    // Declared after `listener`, so it is dropped after the listener is closed.
    let mut acceptor = match Acceptor::new(&listener) {
        Ok(acceptor) => acceptor,
        Err(err) => {
            eprintln!("ringlab: cannot accept on {fd}: {err}");
            return 0;
        }
    };
    let mut slot = None;
    while !stop.is_stopped() {
        // The connection cap: at the limit, stop accepting until a connection ends. New clients
        // then wait in the kernel's backlog (backpressure) instead of being taken and starved.
        if slot.is_none() {
            slot = match limit.try_acquire_static_permit(1) {
                Ok(permit) => Some(permit),
                Err(_) => {
                    acceptor.pause();
                    let waited =
                        future::or(async { limit.acquire_static_permit(1).await.ok() }, async {
                            (&mut stopped).await;
                            None
                        })
                        .await;
                    match waited {
                        Some(permit) => Some(permit),
                        None => break,
                    }
                }
            };
        }
        let next = future::or(async { Some(acceptor.next().await) }, async {
            (&mut stopped).await;
            None
        })
        .await;
        match next {
            None => break,
            Some(Ok(conn)) => {
                accepted += 1;
                on_conn(
                    conn,
                    Slot {
                        _permit: slot.take(),
                    },
                );
                // A full backlog must not starve the connections already accepted.
                glommio::yield_if_needed().await;
            }
            Some(Err(err)) => {
                if is_exhaustion(&err) {
                    // Rate-limit the message: under a descriptor storm this fires per attempt.
                    if last_report.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        eprintln!(
                            "ringlab: accept paused: {err} (raise `ulimit -n` or lower the load); \
                             retrying every {} ms",
                            EXHAUSTED_BACKOFF.as_millis()
                        );
                        last_report = Some(Instant::now());
                    }
                    acceptor.pause();
                    time::sleep(EXHAUSTED_BACKOFF).await;
                }
                // Other errors (a peer that reset before accept, for one) concern one connection.
            }
        }
    }
    // Hand over what the kernel already completed: those clients are owed an answer. First
    // what it accepted for us before the stop, then (new handshakes stopped, those in flight
    // let finish) everything still queued: a client is either served or never connected, never
    // reset after connecting. Past the cap too: refusing them now would reset them.
    for conn in acceptor.stop().await {
        accepted += 1;
        on_conn(
            conn,
            Slot {
                _permit: slot.take(),
            },
        );
    }
    let filtered = drop_new_syns(fd);
    if filtered {
        time::sleep(HANDSHAKE_GRACE).await;
    }
    while let Ok(Some(conn)) = accept_now(fd) {
        accepted += 1;
        on_conn(
            conn,
            Slot {
                _permit: slot.take(),
            },
        );
    }
    drop(acceptor);
    // Closing the descriptor is not enough: the executors of one server share the listening
    // socket through duplicates, and it keeps listening (and completing handshakes nobody will
    // accept) until the last one closes. Shutting it down stops the listening now, so a balancer
    // sees a refused connect instead of a connection that later resets.
    // SAFETY: `fd` is still open (owned by `listener`, dropped just below).
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    drop(listener);
    accepted
}

/// Where connections come from: a multishot accept on the uring driver, level-triggered
/// readiness and `accept4` on the epoll driver.
enum Acceptor {
    Epoll(RawFd, Registration),
    Uring(uring::Accepts),
}

impl Acceptor {
    fn new(listener: &std::net::TcpListener) -> io::Result<Acceptor> {
        let driver = Driver::current()?;
        Ok(match driver.mode() {
            IoMode::Epoll => Acceptor::Epoll(
                listener.as_raw_fd(),
                // One accept per event: the next round says whether more are queued.
                Registration::level(listener.as_raw_fd()),
            ),
            IoMode::Uring => Acceptor::Uring(uring::Accepts::new(driver, listener)),
        })
    }

    /// The next connection. Dropping the future loses none.
    async fn next(&mut self) -> io::Result<Conn> {
        match self {
            Acceptor::Epoll(fd, registration) => loop {
                if registration.ready(Direction::Read) {
                    if let Some(conn) = accept_now(*fd)? {
                        registration.clear(Direction::Read);
                        return Ok(conn);
                    }
                }
                registration.wait_drained(Direction::Read).await?;
            },
            Acceptor::Uring(accepts) => {
                let fd = accepts.next().await?;
                // SAFETY: a descriptor the kernel just accepted for us.
                Conn::new(unsafe { OwnedFd::from_raw_fd(fd) })
            }
        }
    }

    /// Stops accepting until the next [`Acceptor::next`].
    fn pause(&mut self) {
        match self {
            // Out of the epoll set meanwhile: a ready listener would be reported every round.
            Acceptor::Epoll(_, registration) => registration.pause(),
            Acceptor::Uring(accepts) => accepts.pause(),
        }
    }

    /// Stops for good; returns the connections already accepted for us.
    async fn stop(&mut self) -> Vec<Conn> {
        match self {
            Acceptor::Epoll(_, registration) => {
                registration.pause();
                Vec::new()
            }
            Acceptor::Uring(accepts) => accepts
                .stop()
                .await
                .into_iter()
                // SAFETY: descriptors the kernel accepted for us.
                .filter_map(|fd| Conn::new(unsafe { OwnedFd::from_raw_fd(fd) }).ok())
                .collect(),
        }
    }
}

/// How long in-flight handshakes get to complete once new ones are dropped (loopback and LAN
/// round trips are far shorter).
const HANDSHAKE_GRACE: Duration = Duration::from_millis(20);

/// Attaches a classic BPF filter that drops pure SYNs (new connection attempts) and passes
/// everything else, so handshakes already under way complete and queue, and clients that arrive
/// now retransmit their SYN until the socket is gone and then see a refused connect. The filter
/// runs on the TCP header, whose 14th byte holds the flags. Returns whether it was attached.
fn drop_new_syns(fd: RawFd) -> bool {
    const LD_B_ABS: u16 = 0x30;
    const ALU_AND_K: u16 = 0x54;
    const JMP_JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const SYN: u32 = 0x02;
    const SYN_ACK: u32 = 0x12;
    let program = [
        libc::sock_filter {
            code: LD_B_ABS,
            jt: 0,
            jf: 0,
            k: 13,
        },
        libc::sock_filter {
            code: ALU_AND_K,
            jt: 0,
            jf: 0,
            k: SYN_ACK,
        },
        libc::sock_filter {
            code: JMP_JEQ_K,
            jt: 0,
            jf: 1,
            k: SYN,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: u32::MAX,
        },
    ];
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// Runs `serve` as a detached task under `gate`, holding `slot` until it ends. The future is
/// boxed first: glommio moves a spawned future several times on its way into the task, and a
/// pointer is cheaper to move than a connection's whole state (the backend's was 9 KiB once, and
/// `memmove` 13% of its CPU). A closed gate (the server is stopping) drops the connection.
pub fn spawn_connection(gate: &Gate, slot: Slot, serve: impl Future<Output = ()> + 'static) {
    let serve = Box::pin(serve);
    let task = async move {
        serve.await;
        drop(slot);
    };
    #[allow(clippy::disallowed_methods)] // the future is tracked
    let spawned = gate.spawn(driver::tracked(task));
    if let Ok(task) = spawned {
        task.detach();
    }
}

/// A connection's place under the cap; dropping it (when the connection ends) frees the place.
pub struct Slot {
    _permit: Option<StaticPermit>,
}

/// A cap of `n` concurrent connections for [`run`].
pub fn limit(n: usize) -> Rc<Semaphore> {
    Rc::new(Semaphore::new(n.max(1) as u64))
}

/// One non-blocking accept: `Ok(None)` when the backlog is empty.
fn accept_now(fd: RawFd) -> io::Result<Option<Conn>> {
    // SAFETY: `fd` is a listening socket kept open by the caller; null address pointers are
    // allowed.
    let conn = unsafe {
        libc::accept4(
            fd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if conn >= 0 {
        // SAFETY: `conn` is a freshly accepted socket this code now owns.
        return Conn::new(unsafe { OwnedFd::from_raw_fd(conn) }).map(Some);
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::WouldBlock => Ok(None),
        // A client that reset while queued, or a signal: nothing to report, try again.
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted => accept_now(fd),
        _ => Err(err),
    }
}

fn is_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
