//! `ringlab merge`: several `bench --format json` results — clients run on several hosts, or by
//! hand — combined into one, the latency percentiles exact over every request (each result
//! carries its whole HdrHistogram, and histograms add), never averaged.

use std::io;
use std::path::Path;

use crate::lab::client::{BenchResult, OpenLoop, Percentiles, TimeStats};
use crate::lab::hgrm;

/// Reads one `ringlab bench --format json` result, its histogram decoded.
pub fn load(path: &Path) -> io::Result<BenchResult> {
    let bad = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a `ringlab bench --format json` result: {why}",
                path.display()
            ),
        )
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))?;
    let mut r: BenchResult = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    r.histogram = hgrm::decode(&r.latency_histogram).map_err(bad)?;
    Ok(r)
}

/// Combines results measured at the same time against the same target. Counts, bytes and
/// failures add; the latency histogram is the sum of all (so its percentiles are exact); the
/// run lasted as long as the longest part; concurrency and offered rates add. Connection Times
/// rows are exact in min, max, mean and deviation, and the median of each is the
/// request-weighted mean of the parts' medians (the parts keep no histogram of those). An
/// open loop's lag and uncorrected percentiles are the largest of the parts' (upper bounds).
pub fn merge(parts: &[BenchResult]) -> Result<BenchResult, String> {
    let first = parts.first().ok_or("nothing to merge")?;
    if let Some(other) = parts.iter().find(|p| p.target.url() != first.target.url()) {
        return Err(format!(
            "the results measured different targets ({} and {}): merge runs of one target",
            first.target.url(),
            other.target.url()
        ));
    }
    let mut m = first.clone();
    for p in &parts[1..] {
        m.concurrency += p.concurrency;
        m.complete += p.complete;
        m.failed.add(&p.failed);
        m.non_2xx += p.non_2xx;
        m.keep_alive_requests += p.keep_alive_requests;
        m.total_bytes += p.total_bytes;
        m.html_bytes += p.html_bytes;
        m.elapsed_secs = m.elapsed_secs.max(p.elapsed_secs);
        m.histogram
            .add(&p.histogram)
            .map_err(|e| format!("histograms do not add: {e:?}"))?;
        for (name, count) in &p.backends {
            match m.backends.iter_mut().find(|(n, _)| n == name) {
                Some((_, c)) => *c += count,
                None => m.backends.push((name.clone(), *count)),
            }
        }
        m.client_cpus.extend(&p.client_cpus);
        m.first_error = m.first_error.or_else(|| p.first_error.clone());
        m.interrupted |= p.interrupted;
        m.client_cpu_secs += p.client_cpu_secs;
        m.open_loop = match (m.open_loop.take(), &p.open_loop) {
            (Some(a), Some(b)) => Some(add_open_loop(a, b)),
            _ => None,
        };
    }
    m.backends.sort();
    let weights: Vec<(f64, &BenchResult)> = parts.iter().map(|p| (p.complete as f64, p)).collect();
    m.connect_ms = pool_times(&weights, |r| r.connect_ms);
    m.processing_ms = pool_times(&weights, |r| r.processing_ms);
    m.waiting_ms = pool_times(&weights, |r| r.waiting_ms);
    m.total_ms = pool_times(&weights, |r| r.total_ms);
    m.latency_us = Percentiles::of(&m.histogram);
    m.latency_histogram = hgrm::encode(&m.histogram);
    m.server_cpu_us_per_request = None;
    Ok(m)
}

fn add_open_loop(mut a: OpenLoop, b: &OpenLoop) -> OpenLoop {
    let worst = |x: Percentiles, y: Percentiles| Percentiles {
        p50: x.p50.max(y.p50),
        p90: x.p90.max(y.p90),
        p99: x.p99.max(y.p99),
        p999: x.p999.max(y.p999),
        max: x.max.max(y.max),
    };
    a.offered_rate += b.offered_rate;
    a.uncorrected_us = worst(a.uncorrected_us, b.uncorrected_us);
    a.send_lag_us = worst(a.send_lag_us, b.send_lag_us);
    a.pacer_lag_us = worst(a.pacer_lag_us, b.pacer_lag_us);
    a.late += b.late;
    a.late_waiting_for_connection += b.late_waiting_for_connection;
    a.client_busy.extend(&b.client_busy);
    a.client_bound |= b.client_bound;
    a
}

/// One Connection Times row over parts weighted by their requests: the pooled mean and
/// standard deviation (from each part's mean and deviation), the extremes, and the weighted
/// mean of the medians.
fn pool_times(parts: &[(f64, &BenchResult)], row: impl Fn(&BenchResult) -> TimeStats) -> TimeStats {
    let n: f64 = parts.iter().map(|(w, _)| w).sum();
    if n == 0.0 {
        return TimeStats::default();
    }
    let mean = parts.iter().map(|(w, r)| w * row(r).mean).sum::<f64>() / n;
    // E[x²] of each part is sd² + mean²; the pooled variance is E[x²] − mean².
    let second = parts
        .iter()
        .map(|(w, r)| {
            let t = row(r);
            w * (t.sd * t.sd + t.mean * t.mean)
        })
        .sum::<f64>()
        / n;
    TimeStats {
        min: parts
            .iter()
            .map(|(_, r)| row(r).min)
            .fold(f64::INFINITY, f64::min),
        mean,
        sd: (second - mean * mean).max(0.0).sqrt(),
        median: parts.iter().map(|(w, r)| w * row(r).median).sum::<f64>() / n,
        max: parts.iter().map(|(_, r)| row(r).max).fold(0.0, f64::max),
    }
}
