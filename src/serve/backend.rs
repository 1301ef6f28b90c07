//! The lab's HTTP server: one pinned glommio executor serves any number of listeners, answering
//! each request with pre-built bytes from [`crate::serve::http`].

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_lite::future;
use glommio::sync::Gate;

use crate::io::accept;
use crate::io::conn::Conn;
use crate::io::deadline::{Deadline, Deadlines};
use crate::io::driver::{self, IoMode};
use crate::io::placement::{self, Executor};
use crate::io::shutdown::{LocalStop, Shutdown};
use crate::io::time;
use crate::serve::http::{self, HeadError, Kind, Reply, Responses};
use crate::serve::metrics;

/// How a backend treats its clients.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    /// Bound on a request head; a longer head gets 431.
    pub max_head: usize,
    /// Time a client has to deliver a complete head, and on keep-alive the next one. A head that
    /// started but did not finish gets 408; an idle connection is closed silently.
    pub head_timeout: Duration,
    /// How long a graceful stop waits for connections already accepted.
    pub drain_timeout: Duration,
    /// Connections served at once; past it, accepting pauses and clients wait in the backlog.
    pub max_conns: usize,
    /// The executor's socket driver.
    pub io: IoMode,
    /// How long each answer waits before it is sent (a service time to balance over).
    pub delay: Delay,
    /// Per-listener delays, by port, overriding `delay`.
    pub delay_on: Vec<(u16, Delay)>,
}

/// A service time: how long an answer waits (on the executor's timers, so the executor serves
/// other connections meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Delay {
    /// Answer at once.
    #[default]
    None,
    /// Always this long.
    Fixed(Duration),
    /// Exponentially distributed with this mean (a memoryless service time, as in queueing
    /// models).
    Exponential(Duration),
}

impl Delay {
    /// Parses `5ms` (fixed) or `exp:2ms` (exponential with that mean).
    pub fn parse(s: &str) -> Result<Delay, String> {
        match s.strip_prefix("exp:") {
            Some(mean) => Ok(Delay::Exponential(crate::cli::parse_duration(mean)?)),
            None => Ok(Delay::Fixed(crate::cli::parse_duration(s)?)),
        }
    }

    /// One service time; `random` is a uniform draw in (0, 1].
    fn sample(self, random: f64) -> Option<Duration> {
        match self {
            Delay::None => None,
            Delay::Fixed(d) => Some(d),
            Delay::Exponential(mean) => Some(mean.mul_f64(-random.ln())),
        }
    }
}

impl std::fmt::Display for Delay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Delay::None => f.write_str("none"),
            Delay::Fixed(d) => write!(f, "{d:?}"),
            Delay::Exponential(d) => write!(f, "exp:{d:?}"),
        }
    }
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            max_head: http::DEFAULT_MAX_HEAD,
            head_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(10),
            max_conns: crate::io::limits::default_max_conns(1),
            io: IoMode::default(),
            delay: Delay::None,
            delay_on: Vec::new(),
        }
    }
}

/// What one listener did, reported when the server stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// The address it listened on.
    pub addr: Option<SocketAddr>,
    /// Connections accepted.
    pub connections: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// 404 and 405 responses.
    pub not_found: u64,
    /// 400 and 431 responses: heads refused as malformed or too large.
    pub refused: u64,
    /// Heads that did not complete in time (408 sent when a partial head had arrived).
    pub timed_out: u64,
}

impl ListenerStats {
    /// Every response sent.
    pub fn responses(&self) -> u64 {
        self.ok + self.not_found + self.refused
    }
}

/// Per-listener state shared by its connections on one executor.
struct Listener {
    id: [u8; http::SERVER_ID_LEN],
    /// Swapped whole once a second by the date task; a connection clones the `Rc`, so a write in
    /// flight keeps the bytes it started with and nothing is formatted per request.
    responses: RefCell<Rc<Responses>>,
    stats: RefCell<ListenerStats>,
    /// This listener's service time.
    delay: Delay,
    /// For exponential delays.
    rng: crate::rng::Rng,
    /// Connections accepted so far (the accept loop returns its own count at the end).
    accepted: std::cell::Cell<u64>,
}

