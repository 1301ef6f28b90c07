//! The real `ringlab` binary: help, clean errors with non-zero exits, and a graceful SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;
use common::Proc;

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
    let mut child = Proc(
        ringlab()
            .args(["lb", "--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
    let mut banner = String::new();
    stdout.read_line(&mut banner).unwrap();
    assert!(banner.contains("round-robin"), "{banner}");
    assert!(banner.contains("on CPU"), "placement not printed: {banner}");
    // SAFETY: signalling a child this test started, by its pid.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
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

/// Runs `ringlab ARGS` with `io_uring_setup` refused (`EPERM`) by a seccomp filter: for every
/// ring, or (`entries`) only for rings of that many entries, which refuses the uring driver's
/// ring (1024 entries) and leaves glommio's (128) alone, as a kernel whose io_uring lacks what
/// the driver needs would.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn without_io_uring(args: &[&str], entries: Option<u32>) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const ALLOW: u32 = 0x7fff_0000;
    const ERRNO: u32 = 0x0005_0000;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let deny = insn(RET_K, 0, 0, ERRNO | libc::EPERM as u32);
    let allow = insn(RET_K, 0, 0, ALLOW);
    let mut program = vec![
        insn(LD_W_ABS, 0, 0, 4), // arch
        insn(JEQ_K, 1, 0, ARCH),
        allow,
        insn(LD_W_ABS, 0, 0, 0), // syscall number
        insn(JEQ_K, 1, 0, libc::SYS_io_uring_setup as u32),
        allow,
    ];
    if let Some(entries) = entries {
        program.push(insn(LD_W_ABS, 0, 0, 16)); // first argument, low half
        program.push(insn(JEQ_K, 1, 0, entries));
        program.push(allow);
    }
    program.push(deny);
    let mut cmd = ringlab();
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe calls are made (prctl, syscall),
    // on a filter program that outlives them.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: program.len() as u16,
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const libc::sock_fprog) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// When the uring driver's ring cannot be set up, `ringlab` says so in one line, with the fix and
/// with `--io epoll` as the way to run anyway, and `--io epoll` does run.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn without_a_ring_for_sockets_one_line_names_the_fix_and_epoll_runs_anyway() {
    let out = without_io_uring(&["backend", "--listen", "127.0.0.1:0"], Some(1024))
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot set up the io_uring for the sockets"),
        "{err}"
    );
    assert!(
        err.contains("io_uring_disabled=0") && err.contains("--io epoll"),
        "{err}"
    );

    let mut child = without_io_uring(
        &["backend", "--listen", "127.0.0.1:0", "--io", "epoll"],
        Some(1024),
    );
    let mut banner = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut banner)
        .unwrap();
    assert!(banner.contains("sockets on epoll"), "{banner}");
    // SAFETY: signalling a child this test started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

/// With no io_uring at all, glommio's executor itself cannot start: one line says why and what to
/// change, not a panic.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[test]
fn without_io_uring_at_all_one_line_says_what_to_change() {
    let out = without_io_uring(
        &["backend", "--listen", "127.0.0.1:0", "--io", "epoll"],
        None,
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("cannot start a glommio executor"), "{err}");
    assert!(err.contains("kernel.io_uring_disabled=0"), "{err}");
}
