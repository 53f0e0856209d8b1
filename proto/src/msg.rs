//! DERP messages by direction: [`ClientToServer`] and [`ServerToClient`].
//!
//! `decode` applies the spec's rules for the reading side: the server closes a connection on a
//! malformed known frame (the error), the Go client merely skips short frames ([`ServerToClient::Ignored`]).
//! `encode` appends header and payload to a buffer; nothing here allocates per packet beyond the
//! buffer the caller owns.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use crate::consts::*;
use crate::frame::{put_header, FrameError, FrameType, RawFrame};
use crate::key::NodePublic;

/// Why a peer is gone (the PeerGone reason byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerGoneReason {
    /// 0x00: the peer left the region.
    Disconnected,
    /// 0x01: the server has no record of that key.
    NotHere,
    /// Any other byte (0xf0 MeshConnBroke is never sent on the wire).
    Other(u8),
}

impl PeerGoneReason {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            Self::Disconnected => 0,
            Self::NotHere => 1,
            Self::Other(b) => b,
        }
    }
    /// From the wire byte.
    pub fn from_u8(b: u8) -> Self {
        match b {
            0 => Self::Disconnected,
            1 => Self::NotHere,
            b => Self::Other(b),
        }
    }
}

/// PeerPresent flag bits (spec §1.4).
pub mod peer_present_flags {
    /// A regular client (set only when no other bit applies).
    pub const IS_REGULAR: u8 = 0x01;
    /// A mesh peer.
    pub const IS_MESH_PEER: u8 = 0x02;
    /// A prober (`IsProber` in ClientInfo).
    pub const IS_PROBER: u8 = 0x04;
    /// The client sent `Ideal-Node`: it is connected to a non-ideal node of the region.
    pub const NOT_IDEAL: u8 = 0x08;
}

/// Frames a client (or mesh peer) sends to a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientToServer {
    /// The sealed ClientInfo payload; valid only as the first frame (see [`crate::handshake`]).
    ClientInfo(Bytes),
    /// Relay `data` to `dst`.
    SendPacket {
        /// destination node key
        dst: NodePublic,
        /// opaque packet bytes (≤ 64 KiB)
        data: Bytes,
    },
    /// Mesh only: deliver `data` from `src` to local `dst`.
    ForwardPacket {
        /// original sender
        src: NodePublic,
        /// local destination
        dst: NodePublic,
        /// opaque packet bytes (≤ 64 KiB)
        data: Bytes,
    },
    /// Whether this server is the client's home region.
    NotePreferred(bool),
    /// Mesh only: subscribe to PeerPresent/PeerGone.
    WatchConns,
    /// Mesh only: close every connection of this key.
    ClosePeer(NodePublic),
    /// Ping; the server echoes the first 8 bytes.
    Ping([u8; PING_DATA_LEN]),
    /// Pong (answer to a server Ping; servers ignore it).
    Pong([u8; PING_DATA_LEN]),
    /// A frame the server skips (unknown type, Pong, KeepAlive…): the type byte, for counting.
    Ignored(u8),
}

fn key_at(b: &[u8], at: usize) -> NodePublic {
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&b[at..at + KEY_LEN]);
    NodePublic(k)
}

