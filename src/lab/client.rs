//! The HTTP load generator behind `ringlab bench`: `c` workers on pinned glommio executors each
//! connect, send one request, read the whole response, close (unless keep-alive) and go again
//! until `n` requests are done or the time limit passes. Closed loop by default (a worker sends
//! when its last answer came, as ab does); with a rate, open loop (a worker sends at the next
//! intended time from [`crate::lab::pacer`], and latency counts from that time). It counts the way
//! ApacheBench counts, and records latencies in HdrHistograms at microsecond resolution.
//!
//! Printing lives in [`crate::lab::report`]; this module only measures.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::io::conn::{self, Conn};
use crate::io::deadline::{Deadline, Deadlines};
use crate::io::driver::{self, IoMode};
use crate::io::placement;
use crate::io::shutdown::{LocalStop, Shutdown};
use crate::io::time;
use crate::lab::pacer::{Arrival, Pacer};
use crate::serve::http;

pub use crate::lab::target::{RequestSpec, Target};

/// ab's default number of requests for a time-limited run without `-n`.
pub const TIMED_REQUESTS: u64 = 50_000;

/// Connect failures tolerated before any success, as ab does, before the run is declared dead.
const DEAD_TARGET_FAILURES: u64 = 10;

/// An open-loop request sent later than this after its intended time counts as late.
pub const LATE: Duration = Duration::from_millis(1);

/// An executor busy on the CPU for this share of the run could not have paced any faster: the
/// client, not the server, was the limit.
const CLIENT_BOUND_BUSY: f64 = 0.9;

/// How to run one benchmark.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// What to hit.
    pub target: Target,
    /// What to send: method, headers, body.
    pub request: RequestSpec,
    /// Open loop: requests per second in total, each sent at its intended time whatever the
    /// answers (`--rate`); `None` is the closed loop.
    pub rate: Option<f64>,
    /// How the open loop spaces intended send times.
    pub arrival: Arrival,
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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

    /// Adds another run's failures into these.
    pub(crate) fn add(&mut self, o: &Failures) {
        self.connect += o.connect;
        self.receive += o.receive;
        self.length += o.length;
        self.exceptions += o.exceptions;
    }
}

/// One of ab's Connection Times rows, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
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

/// A histogram at the client's bounds (1 µs to an hour, 3 significant digits), empty.
pub fn empty_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

impl Percentiles {
    /// The percentiles of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// What an open-loop run measured besides the closed loop's numbers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenLoop {
    /// Requests per second asked for.
    pub offered_rate: f64,
    /// How intended times were spaced.
    pub arrival: Arrival,
    /// Latency from each request's actual send (what a closed-loop client reports), in µs;
    /// `BenchResult::latency_us` is from the intended send.
    pub uncorrected_us: Percentiles,
    /// Actual minus intended send time over all requests, in µs.
    pub send_lag_us: Percentiles,
    /// The same over requests a connection was free for: the pacer's own jitter, in µs.
    pub pacer_lag_us: Percentiles,
    /// Requests sent more than [`LATE`] after their intended time.
    pub late: u64,
    /// Of those, the ones that waited because all `-c` connections were busy (the server was
    /// slow); the rest were late because the client itself was.
    pub late_waiting_for_connection: u64,
    /// Each client executor's CPU time over the run's wall time (1.0 = never idle), leaving
    /// out the pacer's yielding in the last microseconds before each slot.
    pub client_busy: Vec<f64>,
    /// The client could not generate the offered rate: achieved below 98% of it while an
    /// executor was busy nearly all the time.
    pub client_bound: bool,
}

