//! The lab matrix: every (repetition × concurrency × target) cell measured with the built-in
//! client, targets interleaved so slow drift on a shared machine hits all of them alike, and the
//! median repetition kept per cell. With offered rates (`--rates`), the matrix is open loop:
//! every (repetition × rate × target), or rates stepped up per target until it stops keeping up,
//! and each target's knee named.

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use serde::Serialize;

use crate::io::driver::IoMode;
use crate::io::shutdown::Shutdown;
use crate::lab::client::{self, BenchConfig, BenchResult, RequestSpec, Target};
use crate::lab::machine::Machine;
use crate::lab::pacer::Arrival;
use crate::lab::placed::{ClientCell, HostFacts, HostPlan, PlacedLab, RoleReport};
use crate::lab::topology::{Lab, LabSetup, NamedTarget, Placement, Ports};

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
    /// Socket drivers: the in-process lab is started once per driver (the first on the lab's
    /// ports, the others beside it on free ports) and their targets measured side by side. The
    /// client runs on the first.
    pub io: Vec<IoMode>,
    /// What else the in-process lab runs: balancer modes and policies, backend service times
    /// (its `io` is taken from `io` above, one lab per driver).
    pub lab: LabSetup,
    /// Tripped by Ctrl-C: the cell in flight is abandoned, the lab stopped, and what was measured
    /// until then is kept, marked interrupted.
    pub stop: Shutdown,
    /// Open loop: the offered rates to measure (`--rates`); `None` is the closed-loop matrix.
    pub rates: Option<RatePlan>,
    /// For targets started elsewhere: the processes serving each (`--target-pid`), whose CPU
    /// time per request each cell records.
    pub target_pids: Vec<(String, Vec<u32>)>,
    /// Run the lab as separate processes on these hosts (`--place`, `--netns`) instead of
    /// in-process.
    pub hosts: Option<HostPlan>,
}

/// Which offered rates an open-loop sweep measures.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rates {
    /// These, in order, for every target.
    List(Vec<f64>),
    /// From `start`, each step `factor` times the last, per target until it stops keeping up
    /// (or `max_steps`).
    Auto {
        /// The first rate.
        start: f64,
        /// The step.
        factor: f64,
        /// At most this many rates.
        max_steps: usize,
    },
}

/// An open-loop sweep's plan.
#[derive(Debug, Clone, Serialize)]
pub struct RatePlan {
    /// The rates.
    pub rates: Rates,
    /// How long each cell sends (its requests are rate × this).
    pub duration: Duration,
    /// The p99 a target must stay under to keep up (`--slo`); `None` judges by rate alone.
    pub slo: Option<Duration>,
    /// How intended send times are spaced.
    pub arrival: Arrival,
}

impl RatePlan {
    /// A cell keeps up when it achieved its offered rate within 2%, failed nothing, and (with an
    /// SLO) kept p99 under it.
    pub fn keeps_up(&self, r: &BenchResult) -> bool {
        let Some(ol) = &r.open_loop else {
            return false;
        };
        r.requests_per_sec() >= 0.98 * ol.offered_rate
            && r.failed.total() == 0
            && self
                .slo
                .is_none_or(|slo| r.latency_us.p99 as u128 <= slo.as_micros())
    }
}

/// One cell: a target at one concurrency, every repetition kept.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Target name.
    pub target: String,
    /// Concurrency level (with a rate: the most requests in flight).
    pub concurrency: usize,
    /// The offered rate of an open-loop cell.
    pub rate: Option<f64>,
    /// Every repetition, in the order run.
    pub runs: Vec<BenchResult>,
    /// Index into `runs` of the median: by req/s, or for an open-loop cell by p99 (its rate is
    /// the one offered).
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

/// How far a sweep got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "why")]
pub enum Status {
    /// Still measuring (what a `sweep.json` written between cells says).
    Running,
    /// Every cell measured.
    Complete,
    /// Stopped by Ctrl-C or SIGTERM; the cells measured until then are kept.
    Interrupted,
    /// A cell failed; the cells measured until then are kept.
    Failed(String),
}

