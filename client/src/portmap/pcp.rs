//! PCP (RFC 6887) wire format: the MAP request for one UDP port and its response. Pure code;
//! the client is in the parent module. Addresses are IPv4 carried as IPv4-mapped IPv6 (§5).

use std::net::{Ipv4Addr, Ipv6Addr};

/// PCP's version byte.
pub const VERSION: u8 = 2;
/// Opcode MAP.
pub const OP_MAP: u8 = 1;
/// IANA protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// Request length: 24-byte header + 36-byte MAP body.
pub const MAP_LEN: usize = 60;

/// Why a response was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PcpError {
    /// Too short, wrong version/opcode, or another request's nonce.
    #[error("malformed or foreign PCP response")]
    Malformed,
    /// A non-zero result code (§7.4).
    #[error("PCP result code {0}")]
    Result(u8),
}

fn mapped(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

/// A MAP request: map UDP `internal_port` of `client` (our address as the gateway sees it),
/// suggesting `external` (port 0 / unspecified = any), for `lifetime` seconds (0 deletes).
pub fn map_request(
    client: Ipv4Addr,
    nonce: [u8; 12],
    internal_port: u16,
    external: (Ipv4Addr, u16),
    lifetime: u32,
) -> [u8; MAP_LEN] {
    let mut b = [0u8; MAP_LEN];
    b[0] = VERSION;
    b[1] = OP_MAP;
    b[4..8].copy_from_slice(&lifetime.to_be_bytes());
    b[8..24].copy_from_slice(&mapped(client));
    b[24..36].copy_from_slice(&nonce);
    b[36] = PROTO_UDP;
    b[40..42].copy_from_slice(&internal_port.to_be_bytes());
    b[42..44].copy_from_slice(&external.1.to_be_bytes());
    let ext = if external.0.is_unspecified() { [0u8; 16] } else { mapped(external.0) };
    b[44..60].copy_from_slice(&ext);
    b
}

/// A mapping the gateway granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcpMapping {
    /// seconds the mapping lasts
    pub lifetime: u32,
    /// our port
    pub internal_port: u16,
    /// the assigned external port
    pub external_port: u16,
    /// the assigned external address
    pub external_ip: Ipv4Addr,
}

/// Parses a MAP response to the request with `nonce`.
pub fn parse_map(b: &[u8], nonce: &[u8; 12]) -> Result<PcpMapping, PcpError> {
    if b.len() < MAP_LEN || b[0] != VERSION || b[1] != 0x80 | OP_MAP || &b[24..36] != nonce {
        return Err(PcpError::Malformed);
    }
    if b[3] != 0 {
        return Err(PcpError::Result(b[3]));
    }
    let ip6 = Ipv6Addr::from(<[u8; 16]>::try_from(&b[44..60]).map_err(|_| PcpError::Malformed)?);
    Ok(PcpMapping {
        lifetime: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        internal_port: u16::from_be_bytes([b[40], b[41]]),
        external_port: u16::from_be_bytes([b[42], b[43]]),
        external_ip: ip6.to_ipv4_mapped().ok_or(PcpError::Malformed)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_round_trip() {
        let nonce = [7u8; 12];
        let req = map_request(Ipv4Addr::new(192, 168, 1, 2), nonce, 41641, (Ipv4Addr::UNSPECIFIED, 0), 7200);
        assert_eq!(&req[..4], &[2, 1, 0, 0]);
        assert_eq!(&req[8..24], &Ipv4Addr::new(192, 168, 1, 2).to_ipv6_mapped().octets());
        assert_eq!(req[36], 17);
        // A response is the request with R set, a result code, and the assigned external address.
        let mut resp = req;
        resp[1] = 0x81;
        resp[42..44].copy_from_slice(&5000u16.to_be_bytes());
        resp[44..60].copy_from_slice(&Ipv4Addr::new(44, 30, 1, 2).to_ipv6_mapped().octets());
        let m = parse_map(&resp, &nonce).unwrap();
        assert_eq!(
            (m.external_ip, m.external_port, m.internal_port),
            (Ipv4Addr::new(44, 30, 1, 2), 5000, 41641)
        );
        assert_eq!(parse_map(&resp, &[8; 12]), Err(PcpError::Malformed), "another request's nonce");
        resp[3] = 8;
        assert_eq!(parse_map(&resp, &nonce), Err(PcpError::Result(8)));
        assert_eq!(parse_map(&resp[..59], &nonce), Err(PcpError::Malformed));
        assert_eq!(parse_map(&req, &nonce), Err(PcpError::Malformed), "a request is not a response");
    }
}
