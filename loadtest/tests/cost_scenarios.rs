//! The cost-per-packet tooling against a real `derpfleet-relay` process: the Tailscale-like write
//! mode (checked at the syscall level with `strace`: every frame is its own write), the `many`
//! scenario (holds its connections and delivers on every pair), the floor benchmark and the
//! figures derived from it, and the relay's drop counters read through `--metrics-url`.

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(90);
/// A 1200-byte payload in a SendPacket frame: 5-byte header, 32-byte key.
const FRAME: u64 = 5 + 32 + 1200;

/// Runs the load test under `strace -f` and returns (bytes → count) of every successful write to
/// a socket (stdout/stderr excluded), with the run's JSON.
fn socket_writes(args: &[&str]) -> (BTreeMap<u64, u64>, serde_json::Value) {
    let dir = TempDir::new("strace");
    let trace = dir.0.join("trace");
    let out = std::process::Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=write,writev,sendto,sendmsg", "-e", "signal=none", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_derpfleet-loadtest"))
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .expect("strace runs (scripts/apt-packages.txt installs it)");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let mut sizes = BTreeMap::new();
    for line in std::fs::read_to_string(&trace).unwrap().lines() {
        // `PID sendto(7, "\4\0\0\4\345"..., 1237, MSG_NOSIGNAL, NULL, 0) = 1237`
        let Some((_, call)) = line.split_once(' ') else { continue };
        let Some((name, rest)) = call.trim_start().split_once('(') else { continue };
        if !["write", "writev", "sendto", "sendmsg"].contains(&name) {
            continue;
        }
        let fd: i64 = rest.split(',').next().and_then(|f| f.trim().parse().ok()).unwrap_or(-1);
        let ret: Option<u64> = line.rsplit_once("= ").and_then(|(_, r)| r.trim().parse().ok());
        if let (true, Some(n)) = (fd > 2, ret) {
            // tokio's wake-ups write 8 bytes to an eventfd: not DERP traffic.
            if n != 8 {
                *sizes.entry(n).or_default() += 1;
            }
        }
    }
    (sizes, v)
}

#[test]
fn tailscale_writes_put_every_frame_in_its_own_write() {
    let relay = Relay::plain();
    let url = relay.url();
    // Unthrottled, so the send queue holds bursts that batching would coalesce.
    let base = [
        "throughput",
        "--url",
        &url,
        "--pairs",
        "1",
        "--size",
        "1200",
        "--duration",
        "0.5s",
        "--warmup",
        "0.1s",
    ];
    let mut args = base.to_vec();
    args.push("--tailscale-writes");
    let (sizes, v) = socket_writes(&args);
    assert_eq!(v["config"]["tailscale_writes"], true);
    let sent = num(&v, &["results", "sent_packets"]) as u64;
    assert!(sent > 0, "{v:#}");
    let frames = sizes.get(&FRAME).copied().unwrap_or(0);
    assert!(frames >= sent, "{frames} single-frame writes for {sent} packets: {sizes:?}");
    let largest = *sizes.keys().last().unwrap();
    assert!(largest <= FRAME, "a write of {largest} bytes coalesced frames: {sizes:?}");

    // The default mode does coalesce under the same load (so the check above can fail).
    let (sizes, v) = socket_writes(&base);
    assert_eq!(v["config"]["tailscale_writes"], false);
    let largest = *sizes.keys().last().unwrap();
    assert!(largest >= 2 * FRAME, "batched writes never held two frames: {sizes:?}");
}

