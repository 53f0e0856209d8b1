//! Accepting a connection: the first request is sniffed by hand, everything else is hyper's.
//!
//! Why sniff: a fast-start DERP client (spec §2.1) writes `GET /derp` and its ClientInfo in one
//! segment and expects **no** HTTP response, which no HTTP server library offers. So the first
//! request head is parsed here (`httparse`, at most [`MAX_HEAD_LEN`], within the 10 s handshake
//! budget). A DERP upgrade is answered here and the stream, with the bytes read past the head
//! still readable ([`PrefixedIo`]), goes to [`DerpServer::accept`]. Any other request goes, with
//! those bytes, to hyper's HTTP/1.1 server ([`serve_http`]), which also handles DERP upgrades on
//! later keep-alive requests (without fast start). HTTP/2 is never spoken.

pub mod forwarded;
pub mod proxy_protocol;
pub mod shutdown_watch;
pub mod tls;
pub(crate) mod websocket;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use derpfleet_proto::consts::HANDSHAKE_TIMEOUT;
use derpfleet_proto::NodePublic;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::derp_server::{ConnInfo, DerpServer};
use crate::http::shutdown_watch::ShutdownWatch;

/// Cap on the first request head we buffer while sniffing.
pub const MAX_HEAD_LEN: usize = 16 << 10;
/// Maximum number of headers in the sniffed request.
const MAX_HEADERS: usize = 100;
/// How long hyper waits for the head of a later keep-alive request (derper: 30 s read timeout).
const HTTP_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What `/` serves (`-home`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HomePage {
    /// The built-in HTML page.
    Default,
    /// An empty 200.
    Blank,
    /// A 302 to this URL.
    Redirect(String),
}

impl HomePage {
    /// Parses derper's `-home` value: `""`, `blank`, or an `http://`/`https://` URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" => Ok(Self::Default),
            "blank" => Ok(Self::Blank),
            u if u.starts_with("http://") || u.starts_with("https://") => Ok(Self::Redirect(u.to_owned())),
            other => Err(format!("unknown -home value {other:?}: use \"\", \"blank\" or an http(s) URL")),
        }
    }
}

/// Everything the HTTP layer needs to answer requests; shared by all connections.
pub struct HttpContext {
    /// The DERP core that takes upgraded connections.
    pub derp: Arc<DerpServer>,
    /// The server's public key (the `Derp-Public-Key` header).
    pub server_public: NodePublic,
    /// What `/` serves.
    pub home: HomePage,
    /// `-derp=false` serves `/derp` as 404.
    pub derp_enabled: bool,
    /// Owns the tasks that serve connections upgraded through hyper (they outlive the request).
    pub tasks: TaskTracker,
    /// Stops those tasks at shutdown.
    pub cancel: CancellationToken,
    /// `/healthz` and the metrics text of `/debug/varz`.
    pub status: Arc<crate::ops::metrics_http::Status>,
    /// `/bootstrap-dns` (on every port, whether or not DERP is served).
    pub bootstrap_dns: Arc<crate::ops::bootstrap_dns::BootstrapDns>,
    /// L7 proxies whose forwarding header is believed (`-forwarded-trusted`, `-forwarded-header`).
    pub forwarded: forwarded::ForwardedTrust,
    /// ACME: HTTP-01 challenge answers on the plain-HTTP port.
    pub acme: Option<Arc<crate::ops::acme::AcmeTask>>,
}

/// Why the first request could not be read; the connection is closed.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("reading the request: {0}")]
    Io(#[from] io::Error),
    #[error("no complete request head within {0:?}")]
    Timeout(Duration),
    #[error("request head larger than {MAX_HEAD_LEN} bytes")]
    TooLarge,
    #[error("connection closed inside the request head")]
    Truncated,
    #[error("malformed request head: {0}")]
    Malformed(httparse::Error),
}

