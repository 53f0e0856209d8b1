//! derpfleet-client (under construction).
