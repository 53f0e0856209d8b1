//! The DERP core: everything between an upgraded byte stream and another client's socket, with no
//! knowledge of HTTP, TLS, listeners or operations policy (Tailscale's `derpserver` package).
//!
//! - [`branch_wake`]: per-branch wakers, so a woken connection task polls only what woke it.
//! - [`derp_server`]: [`derp_server::DerpServer::accept`] takes an upgraded stream and runs one
//!   connection: handshake, reader loop, send loop.
//! - [`handshake`]: ServerKey, ClientInfo, admission, registration, ServerInfo, in that order.
//! - [`reader`]: one connection's reader loop.
//! - [`registry`]: clients by key, the duplicate-connection policy, watchers, who-saw-whom.
//! - [`outbox`]: what other tasks hand one connection: packets, Pongs, control frames (never
//!   blocking), and the sources it has been sent packets from.
//! - [`writer`]: one connection's drain-then-flush send loop.
//! - [`queue`]: the bounded head-drop queue the outbox is made of.
//! - [`recv_limit`]: the per-client receive byte rate the reader waits on.
//! - [`metrics`]: every DERP series with derper's names, and the drop reasons.

pub(crate) mod branch_wake;
pub mod derp_server;
pub(crate) mod handshake;
pub mod metrics;
pub mod outbox;
pub(crate) mod queue;
pub(crate) mod reader;
pub mod recv_limit;
pub mod registry;
pub(crate) mod writer;
