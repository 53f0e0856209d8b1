//! What the STUN responders (the relay's `-stun` and `derpfleet-stun`) read from any UDP source: a
//! datagram parsed as a Binding request. Nothing may panic; a packet accepted as a request is a STUN
//! packet and carries its transaction ID at bytes 8..20.
#![no_main]

use derpfleet_stun::message::{is_stun, parse_binding_request, TxId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_binding_request(data) {
        assert!(is_stun(data));
        assert_eq!(Some(req.txid), TxId::from_packet(data));
    }
});
