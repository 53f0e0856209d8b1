//! `derpfleet-loadtest`: see `derpfleet-loadtest --help` and loadtest/README.md.
//!
//! Exit codes: 0 done, 1 the run failed (e.g. cannot connect), 2 bad arguments.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use derpfleet_loadtest::cli::{Cli, Scenario};
use derpfleet_loadtest::plot;
use derpfleet_loadtest::report::Report;
use derpfleet_loadtest::scenario::{churn, connections, flow, pingpong, stun};
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
        run(&cli, &targets, stop).await
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
        Scenario::Connections(a) => connections::run(a, targets, stop).await,
        Scenario::Churn(a) => churn::run(a, targets, stop).await,
        Scenario::Stun(a) => stun::run(a, stop).await,
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
