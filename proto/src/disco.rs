//! The part of Tailscale's disco format a relay needs: recognising a disco packet (spec §8).
//!
//! A disco packet is `"TS💬" ‖ sender disco key(32) ‖ nonce(24) ‖ box`. The relay never opens it;
//! it only routes disco into its own queue and answers disco to unknown keys with PeerGone(NotHere).

/// `"TS💬"`: the 6-byte disco magic.
pub const MAGIC: [u8; 6] = *b"TS\xf0\x9f\x92\xac";
/// Magic ‖ key ‖ nonce: the shortest a disco packet can be.
pub const MIN_LEN: usize = MAGIC.len() + 32 + 24;

/// Tailscale's `LooksLikeDiscoWrapper`: at least 62 bytes and the magic prefix.
#[inline]
pub fn looks_like_disco(data: &[u8]) -> bool {
    data.len() >= MIN_LEN && data[..MAGIC.len()] == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_disco() {
        let mut p = vec![0u8; 62];
        p[..6].copy_from_slice(&MAGIC);
        assert!(looks_like_disco(&p));
        assert!(!looks_like_disco(&p[..61]));
        p[0] = b'X';
        assert!(!looks_like_disco(&p));
    }
}
