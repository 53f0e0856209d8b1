//! TCP dialing of a DERP target (spec §2.6): a region's nodes in priority order, or a plain URL.
//!
//! Per node: IPv4 and IPv6 are raced (IPv4 held back 200 ms when IPv6 is preferred), each family
//! using the fixed address from the map, a DNS lookup of `HostName` for `""`, or nothing for a
//! disabled family. Each node gets 1.5 s; the first node that connects wins.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use derpfleet_proto::derpmap::{AddrUsage, CertCheck, DerpNode, DerpRegion};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// Time each node gets to accept a TCP connection.
pub const NODE_DIAL_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long IPv4 waits behind IPv6 when IPv6 is preferred.
pub const IPV4_DELAY_WHEN_V6: Duration = Duration::from_millis(200);

/// A DERP server given as a URL: `http://127.0.0.1:3340/derp` or `https://host[:port][/derp]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DerpUrl {
    /// `https` (true) or `http`.
    pub https: bool,
    /// Host name or IP literal (brackets removed).
    pub host: String,
    /// Port (default 443 / 80).
    pub port: u16,
    /// Request path (default `/derp`).
    pub path: String,
    /// Certificate verification for `https` (default: Web PKI for `host`).
    pub cert_check: CertCheck,
    /// Dial this address instead of resolving `host` (the mesh `host/dialhost` form).
    pub dial_addr: Option<SocketAddr>,
}

/// Why a URL was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad DERP URL {url:?}: {reason}")]
pub struct BadUrl {
    url: String,
    reason: &'static str,
}

impl FromStr for DerpUrl {
    type Err = BadUrl;
    fn from_str(s: &str) -> Result<Self, BadUrl> {
        let bad = |reason| BadUrl { url: s.to_string(), reason };
        let uri: http::Uri = s.parse().map_err(|_| bad("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("scheme must be http or https")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = match uri.path() {
            "" | "/" => "/derp".to_string(),
            p => p.to_string(),
        };
        Ok(Self { https, host, port, path, cert_check: CertCheck::HostName, dial_addr: None })
    }
}

impl DerpUrl {
    /// The `Host` header value: the host, plus the port when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        host_header(&self.host, self.port, if self.https { 443 } else { 80 })
    }
}

pub(crate) fn host_header(host: &str, port: u16, default_port: u16) -> String {
    let h = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    if port == default_port {
        h
    } else {
        format!("{h}:{port}")
    }
}

/// Why no node could be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The region lists no node that may be dialed for DERP.
    #[error("region {0} has no DERP nodes (all STUNOnly or none)")]
    NoNodes(i64),
    /// Every node failed; one message per node.
    #[error("could not reach any node: {}", .0.join("; "))]
    AllFailed(Vec<String>),
}

async fn resolve(host: &str, port: u16) -> Vec<SocketAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![SocketAddr::new(ip, port)];
    }
    match tokio::net::lookup_host((host, port)).await {
        Ok(it) => it.collect(),
        Err(_) => Vec::new(),
    }
}

async fn connect_one(a: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(local) = bind else { return TcpStream::connect(a).await };
    if local.is_ipv6() != a.is_ipv6() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "source address of the other family",
        ));
    }
    let sock = if a.is_ipv6() { TcpSocket::new_v6()? } else { TcpSocket::new_v4()? };
    sock.bind(SocketAddr::new(local, 0))?;
    sock.connect(a).await
}

