//! The command line, defined once: clap derives parsing, `--help` and error messages from these
//! types, and the value parsers give each bad value a message that says what to type instead.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::io::driver::IoMode;
use crate::lab::pacer::Arrival;
use crate::lab::report::Format;
use crate::lab::sweep::Rates;
use crate::lab::target::RequestSpec;
use crate::serve::balancer::Mode;
use crate::serve::policy::Policy;

/// ringlab — the networking performance lab on pinned glommio executors.
///
/// Four HTTP backends behind a round-robin L4 balancer, compared with a direct async server and a
/// thread-per-connection server. Run each piece by hand with the subcommands below.
#[derive(Debug, Parser)]
#[command(name = "ringlab", version = crate::lab::machine::VERSION, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the lab's HTTP response on one pinned glommio executor (any number of listeners).
    Backend(BackendArgs),
    /// Round-robin TCP (L4) load balancer in front of backends, one pinned executor per CPU.
    Lb(LbArgs),
    /// Serve the same HTTP response with one OS thread per connection (the classic baseline).
    Threaded(ThreadedArgs),
    /// HTTP load generator with ab's flags and columns, plus latency percentiles: closed loop,
    /// or open loop at a fixed rate (--rate).
    Bench(BenchArgs),
    /// The whole lab in one command: start the topology, run the matrix, write results/.
    Sweep(Box<SweepArgs>),
    /// Compare two sweeps cell by cell, each difference judged against the repetitions' noise.
    Diff(DiffArgs),
    /// Combine `bench --format json` results run at once (several clients), percentiles exact.
    Merge(MergeArgs),
    /// Network namespaces standing in for hosts: one per role, veth pairs to a bridge,
    /// 198.18.0.0/15 addresses (needs root).
    Netlab(NetlabArgs),
    /// Print the facts every result records about this host: CPU, cores, kernel, ringlab's
    /// version and git revision (`sweep --place` asks each host for them).
    Machine(MachineArgs),
}

impl Command {
    /// The `--supervised` flag of a role a sweep can place (off for the others).
    pub fn supervise(&self) -> Supervise {
        match self {
            Command::Backend(a) => a.supervise,
            Command::Lb(a) => a.supervise,
            Command::Threaded(a) => a.supervise,
            Command::Bench(a) => a.supervise,
            _ => Supervise::default(),
        }
    }
}

/// `ringlab machine`.
#[derive(Debug, Args)]
pub struct MachineArgs {
    /// Output format: text (one fact per line) or json.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// `ringlab netlab`.
#[derive(Debug, Args)]
pub struct NetlabArgs {
    /// `up` builds the namespaces (client 198.18.0.1, lb .2, backends .3); `down` removes them.
    #[arg(value_enum)]
    pub action: NetlabAction,
    /// Name prefix of the namespaces and interfaces (1 to 8 letters or digits).
    #[arg(long, default_value = "rl")]
    pub prefix: String,
    /// Client namespaces to make (`PREFIX-client`, `PREFIX-client2`, …; 198.18.0.1, then
    /// .4, .5, …), for several client hosts.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clients_count)]
    pub clients: usize,
    /// What each link does to packets.
    #[command(flatten)]
    pub links: Links,
}

/// Link shaping for the namespaces `netlab` (and `sweep --netns`) builds.
#[derive(Debug, Clone, Default, Args)]
pub struct Links {
    /// Shape every link to this rate with tbf (e.g. 1gbit, 100mbit): each role's egress into the
    /// bridge and the bridge's egress to each role.
    #[arg(long, value_name = "RATE")]
    pub rate_limit: Option<String>,
    /// Add this one-way delay on each link with netem (e.g. 1ms), where the kernel has sch_netem.
    #[arg(long, value_name = "DURATION")]
    pub delay: Option<String>,
    /// Drop this share of packets on each link with netem (e.g. 0.1%), where the kernel has
    /// sch_netem.
    #[arg(long, value_name = "PERCENT")]
    pub loss: Option<String>,
}

/// Parses a client-namespace count: 1 to [`crate::lab::netlab::MAX_CLIENTS`].
fn clients_count(s: &str) -> Result<usize, String> {
    let n = usize_at_least::<1>(s)?;
    if n > crate::lab::netlab::MAX_CLIENTS {
        return Err(format!(
            "at most {} client namespaces",
            crate::lab::netlab::MAX_CLIENTS
        ));
    }
    Ok(n)
}

/// What `ringlab netlab` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetlabAction {
    /// Build the namespaces, veth pairs and bridge.
    Up,
    /// Remove exactly what `up` made.
    Down,
}

