//! The balancer: one pinned executor per CPU, accepting from one shared listener, choosing a
//! backend by policy ([`crate::serve::policy`]) among those in rotation ([`crate::serve::health`]).
//! Two modes share this: TCP ([`tcp`], the default: bytes relayed untouched) and HTTP ([`http`]:
//! requests parsed and sent over pooled keep-alive backend connections).

mod http;
mod pool;
mod tcp;

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use futures_lite::future;
use glommio::sync::Gate;

use crate::serve::metrics;

use crate::io::accept;
use crate::io::conn::{self, Conn};
use crate::io::deadline::Deadlines;
use crate::io::driver::{self, IoMode};
use crate::io::placement::{self, Executor};
use crate::io::shutdown::{LocalStop, Shutdown};
use crate::io::time;
use crate::serve::health::{Health, HealthPolicy};
use crate::serve::policy::{Chooser, Load, Policy};

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
    /// TCP (bytes relayed untouched) or HTTP (requests over pooled backend connections).
    pub mode: Mode,
    /// How the first backend to try is chosen.
    pub policy: Policy,
    /// Per-backend weights, in `backends` order (each at least 1).
    pub weights: Vec<u32>,
    /// HTTP mode: a backend that has not begun its response this long after the request is
    /// answered 504 for it.
    pub response_timeout: Duration,
    /// HTTP mode: idle keep-alive connections kept per backend and executor.
    pub pool_size: usize,
    /// HTTP mode: an idle pooled connection is closed after this long (sooner if the backend's
    /// `Keep-Alive: timeout` says so).
    pub pool_idle_timeout: Duration,
    /// HTTP mode: bound on a request or response head; a longer request head gets 431.
    pub max_head: usize,
    /// HTTP mode: time a client has to send a complete request head (and, kept alive, the next).
    pub head_timeout: Duration,
}

/// The balancer's mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// An L4 proxy: bytes relayed untouched both ways, any TCP protocol.
    #[default]
    Tcp,
    /// An HTTP/1.1 proxy: each request parsed and sent over a pooled keep-alive connection.
    Http,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
        })
    }
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
            mode: Mode::default(),
            policy: Policy::default(),
            weights: Vec::new(),
            response_timeout: Duration::from_secs(30),
            pool_size: 64,
            pool_idle_timeout: Duration::from_secs(60),
            max_head: crate::serve::http::DEFAULT_MAX_HEAD,
            head_timeout: Duration::from_secs(10),
        }
    }
}

/// Per-backend counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// The backend's address.
    pub addr: Option<SocketAddr>,
    /// Client connections relayed to it (TCP mode).
    pub connections: u64,
    /// Requests sent to it (HTTP mode).
    pub requests: u64,
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
    /// The HTTP mode's counters (all zero in TCP mode).
    pub http: HttpCounters,
}

/// What the HTTP mode did on one executor.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpCounters {
    /// Requests read from clients (refused ones included).
    pub requests: u64,
    /// Requests sent on a pooled (kept-alive) backend connection.
    pub pooled: u64,
    /// Requests that needed a new backend connection.
    pub connected: u64,
    /// GET/HEAD requests sent again on a fresh connection after a pooled one turned out closed.
    pub retried: u64,
    /// Requests refused before reaching a backend (400, 408, 417, 431, 501).
    pub refused: u64,
    /// Broken or unreachable backends answered 502 (503 when no backend was up).
    pub bad_gateway: u64,
    /// Backends that did not begin a response within the response timeout (504).
    pub gateway_timeout: u64,
}

impl HttpCounters {
    fn add(&mut self, o: &HttpCounters) {
        self.requests += o.requests;
        self.pooled += o.pooled;
        self.connected += o.connected;
        self.retried += o.retried;
        self.refused += o.refused;
        self.bad_gateway += o.bad_gateway;
        self.gateway_timeout += o.gateway_timeout;
    }
}

