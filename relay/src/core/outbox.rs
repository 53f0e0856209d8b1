//! What other tasks hand one connection for sending: its [`Outbox`] (data, disco, Pong and control
//! queues), the [`Packet`] and [`Control`] items in it, and the connection's [`SeenSources`].
//!
//! Spec §1.5. Producers (other connections' readers, the registry) never block: packets go into
//! a head-drop data or disco queue (depth `queue_depth`), a Pong into a one-slot mailbox (a Ping
//! arriving while it is full is dropped), PeerGone/PeerPresent into a bounded control queue
//! (refused and counted when full). Every push is followed by `Notify::notify_one`, whose stored
//! permit means a wakeup is never lost between "queues look empty" and "wait". The registry and
//! the send loop (`core::writer`) both build on this module, which imports neither.

use std::collections::HashSet;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use derpfleet_proto::consts::{FRAME_HEADER_LEN, KEY_LEN, PING_DATA_LEN};
use derpfleet_proto::msg::recv_packet_header;
use derpfleet_proto::msg::PeerGoneReason;
use derpfleet_proto::NodePublic;
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::core::metrics::{DropReason, Metrics, PacketKind};
use crate::core::queue::BoundedQueue;

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
    pub(super) data: BoundedQueue<Packet>,
    pub(super) disco: BoundedQueue<Packet>,
    pub(super) pong: Mutex<Option<[u8; PING_DATA_LEN]>>,
    /// A Pong is in `pong` (read without the lock by the send loop).
    pong_waiting: AtomicBool,
    pub(super) control: BoundedQueue<Control>,
    pub(super) notify: Notify,
    pub(super) closed: AtomicBool,
    pub(super) metrics: Arc<Metrics>,
    /// Shared by the send loop and other connections' readers: who may write to the socket now.
    pub(super) direct: Mutex<DirectSlot>,
}

/// The write slot of one connection, shared by its send loop and the readers of its senders.
///
/// A sender's reader that finds the destination idle (every queue empty, the send loop not
/// writing, nothing left over) writes the RecvPacket frame itself with one non-blocking `sendmsg`
/// on the destination's socket while holding this slot (`try_lock`: a reader never waits), so the
/// packet costs no queue hop and no wake-up of the destination's task. Anything else — the slot
/// taken, a queue not empty, the socket full, an error — falls back to the queue, so per-destination
/// order, head drop, disco priority and counted drops are those of the queue path; a direct write
/// never waits, so the write deadline stays the send loop's. A partial write leaves the rest in
/// `pending`, which the send loop writes before anything else.
///
/// Only plain TCP connections have a socket here (`fd`); TLS and WebSocket always queue. The fd
/// is set after the handshake (so nothing overtakes ServerInfo) and cleared before the socket is
/// closed, under this lock.
#[derive(Debug, Default)]
pub struct DirectSlot {
    pub(super) fd: Option<RawFd>,
    /// The send loop is draining or writing: no direct write.
    pub(super) busy: bool,
    /// The rest of a partial direct write: bytes, and the packet's kind and data length.
    pub(super) pending: Option<(Vec<u8>, PacketKind, usize)>,
    /// The sources this connection was sent packets from.
    pub seen: SeenSources,
    /// Packets written so far, direct and queued, for sampling `derp_queue_delay_seconds`.
    sampled: u64,
}

impl DirectSlot {
    /// Counts one written packet; true for the one in [`QUEUE_DELAY_SAMPLE_MASK`]` + 1` whose
    /// queue delay is recorded (a direct packet waited 0 s).
    #[inline]
    pub(super) fn sample_queue_delay(&mut self) -> bool {
        self.sampled += 1;
        self.sampled & QUEUE_DELAY_SAMPLE_MASK == 1
    }
}

/// One packet in this many has its queue delay recorded (send loop and direct writes alike).
const QUEUE_DELAY_SAMPLE_MASK: u64 = 15;