impl ClientToServer {
    /// Decodes a frame read by a server (limits already enforced by the decoder).
    pub fn decode(f: RawFrame) -> Result<Self, FrameError> {
        let p = f.payload;
        let Some(ty) = FrameType::from_u8(f.ty) else {
            return Ok(Self::Ignored(f.ty));
        };
        Ok(match ty {
            FrameType::ClientInfo => Self::ClientInfo(p),
            FrameType::SendPacket => {
                if p.len() < KEY_LEN || p.len() > KEY_LEN + MAX_PACKET_SIZE {
                    return Err(FrameError::Malformed("SendPacket"));
                }
                Self::SendPacket { dst: key_at(&p, 0), data: p.slice(KEY_LEN..) }
            }
            FrameType::ForwardPacket => {
                if p.len() < 2 * KEY_LEN || p.len() > 2 * KEY_LEN + MAX_PACKET_SIZE {
                    return Err(FrameError::Malformed("ForwardPacket"));
                }
                Self::ForwardPacket {
                    src: key_at(&p, 0),
                    dst: key_at(&p, KEY_LEN),
                    data: p.slice(2 * KEY_LEN..),
                }
            }
            FrameType::NotePreferred => {
                if p.len() != 1 {
                    return Err(FrameError::Malformed("NotePreferred"));
                }
                Self::NotePreferred(p[0] != 0)
            }
            FrameType::WatchConns => {
                if !p.is_empty() {
                    return Err(FrameError::Malformed("WatchConns"));
                }
                Self::WatchConns
            }
            FrameType::ClosePeer => {
                if p.len() != KEY_LEN {
                    return Err(FrameError::Malformed("ClosePeer"));
                }
                Self::ClosePeer(key_at(&p, 0))
            }
            FrameType::Ping => {
                if p.len() < PING_DATA_LEN || p.len() > MAX_PING_LEN {
                    return Err(FrameError::Malformed("Ping"));
                }
                Self::Ping(p[..PING_DATA_LEN].try_into().expect("length checked"))
            }
            _ => Self::Ignored(f.ty),
        })
    }

    /// Bytes `encode` appends, header included.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN
            + match self {
                Self::ClientInfo(b) => b.len(),
                Self::SendPacket { data, .. } => KEY_LEN + data.len(),
                Self::ForwardPacket { data, .. } => 2 * KEY_LEN + data.len(),
                Self::NotePreferred(_) => 1,
                Self::WatchConns | Self::Ignored(_) => 0,
                Self::ClosePeer(_) => KEY_LEN,
                Self::Ping(_) | Self::Pong(_) => PING_DATA_LEN,
            }
    }

    /// Appends the frame to `buf`. `Ignored` encodes as an empty frame of its type.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len());
        let len = self.encoded_len() - FRAME_HEADER_LEN;
        match self {
            Self::ClientInfo(b) => {
                put_header(buf, FrameType::ClientInfo, len);
                buf.put_slice(b);
            }
            Self::SendPacket { dst, data } => {
                put_header(buf, FrameType::SendPacket, len);
                buf.put_slice(&dst.0);
                buf.put_slice(data);
            }
            Self::ForwardPacket { src, dst, data } => {
                put_header(buf, FrameType::ForwardPacket, len);
                buf.put_slice(&src.0);
                buf.put_slice(&dst.0);
                buf.put_slice(data);
            }
            Self::NotePreferred(p) => {
                put_header(buf, FrameType::NotePreferred, len);
                buf.put_u8(*p as u8);
            }
            Self::WatchConns => put_header(buf, FrameType::WatchConns, 0),
            Self::ClosePeer(k) => {
                put_header(buf, FrameType::ClosePeer, len);
                buf.put_slice(&k.0);
            }
            Self::Ping(d) => {
                put_header(buf, FrameType::Ping, len);
                buf.put_slice(d);
            }
            Self::Pong(d) => {
                put_header(buf, FrameType::Pong, len);
                buf.put_slice(d);
            }
            Self::Ignored(t) => {
                buf.put_u8(*t);
                buf.put_u32(0);
            }
        }
    }
}

