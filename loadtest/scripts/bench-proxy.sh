#!/usr/bin/env bash
# PROXY protocol cost: derpfleet-loadtest through the same HAProxy (TCP mode) to two relays, one
# plain (HAProxy forwards bytes only) and one with -proxy-protocol-trusted (HAProxy sends a v2
# header from 127.0.0.9). Both paths are identical except for the header and its parsing, so the
# difference is the PROXY listener's cost. Runs alternate A, B, A, B… in one invocation.
# Usage (from the workspace root): loadtest/scripts/bench-proxy.sh [SECONDS] [ROUNDS] [OUTDIR]
# Env: BIN (release binaries, default target/release).
set -euo pipefail
secs=${1:-10}
rounds=${2:-3}
out=${3:-/tmp/derpfleet-bench-proxy}
bin=${BIN:-target/release}
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

base=$((21000 + RANDOM % 1000))
plain_relay=$base; pp_relay=$((base + 1)); plain_front=$((base + 2)); pp_front=$((base + 3))
"$bin/derpfleet-relay" -a 127.0.0.1:$plain_relay -c "$work/a.key" -stun=false -metrics-addr= >"$work/a.log" 2>&1 &
plain_pid=$!; pids+=("$plain_pid")
"$bin/derpfleet-relay" -a 127.0.0.1:$pp_relay -c "$work/b.key" -stun=false -metrics-addr= \
  -proxy-protocol-trusted 127.0.0.9 >"$work/b.log" 2>&1 &
pp_pid=$!; pids+=("$pp_pid")
cat >"$work/haproxy.cfg" <<CFG
global
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend plain
  bind 127.0.0.1:$plain_front
  default_backend plain
backend plain
  server r 127.0.0.1:$plain_relay source 127.0.0.9
frontend proxied
  bind 127.0.0.1:$pp_front
  default_backend proxied
backend proxied
  server r 127.0.0.1:$pp_relay send-proxy-v2 source 127.0.0.9
CFG
haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
pids+=("$!")
sleep 1.5

run() { # name port relay-pid scenario args...
  local name=$1 port=$2 pid=$3; shift 3
  echo "+ $name: derpfleet-loadtest $* (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  "$bin/derpfleet-loadtest" "$@" --url "http://127.0.0.1:$port/derp" --relay-pid "$pid" --json >"$out/$name.json"
}
for r in $(seq 1 "$rounds"); do
  run "plain-tput-$r" $plain_front $plain_pid throughput --pairs 8 --duration "${secs}s"
  run "proxy-tput-$r" $pp_front $pp_pid throughput --pairs 8 --duration "${secs}s"
  run "plain-churn-$r" $plain_front $plain_pid churn --rate 200 --duration 5s
  run "proxy-churn-$r" $pp_front $pp_pid churn --rate 200 --duration 5s
done
echo "| run | received pkt/s | Mbit/s | loss % | relay CPU µs/pkt |"
echo "|---|---|---|---|---|"
for f in "$out"/*-tput-*.json; do
  jq -r --arg n "$(basename "$f" .json)" '"| \($n) | \(.results.received_pps|floor) | \(.results.received_mbps|floor) | \(.results.loss_pct) | \(.results.relay_cpu_us_per_event) |"' "$f"
done
echo
echo "| run | handshakes ok / failed | handshake p50 / p99 µs | relay CPU µs/handshake |"
echo "|---|---|---|---|"
for f in "$out"/*-churn-*.json; do
  jq -r --arg n "$(basename "$f" .json)" '"| \($n) | \(.results.succeeded) / \(.results.failed) | \(.latency_us.p50_us) / \(.latency_us.p99_us) | \(.results.relay_cpu_us_per_event) |"' "$f"
done
