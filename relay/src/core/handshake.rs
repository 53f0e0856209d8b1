//! One connection's handshake, in order (derper's `accept`, spec §1.3–§1.4, §2.7): ServerKey,
//! ClientInfo, admission, registration, ServerInfo.
//!
//! ServerKey is written and exactly one frame read under the handshake deadline: it must be a
//! ClientInfo whose box opens and whose JSON parses, or the connection closes without a
//! ServerInfo. Mesh-key holders skip the admission check. The connection is registered before
//! ServerInfo is written (so a client that saw ServerInfo can be sent packets at once); a
//! ServerInfo write that fails or misses the deadline unregisters it again. Bytes the client
//! pipelined after its ClientInfo stay in the read buffer for the reader loop.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use derpfleet_proto::frame::{FrameDecoder, FrameError, FrameType};
use derpfleet_proto::handshake::{
    open_client_info_and_seal_reply, server_key_frame, ClientInfo, HandshakeError, ServerInfo,
};
use derpfleet_proto::msg::{peer_present_flags as flags, ServerToClient};
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::metrics::Metrics;
use crate::core::outbox::{Outbox, SeenSources};
use crate::core::registry::{Conn, Registry};

/// Control-queue depth (PeerGone) of a regular connection.
const CONTROL_QUEUE_DEPTH: usize = 512;
/// Control-queue depth of a mesh peer: it may be flooded with one PeerPresent per connected key.
const MESH_CONTROL_QUEUE_DEPTH: usize = 1 << 17;
/// How much the read buffer grows per read while waiting for the ClientInfo.
const READ_CHUNK: usize = 2 << 10;

/// The admission decision for a client (spec §2.7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Let the client in.
    Allow,
    /// Close it after its ClientInfo, without a ServerInfo; the reason is logged.
    Reject(String),
}

/// A check run after a non-mesh client's ClientInfo opens and before it is registered
/// (the `-verify-client-url` and `-allowlist` policy plugs in here). It must bound its own time.
pub trait AdmissionCheck: Send + Sync + 'static {
    /// Decides whether `key` (with `info`, arriving as `conn`) may connect.
    fn check<'a>(
        &'a self,
        key: NodePublic,
        info: &'a ClientInfo,
        conn: &'a ConnInfo,
    ) -> Pin<Box<dyn Future<Output = Admission> + Send + 'a>>;
}

/// A shareable [`AdmissionCheck`] (a newtype so the config stays `Debug`).
#[derive(Clone)]
pub struct AdmissionHook(pub Arc<dyn AdmissionCheck>);

impl fmt::Debug for AdmissionHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdmissionHook(..)")
    }
}

/// What the HTTP layer knows about a connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client's address as seen by the listener.
    pub remote: SocketAddr,
    /// The client sent an `Ideal-Node` header: it is on a non-ideal node (PeerPresent flag 0x08).
    pub not_ideal: bool,
}

/// Why a handshake failed. The connection is closed without a ServerInfo.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeFailure {
    /// ServerKey could not be written, ClientInfo read or ServerInfo written before the deadline.
    #[error("handshake deadline passed")]
    Timeout,
    /// The transport failed or closed.
    #[error("transport: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed before sending a complete ClientInfo.
    #[error("closed before ClientInfo")]
    Eof,
    /// The first frame has the wrong type or length.
    #[error("first frame: {0}")]
    Frame(#[from] FrameError),
    /// The first frame is not a ClientInfo.
    #[error("first frame has type {0:#04x}, not ClientInfo")]
    NotClientInfo(u8),
    /// The box or the JSON inside is bad.
    #[error("ClientInfo: {0}")]
    ClientInfo(#[from] HandshakeError),
    /// The admission check refused the client.
    #[error("client rejected: {0}")]
    Rejected(String),
    /// The server is shutting down.
    #[error("server shutting down")]
    Shutdown,
}

/// Everything one handshake needs from the server, borrowed for its duration.
pub(crate) struct Handshake<'a> {
    /// The server's identity key (opens ClientInfo, seals ServerInfo).
    pub(crate) private_key: &'a NodePrivate,
    /// Its public half (sent in ServerKey).
    pub(crate) public_key: NodePublic,
    /// The region mesh key; a client proving it is a mesh peer.
    pub(crate) mesh_key: Option<&'a MeshKey>,
    /// Admission check for non-mesh clients.
    pub(crate) admission: Option<&'a AdmissionHook>,
    /// Data and disco queue depth of the new connection.
    pub(crate) queue_depth: usize,
    /// Where the connection is registered.
    pub(crate) registry: &'a Registry,
    /// The server's metrics (shared with the new connection's outbox).
    pub(crate) metrics: &'a Arc<Metrics>,
}

