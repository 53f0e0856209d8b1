//! stun: Binding requests against a responder, open loop (`--rate` in total) or closed loop
//! (`--window` unanswered requests per socket). Built on `derpfleet_stun::message`.
//!
//! Each request's transaction ID is a per-socket prefix (4 bytes) and its (intended) send time
//! (8 bytes, ns of the run's clock), so answers need no lookup table: latency is the receive time
//! minus the time in the ID, and answers from another run or socket are counted as invalid.
//! For the responder's peak rate with batched syscalls see the STUN crate's `stun-bench` example.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use derpfleet_stun::message::{build_request, parse_response, TxId};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use crate::cli::StunArgs;
use crate::payload::Clock;
use crate::progress::Progress;
use crate::report::{r3, Report};
use crate::stats::{LatencyHist, Timeline};

/// Closed loop: with no answer for this long, outstanding requests are written off as lost.
const STALL_NS: u64 = 50_000_000;
/// After sending stops, how long to wait for late answers.
const DRAIN: Duration = Duration::from_millis(500);

#[derive(Clone, Copy)]
struct Run {
    clock: Clock,
    start: u64,
    end: u64,
}

#[derive(Default)]
struct SockResult {
    sent: u64,
    answered: u64,
    invalid: u64,
    hist: LatencyHist,
    lag: LatencyHist,
}

fn txid(prefix: u32, ts: u64) -> TxId {
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&prefix.to_le_bytes());
    id[4..].copy_from_slice(&ts.to_le_bytes());
    TxId(id)
}

/// Checks an answer: ours (prefix) → the send time in its ID.
fn answer_ts(b: &[u8], prefix: u32) -> Option<u64> {
    let (id, _) = parse_response(b).ok()?;
    (id.0[..4] == prefix.to_le_bytes()).then(|| u64::from_le_bytes(id.0[4..].try_into().unwrap_or_default()))
}

/// Runs the scenario.
pub async fn run(a: &StunArgs, stop: CancellationToken) -> Result<Report> {
    let bind: SocketAddr = if a.server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let clock = Clock::start();
    let warm = a.warmup.as_nanos() as u64;
    let run = Run { clock, start: warm, end: warm + a.duration.as_nanos() as u64 };
    let timeline = Arc::new(Timeline::new((run.end / 1_000_000_000) as usize + 4));
    let answered_all = Arc::new(AtomicU64::new(0));
    let base: u32 = rand::random();
    let mut tasks = Vec::new();
    for i in 0..a.sockets {
        let sock = UdpSocket::bind(bind).await.context("binding a UDP socket")?;
        sock.connect(a.server).await.with_context(|| format!("connecting the UDP socket to {}", a.server))?;
        let sock = Arc::new(sock);
        let prefix = base.wrapping_add(i);
        let (tl, ans, st) = (timeline.clone(), answered_all.clone(), stop.clone());
        tasks.push(match a.rate {
            Some(rate) => {
                let share = rate / a.sockets as u64 + u64::from((i as u64) < rate % a.sockets as u64);
                tokio::spawn(open_loop(sock, prefix, share, run, st, tl, ans))
            }
            None => tokio::spawn(closed_loop(sock, prefix, a.window as u64, run, st, tl, ans)),
        });
    }
    let progress = Progress::start(
        run.end.div_ceil(1_000_000_000),
        "answers",
        move || clock.now_ns() / 1_000_000_000,
        answered_all,
    );
    let mut total = SockResult::default();
    for t in tasks {
        let r = t.await.context("STUN socket task")??;
        total.sent += r.sent;
        total.answered += r.answered;
        total.invalid += r.invalid;
        total.hist.merge(&r.hist);
        total.lag.merge(&r.lag);
    }
    progress.finish();
    let elapsed = (clock.now_ns().min(run.end).saturating_sub(run.start)).max(1) as f64 / 1e9;
    let elapsed = if stop.is_cancelled() { elapsed } else { a.duration.as_secs_f64() };
    let mut rep = Report::new("stun", vec![a.server.to_string()]);
    rep.config
        .put("rate", a.rate.map(serde_json::Value::from).unwrap_or_default())
        .put("sockets", a.sockets)
        .put("window", a.window)
        .put("duration_s", a.duration.as_secs_f64())
        .put("warmup_s", a.warmup.as_secs_f64());
    rep.elapsed_s = r3(elapsed);
    let lost = total.sent.saturating_sub(total.answered);
    rep.results
        .put("sent", total.sent)
        .put("answered", total.answered)
        .put("invalid", total.invalid)
        .put("sent_per_s", r3(total.sent as f64 / elapsed))
        .put("answered_per_s", r3(total.answered as f64 / elapsed))
        .put("loss_pct", r3(if total.sent == 0 { 0.0 } else { 100.0 * lost as f64 / total.sent as f64 }));
    rep.latency_us = total.hist.summary();
    rep.distribution = total.hist.distribution();
    rep.timeline = timeline.counts();
    if let (Some(_), Some(l)) = (a.rate, total.lag.summary()) {
        rep.results.put("send_lag_p50_us", l.p50_us).put("send_lag_p99_us", l.p99_us);
        rep.notes
            .push("latency measured from the intended send time (coordinated omission corrected)".into());
    }
    Ok(rep)
}

