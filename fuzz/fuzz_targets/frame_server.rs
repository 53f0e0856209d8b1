//! The relay's side of a DERP connection: arbitrary bytes, split at arbitrary points, through the frame
//! decoder in the server role, and every frame it yields decoded as a client-to-server message. Nothing
//! may panic; every frame respects the server's size limits; a decode error ends the feed, as the
//! server closes the connection there.
#![no_main]

use derpfleet_fuzz::feed_frames;
use derpfleet_proto::consts::{KEY_LEN, MAX_CLIENT_INFO_LEN, MAX_PACKET_SIZE};
use derpfleet_proto::frame::Role;
use derpfleet_proto::msg::ClientToServer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    feed_frames(data, Role::Server, |f| {
        assert!(f.payload.len() <= MAX_CLIENT_INFO_LEN.max(2 * KEY_LEN + MAX_PACKET_SIZE));
        let _ = ClientToServer::decode(f);
    });
});