/// `ringlab merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// `ringlab bench --format json` outputs of one target, measured at the same time.
    #[arg(value_name = "RESULT.json", required = true, num_args = 1..)]
    pub files: Vec<std::path::PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
}

/// `ringlab diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The baseline: a results folder or its sweep.json.
    #[arg(value_name = "BASE")]
    pub base: std::path::PathBuf,
    /// The sweep to judge against it.
    #[arg(value_name = "NEW")]
    pub new: std::path::PathBuf,
    /// Exit 1 when a cell is worse beyond noise and its ratio is below this, e.g. 0.95.
    #[arg(long, value_name = "RATIO", value_parser = parse_ratio)]
    pub fail_below: Option<f64>,
    /// Also write diff.md and diff.svg (both runs' medians and their ratio) into DIR.
    #[arg(long, value_name = "DIR")]
    pub out: Option<std::path::PathBuf>,
}

/// Parses a ratio such as 0.95 (positive).
fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("'{s}' is not a ratio; use e.g. 0.95")),
    }
}

/// How a role runs under `ringlab sweep --place`, on this host or another: the sweep holds the
/// role's standard input open for as long as it wants the role, so a sweep that ends in any way —
/// finished, failed, interrupted, killed, its ssh connection lost — stops every role it started.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct Supervise {
    /// Run under a supervisor (what `sweep --place` starts roles with): print `ringlab ready:
    /// ADDR…` once listening, and stop gracefully, as on SIGTERM, when standard input closes.
    #[arg(long)]
    pub supervised: bool,
}

/// `ringlab backend`.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Address to serve; repeat for several listeners on the same executor. Bare `PORT` or
    /// `:PORT` means 127.0.0.1.
    #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:9002", value_parser = parse_addr)]
    pub listen: Vec<SocketAddr>,
    /// CPU to pin the executor to [default: the last CPU this process may use].
    #[arg(long, value_name = "N")]
    pub cpu: Option<usize>,
    /// Serve Prometheus metrics at http://ADDR/metrics (a bare PORT means 127.0.0.1), from this
    /// same executor; off by default.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub metrics: Option<SocketAddr>,
    /// Socket driver: io_uring (a ring per executor, SINGLE_ISSUER|DEFER_TASKRUN where the
    /// kernel has them) or epoll (non-blocking system calls).
    #[arg(long, value_enum, value_name = "DRIVER", default_value_t = IoMode::Uring)]
    pub io: IoMode,
    /// Wait this long before each answer, fixed (5ms) or exponentially distributed with that
    /// mean (exp:2ms): a service time to balance over. The executor serves others meanwhile.
    #[arg(long, value_name = "DELAY", value_parser = crate::serve::backend::Delay::parse)]
    pub delay: Option<crate::serve::backend::Delay>,
    /// A delay for one listener, by port (9003=20ms or 9003=exp:5ms); repeatable.
    #[arg(long, value_name = "PORT=DELAY", value_parser = parse_delay_on)]
    pub delay_on: Vec<(u16, crate::serve::backend::Delay)>,
    /// Request-head options shared with `threaded`.
    #[command(flatten)]
    pub http: HttpArgs,
    /// Under `sweep --place`.
    #[command(flatten)]
    pub supervise: Supervise,
}

/// Parses `DELAY` or `PORT=DELAY`.
pub fn parse_backend_delay(s: &str) -> Result<(Option<u16>, crate::serve::backend::Delay), String> {
    if s.contains('=') {
        parse_delay_on(s).map(|(p, d)| (Some(p), d))
    } else {
        crate::serve::backend::Delay::parse(s).map(|d| (None, d))
    }
}

