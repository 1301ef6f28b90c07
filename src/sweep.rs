//! The lab matrix: every (repetition × concurrency × target) cell measured with the built-in
//! client, targets interleaved so slow drift on a shared machine hits all of them alike, and the
//! median repetition kept per cell.

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use serde::Serialize;

use crate::client::{self, BenchConfig, BenchResult, Target};
use crate::machine::Machine;
use crate::shutdown::Shutdown;
use crate::topology::{Lab, NamedTarget, Placement, Ports};

/// What a sweep runs.
#[derive(Debug, Clone)]
pub struct SweepConfig {
    /// Requests per cell.
    pub requests: u64,
    /// Concurrency levels, in order.
    pub concurrency: Vec<usize>,
    /// Repetitions per cell; the median by req/s is kept.
    pub repeat: usize,
    /// Reuse connections (`-k`).
    pub keep_alive: bool,
    /// Addresses to measure; empty means start the lab in-process and measure it.
    pub targets: Vec<NamedTarget>,
    /// Core placement (of the client always; of the servers when the lab is started here).
    pub placement: Placement,
    /// Ports for the in-process lab.
    pub ports: Ports,
    /// Unrecorded requests sent to each target before its first cell, to warm caches and the
    /// kernel's socket paths.
    pub warmup: u64,
    /// Per-request timeout.
    pub timeout: Duration,
    /// How servers started elsewhere were placed, recorded with the results (`--note`).
    pub note: Option<String>,
    /// Tripped by Ctrl-C: the sweep stops after the current cell, stops the lab, writes nothing.
    pub stop: Shutdown,
}

/// One cell: a target at one concurrency, every repetition kept.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Target name.
    pub target: String,
    /// Concurrency level.
    pub concurrency: usize,
    /// Every repetition, in the order run.
    pub runs: Vec<BenchResult>,
    /// Index into `runs` of the median by req/s.
    pub median: usize,
}

impl Cell {
    /// The median repetition.
    pub fn median_run(&self) -> &BenchResult {
        &self.runs[self.median]
    }

    /// Lowest and highest req/s over the repetitions.
    pub fn spread(&self) -> (f64, f64) {
        let rates = self.runs.iter().map(BenchResult::requests_per_sec);
        let lo = rates.clone().fold(f64::INFINITY, f64::min);
        let hi = rates.fold(0.0, f64::max);
        (lo, hi)
    }
}

/// A finished sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    /// Where and with what it ran.
    pub machine: Machine,
    /// Which core ran what.
    pub placement: Placement,
    /// Whether the topology was started in-process (else the targets were given).
    pub started_lab: bool,
    /// The caller's note on how servers started elsewhere were placed.
    pub note: Option<String>,
    /// Requests per cell.
    pub requests: u64,
    /// Repetitions per cell.
    pub repeat: usize,
    /// Whether connections were reused.
    pub keep_alive: bool,
    /// The measured targets.
    pub targets: Vec<NamedTarget>,
    /// Concurrency levels.
    pub concurrency: Vec<usize>,
    /// Every cell.
    pub cells: Vec<Cell>,
}

impl Sweep {
    /// The cell for a target and concurrency.
    pub fn cell(&self, target: &str, concurrency: usize) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.target == target && c.concurrency == concurrency)
    }
}

