//! The round-robin L4 balancer: each accepted connection is paired with the next backend that
//! accepts a connect, and bytes are relayed both ways, half-closes included, until both sides are
//! done. It never looks at the bytes, so any TCP protocol passes through.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use futures_lite::future;
use glommio::sync::Gate;

use crate::accept;
use crate::conn::{self, Conn};
use crate::deadline::{Deadline, Deadlines};
use crate::placement::{self, Executor};
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
}

impl BalancerConfig {
    /// The defaults for `backends`: 1 s connect timeout, 60 s idle timeout, 10 s drain, 16 KiB
    /// buffers.
    pub fn new(backends: Vec<SocketAddr>) -> BalancerConfig {
        BalancerConfig {
            backends,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            buffer_size: 16 * 1024,
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

/// Starts one balancer executor per `(listener, cpu)` pair. Each gets its own `SO_REUSEPORT`
/// listener (see [`crate::listen::bind_shared`]) and its own rotation.
pub fn spawn(
    listeners: Vec<std::net::TcpListener>,
    cpus: &[Option<usize>],
    config: BalancerConfig,
    shutdown: Shutdown,
) -> io::Result<Vec<Executor<io::Result<BalancerReport>>>> {
    let mut executors = Vec::new();
    for (listener, &cpu) in listeners.into_iter().zip(cpus) {
        let name = match cpu {
            Some(cpu) => format!("lb-cpu{cpu}"),
            None => "lb".to_string(),
        };
        let (config, stopper) = (config.clone(), shutdown.clone());
        match placement::spawn_pinned(&name, cpu, move || async move {
            let mut report = serve(listener, config, stopper).await?;
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
    counters: RefCell<Vec<BackendCounters>>,
    unserved: Cell<u64>,
    deadlines: Rc<Deadlines>,
    buffers: BufferPool,
}

/// Runs the balancer on the current glommio executor until `shutdown` trips, then drains
/// (bounded by `drain_timeout`) and returns this executor's counters.
pub async fn serve(
    listener: std::net::TcpListener,
    config: BalancerConfig,
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
        unserved: Cell::new(0),
        deadlines: Deadlines::new(Deadlines::tick_for(config.idle_timeout)),
        buffers: BufferPool::new(config.buffer_size),
        config,
    });
    let ticker = glommio::spawn_local(shared.deadlines.clone().run(stop.clone()));
    let gate = Gate::new();
    let accepted = accept::run(listener, &stop, |client| {
        if let Ok(task) = gate.spawn(proxy(client, shared.clone())) {
            task.detach();
        }
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
    let report = BalancerReport {
        cpu: None,
        accepted,
        unserved: shared.unserved.get(),
        idle_closed: shared.deadlines.fired(),
        backends: shared.counters.borrow().clone(),
    };
    Ok(report)
}

/// Connects `client` to the first backend that answers, starting where the chooser says.
async fn proxy(client: Conn, shared: Rc<Shared>) {
    let count = shared.config.backends.len();
    let first = shared.chooser.first(count);
    let mut server = None;
    for step in 0..count {
        let idx = (first + step) % count;
        let addr = shared.config.backends[idx];
        match conn::connect(addr, shared.config.connect_timeout).await {
            Ok(stream) => {
                server = Some((idx, stream));
                break;
            }
            Err(_) => shared.counters.borrow_mut()[idx].connect_failures += 1,
        }
    }
    let Some((idx, server)) = server else {
        // Dropping the client closes it at once: no backend means no hang.
        shared.unserved.set(shared.unserved.get() + 1);
        return;
    };
    shared.counters.borrow_mut()[idx].connections += 1;
    let (up, down) = relay(client, server, &shared).await;
    let mut counters = shared.counters.borrow_mut();
    counters[idx].bytes_up += up;
    counters[idx].bytes_down += down;
}

/// Relays both directions until both have ended; returns bytes moved (up, down).
async fn relay(client: Conn, server: Conn, shared: &Shared) -> (u64, u64) {
    // Declared after the connections, so it is deregistered before they close.
    let deadline = shared.deadlines.arm(
        [client.fd(), server.fd()],
        libc::SHUT_RDWR,
        shared.config.idle_timeout,
    );
    let mut up_buf = shared.buffers.take();
    let mut down_buf = shared.buffers.take();
    let ended = Cell::new(false);
    let up = pump(&client, &server, &mut up_buf, &deadline, &ended);
    let down = pump(&server, &client, &mut down_buf, &deadline, &ended);
    let (up, down) = future::zip(up, down).await;
    shared.buffers.give(up_buf);
    shared.buffers.give(down_buf);
    (up, down)
}

/// Copies `from` → `to` until `from` ends, then half-closes `to` so the far side sees the end too
/// (unless the other direction already ended: the close that follows sends that FIN, for one
/// syscall less). On an error (a reset, a failed write) it shuts both sockets down, which ends the
/// opposite pump as well: a pair never waits on a dead half. Each read that moves bytes pushes the
/// idle deadline back.
async fn pump(
    from: &Conn,
    to: &Conn,
    buf: &mut [u8],
    deadline: &Deadline,
    other_ended: &Cell<bool>,
) -> u64 {
    let mut total = 0u64;
    loop {
        let n = match from.read(buf).await {
            Ok(0) => {
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
        if to.write_all(&buf[..n]).await.is_err() {
            deadline.fire_now();
            return total;
        }
        total += n as u64;
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
