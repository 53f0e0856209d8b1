//! Port mapping on the LAN gateway, so a node behind a NAT that would map a port on request (even
//! a symmetric one) gets an address peers can reach directly: NAT-PMP (RFC 6886), then PCP (RFC
//! 6887), then UPnP IGD ([`upnp`], through the `igd-next` crate), tried in that order as
//! Tailscale's portmapper does.
//!
//! Decisions (Tailscale's where it has one): ask for a 2 h lifetime and renew at half of what
//! the gateway granted; each protocol gets three tries (250, 500, 1000 ms, RFC 6886's schedule cut
//! short); the gateway is the IPv4 default route's next hop (`/proc/net/route`), and our address is
//! the one the kernel picks towards it. A granted mapping is deleted (lifetime 0) when the node
//! stops. The NAT-PMP and PCP wire formats are small and pure ([`pmp`], [`pcp`]); no crate
//! covered both with tokio at the time.

pub mod pcp;
pub mod pmp;
pub mod upnp;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

/// The NAT-PMP / PCP server port on the gateway.
pub const SERVER_PORT: u16 = 5351;
/// Lifetime asked for (Tailscale: 2 h).
pub const LIFETIME_SECS: u32 = 7200;
/// Waits per try.
const TRIES: [Duration; 3] =
    [Duration::from_millis(250), Duration::from_millis(500), Duration::from_millis(1000)];

/// A port mapping protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// NAT-PMP (RFC 6886)
    NatPmp,
    /// PCP (RFC 6887)
    Pcp,
    /// UPnP IGD
    Upnp,
}

impl Protocol {
    /// The config / status name.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::NatPmp => "nat-pmp",
            Protocol::Pcp => "pcp",
            Protocol::Upnp => "upnp",
        }
    }

    /// Parses a config name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nat-pmp" => Some(Protocol::NatPmp),
            "pcp" => Some(Protocol::Pcp),
            "upnp" => Some(Protocol::Upnp),
            _ => None,
        }
    }
}

/// Why no mapping was obtained.
#[derive(Debug, thiserror::Error)]
pub enum PortmapError {
    /// No IPv4 default route.
    #[error("no IPv4 default gateway")]
    NoGateway,
    /// Socket trouble.
    #[error("portmap socket: {0}")]
    Io(#[from] std::io::Error),
    /// Every protocol failed; one reason each.
    #[error("no port mapping: {0}")]
    Failed(String),
}

/// The gateway and our address towards it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gateway {
    /// the gateway
    pub gateway: Ipv4Addr,
    /// our address on its network
    pub local_ip: Ipv4Addr,
}

/// A granted mapping.
#[derive(Clone, Debug)]
pub struct Mapping {
    /// which protocol granted it
    pub protocol: Protocol,
    /// the public address peers can send to
    pub external: SocketAddrV4,
    /// how long it lasts from `obtained`
    pub lifetime: Duration,
    /// when it was granted
    pub obtained: Instant,
    /// the gateway that granted it
    pub gateway: Gateway,
    /// our port
    pub internal_port: u16,
    nonce: [u8; 12],
    igd: Option<Arc<upnp::Igd>>,
}

impl Mapping {
    /// When to renew it: at half its lifetime.
    pub fn renew_at(&self) -> Instant {
        self.obtained + self.lifetime / 2
    }

    /// Deletes it on the gateway (UPnP: a SOAP request; NAT-PMP / PCP: [`Self::delete_now`]).
    pub async fn delete(&self) -> Result<(), String> {
        match &self.igd {
            Some(igd) => upnp::unmap(igd, self.external.port()).await,
            None => {
                self.delete_now();
                Ok(())
            }
        }
    }

    /// The NAT-PMP / PCP request that deletes it (UPnP: none, see [`Self::delete`]).
    pub fn delete_request(&self) -> Vec<u8> {
        match self.protocol {
            Protocol::Upnp => Vec::new(),
            Protocol::NatPmp => pmp::map_request(self.internal_port, 0, 0).to_vec(),
            Protocol::Pcp => pcp::map_request(
                self.gateway.local_ip,
                self.nonce,
                self.internal_port,
                (Ipv4Addr::UNSPECIFIED, 0),
                0,
            )
            .to_vec(),
        }
    }

    /// Sends the delete request without waiting for an answer (for shutdown paths).
    pub fn delete_now(&self) {
        if self.protocol == Protocol::Upnp {
            return;
        }
        if let Ok(s) = std::net::UdpSocket::bind((self.gateway.local_ip, 0)) {
            let _ = s.send_to(&self.delete_request(), (self.gateway.gateway, SERVER_PORT));
        }
    }
}

/// The IPv4 default gateway from `/proc/net/route` (lowest metric).
pub fn default_gateway() -> Option<Ipv4Addr> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    crate::route_table::ipv4_gateway(&crate::route_table::default_routes_v4(&text))
}

/// The gateway and our address towards it.
pub fn discover() -> Option<Gateway> {
    let gateway = default_gateway()?;
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((gateway, SERVER_PORT)).ok()?;
    match s.local_addr().ok()? {
        SocketAddr::V4(a) => Some(Gateway { gateway, local_ip: *a.ip() }),
        SocketAddr::V6(_) => None,
    }
}

