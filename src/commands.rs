//! What each subcommand does: turn parsed flags into listeners, placement and servers, print where
//! everything runs, wait for Ctrl-C/SIGTERM, and print the counters on the way out.

use std::io;

use crate::cli::{
    self, BackendArgs, BenchArgs, Command, DiffArgs, HttpArgs, LbArgs, SweepArgs, ThreadedArgs,
};
use crate::io::driver::IoMode;
use crate::io::limits;
use crate::io::listen;
use crate::io::placement;
use crate::io::shutdown::{self, Shutdown};
use crate::lab::client::{self, BenchConfig, RequestSpec, Target};
use crate::lab::diff;
use crate::lab::hgrm;
use crate::lab::hosts::{Host, Reach};
use crate::lab::merge;
use crate::lab::netlab;
use crate::lab::placed::HostPlan;
use crate::lab::report;
use crate::lab::results;
use crate::lab::sweep::{self, RatePlan, SweepConfig};
use crate::lab::topology::{LabSetup, NamedTarget, Placement, Ports};
use crate::serve::backend::{self, BackendConfig, ListenerStats};
use crate::serve::balancer::{self, BalancerConfig, BalancerReport};
use crate::serve::health::HealthPolicy;
use crate::serve::threaded;

/// Runs one subcommand to completion. Errors carry a one-line, user-facing message.
pub fn run(command: Command) -> io::Result<()> {
    limits::raise_nofile();
    let shutdown = Shutdown::new();
    shutdown::trip_on_signals(&shutdown)?;
    if command.supervise().supervised {
        SUPERVISED.store(true, std::sync::atomic::Ordering::Relaxed);
        shutdown::trip_on_stdin_eof(&shutdown)?;
    }
    match command {
        Command::Backend(args) => run_backend(args, shutdown),
        Command::Lb(args) => run_lb(args, shutdown),
        Command::Threaded(args) => run_threaded(args, shutdown),
        Command::Bench(args) => run_bench(args, shutdown),
        Command::Sweep(args) => run_sweep(*args, shutdown),
        Command::Diff(args) => run_diff(args),
        Command::Netlab(args) => match args.action {
            cli::NetlabAction::Up => {
                let note = netlab::up(&args.prefix, args.clients, &shaping(&args.links))?;
                if let Some(note) = note {
                    eprintln!("ringlab netlab: {note}");
                }
                for (role, addr) in netlab::roles(args.clients) {
                    println!(
                        "ringlab netlab: {role} = {addr} (ip netns exec {} …)",
                        netlab::namespace(&args.prefix, &role)
                    );
                }
                Ok(())
            }
            cli::NetlabAction::Down => {
                let removed = netlab::down(&args.prefix)?;
                println!(
                    "ringlab netlab: removed {}",
                    if removed.is_empty() {
                        "nothing (none were there)".to_string()
                    } else {
                        removed.join(", ")
                    }
                );
                Ok(())
            }
        },
        Command::Machine(args) => {
            let m = crate::lab::machine::Machine::probe();
            match args.format {
                report::Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&m).map_err(io::Error::other)?
                ),
                _ => print!("{}", m.describe()),
            }
            Ok(())
        }
        Command::Merge(args) => {
            let parts = args
                .files
                .iter()
                .map(|f| merge::load(f))
                .collect::<io::Result<Vec<_>>>()?;
            let merged = merge::merge(&parts).map_err(io::Error::other)?;
            print!("{}", report::render(&merged, args.format));
            Ok(())
        }
    }
}

/// Set under `--supervised`: the servers then print a `ringlab ready:` line for the sweep.
static SUPERVISED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tells a supervising sweep where a server listens, once it does: one line, `ringlab ready:`
/// and the addresses, after the human-readable start-up line.
fn announce_ready(addrs: &[std::net::SocketAddr]) {
    if SUPERVISED.load(std::sync::atomic::Ordering::Relaxed) {
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        println!("ringlab ready: {}", list.join(" "));
        let _ = std::io::Write::flush(&mut std::io::stdout());
    }
}

