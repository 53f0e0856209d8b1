//! What the reference client's magicsock reads from a DERP packet or a UDP datagram that looks like disco:
//! the sealed envelope (magic, sender key, nonce, box) opened with fixed keys, and the plaintext parsed
//! as Ping/Pong/CallMeMaybe. Nothing may panic; a message that parses re-encodes to bytes that parse to
//! the same message.
#![no_main]

use std::sync::OnceLock;

use derpfleet_client::node::disco::{sender_key, DiscoMessage, DiscoPrivate, SharedBox};
use libfuzzer_sys::fuzz_target;

/// A fixed key pair's box, made once (one X25519 per peer, as magicsock does).
fn shared() -> &'static SharedBox {
    static BOX: OnceLock<SharedBox> = OnceLock::new();
    BOX.get_or_init(|| {
        let ours: DiscoPrivate = format!("discoprivkey:{}", "11".repeat(32)).parse().expect("key");
        ours.shared(&ours.public())
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = sender_key(data);
    let _ = shared().open(data);
    if let Ok(msg) = DiscoMessage::decode(data) {
        assert_eq!(DiscoMessage::decode(&msg.encode()).ok(), Some(msg));
    }
});
