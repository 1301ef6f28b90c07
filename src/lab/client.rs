//! The closed-loop HTTP load generator behind `ringlab bench`: `c` workers on pinned glommio
//! executors each connect, send one request, read the whole response, close (unless keep-alive)
//! and go again until `n` requests are done or the time limit passes. It counts the way ApacheBench
//! counts, and records latencies in HdrHistograms at microsecond resolution.
//!
//! Printing lives in [`crate::lab::report`]; this module only measures.

use std::cell::RefCell;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::io::conn::{self, Conn};
use crate::io::deadline::{Deadline, Deadlines};
use crate::io::driver::{self, IoMode};
use crate::io::placement;
use crate::io::shutdown::{LocalStop, Shutdown};
use crate::serve::http;

/// ab's default number of requests for a time-limited run without `-n`.
pub const TIMED_REQUESTS: u64 = 50_000;

/// Connect failures tolerated before any success, as ab does, before the run is declared dead.
const DEAD_TARGET_FAILURES: u64 = 10;

/// Where to send requests, parsed from an `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// The resolved address.
    pub addr: SocketAddr,
    /// The host as written (for the `Host` header and the report).
    pub host: String,
    /// The port.
    pub port: u16,
    /// The path, query included, as sent on the request line.
    pub path: String,
    /// An `Authorization` header value from credentials in the URL (never printed).
    #[serde(skip)]
    pub authorization: Option<String>,
}

impl Target {
    /// Parses an `http://` URL (the scheme in any case, as RFC 3986 allows); the port defaults
    /// to 80 and the path to `/`. Credentials in the URL (`http://user:pw@host/`) become a
    /// Basic `Authorization` header, as curl sends them; characters a request line cannot carry
    /// raw (a space, say) are percent-encoded, as curl and browsers do.
    pub fn parse(url: &str) -> Result<Target, String> {
        let scheme_end = url.find("://");
        let rest = match scheme_end.map(|i| (&url[..i], &url[i + 3..])) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(format!("'{url}': https is not supported; use http://"));
            }
            _ => {
                return Err(format!(
                    "'{url}' is not a URL; expected http://HOST:PORT/PATH"
                ));
            }
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (userinfo, authority) = match authority.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, authority),
        };
        if authority.is_empty() {
            return Err(format!("'{url}' has no host"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| format!("'{url}': bad port '{p}'"))?;
                (h.to_string(), port)
            }
            _ => (authority.to_string(), 80),
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addr = (bare, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve '{host}': {e}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve '{host}'"))?;
        let authorization = userinfo.map(|u| {
            use base64::Engine;
            let decoded = percent_decode(u);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(decoded)
            )
        });
        Ok(Target {
            addr,
            host,
            port,
            path: percent_encode_path(&path),
            authorization,
        })
    }

    /// The target for an address, path `/`.
    pub fn from_addr(addr: SocketAddr) -> Target {
        Target {
            addr,
            host: addr.ip().to_string(),
            port: addr.port(),
            path: "/".to_string(),
            authorization: None,
        }
    }

    /// `http://host:port/path`.
    pub fn url(&self) -> String {
        format!("http://{}:{}{}", self.host, self.port, self.path)
    }

    fn request(&self, keep_alive: bool) -> Vec<u8> {
        let mut r = format!(
            "GET {} HTTP/1.0\r\nHost: {}:{}\r\nUser-Agent: ringlab/{}\r\nAccept: */*\r\n",
            self.path,
            self.host,
            self.port,
            env!("CARGO_PKG_VERSION")
        );
        if let Some(auth) = &self.authorization {
            r.push_str(&format!("Authorization: {auth}\r\n"));
        }
        if keep_alive {
            r.push_str("Connection: Keep-Alive\r\n");
        }
        r.push_str("\r\n");
        r.into_bytes()
    }
}

