//! The kernel's default routes, read from `/proc/net/route` and `/proc/net/ipv6_route`: one parser
//! for the network monitor (which compares them between snapshots) and port mapping (which sends to
//! the IPv4 gateway). The text is read, not netlink, because it is one file read with no socket and
//! works in every container that has `/proc`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One default route (destination and prefix length zero).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DefaultRoute {
    /// The interface it leaves by.
    pub iface: String,
    /// Its next hop (unspecified for an on-link default route).
    pub gateway: IpAddr,
    /// The route's metric (lower wins).
    pub metric: u32,
}

/// Default routes in `/proc/net/route` text: a header line, then `Iface Destination Gateway Flags
/// RefCnt Use Metric Mask ...` with the addresses in little-endian hex as the kernel prints them.
/// Lines that do not parse are skipped.
pub fn default_routes_v4(text: &str) -> Vec<DefaultRoute> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (iface, dst, gw, metric, mask) = (f.first()?, f.get(1)?, f.get(2)?, f.get(6)?, f.get(7)?);
            if *dst != "00000000" || *mask != "00000000" {
                return None;
            }
            let gw = u32::from_str_radix(gw, 16).ok()?;
            Some(DefaultRoute {
                iface: iface.to_string(),
                gateway: IpAddr::V4(Ipv4Addr::from(gw.swap_bytes())),
                metric: metric.parse().ok()?,
            })
        })
        .collect()
}

/// Default routes in `/proc/net/ipv6_route` text: `dst dst_len src src_len next_hop metric refcnt use
/// flags iface`, addresses as 32 hex digits, no header. Loopback's catch-all entry is skipped.
pub fn default_routes_v6(text: &str) -> Vec<DefaultRoute> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dst, len, hop, metric, iface) = (f.first()?, f.get(1)?, f.get(4)?, f.get(5)?, f.get(9)?);
            if !dst.bytes().all(|b| b == b'0') || *len != "00" || *iface == "lo" {
                return None;
            }
            Some(DefaultRoute {
                iface: iface.to_string(),
                gateway: IpAddr::V6(Ipv6Addr::from(u128::from_str_radix(hop, 16).ok()?)),
                metric: u32::from_str_radix(metric, 16).ok()?,
            })
        })
        .collect()
}

/// The IPv4 default gateway with the lowest metric, skipping on-link default routes.
pub fn ipv4_gateway(routes: &[DefaultRoute]) -> Option<Ipv4Addr> {
    routes
        .iter()
        .filter_map(|r| match r.gateway {
            IpAddr::V4(gw) if !gw.is_unspecified() => Some((r.metric, gw)),
            _ => None,
        })
        .min()
        .map(|(_, gw)| gw)
}

/// Reads both tables (a missing file reads as no routes).
pub fn read_default_routes() -> Vec<DefaultRoute> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mut routes = default_routes_v4(&read("/proc/net/route"));
    routes.extend(default_routes_v6(&read("/proc/net/ipv6_route")));
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                      h0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                      h0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                      h1\t00000000\t0102A8C0\t0003\t0\t0\t50\t00000000\t0\t0\t0\n\
                      df0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n";

    #[test]
    fn ipv4_default_routes_and_the_lowest_metric_gateway() {
        let r = default_routes_v4(V4);
        let names: Vec<_> = r.iter().map(|r| (r.iface.as_str(), r.gateway.to_string(), r.metric)).collect();
        assert_eq!(
            names,
            [
                ("h0", "192.168.1.1".into(), 100),
                ("h1", "192.168.2.1".into(), 50),
                ("df0", "0.0.0.0".into(), 0)
            ]
        );
        assert_eq!(ipv4_gateway(&r), Some(Ipv4Addr::new(192, 168, 2, 1)));
        assert_eq!(ipv4_gateway(&default_routes_v4("Iface\n")), None);
        assert!(default_routes_v4("x\nh0 00000000 zz 3 0 0 0 00000000\n").is_empty());
    }

    #[test]
    fn ipv6_default_routes_skip_loopback_and_specific_routes() {
        let z = "00000000000000000000000000000000";
        let v6 = format!(
            "{z} 00 {z} 00 fd000001000000000000000000000001 00000400 00000001 00000000 00000003 h1\n\
             fd000001000000000000000000000000 40 {z} 00 {z} 00000100 00000001 00000000 00000001 h1\n\
             {z} 00 {z} 00 {z} ffffffff 00000001 00000000 00200200 lo\n"
        );
        let r = default_routes_v6(&v6);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(
            (r[0].iface.as_str(), r[0].gateway.to_string(), r[0].metric),
            ("h1", "fd00:1::1".into(), 0x400)
        );
    }
}
