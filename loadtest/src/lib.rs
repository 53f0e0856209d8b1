//! derpfleet-loadtest (under construction).
