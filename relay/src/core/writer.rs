//! One connection's send loop: it drains the connection's `Outbox` (see
//! [`crate::core::outbox`] for what producers put there).
//!
//! The send loop drains every ready item into one write buffer without flushing (frames are
//! coalesced into few syscalls / TLS records), writes and flushes once nothing is ready, then
//! sleeps until notified or until the next KeepAlive. Each write has a deadline; on expiry or
//! error the connection closes and the packets lost are counted (`write_error` for the batch in
//! flight, `gone_disconnected` for what was still queued). The write buffer is released after a
//! large flush so an idle connection holds no big buffer.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use derpfleet_proto::msg::{encode_recv_packet, PeerGoneReason, ServerToClient};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::core::metrics::{DropReason, Metrics, PacketKind};
use crate::core::outbox::{Control, DirectSlot, Packet};
use crate::core::registry::{Conn, Registry};

/// Write out the buffer (without flushing) once it holds this much, while still draining.
const WRITE_CHUNK: usize = 64 << 10;
/// After a flush, a write buffer that grew beyond this is released rather than kept.
const WRITE_BUF_KEEP: usize = 4 << 10;

/// Why a send loop ended with an error.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WriteError {
    /// A write did not complete within the write deadline.
    #[error("write timed out after {0:?}")]
    Timeout(Duration),
    /// The transport failed.
    #[error("write failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Per-connection settings of the send loop.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WriterConfig {
    /// Deadline of each write (None = none).
    pub write_timeout: Option<Duration>,
    /// KeepAlive period for this connection (interval plus this connection's jitter).
    pub keepalive: Duration,
}

/// Packets (count, bytes) per kind in the write buffer, not yet confirmed written. Owned by
/// the connection task, so packets of a write cut short by cancellation are still counted.
#[derive(Default)]
pub(crate) struct InFlight([(u64, usize); 2]);

impl InFlight {
    /// True when no packet awaits confirmation.
    pub(crate) fn is_empty(&self) -> bool {
        self.0[0].0 + self.0[1].0 == 0
    }

    fn add(&mut self, kind: PacketKind, bytes: usize) {
        let e = &mut self.0[kind as usize];
        e.0 += 1;
        e.1 += bytes;
    }

    fn commit(&mut self, m: &Metrics) {
        let (n, b) = (self.0[0].0 + self.0[1].0, self.0[0].1 + self.0[1].1);
        m.packets_sent.increment(n);
        m.bytes_sent.increment(b as u64);
        *self = Self::default();
    }

    /// Counts every packet still in flight as `write_error`.
    pub(crate) fn fail(&mut self, m: &Metrics) {
        for kind in PacketKind::ALL {
            let (n, b) = self.0[kind as usize];
            m.drop_packets(DropReason::WriteError, kind, n, b);
        }
        *self = Self::default();
    }
}

/// The send loop of one connection. Returns when the outbox closes or after Restarting (Ok),
/// or when a write fails; cancellation is the caller's (it drops the future, and counts what
/// `in_flight` still holds). The direct slot's `seen` collects the source keys this connection
/// was sent packets from (and tells `registry` the first time).
pub(crate) async fn run_writer<W>(
    w: &mut W,
    conn: &Arc<Conn>,
    registry: &Registry,
    metrics: &Metrics,
    settings: WriterConfig,
    in_flight: &mut InFlight,
) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
{
    let out = &conn.out;
    let mut buf = BytesMut::new();
    let keepalive = tokio::time::sleep(settings.keepalive);
    tokio::pin!(keepalive);
    let mut keepalive_due = false;

    let mut restarting = false;
    loop {
        let mut frames: u64 = 0;
        loop {
            let chunk_full = {
                // Held while draining (no await): readers see `busy` and queue instead of writing.
                let mut d = out.direct.lock();
                d.busy = true;
                if let Some((rest, kind, len)) = d.pending.take() {
                    // The rest of a reader's partial direct write goes first.
                    buf.extend_from_slice(&rest);
                    in_flight.add(kind, len);
                    frames += 1;
                }
                drain(&mut buf, conn, registry, metrics, &mut d, in_flight, &mut frames, &mut restarting)
            };
            if !chunk_full {
                break;
            }
            write_buf(w, &buf, settings, metrics, in_flight, false).await?;
            buf.clear();
        }
        if keepalive_due {
            ServerToClient::KeepAlive.encode(&mut buf);
            frames += 1;
            keepalive_due = false;
        }
        if frames > 0 || !buf.is_empty() {
            write_buf(w, &buf, settings, metrics, in_flight, true).await?;
            metrics.buffered_write_frames.record(frames as f64);
            buf.clear();
            if buf.capacity() > WRITE_BUF_KEEP {
                buf = BytesMut::new();
            }
        }
        if out.is_closed() || restarting {
            return Ok(());
        }
        {
            // Idle again: readers may write directly. A push that raced with this look has
            // notified, so the wait below returns at once and the loop drains it.
            let mut d = out.direct.lock();
            if d.pending.is_none() && out.all_empty() {
                d.busy = false;
            }
        }
        tokio::select! {
            biased;
            _ = out.notify.notified() => {}
            _ = &mut keepalive => {
                keepalive_due = true;
                keepalive.as_mut().reset(Instant::now() + settings.keepalive);
                out.trim();
                buf = BytesMut::new();
            }
        }
    }
}

