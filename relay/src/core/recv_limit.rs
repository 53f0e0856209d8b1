//! The per-client receive byte rate (derper's `-rate-config`, spec §1.8), as the reader applies it.
//!
//! The receive limit never drops anything: a connection's reader waits for tokens before its next
//! read, so the socket buffer fills and TCP flow control slows the sender. The setting lives in a
//! [`SharedRecvRate`] that SIGHUP replaces; every reader notices the new generation before its
//! next read and rebuilds its bucket. Mesh peers are exempt (the core never creates a limiter for
//! them). Deviation from derper, documented: tokens are taken for the bytes of each read (frame
//! headers included) after the frames in it were handled, rather than for `min(frameLen, 65568)`
//! between a frame's header and its body; the long-run rate and the back-pressure are the same.
//! Reading the setting from a file is an operations concern (`ops::ratelimit`).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use parking_lot::RwLock;
use serde::Deserialize;

/// derper raises the per-client burst to at least one maximal frame (64 KiB + 32).
pub const MIN_RECV_BURST: u64 = 65_568;

/// A per-client receive rate (derper's `-rate-config` JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
pub struct RecvRate {
    /// Sustained bytes per second; 0 = no limit.
    #[serde(rename = "PerClientRateLimitBytesPerSec", default)]
    pub bytes_per_sec: u64,
    /// Bucket size in bytes (raised to [`MIN_RECV_BURST`]).
    #[serde(rename = "PerClientRateBurstBytes", default)]
    pub burst_bytes: u64,
}

impl RecvRate {
    /// The effective setting: `None` when off, else the burst raised to [`MIN_RECV_BURST`] and
    /// both clamped to what a token bucket can hold.
    pub fn effective(self) -> Option<RecvRate> {
        if self.bytes_per_sec == 0 {
            return None;
        }
        Some(RecvRate {
            bytes_per_sec: self.bytes_per_sec.min(u32::MAX as u64),
            burst_bytes: self.burst_bytes.max(MIN_RECV_BURST).min(u32::MAX as u64),
        })
    }
}

/// The current per-client receive rate, shared by every connection and replaced at SIGHUP.
#[derive(Debug, Default)]
pub struct SharedRecvRate {
    current: RwLock<Option<RecvRate>>,
    generation: AtomicU64,
}

impl SharedRecvRate {
    /// A shared setting starting at `rate` (made [`RecvRate::effective`]).
    pub fn new(rate: RecvRate) -> Arc<Self> {
        let s = Arc::new(Self::default());
        s.set(rate);
        s
    }

    /// Replaces the setting; readers pick it up before their next read.
    pub fn set(&self, rate: RecvRate) {
        *self.current.write() = rate.effective();
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The effective setting (None = off).
    pub fn get(&self) -> Option<RecvRate> {
        *self.current.read()
    }

    /// A limiter for one connection.
    pub fn client(self: &Arc<Self>) -> ClientRecvLimiter {
        ClientRecvLimiter { shared: self.clone(), generation: u64::MAX, bucket: None }
    }
}

/// One connection's receive bucket.
pub struct ClientRecvLimiter {
    shared: Arc<SharedRecvRate>,
    generation: u64,
    bucket: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
}

impl std::fmt::Debug for ClientRecvLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientRecvLimiter").field("generation", &self.generation).finish_non_exhaustive()
    }
}

impl ClientRecvLimiter {
    /// Waits until `bytes` more bytes may be read (at once when limiting is off).
    pub async fn consume(&mut self, bytes: usize) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.generation = generation;
            self.bucket = self.shared.get().and_then(bucket_for);
        }
        let Some((bucket, burst)) = &self.bucket else { return };
        let mut left = bytes as u64;
        while left > 0 {
            let n = left.min(burst.get() as u64) as u32;
            let Some(n) = NonZeroU32::new(n) else { return };
            // n <= burst, so capacity is always sufficient.
            let _ = bucket.until_n_ready(n).await;
            left -= n.get() as u64;
        }
    }
}

fn bucket_for(rate: RecvRate) -> Option<(DefaultDirectRateLimiter, NonZeroU32)> {
    let per_sec = NonZeroU32::new(rate.bytes_per_sec as u32)?;
    let burst = NonZeroU32::new(rate.burst_bytes as u32)?;
    // The bucket starts full, as derper's does: a new client may send one burst at once.
    Some((RateLimiter::direct(Quota::per_second(per_sec).allow_burst(burst)), burst))
}
