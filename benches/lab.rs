//! `cargo bench`: the end-to-end regression guard. Starts the lab in-process on free ports, with
//! the default placement, and measures balancer, direct and threaded at low and high concurrency
//! (new connection per request), repeated and interleaved; prints median req/s, p99 and the
//! balancer's ratio to each direct server. Ratios measured in the same run are what to compare
//! across commits: absolute numbers move with whatever else the machine is doing.
//!
//! Environment: RINGLAB_BENCH_REQUESTS (default 20000 per cell), RINGLAB_BENCH_REPEAT (3).

use std::time::Duration;

use ringlab::io::shutdown::Shutdown;
use ringlab::lab::sweep::{self, SweepConfig};
use ringlab::lab::topology::{Placement, Ports};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo test --all-targets` runs benches in test mode with `--bench` absent: stay quick then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let requests = if quick {
        500
    } else {
        env("RINGLAB_BENCH_REQUESTS", 20_000)
    };
    let repeat = if quick {
        1
    } else {
        env("RINGLAB_BENCH_REPEAT", 3) as usize
    };
    let placement = Placement::default_for(&ringlab::io::placement::allowed_cpus());
    let config = SweepConfig {
        requests,
        concurrency: vec![1, 5, 50],
        repeat,
        keep_alive: false,
        targets: Vec::new(),
        placement: placement.clone(),
        ports: Ports::ephemeral(),
        warmup: 1000,
        timeout: Duration::from_secs(10),
        note: None,
        stop: Shutdown::new(),
    };
    println!(
        "ringlab e2e bench: {requests} requests per cell, median of {repeat}; {}",
        placement.describe()
    );
    let sweep = sweep::run(&config).expect("sweep");
    println!(
        "{:>4} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9} {:>11} {:>13}",
        "c",
        "lb req/s",
        "direct",
        "threaded",
        "lb p99us",
        "dir p99",
        "thr p99",
        "lb/direct",
        "lb/threaded"
    );
    for &c in &sweep.concurrency {
        let get = |t: &str| sweep.cell(t, c).expect("cell").median_run().clone();
        let (lb, direct, threaded) = (get("lb"), get("direct"), get("threaded"));
        for r in [&lb, &direct, &threaded] {
            assert_eq!(
                r.failed.total(),
                0,
                "failed requests against {}",
                r.target.url()
            );
        }
        println!(
            "{c:>4} {:>10.0} {:>10.0} {:>10.0} {:>9} {:>9} {:>9} {:>10.2}x {:>12.2}x",
            lb.requests_per_sec(),
            direct.requests_per_sec(),
            threaded.requests_per_sec(),
            lb.latency_us.p99,
            direct.latency_us.p99,
            threaded.latency_us.p99,
            lb.requests_per_sec() / direct.requests_per_sec(),
            lb.requests_per_sec() / threaded.requests_per_sec(),
        );
    }
}
