//! The metrics listener (`-metrics-addr`, default `127.0.0.1:9090`): `/metrics` (Prometheus text:
//! the DERP core's series followed by the process series) and `/healthz` (also on the main port),
//! plus the rate-limited drop log.
//!
//! `/healthz` answers `200 {"status":"ok","version":"…","connections":N,"uptime_seconds":S}`, and
//! `503` with `"status":"draining"` once a graceful shutdown began, so a load balancer stops
//! sending new clients before the process goes away.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::derp_server::DerpServer;
use crate::core::metrics::{DropReason, PacketKind};
use crate::ops::ops_metrics::OpsMetrics;

/// What `/metrics` and `/healthz` report.
#[derive(Debug)]
pub struct Status {
    /// The DERP core.
    pub derp: Arc<DerpServer>,
    /// Process-level series.
    pub ops: Arc<OpsMetrics>,
    /// Set when a graceful shutdown begins.
    pub draining: AtomicBool,
}

impl Status {
    /// A status source for `derp` and `ops`, not draining.
    pub fn new(derp: Arc<DerpServer>, ops: Arc<OpsMetrics>) -> Arc<Self> {
        Arc::new(Self { derp, ops, draining: AtomicBool::new(false) })
    }

    /// Every series, DERP core first.
    pub fn render_metrics(&self) -> String {
        let mut text = self.derp.render_metrics();
        if !text.ends_with('\n') && !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&self.ops.render());
        text
    }

    /// Live DERP connections.
    pub fn connections(&self) -> u64 {
        self.derp.metrics().snapshot().get("derp_current_connections", &[]).max(0.0) as u64
    }

    /// `/healthz`: status code and JSON body.
    pub fn healthz(&self) -> (StatusCode, String) {
        let draining = self.draining.load(Ordering::Acquire);
        let body = serde_json::json!({
            "status": if draining { "draining" } else { "ok" },
            "version": env!("CARGO_PKG_VERSION"),
            "connections": self.connections(),
            "uptime_seconds": self.ops.uptime().as_secs(),
        });
        let code = if draining { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
        (code, format!("{body}\n"))
    }
}

type Resp = Response<Full<Bytes>>;

/// The `/healthz` response.
pub(crate) fn healthz_response(status: &Status) -> Resp {
    let (code, body) = status.healthz();
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn metrics_response(status: &Status) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(status.render_metrics())));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

fn route(req: &Request<hyper::body::Incoming>, status: &Status) -> Resp {
    let text = |code: StatusCode, body: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
        *r.status_mut() = code;
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match req.uri().path() {
        "/metrics" => metrics_response(status),
        "/healthz" => healthz_response(status),
        _ => text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `cancel`.
pub(crate) async fn serve(
    listener: TcpListener,
    status: Arc<Status>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let (stream, remote) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let status = status.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let status = status.clone();
                async move { Ok::<_, Infallible>(route(&req, &status)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = conn => if let Err(e) = r { tracing::debug!(%remote, "metrics connection: {e}") },
            }
        });
    }
}

/// Logs packet drops at most once per `interval`, one line per reason and kind that grew, with
/// the count since the last line (so a drop storm costs a few log lines, not one per packet).
pub(crate) async fn drop_log(derp: Arc<DerpServer>, interval: Duration, cancel: CancellationToken) {
    let mut last: HashMap<(DropReason, PacketKind), f64> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snap = derp.metrics().snapshot();
        for reason in DropReason::ALL {
            for kind in PacketKind::ALL {
                let now = snap.dropped(reason, kind);
                let before = last.insert((reason, kind), now).unwrap_or(0.0);
                if now > before {
                    tracing::warn!(
                        reason = reason.as_str(),
                        kind = kind.as_str(),
                        "{} packets dropped in the last {:?} ({now} in total)",
                        now - before,
                        interval
                    );
                }
            }
        }
    }
}
