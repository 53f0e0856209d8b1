//! The client's side of a DERP connection (what `derpfleet_client::conn` and the relay's mesh links read
//! from a server): arbitrary bytes, split at arbitrary points, through the frame decoder in the client
//! role, every frame decoded as a server-to-client message. Nothing may panic.
#![no_main]

use derpfleet_fuzz::feed_frames;
use derpfleet_proto::frame::Role;
use derpfleet_proto::msg::ServerToClient;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    feed_frames(data, Role::Client, |f| {
        let _ = ServerToClient::decode(f);
    });
});
