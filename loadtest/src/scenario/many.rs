//! many: thousands of sender→receiver pairs on one server, each sender on its own paced schedule
//! of a few packets a second, every frame written on its own as Tailscale's client writes them.
//! This is the load a real fleet carries (many clients, little traffic each), where a relay's
//! per-packet overhead (wake-ups, hand-offs, syscalls) shows; the headline is the relay's CPU per
//! delivered packet (`--relay-pid`).
//!
//! Cheap enough to hold tens of thousands of connections in one process: no task per sender.
//! One pacer task keeps every sender's next due time in a heap and, when it comes, hands the
//! packet to that connection's writer without waiting (`try_send`). A full send queue drops the
//! packet and counts it (`local_drops`), as tailscaled drops when its DERP write channel is
//! full; such packets count as not sent. Each connection still has its writer and reader task
//! (the client crate's connection), which sleep between packets.
//!
//! `--both-ways` makes every receiver a sender too, back to its pair's sender at the same rate:
//! real tunnels carry traffic both ways, so each connection's TCP ACKs ride on data. One-way (the
//! default) is the harder case for a relay: every packet read from a sender that never receives
//! costs the relay's kernel a pure ACK.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;

use anyhow::Result;
use derpfleet_client::{DerpSender, DerpTarget, SendError};
use derpfleet_proto::NodePublic;
use tokio_util::sync::CancellationToken;

use super::flow::{Pairs, Window};
use super::{connect_all, ClientSetup};
use crate::cli::ManyArgs;
use crate::payload::{Clock, Header, PayloadArena};
use crate::report::Report;
use crate::stats::LatencyHist;

/// Frames that may wait per connection: tailscaled's per-region DERP write channel holds 32.
const SEND_QUEUE: usize = 32;

/// Runs the scenario.
pub async fn run(
    a: &ManyArgs,
    websocket: bool,
    relay_pids: &[u32],
    targets: &[(String, DerpTarget)],
    stop: CancellationToken,
) -> Result<Report> {
    let mut notes = Vec::new();
    let pairs = a.pairs as usize;
    let sources: Vec<IpAddr> = a.source_ips.as_ref().map(|s| s.0.clone()).unwrap_or_default();
    let conns = 2 * pairs as u64;
    match crate::sys::raise_nofile_limit() {
        Ok(limit) if conns + 64 > limit => anyhow::bail!(
            "{pairs} pairs need {conns} connections but this process may open {limit} files \
             (raise `ulimit -n` or use fewer pairs)"
        ),
        Ok(_) => {}
        Err(e) => notes.push(format!("could not raise the open-file limit: {e}")),
    }
    if conns > super::connections::PORTS_PER_SOURCE * sources.len().max(1) as u64 {
        notes.push(format!(
            "{conns} connections over {} source address(es) exceeds ~{} ephemeral ports each; \
             use --source-ips 127.0.0.2-127.0.0.N",
            sources.len().max(1),
            super::connections::PORTS_PER_SOURCE
        ));
    }
    let setup = ClientSetup {
        websocket,
        per_frame: true,
        send_queue: SEND_QUEUE,
        sources: sources.clone(),
        concurrency: a.concurrency as usize,
    };
    let clients = connect_all(targets, vec![0; 2 * pairs], &setup).await?;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let mut run = Pairs::start(clients, a.warmup, a.duration, relay_pids, a.both_ways);
    let progress = run.progress();
    let pacer =
        Pacer { senders: run.take_senders(), rate: a.rate, size: a.size, clock: run.clock, win: run.win };
    let sent_all = run.sent_all.clone();
    let paced = tokio::spawn(pacer.run(stop.clone(), sent_all));
    let (sent, local_drops, lag) = paced.await.unwrap_or_default();
    let mut rep = run.finish("many", targets, sent, a.size, Some(&lag), &stop).await;
    progress.finish();
    rep.results.put("local_drops", local_drops);
    rep.config
        .put("pairs", a.pairs)
        .put("both_ways", a.both_ways)
        .put("size", a.size as u64)
        .put("rate_per_sender", a.rate)
        .put("duration_s", a.duration.as_secs_f64())
        .put("warmup_s", a.warmup.as_secs_f64())
        .put("source_ips", sources.len() as u64)
        .put("tailscale_writes", true)
        .put("websocket", websocket)
        .put("send_queue", SEND_QUEUE as u64);
    if local_drops > 0 {
        rep.notes.push(format!(
            "{local_drops} packets dropped here, before the relay, because a connection's send queue \
             ({SEND_QUEUE} frames) was full: the load generator or its CPU fell behind"
        ));
    }
    rep.notes.extend(notes);
    Ok(rep)
}

/// Every sender's schedule in one task.
struct Pacer {
    senders: Vec<(DerpSender, NodePublic)>,
    rate: u64,
    size: usize,
    clock: Clock,
    win: Window,
}

impl Pacer {
    /// Sends until the window ends; returns (packets sent inside the window, packets dropped
    /// locally inside the window, send lag).
    async fn run(
        self,
        stop: CancellationToken,
        sent_all: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> (u64, u64, LatencyHist) {
        let interval = 1e9 / self.rate as f64;
        let mut arena = PayloadArena::new(self.size);
        let mut lag = LatencyHist::default();
        let (mut sent, mut dropped) = (0u64, 0u64);
        // (due ns, sender index, sequence number); senders start spread over one interval.
        let mut heap: BinaryHeap<Reverse<(u64, u32, u64)>> = (0..self.senders.len())
            .map(|i| Reverse((((i as f64 * 0.618_033_988) % 1.0 * interval) as u64, i as u32, 0)))
            .collect();
        let offset = |i: u32| (i as f64 * 0.618_033_988) % 1.0 * interval;
        loop {
            let now = self.clock.now_ns();
            let mut batch = 0u64;
            while let Some(&Reverse((due, i, seq))) = heap.peek() {
                if due > now {
                    break;
                }
                heap.pop();
                if due >= self.win.end {
                    continue;
                }
                let (tx, dst) = &self.senders[i as usize];
                let p = arena.make(Header { seq, sent_ns: due, sender: i });
                match tx.try_send_packet(*dst, p) {
                    Ok(()) if self.win.contains(due) => {
                        sent += 1;
                        batch += 1;
                        lag.record_ns(now.saturating_sub(due));
                    }
                    Ok(()) => {}
                    Err(SendError::Full) if self.win.contains(due) => dropped += 1,
                    Err(SendError::Full) => {}
                    // The connection is gone: this sender stops (a relay closing it shows in its metrics).
                    Err(SendError::Closed) => continue,
                }
                let next = (offset(i) + (seq + 1) as f64 * interval) as u64;
                heap.push(Reverse((next, i, seq + 1)));
            }
            sent_all.fetch_add(batch, std::sync::atomic::Ordering::Relaxed);
            let Some(&Reverse((next, _, _))) = heap.peek() else { break };
            if stop.is_cancelled() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(self.clock.at(next).into()) => {}
                _ = stop.cancelled() => break,
            }
        }
        (sent, dropped, lag)
    }
}
