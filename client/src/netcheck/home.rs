//! Choosing the home region (spec §7, Go's `addReportHistoryAndSetPreferredDERP`), as pure code.
//!
//! 1. Per region, the best latency over the reports of the last 5 min 5 s, times `RegionScore`.
//! 2. The candidate is the minimum among regions present in **this** report.
//! 3. Hysteresis: while the old home is reachable (it answered in this report, or sent a DERP frame
//!    in the last 8 s), it stays unless the candidate is ≥ 10 ms faster **and** at most ⅔ of the
//!    old home's latency.
//! 4. With no latency at all, the old home stays if it was heard from within 120 s.
//! 5. A home whose DERP connection is known to be down (the node saw it fail) is not reachable,
//!    whatever STUN says, and is left for the best other region that answered; it stays only when
//!    no other region answered. (Go's client leans on its DERP activity timestamp for this; a
//!    relay whose STUN port still answers while its DERP port is dead would otherwise keep it.)

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use derpfleet_proto::derpmap::DerpMap;

/// How long a report counts toward "best recent latency".
pub const HISTORY_RETENTION: Duration = Duration::from_secs(5 * 60 + 5);
/// A switch must gain at least this much…
pub const MIN_ABSOLUTE_GAIN: Duration = Duration::from_millis(10);
/// …the old home counts as reachable if heard from this recently…
pub const RECENTLY_HEARD: Duration = Duration::from_secs(8);
/// …and, with no latency data at all, is kept if heard from this recently (2 × KeepAlive).
pub const KEEP_WITHOUT_DATA: Duration = Duration::from_secs(120);

/// Recent reports' region latencies.
#[derive(Clone, Debug)]
pub struct HomeHistory {
    reports: VecDeque<(Instant, BTreeMap<i64, Duration>)>,
    retention: Duration,
}

impl Default for HomeHistory {
    fn default() -> Self {
        Self::with_retention(HISTORY_RETENTION)
    }
}

impl HomeHistory {
    /// A history that keeps reports for `retention` (default [`HISTORY_RETENTION`]).
    pub fn with_retention(retention: Duration) -> Self {
        Self { reports: VecDeque::new(), retention }
    }

    /// Adds this report's latencies and forgets the ones older than the retention.
    pub fn push(&mut self, now: Instant, latencies: &BTreeMap<i64, Duration>) {
        self.reports.push_back((now, latencies.clone()));
        let keep = self.retention;
        while self.reports.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > keep) {
            self.reports.pop_front();
        }
    }

    /// The best retained latency per region.
    pub fn best_recent(&self) -> BTreeMap<i64, Duration> {
        let mut best = BTreeMap::new();
        for (_, m) in &self.reports {
            for (id, d) in m {
                best.entry(*id).and_modify(|b: &mut Duration| *b = (*b).min(*d)).or_insert(*d);
            }
        }
        best
    }
}

/// What the choice needs to know besides this report.
#[derive(Clone, Copy, Debug, Default)]
pub struct HomeState {
    /// The current home region, if any.
    pub old_home: Option<i64>,
    /// How long ago the old home's DERP connection last delivered a frame (None = never/unknown).
    pub old_home_heard_ago: Option<Duration>,
    /// The old home's DERP connection is down (failing to connect): not reachable.
    pub old_home_down: bool,
}

/// Picks the home region after a report with latencies `current` (already recorded in `history`).
pub fn choose_home(
    map: &DerpMap,
    history: &HomeHistory,
    current: &BTreeMap<i64, Duration>,
    state: HomeState,
) -> Option<i64> {
    let heard_within = |d: Duration| state.old_home_heard_ago.is_some_and(|a| a <= d);
    if current.is_empty() {
        // A dead home is kept too: with nothing measured there is nowhere better to go.
        return state.old_home.filter(|_| state.old_home_down || heard_within(KEEP_WITHOUT_DATA));
    }
    // A huge RegionScore (it comes from the map) saturates instead of overflowing.
    let scale =
        |d: Duration, f: f64| Duration::try_from_secs_f64(d.as_secs_f64() * f).unwrap_or(Duration::MAX);
    let scored: BTreeMap<i64, Duration> =
        history.best_recent().into_iter().map(|(id, d)| (id, scale(d, map.region_score(id)))).collect();
    let dead = state.old_home.filter(|_| state.old_home_down);
    let best = current
        .keys()
        .filter(|id| Some(**id) != dead)
        .filter_map(|id| scored.get(id).map(|d| (*d, *id)))
        .filter(|(_, id)| map.regions.get(id).is_none_or(|r| !r.no_measure_no_home))
        .min();
    let Some((best_lat, best_id)) = best else {
        // Nothing else answered: a dead home is still the best guess (it may come back).
        return dead.or_else(|| state.old_home.filter(|_| heard_within(KEEP_WITHOUT_DATA)));
    };
    let Some(old) = state.old_home.filter(|o| *o != best_id) else { return Some(best_id) };
    if state.old_home_down {
        return Some(best_id);
    }
    let old_reachable = current.contains_key(&old) || heard_within(RECENTLY_HEARD);
    let Some(&old_lat) = scored.get(&old).filter(|_| old_reachable) else { return Some(best_id) };
    let gain = old_lat.saturating_sub(best_lat);
    let switch = gain >= MIN_ABSOLUTE_GAIN && best_lat <= old_lat.mul_f64(2.0 / 3.0);
    Some(if switch { best_id } else { old })
}

#[cfg(test)]
mod tests {
    use super::*;
    use derpfleet_proto::derpmap::{DerpRegion, HomeParams};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn lat(v: &[(i64, u64)]) -> BTreeMap<i64, Duration> {
        v.iter().map(|(id, m)| (*id, ms(*m))).collect()
    }

