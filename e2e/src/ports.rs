//! Ports for tests that must name a port before the process that binds it starts.
//!
//! The usual trick, bind port 0, read the port and close, hands out a port from the kernel's ephemeral
//! range: until the test's relay binds it, any `connect()` or `bind(:0)` anywhere on the machine (and
//! the suite runs hundreds of tests at once, some holding thousands of connections) may take that same
//! port, and the relay fails to start with "address in use". So the ports here come from *below* the
//! ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), where the kernel never allocates on its
//! own. Only another test's pick can land there: picks are random, checked free on TCP and UDP of every
//! address asked for, and never handed out twice by one process.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::sync::Mutex;

/// Lowest port handed out (above the well-known and most registered service ports).
const LOWEST: u16 = 10_000;

/// A port free for TCP and UDP on 127.0.0.1, outside the kernel's ephemeral range.
pub fn unused_port() -> u16 {
    unused_port_on(&[IpAddr::V4(Ipv4Addr::LOCALHOST)])
}

/// A port free for TCP and UDP on every one of `ips` (e.g. 127.0.0.1, .2 and .3 for relays that
/// share a port on several loopback addresses), outside the kernel's ephemeral range.
///
/// Panics after many tries, which only a machine with the whole range in use would cause.
pub fn unused_port_on(ips: &[IpAddr]) -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let (lowest, highest) = range();
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..1_000 {
        let port = lowest + (random() % u64::from(highest - lowest)) as u16;
        if !given.contains(&port) && ips.iter().all(|&ip| free_on(ip, port)) {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port in {lowest}..{highest} on {ips:?} after 1000 tries");
}

/// The ports handed out: from [`LOWEST`] up to the ephemeral range's start. A machine whose
/// ephemeral range starts lower still gets ports (from a thousand above `LOWEST`), just without
/// that protection.
fn range() -> (u16, u16) {
    (LOWEST, ephemeral_start().max(LOWEST + 1_000))
}

/// Whether `port` can be bound on `ip` now, for TCP and for UDP.
fn free_on(ip: IpAddr, port: u16) -> bool {
    TcpListener::bind((ip, port)).is_ok() && UdpSocket::bind((ip, port)).is_ok()
}

/// First port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A random number: std's randomly keyed hasher, fed the clock so each call differs.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_below_the_ephemeral_range_free_and_never_repeated() {
        let ips = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))];
        let ports: Vec<u16> = (0..200).map(|_| unused_port_on(&ips)).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for p in ports {
            let (lowest, highest) = range();
            assert!((lowest..highest).contains(&p), "{p} is outside {lowest}..{highest}");
            assert!(ips.iter().all(|&ip| free_on(ip, p)), "{p} is not free");
        }
    }

    #[test]
    fn a_port_bound_for_tcp_or_udp_is_not_free() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let tcp = TcpListener::bind((lo, unused_port())).unwrap();
        let udp = UdpSocket::bind((lo, unused_port())).unwrap();
        assert!(!free_on(lo, tcp.local_addr().unwrap().port()), "a TCP listener's port counted as free");
        assert!(!free_on(lo, udp.local_addr().unwrap().port()), "a bound UDP port counted as free");
    }
}
