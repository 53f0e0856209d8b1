//! Which STUN probes to send, and when (spec §7): pure functions of the DERP map and history.

use std::time::Duration;

use derpfleet_proto::derpmap::{AddrUsage, DerpMap, DerpNode, DerpRegion};

pub use super::family::Family;
use super::report::Report;

/// One STUN probe: send to `region.nodes[node]` over `family`, `delay` after the report starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// Region ID.
    pub region: i64,
    /// Index into the region's `Nodes`.
    pub node: usize,
    /// Address family.
    pub family: Family,
    /// When to send, relative to the start of the report.
    pub delay: Duration,
}

/// Tries per region in a full report, sent at 0, 100 and 200 ms.
pub const FULL_TRIES: u32 = 3;
/// Spacing of the tries in a full report.
pub const FULL_TRY_SPACING: Duration = Duration::from_millis(100);

/// True when the region is measured: it has nodes, is not `NoMeasureNoHome`, and is not `Avoid`
/// unless it is the current home.
pub fn measurable(region: &DerpRegion, current_home: Option<i64>) -> bool {
    !region.nodes.is_empty()
        && !region.no_measure_no_home
        && (!region.avoid || current_home == Some(region.region_id))
}

/// True when `node` can answer STUN over `family` (STUN enabled, family not disabled).
pub fn node_supports(node: &DerpNode, family: Family) -> bool {
    node.stun_port().is_some()
        && match family {
            Family::V4 => node.ipv4_usage() != AddrUsage::Disabled,
            Family::V6 => node.ipv6_usage() != AddrUsage::Disabled,
        }
}

fn families(have_v4: bool, have_v6: bool) -> Vec<Family> {
    let mut f = Vec::new();
    if have_v4 {
        f.push(Family::V4);
    }
    if have_v6 {
        f.push(Family::V6);
    }
    f
}

/// The full plan: for every measurable region, tries 0..3 at `try × 100 ms`, node = `Nodes[try % n]`,
/// for each family the host has. Probes to nodes that cannot serve the family are left out.
pub fn full_plan(map: &DerpMap, have_v4: bool, have_v6: bool, current_home: Option<i64>) -> Vec<Probe> {
    let mut plan = Vec::new();
    for r in map.regions.values().filter(|r| measurable(r, current_home)) {
        for t in 0..FULL_TRIES {
            let node = t as usize % r.nodes.len();
            for family in families(have_v4, have_v6) {
                if node_supports(&r.nodes[node], family) {
                    plan.push(Probe { region: r.region_id, node, family, delay: FULL_TRY_SPACING * t });
                }
            }
        }
    }
    plan
}

