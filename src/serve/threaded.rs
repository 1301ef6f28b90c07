//! The classic thread-per-connection server, the comparison row: plain `std::net`, one OS thread
//! per accepted connection, blocking reads and writes, the same response bytes as the backend.

use std::io::{self, Read, Write};
use std::net::{Shutdown as SockShutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::io::shutdown::{self, Shutdown};
use crate::serve::backend::{BackendConfig, ListenerStats};
use crate::serve::http::{self, HeadError, Kind, Reply, Responses};

/// Responses for the current second, shared by all connection threads. Rebuilt by whichever
/// thread first notices the second changed, so no thread formats a date per request.
struct DatedResponses {
    id: [u8; http::SERVER_ID_LEN],
    current: Mutex<(u64, Arc<Responses>)>,
}

impl DatedResponses {
    fn new(port: u16) -> DatedResponses {
        let id = http::server_id(port);
        let (secs, date) = now();
        DatedResponses {
            id,
            current: Mutex::new((secs, Arc::new(Responses::new(&id, &date)))),
        }
    }

    fn get(&self) -> Arc<Responses> {
        let (secs, date) = now();
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.0 != secs {
            *cur = (secs, Arc::new(Responses::new(&self.id, &date)));
        }
        cur.1.clone()
    }
}

fn now() -> (u64, [u8; http::DATE_LEN]) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (secs, http::imf_fixdate(secs))
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    not_found: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
}

/// Live connection threads, so a graceful stop can wait for them.
#[derive(Default)]
struct Live {
    count: Mutex<usize>,
    idle: Condvar,
}

/// Serves `listener` with a thread per connection until `shutdown` trips, then waits (bounded by
/// `drain_timeout`) for live connections and returns the counters.
pub fn serve(
    listener: TcpListener,
    config: BackendConfig,
    shutdown: Shutdown,
) -> io::Result<ListenerStats> {
    let addr = listener.local_addr()?;
    let wake = shutdown.wait_fd()?;
    let responses = Arc::new(DatedResponses::new(addr.port()));
    let counters = Arc::new(Counters::default());
    let live = Arc::new(Live::default());
    let config = Arc::new(config);
    let mut connections = 0u64;
    listener.set_nonblocking(true)?;
    loop {
        let (stopping, _) = shutdown::poll_two(&wake, listener.as_raw_fd(), 1000)?;
        // Accept everything queued, also after a stop: those clients are owed an answer.
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    connections += 1;
                    spawn_connection(stream, &responses, &counters, &live, &config);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    std::thread::sleep(Duration::from_millis(50));
                    break;
                }
                Err(_) => break,
            }
        }
        if stopping {
            break;
        }
    }
    drop(listener);
    let deadline = Instant::now() + config.drain_timeout;
    let mut count = live.count.lock().unwrap_or_else(|e| e.into_inner());
    while *count > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!("ringlab: threaded drain deadline passed with {count} connections open");
            break;
        }
        count = live
            .idle
            .wait_timeout(count, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    Ok(ListenerStats {
        addr: Some(addr),
        connections,
        ok: counters.ok.load(Ordering::Relaxed),
        not_found: counters.not_found.load(Ordering::Relaxed),
        refused: counters.refused.load(Ordering::Relaxed),
        timed_out: counters.timed_out.load(Ordering::Relaxed),
    })
}

fn spawn_connection(
    stream: TcpStream,
    responses: &Arc<DatedResponses>,
    counters: &Arc<Counters>,
    live: &Arc<Live>,
    config: &Arc<BackendConfig>,
) {
    let (responses, counters, live, config) = (
        responses.clone(),
        counters.clone(),
        live.clone(),
        config.clone(),
    );
    *live.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    let spawned = std::thread::Builder::new()
        .name("threaded-conn".into())
        .stack_size(64 * 1024)
        .spawn({
            let live = live.clone();
            move || {
                let _ = stream.set_nonblocking(false);
                serve_connection(stream, &responses, &counters, &config);
                let mut count = live.count.lock().unwrap_or_else(|e| e.into_inner());
                *count -= 1;
                live.idle.notify_all();
            }
        });
    if spawned.is_err() {
        // Out of threads: the connection (moved into the failed closure) is already closed.
        *live.count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
    }
}

fn serve_connection(
    mut stream: TcpStream,
    responses: &DatedResponses,
    counters: &Counters,
    config: &BackendConfig,
) {
    let mut buf = vec![0u8; config.max_head];
    let mut filled = 0usize;
    loop {
        let deadline = Instant::now() + config.head_timeout;
        let mut scanned = 0;
        let parsed = loop {
            match http::parse_request_head(&buf[..filled], scanned, config.max_head) {
                Ok(None) => scanned = filled,
                done => break Some(done),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
                break None;
            }
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return,
                Ok(n) => filled += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    break None;
                }
                Err(_) => return,
            }
        };
        let resp = responses.get();
        let parsed = match parsed {
            None => {
                counters.timed_out.fetch_add(1, Ordering::Relaxed);
                if filled > 0 {
                    let _ = stream.write_all(resp.get(Kind::Timeout));
                    linger_close(&mut stream);
                }
                return;
            }
            Some(Ok(Some(head))) => Ok(head),
            Some(Err(err)) => Err(err),
            // The read loop only stops on a complete or refused head.
            Some(Ok(None)) => Err(HeadError::BadRequest),
        };
        let Reply {
            kind,
            consumed,
            linger,
        } = Reply::to(parsed, filled, false);
        let counter = match kind.status() {
            200..=299 => &counters.ok,
            404 | 405 => &counters.not_found,
            _ => &counters.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if stream.write_all(resp.get(kind)).is_err() {
            return;
        }
        if kind.closes() {
            if linger {
                linger_close(&mut stream);
            }
            return;
        }
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
}

fn linger_close(stream: &mut TcpStream) {
    let _ = stream.shutdown(SockShutdown::Write);
    let _ = stream.set_read_timeout(Some(http::LINGER));
    let deadline = Instant::now() + http::LINGER;
    let mut sink = [0u8; 4096];
    let mut seen = 0;
    while seen < http::LINGER_BYTES && Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => seen += n,
        }
    }
}
