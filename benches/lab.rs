//! `cargo bench`: the end-to-end regression guard. Starts the lab in-process on free ports, once
//! per socket driver (io_uring and epoll, side by side), with the default placement, and measures
//! balancer, direct and threaded at low and high concurrency (new connection per request),
//! repeated and interleaved; prints median req/s, p99, the io_uring/epoll ratio of each server
//! and the balancer's ratio to the threaded server. Ratios measured in the same run are what to
//! compare across commits: absolute numbers move with whatever else the machine is doing.
//!
//! The whole sweep is written as a results folder (`target/ringlab-bench/<date>-bench/`, or under
//! RINGLAB_BENCH_OUT) and, with RINGLAB_BASELINE=FOLDER, ends with `ringlab diff` against that
//! committed baseline; RINGLAB_FAIL_BELOW=0.95 then fails the bench on a cell worse beyond noise
//! and below that ratio.
//!
//! Environment: RINGLAB_BENCH_REQUESTS (default 20000 per cell), RINGLAB_BENCH_REPEAT (3),
//! RINGLAB_BENCH_OUT, RINGLAB_BASELINE, RINGLAB_FAIL_BELOW.

use std::time::Duration;

use ringlab::io::driver::IoMode;
use ringlab::io::shutdown::Shutdown;
use ringlab::lab::sweep::{self, Sweep, SweepConfig};
use ringlab::lab::topology::{LabSetup, Placement, Ports};
use ringlab::lab::{diff, results};

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
        io: vec![IoMode::Uring, IoMode::Epoll],
        lab: LabSetup::default(),
        rates: None,
        target_pids: Vec::new(),
        hosts: None,
    };
    println!(
        "ringlab e2e bench: {requests} requests per cell, median of {repeat}; {}",
        placement.describe()
    );
    let sweep = sweep::run(&config).expect("sweep");
    println!(
        "{:>4} {:>9} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>9} {:>8} {:>8} {:>12}",
        "c",
        "lb uring",
        "lb epoll",
        "ratio",
        "http-lb",
        "http/tcp",
        "dir uring",
        "dir epoll",
        "ratio",
        "threaded",
        "lb p99us",
        "dir p99",
        "lb/threaded"
    );
    for &c in &sweep.concurrency {
        let get = |t: &str| sweep.cell(t, c).expect("cell").median_run().clone();
        let (lbu, lbe) = (get("lb-uring"), get("lb-epoll"));
        let http = get("lb-http-uring");
        let (du, de) = (get("direct-uring"), get("direct-epoll"));
        let threaded = get("threaded");
        for r in [&lbu, &lbe, &http, &du, &de, &threaded] {
            assert_eq!(
                r.failed.total(),
                0,
                "failed requests against {}",
                r.target.url()
            );
        }
        let rate = |r: &ringlab::lab::client::BenchResult| r.requests_per_sec();
        println!(
            "{c:>4} {:>9.0} {:>9.0} {:>6.2}x {:>9.0} {:>8.2}x {:>9.0} {:>9.0} {:>6.2}x {:>9.0} {:>8} {:>8} {:>11.2}x",
            rate(&lbu),
            rate(&lbe),
            rate(&lbu) / rate(&lbe),
            rate(&http),
            rate(&http) / rate(&lbu),
            rate(&du),
            rate(&de),
            rate(&du) / rate(&de),
            rate(&threaded),
            lbu.latency_us.p99,
            du.latency_us.p99,
            rate(&lbu) / rate(&threaded),
        );
    }
    if !quick {
        against_baseline(&sweep);
    }
}

/// Writes the sweep as a results folder and, given a baseline, diffs against it.
fn against_baseline(sweep: &Sweep) {
    let out = std::env::var("RINGLAB_BENCH_OUT").unwrap_or_else(|_| "target/ringlab-bench".into());
    let dir = std::path::Path::new(&out).join(results::folder_name("bench"));
    let written = results::write(sweep, &dir).expect("write the bench's results folder");
    println!("results: {}", written.display());
    let Ok(baseline) = std::env::var("RINGLAB_BASELINE") else {
        return;
    };
    let base = diff::load(std::path::Path::new(&baseline)).expect("read the baseline");
    let new = diff::load(&written).expect("read the results just written");
    let fail_below = std::env::var("RINGLAB_FAIL_BELOW")
        .ok()
        .and_then(|v| v.parse::<f64>().ok());
    let d = diff::compare(&base, &new);
    println!("\n{}", diff::markdown(&d, fail_below));
    if let Some(threshold) = fail_below {
        let failing = d.failing(threshold);
        assert!(
            failing.is_empty(),
            "{} cell(s) worse than the baseline beyond noise and below {threshold}x",
            failing.len()
        );
    }
}