/// The netlab link shaping from its flags.
fn shaping(links: &cli::Links) -> netlab::Shaping {
    netlab::Shaping {
        rate: links.rate_limit.clone(),
        delay: links.delay.clone(),
        loss: links.loss.clone(),
    }
}

fn run_diff(args: DiffArgs) -> io::Result<()> {
    let base = diff::load(&args.base)?;
    let new = diff::load(&args.new)?;
    let d = diff::compare(&base, &new);
    let text = diff::markdown(&d, args.fail_below);
    print!("{text}");
    if let Some(dir) = &args.out {
        results::create(dir)?;
        for (name, contents) in [("diff.md", text.clone()), ("diff.svg", diff::svg(&d))] {
            std::fs::write(dir.join(name), contents).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot write {}: {e}", dir.join(name).display()),
                )
            })?;
        }
    }
    if let Some(threshold) = args.fail_below {
        let failing = d.failing(threshold);
        if !failing.is_empty() {
            return Err(io::Error::other(format!(
                "{} cell(s) worse beyond noise and below {threshold}x",
                failing.len()
            )));
        }
    }
    Ok(())
}

fn run_bench(args: BenchArgs, shutdown: Shutdown) -> io::Result<()> {
    let target =
        Target::parse(&args.url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let requests = match (args.requests, args.time_limit, args.rate) {
        (Some(n), _, _) => n,
        // An open loop for a time: as many requests as the rate sends in it.
        (None, Some(t), Some(rate)) => (rate * t.as_secs_f64()).ceil().max(1.0) as u64,
        (None, Some(_), None) => client::TIMED_REQUESTS,
        (None, None, _) => 1000,
    };
    if args.concurrency as u64 > requests {
        // ab refuses this too: the extra workers would never send, yet the report would divide
        // by them.
        return Err(cli::usage(format!(
            "-c {} is more than the {requests} requests to make; use -c {requests} or fewer, or \
             a larger -n",
            args.concurrency
        )));
    }
    let body = match &args.post_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| io::Error::new(e.kind(), format!("-p {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let method = args.method.clone().unwrap_or_else(|| {
        if args.head {
            "HEAD".into()
        } else if body.is_some() {
            "POST".into()
        } else {
            "GET".into()
        }
    });
    let request = RequestSpec {
        method,
        headers: args.headers.clone(),
        body,
        content_type: args.content_type.clone(),
    };
    // Standalone, the client takes every CPU it may use, as wrk does; the sweep keeps its own
    // measured placement.
    let cpus = args.cpus.map_or_else(placement::allowed_cpus, |l| l.0);
    if let Some(at) = args.start_at {
        wait_until(at, &shutdown);
    }
    let result = client::run(BenchConfig {
        target,
        request,
        rate: args.rate,
        arrival: args.arrival,
        requests,
        concurrency: args.concurrency,
        keep_alive: args.keep_alive,
        time_limit: args.time_limit,
        timeout: args.timeout,
        cpus: cpus.into_iter().map(Some).collect(),
        io: args.io,
        stop: Some(shutdown),
    })?;
    print!("{}", report::render(&result, args.format));
    if let Some(path) = &args.latency_out {
        std::fs::write(path, hgrm::percentile_distribution(&result.histogram)).map_err(|e| {
            io::Error::new(e.kind(), format!("--latency-out {}: {e}", path.display()))
        })?;
    }
    if result.interrupted {
        return Err(io::Error::new(
            io::ErrorKind::Interrupted,
            format!(
                "interrupted after {} of {requests} requests; the results above are partial",
                result.complete
            ),
        ));
    }
    Ok(())
}

fn run_sweep(args: SweepArgs, shutdown: Shutdown) -> io::Result<()> {
    let allowed = placement::allowed_cpus();
    let mut place = Placement::default_for(&allowed);
    if let Some(c) = args.client_cpus {
        place.client = c.0.clone();
        place.lb_client = c.0.clone();
        place.lb_http_client = c.0;
    }
    if let Some(c) = args.lb_client_cpus {
        place.lb_client = c.0;
    }
    if let Some(c) = args.lb_cpus {
        place.lb = c.0;
    }
    if let Some(c) = args.lb_http_client_cpus {
        place.lb_http_client = c.0;
    }
    if let Some(c) = args.lb_http_cpus {
        place.lb_http = c.0;
    }
    if let Some(c) = args.server_cpu {
        place.servers = c;
    }
    place.check()?;
    let targets = args
        .targets
        .iter()
        .map(|(name, addr)| NamedTarget {
            name: name.clone(),
            addr: *addr,
            description: "given with --target".into(),
            client_cpus: place.client.clone(),
            io: None,
        })
        .collect();
    if let Some((name, _)) = args
        .target_pids
        .iter()
        .find(|(name, _)| !args.targets.iter().any(|(t, _)| t == name))
    {
        return Err(cli::usage(format!(
            "--target-pid {name}=…: no --target is named {name}; name the target it serves"
        )));
    }
    let mut config = SweepConfig {
        requests: args.requests,
        concurrency: args.concurrency.map_or_else(
            || {
                if args.rates.is_some() {
                    vec![64]
                } else {
                    vec![1, 2, 3, 4, 5]
                }
            },
            |l| l.0,
        ),
        repeat: args.repeat,
        keep_alive: args.keep_alive,
        targets,
        placement: place,
        ports: Ports::lab(),
        warmup: args.warmup,
        timeout: args.timeout,
        note: args.note,
        stop: shutdown,
        io: args.io,
        lab: LabSetup {
            modes: args.modes.clone(),
            policies: args.policies.clone(),
            delay: args
                .backend_delay
                .iter()
                .find(|(port, _)| port.is_none())
                .map_or_else(Default::default, |(_, d)| *d),
            delay_on: args
                .backend_delay
                .iter()
                .filter_map(|(port, d)| port.map(|p| (p, *d)))
                .collect(),
            ..LabSetup::default()
        },
        target_pids: args.target_pids.clone(),
        hosts: None,
        rates: args.rates.clone().map(|rates| RatePlan {
            rates,
            duration: args.duration,
            slo: args.slo,
            arrival: args.arrival,
        }),
    };
    let label = args
        .label
        .unwrap_or_else(|| match (args.rates.is_some(), args.keep_alive) {
            (true, true) => "lab-rates-k".into(),
            (true, false) => "lab-rates".into(),
            (false, true) => "lab-k".into(),
            (false, false) => "lab".into(),
        });
    if args.free_ports {
        config.ports = Ports::ephemeral();
    }
    if !args.place.is_empty() {
        let mut plan = HostPlan::local();
        plan.remote_bin = args.remote_bin.clone();
        for (role, hosts) in &args.place {
            plan.place(*role, hosts.clone());
        }
        config.hosts = Some(plan);
    } else if args.netns {
        // Checked before the namespaces are built; built before the results folder is made.
        config.hosts = Some(HostPlan::local());
    } else if args.links.rate_limit.is_some()
        || args.links.delay.is_some()
        || args.links.loss.is_some()
    {
        return Err(cli::usage(
            "--rate-limit, --delay and --loss shape the links of --netns; add --netns",
        ));
    }
    sweep::validate(&config)?;
    // The namespaces live exactly as long as this guard: removed when the sweep ends, however.
    let _netns = if args.netns {
        let lab = NetnsLab::up(args.clients, &shaping(&args.links))?;
        config.hosts = Some(lab.plan(&args.remote_bin));
        Some(lab)
    } else {
        None
    };
    let mut folder = ResultsFolder {
        dir: args.out.join(results::folder_name(&label)),
        failed: None,
    };
    let sweep = sweep::run_recording(&config, &mut folder)?;
    // The summary always reaches stdout, whatever happens to the files.
    print!("{}", results::summary_text(&sweep));
    let (dir, write_error) = match results::write(&sweep, &folder.dir) {
        Ok(dir) => (dir, None),
        Err(err) => {
            // Nothing measured is thrown away: the numbers go to the temporary folder instead.
            let fallback = std::env::temp_dir().join(folder.dir.file_name().unwrap_or_default());
            eprintln!(
                "ringlab sweep: {err}; writing to {} instead",
                fallback.display()
            );
            results::write(&sweep, &fallback)
                .map_err(|again| io::Error::new(again.kind(), format!("{err}; and {again}")))?;
            (fallback, Some(err))
        }
    };
    match &sweep.status {
        sweep::Status::Complete => println!("ringlab sweep: wrote {}", dir.display()),
        _ => println!(
            "ringlab sweep: wrote the {} runs measured (of {}) to {}",
            sweep.measured_runs(),
            sweep.planned_runs,
            dir.display()
        ),
    }
    match (sweep.status, write_error) {
        (sweep::Status::Interrupted, _) => Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "sweep interrupted; the cells measured until then were kept",
        )),
        (sweep::Status::Failed(why), _) => Err(io::Error::other(format!(
            "sweep failed: {why}; the cells measured until then were kept"
        ))),
        (_, Some(err)) => Err(err),
        _ => Ok(()),
    }
}

