//! Disco: Tailscale's path-discovery messages (spec §8) and the disco keys that seal them.
//!
//! A disco packet is `MAGIC ‖ sender disco public (32) ‖ nonce (24) ‖ NaCl box`; the box holds
//! `type ‖ version(0) ‖ body`. Disco keys are separate from node keys so that path discovery can be
//! re-keyed without touching WireGuard; there is no control plane here, so peers learn each other's
//! disco public keys from the config file.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crypto_box::aead::{Aead, AeadCore};
use crypto_box::{Nonce, PublicKey, SalsaBox, SecretKey};
use derpfleet_proto::disco::{looks_like_disco, MAGIC};

/// Length of a disco key.
pub const KEY_LEN: usize = 32;
/// Length of a ping transaction id.
pub const TXID_LEN: usize = 12;
const NONCE_LEN: usize = 24;
const HEADER_LEN: usize = MAGIC.len() + KEY_LEN + NONCE_LEN;
/// One endpoint in a CallMeMaybe: IPv6 (v4-mapped) ‖ port.
const EP_LEN: usize = 18;
/// At most this many endpoints are read from a CallMeMaybe (bounds memory per message).
pub const MAX_CALL_ME_MAYBE_ENDPOINTS: usize = 64;

const TYPE_PING: u8 = 0x01;
const TYPE_PONG: u8 = 0x02;
const TYPE_CALL_ME_MAYBE: u8 = 0x03;

/// Why a disco key did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoKeyError {
    /// Missing the `discokey:` / `discoprivkey:` prefix.
    #[error("expected prefix {0:?}")]
    Prefix(&'static str),
    /// Not 64 hex digits.
    #[error("expected 64 hex digits")]
    Hex,
}

fn parse_hex32(s: &str, prefix: &'static str) -> Result<[u8; KEY_LEN], DiscoKeyError> {
    let hex_part = s.trim().strip_prefix(prefix).ok_or(DiscoKeyError::Prefix(prefix))?;
    let v = hex::decode(hex_part).map_err(|_| DiscoKeyError::Hex)?;
    v.try_into().map_err(|_| DiscoKeyError::Hex)
}

/// A disco public key; text form `discokey:<64 hex>` (as Tailscale prints it).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiscoPublic(pub [u8; KEY_LEN]);

impl fmt::Display for DiscoPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "discokey:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for DiscoPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d:{}", &hex::encode(self.0)[..16])
    }
}

impl FromStr for DiscoPublic {
    type Err = DiscoKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s, "discokey:").map(Self)
    }
}

/// A disco private key; text form `discoprivkey:<64 hex>` (our own convention: Tailscale never
/// stores one, but without a control plane the public half must stay stable across restarts).
#[derive(Clone)]
pub struct DiscoPrivate(SecretKey);

impl DiscoPrivate {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self(SecretKey::generate(&mut crypto_box::aead::OsRng))
    }
    /// The matching public key.
    pub fn public(&self) -> DiscoPublic {
        DiscoPublic(*self.0.public_key().as_bytes())
    }
    /// `discoprivkey:<hex>`.
    pub fn to_text(&self) -> String {
        format!("discoprivkey:{}", hex::encode(self.0.to_bytes()))
    }
    /// The precomputed box between us and `peer` (one X25519 per peer, not per packet).
    pub fn shared(&self, peer: &DiscoPublic) -> SharedBox {
        SharedBox(SalsaBox::new(&PublicKey::from(peer.0), &self.0))
    }
}

impl FromStr for DiscoPrivate {
    type Err = DiscoKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s, "discoprivkey:").map(|b| Self(SecretKey::from(b)))
    }
}

impl fmt::Debug for DiscoPrivate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DiscoPrivate({:?})", self.public())
    }
}

/// The NaCl box shared with one peer.
pub struct SharedBox(SalsaBox);

/// A decoded disco message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoMessage {
    /// Path probe; `node_key` is the sender's node key (since Tailscale 1.16).
    Ping {
        /// transaction id echoed in the Pong
        tx_id: [u8; TXID_LEN],
        /// sender's node public key, if present
        node_key: Option<[u8; 32]>,
    },
    /// Answer to a Ping, carrying the source address the Ping arrived from.
    Pong {
        /// the Ping's transaction id
        tx_id: [u8; TXID_LEN],
        /// where the Ping came from, as the answerer saw it
        src: SocketAddr,
    },
    /// "Ping me at these endpoints" (sent only over DERP).
    CallMeMaybe {
        /// the sender's candidate endpoints
        endpoints: Vec<SocketAddr>,
    },
}