/// The parts of a request head that decide its route.
#[derive(Debug, Default, Clone)]
pub struct RequestHead {
    /// Request path without the query.
    pub path: String,
    /// `Upgrade` header, lowercased.
    pub upgrade: Option<String>,
    /// `Sec-WebSocket-Protocol` header value(s).
    pub ws_protocols: Option<String>,
    /// `Sec-WebSocket-Key` header.
    pub ws_key: Option<String>,
    /// `Derp-Fast-Start: 1` present.
    pub fast_start: bool,
    /// `Ideal-Node` header present.
    pub ideal_node: bool,
    /// `Forwarded` / `X-Forwarded-For` values ([`forwarded::client_addr`]).
    pub forwarded: forwarded::ForwardedHeaders,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/derp` with `Upgrade: DERP`, or legacy `Upgrade: websocket` without the `derp` subprotocol.
    RawDerp,
    /// `/derp` with `Upgrade: websocket` and subprotocol `derp`.
    WebSocketDerp,
    /// Anything else: ordinary HTTP.
    Http,
}

impl RequestHead {
    fn from_headers<'a>(path: &str, headers: impl Iterator<Item = (&'a str, &'a [u8])>) -> Self {
        // An absolute-form target (`POST https://host/derp`, as some clients send) routes by its path.
        let path = match path.split_once("://") {
            Some((scheme, rest))
                if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") =>
            {
                rest.find('/').map_or("/", |i| &rest[i..])
            }
            _ => path,
        };
        let mut head =
            RequestHead { path: path.split('?').next().unwrap_or("").to_owned(), ..Default::default() };
        for (name, value) in headers {
            let text = || String::from_utf8_lossy(value).trim().to_owned();
            if name.eq_ignore_ascii_case("upgrade") {
                head.upgrade = Some(text().to_ascii_lowercase());
            } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
                let v = text();
                head.ws_protocols = Some(match head.ws_protocols.take() {
                    Some(prev) => format!("{prev}, {v}"),
                    None => v,
                });
            } else if name.eq_ignore_ascii_case("sec-websocket-key") {
                head.ws_key = Some(text());
            } else if name.eq_ignore_ascii_case(derpfleet_proto::consts::FAST_START_HEADER) {
                head.fast_start = text() == "1";
            } else if name.eq_ignore_ascii_case(derpfleet_proto::consts::IDEAL_NODE_HEADER) {
                head.ideal_node = true;
            } else {
                head.forwarded.collect(name, value);
            }
        }
        head
    }

    fn from_header_map(path: &str, headers: &HeaderMap) -> Self {
        Self::from_headers(path, headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())))
    }

    /// Where this request goes (derper's `Handler` plus `AddWebSocketSupport`). A `/derp` request
    /// with no or another upgrade is [`Route::Http`], which answers 426.
    pub fn route(&self, derp_enabled: bool) -> Route {
        if !derp_enabled || self.path != "/derp" {
            return Route::Http;
        }
        match self.upgrade.as_deref() {
            Some("websocket") if self.ws_protocols.as_deref().is_some_and(|p| p.contains("derp")) => {
                Route::WebSocketDerp
            }
            Some("derp") | Some("websocket") => Route::RawDerp,
            _ => Route::Http,
        }
    }
}

/// Reads until a complete request head is buffered. Returns `Ok(None)` if the peer closed
/// before sending anything. The returned buffer holds the head and any bytes after it.
pub async fn read_request_head<S>(io: &mut S) -> Result<Option<(RequestHead, BytesMut, usize)>, HeadError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = BytesMut::with_capacity(2048);
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let head = RequestHead::from_headers(
                        req.path.unwrap_or(""),
                        req.headers.iter().map(|h| (h.name, h.value)),
                    );
                    return Ok(Some((head, buf, head_len)));
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(HeadError::Malformed(e)),
            }
        }
        if buf.len() >= MAX_HEAD_LEN {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(2048.min(MAX_HEAD_LEN - buf.len()));
        let room = MAX_HEAD_LEN - buf.len();
        let n = (&mut *io).take(room as u64).read_buf(&mut buf).await?;
        if n == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(HeadError::Truncated) };
        }
    }
}

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

/// Which listener a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Port {
    /// The `-a` port (TLS or plain).
    Main,
    /// The plain-HTTP port next to a TLS main port.
    Http80,
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

type Resp = Response<Full<Bytes>>;