/// Percent-encodes the bytes a request target cannot carry raw (controls, space, non-ASCII and
/// the few printable characters RFC 3986 excludes); an existing `%XX` is kept as it is.
fn percent_encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        let raw = b.is_ascii_graphic()
            && !matches!(
                b,
                b'"' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
            );
        if raw {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (credentials in a URL may carry them); malformed escapes stay as
/// written.
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// How to run one benchmark.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// What to hit.
    pub target: Target,
    /// Requests to complete (`-n`).
    pub requests: u64,
    /// Workers running at once (`-c`).
    pub concurrency: usize,
    /// Reuse connections (`-k`).
    pub keep_alive: bool,
    /// Stop starting requests after this long (`-t`).
    pub time_limit: Option<Duration>,
    /// Per-request connect and read timeout (`-s`).
    pub timeout: Duration,
    /// One executor per entry, pinned where `Some`; workers are spread across them.
    pub cpus: Vec<Option<usize>>,
    /// The executors' socket driver.
    pub io: IoMode,
    /// When tripped (Ctrl-C), requests in flight are abandoned (not counted), no new one starts,
    /// and the run reports what it has, marked interrupted.
    pub stop: Option<Shutdown>,
}

/// ab's failure kinds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Failures {
    /// The connect was refused or timed out.
    pub connect: u64,
    /// A read failed (reset) after connecting.
    pub receive: u64,
    /// The body length differed from the first good response's, or the server closed early.
    pub length: u64,
    /// Anything else: a timeout waiting for the response, a malformed or oversize response head.
    pub exceptions: u64,
}

impl Failures {
    /// All failed requests.
    pub fn total(&self) -> u64 {
        self.connect + self.receive + self.length + self.exceptions
    }

    fn add(&mut self, o: &Failures) {
        self.connect += o.connect;
        self.receive += o.receive;
        self.length += o.length;
        self.exceptions += o.exceptions;
    }
}

/// One of ab's Connection Times rows, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TimeStats {
    /// Fastest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub sd: f64,
    /// Median.
    pub median: f64,
    /// Slowest.
    pub max: f64,
}

/// Latency percentiles of the total request time, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Slowest.
    pub max: u64,
}

/// Everything one benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// What was hit.
    pub target: Target,
    /// `-c`.
    pub concurrency: usize,
    /// Whether connections were reused.
    pub keep_alive: bool,
    /// Requests that completed (failed ones included, as ab counts them).
    pub complete: u64,
    /// Failed requests by kind.
    pub failed: Failures,
    /// Responses whose status was not 2xx.
    pub non_2xx: u64,
    /// Responses that kept their connection open for the next request (with `-k`), as ab
    /// counts them.
    pub keep_alive_requests: u64,
    /// All bytes received, heads included.
    pub total_bytes: u64,
    /// Body bytes received.
    pub html_bytes: u64,
    /// Body length of the first good response.
    pub document_length: u64,
    /// The `Server` header of the first response.
    pub server_software: String,
    /// Wall time from the first request to the last response, in seconds.
    pub elapsed_secs: f64,
    /// ab's Connection Times, in milliseconds.
    pub connect_ms: TimeStats,
    /// Total minus connect.
    pub processing_ms: TimeStats,
    /// Request written to first response byte.
    pub waiting_ms: TimeStats,
    /// Start to end of each request.
    pub total_ms: TimeStats,
    /// Percentiles of the total time, in microseconds.
    pub latency_us: Percentiles,
    /// Responses per `Server` header value, sorted by value.
    pub backends: Vec<(String, u64)>,
    /// Where the client's executors ran.
    pub client_cpus: Vec<Option<usize>>,
    /// What the first failed request ran into, if any failed.
    pub first_error: Option<String>,
    /// Stopped by Ctrl-C or SIGTERM before `-n` requests (or `-t`) were done: the numbers are
    /// what was measured until then.
    pub interrupted: bool,
}

impl BenchResult {
    /// Completed requests per second.
    pub fn requests_per_sec(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.complete as f64 / self.elapsed_secs
        } else {
            0.0
        }
    }

    /// ab's "Time per request (mean)": concurrency × elapsed / complete, in ms.
    pub fn time_per_request_ms(&self) -> f64 {
        self.time_per_request_all_ms() * self.concurrency as f64
    }

    /// ab's "Time per request (mean, across all concurrent requests)", in ms.
    pub fn time_per_request_all_ms(&self) -> f64 {
        if self.complete > 0 {
            self.elapsed_secs * 1000.0 / self.complete as f64
        } else {
            0.0
        }
    }

    /// ab's "Transfer rate", in KiB received per second.
    pub fn transfer_rate_kbps(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.total_bytes as f64 / 1024.0 / self.elapsed_secs
        } else {
            0.0
        }
    }
}