/// Why a disco packet was not accepted. All are silently ignored by the node (spec §8).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiscoError {
    /// Too short or wrong magic.
    #[error("not a disco packet")]
    NotDisco,
    /// The box did not open (wrong key or tampered).
    #[error("box did not open")]
    BadBox,
    /// Opened, but the message is unknown or malformed (maybe from a newer version).
    #[error("unparsable disco message")]
    Unparsable,
}

fn put_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    let v6 = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&v6.octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn get_addr(b: &[u8]) -> SocketAddr {
    let mut ip = [0u8; 16];
    ip.copy_from_slice(&b[..16]);
    let v6 = Ipv6Addr::from(ip);
    let ip = v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6));
    SocketAddr::new(ip, u16::from_be_bytes([b[16], b[17]]))
}

impl DiscoMessage {
    /// The plaintext (`type ‖ version ‖ body`).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            DiscoMessage::Ping { tx_id, node_key } => {
                out.extend_from_slice(&[TYPE_PING, 0]);
                out.extend_from_slice(tx_id);
                if let Some(k) = node_key {
                    out.extend_from_slice(k);
                }
            }
            DiscoMessage::Pong { tx_id, src } => {
                out.extend_from_slice(&[TYPE_PONG, 0]);
                out.extend_from_slice(tx_id);
                put_addr(&mut out, src);
            }
            DiscoMessage::CallMeMaybe { endpoints } => {
                out.extend_from_slice(&[TYPE_CALL_ME_MAYBE, 0]);
                for e in endpoints.iter().take(MAX_CALL_ME_MAYBE_ENDPOINTS) {
                    put_addr(&mut out, e);
                }
            }
        }
        out
    }

    /// Parses a plaintext; trailing bytes are ignored, as Tailscale does.
    pub fn decode(b: &[u8]) -> Result<Self, DiscoError> {
        let (&ty, rest) = b.split_first().ok_or(DiscoError::Unparsable)?;
        let (&version, body) = rest.split_first().ok_or(DiscoError::Unparsable)?;
        match ty {
            TYPE_PING => {
                let tx_id: [u8; TXID_LEN] =
                    body.get(..TXID_LEN).ok_or(DiscoError::Unparsable)?.try_into().expect("12 bytes");
                let node_key = body.get(TXID_LEN..TXID_LEN + 32).map(|k| k.try_into().expect("32 bytes"));
                Ok(DiscoMessage::Ping { tx_id, node_key })
            }
            TYPE_PONG => {
                if body.len() < TXID_LEN + EP_LEN {
                    return Err(DiscoError::Unparsable);
                }
                let tx_id = body[..TXID_LEN].try_into().expect("12 bytes");
                Ok(DiscoMessage::Pong { tx_id, src: get_addr(&body[TXID_LEN..]) })
            }
            TYPE_CALL_ME_MAYBE => {
                // Go: a bad length, a version other than 0 or an empty body give an empty list.
                if version != 0 || body.is_empty() || body.len() % EP_LEN != 0 {
                    return Ok(DiscoMessage::CallMeMaybe { endpoints: Vec::new() });
                }
                let endpoints =
                    body.chunks_exact(EP_LEN).take(MAX_CALL_ME_MAYBE_ENDPOINTS).map(get_addr).collect();
                Ok(DiscoMessage::CallMeMaybe { endpoints })
            }
            _ => Err(DiscoError::Unparsable),
        }
    }
}

impl SharedBox {
    /// Seals `msg` into a full disco packet from `sender`.
    pub fn seal(&self, sender: &DiscoPublic, msg: &DiscoMessage) -> Vec<u8> {
        let nonce = SalsaBox::generate_nonce(&mut crypto_box::aead::OsRng);
        let sealed = self.0.encrypt(&nonce, msg.encode().as_slice()).expect("sealing cannot fail");
        let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&sender.0);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a disco packet (whose sender key the caller already used to pick this box).
    pub fn open(&self, packet: &[u8]) -> Result<DiscoMessage, DiscoError> {
        if !looks_like_disco(packet) {
            return Err(DiscoError::NotDisco);
        }
        let nonce = Nonce::from_slice(&packet[MAGIC.len() + KEY_LEN..HEADER_LEN]);
        let plain = self.0.decrypt(nonce, &packet[HEADER_LEN..]).map_err(|_| DiscoError::BadBox)?;
        DiscoMessage::decode(&plain)
    }
}

