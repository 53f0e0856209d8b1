//! Relay integration tests, meshing: watchers, mesh links between processes,
//! regions, a stalled peer, mesh TLS.
//!
//! One test binary per area rather than per file: each binary links the whole relay (build time,
//! disk).

#[path = "../http_common/mod.rs"]
mod http_common;
#[path = "../mesh_common/mod.rs"]
mod mesh_common;
#[path = "../ops_common/mod.rs"]
mod ops_common;

mod conformance;
mod process;
mod region;
mod stalled_peer;
mod tls;
