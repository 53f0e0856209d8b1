//! The one UDP socket shared by WireGuard, disco and STUN, and the demultiplexer that tells them
//! apart: STUN by its header (magic cookie), disco by its `TS💬` magic, everything else is WireGuard.
//! Sharing the socket matters: the NAT mapping STUN discovers is the one WireGuard and disco use.
//!
//! Also here: our own endpoint list (STUN-mapped addresses plus local interface addresses with the
//! socket's port), which goes into CallMeMaybe.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use derpfleet_proto::derpmap::DerpRegion;
use derpfleet_stun::message::{build_request, is_stun, parse_response, TxId};

/// What a datagram is.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// A STUN message (we only expect Binding responses).
    Stun,
    /// A disco packet.
    Disco,
    /// Anything else: WireGuard.
    WireGuard,
}

/// Classifies a datagram received on the shared socket.
pub fn classify(b: &[u8]) -> Kind {
    if is_stun(b) {
        Kind::Stun
    } else if derpfleet_proto::disco::looks_like_disco(b) {
        Kind::Disco
    } else {
        Kind::WireGuard
    }
}

/// A STUN-mapped address is advertised this long after it was last confirmed.
pub const STUN_ENDPOINT_TTL: Duration = Duration::from_secs(90);
/// Re-STUN period (Tailscale re-STUNs every 20–26 s).
pub const RESTUN_INTERVAL: Duration = Duration::from_secs(20);
/// Re-STUN period while no answer has come yet.
pub const RESTUN_INTERVAL_UNANSWERED: Duration = Duration::from_millis(500);
const MAX_STUN_PENDING: usize = 64;

/// Our own candidate endpoints.
#[derive(Debug, Default)]
pub struct OwnEndpoints {
    stun: HashMap<SocketAddr, Instant>,
    mapped: Option<SocketAddr>,
    local: Vec<SocketAddr>,
    pending: HashMap<[u8; 12], Instant>,
    last_request: Option<Instant>,
    ipv6: bool,
}

impl OwnEndpoints {
    /// Sets the local interface addresses (with our port).
    pub fn set_local(&mut self, local: Vec<SocketAddr>) {
        self.local = local;
    }

    /// Also STUN the region's IPv6 addresses (we have an IPv6 socket).
    pub fn set_ipv6(&mut self, on: bool) {
        self.ipv6 = on;
    }

    /// The network changed: mappings learned on the old one are stale (they would send peers to a
    /// NAT we are no longer behind), so they are forgotten, the local addresses replaced and a
    /// re-STUN made due at once.
    pub fn on_network_change(&mut self, local: Vec<SocketAddr>) {
        self.local = local;
        self.stun.clear();
        self.pending.clear();
        self.last_request = None;
    }

    /// STUN requests to send now: one per STUN server of `region` and family, if a re-STUN is due.
    pub fn stun_due(&mut self, region: Option<&DerpRegion>, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let fresh = self.stun.values().any(|t| now.duration_since(*t) < RESTUN_INTERVAL * 2);
        let every = if fresh { RESTUN_INTERVAL } else { RESTUN_INTERVAL_UNANSWERED };
        if self.last_request.is_some_and(|t| now.duration_since(t) < every) {
            return Vec::new();
        }
        self.last_request = Some(now);
        self.pending.retain(|_, t| now.duration_since(*t) < Duration::from_secs(5));
        let Some(region) = region else { return Vec::new() };
        let mut out = Vec::new();
        for n in &region.nodes {
            let Some(port) = n.stun_port() else { continue };
            let v4: Option<IpAddr> = n
                .ipv4
                .parse::<Ipv4Addr>()
                .ok()
                .map(IpAddr::V4)
                .or_else(|| n.host_name.parse::<Ipv4Addr>().ok().map(IpAddr::V4));
            let v6: Option<IpAddr> = n
                .ipv6
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
                .or_else(|| n.host_name.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6))
                .filter(|_| self.ipv6);
            for ip in [v4, v6].into_iter().flatten() {
                if self.pending.len() >= MAX_STUN_PENDING {
                    break;
                }
                let tx = TxId::random();
                self.pending.insert(tx.0, now);
                out.push((SocketAddr::new(ip, port), build_request(tx).to_vec()));
            }
        }
        out
    }

    /// Sets the address a port mapping (NAT-PMP / PCP) gave us; advertised first.
    pub fn set_mapped(&mut self, mapped: Option<SocketAddr>) {
        self.mapped = mapped;
    }

    /// Makes the next [`Self::stun_due`] send at once (the home region changed).
    pub fn restun_now(&mut self) {
        self.last_request = None;
    }

    /// Handles a STUN datagram; returns the mapped address when it answers one of our requests.
    pub fn on_stun(&mut self, b: &[u8], now: Instant) -> Option<SocketAddr> {
        let (tx, mapped) = parse_response(b).ok()?;
        self.pending.remove(&tx.0)?;
        let new = self.stun.insert(mapped, now).is_none();
        if self.stun.len() > 8 {
            let oldest = self.stun.iter().min_by_key(|(_, t)| **t).map(|(a, _)| *a);
            if let Some(o) = oldest {
                self.stun.remove(&o);
            }
        }
        new.then_some(mapped)
    }

    /// Adds a mapping learned elsewhere (netcheck at start-up).
    pub fn add_stun(&mut self, a: SocketAddr, now: Instant) {
        self.stun.insert(a, now);
    }

    /// The endpoints to advertise: fresh STUN mappings first, then local addresses.
    pub fn list(&self, now: Instant) -> Vec<SocketAddr> {
        let mut v: Vec<SocketAddr> = self
            .stun
            .iter()
            .filter(|(_, t)| now.duration_since(**t) < STUN_ENDPOINT_TTL)
            .map(|(a, _)| *a)
            .collect();
        v.sort();
        if let Some(m) = self.mapped.filter(|m| !v.contains(m)) {
            v.insert(0, m);
        }
        for l in &self.local {
            if !v.contains(l) {
                v.push(*l);
            }
        }
        v
    }
}

