//! throughput / mesh / fleet: N sender→receiver pairs. Sender i talks to receiver i; with several
//! targets, sender i is on target i mod T and its receiver on target (i+1) mod T, so every packet
//! crosses between servers (a region's mesh, or regions of a fleet) when T > 1.
//!
//! Each payload carries a sequence number and its send time ([`crate::payload`]). In rate mode the
//! time written is the *intended* send time from the schedule, so a stalled sender's late packets
//! show the delay (coordinated omission corrected). Only packets whose send time falls inside the
//! measurement window (after the warmup) count, on both sides.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use derpfleet_client::{DerpReceiver, DerpSender, DerpTarget};
use derpfleet_proto::msg::ServerToClient;
use derpfleet_proto::NodePublic;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{connect_all, Client, ClientSetup};
use crate::cli::FlowArgs;
use crate::payload::{Clock, Header, PayloadArena};
use crate::progress::Progress;
use crate::report::{r3, Report};
use crate::stats::{LatencyHist, Timeline};
use crate::sys::CpuMeter;

/// The measurement window, in ns of the run's clock.
#[derive(Clone, Copy)]
pub struct Window {
    /// first counted send time (end of the warmup)
    pub start: u64,
    /// first send time no longer counted
    pub end: u64,
}

impl Window {
    /// A send time inside the window.
    pub fn contains(&self, ns: u64) -> bool {
        ns >= self.start && ns < self.end
    }
}

/// Runs the scenario named `name` (throughput, mesh or fleet).
pub async fn run(
    name: &str,
    a: &FlowArgs,
    setup: &ClientSetup,
    relay_pids: &[u32],
    targets: &[(String, DerpTarget)],
    stop: CancellationToken,
) -> Result<Report> {
    let t = targets.len();
    let pairs = a.pairs as usize;
    let mut which = Vec::with_capacity(2 * pairs);
    for i in 0..pairs {
        which.push(i % t);
        which.push((i + 1) % t);
    }
    let clients = connect_all(targets, which, setup).await?;
    // Let the relay(s) settle registrations before traffic starts (mesh peers learn of receivers).
    tokio::time::sleep(Duration::from_millis(if t > 1 { 500 } else { 100 })).await;

    let mut run = Pairs::start(clients, a.warmup, a.duration, relay_pids, false);
    let (clock, win) = (run.clock, run.win);
    let mut senders = Vec::new();
    for (i, (tx, dst)) in run.take_senders().into_iter().enumerate() {
        senders.push(tokio::spawn(send_loop(
            tx,
            dst,
            i as u32,
            a.size,
            a.rate,
            clock,
            win,
            stop.clone(),
            run.sent_all.clone(),
        )));
    }
    let progress = run.progress();
    let mut sent = 0u64;
    let mut lag = LatencyHist::default();
    for s in senders {
        if let Ok((n, h)) = s.await {
            sent += n;
            lag.merge(&h);
        }
    }
    let mut rep = run.finish(name, targets, sent, a.size, a.rate.is_some().then_some(&lag), &stop).await;
    progress.finish();
    rep.config
        .put("pairs", a.pairs)
        .put("size", a.size as u64)
        .put("rate_per_sender", a.rate.map(serde_json::Value::from).unwrap_or(serde_json::Value::Null))
        .put("duration_s", a.duration.as_secs_f64())
        .put("warmup_s", a.warmup.as_secs_f64())
        .put("tailscale_writes", setup.per_frame)
        .put("websocket", setup.websocket);
    Ok(rep)
}

/// Sender→receiver pairs with their receiving tasks running: the part of a packet run that
/// `throughput`/`mesh`/`fleet` and `many` share (windows, counting, the drain, the report).
pub struct Pairs {
    /// the run's clock (started by [`Pairs::start`])
    pub clock: Clock,
    /// the measurement window
    pub win: Window,
    /// packets sent inside the window so far (for the progress bar)
    pub sent_all: Arc<AtomicU64>,
    senders: Vec<(DerpSender, NodePublic)>,
    timeline: Arc<Timeline>,
    received_all: Arc<AtomicU64>,
    /// Each pair's receiving tasks, adjacent: one per direction.
    receivers: Vec<JoinHandle<RecvResult>>,
    /// Directions per pair: 1, or 2 with `both_ways`.
    directions: usize,
    closers: Vec<DerpSender>,
    relay_cpu: Vec<CpuMeter>,
}

