//! What the node remembers about choosing its home: the last netcheck report, every home move
//! and why, and the timing of the re-netcheck loop (which runs in the engine).
//!
//! Timing decisions:
//! - periodic re-netcheck every `interval` plus a uniform 0–30 % jitter (20–26 s by default, as
//!   Tailscale re-STUNs while active); a full report every [`FULL_REPORT_EVERY`] (as Go), the
//!   others incremental;
//! - [`Homing::request`] runs one at once (full): the hook for a network-change watcher, also
//!   reachable as `SIGUSR1` on `derpfleet-client up`;
//! - a home DERP connection down for [`HOME_DOWN_GRACE`] (longer than a normal reconnect, which
//!   takes ≤ 100 ms plus a connect) triggers a full report at once, and the dead home is left for
//!   any region that answers; while the home stays down, reports repeat every
//!   [`HOME_DOWN_RETRY`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::status::{HomeMove, NetcheckStatus};
use crate::netcheck::Report;

/// Go's netcheck does a full report every 5 minutes, incremental ones in between.
pub const FULL_REPORT_EVERY: Duration = Duration::from_secs(5 * 60);
/// A home DERP connection down this long counts as dead.
pub const HOME_DOWN_GRACE: Duration = Duration::from_secs(3);
/// Re-netcheck period while the home is down.
pub const HOME_DOWN_RETRY: Duration = Duration::from_secs(5);
/// Home moves kept for status.
pub const HOME_HISTORY_LEN: usize = 32;

/// `base` plus a uniform 0–30 % jitter, from `u01` ∈ [0, 1].
pub fn jittered(base: Duration, u01: f64) -> Duration {
    base + base.mul_f64(0.3 * u01.clamp(0.0, 1.0))
}

/// Seconds since the Unix epoch (for status timestamps).
pub fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// Why the home moves from `old` to `new`, in words, from this report's `latencies` and how long
/// the old home's DERP connection has been down (if it is).
pub fn move_reason(
    old: i64,
    new: i64,
    latencies: &BTreeMap<i64, Duration>,
    old_down: Option<Duration>,
) -> String {
    let new_lat = latencies.get(&new).map(|d| ms(*d)).unwrap_or_else(|| "no answer".into());
    if let Some(d) = old_down {
        return format!(
            "derp-{old} unreachable (DERP connection down for {:.1} s); derp-{new} answered in {new_lat}",
            d.as_secs_f64()
        );
    }
    match latencies.get(&old) {
        None => format!("derp-{old} did not answer netcheck; derp-{new} answered in {new_lat}"),
        Some(o) => format!(
            "derp-{new} ({new_lat}) faster than derp-{old} ({}) by the margin (≥ 10 ms and ≤ ⅔ of the old \
             home's best recent latency)",
            ms(*o)
        ),
    }
}

/// Netcheck and home-move records for status, and the re-netcheck trigger.
#[derive(Default)]
pub struct Homing {
    wake: Notify,
    last: Mutex<Option<(Instant, String, Report)>>,
    moves: Mutex<VecDeque<HomeMove>>,
    reports: AtomicU64,
}

impl Homing {
    /// Asks for a netcheck now (network changed, operator asked).
    pub fn request(&self) {
        self.wake.notify_one();
    }

    /// Resolves when [`Self::request`] was called.
    pub async fn requested(&self) {
        self.wake.notified().await
    }

    /// Records a finished report and what triggered it.
    pub fn record_report(&self, report: &Report, trigger: &str) {
        self.reports.fetch_add(1, Relaxed);
        *self.last.lock() = Some((Instant::now(), trigger.to_string(), report.clone()));
    }

    /// Records a home move.
    pub fn record_move(&self, from: i64, to: i64, reason: String) {
        let mut m = self.moves.lock();
        if m.len() >= HOME_HISTORY_LEN {
            m.pop_front();
        }
        m.push_back(HomeMove { at_unix: unix_now(), from, to, reason });
    }

    /// The last report for status.
    pub fn netcheck_status(&self) -> Option<NetcheckStatus> {
        let last = self.last.lock();
        let (at, trigger, r) = last.as_ref()?;
        Some(NetcheckStatus {
            age_secs: at.elapsed().as_secs_f64(),
            trigger: trigger.clone(),
            udp: r.udp,
            global_v4: r.global_v4,
            preferred_derp: r.preferred_derp,
            region_latency_ms: r.region_latency.iter().map(|(k, d)| (*k, d.as_secs_f64() * 1e3)).collect(),
            reports: self.reports.load(Relaxed),
        })
    }

    /// Home moves, oldest first.
    pub fn moves(&self) -> Vec<HomeMove> {
        self.moves.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_twenty_to_twenty_six_seconds() {
        let b = Duration::from_secs(20);
        assert_eq!(jittered(b, 0.0), b);
        assert_eq!(jittered(b, 1.0), Duration::from_secs(26));
        assert_eq!(jittered(b, 7.0), Duration::from_secs(26), "clamped");
    }

    #[test]
    fn reasons_name_the_cause() {
        let lat: BTreeMap<i64, Duration> =
            [(1, Duration::from_millis(60)), (2, Duration::from_millis(5))].into_iter().collect();
        let r = move_reason(1, 2, &lat, Some(Duration::from_secs(4)));
        assert!(r.contains("derp-1 unreachable") && r.contains("5.0 ms"), "{r}");
        assert!(move_reason(3, 2, &lat, None).contains("derp-3 did not answer"));
        let r = move_reason(1, 2, &lat, None);
        assert!(r.contains("faster than derp-1 (60.0 ms)"), "{r}");
    }

    #[test]
    fn home_history_is_bounded() {
        let h = Homing::default();
        for i in 0..(HOME_HISTORY_LEN as i64 + 5) {
            h.record_move(i, i + 1, "x".into());
        }
        let m = h.moves();
        assert_eq!(m.len(), HOME_HISTORY_LEN);
        assert_eq!(m[0].from, 5);
    }
}
