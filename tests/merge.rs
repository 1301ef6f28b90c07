//! `ringlab merge`: two clients' results combined, the merged histogram exactly the histogram of
//! the union of their recorded latencies.

#[macro_use]
mod common;

use std::process::Command;

use ringlab::lab::hgrm;

fn bench_json(url: &str, n: &str) -> serde_json::Value {
    let out = common::succeeds(Command::new(env!("CARGO_BIN_EXE_ringlab")).args([
        "bench", "-n", n, "-c", "2", "--cpus", "0", "--format", "json", url,
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn two_clients_merge_into_the_histogram_of_their_union() {
    let lab = common::backend(2);
    let url = format!("http://{}/", lab.addrs[0]);
    let (a, b) = (bench_json(&url, "300"), bench_json(&url, "500"));
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(&pa, a.to_string()).unwrap();
    std::fs::write(&pb, b.to_string()).unwrap();
    let out = common::succeeds(
        Command::new(env!("CARGO_BIN_EXE_ringlab"))
            .args(["merge", "--format", "json"])
            .arg(&pa)
            .arg(&pb),
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["complete"], 800);
    assert_eq!(m["concurrency"], 4);
    assert_eq!(m["total_bytes"].as_u64().unwrap(), 800 * 122);
    // Exact: the merged histogram is the sum of the two, count for count.
    let h = |v: &serde_json::Value| hgrm::decode(v["latency_histogram"].as_str().unwrap()).unwrap();
    let mut union = h(&a);
    union.add(h(&b)).unwrap();
    let merged = h(&m);
    assert_eq!(merged, union);
    assert_eq!(
        m["latency_us"]["p99"].as_u64().unwrap(),
        union.value_at_quantile(0.99)
    );
    assert_eq!(m["latency_us"]["max"].as_u64().unwrap(), union.max());

    // Text output reads like bench's.
    let text = Command::new(env!("CARGO_BIN_EXE_ringlab"))
        .arg("merge")
        .arg(&pa)
        .arg(&pb)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("Complete requests:      800"));

    // Results of different targets do not merge.
    let other = format!("http://{}/", lab.addrs[1]);
    let pc = dir.path().join("c.json");
    std::fs::write(&pc, bench_json(&other, "10").to_string()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringlab"))
        .arg("merge")
        .arg(&pa)
        .arg(&pc)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("different targets"));
}