/// Parses `PORT=DELAY`.
pub fn parse_delay_on(s: &str) -> Result<(u16, crate::serve::backend::Delay), String> {
    let (port, delay) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not PORT=DELAY, e.g. 9003=20ms"))?;
    let port = port
        .parse()
        .map_err(|_| format!("'{port}' is not a port"))?;
    Ok((port, crate::serve::backend::Delay::parse(delay)?))
}

/// Options every HTTP server here shares.
#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Largest request head accepted, in bytes; a longer one gets 431 and a close.
    #[arg(long, value_name = "BYTES", default_value_t = crate::serve::http::DEFAULT_MAX_HEAD, value_parser = usize_at_least::<64>)]
    pub max_head: usize,
    /// Time a client has to send a complete request head (and, on keep-alive, the next one).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub head_timeout: Duration,
    /// On Ctrl-C/SIGTERM, how long to let accepted connections finish before exiting.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Connections served at once; past it, accepting pauses and clients wait in the kernel's
    /// backlog [default: what the descriptor limit allows, at most 10000].
    #[arg(long, value_name = "N", value_parser = usize_at_least::<1>)]
    pub max_conns: Option<usize>,
}

/// `ringlab lb`.
#[derive(Debug, Args)]
pub struct LbArgs {
    /// Address to accept clients on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:44444", value_parser = parse_addr)]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics at http://ADDR/metrics (a bare PORT means 127.0.0.1); off by
    /// default.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    pub metrics: Option<SocketAddr>,
    /// Backend address, in rotation order, optionally with a weight (ADDR,weight=3); repeat for
    /// each backend.
    #[arg(
        long = "backend",
        value_name = "ADDR[,weight=N]",
        value_parser = parse_backend,
        default_values = ["127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004", "127.0.0.1:9005"]
    )]
    pub backends: Vec<(SocketAddr, u32)>,
    /// tcp: relay bytes untouched (any TCP protocol); http: an HTTP/1.1 proxy that sends each
    /// request over a pooled keep-alive backend connection.
    #[arg(long, value_enum, default_value_t = Mode::Tcp)]
    pub mode: Mode,
    /// How the first backend to try is chosen: round-robin (weighted), least-conn (fewest in
    /// flight per weight) or p2c (the less loaded of two random picks).
    #[arg(long, value_enum, default_value_t = Policy::RoundRobin)]
    pub policy: Policy,
    /// HTTP mode: answer 504 when a backend has not begun its response after this long.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub response_timeout: Duration,
    /// HTTP mode: idle keep-alive connections kept per backend and executor.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub pool_size: usize,
    /// HTTP mode: close an idle pooled connection after this long (sooner when the backend's
    /// Keep-Alive: timeout says so).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub pool_idle_timeout: Duration,
    /// HTTP mode: largest request or response head, in bytes; a longer request head gets 431.
    #[arg(long, value_name = "BYTES", default_value_t = crate::serve::http::DEFAULT_MAX_HEAD, value_parser = usize_at_least::<64>)]
    pub max_head: usize,
    /// HTTP mode: time a client has to send a complete request head (and, kept alive, the next).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub head_timeout: Duration,
    /// CPUs to run balancer executors on, one executor each, e.g. `0` or `0,1` or `0-1`
    /// [default: the first CPU this process may use].
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuList>,
    /// Socket driver: io_uring (a ring per executor, SINGLE_ISSUER|DEFER_TASKRUN where the
    /// kernel has them) or epoll (non-blocking system calls).
    #[arg(long, value_enum, value_name = "DRIVER", default_value_t = IoMode::Uring)]
    pub io: IoMode,
    /// How long to wait for a backend's connect before trying the next one.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Close a client/backend pair after this long with no bytes moving either way.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Once one side of a pair has finished (sent its FIN, or stopped reading), close the pair
    /// after this long with no bytes moving (HAProxy's `timeout client-fin`/`server-fin`).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub fin_timeout: Duration,
    /// On Ctrl-C/SIGTERM, how long to let relayed connections finish before exiting.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Relay buffer per direction, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 16384, value_parser = usize_at_least::<512>)]
    pub buffer_size: usize,
    /// Consecutive failed connects that take a backend out of rotation.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub fail_threshold: u32,
    /// How long a backend stays out of rotation before one connection tries it again.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub cooldown: Duration,
    /// Also probe every backend with a TCP connect this often (off unless given).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub health_interval: Option<Duration>,
    /// When a backend closes or resets a connection without answering a byte, replay the
    /// client's first bytes to the next backend (like HAProxy's `retry-on empty-response`).
    /// Off by default: if those bytes were not idempotent (a POST, a payment), a backend that
    /// acted on them and then died would see them twice.
    #[arg(long)]
    pub retry_unanswered: bool,
    /// Most client bytes kept for a replay; a client that sends more before the answer is not
    /// replayed.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024)]
    pub retry_buffer: usize,
    /// Client connections served at once per executor; past it, accepting pauses and clients
    /// wait in the kernel's backlog [default: what the descriptor limit allows, at most 10000].
    #[arg(long, value_name = "N", value_parser = usize_at_least::<1>)]
    pub max_conns: Option<usize>,
    /// Under `sweep --place`.
    #[command(flatten)]
    pub supervise: Supervise,
}