async fn connect_any(
    addrs: Vec<SocketAddr>,
    bind: Option<IpAddr>,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match connect_one(a, bind).await {
            Ok(s) => return Ok((s, a)),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Addresses of `node` for one family: fixed, resolved, or none when disabled.
async fn family_addrs(node: &DerpNode, v6: bool, port: u16) -> Vec<SocketAddr> {
    let usage =
        if v6 { node.ipv6_usage().map_fixed(IpAddr::V6) } else { node.ipv4_usage().map_fixed(IpAddr::V4) };
    match usage {
        AddrUsage::Fixed(ip) => vec![SocketAddr::new(ip, port)],
        AddrUsage::Disabled => Vec::new(),
        AddrUsage::Dns => {
            resolve(&node.host_name, port).await.into_iter().filter(|a| a.is_ipv6() == v6).collect()
        }
    }
}

trait MapFixed<A> {
    fn map_fixed(self, f: impl FnOnce(A) -> IpAddr) -> AddrUsage<IpAddr>;
}
impl<A> MapFixed<A> for AddrUsage<A> {
    fn map_fixed(self, f: impl FnOnce(A) -> IpAddr) -> AddrUsage<IpAddr> {
        match self {
            AddrUsage::Dns => AddrUsage::Dns,
            AddrUsage::Fixed(a) => AddrUsage::Fixed(f(a)),
            AddrUsage::Disabled => AddrUsage::Disabled,
        }
    }
}

/// An HTTP proxy that DERP connections tunnel through with `CONNECT host:port` (tailscaled honours
/// the proxy from the environment; spec §2.6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProxy {
    /// `host:port` of the proxy.
    pub addr: String,
    /// `user:pass` for `Proxy-Authorization: Basic`, if the URL carried it.
    pub credentials: Option<String>,
    /// Host names (or `.suffix`es) reached directly (`NO_PROXY`); `*` bypasses the proxy entirely.
    pub no_proxy: Vec<String>,
}

impl HttpProxy {
    /// Parses `http://[user:pass@]host[:port]` (port 80 by default).
    pub fn parse(url: &str) -> Result<Self, BadUrl> {
        let bad = |reason| BadUrl { url: url.to_string(), reason };
        let rest = url.strip_prefix("http://").ok_or_else(|| bad("proxy URL must start with http://"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (credentials, hostport) = match authority.rsplit_once('@') {
            Some((c, h)) => (Some(c.to_string()), h),
            None => (None, authority),
        };
        if hostport.is_empty() {
            return Err(bad("proxy URL has no host"));
        }
        let has_port = hostport.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !hostport.ends_with(']');
        let addr = if has_port { hostport.to_string() } else { format!("{hostport}:80") };
        Ok(Self { addr, credentials, no_proxy: Vec::new() })
    }

    /// The proxy from `HTTPS_PROXY`/`https_proxy` (then `ALL_PROXY`/`all_proxy`), with `NO_PROXY`.
    pub fn from_env() -> Option<Self> {
        let var = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()));
        let url = var(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"])?;
        let mut p = Self::parse(&url).ok()?;
        if let Some(np) = var(&["NO_PROXY", "no_proxy"]) {
            p.no_proxy =
                np.split(',').map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty()).collect();
        }
        Some(p)
    }

    /// True when `host` is reached directly.
    pub fn bypasses(&self, host: &str) -> bool {
        let h = host.to_ascii_lowercase();
        self.no_proxy.iter().any(|n| {
            n == "*"
                || *n == h
                || (n.starts_with('.') && h.ends_with(n.as_str()))
                || h.ends_with(&format!(".{n}"))
        })
    }

    /// Opens a tunnel to `host:port` through the proxy.
    pub async fn connect(&self, host: &str, port: u16, bind: Option<IpAddr>) -> std::io::Result<TcpStream> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (phost, pport) = self
            .addr
            .rsplit_once(':')
            .and_then(|(h, p)| {
                Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?))
            })
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad proxy address"))?;
        let (mut s, _) = connect_any(resolve(phost, pport).await, bind).await?;
        let target = host_header(host, port, 0);
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(c) = &self.credentials {
            use base64::Engine;
            let b = base64::engine::general_purpose::STANDARD.encode(c);
            req.push_str(&format!("Proxy-Authorization: Basic {b}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        // Read the response head byte by byte: nothing after it may be consumed (TLS follows).
        let mut head = Vec::with_capacity(256);
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 8192 {
                return Err(std::io::Error::other("proxy response head too large"));
            }
            let b = s.read_u8().await?;
            head.push(b);
        }
        let status_line = String::from_utf8_lossy(&head);
        let status_line = status_line.lines().next().unwrap_or_default().to_string();
        let code = status_line.split_whitespace().nth(1).unwrap_or_default();
        if code != "200" {
            return Err(std::io::Error::other(format!("proxy refused CONNECT {target}: {status_line}")));
        }
        Ok(s)
    }
}

/// Dials one node, racing IPv4 and IPv6, within [`NODE_DIAL_TIMEOUT`]; `bind` fixes the source
/// address (then only its family is tried). Through `proxy` (unless it bypasses the host) the node
/// is reached by name with one `CONNECT`; the returned address is then the proxy's.
pub async fn dial_node(
    node: &DerpNode,
    prefer_ipv6: bool,
    bind: Option<IpAddr>,
    proxy: Option<&HttpProxy>,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    let port = node.derp_port();
    if let Some(p) = proxy.filter(|p| !p.bypasses(&node.host_name)) {
        let tunnel = async {
            let s = p.connect(&node.host_name, port, bind).await?;
            let a = s.peer_addr()?;
            Ok((s, a))
        };
        return tokio::time::timeout(NODE_DIAL_TIMEOUT, tunnel).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "proxy dial timed out"))
        });
    }
    let attempt = async {
        let mut set = JoinSet::new();
        for v6 in [false, true] {
            if bind.is_some_and(|b| b.is_ipv6() != v6) {
                continue;
            }
            let node = node.clone();
            set.spawn(async move {
                if !v6 && prefer_ipv6 {
                    tokio::time::sleep(IPV4_DELAY_WHEN_V6).await;
                }
                connect_any(family_addrs(&node, v6, port).await, bind).await
            });
        }
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no usable address");
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) => last = e,
                Err(e) => last = std::io::Error::other(e),
            }
        }
        Err(last)
    };
    tokio::time::timeout(NODE_DIAL_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "node dial timed out")))
}