/// State shared by all executors of one run.
struct Shared {
    config: BenchConfig,
    request: Vec<u8>,
    started: AtomicU64,
    good: AtomicU64,
    connect_failures: AtomicU64,
    /// Body length of the first good response, -1 until one arrives (ab's `doclen`).
    doclen: AtomicI64,
    dead: AtomicBool,
    /// Reference point for `deadline_ns`.
    epoch: Instant,
    /// Nanoseconds after `epoch` at which no new request starts; `u64::MAX` for none.
    deadline_ns: AtomicU64,
    /// The start signal: executors wait here so they all begin together.
    go: (Mutex<bool>, Condvar),
}

impl Shared {
    /// Claims the next request slot, or says the run is over.
    fn claim(&self) -> bool {
        if self.dead.load(Ordering::Relaxed)
            || self
                .config
                .stop
                .as_ref()
                .is_some_and(Shutdown::is_triggered)
        {
            return false;
        }
        let deadline = self.deadline_ns.load(Ordering::Relaxed);
        if deadline != u64::MAX && self.epoch.elapsed().as_nanos() as u64 >= deadline {
            return false;
        }
        self.started.fetch_add(1, Ordering::Relaxed) < self.config.requests
    }

    fn wait_for_go(&self) {
        let (lock, cv) = &self.go;
        let mut go = lock.lock().unwrap_or_else(|e| e.into_inner());
        while !*go {
            go = cv.wait(go).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn release(&self) {
        let (lock, cv) = &self.go;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

/// One executor's tally, merged at the end.
struct Tally {
    complete: u64,
    failed: Failures,
    non_2xx: u64,
    keep_alive_requests: u64,
    total_bytes: u64,
    html_bytes: u64,
    connect: Histogram<u64>,
    processing: Histogram<u64>,
    waiting: Histogram<u64>,
    total: Histogram<u64>,
    servers: Vec<(Vec<u8>, u64)>,
    last_end: Option<Instant>,
    first_error: Option<String>,
    /// Whether `first_error` is of a kind other than Connect.
    first_error_telling: bool,
}

impl Tally {
    fn new() -> Tally {
        let h = || Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        Tally {
            complete: 0,
            failed: Failures::default(),
            non_2xx: 0,
            keep_alive_requests: 0,
            total_bytes: 0,
            html_bytes: 0,
            connect: h(),
            processing: h(),
            waiting: h(),
            total: h(),
            servers: Vec::new(),
            last_end: None,
            first_error: None,
            first_error_telling: false,
        }
    }

    fn merge(&mut self, o: Tally) {
        self.complete += o.complete;
        self.failed.add(&o.failed);
        self.non_2xx += o.non_2xx;
        self.keep_alive_requests += o.keep_alive_requests;
        self.total_bytes += o.total_bytes;
        self.html_bytes += o.html_bytes;
        let _ = self.connect.add(&o.connect);
        let _ = self.processing.add(&o.processing);
        let _ = self.waiting.add(&o.waiting);
        let _ = self.total.add(&o.total);
        for (name, count) in o.servers {
            self.count_server(&name, count);
        }
        self.last_end = self.last_end.max(o.last_end);
        if self.first_error.is_none() || (o.first_error_telling && !self.first_error_telling) {
            self.first_error = o.first_error;
            self.first_error_telling = o.first_error_telling;
        }
    }

    fn count_server(&mut self, name: &[u8], count: u64) {
        match self.servers.iter_mut().find(|(n, _)| n == name) {
            Some((_, c)) => *c += count,
            None => self.servers.push((name.to_vec(), count)),
        }
    }
}

/// Runs one benchmark to completion. Fails (instead of returning a table of zeros) when the
/// target never answered.
pub fn run(config: BenchConfig) -> io::Result<BenchResult> {
    if config.concurrency == 0 || config.requests == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "need at least one request and a concurrency of at least 1",
        ));
    }
    let cpus = if config.cpus.is_empty() {
        vec![None]
    } else {
        config.cpus.clone()
    };
    // More executors than workers would only idle.
    let executors = cpus.len().min(config.concurrency);
    let shared = Arc::new(Shared {
        request: config.target.request(config.keep_alive),
        started: AtomicU64::new(0),
        good: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        doclen: AtomicI64::new(-1),
        dead: AtomicBool::new(false),
        epoch: Instant::now(),
        deadline_ns: AtomicU64::new(u64::MAX),
        go: (Mutex::new(false), Condvar::new()),
        config: config.clone(),
    });
    let mut handles = Vec::new();
    for (i, &cpu) in cpus.iter().take(executors).enumerate() {
        // Spread workers as evenly as possible: the first executors take the remainder.
        let workers =
            config.concurrency / executors + usize::from(i < config.concurrency % executors);
        let name = match cpu {
            Some(c) => format!("bench-cpu{c}"),
            None => format!("bench-{i}"),
        };
        let mine = shared.clone();
        match placement::spawn_pinned(&name, cpu, config.io, move || async move {
            mine.wait_for_go();
            executor_main(mine, workers).await
        }) {
            Ok(h) => handles.push(h),
            Err(e) => {
                // Release the executors that did start; they see `dead` and finish at once.
                shared.dead.store(true, Ordering::Relaxed);
                shared.release();
                for h in handles {
                    let _ = h.join();
                }
                return Err(e);
            }
        }
    }
    // Every executor is up (spawn_pinned returns once its rings exist); start them together.
    let start = Instant::now();
    if let Some(limit) = config.time_limit {
        let at = start.duration_since(shared.epoch) + limit;
        shared
            .deadline_ns
            .store(at.as_nanos() as u64, Ordering::Relaxed);
    }
    shared.release();
    let mut tally = Tally::new();
    for h in handles {
        tally.merge(h.join()?);
    }
    let end = tally.last_end.unwrap_or(start).max(start);
    let interrupted = config.stop.as_ref().is_some_and(Shutdown::is_triggered);
    if shared.good.load(Ordering::Relaxed) == 0 && tally.complete > 0 && !interrupted {
        let why = tally
            .first_error
            .clone()
            .unwrap_or_else(|| "no successful response".into());
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "{} did not answer: {why} ({} attempts, {} failed)",
                config.target.url(),
                tally.complete,
                tally.failed.total()
            ),
        ));
    }
    let mut result = build_result(
        &config,
        &cpus[..executors],
        &shared,
        tally,
        end.duration_since(start),
    );
    result.interrupted = interrupted;
    Ok(result)
}

