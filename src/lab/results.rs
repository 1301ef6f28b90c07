//! Writing a sweep into its results folder: `README.md` (machine, placement, the lab's tables,
//! percentiles, backend spread, a cross-target summary), `sweep.json` (every number of every
//! repetition) and `chart.svg`.

use std::fmt::Write;
use std::io;
use std::path::{Path, PathBuf};

use crate::lab::chart::{self, Panel, Series};
use crate::lab::curves;
use crate::lab::report;
use crate::lab::sweep::{Status, Sweep};

/// The folder name for a sweep started now: `<UTC date-time>-<label>`.
pub fn folder_name(label: &str) -> String {
    let label: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{}-{label}", crate::lab::machine::utc_now_compact())
}

/// Creates a results folder (and its parents), with a message that names it on failure.
pub fn create(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))
}

/// Writes `README.md`, `sweep.json` and `chart.svg` into `dir` (created if needed).
pub fn write(sweep: &Sweep, dir: &Path) -> io::Result<PathBuf> {
    create(dir)?;
    let named = |name: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot write {}: {e}", dir.join(name).display()),
        )
    };
    write_json(sweep, dir)?;
    for r in &sweep.roles {
        let name = role_log(r);
        let path = dir.join(&name);
        if let Some(parent) = path.parent() {
            create(parent)?;
        }
        let text = format!("$ {}\n{}({})\n", r.command, r.output, r.ended);
        std::fs::write(&path, text).map_err(|e| named(&name, e))?;
    }
    if sweep.rates.is_some() {
        for (name, text) in curves::files(sweep) {
            let path = dir.join(&name);
            if let Some(parent) = path.parent() {
                create(parent)?;
            }
            std::fs::write(&path, text).map_err(|e| named(&name, e))?;
        }
        return Ok(dir.to_path_buf());
    }
    std::fs::write(dir.join("README.md"), markdown(sweep)).map_err(|e| named("README.md", e))?;
    std::fs::write(dir.join("chart.svg"), svg(sweep)).map_err(|e| named("chart.svg", e))?;
    Ok(dir.to_path_buf())
}

/// Writes `sweep.json` alone (between cells, so a sweep that ends badly keeps its numbers). It
/// goes to a temporary name first and is renamed over the old one, so a reader never sees half
/// a file.
pub fn write_json(sweep: &Sweep, dir: &Path) -> io::Result<()> {
    let mut json =
        serde_json::to_string_pretty(&JsonSweep::new(sweep)).map_err(io::Error::other)?;
    json.push('\n');
    let tmp = dir.join(".sweep.json.tmp");
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, dir.join("sweep.json")))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot write {}: {e}", dir.join("sweep.json").display()),
            )
        })
}

/// `sweep.json`: the sweep plus, per run, the derived rates a reader would otherwise recompute.
#[derive(serde::Serialize)]
struct JsonSweep<'a> {
    #[serde(flatten)]
    sweep: &'a Sweep,
    derived: Vec<JsonCell<'a>>,
    /// Open loop: each target's knee (the highest offered rate it kept up with), if any.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    knees: Vec<(String, Option<f64>)>,
}

#[derive(serde::Serialize)]
struct JsonCell<'a> {
    target: &'a str,
    concurrency: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    offered_rate: Option<f64>,
    median_requests_per_sec: f64,
    min_requests_per_sec: f64,
    max_requests_per_sec: f64,
    runs: Vec<report::JsonReport<'a>>,
}

