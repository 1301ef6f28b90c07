//! One test per defect found by trying the lab as a new user and as an attacker would (issue 14),
//! each named for the behaviour it guards. They drive the real `ringlab` binary against small
//! stand-ins that misbehave on purpose, so each also runs against an older build.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn ringlab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringlab"))
}

/// A `ringlab` child process, stopped (by its pid) when dropped.
/// Starts `ringlab lb --listen 127.0.0.1:0 ARGS…` and returns it with the port it printed.
fn lb(args: &[&str]) -> (Proc, SocketAddr) {
    let mut child = ringlab()
        .args(["lb", "--listen", "127.0.0.1:0"])
        .args(io_flag())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut banner = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut banner)
        .unwrap();
    // "ringlab lb: 127.0.0.1:PORT -> [...]"
    let addr = banner
        .split_whitespace()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {banner:?}"));
    (Proc(child), addr)
}

/// A stand-in backend: runs `serve` on a thread for every accepted connection.
fn stand_in(serve: impl Fn(TcpStream, u64) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = std::sync::Arc::new(serve);
    std::thread::spawn(move || {
        for (i, s) in listener.incoming().enumerate() {
            let Ok(s) = s else { return };
            let serve = serve.clone();
            std::thread::spawn(move || serve(s, i as u64));
        }
    });
    addr
}

fn reset(s: &TcpStream) {
    socket2::SockRef::from(s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// Reads what `s` delivers until it ends; returns the bytes and whether it ended in a reset.
fn read_until_end(s: &mut TcpStream) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, false),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

both_drivers! {
fn a_backend_reset_after_a_partial_response_reaches_the_client_as_a_reset() {
    // f31ec7c: the balancer passed the reset on as a clean close, so curl exited 0 and bench
    // counted a cut-off response as complete.
    let backend = stand_in(|mut s, i| {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        s.write_all(b"HTTP/1.0 200 OK\r\n\r\npartial-body").unwrap();
        if i % 2 == 1 {
            reset(&s);
        }
    });
    let (_lb, addr) = lb(&["--backend", &backend.to_string()]);
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let (_, was_reset) = read_until_end(&mut s);
        let mut again = TcpStream::connect(addr).unwrap();
        again.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let (body, clean_reset) = read_until_end(&mut again);
        // Connections alternate between a clean answer and a reset one.
        assert_ne!(
            was_reset,
            clean_reset,
            "{:?}",
            String::from_utf8_lossy(&body)
        );
    }
    // The built-in client counts the reset ones as failed (Receive), as it does directly.
    let r = ringlab::lab::client::run(bench_config(addr, 20, 1)).unwrap();
    assert_eq!(r.complete, 20);
    assert_eq!(r.failed.receive, 10, "{:?}", r.failed);
}
}

both_drivers! {
fn a_client_reset_reaches_the_backend_as_a_reset() {
    // f31ec7c: the balancer shut both sides down, so the backend read a clean end.
    let (tx, rx) = mpsc::channel();
    let backend = stand_in(move |mut s, _| {
        let mut buf = [0u8; 16];
        s.read_exact(&mut buf[..5]).unwrap();
        s.write_all(b"ok").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let end = match s.read(&mut buf) {
            Ok(0) => "end-of-file",
            Ok(_) => "data",
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
            Err(_) => "timeout",
        };
        let _ = tx.send(end);
    });
    let (_lb, addr) = lb(&["--backend", &backend.to_string()]);
    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(b"hello").unwrap();
    let mut ok = [0u8; 2];
    client.read_exact(&mut ok).unwrap();
    reset(&client);
    drop(client);
    assert_eq!(rx.recv_timeout(Duration::from_secs(15)).unwrap(), "reset");
}
}

/// Sends a request head of `size` bytes (from a second thread, as a client streaming a huge head
/// does) and returns the start of what came back and whether it ended in a reset.
fn huge_head(addr: SocketAddr, size: usize) -> (String, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.resize(size, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        let _ = writer.write_all(&head);
    });
    let (got, was_reset) = read_until_end(&mut s);
    sender.join().unwrap();
    (
        String::from_utf8_lossy(&got[..got.len().min(12)]).into_owned(),
        was_reset,
    )
}

both_drivers! {
fn a_refused_huge_head_reaches_the_client_through_the_balancer() {
    // f31ec7c: directly the client got its 431, through the balancer no byte at all: the
    // backend's close with the head unread reset the balancer, which closed the client at once.
    let b = backend(1);
    let (_lb, addr) = lb(&["--backend", &b.addr().to_string()]);
    for size in [200_000, 1 << 20] {
        for _ in 0..3 {
            let (start, _) = huge_head(addr, size);
            assert_eq!(start, "HTTP/1.1 431", "head of {size} bytes");
        }
    }
}
}