/// A sweep, finished or in progress: the cells hold every repetition measured so far.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    /// Whether every cell was measured.
    pub status: Status,
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
    /// Every cell with at least one repetition, in the order first measured.
    pub cells: Vec<Cell>,
    /// Cells planned: targets × concurrency levels × repetitions.
    pub planned_runs: usize,
    /// The socket drivers, in order (the client ran on the first).
    pub io: Vec<IoMode>,
    /// How each driver was set up on this kernel, e.g. `uring: io_uring
    /// (SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG)`.
    pub drivers: Vec<String>,
    /// The open-loop plan, for a sweep over offered rates.
    pub rates: Option<RatePlan>,
    /// With the lab on hosts: where each role ran, in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub placed: Option<String>,
    /// With the lab on hosts: each host's own facts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostFacts>,
    /// With the lab on hosts: what each role printed, its counters last (filled when it
    /// stopped).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<RoleReport>,
}

impl Sweep {
    /// The closed-loop cell for a target and concurrency.
    pub fn cell(&self, target: &str, concurrency: usize) -> Option<&Cell> {
        self.cells
            .iter()
            .find(|c| c.target == target && c.concurrency == concurrency && c.rate.is_none())
    }

    /// A target's open-loop cells, by offered rate.
    pub fn rate_cells(&self, target: &str) -> Vec<&Cell> {
        let mut cells: Vec<&Cell> = self
            .cells
            .iter()
            .filter(|c| c.target == target && c.rate.is_some())
            .collect();
        cells.sort_by(|a, b| a.rate.unwrap_or(0.0).total_cmp(&b.rate.unwrap_or(0.0)));
        cells
    }

    /// A target's knee: the highest offered rate whose median run kept up (see
    /// [`RatePlan::keeps_up`]) with every lower rate keeping up too.
    pub fn knee(&self, target: &str) -> Option<&Cell> {
        let plan = self.rates.as_ref()?;
        self.rate_cells(target)
            .into_iter()
            .take_while(|c| plan.keeps_up(c.median_run()))
            .last()
    }

    /// Repetitions measured so far, over all cells.
    pub fn measured_runs(&self) -> usize {
        self.cells.iter().map(|c| c.runs.len()).sum()
    }

    /// Adds a repetition to its cell (creating the cell on its first one) and keeps the median.
    fn add(&mut self, target: &str, concurrency: usize, rate: Option<f64>, run: BenchResult) {
        let found = self
            .cells
            .iter_mut()
            .find(|c| c.target == target && c.concurrency == concurrency && c.rate == rate);
        let cell = match found {
            Some(cell) => cell,
            None => {
                self.cells.push(Cell {
                    target: target.to_string(),
                    concurrency,
                    rate,
                    runs: Vec::new(),
                    median: 0,
                });
                self.cells.last_mut().expect("just pushed")
            }
        };
        cell.runs.push(run);
        cell.median = if rate.is_some() {
            median_by(&cell.runs, |r| r.latency_us.p99 as f64)
        } else {
            median_by(&cell.runs, BenchResult::requests_per_sec)
        };
    }
}

/// Where a sweep's numbers go while it runs, so a run that is interrupted, fails, or cannot be
/// written at the end still keeps what it measured.
pub trait Record {
    /// Called once the lab is up, before the first cell: a failure here (an output folder that
    /// cannot be made) stops the sweep before anything is measured.
    fn started(&mut self, sweep: &Sweep) -> io::Result<()>;
    /// Called after every repetition with everything measured so far; best effort.
    fn measured(&mut self, sweep: &Sweep);
}

/// Records nothing (for callers that only want the returned [`Sweep`]).
pub struct Discard;

impl Record for Discard {
    fn started(&mut self, _: &Sweep) -> io::Result<()> {
        Ok(())
    }
    fn measured(&mut self, _: &Sweep) {}
}

