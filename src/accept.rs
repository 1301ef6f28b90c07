//! The accept loop every glommio server here shares: it stops when told, backs off instead of
//! spinning when the process runs out of descriptors or memory, and on a graceful stop hands over
//! the connections already queued in the kernel backlog instead of resetting them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::net::{TcpListener, TcpStream};

use crate::shutdown::LocalStop;

/// How long to pause accepting after the process or system runs out of a resource. Short enough
/// to recover quickly once connections close, long enough not to burn the core on a full table.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(50);

/// Accepts on `listener` (bound elsewhere, adopted by the current executor) until `stop` fires,
/// calling `on_conn` for each connection, including those still in the backlog when the stop
/// comes. Returns how many connections were accepted.
pub async fn run(
    listener: std::net::TcpListener,
    stop: &LocalStop,
    mut on_conn: impl FnMut(TcpStream),
) -> u64 {
    // glommio's listener does not expose its descriptor; keep the number for the backlog drain.
    let fd = listener.as_raw_fd();
    // SAFETY: the descriptor comes from an owned, bound, listening std socket; ownership moves.
    let listener = unsafe { TcpListener::from_raw_fd(listener.into_raw_fd()) };
    let mut accepted = 0u64;
    let mut stopped = std::pin::pin!(stop.stopped());
    let mut last_report: Option<Instant> = None;
    loop {
        let next = future::or(async { Some(listener.accept().await) }, async {
            (&mut stopped).await;
            None
        })
        .await;
        match next {
            None => break,
            Some(Ok(stream)) => {
                accepted += 1;
                on_conn(stream);
            }
            Some(Err(err)) => {
                let err = io::Error::from(err);
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
                    glommio::timer::sleep(EXHAUSTED_BACKOFF).await;
                }
                // Other errors (a peer that reset before accept, for one) concern one connection.
            }
        }
    }
    accepted += drain_backlog(fd, &mut on_conn);
    // Closing the descriptor is not enough: the cancelled io_uring accept still holds the socket,
    // which keeps listening (and completing handshakes nobody will accept) until the ring is torn
    // down, after the executor exits. Shutting it down stops the listening now, so a balancer
    // sees a refused connect instead of a connection that later resets.
    // SAFETY: `fd` is still open (owned by `listener`, dropped just below).
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    drop(listener);
    accepted
}

/// Takes every connection the kernel already completed for this listener without waiting.
fn drain_backlog(fd: RawFd, on_conn: &mut impl FnMut(TcpStream)) -> u64 {
    let mut drained = 0;
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; zero timeout, so this only asks whether a connection waits.
        if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
            return drained;
        }
        // SAFETY: `fd` is a listening socket kept open by the caller's listener; null address pointers are
        // allowed. The poll above said a connection is queued, so this does not block (a racing
        // executor cannot take it: each executor has its own SO_REUSEPORT listener).
        let conn = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if conn < 0 {
            return drained;
        }
        drained += 1;
        // SAFETY: `conn` is a freshly accepted socket this code owns.
        on_conn(unsafe { TcpStream::from_raw_fd(conn) });
    }
}

fn is_exhaustion(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
