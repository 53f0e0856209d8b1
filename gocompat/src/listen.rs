//! Go `net.Listen` addresses, as derper's `-a` and the STUN responder's `-a` take them.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, ToSocketAddrs};

/// A listen address that cannot be used, with the text as given and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid listen address {addr:?}: {reason}")]
pub struct ListenAddrError {
    /// The address as given.
    pub addr: String,
    /// Why it was refused.
    pub reason: String,
}

/// Parses `:443`, `0.0.0.0:443`, `[::]:443`, `127.0.0.1:3340`, `host:https`.
///
/// An empty host means all interfaces: `[::]`, which the callers bind dual-stack. The port may be
/// a number or `http`/`https`; a host name is resolved (first address), as Go does.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, ListenAddrError> {
    let err = |reason: String| ListenAddrError { addr: s.to_owned(), reason };
    let (host, port) = s.rsplit_once(':').ok_or_else(|| err("missing port (use :PORT or IP:PORT)".into()))?;
    let port: u16 = match port {
        "https" => 443,
        "http" => 80,
        p => p.parse().map_err(|_| err(format!("bad port {p:?}")))?,
    };
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if bracketed.is_none() && host.contains(':') {
        return Err(err("an IPv6 address needs brackets: [IPv6]:PORT".into()));
    }
    let host = bracketed.unwrap_or(host);
    let ip = if host.is_empty() {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        ip
    } else {
        (host, port)
            .to_socket_addrs()
            .map_err(|e| err(format!("cannot resolve {host:?}: {e}")))?
            .next()
            .ok_or_else(|| err(format!("{host:?} has no address")))?
            .ip()
    };
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addrs() {
        let p = |s| parse_listen_addr(s).unwrap();
        assert_eq!(p(":443"), "[::]:443".parse().unwrap());
        assert_eq!(p("0.0.0.0:443"), "0.0.0.0:443".parse().unwrap());
        assert_eq!(p("[::]:443"), "[::]:443".parse().unwrap());
        assert_eq!(p("[::1]:2"), "[::1]:2".parse().unwrap());
        assert_eq!(p("127.0.0.1:3340"), "127.0.0.1:3340".parse().unwrap());
        assert_eq!(p("127.0.0.1:https"), "127.0.0.1:443".parse().unwrap());
        assert!(p("localhost:https").ip().is_loopback());
        for bad in ["", "443", ":", ":99999", "::1:3478", "1.2.3.4", "nonsense"] {
            let e = parse_listen_addr(bad).unwrap_err();
            assert_eq!(e.addr, bad);
        }
    }
}