/// Checks a sweep's flags before anything starts or touches the disk.
pub fn validate(config: &SweepConfig) -> io::Result<()> {
    if config.concurrency.is_empty()
        || config.repeat == 0
        || config.requests == 0
        || config.io.is_empty()
    {
        return Err(crate::cli::usage(
            "a sweep needs at least one concurrency level, one repetition and one request",
        ));
    }
    if config.hosts.is_some() && (config.io.len() > 1 || !config.targets.is_empty()) {
        return Err(crate::cli::usage(
            "--place and --netns start one lab on one socket driver: give one --io and no --target",
        ));
    }
    if let Some(plan) = &config.rates {
        let bad = match &plan.rates {
            Rates::List(list) => list.is_empty() || !list.iter().all(|r| r.is_finite() && *r > 0.0),
            Rates::Auto {
                start,
                factor,
                max_steps,
            } => {
                !(start.is_finite() && *start > 0.0 && factor.is_finite() && *factor > 1.0)
                    || *max_steps == 0
            }
        };
        if bad {
            return Err(crate::cli::usage(
                "--rates needs positive rates, e.g. 2k,4k,8k, or auto",
            ));
        }
        return Ok(());
    }
    if let Some(&c) = config
        .concurrency
        .iter()
        .find(|&&c| c as u64 > config.requests)
    {
        return Err(crate::cli::usage(format!(
            "concurrency {c} is more than the {} requests per cell; lower -c or raise -n",
            config.requests
        )));
    }
    Ok(())
}

/// Runs the sweep and returns it only if every cell was measured (an interrupted or failed
/// sweep is an error); [`run_recording`] keeps partial sweeps.
pub fn run(config: &SweepConfig) -> io::Result<Sweep> {
    let sweep = run_recording(config, &mut Discard)?;
    match &sweep.status {
        Status::Complete => Ok(sweep),
        Status::Interrupted => Err(io::Error::new(
            io::ErrorKind::Interrupted,
            "sweep interrupted",
        )),
        Status::Failed(why) => Err(io::Error::other(why.clone())),
        Status::Running => unreachable!("a returned sweep has ended"),
    }
}

