#!/usr/bin/env bash
# Relay cost per packet and idle memory per connection, in Tailscale-like write mode, with the
# floor measured in every packet run (BENCHMARKS.md "Relay: cost per packet").
# Usage (from the workspace root): loadtest/scripts/cost.sh [ROUNDS] [OUTDIR]
# Env: BIN       directory of release binaries (default target/release; build them first with
#                cargo build --release -p derpfleet-relay -p derpfleet-loadtest --all-features)
#      RELAYS    space-separated NAME=PATH relay binaries to compare; each row runs once per relay
#                per round, alternating (default "relay=$BIN/derpfleet-relay")
#      ROWS      rows to run (default: all): floor tp8x5000 many2000x20 many1000x40 many2000x2 tls8x5000
#                ws8x5000 mesh_tls8x5000 idle18k_plain idle18k_tls idle18k_ws; on request also
#                manyPxR for any P pairs x R pkt/s (e.g. many1000x20), manytlsPxR (over TLS),
#                manybothPxR (every connection sends and receives: manyboth1000x20 relays as many
#                packets as many1000x40) and floorN (e.g. floor2000: the floor round-robin over N
#                connections)
#      SECS      measurement window of the packet rows (default 20)
#      PORT_BASE, PORT_SPAN  relay ports are picked in [PORT_BASE, PORT_BASE+PORT_SPAN) and their
#                metrics ports PORT_SPAN above (defaults 20000 and 5000); give concurrent runs disjoint
#                ranges, and keep PORT_BASE+2*PORT_SPAN below the ephemeral range (32768)
# Every run gets a fresh relay; its JSON lands in OUTDIR/ROUND-ROW-NAME.json and the command,
# start time and load average in OUTDIR/LOG. A Markdown table is printed at the end.
set -euo pipefail
rounds=${1:-2}
out=${2:-/tmp/derpfleet-cost}
bin=${BIN:-target/release}
relays=${RELAYS:-relay=$bin/derpfleet-relay}
rows=${ROWS:-floor tp8x5000 many2000x20 many1000x40 many2000x2 tls8x5000 ws8x5000 mesh_tls8x5000 idle18k_plain idle18k_tls idle18k_ws}
secs=${SECS:-20}
port_base=${PORT_BASE:-20000}
port_span=${PORT_SPAN:-5000}
lt="$bin/derpfleet-loadtest"
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
mkdir -p "$out"
work=$(mktemp -d)
pids=()
stop_relays() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap 'stop_relays; rm -rf "$work"' EXIT

# wait_running LOG: waits (5 s) for the relay $pid to log "running"; stops the script if it does not.
wait_running() {
  for _ in $(seq 50); do
    grep -q "running" "$1" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "relay did not start:" >&2
  cat "$1" >&2
  exit 1
}

# start_relay BINARY tls|plain [MESH-PEERS]: sets port, url, pid, murl; below the ephemeral range.
start_relay() {
  local exe=$1 mode=$2 mesh=${3:-}
  port=$((port_base + RANDOM % port_span))
  local dir="$work/r$port" args
  mkdir -p "$dir"
  args=(-a "127.0.0.1:$port" -c "$dir/key.json" -stun=false -metrics-addr "127.0.0.1:$((port + port_span))")
  if [ "$mode" = tls ]; then
    # One certificate for every node (all are 127.0.0.1), trusted by the mesh links.
    args+=(-certmode manual -hostname 127.0.0.1 -http-port -1 -certdir "$work/certs")
    url="https://127.0.0.1:$port/derp"
  else
    url="http://127.0.0.1:$port/derp"
  fi
  if [ -n "$mesh" ]; then
    args+=(-mesh-psk-file "$work/mesh.key" -mesh-with "$mesh")
    [ "$mode" = tls ] && args+=(-mesh-ca-file "$work/certs/127.0.0.1.crt")
  fi
  "$exe" "${args[@]}" >"$dir/log" 2>&1 &
  pid=$!
  pids+=("$pid")
  murl="http://127.0.0.1:$((port + port_span))/metrics"
  wait_running "$dir/log"
}

run() { # round row name args...
  local round=$1 row=$2 name=$3
  shift 3
  local f="$out/$round-$row-$name.json"
  echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC') load $(cut -d' ' -f1-3 /proc/loadavg) $row $name: derpfleet-loadtest $*" | tee -a "$out/LOG" >&2
  "$lt" "$@" --json >"$f" || echo "  (failed)" >&2
}