impl Pairs {
    /// Pairs up `clients` (sender, receiver, sender, receiver, ...), starts reading on every
    /// connection and the clock, with the window after `warmup` for `duration`. The CPU of
    /// `relay_pids` is metered from here to the end of [`Pairs::finish`]: traffic only, without
    /// the connection set-up (thousands of handshakes would otherwise count as packet cost).
    /// `both_ways`: each receiver is also a sender to its pair's sender (after every forward
    /// sender in [`Pairs::take_senders`]), whose packets are counted like the others.
    pub fn start(
        clients: Vec<Client>,
        warmup: Duration,
        duration: Duration,
        relay_pids: &[u32],
        both_ways: bool,
    ) -> Self {
        let clock = Clock::start();
        let warm = warmup.as_nanos() as u64;
        let win = Window { start: warm, end: warm + duration.as_nanos() as u64 };
        let timeline = Arc::new(Timeline::new((win.end / 1_000_000_000) as usize + 8));
        let received_all = Arc::new(AtomicU64::new(0));
        let mut run = Pairs {
            clock,
            win,
            sent_all: Arc::new(AtomicU64::new(0)),
            senders: Vec::new(),
            timeline,
            received_all,
            receivers: Vec::new(),
            directions: if both_ways { 2 } else { 1 },
            closers: Vec::new(),
            relay_cpu: relay_pids.iter().filter_map(|&p| CpuMeter::start(p)).collect(),
        };
        let mut backward = Vec::new();
        let mut it = clients.into_iter();
        while let (Some(s), Some(r)) = (it.next(), it.next()) {
            run.closers.push(s.tx.clone());
            run.closers.push(r.tx.clone());
            if both_ways {
                backward.push((r.tx.clone(), s.public));
                run.receivers.push(run.count_received(s.rx));
            } else {
                // The sender's receiving half must stay read (dropping it closes the connection).
                tokio::spawn(drain(s.rx));
            }
            run.senders.push((s.tx, r.public));
            run.receivers.push(run.count_received(r.rx));
        }
        run.senders.extend(backward);
        run
    }

    /// Reads `rx` in a task of its own, counting its packets into the run.
    fn count_received(&self, rx: DerpReceiver) -> JoinHandle<RecvResult> {
        tokio::spawn(recv_loop(rx, self.clock, self.win, self.timeline.clone(), self.received_all.clone()))
    }

    /// The sending halves with the key of each one's receiver, in pair order.
    pub fn take_senders(&mut self) -> Vec<(DerpSender, NodePublic)> {
        std::mem::take(&mut self.senders)
    }

    /// A progress bar over the run's seconds, counting received packets.
    pub fn progress(&self) -> Progress {
        let clock = self.clock;
        Progress::start(
            self.win.end.div_ceil(1_000_000_000),
            "pkt",
            move || clock.now_ns() / 1_000_000_000,
            self.received_all.clone(),
        )
    }

    /// After the senders stopped: waits for packets in flight (≤ 2 s, until the count stops
    /// moving), closes every connection and reports. `sent` counts packets sent inside the
    /// window; `lag` (paced runs) how late the senders ran behind their schedule.
    pub async fn finish(
        self,
        name: &str,
        targets: &[(String, DerpTarget)],
        sent: u64,
        size: usize,
        lag: Option<&LatencyHist>,
        stop: &CancellationToken,
    ) -> Report {
        let (clock, win) = (self.clock, self.win);
        let drain_end = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut last = self.received_all.load(Ordering::Relaxed);
        while tokio::time::Instant::now() < drain_end && !stop.is_cancelled() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.received_all.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
        }
        let relay_cpu_s: Option<f64> =
            if self.relay_cpu.is_empty() { None } else { self.relay_cpu.iter().map(CpuMeter::seconds).sum() };
        let end_ns = clock.now_ns().min(win.end).max(win.start + 1);
        let stopped_early = stop.is_cancelled();
        for c in &self.closers {
            c.close();
        }
        let mut hist = LatencyHist::default();
        let (mut received, mut reordered, mut foreign, mut last_ns) = (0u64, 0u64, 0u64, 0u64);
        let pairs = (self.receivers.len() / self.directions) as u64;
        // A pair delivered when each of its directions received a packet of the window.
        let (mut delivered, mut pair_directions) = (0u64, 0usize);
        for (i, r) in self.receivers.into_iter().enumerate() {
            if let Ok(res) = r.await {
                pair_directions += usize::from(res.received > 0);
                received += res.received;
                last_ns = last_ns.max(res.last_ns);
                reordered += res.reordered;
                foreign += res.foreign;
                hist.merge(&res.hist);
            }
            if (i + 1) % self.directions == 0 {
                delivered += u64::from(pair_directions == self.directions);
                pair_directions = 0;
            }
        }

