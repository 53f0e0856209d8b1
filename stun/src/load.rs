//! A STUN load generator: several client sockets send Tailscale-style Binding requests in batches
//! and count valid answers. Used by the `stun-bench` example and reusable by the load-test tool.
//!
//! Two ways to offer load:
//! - open loop (`rate > 0`): a fixed total request rate, to check the responder keeps up with it;
//! - closed loop (`rate == 0`): each socket keeps at most `window` requests unanswered, which finds
//!   the responder's maximum without flooding socket buffers (lost requests are written off after
//!   [`STALL`] without progress).
//!
//! An answer counts as valid when it parses, its transaction ID carries this run's per-socket
//! prefix, and the mapped address equals the socket's own address.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::batch::{recv_batch, send_batch, RecvBatch, SendBatch, BATCH};
use crate::message::{build_request, parse_response, TxId, REQUEST_LEN};

/// With no answer for this long, a closed-loop sender writes its outstanding requests off as lost.
pub const STALL: Duration = Duration::from_millis(50);

/// After the sending window, how long receivers wait at most for answers still in flight.
pub const DRAIN: Duration = Duration::from_secs(1);

/// What load to offer.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Responder address.
    pub server: SocketAddr,
    /// Local address to bind client sockets to (port 0).
    pub bind: SocketAddr,
    /// Client sockets (each has a sender and a receiver task).
    pub sockets: usize,
    /// Total requests per second across sockets; 0 = closed loop.
    pub rate: u64,
    /// Closed loop: unanswered requests allowed per socket.
    pub window: u64,
    /// Measurement length.
    pub duration: Duration,
}

/// Totals over the measurement.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: u64,
    /// Valid answers received.
    pub answered: u64,
    /// Datagrams received that were not valid answers to this run.
    pub invalid: u64,
    /// Measured wall time.
    pub elapsed: Duration,
}

impl LoadReport {
    /// Valid answers per second.
    pub fn answers_per_sec(&self) -> f64 {
        self.answered as f64 / self.elapsed.as_secs_f64()
    }

    /// Requests sent per second.
    pub fn sent_per_sec(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    answered: AtomicU64,
    invalid: AtomicU64,
    /// Signalled by the receiver after each batch, so a closed-loop sender refills promptly.
    progress: tokio::sync::Notify,
}

/// Runs the load for `cfg.duration` and returns the totals. Needs a Tokio runtime (multi-thread
/// to use several cores).
pub async fn run(cfg: &LoadConfig) -> io::Result<LoadReport> {
    let sockets = cfg.sockets.max(1);
    let end = Instant::now() + cfg.duration;
    let mut tasks = tokio::task::JoinSet::new();
    let mut all = Vec::new();
    for i in 0..sockets {
        let sock = Arc::new(UdpSocket::bind(cfg.bind).await?);
        sock.connect(cfg.server).await?;
        let counters = Arc::new(Counters::default());
        let prefix = (i as u32).to_be_bytes();
        let per_socket_rate = cfg.rate.div_ceil(sockets as u64);
        tasks.spawn(sender(sock.clone(), counters.clone(), prefix, per_socket_rate, cfg.window.max(1), end));
        tasks.spawn(receiver(sock, counters.clone(), prefix, end));
        all.push(counters);
    }
    let start = Instant::now();
    while let Some(res) = tasks.join_next().await {
        res.map_err(io::Error::other)??;
    }
    // Rates are per second of sending; answers still in flight at the end are counted too.
    let elapsed = end.saturating_duration_since(start);
    let mut report = LoadReport { elapsed, ..LoadReport::default() };
    for c in all {
        report.sent += c.sent.load(Ordering::Relaxed);
        report.answered += c.answered.load(Ordering::Relaxed);
        report.invalid += c.invalid.load(Ordering::Relaxed);
    }
    Ok(report)
}

async fn sender(
    sock: Arc<UdpSocket>,
    counters: Arc<Counters>,
    prefix: [u8; 4],
    rate: u64,
    window: u64,
    end: Instant,
) -> io::Result<()> {
    let server = sock.peer_addr()?;
    let mut batch = SendBatch::<REQUEST_LEN>::default();
    let mut seq: u64 = 0;
    let start = Instant::now();
    let mut written_off: u64 = 0;
    let mut last_progress = (Instant::now(), 0u64);
    while Instant::now() < end {
        let sent = counters.sent.load(Ordering::Relaxed);
        let allowed = if rate > 0 {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if due <= sent {
                tokio::time::sleep(Duration::from_micros(200)).await;
                continue;
            }
            due - sent
        } else {
            let answered = counters.answered.load(Ordering::Relaxed);
            if answered != last_progress.1 {
                last_progress = (Instant::now(), answered);
            }
            let outstanding = sent.saturating_sub(answered + written_off);
            if outstanding >= window {
                if last_progress.0.elapsed() > STALL {
                    written_off += outstanding;
                    last_progress.0 = Instant::now();
                } else {
                    tokio::select! {
                        _ = counters.progress.notified() => {}
                        _ = tokio::time::sleep(STALL) => {}
                    }
                }
                continue;
            }
            window - outstanding
        };
        let n = allowed.min(BATCH as u64) as usize;
        for _ in 0..n {
            let mut id = [0u8; 12];
            id[..4].copy_from_slice(&prefix);
            id[4..].copy_from_slice(&seq.to_be_bytes());
            seq += 1;
            batch.push(server, |buf| {
                buf.copy_from_slice(&build_request(TxId(id)));
                REQUEST_LEN
            });
        }
        while !batch.is_empty() {
            sock.writable().await?;
            match sock.try_io(Interest::WRITABLE, || send_batch(sock.as_fd(), &mut batch)) {
                Ok(k) => {
                    counters.sent.fetch_add(k as u64, Ordering::Relaxed);
                    batch.consume(k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // ECONNREFUSED from an earlier ICMP error on the connected socket: drop one, go on.
                Err(_) => batch.consume(1),
            }
        }
        // A socket is almost always writable, so without this a sender that cannot keep up with
        // its rate would never yield and starve the receivers sharing its worker thread.
        tokio::task::yield_now().await;
    }
    Ok(())
}

async fn receiver(
    sock: Arc<UdpSocket>,
    counters: Arc<Counters>,
    prefix: [u8; 4],
    end: Instant,
) -> io::Result<()> {
    let local = sock.local_addr()?;
    let mut batch = Box::<RecvBatch>::default();
    // Keep receiving past the end until every request is accounted for (or DRAIN passes), so
    // answers in flight are counted.
    let stop = end + DRAIN;
    loop {
        if Instant::now() >= end {
            let received =
                counters.answered.load(Ordering::Relaxed) + counters.invalid.load(Ordering::Relaxed);
            if received >= counters.sent.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(stop) => return Ok(()),
            _ = tokio::time::sleep_until(end), if Instant::now() < end => continue,
            ready = sock.readable() => { ready?; }
        }
        loop {
            match sock.try_io(Interest::READABLE, || recv_batch(sock.as_fd(), &mut batch)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
            let (mut ok, mut bad) = (0, 0);
            for pkt in batch.iter() {
                match parse_response(pkt.data) {
                    Ok((txid, mapped)) if txid.0[..4] == prefix && mapped == local => ok += 1,
                    _ => bad += 1,
                }
            }
            counters.answered.fetch_add(ok, Ordering::Relaxed);
            counters.invalid.fetch_add(bad, Ordering::Relaxed);
            counters.progress.notify_one();
        }
    }
}
