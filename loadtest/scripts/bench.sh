#!/usr/bin/env bash
# Relay benchmark sweep with derpfleet-loadtest against a local release derpfleet-relay.
# Usage (from the workspace root): loadtest/scripts/bench.sh [plain|tls] [SECONDS] [OUTDIR]
# Env: BIN (directory of release binaries, default target/release; build them first with
#      cargo build --release -p derpfleet-relay -p derpfleet-loadtest), QDEPTH (sets the relay's
#      TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH), SKIP_CONNS=1 (no idle-connection/churn runs),
#      SKIP_FLOWS=1 (no throughput/pingpong runs).
# Every run's JSON lands in OUTDIR; a Markdown table is printed at the end.
set -euo pipefail
mode=${1:-plain}
secs=${2:-10}
out=${3:-/tmp/derpfleet-bench-$mode}
bin=${BIN:-target/release}
mkdir -p "$out"
rm -f "$out/ORDER"
work=$(mktemp -d)
relay_pid=""
cleanup() { [ -n "$relay_pid" ] && kill "$relay_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

start_relay() {
  [ -n "$relay_pid" ] && { kill "$relay_pid"; wait "$relay_pid" 2>/dev/null || true; }
  # Below the ephemeral range (32768-60999): after 10k connections their TIME_WAIT ports would
  # make the listen address busy.
  local port=$((20000 + RANDOM % 1000))
  local args=(-a 127.0.0.1:$port -c "$work/key.json" -stun=false)
  if [ "$mode" = tls ]; then
    args+=(-certmode manual -hostname 127.0.0.1 -http-port -1 -certdir "$work/certs")
    url="https://127.0.0.1:$port/derp"
  else
    url="http://127.0.0.1:$port/derp"
  fi
  if [ -n "${QDEPTH:-}" ]; then
    TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH=$QDEPTH "$bin/derpfleet-relay" "${args[@]}" >"$work/relay.log" 2>&1 &
  else
    "$bin/derpfleet-relay" "${args[@]}" >"$work/relay.log" 2>&1 &
  fi
  relay_pid=$!
  sleep 1
  kill -0 "$relay_pid" 2>/dev/null || { echo "relay did not start:" >&2; cat "$work/relay.log" >&2; exit 1; }
}

lt() { # name, args...
  local name=$1; shift
  echo "+ derpfleet-loadtest $* --url $url --relay-pid \$RELAY --json  # load $(cut -d' ' -f1 /proc/loadavg)" >&2
  "$bin/derpfleet-loadtest" "$@" --url "$url" --insecure --relay-pid "$relay_pid" --json >"$out/$name.json"
  echo "$name" >>"$out/ORDER"
}

echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); mode $mode; queue depth ${QDEPTH:-default}" | tee "$out/HOST"
start_relay
if [ -z "${SKIP_FLOWS:-}" ]; then
lt pingpong8 pingpong --pairs 8 --duration "${secs}s"
for p in 1 8 64; do
  lt "tp${p}_unthrottled" throughput --pairs $p --duration "${secs}s"
done
for r in 64000 128000 192000 256000 384000; do
  lt "tp1_rate$r" throughput --pairs 1 --rate $r --duration "${secs}s"
done
for r in 8000 12000 16000 24000 32000 40000 48000; do
  lt "tp8_rate$r" throughput --pairs 8 --rate $r --duration "${secs}s"
done
for r in 1000 2000 3000 4000; do
  lt "tp64_rate$r" throughput --pairs 64 --rate $r --duration "${secs}s"
done
fi
if [ -z "${SKIP_CONNS:-}" ]; then
  start_relay # fresh relay: memory per connection from a clean start
  lt conns10k connections --count 10000 --concurrency 128 --hold 3s
  start_relay
  lt conns10k_ws connections --count 10000 --concurrency 128 --hold 3s --websocket
  lt churn churn --rate 1000 --duration "${secs}s"
fi

echo
[ -z "${SKIP_FLOWS:-}" ] && {
echo "| run | pairs | rate/sender | sent pps | received pps | loss % | Mbit/s recv | latency p50 / p99 µs | relay CPU µs/pkt |"
echo "|---|---|---|---|---|---|---|---|---|"
for n in $(grep '^tp' "$out/ORDER"); do
  f="$out/$n.json"
  jq -r --arg n "$(basename "$f" .json)" '"| \($n) | \(.config.pairs) | \(.config.rate_per_sender // "unthrottled") | \(.results.sent_pps|floor) | \(.results.received_pps|floor) | \(.results.loss_pct) | \(.results.received_mbps|floor) | \(.latency_us.p50_us) / \(.latency_us.p99_us) | \(.results.relay_cpu_us_per_event) |"' "$f"
done
}
[ -z "${SKIP_FLOWS:-}" ] && jq -r '"\npingpong 8 pairs: \(.results.round_trips_per_s|floor) round trips/s, RTT p50 \(.latency_us.p50_us) µs, p90 \(.latency_us.p90_us) µs, p99 \(.latency_us.p99_us) µs, max \(.latency_us.max_us) µs, lost \(.results.lost)"' "$out/pingpong8.json"
if [ -f "$out/conns10k.json" ]; then
  jq -r '"connections: opened \(.results.opened), failed \(.results.failed), \(.results.handshakes_per_s|floor) handshakes/s (concurrency 128), handshake p50 \(.latency_us.p50_us) µs p99 \(.latency_us.p99_us) µs; relay RSS \(.results.relay_rss_before_kib) → \(.results.relay_rss_after_kib) KiB = \(.results.relay_bytes_per_conn|floor) B/conn; loadtest \(.results.loadtest_bytes_per_conn|floor) B/conn"' "$out/conns10k.json"
  jq -r '"connections over WebSocket: opened \(.results.opened), failed \(.results.failed), \(.results.handshakes_per_s|floor) handshakes/s, relay \(.results.relay_bytes_per_conn|floor) B/conn"' "$out/conns10k_ws.json"
  jq -r '"churn at \(.config.rate)/s: \(.results.succeeded) ok, \(.results.failed) failed, \(.results.handshakes_per_s|floor)/s, handshake p50 \(.latency_us.p50_us) µs p99 \(.latency_us.p99_us) µs, relay CPU \(.results.relay_cpu_us_per_event) µs/handshake"' "$out/churn.json"
fi
