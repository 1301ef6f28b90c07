#!/usr/bin/env python3
"""Bad-day runs against real ringlab processes, with their numbers written under results/.

Scenarios (all by default; pick with --only):
  term   >= 100k requests through `ringlab lb --retry-unanswered` in front of four backend
         processes; one backend gets SIGTERM mid-run and is restarted later. Expect 0 failed
         requests and the restarted backend answering again.
  kill   the same with SIGKILL: at most the requests in flight on that backend may fail (with
         --retry-unanswered, those that got no byte are replayed).
  idle   10 000 idle connections held open against a backend while a load runs beside them.
  storm  a slow-client storm (slow loris, garbage, early resets) beside a measured load; req/s
         with and without the storm.
  soak   >= 1 million requests through the balancer: RSS growth and descriptor counts of the
         balancer process before, during and after.

Usage: python3 scripts/chaos.py [--only term,kill,idle,storm,soak] [--requests 100000]
Every process it starts is stopped by pid when it ends.
"""

import argparse
import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "ringlab")
BACKENDS = [9002, 9003, 9004, 9005]
LB = 44444
LAST = os.cpu_count() - 1
procs = []
TMP = tempfile.mkdtemp(prefix="ringlab-chaos-")


def start(name, *args):
    log = open(os.path.join(TMP, name + ".log"), "a")
    p = subprocess.Popen([BIN, *args], stdout=log, stderr=subprocess.STDOUT)
    procs.append(p)
    return p


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def stop_all():
    for p in reversed(procs):
        stop(p)


def wait_port(port, timeout=70):
    # Up to 70 s: a fixed port may first have to wait out TIME_WAIT (ringlab says so in its log).
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing answers on {port}; logs in {TMP}")


def backend(port):
    p = start(f"backend-{port}", "backend", "--listen", str(port), "--cpu", str(LAST))
    wait_port(port)
    return p