/// Runs the sweep: starts the lab unless targets were given, measures, stops what it started.
pub fn run(config: &SweepConfig) -> io::Result<Sweep> {
    if config.concurrency.is_empty() || config.repeat == 0 || config.requests == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a sweep needs at least one concurrency level, one repetition and one request",
        ));
    }
    let machine = Machine::probe();
    let lab = if config.targets.is_empty() {
        Some(Lab::start(&config.ports, &config.placement).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{e}\n(to measure servers that are already running, pass them with --target NAME=HOST:PORT)"
                ),
            )
        })?)
    } else {
        None
    };
    let targets = match &lab {
        Some(lab) => lab.targets(&config.placement),
        None => config.targets.clone(),
    };
    eprintln!(
        "ringlab sweep: placement: {}",
        describe_placement(
            config.targets.is_empty(),
            &config.placement,
            config.note.as_deref()
        )
    );
    for t in &targets {
        eprintln!(
            "ringlab sweep: target {} = {} ({})",
            t.name, t.addr, t.description
        );
    }
    let progress = Progress::new(targets.len() * config.concurrency.len() * config.repeat);

    let bench = |target: &NamedTarget, requests: u64, concurrency: usize| {
        client::run(BenchConfig {
            target: Target::from_addr(target.addr),
            requests,
            concurrency,
            keep_alive: config.keep_alive,
            time_limit: None,
            timeout: config.timeout,
            cpus: target.client_cpus.iter().copied().map(Some).collect(),
            stop: None,
        })
        .map_err(|e| io::Error::new(e.kind(), format!("target {}: {e}", target.name)))
    };

    if config.warmup > 0 {
        for t in &targets {
            bench(t, config.warmup, 1)?;
        }
    }
    let mut runs: Vec<Vec<Vec<BenchResult>>> =
        vec![vec![Vec::new(); config.concurrency.len()]; targets.len()];
    for rep in 0..config.repeat {
        for (ci, &c) in config.concurrency.iter().enumerate() {
            for (ti, t) in targets.iter().enumerate() {
                if config.stop.is_triggered() {
                    progress.finish();
                    return Err(io::Error::new(
                        io::ErrorKind::Interrupted,
                        "sweep interrupted; the lab was stopped and no results were written",
                    ));
                }
                let r = bench(t, config.requests, c)?;
                progress.step(&format!(
                    "rep {}/{} c={c} {}: {:.0} req/s, {} failed",
                    rep + 1,
                    config.repeat,
                    t.name,
                    r.requests_per_sec(),
                    r.failed.total()
                ));
                runs[ti][ci].push(r);
            }
        }
    }
    progress.finish();
    if let Some(lab) = lab {
        lab.stop();
    }

    let mut cells = Vec::new();
    for (ti, t) in targets.iter().enumerate() {
        for (ci, &c) in config.concurrency.iter().enumerate() {
            let runs = std::mem::take(&mut runs[ti][ci]);
            let median = median_index(&runs);
            cells.push(Cell {
                target: t.name.clone(),
                concurrency: c,
                runs,
                median,
            });
        }
    }
    Ok(Sweep {
        machine,
        placement: config.placement.clone(),
        started_lab: config.targets.is_empty(),
        note: config.note.clone(),
        requests: config.requests,
        repeat: config.repeat,
        keep_alive: config.keep_alive,
        targets,
        concurrency: config.concurrency.clone(),
        cells,
    })
}

/// Where things ran: the whole placement when this sweep started the lab, else the client's CPUs
/// and the caller's note about the servers.
pub fn describe_placement(started_lab: bool, placement: &Placement, note: Option<&str>) -> String {
    if started_lab {
        return placement.describe();
    }
    format!(
        "client CPU {}; servers started elsewhere: {}",
        crate::placement::format_cpus(&placement.client),
        note.unwrap_or("placement not recorded (pass --note)")
    )
}

/// Index of the run with the median req/s (the lower middle for an even count).
fn median_index(runs: &[BenchResult]) -> usize {
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| {
        runs[a]
            .requests_per_sec()
            .total_cmp(&runs[b].requests_per_sec())
    });
    order[(order.len() - 1) / 2]
}

/// Progress on a terminal; silence when stderr is piped (scripts and CI logs stay clean).
struct Progress {
    total: usize,
    done: std::cell::Cell<usize>,
    tty: bool,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            done: std::cell::Cell::new(0),
            tty: io::stderr().is_terminal(),
        }
    }

    fn step(&self, what: &str) {
        self.done.set(self.done.get() + 1);
        if self.tty {
            let mut err = io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K[{}/{}] {what}", self.done.get(), self.total);
            let _ = err.flush();
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
