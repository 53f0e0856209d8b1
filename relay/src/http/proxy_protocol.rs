//! PROXY protocol v1 (text) and v2 (binary) in front of the main and `-http-port` listeners.
//!
//! An L4 load balancer (AWS NLB, HAProxy `send-proxy-v2`, …) that forwards TCP hides the client's
//! address; the PROXY header it writes first tells us. Only a connection whose TCP peer is in
//! `-proxy-protocol-trusted` is read for a header, and such a connection **must** start with one
//! (a trusted balancer that forgot to send it would otherwise make every client look like the
//! balancer). A connection from anyone else is never parsed: a `PROXY …` line from it is just a
//! bad HTTP request (or a bad TLS ClientHello).
//!
//! The header's source address then replaces the TCP peer address everywhere downstream (accept
//! limits, admission `Source`, PeerPresent, logs). `LOCAL` (v2 health checks) and `UNKNOWN`/
//! `AF_UNSPEC`/`AF_UNIX` keep the TCP peer address, as the specification asks.
//!
//! The codec is the `ppp` crate; this module only reads the right number of bytes, caps them,
//! applies the deadline and counts failures by reason. Reads never go past the header (v2 is read
//! by its length field, v1 byte by byte up to its CRLF), so the TLS or HTTP bytes that follow stay
//! in the socket and the stream type does not change.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use metrics::Counter;
use ppp::{v1, v2, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

/// A v1 header is at most 107 bytes, CRLF included (specification §2.1).
pub const V1_MAX_LEN: usize = 107;
/// Our cap on a v2 header (16-byte preamble + addresses + TLVs). AWS NLB and HAProxy send well
/// under 1 KiB (addresses plus a few TLVs); the protocol's 64 KiB ceiling is refused as oversized
/// so a trusted-but-broken sender cannot make us buffer that much per connection.
pub const V2_MAX_LEN: usize = 4096;
/// The v2 preamble: 12-byte signature, version/command, family/protocol, 2-byte length.
const V2_PREAMBLE: usize = 16;
/// Default time a trusted peer has to send its whole header (`-proxy-protocol-timeout`).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A list of networks (`CIDR[,CIDR…]`; a bare IP is a /32 or /128).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedNets(Vec<IpNet>);

impl TrustedNets {
    /// Whether `ip` is inside one of the networks (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = unmap(ip);
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// No networks: nothing is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for TrustedNets {
    type Err = String;

    /// Parses `10.0.0.0/8,192.0.2.7,2001:db8::/32`; empty = none. Host bits are cleared
    /// (`10.1.2.3/8` means `10.0.0.0/8`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut nets = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let net = match part.parse::<IpNet>() {
                Ok(n) => n.trunc(),
                Err(_) => match part.parse::<IpAddr>() {
                    Ok(ip) => IpNet::from(unmap(ip)),
                    Err(_) => return Err(format!("{part:?} is not a CIDR (10.0.0.0/8) or an IP address")),
                },
            };
            nets.push(net);
        }
        Ok(TrustedNets(nets))
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// What a complete, valid header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxiedAddr {
    /// `PROXY` with TCP over IPv4/IPv6: the client's address.
    Client(SocketAddr),
    /// v2 `LOCAL` (the balancer's own health check): keep the TCP peer address.
    Local,
    /// v1 `UNKNOWN`, or v2 `PROXY` for a family we cannot use (unspecified, UNIX): keep the
    /// TCP peer address.
    Unknown,
}

/// Why a trusted connection was closed before anything else was read. The reason names are
/// the `reason` label of `derp_proxy_protocol_rejected`.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("not a PROXY protocol header: {0}")]
    Malformed(String),
    #[error("PROXY header longer than {0} bytes")]
    Oversized(usize),
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("connection closed inside the PROXY header")]
    Truncated,
    #[error("reading the PROXY header: {0}")]
    Io(io::Error),
}

impl ProxyHeaderError {
    /// The metric label for this failure.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::Oversized(_) => "oversized",
            Self::Timeout(_) => "timeout",
            Self::Truncated => "truncated",
            Self::Io(_) => "io",
        }
    }
}

