//! `tokio_util::codec` adapters for the frame decoder (feature `codec`), so a reader is a
//! `FramedRead`/`Framed` instead of a hand-written "decode or read more" loop.
//!
//! - [`FrameDecoder`] itself is a [`Decoder`] of [`RawFrame`]s (for callers that want the bytes).
//! - [`ClientCodec`]: what a client reads and writes: decodes [`ServerToClient`], encodes
//!   [`ClientToServer`].
//! - [`ServerCodec`]: the other direction, for servers (and test servers): decodes
//!   [`ClientToServer`], encodes [`ServerToClient`].
//!
//! Skipped frames come out as `Ignored(type)`, as the decoder reports them; the caller decides
//! whether to count or drop them. Framing errors are [`CodecError::Frame`]; they end the stream.

use bytes::BytesMut;
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{FrameDecoder, FrameError, RawFrame, Role};
use crate::msg::{ClientToServer, ServerToClient};

/// A framed reader's failure: the transport's, or the bytes'.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// Reading or writing the transport failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The bytes are not valid DERP framing for this reader.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// At the end of the stream: what is left must be whole frames; a cut frame is `UnexpectedEof`
/// (the default would be an untyped "bytes remaining" error).
fn at_eof<T>(got: Option<T>, dec: &FrameDecoder, src: &BytesMut) -> Result<Option<T>, CodecError> {
    match got {
        None if !src.is_empty() || dec.is_skipping() => Err(CodecError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "stream ended inside a DERP frame",
        ))),
        got => Ok(got),
    }
}

impl Decoder for FrameDecoder {
    type Item = RawFrame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, CodecError> {
        Ok(FrameDecoder::decode(self, src)?)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<RawFrame>, CodecError> {
        let got = FrameDecoder::decode(self, src)?;
        at_eof(got, self, src)
    }
}

/// A client's codec: frames from a server in, frames to a server out.
#[derive(Debug)]
pub struct ClientCodec(FrameDecoder);

impl ClientCodec {
    /// A codec with the client role's size limits.
    pub fn new() -> Self {
        Self(FrameDecoder::new(Role::Client))
    }

    /// The frame decoder inside (to decode raw frames from the same buffer).
    pub fn frames(&mut self) -> &mut FrameDecoder {
        &mut self.0
    }
}

impl Default for ClientCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder for ClientCodec {
    type Item = ServerToClient;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ServerToClient>, CodecError> {
        match self.0.decode(src)? {
            Some(f) => Ok(Some(ServerToClient::decode(f)?)),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<ServerToClient>, CodecError> {
        let got = self.decode(src)?;
        at_eof(got, &self.0, src)
    }
}

impl Encoder<ClientToServer> for ClientCodec {
    type Error = CodecError;

    fn encode(&mut self, m: ClientToServer, dst: &mut BytesMut) -> Result<(), CodecError> {
        m.encode(dst);
        Ok(())
    }
}

impl Encoder<&ClientToServer> for ClientCodec {
    type Error = CodecError;

    fn encode(&mut self, m: &ClientToServer, dst: &mut BytesMut) -> Result<(), CodecError> {
        m.encode(dst);
        Ok(())
    }
}

/// A server's codec: frames from a client in, frames to a client out.
#[derive(Debug)]
pub struct ServerCodec(FrameDecoder);

impl ServerCodec {
    /// A codec with the server role's size limits.
    pub fn new() -> Self {
        Self(FrameDecoder::new(Role::Server))
    }
}

impl Default for ServerCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder for ServerCodec {
    type Item = ClientToServer;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ClientToServer>, CodecError> {
        match self.0.decode(src)? {
            Some(f) => Ok(Some(ClientToServer::decode(f)?)),
            None => Ok(None),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<ClientToServer>, CodecError> {
        let got = self.decode(src)?;
        at_eof(got, &self.0, src)
    }
}

impl Encoder<ServerToClient> for ServerCodec {
    type Error = CodecError;

    fn encode(&mut self, m: ServerToClient, dst: &mut BytesMut) -> Result<(), CodecError> {
        m.encode(dst);
        Ok(())
    }
}

impl Encoder<&ServerToClient> for ServerCodec {
    type Error = CodecError;

    fn encode(&mut self, m: &ServerToClient, dst: &mut BytesMut) -> Result<(), CodecError> {
        m.encode(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::NodePrivate;
    use crate::msg::PeerGoneReason;

    #[test]
    fn client_and_server_codecs_round_trip_split_input() {
        let key = NodePrivate::generate().public();
        let mut wire = BytesMut::new();
        let sent = [
            ServerToClient::KeepAlive,
            ServerToClient::RecvPacket { src: key, data: bytes::Bytes::from_static(b"hello") },
            ServerToClient::PeerGone { key, reason: PeerGoneReason::NotHere },
        ];
        let mut server = ServerCodec::new();
        for m in &sent {
            server.encode(m, &mut wire).unwrap();
        }
        let mut client = ClientCodec::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.extend_from_slice(&[b]);
            while let Some(m) = Decoder::decode(&mut client, &mut buf).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, sent);

        let mut up = BytesMut::new();
        client.encode(ClientToServer::NotePreferred(true), &mut up).unwrap();
        assert_eq!(server.decode(&mut up).unwrap(), Some(ClientToServer::NotePreferred(true)));
        assert!(up.is_empty());
    }

    #[test]
    fn a_frame_cut_by_the_end_of_the_stream_is_unexpected_eof() {
        let mut c = ClientCodec::new();
        assert!(c.decode_eof(&mut BytesMut::new()).unwrap().is_none());
        let mut buf = BytesMut::from(&[0x06u8, 0, 0, 0, 0, 0x12, 0, 0][..]);
        assert_eq!(c.decode_eof(&mut buf).unwrap(), Some(ServerToClient::KeepAlive));
        let e = c.decode_eof(&mut buf).unwrap_err();
        assert!(matches!(&e, CodecError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof), "{e}");
    }

    #[test]
    fn framing_errors_surface_as_codec_errors() {
        // A SendPacket shorter than a key, read by a server.
        let mut buf = BytesMut::from(&[0x04u8, 0, 0, 0, 3, 1, 2, 3][..]);
        assert!(matches!(
            ServerCodec::new().decode(&mut buf),
            Err(CodecError::Frame(FrameError::BadLength { .. }))
        ));
        // A frame over 1 MiB, read by a client.
        let mut buf = BytesMut::from(&[0x05u8, 0x00, 0x20, 0, 0][..]);
        assert!(matches!(
            Decoder::decode(&mut FrameDecoder::new(Role::Client), &mut buf),
            Err(CodecError::Frame(_))
        ));
    }
}
