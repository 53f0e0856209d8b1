//! STUN Binding request/response codec (RFC 8489 subset), byte-compatible with Tailscale's
//! `net/stun` package (spec §5).
//!
//! Only what a DERP region needs: the Binding request Tailscale sends, the rules a responder uses
//! to accept it (derper's exact rules, or a lenient RFC 5389 mode so ordinary STUN clients work),
//! the XOR-MAPPED-ADDRESS success response, and the client-side parse of every response shape seen
//! in the wild (XOR-MAPPED 0x0020 or 0x8020, MAPPED-ADDRESS fallback, trailing bytes).
//!
//! Everything here is pure: no sockets, no allocation on the responder's path
//! ([`write_response`] fills a caller-supplied buffer).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The RFC 5389 magic cookie, bytes 4..8 of every STUN message we speak.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
/// Length of the fixed STUN header.
pub const HEADER_LEN: usize = 20;
/// Length of the Binding request Tailscale sends (and [`build_request`] produces): header, SOFTWARE
/// (4 + 8) and FINGERPRINT (4 + 4). The spec's prose says 48, but its byte vector (and Go's
/// `headerLen + lenAttrSoftware + lenFingerprint`) is 40 bytes; the vector wins.
pub const REQUEST_LEN: usize = 40;
/// Length of the largest response we build (IPv6 XOR-MAPPED-ADDRESS).
pub const MAX_RESPONSE_LEN: usize = HEADER_LEN + 4 + 20;

/// Message type of a Binding request.
pub const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
/// Message type of a Binding success response.
pub const BINDING_SUCCESS: [u8; 2] = [0x01, 0x01];

/// MAPPED-ADDRESS (RFC 3489 style, not XORed); a fallback when no XOR-MAPPED-ADDRESS is present.
pub const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
/// XOR-MAPPED-ADDRESS.
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// Pre-standard XOR-MAPPED-ADDRESS code point still sent by some servers (e.g. sipgate).
pub const ATTR_XOR_MAPPED_ADDRESS_ALT: u16 = 0x8020;
/// SOFTWARE.
pub const ATTR_SOFTWARE: u16 = 0x8022;
/// FINGERPRINT; when present it must be the last attribute.
pub const ATTR_FINGERPRINT: u16 = 0x8028;

/// The SOFTWARE value Tailscale puts in its requests, and that derper requires.
pub const TAILSCALE_SOFTWARE: &[u8; 8] = b"tailnode";
/// FINGERPRINT is CRC-32 of the preceding bytes XORed with this ("STUN" in ASCII).
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// A 96-bit STUN transaction ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxId(pub [u8; 12]);

impl TxId {
    /// A fresh random transaction ID (RFC 8489 asks for a cryptographically random one).
    pub fn random() -> Self {
        use rand::RngCore;
        let mut id = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut id);
        TxId(id)
    }

    /// The transaction ID at bytes 8..20 of `b`, if `b` is long enough to hold a header.
    pub fn from_packet(b: &[u8]) -> Option<Self> {
        let id: [u8; 12] = b.get(8..HEADER_LEN)?.try_into().ok()?;
        Some(TxId(id))
    }
}

impl fmt::Debug for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxId({self})")
    }
}

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

/// Why a datagram was not accepted as the STUN message we wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StunError {
    /// Too short, top bits of the type set, or no magic cookie (fails [`is_stun`]).
    #[error("not a STUN message")]
    NotStun,
    /// A STUN message, but not the message type expected here.
    #[error("unexpected STUN message type {0:#06x}")]
    WrongType(u16),
    /// The attribute list or a length field is inconsistent.
    #[error("malformed STUN message: {0}")]
    Malformed(&'static str),
    /// Strict (Tailscale) rules: no SOFTWARE attribute equal to `tailnode`.
    #[error("SOFTWARE attribute is not \"tailnode\"")]
    WrongSoftware,
    /// Strict (Tailscale) rules: the last attribute is not FINGERPRINT.
    #[error("last attribute is not FINGERPRINT")]
    NoFingerprint,
    /// A FINGERPRINT attribute is present but is not the last attribute.
    #[error("FINGERPRINT attribute is not the last attribute")]
    FingerprintNotLast,
    /// The FINGERPRINT value does not match the message's CRC-32.
    #[error("FINGERPRINT mismatch")]
    WrongFingerprint,
    /// A success response with neither XOR-MAPPED-ADDRESS nor MAPPED-ADDRESS.
    #[error("response carries no mapped address")]
    NoAddress,
}

