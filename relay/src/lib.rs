//! derpfleet-relay: a Tailscale DERP v2 relay server.
//!
//! # Layout
//! The layers, each ignorant of the one above (like Tailscale's `derpserver` → `handler.go` →
//! `cmd/derper`):
//! - [`core`]: the transport-free DERP server. [`core::derp_server::DerpServer::accept`] takes an
//!   already-upgraded byte stream and runs the handshake, the reader loop and the send loop; the
//!   registry, the send queues and the DERP metrics live beside it.
//! - [`http`]: accepting connections: first-request sniffing, `/derp` upgrade (incl. fast start
//!   and WebSocket), the other HTTP endpoints (served by hyper), port-80 behaviour; TLS
//!   ([`http::tls`]) and the WebSocket byte stream ([`http::websocket`]).
//! - [`mesh`]: `-mesh-with` watch links to the other nodes of the region, and their forwarders.
//! - [`ops`]: operations around the core: admission, rate limits, ACME, the metrics listener.
//! - [`startup`]: derper-compatible flags, the TOML config file, derper's key file;
//!   [`defaults`]: every flag's default, read by the flags and by the settings' `Default` impls.
//! - [`server`]: `Server::spawn(config)`: owns listeners and tasks; graceful shutdown.

pub mod core;
pub mod defaults;
pub mod http;
pub mod mesh;
pub mod ops;
pub mod server;
pub mod startup;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
