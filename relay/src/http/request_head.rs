//! The first request head of a connection, parsed by hand (`httparse`) so that a fast-start DERP
//! client, which sends its ClientInfo right behind the head and expects no response, can be told
//! apart from ordinary HTTP before anything is answered; and where such a head goes ([`Route`]).

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::http::forwarded;

/// Cap on the first request head we buffer while sniffing.
pub const MAX_HEAD_LEN: usize = 16 << 10;
/// Maximum number of headers in the sniffed request.
const MAX_HEADERS: usize = 100;

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

    pub(crate) fn from_header_map(path: &str, headers: &HeaderMap) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn head_of(bytes: &[u8]) -> Result<Option<(RequestHead, BytesMut, usize)>, HeadError> {
        let mut r = bytes;
        read_request_head(&mut r).await
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
}