/// Moves every ready item into `buf` until nothing is ready (false) or `buf` reached
/// `WRITE_CHUNK` (true: write it out and call again).
#[allow(clippy::too_many_arguments)]
fn drain(
    buf: &mut BytesMut,
    conn: &Arc<Conn>,
    registry: &Registry,
    metrics: &Metrics,
    slot: &mut DirectSlot,
    in_flight: &mut InFlight,
    frames: &mut u64,
    restarting: &mut bool,
) -> bool {
    let out = &conn.out;
    loop {
        let mut progressed = false;
        while let Some(c) = out.control.pop() {
            *restarting |= matches!(c, Control::Restarting { .. });
            encode_control(buf, &c, metrics);
            if let Control::PeerGone(key, PeerGoneReason::Disconnected) = &c {
                slot.seen.forget(key);
            }
            *frames += 1;
            progressed = true;
            if buf.len() >= WRITE_CHUNK {
                return true;
            }
        }
        if let Some(d) = out.take_pong() {
            ServerToClient::Pong(d).encode(buf);
            metrics.sent_pong.increment(1);
            *frames += 1;
            progressed = true;
        }
        for (queue, kind) in [(&out.disco, PacketKind::Disco), (&out.data, PacketKind::Other)] {
            if let Some(p) = queue.pop() {
                if slot.sample_queue_delay() {
                    metrics.queue_delay_seconds.record(p.enqueued.elapsed().as_secs_f64());
                }
                encode_packet(buf, &p);
                in_flight.add(kind, p.data.len());
                if slot.seen.note(p.src) {
                    registry.note_sent(p.src, conn);
                }
                *frames += 1;
                progressed = true;
            }
        }
        if buf.len() >= WRITE_CHUNK {
            return true;
        }
        if !progressed {
            return false;
        }
    }
}

/// Writes `buf` (and flushes when `flush`) under the write deadline. On failure the in-flight
/// packets count as `write_error`.
///
/// The deadline's timer is armed only if the write cannot complete at once: almost every write
/// fits in the socket buffer, and a timer per write (a clock read, a timer-wheel entry) was a
/// cost per packet. So the deadline runs from the moment the write first waits, not from the
/// call; the two differ by the few microseconds of the first attempt.
async fn write_buf<W>(
    w: &mut W,
    buf: &[u8],
    settings: WriterConfig,
    metrics: &Metrics,
    in_flight: &mut InFlight,
    flush: bool,
) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
{
    let io = async {
        w.write_all(buf).await?;
        if flush {
            w.flush().await?;
        }
        Ok::<(), std::io::Error>(())
    };
    let mut io = std::pin::pin!(io);
    let first = std::future::poll_fn(|cx| Poll::Ready(io.as_mut().poll(cx))).await;
    let result = match first {
        Poll::Ready(r) => r.map_err(WriteError::from),
        Poll::Pending => with_deadline(settings.write_timeout, io).await,
    };
    match result {
        Ok(()) => {
            in_flight.commit(metrics);
            Ok(())
        }
        Err(e) => {
            if matches!(e, WriteError::Timeout(_)) {
                metrics.sclient_write_timeouts.increment(1);
            }
            in_flight.fail(metrics);
            Err(e)
        }
    }
}

async fn with_deadline<F>(limit: Option<Duration>, io: F) -> Result<(), WriteError>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    match limit {
        Some(d) => tokio::time::timeout(d, io).await.map_err(|_| WriteError::Timeout(d))?.map_err(Into::into),
        None => io.await.map_err(Into::into),
    }
}

/// Appends RecvPacket(src ‖ data): the only copy of the packet bytes on the relay path.
#[inline]
fn encode_packet(buf: &mut BytesMut, p: &Packet) {
    encode_recv_packet(buf, &p.src, &p.data);
}

fn encode_control(buf: &mut BytesMut, c: &Control, metrics: &Metrics) {
    match *c {
        Control::PeerGone(key, reason) => {
            match reason {
                PeerGoneReason::Disconnected => metrics.peer_gone_disconnected_frames.increment(1),
                PeerGoneReason::NotHere => metrics.peer_gone_not_here_frames.increment(1),
                PeerGoneReason::Other(_) => {}
            }
            ServerToClient::PeerGone { key, reason }.encode(buf);
        }
        Control::PeerPresent(key, endpoint, flags) => {
            ServerToClient::PeerPresent { key, endpoint: Some(endpoint), flags }.encode(buf);
        }
        Control::Restarting { reconnect_in, try_for } => {
            ServerToClient::Restarting { reconnect_in, try_for }.encode(buf);
        }
    }
}