/// Sends `rate` requests/s on schedule; a separate receiver counts answers.
async fn open_loop(
    sock: Arc<UdpSocket>,
    prefix: u32,
    rate: u64,
    run: Run,
    stop: CancellationToken,
    tl: Arc<Timeline>,
    ans: Arc<AtomicU64>,
) -> Result<SockResult> {
    let done = CancellationToken::new();
    let recv = tokio::spawn(receive(sock.clone(), prefix, run, done.clone(), tl, ans));
    let mut sent = 0u64;
    let mut lag = LatencyHist::default();
    if rate > 0 {
        let interval = 1e9 / rate as f64;
        let mut i = 0u64;
        'outer: loop {
            let now = run.clock.now_ns();
            loop {
                let at = (i as f64 * interval) as u64;
                if at > now {
                    break;
                }
                if at >= run.end || stop.is_cancelled() {
                    break 'outer;
                }
                // A full socket buffer drops the request (counted as lost), as the wire would.
                let _ = sock.send(&build_request(txid(prefix, at))).await;
                if at >= run.start {
                    sent += 1;
                    lag.record_ns(run.clock.now_ns().saturating_sub(at));
                }
                i += 1;
            }
            let next = (i as f64 * interval) as u64;
            if next >= run.end {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(run.clock.at(next).into()) => {}
                _ = stop.cancelled() => break,
            }
        }
    }
    done.cancel();
    let mut r = recv.await.context("STUN receiver")?;
    r.sent = sent;
    r.lag = lag;
    Ok(r)
}

/// Counts answers until `done` and then [`DRAIN`] without one.
async fn receive(
    sock: Arc<UdpSocket>,
    prefix: u32,
    run: Run,
    done: CancellationToken,
    tl: Arc<Timeline>,
    ans: Arc<AtomicU64>,
) -> SockResult {
    let mut r = SockResult::default();
    let mut buf = [0u8; 1500];
    loop {
        let got = tokio::select! {
            g = tokio::time::timeout(DRAIN, sock.recv(&mut buf)) => g,
            _ = done.cancelled(), if !done.is_cancelled() => continue,
        };
        match got {
            Ok(Ok(n)) => note_answer(&buf[..n], prefix, run, &mut r, &tl, &ans),
            Ok(Err(_)) => {} // e.g. ECONNREFUSED from an ICMP error: the request is lost
            Err(_) if done.is_cancelled() => break,
            Err(_) => {}
        }
    }
    r
}

fn note_answer(b: &[u8], prefix: u32, run: Run, r: &mut SockResult, tl: &Timeline, ans: &AtomicU64) {
    match answer_ts(b, prefix) {
        Some(ts) => {
            let now = run.clock.now_ns();
            if ts >= run.start && ts < run.end {
                r.answered += 1;
                r.hist.record_ns(now.saturating_sub(ts));
            }
            tl.add(now, 1);
            ans.fetch_add(1, Ordering::Relaxed);
        }
        None => r.invalid += 1,
    }
}

/// Keeps `window` requests unanswered; a stall writes them off.
async fn closed_loop(
    sock: Arc<UdpSocket>,
    prefix: u32,
    window: u64,
    run: Run,
    stop: CancellationToken,
    tl: Arc<Timeline>,
    ans: Arc<AtomicU64>,
) -> Result<SockResult> {
    let mut r = SockResult::default();
    let mut buf = [0u8; 1500];
    let mut outstanding = 0u64;
    let mut sending = true;
    loop {
        let now = run.clock.now_ns();
        if now >= run.end || stop.is_cancelled() {
            sending = false;
        }
        while sending && outstanding < window {
            let ts = run.clock.now_ns();
            let _ = sock.send(&build_request(txid(prefix, ts))).await;
            outstanding += 1;
            if ts >= run.start {
                r.sent += 1;
            }
        }
        let wait = if sending { Duration::from_nanos(STALL_NS) } else { DRAIN };
        match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                note_answer(&buf[..n], prefix, run, &mut r, &tl, &ans);
                outstanding = outstanding.saturating_sub(1);
            }
            Ok(Err(_)) => outstanding = outstanding.saturating_sub(1),
            Err(_) if !sending => break,
            Err(_) => outstanding = 0,
        }
        if !sending && outstanding == 0 {
            break;
        }
    }
    Ok(r)
}