/// The namespaces `sweep --netns` built, removed when this is dropped.
struct NetnsLab {
    prefix: String,
    clients: usize,
    shaping: netlab::Shaping,
}

impl NetnsLab {
    /// Builds the namespaces under a prefix of this process's own, so two sweeps never share
    /// (or remove) each other's.
    fn up(clients: usize, shaping: &netlab::Shaping) -> io::Result<NetnsLab> {
        let prefix = format!("rl{}", std::process::id() % 100_000);
        if let Some(note) = netlab::up(&prefix, clients, shaping)? {
            eprintln!("ringlab sweep: {note}");
        }
        eprintln!(
            "ringlab sweep: built network namespaces {prefix}-{{client,lb,backends}}{} and their bridge",
            if clients > 1 { " and more clients" } else { "" }
        );
        Ok(NetnsLab {
            prefix,
            clients,
            shaping: shaping.clone(),
        })
    }

    /// The hosts: one namespace per role, at its netlab address.
    fn plan(&self, remote_bin: &str) -> HostPlan {
        let host = |role: &str, addr: std::net::Ipv4Addr| Host {
            reach: Reach::Netns(netlab::namespace(&self.prefix, role)),
            addr: Some(addr.into()),
        };
        let (_, lb) = netlab::ROLES[1];
        let (_, backends) = netlab::ROLES[2];
        HostPlan {
            backends: vec![host("backends", backends)],
            lb: host("lb", lb),
            clients: (1..=self.clients)
                .map(|k| host(&netlab::client_role(k), netlab::client_address(k)))
                .collect(),
            remote_bin: remote_bin.to_string(),
            origin: Some(format!(
                "each role in its own network namespace, built by this sweep and removed after it (prefix {}: clients from 198.18.0.1, lb 198.18.0.2, backends 198.18.0.3; veth pairs to a bridge; links {})",
                self.prefix,
                self.shaping.describe()
            )),
        }
    }
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        match netlab::down(&self.prefix) {
            Ok(removed) => eprintln!("ringlab sweep: removed {}", removed.join(", ")),
            Err(e) => eprintln!(
                "ringlab sweep: removing the namespaces failed ({e}); run `ringlab netlab down --prefix {}`",
                self.prefix
            ),
        }
    }
}

