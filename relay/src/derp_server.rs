//! The transport-free DERP server core (Tailscale `derpserver.Server`).
//!
//! INTERFACE CONTRACT (between the core and the HTTP/TLS layer): the HTTP layer calls
//! [`DerpServer::accept`] with the upgraded byte stream (any bytes the client pipelined after the
//! request headers must already be readable from `io`) and a [`ConnInfo`]. Everything after the
//! HTTP upgrade — ServerKey, handshake, frames — happens here. Keep these signatures stable.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use tokio::io::{AsyncRead, AsyncWrite};

/// Settings of the server core.
#[derive(Clone, Debug)]
pub struct DerpServerConfig {
    /// The server's identity key (derper's `-c` file).
    pub private_key: NodePrivate,
    /// The region mesh key, if this server meshes.
    pub mesh_key: Option<MeshKey>,
    /// Per-frame write deadline for regular clients (`-tcp-write-timeout`; None = no deadline).
    pub write_timeout: Option<Duration>,
    /// Per-connection data and disco queue depth (32, or `TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH`).
    pub queue_depth: usize,
}

/// What the HTTP layer knows about a connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address as seen by the listener.
    pub remote: SocketAddr,
    /// The client sent an `Ideal-Node` header: it is on a non-ideal node (PeerPresent flag 0x08).
    pub not_ideal: bool,
}

/// The DERP server core, shared by all connections.
pub struct DerpServer {
    _todo: (),
}

impl DerpServer {
    /// Creates the core.
    pub fn new(_config: DerpServerConfig) -> Arc<Self> {
        todo!("relay core")
    }

    /// The server's public key.
    pub fn public_key(&self) -> NodePublic {
        todo!("relay core")
    }

    /// Serves one upgraded DERP connection until it closes. Never panics on input; errors only
    /// close this connection.
    pub async fn accept<S>(self: &Arc<Self>, _io: S, _info: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        todo!("relay core")
    }
}
