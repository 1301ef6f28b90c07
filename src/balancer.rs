//! The round-robin L4 balancer: each accepted connection is paired with the next backend that
//! accepts a connect, and bytes are relayed both ways, half-closes included, until both sides are
//! done. It never looks at the bytes, so any TCP protocol passes through.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_lite::future;
use glommio::sync::Gate;

use crate::accept;
use crate::conn::{self, Conn};
use crate::deadline::{Deadline, Deadlines};
use crate::health::{Health, HealthPolicy};
use crate::placement::{self, Executor};
use crate::readiness;
use crate::shutdown::{LocalStop, Shutdown};

/// How the balancer connects, relays and stops.
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    /// The backends, in rotation order.
    pub backends: Vec<SocketAddr>,
    /// Longest wait for one backend's connect before trying the next.
    pub connect_timeout: Duration,
    /// A pair with no bytes moving either way for this long is closed (checked every quarter of
    /// it, at most once a second).
    pub idle_timeout: Duration,
    /// How long a graceful stop waits for pairs in flight.
    pub drain_timeout: Duration,
    /// Relay buffer per direction, in bytes.
    pub buffer_size: usize,
    /// When failed connects take a backend out of rotation, and for how long.
    pub health: HealthPolicy,
    /// Probe every backend with a TCP connect this often (off when `None`).
    pub health_interval: Option<Duration>,
    /// Replay a client's first bytes (up to this many) to the next backend when a backend closes
    /// or resets without answering a byte. Off when `None`: replaying bytes that were not
    /// idempotent is a hazard the operator must choose.
    pub retry_unanswered: Option<usize>,
    /// Client connections served at once per executor; past it, accepting pauses.
    pub max_conns: usize,
}

impl BalancerConfig {
    /// The defaults for `backends`: 1 s connect timeout, 60 s idle timeout, 10 s drain, 16 KiB
    /// buffers, out of rotation after 3 failed connects for 2 s, no active probe, no replay, and
    /// a connection cap that fits the descriptor limit (two descriptors per pair).
    pub fn new(backends: Vec<SocketAddr>) -> BalancerConfig {
        BalancerConfig {
            backends,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            buffer_size: 16 * 1024,
            health: HealthPolicy::default(),
            health_interval: None,
            retry_unanswered: None,
            max_conns: crate::limits::default_max_conns(2),
        }
    }
}

/// Per-backend counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// The backend's address.
    pub addr: Option<SocketAddr>,
    /// Client connections relayed to it.
    pub connections: u64,
    /// Bytes relayed client → backend.
    pub bytes_up: u64,
    /// Bytes relayed backend → client.
    pub bytes_down: u64,
    /// Connect attempts that failed or timed out (the client then went to the next backend).
    pub connect_failures: u64,
    /// Connections it closed or reset without answering a byte.
    pub unanswered: u64,
}

/// What one balancer executor did, reported when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalancerReport {
    /// The CPU the executor was pinned to.
    pub cpu: Option<usize>,
    /// Client connections accepted on this core.
    pub accepted: u64,
    /// Clients closed because no backend accepted a connect.
    pub unserved: u64,
    /// Pairs closed by the idle timeout.
    pub idle_closed: u64,
    /// Clients whose first bytes were replayed to another backend (`retry_unanswered`).
    pub retried: u64,
    /// Per-backend counters, in configuration order.
    pub backends: Vec<BackendCounters>,
}

impl BalancerReport {
    /// Adds another executor's counters into this one (accepts are per core; keep them apart).
    pub fn merge_backends(&mut self, other: &BalancerReport) {
        if self.backends.is_empty() {
            self.backends = other.backends.clone();
            return;
        }
        for (mine, theirs) in self.backends.iter_mut().zip(&other.backends) {
            mine.connections += theirs.connections;
            mine.bytes_up += theirs.bytes_up;
            mine.bytes_down += theirs.bytes_down;
            mine.connect_failures += theirs.connect_failures;
            mine.unanswered += theirs.unanswered;
        }
    }
}

