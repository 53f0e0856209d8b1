//! derpfleet-loadtest: a load generator for DERP v2 relays (derpfleet-relay, Go derper, ...).
//!
//! The binary (`src/main.rs`) parses the command line ([`cli`]), resolves the targets ([`target`]),
//! runs one scenario ([`scenario`]) and prints a [`report::Report`] as a table or JSON.
//!
//! Every DERP connection is `derpfleet-client`'s ([`derpfleet_client::conn`]): the packet
//! scenarios use its connections (batched writes, or one write per frame as Tailscale's client
//! writes), the connection-count scenarios its bare connect that keeps only the socket. [`floor`]
//! measures the host's per-packet floor that relay CPU per packet is compared with; [`drops`]
//! reads the relay's drop counters.

pub mod cli;
pub mod drops;
pub mod floor;
pub mod payload;
pub mod plot;
pub mod progress;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod sys;
pub mod target;
