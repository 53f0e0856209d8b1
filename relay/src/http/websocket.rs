//! A WebSocket connection (subprotocol `derp`) as a plain DERP byte stream (spec §2.2).
//!
//! Browsers (js/wasm clients) cannot open raw sockets, so they carry the DERP byte stream in
//! binary WebSocket messages. Message boundaries mean nothing: a DERP frame may span messages and
//! one message may hold several frames. The adapter itself is shared with the client side
//! ([`derpfleet_client::ws::WsBytes`]), so both ends frame the stream the same way; this module
//! only opens it in the server role.

use derpfleet_client::ws::WsBytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::Role;

/// Turns an upgraded server-side connection (the 101 already written) into a DERP byte stream.
pub(crate) async fn server_byte_stream<S>(io: S) -> WsBytes<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    WsBytes::new(io, Role::Server, Vec::new()).await
}