/// Picks where a new connection starts looking for a backend. Failing backends are skipped by
/// trying the following ones in order, so a chooser only names the first candidate.
pub trait Chooser {
    /// The index (below `count`) of the first backend to try for the next connection.
    fn first(&self, count: usize) -> usize;
}

/// Plain rotation: connection *k* on an executor starts at backend *k mod n*.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Cell<usize>,
}

impl Chooser for RoundRobin {
    fn first(&self, count: usize) -> usize {
        let i = self.next.get() % count;
        self.next.set(i + 1);
        i
    }
}

/// Starts one balancer executor per `(listener, cpu)` pair. The listeners are usually duplicates
/// of one socket, so the executors share its accept queue (see [`crate::listen::bind_shared`]);
/// each has its own rotation.
pub fn spawn(
    listeners: Vec<std::net::TcpListener>,
    cpus: &[Option<usize>],
    config: BalancerConfig,
    shutdown: Shutdown,
) -> io::Result<Vec<Executor<io::Result<BalancerReport>>>> {
    let health = Arc::new(Health::new(&config.backends, config.health, true));
    let mut executors = Vec::new();
    for (i, (listener, &cpu)) in listeners.into_iter().zip(cpus).enumerate() {
        let name = match cpu {
            Some(cpu) => format!("lb-cpu{cpu}"),
            None => "lb".to_string(),
        };
        let (config, stopper, health) = (config.clone(), shutdown.clone(), health.clone());
        // One executor probes for all: the table is shared.
        let probe = i == 0;
        match placement::spawn_pinned(&name, cpu, move || async move {
            let mut report = serve(listener, config, health, probe, stopper).await?;
            report.cpu = cpu;
            Ok(report)
        }) {
            Ok(ex) => executors.push(ex),
            Err(err) => {
                // Do not leave the executors that did start running unsupervised.
                shutdown.trigger();
                for ex in executors {
                    let _ = ex.join();
                }
                return Err(err);
            }
        }
    }
    Ok(executors)
}

/// Executor-local state shared by every pair.
struct Shared {
    config: BalancerConfig,
    chooser: RoundRobin,
    health: Arc<Health>,
    counters: RefCell<Vec<BackendCounters>>,
    unserved: Cell<u64>,
    retried: Cell<u64>,
    deadlines: Rc<Deadlines>,
    buffers: BufferPool,
}

/// Runs the balancer on the current glommio executor until `shutdown` trips, then drains
/// (bounded by `drain_timeout`) and returns this executor's counters. `probe` runs the active
/// health check (one executor per balancer does).
pub async fn serve(
    listener: std::net::TcpListener,
    config: BalancerConfig,
    health: Arc<Health>,
    probe: bool,
    shutdown: Shutdown,
) -> io::Result<BalancerReport> {
    if config.backends.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the balancer needs at least one backend",
        ));
    }
    let stop = LocalStop::watch(&shutdown);
    let shared = Rc::new(Shared {
        counters: RefCell::new(
            config
                .backends
                .iter()
                .map(|&addr| BackendCounters {
                    addr: Some(addr),
                    ..BackendCounters::default()
                })
                .collect(),
        ),
        chooser: RoundRobin::default(),
        health,
        unserved: Cell::new(0),
        retried: Cell::new(0),
        deadlines: Deadlines::new(Deadlines::tick_for(config.idle_timeout)),
        buffers: BufferPool::new(config.buffer_size),
        config,
    });
    let ticker = readiness::spawn_local(shared.deadlines.clone().run(stop.clone()));
    let prober = match (probe, shared.config.health_interval) {
        (true, Some(every)) => Some(readiness::spawn_local(probe_backends(
            shared.clone(),
            every,
            stop.clone(),
        ))),
        _ => None,
    };
    let gate = Gate::new();
    let limit = accept::limit(shared.config.max_conns);
    let accepted = accept::run(listener, &stop, &limit, |client, slot| {
        accept::spawn_connection(&gate, slot, proxy(client, shared.clone()));
    })
    .await;
    let drained = future::or(async { gate.close().await.is_ok() }, async {
        glommio::timer::sleep(shared.config.drain_timeout).await;
        false
    })
    .await;
    if !drained {
        eprintln!(
            "ringlab: balancer drain deadline ({:?}) passed with pairs still open; closing them",
            shared.config.drain_timeout
        );
    }
    drop(ticker);
    drop(prober);
    let report = BalancerReport {
        cpu: None,
        accepted,
        unserved: shared.unserved.get(),
        idle_closed: shared.deadlines.fired(),
        retried: shared.retried.get(),
        backends: shared.counters.borrow().clone(),
    };
    Ok(report)
}