/// The sender's disco public key of a packet that looks like disco.
pub fn sender_key(packet: &[u8]) -> Option<DiscoPublic> {
    if !looks_like_disco(packet) {
        return None;
    }
    Some(DiscoPublic(packet[MAGIC.len()..MAGIC.len() + KEY_LEN].try_into().expect("32 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txid() -> [u8; 12] {
        core::array::from_fn(|i| i as u8 + 1)
    }

    #[test]
    fn ping_vector() {
        let p = DiscoMessage::Ping { tx_id: txid(), node_key: None }.encode();
        assert_eq!(hex::encode(&p), "01000102030405060708090a0b0c");
        assert_eq!(DiscoMessage::decode(&p).unwrap(), DiscoMessage::Ping { tx_id: txid(), node_key: None });
    }

    #[test]
    fn pong_vector() {
        let m = DiscoMessage::Pong { tx_id: txid(), src: "2.3.4.5:1234".parse().unwrap() };
        let p = m.encode();
        assert_eq!(hex::encode(&p), "02000102030405060708090a0b0c00000000000000000000ffff0203040504d2");
        assert_eq!(DiscoMessage::decode(&p).unwrap(), m);
    }

    #[test]
    fn call_me_maybe_vector() {
        let eps: Vec<SocketAddr> = vec!["1.2.3.4:567".parse().unwrap(), "[2001::3456]:789".parse().unwrap()];
        let m = DiscoMessage::CallMeMaybe { endpoints: eps };
        let p = m.encode();
        assert_eq!(
            hex::encode(&p),
            "030000000000000000000000ffff010203040237200100000000000000000000000034560315"
        );
        assert_eq!(DiscoMessage::decode(&p).unwrap(), m);
    }

    #[test]
    fn bad_call_me_maybe_is_empty_not_error() {
        let mut p = DiscoMessage::CallMeMaybe { endpoints: vec!["1.2.3.4:5".parse().unwrap()] }.encode();
        p.push(0);
        assert_eq!(DiscoMessage::decode(&p).unwrap(), DiscoMessage::CallMeMaybe { endpoints: vec![] });
        assert_eq!(DiscoMessage::decode(&[3, 1]).unwrap(), DiscoMessage::CallMeMaybe { endpoints: vec![] });
    }

    #[test]
    fn short_or_unknown_messages_are_errors() {
        assert_eq!(DiscoMessage::decode(&[]), Err(DiscoError::Unparsable));
        assert_eq!(DiscoMessage::decode(&[1, 0, 1, 2]), Err(DiscoError::Unparsable));
        assert_eq!(DiscoMessage::decode(&[2, 0, 1]), Err(DiscoError::Unparsable));
        assert_eq!(DiscoMessage::decode(&[0x42, 0]), Err(DiscoError::Unparsable));
    }

    #[test]
    fn seal_open_roundtrip_and_wrong_key() {
        let (a, b, c) = (DiscoPrivate::generate(), DiscoPrivate::generate(), DiscoPrivate::generate());
        let m = DiscoMessage::Ping { tx_id: txid(), node_key: Some([7; 32]) };
        let pkt = a.shared(&b.public()).seal(&a.public(), &m);
        assert!(looks_like_disco(&pkt));
        assert_eq!(sender_key(&pkt), Some(a.public()));
        assert_eq!(b.shared(&a.public()).open(&pkt).unwrap(), m);
        assert_eq!(c.shared(&a.public()).open(&pkt), Err(DiscoError::BadBox));
        let mut bad = pkt.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(b.shared(&a.public()).open(&bad), Err(DiscoError::BadBox));
        assert_eq!(b.shared(&a.public()).open(&pkt[..40]), Err(DiscoError::NotDisco));
    }

    #[test]
    fn key_text_roundtrip() {
        let k = DiscoPrivate::generate();
        let k2: DiscoPrivate = k.to_text().parse().unwrap();
        assert_eq!(k.public(), k2.public());
        let p: DiscoPublic = k.public().to_string().parse().unwrap();
        assert_eq!(p, k.public());
        assert_eq!("nodekey:00".parse::<DiscoPublic>(), Err(DiscoKeyError::Prefix("discokey:")));
        assert_eq!("discokey:zz".parse::<DiscoPublic>(), Err(DiscoKeyError::Hex));
    }

    /// Random bytes (and random bytes behind a valid header) never panic the codec or the box.
    #[test]
    fn random_input_never_panics() {
        let (a, b) = (DiscoPrivate::generate(), DiscoPrivate::generate());
        let bx = b.shared(&a.public());
        for i in 0..20_000usize {
            let len = i % 200;
            let mut v: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            let _ = DiscoMessage::decode(&v);
            if v.len() >= HEADER_LEN {
                v[..MAGIC.len()].copy_from_slice(&MAGIC);
            }
            let _ = sender_key(&v);
            assert!(bx.open(&v).is_err());
        }
    }
}