/// Frames a server sends to a client (or to a mesh watcher).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerToClient {
    /// The server's public key (payload = Magic ‖ key ‖ possible future bytes).
    ServerKey(NodePublic),
    /// The sealed ServerInfo payload (see [`crate::handshake`]).
    ServerInfo(Bytes),
    /// A relayed packet from `src`.
    RecvPacket {
        /// sender node key
        src: NodePublic,
        /// opaque packet bytes
        data: Bytes,
    },
    /// Liveness signal, empty.
    KeepAlive,
    /// `key` is gone for `reason`.
    PeerGone {
        /// the departed key
        key: NodePublic,
        /// why
        reason: PeerGoneReason,
    },
    /// (Watchers) `key` connected, from `endpoint`, with [`peer_present_flags`].
    PeerPresent {
        /// the connected key
        key: NodePublic,
        /// its remote address (None in the 32-byte legacy form)
        endpoint: Option<SocketAddr>,
        /// flag bits (0 from old servers)
        flags: u8,
    },
    /// Ping from the server (derper never sends one).
    Ping([u8; PING_DATA_LEN]),
    /// Pong answering a client Ping.
    Pong([u8; PING_DATA_LEN]),
    /// Health problem text; empty = healthy again.
    Health(String),
    /// The server is restarting: reconnect after `reconnect_in`, keep trying for `try_for`.
    Restarting {
        /// when to reconnect
        reconnect_in: Duration,
        /// how long to keep trying
        try_for: Duration,
    },
    /// A frame the client skips (unknown type, or too short as the Go client tolerates).
    Ignored(u8),
}

