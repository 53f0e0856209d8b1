//! The relay's PROXY protocol header parser (`derpfleet_relay::http::proxy_protocol::parse_header`)
//! on arbitrary bytes: nothing may panic, and a header that parses as v1 is at most 107 bytes
//! and a v2 one at most the relay's cap.
#![no_main]

use derpfleet_relay::http::proxy_protocol::{parse_header, V1_MAX_LEN, V2_MAX_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if parse_header(data).is_ok() {
        let cap = if data.starts_with(b"PROXY ") { V1_MAX_LEN } else { V2_MAX_LEN };
        assert!(data.len() <= cap, "accepted a {}-byte header", data.len());
    }
});
