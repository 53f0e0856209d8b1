//! The client address an L7 reverse proxy reports (`Forwarded` / `X-Forwarded-For`).
//!
//! nginx, Caddy and Traefik terminate TLS and pass the DERP upgrade (or the WebSocket `derp`
//! subprotocol) to a plain-HTTP relay; the TCP peer is then the proxy. Only when that peer is in
//! `-forwarded-trusted` are its headers believed; from anyone else they are ignored (a client
//! can write any header it likes).
//!
//! Which header: exactly one, chosen by the operator (`-forwarded-header`, default
//! `x-forwarded-for`), never "whichever is present": nginx and Caddy set `X-Forwarded-For` but
//! pass a client's own `Forwarded` header through untouched, so believing either would let any
//! client choose its address (the nginx/Caddy tests caught exactly that).
//!
//! Which address: the list is walked from the right (the hop nearest to us) skipping addresses
//! that are themselves trusted proxies; the first untrusted one is the client (nginx's
//! `real_ip_recursive on`, Caddy's `trusted_proxies`). If every hop is trusted the leftmost is
//! used. Entries that are not IP addresses (`unknown`, obfuscated `_name`) end the walk there:
//! the hop before them cannot be vouched for, so the TCP peer is kept. `X-Forwarded-For` carries
//! no port, so the client's port is 0 (unknown) unless `Forwarded` gives one.

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

/// Which header the trusted proxies set (`-forwarded-header`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx `$proxy_add_x_forwarded_for`, Caddy, Traefik, HAProxy `option forwardfor`).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=…`.
    Forwarded,
}

impl std::str::FromStr for ForwardedHeader {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Ok(Self::XForwardedFor),
            "forwarded" => Ok(Self::Forwarded),
            _ => Err(format!("{s:?}: use x-forwarded-for or forwarded")),
        }
    }
}

/// Whose forwarding headers are believed, and which header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardedTrust {
    /// The L7 proxies (`-forwarded-trusted`); empty = headers never believed.
    pub proxies: TrustedNets,
    /// The header they set.
    pub header: ForwardedHeader,
}

/// The address to treat as the client's: from the chosen header when `peer` is a trusted proxy
/// and it names one, else `peer`.
pub fn client_addr(peer: SocketAddr, headers: &ForwardedHeaders, trust: &ForwardedTrust) -> SocketAddr {
    let trusted = &trust.proxies;
    if trusted.is_empty() || headers.is_empty() || !trusted.contains(peer.ip()) {
        return peer;
    }
    let hops: Vec<Option<SocketAddr>> = match trust.header {
        ForwardedHeader::Forwarded => {
            headers.forwarded.iter().flat_map(|v| v.split(',')).map(forwarded_for).collect()
        }
        ForwardedHeader::XForwardedFor => {
            headers.x_forwarded_for.iter().flat_map(|v| v.split(',')).map(|h| parse_node(h.trim())).collect()
        }
    };
    if hops.is_empty() {
        return peer;
    }
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

    fn trust(nets: &str, header: ForwardedHeader) -> ForwardedTrust {
        ForwardedTrust { proxies: nets.parse().unwrap(), header }
    }

    #[test]
    fn believes_only_trusted_peers_and_skips_trusted_hops() {
        let trusted = trust("127.0.0.1,10.0.0.0/8", ForwardedHeader::XForwardedFor);
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:5000".parse().unwrap();
        let x = h(&[], &["198.51.100.1, 10.0.0.5"]);
        assert_eq!(client_addr(proxy, &x, &trusted), "198.51.100.1:0".parse().unwrap());
        assert_eq!(client_addr(stranger, &x, &trusted), stranger);
        assert_eq!(client_addr(proxy, &x, &ForwardedTrust::default()), proxy);
        // A client-forged left part does not win over what the trusted hop appended.
        let forged = h(&[], &["127.0.0.9", "198.51.100.2"]);
        assert_eq!(client_addr(proxy, &forged, &trusted), "198.51.100.2:0".parse().unwrap());
        let all_trusted = h(&[], &["10.1.1.1, 10.0.0.5"]);
        assert_eq!(client_addr(proxy, &all_trusted, &trusted), "10.1.1.1:0".parse().unwrap());
        let junk = h(&[], &["198.51.100.1, unknown"]);
        assert_eq!(client_addr(proxy, &junk, &trusted), proxy);
        // A Forwarded header passed through from the client is not read in this mode.
        let both = h(&["for=192.0.2.66"], &["198.51.100.3"]);
        assert_eq!(client_addr(proxy, &both, &trusted), "198.51.100.3:0".parse().unwrap());
        assert_eq!(client_addr(proxy, &h(&["for=192.0.2.66"], &[]), &trusted), proxy);
    }

    #[test]
    fn forwarded_mode_reads_only_forwarded_which_may_carry_a_port() {
        let trusted = trust("127.0.0.1", ForwardedHeader::Forwarded);
        let proxy: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let both = h(&["for=\"[2001:db8::7]:4711\";proto=https"], &["198.51.100.1"]);
        assert_eq!(client_addr(proxy, &both, &trusted), "[2001:db8::7]:4711".parse().unwrap());
        let f = h(&["for=192.0.2.60;proto=http;by=203.0.113.43, For=127.0.0.1"], &[]);
        assert_eq!(client_addr(proxy, &f, &trusted), "192.0.2.60:0".parse().unwrap());
        let obfuscated = h(&["for=_hidden"], &[]);
        assert_eq!(client_addr(proxy, &obfuscated, &trusted), proxy);
        assert_eq!(client_addr(proxy, &h(&[], &["198.51.100.1"]), &trusted), proxy);
        assert_eq!("Forwarded".parse::<ForwardedHeader>(), Ok(ForwardedHeader::Forwarded));
        assert!("via".parse::<ForwardedHeader>().is_err());
    }
}