def bench(port, n, c, extra=()):
    out = subprocess.run([BIN, "bench", "-n", str(n), "-c", str(c), "--cpus", str(LAST),
                          "--format", "json", *extra, f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench failed: {out.stderr}")
    return json.loads(out.stdout)


def lb_counters(p):
    """Stops the balancer and parses the counters it prints."""
    stop(p)
    text = open(os.path.join(TMP, "lb.log")).read()
    # The counters follow the drain message of the last stop.
    return text.rsplit("draining (send it again to stop at once)\n", 1)[-1]


def chaos(sig, n):
    bs = {port: backend(port) for port in BACKENDS}
    lb = start("lb", "lb", "--cpus", "0", "--retry-unanswered", "--cooldown", "500ms")
    wait_port(LB)
    victim = BACKENDS[1]
    result = {}

    def load():
        result["bench"] = bench(LB, n, 20)

    t = threading.Thread(target=load)
    t0 = time.time()
    t.start()
    time.sleep(1.5)
    stop(bs[victim], sig)
    result["stopped_at_s"] = round(time.time() - t0, 2)
    time.sleep(2.0)
    bs[victim] = backend(victim)
    result["restarted_at_s"] = round(time.time() - t0, 2)
    t.join()
    result["elapsed_s"] = round(time.time() - t0, 2)
    # The restarted backend is back in rotation: a fresh burst reaches it.
    after = bench(LB, 400, 4)
    result["after_restart_spread"] = after["backends"]
    result["lb_report"] = lb_counters(lb)
    for p in bs.values():
        stop(p)
    procs.clear()
    return result


def idle(n_idle, n):
    # A head timeout longer than the scenario, so the idle connections are really held (with the
    # default 10 s the server would rightly close them while they are still being opened).
    b = start("backend-idle", "backend", "--listen", str(BACKENDS[0]), "--cpu", str(LAST),
              "--max-conns", str(n_idle + 1000), "--head-timeout", "120s")
    wait_port(BACKENDS[0])
    held = [socket.create_connection(("127.0.0.1", BACKENDS[0])) for _ in range(n_idle)]
    time.sleep(0.5)
    d = bench(BACKENDS[0], n, 10)

    def still_open(s):
        s.setblocking(False)
        try:
            return s.recv(1) != b""  # data would be a protocol error; b"" is a close
        except BlockingIOError:
            return True  # open, nothing to read
        except OSError:
            return False

    alive = sum(still_open(s) for s in held)
    for s in held:
        s.close()
    stop(b)
    procs.clear()
    return {"idle_connections": n_idle, "still_open_after_load": alive, "bench": d}


def storm(n):
    b = backend(BACKENDS[0])
    quiet = [bench(BACKENDS[0], n, 5) for _ in range(3)]
    done = threading.Event()

    def loris():
        while not done.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", BACKENDS[0]))
                for ch in b"GET / HTTP/1.1\r\nX: " * 100:
                    if done.is_set():
                        break
                    s.send(bytes([ch]))
                    time.sleep(0.5)
                s.close()
            except OSError:
                time.sleep(0.05)

    def hostile():
        i = 0
        while not done.is_set():
            i += 1
            try:
                s = socket.create_connection(("127.0.0.1", BACKENDS[0]))
                if i % 3 == 0:
                    s.send(b"\xff\x00\x13\x37\r\n\r\n")
                elif i % 3 == 1:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                else:
                    s.send(b"GET / HT")
                    s.shutdown(socket.SHUT_WR)
                s.close()
            except OSError:
                pass
            time.sleep(0.001)

    threads = [threading.Thread(target=loris) for _ in range(200)] + [threading.Thread(target=hostile) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1)
    stormy = [bench(BACKENDS[0], n, 5) for _ in range(3)]
    done.set()
    for t in threads:
        t.join()
    stop(b)
    procs.clear()
    med = lambda runs: sorted(r["requests_per_sec"] for r in runs)[1]
    return {"quiet_req_per_sec": med(quiet), "storm_req_per_sec": med(stormy),
            "storm_failed": sum(r["failed_total"] for r in stormy),
            "storm_clients": "200 slow loris (a byte every 0.5 s) + 2 threads of garbage, resets, half-open"}


def proc_status(pid):
    rss = next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds


def soak(total, chunk):
    bs = [backend(p) for p in BACKENDS]
    lb = start("lb", "lb", "--cpus", "0")
    wait_port(LB)
    bench(LB, 20000, 20)  # warm up: pools, buffers, allocator arenas
    time.sleep(0.5)
    base = proc_status(lb.pid)
    samples = []
    done = failed = 0
    t0 = time.time()
    while done < total:
        d = bench(LB, chunk, 20)
        done += d["complete"]
        failed += d["failed_total"]
        samples.append({"requests": done, "rss_kb": proc_status(lb.pid)[0], "fds": proc_status(lb.pid)[1]})
    elapsed = time.time() - t0
    time.sleep(1.0)
    end = proc_status(lb.pid)
    report = lb_counters(lb)
    for p in bs:
        stop(p)
    procs.clear()
    return {"requests": done, "failed": failed, "elapsed_s": round(elapsed, 1),
            "rss_kb_baseline": base[0], "rss_kb_end": end[0], "rss_growth_kb": end[0] - base[0],
            "rss_kb_max": max(s["rss_kb"] for s in samples), "fds_baseline": base[1], "fds_end": end[1],
            "samples": samples, "lb_report": report}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="term,kill,idle,storm,soak")
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--soak-requests", type=int, default=1_000_000)
    ap.add_argument("--idle", type=int, default=10_000)
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    ap.add_argument("--render", metavar="CHAOS_JSON", help="rewrite README.md from a saved chaos.json")
    args = ap.parse_args()
    if args.render:
        res = json.load(open(args.render))
        for name in ("term", "kill", "soak"):
            if name in res:
                res[name]["lb_report"] = res[name]["lb_report"].rsplit(
                    "draining (send it again to stop at once)\n", 1)[-1]
        write(res, os.path.dirname(os.path.abspath(args.render)), folder=os.path.dirname(os.path.abspath(args.render)))
        return
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    want = args.only.split(",")
    res = {"started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           # `ringlab --version` carries the git revision the binary was built from.
           "ringlab": subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip(),
           "kernel": " ".join(os.uname()[2:5:2]), "cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    if "term" in want:
        res["term"] = chaos(signal.SIGTERM, args.requests)
        print("term:", summary(res["term"]), flush=True)
    if "kill" in want:
        res["kill"] = chaos(signal.SIGKILL, args.requests)
        print("kill:", summary(res["kill"]), flush=True)
    if "idle" in want:
        res["idle"] = idle(args.idle, 20000)
        print("idle:", res["idle"]["still_open_after_load"], "open,", res["idle"]["bench"]["failed_total"], "failed", flush=True)
    if "storm" in want:
        res["storm"] = storm(5000)
        print("storm:", {k: v for k, v in res["storm"].items()}, flush=True)
    if "soak" in want:
        res["soak"] = soak(args.soak_requests, 100_000)
        print("soak:", {k: v for k, v in res["soak"].items() if k not in ("samples", "lb_report")}, flush=True)
    write(res, args.out)


def summary(r):
    b = r["bench"]
    return (f"{b['complete']} requests, {b['failed_total']} failed {b['failed']}, "
            f"{b['requests_per_sec']:.0f} req/s; after restart: {r['after_restart_spread']}")


def write(res, out, folder=None):
    folder = folder or os.path.join(out, datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-chaos")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "chaos.json"), "w") as f:
        json.dump(res, f, indent=2)
    o = [f"# ringlab on a bad day, {res['started_utc']}\n",
         f"{res['ringlab']}{' (git ' + res['git_revision'] + ')' if 'git_revision' in res else ''}, "
         f"{res['kernel']}, {res['cpus']} CPUs; "
         f"backends on CPU {LAST}, balancer on CPU 0, client on CPU {LAST}. Command: `{res['command']}`\n"]
    for name, label in [("term", "SIGTERM"), ("kill", "SIGKILL")]:
        if name in res:
            r, b = res[name], res[name]["bench"]
            o += [f"## A backend gets {label} mid-run and is restarted (`lb --retry-unanswered`)\n",
                  f"- {b['complete']} requests at c=20 in {r['elapsed_s']} s; backend {BACKENDS[1]} stopped at "
                  f"{r['stopped_at_s']} s, restarted at {r['restarted_at_s']} s",
                  f"- failed: **{b['failed_total']}** {b['failed']}",
                  f"- responses per backend over the run: {b['backends']}",
                  f"- a burst after the restart: {r['after_restart_spread']}",
                  "- balancer counters at its stop:\n\n```\n" + r["lb_report"].strip() + "\n```\n"]
    if "idle" in res:
        r = res["idle"]
        o += ["## Idle connections\n",
              f"- {r['idle_connections']} idle connections held open against one backend; beside them "
              f"{r['bench']['complete']} requests at c=10: **{r['bench']['failed_total']} failed**, "
              f"{r['bench']['requests_per_sec']:.0f} req/s; {r['still_open_after_load']} idle connections still open after.\n"]
    if "storm" in res:
        r = res["storm"]
        o += ["## Slow-client storm\n",
              f"- {r['storm_clients']}",
              f"- 5000 requests at c=5, median of 3: {r['quiet_req_per_sec']:.0f} req/s quiet, "
              f"{r['storm_req_per_sec']:.0f} req/s during the storm "
              f"({r['storm_req_per_sec'] / r['quiet_req_per_sec']:.2f}×), {r['storm_failed']} failed.\n"]
    if "soak" in res:
        r = res["soak"]
        o += ["## Soak\n",
              f"- {r['requests']} requests through the balancer in {r['elapsed_s']} s, {r['failed']} failed",
              f"- balancer RSS: {r['rss_kb_baseline']} KiB after warm-up, {r['rss_kb_max']} KiB at most, "
              f"{r['rss_kb_end']} KiB at the end (**{r['rss_growth_kb']:+} KiB**)",
              f"- open descriptors: {r['fds_baseline']} after warm-up, {r['fds_end']} at the end\n"]
    o.append("`chaos.json` has every number, including the soak's samples.\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(o))
    print("\n".join(o))
    print("wrote", folder)


if __name__ == "__main__":
    main()