fn ip16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl ServerToClient {
    /// Decodes a frame read by a client, with the Go client's tolerance for short frames.
    pub fn decode(f: RawFrame) -> Result<Self, FrameError> {
        let p = f.payload;
        let Some(ty) = FrameType::from_u8(f.ty) else {
            return Ok(Self::Ignored(f.ty));
        };
        Ok(match ty {
            FrameType::ServerKey => {
                if p.len() < MAGIC.len() + KEY_LEN || p[..MAGIC.len()] != MAGIC {
                    return Err(FrameError::Malformed("ServerKey"));
                }
                Self::ServerKey(key_at(&p, MAGIC.len()))
            }
            FrameType::ServerInfo => Self::ServerInfo(p),
            FrameType::RecvPacket if p.len() >= KEY_LEN => {
                Self::RecvPacket { src: key_at(&p, 0), data: p.slice(KEY_LEN..) }
            }
            FrameType::KeepAlive => Self::KeepAlive,
            FrameType::PeerGone if p.len() >= KEY_LEN => Self::PeerGone {
                key: key_at(&p, 0),
                reason: PeerGoneReason::from_u8(p.get(KEY_LEN).copied().unwrap_or(0)),
            },
            FrameType::PeerPresent if p.len() >= KEY_LEN => {
                let endpoint = (p.len() >= KEY_LEN + 18).then(|| {
                    let ip: [u8; 16] = p[KEY_LEN..KEY_LEN + 16].try_into().expect("sliced");
                    let ip = Ipv6Addr::from(ip);
                    let ip = ip.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(ip));
                    let port = u16::from_be_bytes([p[KEY_LEN + 16], p[KEY_LEN + 17]]);
                    SocketAddr::new(ip, port)
                });
                let flags = p.get(KEY_LEN + 18).copied().unwrap_or(0);
                Self::PeerPresent { key: key_at(&p, 0), endpoint, flags }
            }
            FrameType::Ping if p.len() >= PING_DATA_LEN => {
                Self::Ping(p[..PING_DATA_LEN].try_into().expect("length checked"))
            }
            FrameType::Pong if p.len() >= PING_DATA_LEN => {
                Self::Pong(p[..PING_DATA_LEN].try_into().expect("length checked"))
            }
            FrameType::Health => Self::Health(String::from_utf8_lossy(&p).into_owned()),
            FrameType::Restarting if p.len() >= 8 => Self::Restarting {
                reconnect_in: Duration::from_millis(
                    u32::from_be_bytes(p[0..4].try_into().expect("len")) as u64
                ),
                try_for: Duration::from_millis(u32::from_be_bytes(p[4..8].try_into().expect("len")) as u64),
            },
            _ => Self::Ignored(f.ty),
        })
    }

    /// The frame type byte this message travels as.
    pub fn frame_type(&self) -> u8 {
        let t = match self {
            Self::ServerKey(_) => FrameType::ServerKey,
            Self::ServerInfo(_) => FrameType::ServerInfo,
            Self::RecvPacket { .. } => FrameType::RecvPacket,
            Self::KeepAlive => FrameType::KeepAlive,
            Self::PeerGone { .. } => FrameType::PeerGone,
            Self::PeerPresent { .. } => FrameType::PeerPresent,
            Self::Ping(_) => FrameType::Ping,
            Self::Pong(_) => FrameType::Pong,
            Self::Health(_) => FrameType::Health,
            Self::Restarting { .. } => FrameType::Restarting,
            Self::Ignored(t) => return *t,
        };
        t as u8
    }

    /// Bytes `encode` appends, header included.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_LEN
            + match self {
                Self::ServerKey(_) => MAGIC.len() + KEY_LEN,
                Self::ServerInfo(b) => b.len(),
                Self::RecvPacket { data, .. } => KEY_LEN + data.len(),
                Self::KeepAlive | Self::Ignored(_) => 0,
                Self::PeerGone { .. } => KEY_LEN + 1,
                Self::PeerPresent { .. } => KEY_LEN + 16 + 2 + 1,
                Self::Ping(_) | Self::Pong(_) => PING_DATA_LEN,
                Self::Health(s) => s.len(),
                Self::Restarting { .. } => 8,
            }
    }

    /// Appends the frame to `buf`. PeerPresent always uses the 51-byte form; a missing endpoint
    /// is written as `[::]:0`.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len());
        let len = self.encoded_len() - FRAME_HEADER_LEN;
        match self {
            Self::ServerKey(k) => {
                put_header(buf, FrameType::ServerKey, len);
                buf.put_slice(&MAGIC);
                buf.put_slice(&k.0);
            }
            Self::ServerInfo(b) => {
                put_header(buf, FrameType::ServerInfo, len);
                buf.put_slice(b);
            }
            Self::RecvPacket { src, data } => encode_recv_packet(buf, src, data),
            Self::KeepAlive => put_header(buf, FrameType::KeepAlive, 0),
            Self::PeerGone { key, reason } => {
                put_header(buf, FrameType::PeerGone, len);
                buf.put_slice(&key.0);
                buf.put_u8(reason.to_u8());
            }
            Self::PeerPresent { key, endpoint, flags } => {
                put_header(buf, FrameType::PeerPresent, len);
                buf.put_slice(&key.0);
                let ep = endpoint.unwrap_or_else(|| SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0));
                buf.put_slice(&ip16(ep.ip()));
                buf.put_u16(ep.port());
                buf.put_u8(*flags);
            }
            Self::Ping(d) => {
                put_header(buf, FrameType::Ping, len);
                buf.put_slice(d);
            }
            Self::Pong(d) => {
                put_header(buf, FrameType::Pong, len);
                buf.put_slice(d);
            }
            Self::Health(s) => {
                put_header(buf, FrameType::Health, len);
                buf.put_slice(s.as_bytes());
            }
            Self::Restarting { reconnect_in, try_for } => {
                put_header(buf, FrameType::Restarting, len);
                buf.put_u32(reconnect_in.as_millis().min(u32::MAX as u128) as u32);
                buf.put_u32(try_for.as_millis().min(u32::MAX as u128) as u32);
            }
            Self::Ignored(t) => {
                buf.put_u8(*t);
                buf.put_u32(0);
            }
        }
    }
}

/// The frame header of RecvPacket(`src` ‖ a `data_len`-byte packet), for a writer that sends the
/// header, the key and the packet as separate slices (one vectored write).
#[inline]
pub fn recv_packet_header(data_len: usize) -> [u8; FRAME_HEADER_LEN] {
    let mut hdr = [0u8; FRAME_HEADER_LEN];
    put_header(&mut &mut hdr[..], FrameType::RecvPacket, KEY_LEN + data_len);
    hdr
}

