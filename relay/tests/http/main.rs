//! Relay integration tests, the HTTP/TLS layer: the upgrade, WebSocket, TLS
//! and meta-certificates, interop with the `ts_derp` client.
//!
//! One test binary per area rather than per file: each binary links the whole relay (build time,
//! disk).

#[path = "../http_common/mod.rs"]
mod http_common;

mod conformance;
mod direct_write;
mod fuzz;
mod interop_ts_derp;
mod tls;