/// `ringlab threaded`.
#[derive(Debug, Args)]
pub struct ThreadedArgs {
    /// Address to serve.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:46000", value_parser = parse_addr)]
    pub listen: SocketAddr,
    /// Request-head options shared with `backend`.
    #[command(flatten)]
    pub http: HttpArgs,
    /// Under `sweep --place`.
    #[command(flatten)]
    pub supervise: Supervise,
}

/// `ringlab bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The URL to request, e.g. http://127.0.0.1:44444/
    #[arg(value_name = "URL")]
    pub url: String,
    /// Requests to perform [default: 1000, or 50000 with -t, as ab does; with --rate and -t,
    /// rate × time].
    #[arg(short = 'n', long = "requests", value_name = "N", value_parser = at_least::<1>)]
    pub requests: Option<u64>,
    /// Requests to run at once (closed loop: each worker waits for its response; with --rate,
    /// the most in flight, so a slow server makes requests wait and that wait is measured); at
    /// most -n.
    #[arg(
        short = 'c',
        long = "concurrency",
        value_name = "N",
        default_value_t = 1,
        value_parser = usize_at_least::<1>
    )]
    pub concurrency: usize,
    /// Reuse connections (HTTP keep-alive), like ab -k.
    #[arg(short = 'k', long = "keep-alive")]
    pub keep_alive: bool,
    /// Open loop: send this many requests per second in total (2000, 2k, 1.5k) at intended
    /// times, whatever the answers, and measure latency from each intended time (coordinated
    /// omission corrected, as wrk2 -R). Without it the loop is closed, as ab's.
    #[arg(short = 'R', long, value_name = "REQ/S", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// How --rate spaces intended send times: fixed intervals (wrk2) or Poisson arrivals.
    #[arg(long, value_enum, value_name = "KIND", default_value_t = Arrival::Fixed, requires = "rate")]
    pub arrival: Arrival,
    /// Write the latency percentile spectrum to FILE in HdrHistogram's .hgrm text format (ms),
    /// as wrk2 prints it; with --rate, the corrected latencies.
    #[arg(long, value_name = "FILE")]
    pub latency_out: Option<std::path::PathBuf>,
    /// Stop starting requests after this long, e.g. 10s.
    #[arg(short = 't', long = "time-limit", value_name = "DURATION", value_parser = parse_duration)]
    pub time_limit: Option<Duration>,
    /// Method to send, e.g. PUT or DELETE [default: GET, POST with -p, HEAD with -i].
    #[arg(short = 'm', long, value_name = "METHOD", value_parser = parse_method)]
    pub method: Option<String>,
    /// Send HEAD instead of GET (and read no body), like ab -i.
    #[arg(short = 'i', long = "head", conflicts_with = "post_file")]
    pub head: bool,
    /// Add a header, e.g. -H 'Accept-Encoding: gzip'; repeatable. One named Host, User-Agent
    /// or Accept replaces the default.
    #[arg(short = 'H', long = "header", value_name = "'NAME: VALUE'", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Send FILE's contents as the request body (POST unless -m), like ab -p.
    #[arg(short = 'p', long = "post-file", value_name = "FILE")]
    pub post_file: Option<std::path::PathBuf>,
    /// Content-Type of the -p body, like ab -T.
    #[arg(
        short = 'T',
        long = "content-type",
        value_name = "TYPE",
        default_value = "text/plain",
        requires = "post_file"
    )]
    pub content_type: String,
    /// Connect and response timeout per request.
    #[arg(short = 's', long = "timeout", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// CPUs for the client's executors, one each, e.g. 0 or 0,1 [default: every CPU this
    /// process may run on, as wrk uses all cores; never more executors than -c].
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuList>,
    /// Socket driver: io_uring (a ring per executor, SINGLE_ISSUER|DEFER_TASKRUN where the
    /// kernel has them) or epoll (non-blocking system calls).
    #[arg(long, value_enum, value_name = "DRIVER", default_value_t = IoMode::Uring)]
    pub io: IoMode,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Start at this wall-clock time, in milliseconds since the Unix epoch, so clients on
    /// several hosts start together (`sweep --place client=A,B` hands one out); the hosts'
    /// clocks must agree (NTP).
    #[arg(long, value_name = "UNIX_MS")]
    pub start_at: Option<u64>,
    /// Under `sweep --place`.
    #[command(flatten)]
    pub supervise: Supervise,
}

