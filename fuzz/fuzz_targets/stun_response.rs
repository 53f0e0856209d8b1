//! What netcheck and the STUN client read back: a datagram parsed as a Binding response (XOR-MAPPED-ADDRESS
//! or MAPPED-ADDRESS). Nothing may panic; an accepted response carries its transaction ID at 8..20.
#![no_main]

use derpfleet_stun::message::{parse_response, TxId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((txid, _addr)) = parse_response(data) {
        assert_eq!(Some(txid), TxId::from_packet(data));
    }
});