/// Which rule set accepted a Binding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestStyle {
    /// derper's rules: SOFTWARE `tailnode` somewhere, FINGERPRINT last and correct.
    Tailscale,
    /// A plain RFC 5389/8489 Binding request (any well-formed attributes, optional FINGERPRINT).
    Rfc5389,
}

/// An accepted Binding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindingRequest {
    /// Transaction ID to echo in the response.
    pub txid: TxId,
    /// Which rules accepted it.
    pub style: RequestStyle,
}

/// Tailscale's `stun.Is`: at least a header, top two bits of byte 0 clear, magic cookie present.
///
/// Cheap enough to demultiplex STUN replies from WireGuard/disco traffic on a shared socket.
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= HEADER_LEN && b[0] & 0xc0 == 0 && b[4..8] == MAGIC_COOKIE
}

/// CRC-32 (IEEE) of `b` XORed with the STUN constant, as FINGERPRINT carries it.
pub fn fingerprint(b: &[u8]) -> u32 {
    crc32fast::hash(b) ^ FINGERPRINT_XOR
}

/// The 40-byte Binding request Tailscale sends: SOFTWARE `tailnode` first, FINGERPRINT last.
///
/// The attribute order matters: derper's XDP fast path only understands this exact layout.
pub fn build_request(txid: TxId) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..2].copy_from_slice(&BINDING_REQUEST);
    b[2..4].copy_from_slice(&((REQUEST_LEN - HEADER_LEN) as u16).to_be_bytes());
    b[4..8].copy_from_slice(&MAGIC_COOKIE);
    b[8..20].copy_from_slice(&txid.0);
    b[20..22].copy_from_slice(&ATTR_SOFTWARE.to_be_bytes());
    b[22..24].copy_from_slice(&(TAILSCALE_SOFTWARE.len() as u16).to_be_bytes());
    b[24..32].copy_from_slice(TAILSCALE_SOFTWARE);
    b[32..34].copy_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    b[34..36].copy_from_slice(&4u16.to_be_bytes());
    let fp = fingerprint(&b[..32]);
    b[36..40].copy_from_slice(&fp.to_be_bytes());
    b
}

/// One attribute as found by [`attributes`]: type, unpadded value, and its offset in the message.
#[derive(Debug, Clone, Copy)]
struct Attr<'a> {
    ty: u16,
    value: &'a [u8],
    /// Offset of the attribute header within the whole message.
    offset: usize,
}

/// Walks the attribute list in `body` (which starts at message offset `base`).
///
/// Every attribute is a 4-byte header plus a value padded to 4 bytes; one that runs past the end
/// of `body` (including its padding) is an error, like Go's `foreachAttr`.
fn attributes(body: &[u8], base: usize) -> impl Iterator<Item = Result<Attr<'_>, StunError>> {
    let mut pos = 0usize;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || pos >= body.len() {
            return None;
        }
        let rest = &body[pos..];
        if rest.len() < 4 {
            failed = true;
            return Some(Err(StunError::Malformed("truncated attribute header")));
        }
        let ty = u16::from_be_bytes([rest[0], rest[1]]);
        let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let padded = (len + 3) & !3;
        if padded > rest.len() - 4 {
            failed = true;
            return Some(Err(StunError::Malformed("truncated attribute value")));
        }
        let attr = Attr { ty, value: &rest[4..4 + len], offset: base + pos };
        pos += 4 + padded;
        Some(Ok(attr))
    })
}

