//! Relay integration tests, operations: ACME, admission, bootstrap DNS,
//! certificates, the config file, debug vars, drain, metrics, rate limits, the README's flag
//! list, secrets, client verification.
//!
//! One test binary per area rather than per file: each binary links the whole relay (build time,
//! disk).

#[path = "../http_common/mod.rs"]
mod http_common;
#[path = "../ops_common/mod.rs"]
mod ops_common;

mod acme;
mod admission;
mod bootstrap_dns;
mod certs;
mod config;
mod debug_vars;
mod drain;
mod metrics;
mod ratelimit;
mod readme;
mod secrets;
mod verify_clients;
