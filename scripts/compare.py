#!/usr/bin/env python3
"""Side-by-side comparison, in one run: ringlab lb on each socket driver (io_uring, epoll) against
HAProxy (mode tcp, roundrobin) and nginx stream in front of the same ringlab backends, with the
same cores each (1 and 2), the same client and alternating rounds (A B C D A B C D ...) so drift on
a shared machine hits all alike; ringlab backend on each driver against nginx serving the same tiny
response; and ringlab bench (on each driver) against ab and wrk as clients of nginx.

Reported per server: req/s, p50/p99 latency, CPU time per request (user + system of the server's
processes, from /proc/<pid>/task/*/stat before and after each round), system calls and
io_uring_enter calls per request (perf stat on the server's processes), and reschedule IPIs per
request on the server's cores (/proc/interrupts). Per client: req/s and the client's own CPU per
request. Medians over the rounds; every round is kept in compare.json.

Usage: scripts/compare.sh [--rounds 5] [--requests 50000] [--low-requests 10000]
                          [--concurrency 50,200,1000] [--quick] [--sections l4,l7,direct,clients]
                          [--baseline results/FOLDER [--fail-below 0.95]]
Writes results/<UTC date-time>-compare/{README.md,compare.json}. Needs haproxy, nginx with the
stream module, wrk and ab (the wrapper installs them with apt-get when run as root).

scripts/compare.sh --aborts [--tries 10] instead measures how each balancer passes an abort on:
a backend's reset after part of a response, a 431 for a huge request head (the backend closes
with the head unread, which resets), and a client's reset. Writes results/<date>-aborts/.
"""

import argparse
import atexit
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "ringlab")
HZ = os.sysconf("SC_CLK_TCK")
BACKENDS = [9002, 9003, 9004, 9005]
PORTS = {"ringlab-lb-uring": 44444, "ringlab-lb-epoll": 44447, "haproxy": 44445, "nginx-stream": 44446,
         "ringlab-backend-uring": 45000, "ringlab-backend-epoll": 45002, "nginx": 45001,
         "ringlab-http": 44480, "haproxy-http": 44481, "nginx-proxy": 44482, "ringlab-tcp": 44483}
RESERVED = "9002-9005,44444-44447,44480-44483,45000-45002"
DRIVERS = ["uring", "epoll"]
# l4: TCP balancers; l7: HTTP-aware balancers; direct: HTTP servers; clients: load generators.
SECTIONS = ["l4", "l7", "direct", "clients"]

started = []  # (name, Popen) of everything this script started, stopped at exit by pid
PERF_OUT = os.path.join(tempfile.gettempdir(), f"ringlab-compare-{os.getpid()}.perf")


def stop_all():
    for _, p in reversed(started):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + 15
    for _, p in reversed(started):
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
    started.clear()


def start(name, argv, cpus=None, log_dir=None):
    if cpus is not None:
        argv = ["taskset", "-c", ",".join(map(str, cpus))] + argv
    log = open(os.path.join(log_dir, name + ".log"), "w")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    started.append((name, p))
    return p


def wait_port(port, timeout=10):
    import socket
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing answers on port {port}; see the logs")


def wait_ports_free(ports, timeout=65):
    """Waits until every fixed port can be bound: a port an earlier client took as its ephemeral
    port stays held by TIME_WAIT for 60 s after the reservation stopped new ones taking it."""
    import socket
    end = time.time() + timeout
    told = False
    for port in ports:
        while True:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.time() > end:
                    raise SystemExit(f"port {port} is in use; stop what holds it (ss -tanp | grep :{port})")
                if not told:
                    print(f"waiting for port {port} (and the other fixed ports) to leave TIME_WAIT", flush=True)
                    told = True
                time.sleep(0.5)
            finally:
                s.close()


def pids_of(p):
    """The process and its children (nginx workers)."""
    out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout
    return [p.pid] + [int(x) for x in out.split()]


def cpu_ticks(pids):
    total = 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except FileNotFoundError:
            pass
    return total


def resched_ipis():
    with open("/proc/interrupts") as f:
        for line in f:
            if line.strip().startswith("RES:"):
                return [int(x) for x in line.split()[1:1 + os.cpu_count()]]
    return [0] * os.cpu_count()


