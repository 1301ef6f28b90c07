//! The real `ringlab` binary: help, clean errors with non-zero exits, and a graceful SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

fn ringlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringlab"))
}

#[test]
fn help_lists_the_subcommands() {
    let out = ringlab().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["backend", "lb", "threaded"] {
        assert!(text.contains(cmd), "{cmd} missing from --help");
    }
    for cmd in ["backend", "lb", "threaded"] {
        let out = ringlab().args([cmd, "--help"]).output().unwrap();
        assert!(out.status.success(), "{cmd} --help failed");
    }
}

#[test]
fn a_wrong_flag_says_what_to_do() {
    let out = ringlab().args(["lb", "--bakend", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("--backend"), "{err}");
}

#[test]
fn an_unparsable_address_is_one_clear_line() {
    let out = ringlab()
        .args(["lb", "--backend", "nowhere"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("'nowhere' is not an address"), "{err}");
}

#[test]
fn a_port_in_use_is_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = ringlab()
        .args(["backend", "--listen", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
    assert!(err.contains("in use"), "{err}");
}

#[test]
fn an_unavailable_cpu_is_refused() {
    let out = ringlab()
        .args(["backend", "--listen", "127.0.0.1:0", "--cpu", "4096"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("CPU 4096 is not available"), "{err}");
}

#[test]
fn sigterm_drains_prints_counters_and_exits_zero() {
    let mut child = ringlab()
        .args(["lb", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    assert!(banner.contains("round robin"), "{banner}");
    assert!(banner.contains("on CPU"), "placement not printed: {banner}");
    // SAFETY: signalling a child this test started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(rest.contains("connect failures"), "{rest}");
    assert!(rest.contains("accepted"), "{rest}");
}
