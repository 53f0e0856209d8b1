//! `derpfleet-loadtest`: see `derpfleet-loadtest --help` and loadtest/README.md.
//!
//! Exit codes: 0 done, 1 the run failed (e.g. cannot connect), 2 bad arguments.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use derpfleet_loadtest::cli::{Cli, Scenario};
use derpfleet_loadtest::plot;
use derpfleet_loadtest::report::{r3, Report};
use derpfleet_loadtest::scenario::{churn, connections, flow, pingpong, stun};
use derpfleet_loadtest::sys::CpuMeter;
use derpfleet_loadtest::target::{self, Spread};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let spread = match &cli.scenario {
        Scenario::Mesh(_) => Some(Spread::Nodes),
        Scenario::Fleet(_) => Some(Spread::Regions),
        Scenario::Stun(_) => None,
        _ => Some(Spread::Single),
    };
    if cli.common.websocket && !matches!(cli.scenario, Scenario::Connections(_) | Scenario::Churn(_)) {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--websocket works with connections and churn only: derpfleet-client has no WebSocket \
                 transport yet for the packet scenarios",
            )
            .exit();
    }
    let targets = match spread.map(|s| target::resolve(&cli.common, s)).transpose() {
        Ok(t) => t.unwrap_or_default(),
        Err(e) => Cli::command().error(clap::error::ErrorKind::ArgumentConflict, e.to_string()).exit(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.common.threads as usize)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                s.cancel();
            }
        });
        let relay_cpu = cli.common.relay_pid.and_then(CpuMeter::start);
        let own_cpu = CpuMeter::start(std::process::id());
        let mut r = run(&cli, &targets, stop).await?;
        add_cpu(&mut r, relay_cpu, own_cpu);
        Ok(r)
    });
    // Connection tasks that are still winding down are dropped with the runtime.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match res.and_then(|r| output(&cli, &r)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    cli: &Cli,
    targets: &[(String, derpfleet_client::DerpTarget)],
    stop: CancellationToken,
) -> Result<Report> {
    match &cli.scenario {
        Scenario::Throughput(a) => flow::run("throughput", a, targets, stop).await,
        Scenario::Mesh(a) => flow::run("mesh", a, targets, stop).await,
        Scenario::Fleet(a) => flow::run("fleet", a, targets, stop).await,
        Scenario::Pingpong(a) => pingpong::run(a, targets, stop).await,
        Scenario::Connections(a) => {
            connections::run(a, cli.common.relay_pid, cli.common.websocket, targets, stop).await
        }
        Scenario::Churn(a) => churn::run(a, cli.common.websocket, targets, stop).await,
        Scenario::Stun(a) => stun::run(a, stop).await,
    }
}

/// CPU time of the relay (with `--relay-pid`) and of this process over the whole run, and the
/// relay's CPU per timeline event (packet received, round trip, handshake, STUN answer).
fn add_cpu(r: &mut Report, relay: Option<CpuMeter>, own: Option<CpuMeter>) {
    let events: u64 = r.timeline.iter().sum();
    if let Some(s) = relay.and_then(|m| m.seconds()) {
        r.results.put("relay_cpu_s", r3(s));
        if events > 0 {
            r.results.put("relay_cpu_us_per_event", r3(s * 1e6 / events as f64));
        }
    }
    if let Some(s) = own.and_then(|m| m.seconds()) {
        r.results.put("loadtest_cpu_s", r3(s));
    }
}

fn output(cli: &Cli, r: &Report) -> Result<()> {
    if let Some(path) = &cli.common.plot {
        let svg = match cli.scenario {
            Scenario::Throughput(_) | Scenario::Mesh(_) | Scenario::Fleet(_) => plot::timeline_chart(
                &format!("{}: packets received per second", r.scenario),
                "packets/s",
                &r.timeline,
            ),
            _ => plot::latency_chart(&format!("{}: latency distribution", r.scenario), &r.distribution),
        };
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if cli.common.json {
        serde_json::to_writer_pretty(&mut out, r)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", r.table())?;
    }
    Ok(())
}
