//! Operations around the DERP core: who may connect, how fast, certificates from an ACME CA, and
//! what the relay tells its operator (`/metrics`, `/healthz`, the drop log).
//!
//! - [`admission`]: the allowlist file and `-verify-client-url`, plugged into the core as a check.
//! - [`ratelimit`]: accept limits (global, per source IP) and the per-client receive rate.
//! - [`acme`]: `-certmode letsencrypt`/`gcp` (ACME: TLS-ALPN-01, HTTP-01, EAB, IP certificates).
//! - [`bootstrap_dns`]: `/bootstrap-dns` (derper's DNS answers for clients without DNS).
//! - [`debug_vars`]: derper's `/debug/` index and `/debug/vars`.
//! - [`secrets`]: `-secrets-url` (the mesh key from setec).
//! - [`verify_localapi`]: `-verify-clients` (tailscaled's LocalAPI whois).
//! - [`ops_metrics`]: the process series around the core's; [`metrics_http`]: the metrics listener.

pub mod acme;
pub mod admission;
pub mod bootstrap_dns;
pub(crate) mod debug_vars;
pub(crate) mod http_client;
pub(crate) mod metrics_http;
pub(crate) mod ops_metrics;
pub mod ratelimit;
pub(crate) mod secrets;
pub(crate) mod verify_localapi;