/// Dials a region's nodes in order, skipping `STUNOnly`; returns the stream and the node's index.
pub async fn dial_region(
    region: &DerpRegion,
    prefer_ipv6: bool,
    bind: Option<IpAddr>,
    proxy: Option<&HttpProxy>,
) -> Result<(TcpStream, SocketAddr, usize), DialError> {
    let mut errors = Vec::new();
    for (i, node) in region.nodes.iter().enumerate().filter(|(_, n)| !n.stun_only) {
        match dial_node(node, prefer_ipv6, bind, proxy).await {
            Ok((s, a)) => return Ok((s, a, i)),
            Err(e) => errors.push(format!("{}: {e}", node.name)),
        }
    }
    if errors.is_empty() {
        return Err(DialError::NoNodes(region.region_id));
    }
    Err(DialError::AllFailed(errors))
}

/// Dials a URL target (or its `dial_addr`), from source address `bind` if given, through `proxy`
/// unless it bypasses the host (a `dial_addr` is always dialed directly).
pub async fn dial_url(
    url: &DerpUrl,
    bind: Option<IpAddr>,
    proxy: Option<&HttpProxy>,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    if let Some(p) = proxy.filter(|p| url.dial_addr.is_none() && !p.bypasses(&url.host)) {
        let s = p.connect(&url.host, url.port, bind).await?;
        let a = s.peer_addr()?;
        return Ok((s, a));
    }
    let addrs = match url.dial_addr {
        Some(a) => vec![a],
        None => resolve(&url.host, url.port).await,
    };
    connect_any(addrs, bind).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let u: DerpUrl = "http://127.0.0.1:3340/derp".parse().unwrap();
        assert!(!u.https);
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("127.0.0.1", 3340, "/derp"));
        assert_eq!(u.host_header(), "127.0.0.1:3340");
        let u: DerpUrl = "https://derp.example".parse().unwrap();
        assert!(u.https);
        assert_eq!((u.port, u.path.as_str(), u.host_header().as_str()), (443, "/derp", "derp.example"));
        let u: DerpUrl = "https://[::1]:8443/derp".parse().unwrap();
        assert_eq!((u.host.as_str(), u.host_header().as_str()), ("::1", "[::1]:8443"));
        assert!("ftp://x/derp".parse::<DerpUrl>().is_err());
        assert!("not a url".parse::<DerpUrl>().is_err());
    }

    #[tokio::test]
    async fn region_dial_skips_dead_and_stun_only_nodes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        // A port with no listener: connection refused at once.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_port = dead.local_addr().unwrap().port();
        drop(dead);
        let node = |name: &str, port: u16, stun_only: bool| DerpNode {
            name: name.into(),
            region_id: 1,
            host_name: "127.0.0.1".into(),
            ipv4: "127.0.0.1".into(),
            ipv6: "none".into(),
            derp_port: port as i64,
            stun_only,
            ..Default::default()
        };
        let region = DerpRegion {
            region_id: 1,
            nodes: vec![node("a", port, true), node("b", dead_port, false), node("c", port, false)],
            ..Default::default()
        };
        let (_s, addr, idx) = dial_region(&region, false, None, None).await.unwrap();
        assert_eq!((idx, addr.port()), (2, port));
        let only_dead =
            DerpRegion { region_id: 1, nodes: vec![node("b", dead_port, false)], ..Default::default() };
        let e = dial_region(&only_dead, false, None, None).await.unwrap_err();
        assert!(e.to_string().contains("b:"), "{e}");
        let none = DerpRegion { region_id: 1, nodes: vec![node("a", port, true)], ..Default::default() };
        assert!(matches!(dial_region(&none, false, None, None).await, Err(DialError::NoNodes(1))));
    }
}

#[cfg(test)]
mod bind_tests {
    use super::*;

    #[tokio::test]
    async fn url_dial_uses_the_source_address() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url: DerpUrl = format!("http://{}/derp", l.local_addr().unwrap()).parse().unwrap();
        let src: IpAddr = "127.0.0.9".parse().unwrap();
        let (_s, _) = dial_url(&url, Some(src), None).await.unwrap();
        let (_, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), src);
        let v6: IpAddr = "::1".parse().unwrap();
        assert!(dial_url(&url, Some(v6), None).await.is_err(), "family mismatch is an error");
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::*;

    #[test]
    fn proxy_urls_and_no_proxy() {
        let p = HttpProxy::parse("http://user:pw@proxy.example:3128/").unwrap();
        assert_eq!((p.addr.as_str(), p.credentials.as_deref()), ("proxy.example:3128", Some("user:pw")));
        assert_eq!(HttpProxy::parse("http://10.0.0.1").unwrap().addr, "10.0.0.1:80");
        assert_eq!(HttpProxy::parse("http://[::1]:8080").unwrap().addr, "[::1]:8080");
        assert!(HttpProxy::parse("socks5://x:1").is_err());
        let p = HttpProxy { no_proxy: vec!["internal.example".into(), ".corp".into()], ..p };
        assert!(
            p.bypasses("derp.internal.example") && p.bypasses("internal.example") && p.bypasses("a.corp")
        );
        assert!(!p.bypasses("derp.example") && !p.bypasses("xinternal.example"));
    }
}