/// Runs the sweep: starts the lab unless targets were given, measures every cell (handing each
/// result to `record` as it comes), stops what it started. Returns the sweep with its status:
/// a Ctrl-C or a failing cell ends it early, with the cells measured until then. Errors only when
/// nothing could be measured (flags, the lab, the recorder's start).
pub fn run_recording(config: &SweepConfig, record: &mut dyn Record) -> io::Result<Sweep> {
    validate(config)?;
    let machine = Machine::probe();
    let mut labs = Vec::new();
    let placed = match &config.hosts {
        Some(plan) => Some(PlacedLab::start(
            plan,
            &config.ports,
            &config.placement,
            &LabSetup {
                io: config.io[0],
                ..config.lab.clone()
            },
            &config.stop,
        )?),
        None => None,
    };
    if config.targets.is_empty() && placed.is_none() {
        for (i, &io) in config.io.iter().enumerate() {
            let ports = if i == 0 {
                config.ports.clone()
            } else {
                Ports::beside()
            };
            let setup = LabSetup {
                io,
                ..config.lab.clone()
            };
            labs.push(Lab::start(&ports, &config.placement, &setup).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{e}\n(to measure servers that are already running, pass them with --target NAME=HOST:PORT)"
                    ),
                )
            })?);
        }
    }
    let targets = match &placed {
        Some(p) => p.targets(),
        None if labs.is_empty() => config.targets.clone(),
        None => interleave(&labs, &config.placement),
    };
    let drivers = match &placed {
        Some(p) => vec![format!("{}: {}", config.io[0], p.driver)],
        None => driver_descriptions(&labs, config.io[0])?,
    };
    let placed_text = placed.as_ref().map(|p| p.describe(&config.placement));
    eprintln!(
        "ringlab sweep: placement: {}",
        placed_text.clone().unwrap_or_else(|| describe_placement(
            config.targets.is_empty(),
            &config.placement,
            config.note.as_deref()
        ))
    );
    for t in &targets {
        eprintln!(
            "ringlab sweep: target {} = {} ({})",
            t.name, t.addr, t.description
        );
    }
    let planned = match config.rates.as_ref().map(|p| &p.rates) {
        None => targets.len() * config.concurrency.len() * config.repeat,
        Some(Rates::List(rates)) => targets.len() * rates.len() * config.repeat,
        Some(Rates::Auto { max_steps, .. }) => targets.len() * max_steps * config.repeat,
    };
    let mut sweep = Sweep {
        status: Status::Running,
        machine,
        placement: config.placement.clone(),
        started_lab: config.targets.is_empty(),
        note: config.note.clone(),
        requests: config.requests,
        repeat: config.repeat,
        keep_alive: config.keep_alive,
        targets: targets.clone(),
        concurrency: config.concurrency.clone(),
        cells: Vec::new(),
        planned_runs: planned,
        io: config.io.clone(),
        drivers,
        rates: config.rates.clone(),
        placed: placed_text,
        hosts: placed.as_ref().map(|p| p.hosts.clone()).unwrap_or_default(),
        roles: Vec::new(),
    };
    record.started(&sweep)?;
    let progress = Progress::new(planned);
    let in_process = !labs.is_empty();
    let bench = |target: &NamedTarget, requests: u64, concurrency: usize, rate: Option<f64>| {
        let plan = config.rates.as_ref();
        let cpu_before = crate::io::placement::process_cpu();
        let placed_pids = placed.as_ref().map(|p| p.pids(&target.name));
        let pids = match &placed_pids {
            Some(pids) => Some(pids.as_slice()).filter(|p| !p.is_empty()),
            None => config
                .target_pids
                .iter()
                .find(|(name, _)| *name == target.name)
                .map(|(_, pids)| pids.as_slice()),
        };
        let pids_before = pids.map(processes_cpu);
        let measured = match &placed {
            Some(p) => p.bench(
                target,
                ClientCell {
                    requests,
                    concurrency,
                    rate,
                    arrival: plan.map_or(Arrival::Fixed, |p| p.arrival),
                    time_limit: rate.and(plan.map(|p| p.duration)),
                    keep_alive: config.keep_alive,
                    timeout: config.timeout,
                },
                &config.stop,
            ),
            None => client::run(BenchConfig {
                target: Target::from_addr(target.addr),
                request: RequestSpec::default(),
                rate,
                arrival: plan.map_or(Arrival::Fixed, |p| p.arrival),
                requests,
                concurrency,
                keep_alive: config.keep_alive,
                // An open-loop cell sends for its duration; past the knee the backlog it could not
                // send is dropped (as wrk2 does), so an overloaded cell still ends on time.
                time_limit: rate.and(plan.map(|p| p.duration)),
                timeout: config.timeout,
                cpus: target.client_cpus.iter().copied().map(Some).collect(),
                io: config.io[0],
                stop: Some(config.stop.clone()),
            }),
        };
        let cpu = (crate::io::placement::process_cpu() - cpu_before).as_secs_f64();
        measured
            .map(|mut r| {
                // The lab runs in this process: all its CPU but the client's is the servers'
                // (the other targets idle meanwhile).
                if let (Some(pids), Some(before)) = (pids, pids_before) {
                    let servers = cpu_between(before, processes_cpu(pids));
                    r.server_cpu_us_per_request = Some(servers * 1e6 / r.complete.max(1) as f64);
                } else if in_process && r.complete > 0 {
                    let servers = (cpu - r.client_cpu_secs).max(0.0);
                    r.server_cpu_us_per_request = Some(servers * 1e6 / r.complete as f64);
                }
                r
            })
            .map_err(|e| io::Error::new(e.kind(), format!("target {}: {e}", target.name)))
    };
    sweep.status = match (warm_up(config, &targets, &bench), &config.rates) {
        (Err(status), _) => status,
        (Ok(()), None) => measure(config, &targets, &mut sweep, record, &progress, &bench),
        (Ok(()), Some(plan)) => measure_rates(
            config, plan, &targets, &mut sweep, record, &progress, &bench,
        ),
    };
    progress.finish();
    for lab in labs {
        lab.stop();
    }
    if let Some(p) = placed {
        sweep.roles = p.stop();
        for r in &sweep.roles {
            eprintln!(
                "ringlab sweep: stopped {} on {}: {}",
                r.name, r.host, r.ended
            );
        }
    }
    Ok(sweep)
}

/// The labs' targets, role by role (every driver's balancer, then every driver's direct
/// server, then the threaded server), so a driver's cells sit beside the other's.
fn interleave(labs: &[Lab], placement: &Placement) -> Vec<NamedTarget> {
    let suffix = labs.len() > 1;
    let per_lab: Vec<Vec<NamedTarget>> =
        labs.iter().map(|l| l.targets(placement, suffix)).collect();
    let roles = per_lab.iter().map(Vec::len).max().unwrap_or(0);
    (0..roles)
        .flat_map(|role| per_lab.iter().filter_map(move |t| t.get(role).cloned()))
        .collect()
}