impl Handshake<'_> {
    /// Runs the handshake before `deadline`: a registered connection with id `id` and
    /// cancellation token `cancel`, or why not. Bytes read past the ClientInfo stay in `buf`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run<R, W>(
        &self,
        r: &mut R,
        w: &mut W,
        buf: &mut BytesMut,
        dec: &mut FrameDecoder,
        info: &ConnInfo,
        id: u64,
        cancel: CancellationToken,
        deadline: Instant,
    ) -> Result<Arc<Conn>, HandshakeFailure>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        write_before(deadline, w, &server_key_frame(&self.public_key)).await?;
        let (key, client, sealed_server_info) = self.read_client_info(r, buf, dec, deadline).await?;
        let can_mesh = match (self.mesh_key, &client.mesh_key) {
            (Some(ours), Some(theirs)) => ours.ct_eq(theirs),
            _ => false,
        };
        if !can_mesh {
            if let Some(AdmissionHook(check)) = self.admission {
                if let Admission::Reject(why) = check.check(key, &client, info).await {
                    return Err(HandshakeFailure::Rejected(why));
                }
            }
        }
        let control_depth = if can_mesh { MESH_CONTROL_QUEUE_DEPTH } else { CONTROL_QUEUE_DEPTH };
        let conn = Arc::new(Conn::new(
            id,
            key,
            info.remote,
            present_flags(can_mesh, client.is_prober, info.not_ideal),
            can_mesh,
            Outbox::new(self.queue_depth, control_depth, self.metrics.clone()),
            cancel,
        ));
        self.registry.register(&conn);
        let mut frame = BytesMut::new();
        ServerToClient::ServerInfo(sealed_server_info).encode(&mut frame);
        if let Err(e) = write_before(deadline, w, &frame).await {
            conn.out.close();
            self.registry.unregister(&conn, &SeenSources::default());
            return Err(e);
        }
        Ok(conn)
    }

    /// Reads the first frame; it must be a ClientInfo that opens. Returns the client's key, its
    /// info, and the sealed ServerInfo payload to send once it is admitted (sealed with the same
    /// key agreement that opened the ClientInfo).
    async fn read_client_info<R>(
        &self,
        r: &mut R,
        buf: &mut BytesMut,
        dec: &mut FrameDecoder,
        deadline: Instant,
    ) -> Result<(NodePublic, ClientInfo, Bytes), HandshakeFailure>
    where
        R: AsyncRead + Unpin,
    {
        let first = loop {
            if let Some(f) = dec.decode(buf)? {
                break f;
            }
            buf.reserve(READ_CHUNK);
            let n = tokio::time::timeout_at(deadline, r.read_buf(buf))
                .await
                .map_err(|_| HandshakeFailure::Timeout)??;
            if n == 0 {
                return Err(HandshakeFailure::Eof);
            }
        };
        if first.ty != FrameType::ClientInfo as u8 {
            return Err(HandshakeFailure::NotClientInfo(first.ty));
        }
        Ok(open_client_info_and_seal_reply(self.private_key, &first.payload, &ServerInfo::default())?)
    }
}

/// Writes and flushes `frame` before `deadline`.
async fn write_before<W>(deadline: Instant, w: &mut W, frame: &[u8]) -> Result<(), HandshakeFailure>
where
    W: AsyncWrite + Unpin,
{
    tokio::time::timeout_at(deadline, async {
        w.write_all(frame).await?;
        w.flush().await
    })
    .await
    .map_err(|_| HandshakeFailure::Timeout)??;
    Ok(())
}

/// The PeerPresent flag bits watchers are told for this connection.
fn present_flags(can_mesh: bool, is_prober: bool, not_ideal: bool) -> u8 {
    let mut f = 0;
    if can_mesh {
        f |= flags::IS_MESH_PEER;
    }
    if is_prober {
        f |= flags::IS_PROBER;
    }
    if not_ideal {
        f |= flags::NOT_IDEAL;
    }
    if f == 0 {
        flags::IS_REGULAR
    } else {
        f
    }
}