/// The sweep's results folder, made before the first cell and kept up to date after each one.
struct ResultsFolder {
    dir: std::path::PathBuf,
    /// The first failure to write between cells, reported once.
    failed: Option<String>,
}

impl sweep::Record for ResultsFolder {
    fn started(&mut self, sweep: &sweep::Sweep) -> io::Result<()> {
        results::create(&self.dir)?;
        results::write_json(sweep, &self.dir)
    }

    fn measured(&mut self, sweep: &sweep::Sweep) {
        if let Err(err) = results::write_json(sweep, &self.dir) {
            if self.failed.is_none() {
                eprintln!("ringlab sweep: {err}; measuring on, the results are kept in memory");
                self.failed = Some(err.to_string());
            }
        }
    }
}

fn http_config(args: &HttpArgs, io: IoMode) -> BackendConfig {
    BackendConfig {
        max_head: args.max_head,
        head_timeout: args.head_timeout,
        drain_timeout: args.drain_timeout,
        max_conns: args
            .max_conns
            .unwrap_or_else(|| limits::default_max_conns(1)),
        io,
        ..BackendConfig::default()
    }
}

/// Sleeps until the wall clock reads `unix_ms` (or a stop is asked for); a time already past
/// starts at once.
fn wait_until(unix_ms: u64, stop: &Shutdown) {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms);
    while !stop.is_triggered() {
        match at.duration_since(std::time::SystemTime::now()) {
            Ok(left) if !left.is_zero() => {
                std::thread::sleep(left.min(std::time::Duration::from_millis(50)))
            }
            _ => break,
        }
    }
}

