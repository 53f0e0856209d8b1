//! IPv6 underlay: the nodes find and use direct IPv6 paths.
//! - IPv6-only lab: homes have only IPv6 (routed through stateful-firewall routers, no NAT); the
//!   relay and STUN are reached over IPv6, and the direct path forms between the homes' addresses.
//! - Dual-stack lab: IPv4 behind symmetric NATs (no IPv4 direct path is possible) and IPv6 routed:
//!   the direct path forms over IPv6, with IPv4 STUN endpoints advertised beside the IPv6 ones.

use std::time::Duration;

use anyhow::Result;
use derpfleet_e2e::pathlab::{LabOpts, Nat, PathLab};

fn direct_over_v6(lab: &mut PathLab) -> Result<()> {
    lab.up()?;
    assert_eq!(lab.ping(0, 1, "0.2")?, 1, "log0:\n{}", lab.log(0));
    lab.wait_path(0, Duration::from_secs(8), |p| p.starts_with("direct [fd00:2::2]:"))?;
    lab.wait_path(1, Duration::from_secs(8), |p| p.starts_with("direct [fd00:1::2]:"))?;
    assert_eq!(lab.ping(0, 10, "0.1")?, 10);
    assert!(lab.path(0)?.starts_with("direct [fd00:2::2]:"));
    Ok(())
}

#[test]
fn ipv6_only_lab_goes_direct_over_ipv6() -> Result<()> {
    let mut lab = PathLab::new("6o", LabOpts { ipv4: false, ipv6: true, ..LabOpts::default() })?;
    direct_over_v6(&mut lab)?;
    let s = lab.status(0)?;
    let eps: Vec<&str> = s["endpoints"].as_array().unwrap().iter().filter_map(|e| e.as_str()).collect();
    assert!(eps.iter().all(|e| e.starts_with('[')), "IPv4 endpoints in an IPv6-only lab: {eps:?}");
    Ok(())
}

#[test]
fn dual_stack_lab_with_symmetric_ipv4_nat_goes_direct_over_ipv6() -> Result<()> {
    let mut lab =
        PathLab::new("6d", LabOpts { nat: Nat::Symmetric, ipv4: true, ipv6: true, ..LabOpts::default() })?;
    direct_over_v6(&mut lab)?;
    let s = lab.status(1)?;
    let eps: Vec<&str> = s["endpoints"].as_array().unwrap().iter().filter_map(|e| e.as_str()).collect();
    assert!(eps.iter().any(|e| e.starts_with("172.30.2.2:")), "no IPv4 STUN endpoint: {eps:?}");
    assert!(eps.iter().any(|e| e.starts_with("[fd00:2::2]:")), "no IPv6 endpoint: {eps:?}");
    Ok(())
}