        // Rates are over the window, or over the time the window's packets really took to get
        // through when the senders fell behind their schedule (or the relay held them back).
        let window_s = (win.end - win.start) as f64 / 1e9;
        let through_s = last_ns.saturating_sub(win.start) as f64 / 1e9;
        let elapsed = if stopped_early { (end_ns - win.start) as f64 / 1e9 } else { window_s.max(through_s) };
        let mut rep = Report::new(name, targets.iter().map(|(n, _)| n.clone()).collect());
        rep.elapsed_s = r3(elapsed);
        rep.window_s = Some((win.start as f64 / 1e9, win.end as f64 / 1e9));
        rep.relay_cpu_traffic_s = relay_cpu_s;
        let loss = if sent == 0 { 0.0 } else { 100.0 * sent.saturating_sub(received) as f64 / sent as f64 };
        rep.results
            .put("sent_packets", sent)
            .put("received_packets", received)
            .put("sent_pps", r3(sent as f64 / elapsed))
            .put("received_pps", r3(received as f64 / elapsed))
            .put("sent_mbps", r3(sent as f64 * size as f64 * 8.0 / elapsed / 1e6))
            .put("received_mbps", r3(received as f64 * size as f64 * 8.0 / elapsed / 1e6))
            .put("loss_pct", r3(loss))
            .put("pairs_connected", pairs)
            .put("pairs_delivered", delivered)
            .put("reordered_packets", reordered)
            .put(
                "reordered_pct",
                r3(if received == 0 { 0.0 } else { 100.0 * reordered as f64 / received as f64 }),
            );
        if foreign > 0 {
            rep.results.put("unexpected_frames", foreign);
        }
        rep.latency_us = hist.summary();
        rep.distribution = hist.distribution();
        rep.timeline = self.timeline.counts();
        if let Some(l) = lag.and_then(|l| l.summary()) {
            // How late the sender ran behind its schedule (timer granularity, backpressure): this
            // is included in the one-way latency.
            rep.results.put("send_lag_p50_us", l.p50_us).put("send_lag_p99_us", l.p99_us);
            rep.notes.push(
                "one-way latency measured from the intended send time (coordinated omission corrected)"
                    .into(),
            );
        }
        if stopped_early {
            rep.notes.push("interrupted: figures cover the time run".into());
        } else if through_s > window_s * 1.05 + 0.05 {
            rep.notes.push(format!(
                "the window's packets took {through_s:.2} s to get through instead of {window_s:.2} s: \
                 the offered load was not sustained; rates are over {through_s:.2} s"
            ));
        }
        if let (Some(_), Some(l)) = (lag, &rep.latency_us) {
            if l.p50_us > 5_000.0 {
                rep.notes.push(format!(
                    "one-way p50 {:.1} ms: packets queued (the relay or this tool was short of CPU); a \
                     relay that falls behind reads several frames per syscall, so its CPU per packet is \
                     lower than when it keeps up: compare cost figures only between runs that kept up",
                    l.p50_us / 1e3
                ));
            }
        }
        if received > sent {
            rep.notes.push("more packets received than sent in the window (duplicates?)".into());
        }
        rep
    }
}

