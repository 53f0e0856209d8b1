//! The header our packets carry: sequence number, send timestamp and sender index, so the receiving
//! side can count loss and reordering and compute one-way latency (sender and receiver share a
//! process and therefore a clock).

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of header at the start of every payload: seq (u64 LE), timestamp ns (u64 LE), sender (u32 LE).
pub const HEADER_LEN: usize = 20;

/// Parsed packet header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Per-sender sequence number, from 0.
    pub seq: u64,
    /// (Intended) send time, ns since the run's [`Clock`] epoch.
    pub sent_ns: u64,
    /// Index of the sending flow.
    pub sender: u32,
}

impl Header {
    /// Reads a header; `None` if the payload is too short (not ours).
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN {
            return None;
        }
        Some(Header {
            seq: u64::from_le_bytes(b[0..8].try_into().ok()?),
            sent_ns: u64::from_le_bytes(b[8..16].try_into().ok()?),
            sender: u32::from_le_bytes(b[16..20].try_into().ok()?),
        })
    }
}

/// A monotonic clock shared by all tasks of a run, reading nanoseconds since its epoch.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Self { epoch: Instant::now() }
    }

    /// Nanoseconds since the epoch.
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// The instant `ns` after the epoch.
    pub fn at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }
}

/// Builds payloads out of one large buffer, so sending does not allocate per packet: each payload
/// is split off the arena, which is refilled (one allocation) every `PER_CHUNK` packets.
pub struct PayloadArena {
    buf: BytesMut,
    size: usize,
}

const PER_CHUNK: usize = 64;

impl PayloadArena {
    /// Payloads of `size` bytes (at least [`HEADER_LEN`]).
    pub fn new(size: usize) -> Self {
        Self { buf: BytesMut::new(), size: size.max(HEADER_LEN) }
    }

    /// A payload carrying `h`, zero-padded to the size.
    pub fn make(&mut self, h: Header) -> Bytes {
        if self.buf.capacity() < self.size {
            self.buf = BytesMut::with_capacity(self.size * PER_CHUNK);
        }
        self.buf.put_u64_le(h.seq);
        self.buf.put_u64_le(h.sent_ns);
        self.buf.put_u32_le(h.sender);
        self.buf.put_bytes(0, self.size - HEADER_LEN);
        self.buf.split_to(self.size).freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_size() {
        let mut a = PayloadArena::new(100);
        for seq in 0..200 {
            let h = Header { seq, sent_ns: seq * 7 + 1, sender: 3 };
            let b = a.make(h);
            assert_eq!(b.len(), 100);
            assert_eq!(Header::parse(&b), Some(h));
        }
        assert_eq!(Header::parse(&[0u8; 19]), None);
    }
}
