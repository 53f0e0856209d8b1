//! Feeds arbitrary bytes, split at arbitrary points, to the frame decoder in both roles and
//! decodes every frame it yields into a message. Nothing may panic; every frame the server role
//! accepts must respect its size limits; a decode error must be sticky-safe (we stop there, as
//! the server closes the connection).
#![no_main]

use bytes::BytesMut;
use derpfleet_proto::consts::{KEY_LEN, MAX_CLIENT_INFO_LEN, MAX_PACKET_SIZE};
use derpfleet_proto::frame::{FrameDecoder, Role};
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte chooses the read size, so frames get split across reads in many ways.
    let Some((&step, rest)) = data.split_first() else { return };
    let step = (step as usize % 64) + 1;
    for role in [Role::Server, Role::Client] {
        let mut dec = FrameDecoder::new(role);
        let mut buf = BytesMut::new();
        'feed: for piece in rest.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match dec.decode(&mut buf) {
                    Ok(Some(f)) => {
                        assert!(f.payload.len() <= MAX_CLIENT_INFO_LEN.max(2 * KEY_LEN + MAX_PACKET_SIZE));
                        match role {
                            Role::Server => {
                                let _ = ClientToServer::decode(f);
                            }
                            Role::Client => {
                                let _ = ServerToClient::decode(f);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
        }
    }
});
