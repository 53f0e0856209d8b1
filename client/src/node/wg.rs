//! The boringtun adapter: one `Tunn` per peer, our node key as the WireGuard static key.
//!
//! Node keys are Curve25519 keys, exactly what WireGuard uses, so a peer's `nodekey:` is also its
//! WireGuard public key and a DERP `RecvPacket.src` names the WireGuard peer directly. Keys cross
//! into boringtun's x25519-dalek 2 types as raw bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn};
use boringtun::x25519::{PublicKey, StaticSecret};
use derpfleet_proto::key::{NodePrivate, NodePublic};

/// Handshakes per second above which the shared limiter answers with cookies.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// Largest buffer any boringtun call writes into (a maximal IP packet plus WireGuard overhead).
pub const WG_BUF_LEN: usize = 65536 + 148;

/// Our WireGuard identity, shared by every peer's `Tunn`.
pub struct WgIdentity {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
}

/// Which peer an incoming UDP WireGuard datagram belongs to.
#[derive(Debug, PartialEq, Eq)]
pub enum WgSender {
    /// A handshake initiation from this static key.
    Key(NodePublic),
    /// A message addressed to our session index of this peer.
    Index(u32),
}

impl WgIdentity {
    /// Builds the identity from our node key.
    pub fn new(key: &NodePrivate) -> Self {
        let secret = StaticSecret::from(key.to_bytes());
        let public = PublicKey::from(&secret);
        let limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Self { secret, public, limiter }
    }

    /// A tunnel to `peer`; `index` (< 2^24) is the peer's slot, recovered from session indices.
    pub fn tunnel(&self, peer: &NodePublic, index: u32, keepalive: Option<u16>) -> Tunn {
        Tunn::new(
            self.secret.clone(),
            PublicKey::from(peer.0),
            None,
            keepalive,
            index,
            Some(self.limiter.clone()),
        )
    }

    /// Resets the handshake rate-limit counter; call once a second.
    pub fn reset_rate_limit(&self) {
        self.limiter.reset_count();
    }

    /// Identifies the peer of a UDP datagram without decrypting data: initiations name the sender's
    /// static key (one DH), everything else carries our index (peer slot in the top 24 bits).
    pub fn sender_of(&self, datagram: &[u8]) -> Option<WgSender> {
        self.sender_of_packet(Tunn::parse_incoming_packet(datagram).ok()?)
    }

    fn sender_of_packet(&self, packet: Packet<'_>) -> Option<WgSender> {
        match packet {
            Packet::HandshakeInit(init) => parse_handshake_anon(&self.secret, &self.public, &init)
                .ok()
                .map(|h| WgSender::Key(NodePublic(h.peer_static_public))),
            Packet::HandshakeResponse(p) => Some(WgSender::Index(p.receiver_idx >> 8)),
            Packet::PacketCookieReply(p) => Some(WgSender::Index(p.receiver_idx >> 8)),
            Packet::PacketData(p) => Some(WgSender::Index(p.receiver_idx >> 8)),
        }
    }

    /// Screens a UDP datagram from `from` before any per-peer work, as boringtun's own device does:
    /// handshake messages need a valid mac1 (keyed by our public key), and under handshake load a
    /// valid mac2 cookie, else the answer is a cookie reply. Only then is the (costly, one DH)
    /// initiation parsed to find its sender.
    pub fn screen<'b>(&self, from: SocketAddr, datagram: &[u8], buf: &'b mut [u8]) -> Screened<'b> {
        match self.limiter.verify_packet(Some(from.ip()), datagram, buf) {
            Ok(packet) => self.sender_of_packet(packet).map_or(Screened::Drop, Screened::Peer),
            Err(boringtun::noise::TunnResult::WriteToNetwork(cookie)) => Screened::Reply(cookie),
            Err(_) => Screened::Drop,
        }
    }
}

/// What [`WgIdentity::screen`] decided.
#[derive(Debug)]
pub enum Screened<'b> {
    /// Hand the datagram to this peer's tunnel.
    Peer(WgSender),
    /// Send this cookie reply back to the source instead.
    Reply(&'b [u8]),
    /// Drop it (malformed, bad mac, unknown sender).
    Drop,
}