/// `ringlab sweep`.
#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Requests per cell.
    #[arg(
        short = 'n',
        long = "requests",
        value_name = "N",
        default_value_t = 1000,
        value_parser = at_least::<1>
    )]
    pub requests: u64,
    /// Concurrency levels: a range like 1-5 or a list like 1,2,4,8 [default: 1-5; with --rates,
    /// 64: the most requests in flight].
    #[arg(short = 'c', long = "concurrency", value_name = "LIST", value_parser = parse_number_list)]
    pub concurrency: Option<NumberList>,
    /// Open loop: measure each target at these offered rates (2k,4k,8k), or `auto` to step up
    /// from 1k by 1.5× until a target stops keeping up; the summary names each target's knee.
    #[arg(long, value_name = "LIST|auto", value_parser = parse_rates)]
    pub rates: Option<Rates>,
    /// With --rates: how long each cell sends.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration, requires = "rates")]
    pub duration: Duration,
    /// With --rates: the p99 latency a target must stay under to be keeping up (and for
    /// `auto` to step further); without it, only the achieved rate counts.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, requires = "rates")]
    pub slo: Option<Duration>,
    /// With --rates: fixed intervals (wrk2) or Poisson arrivals.
    #[arg(long, value_enum, value_name = "KIND", default_value_t = Arrival::Fixed, requires = "rates")]
    pub arrival: Arrival,
    /// Repetitions per cell; the median is reported, the spread shown.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = usize_at_least::<1>)]
    pub repeat: usize,
    /// Measure this address instead of starting the lab; repeat for each target, e.g.
    /// --target lb=127.0.0.1:44444 --target haproxy=127.0.0.1:8080. The first is compared with
    /// the others in the summary.
    #[arg(long = "target", value_name = "NAME=HOST:PORT", value_parser = parse_target)]
    pub targets: Vec<(String, SocketAddr)>,
    /// Folder to write the results folder into.
    #[arg(long, value_name = "DIR", default_value = "results")]
    pub out: std::path::PathBuf,
    /// Label appended to the results folder's name [default: lab, or lab-k with -k].
    #[arg(long, value_name = "LABEL")]
    pub label: Option<String>,
    /// Reuse connections (HTTP keep-alive), like ab -k.
    #[arg(short = 'k', long = "keep-alive")]
    pub keep_alive: bool,
    /// CPUs for the client's executors, for every target [default: the first CPU for direct
    /// servers and --target addresses, the last CPU for the in-process balancer].
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub client_cpus: Option<CpuList>,
    /// CPUs for the client while it measures the in-process balancer (overrides --client-cpus).
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub lb_client_cpus: Option<CpuList>,
    /// CPUs for the (TCP-mode) balancer's executors, one each [default: the first CPU].
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub lb_cpus: Option<CpuList>,
    /// CPUs for the HTTP-mode balancer's executors, one each [default: the last CPU, beside
    /// its backends].
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub lb_http_cpus: Option<CpuList>,
    /// CPUs for the client while it measures the HTTP-mode balancer (overrides --client-cpus)
    /// [default: the first CPU].
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub lb_http_client_cpus: Option<CpuList>,
    /// CPU for the backends, the direct server and the threaded server [default: the last CPU].
    #[arg(long, value_name = "N")]
    pub server_cpu: Option<usize>,
    /// The processes serving a --target, e.g. lb=4242,4243 (repeatable): each cell then records
    /// their CPU time per request (user + system from /proc, every thread).
    #[arg(long = "target-pid", value_name = "NAME=PID[,PID…]", value_parser = parse_target_pids)]
    pub target_pids: Vec<(String, Vec<u32>)>,
    /// How servers given with --target were placed on CPUs, recorded in the results.
    #[arg(long, value_name = "TEXT")]
    pub note: Option<String>,
    /// Unrecorded requests per target before measuring.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub warmup: u64,
    /// Connect and response timeout per request.
    #[arg(short = 's', long = "timeout", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Balancer modes in the in-process lab: tcp (44444), http (44480) or both.
    #[arg(
        long = "mode",
        value_enum,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "tcp,http"
    )]
    pub modes: Vec<Mode>,
    /// Balancer policies in the in-process lab: one balancer per mode and policy, e.g.
    /// round-robin,least-conn,p2c (the first takes the lab's ports, the others free ones).
    #[arg(
        long = "policy",
        value_enum,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "round-robin"
    )]
    pub policies: Vec<Policy>,
    /// Service time of the in-process backends: DELAY for all (5ms, exp:2ms) or PORT=DELAY
    /// for one (9005=20ms); repeatable.
    #[arg(long, value_name = "[PORT=]DELAY", value_parser = parse_backend_delay)]
    pub backend_delay: Vec<(Option<u16>, crate::serve::backend::Delay)>,
    /// Socket drivers to measure, e.g. uring or uring,epoll: the lab is started once per
    /// driver and their targets are measured side by side (the summary gives the ratio). The
    /// client runs on the first.
    #[arg(
        long,
        value_enum,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "uring"
    )]
    pub io: Vec<IoMode>,
    /// Run a role on other hosts, each its own process: backends=HOST[,HOST…] (the four
    /// backends spread over them; the direct and threaded servers on the first),
    /// lb=HOST, client=HOST[,HOST…] (each client runs its share of -c and --rate, all starting
    /// together, their histograms merged exactly). HOST is local[/IP], netns:NAME[/IP] (`ip netns
    /// exec NAME`) or ssh:[USER@]HOST[/IP] (OpenSSH in batch mode); /IP is the address the
    /// other roles reach it at [default: 127.0.0.1, the namespace's address, the ssh host's].
    /// Roles not placed run locally.
    #[arg(long = "place", value_name = "ROLE=HOST[,HOST…]", value_parser = crate::lab::hosts::parse_place)]
    pub place: Vec<(crate::lab::hosts::Role, Vec<crate::lab::hosts::Host>)>,
    /// The ringlab binary on ssh hosts.
    #[arg(long, value_name = "PATH", default_value = "ringlab")]
    pub remote_bin: String,
    /// Build network namespaces for the roles (as `ringlab netlab up` does: one per role, veth
    /// pairs to a bridge, 198.18.0.0/15), run the lab in them, and remove exactly what was made;
    /// needs root.
    #[arg(long, conflicts_with = "place")]
    pub netns: bool,
    /// With --netns: client namespaces, each running its share of the load.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clients_count, requires = "netns")]
    pub clients: usize,
    /// With --netns: what each link does to packets.
    #[command(flatten)]
    pub links: Links,
    /// Let the kernel choose every server's port instead of the lab's 9002-9005, 44444, 44480,
    /// 45000 and 46000 (to run beside a lab that holds them).
    #[arg(long)]
    pub free_ports: bool,
}

