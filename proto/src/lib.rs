//! The Tailscale DERP v2 wire format, with no sockets and no async runtime.
//!
//! Everything here is pure: bytes in, bytes out. The relay, the client, the mesh and the load-test
//! tool all speak DERP through these types, so the two directions of the protocol cannot drift apart.
//!
//! # Layout
//! - [`consts`]: magic, protocol version, size limits and timings from the spec (§1.1).
//! - [`key`]: node keys (`nodekey:`/`privkey:`), the mesh key, constant-time comparison.
//! - [`frame`]: the 5-byte frame header, the [`frame::FrameType`] registry and the incremental
//!   [`frame::FrameDecoder`] (header length checked before any allocation; unknown frames skipped).
//! - [`msg`]: [`msg::ClientToServer`] and [`msg::ServerToClient`] messages: decode with the spec's
//!   validation rules, encode into a buffer.
//! - [`handshake`]: ServerKey, ClientInfo and ServerInfo, with the NaCl box (`crypto_box`).
//! - [`client_handshake`]: the client side of the handshake as a state machine (frames in,
//!   bytes to send out), shared by every client in the workspace.
//! - [`upgrade`]: the HTTP upgrade request head and the parsing of the response head.
//! - `codec` (feature `codec`): `tokio_util::codec` decoders/encoders over [`frame::FrameDecoder`].
//! - [`disco`]: just enough of the disco format for a relay to recognise disco packets.
//! - [`derpmap`]: Tailscale's DERP map JSON (`tailcfg.DERPMap`) and its validation.

pub mod client_handshake;
#[cfg(feature = "codec")]
pub mod codec;
pub mod consts;
pub mod derpmap;
pub mod disco;
pub mod frame;
pub mod handshake;
pub mod key;
pub mod msg;
pub mod upgrade;

pub use frame::{FrameDecoder, FrameError, FrameType, RawFrame};
pub use key::{MeshKey, NodePrivate, NodePublic};
