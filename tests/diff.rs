//! `ringlab diff` on hand-made sweeps with a known regression, a known improvement and pure
//! noise: each is classified as it should be, cells on one side only and differing machine facts
//! are reported, and `--fail-below` sets the exit status.

use std::path::Path;
use std::process::Command;

use ringlab::lab::diff::{self, Verdict};
use serde_json::json;

/// A sweep.json with these cells: (target, concurrency, req/s of each repetition).
fn sweep(
    dir: &Path,
    name: &str,
    kernel: &str,
    cells: &[(&str, u64, &[f64])],
) -> std::path::PathBuf {
    let cells: Vec<_> = cells
        .iter()
        .map(|(target, c, rates)| {
            let runs: Vec<_> = rates
                .iter()
                .map(|r| json!({"complete": r * 2.0, "elapsed_secs": 2.0, "latency_us": {"p99": 1e6 / r}}))
                .collect();
            json!({"target": target, "concurrency": c, "rate": null, "runs": runs, "median": 0})
        })
        .collect();
    let doc = json!({
        "machine": {"cpu_model": "AMD EPYC", "cpus_online": 2, "kernel": kernel, "hostname": "vm",
                    "git_revision": name},
        "placement": {"client": [0]}, "drivers": ["uring: io_uring"], "keep_alive": false,
        "requests": 1000, "cells": cells,
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string(&doc).unwrap()).unwrap();
    path
}

fn pair(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = sweep(
        dir,
        "base",
        "6.18",
        &[
            ("lb", 1, &[1000.0, 1010.0, 990.0, 1005.0, 995.0]),
            ("lb", 5, &[5000.0, 5050.0, 4950.0, 5020.0, 4980.0]),
            ("direct", 1, &[2000.0, 2100.0, 1900.0, 2050.0, 1950.0]),
            ("threaded", 1, &[800.0, 810.0, 790.0, 805.0, 795.0]),
        ],
    );
    let new = sweep(
        dir,
        "new",
        "6.19",
        &[
            // 20% slower, every repetition below every base one: a regression.
            ("lb", 1, &[800.0, 810.0, 790.0, 805.0, 795.0]),
            // 20% faster: an improvement.
            ("lb", 5, &[6000.0, 6050.0, 5950.0, 6020.0, 5980.0]),
            // The same spread, shuffled and a little lower: noise.
            ("direct", 1, &[1950.0, 2060.0, 1880.0, 2090.0, 1990.0]),
            ("http", 1, &[3000.0, 3000.0, 3000.0]),
        ],
    );
    (base, new)
}

#[test]
fn a_regression_an_improvement_and_noise_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (base, new) = pair(dir.path());
    let d = diff::compare(&diff::load(&base).unwrap(), &diff::load(&new).unwrap());
    let verdict = |target: &str, c: u64| {
        d.cells
            .iter()
            .find(|x| x.key.target == target && x.key.concurrency == c)
            .unwrap()
            .clone()
    };
    let lb1 = verdict("lb", 1);
    assert_eq!(lb1.verdict, Verdict::Regression);
    assert!((lb1.ratio - 0.8).abs() < 0.01, "{lb1:?}");
    // Five a side, fully separated: the exact p-value is 1/252.
    assert!((lb1.p_worse - 1.0 / 252.0).abs() < 1e-9);
    assert_eq!(verdict("lb", 5).verdict, Verdict::Improvement);
    assert_eq!(verdict("direct", 1).verdict, Verdict::Noise);
    assert_eq!(d.only_base.len(), 1);
    assert_eq!(d.only_base[0].target, "threaded");
    assert_eq!(d.only_new[0].target, "http");
    assert_eq!(d.failing(0.95).len(), 1);
    assert!(d.failing(0.75).is_empty());
    let md = diff::markdown(&d, Some(0.95));
    assert!(md.contains("| kernel | 6.18 | 6.19 |"), "{md}");
    assert!(
        md.contains("In the base sweep only: `threaded c=1`."),
        "{md}"
    );
    assert!(md.contains("In the new sweep only: `http c=1`."), "{md}");
}

#[test]
fn fail_below_sets_the_exit_status_and_out_writes_the_table_and_chart() {
    let dir = tempfile::tempdir().unwrap();
    let (base, new) = pair(dir.path());
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ringlab"))
            .arg("diff")
            .arg(&base)
            .arg(&new)
            .args(args)
            .output()
            .unwrap()
    };
    let out_dir = dir.path().join("out");
    let gated = run(&["--fail-below", "0.95", "--out", out_dir.to_str().unwrap()]);
    assert_eq!(
        gated.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&gated.stderr)
    );
    assert!(String::from_utf8_lossy(&gated.stderr).contains("1 cell(s) worse beyond noise"));
    assert!(
        std::fs::read_to_string(out_dir.join("diff.md"))
            .unwrap()
            .contains("**worse**")
    );
    assert!(
        std::fs::read_to_string(out_dir.join("diff.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    // Below the regression's ratio, or without a threshold, the diff passes.
    assert_eq!(run(&["--fail-below", "0.75"]).status.code(), Some(0));
    assert_eq!(run(&[]).status.code(), Some(0));
    // A file that is not a sweep is a clear error.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringlab"))
        .args(["diff", bad.to_str().unwrap(), new.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a sweep.json"));
}