/// Appends RecvPacket(`src` ‖ `data`) from borrowed parts: the relay's send loop writes queued
/// packets with this (no `ServerToClient` value, so no reference-count traffic per packet).
#[inline]
pub fn encode_recv_packet(buf: &mut BytesMut, src: &NodePublic, data: &[u8]) {
    buf.reserve(FRAME_HEADER_LEN + KEY_LEN + data.len());
    buf.put_slice(&recv_packet_header(data.len()));
    buf.put_slice(&src.0);
    buf.put_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameDecoder, Role};
    use proptest::prelude::*;

    fn round_trip_s2c(m: ServerToClient) -> ServerToClient {
        let mut b = BytesMut::new();
        m.encode(&mut b);
        assert_eq!(b.len(), m.encoded_len());
        let f = FrameDecoder::new(Role::Client).decode(&mut b).unwrap().unwrap();
        ServerToClient::decode(f).unwrap()
    }

    #[test]
    fn server_frames_round_trip() {
        let k = NodePublic([7; 32]);
        for m in [
            ServerToClient::ServerKey(k),
            ServerToClient::RecvPacket { src: k, data: Bytes::from_static(b"hello") },
            ServerToClient::KeepAlive,
            ServerToClient::PeerGone { key: k, reason: PeerGoneReason::NotHere },
            ServerToClient::PeerPresent {
                key: k,
                endpoint: Some("1.2.3.4:567".parse().unwrap()),
                flags: peer_present_flags::IS_REGULAR,
            },
            ServerToClient::Pong(*b"abcdefgh"),
            ServerToClient::Health("bad".into()),
            ServerToClient::Restarting {
                reconnect_in: Duration::from_millis(1500),
                try_for: Duration::from_secs(30),
            },
        ] {
            assert_eq!(round_trip_s2c(m.clone()), m);
        }
    }

    #[test]
    fn peer_present_wire_form_is_51_bytes_v4_mapped() {
        let mut b = BytesMut::new();
        ServerToClient::PeerPresent {
            key: NodePublic([1; 32]),
            endpoint: Some("10.0.0.1:80".parse().unwrap()),
            flags: 1,
        }
        .encode(&mut b);
        assert_eq!(&b[..5], &[0x09, 0, 0, 0, 51]);
        assert_eq!(&b[5 + 32..5 + 48], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
        assert_eq!(&b[5 + 48..], &[0, 80, 1]);
    }

    #[test]
    fn client_frame_rules() {
        let d =
            |ty: u8, p: &[u8]| ClientToServer::decode(RawFrame { ty, payload: Bytes::copy_from_slice(p) });
        assert!(d(0x07, &[1, 2]).is_err());
        assert_eq!(d(0x07, &[2]).unwrap(), ClientToServer::NotePreferred(true));
        assert!(d(0x10, &[0]).is_err());
        assert!(d(0x12, &[0; 7]).is_err());
        assert!(d(0x12, &[0; 1001]).is_err());
        assert_eq!(d(0x12, &[3; 12]).unwrap(), ClientToServer::Ping([3; 8]));
        assert_eq!(d(0x42, &[]).unwrap(), ClientToServer::Ignored(0x42));
        assert_eq!(d(0x13, &[0; 8]).unwrap(), ClientToServer::Ignored(0x13));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(role_server in any::<bool>(), chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..8)) {
            let role = if role_server { Role::Server } else { Role::Client };
            let mut d = FrameDecoder::new(role);
            let mut buf = BytesMut::new();
            'outer: for c in chunks {
                buf.extend_from_slice(&c);
                loop {
                    match d.decode(&mut buf) {
                        Ok(Some(f)) => {
                            let _ = if role_server { ClientToServer::decode(f).map(|_| ()) } else { ServerToClient::decode(f).map(|_| ()) };
                        }
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
            }
        }

        #[test]
        fn client_frames_round_trip(dst in any::<[u8; 32]>(), data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let m = ClientToServer::SendPacket { dst: NodePublic(dst), data: Bytes::from(data) };
            let mut b = BytesMut::new();
            m.encode(&mut b);
            prop_assert_eq!(b.len(), m.encoded_len());
            let f = FrameDecoder::new(Role::Server).decode(&mut b).unwrap().unwrap();
            prop_assert_eq!(ClientToServer::decode(f).unwrap(), m);
        }
    }
}
