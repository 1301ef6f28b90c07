#!/usr/bin/env bash
# The lab the way its handout reads: four backend processes on 9002-9005, the round-robin
# balancer on 44444 in front of them, a direct async server on 45000 and the thread-per-connection
# server on 46000, each started as its own `ringlab` process; then `ringlab sweep --target ...`
# measures them, and exactly the processes started here are stopped (by pid) on the way out.
#
# Usage: scripts/lab.sh [extra sweep flags, e.g. -n 1000 -c 1-5 --repeat 3 --label handout]
# Placement (2 CPUs): backends, direct and threaded on the last CPU; the balancer on the first;
# the client on the first. Override with LB_CPU, SERVER_CPU, CLIENT_CPU. Socket driver of the
# servers, the balancer and the client: IO=uring (default) or IO=epoll.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
bin=./target/release/ringlab
last_cpu=$(( $(nproc) - 1 ))
LB_CPU=${LB_CPU:-0}
SERVER_CPU=${SERVER_CPU:-$last_cpu}
CLIENT_CPU=${CLIENT_CPU:-0}
IO=${IO:-uring}

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT INT TERM

logdir=$(mktemp -d)
start() {
  local name=$1
  shift
  "$bin" "$@" >"$logdir/$name.log" 2>&1 &
  pids+=($!)
}

for port in 9002 9003 9004 9005; do
  start "backend-$port" backend --listen "127.0.0.1:$port" --cpu "$SERVER_CPU" --io "$IO"
done
start lb lb --listen 127.0.0.1:44444 --cpus "$LB_CPU" --io "$IO" \
  --backend 127.0.0.1:9002 --backend 127.0.0.1:9003 \
  --backend 127.0.0.1:9004 --backend 127.0.0.1:9005
start direct backend --listen 127.0.0.1:45000 --cpu "$SERVER_CPU" --io "$IO"
start threaded threaded --listen 127.0.0.1:46000

# Wait until every port answers (or a server died: its log says why).
for port in 9002 9003 9004 9005 44444 45000 46000; do
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.05
  done
done
for pid in "${pids[@]}"; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "a server failed to start:" >&2
    cat "$logdir"/*.log >&2
    exit 1
  fi
done

"$bin" sweep \
  --target lb=127.0.0.1:44444 --target direct=127.0.0.1:45000 --target threaded=127.0.0.1:46000 \
  --client-cpus "$CLIENT_CPU" --label handout --io "$IO" \
  --target-pid "lb=${pids[4]},${pids[0]},${pids[1]},${pids[2]},${pids[3]}" \
  --target-pid "direct=${pids[5]}" --target-pid "threaded=${pids[6]}" \
  --note "separate processes, sockets on $IO: four backends (9002-9005) and direct (45000) on CPU $SERVER_CPU, lb (44444) on CPU $LB_CPU, threaded (46000) unpinned" \
  "$@"

stop_all
trap - EXIT INT TERM
echo "server logs (counters printed on stop): $logdir"
