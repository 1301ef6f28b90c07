//! What each subcommand does: turn parsed flags into listeners, placement and servers, print where
//! everything runs, wait for Ctrl-C/SIGTERM, and print the counters on the way out.

use std::io;

use crate::backend::{self, BackendConfig, ListenerStats};
use crate::balancer::{self, BalancerConfig, BalancerReport};
use crate::cli::{BackendArgs, BenchArgs, Command, HttpArgs, LbArgs, SweepArgs, ThreadedArgs};
use crate::client::{self, BenchConfig, Target};
use crate::health::HealthPolicy;
use crate::limits;
use crate::listen;
use crate::placement;
use crate::report;
use crate::results;
use crate::shutdown::{self, Shutdown};
use crate::sweep::{self, SweepConfig};
use crate::threaded;
use crate::topology::{NamedTarget, Placement, Ports};

/// Runs one subcommand to completion. Errors carry a one-line, user-facing message.
pub fn run(command: Command) -> io::Result<()> {
    limits::raise_nofile();
    let shutdown = Shutdown::new();
    shutdown::trip_on_signals(&shutdown)?;
    match command {
        Command::Backend(args) => run_backend(args, shutdown),
        Command::Lb(args) => run_lb(args, shutdown),
        Command::Threaded(args) => run_threaded(args, shutdown),
        Command::Bench(args) => run_bench(args, shutdown),
        Command::Sweep(args) => run_sweep(args, shutdown),
    }
}

fn run_bench(args: BenchArgs, shutdown: Shutdown) -> io::Result<()> {
    let target =
        Target::parse(&args.url).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let requests = args.requests.unwrap_or(if args.time_limit.is_some() {
        client::TIMED_REQUESTS
    } else {
        1000
    });
    let cpus = args
        .cpus
        .map_or_else(|| vec![placement::default_cpu(1)], |l| l.0);
    let result = client::run(BenchConfig {
        target,
        requests,
        concurrency: args.concurrency,
        keep_alive: args.keep_alive,
        time_limit: args.time_limit,
        timeout: args.timeout,
        cpus: cpus.into_iter().map(Some).collect(),
        stop: Some(shutdown),
    })?;
    print!("{}", report::render(&result, args.format));
    Ok(())
}

fn run_sweep(args: SweepArgs, shutdown: Shutdown) -> io::Result<()> {
    let allowed = placement::allowed_cpus();
    let mut place = Placement::default_for(&allowed);
    if let Some(c) = args.client_cpus {
        place.client = c.0.clone();
        place.lb_client = c.0;
    }
    if let Some(c) = args.lb_client_cpus {
        place.lb_client = c.0;
    }
    if let Some(c) = args.lb_cpus {
        place.lb = c.0;
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
        })
        .collect();
    let config = SweepConfig {
        requests: args.requests,
        concurrency: args.concurrency.0,
        repeat: args.repeat,
        keep_alive: args.keep_alive,
        targets,
        placement: place,
        ports: Ports::lab(),
        warmup: args.warmup,
        timeout: args.timeout,
        note: args.note,
        stop: shutdown,
    };
    let label = args
        .label
        .unwrap_or_else(|| if args.keep_alive { "lab-k" } else { "lab" }.into());
    // Fail on an unwritable output folder before spending minutes measuring.
    std::fs::create_dir_all(&args.out).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot create {}: {e}", args.out.display()),
        )
    })?;
    let sweep = sweep::run(&config)?;
    let dir = results::write(&sweep, &args.out.join(results::folder_name(&label)))?;
    print!("{}", results::summary_text(&sweep));
    println!("ringlab sweep: wrote {}", dir.display());
    Ok(())
}

fn http_config(args: &HttpArgs) -> BackendConfig {
    BackendConfig {
        max_head: args.max_head.max(64),
        head_timeout: args.head_timeout,
        drain_timeout: args.drain_timeout,
        max_conns: args
            .max_conns
            .unwrap_or_else(|| limits::default_max_conns(1)),
    }
}

fn run_backend(args: BackendArgs, shutdown: Shutdown) -> io::Result<()> {
    let cpu = args.cpu.unwrap_or_else(|| placement::default_cpu(0));
    let listeners = args
        .listen
        .iter()
        .map(|&addr| listen::bind_one(addr))
        .collect::<io::Result<Vec<_>>>()?;
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<io::Result<Vec<_>>>()?;
    let executor = backend::spawn(listeners, Some(cpu), http_config(&args.http), shutdown)?;
    println!(
        "ringlab backend: serving {} on CPU {cpu} (one glommio executor); Ctrl-C to stop",
        addrs.join(", ")
    );
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
    let stats = threaded::serve(listener, http_config(&args.http), shutdown)?;
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
    let listeners = listen::bind_shared(args.listen, cpus.len())?;
    let local = listeners[0].local_addr()?;
    let config = BalancerConfig {
        backends: args.backends.clone(),
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout,
        drain_timeout: args.drain_timeout,
        buffer_size: args.buffer_size.max(512),
        health: HealthPolicy {
            fail_threshold: args.fail_threshold.max(1),
            cooldown: args.cooldown,
        },
        health_interval: args.health_interval,
        retry_unanswered: args.retry_unanswered.then_some(args.retry_buffer),
        // Two descriptors per pair, and the executors share the process's limit.
        max_conns: args
            .max_conns
            .unwrap_or_else(|| limits::default_max_conns(2 * cpus.len() as u64)),
    };
    let placements: Vec<Option<usize>> = cpus.iter().copied().map(Some).collect();
    let executors = balancer::spawn(listeners, &placements, config.clone(), shutdown)?;
    let backends: Vec<String> = args.backends.iter().map(|a| a.to_string()).collect();
    println!(
        "ringlab lb: {local} -> [{}] round robin; {} executor(s) on CPU {}; up to {} connections \
         each; replay unanswered: {}; Ctrl-C to stop",
        backends.join(", "),
        cpus.len(),
        placement::format_cpus(&cpus),
        config.max_conns,
        if config.retry_unanswered.is_some() {
            "on"
        } else {
            "off"
        }
    );
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
            "ringlab lb CPU {}: {} accepted, {} unserved (no backend up), {} closed idle, {} replayed",
            r.cpu.map_or("-".into(), |c| c.to_string()),
            r.accepted,
            r.unserved,
            r.idle_closed,
            r.retried
        );
    }
    println!(
        "{:<22} {:>12} {:>14} {:>14} {:>16} {:>11}",
        "backend", "connections", "bytes up", "bytes down", "connect failures", "unanswered"
    );
    for b in &total.backends {
        println!(
            "{:<22} {:>12} {:>14} {:>14} {:>16} {:>11}",
            b.addr.map(|a| a.to_string()).unwrap_or_default(),
            b.connections,
            b.bytes_up,
            b.bytes_down,
            b.connect_failures,
            b.unanswered
        );
    }
}