/// The active health check: a TCP connect to every backend each `every`. A probe slower than the
/// interval counts as failed (a backend that drops SYNs while it drains answers nothing).
async fn probe_backends(shared: Rc<Shared>, every: Duration, stop: LocalStop) {
    let timeout = shared.config.connect_timeout.min(every);
    while !stop.is_stopped() {
        for (i, &addr) in shared.config.backends.iter().enumerate() {
            match conn::connect(addr, timeout).await {
                Ok(_) => shared.health.success(i),
                Err(e) => shared.health.failure(i, &e),
            }
        }
        let stopped = async {
            stop.stopped().await;
        };
        future::or(glommio::timer::sleep(every), stopped).await;
    }
}

/// Serves one client: connects it to a backend, relays, and with `retry_unanswered` replays its
/// first bytes to the next backend when one goes away without answering. Each backend is tried
/// at most once per client, so a client never waits on more than one round of the backends.
async fn proxy(client: Conn, shared: Rc<Shared>) {
    let count = shared.config.backends.len();
    let mut next = shared.chooser.first(count);
    let mut tries_left = count;
    let replay = shared
        .config
        .retry_unanswered
        .map(|cap| RefCell::new(Replay::new(cap)));
    loop {
        let Some((idx, server)) = connect_next(&shared, &mut next, &mut tries_left).await else {
            // Dropping the client closes it at once: no backend means no hang.
            shared.unserved.set(shared.unserved.get() + 1);
            return;
        };
        if let Some(replay) = &replay {
            // A copy, so no borrow is held across the write (this is the rare replay path).
            let (bytes, client_done) = {
                let r = replay.borrow();
                (r.bytes.clone(), r.client_done)
            };
            if !bytes.is_empty() && server.write_all(&bytes).await.is_err() {
                unanswered(&shared, idx);
                continue;
            }
            if client_done {
                let _ = server.shutdown_write();
            }
        }
        shared.counters.borrow_mut()[idx].connections += 1;
        let end = relay(&client, server, &shared, replay.as_ref()).await;
        let mut counters = shared.counters.borrow_mut();
        counters[idx].bytes_up += end.up;
        counters[idx].bytes_down += end.down;
        drop(counters);
        if !end.unanswered {
            return;
        }
        unanswered(&shared, idx);
        let can_replay = replay.as_ref().is_some_and(|r| !r.borrow().overflowed);
        if !can_replay || tries_left == 0 {
            return;
        }
        shared.retried.set(shared.retried.get() + 1);
    }
}

fn unanswered(shared: &Shared, idx: usize) {
    shared.counters.borrow_mut()[idx].unanswered += 1;
}

/// Connects to the next backend in rotation order that is in rotation (or every one in turn when
/// all are out, so a recovered backend is found at once), spending one try per attempt.
async fn connect_next(
    shared: &Shared,
    next: &mut usize,
    tries_left: &mut usize,
) -> Option<(usize, Conn)> {
    let count = shared.config.backends.len();
    let all_down = shared.health.all_down();
    let mut skipped = 0;
    while *tries_left > 0 && skipped < count {
        let idx = *next % count;
        *next = idx + 1;
        if !all_down && !shared.health.usable(idx) {
            skipped += 1;
            continue;
        }
        *tries_left -= 1;
        let addr = shared.config.backends[idx];
        match conn::connect(addr, shared.config.connect_timeout).await {
            Ok(server) => {
                shared.health.success(idx);
                return Some((idx, server));
            }
            Err(e) => {
                shared.counters.borrow_mut()[idx].connect_failures += 1;
                shared.health.failure(idx, &e);
            }
        }
    }
    None
}