/// Parses a whole number that must be at least `MIN`; clap reports a refusal as a usage error
/// (exit status 2) with this message.
fn at_least<const MIN: u64>(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number"))?;
    if n < MIN {
        return Err(format!("must be at least {MIN}"));
    }
    Ok(n)
}

/// [`at_least`] for a `usize` flag.
fn usize_at_least<const MIN: u64>(s: &str) -> Result<usize, String> {
    at_least::<MIN>(s).and_then(|n| usize::try_from(n).map_err(|_| format!("'{s}' is too large")))
}

/// A usage error found after parsing (two flags that do not fit together): reported like clap's
/// own, with exit status 2. Build one with [`usage`].
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A usage error with `message`, which should say what to type instead.
pub fn usage(message: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, Usage(message.into()))
}

/// The exit status for a failed command, decided here and nowhere else: 2 for a usage error
/// (clap exits 2 itself for the errors it finds), 130 for a run interrupted by Ctrl-C or SIGTERM
/// (the partial results are printed first), 1 for everything else.
pub fn exit_status(err: &std::io::Error) -> u8 {
    if err.get_ref().is_some_and(|e| e.is::<Usage>()) {
        2
    } else if err.kind() == std::io::ErrorKind::Interrupted {
        130
    } else {
        1
    }
}

