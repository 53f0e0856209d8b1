//! derpfleet-relay: a Tailscale DERP v2 relay server.
//!
//! # Layout
//! The layers, each ignorant of the one above (like Tailscale's `derpserver` → `handler.go` →
//! `cmd/derper`):
//! - [`derp_server`]: the transport-free server core. [`derp_server::DerpServer::accept`] takes an
//!   already-upgraded byte stream and runs the handshake, the reader loop and the send loop.
//!   - [`registry`]: clients by key, duplicate-connection policy, who-saw-whom for PeerGone.
//!   - [`session`]: one connection's handshake and reader loop (`handle_frame_*`).
//!   - [`writer`]: one connection's send loop: queues, drain-then-flush batching, keepalive,
//!     write deadline.
//!   - [`queue`]: the bounded head-drop send queue.
//!   - [`metrics`]: every counter, gauge and histogram, with derper's names, and drop reasons.
//! - [`http`]: accepting connections: first-request sniffing, `/derp` upgrade (incl. fast start
//!   and WebSocket), the other HTTP endpoints (served by hyper), port-80 behaviour.
//! - [`websocket`]: a WebSocket connection as a DERP byte stream.
//! - [`tls`]: rustls configuration: manual certificates, self-signed for IP literals, the
//!   `derpkey` meta-certificate, ALPN.
//! - [`keyfile`]: derper's `-c` JSON key file.
//! - [`cli`]: derper-compatible flags (Go flag syntax) turned into a [`server::ServerConfig`].
//! - [`server`]: `Server::spawn(config)`: owns listeners and tasks; graceful shutdown.
//! - Operations (issue 4): [`admission`] (allowlist, `-verify-client-url`), [`ratelimit`]
//!   (accept limits, per-client receive rate), [`ops_metrics`] and [`metrics_http`] (`/metrics`,
//!   `/healthz`, drop log), [`config`] (the TOML file), certificate reload in [`tls`].
//! - Mesh (issue 5): [`mesh`] (`-mesh-with` watch links, forwarders; the multi-forwarder policy
//!   lives in [`registry`]).

pub mod acme;
pub mod admission;
pub mod cli;
pub mod config;
pub mod derp_server;
pub mod http;
pub mod keyfile;
pub mod mesh;
pub mod metrics;
pub mod metrics_http;
pub mod ops_metrics;
pub mod queue;
pub mod ratelimit;
pub mod registry;
pub mod server;
pub mod session;
pub mod tls;
pub mod websocket;
pub mod writer;

#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