fn message_type(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// derper's `ParseBindingRequest`, rule for rule (spec §5 "Server validation").
///
/// The attribute walk covers the whole datagram (the header length field is not consulted), some
/// SOFTWARE must be exactly `tailnode`, and the last attribute must be a correct FINGERPRINT.
pub fn parse_tailscale_request(b: &[u8]) -> Result<TxId, StunError> {
    if !is_stun(b) {
        return Err(StunError::NotStun);
    }
    if b[0..2] != BINDING_REQUEST {
        return Err(StunError::WrongType(message_type(b)));
    }
    let mut software_ok = false;
    let mut last: Option<Attr<'_>> = None;
    for attr in attributes(&b[HEADER_LEN..], HEADER_LEN) {
        let attr = attr?;
        if attr.ty == ATTR_SOFTWARE && attr.value == TAILSCALE_SOFTWARE {
            software_ok = true;
        }
        last = Some(attr);
    }
    if !software_ok {
        return Err(StunError::WrongSoftware);
    }
    let last = last.filter(|a| a.ty == ATTR_FINGERPRINT).ok_or(StunError::NoFingerprint)?;
    // Go reads the value only when it is 4 bytes long and compares against CRC(b[:len-8]); any
    // other length leaves "got" at zero, which never matches in practice. Treat it as a mismatch.
    let got: [u8; 4] = last.value.try_into().map_err(|_| StunError::WrongFingerprint)?;
    if u32::from_be_bytes(got) != fingerprint(&b[..b.len() - 8]) {
        return Err(StunError::WrongFingerprint);
    }
    Ok(TxId::from_packet(b).expect("is_stun guarantees a full header"))
}

/// A plain RFC 5389/8489 Binding request: magic cookie, type 0x0001, a header length that matches
/// the datagram and is a multiple of 4, well-formed attributes (unknown ones ignored), and a
/// FINGERPRINT that, if present, is last and correct.
pub fn parse_rfc5389_request(b: &[u8]) -> Result<TxId, StunError> {
    if !is_stun(b) {
        return Err(StunError::NotStun);
    }
    if b[0..2] != BINDING_REQUEST {
        return Err(StunError::WrongType(message_type(b)));
    }
    let declared = usize::from(u16::from_be_bytes([b[2], b[3]]));
    if declared != b.len() - HEADER_LEN {
        return Err(StunError::Malformed("header length does not match datagram length"));
    }
    if declared % 4 != 0 {
        return Err(StunError::Malformed("header length is not a multiple of 4"));
    }
    let mut fingerprint_seen: Option<Attr<'_>> = None;
    for attr in attributes(&b[HEADER_LEN..], HEADER_LEN) {
        let attr = attr?;
        if fingerprint_seen.is_some() {
            return Err(StunError::FingerprintNotLast);
        }
        if attr.ty == ATTR_FINGERPRINT {
            fingerprint_seen = Some(attr);
        }
    }
    if let Some(fp) = fingerprint_seen {
        let got: [u8; 4] = fp.value.try_into().map_err(|_| StunError::Malformed("FINGERPRINT length"))?;
        if u32::from_be_bytes(got) != fingerprint(&b[..fp.offset]) {
            return Err(StunError::WrongFingerprint);
        }
    }
    Ok(TxId::from_packet(b).expect("is_stun guarantees a full header"))
}

/// Accepts a Binding request under the default (lenient) rules: Tailscale-style first, then plain
/// RFC 5389. A strict responder answers only [`RequestStyle::Tailscale`] (or calls
/// [`parse_tailscale_request`] directly).
///
/// On failure the RFC 5389 error is returned, since those are the broader rules.
pub fn parse_binding_request(b: &[u8]) -> Result<BindingRequest, StunError> {
    if let Ok(txid) = parse_tailscale_request(b) {
        return Ok(BindingRequest { txid, style: RequestStyle::Tailscale });
    }
    let txid = parse_rfc5389_request(b)?;
    Ok(BindingRequest { txid, style: RequestStyle::Rfc5389 })
}

/// Writes the Binding success response for `txid` reporting `addr` into `out`; returns its length
/// (32 bytes for IPv4, 44 for IPv6).
///
/// Byte-identical to Tailscale's `stun.Response` (a lone XOR-MAPPED-ADDRESS, no SOFTWARE or
/// FINGERPRINT), except that IPv4-mapped IPv6 sources are unmapped and answered as family 1, as
/// derper's XDP path does and spec §5 recommends.
pub fn write_response(txid: TxId, addr: SocketAddr, out: &mut [u8; MAX_RESPONSE_LEN]) -> usize {
    let ip = addr.ip().to_canonical();
    let (family, addr_len) = match ip {
        IpAddr::V4(_) => (1u8, 4usize),
        IpAddr::V6(_) => (2u8, 16usize),
    };
    let attr_len = 4 + addr_len;
    let total = HEADER_LEN + 4 + attr_len;
    out[0..2].copy_from_slice(&BINDING_SUCCESS);
    out[2..4].copy_from_slice(&((4 + attr_len) as u16).to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE);
    out[8..20].copy_from_slice(&txid.0);
    out[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    out[22..24].copy_from_slice(&(attr_len as u16).to_be_bytes());
    out[24] = 0;
    out[25] = family;
    let port = addr.port() ^ u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]);
    out[26..28].copy_from_slice(&port.to_be_bytes());
    let key = xor_key(txid);
    match ip {
        IpAddr::V4(v4) => xor_into(&mut out[28..32], &v4.octets(), &key),
        IpAddr::V6(v6) => xor_into(&mut out[28..44], &v6.octets(), &key),
    }
    total
}

