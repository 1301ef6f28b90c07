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

use crate::io::accept;
use crate::io::conn::{self, Conn};
use crate::io::deadline::{self, Deadline, Deadlines};
use crate::io::driver::{self, IoMode};
use crate::io::placement::{self, Executor};
use crate::io::shutdown::{LocalStop, Shutdown};
use crate::io::time;
use crate::serve::health::{Health, HealthPolicy};

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
    /// Once one side of a pair has finished (its FIN relayed, or the backend stopped reading),
    /// the pair is closed after this long with no bytes moving (HAProxy's `timeout client-fin`
    /// and `server-fin`).
    pub fin_timeout: Duration,
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
    /// The executors' socket driver.
    pub io: IoMode,
}

impl BalancerConfig {
    /// The defaults for `backends`: 1 s connect timeout, 60 s idle timeout (5 s once one side has
    /// finished), 10 s drain, 16 KiB
    /// buffers, out of rotation after 3 failed connects for 2 s, no active probe, no replay, and
    /// a connection cap that fits the descriptor limit (two descriptors per pair).
    pub fn new(backends: Vec<SocketAddr>) -> BalancerConfig {
        BalancerConfig {
            backends,
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            fin_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            buffer_size: 16 * 1024,
            health: HealthPolicy::default(),
            health_interval: None,
            retry_unanswered: None,
            max_conns: crate::io::limits::default_max_conns(2),
            io: IoMode::default(),
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
    /// Pairs it reset (or failed) mid-way; the client was reset in turn.
    pub backend_resets: u64,
    /// Pairs whose client reset (or stopped reading); the backend was reset in turn.
    pub client_resets: u64,
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
    /// Pairs reset by the idle or half-closed timeout, or at the drain deadline.
    pub idle_closed: u64,
    /// Connections refused because they came from the balancer itself (a backend address that
    /// is the balancer's own).
    pub self_loops: u64,
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
            mine.backend_resets += theirs.backend_resets;
            mine.client_resets += theirs.client_resets;
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
/// of one socket, so the executors share its accept queue (see [`crate::io::listen::bind_shared`]);
/// each has its own rotation. A backend that is the balancer's own address is refused here
/// ([`check_backends`]).
pub fn spawn(
    listeners: Vec<std::net::TcpListener>,
    cpus: &[Option<usize>],
    config: BalancerConfig,
    shutdown: Shutdown,
) -> io::Result<Vec<Executor<io::Result<BalancerReport>>>> {
    if let Some(first) = listeners.first() {
        check_backends(first.local_addr()?, &config.backends)?;
    }
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
        match placement::spawn_pinned(&name, cpu, config.io, move || async move {
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
    self_loops: Cell<u64>,
    /// Backends that could turn out to be this balancer (see [`loop_guard`]).
    loop_guard: Vec<SocketAddr>,
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
    let listening = listener.local_addr()?;
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
        deadlines: Deadlines::new(Deadlines::tick_for(
            config.idle_timeout.min(config.fin_timeout),
        )),
        buffers: BufferPool::new(config.buffer_size),
        self_loops: Cell::new(0),
        loop_guard: loop_guard(listening, &config.backends),
        config,
    });
    let ticker = driver::spawn_local(shared.deadlines.clone().run(stop.clone()));
    let prober = match (probe, shared.config.health_interval) {
        (true, Some(every)) => Some(driver::spawn_local(probe_backends(
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
    // One close, kept across both waits: a gate may only be closed once.
    let mut closing = std::pin::pin!(gate.close());
    let drained = future::or(async { (&mut closing).await.is_ok() }, async {
        time::sleep(shared.config.drain_timeout).await;
        false
    })
    .await;
    if !drained {
        eprintln!(
            "ringlab: balancer drain deadline ({:?}) passed with pairs still open; resetting them",
            shared.config.drain_timeout
        );
        // Reset, not closed: a client whose answer is cut off must not read a clean end.
        shared.deadlines.expire_all();
        future::or(async { (&mut closing).await.is_ok() }, async {
            time::sleep(Duration::from_millis(100)).await;
            false
        })
        .await;
    }
    drop(ticker);
    drop(prober);
    let report = BalancerReport {
        cpu: None,
        accepted,
        unserved: shared.unserved.get(),
        idle_closed: shared.deadlines.fired(),
        self_loops: shared.self_loops.get(),
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
        future::or(time::sleep(every), stopped).await;
    }
}

/// Serves one client: connects it to a backend, relays, and with `retry_unanswered` replays its
/// first bytes to the next backend when one goes away without answering. Each backend is tried
/// at most once per client, so a client never waits on more than one round of the backends.
async fn proxy(client: Conn, shared: Rc<Shared>) {
    if !shared.loop_guard.is_empty() && refuse_self_loop(&client, &shared) {
        return;
    }
    let count = shared.config.backends.len();
    let mut next = shared.chooser.first(count);
    let mut tries_left = count;
    let replay = shared
        .config
        .retry_unanswered
        .map(|cap| RefCell::new(Replay::new(cap)));
    loop {
        // The client's first bytes are read while the backend connect is in flight (on io_uring
        // the read and the connect go out in one submission, a round saved). The relay takes the
        // read over as it stands: it never waits for the client to speak before relaying, so a
        // protocol whose server speaks first passes too.
        let buf = shared.buffers.take();
        let conn = &client;
        let mut reading = std::pin::pin!(async move {
            let mut buf = buf;
            let read = conn.read(&mut buf).await;
            (read, buf)
        });
        let mut read_early = None;
        let connected = {
            let mut connecting = std::pin::pin!(connect_next(&shared, &mut next, &mut tries_left));
            poll_fn(|cx| {
                if read_early.is_none() {
                    if let Poll::Ready(done) = reading.as_mut().poll(cx) {
                        read_early = Some(done);
                    }
                }
                connecting.as_mut().poll(cx)
            })
            .await
        };
        let Some((idx, server)) = connected else {
            // Dropping the client closes it at once: no backend means no hang.
            shared.unserved.set(shared.unserved.get() + 1);
            return;
        };
        let first = match read_early {
            Some((read, buf)) => First::Read(read, buf),
            None => First::Reading(reading),
        };
        if let Some(replay) = &replay {
            // A copy, so no borrow is held across the write (this is the rare replay path).
            let (mut bytes, client_done) = {
                let r = replay.borrow();
                (r.bytes.clone(), r.client_done)
            };
            if !bytes.is_empty() && server.write_all(&mut bytes).await.is_err() {
                unanswered(&shared, idx);
                continue;
            }
            if client_done {
                let _ = server.shutdown_write();
            }
        }
        shared.counters.borrow_mut()[idx].connections += 1;
        let end = relay(&client, server, &shared, replay.as_ref(), first).await;
        let mut counters = shared.counters.borrow_mut();
        counters[idx].bytes_up += end.up;
        counters[idx].bytes_down += end.down;
        match end.aborted {
            Some(Abort::Backend) => counters[idx].backend_resets += 1,
            Some(Abort::Client) => counters[idx].client_resets += 1,
            Some(Abort::Expired) | None => {}
        }
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

/// Refuses `client` if it arrived on an address that is one of the backends: the balancer's own
/// connect to that backend has landed on itself. Without this, each such connection would make
/// another until the connection cap (a start-up check catches the addresses known then; this
/// catches a wildcard listener's address that became local later). The backend is counted as
/// failing, so it leaves the rotation.
fn refuse_self_loop(client: &Conn, shared: &Shared) -> bool {
    let Ok(local) = socket2::SockRef::from(client).local_addr() else {
        return false;
    };
    let Some(local) = local.as_socket() else {
        return false;
    };
    let Some(idx) = shared.config.backends.iter().position(|&b| b == local) else {
        return false;
    };
    if shared.self_loops.replace(shared.self_loops.get() + 1) == 0 {
        eprintln!(
            "ringlab: backend {local} is this balancer itself (a connection to it arrived here); \
             refusing such connections and taking it out of rotation"
        );
    }
    shared.health.failure(
        idx,
        &io::Error::new(io::ErrorKind::InvalidInput, "the backend is this balancer"),
    );
    true
}

/// The backends that a wildcard listener could receive connections for at run time: those on
/// its port (an address added to the host later would make one of them this balancer).
fn loop_guard(listening: SocketAddr, backends: &[SocketAddr]) -> Vec<SocketAddr> {
    if !listening.ip().is_unspecified() {
        return Vec::new();
    }
    backends
        .iter()
        .copied()
        .filter(|b| b.port() == listening.port())
        .collect()
}

/// Refuses a backend that is the balancer's own listening address: the same address, a local
/// address on the port of a wildcard listener, or a wildcard address on the listener's port.
/// Each would make the balancer connect to itself until its connection cap.
pub fn check_backends(listening: SocketAddr, backends: &[SocketAddr]) -> io::Result<()> {
    for &b in backends {
        let same_port = b.port() == listening.port();
        let is_self = same_port
            && (b.ip() == listening.ip()
                || b.ip().is_unspecified()
                || (listening.ip().is_unspecified() && is_local(b.ip())));
        if is_self {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "backend {b} is the balancer's own listening address ({listening}): it would \
                     connect to itself; give the backends' addresses with --backend"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `ip` is an address of this host (binding to it succeeds).
fn is_local(ip: std::net::IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
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
    /// Who aborted the pair, if anyone did; the other side was reset in turn.
    aborted: Option<Abort>,
}

/// Who ended a pair abnormally. An L4 proxy must pass an abort on as an abort: a reset from the
/// backend that reached the client as a clean close would make a cut-off response look complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Abort {
    /// The backend reset (or failed) before finishing its side.
    Backend,
    /// The client reset, or stopped taking the backend's bytes.
    Client,
    /// No bytes moved for the idle (or half-closed) timeout, or the drain deadline passed.
    Expired,
}

/// The client's first read, started while the backend connect was in flight: done, or still
/// going (then the relay goes on waiting for it, never for the client before relaying).
enum First<'a> {
    Read(io::Result<usize>, Vec<u8>),
    Reading(std::pin::Pin<&'a mut dyn Future<Output = (io::Result<usize>, Vec<u8>)>>),
}

/// What one direction's pump reports when it stops.
enum Flow {
    /// The sending side finished cleanly (its FIN was passed on).
    Done,
    /// The pair must end now, with a reset towards the side that did not abort.
    Aborted(Abort),
    /// The backend went away before answering and a replay is possible.
    Unanswered,
}

/// The state both pumps of a pair share.
struct Pair<'a> {
    client: &'a Conn,
    server: &'a Conn,
    deadline: Deadline,
    /// One direction has finished cleanly.
    one_ended: Cell<bool>,
    /// The deadline was shortened to `fin_timeout`.
    shortened: Cell<bool>,
    /// The shorter limit for a pair one side of which has finished.
    fin_timeout: Duration,
    /// Bytes relayed client → backend and backend → client, kept here rather than returned by
    /// the pumps so that a pump dropped by the other's abort still counts what it moved.
    up: Cell<u64>,
    down: Cell<u64>,
}

impl Pair<'_> {
    /// Records that a direction finished cleanly. Returns whether it was the first: the caller
    /// then half-closes the other socket; after the second, the close sends that FIN anyway.
    /// From here on the pair gets `fin_timeout`, as HAProxy's `timeout client-fin`/`server-fin`
    /// do: a peer that has finished and a peer that never will must not hold two descriptors
    /// for the whole idle timeout.
    fn finish_one(&self) -> bool {
        self.half_closed();
        !self.one_ended.replace(true)
    }

    /// Shortens the pair's limit to `fin_timeout` (once: later calls keep it).
    fn half_closed(&self) {
        if !self.shortened.replace(true) {
            self.deadline.rearm(self.fin_timeout);
        }
    }
}

/// Relays both directions until both have ended, until one side aborts (the other is then reset),
/// until the pair expires, or until the backend goes away unanswered while a replay is possible
/// (then the client is left open for the next backend).
async fn relay(
    client: &Conn,
    server: Conn,
    shared: &Shared,
    replay: Option<&RefCell<Replay>>,
    first: First<'_>,
) -> RelayEnd {
    let pair = Pair {
        client,
        server: &server,
        // Nothing is shut down when it passes: the relay wakes and resets both sides.
        deadline: shared.deadlines.arm(
            [client.fd(), server.fd()],
            deadline::WAKE_ONLY,
            shared.config.idle_timeout,
        ),
        one_ended: Cell::new(false),
        shortened: Cell::new(false),
        up: Cell::new(0),
        down: Cell::new(0),
        fin_timeout: shared.config.fin_timeout.min(shared.config.idle_timeout),
    };
    // The client's buffer comes with its first read.
    let mut up_buf = Vec::new();
    let mut down_buf = shared.buffers.take();
    let end = {
        let up = pump_up(&pair, &mut up_buf, replay, first);
        let down = pump_down(&pair, &mut down_buf, replay);
        settle(up, down, pair.deadline.expired()).await
    };
    let (up, down) = (pair.up.get(), pair.down.get());
    let end = RelayEnd {
        up,
        down: if end.unanswered { 0 } else { down },
        ..end
    };
    shared.buffers.give(up_buf);
    shared.buffers.give(down_buf);
    match end.aborted {
        // The client aborted: the backend is reset, not told the client finished.
        Some(Abort::Client) => reset_on_close(&server),
        Some(Abort::Backend) => reset_on_close(client),
        Some(Abort::Expired) => {
            reset_on_close(client);
            reset_on_close(&server);
        }
        None => {}
    }
    end
}

/// Makes the coming close of `conn` send a reset (`SO_LINGER` 0) instead of a FIN.
fn reset_on_close(conn: &Conn) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is a valid struct of the size given; the descriptor is open.
    unsafe {
        libc::setsockopt(
            conn.fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Waits for both pumps. An abort or an expired deadline ends the pair at once (dropping the
/// other pump mid-wait); an unanswered backend ends it at once too (dropping the client pump,
/// which never loses bytes: it keeps them for the replay before writing).
async fn settle(
    up: impl Future<Output = Flow>,
    down: impl Future<Output = Flow>,
    expired: impl Future<Output = ()>,
) -> RelayEnd {
    let mut up = std::pin::pin!(up);
    let mut down = std::pin::pin!(down);
    let mut expired = std::pin::pin!(expired);
    let (mut up_done, mut down_done) = (false, false);
    poll_fn(|cx| {
        let up_state = poll_pump(up.as_mut(), &mut up_done, cx);
        let down_state = poll_pump(down.as_mut(), &mut down_done, cx);
        let (aborted, unanswered) = match (up_state, down_state) {
            (Some(Flow::Aborted(who)), _) | (_, Some(Flow::Aborted(who))) => (Some(who), false),
            // Leave the client open for the replay; stop reading from it here.
            (_, Some(Flow::Unanswered)) => (None, true),
            _ => match (up_done, down_done) {
                (true, true) => (None, false),
                _ if expired.as_mut().poll(cx).is_ready() => (Some(Abort::Expired), false),
                _ => return Poll::Pending,
            },
        };
        // The byte counts are filled in by the caller, from the pair.
        Poll::Ready(RelayEnd {
            up: 0,
            down: 0,
            unanswered,
            aborted,
        })
    })
    .await
}

/// Polls one pump unless it already finished cleanly (`done`). Returns an abort or an
/// unanswered end, which end the pair.
fn poll_pump(
    pump: std::pin::Pin<&mut impl Future<Output = Flow>>,
    done: &mut bool,
    cx: &mut std::task::Context<'_>,
) -> Option<Flow> {
    if *done {
        return None;
    }
    match pump.poll(cx) {
        Poll::Pending => None,
        Poll::Ready(Flow::Done) => {
            *done = true;
            None
        }
        Poll::Ready(end) => {
            *done = true;
            Some(end)
        }
    }
}

/// Client → backend. Bytes are kept for a replay before they are written, so a backend dying
/// mid-write loses nothing. On the client's end it half-closes the backend (unless the other
/// direction already ended: the close that follows sends that FIN, for one syscall less).
///
/// A backend that stops reading (it answered and closed, say a 431 for a head too large, and its
/// close with our bytes unread came back as a reset) has not aborted its answer: that is still on
/// its way down. So the client's further bytes are read and dropped until the client finishes
/// (bounded by the pair's half-closed timeout), the way a server's lingering close does; closing
/// at once would reset the client and could destroy the answer before the client reads it.
async fn pump_up(
    pair: &Pair<'_>,
    buf: &mut Vec<u8>,
    replay: Option<&RefCell<Replay>>,
    first: First<'_>,
) -> Flow {
    let (from, to) = (pair.client, pair.server);
    let mut discarding = false;
    let mut first = Some(first);
    loop {
        let read = match first.take() {
            Some(First::Read(read, early)) => {
                *buf = early;
                read
            }
            Some(First::Reading(reading)) => {
                let (read, early) = reading.await;
                *buf = early;
                read
            }
            None => {
                buf.clear();
                from.read(buf).await
            }
        };
        match read {
            Ok(0) => {
                if let Some(r) = replay {
                    r.borrow_mut().client_done = true;
                }
                if pair.finish_one() && !discarding {
                    let _ = to.shutdown_write();
                }
                return Flow::Done;
            }
            Ok(_) => {}
            Err(_) => return Flow::Aborted(Abort::Client),
        }
        if discarding {
            continue;
        }
        pair.deadline.extend();
        let retrying = replay.is_some_and(|r| {
            let mut r = r.borrow_mut();
            r.keep(buf);
            r.may_retry()
        });
        if to.write_all(buf).await.is_err() {
            if retrying {
                // Only the backend's side: the client stays open for the replay, and the
                // backend pump sees the end and reports it unanswered.
                let _ = conn::shutdown(to.fd(), libc::SHUT_RDWR);
                return Flow::Done;
            }
            // The backend's receiving side is gone; its answer may still be coming down. The
            // half-closed timeout now bounds the lingering, and reading no longer extends it.
            discarding = true;
            pair.half_closed();
            continue;
        }
        pair.up.set(pair.up.get() + buf.len() as u64);
    }
}

/// Backend → client. A backend that ends before its first byte while a replay is possible is
/// reported unanswered instead of passing the end on to the client; a backend that resets is
/// an abort, passed on to the client as a reset.
async fn pump_down(pair: &Pair<'_>, buf: &mut Vec<u8>, replay: Option<&RefCell<Replay>>) -> Flow {
    let (from, to) = (pair.server, pair.client);
    loop {
        buf.clear();
        // Whether the backend's FIN is queued behind the answer comes with the read: passing
        // both on together puts them in one segment to the client.
        let read = from.read_probing(buf).await;
        let end = matches!(read, Ok((n, true)) if n > 0);
        let read = read.map(|(n, _)| n);
        // Unanswered means the backend went away first: a backend that closes after the client
        // has finished sending (a connect-and-close probe, a half-closed request it refused)
        // ended a complete exchange, and is not replayed.
        if pair.down.get() == 0
            && matches!(read, Ok(0) | Err(_))
            && replay.is_some_and(|r| {
                let r = r.borrow();
                r.may_retry() && !r.client_done
            })
        {
            return Flow::Unanswered;
        }
        match read {
            Ok(0) => {
                if pair.finish_one() {
                    let _ = to.shutdown_write();
                }
                return Flow::Done;
            }
            Ok(_) => {}
            Err(_) => return Flow::Aborted(Abort::Backend),
        }
        if pair.down.get() == 0 {
            if let Some(r) = replay {
                let mut r = r.borrow_mut();
                r.answered = true;
                r.bytes = Vec::new();
            }
        }
        pair.deadline.extend();
        let written = if end && pair.finish_one() {
            to.write_all_and_finish(buf).await
        } else {
            to.write_all(buf).await
        };
        if written.is_err() {
            // The client is gone mid-answer: the backend learns it by a reset, as it would
            // have directly.
            return Flow::Aborted(Abort::Client);
        }
        pair.down.set(pair.down.get() + buf.len() as u64);
        if end {
            return Flow::Done;
        }
    }
}

/// Recycles relay buffers so a new pair does not allocate.
struct BufferPool {
    size: usize,
    free: RefCell<Vec<Vec<u8>>>,
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

    fn take(&self) -> Vec<u8> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.size))
    }

    /// Takes a buffer back, emptied (one an aborted operation kept is replaced by an empty one
    /// without capacity: dropped).
    fn give(&self, mut buf: Vec<u8>) {
        let mut free = self.free.borrow_mut();
        if free.len() < Self::KEEP && buf.capacity() >= self.size {
            buf.clear();
            free.push(buf);
        }
    }
}
