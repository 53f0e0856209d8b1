//! STUN for derpfleet: the Binding codec Tailscale speaks (spec §5), client helpers for netcheck,
//! and a fast responder usable embedded in the relay or as the `derpfleet-stun` binary.
//!
//! - [`message`]: pure codec — build/parse requests and responses, `is_stun`, the acceptance rules.
//! - [`client`]: one request/response exchange with retries and RTT, on a dedicated socket or
//!   through [`client::StunDemux`] on a socket shared with other traffic.
//! - [`server`]: the responder ([`server::StunServer`]), its metrics and socket binding.
//! - [`load`]: a batched load generator (the `stun-bench` example; reusable by the load-test tool).
//! - [`batch`]: `recvmmsg`/`sendmmsg` behind a safe interface (also used by the load generator).

pub mod batch;
pub mod client;
pub mod load;
pub mod message;
pub mod server;

pub use message::{
    build_request, build_response, is_stun, parse_binding_request, parse_response, BindingRequest,
    RequestStyle, StunError, TxId,
};
pub use server::{bind_sockets, PerIpLimit, StunConfig, StunMetrics, StunServer};