def bench(port, n, c, client_cpus, keep_alive=False):
    out = subprocess.run([BIN, "bench", "-n", str(n), "-c", str(c), "--cpus", client_cpus,
                          "--format", "json"] + (["-k"] if keep_alive else []) + [f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench against {port} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def measure_server(name, port, pids, n, c, client_cpus, server_cpus, keep_alive=False):
    a, ia = cpu_ticks(pids), resched_ipis()
    # System calls of the server's processes while the bench runs (all threads, io-wq included).
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter",
                             "-p", ",".join(map(str, pids)), "-o", PERF_OUT],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.1)
    d = bench(port, n, c, client_cpus, keep_alive)
    perf.send_signal(signal.SIGINT)
    perf.wait()
    b, ib = cpu_ticks(pids), resched_ipis()
    counts = {}
    for line in open(PERF_OUT):
        f = line.strip().split(",")
        if len(f) > 2 and f[0].isdigit():
            counts[f[2]] = int(f[0])
    done = max(1, d["complete"])
    ipis = sum(ib[i] - ia[i] for i in server_cpus)
    return {"name": name, "concurrency": c, "requests": d["complete"], "failed": d["failed_total"],
            "req_per_sec": d["requests_per_sec"], "time_per_request_ms": d["time_per_request_ms"],
            "p50_us": d["latency_us"]["p50"], "p99_us": d["latency_us"]["p99"],
            "cpu_us_per_req": (b - a) / HZ * 1e6 / done, "ipis_per_req": ipis / done,
            "syscalls_per_req": counts.get("raw_syscalls:sys_enter", 0) / done,
            "uring_enter_per_req": counts.get("syscalls:sys_enter_io_uring_enter", 0) / done}


def run_client(name, argv):
    before = os.times()
    out = subprocess.run(argv, capture_output=True, text=True)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return out, cpu


def measure_client(name, port, n, c, cpu, wrk_secs):
    url = f"http://127.0.0.1:{port}/"
    pin = ["taskset", "-c", str(cpu)]
    if name.startswith("ringlab-bench-open"):
        # Open loop offered far above what one core can send: the achieved rate is the
        # generator's ceiling (wrk2 is not packaged in Debian; wrk's closed loop is the reference).
        out, t = run_client(name, [BIN, "bench", "--rate", "1m", "-t", f"{wrk_secs}s", "-c", str(c),
                                   "--cpus", str(cpu), "--format", "json", url])
        d = json.loads(out.stdout)
        done, rate, failed = d["complete"], d["requests_per_sec"], d["failed_total"]
    elif name.startswith("ringlab-bench"):
        io = "epoll" if name.endswith("epoll") else "uring"
        out, t = run_client(name, [BIN, "bench", "-n", str(n), "-c", str(c), "--cpus", str(cpu),
                                   "--io", io, "--format", "json", url])
        d = json.loads(out.stdout)
        done, rate, failed = d["complete"], d["requests_per_sec"], d["failed_total"]
    elif name == "ab":
        out, t = run_client(name, pin + ["ab", "-q", "-n", str(n), "-c", str(c), url])
        done = int(re.search(r"Complete requests:\s+(\d+)", out.stdout).group(1))
        failed = int(re.search(r"Failed requests:\s+(\d+)", out.stdout).group(1))
        rate = float(re.search(r"Requests per second:\s+([\d.]+)", out.stdout).group(1))
    else:  # wrk: time-bounded, one thread, a new connection per request
        out, t = run_client(name, pin + ["wrk", "-t1", f"-c{c}", f"-d{wrk_secs}s",
                                         "-H", "Connection: close", url])
        done = int(re.search(r"(\d+) requests in", out.stdout).group(1))
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out.stdout).group(1))
        errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out.stdout)
        failed = sum(int(x) for x in errs.groups()) if errs else 0
    return {"name": name, "concurrency": c, "requests": done, "failed": failed, "req_per_sec": rate,
            "cpu_us_per_req": t * 1e6 / max(1, done)}


def medians(rows, keys):
    out = {}
    for k in keys:
        vals = [r[k] for r in rows]
        out[k] = statistics.median(vals)
        out[k + "_min"], out[k + "_max"] = min(vals), max(vals)
    return out


def machine():
    def sh(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return "unknown"
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                  if l.startswith("model name")), "unknown")
    return {"cpu_model": model, "cpus": os.cpu_count(), "kernel": " ".join(os.uname()[2:5:2]),
            # `ringlab --version` carries the git revision it was built from.
            "ringlab": sh(BIN, "--version"),
            "haproxy": sh("haproxy", "-v").splitlines()[0] if shutil.which("haproxy") else "missing",
            "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
            "wrk": (sh("wrk", "--version") or "wrk").splitlines()[0],
            "started_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": " ".join(sys.argv)}