/// Everything one benchmark measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Percentiles of the total time, in microseconds: from the intended send time in an open
    /// loop (coordinated omission corrected), from the connect in a closed one.
    pub latency_us: Percentiles,
    /// The histogram behind `latency_us`, every count (not serialized as is: see
    /// `latency_histogram`).
    #[serde(skip, default = "empty_histogram")]
    pub histogram: Histogram<u64>,
    /// `histogram` in HdrHistogram's V2 compressed serialization, base64 ([`crate::lab::hgrm`]),
    /// so runs can be merged and re-plotted without losing precision.
    pub latency_histogram: String,
    /// The method sent (`GET` unless `-m`, `-i` or `-p` changed it).
    pub method: String,
    /// Open-loop measurements, when run with a rate.
    pub open_loop: Option<OpenLoop>,
    /// Responses per `Server` header value, sorted by value.
    pub backends: Vec<(String, u64)>,
    /// Where the client's executors ran.
    pub client_cpus: Vec<Option<usize>>,
    /// What the first failed request ran into, if any failed.
    pub first_error: Option<String>,
    /// Stopped by Ctrl-C or SIGTERM before `-n` requests (or `-t`) were done: the numbers are
    /// what was measured until then.
    pub interrupted: bool,
    /// CPU seconds the client's executors used.
    pub client_cpu_secs: f64,
    /// CPU time per completed request of the servers measured, in µs, where the sweep could
    /// measure it (the lab it started in-process: every thread of the process but the
    /// client's, so through the balancer the balancer and its backends together).
    pub server_cpu_us_per_request: Option<f64>,
    /// With clients on several hosts (`sweep --place client=A,B`): each client's part, this
    /// result being their exact merge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientShare>,
}

/// One client host's part of a run measured from several.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientShare {
    /// The host, as placed (`netns:rl-client2`).
    pub host: String,
    /// Its share of the concurrency.
    pub concurrency: usize,
    /// Its offered rate, in an open loop.
    pub offered_rate: Option<f64>,
    /// Requests it completed.
    pub complete: u64,
    /// Requests that failed.
    pub failed: u64,
    /// How long it ran.
    pub elapsed_secs: f64,
    /// Its latency histogram (HdrHistogram V2, deflated, base64), so the merge can be checked.
    pub latency_histogram: String,
}