fn route_request(req: Request<Incoming>, remote: SocketAddr, ctx: &Arc<HttpContext>, port: Port) -> Resp {
    if req.method() == Method::CONNECT {
        // derper's experimental CONNECT proxy (`-ace`) is not offered.
        return plain_error(StatusCode::FORBIDDEN, "CONNECT not allowed");
    }
    let path = req.uri().path().to_owned();
    if path == "/generate_204" {
        return generate_204(req.headers());
    }
    if path.starts_with("/debug") {
        return debug(&req, remote, ctx);
    }
    if path == "/bootstrap-dns" {
        return with_browser_headers(ctx.bootstrap_dns.response(req.uri().query(), remote));
    }
    if port == Port::Http80 {
        if let (Some(acme), true) = (&ctx.acme, path.starts_with(crate::ops::acme::HTTP01_PREFIX)) {
            return match acme.http01_response(&path) {
                Some(body) => text_owned("text/plain", body),
                None => plain_error(StatusCode::NOT_FOUND, "404 page not found"),
            };
        }
        return port80(&req);
    }
    match path.as_str() {
        "/derp/probe" | "/derp/latency-check" => probe(req.method()),
        "/healthz" => crate::ops::metrics_http::healthz_response(&ctx.status),
        "/derp" if ctx.derp_enabled => derp_upgrade_via_hyper(req, remote, ctx),
        "/derp" => plain_error(StatusCode::NOT_FOUND, "derp server disabled"),
        "/robots.txt" => with_browser_headers(text(
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "User-agent: *\nDisallow: /\n",
        )),
        "/" => with_browser_headers(home(&ctx.home)),
        _ => plain_error(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// A `/derp` request that is not the connection's first: upgrade through hyper (no fast start
/// possible here, the 101 is always sent), or 426 without an upgrade header.
fn derp_upgrade_via_hyper(mut req: Request<Incoming>, remote: SocketAddr, ctx: &Arc<HttpContext>) -> Resp {
    let head = RequestHead::from_header_map(req.uri().path(), req.headers());
    let route = head.route(true);
    if route == Route::Http {
        return plain_error(StatusCode::UPGRADE_REQUIRED, "DERP requires connection upgrade");
    }
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if route == Route::WebSocketDerp {
        let Some(key) = head.ws_key.as_deref() else {
            return plain_error(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
        };
        ctx.derp.metrics().websocket_accepts.increment(1);
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("derp"));
        if let Ok(v) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
            h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
    } else {
        h.insert(header::UPGRADE, HeaderValue::from_static("DERP"));
        h.insert("Derp-Version", HeaderValue::from_static("2"));
        if let Ok(v) = HeaderValue::from_str(&ctx.server_public.to_hex()) {
            h.insert("Derp-Public-Key", v);
        }
    }
    let remote = forwarded::client_addr(remote, &head.forwarded, &ctx.forwarded);
    let info = ConnInfo { remote, not_ideal: head.ideal_node };
    let derp = ctx.derp.clone();
    let on_upgrade = hyper::upgrade::on(&mut req);
    // The task ends when the DERP connection ends, or at shutdown.
    let cancel = ctx.cancel.clone();
    ctx.tasks.spawn(async move {
        let upgraded = tokio::select! {
            _ = cancel.cancelled() => return,
            u = on_upgrade => u,
        };
        let watch = ShutdownWatch::new();
        let serve = std::pin::pin!(async {
            match upgraded {
                Ok(upgraded) if route == Route::WebSocketDerp => {
                    let ws = websocket::server_byte_stream(TokioIo::new(upgraded)).await;
                    watch.hand_to_derp();
                    derp.accept(ws, info).await;
                }
                Ok(upgraded) => {
                    watch.hand_to_derp();
                    derp.accept(TokioIo::new(upgraded), info).await
                }
                Err(e) => tracing::debug!(%remote, "upgrade failed: {e}"),
            }
        });
        watch.run(&cancel, serve).await;
    });
    resp
}

fn probe(method: &Method) -> Resp {
    if method == Method::GET || method == Method::HEAD {
        let mut r = Response::new(Full::new(Bytes::new()));
        r.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        r
    } else {
        plain_error(StatusCode::METHOD_NOT_ALLOWED, "bogus probe method")
    }
}

/// The captive-portal check: 204, and the challenge echoed only if it is short and plain.
fn generate_204(headers: &HeaderMap) -> Resp {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    if let Some(ch) = headers.get("X-Tailscale-Challenge") {
        let ch = ch.as_bytes();
        let ok = !ch.is_empty()
            && ch.len() <= 64
            && ch.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'));
        if ok {
            if let Ok(v) = HeaderValue::from_bytes(&[b"response ", ch].concat()) {
                r.headers_mut().insert("X-Tailscale-Response", v);
            }
        }
    }
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, no-store, must-revalidate, no-transform, max-age=0"),
    );
    r
}

/// The plain-HTTP port: DERP is never spoken here; browsers are sent to HTTPS.
fn port80(req: &Request<Incoming>) -> Resp {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return plain_error(StatusCode::BAD_REQUEST, "Use HTTPS");
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let target = format!("https://{host}{path}");
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    match HeaderValue::from_str(&target) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
            r
        }
        Err(_) => plain_error(StatusCode::BAD_REQUEST, "bad Host header"),
    }
}