#[allow(clippy::too_many_arguments)]
async fn send_loop(
    tx: DerpSender,
    dst: NodePublic,
    sender: u32,
    size: usize,
    rate: Option<u64>,
    clock: Clock,
    win: Window,
    stop: CancellationToken,
    sent_all: Arc<AtomicU64>,
) -> (u64, LatencyHist) {
    let mut arena = PayloadArena::new(size);
    let mut lag = LatencyHist::default();
    let mut counted = 0u64;
    let mut seq = 0u64;
    let mut pending_progress = 0u64;
    match rate {
        None => loop {
            let now = clock.now_ns();
            if now >= win.end || (seq.is_multiple_of(64) && stop.is_cancelled()) {
                break;
            }
            let p = arena.make(Header { seq, sent_ns: now, sender });
            if tx.send_packet(dst, p).await.is_err() {
                break;
            }
            seq += 1;
            if win.contains(now) {
                counted += 1;
                pending_progress += 1;
                if pending_progress == 256 {
                    sent_all.fetch_add(pending_progress, Ordering::Relaxed);
                    pending_progress = 0;
                }
            }
        },
        Some(rate) => {
            let interval = 1e9 / rate as f64;
            // Senders start spread over one interval so they do not all fire at once.
            let offset = (sender as f64 * 0.618_033_988 % 1.0) * interval;
            let due = |i: u64| (offset + i as f64 * interval) as u64;
            'outer: loop {
                let now = clock.now_ns();
                while due(seq) <= now {
                    let at = due(seq);
                    if at >= win.end || stop.is_cancelled() {
                        break 'outer;
                    }
                    let p = arena.make(Header { seq, sent_ns: at, sender });
                    if tx.send_packet(dst, p).await.is_err() {
                        break 'outer;
                    }
                    seq += 1;
                    if win.contains(at) {
                        counted += 1;
                        pending_progress += 1;
                        lag.record_ns(clock.now_ns().saturating_sub(at));
                    }
                }
                if due(seq) >= win.end {
                    break;
                }
                sent_all.fetch_add(std::mem::take(&mut pending_progress), Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep_until(clock.at(due(seq)).into()) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    sent_all.fetch_add(pending_progress, Ordering::Relaxed);
    (counted, lag)
}

/// Reads and discards frames (keepalives, pings, PeerGone) until the connection closes.
pub async fn drain(mut rx: DerpReceiver) {
    while rx.recv().await.is_ok() {}
}

/// What one receiving connection counted.
pub struct RecvResult {
    received: u64,
    reordered: u64,
    foreign: u64,
    hist: LatencyHist,
    /// When the last packet sent inside the window arrived (ns of the run's clock).
    last_ns: u64,
}

async fn recv_loop(
    mut rx: DerpReceiver,
    clock: Clock,
    win: Window,
    timeline: Arc<Timeline>,
    received_all: Arc<AtomicU64>,
) -> RecvResult {
    let mut res =
        RecvResult { received: 0, reordered: 0, foreign: 0, hist: LatencyHist::default(), last_ns: 0 };
    let mut max_seq: Option<u64> = None;
    let (mut bucket_sec, mut bucket_n, mut flushed_ns) = (0u64, 0u64, 0u64);
    while let Ok(m) = rx.recv().await {
        let ServerToClient::RecvPacket { data, .. } = m else { continue };
        let Some(h) = Header::parse(&data) else {
            res.foreign += 1;
            continue;
        };
        let now = clock.now_ns();
        let sec = now / 1_000_000_000;
        // Shared counters are updated in batches (per second, 1024 packets or 50 ms).
        if sec != bucket_sec || bucket_n >= 1024 || now - flushed_ns > 50_000_000 {
            timeline.add(bucket_sec * 1_000_000_000, bucket_n);
            received_all.fetch_add(bucket_n, Ordering::Relaxed);
            bucket_sec = sec;
            bucket_n = 0;
            flushed_ns = now;
        }
        bucket_n += 1;
        match max_seq {
            Some(m) if h.seq < m => res.reordered += 1,
            _ => max_seq = Some(h.seq),
        }
        if win.contains(h.sent_ns) {
            res.received += 1;
            res.last_ns = now;
            res.hist.record_ns(now.saturating_sub(h.sent_ns));
        }
    }
    timeline.add(bucket_sec * 1_000_000_000, bucket_n);
    received_all.fetch_add(bucket_n, Ordering::Relaxed);
    res
}
