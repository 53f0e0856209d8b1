//! The client address an L7 reverse proxy reports (`Forwarded` / `X-Forwarded-For`).
//!
//! nginx, Caddy and Traefik terminate TLS and pass the DERP upgrade (or the WebSocket `derp`
//! subprotocol) to a plain-HTTP relay; the TCP peer is then the proxy. Only when that peer is in
//! `-forwarded-trusted` are its headers believed; from anyone else they are ignored (a client
//! can write any header it likes).
//!
//! Which address: the list is walked from the right (the hop nearest to us) skipping addresses
//! that are themselves trusted proxies; the first untrusted one is the client (nginx's
//! `real_ip_recursive on`, Caddy's `trusted_proxies`). If every hop is trusted the leftmost is
//! used. `Forwarded` (RFC 7239) wins over `X-Forwarded-For` when both are sent. Entries that are
//! not IP addresses (`unknown`, obfuscated `_name`) end the walk there: the hop before them
//! cannot be vouched for, so the TCP peer is kept. `X-Forwarded-For` carries no port, so the
//! client's port is 0 (unknown) unless `Forwarded` gives one.

use std::net::{IpAddr, SocketAddr};

use super::proxy_protocol::TrustedNets;

/// The `Forwarded` and `X-Forwarded-For` header values of one request, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardedHeaders {
    /// `Forwarded` values (each may hold several comma-separated elements).
    pub forwarded: Vec<String>,
    /// `X-Forwarded-For` values.
    pub x_forwarded_for: Vec<String>,
}

impl ForwardedHeaders {
    /// Collects the values from a header iterator (names compared case-insensitively).
    pub fn collect(&mut self, name: &str, value: &[u8]) {
        if name.eq_ignore_ascii_case("forwarded") {
            self.forwarded.push(String::from_utf8_lossy(value).into_owned());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            self.x_forwarded_for.push(String::from_utf8_lossy(value).into_owned());
        }
    }

    fn is_empty(&self) -> bool {
        self.forwarded.is_empty() && self.x_forwarded_for.is_empty()
    }
}

/// The address to treat as the client's: from the headers when `peer` is a trusted proxy and
/// they name one, else `peer`.
pub fn client_addr(peer: SocketAddr, headers: &ForwardedHeaders, trusted: &TrustedNets) -> SocketAddr {
    if trusted.is_empty() || headers.is_empty() || !trusted.contains(peer.ip()) {
        return peer;
    }
    let hops: Vec<Option<SocketAddr>> = if !headers.forwarded.is_empty() {
        headers.forwarded.iter().flat_map(|v| v.split(',')).map(forwarded_for).collect()
    } else {
        headers.x_forwarded_for.iter().flat_map(|v| v.split(',')).map(|h| parse_node(h.trim())).collect()
    };
    let mut leftmost = None;
    for hop in hops.iter().rev() {
        match hop {
            Some(addr) if trusted.contains(addr.ip()) => leftmost = Some(*addr),
            Some(addr) => return *addr,
            None => return peer,
        }
    }
    leftmost.unwrap_or(peer)
}

/// The `for=` node of one `Forwarded` element (`for=192.0.2.1;proto=https`), if it is an address.
fn forwarded_for(element: &str) -> Option<SocketAddr> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then(|| parse_node(v.trim().trim_matches('"')))?
    })
}

/// `192.0.2.1`, `192.0.2.1:5678`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:5678`.
fn parse_node(s: &str) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa);
    }
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(fwd: &[&str], xff: &[&str]) -> ForwardedHeaders {
        ForwardedHeaders {
            forwarded: fwd.iter().map(|s| s.to_string()).collect(),
            x_forwarded_for: xff.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn believes_only_trusted_peers_and_skips_trusted_hops() {
        let trusted: TrustedNets = "127.0.0.1,10.0.0.0/8".parse().unwrap();
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let x = h(&[], &["198.51.100.1, 10.0.0.5"]);
        assert_eq!(client_addr(proxy, &x, &trusted), "198.51.100.1:0".parse().unwrap());
        assert_eq!(client_addr(stranger, &x, &trusted), stranger);
        assert_eq!(client_addr(proxy, &x, &TrustedNets::default()), proxy);
        // A client-forged left part does not win over what the trusted hop appended.
        let forged = h(&[], &["127.0.0.9", "198.51.100.2"]);
        assert_eq!(client_addr(proxy, &forged, &trusted), "198.51.100.2:0".parse().unwrap());
        let all_trusted = h(&[], &["10.1.1.1, 10.0.0.5"]);
        assert_eq!(client_addr(proxy, &all_trusted, &trusted), "10.1.1.1:0".parse().unwrap());
        let junk = h(&[], &["198.51.100.1, unknown"]);
        assert_eq!(client_addr(proxy, &junk, &trusted), proxy);
    }

    #[test]
    fn forwarded_wins_and_may_carry_a_port() {
        let trusted: TrustedNets = "127.0.0.1".parse().unwrap();
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let both = h(&["for=\"[2001:db8::7]:4711\";proto=https"], &["198.51.100.1"]);
        assert_eq!(client_addr(proxy, &both, &trusted), "[2001:db8::7]:4711".parse().unwrap());
        let f = h(&["for=192.0.2.60;proto=http;by=203.0.113.43, For=127.0.0.1"], &[]);
        assert_eq!(client_addr(proxy, &f, &trusted), "192.0.2.60:0".parse().unwrap());
        let obfuscated = h(&["for=_hidden"], &[]);
        assert_eq!(client_addr(proxy, &obfuscated, &trusted), proxy);
    }
}
