//! Spec §5 vectors and the request acceptance rules, against the pure codec.
//!
//! The spec gives exact bytes for the request, three responses, google-1 and no-4in6. For pion,
//! software-a/abc, stuntman-ipv6 and sipgate it gives only a description; those messages are built
//! here attribute by attribute per RFC 5389/8489 (same attribute set and order as described).

use std::net::SocketAddr;

use derpfleet_stun::message::{
    build_request, build_response, fingerprint, is_stun, parse_binding_request, parse_response,
    parse_rfc5389_request, parse_tailscale_request, RequestStyle, StunError, TxId, MAGIC_COOKIE,
};

fn txid_seq() -> TxId {
    TxId([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Assembles a STUN message: header, attributes (padded), optional FINGERPRINT, then `trailing`
/// bytes that the header length does not cover.
fn message(
    ty: u16,
    txid: TxId,
    attrs: &[(u16, Vec<u8>)],
    with_fingerprint: bool,
    trailing: &[u8],
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&ty.to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(&txid.0);
    for (t, v) in attrs {
        b.extend_from_slice(&t.to_be_bytes());
        b.extend_from_slice(&(v.len() as u16).to_be_bytes());
        b.extend_from_slice(v);
        while b.len() % 4 != 0 {
            b.push(0);
        }
    }
    if with_fingerprint {
        let len = (b.len() - 20 + 8) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
        let fp = fingerprint(&b);
        b.extend_from_slice(&0x8028u16.to_be_bytes());
        b.extend_from_slice(&4u16.to_be_bytes());
        b.extend_from_slice(&fp.to_be_bytes());
    } else {
        let len = (b.len() - 20) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
    }
    b.extend_from_slice(trailing);
    b
}

/// A (XOR-)MAPPED-ADDRESS value for `addr`, XORed with cookie‖txid when `xor_txid` is given.
fn address_value(addr: SocketAddr, xor_txid: Option<TxId>) -> Vec<u8> {
    let (family, mut ip) = match addr.ip() {
        std::net::IpAddr::V4(v4) => (1u8, v4.octets().to_vec()),
        std::net::IpAddr::V6(v6) => (2u8, v6.octets().to_vec()),
    };
    let mut port = addr.port();
    if let Some(txid) = xor_txid {
        port ^= 0x2112;
        let mut key = MAGIC_COOKIE.to_vec();
        key.extend_from_slice(&txid.0);
        for (b, k) in ip.iter_mut().zip(key) {
            *b ^= k;
        }
    }
    let mut v = vec![0, family];
    v.extend_from_slice(&port.to_be_bytes());
    v.extend_from_slice(&ip);
    v
}

// ---- requests ----

#[test]
fn request_vector_is_byte_exact() {
    let want = "000100142112a4420102030405060708090a0b0c802200087461696c6e6f646580280004b32c370f";
    assert_eq!(hex::encode(build_request(txid_seq())), want);
}

#[test]
fn request_is_accepted_as_tailscale_style_with_its_txid() {
    let txid = TxId::random();
    let req = build_request(txid);
    assert_eq!(parse_tailscale_request(&req), Ok(txid));
    let parsed = parse_binding_request(&req).unwrap();
    assert_eq!(parsed.txid, txid);
    assert_eq!(parsed.style, RequestStyle::Tailscale);
}

#[test]
fn random_txids_differ() {
    assert_ne!(TxId::random(), TxId::random());
}

// ---- responses built by us ----

#[test]
fn response_vector_ipv4_1_2_3_4() {
    let got = build_response(TxId([1; 12]), sa("1.2.3.4:254"));
    assert_eq!(hex::encode(got), "0101000c2112a44201010101010101010101010100200008000121ec2010a746");
}

#[test]
fn response_vector_ipv6_1_4() {
    let got = build_response(TxId([4; 12]), sa("[1::4]:257"));
    assert_eq!(
        hex::encode(got),
        "010100182112a44204040404040404040404040400200014000220132113a442040404040404040404040400"
    );
}

#[test]
fn response_vector_203_0_113_7() {
    let got = build_response(txid_seq(), sa("203.0.113.7:41641"));
    assert_eq!(hex::encode(got), "0101000c2112a4420102030405060708090a0b0c00200008000183bbea12d545");
}

#[test]
fn v4_mapped_source_is_answered_as_family_1() {
    let mapped = build_response(txid_seq(), sa("[::ffff:203.0.113.7]:41641"));
    let plain = build_response(txid_seq(), sa("203.0.113.7:41641"));
    assert_eq!(mapped, plain);
    assert_eq!(mapped.len(), 32);
    assert_eq!(mapped[25], 1, "family byte");
}

#[test]
fn built_responses_round_trip() {
    for addr in ["1.2.3.4:1", "[2001:db8::1]:65535", "0.0.0.0:0", "[::1]:3478"] {
        let txid = TxId::random();
        assert_eq!(parse_response(&build_response(txid, sa(addr))), Ok((txid, sa(addr))));
    }
}

// ---- responses from other servers (stun_test.go cases) ----

#[test]
fn parse_google_1() {
    let b = hex::decode("0101000c2112a4422360b11e3ec68ffa93e08007002000080001c7866957856f").unwrap();
    let (txid, addr) = parse_response(&b).unwrap();
    assert_eq!(addr, sa("72.69.33.45:59028"));
    assert_eq!(hex::encode(txid.0), "2360b11e3ec68ffa93e08007");
}

#[test]
fn parse_no_4in6_unmaps_the_address() {
    let b = hex::decode(
        "010100182112a4424fd5d202dcb37d31fc773306002000140002cd3d2112a4424fd5d202dcb382ce2dc3fcc7",
    )
    .unwrap();
    let (_, addr) = parse_response(&b).unwrap();
    assert_eq!(addr, sa("209.180.207.193:60463"));
    assert!(addr.is_ipv4());
}

#[test]
fn parse_pion_software_fingerprint_and_trailing_bytes() {
    let txid = TxId(*b"pion-txid-01");
    let want = sa("127.0.0.1:61300");
    let b = message(
        0x0101,
        txid,
        &[(0x0020, address_value(want, Some(txid))), (0x8022, b"endpointer".to_vec())],
        true,
        &[0xde, 0xad, 0xbe, 0xef, 0x01, 0x02, 0x03, 0x04],
    );
    assert_eq!(parse_response(&b), Ok((txid, want)));
}

#[test]
fn parse_software_a_and_abc_padding() {
    let want = sa("127.0.0.1:61300");
    for software in [&b"a"[..], &b"abc"[..]] {
        let txid = TxId::random();
        let b = message(
            0x0101,
            txid,
            &[(0x8022, software.to_vec()), (0x0020, address_value(want, Some(txid)))],
            true,
            &[],
        );
        assert_eq!(parse_response(&b), Ok((txid, want)), "SOFTWARE {software:?}");
    }
}

#[test]
fn parse_stuntman_ipv6_prefers_xor_over_mapped() {
    let txid = TxId::random();
    let want = sa("[2602:d1:b4cf:c100:38b2:31ff:feef:96f6]:37070");
    // MAPPED-ADDRESS carries a different address so the test proves which one wins.
    let decoy = sa("[2001:db8::99]:1");
    let b = message(
        0x0101,
        txid,
        &[
            (0x0001, address_value(decoy, None)),
            (0x802b, address_value(sa("[2001:db8::1]:3478"), None)),
            (0x0020, address_value(want, Some(txid))),
        ],
        false,
        &[],
    );
    assert_eq!(parse_response(&b), Ok((txid, want)));
}

#[test]
fn parse_sipgate_alt_xor_code_point() {
    let txid = TxId::random();
    let want = sa("72.69.33.45:58539");
    let b = message(
        0x0101,
        txid,
        &[
            (0x0001, address_value(sa("10.9.8.7:1"), None)),
            (0x0004, address_value(sa("217.10.68.152:3478"), None)),
            (0x0005, address_value(sa("217.116.122.136:3479"), None)),
            (0x8020, address_value(want, Some(txid))),
            (0x8022, b"Vovida.org 0.96".to_vec()),
        ],
        false,
        &[],
    );
    assert_eq!(parse_response(&b), Ok((txid, want)));
}

#[test]
fn parse_mapped_address_fallback() {
    let txid = TxId::random();
    let want = sa("198.51.100.9:4000");
    let b = message(0x0101, txid, &[(0x0001, address_value(want, None))], false, &[]);
    assert_eq!(parse_response(&b), Ok((txid, want)));
}

#[test]
fn parse_response_errors() {
    let txid = TxId::random();
    // No address at all.
    let b = message(0x0101, txid, &[(0x8022, b"x".to_vec())], false, &[]);
    assert_eq!(parse_response(&b), Err(StunError::NoAddress));
    // A request is not a response.
    assert_eq!(parse_response(&build_request(txid)), Err(StunError::WrongType(0x0001)));
    // Header length beyond the datagram.
    let mut b = build_response(txid, sa("1.2.3.4:5"));
    b.truncate(30);
    assert!(matches!(parse_response(&b), Err(StunError::Malformed(_))));
    // Unknown family.
    let b = message(0x0101, txid, &[(0x0020, vec![0, 3, 0, 0, 1, 2, 3, 4])], false, &[]);
    assert!(matches!(parse_response(&b), Err(StunError::Malformed(_))));
    assert_eq!(parse_response(b"hello"), Err(StunError::NotStun));
}

// ---- Is ----

#[test]
fn is_table() {
    let mut twenty = [0u8; 20];
    twenty[4..8].copy_from_slice(&MAGIC_COOKIE);
    assert!(is_stun(&twenty), "20 bytes with cookie");
    assert!(!is_stun(&twenty[..19]), "19 bytes");
    let mut b = twenty;
    b[0] = 0xf0;
    assert!(!is_stun(&b), "first byte 0xf0");
    b[0] = 0x40;
    assert!(!is_stun(&b), "first byte 0x40");
    b[0] = 0x20;
    assert!(is_stun(&b), "first byte 0x20");
    let mut no_cookie = twenty;
    no_cookie[4] = 0;
    assert!(!is_stun(&no_cookie), "no cookie");
}

// ---- acceptance rules ----

#[test]
fn wrong_type_is_rejected() {
    let mut b = build_request(txid_seq()).to_vec();
    b[1] = 0x11; // Binding indication-ish (0x0011)
    assert_eq!(parse_tailscale_request(&b), Err(StunError::WrongType(0x0011)));
    assert_eq!(parse_binding_request(&b).map(|r| r.txid), Err(StunError::WrongType(0x0011)));
}

#[test]
fn bad_fingerprint_is_rejected_in_both_modes() {
    let mut b = build_request(txid_seq()).to_vec();
    b[39] ^= 1;
    assert_eq!(parse_tailscale_request(&b), Err(StunError::WrongFingerprint));
    assert_eq!(parse_binding_request(&b), Err(StunError::WrongFingerprint));
}

#[test]
fn fingerprint_not_last_is_rejected() {
    let mut b = build_request(txid_seq()).to_vec();
    b.extend_from_slice(&[0x80, 0x22, 0x00, 0x00]); // an empty SOFTWARE after FINGERPRINT
    b[3] += 4;
    assert_eq!(parse_tailscale_request(&b), Err(StunError::NoFingerprint));
    assert_eq!(parse_binding_request(&b), Err(StunError::FingerprintNotLast));
}

#[test]
fn truncated_attribute_is_rejected() {
    let req = build_request(txid_seq());
    // Cut the FINGERPRINT value short: the attribute claims 4 bytes, 2 remain.
    let mut b = req[..38].to_vec();
    b[3] = 18;
    assert!(matches!(parse_tailscale_request(&b), Err(StunError::Malformed(_))));
    assert!(matches!(parse_binding_request(&b), Err(StunError::Malformed(_))));
    // A 2-byte attribute header stub.
    let mut b = message(0x0001, txid_seq(), &[], false, &[]);
    b.extend_from_slice(&[0x80, 0x22]);
    b[3] = 2;
    assert!(matches!(parse_binding_request(&b), Err(StunError::Malformed(_))));
}

#[test]
fn wrong_software_is_rejected_in_strict_mode_only() {
    let txid = TxId::random();
    let b = message(0x0001, txid, &[(0x8022, b"notnode!".to_vec())], true, &[]);
    assert_eq!(parse_tailscale_request(&b), Err(StunError::WrongSoftware));
    let lenient = parse_binding_request(&b).unwrap();
    assert_eq!((lenient.txid, lenient.style), (txid, RequestStyle::Rfc5389));
}

#[test]
fn missing_fingerprint_fails_strict_but_passes_rfc() {
    let txid = TxId::random();
    let b = message(0x0001, txid, &[(0x8022, b"tailnode".to_vec())], false, &[]);
    assert_eq!(parse_tailscale_request(&b), Err(StunError::NoFingerprint));
    assert_eq!(parse_binding_request(&b).unwrap().style, RequestStyle::Rfc5389);
}

#[test]
fn bare_rfc5389_binding_request_is_accepted() {
    // What turnutils_stunclient sends: header only.
    let txid = TxId::random();
    let b = message(0x0001, txid, &[], false, &[]);
    assert_eq!(b.len(), 20);
    assert_eq!(parse_tailscale_request(&b), Err(StunError::WrongSoftware));
    assert_eq!(parse_rfc5389_request(&b), Ok(txid));
    // Unknown attributes are ignored; a correct FINGERPRINT is fine.
    let b = message(0x0001, txid, &[(0x0006, b"user".to_vec()), (0xc057, vec![0, 1, 0, 2])], true, &[]);
    assert_eq!(parse_rfc5389_request(&b), Ok(txid));
}

#[test]
fn rfc5389_rules_check_the_header_length() {
    let txid = TxId::random();
    let mut b = message(0x0001, txid, &[], false, &[]);
    b.extend_from_slice(&[0, 0, 0, 0]); // trailing bytes not covered by the header length
    assert!(matches!(parse_rfc5389_request(&b), Err(StunError::Malformed(_))));
}

#[test]
fn tailscale_rules_ignore_the_header_length_field() {
    // derper walks the whole datagram and never reads the length field.
    let mut b = build_request(txid_seq());
    b[2] = 0x12;
    b[3] = 0x34;
    // The fingerprint covers the header, so recompute it over the edited bytes.
    let fp = fingerprint(&b[..32]);
    b[36..40].copy_from_slice(&fp.to_be_bytes());
    assert_eq!(parse_tailscale_request(&b), Ok(txid_seq()));
}
