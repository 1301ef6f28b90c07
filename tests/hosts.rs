//! The lab across hosts: `sweep --netns` builds namespaces for the roles, runs the lab in them
//! with two client hosts whose histograms merge exactly, and removes every namespace and link it
//! made; `ssh:` hosts are reached through OpenSSH in batch mode (here a stand-in `ssh` that
//! records its command and runs it on this machine); and every role started is stopped when the
//! sweep fails or is interrupted.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringlab::lab::hgrm;

const BIN: &str = env!("CARGO_BIN_EXE_ringlab");

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn sweep_json(out: &Path) -> serde_json::Value {
    let dir = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .find(|e| e.path().join("sweep.json").exists())
        .expect("a results folder")
        .path();
    serde_json::from_str(&std::fs::read_to_string(dir.join("sweep.json")).unwrap()).unwrap()
}

fn readme(out: &Path) -> String {
    let dir = std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    std::fs::read_to_string(dir.join("README.md")).unwrap()
}

/// The names in `ip netns list` and `ip -o link show` (this namespace's links).
fn names(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sweep_netns_runs_the_lab_in_namespaces_with_two_clients_and_removes_them() {
    if !is_root() {
        let out = Command::new(BIN)
            .args(["sweep", "--netns", "-n", "10", "-c", "1", "--repeat", "1"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"));
        return;
    }
    common::require("ip", "iproute2");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args([
            "sweep",
            "--netns",
            "--clients",
            "2",
            "-n",
            "2000",
            "-c",
            "1,2",
            "--repeat",
            "1",
            "--warmup",
            "20",
            "--mode",
            "tcp",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The prefix it built under, from its own words; nothing under it is left.
    let prefix = stderr
        .split("built network namespaces ")
        .nth(1)
        .and_then(|r| r.split('-').next())
        .expect("the sweep names its namespaces")
        .to_string();
    assert!(prefix.starts_with("rl"), "{prefix}");
    assert!(!names(&["netns", "list"]).contains(&format!("{prefix}-")));
    assert!(!names(&["-o", "link", "show"]).contains(&prefix));

    let s = sweep_json(dir.path());
    assert_eq!(s["status"]["state"], "complete");
    assert_eq!(s["hosts"].as_array().unwrap().len(), 4, "{}", s["hosts"]);
    for cell in s["cells"].as_array().unwrap() {
        let r = &cell["runs"][0];
        assert_eq!(r["complete"], 2000, "{}", cell["target"]);
        assert_eq!(r["total_bytes"], 2000 * 122);
        assert_eq!(r["failed"]["connect"], 0);
        if cell["target"] == "lb" {
            // Round robin as on loopback: every backend a quarter.
            let spread: Vec<u64> = r["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b[1].as_u64().unwrap())
                .collect();
            assert_eq!(spread, vec![500; 4], "{}", r["backends"]);
        }
        if cell["concurrency"] == 2 {
            // Two client hosts, each its share; the merged histogram is the sum of theirs.
            let parts = r["clients"].as_array().expect("two clients' parts");
            assert_eq!(parts.len(), 2);
            let mut sum = hgrm::decode(parts[0]["latency_histogram"].as_str().unwrap()).unwrap();
            sum.add(hgrm::decode(parts[1]["latency_histogram"].as_str().unwrap()).unwrap())
                .unwrap();
            let merged = hgrm::decode(r["latency_histogram"].as_str().unwrap()).unwrap();
            assert_eq!(merged, sum);
            assert_eq!(
                r["latency_us"]["p99"].as_u64().unwrap(),
                sum.value_at_quantile(0.99)
            );
            let rate = |p: &serde_json::Value| {
                p["complete"].as_f64().unwrap() / p["elapsed_secs"].as_f64().unwrap()
            };
            let (a, b) = (rate(&parts[0]), rate(&parts[1]));
            assert_eq!(parts[0]["complete"], 1000);
            assert!(
                (a / (a + b) - 0.5).abs() <= 0.05,
                "each client within 10% of its half: {a:.0} and {b:.0} req/s"
            );
        }
    }
    let text = readme(dir.path());
    assert!(text.contains("244000 bytes"));
    assert!(text.contains("network namespace"));
    assert!(text.contains("## Hosts"));
    // Every role's counters were collected when it stopped.
    let roles = s["roles"].as_array().unwrap();
    assert!(
        roles
            .iter()
            .all(|r| r["ended"] == "exit status: 0" && !r["output"].as_str().unwrap().is_empty())
    );
    let lb = roles.iter().find(|r| r["name"] == "lb").unwrap();
    assert!(lb["output"].as_str().unwrap().contains(" accepted"));
}

/// A stand-in for `ssh` on PATH: records its arguments (and, before it becomes the command, its
/// pid), then runs the remote command here, as sshd would there.
fn stand_in_ssh(dir: &Path) {
    let script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$*\" >> {log}\necho $$ >> {pids}\n\
         while [ \"$1\" != \"--\" ]; do shift; done; shift; shift\nexec sh -c \"$1\"\n",
        log = dir.join("ssh.log").display(),
        pids = dir.join("pids").display()
    );
    let path = dir.join("ssh");
    std::fs::write(&path, script).unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
}

fn sweep_over_ssh(dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env(
        "PATH",
        format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()),
    )
    .args([
        "sweep",
        "--place",
        "backends=ssh:lab@be1/127.0.0.1",
        "--place",
        "lb=ssh:lb1/127.0.0.1",
        "--remote-bin",
        BIN,
        "--free-ports",
        "--mode",
        "tcp",
        "--warmup",
        "0",
        "--repeat",
        "1",
        "--out",
    ])
    .arg(dir.join("out"))
    .args(extra);
    c
}

/// The pids the stand-in recorded (each became a role: `exec` keeps the pid).
fn recorded_pids(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for our purpose (its parent, the sweep, reaps it).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[test]
fn ssh_hosts_are_reached_in_batch_mode_with_the_remote_binary() {
    let dir = tempfile::tempdir().unwrap();
    stand_in_ssh(dir.path());
    common::succeeds(&mut sweep_over_ssh(
        dir.path(),
        &[
            "--place",
            "client=local,ssh:c2/127.0.0.1",
            "-n",
            "200",
            "-c",
            "2",
        ],
    ));
    let log = std::fs::read_to_string(dir.path().join("ssh.log")).unwrap();
    let calls: Vec<&str> = log.lines().collect();
    assert!(
        calls
            .iter()
            .all(|c| c.starts_with("-o BatchMode=yes -o ConnectTimeout=10 -T -- "))
    );
    for expected in [
        format!("lab@be1 exec {BIN} machine --format json"),
        format!("lb1 exec {BIN} machine --format json"),
        format!("c2 exec {BIN} machine --format json"),
        format!("lab@be1 exec {BIN} backend --supervised"),
        format!("lab@be1 exec {BIN} threaded --supervised"),
        format!("lb1 exec {BIN} lb --supervised"),
        format!("c2 exec {BIN} bench --supervised --format json --start-at "),
    ] {
        assert!(
            calls.iter().any(|c| c.contains(&expected)),
            "no ssh call with `{expected}` in:\n{log}"
        );
    }
    let s = sweep_json(&dir.path().join("out"));
    let hosts: Vec<&str> = s["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["host"].as_str().unwrap())
        .collect();
    assert_eq!(
        hosts,
        [
            "ssh:lab@be1/127.0.0.1",
            "ssh:lb1/127.0.0.1",
            "local",
            "ssh:c2/127.0.0.1"
        ]
    );
    for cell in s["cells"].as_array().unwrap() {
        assert_eq!(cell["runs"][0]["complete"], 200);
        assert_eq!(cell["runs"][0]["clients"].as_array().unwrap().len(), 2);
    }
    // Every role exited by itself once its input closed; none is left.
    assert!(
        s["roles"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["ended"] == "exit status: 0")
    );
    let pids = recorded_pids(dir.path());
    assert!(pids.len() >= 6, "{pids:?}");
    assert!(pids.iter().all(|&p| !alive(p)));
}

#[test]
fn a_role_that_cannot_start_stops_the_ones_that_did() {
    let dir = tempfile::tempdir().unwrap();
    stand_in_ssh(dir.path());
    // The backends start over "ssh"; the balancer cannot bind an address this machine lacks.
    let out = sweep_over_ssh(dir.path(), &["--place", "lb=local/192.0.2.1", "-n", "10"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lb on local/192.0.2.1 did not start"),
        "{stderr}"
    );
    let pids = recorded_pids(dir.path());
    assert!(pids.len() >= 3, "the backends had started: {pids:?}");
    assert!(pids.iter().all(|&p| !alive(p)), "left running: {pids:?}");
}

#[test]
fn an_interrupted_placed_sweep_stops_every_role_and_keeps_what_it_measured() {
    let dir = tempfile::tempdir().unwrap();
    stand_in_ssh(dir.path());
    let child = sweep_over_ssh(
        dir.path(),
        &[
            "-n",
            "20000",
            "-c",
            "1-5",
            "--place",
            "client=ssh:c1/127.0.0.1",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut sweep = common::Proc(child);
    // Interrupted once the first cell is measured.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let json = std::fs::read_dir(dir.path().join("out"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| std::fs::read_to_string(e.ok()?.path().join("sweep.json")).ok());
        if json.is_some_and(|j| j.contains("\"runs\"")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling the sweep this test started, by its pid.
    unsafe { libc::kill(sweep.0.id() as i32, libc::SIGINT) };
    let status = sweep.0.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let s = sweep_json(&dir.path().join("out"));
    assert_eq!(s["status"]["state"], "interrupted");
    assert!(!s["cells"].as_array().unwrap().is_empty());
    let pids = recorded_pids(dir.path());
    assert!(pids.iter().all(|&p| !alive(p)), "left running: {pids:?}");
}

#[test]
fn placement_flags_that_do_not_fit_are_usage_errors() {
    for args in [
        &["sweep", "--rate-limit", "1gbit"][..],
        &["sweep", "--place", "db=local"],
        &["sweep", "--place", "lb=ssh:-oProxyCommand=x"],
        &["sweep", "--netns", "--place", "lb=local"],
        &["sweep", "--place", "lb=local", "--io", "uring,epoll"],
        &["sweep", "--place", "lb=local", "--target", "x=127.0.0.1:1"],
        &["sweep", "--clients", "2"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .args(args)
            .arg("--out")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{args:?}"
        );
    }
}

#[test]
fn an_open_loop_shares_its_rate_among_client_hosts() {
    let dir = tempfile::tempdir().unwrap();
    common::succeeds(
        Command::new(BIN)
            .args([
                "sweep",
                "--place",
                "client=local,local",
                "--free-ports",
                "--mode",
                "tcp",
                "--policy",
                "least-conn",
                "--rates",
                "1k",
                "--duration",
                "500ms",
                "--arrival",
                "poisson",
                "-c",
                "8",
                "--repeat",
                "1",
                "--warmup",
                "0",
                "--out",
            ])
            .arg(dir.path()),
    );
    let s = sweep_json(dir.path());
    let cells = s["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 3, "lb, direct, threaded");
    for cell in cells {
        let r = &cell["runs"][0];
        assert_eq!(r["open_loop"]["offered_rate"], 1000.0, "{}", cell["target"]);
        let parts = r["clients"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        for p in parts {
            assert_eq!(p["offered_rate"], 500.0);
            assert_eq!(p["concurrency"], 4);
        }
        assert_eq!(
            r["complete"].as_u64().unwrap(),
            parts
                .iter()
                .map(|p| p["complete"].as_u64().unwrap())
                .sum::<u64>()
        );
    }
}