/// A parsed list of positive numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberList(pub Vec<usize>);

/// Parses `1-5`, `1,2,4` or a mix, for concurrency levels (all at least 1).
pub fn parse_number_list(s: &str) -> Result<NumberList, String> {
    let list =
        parse_list(s).map_err(|_| format!("'{s}' is not a list; use e.g. 1-5 or 1,2,4,8"))?;
    if list.contains(&0) {
        return Err(format!("'{s}': every level must be at least 1"));
    }
    Ok(NumberList(list))
}

/// Parses a backend: `HOST:PORT` (as [`parse_addr`]), optionally `,weight=N` (N ≥ 1).
pub fn parse_backend(s: &str) -> Result<(SocketAddr, u32), String> {
    let (addr, rest) = match s.split_once(',') {
        Some((a, r)) => (a, Some(r)),
        None => (s, None),
    };
    let weight = match rest {
        None => 1,
        Some(r) => {
            let w = r.strip_prefix("weight=").ok_or_else(|| {
                format!("'{s}': after the address only weight=N may follow, e.g. 127.0.0.1:9002,weight=3")
            })?;
            match w.parse::<u32>() {
                Ok(w) if w >= 1 => w,
                _ => {
                    return Err(format!(
                        "'{s}': the weight must be a whole number of at least 1"
                    ));
                }
            }
        }
    };
    Ok((parse_addr(addr)?, weight))
}

/// Parses `NAME=HOST:PORT`.
pub fn parse_target(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s.split_once('=').ok_or_else(|| {
        format!("'{s}' is not a target; expected NAME=HOST:PORT such as lb=127.0.0.1:44444")
    })?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "'{name}': a target name uses letters, digits, '-', '_' or '.'"
        ));
    }
    Ok((name.to_string(), parse_addr(addr)?))
}

/// A parsed CPU list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

/// Parses `HOST:PORT`, `:PORT` or `PORT` (the last two on 127.0.0.1: loopback unless told).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let bad = || format!("'{s}' is not an address; expected HOST:PORT such as 127.0.0.1:9002");
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if !s.contains(':') {
        return Err(bad());
    }
    s.to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{s}': {e}"))?
        .next()
        .ok_or_else(bad)
}

/// Parses a request rate: `2000`, `2k`, `1.5k` or `1m` (per second, positive).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, scale) = if let Some(n) = t.strip_suffix('k') {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 1e6)
    } else {
        (t.as_str(), 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * scale <= 1e8 => Ok(v * scale),
        _ => Err(format!(
            "'{s}' is not a rate; use requests per second such as 2000, 2k or 1.5k"
        )),
    }
}