/// The incremental plan (spec §7): the 3 fastest regions of the last report plus the current
/// home; the fastest 2 get 2 tries, the home 4, the rest 1; try delay
/// `try × max(lastLatency × 1.2, 200 ms)` plus `try × 50 ms` for try > 1. On dual-stack hosts the
/// third and slower regions alternate between IPv4 and IPv6. Falls back to the full plan without
/// a previous report.
pub fn incremental_plan(
    map: &DerpMap,
    last: Option<&Report>,
    have_v4: bool,
    have_v6: bool,
    current_home: Option<i64>,
) -> Vec<Probe> {
    let Some(last) = last.filter(|l| !l.region_latency.is_empty()) else {
        return full_plan(map, have_v4, have_v6, current_home);
    };
    let mut by_latency: Vec<(i64, Duration)> = last
        .region_latency
        .iter()
        .filter(|(id, _)| map.regions.get(id).is_some_and(|r| measurable(r, current_home)))
        .map(|(id, d)| (*id, *d))
        .collect();
    by_latency.sort_by_key(|(id, d)| (*d, *id));
    let mut chosen: Vec<(i64, Duration)> = by_latency.iter().take(3).copied().collect();
    if let Some(h) = current_home {
        if !chosen.iter().any(|(id, _)| *id == h) {
            if let Some(&(id, d)) = by_latency.iter().find(|(id, _)| *id == h) {
                chosen.push((id, d));
            }
        }
    }
    let mut plan = Vec::new();
    for (rank, (id, lat)) in chosen.iter().enumerate() {
        let r = &map.regions[id];
        let tries = if Some(*id) == current_home {
            4
        } else if rank < 2 {
            2
        } else {
            1
        };
        let fams = if rank >= 2 && have_v4 && have_v6 {
            vec![if rank % 2 == 0 { Family::V4 } else { Family::V6 }]
        } else {
            families(have_v4, have_v6)
        };
        let step = lat.mul_f64(1.2).max(Duration::from_millis(200));
        for t in 0..tries {
            let mut delay = step * t;
            if t > 1 {
                delay += Duration::from_millis(50) * t;
            }
            let node = t as usize % r.nodes.len();
            for &family in &fams {
                if node_supports(&r.nodes[node], family) {
                    plan.push(Probe { region: *id, node, family, delay });
                }
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use derpfleet_proto::derpmap::DerpNode;

    fn map(regions: &[(i64, usize)]) -> DerpMap {
        let mut m = DerpMap::default();
        for &(id, n) in regions {
            let nodes = (0..n)
                .map(|i| DerpNode {
                    name: format!("{id}{i}"),
                    region_id: id,
                    host_name: "h".into(),
                    ..Default::default()
                })
                .collect();
            m.regions.insert(id, DerpRegion { region_id: id, nodes, ..Default::default() });
        }
        m
    }

    #[test]
    fn full_plan_is_three_tries_rotating_over_nodes() {
        let m = map(&[(1, 2), (2, 1)]);
        let p = full_plan(&m, true, false, None);
        let r1: Vec<(usize, u128)> =
            p.iter().filter(|p| p.region == 1).map(|p| (p.node, p.delay.as_millis())).collect();
        assert_eq!(r1, vec![(0, 0), (1, 100), (0, 200)]);
        assert_eq!(p.iter().filter(|p| p.region == 2).count(), 3);
        let both = full_plan(&m, true, true, None);
        assert_eq!(both.len(), 12);
        assert_eq!(both.iter().filter(|p| p.family == Family::V6).count(), 6);
    }

    #[test]
    fn avoid_no_measure_and_stun_disabled_are_left_out() {
        let mut m = map(&[(1, 1), (2, 1), (3, 1), (4, 1)]);
        m.regions.get_mut(&1).unwrap().avoid = true;
        m.regions.get_mut(&2).unwrap().no_measure_no_home = true;
        m.regions.get_mut(&3).unwrap().nodes[0].stun_port = -1;
        let regions = |p: Vec<Probe>| {
            let mut r: Vec<i64> = p.iter().map(|p| p.region).collect();
            r.dedup();
            r
        };
        assert_eq!(regions(full_plan(&m, true, false, None)), vec![4]);
        assert_eq!(
            regions(full_plan(&m, true, false, Some(1))),
            vec![1, 4],
            "Avoid is measured when it is home"
        );
        m.regions.get_mut(&4).unwrap().nodes[0].ipv4 = "none".into();
        assert!(full_plan(&m, true, false, None).is_empty());
        assert_eq!(full_plan(&m, false, true, None).len(), 3);
    }

    #[test]
    fn incremental_plan_takes_top_three_plus_home() {
        let m = map(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
        let mut last = Report::default();
        for (id, ms) in [(1, 50), (2, 10), (3, 20), (4, 30), (5, 90)] {
            last.region_latency.insert(id, Duration::from_millis(ms));
        }
        let p = incremental_plan(&m, Some(&last), true, false, Some(5));
        let count = |r| p.iter().filter(|p| p.region == r).count();
        assert_eq!((count(2), count(3), count(4), count(5), count(1)), (2, 2, 1, 4, 0));
        let home: Vec<u128> = p.iter().filter(|p| p.region == 5).map(|p| p.delay.as_millis()).collect();
        // step = max(90 × 1.2, 200) = 200 ms; tries > 1 add try × 50 ms.
        assert_eq!(home, vec![0, 200, 500, 750]);
        assert_eq!(incremental_plan(&m, None, true, false, None), full_plan(&m, true, false, None));
    }
}
