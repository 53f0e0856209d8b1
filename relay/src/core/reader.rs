//! One connection's reader loop (derper's `run` half, spec §1.5–§1.7), after
//! [`crate::core::handshake`].
//!
//! The loop decodes frames from a read buffer and dispatches them to `handle_*`; packets go to
//! [`Registry::route`], which counts every packet it cannot deliver. Packets leave as `Bytes`
//! slices of the read buffer (no copy here). The buffer is sized adaptively: 64 KiB while reads
//! keep filling it, and none at all while the connection is quiet: a quiet reader waits with an
//! empty buffer and reads into room on the stack of the poll that finds data, then copies what
//! arrived (at most 2 KiB) into a buffer of exactly that size. So an idle connection holds no read
//! buffer and no shared block stays pinned, for every transport (plain TCP, TLS, WebSocket).
//! Malformed known frames end only this connection (an `Err` from the loop).

use std::mem::MaybeUninit;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};

use bytes::{Bytes, BytesMut};
use derpfleet_proto::frame::{FrameDecoder, FrameError, RawFrame};
use derpfleet_proto::msg::{ClientToServer, PeerGoneReason};
use derpfleet_proto::NodePublic;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::time::Instant;

use crate::core::metrics::{Metrics, PacketKind};
use crate::core::outbox::Control;
use crate::core::recv_limit::ClientRecvLimiter;
use crate::core::registry::{Conn, Registry, Routed};

/// Read buffer while traffic keeps filling it.
const READ_LARGE: usize = 64 << 10;
/// A busy reader yields to the scheduler after routing this many packets (half a queue depth).
const YIELD_EVERY_PACKETS: u32 = 16;
/// Most a quiet connection's first read takes (on the stack; then copied to the heap).
const READ_SMALL: usize = 2 << 10;

/// Why a reader loop ended with an error. Only this connection closes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The transport failed.
    #[error("read failed: {0}")]
    Io(#[from] std::io::Error),
    /// A known frame had a bad length or shape.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// A mesh-only frame from a client without the mesh key.
    #[error("{0} without the mesh key: insufficient permissions")]
    NotMeshPeer(&'static str),
}

/// derper ignores NotePreferred changes this soon after connecting when counting home moves.
const HOME_MOVE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// One read: [`read_quiet`] when the connection is quiet, else into `buf`'s spare capacity.
async fn read_some<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    quiet: bool,
) -> std::io::Result<usize> {
    if quiet {
        read_quiet(r, buf).await
    } else {
        r.read_buf(buf).await
    }
}

/// Reads at most [`READ_SMALL`] bytes into stack room that lives only during one poll, and puts
/// what arrived into `buf` (empty on entry) as an allocation of exactly that size. While the
/// transport is not ready, nothing is held: a pending `poll_read` keeps no buffer of ours.
async fn read_quiet<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut room = [MaybeUninit::<u8>::uninit(); READ_SMALL];
        let mut rb = ReadBuf::uninit(&mut room);
        ready!(Pin::new(&mut *r).poll_read(cx, &mut rb))?;
        let got = rb.filled();
        if !got.is_empty() {
            *buf = BytesMut::from(got);
        }
        Poll::Ready(Ok(got.len()))
    })
    .await
}

/// The reader side of one connection.
pub(crate) struct Reader<'a> {
    conn: &'a Arc<Conn>,
    registry: &'a Registry,
    metrics: &'a Metrics,
    /// Last NotePreferred value (the home-connections gauge follows it).
    preferred: bool,
    /// When the reader started: home moves in the first [`HOME_MOVE_GRACE`] are the client's
    /// initial announcement, not moves (derper's rule).
    started: Instant,
    /// PeerGone(NotHere) limiter (1/s, burst 3), created on first use.
    not_here_limiter: Option<DefaultDirectRateLimiter>,
    /// Received-packet counts not yet added to the shared counters: they are published once
    /// per read, not per packet, to keep shared cache lines out of the packet path.
    tally: RecvTally,
    /// Per-client receive rate (`-rate-config`): waited on before each read for the bytes of
    /// the previous one, so TCP back-pressure slows the sender and nothing is dropped.
    recv_limit: Option<ClientRecvLimiter>,
    /// The frame being handled is the only one this read brought (nothing more buffered, the read
    /// did not fill the buffer): its packet may be written straight to an idle destination. Frames
    /// of a burst queue instead, so the destination's send loop coalesces them into one write.
    alone: bool,
}

