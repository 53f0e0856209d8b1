//! The netcheck report (Tailscale's `netcheck.Report` fields) and how probe results fold into it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::family::Family;

fn ser_dur_map<S: Serializer>(m: &BTreeMap<i64, Duration>, s: S) -> Result<S::Ok, S::Error> {
    // Go marshals time.Duration as integer nanoseconds.
    let ns: BTreeMap<i64, u64> = m.iter().map(|(k, d)| (*k, d.as_nanos() as u64)).collect();
    ns.serialize(s)
}

fn ser_counters<S: Serializer>(m: &BTreeMap<SocketAddr, u32>, s: S) -> Result<S::Ok, S::Error> {
    let v: BTreeMap<String, u32> = m.iter().map(|(k, c)| (k.to_string(), *c)).collect();
    v.serialize(s)
}

/// What one netcheck run found. JSON field names follow Go's `netcheck.Report`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// A STUN round trip worked over some family.
    #[serde(rename = "UDP")]
    pub udp: bool,
    /// A STUN round trip worked over IPv4.
    #[serde(rename = "IPv4")]
    pub ipv4: bool,
    /// A STUN round trip worked over IPv6.
    #[serde(rename = "IPv6")]
    pub ipv6: bool,
    /// A STUN request could be sent over IPv4.
    #[serde(rename = "IPv4CanSend")]
    pub ipv4_can_send: bool,
    /// A STUN request could be sent over IPv6.
    #[serde(rename = "IPv6CanSend")]
    pub ipv6_can_send: bool,
    /// The OS can bind `[::1]`.
    #[serde(rename = "OSHasIPv6")]
    pub os_has_ipv6: bool,
    /// Two IPv4 STUN answers disagreed (hard NAT); `None` with fewer than two answers.
    #[serde(rename = "MappingVariesByDestIP")]
    pub mapping_varies_by_dest_ip: Option<bool>,
    /// The chosen home region (0 = none).
    #[serde(rename = "PreferredDERP")]
    pub preferred_derp: i64,
    /// Best latency per region over both families (and HTTPS when UDP failed).
    #[serde(rename = "RegionLatency", serialize_with = "ser_dur_map")]
    pub region_latency: BTreeMap<i64, Duration>,
    /// Best IPv4 STUN latency per region.
    #[serde(rename = "RegionV4Latency", serialize_with = "ser_dur_map")]
    pub region_v4_latency: BTreeMap<i64, Duration>,
    /// Best IPv6 STUN latency per region.
    #[serde(rename = "RegionV6Latency", serialize_with = "ser_dur_map")]
    pub region_v6_latency: BTreeMap<i64, Duration>,
    /// Our public IPv4 address and port as the first STUN server saw it.
    #[serde(rename = "GlobalV4")]
    pub global_v4: Option<SocketAddr>,
    /// Our public IPv6 address and port as the first STUN server saw it.
    #[serde(rename = "GlobalV6")]
    pub global_v6: Option<SocketAddr>,
    /// How often each IPv4 mapping was seen.
    #[serde(rename = "GlobalV4Counters", serialize_with = "ser_counters")]
    pub global_v4_counters: BTreeMap<SocketAddr, u32>,
    /// How often each IPv6 mapping was seen.
    #[serde(rename = "GlobalV6Counters", serialize_with = "ser_counters")]
    pub global_v6_counters: BTreeMap<SocketAddr, u32>,
    /// Regions measured by HTTPS because UDP failed (not in Go's report; for operators).
    #[serde(rename = "HTTPSLatencyRegions")]
    pub https_regions: Vec<i64>,
}

fn keep_min(m: &mut BTreeMap<i64, Duration>, region: i64, d: Duration) {
    m.entry(region).and_modify(|v| *v = (*v).min(d)).or_insert(d);
}

impl Report {
    /// Folds in a STUN answer from `region` over `family`: round trip `rtt`, mapping `mapped`.
    pub fn add_stun(&mut self, region: i64, family: Family, rtt: Duration, mapped: SocketAddr) {
        self.udp = true;
        keep_min(&mut self.region_latency, region, rtt);
        match family {
            Family::V4 => {
                self.ipv4 = true;
                keep_min(&mut self.region_v4_latency, region, rtt);
                match self.global_v4 {
                    None => self.global_v4 = Some(mapped),
                    Some(first) if first != mapped => self.mapping_varies_by_dest_ip = Some(true),
                    Some(_) => {
                        if self.mapping_varies_by_dest_ip.is_none() {
                            self.mapping_varies_by_dest_ip = Some(false);
                        }
                    }
                }
                *self.global_v4_counters.entry(mapped).or_default() += 1;
            }
            Family::V6 => {
                self.ipv6 = true;
                keep_min(&mut self.region_v6_latency, region, rtt);
                self.global_v6.get_or_insert(mapped);
                *self.global_v6_counters.entry(mapped).or_default() += 1;
            }
        }
    }

    /// Folds in an HTTPS `/derp/latency-check` round trip for `region`.
    pub fn add_https(&mut self, region: i64, rtt: Duration) {
        keep_min(&mut self.region_latency, region, rtt);
        if !self.https_regions.contains(&region) {
            self.https_regions.push(region);
        }
    }

    /// Number of regions with a latency.
    pub fn regions_answered(&self) -> usize {
        self.region_latency.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn latencies_keep_the_minimum_per_family_and_overall() {
        let mut r = Report::default();
        let a: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        r.add_stun(1, Family::V4, ms(30), a);
        r.add_stun(1, Family::V4, ms(20), a);
        r.add_stun(1, Family::V6, ms(10), v6);
        assert!(r.udp && r.ipv4 && r.ipv6);
        assert_eq!(r.region_latency[&1], ms(10));
        assert_eq!(r.region_v4_latency[&1], ms(20));
        assert_eq!(r.region_v6_latency[&1], ms(10));
        assert_eq!(r.global_v4, Some(a));
        assert_eq!(r.global_v6, Some(v6));
        assert_eq!(r.global_v4_counters[&a], 2);
        assert_eq!(r.mapping_varies_by_dest_ip, Some(false));
    }

    #[test]
    fn mapping_varies_when_two_v4_answers_disagree() {
        let mut r = Report::default();
        r.add_stun(1, Family::V4, ms(5), "198.51.100.1:4000".parse().unwrap());
        assert_eq!(r.mapping_varies_by_dest_ip, None);
        r.add_stun(2, Family::V4, ms(5), "198.51.100.1:4001".parse().unwrap());
        assert_eq!(r.mapping_varies_by_dest_ip, Some(true));
        r.add_stun(3, Family::V4, ms(5), "198.51.100.1:4000".parse().unwrap());
        assert_eq!(r.mapping_varies_by_dest_ip, Some(true), "once varied, stays varied");
        assert_eq!(r.global_v4, Some("198.51.100.1:4000".parse().unwrap()));
    }

    #[test]
    fn json_uses_go_names_and_nanoseconds() {
        let mut r = Report::default();
        r.add_https(7, ms(12));
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["RegionLatency"]["7"], 12_000_000);
        assert_eq!(j["UDP"], false);
        assert!(j["MappingVariesByDestIP"].is_null());
        assert_eq!(j["HTTPSLatencyRegions"][0], 7);
    }
}