/// Candidate addresses of up, non-loopback interfaces other than `exclude_iface`: IPv4 with
/// `port`, IPv6 (global and ULA; link-local needs a scope the endpoint format cannot carry) with
/// `port6` when there is an IPv6 socket.
pub fn local_addresses(port: u16, port6: Option<u16>, exclude_iface: &str) -> Vec<SocketAddr> {
    local_ips(exclude_iface)
        .into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V4(_) => Some(SocketAddr::new(ip, port)),
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => None,
            IpAddr::V6(_) => port6.map(|p| SocketAddr::new(ip, p)),
        })
        .collect()
}

/// Addresses (IPv4 and IPv6) of up interfaces other than `exclude_iface`, without loopback and
/// unspecified ones.
pub fn local_ips(exclude_iface: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we free with freeifaddrs below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a valid node of the list returned by getifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || (ifa.ifa_flags & libc::IFF_UP as u32) == 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        if name == exclude_iface {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points at a sockaddr of the family it declares.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let ip = if family == libc::AF_INET {
            // SAFETY: AF_INET means the sockaddr is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
        } else if family == libc::AF_INET6 {
            // SAFETY: AF_INET6 means the sockaddr is a sockaddr_in6.
            let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
            IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr))
        } else {
            continue;
        };
        if !ip.is_loopback() && !ip.is_unspecified() {
            out.push(ip);
        }
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use derpfleet_stun::message::build_response;

    #[test]
    fn classify_demuxes() {
        let stun = build_request(TxId::random());
        assert_eq!(classify(&stun), Kind::Stun);
        let mut disco = vec![0u8; 80];
        disco[..6].copy_from_slice(&derpfleet_proto::disco::MAGIC);
        assert_eq!(classify(&disco), Kind::Disco);
        assert_eq!(classify(&[4, 0, 0, 0, 1, 2, 3]), Kind::WireGuard);
        assert_eq!(classify(&[]), Kind::WireGuard);
    }

    #[test]
    fn stun_answers_only_count_for_our_requests() {
        let region: DerpRegion = serde_json::from_str(
            r#"{"RegionID":1,"RegionCode":"x","Nodes":[{"Name":"a","RegionID":1,"HostName":"h","IPv4":"10.0.0.1","STUNPort":3478}]}"#,
        )
        .unwrap();
        let mut o = OwnEndpoints::default();
        let t0 = Instant::now();
        let reqs = o.stun_due(Some(&region), t0);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].0, "10.0.0.1:3478".parse().unwrap());
        // Not again until the unanswered interval passes.
        assert!(o.stun_due(Some(&region), t0).is_empty());
        let tx = TxId::from_packet(&reqs[0].1).unwrap();
        let mapped: SocketAddr = "203.0.113.5:41641".parse().unwrap();
        assert_eq!(o.on_stun(&build_response(TxId::random(), mapped), t0), None);
        assert_eq!(o.on_stun(&build_response(tx, mapped), t0), Some(mapped));
        o.set_local(vec!["192.168.1.2:41641".parse().unwrap()]);
        assert_eq!(o.list(t0), vec![mapped, "192.168.1.2:41641".parse().unwrap()]);
        assert_eq!(o.list(t0 + STUN_ENDPOINT_TTL), vec!["192.168.1.2:41641".parse().unwrap()]);
        // A network change forgets the mapping and makes a re-STUN due at once.
        o.on_network_change(vec!["192.168.3.2:41641".parse().unwrap()]);
        assert_eq!(o.list(t0), vec!["192.168.3.2:41641".parse().unwrap()]);
        assert_eq!(o.stun_due(Some(&region), t0).len(), 1);
    }

    #[test]
    fn ipv6_stun_servers_are_asked_only_with_an_ipv6_socket() {
        let region: DerpRegion = serde_json::from_str(
            r#"{"RegionID":1,"RegionCode":"x","Nodes":[{"Name":"a","RegionID":1,"HostName":"h","IPv4":"10.0.0.1","IPv6":"fd00::1","STUNPort":3478}]}"#,
        )
        .unwrap();
        let t0 = Instant::now();
        let mut o = OwnEndpoints::default();
        let to: Vec<SocketAddr> = o.stun_due(Some(&region), t0).into_iter().map(|r| r.0).collect();
        assert_eq!(to, vec!["10.0.0.1:3478".parse().unwrap()]);
        let mut o = OwnEndpoints::default();
        o.set_ipv6(true);
        let to: Vec<SocketAddr> = o.stun_due(Some(&region), t0).into_iter().map(|r| r.0).collect();
        assert_eq!(to, vec!["10.0.0.1:3478".parse().unwrap(), "[fd00::1]:3478".parse().unwrap()]);
    }
}
