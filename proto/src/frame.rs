//! Frame header, frame-type registry and the incremental frame decoder (spec §1.1, §1.4).
//!
//! A frame is `type:u8 ‖ length:u32 BE ‖ payload`. The decoder checks the declared length against
//! the limit for that frame type **before** buffering anything, so a hostile length costs nothing.
//! Frames the reading side does not handle are skipped byte by byte as they arrive, whatever their
//! length, exactly as derper does ("unknown frames are skipped, not fatal").

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::consts::*;

/// Every DERP frame type. The payload layout of each is in the spec §1.4 table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// S→C `Magic(8) ‖ serverPub(32)`.
    ServerKey = 0x01,
    /// C→S `clientPub(32) ‖ nonce(24) ‖ box(JSON)`.
    ClientInfo = 0x02,
    /// S→C `nonce(24) ‖ box(JSON)`.
    ServerInfo = 0x03,
    /// C→S `dstPub(32) ‖ data`.
    SendPacket = 0x04,
    /// S→C `srcPub(32) ‖ data`.
    RecvPacket = 0x05,
    /// S→C, empty.
    KeepAlive = 0x06,
    /// C→S one byte, non-zero = home region.
    NotePreferred = 0x07,
    /// S→C `pub(32) ‖ reason(1)`.
    PeerGone = 0x08,
    /// S→C (watchers) `pub(32) ‖ ip16 ‖ port u16 ‖ flags(1)`.
    PeerPresent = 0x09,
    /// mesh→S `srcPub(32) ‖ dstPub(32) ‖ data`.
    ForwardPacket = 0x0a,
    /// mesh→S, empty.
    WatchConns = 0x10,
    /// mesh→S `pub(32)`.
    ClosePeer = 0x11,
    /// either direction, 8 bytes (server accepts up to 1000).
    Ping = 0x12,
    /// either direction, 8 bytes.
    Pong = 0x13,
    /// S→C UTF-8 problem text; empty = healthy.
    Health = 0x14,
    /// S→C `reconnectIn ms u32 ‖ tryFor ms u32`.
    Restarting = 0x15,
}

impl FrameType {
    /// Maps a wire byte to a known type.
    pub fn from_u8(b: u8) -> Option<Self> {
        use FrameType::*;
        Some(match b {
            0x01 => ServerKey,
            0x02 => ClientInfo,
            0x03 => ServerInfo,
            0x04 => SendPacket,
            0x05 => RecvPacket,
            0x06 => KeepAlive,
            0x07 => NotePreferred,
            0x08 => PeerGone,
            0x09 => PeerPresent,
            0x0a => ForwardPacket,
            0x10 => WatchConns,
            0x11 => ClosePeer,
            0x12 => Ping,
            0x13 => Pong,
            0x14 => Health,
            0x15 => Restarting,
            _ => return None,
        })
    }
}

/// Which side is reading: it decides which frame types are handled and their size limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A server reading frames that a client (or mesh peer) sent.
    Server,
    /// A client (or mesh watcher) reading frames that a server sent.
    Client,
}

/// A complete frame: its type byte and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    /// The type byte as it arrived.
    pub ty: u8,
    /// The payload (empty for a skipped frame).
    pub payload: Bytes,
}

/// Framing-level failures. Each one closes the connection it happened on, and only that one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared payload length is outside what this frame type allows.
    #[error("frame type {ty:#04x}: length {len} outside {min}..={max}")]
    BadLength {
        /// type byte
        ty: u8,
        /// declared length
        len: usize,
        /// smallest allowed
        min: usize,
        /// largest allowed
        max: usize,
    },
    /// The payload of a known frame does not have the required shape.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// A frame that is only valid elsewhere (e.g. ClientInfo after the handshake).
    #[error("unexpected frame type {0:#04x}")]
    Unexpected(u8),
}

/// Writes a frame header into `buf`.
#[inline]
pub fn put_header(buf: &mut impl BufMut, ty: FrameType, len: usize) {
    buf.put_u8(ty as u8);
    buf.put_u32(len as u32);
}

