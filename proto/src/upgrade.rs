//! The HTTP/1.1 upgrade that starts a DERP connection (spec §2.1), with no IO: the request a
//! client writes and the parsing of the response head it reads back.
//!
//! The stream switches to DERP frames right after the response head, so the head is parsed out
//! of the read buffer and [`ResponseHead::len`] says where the frames begin. Everything after the
//! head stays the caller's (a fast-start server may already have sent ServerKey behind the 101).

use crate::consts::{FAST_START_HEADER, IDEAL_NODE_HEADER};

/// Largest response head a client reads before giving up.
pub const MAX_RESPONSE_HEAD: usize = 16 << 10;
/// Most response headers a client accepts (more is a malformed response).
const MAX_RESPONSE_HEADERS: usize = 32;

/// `GET <path>` with `Upgrade: DERP`, as tailscaled sends it.
#[derive(Clone, Debug)]
pub struct UpgradeRequest<'a> {
    /// Request target, normally `/derp`.
    pub path: &'a str,
    /// The `Host` header value (port included when not the scheme's default).
    pub host: &'a str,
    /// The `User-Agent` header value.
    pub user_agent: &'a str,
    /// `Ideal-Node`: the region's first node, sent when connected to another one.
    pub ideal_node: Option<&'a str>,
    /// `Derp-Fast-Start: 1`: ClientInfo follows the request at once and no 101 is awaited.
    pub fast_start: bool,
}

impl UpgradeRequest<'_> {
    /// The request head, ending with the blank line.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut r = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: {}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n",
            self.path, self.host, self.user_agent
        );
        if let Some(n) = self.ideal_node {
            r.push_str(&format!("{IDEAL_NODE_HEADER}: {n}\r\n"));
        }
        if self.fast_start {
            r.push_str(&format!("{FAST_START_HEADER}: 1\r\n"));
        }
        r.push_str("\r\n");
        r.into_bytes()
    }
}

/// `GET <path>` upgrading to a WebSocket with subprotocol `subprotocol` (the browser transport;
/// `key` is the client's `Sec-WebSocket-Key`).
pub fn websocket_request(path: &str, host: &str, user_agent: &str, key: &str, subprotocol: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    )
    .into_bytes()
}

/// Why a response head could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpgradeError {
    /// Not an HTTP/1.x response head.
    #[error("bad HTTP response: {0}")]
    Malformed(String),
    /// No end of the head within [`MAX_RESPONSE_HEAD`] bytes.
    #[error("bad HTTP response: response head too large")]
    TooLarge,
}

/// A parsed response head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes of the head in the buffer (the stream continues after them).
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// Headers in order, names lowercased.
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// True for `101 Switching Protocols`: the DERP (or WebSocket) stream starts after the head.
    pub fn is_upgrade(&self) -> bool {
        self.status == 101
    }

    /// The first header called `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim())
    }

    /// `Content-Length`, when present and a number.
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.parse().ok()
    }
}

/// Parses the response head at the start of `buf`: `Ok(None)` means "read more bytes".
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, UpgradeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(ResponseHead {
            len,
            status: resp.code.unwrap_or(0),
            headers: resp
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                .collect(),
        })),
        Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => Err(UpgradeError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(UpgradeError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let r = UpgradeRequest {
            path: "/derp",
            host: "derp1.example.com",
            user_agent: "ua/1",
            ideal_node: None,
            fast_start: false,
        };
        assert_eq!(
            String::from_utf8(r.to_bytes()).unwrap(),
            "GET /derp HTTP/1.1\r\nHost: derp1.example.com\r\nUser-Agent: ua/1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
        );
        let r = UpgradeRequest { ideal_node: Some("1a"), fast_start: true, ..r };
        assert!(String::from_utf8(r.to_bytes())
            .unwrap()
            .ends_with("Connection: Upgrade\r\nIdeal-Node: 1a\r\nDerp-Fast-Start: 1\r\n\r\n"));
        let ws = String::from_utf8(websocket_request("/derp", "h:8443", "ua/1", "k==", "derp")).unwrap();
        assert!(ws.contains("\r\nUpgrade: websocket\r\n") && ws.contains("\r\nSec-WebSocket-Key: k==\r\n"));
        assert!(ws.ends_with("Sec-WebSocket-Protocol: derp\r\n\r\n"));
    }

    #[test]
    fn response_heads() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nDerp-Version: 2\r\n\r\n\x01\x00";
        for cut in 0..raw.len() - 2 {
            assert_eq!(parse_response_head(&raw[..cut]), Ok(None), "cut at {cut}");
        }
        let h = parse_response_head(raw).unwrap().unwrap();
        assert!(h.is_upgrade());
        assert_eq!(h.len, raw.len() - 2);
        assert_eq!(h.header("DERP-version"), Some("2"));
        let h = parse_response_head(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope!")
            .unwrap()
            .unwrap();
        assert!(!h.is_upgrade());
        assert_eq!((h.status, h.content_length()), (403, Some(5)));
        assert!(matches!(parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n"), Err(UpgradeError::Malformed(_))));
        let mut big = b"HTTP/1.1 101 x\r\n".to_vec();
        big.resize(MAX_RESPONSE_HEAD + 1, b'a');
        assert_eq!(parse_response_head(&big), Err(UpgradeError::TooLarge));
    }
}