/// Sends `req` to the gateway up to three times; returns the first answer `accept` takes.
async fn exchange<T>(
    gw: &Gateway,
    req: &[u8],
    mut accept: impl FnMut(&[u8]) -> Option<Result<T, String>>,
) -> Result<T, String> {
    let sock = UdpSocket::bind((gw.local_ip, 0)).await.map_err(|e| e.to_string())?;
    sock.connect((gw.gateway, SERVER_PORT)).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1100];
    for wait in TRIES {
        sock.send(req).await.map_err(|e| e.to_string())?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                Err(_) => break,
                // ICMP port unreachable: nothing listens there.
                Ok(Err(e)) => return Err(e.to_string()),
                Ok(Ok(n)) => {
                    if let Some(r) = accept(&buf[..n]) {
                        return r;
                    }
                }
            }
        }
    }
    Err("no answer".into())
}

async fn map_pmp(gw: &Gateway, port: u16, prev: Option<&Mapping>) -> Result<Mapping, String> {
    let ip = exchange(gw, &pmp::external_address_request(), |b| match pmp::parse_external_address(b) {
        Err(pmp::PmpError::Malformed) => None,
        r => Some(r.map_err(|e| e.to_string())),
    })
    .await?;
    let suggest = prev.filter(|p| p.protocol == Protocol::NatPmp).map(|p| p.external.port()).unwrap_or(0);
    let req = pmp::map_request(port, suggest, LIFETIME_SECS);
    let m = exchange(gw, &req, |b| match pmp::parse_map(b) {
        Err(pmp::PmpError::Malformed) => None,
        Ok(m) if m.internal_port != port => None,
        r => Some(r.map_err(|e| e.to_string())),
    })
    .await?;
    if ip.is_unspecified() || m.external_port == 0 {
        return Err(format!("gateway granted {ip}:{}", m.external_port));
    }
    Ok(Mapping {
        protocol: Protocol::NatPmp,
        external: SocketAddrV4::new(ip, m.external_port),
        lifetime: Duration::from_secs(m.lifetime.into()),
        obtained: Instant::now(),
        gateway: *gw,
        internal_port: port,
        nonce: [0; 12],
        igd: None,
    })
}

async fn map_pcp(gw: &Gateway, port: u16, prev: Option<&Mapping>) -> Result<Mapping, String> {
    // Renewals reuse the nonce and suggest the same address (RFC 6887 §11.2.1).
    let (nonce, suggest) = match prev.filter(|p| p.protocol == Protocol::Pcp) {
        Some(p) => (p.nonce, (*p.external.ip(), p.external.port())),
        None => (rand::random(), (Ipv4Addr::UNSPECIFIED, 0)),
    };
    let req = pcp::map_request(gw.local_ip, nonce, port, suggest, LIFETIME_SECS);
    let m = exchange(gw, &req, |b| match pcp::parse_map(b, &nonce) {
        Err(pcp::PcpError::Malformed) => None,
        r => Some(r.map_err(|e| e.to_string())),
    })
    .await?;
    if m.external_ip.is_unspecified() || m.external_port == 0 {
        return Err(format!("gateway granted {}:{}", m.external_ip, m.external_port));
    }
    Ok(Mapping {
        protocol: Protocol::Pcp,
        external: SocketAddrV4::new(m.external_ip, m.external_port),
        lifetime: Duration::from_secs(m.lifetime.into()),
        obtained: Instant::now(),
        gateway: *gw,
        internal_port: port,
        nonce,
        igd: None,
    })
}

async fn map_upnp(gw: &Gateway, port: u16, prev: Option<&Mapping>) -> Result<Mapping, String> {
    let prefer = prev.filter(|p| p.protocol == Protocol::Upnp).map(|p| p.external.port());
    let (external, igd) = upnp::map(gw, port, prefer).await?;
    Ok(Mapping {
        protocol: Protocol::Upnp,
        external,
        lifetime: Duration::from_secs(LIFETIME_SECS.into()),
        obtained: Instant::now(),
        gateway: *gw,
        internal_port: port,
        nonce: [0; 12],
        igd: Some(Arc::new(igd)),
    })
}

/// Maps UDP `port` on `gw` with the first of `protocols` that works (renewing `prev` if given).
pub async fn map_port(
    gw: &Gateway,
    port: u16,
    prev: Option<&Mapping>,
    protocols: &[Protocol],
) -> Result<Mapping, PortmapError> {
    let mut why = Vec::new();
    for p in protocols {
        let r = match p {
            Protocol::NatPmp => map_pmp(gw, port, prev).await,
            Protocol::Pcp => map_pcp(gw, port, prev).await,
            Protocol::Upnp => map_upnp(gw, port, prev).await,
        };
        match r {
            Ok(m) => return Ok(m),
            Err(e) => why.push(format!("{}: {e}", p.name())),
        }
    }
    Err(PortmapError::Failed(why.join("; ")))
}
