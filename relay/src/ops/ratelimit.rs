//! Rate limits: connection accepts (global and per source IP) and the per-client receive
//! byte rate (derper's `-rate-config`, spec §1.8).
//!
//! Accept limits are GCRA token buckets (`governor`); a connection over the limit is accepted and
//! closed at once, as derper does, so the kernel's accept queue never fills with refused peers.
//!
//! The per-client receive limit itself is part of the core (`core::recv_limit`, re-exported
//! here); this module reads its `-rate-config` file.

use std::fs;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

pub use crate::core::recv_limit::{ClientRecvLimiter, RecvRate, SharedRecvRate, MIN_RECV_BURST};

/// Why a `-rate-config` file could not be used.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum RateConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: bad JSON (want {{\"PerClientRateLimitBytesPerSec\":N,\"PerClientRateBurstBytes\":M}}): {source}")]
    Json { path: PathBuf, source: serde_json::Error },
}

/// Reads a `-rate-config` file.
pub fn load_rate_config(path: &Path) -> Result<RecvRate, RateConfigError> {
    let text = fs::read(path).map_err(|source| RateConfigError::Read { path: path.to_owned(), source })?;
    serde_json::from_slice(&text).map_err(|source| RateConfigError::Json { path: path.to_owned(), source })
}

/// A connection-accept rate: `per_second` (may be fractional) with `burst`. Infinite = no limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AcceptRate {
    /// Connections per second; `f64::INFINITY` = no limit (see [`AcceptRate::quota`] for 0).
    pub per_second: f64,
    /// Connections allowed back to back.
    pub burst: u64,
}

impl AcceptRate {
    /// The GCRA quota, or None when unlimited (infinite rate). A rate of 0 admits only the burst
    /// and never refills (derper's `rate.Limit(0)` behaves the same).
    pub fn quota(self) -> Option<Quota> {
        if !self.per_second.is_finite() || self.per_second.is_nan() {
            return None;
        }
        let burst = NonZeroU32::new(self.burst.clamp(1, u32::MAX as u64) as u32)?;
        let period = if self.per_second <= 0.0 {
            // Effectively never refills.
            Duration::from_secs(u32::MAX as u64)
        } else {
            Duration::from_secs_f64((1.0 / self.per_second).min(u32::MAX as f64)).max(Duration::from_nanos(1))
        };
        Quota::with_period(period).map(|q| q.allow_burst(burst))
    }
}

/// Why an accepted connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptRefusal {
    /// Over `-accept-connection-limit`/`-burst`.
    Global,
    /// Over the per-source-IP limit.
    PerIp,
}

/// The accept-side limits of one listener.
pub struct AcceptLimiter {
    global: Option<DefaultDirectRateLimiter>,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl std::fmt::Debug for AcceptLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptLimiter")
            .field("global", &self.global.is_some())
            .field("per_ip", &self.per_ip.is_some())
            .finish()
    }
}

impl AcceptLimiter {
    /// Limits from the two rates (either may be unlimited).
    pub fn new(global: AcceptRate, per_ip: AcceptRate) -> Self {
        Self {
            global: global.quota().map(RateLimiter::direct),
            per_ip: per_ip.quota().map(RateLimiter::keyed),
        }
    }

    /// True when neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.global.is_none() && self.per_ip.is_none()
    }

    /// Decides on one accepted connection from `ip`. The per-IP bucket is checked first so a
    /// single flooding source does not use up the global burst.
    pub fn check(&self, ip: IpAddr) -> Result<(), AcceptRefusal> {
        let ip = unmap(ip);
        if let Some(l) = &self.per_ip {
            if l.check_key(&ip).is_err() {
                return Err(AcceptRefusal::PerIp);
            }
        }
        if let Some(l) = &self.global {
            if l.check().is_err() {
                return Err(AcceptRefusal::Global);
            }
        }
        Ok(())
    }

    /// Forgets per-IP buckets that have refilled (call periodically; keeps memory bounded).
    pub fn prune(&self) {
        if let Some(l) = &self.per_ip {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// An IPv4-mapped IPv6 address as IPv4 (dual-stack listeners report IPv4 peers that way).
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_config_json_and_effective_burst() {
        let r: RecvRate =
            serde_json::from_str(r#"{"PerClientRateLimitBytesPerSec":1000,"PerClientRateBurstBytes":10}"#)
                .unwrap();
        assert_eq!(r.effective(), Some(RecvRate { bytes_per_sec: 1000, burst_bytes: MIN_RECV_BURST }));
        let off: RecvRate = serde_json::from_str(r#"{"PerClientRateLimitBytesPerSec":0}"#).unwrap();
        assert_eq!(off.effective(), None);
        let big: RecvRate = serde_json::from_str(
            r#"{"PerClientRateLimitBytesPerSec":5000000,"PerClientRateBurstBytes":1000000}"#,
        )
        .unwrap();
        assert_eq!(big.effective().unwrap().burst_bytes, 1_000_000);
        assert!(serde_json::from_str::<RecvRate>(r#"{"PerClientRateLimitBytesPerSec":"x"}"#).is_err());
    }

    #[test]
    fn accept_limits_refuse_beyond_the_burst() {
        let l = AcceptLimiter::new(
            AcceptRate { per_second: 0.001, burst: 5 },
            AcceptRate { per_second: f64::INFINITY, burst: 0 },
        );
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!((0..5).filter(|_| l.check(ip).is_ok()).count(), 5);
        assert_eq!(l.check(ip), Err(AcceptRefusal::Global));
        let per_ip = AcceptLimiter::new(
            AcceptRate { per_second: f64::INFINITY, burst: 0 },
            AcceptRate { per_second: 0.001, burst: 2 },
        );
        let other: IpAddr = "::ffff:192.0.2.2".parse().unwrap();
        assert!(per_ip.check(ip).is_ok() && per_ip.check(ip).is_ok());
        assert_eq!(per_ip.check(ip), Err(AcceptRefusal::PerIp));
        assert!(per_ip.check(other).is_ok());
        assert!(AcceptLimiter::new(
            AcceptRate { per_second: f64::INFINITY, burst: 1 },
            AcceptRate { per_second: f64::INFINITY, burst: 1 }
        )
        .is_unlimited());
    }

    #[tokio::test]
    async fn recv_limiter_follows_reloads() {
        let shared = SharedRecvRate::new(RecvRate::default());
        let mut c = shared.client();
        // Off: never waits.
        tokio::time::timeout(Duration::from_millis(500), c.consume(10 << 20)).await.unwrap();
        shared.set(RecvRate { bytes_per_sec: 100_000, burst_bytes: 0 });
        // The burst (65568) passes at once; twice the burst cannot.
        tokio::time::timeout(Duration::from_millis(500), c.consume(60_000)).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(100), c.consume(200_000)).await.is_err());
        shared.set(RecvRate::default());
        tokio::time::timeout(Duration::from_millis(500), c.consume(10 << 20)).await.unwrap();
    }
}
