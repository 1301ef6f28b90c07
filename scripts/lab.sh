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
# NETNS=1 (root) runs each role in its own network namespace (`ringlab netlab up --prefix rlab`:
# client 198.18.0.1, balancer .2, backends, direct and threaded .3, joined by veth pairs to a
# bridge) instead of on loopback, and removes the namespaces at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --quiet
bin=./target/release/ringlab
last_cpu=$(( $(nproc) - 1 ))
LB_CPU=${LB_CPU:-0}
SERVER_CPU=${SERVER_CPU:-$last_cpu}
CLIENT_CPU=${CLIENT_CPU:-0}
IO=${IO:-uring}
NETNS=${NETNS:-0}
if [ "$NETNS" = 1 ]; then
  "$bin" netlab up --prefix rlab >/dev/null
  CLIENT_NS=(ip netns exec rlab-client); LB_NS=(ip netns exec rlab-lb); SERVER_NS=(ip netns exec rlab-backends)
  LB_ADDR=198.18.0.2; SERVER_ADDR=198.18.0.3; label=handout-netns
else
  CLIENT_NS=(); LB_NS=(); SERVER_NS=(); LB_ADDR=127.0.0.1; SERVER_ADDR=127.0.0.1; label=handout
fi

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "$NETNS" = 1 ]; then "$bin" netlab down --prefix rlab >/dev/null || true; fi
}
trap stop_all EXIT INT TERM

logdir=$(mktemp -d)
# start NAME NAMESPACE-PREFIX-VAR ARGS...: `ip netns exec` replaces itself with ringlab, so the
# pid recorded is the server's own.
start() {
  local name=$1 ns=$2
  shift 2
  local -n prefix=$ns
  "${prefix[@]}" "$bin" "$@" >"$logdir/$name.log" 2>&1 &
  pids+=($!)
}

for port in 9002 9003 9004 9005; do
  start "backend-$port" SERVER_NS backend --listen "$SERVER_ADDR:$port" --cpu "$SERVER_CPU" --io "$IO"
done
start lb LB_NS lb --listen "$LB_ADDR:44444" --cpus "$LB_CPU" --io "$IO" \
  --backend "$SERVER_ADDR:9002" --backend "$SERVER_ADDR:9003" \
  --backend "$SERVER_ADDR:9004" --backend "$SERVER_ADDR:9005"
start direct SERVER_NS backend --listen "$SERVER_ADDR:45000" --cpu "$SERVER_CPU" --io "$IO"
start threaded SERVER_NS threaded --listen "$SERVER_ADDR:46000"

# Wait until every port answers (or a server died: its log says why).
addr_of() { if [ "$1" = 44444 ]; then echo "$LB_ADDR"; else echo "$SERVER_ADDR"; fi; }
for port in 9002 9003 9004 9005 44444 45000 46000; do
  for _ in $(seq 1 100); do
    if "${CLIENT_NS[@]}" bash -c "exec 3<>/dev/tcp/$(addr_of "$port")/$port" 2>/dev/null; then break; fi
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

"${CLIENT_NS[@]}" "$bin" sweep \
  --target "lb=$LB_ADDR:44444" --target "direct=$SERVER_ADDR:45000" --target "threaded=$SERVER_ADDR:46000" \
  --client-cpus "$CLIENT_CPU" --label "$label" --io "$IO" \
  --target-pid "lb=${pids[4]},${pids[0]},${pids[1]},${pids[2]},${pids[3]}" \
  --target-pid "direct=${pids[5]}" --target-pid "threaded=${pids[6]}" \
  --note "separate processes, sockets on $IO$( [ "$NETNS" = 1 ] && echo ", each role in its own network namespace (client 198.18.0.1, lb .2, servers .3; veth pairs to a bridge)"): four backends (9002-9005) and direct (45000) on CPU $SERVER_CPU, lb (44444) on CPU $LB_CPU, threaded (46000) unpinned" \
  "$@"

stop_all
trap - EXIT INT TERM
echo "server logs (counters printed on stop): $logdir"