impl<'a> JsonSweep<'a> {
    fn new(sweep: &'a Sweep) -> JsonSweep<'a> {
        let derived = sweep
            .cells
            .iter()
            .map(|c| {
                let (lo, hi) = c.spread();
                JsonCell {
                    target: &c.target,
                    concurrency: c.concurrency,
                    offered_rate: c.rate,
                    median_requests_per_sec: c.median_run().requests_per_sec(),
                    min_requests_per_sec: lo,
                    max_requests_per_sec: hi,
                    runs: c.runs.iter().map(report::JsonReport::new).collect(),
                }
            })
            .collect();
        let knees = match sweep.rates {
            Some(_) => sweep
                .targets
                .iter()
                .map(|t| (t.name.clone(), sweep.knee(&t.name).and_then(|c| c.rate)))
                .collect(),
            None => Vec::new(),
        };
        JsonSweep {
            sweep,
            derived,
            knees,
        }
    }
}

fn markdown(s: &Sweep) -> String {
    let mut o = String::new();
    let matrix = format!(
        "{} requests × concurrency {} × {} repetitions (targets interleaved; the median repetition by req/s is reported), {}",
        s.requests,
        list(&s.concurrency),
        s.repeat,
        if s.keep_alive {
            "keep-alive (`-k`)"
        } else {
            "a new connection per request"
        }
    );
    header(&mut o, s, &matrix);
    summary(&mut o, s);
    closed_loop_body(&mut o, s);
    o
}

/// The title, the partial-run banner and the table of facts every results `README.md` opens
/// with; `matrix` says what was measured.
pub(crate) fn header(o: &mut String, s: &Sweep, matrix: &str) {
    let m = &s.machine;
    let _ = writeln!(o, "# ringlab sweep, {}\n", m.started_utc);
    match &s.status {
        Status::Complete => {}
        Status::Running => {
            let _ = writeln!(o, "**Partial: still running when this was written.**\n");
        }
        Status::Interrupted => {
            let _ = writeln!(
                o,
                "**Partial: interrupted (Ctrl-C or SIGTERM) after {} of {} runs; the tables \
                 show the cells measured until then.**\n",
                s.measured_runs(),
                s.planned_runs
            );
        }
        Status::Failed(why) => {
            let _ = writeln!(
                o,
                "**Partial: failed after {} of {} runs ({why}); the tables show the cells \
                 measured until then.**\n",
                s.measured_runs(),
                s.planned_runs
            );
        }
    }
    let _ = writeln!(o, "| | |\n| --- | --- |");
    let _ = writeln!(o, "| Started (UTC) | {} |", m.started_utc);
    let _ = writeln!(
        o,
        "| Machine | {}, {} CPUs online (this process may use {}), host `{}` |",
        m.cpu_model, m.cpus_online, m.cpus_allowed, m.hostname
    );
    let _ = writeln!(o, "| Kernel | {} |", m.kernel);
    let _ = writeln!(
        o,
        "| ringlab | {} (git {}) |",
        m.ringlab_version, m.git_revision
    );
    let _ = writeln!(
        o,
        "| Placement | {} |",
        s.placed
            .clone()
            .unwrap_or_else(|| crate::lab::sweep::describe_placement(
                s.started_lab,
                &s.placement,
                s.note.as_deref()
            ))
    );
    let _ = writeln!(
        o,
        "| Socket drivers | {} (the client on {}) |",
        s.drivers.join("; "),
        s.io.first().map_or("-".to_string(), |io| io.to_string())
    );
    let _ = writeln!(
        o,
        "| Topology | {} |",
        if s.placed.is_some() {
            "started by the sweep, each role a process of its own on its host (below)"
        } else if s.started_lab {
            "started in-process by the sweep"
        } else {
            "given with --target (started elsewhere)"
        }
    );
    let _ = writeln!(o, "| Matrix | {matrix} |");
    let _ = writeln!(o, "| Command | `{}` |\n", m.command);
    hosts(o, s);
}

/// The hosts of a lab placed on several (each one's own facts) and the roles' stop reports.
fn hosts(o: &mut String, s: &Sweep) {
    if s.hosts.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "## Hosts
"
    );
    let _ = writeln!(
        o,
        "| Host | Roles | Address | CPU | CPUs | Kernel | ringlab |\n| --- | --- | --- | --- | ---: | --- | --- |"
    );
    for h in &s.hosts {
        let roles: Vec<String> = h.roles.iter().map(ToString::to_string).collect();
        let m = &h.machine;
        let _ = writeln!(
            o,
            "| `{}` | {} | {} | {} | {} | {} | {} (git {}) |",
            h.host,
            roles.join(", "),
            h.address,
            m.cpu_model,
            m.cpus_online,
            m.kernel,
            m.ringlab_version,
            m.git_revision
        );
    }
    if !s.roles.is_empty() {
        let files: Vec<String> = s
            .roles
            .iter()
            .map(|r| format!("[{}]({})", r.name, role_log(r)))
            .collect();
        let _ = writeln!(
            o,
            "\nWhat each role printed, its counters last (stopped by closing its standard input): \
             {}.",
            files.join(", ")
        );
    }
    o.push('\n');
}

/// The file a role's output goes to, inside the results folder.
pub fn role_log(r: &crate::lab::placed::RoleReport) -> String {
    let host: String = r
        .host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("roles/{}-{host}.log", r.name)
}