both_drivers! {
fn a_half_closed_pair_is_reset_after_the_fin_timeout() {
    // f31ec7c: a pair whose backend had finished stayed until the client closed or the 60 s
    // idle timeout passed, so silent clients could hold the balancer's descriptors.
    let (tx, rx) = mpsc::channel();
    let backend = stand_in(move |mut s, _| {
        // Ends its side at once (as a backend's head timeout does) but keeps reading.
        s.shutdown(Shutdown::Write).unwrap();
        let started = Instant::now();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 16];
        let ended = match s.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        let _ = tx.send((ended, started.elapsed()));
    });
    let (_lb, addr) = lb(&["--backend", &backend.to_string(), "--fin-timeout", "300ms"]);
    let mut silent = TcpStream::connect(addr).unwrap();
    let (got, _) = read_until_end(&mut silent);
    assert!(got.is_empty());
    let (ended, after) = rx.recv_timeout(Duration::from_secs(25)).unwrap();
    assert!(ended, "the pair was never closed");
    assert!(
        after < Duration::from_secs(5),
        "closed only after {after:?}"
    );
    drop(silent);
}
}

both_drivers! {
fn a_stalled_response_cut_by_the_idle_timeout_is_a_reset_not_an_end() {
    // f31ec7c: the idle timeout shut both sides down with a FIN, so a client reading to the end
    // took the cut-off response for a complete one.
    let backend = stand_in(|mut s, _| {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        s.write_all(b"HTTP/1.0 200 OK\r\n\r\nthe first half")
            .unwrap();
        std::thread::sleep(Duration::from_secs(20));
    });
    let (_lb, addr) = lb(&["--backend", &backend.to_string(), "--idle-timeout", "1s"]);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let (got, was_reset) = read_until_end(&mut s);
    assert!(got.ends_with(b"the first half"));
    assert!(was_reset, "a cut-off response ended like a complete one");
}
}

#[test]
fn the_balancer_refuses_itself_as_a_backend() {
    // f31ec7c: it connected to itself until its cap (9937 stuck pairs, minutes until stopped).
    let free = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = free.local_addr().unwrap().port();
    drop(free);
    for (listen, backend) in [
        (format!("127.0.0.1:{port}"), format!("127.0.0.1:{port}")),
        (format!("0.0.0.0:{port}"), format!("127.0.0.1:{port}")),
        (format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}")),
    ] {
        let mut child = Proc(
            ringlab()
                .args(["lb", "--listen", &listen, "--backend", &backend])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{listen} -> {backend} was not refused"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.code(), Some(2), "{listen} -> {backend}");
        let mut err = String::new();
        child
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(err.contains("own listening address"), "{err}");
    }
}

#[test]
fn usage_errors_exit_2_and_touch_no_disk() {
    // f31ec7c: -c > -n ran (and printed a time per request 10× the measured one), --max-conns 0
    // silently became 1, -n 0 and --repeat 0 exited 1, and sweep made its folders before
    // rejecting its flags.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let out = out.to_str().unwrap();
    let url = "http://127.0.0.1:9/";
    for args in [
        vec!["bench", "-n", "3", "-c", "10", url],
        vec!["bench", "-n", "0", url],
        vec!["bench", "-c", "0", url],
        vec!["lb", "--max-conns", "0"],
        vec!["backend", "--max-conns", "0"],
        vec!["lb", "--buffer-size", "10"],
        vec!["sweep", "--repeat", "0", "--out", out],
        vec!["sweep", "-n", "0", "--out", out],
        vec!["sweep", "-n", "3", "-c", "1,5", "--out", out],
    ] {
        let res = ringlab().args(&args).output().unwrap();
        assert_eq!(res.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(err.contains("--help"), "{args:?}: {err}");
        assert!(!Path::new(out).exists(), "{args:?} made {out}");
    }
}

both_drivers! {
fn keep_alive_responses_are_counted_as_ab_counts_them() {
    // f31ec7c: bench reported n − c (requests on a reused connection); ab counts every response
    // that kept its connection open.
    require("ab", "apache2-utils");
    let b = backend(1);
    let url = format!("http://{}/", b.addr());
    let keep_alive = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("Keep-Alive requests:"))
            .unwrap_or_else(|| panic!("no Keep-Alive line in {text}"))
            .trim()
            .parse()
            .unwrap()
    };
    let ab = Command::new("ab")
        .args(["-k", "-n", "600", "-c", "5", &url])
        .output()
        .unwrap();
    let ours = ringlab()
        .args(["bench", "-k", "-n", "600", "-c", "5", &url])
        .args(io_flag())
        .output()
        .unwrap();
    let ab = keep_alive(&String::from_utf8_lossy(&ab.stdout));
    let ours = keep_alive(&String::from_utf8_lossy(&ours.stdout));
    assert_eq!(ab, 600);
    assert_eq!(ours, ab);
}
}

both_drivers! {
fn an_interrupted_bench_stops_at_once_and_says_so() {
    // f31ec7c: the first Ctrl-C against a silent server waited out the 30 s timeout, then
    // printed partial numbers with no mark and exited 0.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", silent.local_addr().unwrap());
    for format in ["text", "json"] {
        let child = ringlab()
            .args([
                "bench", "-n", "100", "-c", "2", "-s", "30s", "--format", format,
            ])
            .arg(&url)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let started = Instant::now();
        // SAFETY: signalling the child this test started, by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        assert!(started.elapsed() < Duration::from_secs(3), "{format}");
        assert_eq!(out.status.code(), Some(130), "{format}");
        let text = String::from_utf8_lossy(&out.stdout);
        match format {
            "json" => {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["interrupted"], true);
            }
            _ => assert!(text.contains("Interrupted:"), "{text}"),
        }
    }
}
}

