#!/usr/bin/env bash
# What a Prometheus scrape every 100 ms costs the balancer: alternating rounds with and without
# a scraper against `ringlab lb --metrics` over four backends, the client saturating it with new
# connections. Prints req/s per round and the ratio of medians. The scraper is one long-lived
# Python process (a curl per scrape costs more in fork and exec than the scrape itself, on the
# same two cores).
# Usage: scripts/metrics_cost.sh [ROUNDS] [REQUESTS]   (ports 29102-29105, 29144, 29190)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}; N=${2:-50000}
B=target/release/ringlab
cargo build --release -q
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
$B backend --listen 29102 --listen 29103 --listen 29104 --listen 29105 --cpu 1 >/dev/null &
pids+=($!)
$B lb --listen 29144 --backend 29102 --backend 29103 --backend 29104 --backend 29105 \
  --cpus 0 --metrics 29190 >/dev/null &
pids+=($!)
sleep 0.5
rate() { $B bench --cpus 1 -n "$N" -c 50 --format json http://127.0.0.1:29144/ |
  python3 -c 'import json,sys; print(round(json.load(sys.stdin)["requests_per_sec"]))'; }
# The scraper: one long-lived Python process, GET every 100 ms. In the "without" arm the same
# process scrapes a stand-in it serves itself (the same bytes), so both arms carry the
# scraper's own CPU on these two cores and the difference is the balancer's endpoint alone.
scrape_loop() { python3 -c '
import socket, sys, threading, time
port = int(sys.argv[1])
if port == 0:
    body = b"x" * 6000
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(16); port = ls.getsockname()[1]
    def serve():
        while True:
            c, _ = ls.accept(); c.recv(4096)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6000\r\nConnection: close\r\n\r\n" + body); c.close()
    threading.Thread(target=serve, daemon=True).start()
for _ in range(100000):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
    time.sleep(0.1)
' "$1" & scraper=$!; }
with=(); without=()
arm() { scrape_loop "$1"; local r; r=$(rate); kill "$scraper" 2>/dev/null || true; wait "$scraper" 2>/dev/null || true; echo "$r"; }
for r in $(seq 1 "$ROUNDS"); do
  # A B B A ...: neither side always goes first.
  if [ $((r % 2)) = 1 ]; then without+=("$(arm 0)"); with+=("$(arm 29190)")
  else with+=("$(arm 29190)"); without+=("$(arm 0)"); fi
  echo "round $r: scraping a stand-in ${without[-1]} req/s, scraping the balancer every 100 ms ${with[-1]} req/s"
done
# The endpoint's own cost, apart from the scraper's: the balancer's CPU (from /proc) over 2000
# scrapes back to back, with no other traffic.
lb=${pids[1]}
before=$(awk '{print $14+$15}' /proc/$lb/stat)
python3 -c '
import socket
for _ in range(2000):
    s = socket.create_connection(("127.0.0.1", 29190))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
'
after=$(awk '{print $14+$15}' /proc/$lb/stat)
python3 -c "t=($after-$before)/$(getconf CLK_TCK)/2000; print(f'balancer CPU per scrape: {t*1e6:.0f} us; at one scrape per 100 ms {t*10*100:.2f}% of a core')"
python3 - "${without[*]}" "${with[*]}" <<'PY'
import statistics, sys
a = [float(x) for x in sys.argv[1].split()]; b = [float(x) for x in sys.argv[2].split()]
print(f"median without {statistics.median(a):.0f}, with {statistics.median(b):.0f}: "
      f"ratio {statistics.median(b) / statistics.median(a):.3f} (want >= 0.99)")
PY
