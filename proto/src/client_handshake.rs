//! The client side of the DERP handshake (spec §1.3) as a state machine with no IO.
//!
//! Feed it the frames the server sends, in order; it says what to send and when the connection
//! is up. Every DERP client in the workspace (the library connection, the load generator, the
//! relay's test client) runs this one machine, so the rules below hold everywhere:
//!
//! - The first frame must be ServerKey (as the Go client's `recvServerKey`); anything else fails.
//! - After ClientInfo, frames other than ServerInfo are passed over until ServerInfo arrives
//!   (a fast-start server still sends ServerKey first). A ServerKey naming another key fails.
//! - With fast start ([`ClientHandshake::with_server_key`]) the key comes from the TLS
//!   meta-certificate and ClientInfo is sent before anything is read.
//!
//! ```
//! use derpfleet_proto::client_handshake::{ClientHandshake, Progress};
//! use derpfleet_proto::handshake::{seal_server_info, ClientInfo, ServerInfo};
//! use derpfleet_proto::msg::ServerToClient;
//! use derpfleet_proto::NodePrivate;
//!
//! let (client, server) = (NodePrivate::generate(), NodePrivate::generate());
//! let mut hs = ClientHandshake::new(client.clone(), ClientInfo::default());
//! let Progress::Send(_client_info_frame) = hs.feed(ServerToClient::ServerKey(server.public())).unwrap()
//! else { panic!() };
//! let reply = seal_server_info(&server, &client.public(), &ServerInfo::default());
//! let Progress::Done(up) = hs.feed(ServerToClient::ServerInfo(reply)).unwrap() else { panic!() };
//! assert_eq!(up.server_key, server.public());
//! ```

use bytes::{Bytes, BytesMut};

use crate::handshake::{open_server_info, seal_client_info, ClientInfo, HandshakeError, ServerInfo};
use crate::key::{NodePrivate, NodePublic};
use crate::msg::{ClientToServer, ServerToClient};

/// Why the client handshake failed; each closes the connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientHandshakeError {
    /// The first frame was not ServerKey.
    #[error("expected ServerKey frame, got type {0:#04x}")]
    NoServerKey(u8),
    /// A ServerKey frame named a key other than the one the handshake runs with (the first
    /// ServerKey, or the meta-certificate's under fast start).
    #[error("server key {got} in ServerKey frame differs from expected key {expected}")]
    KeyMismatch {
        /// from the frame
        got: NodePublic,
        /// the key the handshake was using
        expected: NodePublic,
    },
    /// ServerInfo did not open or is not valid JSON.
    #[error(transparent)]
    ServerInfo(#[from] HandshakeError),
    /// A frame was fed after the handshake finished.
    #[error("handshake already finished")]
    Finished,
}

/// What to do after feeding a frame.
#[derive(Debug)]
pub enum Progress {
    /// Write these bytes (the ClientInfo frame) to the server, then keep feeding frames.
    Send(Bytes),
    /// Nothing to send; feed the next frame.
    Pending,
    /// The connection is up.
    Done(Established),
}

/// The result of a finished handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Established {
    /// The server's public key.
    pub server_key: NodePublic,
    /// What the server said in ServerInfo.
    pub server_info: ServerInfo,
}

#[derive(Debug)]
enum State {
    AwaitServerKey,
    AwaitServerInfo(NodePublic),
    Done,
}

/// The client half of the handshake: ServerKey in, ClientInfo out, ServerInfo in.
#[derive(Debug)]
pub struct ClientHandshake {
    key: NodePrivate,
    info: ClientInfo,
    state: State,
}

impl ClientHandshake {
    /// A handshake that waits for the server's ServerKey frame.
    pub fn new(key: NodePrivate, info: ClientInfo) -> Self {
        Self { key, info, state: State::AwaitServerKey }
    }

    /// Fast start: the server key is already known (TLS meta-certificate). Returns the machine
    /// and the ClientInfo frame to send at once, before reading anything.
    pub fn with_server_key(key: NodePrivate, info: ClientInfo, server: NodePublic) -> (Self, Bytes) {
        let hs = Self { key, info, state: State::AwaitServerInfo(server) };
        let frame = hs.client_info_frame(&server);
        (hs, frame)
    }

    /// The server key, once known.
    pub fn server_key(&self) -> Option<NodePublic> {
        match self.state {
            State::AwaitServerInfo(k) => Some(k),
            _ => None,
        }
    }

    /// True once [`Progress::Done`] was returned.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The encoded ClientInfo frame (header included) sealed to `server`.
    fn client_info_frame(&self, server: &NodePublic) -> Bytes {
        let mut b = BytesMut::new();
        ClientToServer::ClientInfo(seal_client_info(&self.key, server, &self.info)).encode(&mut b);
        b.freeze()
    }