/// How each driver was set up: read off the labs' executors, or (measuring `--target`s, where
/// only the client runs here) off a probe executor with the client's driver.
fn driver_descriptions(labs: &[Lab], client: IoMode) -> io::Result<Vec<String>> {
    if !labs.is_empty() {
        return Ok(labs
            .iter()
            .map(|l| format!("{}: {}", l.io, l.driver))
            .collect());
    }
    let probe = crate::io::placement::spawn_pinned("io-probe", None, client, || async {})?;
    let described = format!("{client}: {} (the client)", probe.driver);
    probe.join()?;
    Ok(vec![described])
}

/// The matrix itself (after the warm-up): every repetition of every cell, targets interleaved.
fn measure(
    config: &SweepConfig,
    targets: &[NamedTarget],
    sweep: &mut Sweep,
    record: &mut dyn Record,
    progress: &Progress,
    bench: &Bench,
) -> Status {
    for rep in 0..config.repeat {
        for &c in &config.concurrency {
            for t in targets {
                if config.stop.is_triggered() {
                    return Status::Interrupted;
                }
                let r = match ended(bench(t, config.requests, c, None)) {
                    Ok(r) => r,
                    Err(status) => return status,
                };
                progress.step(&format!(
                    "rep {}/{} c={c} {}: {:.0} req/s, {} failed",
                    rep + 1,
                    config.repeat,
                    t.name,
                    r.requests_per_sec(),
                    r.failed.total()
                ));
                sweep.add(&t.name, c, None, r);
                record.measured(sweep);
            }
        }
    }
    Status::Complete
}

/// What measures one cell: target, requests, concurrency, offered rate.
type Bench<'a> = dyn Fn(&NamedTarget, u64, usize, Option<f64>) -> io::Result<BenchResult> + 'a;

/// A run cut short by Ctrl-C is not a measurement of the cell: it is dropped.
fn ended(r: io::Result<BenchResult>) -> Result<BenchResult, Status> {
    match r {
        Ok(r) if r.interrupted => Err(Status::Interrupted),
        Ok(r) => Ok(r),
        Err(e) => Err(Status::Failed(e.to_string())),
    }
}

/// Unrecorded requests to each target before its first cell.
fn warm_up(config: &SweepConfig, targets: &[NamedTarget], bench: &Bench) -> Result<(), Status> {
    if config.warmup > 0 {
        for t in targets {
            ended(bench(t, config.warmup, 1, None))?;
        }
    }
    Ok(())
}

/// The open-loop matrix: each rate for every target still keeping up, repetitions outermost
/// within a rate and targets interleaved. Listed rates are all measured; `auto` steps up until
/// no target keeps up, then halves the gap between each target's knee and the first rate it
/// missed, [`REFINE`] times, so the knee is not only bounded by a 1.5× step.
fn measure_rates(
    config: &SweepConfig,
    plan: &RatePlan,
    targets: &[NamedTarget],
    sweep: &mut Sweep,
    record: &mut dyn Record,
    progress: &Progress,
    bench: &Bench,
) -> Status {
    let (rates, auto) = match &plan.rates {
        Rates::List(list) => (list.clone(), false),
        Rates::Auto {
            start,
            factor,
            max_steps,
        } => (
            (0..*max_steps)
                .map(|k| (start * factor.powi(k as i32)).round())
                .collect(),
            true,
        ),
    };
    let mut cell = |t: &NamedTarget, rate: f64, rep: usize, sweep: &mut Sweep| {
        measure_rate_cell(config, plan, t, rate, rep, sweep, record, progress, bench)
    };
    let mut active: Vec<&NamedTarget> = targets.iter().collect();
    for rate in rates {
        for rep in 0..config.repeat {
            for t in &active {
                if let Err(status) = cell(t, rate, rep, sweep) {
                    return status;
                }
            }
        }
        if auto {
            active.retain(|t| {
                sweep
                    .rate_cells(&t.name)
                    .last()
                    .is_some_and(|cell| plan.keeps_up(cell.median_run()))
            });
            sweep.planned_runs = sweep.measured_runs()
                + (active.len() * sweep_steps_left(&plan.rates, rate) + targets.len() * REFINE)
                    * config.repeat;
            if active.is_empty() {
                break;
            }
        }
    }
    if !auto {
        return Status::Complete;
    }
    for _ in 0..REFINE {
        // Per target: halfway between its knee and the first rate it missed.
        let between: Vec<(&NamedTarget, f64)> = targets
            .iter()
            .filter_map(|t| {
                let knee = sweep.knee(&t.name)?.rate?;
                let missed = sweep
                    .rate_cells(&t.name)
                    .into_iter()
                    .find(|c| c.rate.is_some_and(|r| r > knee))?
                    .rate?;
                let mid = ((knee + missed) / 2.0).round();
                (mid > knee && mid < missed).then_some((t, mid))
            })
            .collect();
        for rep in 0..config.repeat {
            for &(t, rate) in &between {
                if let Err(status) = cell(t, rate, rep, sweep) {
                    return status;
                }
            }
        }
    }
    sweep.planned_runs = sweep.measured_runs();
    Status::Complete
}

