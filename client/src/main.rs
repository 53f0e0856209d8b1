//! `derpfleet-client`: netcheck and DERP connection tools (filled in below).

fn main() {}
