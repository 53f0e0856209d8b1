//! A WebSocket connection (subprotocol `derp`) as a plain DERP byte stream (spec §2.2).
//!
//! Browsers (js/wasm clients) cannot open raw sockets, so they carry the DERP byte stream in
//! binary WebSocket messages. Message boundaries mean nothing: a DERP frame may span messages and
//! one message may hold several frames. Reads concatenate binary payloads; every writer flush
//! becomes one binary message (the core flushes once per batch of frames).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The largest WebSocket message (and frame) accepted from a client. DERP frames are at most
/// 64 KiB plus headers; the cap bounds memory per connection while leaving room for clients that
/// pack several frames into one message.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Buffered outgoing bytes beyond which a write first flushes them as a message, so a writer that
/// never flushes cannot grow the buffer without bound.
const MAX_PENDING_WRITE: usize = 256 << 10;

/// The WebSocket settings for DERP: bounded message sizes, no compression (tungstenite never
/// negotiates permessage-deflate).
pub fn config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE_SIZE)).max_frame_size(Some(MAX_MESSAGE_SIZE))
}

/// Turns an upgraded server-side connection (the 101 already written) into a DERP byte stream.
pub async fn server_byte_stream<S>(io: S) -> WsByteStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    WsByteStream::new(WebSocketStream::from_raw_socket(io, Role::Server, Some(config())).await)
}

/// `AsyncRead + AsyncWrite` over binary WebSocket messages.
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    read_buf: Bytes,
    write_buf: BytesMut,
    read_done: bool,
}

impl<S> WsByteStream<S> {
    /// Wraps an established WebSocket.
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self { ws, read_buf: Bytes::new(), write_buf: BytesMut::new(), read_done: false }
    }
}

fn ws_err(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsByteStream<S> {
    /// Sends the buffered bytes as one binary message (if any) and flushes the socket.
    fn poll_send_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_buf.is_empty() {
            ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(ws_err)?;
            let msg = Message::Binary(self.write_buf.split().freeze());
            Pin::new(&mut self.ws).start_send(msg).map_err(ws_err)?;
        }
        Pin::new(&mut self.ws).poll_flush(cx).map_err(ws_err)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.read_buf.is_empty() {
                let n = this.read_buf.len().min(buf.remaining());
                buf.put_slice(&this.read_buf[..n]);
                this.read_buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => this.read_done = true,
                Some(Ok(Message::Binary(b))) => this.read_buf = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text message on a DERP WebSocket (binary expected)",
                    )));
                }
                // Pings are answered by tungstenite itself; pongs and raw frames carry no data.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.write_buf.len() >= MAX_PENDING_WRITE {
            ready!(self.poll_send_pending(cx))?;
        }
        let n = data.len().min(MAX_PENDING_WRITE);
        self.write_buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_pending(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_pending(cx))?;
        Pin::new(&mut self.ws).poll_close(cx).map_err(ws_err)
    }
}