/// Parses one complete header that fills `bytes` exactly (v1 up to and including its CRLF, v2
/// preamble plus its length). The single entry point of the codec, also the fuzz target's.
pub fn parse_header(bytes: &[u8]) -> Result<ProxiedAddr, ProxyHeaderError> {
    let malformed = |e: &dyn std::fmt::Display| ProxyHeaderError::Malformed(e.to_string());
    if bytes.starts_with(v2::PROTOCOL_PREFIX) {
        if bytes.len() > V2_MAX_LEN {
            return Err(ProxyHeaderError::Oversized(V2_MAX_LEN));
        }
        let h = v2::Header::try_from(bytes).map_err(|e| malformed(&e))?;
        if h.len() != bytes.len() {
            return Err(ProxyHeaderError::Malformed(format!(
                "v2 header is {} bytes but {} were given",
                h.len(),
                bytes.len()
            )));
        }
        return Ok(match (h.command, h.addresses) {
            (v2::Command::Local, _) => ProxiedAddr::Local,
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                ProxiedAddr::Client(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                ProxiedAddr::Client(SocketAddr::new(unmap(a.source_address.into()), a.source_port))
            }
            (v2::Command::Proxy, _) => ProxiedAddr::Unknown,
        });
    }
    if bytes.starts_with(b"PROXY ") {
        if bytes.len() > V1_MAX_LEN {
            return Err(ProxyHeaderError::Oversized(V1_MAX_LEN));
        }
        if !bytes.ends_with(b"\r\n") {
            return Err(ProxyHeaderError::Malformed("v1 header does not end with CRLF".into()));
        }
        let h = v1::Header::try_from(bytes).map_err(|e| malformed(&e))?;
        if h.header.len() != bytes.len() {
            return Err(ProxyHeaderError::Malformed("bytes after the v1 header's CRLF".into()));
        }
        return Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => {
                ProxiedAddr::Client(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            v1::Addresses::Tcp6(a) => {
                ProxiedAddr::Client(SocketAddr::new(unmap(a.source_address.into()), a.source_port))
            }
            v1::Addresses::Unknown => ProxiedAddr::Unknown,
        });
    }
    Err(ProxyHeaderError::Malformed("neither the v1 nor the v2 signature".into()))
}

/// Reads exactly one header from `io` (nothing past it) and parses it. No deadline here; see
/// [`ProxyProtocol::read`].
pub async fn read_header<S: AsyncRead + Unpin>(io: &mut S) -> Result<ProxiedAddr, ProxyHeaderError> {
    let mut buf = Vec::with_capacity(V2_PREAMBLE);
    let mut first = [0u8; 1];
    read_exact(io, &mut first).await?;
    buf.push(first[0]);
    match first[0] {
        // v2 signature starts with CR: the preamble, then as many bytes as its length says.
        b'\r' => {
            buf.resize(V2_PREAMBLE, 0);
            read_exact(io, &mut buf[1..]).await?;
            if !buf.starts_with(v2::PROTOCOL_PREFIX) {
                return Err(ProxyHeaderError::Malformed("bad v2 signature".into()));
            }
            // A bad version, command, family or length is refused before waiting for the rest.
            if let Err(e) = v2::Header::try_from(&buf[..]) {
                if !e.is_incomplete() {
                    return Err(ProxyHeaderError::Malformed(e.to_string()));
                }
            }
            let len = V2_PREAMBLE + u16::from_be_bytes([buf[14], buf[15]]) as usize;
            if len > V2_MAX_LEN {
                return Err(ProxyHeaderError::Oversized(V2_MAX_LEN));
            }
            buf.resize(len, 0);
            read_exact(io, &mut buf[V2_PREAMBLE..]).await?;
        }
        // v1: byte by byte until LF, so no HTTP/TLS byte after it is consumed (v1 is rare and
        // short; v2 is what load balancers send).
        b'P' => loop {
            if buf.len() >= V1_MAX_LEN {
                return Err(ProxyHeaderError::Oversized(V1_MAX_LEN));
            }
            read_exact(io, &mut first).await?;
            buf.push(first[0]);
            if first[0] == b'\n' {
                break;
            }
            if buf.len() == 6 && &buf[..] != b"PROXY " {
                return Err(ProxyHeaderError::Malformed("bad v1 signature".into()));
            }
        },
        _ => return Err(ProxyHeaderError::Malformed("neither the v1 nor the v2 signature".into())),
    }
    parse_header(&buf)
}

async fn read_exact<S: AsyncRead + Unpin>(io: &mut S, buf: &mut [u8]) -> Result<(), ProxyHeaderError> {
    match io.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ProxyHeaderError::Truncated),
        Err(e) => Err(ProxyHeaderError::Io(e)),
    }
}

/// The PROXY protocol setting of a relay's listeners, with its counters.
#[derive(Clone, Debug)]
pub struct ProxyProtocol {
    trusted: TrustedNets,
    timeout: Duration,
    metrics: ProxyProtocolMetrics,
}

/// `derp_proxy_protocol_headers{result}` and `derp_proxy_protocol_rejected{reason}`.
#[derive(Clone, Debug)]
pub struct ProxyProtocolMetrics {
    /// Headers that gave a client address.
    pub proxied: Counter,
    /// `LOCAL` / `UNKNOWN` headers (the TCP peer address is kept).
    pub local: Counter,
    /// Rejections by reason, indexed like [`ProxyProtocolMetrics::REASONS`].
    pub rejected: [Counter; 5],
}

