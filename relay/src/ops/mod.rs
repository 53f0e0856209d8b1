//! Operations around the DERP core: who may connect, how fast, certificates from an ACME CA, and
//! what the relay tells its operator (`/metrics`, `/healthz`, the drop log).
//!
//! - [`admission`]: the allowlist file and `-verify-client-url`, plugged into the core as a check.
//! - [`ratelimit`]: accept limits (global, per source IP) and the per-client receive rate.
//! - [`acme`]: `-certmode letsencrypt`.
//! - [`ops_metrics`]: the process series around the core's; [`metrics_http`]: the metrics listener.

pub mod acme;
pub mod admission;
pub mod metrics_http;
pub mod ops_metrics;
pub mod ratelimit;