/// What a client sent before its backend answered, kept for a replay.
struct Replay {
    bytes: Vec<u8>,
    cap: usize,
    /// More than `cap` bytes came before an answer: no replay is possible.
    overflowed: bool,
    /// The backend answered: the bytes are no longer needed.
    answered: bool,
    /// The client half-closed before the answer; a replay must half-close too.
    client_done: bool,
}

impl Replay {
    fn new(cap: usize) -> Replay {
        Replay {
            bytes: Vec::new(),
            cap,
            overflowed: false,
            answered: false,
            client_done: false,
        }
    }

    fn keep(&mut self, data: &[u8]) {
        if self.answered || self.overflowed {
            return;
        }
        if self.bytes.len() + data.len() > self.cap {
            self.overflowed = true;
            self.bytes = Vec::new();
        } else {
            self.bytes.extend_from_slice(data);
        }
    }

    fn may_retry(&self) -> bool {
        !self.answered && !self.overflowed
    }
}

/// How a relay ended.
struct RelayEnd {
    up: u64,
    down: u64,
    /// The backend closed or reset before sending a byte, and a replay is possible.
    unanswered: bool,
}

/// Relays both directions until both have ended, or until the backend goes away unanswered while
/// a replay is possible (then the client is left open for the next backend).
async fn relay(
    client: &Conn,
    server: Conn,
    shared: &Shared,
    replay: Option<&RefCell<Replay>>,
) -> RelayEnd {
    // Declared after the connections, so it is deregistered before they close.
    let deadline = shared.deadlines.arm(
        [client.fd(), server.fd()],
        libc::SHUT_RDWR,
        shared.config.idle_timeout,
    );
    let mut up_buf = shared.buffers.take();
    let mut down_buf = shared.buffers.take();
    let ended = Cell::new(false);
    let end = {
        let up = pump_up(client, &server, &mut up_buf, &deadline, &ended, replay);
        let down = pump_down(&server, client, &mut down_buf, &deadline, &ended, replay);
        both_or_unanswered(up, down).await
    };
    shared.buffers.give(up_buf);
    shared.buffers.give(down_buf);
    end
}

/// Waits for both pumps, except that an unanswered backend ends the relay at once (dropping the
/// client pump, which never loses bytes: it keeps them for the replay before writing).
async fn both_or_unanswered(
    up: impl Future<Output = u64>,
    down: impl Future<Output = Down>,
) -> RelayEnd {
    let mut up = std::pin::pin!(up);
    let mut down = std::pin::pin!(down);
    let (mut up_total, mut down_total) = (None, None);
    poll_fn(|cx| {
        if up_total.is_none() {
            if let Poll::Ready(n) = up.as_mut().poll(cx) {
                up_total = Some(n);
            }
        }
        if down_total.is_none() {
            if let Poll::Ready(d) = down.as_mut().poll(cx) {
                if let Down::Unanswered = d {
                    // Leave the client open for the replay; stop reading from it here.
                    return Poll::Ready(RelayEnd {
                        up: up_total.unwrap_or(0),
                        down: 0,
                        unanswered: true,
                    });
                }
                down_total = Some(d.bytes());
            }
        }
        match (up_total, down_total) {
            (Some(up), Some(down)) => Poll::Ready(RelayEnd {
                up,
                down,
                unanswered: false,
            }),
            _ => Poll::Pending,
        }
    })
    .await
}

enum Down {
    Done(u64),
    Unanswered,
}

impl Down {
    fn bytes(&self) -> u64 {
        match self {
            Down::Done(n) => *n,
            Down::Unanswered => 0,
        }
    }
}

