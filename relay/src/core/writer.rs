//! One connection's send side: its [`Outbox`] (what other tasks hand it) and its send loop.
//!
//! Spec §1.5. Producers (other connections' readers, the registry) never block: packets go into
//! a head-drop data or disco queue (depth `queue_depth`), a Pong into a one-slot mailbox (a Ping
//! arriving while it is full is dropped), PeerGone/PeerPresent into a bounded control queue
//! (refused and counted when full). Every push is followed by `Notify::notify_one`, whose stored
//! permit means a wakeup is never lost between "queues look empty" and "wait".
//!
//! The send loop drains every ready item into one write buffer without flushing (frames are
//! coalesced into few syscalls / TLS records), writes and flushes once nothing is ready, then
//! sleeps until notified or until the next KeepAlive. Each write has a deadline; on expiry or
//! error the connection closes and the packets lost are counted (`write_error` for the batch in
//! flight, `gone_disconnected` for what was still queued). The write buffer is released after a
//! large flush so an idle connection holds no big buffer.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use derpfleet_proto::consts::{KEY_LEN, PING_DATA_LEN};
use derpfleet_proto::frame::{put_header, FrameType};
use derpfleet_proto::msg::{PeerGoneReason, ServerToClient};
use derpfleet_proto::NodePublic;
use parking_lot::Mutex;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::core::metrics::{DropReason, Metrics, PacketKind};
use crate::core::queue::BoundedQueue;
use crate::core::registry::{Conn, Registry};

/// Write out the buffer (without flushing) once it holds this much, while still draining.
const WRITE_CHUNK: usize = 64 << 10;
/// After a flush, a write buffer that grew beyond this is released rather than kept.
const WRITE_BUF_KEEP: usize = 4 << 10;
/// One packet in this many has its queue delay recorded.
const QUEUE_DELAY_SAMPLE_MASK: u64 = 15;

/// A packet waiting in a destination's queue.
#[derive(Debug)]
pub struct Packet {
    /// The sender's key (written in front of the data in RecvPacket).
    pub src: NodePublic,
    /// The packet data: a slice of the sender's read buffer, copied only into the write buffer.
    pub data: Bytes,
    /// When it was queued (for `derp_queue_delay_seconds`).
    pub enqueued: Instant,
}

/// A server-generated frame for one connection, other than packets and Pongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// `key` is gone for `reason`.
    PeerGone(NodePublic, PeerGoneReason),
    /// (Watchers) `key` connected from `endpoint` with these PeerPresent flags.
    PeerPresent(NodePublic, SocketAddr, u8),
    /// The server is going away (graceful shutdown): the send loop writes this after everything
    /// queued before it, flushes, and ends the connection.
    Restarting {
        /// When the client should reconnect.
        reconnect_in: Duration,
        /// How long it should keep trying.
        try_for: Duration,
    },
}