/// What a direct write did.
pub(crate) enum Direct {
    /// Not written: queue it.
    Queue,
    /// Written (or its rest handed to the send loop); true when `src` is new for this receiver.
    Written(bool),
}

impl Outbox {
    /// An empty outbox: data and disco queues of `depth`, a control queue of `control_depth`.
    pub fn new(depth: usize, control_depth: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            data: BoundedQueue::new(depth),
            disco: BoundedQueue::new(depth),
            pong: Mutex::new(None),
            pong_waiting: AtomicBool::new(false),
            control: BoundedQueue::new(control_depth),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
            metrics,
            direct: Mutex::new(DirectSlot::default()),
        }
    }

    /// Lets readers write straight to this plain TCP socket (`Some`) or stops them (`None`, before
    /// the socket closes).
    pub(crate) fn set_direct_fd(&self, fd: Option<RawFd>) {
        self.direct.lock().fd = fd;
    }

    /// Every queue is empty (lock-free look).
    #[inline]
    pub(super) fn all_empty(&self) -> bool {
        self.data.looks_empty()
            && self.disco.looks_empty()
            && self.control.looks_empty()
            && !self.pong_waiting.load(Ordering::Acquire)
    }

    /// Writes RecvPacket(src ‖ data) straight to the socket when the connection is idle; see
    /// [`DirectSlot`].
    #[inline]
    pub(crate) fn try_direct(&self, src: &NodePublic, data: &[u8], kind: PacketKind) -> Direct {
        if !self.all_empty() || self.closed.load(Ordering::Acquire) {
            return Direct::Queue;
        }
        let Some(mut d) = self.direct.try_lock() else { return Direct::Queue };
        let Some(fd) = d.fd else { return Direct::Queue };
        if d.busy || d.pending.is_some() || !self.all_empty() {
            return Direct::Queue;
        }
        let hdr = recv_packet_header(data.len());
        let parts: [&[u8]; 3] = [&hdr, &src.0, data];
        // SAFETY: `fd` is the connection's open socket while it is in the slot: it is cleared
        // under this lock before the socket closes, and the lock is held for this write.
        let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let n = match socket2::SockRef::from(&sock)
            .send_vectored_with_flags(&parts.map(IoSlice::new), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        {
            Ok(n) if n > 0 => n,
            _ => return Direct::Queue,
        };
        let total = FRAME_HEADER_LEN + KEY_LEN + data.len();
        if n < total {
            let mut rest = Vec::with_capacity(total - n);
            let mut skip = n;
            for p in parts {
                let s = skip.min(p.len());
                rest.extend_from_slice(&p[s..]);
                skip -= s;
            }
            d.pending = Some((rest, kind, data.len()));
            d.busy = true;
            let first = d.seen.note(*src);
            drop(d);
            self.notify.notify_one();
            return Direct::Written(first);
        }
        self.metrics.packets_sent.increment(1);
        self.metrics.bytes_sent.increment(data.len() as u64);
        if d.sample_queue_delay() {
            self.metrics.queue_delay_seconds.record(0.0);
        }
        Direct::Written(d.seen.note(*src))
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
            self.pong_waiting.store(true, Ordering::Release);
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

    /// Takes the waiting Pong, if any (the send loop), without locking when there is none.
    #[inline]
    pub(super) fn take_pong(&self) -> Option<[u8; PING_DATA_LEN]> {
        if !self.pong_waiting.load(Ordering::Acquire) {
            return None;
        }
        let mut slot = self.pong.lock();
        self.pong_waiting.store(false, Ordering::Release);
        slot.take()
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
    pub(super) fn trim(&self) {
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
    pub(super) fn forget(&mut self, src: &NodePublic) {
        if self.last.as_ref() == Some(src) {
            self.last = None;
        }
        self.keys.remove(src);
    }

    /// Records `src`; true when it is new.
    #[inline]
    pub(super) fn note(&mut self, src: NodePublic) -> bool {
        if self.last == Some(src) {
            return false;
        }
        self.last = Some(src);
        self.keys.insert(src)
    }
}
