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
        rates: None,
        target_pids: Vec::new(),
        hosts: None,
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
        // The lab runs in-process, so the servers' CPU per request is measured, and is real.
        let us = r.server_cpu_us_per_request.expect("server CPU measured");
        assert!(us > 0.5 && us < 100_000.0, "{us} µs per request");
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
        "server CPU µs/request |",
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
        // The backend runs in this test process: its CPU is what the sweep should read.
        .arg("--target-pid")
        .arg(format!("one={}", std::process::id()))
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
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("sweep.json")).unwrap()).unwrap();
    let us = json["cells"][0]["runs"][0]["server_cpu_us_per_request"].as_f64();
    assert!(us.is_some_and(|us| us > 0.0), "server CPU from --target-pid: {us:?}");

    // A --target-pid naming no target is a usage error.
    let out = Command::new(env!("CARGO_BIN_EXE_ringlab"))
        .args(["sweep", "--target", "one=127.0.0.1:9", "--target-pid", "two=1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--target-pid two"));
}
}

fn target(name: &str, addr: std::net::SocketAddr) -> ringlab::lab::topology::NamedTarget {
    ringlab::lab::topology::NamedTarget {
        name: name.into(),
        addr,
        description: "in-process test backend".into(),
        client_cpus: vec![ringlab::io::placement::allowed_cpus()[0]],
        io: None,
    }
}

both_drivers! {
fn a_rate_sweep_writes_latency_curves_spectra_and_the_knee() {
    use ringlab::lab::pacer::Arrival;
    use ringlab::lab::sweep::{RatePlan, Rates};
    let lab = common::backend(1);
    let mut config = small(vec![target("fast", lab.addrs[0])]);
    config.repeat = 2;
    config.concurrency = vec![16];
    config.rates = Some(RatePlan {
        rates: Rates::List(vec![400.0, 800.0]),
        duration: Duration::from_millis(500),
        slo: None,
        arrival: Arrival::Fixed,
    });
    let sweep = sweep::run(&config).unwrap();
    let cells = sweep.rate_cells("fast");
    assert_eq!(cells.iter().map(|c| c.rate.unwrap()).collect::<Vec<_>>(), [400.0, 800.0]);
    for cell in &cells {
        assert_eq!(cell.runs.len(), 2);
        let r = cell.median_run();
        assert_eq!(r.complete, (cell.rate.unwrap() * 0.5) as u64);
        assert_eq!(r.failed.total(), 0);
    }
    assert_eq!(sweep.knee("fast").and_then(|c| c.rate), Some(800.0));
    // A given target runs elsewhere as far as the sweep knows: its CPU is not guessed.
    assert!(cells[0].median_run().server_cpu_us_per_request.is_none());

    let dir = tempfile::tempdir().unwrap();
    let out = ringlab::lab::results::write(&sweep, &dir.path().join("run")).unwrap();
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    for needle in [
        "## Summary: the knee of each target",
        "| fast | 800 |",
        "open loop (fixed intervals), offered rates 400, 800 req/s",
        "(latency.svg)",
        "(spectrum.svg)",
        "hgrm/fast-400.hgrm",
        "| Kernel |",
    ] {
        assert!(readme.contains(needle), "{needle:?} missing from\n{readme}");
    }
    for file in ["latency.svg", "spectrum.svg", "hgrm/fast-400.hgrm", "hgrm/fast-800.hgrm"] {
        let text = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(text.len() > 100, "{file} is empty");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(json["knees"][0], serde_json::json!(["fast", 800.0]));
    // Every run carries its full histogram, which decodes to the run's own count.
    let encoded = json["cells"][0]["runs"][0]["latency_histogram"].as_str().unwrap();
    let h = ringlab::lab::hgrm::decode(encoded).unwrap();
    assert_eq!(h.len(), 200);
}
}

both_drivers! {
fn auto_rates_step_up_until_the_target_stops_keeping_up() {
    use ringlab::lab::pacer::Arrival;
    use ringlab::lab::sweep::{RatePlan, Rates};
    use ringlab::serve::backend::{BackendConfig, Delay};
    // 5 ms per answer and at most 4 in flight: at most 800 answers a second.
    let lab = common::backend_with(
        1,
        BackendConfig {
            delay: Delay::Fixed(Duration::from_millis(5)),
            ..BackendConfig::default()
        },
    );
    let mut config = small(vec![target("slow", lab.addrs[0])]);
    config.repeat = 1;
    config.concurrency = vec![4];
    config.rates = Some(RatePlan {
        rates: Rates::Auto {
            start: 200.0,
            factor: 2.0,
            max_steps: 6,
        },
        duration: Duration::from_millis(500),
        slo: None,
        arrival: Arrival::Fixed,
    });
    let sweep = sweep::run(&config).unwrap();
    let rates: Vec<f64> = sweep.rate_cells("slow").iter().map(|c| c.rate.unwrap()).collect();
    // 200 and 400 are kept up with; 1600 cannot be; the steps stop at the first rate missed
    // (3200 never runs), then two halvings narrow the knee between the last step kept up with
    // and the first missed.
    assert!(rates.starts_with(&[200.0, 400.0]), "{rates:?}");
    assert!(!rates.contains(&3200.0), "{rates:?}");
    let steps = [200.0, 400.0, 800.0, 1600.0];
    let refined: Vec<f64> = rates.iter().copied().filter(|r| !steps.contains(r)).collect();
    assert_eq!(refined.len(), 2, "{rates:?}");
    let knee = sweep.knee("slow").and_then(|c| c.rate).unwrap();
    assert!((400.0..=1200.0).contains(&knee), "knee {knee} in {rates:?}");
    // The first rate above the knee was missed.
    let missed = sweep
        .rate_cells("slow")
        .into_iter()
        .find(|c| c.rate.unwrap() > knee)
        .unwrap();
    assert!(!matches!(&sweep.rates, Some(plan) if plan.keeps_up(missed.median_run())));
}
}
