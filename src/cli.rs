//! The command line, defined once: clap derives parsing, `--help` and error messages from these
//! types, and the value parsers give each bad value a message that says what to type instead.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// ringlab — the networking performance lab on glommio and io_uring.
///
/// Four HTTP backends behind a round-robin L4 balancer, compared with a direct async server and a
/// thread-per-connection server. Run each piece by hand with the subcommands below.
#[derive(Debug, Parser)]
#[command(name = "ringlab", version, propagate_version = true)]
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
    /// Request-head options shared with `threaded`.
    #[command(flatten)]
    pub http: HttpArgs,
}

/// Options every HTTP server here shares.
#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Largest request head accepted, in bytes; a longer one gets 431 and a close.
    #[arg(long, value_name = "BYTES", default_value_t = crate::http::DEFAULT_MAX_HEAD, value_parser = clap::value_parser!(usize))]
    pub max_head: usize,
    /// Time a client has to send a complete request head (and, on keep-alive, the next one).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub head_timeout: Duration,
    /// On Ctrl-C/SIGTERM, how long to let accepted connections finish before exiting.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// `ringlab lb`.
#[derive(Debug, Args)]
pub struct LbArgs {
    /// Address to accept clients on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:44444", value_parser = parse_addr)]
    pub listen: SocketAddr,
    /// Backend address, in rotation order; repeat for each backend.
    #[arg(
        long = "backend",
        value_name = "ADDR",
        value_parser = parse_addr,
        default_values = ["127.0.0.1:9002", "127.0.0.1:9003", "127.0.0.1:9004", "127.0.0.1:9005"]
    )]
    pub backends: Vec<SocketAddr>,
    /// CPUs to run balancer executors on, one executor each, e.g. `0` or `0,1` or `0-1`
    /// [default: the first CPU this process may use].
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub cpus: Option<CpuList>,
    /// How long to wait for a backend's connect before trying the next one.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Close a client/backend pair after this long with no bytes moving either way.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// On Ctrl-C/SIGTERM, how long to let relayed connections finish before exiting.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Relay buffer per direction, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 16384)]
    pub buffer_size: usize,
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

/// Parses `500ms`, `2s`, `1.5s`, `1m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration; use e.g. 500ms, 2s, 1.5s or 1m");
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
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
    let bad = || format!("'{s}' is not a CPU list; use e.g. 0 or 0,1 or 0-1");
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a.trim().parse().map_err(|_| bad())?;
            let b: usize = b.trim().parse().map_err(|_| bad())?;
            if a > b {
                return Err(bad());
            }
            cpus.extend(a..=b);
        } else {
            cpus.push(part.parse().map_err(|_| bad())?);
        }
    }
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(CpuList(cpus))
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
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
