//! DERP over WebSocket (spec §2.2) for the lean connections: the `derp` subprotocol, binary
//! messages carrying a byte stream (a frame may span messages, a message may hold several).
//! [`WsStream`] turns the message stream back into `AsyncRead`/`AsyncWrite`: each write becomes
//! one binary message, and reads return message bytes in order.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream as _};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::lean::Stream;

/// A WebSocket connection seen as a byte stream.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
}

/// Performs the WebSocket upgrade for `path` on `host` over `io` (already TLS-wrapped if needed).
pub async fn upgrade<S: Stream>(io: S, host_header: &str, path: &str) -> anyhow::Result<WsStream<S>> {
    let mut req = format!("ws://{host_header}{path}").into_client_request()?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("derp"));
    // tungstenite's default 128 KiB read buffer per connection would dominate an idle-connection
    // test; DERP frames are small and the adapter copies out of each message anyway.
    let cfg = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (ws, _resp) = tokio_tungstenite::client_async_with_config(req, io, Some(cfg)).await?;
    Ok(WsStream { ws, pending: Bytes::new() })
}

fn to_io(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl<S: Stream> AsyncRead for WsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(out.remaining());
                out.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(b))) => self.pending = b,
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(_)) => continue, // pings are answered by tungstenite; text is not DERP
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: Stream> AsyncWrite for WsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut self.ws).start_send(Message::Binary(Bytes::copy_from_slice(buf))).map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(to_io)
    }
}