/// `git describe` of this checkout, as `build.rs` takes it.
fn own_revision() -> String {
    let out = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "this test needs the git checkout");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

both_drivers! {
fn results_record_ringlabs_own_revision_wherever_it_runs() {
    // f31ec7c: the sweep recorded the revision of the directory it ran in.
    let b = backend(1);
    let elsewhere = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let ok = Command::new("git")
            .arg("-C")
            .arg(elsewhere.path())
            .args(["-c", "user.email=a@b", "-c", "user.name=a"])
            .args(args)
            .output()
            .unwrap()
            .status
            .success();
        assert!(ok, "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["commit", "-q", "--allow-empty", "-m", "another repository"]);
    let out = ringlab()
        .current_dir(elsewhere.path())
        .args([
            "sweep", "-n", "10", "-c", "1", "--repeat", "1", "--warmup", "0", "--io",
            &driver().to_string(),
        ])
        .arg("--target")
        .arg(format!("one={}", b.addr()))
        .args(["--out", "results"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let folder = std::fs::read_dir(elsewhere.path().join("results"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let readme = std::fs::read_to_string(folder.join("README.md")).unwrap();
    let rev = own_revision();
    assert!(
        readme.contains(&format!("(git {rev}")),
        "want {rev} in\n{readme}"
    );
}
}

/// Waits until `dir` holds a folder with a `sweep.json` that lists at least one cell.
fn wait_for_first_cell(dir: &Path) -> PathBuf {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no cell was ever written");
        let found = std::fs::read_dir(dir).ok().and_then(|mut d| d.next());
        if let Some(Ok(entry)) = found {
            let json = std::fs::read_to_string(entry.path().join("sweep.json")).unwrap_or_default();
            if json.contains("\"concurrency\": 1,") && json.contains("\"runs\"") {
                return entry.path();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn sweep_child(target: SocketAddr, out: &Path, tmp: &Path) -> Child {
    ringlab()
        .env("TMPDIR", tmp)
        .args([
            "sweep",
            "-n",
            "3000",
            "-c",
            "1-4",
            "--repeat",
            "3",
            "--warmup",
            "0",
            "--io",
            &driver().to_string(),
        ])
        .arg("--target")
        .arg(format!("one={target}"))
        .arg("--out")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

both_drivers! {
fn an_unwritable_results_folder_loses_no_measurement() {
    // f31ec7c: made unwritable mid-run, the sweep exited 1 with nothing on stdout, and every
    // measurement was lost.
    let b = backend(1);
    let (out, tmp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let child = sweep_child(b.addr(), out.path(), tmp.path());
    let folder = wait_for_first_cell(out.path());
    // The folder becomes a file: every later write there fails.
    std::fs::remove_dir_all(&folder).unwrap();
    std::fs::write(&folder, b"in the way").unwrap();
    let res = child.wait_with_output().unwrap();
    assert_eq!(res.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(stdout.contains("## Summary"), "{stdout}");
    let kept = tmp.path().join(folder.file_name().unwrap());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kept.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(json["status"]["state"], "complete");
    assert_eq!(json["cells"].as_array().unwrap().len(), 4);
}
}

both_drivers! {
fn an_interrupted_sweep_keeps_what_it_measured() {
    // f31ec7c: Ctrl-C threw away every cell already measured.
    let b = backend(1);
    let (out, tmp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let child = sweep_child(b.addr(), out.path(), tmp.path());
    let folder = wait_for_first_cell(out.path());
    // SAFETY: signalling the child this test started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let res = child.wait_with_output().unwrap();
    assert_eq!(res.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&res.stdout).contains("## Summary"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(json["status"]["state"], "interrupted");
    assert!(!json["cells"].as_array().unwrap().is_empty());
    let readme = std::fs::read_to_string(folder.join("README.md")).unwrap();
    assert!(readme.contains("**Partial: interrupted"), "{readme}");
}
}

both_drivers! {
fn urls_as_curl_takes_them_scheme_case_credentials_and_spaces() {
    // f31ec7c: HTTP:// was refused, user:pw@host failed to resolve, and a space went out raw
    // (the server answered 400).
    let (tx, rx) = mpsc::channel();
    let capture = stand_in(move |mut s, _| {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
        let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    let out = ringlab()
        .args(["bench", "-n", "1"])
        .args(io_flag())
        .arg(format!(
            "HTTP://user:p%40ss@127.0.0.1:{}/a b?x=1",
            capture.port()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(head.starts_with("GET /a%20b?x=1 HTTP/1.0\r\n"), "{head}");
    // base64("user:p@ss")
    assert!(
        head.contains("\r\nAuthorization: Basic dXNlcjpwQHNz\r\n"),
        "{head}"
    );
}
}
