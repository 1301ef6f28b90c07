//! `ringlab diff`: two sweeps compared cell by cell — this revision against the last, this
//! kernel against that, io_uring against epoll — with each difference judged against the noise
//! the repetitions themselves show, so a script can gate on a regression and not on noise.
//!
//! The test is the exact one-sided Mann-Whitney U (rank-sum) test over the repetitions of a cell
//! on each side. It assumes no distribution (run-to-run noise on a shared VM is skewed, with
//! outliers) and its p-value is exact at the 3–10 repetitions a sweep has, where a t-test's
//! normality cannot be checked and a bootstrap has too few points to resample. Its honest limit
//! shows at 3 repetitions a side: the smallest p-value is 1/20 = 0.05, reached only when every
//! new repetition is worse than every base one.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::lab::chart::{self, Panel, Series};

/// The significance level of the rank test.
pub const ALPHA: f64 = 0.05;

/// What identifies a cell on both sides.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CellKey {
    /// Target name.
    pub target: String,
    /// Concurrency (the most in flight, for an open-loop cell).
    pub concurrency: u64,
    /// Offered rate of an open-loop cell, req/s.
    pub rate: Option<u64>,
}

impl std::fmt::Display for CellKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rate {
            Some(rate) => write!(f, "{} @ {rate} req/s", self.target),
            None => write!(f, "{} c={}", self.target, self.concurrency),
        }
    }
}

/// One side's measurements of a cell: per repetition, req/s and p99 (µs).
#[derive(Debug, Clone, Default)]
pub struct Runs {
    /// Requests per second, per repetition.
    pub rates: Vec<f64>,
    /// p99 latency in µs, per repetition.
    pub p99s: Vec<f64>,
}

/// A sweep read back from its `sweep.json`.
#[derive(Debug, Clone)]
pub struct SweepFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// The machine facts and set-up worth comparing, by name.
    pub facts: BTreeMap<String, String>,
    /// Cells, by key.
    pub cells: BTreeMap<CellKey, Runs>,
}

/// Reads a results folder (its `sweep.json`, or the `compare.json` of `scripts/compare.sh`) or
/// either file itself.
pub fn load(path: &Path) -> io::Result<SweepFile> {
    let file = if path.is_dir() && !path.join("sweep.json").exists() {
        path.join("compare.json")
    } else if path.is_dir() {
        path.join("sweep.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", file.display())))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a sweep.json: {e}", file.display()),
        )
    })?;
    parse(&json)
        .map(|(facts, cells)| SweepFile {
            path: file.clone(),
            facts,
            cells,
        })
        .map_err(|why| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a sweep.json: {why}", file.display()),
            )
        })
}

type Parsed = (BTreeMap<String, String>, BTreeMap<CellKey, Runs>);

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn parse(json: &Value) -> Result<Parsed, String> {
    if json.get("cells").is_none() && json["machine"].get("haproxy").is_some() {
        return Ok(parse_compare(json));
    }
    let machine = &json["machine"];
    let mut facts = BTreeMap::new();
    for key in [
        "cpu_model",
        "cpus_online",
        "kernel",
        "hostname",
        "git_revision",
    ] {
        facts.insert(key.to_string(), text(&machine[key]));
    }
    facts.insert("placement".into(), text(&json["placement"]));
    facts.insert("drivers".into(), text(&json["drivers"]));
    facts.insert("keep_alive".into(), text(&json["keep_alive"]));
    facts.insert("requests".into(), text(&json["requests"]));
    let cells = json["cells"].as_array().ok_or("no cells")?;
    let mut out = BTreeMap::new();
    for cell in cells {
        let key = CellKey {
            target: cell["target"]
                .as_str()
                .ok_or("a cell without a target")?
                .into(),
            concurrency: cell["concurrency"].as_u64().unwrap_or(0),
            rate: cell["rate"].as_f64().map(|r| r.round() as u64),
        };
        let mut runs = Runs::default();
        for run in cell["runs"].as_array().ok_or("a cell without runs")? {
            let complete = run["complete"].as_f64().unwrap_or(0.0);
            let secs = run["elapsed_secs"].as_f64().unwrap_or(0.0);
            runs.rates
                .push(if secs > 0.0 { complete / secs } else { 0.0 });
            runs.p99s
                .push(run["latency_us"]["p99"].as_f64().unwrap_or(0.0));
        }
        out.insert(key, runs);
    }
    Ok((facts, out))
}