/// Client → backend. Bytes are kept for a replay before they are written, so a backend dying
/// mid-write loses nothing. On the client's end it half-closes the backend (unless the other
/// direction already ended: the close that follows sends that FIN, for one syscall less).
async fn pump_up(
    from: &Conn,
    to: &Conn,
    buf: &mut [u8],
    deadline: &Deadline,
    other_ended: &Cell<bool>,
    replay: Option<&RefCell<Replay>>,
) -> u64 {
    let mut total = 0u64;
    loop {
        let n = match from.read(buf).await {
            Ok(0) => {
                if let Some(r) = replay {
                    r.borrow_mut().client_done = true;
                }
                if !other_ended.replace(true) {
                    let _ = to.shutdown_write();
                }
                return total;
            }
            Ok(n) => n,
            Err(_) => {
                deadline.fire_now();
                return total;
            }
        };
        deadline.extend();
        let retrying = replay.is_some_and(|r| {
            let mut r = r.borrow_mut();
            r.keep(&buf[..n]);
            r.may_retry()
        });
        if to.write_all(&buf[..n]).await.is_err() {
            if retrying {
                // Only the backend's side: the client stays open for the replay, and the
                // backend pump sees the end and reports it unanswered.
                let _ = conn::shutdown(to.fd(), libc::SHUT_RDWR);
            } else {
                deadline.fire_now();
            }
            return total;
        }
        total += n as u64;
    }
}

/// Backend → client. A backend that ends before its first byte while a replay is possible is
/// reported unanswered instead of passing the end on to the client.
async fn pump_down(
    from: &Conn,
    to: &Conn,
    buf: &mut [u8],
    deadline: &Deadline,
    other_ended: &Cell<bool>,
    replay: Option<&RefCell<Replay>>,
) -> Down {
    let mut total = 0u64;
    loop {
        let read = from.read(buf).await;
        // Unanswered means the backend went away first: a backend that closes after the client
        // has finished sending (a connect-and-close probe, a half-closed request it refused)
        // ended a complete exchange, and is not replayed.
        if total == 0
            && matches!(read, Ok(0) | Err(_))
            && replay.is_some_and(|r| {
                let r = r.borrow();
                r.may_retry() && !r.client_done
            })
        {
            return Down::Unanswered;
        }
        let n = match read {
            Ok(0) => {
                if !other_ended.replace(true) {
                    let _ = to.shutdown_write();
                }
                return Down::Done(total);
            }
            Ok(n) => n,
            Err(_) => {
                deadline.fire_now();
                return Down::Done(total);
            }
        };
        // A backend that answers and closes usually has its FIN queued behind the answer
        // already (the read knows it from EPOLLRDHUP); passing both on together puts them in
        // one segment to the client.
        let end = from.eof_pending();
        if total == 0 {
            if let Some(r) = replay {
                let mut r = r.borrow_mut();
                r.answered = true;
                r.bytes = Vec::new();
            }
        }
        deadline.extend();
        let written = if end && !other_ended.replace(true) {
            to.write_all_and_finish(&buf[..n]).await
        } else {
            to.write_all(&buf[..n]).await
        };
        if written.is_err() {
            deadline.fire_now();
            return Down::Done(total);
        }
        total += n as u64;
        if end {
            return Down::Done(total);
        }
    }
}

/// Recycles relay buffers so a new pair does not allocate.
struct BufferPool {
    size: usize,
    free: RefCell<Vec<Box<[u8]>>>,
}

impl BufferPool {
    /// Buffers kept for reuse at most; beyond that, returned ones are freed.
    const KEEP: usize = 1024;

    fn new(size: usize) -> BufferPool {
        BufferPool {
            size: size.max(1),
            free: RefCell::new(Vec::new()),
        }
    }

    fn take(&self) -> Box<[u8]> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice())
    }

    fn give(&self, buf: Box<[u8]>) {
        let mut free = self.free.borrow_mut();
        if free.len() < Self::KEEP {
            free.push(buf);
        }
    }
}