    fn run(map: &DerpMap, v: &[(i64, u64)], state: HomeState) -> Option<i64> {
        let mut h = HomeHistory::default();
        let l = lat(v);
        h.push(Instant::now(), &l);
        choose_home(map, &h, &l, state)
    }

    fn home(id: i64) -> HomeState {
        HomeState { old_home: Some(id), ..Default::default() }
    }

    #[test]
    fn a_dead_home_is_left_at_once_for_any_answering_region() {
        let down = HomeState { old_home: Some(1), old_home_heard_ago: None, old_home_down: true };
        // Region 1's STUN still answers fastest, but its DERP connection is down.
        assert_eq!(run(&DerpMap::default(), &[(1, 5), (2, 60)], down), Some(2));
        // Nothing else answered: keep it (there is nowhere better to go).
        assert_eq!(run(&DerpMap::default(), &[(1, 5)], down), Some(1));
        assert_eq!(run(&DerpMap::default(), &[], down), Some(1));
    }

    #[test]
    fn short_retention_forgets_a_region_that_became_slower() {
        let mut h = HomeHistory::with_retention(Duration::from_secs(10));
        let t0 = Instant::now();
        h.push(t0, &lat(&[(1, 10), (2, 30)]));
        h.push(t0 + Duration::from_secs(11), &lat(&[(1, 70), (2, 30)]));
        assert_eq!(h.best_recent(), lat(&[(1, 70), (2, 30)]));
    }

    #[test]
    fn picks_the_fastest_without_a_home() {
        assert_eq!(run(&DerpMap::default(), &[(1, 40), (2, 10), (3, 80)], HomeState::default()), Some(2));
    }

    #[test]
    fn five_ms_faster_does_not_take_over() {
        assert_eq!(run(&DerpMap::default(), &[(1, 40), (2, 35)], home(1)), Some(1));
    }

    #[test]
    fn thirty_ms_faster_takes_over() {
        assert_eq!(run(&DerpMap::default(), &[(1, 50), (2, 20)], home(1)), Some(2));
    }

    #[test]
    fn both_conditions_are_needed() {
        // 12 ms faster but not a third faster (100 → 88): stay.
        assert_eq!(run(&DerpMap::default(), &[(1, 100), (2, 88)], home(1)), Some(1));
        // A third faster but only 6 ms (18 → 12): stay.
        assert_eq!(run(&DerpMap::default(), &[(1, 18), (2, 12)], home(1)), Some(1));
        // Exactly 10 ms and exactly ⅔ (30 → 20): switch.
        assert_eq!(run(&DerpMap::default(), &[(1, 30), (2, 20)], home(1)), Some(2));
    }

    #[test]
    fn unreachable_old_home_is_dropped_unless_heard_recently() {
        assert_eq!(run(&DerpMap::default(), &[(2, 35)], home(1)), Some(2));
        let mut h = HomeHistory::default();
        let t0 = Instant::now();
        h.push(t0, &lat(&[(1, 40), (2, 38)]));
        let now_lat = lat(&[(2, 35)]);
        h.push(t0 + Duration::from_secs(30), &now_lat);
        let st = HomeState {
            old_home: Some(1),
            old_home_heard_ago: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        assert_eq!(
            choose_home(&DerpMap::default(), &h, &now_lat, st),
            Some(1),
            "heard 2 s ago: still reachable"
        );
        let st = HomeState {
            old_home: Some(1),
            old_home_heard_ago: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        assert_eq!(choose_home(&DerpMap::default(), &h, &now_lat, st), Some(2));
    }

    #[test]
    fn no_data_keeps_a_recently_heard_home() {
        let st = HomeState {
            old_home: Some(1),
            old_home_heard_ago: Some(Duration::from_secs(60)),
            ..Default::default()
        };
        assert_eq!(run(&DerpMap::default(), &[], st), Some(1));
        let st = HomeState {
            old_home: Some(1),
            old_home_heard_ago: Some(Duration::from_secs(200)),
            ..Default::default()
        };
        assert_eq!(run(&DerpMap::default(), &[], st), None);
    }

    #[test]
    fn region_score_scales_latency() {
        let m = DerpMap {
            home_params: Some(HomeParams { region_score: [(1, 0.25), (2, -1.0)].into_iter().collect() }),
            ..Default::default()
        };
        // 1: 40 × 0.25 = 10; 2: score ≤ 0 ignored, 20.
        assert_eq!(run(&m, &[(1, 40), (2, 20)], HomeState::default()), Some(1));
        let huge = DerpMap {
            home_params: Some(HomeParams { region_score: [(1, 1e300)].into_iter().collect() }),
            ..Default::default()
        };
        assert_eq!(run(&huge, &[(1, 5), (2, 20)], HomeState::default()), Some(2), "saturates, no panic");
    }

    #[test]
    fn history_remembers_best_recent_latency_and_expires() {
        let mut h = HomeHistory::default();
        let t0 = Instant::now();
        h.push(t0, &lat(&[(1, 10), (2, 30)]));
        h.push(t0 + Duration::from_secs(60), &lat(&[(1, 50), (2, 25)]));
        assert_eq!(h.best_recent(), lat(&[(1, 10), (2, 25)]));
        h.push(t0 + Duration::from_secs(306), &lat(&[(1, 50)]));
        assert_eq!(h.best_recent(), lat(&[(1, 50), (2, 25)]));
    }

    #[test]
    fn no_measure_no_home_is_never_chosen() {
        let mut m = DerpMap::default();
        m.regions.insert(1, DerpRegion { region_id: 1, no_measure_no_home: true, ..Default::default() });
        assert_eq!(run(&m, &[(1, 5), (2, 50)], HomeState::default()), Some(2));
    }
}
