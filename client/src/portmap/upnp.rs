//! UPnP IGD port mapping through the `igd-next` crate (SSDP discovery from our LAN address, then
//! SOAP `AddPortMapping` on the gateway's WANIPConnection service). Asks for the internal port as
//! the external one first (or the previous mapping's), then any port the gateway picks.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use igd_next::aio::tokio::{search_gateway, Tokio};
use igd_next::{PortMappingProtocol, SearchOptions};

use super::{Gateway, LIFETIME_SECS};

/// A discovered IGD, kept to renew and delete the mapping.
pub type Igd = igd_next::aio::Gateway<Tokio>;

/// SSDP discovery budget.
const SEARCH_TIMEOUT: Duration = Duration::from_secs(2);
const DESCRIPTION: &str = "derpfleet-client";

/// Maps UDP `port` of our LAN address; `prefer` is the external port to ask for first.
pub async fn map(gw: &Gateway, port: u16, prefer: Option<u16>) -> Result<(SocketAddrV4, Igd), String> {
    let mut opts = SearchOptions::default();
    opts.bind_addr = SocketAddr::new(IpAddr::V4(gw.local_ip), 0);
    opts.timeout = Some(SEARCH_TIMEOUT);
    opts.single_search_timeout = Some(SEARCH_TIMEOUT);
    let igd = search_gateway(opts).await.map_err(|e| format!("SSDP: {e}"))?;
    let ip = match igd.get_external_ip().await.map_err(|e| format!("GetExternalIPAddress: {e}"))? {
        IpAddr::V4(ip) if !ip.is_unspecified() => ip,
        other => return Err(format!("external address {other} is not usable")),
    };
    let local = SocketAddr::new(IpAddr::V4(gw.local_ip), port);
    let want = prefer.unwrap_or(port);
    let ext = match igd.add_port(PortMappingProtocol::UDP, want, local, LIFETIME_SECS, DESCRIPTION).await {
        Ok(()) => want,
        Err(_) => igd
            .add_any_port(PortMappingProtocol::UDP, local, LIFETIME_SECS, DESCRIPTION)
            .await
            .map_err(|e| format!("AddPortMapping: {e}"))?,
    };
    Ok((SocketAddrV4::new(ip, ext), igd))
}

/// Deletes the mapping of external `port`.
pub async fn unmap(igd: &Igd, port: u16) -> Result<(), String> {
    igd.remove_port(PortMappingProtocol::UDP, port).await.map_err(|e| e.to_string())
}
