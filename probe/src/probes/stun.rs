//! `stun` / `stun6`: one Binding exchange with the node's STUN port over the probe's family
//! (`STUNTestIP` when the map sets one, else the fixed address, else `HostName` resolved), with
//! netcheck's retransmissions (3 sends, 100 ms apart) inside the probe's budget.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use derpfleet_proto::derpmap::AddrUsage;
use derpfleet_stun::client::{binding, RetryPlan};
use tokio::net::UdpSocket;

use crate::plan::{Family, ProbeSpec};
use crate::results::Measured;

async fn server_addr(spec: &ProbeSpec, family: Family) -> Result<SocketAddr, String> {
    let node = &spec.node;
    let port = node.stun_port().ok_or("the node has no STUN port")?;
    let v6 = family == Family::V6;
    if let Ok(ip) = node.stun_test_ip.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let fixed = if v6 {
        match node.ipv6_usage() {
            AddrUsage::Fixed(ip) => AddrUsage::Fixed(IpAddr::V6(ip)),
            AddrUsage::Dns => AddrUsage::Dns,
            AddrUsage::Disabled => AddrUsage::Disabled,
        }
    } else {
        match node.ipv4_usage() {
            AddrUsage::Fixed(ip) => AddrUsage::Fixed(IpAddr::V4(ip)),
            AddrUsage::Dns => AddrUsage::Dns,
            AddrUsage::Disabled => AddrUsage::Disabled,
        }
    };
    match fixed {
        AddrUsage::Fixed(ip) => Ok(SocketAddr::new(ip, port)),
        AddrUsage::Disabled => Err("address family disabled in the DERP map".into()),
        AddrUsage::Dns => tokio::net::lookup_host((node.host_name.as_str(), port))
            .await
            .map_err(|e| format!("resolving {}: {e}", node.host_name))?
            .find(|a| a.is_ipv6() == v6)
            .ok_or_else(|| format!("{} has no {} address", node.host_name, if v6 { "IPv6" } else { "IPv4" })),
    }
}

/// Runs the probe.
pub async fn probe(spec: &ProbeSpec, budget: Duration) -> Result<Measured, String> {
    let family = spec.family.unwrap_or(Family::V4);
    let server = server_addr(spec, family).await?;
    let bind: SocketAddr =
        if server.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }.map_err(|e| format!("{e}"))?;
    let socket = UdpSocket::bind(bind).await.map_err(|e| format!("STUN socket: {e}"))?;
    let plan = RetryPlan { sends: 3, interval: Duration::from_millis(100), timeout: budget };
    let answer = binding(&socket, server, plan).await.map_err(|e| format!("STUN {server}: {e}"))?;
    Ok(Measured { latency: answer.rtt, ..Default::default() })
}