impl Listener {
    fn new(addr: SocketAddr, delay: Delay) -> Listener {
        let id = http::server_id(addr.port());
        Listener {
            id,
            delay,
            rng: crate::rng::Rng::new(0x2545_f491_4f6c_dd1d ^ u64::from(addr.port())),
            accepted: std::cell::Cell::new(0),
            responses: RefCell::new(Rc::new(Responses::new(&id, &http::now_fixdate()))),
            stats: RefCell::new(ListenerStats {
                addr: Some(addr),
                ..ListenerStats::default()
            }),
        }
    }

    /// The wait before the next answer, if any.
    fn service_time(&self) -> Option<Duration> {
        self.delay.sample(self.rng.unit())
    }

    fn count(&self, kind: Kind) {
        let mut s = self.stats.borrow_mut();
        match kind.status() {
            200..=299 => s.ok += 1,
            404 | 405 => s.not_found += 1,
            408 => {}
            _ => s.refused += 1,
        }
    }
}

/// Starts a backend on its own executor, pinned to `cpu`, serving every listener in `listeners`.
pub fn spawn(
    listeners: Vec<std::net::TcpListener>,
    cpu: Option<usize>,
    config: BackendConfig,
    shutdown: Shutdown,
) -> io::Result<Executor<io::Result<Vec<ListenerStats>>>> {
    spawn_watched(listeners, cpu, config, shutdown, None)
}

/// [`spawn`], with a Prometheus endpoint on `metrics`.
pub fn spawn_watched(
    listeners: Vec<std::net::TcpListener>,
    cpu: Option<usize>,
    config: BackendConfig,
    shutdown: Shutdown,
    metrics: Option<std::net::TcpListener>,
) -> io::Result<Executor<io::Result<Vec<ListenerStats>>>> {
    let name = match cpu {
        Some(cpu) => format!("backend-cpu{cpu}"),
        None => "backend".to_string(),
    };
    placement::spawn_pinned(&name, cpu, config.io, move || {
        serve_watched(listeners, config, shutdown, metrics)
    })
}

/// The backend's metric families.
pub const FAMILIES: &[metrics::Family] = &[
    metrics::Family {
        name: "ringlab_backend_connections_accepted_total",
        kind: metrics::Kind::Counter,
        help: "Connections accepted, per listener.",
    },
    metrics::Family {
        name: "ringlab_backend_connections_active",
        kind: metrics::Kind::Gauge,
        help: "Connections open now.",
    },
    metrics::Family {
        name: "ringlab_backend_responses_total",
        kind: metrics::Kind::Counter,
        help: "Responses sent, per listener and status class (2xx; 404 for 404 and 405; 4xx for 400 and 431).",
    },
    metrics::Family {
        name: "ringlab_backend_heads_timed_out_total",
        kind: metrics::Kind::Counter,
        help: "Request heads that did not complete within the head timeout.",
    },
];

fn samples(contexts: &[Rc<Listener>], active: f64) -> Vec<metrics::Sample> {
    use metrics::sample;
    let mut out = vec![sample(
        "ringlab_backend_connections_active",
        &[],
        active.max(0.0),
    )];
    for ctx in contexts {
        let l = [(
            "listener",
            ctx.stats
                .borrow()
                .addr
                .map_or("-".into(), |a| a.to_string()),
        )];
        let s = ctx.stats.borrow();
        out.push(sample(
            "ringlab_backend_connections_accepted_total",
            &l,
            ctx.accepted.get() as f64,
        ));
        for (class, n) in [("2xx", s.ok), ("404", s.not_found), ("4xx", s.refused)] {
            let mut labels = l.to_vec();
            labels.push(("code", class.into()));
            out.push(sample("ringlab_backend_responses_total", &labels, n as f64));
        }
        out.push(sample(
            "ringlab_backend_heads_timed_out_total",
            &l,
            s.timed_out as f64,
        ));
    }
    out
}

/// Serves every listener on the current glommio executor until `shutdown` trips, then drains
/// (bounded by `drain_timeout`) and returns per-listener counters.
pub async fn serve(
    listeners: Vec<std::net::TcpListener>,
    config: BackendConfig,
    shutdown: Shutdown,
) -> io::Result<Vec<ListenerStats>> {
    serve_watched(listeners, config, shutdown, None).await
}