/// The part of `README.md` after the header, for a closed-loop sweep.
fn closed_loop_body(o: &mut String, s: &Sweep) {
    let _ = writeln!(
        o,
        "![req/s and p99 latency against concurrency](chart.svg)\n"
    );

    for t in &s.targets {
        let _ = writeln!(o, "### PORT {} ({})\n", t.addr.port(), t.name);
        let _ = writeln!(o, "{} at `{}`.\n", t.description, t.addr);
        o.push_str(&report::lab_header());
        for (i, &c) in s.concurrency.iter().enumerate() {
            if let Some(cell) = s.cell(&t.name, c) {
                o.push_str(&report::lab_row(i + 1, cell.median_run()));
                o.push('\n');
            }
        }
        let _ = writeln!(
            o,
            "\nLatency of the median run (µs, HdrHistogram), the spread of req/s over the repetitions, and the servers' CPU time per request in the median run (every thread of the in-process lab but the client's: through a balancer, the balancer and its backends together):\n"
        );
        let _ = writeln!(
            o,
            "| Concurrency | p50 | p90 | p99 | p99.9 | max | req/s min | req/s median | req/s max | server CPU µs/request |"
        );
        let _ = writeln!(
            o,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for &c in &s.concurrency {
            if let Some(cell) = s.cell(&t.name, c) {
                let r = cell.median_run();
                let l = &r.latency_us;
                let (lo, hi) = cell.spread();
                let _ = writeln!(
                    o,
                    "| {c} | {} | {} | {} | {} | {} | {lo:.0} | {:.0} | {hi:.0} | {} |",
                    l.p50,
                    l.p90,
                    l.p99,
                    l.p999,
                    l.max,
                    r.requests_per_sec(),
                    cpu_per_request(r)
                );
            }
        }
        backend_spread(o, s, &t.name);
        client_shares(o, s, &t.name);
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "`sweep.json` holds every number of every repetition; `chart.svg` is drawn from the medians."
    );
}

/// The summary table alone, for the terminal.
pub fn summary_text(s: &Sweep) -> String {
    let mut o = String::new();
    if s.rates.is_some() {
        curves::summary(&mut o, s);
    } else {
        summary(&mut o, s);
    }
    o
}

fn summary(o: &mut String, s: &Sweep) {
    let _ = writeln!(
        o,
        "## Summary: requests per second (median of {}; min–max over the repetitions)\n",
        s.repeat
    );
    let names: Vec<&str> = s.targets.iter().map(|t| t.name.as_str()).collect();
    let mut header = String::from("| Concurrency |");
    let mut align = String::from("| ---: |");
    for n in &names {
        let _ = write!(header, " {n} |");
        align.push_str(" ---: |");
    }
    // The first target (the balancer, in the lab) against each of the others.
    for n in names.iter().skip(1) {
        let _ = write!(header, " {} / {n} |", names[0]);
        align.push_str(" ---: |");
    }
    let _ = writeln!(o, "{header}\n{align}");
    for &c in &s.concurrency {
        let mut row = format!("| {c} |");
        let medians: Vec<Option<f64>> = names
            .iter()
            .map(|n| {
                s.cell(n, c)
                    .map(|cell| cell.median_run().requests_per_sec())
            })
            .collect();
        for n in &names {
            match s.cell(n, c) {
                Some(cell) => {
                    let (lo, hi) = cell.spread();
                    let _ = write!(
                        row,
                        " {:.0} ({lo:.0}–{hi:.0}) |",
                        cell.median_run().requests_per_sec()
                    );
                }
                None => row.push_str(" – |"),
            }
        }
        for m in medians.iter().skip(1) {
            match (medians[0], m) {
                (Some(a), Some(b)) if *b > 0.0 => {
                    let _ = write!(row, " {:.2}× |", a / b);
                }
                _ => row.push_str(" – |"),
            }
        }
        let _ = writeln!(o, "{row}");
    }
    o.push('\n');
    drivers_side_by_side(o, s);
}

/// With several socket drivers, each server's req/s on the first driver against the others,
/// per concurrency (`lb-uring / lb-epoll`, …).
fn drivers_side_by_side(o: &mut String, s: &Sweep) {
    let Some((first, others)) = s.io.split_first() else {
        return;
    };
    if others.is_empty() {
        return;
    }
    let pairs: Vec<(String, String)> = ["lb", "direct"]
        .iter()
        .flat_map(|role| {
            others
                .iter()
                .map(move |other| (format!("{role}-{first}"), format!("{role}-{other}")))
        })
        .filter(|(a, b)| {
            s.targets.iter().any(|t| &t.name == a) && s.targets.iter().any(|t| &t.name == b)
        })
        .collect();
    let _ = writeln!(o, "## Socket drivers side by side: req/s ratio (medians)\n");
    let mut header = String::from("| Concurrency |");
    for (a, b) in &pairs {
        let _ = write!(header, " {a} / {b} |");
    }
    let _ = writeln!(o, "{header}\n| ---: |{}", " ---: |".repeat(pairs.len()));
    for &c in &s.concurrency {
        let mut row = format!("| {c} |");
        for (a, b) in &pairs {
            let rate = |t: &str| {
                s.cell(t, c)
                    .map(|cell| cell.median_run().requests_per_sec())
            };
            match (rate(a), rate(b)) {
                (Some(x), Some(y)) if y > 0.0 => {
                    let _ = write!(row, " {:.2}× |", x / y);
                }
                _ => row.push_str(" – |"),
            }
        }
        let _ = writeln!(o, "{row}");
    }
    o.push('\n');
}

/// With clients on several hosts: what each carried in the median run.
fn client_shares(o: &mut String, s: &Sweep, target: &str) {
    let cells: Vec<_> = s
        .concurrency
        .iter()
        .filter_map(|&c| s.cell(target, c))
        .filter(|cell| !cell.median_run().clients.is_empty())
        .collect();
    if cells.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "\nEach client host's part of the median run (they started together; the tables above \
         merge their histograms exactly):\n"
    );
    let _ = writeln!(
        o,
        "| Concurrency | client host: concurrency, complete, req/s, p99 µs | farthest from its share of req/s (its share of -c) |\n| ---: | --- | ---: |"
    );
    for cell in cells {
        let parts = &cell.median_run().clients;
        let text: Vec<String> = parts
            .iter()
            .map(|p| {
                let p99 = crate::lab::hgrm::decode(&p.latency_histogram)
                    .map_or(0, |h| h.value_at_quantile(0.99));
                format!(
                    "`{}`: c={}, {}, {:.0}, {p99}",
                    p.host,
                    p.concurrency,
                    p.complete,
                    p.requests_per_sec()
                )
            })
            .collect();
        let _ = writeln!(
            o,
            "| {} | {} | {:+.1}% |",
            cell.concurrency,
            text.join("; "),
            100.0 * crate::lab::placed::share_deviation(parts)
        );
    }
}