fn run_backend(args: BackendArgs, shutdown: Shutdown) -> io::Result<()> {
    let cpu = args.cpu.unwrap_or_else(|| placement::default_cpu(0));
    let listeners = args
        .listen
        .iter()
        .map(|&addr| listen::bind_one(addr))
        .collect::<io::Result<Vec<_>>>()?;
    let bound = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<io::Result<Vec<_>>>()?;
    let addrs: Vec<String> = bound.iter().map(ToString::to_string).collect();
    let config = BackendConfig {
        delay: args.delay.unwrap_or_default(),
        delay_on: args.delay_on.clone(),
        ..http_config(&args.http, args.io)
    };
    let metrics = args.metrics.map(listen::bind_one).transpose()?;
    if let Some(l) = &metrics {
        println!(
            "ringlab backend: metrics at http://{}/metrics (Prometheus text format)",
            l.local_addr()?
        );
    }
    let executor = backend::spawn_watched(listeners, Some(cpu), config, shutdown, metrics)?;
    println!(
        "ringlab backend: serving {} on CPU {cpu} (one glommio executor; sockets on {}); Ctrl-C \
         to stop",
        addrs.join(", "),
        executor.driver
    );
    announce_ready(&bound);
    let stats = executor.join()??;
    print_listener_stats("backend", &stats);
    Ok(())
}

fn run_threaded(args: ThreadedArgs, shutdown: Shutdown) -> io::Result<()> {
    let listener = listen::bind_one(args.listen)?;
    println!(
        "ringlab threaded: serving {} with one OS thread per connection (unpinned); Ctrl-C to stop",
        listener.local_addr()?
    );
    announce_ready(&[listener.local_addr()?]);
    let stats = threaded::serve(
        listener,
        http_config(&args.http, IoMode::default()),
        shutdown,
    )?;
    print_listener_stats("threaded", &[stats]);
    Ok(())
}

