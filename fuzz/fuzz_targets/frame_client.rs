//! The client's side of a DERP connection (what `derpfleet_client::conn` and the relay's mesh links read
//! from a server): arbitrary bytes, split at arbitrary points, through the frame decoder in the client
//! role, every frame decoded as a server-to-client message. Nothing may panic.
#![no_main]

use bytes::BytesMut;
use derpfleet_proto::frame::{FrameDecoder, Role};
use derpfleet_proto::msg::ServerToClient;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, rest)) = data.split_first() else { return };
    let mut dec = FrameDecoder::new(Role::Client);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(step as usize % 64 + 1) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    let _ = ServerToClient::decode(f);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