fn backend_spread(o: &mut String, s: &Sweep, target: &str) {
    let mut servers: Vec<String> = s
        .cells
        .iter()
        .filter(|c| c.target == target)
        .flat_map(|c| c.median_run().backends.iter().map(|b| b.0.clone()))
        .collect();
    servers.sort();
    servers.dedup();
    if servers.len() < 2 {
        return;
    }
    let _ = writeln!(
        o,
        "\nResponses per backend (`Server` header) in the median run:\n"
    );
    let _ = writeln!(o, "| Concurrency | {} |", servers.join(" | "));
    let _ = writeln!(o, "| ---: |{}", " ---: |".repeat(servers.len()));
    for &c in &s.concurrency {
        if let Some(cell) = s.cell(target, c) {
            let counts: Vec<String> = servers
                .iter()
                .map(|name| {
                    let b = &cell.median_run().backends;
                    b.iter()
                        .find(|(n, _)| n == name)
                        .map_or("0".into(), |(_, n)| n.to_string())
                })
                .collect();
            let _ = writeln!(o, "| {c} | {} |", counts.join(" | "));
        }
    }
}

fn svg(s: &Sweep) -> String {
    let series = |f: &dyn Fn(&crate::lab::client::BenchResult) -> f64| -> Vec<Series> {
        s.targets
            .iter()
            .map(|t| Series {
                name: format!("{} :{}", t.name, t.addr.port()),
                points: s
                    .concurrency
                    .iter()
                    .filter_map(|&c| {
                        s.cell(&t.name, c)
                            .map(|cell| (c as f64, f(cell.median_run())))
                    })
                    .collect(),
            })
            .collect()
    };
    chart::render(&[
        Panel::new(
            "Requests per second (median)",
            "concurrency",
            "req/s",
            series(&|r| r.requests_per_sec()),
        ),
        Panel::new(
            "p99 latency (median run)",
            "concurrency",
            "µs",
            series(&|r| r.latency_us.p99 as f64),
        ),
    ])
}

/// A run's server CPU per request for a table, `–` where it was not measured.
pub(crate) fn cpu_per_request(r: &crate::lab::client::BenchResult) -> String {
    r.server_cpu_us_per_request
        .map_or("–".into(), |us| format!("{us:.1}"))
}

pub(crate) fn list(v: &[usize]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
