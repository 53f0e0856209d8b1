//! Direct-path speed of the reference node for BENCHMARKS.md (ignored by default; run by hand with
//! optimised binaries, see BENCHMARKS.md): iperf3 TCP through the tunnel from home 0 to home 1 in
//! the NAT lab ([`derpfleet_e2e::pathlab`]), three 5 s runs per path, median:
//! - `derpfleet-client` direct (endpoint-independent NATs, UDP hole-punched),
//! - `derpfleet-client` relayed (symmetric NATs, DERP over TLS),
//! - Debian's `wireguard-go` on the same routed and NATed path (static endpoints).
//!
//! `NODE_LAB_BIN_DIR` picks the binaries (e.g. an older build for a before/after pair).

use std::time::Duration;

use anyhow::Result;
use derpfleet_e2e::pathlab::{LabOpts, Nat, PathLab};

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split(' ')
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn report(name: &str, mut runs: Vec<f64>) {
    runs.sort_by(f64::total_cmp);
    eprintln!("BENCH {name}: runs {runs:.0?} Mbit/s, median {:.0} (loadavg {})", runs[1], loadavg());
}

#[test]
#[ignore]
fn bench_node_direct() -> Result<()> {
    let mut lab = PathLab::new("bd", LabOpts::default())?;
    let runs = lab.node_throughput_runs(true)?;
    report("derpfleet-client direct", runs);
    Ok(())
}

#[test]
#[ignore]
fn bench_node_relayed() -> Result<()> {
    let mut lab = PathLab::new("br", LabOpts { nat: Nat::Symmetric, ..LabOpts::default() })?;
    let runs = lab.node_throughput_runs(false)?;
    report("derpfleet-client relayed", runs);
    Ok(())
}

#[test]
#[ignore]
fn bench_wireguard_go_same_path() -> Result<()> {
    let mut lab = PathLab::new("bw", LabOpts::default())?;
    let _wg = lab.wireguard_go_pair()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lab.homes[0].exec("ping", &["-c", "1", "-W", "1", "100.65.0.2"]).is_err() {
        assert!(std::time::Instant::now() < deadline, "wireguard-go pair never connected");
    }
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(lab.iperf_to("100.65.0.2", 5)?);
    }
    report("wireguard-go direct (same NAT path)", runs);
    Ok(())
}