row() { # round row name exe
  local round=$1 row=$2 name=$3 exe=$4 w=$((secs))s
  local flow=(--pairs 8 --rate 5000 --duration "$w" --warmup 2s --tailscale-writes)
  case $row in
    floor) run "$round" "$row" "$name" floor --duration 3s ;;
    floor[0-9]*) run "$round" "$row" "$name" floor --duration 3s --connections "${row#floor}" ;;
    tp8x5000)
      start_relay "$exe" plain
      run "$round" "$row" "$name" throughput --url "$url" "${flow[@]}" --relay-pid "$pid" --metrics-url "$murl" ;;
    many[0-9]*x[0-9]* | manyboth[0-9]*x[0-9]* | manytls[0-9]*x[0-9]*)
      # manyPxR, manybothPxR (--both-ways) or manytlsPxR (over TLS): P pairs at R pkt/s each.
      local spec=${row#many} mode=plain extra=()
      case $spec in
        both*) spec=${spec#both}; extra=(--both-ways) ;;
        tls*) spec=${spec#tls}; mode=tls; extra=(--insecure) ;;
      esac
      local p=${spec%x*} r=${spec#*x}
      start_relay "$exe" "$mode"
      run "$round" "$row" "$name" many --url "$url" "${extra[@]}" --pairs "$p" --rate "$r" --duration "$w" \
        --warmup 3s --relay-pid "$pid" --metrics-url "$murl" ;;
    tls8x5000)
      start_relay "$exe" tls
      run "$round" "$row" "$name" throughput --url "$url" --insecure "${flow[@]}" --relay-pid "$pid" --metrics-url "$murl" ;;
    ws8x5000)
      start_relay "$exe" plain
      run "$round" "$row" "$name" throughput --url "$url" --websocket "${flow[@]}" --relay-pid "$pid" --metrics-url "$murl" ;;
    mesh_tls8x5000)
      [ -f "$work/certs/127.0.0.1.crt" ] || { start_relay "$exe" tls; sleep 0.5; stop_relays; }
      head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/mesh.key"
      local a=$((port_base + RANDOM % port_span)) b
      b=$((a + 1))
      local peers="https://127.0.0.1:$a,https://127.0.0.1:$b"
      # Fixed ports for the pair (each lists both; a node skips itself by its key).
      port_a=$a; port_b=$b
      start_relay_at "$exe" "$port_a" "$peers"; local pa=$pid ua=$url ma=$murl
      start_relay_at "$exe" "$port_b" "$peers"; local pb=$pid ub=$url mb=$murl
      sleep 2 # mesh links up
      run "$round" "$row" "$name" mesh --url "$ua" --url "$ub" --insecure "${flow[@]}" \
        --relay-pid "$pa" --relay-pid "$pb" --metrics-url "$ma" --metrics-url "$mb" ;;
    idle18k_plain | idle18k_tls | idle18k_ws)
      local mode=plain extra=()
      [ "$row" = idle18k_tls ] && { mode=tls; extra=(--insecure); }
      [ "$row" = idle18k_ws ] && extra=(--websocket)
      start_relay "$exe" "$mode"
      run "$round" "$row" "$name" connections --url "$url" "${extra[@]}" --count 18000 --concurrency 128 \
        --hold 3s --source-ips 127.0.0.2-127.0.0.20 --relay-pid "$pid" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  stop_relays
}

# start_relay_at BINARY PORT PEERS: a TLS mesh node on a given port.
start_relay_at() {
  local exe=$1 p=$2 mesh=$3
  local dir="$work/r$p"
  mkdir -p "$dir"
  "$exe" -a "127.0.0.1:$p" -c "$dir/key.json" -stun=false -metrics-addr "127.0.0.1:$((p + port_span))" \
    -certmode manual -hostname 127.0.0.1 -http-port -1 -certdir "$work/certs" \
    -mesh-psk-file "$work/mesh.key" -mesh-with "$mesh" -mesh-ca-file "$work/certs/127.0.0.1.crt" >"$dir/log" 2>&1 &
  pid=$!
  pids+=("$pid")
  url="https://127.0.0.1:$p/derp"
  murl="http://127.0.0.1:$((p + port_span))/metrics"
  wait_running "$dir/log"
}

echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); relays: $relays" | tee -a "$out/LOG"
for round in $(seq "$rounds"); do
  for r in $rows; do
    for nr in $relays; do
      row "$round" "$r" "${nr%%=*}" "${nr#*=}"
      case $r in floor*) break ;; esac # the floor does not depend on the relay
    done
  done
done

python3 - "$out" <<'EOF'
import json, os, sys
d = sys.argv[1]
print("| round | row | relay | µs/pkt | × floor | floor µs | loss % | p50 / p99 µs | KiB/conn |")
print("|---|---|---|---|---|---|---|---|---|")
for f in sorted(os.listdir(d)):
    if not f.endswith(".json"):
        continue
    try:
        v = json.load(open(os.path.join(d, f)))
    except Exception:
        continue
    rnd, row, name = f[:-5].split("-", 2)
    r, l = v["results"], v.get("latency_us") or {}
    g = lambda k, fmt="{}": fmt.format(r[k]) if k in r else "-"
    kib = "{:.1f}".format(r["relay_bytes_per_conn"] / 1024) if "relay_bytes_per_conn" in r else "-"
    lat = f"{l.get('p50_us', '-')} / {l.get('p99_us', '-')}" if not row.startswith(("floor", "idle")) else "-"
    print(f"| {rnd} | {row} | {name} | {g('relay_cpu_us_per_packet')} | {g('relay_cpu_x_floor')} | {g('floor_us')} | {g('loss_pct')} | {lat} | {kib} |")
EOF
