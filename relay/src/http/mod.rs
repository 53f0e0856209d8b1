//! Accepting a connection: the first request is sniffed by hand, everything else is hyper's.
//!
//! Why sniff: a fast-start DERP client (spec §2.1) writes `GET /derp` and its ClientInfo in one
//! segment and expects **no** HTTP response, which no HTTP server library offers. So the first
//! request head is parsed here ([`request_head`]: `httparse`, at most [`MAX_HEAD_LEN`], within the
//! 10 s handshake budget). A DERP upgrade is answered here and the stream, with the bytes read past
//! the head still readable ([`PrefixedIo`]), goes to the DERP core
//! ([`DerpServer::accept`](crate::core::derp_server::DerpServer::accept)). Any other request goes,
//! with those bytes, to hyper's HTTP/1.1 server ([`serve_http`], answered by [`routes`]), which also
//! handles DERP upgrades on later keep-alive requests (without fast start). HTTP/2 is never spoken.

mod context;
pub mod forwarded;
mod prefixed_io;
pub mod proxy_protocol;
mod request_head;
mod responses;
mod routes;
pub mod shutdown_watch;
pub mod tls;
pub(crate) mod websocket;

pub use context::{HomePage, HttpContext};
pub use prefixed_io::PrefixedIo;
pub use request_head::{read_request_head, HeadError, RequestHead, Route, MAX_HEAD_LEN};
pub use routes::debug_allowed;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Buf;
use derpfleet_proto::consts::HANDSHAKE_TIMEOUT;
use derpfleet_proto::NodePublic;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::core::derp_server::ConnInfo;
use crate::http::routes::{route_request, Port};
use crate::http::shutdown_watch::ShutdownWatch;

/// How long hyper waits for the head of a later keep-alive request (derper: 30 s read timeout).
const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one accepted connection (plain TCP or TLS) on the main port until it closes. `watch`
/// is told when the DERP core takes the connection over (see [`ShutdownWatch`]).
///
/// Two phases, each in its own allocation: the sniff (read the request head, answer the upgrade)
/// is boxed and freed when it ends, and then the connection's path is boxed on its own. A future
/// is as large as its largest state, so inline the sniff's room, the raw DERP session's and the
/// WebSocket session's would all size this one future, and every connection would carry the
/// largest of them for its whole life; this way an idle connection holds only its own path.
pub async fn serve_connection<S>(io: S, remote: SocketAddr, ctx: Arc<HttpContext>, watch: &ShutdownWatch)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // A plain TCP socket lets other connections' readers write to it directly.
    let fd = (&io as &dyn std::any::Any)
        .downcast_ref::<tokio::net::TcpStream>()
        .map(std::os::fd::AsRawFd::as_raw_fd);
    let Some(next) = Box::pin(sniff(io, remote, &ctx)).await else { return };
    match next {
        Sniffed::RawDerp(io, info) => {
            watch.hand_to_derp();
            Box::pin(ctx.derp.accept_direct(io, info, fd)).await
        }
        Sniffed::WebSocketDerp(io, info) => Box::pin(serve_websocket_derp(io, ctx, info, watch)).await,
        Sniffed::Http(io) => Box::pin(serve_http(io, remote, ctx, Port::Main)).await,
    }
}

/// Where a sniffed connection goes next, with the bytes read past its request head.
enum Sniffed<S> {
    /// The 101 is written (unless fast start): DERP frames follow.
    RawDerp(PrefixedIo<S>, ConnInfo),
    /// The WebSocket 101 is written.
    WebSocketDerp(PrefixedIo<S>, ConnInfo),
    /// Ordinary HTTP: the request head is still in the prefix, for the HTTP server.
    Http(PrefixedIo<S>),
}

/// Reads the request head and answers a DERP upgrade; None when the connection is done (closed,
/// rejected, timed out).
async fn sniff<S>(mut io: S, remote: SocketAddr, ctx: &HttpContext) -> Option<Sniffed<S>>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_request_head(&mut io)).await {
        Ok(Ok(Some(first))) => first,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "bad first request: {e}");
            reject(&mut io).await;
            return None;
        }
        Err(_) => {
            tracing::debug!(%remote, "{}", HeadError::Timeout(HANDSHAKE_TIMEOUT));
            return None;
        }
    };
    let (head, mut buf, head_len) = first;
    // The DERP routes take the proxied client's address; ordinary HTTP (debug pages) keeps the peer's.
    let client = forwarded::client_addr(remote, &head.forwarded, &ctx.forwarded);
    let info = ConnInfo { remote: client, not_ideal: head.ideal_node };
    match head.route(ctx.derp_enabled) {
        Route::RawDerp => {
            buf.advance(head_len);
            if !head.fast_start {
                let resp = derp_101(&ctx.server_public);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, write_and_flush(&mut io, resp.as_bytes())).await
                {
                    Ok(Ok(())) => {}
                    _ => return None,
                }
            }
            tracing::debug!(remote = %client, fast_start = head.fast_start, "DERP upgrade");
            Some(Sniffed::RawDerp(PrefixedIo::new(buf.freeze(), io), info))
        }
        Route::WebSocketDerp => {
            let Some(key) = head.ws_key.as_deref() else {
                reject(&mut io).await;
                return None;
            };
            buf.advance(head_len);
            // Counted before the 101 goes out, so anyone who saw the 101 also sees the count.
            ctx.derp.metrics().websocket_accepts.increment(1);
            let resp = websocket_101(key);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, write_and_flush(&mut io, resp.as_bytes())).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
            tracing::debug!(remote = %client, "DERP WebSocket upgrade");
            Some(Sniffed::WebSocketDerp(PrefixedIo::new(buf.freeze(), io), info))
        }
        Route::Http => Some(Sniffed::Http(PrefixedIo::new(buf.freeze(), io))),
    }
}

/// DERP over WebSocket on an upgraded connection.
async fn serve_websocket_derp<S>(
    io: PrefixedIo<S>,
    ctx: Arc<HttpContext>,
    info: ConnInfo,
    watch: &ShutdownWatch,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // Boxed: the session keeps only a pointer to the WebSocket state (~0.4 KB) instead of room
    // for a copy in this future and another in the session's.
    let ws = Box::new(websocket::server_byte_stream(io).await);
    watch.hand_to_derp();
    ctx.derp.accept(ws, info).await;
}

/// Serves one connection on the plain-HTTP port (`-http-port`, only when TLS is on).
pub async fn serve_port80_connection<S>(io: S, remote: SocketAddr, ctx: Arc<HttpContext>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    serve_http(io, remote, ctx, Port::Http80).await;
}

/// Answers 400 and closes, giving a peer that does not read at most a second.
async fn reject<S: AsyncWrite + Unpin>(io: &mut S) {
    let bye = async {
        write_and_flush(io, b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .await?;
        io.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
}

async fn write_and_flush<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}

/// The exact 101 response derper writes for a raw DERP upgrade.
pub fn derp_101(server_public: &NodePublic) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\n\
         Derp-Public-Key: {}\r\n\r\n",
        server_public.to_hex()
    )
}

fn websocket_101(key: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: derp\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
}

/// Serves HTTP/1.1 requests with hyper until the connection closes.
async fn serve_http<S>(io: S, remote: SocketAddr, ctx: Arc<HttpContext>, port: Port)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(route_request(req, remote, &ctx, port)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HTTP_HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%remote, "HTTP connection ended: {e}");
    }
}