/// [`serve`], with a Prometheus endpoint on `metrics`, served by this same executor.
pub async fn serve_watched(
    listeners: Vec<std::net::TcpListener>,
    config: BackendConfig,
    shutdown: Shutdown,
    metrics: Option<std::net::TcpListener>,
) -> io::Result<Vec<ListenerStats>> {
    let stop = LocalStop::watch(&shutdown);
    let listening = listeners.len();
    let config = Rc::new(config);
    let gate = Gate::new();
    let deadlines = Deadlines::new(Deadlines::tick_for(config.head_timeout));
    // One cap for the executor, shared by its listeners: they share its descriptors.
    let limit = accept::limit(config.max_conns);
    let mut contexts = Vec::new();
    let mut loops = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr()?;
        let delay = config
            .delay_on
            .iter()
            .find(|(port, _)| *port == addr.port())
            .map_or(config.delay, |(_, d)| *d);
        let ctx = Rc::new(Listener::new(addr, delay));
        contexts.push(ctx.clone());
        let (stop, gate, config) = (stop.clone(), gate.clone(), config.clone());
        let (deadlines, limit) = (deadlines.clone(), limit.clone());
        loops.push(driver::spawn_local(async move {
            let accepted = accept::run(listener, &stop, &limit, |conn, slot| {
                ctx.accepted.set(ctx.accepted.get() + 1);
                // The gate only refuses once closed, which happens after every loop ended.
                let served = serve_connection(
                    conn,
                    ctx.clone(),
                    config.clone(),
                    deadlines.clone(),
                    stop.clone(),
                );
                accept::spawn_connection(&gate, slot, served);
            })
            .await;
            ctx.stats.borrow_mut().connections = accepted;
        }));
    }
    let dates = driver::spawn_local(refresh_dates(contexts.clone(), stop.clone()));
    let watching = metrics.map(|scrape| {
        let hub = metrics::Hub::new(FAMILIES, 1);
        let (watched, cap) = (contexts.clone(), limit.clone());
        let max = config.max_conns as f64;
        // Each accept loop holds one place in reserve for its next connection.
        let reserved = listening as f64;
        let collect = move || samples(&watched, max - cap.available() as f64 - reserved);
        (
            driver::spawn_local(metrics::publish_loop(hub.clone(), 0, stop.clone(), collect)),
            driver::spawn_local(metrics::serve(scrape, hub, stop.clone())),
        )
    });
    let ticker = driver::spawn_local(deadlines.clone().run(stop.clone()));
    for task in loops {
        task.await;
    }
    let drained = future::or(async { gate.close().await.is_ok() }, async {
        time::sleep(config.drain_timeout).await;
        false
    })
    .await;
    if !drained {
        eprintln!(
            "ringlab: backend drain deadline ({:?}) passed with connections still open; closing them",
            config.drain_timeout
        );
    }
    drop(dates);
    drop(ticker);
    if let Some((publisher, scrapes)) = watching {
        publisher.await;
        scrapes.await;
    }
    Ok(contexts.iter().map(|c| c.stats.borrow().clone()).collect())
}

/// Rebuilds every listener's responses when the wall-clock second changes.
async fn refresh_dates(contexts: Vec<Rc<Listener>>, stop: LocalStop) {
    while !stop.is_stopped() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let to_next = Duration::from_nanos(1_000_000_000 - u64::from(now.subsec_nanos()));
        time::sleep(to_next).await;
        let date = http::now_fixdate();
        for ctx in &contexts {
            *ctx.responses.borrow_mut() = Rc::new(Responses::new(&ctx.id, &date));
        }
    }
}

enum Read {
    Head(http::RequestHead),
    Refused(HeadError),
    /// The deadline passed; `true` if part of a head had arrived.
    TimedOut(bool),
    /// The client closed or reset, or the server is stopping with no request in progress.
    Gone,
}

