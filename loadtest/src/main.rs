//! `derpfleet-loadtest`: see `derpfleet-loadtest --help` and loadtest/README.md.
//!
//! Exit codes: 0 done, 1 the run failed (e.g. cannot connect), 2 bad arguments. Arguments that can
//! only be checked against the system (`--plot` path, `--relay-pid`) are checked before the run,
//! so a finished run is never lost to a typo.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser};
use derpfleet_loadtest::cli::{Cli, Scenario};
use derpfleet_loadtest::floor::{self, Floor};
use derpfleet_loadtest::report::{r3, Report};
use derpfleet_loadtest::scenario::{churn, connections, flow, many, pingpong, stun, ClientSetup};
use derpfleet_loadtest::sys::CpuMeter;
use derpfleet_loadtest::target::{self, Spread};
use derpfleet_loadtest::{drops, plot};
use tokio_util::sync::CancellationToken;

fn usage_error(msg: impl std::fmt::Display) -> ! {
    Cli::command().error(clap::error::ErrorKind::ValueValidation, msg).exit()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let spread = match &cli.scenario {
        Scenario::Mesh(_) => Some(Spread::Nodes),
        Scenario::Fleet(_) => Some(Spread::Regions),
        Scenario::Stun(_) | Scenario::Floor(_) => None,
        _ => Some(Spread::Single),
    };
    let targets = match spread.map(|s| target::resolve(&cli.common, s)).transpose() {
        Ok(t) => t.unwrap_or_default(),
        Err(e) => Cli::command().error(clap::error::ErrorKind::ArgumentConflict, e.to_string()).exit(),
    };
    for &pid in &cli.common.relay_pids {
        if let Err(e) = derpfleet_loadtest::sys::cpu_seconds(pid) {
            usage_error(format!("--relay-pid {pid}: no such process on this host ({e})"));
        }
    }
    if let Some(path) = &cli.common.plot {
        // Created (empty) now, written after the run: a bad path fails before any work.
        if let Err(e) = std::fs::File::create(path) {
            usage_error(format!("--plot {}: {e}", path.display()));
        }
    }
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
        let packets = is_packet_run(&cli.scenario);
        let floor = if packets && !cli.common.relay_pids.is_empty() && !cli.common.floor_time.is_zero() {
            Some(measure_floor(cli.common.floor_time, floor::MESSAGE_LEN, 1).await?)
        } else {
            None
        };
        let drops_before = if cli.common.metrics_urls.is_empty() {
            None
        } else {
            Some(drops::read_all(&cli.common.metrics_urls).await?)
        };
        let relay_cpu: Vec<CpuMeter> =
            cli.common.relay_pids.iter().filter_map(|&p| CpuMeter::start(p)).collect();
        let own_cpu = CpuMeter::start(std::process::id());
        let load = derpfleet_loadtest::sys::load_average();
        let mut r = run(&cli, &targets, stop).await?;
        if let Some(l) = load {
            r.results.put("host_load_1m", l);
        }
        add_cpu(&mut r, &relay_cpu, own_cpu, packets, floor);
        if let Some(before) = drops_before {
            let after = drops::read_all(&cli.common.metrics_urls).await?;
            let d = drops::delta(&before, &after);
            r.results.put("relay_drops_total", d.values().sum::<u64>());
            r.results.put("relay_drops", serde_json::to_value(&d)?);
        }
        note_loss(&mut r, !cli.common.metrics_urls.is_empty());
        if matches!(cli.scenario, Scenario::Many(_)) {
            r.results.promote(&[
                "relay_cpu_us_per_packet",
                "relay_cpu_x_floor",
                "floor_us",
                "loss_pct",
                "received_pps",
            ]);
            if cli.common.relay_pids.is_empty() {
                r.notes.push("give --relay-pid PID for the headline figure, relay CPU per packet".into());
            }
        }
        Ok(r)
    });
    // Connection tasks that are still winding down are dropped with the runtime.
    rt.shutdown_timeout(Duration::from_secs(1));
    match res.and_then(|r| output(&cli, &r)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(path) = &cli.common.plot {
                // Only the empty placeholder made before the run.
                if std::fs::metadata(path).map(|m| m.len() == 0).unwrap_or(false) {
                    let _ = std::fs::remove_file(path);
                }
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Scenarios whose events are relayed packets (relay CPU per packet, floor, drop counters).
fn is_packet_run(s: &Scenario) -> bool {
    matches!(s, Scenario::Throughput(_) | Scenario::Mesh(_) | Scenario::Fleet(_) | Scenario::Many(_))
}

async fn measure_floor(d: Duration, size: usize, connections: usize) -> Result<Floor> {
    tokio::task::spawn_blocking(move || floor::measure(d, size, connections))
        .await
        .context("floor task")?
        .context("measuring the floor over loopback TCP")
}

async fn run(
    cli: &Cli,
    targets: &[(String, derpfleet_client::DerpTarget)],
    stop: CancellationToken,
) -> Result<Report> {
    let c = &cli.common;
    let setup = ClientSetup::new(c.websocket, c.tailscale_writes);
    match &cli.scenario {
        Scenario::Throughput(a) => flow::run("throughput", a, &setup, &c.relay_pids, targets, stop).await,
        Scenario::Mesh(a) => flow::run("mesh", a, &setup, &c.relay_pids, targets, stop).await,
        Scenario::Fleet(a) => flow::run("fleet", a, &setup, &c.relay_pids, targets, stop).await,
        Scenario::Many(a) => many::run(a, c.websocket, &c.relay_pids, targets, stop).await,
        Scenario::Pingpong(a) => pingpong::run(a, &setup, targets, stop).await,
        Scenario::Connections(a) => connections::run(a, &c.relay_pids, c.websocket, targets, stop).await,
        Scenario::Churn(a) => churn::run(a, c.websocket, targets, stop).await,
        Scenario::Stun(a) => stun::run(a, stop).await,
        Scenario::Floor(a) => floor_report(a.duration, a.size, a.connections as usize).await,
    }
}

async fn floor_report(d: Duration, size: usize, connections: usize) -> Result<Report> {
    // Two descriptors per connection, and a few for the runtime and the report.
    let fds = 2 * connections as u64 + 32;
    match derpfleet_loadtest::sys::raise_nofile_limit() {
        Ok(limit) if fds > limit => anyhow::bail!(
            "{connections} connections need {fds} open files but this process may open {limit} \
             (raise `ulimit -n` or use fewer connections)"
        ),
        _ => {}
    }
    let f = measure_floor(d, size, connections).await?;
    let mut r = Report::new("floor", vec!["127.0.0.1 (loopback TCP)".into()]);
    r.config
        .put("duration_s", d.as_secs_f64())
        .put("size", size as u64)
        .put("connections", f.connections as u64);
    r.elapsed_s = r3(f.elapsed.as_secs_f64());
    put_floor(&mut r, &f);
    r.results.put("messages", f.messages).put("short_reads", f.short_reads);
    Ok(r)
}

fn put_floor(r: &mut Report, f: &Floor) {
    r.results.put("floor_us", r3(f.cpu_us));
    if let Some(k) = f.kernel_pct {
        r.results.put("floor_kernel_pct", r3(k));
    }
}

/// CPU time of the relay(s) (with `--relay-pid`) and of this process over the whole run, the
/// relays' CPU per timeline event (packet received, round trip, handshake, STUN answer), and for
/// packet runs the relays' CPU over the traffic alone (connection set-up excluded) per packet
/// received, also as a multiple of the floor.
fn add_cpu(r: &mut Report, relay: &[CpuMeter], own: Option<CpuMeter>, packets: bool, floor: Option<Floor>) {
    let events: u64 = r.timeline.iter().sum();
    let relay_s: Option<f64> =
        if relay.is_empty() { None } else { relay.iter().map(|m| m.seconds()).sum::<Option<f64>>() };
    if let Some(s) = relay_s {
        r.results.put("relay_cpu_s", r3(s));
        if events > 0 {
            let per = s * 1e6 / events as f64;
            r.results.put("relay_cpu_us_per_event", r3(per));
            if let Some(t) = r.relay_cpu_traffic_s.filter(|_| packets) {
                let per = t * 1e6 / events as f64;
                r.results.put("relay_cpu_traffic_s", r3(t));
                r.results.put("relay_cpu_us_per_packet", r3(per));
                if let Some(f) = &floor {
                    put_floor(r, f);
                    r.results.put("relay_cpu_x_floor", r3(per / f.cpu_us));
                }
            }
        }
    }
    if let Some(s) = own.and_then(|m| m.seconds()) {
        r.results.put("loadtest_cpu_s", r3(s));
    }
}

/// Under loss, say where to look: the relay's drop counters.
fn note_loss(r: &mut Report, have_metrics: bool) {
    let Some(loss) = r.results.num("loss_pct").filter(|&l| l > 0.0) else { return };
    let note = match r.results.num("relay_drops_total") {
        Some(d) if have_metrics => format!(
            "{loss}% loss; the relay counted {d} dropped packets ({}) over the run (warm-up and drain included)",
            r.results.get("relay_drops").map(|v| v.to_string()).unwrap_or_default()
        ),
        _ => format!(
            "{loss}% loss: the relay's drop counters say where (derp_packets_dropped{{reason}} on its \
             /debug/varz or /metrics); pass --metrics-url URL to have them read before and after"
        ),
    };
    r.notes.push(note);
}

fn output(cli: &Cli, r: &Report) -> Result<()> {
    if let Some(path) = &cli.common.plot {
        let subtitle = format!(
            "{} · {}",
            r.targets.join(", "),
            r.config.0.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        );
        let svg = match cli.scenario {
            Scenario::Throughput(_) | Scenario::Mesh(_) | Scenario::Fleet(_) | Scenario::Many(_) => {
                plot::timeline_chart(
                    &format!("{}: packets received per second", r.scenario),
                    &subtitle,
                    "packets/s",
                    &r.timeline,
                    r.window_s,
                )
            }
            _ => plot::latency_chart(
                &format!("{}: latency distribution", r.scenario),
                &subtitle,
                &r.distribution,
            ),
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