/// [`write_response`] into a fresh `Vec`.
pub fn build_response(txid: TxId, addr: SocketAddr) -> Vec<u8> {
    let mut buf = [0u8; MAX_RESPONSE_LEN];
    let n = write_response(txid, addr, &mut buf);
    buf[..n].to_vec()
}

/// cookie ‖ txid: the XOR key for mapped addresses (IPv4 uses its first 4 bytes).
fn xor_key(txid: TxId) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(&MAGIC_COOKIE);
    key[4..].copy_from_slice(&txid.0);
    key
}

fn xor_into(out: &mut [u8], addr: &[u8], key: &[u8; 16]) {
    for ((o, a), k) in out.iter_mut().zip(addr).zip(key) {
        *o = a ^ k;
    }
}

/// Parses a Binding success response into its transaction ID and the mapped address.
///
/// Tailscale's `ParseResponse` rules: the header length must fit the datagram (extra trailing bytes
/// are ignored); XOR-MAPPED-ADDRESS (0x0020 or 0x8020) wins over MAPPED-ADDRESS (0x0001); IPv4-mapped
/// IPv6 addresses are unmapped (derper answers IPv4 clients that way).
pub fn parse_response(b: &[u8]) -> Result<(TxId, SocketAddr), StunError> {
    if !is_stun(b) {
        return Err(StunError::NotStun);
    }
    if b[0..2] != BINDING_SUCCESS {
        return Err(StunError::WrongType(message_type(b)));
    }
    let txid = TxId::from_packet(b).expect("is_stun guarantees a full header");
    let declared = usize::from(u16::from_be_bytes([b[2], b[3]]));
    let body =
        b[HEADER_LEN..].get(..declared).ok_or(StunError::Malformed("header length exceeds datagram"))?;
    let mut xor_mapped = None;
    let mut mapped = None;
    for attr in attributes(body, HEADER_LEN) {
        let attr = attr?;
        match attr.ty {
            ATTR_XOR_MAPPED_ADDRESS | ATTR_XOR_MAPPED_ADDRESS_ALT => {
                xor_mapped = Some(decode_address(attr.value, Some(&xor_key(txid)))?);
            }
            ATTR_MAPPED_ADDRESS => mapped = Some(decode_address(attr.value, None)?),
            _ => {}
        }
    }
    let addr = xor_mapped.or(mapped).ok_or(StunError::NoAddress)?;
    Ok((txid, addr))
}

/// Decodes a (XOR-)MAPPED-ADDRESS value: `00 | family | port | address`, XORed when `key` is given.
fn decode_address(v: &[u8], key: Option<&[u8; 16]>) -> Result<SocketAddr, StunError> {
    if v.len() < 4 {
        return Err(StunError::Malformed("address attribute too short"));
    }
    let addr_len = match v[1] {
        1 => 4,
        2 => 16,
        _ => return Err(StunError::Malformed("unknown address family")),
    };
    let raw = v.get(4..4 + addr_len).ok_or(StunError::Malformed("address attribute too short"))?;
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    let mut bytes = [0u8; 16];
    bytes[..addr_len].copy_from_slice(raw);
    if let Some(key) = key {
        port ^= u16::from_be_bytes([MAGIC_COOKIE[0], MAGIC_COOKIE[1]]);
        for (b, k) in bytes.iter_mut().zip(key) {
            *b ^= k;
        }
    }
    let ip = if addr_len == 4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical()
    };
    Ok(SocketAddr::new(ip, port))
}