fn run_lb(args: LbArgs, shutdown: Shutdown) -> io::Result<()> {
    let cpus = match args.cpus {
        Some(list) => list.0,
        None => vec![placement::default_cpu(1)],
    };
    for &cpu in &cpus {
        placement::check_cpu(cpu)?;
    }
    let addrs: Vec<std::net::SocketAddr> = args.backends.iter().map(|b| b.0).collect();
    balancer::check_backends(args.listen, &addrs).map_err(|e| cli::usage(e.to_string()))?;
    let listeners = listen::bind_shared(args.listen, cpus.len())?;
    let local = listeners[0].local_addr()?;
    let config = BalancerConfig {
        backends: addrs.clone(),
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout,
        fin_timeout: args.fin_timeout,
        drain_timeout: args.drain_timeout,
        buffer_size: args.buffer_size,
        health: HealthPolicy {
            fail_threshold: args.fail_threshold,
            cooldown: args.cooldown,
        },
        health_interval: args.health_interval,
        retry_unanswered: args.retry_unanswered.then_some(args.retry_buffer),
        // Two descriptors per pair, and the executors share the process's limit.
        max_conns: args
            .max_conns
            .unwrap_or_else(|| limits::default_max_conns(2 * cpus.len() as u64)),
        io: args.io,
        mode: args.mode,
        policy: args.policy,
        weights: args.backends.iter().map(|b| b.1).collect(),
        response_timeout: args.response_timeout,
        pool_size: args.pool_size,
        pool_idle_timeout: args.pool_idle_timeout,
        max_head: args.max_head,
        head_timeout: args.head_timeout,
    };
    let placements: Vec<Option<usize>> = cpus.iter().copied().map(Some).collect();
    let metrics = args.metrics.map(listen::bind_one).transpose()?;
    if let Some(l) = &metrics {
        println!(
            "ringlab lb: metrics at http://{}/metrics (Prometheus text format)",
            l.local_addr()?
        );
    }
    let executors =
        balancer::spawn_watched(listeners, &placements, config.clone(), shutdown, metrics)?;
    let backends: Vec<String> = args
        .backends
        .iter()
        .map(|(a, w)| {
            if *w == 1 {
                a.to_string()
            } else {
                format!("{a} (weight {w})")
            }
        })
        .collect();
    println!(
        "ringlab lb: {local} -> [{}] {} mode, {}; {} executor(s) on CPU {}, sockets on {}; up \
         to {} connections each; replay unanswered: {}; Ctrl-C to stop",
        backends.join(", "),
        config.mode,
        config.policy,
        cpus.len(),
        placement::format_cpus(&cpus),
        executors.first().map_or("-", |e| e.driver.as_str()),
        config.max_conns,
        if config.retry_unanswered.is_some() {
            "on"
        } else {
            "off"
        }
    );
    announce_ready(&[local]);
    let mut reports = Vec::new();
    for ex in executors {
        reports.push(ex.join()??);
    }
    print_balancer_reports(&reports);
    Ok(())
}

fn print_listener_stats(role: &str, stats: &[ListenerStats]) {
    for s in stats {
        let addr = s.addr.map(|a| a.to_string()).unwrap_or_default();
        println!(
            "ringlab {role} {addr}: {} connections, {} responses ({} ok, {} not found, {} refused), {} head timeouts",
            s.connections,
            s.responses(),
            s.ok,
            s.not_found,
            s.refused,
            s.timed_out
        );
    }
}

fn print_balancer_reports(reports: &[BalancerReport]) {
    let mut total = BalancerReport::default();
    for r in reports {
        total.merge_backends(r);
        println!(
            "ringlab lb CPU {}: {} accepted, {} unserved (no backend up), {} reset by the idle or \
             half-closed timeout, {} replayed, {} refused as self-loops",
            r.cpu.map_or("-".into(), |c| c.to_string()),
            r.accepted,
            r.unserved,
            r.idle_closed,
            r.retried,
            r.self_loops
        );
    }
    let h = &total.http;
    if h.requests > 0 {
        println!(
            "ringlab lb http: {} requests, {} on pooled connections, {} on new ones, {} retried \
             on a fresh connection, {} refused (4xx/501), {} answered 502/503, {} answered 504",
            h.requests,
            h.pooled,
            h.connected,
            h.retried,
            h.refused,
            h.bad_gateway,
            h.gateway_timeout
        );
    }
    println!(
        "{:<22} {:>12} {:>9} {:>14} {:>14} {:>16} {:>11} {:>14} {:>13}",
        "backend",
        "connections",
        "requests",
        "bytes up",
        "bytes down",
        "connect failures",
        "unanswered",
        "backend resets",
        "client resets"
    );
    for b in &total.backends {
        println!(
            "{:<22} {:>12} {:>9} {:>14} {:>14} {:>16} {:>11} {:>14} {:>13}",
            b.addr.map(|a| a.to_string()).unwrap_or_default(),
            b.connections,
            b.requests,
            b.bytes_up,
            b.bytes_down,
            b.connect_failures,
            b.unanswered,
            b.backend_resets,
            b.client_resets
        );
    }
}
