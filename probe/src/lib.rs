//! derpfleet-probe: a fleet prober for DERP relays, after Tailscale's `cmd/derpprobe`.
//!
//! It reads a DERP map, plans probes per node and per mesh pair ([`plan`]), runs each on its own
//! interval, bounded by a timeout ([`scheduler`], bodies in [`probes`]), keeps the latest results
//! ([`results`]) and serves them as Prometheus metrics ([`metrics`]) and a status page ([`web`]).
//! `-once` probes everything one time and prints the results (as JSON with `-json`).

pub mod cli;
pub mod mapsource;
pub mod metrics;
pub mod plan;
pub mod probes;
pub mod results;
pub mod scheduler;
pub mod web;
