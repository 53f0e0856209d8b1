//! pingpong: N pairs; in each, A sends one packet to B, B echoes it back, A measures the round trip
//! and sends the next. A reply not back within the timeout counts as lost and A moves on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Result;
use derpfleet_client::{DerpReceiver, DerpSender, DerpTarget};
use derpfleet_proto::msg::ServerToClient;
use derpfleet_proto::NodePublic;
use tokio_util::sync::CancellationToken;

use super::{connect_all, ClientSetup};
use crate::cli::PingArgs;
use crate::payload::{Clock, Header, PayloadArena};
use crate::progress::Progress;
use crate::report::{r3, Report};
use crate::stats::{LatencyHist, Timeline};

/// Runs the scenario.
pub async fn run(
    a: &PingArgs,
    setup: &ClientSetup,
    targets: &[(String, DerpTarget)],
    stop: CancellationToken,
) -> Result<Report> {
    let pairs = a.pairs as usize;
    let clients = connect_all(targets, vec![0; 2 * pairs], setup).await?;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let clock = Clock::start();
    let warm = a.warmup.as_nanos() as u64;
    let end = warm + a.duration.as_nanos() as u64;
    let timeline = Arc::new(Timeline::new((end / 1_000_000_000) as usize + 4));
    let rounds_all = Arc::new(AtomicU64::new(0));
    let mut closers = Vec::new();
    let mut pingers = Vec::new();
    let mut it = clients.into_iter();
    for i in 0..pairs {
        let (Some(pa), Some(pb)) = (it.next(), it.next()) else { break };
        closers.push(pa.tx.clone());
        closers.push(pb.tx.clone());
        tokio::spawn(echo(pb.rx, pb.tx));
        let p = Pinger {
            tx: pa.tx,
            rx: pa.rx,
            dst: pb.public,
            me: i as u32,
            size: a.size,
            timeout: a.timeout,
            clock,
            warm,
            end,
        };
        pingers.push(tokio::spawn(p.run(stop.clone(), timeline.clone(), rounds_all.clone())));
    }
    let progress = Progress::start(
        end.div_ceil(1_000_000_000),
        "rtt",
        move || clock.now_ns() / 1_000_000_000,
        rounds_all,
    );
    let mut hist = LatencyHist::default();
    let (mut rounds, mut lost) = (0u64, 0u64);
    for p in pingers {
        if let Ok((h, r, l)) = p.await {
            hist.merge(&h);
            rounds += r;
            lost += l;
        }
    }
    progress.finish();
    let elapsed = (clock.now_ns().min(end).saturating_sub(warm)).max(1) as f64 / 1e9;
    for c in &closers {
        c.close();
    }
    let mut rep = Report::new("pingpong", targets.iter().map(|(n, _)| n.clone()).collect());
    rep.config
        .put("pairs", a.pairs)
        .put("size", a.size as u64)
        .put("duration_s", a.duration.as_secs_f64())
        .put("warmup_s", a.warmup.as_secs_f64())
        .put("timeout_s", a.timeout.as_secs_f64())
        .put("tailscale_writes", setup.per_frame)
        .put("websocket", setup.websocket);
    rep.elapsed_s = r3(elapsed);
    rep.results
        .put("round_trips", rounds)
        .put("round_trips_per_s", r3(rounds as f64 / elapsed))
        .put("lost", lost)
        .put(
            "loss_pct",
            r3(if rounds + lost == 0 { 0.0 } else { 100.0 * lost as f64 / (rounds + lost) as f64 }),
        );
    rep.latency_us = hist.summary();
    rep.distribution = hist.distribution();
    rep.timeline = timeline.counts();
    if stop.is_cancelled() {
        rep.notes.push("interrupted: figures cover the time run".into());
    }
    Ok(rep)
}

/// B's side: send every packet back to whoever sent it.
async fn echo(mut rx: DerpReceiver, tx: DerpSender) {
    while let Ok(m) = rx.recv().await {
        if let ServerToClient::RecvPacket { src, data } = m {
            if tx.send_packet(src, data).await.is_err() {
                break;
            }
        }
    }
}

struct Pinger {
    tx: DerpSender,
    rx: DerpReceiver,
    dst: NodePublic,
    me: u32,
    size: usize,
    timeout: std::time::Duration,
    clock: Clock,
    warm: u64,
    end: u64,
}

impl Pinger {
    /// Returns (histogram of measured round trips, round trips, lost).
    async fn run(
        mut self,
        stop: CancellationToken,
        timeline: Arc<Timeline>,
        rounds_all: Arc<AtomicU64>,
    ) -> (LatencyHist, u64, u64) {
        let mut arena = PayloadArena::new(self.size);
        let mut hist = LatencyHist::default();
        let (mut rounds, mut lost) = (0u64, 0u64);
        let mut seq = 0u64;
        'outer: while !stop.is_cancelled() {
            let t0 = self.clock.now_ns();
            if t0 >= self.end {
                break;
            }
            let p = arena.make(Header { seq, sent_ns: t0, sender: self.me });
            if self.tx.send_packet(self.dst, p).await.is_err() {
                break;
            }
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                let r = tokio::select! {
                    r = tokio::time::timeout_at(deadline, self.rx.recv()) => r,
                    _ = stop.cancelled() => break 'outer,
                };
                match r {
                    Err(_) => {
                        if t0 >= self.warm {
                            lost += 1;
                        }
                        break;
                    }
                    Ok(Err(_)) => break 'outer,
                    Ok(Ok(ServerToClient::RecvPacket { data, .. })) => match Header::parse(&data) {
                        Some(h) if h.seq == seq && h.sender == self.me => {
                            let now = self.clock.now_ns();
                            if t0 >= self.warm {
                                hist.record_ns(now - t0);
                                rounds += 1;
                            }
                            timeline.add(now, 1);
                            rounds_all.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        _ => continue, // a late answer to an earlier (lost) round
                    },
                    Ok(Ok(_)) => continue,
                }
            }
            seq += 1;
        }
        (hist, rounds, lost)
    }
}
