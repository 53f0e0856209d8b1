//! What more than one fuzz target does: feeding arbitrary bytes to a DERP frame decoder the way a
//! socket would, in pieces of a size the input chooses.

use bytes::BytesMut;
use derpfleet_proto::frame::{FrameDecoder, RawFrame, Role};

/// Feeds `data[1..]` to a decoder in `role`, in pieces of `data[0] % 64 + 1` bytes (so frames get
/// split across reads in many ways), and calls `on_frame` with every frame decoded. A decode error
/// ends the feed, as a relay or client closes the connection there.
pub fn feed_frames(data: &[u8], role: Role, mut on_frame: impl FnMut(RawFrame)) {
    let Some((&step, rest)) = data.split_first() else { return };
    let mut dec = FrameDecoder::new(role);
    let mut buf = BytesMut::new();
    for piece in rest.chunks(step as usize % 64 + 1) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => on_frame(f),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}
