//! derpfleet-relay (under construction).