/// `scripts/compare.sh`'s `compare.json`: every section's rows, one per server, concurrency and
/// round; a cell is a section's server (with its cores and keep-alive, where given) at a
/// concurrency, its rounds the repetitions.
fn parse_compare(json: &Value) -> Parsed {
    let machine = &json["machine"];
    let mut facts = BTreeMap::new();
    for key in [
        "cpu_model",
        "cpus",
        "kernel",
        "ringlab",
        "haproxy",
        "nginx",
        "wrk",
    ] {
        facts.insert(key.to_string(), text(&machine[key]));
    }
    let mut cells: BTreeMap<CellKey, Runs> = BTreeMap::new();
    let Some(sections) = json.as_object() else {
        return (facts, cells);
    };
    for (section, rows) in sections {
        let Some(rows) = rows.as_array() else {
            continue;
        };
        for row in rows {
            let (Some(name), Some(rate)) = (row["name"].as_str(), row["req_per_sec"].as_f64())
            else {
                continue;
            };
            let mut target = format!("{section}/{name}");
            if let Some(cores) = row["cores"].as_u64() {
                target.push_str(&format!(" {cores} cores"));
            }
            if row["keep_alive"].as_bool() == Some(true) {
                target.push_str(" -k");
            }
            let key = CellKey {
                target,
                concurrency: row["concurrency"].as_u64().unwrap_or(0),
                rate: None,
            };
            let runs = cells.entry(key).or_default();
            runs.rates.push(rate);
            runs.p99s.push(row["p99_us"].as_f64().unwrap_or(0.0));
        }
    }
    (facts, cells)
}

/// How a cell changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Worse beyond the noise (rank test, one-sided, at [`ALPHA`]).
    Regression,
    /// Better beyond the noise.
    Improvement,
    /// Within the noise the repetitions show.
    Noise,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Regression => "**worse**",
            Verdict::Improvement => "**better**",
            Verdict::Noise => "noise",
        })
    }
}

/// One cell on both sides.
#[derive(Debug, Clone)]
pub struct CellDiff {
    /// The cell.
    pub key: CellKey,
    /// Median req/s, base and new.
    pub base_rate: f64,
    /// See `base_rate`.
    pub new_rate: f64,
    /// Median p99 (µs), base and new.
    pub base_p99: f64,
    /// See `base_p99`.
    pub new_p99: f64,
    /// New against base in the cell's measure, so that below 1 is worse: req/s for a
    /// closed-loop cell, base p99 over new p99 for an open-loop one (its req/s is the rate
    /// offered).
    pub ratio: f64,
    /// One-sided p-value that new is worse.
    pub p_worse: f64,
    /// One-sided p-value that new is better.
    pub p_better: f64,
    /// The verdict.
    pub verdict: Verdict,
    /// Repetitions, base and new.
    pub repetitions: (usize, usize),
}

/// Two sweeps compared.
#[derive(Debug, Clone)]
pub struct Diff {
    /// Where each side came from.
    pub base: PathBuf,
    /// See `base`.
    pub new: PathBuf,
    /// Cells on both sides.
    pub cells: Vec<CellDiff>,
    /// Cells in the base only.
    pub only_base: Vec<CellKey>,
    /// Cells in the new sweep only.
    pub only_new: Vec<CellKey>,
    /// Every fact, base and new value, and whether they differ.
    pub facts: Vec<(String, String, String)>,
}

impl Diff {
    /// Cells worse beyond the noise and below `threshold` (a ratio, e.g. 0.95).
    pub fn failing(&self, threshold: f64) -> Vec<&CellDiff> {
        self.cells
            .iter()
            .filter(|c| c.verdict == Verdict::Regression && c.ratio < threshold)
            .collect()
    }
}

