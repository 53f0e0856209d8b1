//! DERP over WebSocket (spec §2.2): subprotocol `derp`, binary messages forming one byte stream.
//!
//! Useful where only HTTP(S) gets through (reverse proxies, some middleboxes). Message boundaries
//! carry no meaning: reads concatenate binary payloads, and each flush of the writer becomes one
//! binary message (the connection's writer flushes once per batch of frames).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Largest message accepted (a DERP frame is ≤ 64 KiB + headers; a server may pack several).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Pending outgoing bytes after which a write sends them before taking more.
const MAX_PENDING: usize = 256 << 10;

/// The `Sec-WebSocket-Protocol` DERP uses.
pub const SUBPROTOCOL: &str = "derp";

/// A fresh `Sec-WebSocket-Key`.
pub fn new_key() -> String {
    tokio_tungstenite::tungstenite::handshake::client::generate_key()
}

/// The `Sec-WebSocket-Accept` a server must answer for `key`.
pub fn accept_for(key: &str) -> String {
    tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes())
}

/// Bounded messages, no compression (tungstenite never negotiates it), and small buffers: the
/// defaults (128 KiB each way) made an idle WebSocket connection cost the relay ~148 KiB. Writes
/// need no buffer of tungstenite's because [`WsBytes`] already sends one message per flush. The read
/// buffer is zero-filled, so all of it stays resident: 4 KiB rather than 8 saves 4 KiB per idle
/// connection at no measured CPU cost (BENCHMARKS.md).
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .read_buffer_size(4 << 10)
        .write_buffer_size(0)
}

/// `AsyncRead + AsyncWrite` over a WebSocket's binary messages.
pub struct WsBytes<S> {
    ws: WebSocketStream<S>,
    rd: Bytes,
    wr: BytesMut,
    eof: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsBytes<S> {
    /// Wraps a connection whose HTTP upgrade is done; `already_read` holds bytes read past the
    /// response head (WebSocket frames the server sent right after its 101).
    pub async fn new(io: S, role: Role, already_read: Vec<u8>) -> Self {
        let ws = WebSocketStream::from_partially_read(io, already_read, role, Some(config())).await;
        Self { ws, rd: Bytes::new(), wr: BytesMut::new(), eof: false }
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.wr.is_empty() {
            ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io::Error::other)?;
            let m = Message::Binary(self.wr.split().freeze());
            Pin::new(&mut self.ws).start_send(m).map_err(io::Error::other)?;
        }
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io::Error::other)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.rd.is_empty() {
                let n = this.rd.len().min(buf.remaining());
                buf.put_slice(&this.rd[..n]);
                this.rd.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => this.eof = true,
                Some(Ok(Message::Binary(b))) => this.rd = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message",
                    )))
                }
                Some(Ok(_)) => {} // ping/pong (tungstenite answers pings), raw frames
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.wr.len() >= MAX_PENDING {
            ready!(self.poll_send(cx))?;
        }
        let n = data.len().min(MAX_PENDING);
        self.wr.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.ws).poll_close(cx).map_err(io::Error::other)
    }
}