impl BalancerReport {
    /// Adds another executor's counters into this one (accepts are per core; keep them apart).
    pub fn merge_backends(&mut self, other: &BalancerReport) {
        self.http.add(&other.http);
        if self.backends.is_empty() {
            self.backends = other.backends.clone();
            return;
        }
        for (mine, theirs) in self.backends.iter_mut().zip(&other.backends) {
            mine.connections += theirs.connections;
            mine.requests += theirs.requests;
            mine.bytes_up += theirs.bytes_up;
            mine.bytes_down += theirs.bytes_down;
            mine.connect_failures += theirs.connect_failures;
            mine.unanswered += theirs.unanswered;
            mine.backend_resets += theirs.backend_resets;
            mine.client_resets += theirs.client_resets;
        }
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
    spawn_watched(listeners, cpus, config, shutdown, None)
}

/// [`spawn`], with a Prometheus endpoint on `metrics` (served by the first executor).
pub fn spawn_watched(
    listeners: Vec<std::net::TcpListener>,
    cpus: &[Option<usize>],
    config: BalancerConfig,
    shutdown: Shutdown,
    metrics: Option<std::net::TcpListener>,
) -> io::Result<Vec<Executor<io::Result<BalancerReport>>>> {
    let hub = metrics
        .is_some()
        .then(|| metrics::Hub::new(FAMILIES, listeners.len()));
    let mut scrape = metrics;
    if let Some(first) = listeners.first() {
        check_backends(first.local_addr()?, &config.backends)?;
    }
    let common = Common::new(&config, true);
    let mut executors = Vec::new();
    for (i, (listener, &cpu)) in listeners.into_iter().zip(cpus).enumerate() {
        let name = match cpu {
            Some(cpu) => format!("lb-cpu{cpu}"),
            None => "lb".to_string(),
        };
        let (config, stopper, common) = (config.clone(), shutdown.clone(), common.clone());
        // One executor probes for all: the table is shared.
        let probe = i == 0;
        let watch = hub.clone().map(|hub| (hub, i, scrape.take()));
        match placement::spawn_pinned(&name, cpu, config.io, move || async move {
            let mut report = serve_watched(listener, config, common, probe, stopper, watch).await?;
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

/// What a balancer's executors share: backend health and the work in flight per backend.
#[derive(Debug)]
pub struct Common {
    /// Which backends are in rotation.
    pub health: Health,
    /// Connections (TCP) or requests (HTTP) in flight per backend.
    pub load: Arc<Load>,
}

impl Common {
    /// The shared state for `config`'s backends, all in rotation and idle. `log` prints
    /// health changes.
    pub fn new(config: &BalancerConfig, log: bool) -> Arc<Common> {
        Arc::new(Common {
            health: Health::new(&config.backends, config.health, log),
            load: Load::for_policy(config.backends.len(), config.policy),
        })
    }
}

/// Executor-local state shared by every pair (TCP) or client (HTTP).
pub(super) struct Shared {
    config: BalancerConfig,
    chooser: Chooser,
    common: Arc<Common>,
    counters: RefCell<Vec<BackendCounters>>,
    http: RefCell<HttpCounters>,
    pool: pool::Pool,
    /// The balancer is stopping: kept-alive clients are closed after their current request.
    stop: LocalStop,
    unserved: Cell<u64>,
    retried: Cell<u64>,
    deadlines: Rc<Deadlines>,
    buffers: BufferPool,
    self_loops: Cell<u64>,
    /// Backends that could turn out to be this balancer (see [`loop_guard`]).
    loop_guard: Vec<SocketAddr>,
    /// Client connections accepted so far (the accept loop returns its own count at the end).
    accepted: Cell<u64>,
    /// Per backend: how long connects took, and (HTTP mode) how long until the response head.
    connect_latency: RefCell<Vec<metrics::Latency>>,
    pub(super) response_latency: RefCell<Vec<metrics::Latency>>,
}

/// Runs the balancer on the current glommio executor until `shutdown` trips, then drains
/// (bounded by `drain_timeout`) and returns this executor's counters. `probe` runs the active
/// health check (one executor per balancer does).
pub async fn serve(
    listener: std::net::TcpListener,
    config: BalancerConfig,
    common: Arc<Common>,
    probe: bool,
    shutdown: Shutdown,
) -> io::Result<BalancerReport> {
    serve_watched(listener, config, common, probe, shutdown, None).await
}

/// [`serve`], publishing this executor's counters into `metrics` (its hub, this executor's slot,
/// and on one executor the scrape listener).
pub async fn serve_watched(
    listener: std::net::TcpListener,
    config: BalancerConfig,
    common: Arc<Common>,
    probe: bool,
    shutdown: Shutdown,
    metrics: Option<(Arc<metrics::Hub>, usize, Option<std::net::TcpListener>)>,
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
        chooser: Chooser::new(
            config.policy,
            weights_for(&config),
            common.load.clone(),
            // Each executor its own random sequence (p2c).
            0x9e37_79b9_7f4a_7c15 ^ glommio::executor().id() as u64,
        ),
        common,
        http: RefCell::new(HttpCounters::default()),
        pool: pool::Pool::new(config.backends.len(), config.pool_size),
        stop: stop.clone(),
        unserved: Cell::new(0),
        retried: Cell::new(0),
        deadlines: Deadlines::new(Deadlines::tick_for(
            config.idle_timeout.min(config.fin_timeout),
        )),
        buffers: BufferPool::new(config.buffer_size),
        self_loops: Cell::new(0),
        loop_guard: loop_guard(listening, &config.backends),
        accepted: Cell::new(0),
        connect_latency: RefCell::new(vec![metrics::Latency::default(); config.backends.len()]),
        response_latency: RefCell::new(vec![metrics::Latency::default(); config.backends.len()]),
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
    let pruner = match shared.config.mode {
        Mode::Http => Some(driver::spawn_local(pool::prune(
            shared.clone(),
            stop.clone(),
        ))),
        Mode::Tcp => None,
    };
    let (publisher, scrapes) = match metrics {
        Some((hub, slot, scrape)) => {
            let (watched, cap) = (shared.clone(), limit.clone());
            let max = shared.config.max_conns as f64;
            // The accept loop holds one place in reserve for the next connection.
            let collect = move || samples(&watched, max - cap.available() as f64 - 1.0, slot == 0);
            let publisher = driver::spawn_local(metrics::publish_loop(
                hub.clone(),
                slot,
                stop.clone(),
                collect,
            ));
            let scrapes = scrape.map(|l| driver::spawn_local(metrics::serve(l, hub, stop.clone())));
            (Some(publisher), scrapes)
        }
        None => (None, None),
    };
    let accepted = accept::run(listener, &stop, &limit, |client, slot| {
        shared.accepted.set(shared.accepted.get() + 1);
        match shared.config.mode {
            Mode::Tcp => accept::spawn_connection(&gate, slot, tcp::proxy(client, shared.clone())),
            Mode::Http => {
                accept::spawn_connection(&gate, slot, http::serve_client(client, shared.clone()))
            }
        }
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
    drop(pruner);
    if let Some(publisher) = publisher {
        publisher.await;
    }
    if let Some(scrapes) = scrapes {
        scrapes.await;
    }
    // Pooled connections are closed cleanly (a FIN, no request in flight on them).
    shared.pool.clear();
    let report = BalancerReport {
        cpu: None,
        accepted,
        unserved: shared.unserved.get(),
        idle_closed: shared.deadlines.fired(),
        self_loops: shared.self_loops.get(),
        retried: shared.retried.get(),
        backends: shared.counters.borrow().clone(),
        http: shared.http.borrow().clone(),
    };
    Ok(report)
}

/// The balancer's metric families.
pub const FAMILIES: &[metrics::Family] = &[
    metrics::Family {
        name: "ringlab_lb_connections_accepted_total",
        kind: metrics::Kind::Counter,
        help: "Client connections accepted.",
    },
    metrics::Family {
        name: "ringlab_lb_connections_active",
        kind: metrics::Kind::Gauge,
        help: "Client connections open now.",
    },
    metrics::Family {
        name: "ringlab_lb_connections_refused_total",
        kind: metrics::Kind::Counter,
        help: "Client connections closed unserved: no backend reachable, or the balancer itself.",
    },
    metrics::Family {
        name: "ringlab_lb_replayed_total",
        kind: metrics::Kind::Counter,
        help: "Requests sent again to another backend (TCP replay) or on a fresh connection (HTTP).",
    },
    metrics::Family {
        name: "ringlab_lb_http_requests_total",
        kind: metrics::Kind::Counter,
        help: "Requests read from clients in the HTTP mode, by how they ended.",
    },
    metrics::Family {
        name: "ringlab_lb_backend_up",
        kind: metrics::Kind::Gauge,
        help: "1 when the backend is in rotation, 0 when health took it out.",
    },
    metrics::Family {
        name: "ringlab_lb_backend_connections_total",
        kind: metrics::Kind::Counter,
        help: "Client connections relayed to the backend (TCP mode).",
    },
    metrics::Family {
        name: "ringlab_lb_backend_requests_total",
        kind: metrics::Kind::Counter,
        help: "Requests sent to the backend (HTTP mode).",
    },
    metrics::Family {
        name: "ringlab_lb_backend_sent_bytes_total",
        kind: metrics::Kind::Counter,
        help: "Bytes relayed from clients to the backend (TCP mode, counted as pairs end).",
    },
    metrics::Family {
        name: "ringlab_lb_backend_received_bytes_total",
        kind: metrics::Kind::Counter,
        help: "Bytes relayed from the backend to clients (TCP mode, counted as pairs end).",
    },
    metrics::Family {
        name: "ringlab_lb_backend_connect_failures_total",
        kind: metrics::Kind::Counter,
        help: "Connects to the backend that failed or timed out.",
    },
    metrics::Family {
        name: "ringlab_lb_backend_unanswered_total",
        kind: metrics::Kind::Counter,
        help: "Connections the backend closed or reset before answering a byte.",
    },
    metrics::Family {
        name: "ringlab_lb_backend_resets_total",
        kind: metrics::Kind::Counter,
        help: "Pairs reset mid-way, by which side reset first.",
    },
    metrics::Family {
        name: "ringlab_lb_backend_connect_seconds",
        kind: metrics::Kind::Histogram,
        help: "Time to connect to the backend.",
    },
    metrics::Family {
        name: "ringlab_lb_backend_response_seconds",
        kind: metrics::Kind::Histogram,
        help: "Time from sending a request to the backend's response head (HTTP mode).",
    },
];

/// This executor's numbers as samples (`active`: client connections open now). Gauges of state
/// the executors share (backend health) come from the first executor only, as they must not
/// be summed.
fn samples(shared: &Shared, active: f64, first: bool) -> Vec<metrics::Sample> {
    use metrics::sample;
    let mut out = vec![
        sample(
            "ringlab_lb_connections_accepted_total",
            &[],
            shared.accepted.get() as f64,
        ),
        sample("ringlab_lb_connections_active", &[], active.max(0.0)),
        sample(
            "ringlab_lb_connections_refused_total",
            &[],
            (shared.unserved.get() + shared.self_loops.get()) as f64,
        ),
    ];
    let http = shared.http.borrow();
    out.push(sample(
        "ringlab_lb_replayed_total",
        &[],
        (shared.retried.get() + http.retried) as f64,
    ));
    let answered = http.requests - http.refused - http.bad_gateway - http.gateway_timeout;
    for (outcome, n) in [
        ("answered", answered),
        ("refused", http.refused),
        ("bad_gateway", http.bad_gateway),
        ("gateway_timeout", http.gateway_timeout),
    ] {
        out.push(sample(
            "ringlab_lb_http_requests_total",
            &[("outcome", outcome.into())],
            n as f64,
        ));
    }
    drop(http);
    let counters = shared.counters.borrow();
    let connects = shared.connect_latency.borrow();
    let responses = shared.response_latency.borrow();
    for (i, c) in counters.iter().enumerate() {
        let b = [("backend", shared.config.backends[i].to_string())];
        if first {
            let up = f64::from(u8::from(shared.common.health.usable(i)));
            out.push(sample("ringlab_lb_backend_up", &b, up));
        }
        for (name, v) in [
            ("ringlab_lb_backend_connections_total", c.connections),
            ("ringlab_lb_backend_requests_total", c.requests),
            ("ringlab_lb_backend_sent_bytes_total", c.bytes_up),
            ("ringlab_lb_backend_received_bytes_total", c.bytes_down),
            (
                "ringlab_lb_backend_connect_failures_total",
                c.connect_failures,
            ),
            ("ringlab_lb_backend_unanswered_total", c.unanswered),
        ] {
            out.push(sample(name, &b, v as f64));
        }
        for (by, v) in [("backend", c.backend_resets), ("client", c.client_resets)] {
            let mut l = b.to_vec();
            l.push(("by", by.into()));
            out.push(sample("ringlab_lb_backend_resets_total", &l, v as f64));
        }
        connects[i].samples("ringlab_lb_backend_connect_seconds", &b, &mut out);
        responses[i].samples("ringlab_lb_backend_response_seconds", &b, &mut out);
    }
    out
}

/// The active health check: a TCP connect to every backend each `every`. A probe slower than the
/// interval counts as failed (a backend that drops SYNs while it drains answers nothing).
async fn probe_backends(shared: Rc<Shared>, every: Duration, stop: LocalStop) {
    let timeout = shared.config.connect_timeout.min(every);
    while !stop.is_stopped() {
        for (i, &addr) in shared.config.backends.iter().enumerate() {
            match conn::connect(addr, timeout).await {
                Ok(_) => shared.common.health.success(i),
                Err(e) => shared.common.health.failure(i, &e),
            }
        }
        let stopped = async {
            stop.stopped().await;
        };
        future::or(time::sleep(every), stopped).await;
    }
}

/// Refuses `client` if it arrived on an address that is one of the backends: the balancer's own
/// connect to that backend has landed on itself. Without this, each such connection would make
/// another until the connection cap (a start-up check catches the addresses known then; this
/// catches a wildcard listener's address that became local later). The backend is counted as
/// failing, so it leaves the rotation.
pub(super) fn refuse_self_loop(client: &Conn, shared: &Shared) -> bool {
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
    shared.common.health.failure(
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

pub(super) fn unanswered(shared: &Shared, idx: usize) {
    shared.counters.borrow_mut()[idx].unanswered += 1;
}

/// Connects to the next backend in the policy's `order` (from `*pos` on) that is in rotation (or
/// to every one in turn when all are out, so a recovered backend is found at once): each backend
/// is tried at most once per `order`.
pub(super) async fn connect_next(
    shared: &Shared,
    order: &[usize],
    pos: &mut usize,
) -> Option<(usize, Conn)> {
    let all_down = shared.common.health.all_down();
    while *pos < order.len() {
        let idx = order[*pos];
        *pos += 1;
        if !all_down && !shared.common.health.usable(idx) {
            continue;
        }
        if let Some(server) = connect_to(shared, idx).await {
            return Some((idx, server));
        }
    }
    None
}

/// Connects to backend `idx`, counting a failure against its health.
pub(super) async fn connect_to(shared: &Shared, idx: usize) -> Option<Conn> {
    let addr = shared.config.backends[idx];
    let started = std::time::Instant::now();
    match conn::connect(addr, shared.config.connect_timeout).await {
        Ok(server) => {
            shared.common.health.success(idx);
            shared.connect_latency.borrow_mut()[idx].record(started.elapsed());
            Some(server)
        }
        Err(e) => {
            shared.counters.borrow_mut()[idx].connect_failures += 1;
            shared.common.health.failure(idx, &e);
            None
        }
    }
}

/// The weights in backend order: the configured ones, or 1 each.
fn weights_for(config: &BalancerConfig) -> Vec<u32> {
    (0..config.backends.len())
        .map(|i| config.weights.get(i).copied().unwrap_or(1).max(1))
        .collect()
}

/// Makes the coming close of `conn` send a reset (`SO_LINGER` 0) instead of a FIN.
pub(super) fn reset_on_close(conn: &Conn) {
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
