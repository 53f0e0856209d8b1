#!/usr/bin/env bash
# Relay CPU per packet split into user space and kernel, in the middle of a `many` run (connection
# set-up, warm-up and drain excluded), so a change to the relay's own code is seen apart from the
# kernel's share, which moves with how many frames each syscall happens to carry.
# Usage (from the workspace root): loadtest/scripts/cpu-split.sh ROUNDS PAIRS RATE NAME=RELAY...
# Env: BIN (default target/release: the loadtest binary), PORT_BASE (default 24000; the relay
#      listens there and serves metrics 1000 above).
# Each round runs every relay once, alternating, each fresh; prints one line per run: user and
# system CPU µs per packet the relay sent (derp_packets_sent) over 8 s of steady traffic, from
# /proc/PID/stat, with the loadtest's own headline, one-way p50 and the 1-minute load average.
set -euo pipefail
rounds=$1 pairs=$2 rate=$3
shift 3
bin=${BIN:-target/release}
port=${PORT_BASE:-24000}
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
tck=$(getconf CLK_TCK)
one() { # NAME RELAY
  local name=$1 exe=$2 d rp lp a b
  d=$(mktemp -d)
  "$exe" -a "127.0.0.1:$port" -c "$d/key.json" -stun=false -metrics-addr "127.0.0.1:$((port + 1000))" \
    -http-port -1 >"$d/log" 2>&1 &
  rp=$!
  for _ in $(seq 50); do grep -q running "$d/log" && break; sleep 0.1; done
  "$bin/derpfleet-loadtest" many --url "http://127.0.0.1:$port/derp" --pairs "$pairs" --rate "$rate" \
    --duration 15s --warmup 3s --relay-pid "$rp" --json >"$d/out.json" 2>/dev/null &
  lp=$!
  sample() {
    echo "$(cut -d' ' -f14,15 "/proc/$rp/stat") $(curl -s "http://127.0.0.1:$((port + 1000))/metrics" |
      awk '$1=="derp_packets_sent"{print $2}')"
  }
  sleep 6; a=$(sample); sleep 8; b=$(sample)
  wait "$lp" || true
  kill "$rp"; wait "$rp" 2>/dev/null || true
  python3 - "$name" "$a" "$b" "$tck" "$d/out.json" "$(cut -d' ' -f1 /proc/loadavg)" "$pairs" "$rate" <<'P'
import json, sys
name, a, b, tck, f, load, pairs, rate = sys.argv[1:]
a, b, tck = a.split(), b.split(), int(tck)
u, s, n = (int(b[0]) - int(a[0])) / tck, (int(b[1]) - int(a[1])) / tck, float(b[2]) - float(a[2])
v = json.load(open(f)); r, l = v["results"], v.get("latency_us") or {}
print(f"| {pairs} × {rate} | {name} | {u / n * 1e6:.2f} | {s / n * 1e6:.2f} | {(u + s) / n * 1e6:.2f} | "
      f"{r.get('relay_cpu_us_per_packet')} ({r.get('relay_cpu_x_floor')}×) | {l.get('p50_us', 0) / 1000:.2f} | {load} |")
P
  rm -rf "$d"
}
echo "| load | relay | user µs/pkt | system µs/pkt | total µs/pkt | loadtest µs/pkt (× floor) | p50 ms | load 1 min |"
echo "|---|---|---|---|---|---|---|---|"
for _ in $(seq "$rounds"); do
  for nr in "$@"; do one "${nr%%=*}" "${nr#*=}"; done
done
