//! NAT-PMP (RFC 6886) wire format: the external-address request and the UDP mapping request,
//! and their responses. Pure code; the client is in the parent module.

use std::net::Ipv4Addr;

/// NAT-PMP's version byte.
pub const VERSION: u8 = 0;
/// Opcode: external address.
pub const OP_EXTERNAL_ADDRESS: u8 = 0;
/// Opcode: map a UDP port.
pub const OP_MAP_UDP: u8 = 1;

/// Why a response was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PmpError {
    /// Too short, wrong version, or not the response to our opcode.
    #[error("malformed NAT-PMP response")]
    Malformed,
    /// The gateway answered with a non-zero result code (RFC 6886 §3.5).
    #[error("NAT-PMP result code {0}")]
    Result(u16),
}

/// `[version, opcode 0]`.
pub fn external_address_request() -> [u8; 2] {
    [VERSION, OP_EXTERNAL_ADDRESS]
}

/// Parses the external-address response: the gateway's public IPv4 address.
pub fn parse_external_address(b: &[u8]) -> Result<Ipv4Addr, PmpError> {
    if b.len() < 12 || b[0] != VERSION || b[1] != 128 + OP_EXTERNAL_ADDRESS {
        return Err(PmpError::Malformed);
    }
    let code = u16::from_be_bytes([b[2], b[3]]);
    if code != 0 {
        return Err(PmpError::Result(code));
    }
    Ok(Ipv4Addr::new(b[8], b[9], b[10], b[11]))
}

/// A UDP mapping request for `internal_port`, suggesting `external_port` (0 = any), for
/// `lifetime` seconds (0 with external port 0 deletes the mapping, §3.4).
pub fn map_request(internal_port: u16, external_port: u16, lifetime: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0] = VERSION;
    b[1] = OP_MAP_UDP;
    b[4..6].copy_from_slice(&internal_port.to_be_bytes());
    b[6..8].copy_from_slice(&external_port.to_be_bytes());
    b[8..12].copy_from_slice(&lifetime.to_be_bytes());
    b
}

/// A mapping the gateway granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmpMapping {
    /// our port
    pub internal_port: u16,
    /// the port on the gateway's public address
    pub external_port: u16,
    /// seconds the mapping lasts
    pub lifetime: u32,
}

/// Parses a UDP mapping response.
pub fn parse_map(b: &[u8]) -> Result<PmpMapping, PmpError> {
    if b.len() < 16 || b[0] != VERSION || b[1] != 128 + OP_MAP_UDP {
        return Err(PmpError::Malformed);
    }
    let code = u16::from_be_bytes([b[2], b[3]]);
    if code != 0 {
        return Err(PmpError::Result(code));
    }
    Ok(PmpMapping {
        internal_port: u16::from_be_bytes([b[8], b[9]]),
        external_port: u16::from_be_bytes([b[10], b[11]]),
        lifetime: u32::from_be_bytes([b[12], b[13], b[14], b[15]]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_request_layout_matches_rfc_6886() {
        let r = map_request(41641, 0, 7200);
        assert_eq!(r, [0, 1, 0, 0, 0xa2, 0xa9, 0, 0, 0, 0, 0x1c, 0x20]);
    }

    #[test]
    fn responses_parse_and_bad_ones_are_rejected() {
        let ok = [0, 129, 0, 0, 0, 0, 0, 9, 0xa2, 0xa9, 0x13, 0x88, 0, 0, 0x1c, 0x20];
        assert_eq!(
            parse_map(&ok),
            Ok(PmpMapping { internal_port: 41641, external_port: 5000, lifetime: 7200 })
        );
        let mut refused = ok;
        refused[3] = 2;
        assert_eq!(parse_map(&refused), Err(PmpError::Result(2)));
        assert_eq!(parse_map(&ok[..15]), Err(PmpError::Malformed));
        assert_eq!(parse_map(&[2; 16]), Err(PmpError::Malformed), "a PCP packet is not NAT-PMP");
        let ext = [0, 128, 0, 0, 0, 0, 0, 1, 44, 30, 1, 2];
        assert_eq!(parse_external_address(&ext), Ok(Ipv4Addr::new(44, 30, 1, 2)));
        assert_eq!(parse_external_address(&ext[..8]), Err(PmpError::Malformed));
    }
}
