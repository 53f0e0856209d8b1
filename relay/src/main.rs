//! `derpfleet-relay`: the relay binary, a drop-in for Go `derper` (same flags, Go flag syntax).
//!
//! Logs go to stderr via `tracing` (filter with `RUST_LOG`, default `info`), one line per event,
//! without colours unless stderr is a terminal (systemd/journald friendly). SIGINT or SIGTERM
//! stops accepting, closes connections and exits 0.

use std::io::IsTerminal;
use std::process::ExitCode;

use derpfleet_relay::cli::{self, Flags};
use derpfleet_relay::server::Server;
use derpfleet_relay::tls;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let flags = match Flags::parse_go(std::env::args_os()) {
        Ok(f) => f,
        Err(e) => e.exit(),
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
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    let startup = cli::build(&flags)?;
    for note in &startup.notes {
        tracing::info!("{note}");
    }
    if !flags.stun {
        tracing::debug!("-stun=false");
    }
    let server = Server::spawn(startup.config).await?;
    tracing::info!(public_key = %server.derp().public_key(), addr = %server.local_addr(), "derpfleet-relay running");
    if let Some(cert_name) = &startup.cert_name {
        let json = tls::derp_node_json(&flags.hostname, server.local_addr().port(), cert_name);
        tracing::info!("self-signed certificate; use this DERP node in your DERP map: {json}");
    }
    wait_for_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