/// Debug pages are for the operator on the machine itself: loopback clients only, and never
/// through a proxy (`X-Forwarded-For` present), as derper.
pub fn debug_allowed(remote: SocketAddr, headers: &HeaderMap) -> bool {
    let ip = match remote.ip() {
        std::net::IpAddr::V6(v6) => {
            v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(std::net::IpAddr::V6(v6))
        }
        v4 => v4,
    };
    ip.is_loopback() && !headers.contains_key("x-forwarded-for")
}

/// `/debug/`, `/debug/vars` (derper's expvar JSON) and `/debug/varz` (Prometheus text).
fn debug(req: &Request<Incoming>, remote: SocketAddr, ctx: &HttpContext) -> Resp {
    if !debug_allowed(remote, req.headers()) {
        return plain_error(StatusCode::FORBIDDEN, "debug access denied");
    }
    match req.uri().path() {
        "/debug" | "/debug/" => {
            text_owned("text/html; charset=utf-8", crate::ops::debug_vars::index(&ctx.status))
        }
        "/debug/vars" => text_owned(
            "application/json; charset=utf-8",
            crate::ops::debug_vars::vars(
                &ctx.status,
                &ctx.bootstrap_dns,
                ctx.derp.options().recv_rate.as_ref().is_some_and(|r| r.get().is_some()),
            ),
        ),
        "/debug/varz" => {
            let mut r = Response::new(Full::new(Bytes::from(ctx.status.render_metrics())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => plain_error(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

const HOME_HTML: &str =
    "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>DERP</title></head><body>\n\
<h1>DERP</h1>\n<p>This is a Tailscale DERP server (derpfleet-relay).</p>\n\
<p>It relays encrypted WireGuard packets between Tailscale nodes that cannot reach each other directly.</p>\n\
</body></html>\n";

fn home(home: &HomePage) -> Resp {
    match home {
        HomePage::Default => text(StatusCode::OK, "text/html; charset=utf-8", HOME_HTML),
        HomePage::Blank => Response::new(Full::new(Bytes::new())),
        HomePage::Redirect(url) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::FOUND;
            if let Ok(v) = HeaderValue::from_str(url) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
    }
}

/// Headers derper puts on pages a browser may render.
fn with_browser_headers(mut r: Resp) -> Resp {
    let h = r.headers_mut();
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=63072000; includeSubDomains"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; frame-ancestors 'none'; form-action 'none'; base-uri 'none'; \
             style-src 'unsafe-inline'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

fn text_owned(content_type: &'static str, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, content_type: &'static str, body: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Like Go's `http.Error`: text/plain, `nosniff`, the message plus a newline.
fn plain_error(status: StatusCode, msg: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(format!("{msg}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// A stream whose first reads return `prefix` (bytes already read from `inner` while sniffing).
///
/// The prefix is a slice of the sniffing buffer (2 KiB): once it is read (or if it starts empty)
/// it is dropped, so a long-lived connection does not keep that buffer pinned.
pub struct PrefixedIo<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> PrefixedIo<S> {
    /// Wraps `inner` so that `prefix` is read first.
    pub fn new(prefix: Bytes, inner: S) -> Self {
        let prefix = if prefix.is_empty() { Bytes::new() } else { prefix };
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefixedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefixedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn head_of(bytes: &[u8]) -> Result<Option<(RequestHead, BytesMut, usize)>, HeadError> {
        let mut r = bytes;
        read_request_head(&mut r).await
    }

    #[tokio::test]
    async fn prefixed_io_reads_the_prefix_then_the_stream_and_releases_the_sniff_buffer() {
        use tokio::io::AsyncReadExt;
        let sniff = Bytes::from(vec![9u8; 2048]);
        let keep = sniff.clone();
        let prefix = sniff.slice(2040..);
        drop(sniff);
        let mut io = PrefixedIo::new(prefix, &b"after"[..]);
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"\x09\x09\x09\x09\x09\x09\x09\x09after");
        assert!(keep.is_unique(), "the connection still pins the sniff buffer");

        // An empty prefix (nothing read past the head) holds nothing from the start.
        let mut sniff = Bytes::from(vec![9u8; 2048]);
        let keep = sniff.clone();
        sniff.advance(2048);
        let _io = PrefixedIo::new(sniff, &b""[..]);
        assert!(keep.is_unique());
    }

    #[tokio::test]
    async fn sniffs_fast_start_with_trailing_bytes() {
        let req = b"GET /derp?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
                    Derp-Fast-Start: 1\r\nIdeal-Node: n1\r\n\r\n\x02\x00\x00";
        let (head, buf, len) = head_of(req).await.unwrap().unwrap();
        assert_eq!(head.path, "/derp");
        assert!(head.fast_start && head.ideal_node);
        assert_eq!(head.route(true), Route::RawDerp);
        assert_eq!(head.route(false), Route::Http);
        assert_eq!(&buf[len..], b"\x02\x00\x00");
    }

    #[tokio::test]
    async fn routes_websocket_by_subprotocol() {
        let ws = b"GET /derp HTTP/1.1\r\nUpgrade: WebSocket\r\nSec-WebSocket-Protocol: derp\r\n\r\n";
        assert_eq!(head_of(ws).await.unwrap().unwrap().0.route(true), Route::WebSocketDerp);
        let legacy = b"GET /derp HTTP/1.1\r\nUpgrade: WebSocket\r\n\r\n";
        assert_eq!(head_of(legacy).await.unwrap().unwrap().0.route(true), Route::RawDerp);
        let other = b"GET /derp HTTP/1.1\r\nUpgrade: h2c\r\n\r\n";
        assert_eq!(head_of(other).await.unwrap().unwrap().0.route(true), Route::Http);
        let absolute = b"POST https://127.0.0.1:1/derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n";
        assert_eq!(head_of(absolute).await.unwrap().unwrap().0.route(true), Route::RawDerp);
        let probe = b"GET /derp/probe HTTP/1.1\r\nUpgrade: DERP\r\n\r\n";
        assert_eq!(head_of(probe).await.unwrap().unwrap().0.route(true), Route::Http);
    }

    #[tokio::test]
    async fn bad_heads_are_errors() {
        assert!(head_of(b"").await.unwrap().is_none());
        assert!(matches!(head_of(b"GET / HTTP/1.1\r\nHost").await, Err(HeadError::Truncated)));
        assert!(matches!(head_of(b"\x00\x01garbage\r\n\r\n").await, Err(HeadError::Malformed(_))));
        let big = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; MAX_HEAD_LEN]].concat();
        assert!(matches!(head_of(&big).await, Err(HeadError::TooLarge)));
    }

    #[test]
    fn debug_access_is_loopback_only_and_never_proxied() {
        let mut h = HeaderMap::new();
        assert!(debug_allowed("127.0.0.1:1".parse().unwrap(), &h));
        assert!(debug_allowed("[::1]:1".parse().unwrap(), &h));
        assert!(debug_allowed("[::ffff:127.0.0.1]:1".parse().unwrap(), &h));
        assert!(!debug_allowed("192.0.2.1:1".parse().unwrap(), &h));
        assert!(!debug_allowed("[2001:db8::1]:1".parse().unwrap(), &h));
        h.insert("X-Forwarded-For", HeaderValue::from_static("127.0.0.1"));
        assert!(!debug_allowed("127.0.0.1:1".parse().unwrap(), &h));
    }

    #[test]
    fn home_values() {
        assert_eq!(HomePage::parse(""), Ok(HomePage::Default));
        assert_eq!(HomePage::parse("blank"), Ok(HomePage::Blank));
        assert_eq!(HomePage::parse("https://x.y/"), Ok(HomePage::Redirect("https://x.y/".into())));
        assert!(HomePage::parse("ftp://x").is_err());
    }
}