fn build_result(
    config: &BenchConfig,
    cpus: &[Option<usize>],
    shared: &Shared,
    tally: Tally,
    elapsed: Duration,
) -> BenchResult {
    let mut backends: Vec<(String, u64)> = tally
        .servers
        .iter()
        .map(|(n, c)| (String::from_utf8_lossy(n).into_owned(), *c))
        .collect();
    backends.sort();
    let server_software = backends.first().map(|b| b.0.clone()).unwrap_or_default();
    let total = &tally.total;
    BenchResult {
        target: config.target.clone(),
        concurrency: config.concurrency,
        keep_alive: config.keep_alive,
        complete: tally.complete,
        failed: tally.failed,
        non_2xx: tally.non_2xx,
        keep_alive_requests: tally.keep_alive_requests,
        total_bytes: tally.total_bytes,
        html_bytes: tally.html_bytes,
        document_length: shared.doclen.load(Ordering::Relaxed).max(0) as u64,
        server_software,
        elapsed_secs: elapsed.as_secs_f64(),
        connect_ms: time_stats(&tally.connect),
        processing_ms: time_stats(&tally.processing),
        waiting_ms: time_stats(&tally.waiting),
        total_ms: time_stats(total),
        latency_us: Percentiles {
            p50: total.value_at_quantile(0.5),
            p90: total.value_at_quantile(0.9),
            p99: total.value_at_quantile(0.99),
            p999: total.value_at_quantile(0.999),
            max: total.max(),
        },
        backends,
        client_cpus: cpus.to_vec(),
        first_error: tally.first_error.clone(),
        interrupted: false,
    }
}

fn time_stats(h: &Histogram<u64>) -> TimeStats {
    if h.is_empty() {
        return TimeStats::default();
    }
    let ms = |us: f64| us / 1000.0;
    TimeStats {
        min: ms(h.min() as f64),
        mean: ms(h.mean()),
        sd: ms(h.stdev()),
        median: ms(h.value_at_quantile(0.5) as f64),
        max: ms(h.max() as f64),
    }
}

