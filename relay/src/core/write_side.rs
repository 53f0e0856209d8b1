//! A connection's write half, shared by its send loop and by the readers of the connections that
//! send it packets, so a packet can go straight to an idle destination's socket.
//!
//! Why: with many clients each sending a few packets a second, the queue path costs a task
//! wake-up (often on the other worker thread), a notify, a queue lock, a clock read and a write
//! deadline timer per packet, on top of the write itself. When the destination has nothing queued
//! and no write in flight, the sender's reader instead writes the RecvPacket frame itself with one
//! non-blocking vectored write (frame header and source key from [`recv_packet_prefix`], the data
//! where it already is in the sender's read buffer: no copy).
//!
//! Every guarantee of the queue path holds, because the direct path only runs when it changes
//! nothing: it takes the write side with `try_lock` (never waits: producers stay non-blocking),
//! only when every queue of the destination is empty (so order and disco priority are kept), and
//! polls the socket once with a no-op waker. If the socket would block, nothing was written and the
//! packet takes the queue path (head drop, write deadline and fairness as before). If the socket
//! took only part of the frame, or a TLS stream still has to flush, the rest is left in
//! [`WriteSide::unfinished`] for the send loop, which writes it first, under its write deadline.
//! A failed write closes the connection and counts the packet as `write_error`.

use std::cell::RefCell;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use derpfleet_proto::msg::recv_packet_prefix;
use derpfleet_proto::NodePublic;
use tokio::io::AsyncWrite;

use crate::core::outbox::{Outbox, SeenSources};

thread_local! {
    /// Per worker thread: the frame for a transport without vectored writes.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A scratch frame buffer larger than this is released after use.
const SCRATCH_KEEP: usize = 4 << 10;

/// One connection's write half and what belongs with it: whoever holds the lock may write.
#[derive(Debug)]
pub(crate) struct WriteSide<W> {
    /// The transport's write half.
    pub(crate) io: W,
    /// The sources this connection has been sent packets from.
    pub(crate) seen: SeenSources,
    /// Bytes of a directly written frame the socket did not take yet (the send loop writes them
    /// before anything else), or an empty slice when only a flush is owed.
    pub(crate) unfinished: Option<Bytes>,
}

/// A [`WriteSide`] behind the lock the send loop and direct writers share.
pub(crate) type SharedWriteSide<W> = Arc<tokio::sync::Mutex<WriteSide<W>>>;

/// What a direct write did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Direct {
    /// The frame is on its way (written, or its unwritten rest handed to the send loop).
    Written {
        /// `src` is a new source for this destination (record it in the registry).
        new_source: bool,
    },
    /// The write side is busy, something is queued, or the socket would block: queue it.
    Busy,
    /// The write failed: the connection is broken.
    Failed,
}

/// A destination's write side as other connections' readers see it (type-erased, since the
/// registry holds connections of every transport).
pub(crate) trait DirectWrite: Send + Sync + 'static {
    /// Writes RecvPacket(`src`, `data`) now if `out` is idle and the socket takes it at once.
    fn try_write(&self, out: &Outbox, src: NodePublic, data: &Bytes) -> Direct;
}

impl<W> DirectWrite for tokio::sync::Mutex<WriteSide<W>>
where
    W: AsyncWrite + Send + Unpin + 'static,
{
    fn try_write(&self, out: &Outbox, src: NodePublic, data: &Bytes) -> Direct {
        let Ok(mut side) = self.try_lock() else { return Direct::Busy };
        if side.unfinished.is_some() || !out.is_idle() {
            return Direct::Busy;
        }
        let prefix = recv_packet_prefix(&src, data.len());
        let total = prefix.len() + data.len();
        let mut cx = Context::from_waker(Waker::noop());
        let io = Pin::new(&mut side.io);
        let polled = if io.is_write_vectored() {
            io.poll_write_vectored(&mut cx, &[IoSlice::new(&prefix), IoSlice::new(data)])
        } else {
            // A stream without vectored writes (e.g. WebSocket) gets one contiguous frame.
            SCRATCH.with_borrow_mut(|frame| {
                frame.clear();
                frame.extend_from_slice(&prefix);
                frame.extend_from_slice(data);
                let r = io.poll_write(&mut cx, frame);
                if frame.capacity() > SCRATCH_KEEP {
                    *frame = Vec::new();
                }
                r
            })
        };
        let written = match polled {
            Poll::Pending => return Direct::Busy,
            Poll::Ready(Err(_)) | Poll::Ready(Ok(0)) => return Direct::Failed,
            Poll::Ready(Ok(n)) => n,
        };
        if written < total {
            // The socket took part of the frame: the rest must follow before anything else.
            let mut rest = Vec::with_capacity(total - written);
            if written < prefix.len() {
                rest.extend_from_slice(&prefix[written..]);
                rest.extend_from_slice(data);
            } else {
                rest.extend_from_slice(&data[written - prefix.len()..]);
            }
            side.unfinished = Some(Bytes::from(rest));
            out.wake_writer();
        } else {
            match Pin::new(&mut side.io).poll_flush(&mut cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Direct::Failed,
                Poll::Pending => {
                    side.unfinished = Some(Bytes::new());
                    out.wake_writer();
                }
            }
        }
        Direct::Written { new_source: side.seen.note(src) }
    }
}
