//! The `-listen` HTTP server: `/metrics` (Prometheus text), `/healthz` (`ok`, as derpprobe),
//! `/` (the status page) and `/status.json` (the data the page renders).
//!
//! The page is one self-contained HTML document (inline CSS and script, no external assets, so it
//! works on an isolated network) that fetches `/status.json` and redraws itself every few seconds.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::results::{rfc3339, ProbeRecord, Results};

/// The status page.
pub const STATUS_PAGE: &str = include_str!("status.html");

/// What the handlers read.
#[derive(Clone, Debug)]
pub struct WebState {
    /// The results table.
    pub results: Results,
    /// This probing location's name.
    pub location: String,
}

/// The `/status.json` document.
#[derive(serde::Serialize)]
struct StatusDoc {
    location: String,
    generated_at: String,
    map_error: Option<String>,
    probes: Vec<ProbeRecord>,
}

fn respond(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ctype)
        .header(header::CACHE_CONTROL, "no-store")
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Answers one request.
pub fn handle(state: &WebState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match path {
        "/metrics" | "/debug/varz" => {
            respond(StatusCode::OK, "text/plain; version=0.0.4", crate::metrics::render(&state.results))
        }
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE),
        "/status.json" => {
            let doc = StatusDoc {
                location: state.location.clone(),
                generated_at: rfc3339(SystemTime::now()),
                map_error: state.results.map_error(),
                probes: state.results.snapshot().iter().map(ProbeRecord::of).collect(),
            };
            let body = serde_json::to_vec(&doc).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Binds `addr` (`:8030` means every interface).
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let addr =
        if let Some(port) = addr.strip_prefix(':') { format!("[::]:{port}") } else { addr.to_string() };
    let sa: SocketAddr = addr.parse().map_err(|_| anyhow::anyhow!("-listen {addr:?}: not host:port"))?;
    let l = match TcpListener::bind(sa).await {
        // A host without IPv6: fall back to every IPv4 interface.
        Err(_) if sa.ip().is_unspecified() && sa.is_ipv6() => TcpListener::bind(("0.0.0.0", sa.port())).await,
        r => r,
    };
    l.map_err(|e| anyhow::anyhow!("-listen {addr}: {e}"))
}

/// Serves `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, state: WebState, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = handle(&state, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), svc);
            let _ = conn.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let s = WebState { results: Results::new(), location: "here".into() };
        assert_eq!(handle(&s, &Method::GET, "/healthz").status(), StatusCode::OK);
        assert_eq!(handle(&s, &Method::GET, "/nope").status(), StatusCode::NOT_FOUND);
        assert_eq!(handle(&s, &Method::POST, "/metrics").status(), StatusCode::METHOD_NOT_ALLOWED);
        let page = handle(&s, &Method::GET, "/");
        assert_eq!(page.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(!STATUS_PAGE.contains("http://") && !STATUS_PAGE.contains("https://"), "no external assets");
    }
}
