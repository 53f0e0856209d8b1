//! The relay's side of a DERP connection: arbitrary bytes, split at arbitrary points, through the frame
//! decoder in the server role, and every frame it yields decoded as a client-to-server message. Nothing
//! may panic; every frame respects the server's size limits; a decode error ends the feed, as the
//! server closes the connection there.
#![no_main]

use bytes::BytesMut;
use derpfleet_proto::consts::{KEY_LEN, MAX_CLIENT_INFO_LEN, MAX_PACKET_SIZE};
use derpfleet_proto::frame::{FrameDecoder, Role};
use derpfleet_proto::msg::ClientToServer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the read size, so frames get split across reads in many ways.
    let Some((&step, rest)) = data.split_first() else { return };
    let mut dec = FrameDecoder::new(Role::Server);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(step as usize % 64 + 1) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    assert!(f.payload.len() <= MAX_CLIENT_INFO_LEN.max(2 * KEY_LEN + MAX_PACKET_SIZE));
                    let _ = ClientToServer::decode(f);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
