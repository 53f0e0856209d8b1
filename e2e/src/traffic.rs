//! Traffic between lab namespaces with the standard tools: `ping` (how many answered) and `iperf3` (TCP
//! throughput), so what a test measures is what an operator would measure by hand.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::Child;

/// `count` pings from `ns` to `dst`, `interval` apart (ping's `-i`, e.g. `"0.2"`), 2 s reply wait;
/// returns how many were answered.
pub fn ping(ns: &Netns, dst: &str, count: u32, interval: &str) -> Result<u32> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns.name(), "ping", "-n", "-q", "-c", &count.to_string()])
        .args(["-i", interval, "-W", "2", dst])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find_map(|l| {
            l.split(", ").find(|p| p.ends_with("received")).and_then(|p| p.split(' ').next()?.parse().ok())
        })
        .unwrap_or(0))
}

/// TCP throughput from `client` to an `iperf3` server on `dst` in `server`: one `iperf3 -t secs` run,
/// Mbit/s received.
pub fn iperf3_mbps(server: &Netns, client: &Netns, dst: &str, secs: u32) -> Result<f64> {
    let mut cmd = server.command("iperf3");
    cmd.args(["-s", "-1", "-B", dst]).stdout(Stdio::null()).stderr(Stdio::null());
    let _server = Child::spawn(cmd, "iperf3 server")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = client.exec("iperf3", &["-c", dst, "-t", &secs.to_string(), "-J"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e6)
        .with_context(|| format!("iperf3 output: {out}"))
}
