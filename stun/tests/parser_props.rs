//! Property tests: the parsers never panic on any input, and what we build we can parse back.

use std::net::{IpAddr, SocketAddr};

use derpfleet_stun::message::{
    build_request, build_response, is_stun, parse_binding_request, parse_response, parse_tailscale_request,
    RequestStyle, TxId, MAGIC_COOKIE,
};
use proptest::prelude::*;

/// Bytes that pass `is_stun` often enough to reach the attribute walkers: a header with the cookie
/// and a plausible type, then arbitrary attribute bytes.
fn stunish() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just([0u8, 1]), Just([1u8, 1]), any::<[u8; 2]>()],
        any::<u16>(),
        any::<[u8; 12]>(),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(ty, len, txid, rest)| {
            let mut b = ty.to_vec();
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&MAGIC_COOKIE);
            b.extend_from_slice(&txid);
            b.extend_from_slice(&rest);
            b
        })
}

/// Well-formed attribute lists (type, value) so deeper paths (address decoding, fingerprint) run.
fn with_attrs() -> impl Strategy<Value = Vec<u8>> {
    let attr = (
        prop_oneof![Just(0x0001u16), Just(0x0020), Just(0x8020), Just(0x8022), Just(0x8028), any::<u16>()],
        proptest::collection::vec(any::<u8>(), 0..24),
    );
    (
        prop_oneof![Just(0x0001u16), Just(0x0101)],
        any::<[u8; 12]>(),
        proptest::collection::vec(attr, 0..6),
        0usize..8,
    )
        .prop_map(|(ty, txid, attrs, trailing)| {
            let mut b = ty.to_be_bytes().to_vec();
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&MAGIC_COOKIE);
            b.extend_from_slice(&txid);
            for (t, v) in attrs {
                b.extend_from_slice(&t.to_be_bytes());
                b.extend_from_slice(&(v.len() as u16).to_be_bytes());
                b.extend_from_slice(&v);
                while b.len() % 4 != 0 {
                    b.push(0);
                }
            }
            let len = (b.len() - 20) as u16;
            b[2..4].copy_from_slice(&len.to_be_bytes());
            b.extend(std::iter::repeat_n(0xaa, trailing));
            b
        })
}

fn parse_all(b: &[u8]) {
    let _ = is_stun(b);
    let _ = parse_tailscale_request(b);
    let _ = parse_binding_request(b);
    let _ = parse_response(b);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        parse_all(&b);
    }

    #[test]
    fn stun_shaped_bytes_never_panic(b in stunish()) {
        parse_all(&b);
    }

    #[test]
    fn well_formed_attribute_lists_never_panic(b in with_attrs()) {
        parse_all(&b);
        // A well-formed request without FINGERPRINT is always accepted in lenient mode.
        if b[0..2] == [0, 1] && b.len() % 4 == 0 && !b.windows(2).any(|w| w == [0x80, 0x28]) {
            let header_len = u16::from_be_bytes([b[2], b[3]]) as usize;
            if header_len == b.len() - 20 {
                prop_assert!(parse_binding_request(&b).is_ok());
            }
        }
    }

    #[test]
    fn every_truncation_of_a_request_is_rejected_without_panic(txid in any::<[u8; 12]>(), cut in 0usize..40) {
        let req = build_request(TxId(txid));
        let r = parse_binding_request(&req[..cut]);
        // Cutting exactly after SOFTWARE leaves a valid RFC 5389 request only if the header length
        // matched, which it never does for a cut message.
        prop_assert!(r.is_err(), "cut at {} accepted: {:?}", cut, r);
    }

    #[test]
    fn responses_round_trip(txid in any::<[u8; 12]>(), ip in any::<IpAddr>(), port in any::<u16>()) {
        let addr = SocketAddr::new(ip, port);
        let want = SocketAddr::new(ip.to_canonical(), port);
        prop_assert_eq!(parse_response(&build_response(TxId(txid), addr)), Ok((TxId(txid), want)));
    }

    #[test]
    fn requests_round_trip(txid in any::<[u8; 12]>()) {
        let r = parse_binding_request(&build_request(TxId(txid))).unwrap();
        prop_assert_eq!((r.txid, r.style), (TxId(txid), RequestStyle::Tailscale));
    }
}