/// How many times `auto` halves the gap around each knee.
const REFINE: usize = 2;

/// One repetition of one open-loop cell: the target at `rate` for the plan's duration.
#[allow(clippy::too_many_arguments)]
fn measure_rate_cell(
    config: &SweepConfig,
    plan: &RatePlan,
    t: &NamedTarget,
    rate: f64,
    rep: usize,
    sweep: &mut Sweep,
    record: &mut dyn Record,
    progress: &Progress,
    bench: &Bench,
) -> Result<(), Status> {
    if config.stop.is_triggered() {
        return Err(Status::Interrupted);
    }
    // The most in flight: the largest concurrency asked for.
    let c = config.concurrency.iter().copied().max().unwrap_or(1);
    let requests = (rate * plan.duration.as_secs_f64()).ceil().max(1.0) as u64;
    let r = ended(bench(t, requests, c.min(requests as usize), Some(rate)))?;
    progress.step(&format!(
        "rep {}/{} {rate:.0} req/s {}: achieved {:.0}, p99 {} us, {} failed",
        rep + 1,
        config.repeat,
        t.name,
        r.requests_per_sec(),
        r.latency_us.p99,
        r.failed.total()
    ));
    sweep.add(&t.name, c.min(requests as usize), Some(rate), r);
    record.measured(sweep);
    Ok(())
}

/// Steps an `auto` plan has left after `rate`.
fn sweep_steps_left(rates: &Rates, rate: f64) -> usize {
    match rates {
        Rates::Auto {
            start,
            factor,
            max_steps,
        } => {
            let done = ((rate / start).ln() / factor.ln()).round() as usize + 1;
            max_steps.saturating_sub(done)
        }
        Rates::List(_) => 0,
    }
}

/// Where things ran: the whole placement when this sweep started the lab, else the client's CPUs
/// and the caller's note about the servers.
pub fn describe_placement(started_lab: bool, placement: &Placement, note: Option<&str>) -> String {
    if started_lab {
        return placement.describe();
    }
    format!(
        "client CPU {}; servers started elsewhere: {}",
        crate::io::placement::format_cpus(&placement.client),
        note.unwrap_or("placement not recorded (pass --note)")
    )
}

/// CPU the processes `pids` have used, two ways: (clock ticks from `/proc/PID/stat`, which
/// include threads that have exited but count in 10 ms steps; nanoseconds summed over the live
/// threads' `/proc/PID/task/TID/schedstat`), in seconds. A process that is gone counts as none.
fn processes_cpu(pids: &[u32]) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ticks = 0.0;
    let mut ns = 0.0;
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command name (which may hold spaces) start after the last ')'.
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                ticks += field(11) + field(12);
            }
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Ok(sched) = std::fs::read_to_string(task.path().join("schedstat")) {
                ns += sched
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
    }
    (ticks / hz, ns / 1e9)
}

/// The CPU used between two [`processes_cpu`] readings: the tick count once it is coarse no
/// more (200 ms and up: it also holds threads that exited, as a thread-per-connection server's
/// do), else the live threads' nanoseconds.
fn cpu_between(before: (f64, f64), after: (f64, f64)) -> f64 {
    let ticks = after.0 - before.0;
    if ticks >= 0.2 {
        ticks
    } else {
        (after.1 - before.1).max(0.0)
    }
}

/// Index of the run with the median `key` (the lower middle for an even count).
fn median_by(runs: &[BenchResult], key: impl Fn(&BenchResult) -> f64) -> usize {
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| key(&runs[a]).total_cmp(&key(&runs[b])));
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
