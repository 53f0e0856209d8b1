//! connections: open N idle DERP connections (handshake complete) as fast as `--concurrency`
//! allows, spreading source addresses over `--source-ips`, hold them, then close them all.
//! With `--relay-pid` the relay's resident memory is read before opening and after the hold.
//!
//! Connections come from the client crate's [`DerpConn::connect_bare`]: the full handshake
//! (TLS, fast start, WebSocket as asked), after which only the byte stream is kept, so one
//! process holds about as many connections as it may open files.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use derpfleet_client::conn::DerpStream;
use derpfleet_client::{ConnectOptions, DerpConn, DerpTarget};
use derpfleet_proto::NodePrivate;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::ConnArgs;
use crate::progress::Progress;
use crate::report::{r3, Report};
use crate::stats::{LatencyHist, Timeline};
use crate::sys;

/// Sockets kept free for everything else the process needs (runtime, stdio, ...).
const SPARE_FDS: u64 = 64;
/// Roughly how many ephemeral ports one source address offers (Linux default 32768-60999).
pub const PORTS_PER_SOURCE: u64 = 28_000;

/// Counts failures by message, for the report.
#[derive(Default)]
pub struct Failures {
    /// total
    pub count: u64,
    /// message → count
    pub by_message: BTreeMap<String, u64>,
}

impl Failures {
    /// Notes one failure.
    pub fn add(&mut self, e: &dyn std::fmt::Display) {
        self.count += 1;
        *self.by_message.entry(format!("{e:#}")).or_default() += 1;
    }

    /// The most frequent messages with counts, as JSON.
    pub fn top(&self) -> serde_json::Value {
        let mut v: Vec<(&String, &u64)> = self.by_message.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1));
        v.into_iter().take(5).map(|(m, n)| serde_json::json!({"error": m, "count": n})).collect()
    }
}

/// Runs the scenario.
pub async fn run(
    a: &ConnArgs,
    relay_pids: &[u32],
    websocket: bool,
    targets: &[(String, DerpTarget)],
    stop: CancellationToken,
) -> Result<Report> {
    let mut rep = Report::new("connections", targets.iter().map(|(n, _)| n.clone()).take(1).collect());
    let target = targets[0].1.clone();
    let mut count = a.count as u64;
    match sys::raise_nofile_limit() {
        Ok(limit) if count + SPARE_FDS > limit => {
            let fit = limit.saturating_sub(SPARE_FDS);
            rep.notes.push(format!(
                "asked for {count} connections but this process may open {limit} files: opening {fit}; \
                 run several load-generator processes for more"
            ));
            count = fit;
        }
        Ok(_) => {}
        Err(e) => rep.notes.push(format!("could not raise the open-file limit: {e}")),
    }
    let sources: Vec<Option<IpAddr>> = match &a.source_ips {
        Some(v) => v.0.iter().copied().map(Some).collect(),
        None => vec![None],
    };
    if count > PORTS_PER_SOURCE * sources.len() as u64 {
        rep.notes.push(format!(
            "{count} connections over {} source address(es) exceeds ~{PORTS_PER_SOURCE} ephemeral ports each; \
             use --source-ips 127.0.0.2-127.0.0.N",
            sources.len()
        ));
    }
    let rss_before = relay_rss(relay_pids)?;
    let own_before = sys::rss_kib(std::process::id()).ok();

    let started = Instant::now();
    let timeline = Arc::new(Timeline::new(3600));
    let opened_all = Arc::new(AtomicU64::new(0));
    let o = opened_all.clone();
    let progress =
        Progress::start(count, "handshakes", move || o.load(Ordering::Relaxed), opened_all.clone());
    let mut held: Vec<Box<dyn DerpStream>> = Vec::with_capacity(count as usize);
    let mut remote = None;
    let mut hist = LatencyHist::default();
    let mut failures = Failures::default();
    let mut set = JoinSet::new();
    let mut next = 0u64;
    while (next < count && !stop.is_cancelled()) || !set.is_empty() {
        while next < count && set.len() < a.concurrency as usize && !stop.is_cancelled() {
            let t = target.clone();
            let src = sources[(next % sources.len() as u64) as usize];
            set.spawn(async move {
                let t0 = Instant::now();
                let r = DerpConn::connect_bare(&t, &bare_options(src, websocket)).await;
                (r, t0.elapsed())
            });
            next += 1;
        }
        let Some(joined) = set.join_next().await else { break };
        match joined {
            Ok((Ok(c), took)) => {
                remote.get_or_insert(c.info.remote);
                held.push(c.stream);
                hist.record_ns(took.as_nanos() as u64);
                timeline.add(started.elapsed().as_nanos() as u64, 1);
                opened_all.fetch_add(1, Ordering::Relaxed);
            }
            Ok((Err(e), _)) => failures.add(&e),
            Err(e) => failures.add(&anyhow::anyhow!("connect task: {e}")),
        }
    }
    let open_secs = started.elapsed().as_secs_f64().max(1e-9);
    progress.finish();
    tokio::select! {
        _ = tokio::time::sleep(a.hold) => {}
        _ = stop.cancelled() => {}
    }
    let rss_after = relay_rss(relay_pids)?;
    let own_after = sys::rss_kib(std::process::id()).ok();
    let opened = held.len() as u64;
    drop(held);

    rep.config
        .put("count", a.count)
        .put("concurrency", a.concurrency)
        .put("source_ips", sources.iter().flatten().count() as u64)
        .put("hold_s", a.hold.as_secs_f64())
        .put("websocket", websocket)
        .put("relay_pid", relay_pids.first().map(|&p| serde_json::Value::from(p)).unwrap_or_default());
    rep.elapsed_s = r3(open_secs);
    rep.results
        .put("target_addr", remote.map(|a| a.to_string()).unwrap_or_default())
        .put("opened", opened)
        .put("failed", failures.count)
        .put("handshakes_per_s", r3(opened as f64 / open_secs));
    if let (Some(b), Some(af)) = (rss_before, rss_after) {
        rep.results
            .put("relay_rss_before_kib", b)
            .put("relay_rss_after_kib", af)
            .put("relay_bytes_per_conn", r3((af as f64 - b as f64) * 1024.0 / opened.max(1) as f64));
    }
    if let (Some(b), Some(af)) = (own_before, own_after) {
        rep.results
            .put("loadtest_bytes_per_conn", r3((af as f64 - b as f64) * 1024.0 / opened.max(1) as f64));
    }
    if failures.count > 0 {
        rep.results.put("errors", failures.top());
    }
    rep.latency_us = hist.summary();
    rep.distribution = hist.distribution();
    rep.timeline = timeline.counts();
    if stop.is_cancelled() {
        rep.notes.push("interrupted: figures cover the connections opened".into());
    }
    Ok(rep)
}

/// Options for one idle connection: a fresh key, from `source` if given.
pub fn bare_options(source: Option<IpAddr>, websocket: bool) -> ConnectOptions {
    let mut opts = ConnectOptions::new(NodePrivate::generate());
    opts.bind_addr = source;
    opts.websocket = websocket;
    opts
}

/// Resident memory of the relay processes together (KiB), if any were named.
fn relay_rss(pids: &[u32]) -> Result<Option<u64>> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut sum = 0;
    for &p in pids {
        sum += sys::rss_kib(p)?;
    }
    Ok(Some(sum))
}