def haproxy_cfg(path, cores, port, backends=BACKENDS, mode="tcp"):
    nofile = os.sysconf("SC_OPEN_MAX")
    maxconn = max(1000, min(8000, (nofile - 200) // 2))
    servers = "\n".join(f"    server b{i} 127.0.0.1:{p}" for i, p in enumerate(backends))
    with open(path, "w") as f:
        f.write(f"""global
    nbthread {cores}
    cpu-map auto:1/1-{cores} 0-{cores - 1}
    maxconn {maxconn}
defaults
    mode {mode}
    {"http-reuse always" if mode == "http" else ""}
    timeout connect 1s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance roundrobin
{servers}
""")


def nginx_conf(path, tmp, cores, stream_port=None, http_port=None, cpu_mask=None, backends=BACKENDS, proxy_port=None):
    ups = " ".join(f"server 127.0.0.1:{p};" for p in backends)
    body = ""
    head = ""
    if stream_port:
        head = "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
        body = f"stream {{ upstream be {{ {ups} }} server {{ listen 127.0.0.1:{stream_port} reuseport; proxy_pass be; proxy_connect_timeout 1s; }} }}\n"
    if proxy_port:
        body = f"""http {{ access_log off; upstream be {{ {ups} keepalive 64; keepalive_requests 1000000; }}
  server {{ listen 127.0.0.1:{proxy_port} reuseport; keepalive_timeout 65;
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }} }} }}\n"""
    if http_port:
        body = f"""http {{ access_log off; keepalive_timeout 0;
  server {{ listen 127.0.0.1:{http_port} reuseport; location / {{ return 200 "pong\\n"; }} }} }}\n"""
    affinity = cpu_mask or " ".join(format(1 << i, "b") for i in range(cores))
    name = os.path.basename(path)
    with open(path, "w") as f:
        f.write(f"""{head}worker_processes {cores};
worker_cpu_affinity {affinity};
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.err;
daemon off;
events {{ worker_connections 4096; }}
{body}""")


def fmt_table(rows, cols):
    head = "| " + " | ".join(c[0] for c in cols) + " |\n| " + " | ".join("---:" if i else "---" for i in range(len(cols))) + " |\n"
    return head + "".join("| " + " | ".join(c[1](r) for c in cols) + " |\n" for r in rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=50000, help="per round at c=50")
    ap.add_argument("--low-requests", type=int, default=10000, help="per cell at c=1..5")
    ap.add_argument("--concurrency", default="50,200,1000",
                    help="concurrency levels for the balancer and direct tables")
    ap.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="what to measure, of " + ",".join(SECTIONS) + " (all by default)")
    ap.add_argument("--out", default=os.path.join(ROOT, "results"))
    ap.add_argument("--aborts", action="store_true", help="measure how aborts are passed on instead")
    ap.add_argument("--baseline", help="a committed compare results folder to end with `ringlab diff` against")
    ap.add_argument("--fail-below", type=float, help="with --baseline: exit 1 on a cell worse beyond noise and below this ratio")
    ap.add_argument("--tries", type=int, default=10, help="tries per abort scenario (--aborts)")
    args = ap.parse_args()
    if args.aborts:
        return aborts(args)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.sections = [x for x in args.sections.split(",") if x]
    if not args.sections or any(x not in SECTIONS for x in args.sections):
        raise SystemExit(f"--sections takes a list of {','.join(SECTIONS)}")
    if args.quick:
        args.rounds, args.requests, args.low_requests = 1, 2000, 500
        args.concurrency = [args.concurrency[0]]
    for tool in ["haproxy", "nginx", "wrk", "ab", "taskset"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install -y haproxy nginx libnginx-mod-stream wrk apache2-utils")
    if not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"):
        raise SystemExit("nginx's stream module is missing: apt-get install -y libnginx-mod-stream")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    ncpu = os.cpu_count()
    last = ncpu - 1

    # Keep the fixed ports out of the ephemeral range for this run (TIME_WAIT from millions of
    # client ports would otherwise collide with them), and put the old setting back afterwards.
    reserved_path = "/proc/sys/net/ipv4/ip_local_reserved_ports"
    old_reserved = open(reserved_path).read().strip()
    try:
        with open(reserved_path, "w") as f:
            f.write(",".join(x for x in [old_reserved, RESERVED] if x))
        atexit.register(lambda: open(reserved_path, "w").write(old_reserved))
    except PermissionError:
        print(f"note: not root, ports stay in the ephemeral range (sysctl net.ipv4.ip_local_reserved_ports={RESERVED})")
    wait_ports_free(sorted(set(PORTS.values()) | set(BACKENDS)))

    tmp = tempfile.mkdtemp(prefix="ringlab-compare-")
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    # The backends all balancers share: one ringlab process, pinned to the last CPU.
    start("backends", [BIN, "backend", "--cpu", str(last)] + sum((["--listen", str(p)] for p in BACKENDS), []), log_dir=tmp)
    for p in BACKENDS:
        wait_port(p)

    results = {"machine": machine(), "concurrency": args.concurrency, "balancers": {},
               "low_concurrency": [], "direct": [], "direct_low": [], "clients": []}
    for cores in sorted({1, min(2, ncpu)}) if "l4" in args.sections else []:
        lb_cpus = list(range(cores)) if cores > 1 else [0]
        client_cpu = str(last)
        servers = {}
        for io in DRIVERS:
            name = f"ringlab-lb-{io}"
            servers[name] = start(f"{name}-{cores}", [BIN, "lb", "--io", io, "--listen", str(PORTS[name]),
                                  "--cpus", ",".join(map(str, lb_cpus))] + sum((["--backend", str(p)] for p in BACKENDS), []), log_dir=tmp)
        haproxy_cfg(f"{tmp}/haproxy-{cores}.cfg", cores, PORTS["haproxy"])
        servers["haproxy"] = start(f"haproxy-{cores}", ["haproxy", "-f", f"{tmp}/haproxy-{cores}.cfg"], log_dir=tmp)
        nginx_conf(f"{tmp}/nginx-stream-{cores}.conf", tmp, cores, stream_port=PORTS["nginx-stream"])
        servers["nginx-stream"] = start(f"nginx-stream-{cores}", ["nginx", "-c", f"{tmp}/nginx-stream-{cores}.conf"], log_dir=tmp)
        for name in servers:
            wait_port(PORTS[name])
        time.sleep(0.5)
        rows = []
        for c in args.concurrency:
            for r in range(args.rounds):
                for name, proc in servers.items():
                    rows.append(measure_server(name, PORTS[name], pids_of(proc), args.requests, c,
                                               client_cpu, lb_cpus) | {"round": r})
                    print(f"[{cores} core(s), c={c}] round {r + 1}: {name} {rows[-1]['req_per_sec']:.0f} req/s, "
                          f"{rows[-1]['cpu_us_per_req']:.1f} us CPU/req, {rows[-1]['syscalls_per_req']:.2f} syscalls/req",
                          flush=True)
        results["balancers"][str(cores)] = rows
        if cores == 1:
            for r in range(max(1, args.rounds // 2)):
                for c in range(1, 6):
                    for name, proc in servers.items():
                        results["low_concurrency"].append(measure_server(
                            name, PORTS[name], pids_of(proc), args.low_requests, c, client_cpu, lb_cpus) | {"round": r})
        for name, proc in servers.items():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
        started[:] = [s for s in started if s[1].poll() is None]

    if "l7" in args.sections:
        # HTTP-aware balancers, 2 threads or workers each, over the same backends; ringlab's TCP mode
        # beside them for the L7/L4 ratio.
        cores = min(2, ncpu)
        lb_cpus = list(range(cores))
        l7 = {}
        l7["ringlab-http"] = start("ringlab-http", [BIN, "lb", "--mode", "http", "--listen", str(PORTS["ringlab-http"]),
                                   "--cpus", ",".join(map(str, lb_cpus))] + sum((["--backend", str(p)] for p in BACKENDS), []), log_dir=tmp)
        l7["ringlab-tcp"] = start("ringlab-tcp", [BIN, "lb", "--listen", str(PORTS["ringlab-tcp"]),
                                  "--cpus", ",".join(map(str, lb_cpus))] + sum((["--backend", str(p)] for p in BACKENDS), []), log_dir=tmp)
        haproxy_cfg(f"{tmp}/haproxy-http.cfg", cores, PORTS["haproxy-http"], mode="http")
        l7["haproxy-http"] = start("haproxy-http", ["haproxy", "-f", f"{tmp}/haproxy-http.cfg"], log_dir=tmp)
        nginx_conf(f"{tmp}/nginx-proxy.conf", tmp, cores, proxy_port=PORTS["nginx-proxy"])
        l7["nginx-proxy"] = start("nginx-proxy", ["nginx", "-c", f"{tmp}/nginx-proxy.conf"], log_dir=tmp)
        for name in l7:
            wait_port(PORTS[name])
        time.sleep(0.5)
        results["l7"] = []
        for keep_alive in (False, True):
            for r in range(args.rounds):
                for name, proc in l7.items():
                    results["l7"].append(measure_server(name, PORTS[name], pids_of(proc), args.requests, args.concurrency[0],
                                                        str(last), lb_cpus, keep_alive) | {"round": r, "keep_alive": keep_alive})
                    print(f"[l7, keep-alive {keep_alive}] round {r + 1}: {name} {results['l7'][-1]['req_per_sec']:.0f} req/s, "
                          f"{results['l7'][-1]['cpu_us_per_req']:.1f} us CPU/req", flush=True)
        results["l7_low"] = []
        for r in range(max(1, args.rounds // 2)):
            for c in range(1, 6):
                for name, proc in l7.items():
                    results["l7_low"].append(measure_server(name, PORTS[name], pids_of(proc), args.low_requests, c, str(last), lb_cpus) | {"round": r})
        for name, proc in l7.items():
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
        started[:] = [s for s in started if s[1].poll() is None]

    if "direct" in args.sections:
        # Direct servers: the server on the last CPU, the client on the first.
        direct = {}
        for io in DRIVERS:
            name = f"ringlab-backend-{io}"
            direct[name] = start(name, [BIN, "backend", "--io", io, "--listen", str(PORTS[name]), "--cpu", str(last)], log_dir=tmp)
        nginx_conf(f"{tmp}/nginx-http.conf", tmp, 1, http_port=PORTS["nginx"], cpu_mask=format(1 << last, "b"))
        direct["nginx"] = start("nginx-http", ["nginx", "-c", f"{tmp}/nginx-http.conf"], log_dir=tmp)
        for name in direct:
            wait_port(PORTS[name])
        for c in args.concurrency:
            for r in range(args.rounds):
                for name, proc in direct.items():
                    results["direct"].append(measure_server(name, PORTS[name], pids_of(proc), args.requests, c, "0", [last]) | {"round": r})
        for r in range(max(1, args.rounds // 2)):
            for c in range(1, 6):
                for name, proc in direct.items():
                    results["direct_low"].append(measure_server(name, PORTS[name], pids_of(proc), args.low_requests, c, "0", [last]) | {"round": r})
    # Clients against nginx, each pinned to the first CPU.
    wrk_secs = max(1, round(args.requests / 15000))
    c0 = args.concurrency[0]
    if "clients" in args.sections and "direct" not in args.sections:
        nginx_conf(f"{tmp}/nginx-http.conf", tmp, 1, http_port=PORTS["nginx"], cpu_mask=format(1 << last, "b"))
        start("nginx-http", ["nginx", "-c", f"{tmp}/nginx-http.conf"], log_dir=tmp)
        wait_port(PORTS["nginx"])
    for r in range(args.rounds if "clients" in args.sections else 0):
        for name in ["ringlab-bench-uring", "ringlab-bench-epoll", "ab", "wrk", "ringlab-bench-open"]:
            results["clients"].append(measure_client(name, PORTS["nginx"], args.requests, c0, 0, wrk_secs) | {"round": r})
    stop_all()
    write(results, args)


def write(res, args):
    m = res["machine"]
    part = "" if args.sections == SECTIONS else "-" + "-".join(args.sections)
    folder = os.path.join(args.out, datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-compare" + part)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "compare.json"), "w") as f:
        json.dump(res, f, indent=2)
    keys = ["req_per_sec", "cpu_us_per_req", "p50_us", "p99_us", "ipis_per_req", "time_per_request_ms",
            "syscalls_per_req", "uring_enter_per_req"]

    def summarize(rows, group):
        names = list(dict.fromkeys(r["name"] for r in rows))
        return [dict(name=n, **medians([r for r in rows if r["name"] == n], group)) for n in names]

    def at(rows, c):
        return [r for r in rows if r.get("concurrency") == c]

    levels = res.get("concurrency") or [50]
    o = [f"# ringlab vs HAProxy and nginx, io_uring and epoll, {m['started_utc']}\n",
         "| | |\n| --- | --- |",
         f"| Machine | {m['cpu_model']}, {m['cpus']} CPUs |", f"| Kernel | {m['kernel']} |",
         f"| ringlab | {m['ringlab']} |",
         f"| Peers | {m['haproxy']}; {m['nginx']}; {m['wrk']} |",
         f"| Command | `{m['command']}` |",
         f"| Method | {args.rounds} alternating rounds (A B C D A B C D …), medians with [min–max]; "
         f"{args.requests} requests per round at each concurrency, a new connection per request "
         "(`ringlab bench`, closed loop); CPU is user+system of the server's processes per request; "
         "system calls and io_uring_enter per request from `perf stat` on the server's processes; "
         "IPIs are reschedule interrupts on the server's cores per request |\n"]
    rate = lambda r: f"{r['req_per_sec']:.0f} [{r['req_per_sec_min']:.0f}–{r['req_per_sec_max']:.0f}]"
    cpu = lambda r: f"{r['cpu_us_per_req']:.1f} [{r['cpu_us_per_req_min']:.1f}–{r['cpu_us_per_req_max']:.1f}]"
    cols = [("server", lambda r: r["name"]), ("req/s", rate), ("p50 µs", lambda r: f"{r['p50_us']:.0f}"),
            ("p99 µs", lambda r: f"{r['p99_us']:.0f}"), ("CPU µs/request", cpu),
            ("syscalls/request", lambda r: f"{r['syscalls_per_req']:.2f}"),
            ("io_uring_enter/request", lambda r: f"{r['uring_enter_per_req']:.2f}"),
            ("IPIs/request", lambda r: f"{r['ipis_per_req']:.2f}")]

    def ratios(s, ours, theirs):
        a = next(x for x in s if x["name"] == ours)
        b = next(x for x in s if x["name"] == theirs)
        return a["req_per_sec"] / b["req_per_sec"], a["cpu_us_per_req"] / b["cpu_us_per_req"]

    summary = ["## Summary: ratios, medians of the same run\n",
               "| comparison | c | req/s ratio | CPU/request ratio |", "| --- | ---: | ---: | ---: |"]
    for cores, rows in res["balancers"].items():
        o.append(f"## Balancers on {cores} core(s)\n")
        o.append(f"Placement: balancer on CPU {'0' if cores == '1' else '0-1'}; backends (`ringlab backend`, "
                 "io_uring) and client on the last CPU.\n")
        for c in levels:
            s = summarize(at(rows, c), keys)
            if not s:
                continue
            o.append(f"### c={c}\n")
            o.append(fmt_table(s, cols))
            o.append("")
            rr, cr = ratios(s, "ringlab-lb-uring", "ringlab-lb-epoll")
            summary.append(f"| lb io_uring / lb epoll, {cores} core(s) | {c} | {rr:.2f}× | {cr:.2f}× |")
            peers = [x for x in s if not x["name"].startswith("ringlab")]
            best = max(peers, key=lambda x: x["req_per_sec"])
            lb = next(x for x in s if x["name"] == "ringlab-lb-uring")
            summary.append(f"| lb io_uring / best peer ({best['name']}), {cores} core(s) | {c} | "
                           f"{lb['req_per_sec'] / best['req_per_sec']:.2f}× | "
                           f"{lb['cpu_us_per_req'] / best['cpu_us_per_req']:.2f}× |")
    if res["low_concurrency"]:
        o.append("## Time per request through each balancer at c=1..5 (1 core, ms, median)\n")
        names = list(dict.fromkeys(r["name"] for r in res["low_concurrency"]))
        o.append("| c | " + " | ".join(names) + " | lb io_uring / epoll |\n| ---: |" + " ---: |" * (len(names) + 1))
        for c in range(1, 6):
            med = {n: statistics.median(r["time_per_request_ms"] for r in res["low_concurrency"]
                                        if r["name"] == n and r["concurrency"] == c) for n in names}
            o.append(f"| {c} | " + " | ".join(f"{med[n]:.3f}" for n in names)
                     + f" | {med['ringlab-lb-uring'] / med['ringlab-lb-epoll']:.2f}× |")
        o.append("")
    if res.get("l7"):
        o.append("## HTTP-aware balancers, 2 cores each, c=%d\n" % levels[0])
        o.append("`ringlab lb --mode http` (pooled keep-alive backend connections) beside HAProxy `mode http` + "
                 "`http-reuse always` and nginx `proxy_pass` + upstream `keepalive 64`, each with 2 threads or "
                 "workers on CPUs 0-1, and ringlab's TCP mode, over the same `ringlab backend`s on the last CPU.\n")
        for keep_alive in (False, True):
            rows = [r for r in res["l7"] if r.get("keep_alive") == keep_alive]
            s7 = summarize(rows, keys)
            o.append(f"### {'Keep-alive clients (`-k`)' if keep_alive else 'A new client connection per request'}\n")
            o.append(fmt_table(s7, cols))
            o.append("")
            peers = [x for x in s7 if not x["name"].startswith("ringlab")]
            best = max(peers, key=lambda x: x["req_per_sec"])
            low = min(peers, key=lambda x: x["cpu_us_per_req"])
            ours = next(x for x in s7 if x["name"] == "ringlab-http")
            tcp = next(x for x in s7 if x["name"] == "ringlab-tcp")
            kind = "keep-alive clients" if keep_alive else "new connections"
            summary.append(f"| http-mode lb / best L7 peer ({best['name']}), {kind} | {levels[0]} | "
                           f"{ours['req_per_sec'] / best['req_per_sec']:.2f}× | "
                           f"{ours['cpu_us_per_req'] / low['cpu_us_per_req']:.2f}× (vs {low['name']}) |")
            summary.append(f"| http-mode lb / ringlab tcp mode, {kind} | {levels[0]} | "
                           f"{ours['req_per_sec'] / tcp['req_per_sec']:.2f}× | "
                           f"{ours['cpu_us_per_req'] / tcp['cpu_us_per_req']:.2f}× |")
    if res.get("l7_low"):
        o.append("### Time per request through each HTTP-aware balancer at c=1..5 (ms, median)\n")
        names = list(dict.fromkeys(r["name"] for r in res["l7_low"]))
        o.append("| c | " + " | ".join(names) + " |\n| ---: |" + " ---: |" * len(names))
        for c in range(1, 6):
            med = {n: statistics.median(r["time_per_request_ms"] for r in res["l7_low"]
                                        if r["name"] == n and r["concurrency"] == c) for n in names}
            o.append(f"| {c} | " + " | ".join(f"{med[n]:.3f}" for n in names) + " |")
        o.append("")
    if res["direct"]:
        o.append("## Direct servers (server on the last CPU, client on CPU 0)\n")
    for c in levels:
        s = summarize(at(res["direct"], c), keys)
        if not s:
            continue
        o.append(f"### c={c}\n")
        o.append(fmt_table(s, cols))
        o.append("")
        rr, cr = ratios(s, "ringlab-backend-uring", "ringlab-backend-epoll")
        summary.append(f"| backend io_uring / backend epoll | {c} | {rr:.2f}× | {cr:.2f}× |")
        rr, cr = ratios(s, "ringlab-backend-uring", "nginx")
        summary.append(f"| backend io_uring / nginx | {c} | {rr:.2f}× | {cr:.2f}× |")
    if res.get("direct_low"):
        o.append("## Time per request from each direct server at c=1..5 (ms, median)\n")
        names = list(dict.fromkeys(r["name"] for r in res["direct_low"]))
        o.append("| c | " + " | ".join(names) + " | backend io_uring / epoll |\n| ---: |" + " ---: |" * (len(names) + 1))
        for c in range(1, 6):
            med = {n: statistics.median(r["time_per_request_ms"] for r in res["direct_low"]
                                        if r["name"] == n and r["concurrency"] == c) for n in names}
            o.append(f"| {c} | " + " | ".join(f"{med[n]:.3f}" for n in names)
                     + f" | {med['ringlab-backend-uring'] / med['ringlab-backend-epoll']:.2f}× |")
        o.append("")
    if res["clients"]:
        s = summarize(res["clients"], ["req_per_sec", "cpu_us_per_req"])
        o.append(f"## Clients against nginx, c={levels[0]}, pinned to CPU 0\n")
        o.append(fmt_table(s, [("client", lambda r: r["name"]), ("req/s", rate), ("client CPU µs/request", cpu)]))
    o = o[:8] + summary + [""] + o[8:]
    o.append("\n`compare.json` holds every round.\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(o))
    print("\n".join(o))
    print(f"wrote {folder}")
    if args.baseline:
        # End with `ringlab diff` against the committed baseline (written beside the results).
        cmd = [BIN, "diff", args.baseline, folder, "--out", os.path.join(folder, "diff")]
        if args.fail_below:
            cmd += ["--fail-below", str(args.fail_below)]
        d = subprocess.run(cmd, capture_output=True, text=True)
        print(d.stdout + d.stderr)
        if d.returncode != 0:
            sys.exit(d.returncode)


def stand_in(port, serve):
    """A misbehaving backend on `port`: `serve(conn)` runs on a thread per connection."""
    import socket
    import threading
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(256)

    def loop():
        while True:
            c, _ = ls.accept()
            threading.Thread(target=serve, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()


def end_of(sock, limit=1 << 22):
    """Reads until the peer ends: (first bytes, 'reset' | 'end-of-file' | 'timeout')."""
    import socket
    got = b""
    sock.settimeout(10)
    try:
        while len(got) < limit:
            d = sock.recv(65536)
            if not d:
                return got, "end-of-file"
            got += d
        return got, "too much"
    except ConnectionResetError:
        return got, "reset"
    except socket.timeout:
        return got, "timeout"


def aborts(args):
    """How each balancer passes an abort on, counted over --tries tries per scenario."""
    import socket
    import struct
    import threading
    import collections
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="ringlab-aborts-")
    atexit.register(stop_all)
    partial, refusing, watching = 29101, 29102, 29103
    linger0 = struct.pack("ii", 1, 0)

    def partial_then_reset(c):
        c.recv(65536)
        c.sendall(b"HTTP/1.0 200 OK\r\n\r\npartial-body")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
        c.close()
    client_ends = collections.Counter()

    def watch_client_end(c):
        c.recv(5)
        c.sendall(b"ok")
        _, how = end_of(c)
        client_ends[how] += 1
    stand_in(partial, partial_then_reset)
    stand_in(watching, watch_client_end)
    start("backend-431", [BIN, "backend", "--listen", str(refusing), "--cpu", str(os.cpu_count() - 1)], log_dir=tmp)
    wait_port(refusing)
    rows = []
    for name in ["ringlab-lb", "haproxy", "nginx-stream"]:
        per = {}
        for scenario, backend in [("partial", partial), ("431-200KB", refusing), ("431-1MiB", refusing),
                                  ("client-reset", watching)]:
            port = 29110
            if name == "ringlab-lb":
                proc = start(f"{name}-{scenario}", [BIN, "lb", "--listen", str(port), "--backend", str(backend)], log_dir=tmp)
            elif name == "haproxy":
                haproxy_cfg(f"{tmp}/h-{scenario}.cfg", 1, port, backends=[backend])
                proc = start(f"{name}-{scenario}", ["haproxy", "-f", f"{tmp}/h-{scenario}.cfg"], log_dir=tmp)
            else:
                nginx_conf(f"{tmp}/n-{scenario}.conf", tmp, 1, stream_port=port, backends=[backend])
                proc = start(f"{name}-{scenario}", ["nginx", "-c", f"{tmp}/n-{scenario}.conf"], log_dir=tmp)
            wait_port(port)
            # The port probe reaches the backend too; let its end be counted, then forget it.
            time.sleep(0.3)
            seen = collections.Counter()
            client_ends.clear()
            for _ in range(args.tries):
                s = socket.create_connection(("127.0.0.1", port))
                if scenario.startswith("431"):
                    size = 200_000 if scenario.endswith("200KB") else 1 << 20
                    head = b"GET / HTTP/1.1\r\nX: " + b"a" * size + b"\r\n\r\n"
                    t = threading.Thread(target=s.sendall, args=(head,), daemon=True)
                    t.start()
                    got, how = end_of(s)
                    seen[(got[:12].decode(errors="replace") or "no bytes") + ", then " + how] += 1
                elif scenario == "partial":
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    got, how = end_of(s)
                    seen[f"{len(got)} bytes, then {how}"] += 1
                else:
                    s.sendall(b"hello")
                    s.recv(2)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger0)
                s.close()
            if scenario == "client-reset":
                time.sleep(0.5)
                seen = collections.Counter({f"backend read {k}": v for k, v in client_ends.items()})
            per[scenario] = dict(seen)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
            print(f"{name} {scenario}: {dict(seen)}", flush=True)
        rows.append((name, per))
    m = machine()
    folder = os.path.join(args.out, datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S") + "-aborts")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "aborts.json"), "w") as f:
        json.dump({"machine": m, "tries": args.tries, "balancers": dict(rows)}, f, indent=2)
    fmt = lambda d: "; ".join(f"{v}× {k}" for k, v in sorted(d.items()))
    o = [f"# How balancers pass aborts on, {m['started_utc']}\n", "| | |\n| --- | --- |",
         f"| Machine | {m['cpu_model']}, {m['cpus']} CPUs |", f"| Kernel | {m['kernel']} |",
         f"| ringlab | {m['ringlab']} |",
         f"| Peers | {m['haproxy']}; {m['nginx']} |", f"| Command | `{m['command']}` |",
         f"| Method | {args.tries} tries per scenario, each balancer in front of one backend on loopback |\n",
         "| scenario | what a direct client sees | " + " | ".join(n for n, _ in rows) + " |",
         "| --- | --- |" + " --- |" * len(rows)]
    direct = {"partial": "31 bytes (head and 12 body bytes), then a reset (curl exits 56)",
              "431-200KB": "431, then end-of-file", "431-1MiB": "431, then end-of-file",
              "client-reset": "(the backend reads a reset)"}
    for scenario in ["partial", "431-200KB", "431-1MiB", "client-reset"]:
        o.append(f"| {scenario} | {direct[scenario]} | " + " | ".join(fmt(per[scenario]) for _, per in rows) + " |")
    o.append("\n`partial`: the backend sends `HTTP/1.0 200 OK` and 12 body bytes with no length, then resets. "
             "`431-*`: `ringlab backend` refuses a head of that size with 431 and closes with the rest unread. "
             "`client-reset`: the client sends 5 bytes, reads the answer, then resets.\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write("\n".join(o))
    print("\n".join(o))
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