/// Parses `--rates`: `auto`, or a list of rates as [`parse_rate`] reads them.
pub fn parse_rates(s: &str) -> Result<Rates, String> {
    if s.trim().eq_ignore_ascii_case("auto") {
        return Ok(Rates::Auto {
            start: 1000.0,
            factor: 1.5,
            max_steps: 16,
        });
    }
    let list = s
        .split(',')
        .map(parse_rate)
        .collect::<Result<Vec<f64>, String>>()
        .map_err(|e| format!("{e}; --rates takes a list such as 2k,4k,8k, or auto"))?;
    Ok(Rates::List(list))
}

/// Parses `NAME=PID[,PID…]`.
fn parse_target_pids(s: &str) -> Result<(String, Vec<u32>), String> {
    let bad = || format!("'{s}' is not NAME=PID[,PID…]; e.g. lb=4242 or direct=4243,4244");
    let (name, pids) = s.split_once('=').ok_or_else(bad)?;
    let pids = pids
        .split(',')
        .map(|p| p.trim().parse::<u32>().map_err(|_| bad()))
        .collect::<Result<Vec<_>, _>>()?;
    if name.is_empty() {
        return Err(bad());
    }
    Ok((name.to_string(), pids))
}

/// Parses an HTTP method token.
fn parse_method(s: &str) -> Result<String, String> {
    RequestSpec::check_method(s).map(|()| s.to_string())
}

/// Parses `-H 'Name: value'`.
fn parse_header(s: &str) -> Result<(String, String), String> {
    RequestSpec::parse_header(s)
}

/// Parses `50us`, `500ms`, `2s`, `1.5s`, `1m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration; use e.g. 50us, 500ms, 2s, 1.5s or 1m");
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("us").or_else(|| t.strip_suffix("µs")) {
        (n, 0.000_001)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 || v * scale > 86_400.0 * 365.0 {
        return Err(format!("'{s}' must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Parses `0`, `0,1`, `0-3` or combinations such as `0,2-3`.
pub fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    parse_list(s)
        .map(CpuList)
        .map_err(|_| format!("'{s}' is not a CPU list; use e.g. 0 or 0,1 or 0-1"))
}

/// The shared grammar: comma-separated numbers and inclusive `a-b` ranges.
fn parse_list(s: &str) -> Result<Vec<usize>, ()> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a.trim().parse().map_err(|_| ())?;
            let b: usize = b.trim().parse().map_err(|_| ())?;
            if a > b || b - a > 100_000 {
                return Err(());
            }
            out.extend(a..=b);
        } else {
            out.push(part.parse().map_err(|_| ())?);
        }
    }
    if out.is_empty() {
        return Err(());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("9002").unwrap(),
            "127.0.0.1:9002".parse().unwrap()
        );
        assert_eq!(
            parse_addr(":9003").unwrap(),
            "127.0.0.1:9003".parse().unwrap()
        );
        assert_eq!(parse_addr("[::1]:80").unwrap(), "[::1]:80".parse().unwrap());
        assert!(parse_addr("nonsense").unwrap_err().contains("HOST:PORT"));
        assert!(parse_addr("127.0.0.1:99999").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("50us").unwrap(), Duration::from_micros(50));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0").unwrap(), CpuList(vec![0]));
        assert_eq!(parse_cpu_list("0,2-3").unwrap(), CpuList(vec![0, 2, 3]));
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert_eq!(
            parse_number_list("1-5").unwrap(),
            NumberList(vec![1, 2, 3, 4, 5])
        );
        assert!(parse_number_list("0-2").is_err());
    }

    #[test]
    fn targets() {
        let (name, addr) = parse_target("lb=127.0.0.1:44444").unwrap();
        assert_eq!((name.as_str(), addr.port()), ("lb", 44444));
        assert!(
            parse_target("127.0.0.1:44444")
                .unwrap_err()
                .contains("NAME=HOST:PORT")
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
