//! `derpfleet-probe`: see the crate docs and `derpfleet-probe -help`.

use std::process::ExitCode;
use std::time::Duration;

use derpfleet_probe::cli::Flags;
use derpfleet_probe::plan::{plan, PlanConfig};
use derpfleet_probe::probes::ProbeEnv;
use derpfleet_probe::results::{ProbeRecord, Results};
use derpfleet_probe::{mapsource, scheduler, web};
use derpfleet_proto::MeshKey;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let flags = match Flags::parse_go(std::env::args_os()) {
        Ok(f) => f,
        Err(e) if e.is_help => {
            print!("{}", e.text);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprint!("{}", e.text);
            return ExitCode::from(2);
        }
    };
    if flags.version {
        println!("derpfleet-probe {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if flags.once { "warn" } else { "info" })
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("derpfleet-probe: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(flags)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("derpfleet-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_mesh_key(flags: &Flags) -> anyhow::Result<Option<MeshKey>> {
    let Some(path) = &flags.mesh_psk_file else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("-mesh-psk-file {}: {e}", path.display()))?;
    let key = MeshKey::parse(text.trim())
        .map_err(|e| anyhow::anyhow!("-mesh-psk-file {}: {e} (want 64 hex chars)", path.display()))?;
    Ok(Some(key))
}

async fn run(flags: Flags) -> anyhow::Result<ExitCode> {
    let env = ProbeEnv {
        mesh_key: read_mesh_key(&flags)?,
        bw_size: flags.bw_probe_size_bytes,
        qd_rate: flags.qd_packets_per_second,
        qd_packet_timeout: flags.qd_packet_timeout,
    };
    let cfg = PlanConfig {
        derp: flags.interval,
        tls: flags.tls_interval,
        stun: flags.stun_interval,
        mesh: flags.mesh_interval,
        bw: flags.bw_interval,
        qd: if flags.qd_packets_per_second > 0 { flags.interval } else { Duration::ZERO },
        region_code: flags.region_code.clone(),
    };
    let results = Results::new();
    if flags.once {
        let map = mapsource::load(&flags.derp_map).await?;
        let records = scheduler::once(plan(&map, &cfg), env, results).await;
        print_once(&records, flags.json);
        let all_good = records.iter().all(|r| r.ok == Some(true));
        return Ok(if all_good { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    let stop = CancellationToken::new();
    if !flags.listen.is_empty() {
        let listener = web::bind(&flags.listen).await?;
        tracing::info!("listening on {}", listener.local_addr()?);
        let state = web::WebState { results: results.clone(), location: flags.location_name() };
        tokio::spawn(web::serve(listener, state, stop.clone()));
    }
    let prober = tokio::spawn(scheduler::run_forever(
        flags.derp_map.clone(),
        cfg,
        flags.interval,
        flags.spread,
        env,
        results,
        stop.clone(),
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), prober).await;
    Ok(ExitCode::SUCCESS)
}

fn print_once(records: &[ProbeRecord], json: bool) {
    if json {
        let doc = serde_json::json!({ "probes": records });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return;
    }
    let mut lines: Vec<String> = Vec::new();
    for r in records.iter().filter(|r| r.ok == Some(true)) {
        lines.push(format!("good: {}: {:.3} ms", r.name, r.latency_ms.unwrap_or(0.0)));
    }
    for r in records.iter().filter(|r| r.ok != Some(true)) {
        lines.push(format!("bad: {}: {}", r.name, r.error.as_deref().unwrap_or("not run")));
    }
    for l in lines {
        println!("{l}");
    }
}
