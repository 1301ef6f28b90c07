//! `ringlab netlab`: namespaces standing in for hosts. Built, the lab runs through them (client,
//! balancer and backend each in its own namespace, over veth pairs and a bridge) with every
//! request answered; torn down, no namespace, veth or bridge of ours is left. Needs root, as
//! the developers' machines and CI have.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_ringlab");

fn netlab(action: &str, prefix: &str) -> std::process::Output {
    Command::new(BIN)
        .args(["netlab", action, "--prefix", prefix])
        .output()
        .unwrap()
}

fn in_ns(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, BIN]).args(args);
    c
}

/// Removes the namespaces even when an assertion fails part-way.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = netlab("down", &self.0);
    }
}

#[test]
fn the_lab_runs_through_namespaces_and_leaves_nothing_behind() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let out = netlab("up", "rlx");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"));
        return;
    }
    let prefix = format!("t{}", std::process::id() % 1_000_000);
    let up = netlab("up", &prefix);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let guard = Down(prefix.clone());
    // A second `up` under the same prefix is refused, not half-built.
    assert!(!netlab("up", &prefix).status.success());

    let backend = Proc(
        in_ns(
            &format!("{prefix}-backends"),
            &["backend", "--listen", "198.18.0.3:9002"],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let lb = Proc(
        in_ns(
            &format!("{prefix}-lb"),
            &[
                "lb",
                "--listen",
                "198.18.0.2:44444",
                "--backend",
                "198.18.0.3:9002",
            ],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    let out = common::succeeds(&mut in_ns(
        &format!("{prefix}-client"),
        &[
            "bench",
            "-n",
            "200",
            "-c",
            "2",
            "--format",
            "json",
            "http://198.18.0.2:44444/",
        ],
    ));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["complete"], 200);
    assert_eq!(r["failed_total"], 0);
    assert_eq!(r["total_bytes"], 200 * 122);
    drop(lb);
    drop(backend);

    let down = netlab("down", &prefix);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    std::mem::forget(guard);
    let left = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !left.contains(&format!("{prefix}-")),
        "namespaces left: {left}"
    );
    let links = String::from_utf8(
        Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        !links.contains(&format!("{prefix}b")) && !links.contains(&format!("{prefix}r")),
        "links left: {links}"
    );
    // Down again finds nothing to remove, and says so.
    let again = netlab("down", &prefix);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing"));
}

#[test]
fn links_are_shaped_with_tbf_and_netem_is_named_where_it_is_missing() {
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let prefix = format!("s{}", std::process::id() % 1_000_000);
    let up = Command::new(BIN)
        .args(["netlab", "up", "--prefix", &prefix, "--clients", "2"])
        .args(["--rate-limit", "200mbit"])
        .output()
        .unwrap();
    let _guard = Down(prefix.clone());
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(String::from_utf8_lossy(&up.stdout).contains("client2 = 198.18.0.4"));
    for role in ["client", "client2", "lb", "backends"] {
        let q = qdiscs(&format!("{prefix}-{role}"));
        assert!(q.contains("tbf") && q.contains("200Mbit"), "{role}: {q}");
    }
    let no_netem = String::from_utf8_lossy(&up.stderr).contains("no sch_netem");
    assert!(netlab("down", &prefix).status.success());

    // Delay needs netem: applied where the kernel has it, refused in one line where not.
    let delayed = Command::new(BIN)
        .args(["netlab", "up", "--prefix", &prefix, "--delay", "1ms"])
        .output()
        .unwrap();
    if no_netem {
        assert_eq!(delayed.status.code(), Some(1));
        let err = String::from_utf8_lossy(&delayed.stderr);
        assert!(
            err.contains("no sch_netem") && err.contains("--rate-limit"),
            "{err}"
        );
        assert!(!netlab_namespaces().contains(&format!("{prefix}-")));
    } else {
        assert!(delayed.status.success());
        assert!(qdiscs(&format!("{prefix}-lb")).contains("netem"));
    }
}

fn netlab_namespaces() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

/// The queueing disciplines on a namespace's `eth0`.
fn qdiscs(ns: &str) -> String {
    let out = Command::new("tc")
        .args(["-n", ns, "qdisc", "show", "dev", "eth0"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
