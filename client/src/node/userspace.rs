//! Userspace mode: no TUN device (no root needed for it); instead, local UDP ports are forwarded
//! through the tunnel. A datagram arriving at `listen` is wrapped in an IPv4/UDP packet from our
//! tunnel address (source port = the listen port) to `to`; the peer's answers to that address and
//! port are unwrapped and sent back to the last local client of that forward.
//!
//! Only UDP over IPv4: TCP would need a userspace TCP stack.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// One forwarded port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    /// local UDP address clients send to
    pub listen: SocketAddr,
    /// inner destination (a peer's tunnel address and port)
    pub to: SocketAddrV4,
}

struct Port {
    sock: Arc<UdpSocket>,
    to: SocketAddrV4,
    inner_port: u16,
    client: Mutex<Option<SocketAddr>>,
}

/// The userspace "device".
pub struct Userspace {
    addr: Ipv4Addr,
    ports: Vec<Arc<Port>>,
    rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Packets queued from local sockets towards the tunnel (bounded; a full queue drops).
const QUEUE: usize = 1024;

const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

fn ipv4_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 =
        h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds `IPv4 ‖ UDP ‖ payload` (UDP checksum 0 = none, allowed for IPv4).
pub fn build_udp4(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Option<Vec<u8>> {
    let total = IPV4_HEADER + UDP_HEADER + payload.len();
    let total16 = u16::try_from(total).ok()?;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p[2..4].copy_from_slice(&total16.to_be_bytes());
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    let c = ipv4_checksum(&p[..IPV4_HEADER]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&((UDP_HEADER + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    Some(p)
}

/// Parses an unfragmented IPv4/UDP packet into (src, dst, payload).
pub fn parse_udp4(p: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, &[u8])> {
    if p.len() < IPV4_HEADER || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    let frag = u16::from_be_bytes([p[6], p[7]]) & 0x3fff;
    if ihl < IPV4_HEADER || total > p.len() || total < ihl + UDP_HEADER || frag != 0 {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    let u = &p[ihl..total];
    let ulen = usize::from(u16::from_be_bytes([u[4], u[5]]));
    if ulen < UDP_HEADER || ulen > u.len() {
        return None;
    }
    let src = SocketAddrV4::new(ip(12), u16::from_be_bytes([u[0], u[1]]));
    let dst = SocketAddrV4::new(ip(16), u16::from_be_bytes([u[2], u[3]]));
    Some((src, dst, &u[UDP_HEADER..ulen]))
}

impl Userspace {
    /// Binds every forward's local socket and starts reading them. Needs a tokio runtime.
    pub async fn start(addr: Ipv4Addr, forwards: &[Forward]) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut ports = Vec::new();
        let mut tasks = Vec::new();
        for f in forwards {
            let sock = Arc::new(UdpSocket::bind(f.listen).await?);
            let inner_port = sock.local_addr()?.port();
            let port = Arc::new(Port { sock, to: f.to, inner_port, client: Mutex::new(None) });
            let (p, tx) = (port.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65535];
                while let Ok((n, from)) = p.sock.recv_from(&mut buf).await {
                    *p.client.lock() = Some(from);
                    let src = SocketAddrV4::new(addr, p.inner_port);
                    if let Some(pkt) = build_udp4(src, p.to, &buf[..n]) {
                        let _ = tx.try_send(pkt);
                    }
                }
            }));
            ports.push(port);
        }
        Ok(Self { addr, ports, rx: tokio::sync::Mutex::new(rx), tasks })
    }

    /// The next packet towards the tunnel.
    pub async fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let pkt =
            self.rx.lock().await.recv().await.ok_or_else(|| std::io::Error::other("userspace closed"))?;
        let n = pkt.len().min(buf.len());
        buf[..n].copy_from_slice(&pkt[..n]);
        Ok(n)
    }

    /// A packet from the tunnel: delivered to the forward it answers, else dropped (`Err`).
    pub fn try_send(&self, pkt: &[u8]) -> std::io::Result<usize> {
        let miss = || std::io::Error::new(std::io::ErrorKind::NotFound, "no forward for this packet");
        let (src, dst, payload) = parse_udp4(pkt).ok_or_else(miss)?;
        if *dst.ip() != self.addr {
            return Err(miss());
        }
        let port = self.ports.iter().find(|p| p.to == src && p.inner_port == dst.port()).ok_or_else(miss)?;
        let client = (*port.client.lock()).ok_or_else(miss)?;
        port.sock.try_send_to(payload, client)
    }
}

impl Drop for Userspace {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp4_roundtrip_and_header_checksum() {
        let (s, d): (SocketAddrV4, SocketAddrV4) =
            ("100.64.0.1:5000".parse().unwrap(), "100.64.0.2:7".parse().unwrap());
        let p = build_udp4(s, d, b"hello").unwrap();
        assert_eq!(p.len(), 33);
        assert_eq!(ipv4_checksum(&p[..20]), 0, "a valid header sums to zero");
        assert_eq!(parse_udp4(&p), Some((s, d, &b"hello"[..])));
        assert_eq!(parse_udp4(&p[..25]), None);
        let mut tcp = p.clone();
        tcp[9] = 6;
        assert_eq!(parse_udp4(&tcp), None);
        for len in 0..40 {
            let junk: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            let _ = parse_udp4(&junk);
        }
    }

    #[tokio::test]
    async fn forwards_local_datagrams_and_returns_answers() {
        let us = Userspace::start(
            "100.64.0.1".parse().unwrap(),
            &[Forward { listen: "127.0.0.1:0".parse().unwrap(), to: "100.64.0.2:7".parse().unwrap() }],
        )
        .await
        .unwrap();
        let listen = us.ports[0].sock.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"ping", listen).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let n = us.recv(&mut buf).await.unwrap();
        let (src, dst, payload) = parse_udp4(&buf[..n]).unwrap();
        assert_eq!((dst, payload), ("100.64.0.2:7".parse().unwrap(), &b"ping"[..]));
        // The answer comes back from the peer to our inner address and port.
        let answer = build_udp4(dst, src, b"pong").unwrap();
        us.try_send(&answer).unwrap();
        let mut rb = [0u8; 16];
        let (n, _) = client.recv_from(&mut rb).await.unwrap();
        assert_eq!(&rb[..n], b"pong");
        // From anyone else, or to another port: dropped.
        assert!(us.try_send(&build_udp4("100.64.0.3:7".parse().unwrap(), src, b"x").unwrap()).is_err());
    }
}