/// Per-read tally of received packets by kind, and their bytes.
#[derive(Default)]
struct RecvTally {
    packets: [u64; 2],
    bytes: u64,
    /// Packets routed since the reader last yielded to the scheduler.
    since_yield: u32,
}

impl RecvTally {
    #[inline]
    fn add(&mut self, kind: PacketKind, bytes: usize) {
        self.packets[kind as usize] += 1;
        self.bytes += bytes as u64;
        self.since_yield += 1;
    }

    fn publish(&mut self, m: &Metrics) {
        if self.packets != [0, 0] {
            for kind in PacketKind::ALL {
                m.packets_received_kind(kind, self.packets[kind as usize]);
            }
            m.bytes_received.increment(self.bytes);
            self.packets = [0, 0];
            self.bytes = 0;
        }
    }
}

impl Drop for Reader<'_> {
    /// Runs however the loop ends: an error, EOF, or the connection task dropping it when the
    /// connection is cancelled.
    fn drop(&mut self) {
        self.tally.publish(self.metrics);
        if self.preferred {
            self.metrics.current_home_connections.decrement(1.0);
        }
    }
}

impl<'a> Reader<'a> {
    /// A reader for `conn`, routing through `registry` and counting into `metrics`.
    pub(crate) fn new(conn: &'a Arc<Conn>, registry: &'a Registry, metrics: &'a Metrics) -> Self {
        Self {
            conn,
            registry,
            metrics,
            preferred: false,
            started: Instant::now(),
            not_here_limiter: None,
            tally: RecvTally::default(),
            recv_limit: None,
            alone: false,
        }
    }

    /// Limits this reader's receive rate (None = unlimited).
    pub(crate) fn with_recv_limit(mut self, limit: Option<ClientRecvLimiter>) -> Self {
        self.recv_limit = limit;
        self
    }

    /// Reads and handles frames until EOF (Ok) or an error. `buf` may hold bytes already read
    /// during the handshake. Cancellation is the caller's: it stops polling and drops the
    /// future (the counts are published when the reader is dropped).
    ///
    /// Everything is borrowed: an `async fn` keeps room for its by-value arguments and for the
    /// locals they move into, so taking the reader (248 bytes) by value held it twice for the
    /// connection's life.
    pub(crate) async fn run<R>(
        &mut self,
        r: &mut R,
        buf: &mut BytesMut,
        dec: &mut FrameDecoder,
    ) -> Result<(), SessionError>
    where
        R: AsyncRead + Unpin,
    {
        let mut last_read_filled = false;
        // Bytes of the last read not yet paid for with receive-rate tokens.
        let mut unpaid = 0usize;
        loop {
            while let Some(f) = dec.decode(buf)? {
                self.alone = buf.is_empty() && !last_read_filled;
                self.handle_frame(f)?;
                if self.tally.since_yield >= YIELD_EVERY_PACKETS {
                    // Let the destinations' send loops (often queued behind this task on the
                    // same worker) drain before their 32-deep queues overflow.
                    self.tally.since_yield = 0;
                    self.tally.publish(self.metrics);
                    tokio::task::yield_now().await;
                }
            }
            self.tally.publish(self.metrics);
            let quiet = buf.is_empty() && !last_read_filled;
            if quiet {
                // No buffer while waiting, so no large (possibly shared) block stays pinned.
                *buf = BytesMut::new();
            } else {
                buf.reserve(READ_LARGE);
            }
            if let Some(limit) = &mut self.recv_limit {
                if unpaid > 0 {
                    limit.consume(unpaid).await;
                }
            }
            let room = if quiet { READ_SMALL } else { buf.capacity() - buf.len() };
            let n = read_some(r, buf, quiet).await?;
            if n == 0 {
                return Ok(());
            }
            unpaid = n;
            last_read_filled = n == room;
        }
    }

