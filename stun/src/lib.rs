//! STUN for derpfleet: the Binding codec Tailscale speaks (spec §5), client helpers for netcheck,
//! and a fast responder usable embedded in the relay or as the `derpfleet-stun` binary.
//!
//! - [`message`]: pure codec — build/parse requests and responses, `is_stun`, the acceptance rules.

pub mod message;

pub use message::{
    build_request, build_response, is_stun, parse_binding_request, parse_response, BindingRequest,
    RequestStyle, StunError, TxId,
};