/// `count` over `secs` (none in no time).
fn per_second(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

impl ClientShare {
    /// Completed requests per second.
    pub fn requests_per_sec(&self) -> f64 {
        per_second(self.complete, self.elapsed_secs)
    }
}

impl BenchResult {
    /// Completed requests per second.
    pub fn requests_per_sec(&self) -> f64 {
        per_second(self.complete, self.elapsed_secs)
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
    /// Nanoseconds after `epoch` at which the run starts: the open loop's first slot.
    start_ns: AtomicU64,
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
    /// Open loop: end minus intended send time.
    corrected: Histogram<u64>,
    /// Open loop: actual minus intended send time, all requests and those a connection was
    /// free for.
    send_lag: Histogram<u64>,
    pacer_lag: Histogram<u64>,
    late: u64,
    late_waiting: u64,
    /// Per executor: CPU time over wall time.
    busy: Vec<f64>,
    /// CPU seconds of the executors.
    cpu_secs: f64,
    servers: Vec<(Vec<u8>, u64)>,
    last_end: Option<Instant>,
    first_error: Option<String>,
    /// Whether `first_error` is of a kind other than Connect.
    first_error_telling: bool,
}

impl Tally {
    fn new() -> Tally {
        let h = empty_histogram;
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
            corrected: h(),
            send_lag: h(),
            pacer_lag: h(),
            late: 0,
            late_waiting: 0,
            busy: Vec::new(),
            cpu_secs: 0.0,
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
        let _ = self.corrected.add(&o.corrected);
        let _ = self.send_lag.add(&o.send_lag);
        let _ = self.pacer_lag.add(&o.pacer_lag);
        self.late += o.late;
        self.late_waiting += o.late_waiting;
        self.busy.extend(o.busy);
        self.cpu_secs += o.cpu_secs;
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
    if config.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the rate must be a positive number of requests per second",
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
        request: config.target.request(&config.request, config.keep_alive),
        started: AtomicU64::new(0),
        good: AtomicU64::new(0),
        connect_failures: AtomicU64::new(0),
        doclen: AtomicI64::new(-1),
        dead: AtomicBool::new(false),
        epoch: Instant::now(),
        deadline_ns: AtomicU64::new(u64::MAX),
        start_ns: AtomicU64::new(0),
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
        // This executor's share of the rate, in proportion to its workers; fixed schedules are
        // staggered by one gap of the whole rate so the executors' sends interleave.
        let pacing = config.rate.map(|rate| {
            let share = rate * workers as f64 / config.concurrency as f64;
            (share, Duration::from_secs_f64(i as f64 / rate), i as u64)
        });
        match placement::spawn_pinned(&name, cpu, config.io, move || async move {
            mine.wait_for_go();
            executor_main(mine, workers, pacing).await
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
    shared.start_ns.store(
        start.duration_since(shared.epoch).as_nanos() as u64,
        Ordering::Relaxed,
    );
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
    let interrupted = config.stop.as_ref().is_some_and(Shutdown::is_triggered);
    // An interrupted run lasted until the interruption, not until its last answer: an open
    // loop's rate would otherwise read high.
    let end = if interrupted {
        Instant::now()
    } else {
        tally.last_end.unwrap_or(start).max(start)
    };
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
    let latency = if config.rate.is_some() {
        &tally.corrected
    } else {
        &tally.total
    };
    let open_loop = config.rate.map(|offered_rate| {
        let achieved = if elapsed.is_zero() {
            0.0
        } else {
            tally.complete as f64 / elapsed.as_secs_f64()
        };
        let busiest = tally.busy.iter().copied().fold(0.0, f64::max);
        OpenLoop {
            offered_rate,
            arrival: config.arrival,
            uncorrected_us: Percentiles::of(&tally.total),
            send_lag_us: Percentiles::of(&tally.send_lag),
            pacer_lag_us: Percentiles::of(&tally.pacer_lag),
            late: tally.late,
            late_waiting_for_connection: tally.late_waiting,
            client_busy: tally.busy.clone(),
            client_bound: achieved < 0.98 * offered_rate && busiest >= CLIENT_BOUND_BUSY,
        }
    });
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
        total_ms: time_stats(&tally.total),
        latency_us: Percentiles::of(latency),
        histogram: latency.clone(),
        latency_histogram: crate::lab::hgrm::encode(latency),
        method: config.request.method.clone(),
        open_loop,
        backends,
        client_cpus: cpus.to_vec(),
        first_error: tally.first_error.clone(),
        interrupted: false,
        client_cpu_secs: tally.cpu_secs,
        server_cpu_us_per_request: None,
        clients: Vec::new(),
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

/// One executor's part of the run: its workers, their deadlines ticker, and (open loop) its
/// share of the schedule, given as (rate, phase, seed).
async fn executor_main(
    shared: Arc<Shared>,
    workers: usize,
    pacing: Option<(f64, Duration, u64)>,
) -> Tally {
    let cpu_at_start = placement::thread_cpu();
    let wall_at_start = Instant::now();
    let tally = Rc::new(RefCell::new(Tally::new()));
    if pacing.is_some() {
        // The kernel may fire a sleeping thread's timer up to its timer slack late (50 µs by
        // default) to batch wake-ups; a pacer wants its slots on time.
        // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    }
    let pacer = pacing.map(|(rate, phase, seed)| {
        let start = shared.epoch + Duration::from_nanos(shared.start_ns.load(Ordering::Relaxed));
        let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(seed + 1);
        Rc::new(Pacer::new(start, rate, phase, shared.config.arrival, seed))
    });
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
                pacer.clone(),
            ))
        })
        .collect();
    for t in tasks {
        t.await;
    }
    stop.fire();
    drop(ticker);
    let mut tally = Rc::try_unwrap(tally)
        .ok()
        .expect("workers finished")
        .into_inner();
    let wall = wall_at_start.elapsed().as_secs_f64();
    let used = placement::thread_cpu() - cpu_at_start;
    tally.cpu_secs = used.as_secs_f64();
    // The pacer's yielding is precision, not work (other tasks run during it when they can).
    let spun = pacer.as_ref().map_or(Duration::ZERO, |p| p.total_spun());
    let cpu = used.saturating_sub(spun).as_secs_f64();
    tally.busy.push(if wall > 0.0 {
        (cpu / wall).min(1.0)
    } else {
        0.0
    });
    tally
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
    pacer: Option<Rc<Pacer>>,
) {
    let mut buf = Vec::with_capacity(16 * 1024);
    // The worker's own copy: an io_uring send owns its bytes while the kernel sends them.
    let mut request = shared.request.clone();
    // A kept-alive connection and its timeout; the deadline is declared second so it is dropped
    // (deregistered) before the connection closes.
    let mut kept: Option<(Conn, Deadline)> = None;
    while shared.claim() {
        let attempt = async {
            let origin = match &pacer {
                Some(pacer) => Some(wait_for_slot(pacer, &tally).await),
                None => None,
            };
            one_request(
                &shared,
                &tally,
                &deadlines,
                &mut kept,
                &mut request,
                &mut buf,
                origin,
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

/// A duration as the histograms record it: whole microseconds, at least 1 (their lowest bound).
fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Takes this executor's next open-loop slot and waits for it; returns its intended send time.
/// A worker that comes free after its slot sends at once: every connection was busy, and the
/// wait is charged to the request.
async fn wait_for_slot(pacer: &Pacer, tally: &RefCell<Tally>) -> Instant {
    let intended = pacer.next_slot();
    let free_in_time = Instant::now() <= intended;
    if free_in_time {
        let wake_at = pacer.wake_at(intended);
        if Instant::now() < wake_at {
            time::sleep_until(wake_at).await;
            pacer.woke(wake_at, Instant::now());
        }
        // The last few microseconds, yielding to the executor's other tasks meanwhile.
        let spin_from = Instant::now();
        while Instant::now() < intended {
            futures_lite::future::yield_now().await;
        }
        pacer.spun(spin_from.elapsed());
    }
    let lag = Instant::now().saturating_duration_since(intended);
    let mut t = tally.borrow_mut();
    let us = micros(lag);
    let _ = t.send_lag.record(us);
    if free_in_time {
        let _ = t.pacer_lag.record(us);
    }
    if lag > LATE {
        t.late += 1;
        t.late_waiting += u64::from(!free_in_time);
    }
    intended
}

/// Makes one request (retrying a stale kept-alive connection on a fresh one) and tallies it;
/// `origin` is its intended send time in an open loop.
async fn one_request(
    shared: &Shared,
    tally: &Rc<RefCell<Tally>>,
    deadlines: &Rc<Deadlines>,
    kept: &mut Option<(Conn, Deadline)>,
    request: &mut Vec<u8>,
    buf: &mut Vec<u8>,
    origin: Option<Instant>,
) {
    let config = &shared.config;
    let head_only = config.request.head_only();
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
            let outcome = exchange(&conn, &deadline, request, buf, reused, head_only).await;
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
                    let short = !head_only && head.content_length.is_some_and(|cl| body < cl);
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
                    let us = micros;
                    let total = end.duration_since(start);
                    let connect = connected.duration_since(start);
                    let _ = t.total.record(us(total));
                    if let Some(origin) = origin {
                        let _ = t.corrected.record(us(end.duration_since(origin)));
                    }
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
    head_only: bool,
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
    // Answers to HEAD, and 1xx, 204 and 304 answers, have no body whatever their fields say.
    let bodyless = head_only || head.status < 200 || head.status == 204 || head.status == 304;
    let want = if bodyless {
        Some(0)
    } else {
        head.content_length
    };
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