async fn serve_connection(
    conn: Conn,
    ctx: Rc<Listener>,
    config: Rc<BackendConfig>,
    deadlines: Rc<Deadlines>,
    stop: LocalStop,
) {
    // Declared after `conn`, so it is dropped (deregistered) before the socket closes.
    let deadline = deadlines.arm([conn.fd(), -1], libc::SHUT_RD, config.head_timeout);
    // Reads append to it; its length is what has arrived. Not zeroed: nothing reads past it.
    let mut buf = Vec::with_capacity(config.max_head);
    // The response goes out from here (an io_uring send owns its bytes while the kernel sends).
    let mut out = Vec::with_capacity(256);
    let mut first = true;
    loop {
        let read = read_head(&conn, &mut buf, first, &config, &deadline, &stop).await;
        first = false;
        let responses = ctx.responses.borrow().clone();
        let parsed = match read {
            Read::Head(head) => Ok(head),
            Read::Refused(err) => Err(err),
            Read::TimedOut(partial) => {
                ctx.stats.borrow_mut().timed_out += 1;
                out.clear();
                out.extend_from_slice(responses.get(Kind::Timeout));
                if partial && conn.write_all_and_finish(&mut out).await.is_ok() {
                    linger_close(&conn, &deadline).await;
                }
                return;
            }
            Read::Gone => return,
        };
        let parsed_ok = parsed.is_ok();
        let Reply {
            kind,
            consumed,
            linger,
        } = Reply::to(parsed, buf.len(), stop.is_stopped());
        if parsed_ok {
            if let Some(wait) = ctx.service_time() {
                time::sleep(wait).await;
            }
        }
        out.clear();
        out.extend_from_slice(responses.get(kind));
        if kind.closes() && !linger {
            // The common lab request: answer, FIN in the same segment, close; nothing more to
            // read. The deadline goes first: it names the descriptor, which the close frees.
            ctx.count(kind);
            drop(deadline);
            let _ = conn.write_all_and_close(&mut out).await;
            return;
        }
        // A closing response carries the FIN in its last segment.
        let sent = if kind.closes() {
            conn.write_all_and_finish(&mut out).await
        } else {
            conn.write_all(&mut out).await
        };
        ctx.count(kind);
        if sent.is_err() {
            return;
        }
        if kind.closes() {
            if linger {
                linger_close(&conn, &deadline).await;
            }
            return;
        }
        buf.drain(..consumed);
        // The next request gets a full head timeout of its own.
        deadline.extend();
    }
}

/// Reads until `buf` holds a complete head, the head is refused, or the deadline passes (the
/// deadline shuts the read side down, so the read returns end-of-file).
async fn read_head(
    conn: &Conn,
    buf: &mut Vec<u8>,
    first: bool,
    config: &BackendConfig,
    deadline: &Deadline,
    stop: &LocalStop,
) -> Read {
    let mut scanned = 0;
    loop {
        match http::parse_request_head(buf, scanned, config.max_head) {
            Ok(Some(head)) => return Read::Head(head),
            Err(err) => return Read::Refused(err),
            Ok(None) => scanned = buf.len(),
        }
        let n = if buf.is_empty() && !first {
            // Between keep-alive requests: a stopping server closes idle connections at once
            // instead of waiting out their timeout. A connection's first request is always
            // served, so connections drained from the backlog during a stop still get answers.
            let read = async { Some(conn.read(buf).await) };
            let stopped = async {
                stop.stopped().await;
                None
            };
            match future::or(read, stopped).await {
                Some(r) => r,
                None => return Read::Gone,
            }
        } else {
            conn.read(buf).await
        };
        match n {
            Ok(n) if n > 0 && !deadline.fired() => {}
            _ if deadline.fired() => return Read::TimedOut(!buf.is_empty()),
            _ => return Read::Gone,
        }
    }
}

/// After the FIN went out with the response, reads and discards what the client still sends
/// (bounded in bytes and by a one-second deadline) so the final close does not reset a response
/// the client has not read.
async fn linger_close(conn: &Conn, deadline: &Deadline) {
    deadline.extend_by(http::LINGER);
    let mut sink = Vec::with_capacity(4096);
    let mut seen = 0;
    while seen < http::LINGER_BYTES {
        sink.clear();
        match conn.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen += n,
        }
    }
}