/// Everything other tasks can hand one connection for sending. Never blocks.
#[derive(Debug)]
pub struct Outbox {
    data: BoundedQueue<Packet>,
    disco: BoundedQueue<Packet>,
    pong: Mutex<Option<[u8; PING_DATA_LEN]>>,
    control: BoundedQueue<Control>,
    notify: Notify,
    closed: AtomicBool,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// An empty outbox: data and disco queues of `depth`, a control queue of `control_depth`.
    pub fn new(depth: usize, control_depth: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            data: BoundedQueue::new(depth),
            disco: BoundedQueue::new(depth),
            pong: Mutex::new(None),
            control: BoundedQueue::new(control_depth),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            metrics,
        }
    }

    /// Queues a packet from `src`. A full queue drops its oldest packet (`queue_head`); a closed
    /// connection drops the new one (`gone_disconnected`). Returns false in the latter case.
    #[inline]
    pub fn send_packet(&self, src: NodePublic, data: Bytes, kind: PacketKind) -> bool {
        if self.closed.load(Ordering::Acquire) {
            self.metrics.drop_packet(DropReason::GoneDisconnected, kind, data.len());
            return false;
        }
        let queue = match kind {
            PacketKind::Disco => &self.disco,
            PacketKind::Other => &self.data,
        };
        if let Some(old) = queue.push_drop_head(Packet { src, data, enqueued: Instant::now() }) {
            self.metrics.drop_packet(DropReason::QueueHead, kind, old.data.len());
        }
        self.notify.notify_one();
        true
    }

    /// Queues a Pong echoing `data`, unless one is already waiting (then this one is dropped, as
    /// derper does with its depth-1 channel). Returns whether it was queued.
    pub fn send_pong(&self, data: [u8; PING_DATA_LEN]) -> bool {
        {
            let mut slot = self.pong.lock();
            if slot.is_some() || self.closed.load(Ordering::Acquire) {
                return false;
            }
            *slot = Some(data);
        }
        self.notify.notify_one();
        true
    }

    /// Queues a control frame; refused (and counted) when the control queue is full or closed.
    pub fn send_control(&self, c: Control) -> bool {
        if self.closed.load(Ordering::Acquire) || self.control.try_push(c).is_err() {
            self.metrics.control_frames_dropped.increment(1);
            return false;
        }
        self.notify.notify_one();
        true
    }

    /// Queues many control frames at once; returns how many were refused (and counted).
    pub fn send_controls(&self, items: Vec<Control>) -> usize {
        if self.closed.load(Ordering::Acquire) {
            self.metrics.control_frames_dropped.increment(items.len() as u64);
            return items.len();
        }
        let refused = self.control.try_push_all(items);
        self.metrics.control_frames_dropped.increment(refused as u64);
        self.notify.notify_one();
        refused
    }

    /// True once the connection is closing: nothing more will be written.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the connection closed and counts every packet still queued as `gone_disconnected`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.count_leftovers();
        self.notify.notify_one();
    }

    fn count_leftovers(&self) {
        for (queue, kind) in [(&self.data, PacketKind::Other), (&self.disco, PacketKind::Disco)] {
            let left = queue.take_all();
            let bytes = left.iter().map(|p| p.data.len()).sum();
            self.metrics.drop_packets(DropReason::GoneDisconnected, kind, left.len() as u64, bytes);
        }
        self.control.take_all();
    }

    /// Queued data plus disco packets (for tests and debugging).
    pub fn queued_packets(&self) -> usize {
        self.data.len() + self.disco.len()
    }

    /// Releases queue storage if everything is empty (idle connections).
    fn trim(&self) {
        self.data.shrink_if_empty();
        self.disco.shrink_if_empty();
        self.control.shrink_if_empty();
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // A packet pushed after `close` (a sender that saw the flag just before it was set).
        self.count_leftovers();
    }
}

/// Why a send loop ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A write did not complete within the write deadline.
    #[error("write timed out after {0:?}")]
    Timeout(Duration),
    /// The transport failed.
    #[error("write failed: {0}")]
    Io(#[from] std::io::Error),
}

/// The source keys one connection has been sent packets from (spec §1.6, "sawSrc").
///
/// Owned by the send loop, so the per-packet check touches no shared state; the first packet from
/// a new source is recorded in the registry's shared index.
#[derive(Debug, Default)]
pub struct SeenSources {
    last: Option<NodePublic>,
    keys: HashSet<NodePublic>,
}

impl SeenSources {
    /// Every source seen.
    pub fn keys(&self) -> impl Iterator<Item = &NodePublic> {
        self.keys.iter()
    }

    /// Forgets `src` once the receiver is told it left, so that a later return is recorded again.
    fn forget(&mut self, src: &NodePublic) {
        if self.last.as_ref() == Some(src) {
            self.last = None;
        }
        self.keys.remove(src);
    }

    /// Records `src`; true when it is new.
    #[inline]
    fn note(&mut self, src: NodePublic) -> bool {
        if self.last == Some(src) {
            return false;
        }
        self.last = Some(src);
        self.keys.insert(src)
    }
}

/// Per-connection settings of the send loop.
#[derive(Clone, Copy, Debug)]
pub struct WriterSettings {
    /// Deadline of each write (None = none).
    pub write_timeout: Option<Duration>,
    /// KeepAlive period for this connection (interval plus this connection's jitter).
    pub keepalive: Duration,
}

