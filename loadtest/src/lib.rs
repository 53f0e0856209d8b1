//! derpfleet-loadtest: a load generator for DERP v2 relays (derpfleet-relay, Go derper, ...).
//!
//! The binary (`src/main.rs`) parses the command line ([`cli`]), resolves the targets ([`target`]),
//! runs one scenario ([`scenario`]) and prints a [`report::Report`] as a table or JSON.
//!
//! Data-path scenarios (throughput, pingpong, mesh, fleet) use `derpfleet-client`'s connections;
//! the connection-count scenarios (connections, churn) use [`lean`], a minimal handshake that can
//! bind a chosen source address and keeps nothing but the socket per connection.

pub mod cli;
pub mod lean;
pub mod payload;
pub mod plot;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod sys;
pub mod target;
pub mod ws;
