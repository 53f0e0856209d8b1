//! churn: start connections at `--rate` per second for `--duration`; each completes the DERP
//! handshake and closes at once. Reports handshake latency (from the actual start of the connect)
//! and failures; if `--concurrency` handshakes are already in flight the schedule waits, and the
//! achieved rate shows it.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use derpfleet_client::{DerpConn, DerpTarget};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::connections::{bare_options, Failures};
use crate::cli::ChurnArgs;
use crate::progress::Progress;
use crate::report::{r3, Report};
use crate::stats::{LatencyHist, Timeline};

/// A handshake slower than this is a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct Shared {
    hist: LatencyHist,
    failures: Failures,
}

/// Runs the scenario.
pub async fn run(
    a: &ChurnArgs,
    websocket: bool,
    targets: &[(String, DerpTarget)],
    stop: CancellationToken,
) -> Result<Report> {
    let target = targets[0].1.clone();
    let _ = crate::sys::raise_nofile_limit();
    let sources: Vec<Option<IpAddr>> = match &a.source_ips {
        Some(v) => v.0.iter().copied().map(Some).collect(),
        None => vec![None],
    };
    let shared = Arc::new(Mutex::new(Shared::default()));
    let timeline = Arc::new(Timeline::new(a.duration.as_secs() as usize + 16));
    let ok_all = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(Semaphore::new(a.concurrency as usize));
    let interval = 1e9 / a.rate as f64;
    let started = Instant::now();
    let end = started + a.duration;
    let progress = Progress::start(
        a.duration.as_secs().max(1),
        "handshakes",
        move || started.elapsed().as_secs(),
        ok_all.clone(),
    );
    let mut attempted = 0u64;
    loop {
        let due = started + Duration::from_nanos((attempted as f64 * interval) as u64);
        if due >= end || stop.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = stop.cancelled() => break,
        }
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => p?,
            _ = stop.cancelled() => break,
        };
        let (t, sh, tl, ok) = (target.clone(), shared.clone(), timeline.clone(), ok_all.clone());
        let src = sources[(attempted % sources.len() as u64) as usize];
        tokio::spawn(async move {
            let mut opts = bare_options(src, websocket);
            opts.connect_timeout = CONNECT_TIMEOUT;
            let t0 = Instant::now();
            let r = DerpConn::connect_bare(&t, &opts).await;
            let took = t0.elapsed();
            match r {
                Ok(mut c) => {
                    let _ = c.stream.shutdown().await;
                    let mut g = sh.lock().unwrap_or_else(|p| p.into_inner());
                    g.hist.record_ns(took.as_nanos() as u64);
                    drop(g);
                    tl.add((t0 - started).as_nanos() as u64, 1);
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => sh.lock().unwrap_or_else(|p| p.into_inner()).failures.add(&e),
            }
            drop(permit);
        });
        attempted += 1;
    }
    let schedule_secs = started.elapsed().as_secs_f64().max(1e-9);
    // Wait for the handshakes still in flight (each is bounded by CONNECT_TIMEOUT).
    let _ =
        tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), sem.acquire_many(a.concurrency)).await;
    progress.finish();
    let g = shared.lock().unwrap_or_else(|p| p.into_inner());
    let ok = ok_all.load(Ordering::Relaxed);
    let mut rep = Report::new("churn", targets.iter().map(|(n, _)| n.clone()).take(1).collect());
    rep.config
        .put("rate", a.rate)
        .put("duration_s", a.duration.as_secs_f64())
        .put("concurrency", a.concurrency)
        .put("websocket", websocket)
        .put("source_ips", sources.iter().flatten().count() as u64);
    rep.elapsed_s = r3(schedule_secs);
    rep.results
        .put("attempted", attempted)
        .put("succeeded", ok)
        .put("failed", g.failures.count)
        .put("attempted_per_s", r3(attempted as f64 / schedule_secs))
        .put("handshakes_per_s", r3(ok as f64 / schedule_secs));
    if g.failures.count > 0 {
        rep.results.put("errors", g.failures.top());
    }
    rep.latency_us = g.hist.summary();
    rep.distribution = g.hist.distribution();
    rep.timeline = timeline.counts();
    if (attempted as f64) < 0.95 * a.rate as f64 * schedule_secs {
        rep.notes.push("the schedule slipped: --concurrency handshakes were in flight".into());
    }
    if stop.is_cancelled() {
        rep.notes.push("interrupted: figures cover the time run".into());
    }
    Ok(rep)
}
