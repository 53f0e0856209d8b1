//! derpfleet-stun (under construction).