#[test]
fn many_holds_every_pair_and_delivers_with_cost_per_packet() {
    let relay = Relay::plain();
    let url = relay.url();
    let pid = relay.child.id().to_string();
    let metrics = format!("http://{}/debug/varz", relay.addr);
    let dir = TempDir::new("plot");
    let svg = dir.0.join("many.svg");
    let out = run(
        &[
            "many",
            "--url",
            &url,
            "--pairs",
            "300",
            "--rate",
            "10",
            "--duration",
            "2s",
            "--warmup",
            "0.5s",
            "--source-ips",
            "127.0.0.2-127.0.0.3",
            "--relay-pid",
            &pid,
            "--metrics-url",
            &metrics,
            "--floor-time",
            "0.2s",
            "--plot",
            svg.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    check_common(&v, "many");
    assert_eq!(v["config"]["tailscale_writes"], true);
    assert_eq!(num(&v, &["results", "pairs_connected"]), 300.0, "{v:#}");
    assert_eq!(num(&v, &["results", "pairs_delivered"]), 300.0, "{v:#}");
    // 300 senders × 10/s × 2 s by schedule, each either handed to its connection or dropped here.
    let sent = num(&v, &["results", "sent_packets"]);
    assert_eq!(sent + num(&v, &["results", "local_drops"]), 6000.0, "{v:#}");
    assert!(num(&v, &["results", "received_packets"]) >= sent * 0.99, "{v:#}");
    // The headline comes first, with the floor measured in the same run.
    let at = |k: &str| text.find(&format!("\"{k}\"")).unwrap_or_else(|| panic!("no {k} in {text}"));
    assert!(at("relay_cpu_us_per_packet") < at("sent_packets"), "{text}");
    let per = num(&v, &["results", "relay_cpu_us_per_packet"]);
    let floor = num(&v, &["results", "floor_us"]);
    assert!(per > 0.0 && floor > 0.0, "{v:#}");
    assert!(
        (num(&v, &["results", "relay_cpu_x_floor"]) - per / floor).abs() < 0.01 * per / floor + 0.002,
        "{v:#}"
    );
    // Drop counters were read before and after (nothing dropped at this load).
    assert!(v["results"]["relay_drops"].is_object(), "{v:#}");
    assert!(v["results"]["relay_drops_total"].is_number(), "{v:#}");
    assert!(num(&v, &["latency_us", "count"]) > 0.0);
    let s = std::fs::read_to_string(&svg).unwrap();
    assert!(s.contains("measurement window") && s.contains("warm-up") && s.contains("pairs=300"), "{s}");
}

#[test]
fn many_both_ways_sends_from_every_connection_and_counts_each_direction() {
    let relay = Relay::plain();
    let url = relay.url();
    let pid = relay.child.id().to_string();
    let v = run_json(
        &[
            "many",
            "--url",
            &url,
            "--pairs",
            "50",
            "--rate",
            "20",
            "--duration",
            "2s",
            "--warmup",
            "0.5s",
            "--both-ways",
            "--relay-pid",
            &pid,
            "--floor-time",
            "0",
        ],
        LIMIT,
    );
    check_common(&v, "many");
    assert_eq!(v["config"]["both_ways"], true, "{v:#}");
    assert_eq!(num(&v, &["results", "pairs_connected"]), 50.0, "{v:#}");
    assert_eq!(num(&v, &["results", "pairs_delivered"]), 50.0, "{v:#}");
    // 100 senders (both ends of 50 pairs) × 20/s × 2 s by schedule.
    let sent = num(&v, &["results", "sent_packets"]);
    assert_eq!(sent + num(&v, &["results", "local_drops"]), 4000.0, "{v:#}");
    assert!(num(&v, &["results", "received_packets"]) >= sent * 0.99, "{v:#}");
    assert!(num(&v, &["results", "relay_cpu_us_per_packet"]) > 0.0, "{v:#}");
}

#[test]
fn floor_reports_cpu_per_message() {
    let v = run_json(&["floor", "--duration", "0.3s"], LIMIT);
    check_common(&v, "floor");
    assert_eq!(num(&v, &["config", "size"]), 1205.0);
    assert!(num(&v, &["results", "messages"]) > 1000.0, "{v:#}");
    let us = num(&v, &["results", "floor_us"]);
    assert!(us > 0.0 && us < 10_000.0, "{v:#}");
}

#[test]
fn floor_goes_round_robin_over_many_connections() {
    let v = run_json(&["floor", "--duration", "0.3s", "--connections", "500"], LIMIT);
    check_common(&v, "floor");
    assert_eq!(num(&v, &["config", "connections"]), 500.0, "{v:#}");
    assert!(num(&v, &["results", "messages"]) > 500.0, "{v:#}");
    let us = num(&v, &["results", "floor_us"]);
    assert!(us > 0.0 && us < 10_000.0, "{v:#}");
}

#[test]
fn throughput_over_websocket_with_tailscale_writes() {
    let relay = Relay::plain();
    let url = relay.url();
    let v = run_json(
        &[
            "throughput",
            "--url",
            &url,
            "--websocket",
            "--tailscale-writes",
            "--pairs",
            "2",
            "--rate",
            "100",
            "--duration",
            "1s",
        ],
        LIMIT,
    );
    check_common(&v, "throughput");
    assert_eq!(v["config"]["websocket"], true);
    assert_eq!(num(&v, &["results", "sent_packets"]), 200.0, "{v:#}");
    assert!(num(&v, &["results", "received_packets"]) >= 198.0, "{v:#}");
}
