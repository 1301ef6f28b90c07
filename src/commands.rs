//! What each subcommand does: turn parsed flags into listeners, placement and servers, print where
//! everything runs, wait for Ctrl-C/SIGTERM, and print the counters on the way out.

use std::io;

use crate::backend::{self, BackendConfig, ListenerStats};
use crate::balancer::{self, BalancerConfig, BalancerReport};
use crate::cli::{BackendArgs, Command, HttpArgs, LbArgs, ThreadedArgs};
use crate::listen;
use crate::placement;
use crate::shutdown::{self, Shutdown};
use crate::threaded;

/// Runs one subcommand to completion. Errors carry a one-line, user-facing message.
pub fn run(command: Command) -> io::Result<()> {
    let shutdown = Shutdown::new();
    shutdown::trip_on_signals(&shutdown)?;
    match command {
        Command::Backend(args) => run_backend(args, shutdown),
        Command::Lb(args) => run_lb(args, shutdown),
        Command::Threaded(args) => run_threaded(args, shutdown),
    }
}

fn http_config(args: &HttpArgs) -> BackendConfig {
    BackendConfig {
        max_head: args.max_head.max(64),
        head_timeout: args.head_timeout,
        drain_timeout: args.drain_timeout,
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
        "ringlab backend: serving {} on CPU {cpu} (one glommio executor, io_uring); Ctrl-C to stop",
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
    };
    let placements: Vec<Option<usize>> = cpus.iter().copied().map(Some).collect();
    let executors = balancer::spawn(listeners, &placements, config, shutdown)?;
    let backends: Vec<String> = args.backends.iter().map(|a| a.to_string()).collect();
    println!(
        "ringlab lb: {local} -> [{}] round robin; {} executor(s) on CPU {}; Ctrl-C to stop",
        backends.join(", "),
        cpus.len(),
        placement::format_cpus(&cpus)
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
            "ringlab lb CPU {}: {} accepted, {} unserved (no backend up), {} closed idle",
            r.cpu.map_or("-".into(), |c| c.to_string()),
            r.accepted,
            r.unserved,
            r.idle_closed
        );
    }
    println!(
        "{:<22} {:>12} {:>14} {:>14} {:>16}",
        "backend", "connections", "bytes up", "bytes down", "connect failures"
    );
    for b in &total.backends {
        println!(
            "{:<22} {:>12} {:>14} {:>14} {:>16}",
            b.addr.map(|a| a.to_string()).unwrap_or_default(),
            b.connections,
            b.bytes_up,
            b.bytes_down,
            b.connect_failures
        );
    }
}
