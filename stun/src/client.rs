//! Client side of a STUN Binding exchange, for netcheck and tests.
//!
//! Two shapes, because tailscaled sends STUN from its WireGuard socket (spec §7):
//! - [`binding`]: a socket used only for this exchange; it reads the socket itself.
//! - [`StunDemux`]: the socket belongs to someone else's receive loop, which hands every datagram to
//!   [`StunDemux::handle_packet`]; STUN replies are routed to the waiting request by transaction ID
//!   and everything else is left to the caller.
//!
//! Every retransmission uses a fresh transaction ID, so an answer's RTT is measured from the send it
//! actually answers (RFC 8489 would reuse the ID; here we want latency, not reliability).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::message::{build_request, is_stun, parse_response, TxId};

/// When to (re)send a request and how long to wait overall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPlan {
    /// Number of requests sent at most (≥ 1).
    pub sends: u32,
    /// Delay between consecutive sends.
    pub interval: Duration,
    /// Give up this long after the first send.
    pub timeout: Duration,
}

impl Default for RetryPlan {
    /// netcheck's full-report plan: 3 tries 100 ms apart, within its 3 s STUN phase.
    fn default() -> Self {
        RetryPlan { sends: 3, interval: Duration::from_millis(100), timeout: Duration::from_secs(3) }
    }
}

impl RetryPlan {
    /// Offset from the first send at which send number `n` (0-based) goes out.
    fn send_offset(&self, n: u32) -> Duration {
        self.interval.saturating_mul(n)
    }
}

/// A successful exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunAnswer {
    /// Our address as the server saw it (unmapped).
    pub mapped: SocketAddr,
    /// Time from the answered request's send to the reply.
    pub rtt: Duration,
    /// Where the reply came from.
    pub from: SocketAddr,
    /// The transaction ID the reply matched.
    pub txid: TxId,
}

/// Why no answer was obtained.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Sending or receiving failed at the socket level.
    #[error("STUN socket error: {0}")]
    Io(#[from] io::Error),
    /// No valid answer within the plan's timeout.
    #[error("no STUN answer within {0:?}")]
    Timeout(Duration),
}

/// Sends Binding requests to `server` on a socket nobody else reads, per `plan`, and returns the
/// first valid answer whose transaction ID matches one of ours. Other datagrams are ignored.
pub async fn binding(
    socket: &UdpSocket,
    server: SocketAddr,
    plan: RetryPlan,
) -> Result<StunAnswer, ClientError> {
    let start = Instant::now();
    let deadline = start + plan.timeout;
    let mut sent: Vec<(TxId, Instant)> = Vec::with_capacity(plan.sends as usize);
    let mut buf = [0u8; 1500];
    loop {
        let next_send =
            (sent.len() < plan.sends.max(1) as usize).then(|| start + plan.send_offset(sent.len() as u32));
        let wake = next_send.map_or(deadline, |t| t.min(deadline));
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let (n, from) = received?;
                let now = Instant::now();
                if let Ok((txid, mapped)) = parse_response(&buf[..n]) {
                    if let Some((_, at)) = sent.iter().find(|(id, _)| *id == txid) {
                        return Ok(StunAnswer { mapped, rtt: now - *at, from, txid });
                    }
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if Instant::now() >= deadline {
                    return Err(ClientError::Timeout(plan.timeout));
                }
                let txid = TxId::random();
                socket.send_to(&build_request(txid), server).await?;
                sent.push((txid, Instant::now()));
            }
        }
    }
}

type Waiters = HashMap<TxId, oneshot::Sender<(SocketAddr, SocketAddr, Instant)>>;

/// Routes STUN replies arriving on a shared socket to the requests waiting for them.
///
/// The owner of the socket's receive loop calls [`handle_packet`](Self::handle_packet) on every
/// datagram; requests are made with [`binding`](Self::binding). Memory is bounded by the number of
/// requests in flight: each one removes its own entries when it finishes or is dropped.
#[derive(Debug, Clone, Default)]
pub struct StunDemux {
    waiters: Arc<Mutex<Waiters>>,
}

impl StunDemux {
    /// An empty demultiplexer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers a received datagram. Returns `true` if it looked like STUN (per `stun.Is`), in which
    /// case the caller should not treat it as anything else, whether or not a request was waiting.
    pub fn handle_packet(&self, packet: &[u8], from: SocketAddr) -> bool {
        if !is_stun(packet) {
            return false;
        }
        if let Ok((txid, mapped)) = parse_response(packet) {
            let waiter = self.lock().remove(&txid);
            if let Some(tx) = waiter {
                let _ = tx.send((mapped, from, Instant::now()));
            }
        }
        true
    }

    /// Number of transaction IDs currently awaited.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        // A panic while holding this lock cannot leave the map inconsistent; keep going.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends Binding requests to `server` through `socket` per `plan` and waits for the receive loop
    /// to deliver a matching reply via [`handle_packet`](Self::handle_packet).
    pub async fn binding(
        &self,
        socket: &UdpSocket,
        server: SocketAddr,
        plan: RetryPlan,
    ) -> Result<StunAnswer, ClientError> {
        let mut inflight = Inflight { demux: self, ids: Vec::new() };
        let (answer_tx, mut answer_rx) = tokio::sync::mpsc::channel(plan.sends.max(1) as usize);
        let start = Instant::now();
        let deadline = start + plan.timeout;
        loop {
            let next_send = (inflight.ids.len() < plan.sends.max(1) as usize)
                .then(|| start + plan.send_offset(inflight.ids.len() as u32));
            let wake = next_send.map_or(deadline, |t| t.min(deadline));
            tokio::select! {
                Some((txid, sent_at, (mapped, from, at))) = answer_rx.recv() => {
                    let at: Instant = at;
                    return Ok(StunAnswer { mapped, rtt: at - sent_at, from, txid });
                }
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        return Err(ClientError::Timeout(plan.timeout));
                    }
                    let txid = TxId::random();
                    let (tx, rx) = oneshot::channel();
                    self.lock().insert(txid, tx);
                    inflight.ids.push(txid);
                    let sent_at = Instant::now();
                    socket.send_to(&build_request(txid), server).await?;
                    let answer_tx = answer_tx.clone();
                    // Forward this attempt's reply (if any) into the shared channel; the task ends
                    // when the sender is dropped (request finished or removed).
                    tokio::spawn(async move {
                        if let Ok(reply) = rx.await {
                            let _ = answer_tx.send((txid, sent_at, reply)).await;
                        }
                    });
                }
            }
        }
    }
}

/// Removes a request's transaction IDs from the demux when the request ends in any way.
struct Inflight<'a> {
    demux: &'a StunDemux,
    ids: Vec<TxId>,
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        let mut waiters = self.demux.lock();
        for id in &self.ids {
            waiters.remove(id);
        }
    }
}
