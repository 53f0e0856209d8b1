//! `derpfleet-relay`: the relay binary, a drop-in for Go `derper` (same flags, Go flag syntax).
//!
//! Logs go to stderr via `tracing` (filter with `RUST_LOG`, default `info`), one line per event,
//! without colours unless stderr is a terminal (systemd/journald friendly).
//!
//! Signals: SIGHUP re-reads `-allowlist` and `-rate-config` (connected clients stay). SIGTERM or
//! SIGINT drains gracefully ([`Server::drain`]): stop accepting, send every client `Restarting`,
//! flush, close what is left at `-drain-timeout`, exit 0. A second SIGTERM/SIGINT exits at once.

use std::io::IsTerminal;
use std::process::ExitCode;

use derpfleet_relay::http::tls;
use derpfleet_relay::server::Server;
use derpfleet_relay::startup::cli;
use derpfleet_relay::startup::config::{parse_with_config, FlagsError};
use derpfleet_relay::startup::flags::Flags;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let flags = match parse_with_config(std::env::args_os()) {
        Ok(f) => f,
        Err(FlagsError::Flags(e)) => e.exit(),
        Err(FlagsError::Config(e)) => {
            eprintln!("derpfleet-relay: {e}");
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("derpfleet-relay {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(flags)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", skipping a cause whose text the message already ends
/// with (startup errors such as `ACME: <reason>` carry their source in their own text).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let startup = cli::build(&flags)?;
    for note in &startup.notes {
        tracing::info!("{note}");
    }
    // Installed before serving, so an early signal is never the default "terminate".
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let server = Server::spawn_with(startup.config, startup.ops).await?;
    let mesh = startup.mesh.map(|m| derpfleet_relay::mesh::Mesh::start(server.derp().clone(), m));
    tracing::info!(public_key = %server.derp().public_key(), addr = %server.local_addr(), "derpfleet-relay running");
    if let Some(addr) = server.stun_addr() {
        tracing::info!(%addr, "STUN listening");
    }
    if let Some(addr) = server.metrics_addr() {
        tracing::info!(%addr, "metrics listening (/metrics, /healthz)");
    }
    if let Some(cert_name) = &startup.cert_name {
        let json = tls::derp_node_json(&flags.hostname, server.local_addr().port(), cert_name);
        tracing::info!("self-signed certificate; use this DERP node in your DERP map: {json}");
    }
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let report = server.reload();
                for e in &report.errors {
                    tracing::error!("SIGHUP reload: {e} (previous setting kept)");
                }
                tracing::info!(allowlist_keys = ?report.allowlist_keys, recv_rate = ?report.recv_rate, "SIGHUP: reloaded");
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(deadline = ?startup.drain.deadline, "draining: no new connections; sending Restarting to every client");
    let drain = server.drain(startup.drain);
    tokio::pin!(drain);
    tokio::select! {
        report = &mut drain => {
            tracing::info!(
                notified = report.notified, left_on_their_own = report.left, closed_at_deadline = report.closed,
                "drained; exiting"
            );
        }
        _ = term.recv() => tracing::warn!("second signal: exiting without finishing the drain"),
        _ = int.recv() => tracing::warn!("second signal: exiting without finishing the drain"),
    }
    if let Some(mesh) = mesh {
        mesh.shutdown().await;
    }
    Ok(())
}