/// Packets (count, bytes) per kind in the write buffer, not yet confirmed written.
#[derive(Default)]
struct InFlight([(u64, usize); 2]);

impl InFlight {
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

    fn fail(&mut self, m: &Metrics) {
        for kind in PacketKind::ALL {
            let (n, b) = self.0[kind as usize];
            m.drop_packets(DropReason::WriteError, kind, n, b);
        }
        *self = Self::default();
    }
}

/// The send loop of one connection. Returns when the connection is cancelled (Ok) or a write
/// fails; `seen` collects the source keys this connection was sent packets from.
pub async fn run_writer<W>(
    w: &mut W,
    conn: &Arc<Conn>,
    registry: &Registry,
    settings: WriterSettings,
    seen: &mut SeenSources,
) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
{
    let metrics = &*registry.metrics;
    let out = &conn.out;
    let mut buf = BytesMut::new();
    let mut in_flight = InFlight::default();
    let mut sampled: u64 = 0;
    let keepalive = tokio::time::sleep(settings.keepalive);
    tokio::pin!(keepalive);
    let mut keepalive_due = false;

    let mut restarting = false;
    loop {
        let mut frames: u64 = 0;
        loop {
            let mut progressed = false;
            while let Some(c) = out.control.pop() {
                restarting |= matches!(c, Control::Restarting { .. });
                encode_control(&mut buf, &c, metrics);
                if let Control::PeerGone(key, PeerGoneReason::Disconnected) = &c {
                    seen.forget(key);
                }
                frames += 1;
                progressed = true;
                if buf.len() >= WRITE_CHUNK {
                    break;
                }
            }
            let pong = out.pong.lock().take();
            if let Some(d) = pong {
                ServerToClient::Pong(d).encode(&mut buf);
                metrics.sent_pong.increment(1);
                frames += 1;
                progressed = true;
            }
            for (queue, kind) in [(&out.disco, PacketKind::Disco), (&out.data, PacketKind::Other)] {
                if let Some(p) = queue.pop() {
                    sampled += 1;
                    if sampled & QUEUE_DELAY_SAMPLE_MASK == 1 {
                        metrics.queue_delay_seconds.record(p.enqueued.elapsed().as_secs_f64());
                    }
                    encode_packet(&mut buf, &p);
                    in_flight.add(kind, p.data.len());
                    if seen.note(p.src) {
                        registry.note_sent(p.src, conn);
                    }
                    frames += 1;
                    progressed = true;
                }
            }
            if buf.len() >= WRITE_CHUNK {
                write_buf(w, &buf, conn, settings, metrics, &mut in_flight, false).await?;
                buf.clear();
            }
            if !progressed {
                break;
            }
        }
        if keepalive_due {
            ServerToClient::KeepAlive.encode(&mut buf);
            frames += 1;
            keepalive_due = false;
        }
        if frames > 0 || !buf.is_empty() {
            write_buf(w, &buf, conn, settings, metrics, &mut in_flight, true).await?;
            metrics.buffered_write_frames.record(frames as f64);
            buf.clear();
            if buf.capacity() > WRITE_BUF_KEEP {
                buf = BytesMut::new();
            }
        }
        if out.is_closed() || restarting {
            return Ok(());
        }
        tokio::select! {
            biased;
            _ = conn.cancel.cancelled() => return Ok(()),
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

/// Writes `buf` (and flushes when `flush`) under the write deadline; a cancelled connection
/// stops waiting at once. On failure the in-flight packets count as `write_error`.
async fn write_buf<W>(
    w: &mut W,
    buf: &[u8],
    conn: &Conn,
    settings: WriterSettings,
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
    let result = tokio::select! {
        r = with_deadline(settings.write_timeout, io) => r,
        _ = conn.cancel.cancelled() => Err(WriteError::Io(std::io::ErrorKind::ConnectionAborted.into())),
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
    buf.reserve(5 + KEY_LEN + p.data.len());
    put_header(buf, FrameType::RecvPacket, KEY_LEN + p.data.len());
    buf.put_slice(&p.src.0);
    buf.put_slice(&p.data);
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