    /// Advances the handshake with the next frame the server sent.
    pub fn feed(&mut self, frame: ServerToClient) -> Result<Progress, ClientHandshakeError> {
        match (&self.state, frame) {
            (State::AwaitServerKey, ServerToClient::ServerKey(k)) => {
                self.state = State::AwaitServerInfo(k);
                Ok(Progress::Send(self.client_info_frame(&k)))
            }
            (State::AwaitServerKey, other) => Err(ClientHandshakeError::NoServerKey(other.frame_type())),
            (State::AwaitServerInfo(server), ServerToClient::ServerInfo(payload)) => {
                let server_key = *server;
                let server_info = open_server_info(&self.key, &server_key, &payload)?;
                self.state = State::Done;
                Ok(Progress::Done(Established { server_key, server_info }))
            }
            (State::AwaitServerInfo(server), ServerToClient::ServerKey(k)) if k != *server => {
                Err(ClientHandshakeError::KeyMismatch { got: k, expected: *server })
            }
            (State::AwaitServerInfo(_), _) => Ok(Progress::Pending),
            (State::Done, _) => Err(ClientHandshakeError::Finished),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameDecoder, Role};
    use crate::handshake::{open_client_info, seal_server_info};

    fn tailscaled() -> ClientInfo {
        ClientInfo { version: 2, can_ack_pings: true, ..Default::default() }
    }

    /// What a server reads from the bytes the client sends: the claimed key and the info.
    fn server_reads(server: &NodePrivate, bytes: &Bytes) -> (NodePublic, ClientInfo) {
        let mut buf = BytesMut::from(&bytes[..]);
        let f = FrameDecoder::new(Role::Server).decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty(), "exactly one frame");
        let ClientToServer::ClientInfo(p) = ClientToServer::decode(f).unwrap() else {
            panic!("not ClientInfo")
        };
        open_client_info(server, &p).unwrap()
    }

    #[test]
    fn server_key_then_server_info() {
        let (client, server) = (NodePrivate::generate(), NodePrivate::generate());
        let mut hs = ClientHandshake::new(client.clone(), tailscaled());
        assert_eq!(hs.server_key(), None);
        let Progress::Send(out) = hs.feed(ServerToClient::ServerKey(server.public())).unwrap() else {
            panic!("ClientInfo expected")
        };
        let (claimed, info) = server_reads(&server, &out);
        assert_eq!(claimed, client.public());
        assert!(info.can_ack_pings && info.version == 2);
        assert_eq!(hs.server_key(), Some(server.public()));
        assert!(matches!(hs.feed(ServerToClient::KeepAlive).unwrap(), Progress::Pending));
        assert!(matches!(hs.feed(ServerToClient::ServerKey(server.public())).unwrap(), Progress::Pending));
        let si = ServerInfo { token_bucket_bytes_per_second: 7, ..Default::default() };
        let reply = seal_server_info(&server, &client.public(), &si);
        let Progress::Done(up) = hs.feed(ServerToClient::ServerInfo(reply)).unwrap() else { panic!("done") };
        assert_eq!(up, Established { server_key: server.public(), server_info: si });
        assert!(hs.is_done());
        assert!(matches!(hs.feed(ServerToClient::KeepAlive), Err(ClientHandshakeError::Finished)));
    }

    #[test]
    fn first_frame_must_be_server_key() {
        let mut hs = ClientHandshake::new(NodePrivate::generate(), tailscaled());
        let e = hs.feed(ServerToClient::KeepAlive).unwrap_err();
        assert!(matches!(e, ClientHandshakeError::NoServerKey(0x06)), "{e}");
        let mut hs = ClientHandshake::new(NodePrivate::generate(), tailscaled());
        let e = hs.feed(ServerToClient::ServerInfo(Bytes::from_static(&[0; 40]))).unwrap_err();
        assert!(matches!(e, ClientHandshakeError::NoServerKey(0x03)), "{e}");
    }

    #[test]
    fn fast_start_sends_first_and_rejects_another_key() {
        let (client, server) = (NodePrivate::generate(), NodePrivate::generate());
        let (mut hs, out) = ClientHandshake::with_server_key(client.clone(), tailscaled(), server.public());
        assert_eq!(server_reads(&server, &out).0, client.public());
        let other = NodePrivate::generate().public();
        let e = hs.feed(ServerToClient::ServerKey(other)).unwrap_err();
        assert!(
            matches!(e, ClientHandshakeError::KeyMismatch { got, expected } if got == other && expected == server.public())
        );
    }

    #[test]
    fn server_info_from_another_key_does_not_open() {
        let (client, server, impostor) =
            (NodePrivate::generate(), NodePrivate::generate(), NodePrivate::generate());
        let mut hs = ClientHandshake::new(client.clone(), tailscaled());
        hs.feed(ServerToClient::ServerKey(server.public())).unwrap();
        let reply = seal_server_info(&impostor, &client.public(), &ServerInfo::default());
        let e = hs.feed(ServerToClient::ServerInfo(reply)).unwrap_err();
        assert!(matches!(e, ClientHandshakeError::ServerInfo(HandshakeError::BoxOpen(_))), "{e}");
        assert!(!hs.is_done());
    }
}
