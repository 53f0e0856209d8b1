//! The server's handshake reading: arbitrary bytes as a ClientInfo frame payload (box opening
//! with a fixed server key) and as the ClientInfo JSON itself. Nothing may panic; a payload
//! sealed correctly around the fuzzed JSON must open and parse exactly as the JSON alone does.
#![no_main]

use derpfleet_proto::handshake::{open_client_info, seal, ClientInfo};
use derpfleet_proto::NodePrivate;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let server = NodePrivate::from_bytes([0x11; 32]);
    let _ = open_client_info(&server, data);
    let direct = ClientInfo::from_json(data);
    let client = NodePrivate::from_bytes([0x22; 32]);
    let mut payload = client.public().0.to_vec();
    payload.extend(seal(&client, &server.public(), data));
    match (open_client_info(&server, &payload), direct) {
        (Ok((key, via_box)), Ok(plain)) => {
            assert_eq!(key, client.public());
            assert_eq!(via_box.to_json(), plain.to_json());
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("box and plain JSON disagree: {:?} vs {:?}", a.is_ok(), b.is_ok()),
    }
});
