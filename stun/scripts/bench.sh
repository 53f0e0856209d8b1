#!/usr/bin/env bash
# STUN responder throughput on loopback: starts the release `derpfleet-stun` (no rate limit,
# 2 SO_REUSEPORT sockets), offers load with the `stun-bench` example, and prints answers/s plus
# the responder's own CPU time per answer (from /proc, so the figure survives a busy machine).
# Usage: stun/scripts/bench.sh [SECONDS] [RATE]   (run from the workspace root)
#   STUN_BIND=0.0.0.0 binds the responder to the wildcard address (answers then carry packet info);
#   STUN_BIN=path runs another responder build (to compare two builds in one session).
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-5}
rate=${2:-235000}
port=34780
mport=34781
cargo build --release -q -p derpfleet-stun --bin derpfleet-stun --example stun-bench
bin=${STUN_BIN:-target/release/derpfleet-stun}
bind=${STUN_BIND:-127.0.0.1}
bench=target/release/examples/stun-bench

echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# responder $bin bound to $bind:$port"
$bin -a $bind:$port -rate-limit=0 -sockets 2 -metrics-addr 127.0.0.1:$mport >/dev/null 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null || true' EXIT
sleep 0.5
ticks() { awk '{print $14 + $15}' /proc/$srv/stat; }
served() { curl -s http://127.0.0.1:$mport/metrics | sed -n 's/^stun_requests{disposition="success"} //p'; }
hz=$(getconf CLK_TCK)

run() {
  local t0 s0 t1 s1
  t0=$(ticks); s0=$(served)
  $bench --server 127.0.0.1:$port --duration "$secs" "$@"
  t1=$(ticks); s1=$(served)
  awk -v t=$((t1 - t0)) -v s=$((s1 - s0)) -v hz="$hz" -v secs="$secs" 'BEGIN {
    printf "  responder: %d answers, %.2f CPU-seconds (%.0f%% of one core), %.2f us CPU per answer\n",
      s, t / hz, 100 * t / hz / secs, (s > 0 ? 1e6 * t / hz / s : 0) }'
}

run --sockets 4 --rate "$rate"
run --sockets 4 --window 256
kill -TERM $srv
wait $srv
echo "  responder exited with status $? on SIGTERM"
trap - EXIT
