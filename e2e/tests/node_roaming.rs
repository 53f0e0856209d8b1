//! Roaming: home 0 moves from behind NAT router 1 to behind router 3 (its address on the old link
//! removed, the new link addressed, the default route switched) while a ping and an iperf3 TCP flow
//! run through the tunnel to home 1. Both routers are endpoint-independent NATs.
//!
//! Expected (the node's network monitor sees the change): the ping resumes within 5 s (largest gap
//! between answered pings), both nodes are on a direct path again within 10 s (home 1 now talks to
//! router 3's WAN address), and the TCP flow survives (iperf3 ends without error and carried data
//! after the move) without a WireGuard handshake beyond WireGuard's own timers.

use std::fs::File;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use derpfleet_e2e::pathlab::{LabOpts, PathLab, TUN_IPS};
use derpfleet_e2e::Child;

/// Largest gap between consecutive answered pings in `ping -D` output (seconds).
fn largest_gap(ping_out: &str) -> (f64, usize) {
    let times: Vec<f64> = ping_out
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    (gap, times.len())
}

#[test]
fn roaming_between_nats_keeps_ping_and_tcp_flowing() -> Result<()> {
    let mut lab = PathLab::new("ro", LabOpts { roam_router: true, ..LabOpts::default() })?;
    lab.up()?;
    assert_eq!(lab.ping(0, 1, "0.2")?, 1, "log0:\n{}", lab.log(0));
    lab.wait_path(0, Duration::from_secs(5), |p| p.starts_with("direct 172.30.2.2:"))?;
    lab.wait_path(1, Duration::from_secs(5), |p| p.starts_with("direct 172.30.1.2:"))?;

    let mut srv = lab.homes[1].command("iperf3");
    srv.args(["-s", "-1", "-B", TUN_IPS[1]]).stdout(Stdio::null()).stderr(Stdio::null());
    let _server = Child::spawn(srv, "iperf3 server")?;
    std::thread::sleep(Duration::from_millis(300));
    let iperf_out = lab.dir.join("iperf.json");
    let mut cli = lab.homes[0].command("iperf3");
    cli.args(["-c", TUN_IPS[1], "-t", "20", "-i", "1", "-J", "-b", "20M"])
        .stdout(File::create(&iperf_out)?)
        .stderr(Stdio::null());
    let mut iperf = Child::spawn(cli, "iperf3 client")?;
    let ping_out = lab.dir.join("ping.txt");
    let mut p = lab.homes[0].command("ping");
    p.args(["-n", "-D", "-i", "0.1", "-W", "1", "-w", "18", TUN_IPS[1]])
        .stdout(File::create(&ping_out)?)
        .stderr(Stdio::null());
    let mut pinger = Child::spawn(p, "ping")?;

    std::thread::sleep(Duration::from_secs(4));
    let hs_before = lab.status(0)?["peers"][0]["last_handshake_secs"].as_f64().context("no handshake")?;
    let moved = Instant::now();
    lab.roam_home0()?;
    let b_direct = lab.wait_path(1, Duration::from_secs(10), |p| p.starts_with("direct 172.30.3.2:"))?;
    let a_direct =
        lab.wait_path(0, Duration::from_secs(10) - moved.elapsed().min(Duration::from_secs(10)), |p| {
            p.starts_with("direct 172.30.2.2:")
        })?;
    eprintln!("direct again: B->A {b_direct:?}, A->B {:?} after the move", moved.elapsed().max(a_direct));
    assert!(moved.elapsed() < Duration::from_secs(10), "direct again only after {:?}", moved.elapsed());

    let status = iperf.wait_timeout(Duration::from_secs(40)).context("iperf3 did not finish")?;
    let _ = pinger.wait_timeout(Duration::from_secs(20));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&iperf_out)?).with_context(|| {
            format!("iperf3 output: {}", std::fs::read_to_string(&iperf_out).unwrap_or_default())
        })?;
    assert!(status.success() && v.get("error").is_none(), "iperf3 failed: {status} {}", v["error"]);
    let intervals: Vec<f64> = v["intervals"]
        .as_array()
        .context("intervals")?
        .iter()
        .filter_map(|i| i["sum"]["bytes"].as_f64())
        .collect();
    eprintln!("iperf3 bytes per second: {intervals:?}");
    assert!(intervals.len() >= 19, "the flow ended early: {intervals:?}");
    assert!(
        intervals[intervals.len() - 5..].iter().all(|&b| b > 0.0),
        "no data after the move: {intervals:?}"
    );
    let received = v["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(received > 0.0, "{v:#}");

    let text = std::fs::read_to_string(&ping_out)?;
    let (gap, answered) = largest_gap(&text);
    eprintln!("ping: {answered} answered, largest gap {gap:.2} s");
    assert!(answered > 50, "{text}");
    assert!(gap < 5.0, "ping paused {gap:.2} s across the move\nlog0:\n{}", lab.log(0));

    // WireGuard's session survived: no handshake was forced by the move (its own timers may
    // rekey, at most once per 2 minutes, which this short run does not reach).
    let hs_after = lab.status(0)?["peers"][0]["last_handshake_secs"].as_f64().context("no handshake")?;
    let since = moved.elapsed().as_secs_f64();
    assert!(hs_after >= hs_before + since - 1.0, "a new handshake happened: age {hs_before} -> {hs_after}");
    Ok(())
}
