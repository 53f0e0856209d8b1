//! The client's handshake reading: arbitrary bytes as a ServerInfo frame payload (box opening with fixed
//! keys) and as the ServerInfo JSON itself. Nothing may panic; a payload sealed correctly around the
//! fuzzed JSON opens exactly when the JSON alone parses.
#![no_main]

use derpfleet_proto::handshake::{open_server_info, seal, ServerInfo};
use derpfleet_proto::NodePrivate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let client = NodePrivate::from_bytes([0x22; 32]);
    let server = NodePrivate::from_bytes([0x11; 32]);
    let _ = open_server_info(&client, &server.public(), data);
    let direct = ServerInfo::from_json(data);
    let sealed = seal(&server, &client.public(), data);
    let via_box = open_server_info(&client, &server.public(), &sealed);
    // The sealed payload is nonce + tag + JSON; within the size limit the two must agree.
    if data.len() + 16 <= derpfleet_proto::consts::MAX_INFO_LEN {
        assert_eq!(via_box.is_ok(), direct.is_ok(), "box and plain JSON disagree");
    }
});
