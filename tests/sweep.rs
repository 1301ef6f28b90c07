//! `ringlab sweep`: a small matrix over an in-process lab, written to a temporary folder.

#[macro_use]
mod common;

use std::process::Command;
use std::time::Duration;

use ringlab::io::shutdown::Shutdown;
use ringlab::lab::sweep::{self, SweepConfig};
use ringlab::lab::topology::{Placement, Ports};

fn small(targets: Vec<ringlab::lab::topology::NamedTarget>) -> SweepConfig {
    SweepConfig {
        requests: 60,
        concurrency: vec![1, 2],
        repeat: 3,
        keep_alive: false,
        targets,
        placement: Placement::default_for(&ringlab::io::placement::allowed_cpus()),
        ports: Ports::ephemeral(),
        warmup: 10,
        timeout: Duration::from_secs(10),
        note: None,
        stop: Shutdown::new(),
        io: vec![common::driver()],
        lab: ringlab::lab::topology::LabSetup::default(),
    }
}

both_drivers! {
fn a_small_sweep_writes_readme_json_and_chart_in_the_labs_columns() {
    let sweep = sweep::run(&small(Vec::new())).unwrap();
    // lb, lb-http, direct, threaded at two concurrencies.
    assert_eq!(sweep.cells.len(), 4 * 2);
    for cell in &sweep.cells {
        assert_eq!(cell.runs.len(), 3);
        let r = cell.median_run();
        assert_eq!(r.complete, 60);
        assert_eq!(r.failed.total(), 0);
        assert_eq!(r.total_bytes, 60 * 122);
        let (lo, hi) = cell.spread();
        assert!(lo <= r.requests_per_sec() && r.requests_per_sec() <= hi);
    }
    // Round robin seen through the balancer: 60 requests over four backends.
    for name in ["lb", "lb-http"] {
        let lb = sweep.cell(name, 2).unwrap().median_run();
        assert_eq!(
            lb.backends.iter().map(|b| b.1).collect::<Vec<_>>(),
            [15; 4],
            "{name}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let out = ringlab::lab::results::write(&sweep, &dir.path().join("run")).unwrap();
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    for needle in [
        "| No Test | Concurrency Level | Time taken for test | Complete request | Failed request | Total transferred | Request per second | Time per request | Transfer rate |",
        "## Summary",
        "lb / direct",
        "lb / threaded",
        "| Kernel |",
        "| Placement | lb CPU",
        "| ringlab | 0.1.0 (git ",
        "| 60 | 0 | 7320 bytes |",
        "Responses per backend",
    ] {
        assert!(readme.contains(needle), "{needle:?} missing from\n{readme}");
    }
    assert_eq!(readme.matches("### PORT ").count(), 4);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(json["cells"].as_array().unwrap().len(), 8);
    assert_eq!(json["cells"][0]["runs"].as_array().unwrap().len(), 3);
    assert!(
        json["derived"][0]["median_requests_per_sec"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        json["machine"]["kernel"]
            .as_str()
            .unwrap()
            .starts_with("Linux")
    );
    let svg = std::fs::read_to_string(out.join("chart.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 8);
}
}

both_drivers! {
fn the_cli_sweeps_given_targets_into_the_out_folder() {
    let b = common::backend(1);
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringlab"))
        .args([
            "sweep", "-n", "40", "-c", "1,3", "--repeat", "1", "--label", "t", "--io",
            &common::driver().to_string(),
        ])
        .arg("--target")
        .arg(format!("one={}", b.addr()))
        .arg("--out")
        .arg(dir.path())
        .args(["--note", "backend unpinned, in the test process"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("## Summary"), "{stdout}");
    let folders: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(folders.len(), 1);
    let folder = folders[0].as_ref().unwrap().path();
    assert!(
        folder
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("-t")
    );
    let readme = std::fs::read_to_string(folder.join("README.md")).unwrap();
    assert!(readme.contains("backend unpinned, in the test process"));
    assert!(readme.contains(&format!("### PORT {} (one)", b.addr().port())));
    assert!(folder.join("sweep.json").exists() && folder.join("chart.svg").exists());
}
}
