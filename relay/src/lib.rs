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

//!
//! # Names
//! One scheme, so a reader can tell from a name where a thing lives and what it is:
//! - A type is named after its file: [`server::Server`] (`server/mod.rs`) owns the listeners and
//!   every task of a running relay; [`core::derp_server::DerpServer`] (`core/derp_server.rs`) is
//!   the transport-free DERP core it hands upgraded streams to. "Server" alone always means the
//!   former, "DERP server" the latter.
//! - `ConnInfo` in this crate is what the *accept path* knows about a connection (remote address,
//!   the not-ideal-node header); the client crate's `conn::ConnInfo` is what a *server told a
//!   client* in ServerInfo. They live in different crates and never meet.
//! - Settings a caller builds before start are `*Config`, all of them: `ServerConfig`,
//!   `DerpServerConfig` and `CoreConfig` (its less common knobs, with derper's defaults),
//!   `OpsConfig`, `MeshConfig`, `DrainConfig`, `StunListenConfig` (where the embedded STUN
//!   responder listens, around the stun crate's `StunConfig`), `TcpConfig` (socket options),
//!   `WriterConfig` (one connection's send loop), `SecretsConfig`, `AcmeConfig`. The relay's own
//!   (`ServerConfig`, `OpsConfig`, `DrainConfig`, `StunListenConfig`, `TcpConfig`) are in
//!   `server/config.rs`.
//! - Every flag default is a constant in [`defaults`]; Go syntax (flags, durations, listen
//!   addresses) comes from the `derpfleet-gocompat` crate.

#![warn(unreachable_pub, missing_docs)]

pub mod core;
pub mod defaults;
pub mod http;
pub mod mesh;
pub mod ops;
pub mod server;
pub mod startup;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
