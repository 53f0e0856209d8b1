#!/usr/bin/env bash
# Soak benchmark (not a CI test): one relay under connection churn plus steady packet traffic for a long
# time, its RSS sampled every minute, to show that memory stays flat (no leak per connection or per packet).
#
#   scripts/soak.sh [MINUTES] [BIN_DIR]     # defaults: 30, target/release
#
# Prints one line per minute: elapsed minutes, relay RSS (KiB), 1-minute host load; then the loadtest
# reports. Loopback only; the relay and the load generators are ended by PID at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
bin=${2:-target/release}
port=${SOAK_PORT:-34571}
churn_rate=${SOAK_CHURN_RATE:-50}
pps=${SOAK_PPS:-500}
work=$(mktemp -d /tmp/derpfleet-soak.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

"$bin/derpfleet-relay" -a "127.0.0.1:$port" -stun=false -metrics-addr "" -c "$work/derper.key" \
  -hostname 127.0.0.1 >"$work/relay.log" 2>&1 &
relay=$!
pids+=("$relay")
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$port/derp/probe" >/dev/null 2>&1 && break
  sleep 0.1
done
url="http://127.0.0.1:$port/derp"
dur="${minutes}m"
"$bin/derpfleet-loadtest" --url "$url" churn --rate "$churn_rate" --duration "$dur" --concurrency 200 \
  >"$work/churn.txt" 2>&1 &
pids+=("$!")
"$bin/derpfleet-loadtest" --url "$url" throughput --pairs 4 --size 1200 --rate "$pps" --duration "$dur" \
  >"$work/throughput.txt" 2>&1 &
pids+=("$!")
echo "soak: relay pid $relay on :$port, churn ${churn_rate}/s, ${pps} packets/s for ${minutes} min; logs in $work"
echo "minute rss_kib load1"
for m in $(seq 0 "$minutes"); do
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$relay/status")
  echo "$m $rss $(cut -d' ' -f1 /proc/loadavg)"
  [ "$m" -lt "$minutes" ] && sleep 60
done
wait "${pids[1]}" "${pids[2]}" || true
echo "--- churn"; cat "$work/churn.txt"
echo "--- throughput"; cat "$work/throughput.txt"