impl ProxyProtocolMetrics {
    /// The `reason` label values, in the order of [`ProxyProtocolMetrics::rejected`].
    pub const REASONS: [&'static str; 5] = ["malformed", "oversized", "timeout", "truncated", "io"];

    fn reject(&self, e: &ProxyHeaderError) {
        let i = Self::REASONS.iter().position(|r| *r == e.reason()).unwrap_or(0);
        self.rejected[i].increment(1);
    }
}

impl ProxyProtocol {
    /// The setting for these trusted networks; None when the list is empty (PROXY off).
    pub fn new(trusted: TrustedNets, timeout: Duration, metrics: ProxyProtocolMetrics) -> Option<Self> {
        (!trusted.is_empty()).then_some(Self { trusted, timeout, metrics })
    }

    /// Whether a connection from `peer` must start with a header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.contains(peer)
    }

    /// Reads a trusted connection's header within the deadline: the address to use from now on,
    /// or None (logged and counted; the caller closes the connection).
    pub async fn read<S: AsyncRead + Unpin>(&self, io: &mut S, peer: SocketAddr) -> Option<SocketAddr> {
        let r = match tokio::time::timeout(self.timeout, read_header(io)).await {
            Ok(r) => r,
            Err(_) => Err(ProxyHeaderError::Timeout(self.timeout)),
        };
        match r {
            Ok(ProxiedAddr::Client(client)) => {
                self.metrics.proxied.increment(1);
                tracing::trace!(%peer, %client, "PROXY header");
                Some(client)
            }
            Ok(ProxiedAddr::Local | ProxiedAddr::Unknown) => {
                self.metrics.local.increment(1);
                Some(peer)
            }
            Err(e) => {
                self.metrics.reject(&e);
                tracing::debug!(%peer, "closing connection from a trusted proxy: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(cmd: u8, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        let b = v2::Builder::with_addresses(0x20 | cmd, v2::Protocol::Stream, (src, dst));
        b.build().unwrap()
    }

    #[test]
    fn trusted_nets_parse_and_match() {
        let t: TrustedNets = "10.0.0.0/8, 192.0.2.7,2001:db8::/32".parse().unwrap();
        assert!(t.contains("10.9.8.7".parse().unwrap()));
        assert!(t.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(t.contains("192.0.2.7".parse().unwrap()));
        assert!(!t.contains("192.0.2.8".parse().unwrap()));
        assert!(t.contains("2001:db8::1".parse().unwrap()));
        assert!("".parse::<TrustedNets>().unwrap().is_empty());
        let e = "10.0.0.0/33".parse::<TrustedNets>().unwrap_err();
        assert!(e.contains("10.0.0.0/33"), "{e}");
        assert!("nope".parse::<TrustedNets>().is_err());
    }

    #[tokio::test]
    async fn reads_v1_v2_and_local_without_overreading() {
        let src: SocketAddr = "198.51.100.7:4242".parse().unwrap();
        let dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let mut v2 = v2_header(1, src, dst);
        v2.extend_from_slice(b"GET /");
        let mut r = &v2[..];
        assert_eq!(read_header(&mut r).await.unwrap(), ProxiedAddr::Client(src));
        assert_eq!(r, b"GET /");
        let local = v2_header(0, dst, dst);
        assert_eq!(read_header(&mut &local[..]).await.unwrap(), ProxiedAddr::Local);
        let mut r = &b"PROXY TCP6 2001:db8::5 2001:db8::1 5555 443\r\nGET"[..];
        assert_eq!(
            read_header(&mut r).await.unwrap(),
            ProxiedAddr::Client("[2001:db8::5]:5555".parse().unwrap())
        );
        assert_eq!(r, b"GET");
        let r = read_header(&mut &b"PROXY UNKNOWN\r\n"[..]).await.unwrap();
        assert_eq!(r, ProxiedAddr::Unknown);
    }

    #[tokio::test]
    async fn bad_headers_name_their_reason() {
        let reason = |b: Vec<u8>| async move { read_header(&mut &b[..]).await.unwrap_err().reason() };
        assert_eq!(reason(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await, "malformed");
        assert_eq!(reason(b"PROXY TCP4 1.2.3.4\r\n".to_vec()).await, "malformed");
        assert_eq!(reason(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2".to_vec()).await, "truncated");
        assert_eq!(reason([b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat()).await, "oversized");
        let mut big = v2_header(1, "1.2.3.4:1".parse().unwrap(), "1.2.3.4:2".parse().unwrap());
        big[14..16].copy_from_slice(&60000u16.to_be_bytes());
        assert_eq!(reason(big).await, "oversized");
        let mut badver = v2_header(1, "1.2.3.4:1".parse().unwrap(), "1.2.3.4:2".parse().unwrap());
        badver[12] = 0x31;
        assert_eq!(reason(badver).await, "malformed");
    }

    #[test]
    fn parse_header_rejects_trailing_bytes() {
        assert!(parse_header(b"PROXY UNKNOWN\r\nX").is_err());
        assert!(parse_header(b"").is_err());
        let mut v2 = v2_header(1, "1.2.3.4:1".parse().unwrap(), "1.2.3.4:2".parse().unwrap());
        v2.push(0);
        assert!(parse_header(&v2).is_err());
    }
}
