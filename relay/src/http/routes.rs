//! The HTTP routes hyper serves: probes, `/generate_204`, `/bootstrap-dns`, `/healthz`, debug
//! pages, the home page, the plain-HTTP port's redirect and ACME answers, and DERP upgrades on a
//! later keep-alive request (the first request's upgrade is answered while sniffing, in `http`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::core::derp_server::ConnInfo;
use crate::http::context::{HomePage, HttpContext};
use crate::http::forwarded;
use crate::http::request_head::{RequestHead, Route};
use crate::http::responses::{plain_error, text, text_owned, with_browser_headers, Resp};
use crate::http::shutdown_watch::ShutdownWatch;
use crate::http::websocket;

/// Which listener a request arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Port {
    /// The `-a` port (TLS or plain).
    Main,
    /// The plain-HTTP port next to a TLS main port.
    Http80,
}

/// Answers one request that hyper parsed.
pub(crate) fn route_request(
    req: Request<Incoming>,
    remote: SocketAddr,
    ctx: &Arc<HttpContext>,
    port: Port,
) -> Resp {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