/// Length limits `(min, max)` for a frame type read by `role`; `None` means "skip this frame".
fn limits(role: Role, ty: u8) -> Option<(usize, usize)> {
    use FrameType::*;
    let t = FrameType::from_u8(ty)?;
    match role {
        Role::Server => match t {
            ClientInfo => Some((KEY_LEN + NONCE_LEN, MAX_CLIENT_INFO_LEN)),
            SendPacket => Some((KEY_LEN, KEY_LEN + MAX_PACKET_SIZE)),
            ForwardPacket => Some((2 * KEY_LEN, 2 * KEY_LEN + MAX_PACKET_SIZE)),
            NotePreferred => Some((1, 1)),
            WatchConns => Some((0, 0)),
            ClosePeer => Some((KEY_LEN, KEY_LEN)),
            Ping => Some((PING_DATA_LEN, MAX_PING_LEN)),
            // Pong, KeepAlive and server-to-client types from a client: skipped like unknown ones.
            _ => None,
        },
        Role::Client => match t {
            ServerKey | ServerInfo | RecvPacket | KeepAlive | PeerGone | PeerPresent | Ping | Pong
            | Health | Restarting => Some((0, MAX_FRAME_FROM_SERVER)),
            _ => None,
        },
    }
}

/// Incremental decoder: feed it a read buffer, take complete frames out.
///
/// `Ok(None)` means "read more bytes". Skipped frames (unknown types, or types the reading role
/// ignores) are consumed as they arrive and reported once, with an empty payload, so the caller
/// can count them.
#[derive(Debug)]
pub struct FrameDecoder {
    role: Role,
    /// Bytes of a skipped frame still to discard.
    skipping: usize,
    /// The Client role's cap on skipped frames too (the Go client errors past 1 MiB).
    client_cap: bool,
}

impl FrameDecoder {
    /// A decoder for frames read by `role`.
    pub fn new(role: Role) -> Self {
        Self { role, skipping: 0, client_cap: role == Role::Client }
    }

    /// Decodes the next complete frame from `buf`, consuming its bytes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<RawFrame>, FrameError> {
        if self.skipping > 0 {
            self.discard(buf);
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let ty = buf[0];
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        match limits(self.role, ty) {
            Some((min, max)) => {
                if len < min || len > max {
                    return Err(FrameError::BadLength { ty, len, min, max });
                }
                if buf.len() < FRAME_HEADER_LEN + len {
                    buf.reserve(FRAME_HEADER_LEN + len - buf.len());
                    return Ok(None);
                }
                buf.advance(FRAME_HEADER_LEN);
                Ok(Some(RawFrame { ty, payload: buf.split_to(len).freeze() }))
            }
            None => {
                if self.client_cap && len > MAX_FRAME_FROM_SERVER {
                    return Err(FrameError::BadLength { ty, len, min: 0, max: MAX_FRAME_FROM_SERVER });
                }
                buf.advance(FRAME_HEADER_LEN);
                self.skipping = len;
                self.discard(buf);
                Ok(Some(RawFrame { ty, payload: Bytes::new() }))
            }
        }
    }

    /// Drops as much of the frame being skipped as `buf` holds.
    fn discard(&mut self, buf: &mut BytesMut) {
        let n = self.skipping.min(buf.len());
        buf.advance(n);
        self.skipping -= n;
    }

    /// True while the decoder is in the middle of discarding a skipped frame.
    pub fn is_skipping(&self) -> bool {
        self.skipping > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![ty];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_split_and_packed_frames() {
        let mut d = FrameDecoder::new(Role::Server);
        let mut bytes = frame(0x12, b"12345678");
        bytes.extend(frame(0x07, &[1]));
        let mut buf = BytesMut::new();
        for b in &bytes[..7] {
            buf.put_u8(*b);
            assert_eq!(d.decode(&mut buf).unwrap(), None);
        }
        buf.extend_from_slice(&bytes[7..]);
        let f = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!((f.ty, &f.payload[..]), (0x12, &b"12345678"[..]));
        let f = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!((f.ty, &f.payload[..]), (0x07, &[1u8][..]));
        assert_eq!(d.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn skips_unknown_frames_of_any_length_without_buffering() {
        let mut d = FrameDecoder::new(Role::Server);
        let mut buf = BytesMut::from(&[0x42u8, 0xff, 0xff, 0xff, 0xff][..]);
        let f = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(f.ty, 0x42);
        assert!(d.is_skipping());
        buf.extend_from_slice(&[0u8; 1000]);
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_bad_lengths_before_buffering() {
        let mut d = FrameDecoder::new(Role::Server);
        let mut buf = BytesMut::from(&frame(0x04, &[0u8; 31])[..]);
        assert!(matches!(d.decode(&mut buf), Err(FrameError::BadLength { .. })));
        let mut buf = BytesMut::from(&[0x04u8, 0, 1, 0, 0x21][..]);
        assert!(matches!(d.decode(&mut buf), Err(FrameError::BadLength { .. })));
    }
}