/// Compares `new` against `base`.
pub fn compare(base: &SweepFile, new: &SweepFile) -> Diff {
    let mut cells = Vec::new();
    let mut only_base = Vec::new();
    for (key, b) in &base.cells {
        let Some(n) = new.cells.get(key) else {
            only_base.push(key.clone());
            continue;
        };
        // Larger is better in the measure compared: req/s, or minus p99 for an open loop.
        let (bm, nm): (Vec<f64>, Vec<f64>) = if key.rate.is_some() {
            (
                b.p99s.iter().map(|v| -v).collect(),
                n.p99s.iter().map(|v| -v).collect(),
            )
        } else {
            (b.rates.clone(), n.rates.clone())
        };
        let p_worse = rank_test_p(&nm, &bm);
        let p_better = rank_test_p(&bm, &nm);
        let (base_p99, new_p99) = (median(&b.p99s), median(&n.p99s));
        let (base_rate, new_rate) = (median(&b.rates), median(&n.rates));
        let ratio = if key.rate.is_some() {
            if new_p99 > 0.0 {
                base_p99 / new_p99
            } else {
                0.0
            }
        } else if base_rate > 0.0 {
            new_rate / base_rate
        } else {
            0.0
        };
        let verdict = if p_worse <= ALPHA {
            Verdict::Regression
        } else if p_better <= ALPHA {
            Verdict::Improvement
        } else {
            Verdict::Noise
        };
        cells.push(CellDiff {
            key: key.clone(),
            base_rate,
            new_rate,
            base_p99,
            new_p99,
            ratio,
            p_worse,
            p_better,
            verdict,
            repetitions: (b.rates.len(), n.rates.len()),
        });
    }
    let only_new = new
        .cells
        .keys()
        .filter(|k| !base.cells.contains_key(*k))
        .cloned()
        .collect();
    let facts = base
        .facts
        .iter()
        .map(|(k, v)| {
            let other = new.facts.get(k).cloned().unwrap_or_else(|| "-".into());
            (k.clone(), v.clone(), other)
        })
        .collect();
    Diff {
        base: base.path.clone(),
        new: new.path.clone(),
        cells,
        only_base,
        only_new,
        facts,
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let m = s.len() / 2;
    if s.len() % 2 == 1 {
        s[m]
    } else {
        (s[m - 1] + s[m]) / 2.0
    }
}

/// Exact one-sided Mann-Whitney p-value that `x` tends to be smaller than `y`: the chance,
/// with no difference between them, of a U statistic (pairs with x below y, ties counting a
/// half) at least as large as observed. Ties are rounded towards the less extreme value, so the
/// p-value errs large.
pub fn rank_test_p(x: &[f64], y: &[f64]) -> f64 {
    let (n, m) = (x.len(), y.len());
    if n == 0 || m == 0 {
        return 1.0;
    }
    let mut u2 = 0usize; // twice U
    for a in x {
        for b in y {
            u2 += match a.partial_cmp(b) {
                Some(std::cmp::Ordering::Less) => 2,
                Some(std::cmp::Ordering::Equal) => 1,
                _ => 0,
            };
        }
    }
    let u = u2 / 2; // floor: a half from ties is dropped, towards the less extreme
    let counts = u_distribution(n, m);
    let total: f64 = counts.iter().sum();
    counts[u.min(counts.len() - 1)..].iter().sum::<f64>() / total
}

/// How many orderings of `n` and `m` items give each U from 0 to n·m (no ties):
/// f(n, m, u) = f(n−1, m, u−m) + f(n, m−1, u), counted in f64 (the totals outgrow u64 at large
/// n and m).
fn u_distribution(n: usize, m: usize) -> Vec<f64> {
    // table[j][u] for the current i: orderings of i x's and j y's with statistic u.
    let max = n * m;
    let mut prev: Vec<Vec<f64>> = (0..=m)
        .map(|_| {
            let mut v = vec![0.0; max + 1];
            v[0] = 1.0;
            v
        })
        .collect();
    for _ in 1..=n {
        let mut cur: Vec<Vec<f64>> = vec![vec![0.0; max + 1]; m + 1];
        cur[0][0] = 1.0;
        for j in 1..=m {
            for u in 0..=max {
                // The last item is an x (placed above all j y's: it adds j pairs) or a y.
                let from_x = if u >= j { prev[j][u - j] } else { 0.0 };
                cur[j][u] = from_x + cur[j - 1][u];
            }
        }
        prev = cur;
    }
    prev.swap_remove(m)
}

/// The diff as markdown: facts that differ, then every cell.
pub fn markdown(d: &Diff, fail_below: Option<f64>) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# ringlab diff\n");
    let _ = writeln!(o, "- base: `{}`", d.base.display());
    let _ = writeln!(o, "- new: `{}`\n", d.new.display());
    let differ: Vec<_> = d.facts.iter().filter(|(_, a, b)| a != b).collect();
    if differ.is_empty() {
        let _ = writeln!(o, "Machine and set-up: the same on both sides.\n");
    } else {
        let _ = writeln!(o, "Machine and set-up facts that differ:\n");
        let _ = writeln!(o, "| fact | base | new |\n| --- | --- | --- |");
        for (k, a, b) in differ {
            let _ = writeln!(o, "| {k} | {a} | {b} |");
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "Each cell compares the medians of its repetitions; the verdict is an exact one-sided \
         Mann-Whitney rank test over those repetitions at p ≤ {ALPHA} (with 3 repetitions a side \
         that means every new one beyond every base one). The ratio is new/base req/s, or base/new \
         p99 for an open-loop cell: below 1 is worse.\n"
    );
    let _ = writeln!(
        o,
        "| cell | base req/s | new req/s | base p99 µs | new p99 µs | ratio | p (worse) | p (better) | verdict |"
    );
    let _ = writeln!(
        o,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for c in &d.cells {
        let few = if c.repetitions.0 < 3 || c.repetitions.1 < 3 {
            " (too few repetitions to tell)"
        } else {
            ""
        };
        let _ = writeln!(
            o,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3}× | {:.3} | {:.3} | {}{few} |",
            c.key,
            c.base_rate,
            c.new_rate,
            c.base_p99,
            c.new_p99,
            c.ratio,
            c.p_worse,
            c.p_better,
            c.verdict
        );
    }
    for (side, keys) in [("base", &d.only_base), ("new", &d.only_new)] {
        if !keys.is_empty() {
            let names: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
            let _ = writeln!(o, "\nIn the {side} sweep only: {}.", names.join(", "));
        }
    }
    let worse = d
        .cells
        .iter()
        .filter(|c| c.verdict == Verdict::Regression)
        .count();
    let better = d
        .cells
        .iter()
        .filter(|c| c.verdict == Verdict::Improvement)
        .count();
    let _ = writeln!(
        o,
        "\n{} cells: {worse} worse beyond noise, {better} better, {} within noise.",
        d.cells.len(),
        d.cells.len() - worse - better
    );
    if let Some(t) = fail_below {
        let failing = d.failing(t);
        if failing.is_empty() {
            let _ = writeln!(o, "No cell is worse beyond noise and below {t}×.");
        } else {
            let names: Vec<String> = failing.iter().map(|c| format!("`{}`", c.key)).collect();
            let _ = writeln!(
                o,
                "**{} worse beyond noise and below {t}×: {}.**",
                failing.len(),
                names.join(", ")
            );
        }
    }
    o
}

/// Both runs' medians on one chart: req/s (closed-loop cells) against concurrency, base and new
/// per target.
pub fn svg(d: &Diff) -> String {
    let mut targets: Vec<&str> = d.cells.iter().map(|c| c.key.target.as_str()).collect();
    targets.dedup();
    let mut series = Vec::new();
    for t in targets {
        for (side, pick) in [("base", true), ("new", false)] {
            let points: Vec<(f64, f64)> = d
                .cells
                .iter()
                .filter(|c| c.key.target == t && c.key.rate.is_none())
                .map(|c| {
                    let v = if pick { c.base_rate } else { c.new_rate };
                    (c.key.concurrency as f64, v)
                })
                .collect();
            if !points.is_empty() {
                series.push(Series {
                    name: format!("{t} ({side})"),
                    points,
                });
            }
        }
    }
    let ratios = d
        .cells
        .iter()
        .filter(|c| c.key.rate.is_none())
        .fold(BTreeMap::<&str, Vec<(f64, f64)>>::new(), |mut m, c| {
            m.entry(&c.key.target)
                .or_default()
                .push((c.key.concurrency as f64, c.ratio));
            m
        })
        .into_iter()
        .map(|(t, points)| Series {
            name: t.to_string(),
            points,
        })
        .collect();
    chart::render(&[
        Panel::new(
            "req/s, base and new (medians)",
            "concurrency",
            "req/s",
            series,
        ),
        Panel::new("new / base req/s", "concurrency", "ratio", ratios),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_u_distribution_is_exact() {
        // 3 and 3: C(6,3) = 20 orderings, U from 0 to 9, symmetric, one way to reach 0 or 9.
        let d = u_distribution(3, 3);
        assert_eq!(d.iter().sum::<f64>(), 20.0);
        assert_eq!(d, [1.0, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 2.0, 1.0, 1.0]);
        assert_eq!(u_distribution(5, 5).iter().sum::<f64>(), 252.0);
    }

    #[test]
    fn the_rank_test_needs_separation_at_three_repetitions() {
        let base = [100.0, 102.0, 98.0];
        assert!((rank_test_p(&[90.0, 91.0, 89.0], &base) - 0.05).abs() < 1e-12);
        assert!(rank_test_p(&[99.0, 101.0, 90.0], &base) > 0.2);
        assert!(rank_test_p(&[110.0, 111.0, 112.0], &base) > 0.9);
        // Five a side: the smallest p is 1/252.
        let b5 = [100.0, 101.0, 99.0, 102.0, 98.0];
        assert!((rank_test_p(&[90.0, 91.0, 92.0, 93.0, 94.0], &b5) - 1.0 / 252.0).abs() < 1e-12);
    }
}
