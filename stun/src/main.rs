//! `derpfleet-stun`: a standalone STUN responder (the relay embeds the same one with `-stun`).
//!
//! Go-flag syntax like derper (`-a :3478`, `-stun-strict`, `-rate-limit=50`). SIGINT/SIGTERM stop
//! it cleanly with exit status 0.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser};
use derpfleet_gocompat::parse_listen_addr;
use derpfleet_stun::server::bind_sockets;
use derpfleet_stun::{PerIpLimit, StunConfig, StunMetrics, StunServer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A fast STUN (RFC 5389/8489 Binding) responder, compatible with Tailscale clients.
#[derive(Debug, Parser)]
#[command(name = "derpfleet-stun", version, mut_args = derpfleet_gocompat::go_arg)]
struct Flags {
    /// UDP listen address: ":PORT" (all interfaces, IPv4 and IPv6), "IP:PORT" or "[IPv6]:PORT"
    #[arg(long = "a", default_value = ":3478", value_parser = check_listen_addr, value_name = "addr")]
    addr: String,

    /// answer only Tailscale-style requests (SOFTWARE "tailnode" + FINGERPRINT last), like derper;
    /// by default plain RFC 5389 Binding requests are answered too
    #[arg(long = "stun-strict")]
    strict: bool,

    /// sustained STUN requests per second allowed per source IP; 0 disables the limit
    #[arg(long = "rate-limit", default_value_t = 100, value_name = "int")]
    rate_limit: u32,

    /// requests a source IP may send back to back before -rate-limit applies
    #[arg(long = "rate-burst", default_value_t = 200, value_name = "int")]
    rate_burst: u32,

    /// serve Prometheus metrics as text on http://ADDR/metrics (e.g. 127.0.0.1:9478); empty = off
    #[arg(long = "metrics-addr", default_value = "", value_parser = check_metrics_addr, value_name = "addr")]
    metrics_addr: String,

    /// number of SO_REUSEPORT sockets (one task each); 0 = one per CPU
    #[arg(long = "sockets", default_value_t = 0, value_name = "int")]
    sockets: usize,
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("derpfleet-stun: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    // Bad flags exit 2 naming the flag as typed (`-rate-limit -5`: "invalid value '-5' for '-rate-limit'").
    let flags = derpfleet_gocompat::try_get_matches(Flags::command(), std::env::args_os())
        .and_then(|m| Flags::from_arg_matches(&m))
        .unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(flags))
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    let addr = parse_listen_addr(&flags.addr).context("-a")?;
    let per_ip_limit = match (NonZeroU32::new(flags.rate_limit), NonZeroU32::new(flags.rate_burst)) {
        (None, _) => None,
        (Some(per_second), Some(burst)) => Some(PerIpLimit { per_second, burst }),
        (Some(_), None) => anyhow::bail!("-rate-burst must be at least 1 when -rate-limit is set"),
    };
    let count = match flags.sockets {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let recorder = Arc::new(PrometheusBuilder::new().build_recorder());
    let metrics = StunMetrics::register(recorder.as_ref());
    let sockets = bind_sockets(addr, count).with_context(|| format!("binding UDP {addr}"))?;
    let local = sockets[0].local_addr()?;
    let cancel = CancellationToken::new();
    if !flags.metrics_addr.is_empty() {
        let maddr: SocketAddr = parse_listen_addr(&flags.metrics_addr).context("-metrics-addr")?;
        let listener = TcpListener::bind(maddr).await.with_context(|| format!("binding metrics {maddr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
        tokio::spawn(serve_metrics(listener, recorder.clone(), cancel.clone()));
    }
    tracing::info!(
        addr = %local, sockets = count, strict = flags.strict, limit = ?per_ip_limit,
        "STUN responder listening"
    );
    let server = StunServer::new(StunConfig { strict: flags.strict, per_ip_limit }, metrics);
    let serving = tokio::spawn(server.serve(sockets, cancel.clone()));
    shutdown_signal().await?;
    tracing::info!("shutting down");
    cancel.cancel();
    serving.await??;
    Ok(())
}

/// `-a`: checked while parsing, so a bad address exits 2 like any bad flag.
fn check_listen_addr(s: &str) -> Result<String, String> {
    parse_listen_addr(s).map_err(|e| e.reason)?;
    Ok(s.to_owned())
}

/// `-metrics-addr`: empty (off) or a listen address.
fn check_metrics_addr(s: &str) -> Result<String, String> {
    if !s.is_empty() {
        check_listen_addr(s)?;
    }
    Ok(s.to_owned())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// A minimal HTTP/1 endpoint: `GET /metrics` renders the recorder, anything else is 404.
async fn serve_metrics(listener: TcpListener, recorder: Arc<PrometheusRecorder>, cancel: CancellationToken) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let recorder = recorder.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        http::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(recorder.handle().render())))
                    } else {
                        http::Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"not found\n")))
                    };
                    resp
                }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}
