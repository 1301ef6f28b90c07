//! The results of an open-loop sweep (`--rates`): latency against offered load per target, each
//! target's knee, the charts (latency against load, the percentile spectrum at each knee) and
//! one `.hgrm` file per median run for HdrHistogram's plotter.

use std::fmt::Write;

use crate::lab::chart::{self, Panel, Series};
use crate::lab::client::BenchResult;
use crate::lab::hgrm;
use crate::lab::results;
use crate::lab::sweep::{Cell, Rates, Sweep};

/// Every file of the results folder besides `sweep.json`: (name inside the folder, contents).
pub fn files(s: &Sweep) -> Vec<(String, String)> {
    let mut files = vec![
        ("README.md".to_string(), markdown(s)),
        ("latency.svg".to_string(), latency_chart(s)),
        ("spectrum.svg".to_string(), spectrum_chart(s)),
    ];
    for t in &s.targets {
        for cell in s.rate_cells(&t.name) {
            files.push((
                hgrm_name(&t.name, cell),
                hgrm::percentile_distribution(&cell.median_run().histogram),
            ));
        }
    }
    files
}

fn hgrm_name(target: &str, cell: &Cell) -> String {
    format!("hgrm/{target}-{:.0}.hgrm", cell.rate.unwrap_or(0.0))
}

