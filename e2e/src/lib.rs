//! derpfleet-e2e (under construction).