/// The address boringtun wants for cookie decisions.
pub fn src_ip(a: Option<SocketAddr>) -> Option<IpAddr> {
    a.map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::TunnResult;

    /// Two identities complete a handshake in memory and carry an IPv4 packet; each side finds the
    /// other's datagrams by key (initiation) and by index (response, data).
    #[test]
    fn handshake_and_data_between_two_identities() {
        let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
        let (ia, ib) = (WgIdentity::new(&ka), WgIdentity::new(&kb));
        let mut ta = ia.tunnel(&kb.public(), 7, None);
        let mut tb = ib.tunnel(&ka.public(), 3, None);
        let mut pkt = vec![0u8; 40];
        pkt[0] = 0x45;
        pkt[2..4].copy_from_slice(&40u16.to_be_bytes());
        pkt[8] = 64;
        pkt[12..16].copy_from_slice(&[100, 64, 0, 1]);
        pkt[16..20].copy_from_slice(&[100, 64, 0, 2]);
        let (mut b1, mut b2) = (vec![0u8; WG_BUF_LEN], vec![0u8; WG_BUF_LEN]);
        let init = match ta.encapsulate(&pkt, &mut b1) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ib.sender_of(&init), Some(WgSender::Key(ka.public())));
        let resp = match tb.decapsulate(None, &init, &mut b2) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(ia.sender_of(&resp), Some(WgSender::Index(7)));
        // The response releases the queued packet on A's side.
        let data = match ta.decapsulate(None, &resp, &mut b1) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        let data = match ta.decapsulate(None, &[], &mut b1) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            TunnResult::Done => data,
            other => panic!("{other:?}"),
        };
        assert_eq!(ib.sender_of(&data), Some(WgSender::Index(3)));
        match tb.decapsulate(None, &data, &mut b2) {
            TunnResult::WriteToTunnelV4(p, src) => {
                assert_eq!(src, std::net::Ipv4Addr::new(100, 64, 0, 1));
                assert_eq!(&p[..], &pkt[..]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(ia.sender_of(b"junk"), None);
    }

    #[test]
    fn screen_checks_mac1_before_the_handshake_dh() {
        let (ka, kb, kc) = (NodePrivate::generate(), NodePrivate::generate(), NodePrivate::generate());
        let (ia, ib, ic) = (WgIdentity::new(&ka), WgIdentity::new(&kb), WgIdentity::new(&kc));
        let mut ta = ia.tunnel(&kb.public(), 1, None);
        let mut b1 = vec![0u8; WG_BUF_LEN];
        let init = match ta.format_handshake_initiation(&mut b1, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("{other:?}"),
        };
        let from: SocketAddr = "192.0.2.1:41641".parse().unwrap();
        let mut buf = vec![0u8; WG_BUF_LEN];
        assert!(
            matches!(ib.screen(from, &init, &mut buf), Screened::Peer(WgSender::Key(k)) if k == ka.public())
        );
        // Addressed to B, so C's mac1 check fails: dropped without a DH.
        assert!(matches!(ic.screen(from, &init, &mut buf), Screened::Drop));
        let mut bad = init.clone();
        bad[40] ^= 1;
        assert!(matches!(ib.screen(from, &bad, &mut buf), Screened::Drop));
        assert!(matches!(ib.screen(from, b"\x04\0\0\0junk", &mut buf), Screened::Drop));
    }

    /// Random datagrams, including ones with a valid WireGuard type byte, never panic the screen.
    #[test]
    fn random_datagrams_never_panic_the_screen() {
        let id = WgIdentity::new(&NodePrivate::generate());
        let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let mut buf = vec![0u8; WG_BUF_LEN];
        for i in 0..20_000usize {
            let len = [0, 3, 4, 32, 92, 148, 200][i % 7];
            let mut v: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            if let Some(t) = v.first_mut() {
                *t = (i % 5) as u8;
            }
            if v.len() >= 4 {
                v[1..4].fill(0);
            }
            let _ = id.screen(from, &v, &mut buf);
        }
    }
}