    /// Dispatches one frame.
    pub(crate) fn handle_frame(&mut self, f: RawFrame) -> Result<(), SessionError> {
        if self.conn.is_dup() {
            self.registry.note_activity(self.conn);
        }
        match ClientToServer::decode(f)? {
            ClientToServer::SendPacket { dst, data } => self.handle_send_packet(dst, data),
            ClientToServer::ForwardPacket { src, dst, data } => self.handle_forward_packet(src, dst, data)?,
            ClientToServer::NotePreferred(p) => self.handle_note_preferred(p),
            ClientToServer::WatchConns => {
                self.require_mesh("WatchConns")?;
                self.registry.watch(self.conn);
            }
            ClientToServer::ClosePeer(k) => {
                self.require_mesh("ClosePeer")?;
                let n = self.registry.close_peer(&k);
                tracing::info!(peer = %k.short(), conns = n, "ClosePeer from mesh peer");
            }
            ClientToServer::Ping(d) => {
                self.metrics.got_ping.increment(1);
                self.conn.out.send_pong(d);
            }
            // A second ClientInfo, a Pong, KeepAlive, unknown types: skipped, as derper does.
            ClientToServer::ClientInfo(_) | ClientToServer::Pong(_) | ClientToServer::Ignored(_) => {
                self.metrics.unknown_frames.increment(1);
            }
        }
        Ok(())
    }

    fn require_mesh(&self, what: &'static str) -> Result<(), SessionError> {
        if self.conn.can_mesh {
            Ok(())
        } else {
            Err(SessionError::NotMeshPeer(what))
        }
    }

    fn handle_send_packet(&mut self, dst: NodePublic, data: Bytes) {
        let kind = PacketKind::of(&data);
        self.tally.add(kind, data.len());
        if let Routed::Unknown = self.registry.route(self.conn.key, dst, data, kind, true, self.alone) {
            if kind == PacketKind::Disco && self.allow_not_here() {
                self.conn.out.send_control(Control::PeerGone(dst, PeerGoneReason::NotHere));
            }
        }
    }

    /// Mesh-only; delivered locally and never forwarded again (exactly one hop).
    fn handle_forward_packet(
        &mut self,
        src: NodePublic,
        dst: NodePublic,
        data: Bytes,
    ) -> Result<(), SessionError> {
        self.require_mesh("ForwardPacket")?;
        let kind = PacketKind::of(&data);
        self.tally.add(kind, data.len());
        self.metrics.packets_forwarded_in.increment(1);
        self.registry.route(src, dst, data, kind, false, self.alone);
        Ok(())
    }

    fn handle_note_preferred(&mut self, preferred: bool) {
        if preferred != self.preferred {
            self.preferred = preferred;
            let moved = self.started.elapsed() > HOME_MOVE_GRACE;
            if preferred {
                self.metrics.current_home_connections.increment(1.0);
                if moved {
                    self.metrics.home_moves_in.increment(1);
                }
            } else {
                self.metrics.current_home_connections.decrement(1.0);
                if moved {
                    self.metrics.home_moves_out.increment(1);
                }
            }
        }
    }

    fn allow_not_here(&mut self) -> bool {
        self.not_here_limiter
            .get_or_insert_with(|| {
                RateLimiter::direct(
                    Quota::per_second(NonZeroU32::MIN).allow_burst(NonZeroU32::new(3).expect("3 > 0")),
                )
            })
            .check()
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_quiet_read_holds_no_buffer_while_waiting_and_then_exactly_what_arrived() {
        let (mut peer, mut conn) = tokio::io::duplex(64 << 10);
        let mut buf = BytesMut::new();
        // Nothing to read: the read is pending and no buffer was allocated for it.
        assert!(read_quiet(&mut conn, &mut buf).now_or_never().is_none());
        assert_eq!(buf.capacity(), 0);

        peer.write_all(&[7u8; 100]).await.unwrap();
        assert_eq!(read_quiet(&mut conn, &mut buf).await.unwrap(), 100);
        assert_eq!(&buf[..], &[7u8; 100][..]);
        assert!(buf.capacity() < READ_SMALL, "sized to what arrived, not to the read room");

        // More than the quiet room: the first READ_SMALL bytes, in order; the rest stays unread.
        let burst: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        peer.write_all(&burst).await.unwrap();
        let mut buf = BytesMut::new();
        assert_eq!(read_quiet(&mut conn, &mut buf).await.unwrap(), READ_SMALL);
        assert_eq!(&buf[..], &burst[..READ_SMALL]);
        let mut rest = BytesMut::with_capacity(8192);
        let n = conn.read_buf(&mut rest).await.unwrap();
        assert_eq!(&rest[..n], &burst[READ_SMALL..READ_SMALL + n]);

        // EOF reads as 0 and leaves the buffer empty.
        drop(peer);
        let mut buf = BytesMut::new();
        let mut n = read_quiet(&mut conn, &mut buf).await.unwrap();
        while n != 0 {
            buf.clear();
            n = read_quiet(&mut conn, &mut buf).await.unwrap();
        }
        assert!(buf.is_empty());
    }
}