async fn executor_main(shared: Arc<Shared>, workers: usize) -> Tally {
    let tally = Rc::new(RefCell::new(Tally::new()));
    let deadlines = Deadlines::new(Deadlines::tick_for(shared.config.timeout));
    let stop = LocalStop::default();
    let ticker = driver::spawn_local(deadlines.clone().run(stop.clone()));
    let interrupt = match &shared.config.stop {
        Some(shutdown) => LocalStop::watch(shutdown),
        None => LocalStop::default(),
    };
    let tasks: Vec<_> = (0..workers)
        .map(|_| {
            driver::spawn_local(worker(
                shared.clone(),
                tally.clone(),
                deadlines.clone(),
                interrupt.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await;
    }
    stop.fire();
    drop(ticker);
    Rc::try_unwrap(tally)
        .ok()
        .expect("workers finished")
        .into_inner()
}

/// How one request attempt ended.
enum Outcome {
    /// A complete response: head length, body length, status, whether the server keeps the
    /// connection, the Server header span.
    Response {
        head: http::ResponseHead,
        body: u64,
        first_byte: Instant,
    },
    /// The server closed a reused connection before answering: not an error, retry (ab's
    /// "aborted keep-alive").
    StaleKeepAlive,
    Failed(Failure, String),
}

#[derive(Clone, Copy)]
enum Failure {
    Connect,
    Receive,
    Length,
    Exception,
}

async fn worker(
    shared: Arc<Shared>,
    tally: Rc<RefCell<Tally>>,
    deadlines: Rc<Deadlines>,
    interrupt: LocalStop,
) {
    let mut buf = Vec::with_capacity(16 * 1024);
    // The worker's own copy: an io_uring send owns its bytes while the kernel sends them.
    let mut request = shared.request.clone();
    // A kept-alive connection and its timeout; the deadline is declared second so it is dropped
    // (deregistered) before the connection closes.
    let mut kept: Option<(Conn, Deadline)> = None;
    while shared.claim() {
        let attempt = async {
            one_request(
                &shared,
                &tally,
                &deadlines,
                &mut kept,
                &mut request,
                &mut buf,
            )
            .await;
            true
        };
        let interrupted = async {
            interrupt.stopped().await;
            false
        };
        // Ctrl-C ends the request in flight at once (its connection is dropped, so closed), and
        // it is not counted: ab too counts only requests that finished.
        if !futures_lite::future::or(attempt, interrupted).await {
            return;
        }
    }
}

/// Makes one request (retrying a stale kept-alive connection on a fresh one) and tallies it.
async fn one_request(
    shared: &Shared,
    tally: &Rc<RefCell<Tally>>,
    deadlines: &Rc<Deadlines>,
    kept: &mut Option<(Conn, Deadline)>,
    request: &mut Vec<u8>,
    buf: &mut Vec<u8>,
) {
    let config = &shared.config;
    {
        loop {
            let start = Instant::now();
            let reused = kept.is_some();
            let (conn, deadline) = match kept.take() {
                Some((conn, deadline)) => {
                    deadline.extend();
                    (conn, deadline)
                }
                None => match conn::connect(config.target.addr, config.timeout).await {
                    Ok(conn) => {
                        let d = deadlines.arm([conn.fd(), -1], libc::SHUT_RDWR, config.timeout);
                        (conn, d)
                    }
                    Err(e) => {
                        let failures = shared.connect_failures.fetch_add(1, Ordering::Relaxed) + 1;
                        if failures > DEAD_TARGET_FAILURES
                            && shared.good.load(Ordering::Relaxed) == 0
                        {
                            shared.dead.store(true, Ordering::Relaxed);
                        }
                        record_failure(tally, Failure::Connect, format!("connect: {e}"));
                        break;
                    }
                },
            };
            let connected = Instant::now();
            let outcome = exchange(&conn, &deadline, request, buf, reused).await;
            let end = Instant::now();
            match outcome {
                Outcome::StaleKeepAlive => continue,
                Outcome::Failed(kind, why) => {
                    record_failure(tally, kind, why);
                    break;
                }
                Outcome::Response {
                    head,
                    body,
                    first_byte,
                } => {
                    let mut t = tally.borrow_mut();
                    t.complete += 1;
                    t.last_end = Some(end);
                    t.total_bytes += head.len as u64 + body;
                    t.html_bytes += body;
                    // As ab counts them: every response that kept its connection open.
                    if config.keep_alive && head.keep_alive {
                        t.keep_alive_requests += 1;
                    }
                    if !(200..300).contains(&head.status) {
                        t.non_2xx += 1;
                    }
                    if let Some((s, e)) = head.server {
                        t.count_server(&buf[s..e.min(buf.len())], 1);
                    }
                    let short = head.content_length.is_some_and(|cl| body < cl);
                    let doclen = match shared.doclen.compare_exchange(
                        -1,
                        body as i64,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => body as i64,
                        Err(v) => v,
                    };
                    if short || doclen != body as i64 {
                        t.failed.length += 1;
                    } else {
                        shared.good.fetch_add(1, Ordering::Relaxed);
                    }
                    let us = |d: Duration| (d.as_micros() as u64).max(1);
                    let total = end.duration_since(start);
                    let connect = connected.duration_since(start);
                    let _ = t.total.record(us(total));
                    let _ = t.connect.record(us(connect));
                    let _ = t.processing.record(us(total - connect));
                    let _ = t
                        .waiting
                        .record(us(first_byte.saturating_duration_since(connected)));
                    drop(t);
                    if config.keep_alive && head.keep_alive && !short {
                        *kept = Some((conn, deadline));
                    }
                    break;
                }
            }
        }
    }
}

fn record_failure(tally: &Rc<RefCell<Tally>>, kind: Failure, why: String) {
    let mut t = tally.borrow_mut();
    t.complete += 1;
    t.last_end = Some(Instant::now());
    match kind {
        Failure::Connect => t.failed.connect += 1,
        Failure::Receive => t.failed.receive += 1,
        Failure::Length => t.failed.length += 1,
        Failure::Exception => t.failed.exceptions += 1,
    }
    // A refused connect is the least telling failure: let any other kind replace it.
    let telling = !matches!(kind, Failure::Connect);
    if t.first_error.is_none() || (telling && !t.first_error_telling) {
        t.first_error = Some(why);
        t.first_error_telling = telling;
    }
}

/// Sends the request and reads one whole response: by `Content-Length`, or to end-of-file. The
/// deadline bounds the whole exchange: when it passes, the socket is shut down and the read ends.
async fn exchange(
    conn: &Conn,
    deadline: &Deadline,
    request: &mut Vec<u8>,
    buf: &mut Vec<u8>,
    reused: bool,
) -> Outcome {
    let timed_out = || {
        Outcome::Failed(
            Failure::Exception,
            "timed out waiting for the response".into(),
        )
    };
    if let Err(e) = conn.write_all(request).await {
        return if deadline.fired() {
            timed_out()
        } else if reused {
            Outcome::StaleKeepAlive
        } else {
            Outcome::Failed(Failure::Exception, format!("send: {e}"))
        };
    }
    buf.clear();
    let mut scanned = 0usize;
    let mut first_byte = None;
    let head = loop {
        let n = match conn.read(buf).await {
            _ if deadline.fired() => return timed_out(),
            Ok(n) => n,
            Err(_) if reused && buf.is_empty() => return Outcome::StaleKeepAlive,
            Err(e) => return Outcome::Failed(Failure::Receive, format!("receive: {e}")),
        };
        if n == 0 {
            if reused && buf.is_empty() {
                return Outcome::StaleKeepAlive;
            }
            // ab counts a close before a complete response as a length failure.
            return Outcome::Failed(
                Failure::Length,
                "connection closed before a complete response".into(),
            );
        }
        first_byte.get_or_insert_with(Instant::now);
        // Heads are bounded well below the buffer, so the body reads below (into the room
        // after the head) never overwrite the head, nor the Server span the caller reads.
        match http::parse_response_head(buf, scanned, http::DEFAULT_MAX_HEAD) {
            Ok(Some(head)) => break head,
            Ok(None) => scanned = buf.len(),
            Err(_) => {
                return Outcome::Failed(
                    Failure::Exception,
                    "malformed or oversize response head".into(),
                );
            }
        }
    };
    let mut body = (buf.len() - head.len) as u64;
    let want = head.content_length;
    while want.is_none_or(|cl| body < cl) {
        buf.truncate(head.len);
        match conn.read(buf).await {
            _ if deadline.fired() => return timed_out(),
            Ok(0) => break,
            Ok(n) => body += n as u64,
            Err(e) => return Outcome::Failed(Failure::Receive, format!("receive: {e}")),
        }
    }
    Outcome::Response {
        head,
        body,
        first_byte: first_byte.unwrap_or_else(Instant::now),
    }
}
