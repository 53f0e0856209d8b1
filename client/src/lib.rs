//! derpfleet-client: the client side of a Tailscale-compatible DERP fleet.
//!
//! - [`conn`]: one DERP connection (dial a region's nodes or a URL, TLS per `CertName`, fast start,
//!   handshake), split into a batching [`conn::DerpSender`] and a [`conn::DerpReceiver`].
//! - [`region`]: a reconnecting client for one region (backoff with jitter, `Restarting`,
//!   `NotePreferred` for the home region, silence detection).
//! - [`netcheck`]: STUN and HTTPS latency measurement per region and the home-region choice.
//! - [`dial`], [`tls`]: the dialing rules and certificate verification modes of spec §2.6.
//!
//! The DERP map types live in [`derpfleet_proto::derpmap`]. The binary (`cli` feature, on by
//! default) adds `derpfleet-client netcheck` and `derpfleet-client connect`.

pub mod conn;
pub mod dial;
pub mod netcheck;
#[cfg(feature = "node")]
pub mod node;
#[cfg(feature = "node")]
pub mod portmap;
pub mod region;
#[cfg(feature = "node")]
pub mod route_table;
pub mod tls;
pub mod ws;

pub use conn::{ConnectError, ConnectOptions, DerpConn, DerpReceiver, DerpSender, DerpTarget, SendError};
pub use derpfleet_proto::derpmap;
pub use dial::DerpUrl;