fn markdown(s: &Sweep) -> String {
    let mut o = String::new();
    let plan = s.rates.as_ref().expect("an open-loop sweep");
    let rates = match &plan.rates {
        Rates::List(list) => format!(
            "{} req/s",
            list.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Rates::Auto {
            start,
            factor,
            max_steps,
        } => format!(
            "from {start:.0} req/s up, ×{factor} a step (at most {max_steps}), per target until it stops keeping up, then the gap around each knee halved twice"
        ),
    };
    let matrix = format!(
        "open loop ({}), offered rates {rates}, {} s per cell, at most {} in flight, × {} repetitions (targets interleaved; the median repetition by p99 is reported), {}; a target keeps up when it achieves the offered rate within 2% with no failures{}",
        plan.arrival,
        plan.duration.as_secs_f64(),
        results::list(&s.concurrency),
        s.repeat,
        if s.keep_alive {
            "keep-alive (`-k`)"
        } else {
            "a new connection per request"
        },
        plan.slo.map_or(String::new(), |slo| format!(
            " and p99 under the SLO of {} µs",
            slo.as_micros()
        ))
    );
    results::header(&mut o, s, &matrix);
    summary(&mut o, s);
    let _ = writeln!(
        o,
        "Latency here counts from each request's *intended* send time, so a request that had to \
         wait (for a free connection, or behind a stalled server) is charged for the wait, as a \
         user arriving then would be; the closed loop's numbers (the `uncorrected` column) count \
         from the actual send and leave that wait out.\n"
    );
    let _ = writeln!(
        o,
        "![p50, p99 and p99.9 latency against offered load](latency.svg)\n\n\
         ![percentile spectrum at each target's knee](spectrum.svg)\n"
    );
    for t in &s.targets {
        let _ = writeln!(o, "### PORT {} ({})\n", t.addr.port(), t.name);
        let _ = writeln!(o, "{} at `{}`.\n", t.description, t.addr);
        let _ = writeln!(
            o,
            "| offered req/s | achieved req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | uncorrected p99 µs | sent late | failed | client CPU busy | server CPU µs/request | p99 over the repetitions | spectrum |"
        );
        let _ = writeln!(
            o,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
        for cell in s.rate_cells(&t.name) {
            let r = cell.median_run();
            let Some(ol) = &r.open_loop else { continue };
            let l = &r.latency_us;
            let p99s = cell.runs.iter().map(|r| r.latency_us.p99);
            let (lo, hi) = (p99s.clone().min().unwrap_or(0), p99s.max().unwrap_or(0));
            let busy = ol
                .client_busy
                .iter()
                .map(|b| format!("{:.0}%", b * 100.0))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                o,
                "| {:.0} | {:.0} ({:.1}%) | {} | {} | {} | {} | {} | {} | {} | {} | {busy}{} | {} | {lo}–{hi} | [hgrm]({}) |",
                ol.offered_rate,
                r.requests_per_sec(),
                100.0 * r.requests_per_sec() / ol.offered_rate,
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max,
                ol.uncorrected_us.p99,
                ol.late,
                r.failed.total(),
                if ol.client_bound {
                    " (client-bound)"
                } else {
                    ""
                },
                results::cpu_per_request(r),
                hgrm_name(&t.name, cell)
            );
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "`sweep.json` holds every number of every repetition, each run's full HdrHistogram \
         (`latency_histogram`: V2 deflate, base64); `hgrm/` holds the median runs' percentile \
         spectra in HdrHistogram's text format."
    );
    o
}

/// Each target's knee and where it stopped keeping up.
pub fn summary(o: &mut String, s: &Sweep) {
    let Some(plan) = &s.rates else { return };
    let _ = writeln!(
        o,
        "## Summary: the knee of each target (median of {} repetitions)\n",
        s.repeat
    );
    let _ = writeln!(
        o,
        "| target | knee: highest offered req/s kept up | p99 µs there | next rate | why it did not keep up |"
    );
    let _ = writeln!(o, "| --- | ---: | ---: | ---: | --- |");
    for t in &s.targets {
        let knee = s.knee(&t.name);
        let cells = s.rate_cells(&t.name);
        let next = match knee {
            Some(k) => cells.iter().find(|c| c.rate > k.rate),
            None => cells.first(),
        };
        let why = next.map_or("—: kept up at every rate measured".to_string(), |c| {
            why_not(c.median_run(), plan.slo)
        });
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {why} |",
            t.name,
            knee.and_then(|k| k.rate)
                .map_or("none".into(), |r| format!("{r:.0}")),
            knee.map_or("—".into(), |k| k.median_run().latency_us.p99.to_string()),
            next.and_then(|c| c.rate)
                .map_or("—".into(), |r| format!("{r:.0}")),
        );
    }
    o.push('\n');
}

fn why_not(r: &BenchResult, slo: Option<std::time::Duration>) -> String {
    let Some(ol) = &r.open_loop else {
        return String::new();
    };
    let mut why = Vec::new();
    let share = r.requests_per_sec() / ol.offered_rate;
    if share < 0.98 {
        why.push(format!(
            "achieved {:.1}% of the offered rate",
            share * 100.0
        ));
    }
    if r.failed.total() > 0 {
        why.push(format!("{} failed", r.failed.total()));
    }
    if let Some(slo) = slo {
        if r.latency_us.p99 as u128 > slo.as_micros() {
            why.push(format!(
                "p99 {} µs over the SLO of {} µs",
                r.latency_us.p99,
                slo.as_micros()
            ));
        }
    }
    if ol.client_bound {
        why.push("the client was the limit (an executor busy nearly all the time)".into());
    }
    why.join("; ")
}

fn latency_chart(s: &Sweep) -> String {
    let panel = |title: &str, pick: fn(&BenchResult) -> u64| {
        let series = s
            .targets
            .iter()
            .map(|t| Series {
                name: t.name.clone(),
                points: s
                    .rate_cells(&t.name)
                    .iter()
                    .filter_map(|c| Some((c.rate?, pick(c.median_run()).max(1) as f64)))
                    .collect(),
            })
            .collect();
        let mut p = Panel::new(title, "offered req/s", "µs (log)", series);
        p.log_x = true;
        p.log_y = true;
        p
    };
    chart::render(&[
        panel("p50 latency, corrected", |r| r.latency_us.p50),
        panel("p99 latency, corrected", |r| r.latency_us.p99),
        panel("p99.9 latency, corrected", |r| r.latency_us.p999),
    ])
}

/// Latency against percentile on HdrHistogram's axis (1/(1−q), log), one line per target at
/// its knee (or its lowest rate, when it kept up with none).
fn spectrum_chart(s: &Sweep) -> String {
    let series = s
        .targets
        .iter()
        .filter_map(|t| {
            let cell = s
                .knee(&t.name)
                .or_else(|| s.rate_cells(&t.name).into_iter().next())?;
            let h = &cell.median_run().histogram;
            let points = h
                .iter_quantiles(5)
                .map(|v| v.quantile_iterated_to())
                .filter(|&q| q < 0.99999)
                .map(|q| (1.0 / (1.0 - q), h.value_at_quantile(q).max(1) as f64))
                .collect();
            Some(Series {
                name: format!("{} @{}", t.name, chart::short(cell.rate.unwrap_or(0.0))),
                points,
            })
        })
        .collect();
    let mut p = Panel::new(
        "Percentile spectrum at each knee (target @req/s, corrected)",
        "percentile",
        "µs (log)",
        series,
    );
    p.log_x = true;
    p.log_y = true;
    p.x_ticks = [
        (1.0, "0%"),
        (10.0, "90%"),
        (100.0, "99%"),
        (1000.0, "99.9%"),
        (10000.0, "99.99%"),
    ]
    .iter()
    .map(|&(x, l)| (x, l.to_string()))
    .collect();
    chart::render(&[p])
}
