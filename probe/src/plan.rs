//! Which probes a DERP map calls for, named as derpprobe names them
//! (`derp/<region>/<node>/<what>`, `derp/<region>/<from>/<to>/mesh`).
//!
//! Per node that speaks DERP (not `STUNOnly`): `derp`, `tls`, and `bw`/`qd` when enabled. Per node
//! with a STUN port: `stun` over IPv4 and `stun6` over IPv6 for each family the node has (a fixed
//! address, or `HostName` when it is not an IP literal of the other family; `"none"` disables one).
//! Per ordered pair of DERP nodes in a region (itself excluded): `mesh`.

use std::net::IpAddr;
use std::time::Duration;

use derpfleet_proto::derpmap::{AddrUsage, DerpMap, DerpNode, DerpRegion};

/// The probe classes (the `class` label and JSON field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Connect, handshake, ServerInfo, a packet round trip between two connections.
    Derp,
    /// TLS handshake, certificate validity and days to expiry.
    Tls,
    /// STUN Binding round trip.
    Stun,
    /// A packet across the region's mesh, from a client on one node to a client on another.
    Mesh,
    /// Throughput of a transfer through one node.
    Bw,
    /// Continuous queuing delay at a low packet rate.
    Qd,
}

impl Class {
    /// Every class, in the order the status page shows them.
    pub const ALL: [Class; 6] = [Class::Derp, Class::Tls, Class::Stun, Class::Mesh, Class::Bw, Class::Qd];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Derp => "derp",
            Class::Tls => "tls",
            Class::Stun => "stun",
            Class::Mesh => "mesh",
            Class::Bw => "bw",
            Class::Qd => "qd",
        }
    }
}

/// IP family of a STUN probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// One probe to run repeatedly.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeSpec {
    /// Unique name, e.g. `derp/nyc/900a/tls`.
    pub name: String,
    /// What kind of probe.
    pub class: Class,
    /// The region (ID and code).
    pub region_id: i64,
    /// `RegionCode` (or the ID as text when the map has none).
    pub region: String,
    /// The node probed (for mesh: the sending node).
    pub node: DerpNode,
    /// Mesh: the receiving node.
    pub peer: Option<DerpNode>,
    /// STUN: the address family.
    pub family: Option<Family>,
    /// How often it runs.
    pub interval: Duration,
}

/// Intervals per class (zero disables a class) and the region filter.
#[derive(Clone, Debug)]
pub struct PlanConfig {
    /// `derp` probes.
    pub derp: Duration,
    /// `tls` probes.
    pub tls: Duration,
    /// `stun` probes.
    pub stun: Duration,
    /// `mesh` probes.
    pub mesh: Duration,
    /// `bw` probes.
    pub bw: Duration,
    /// `qd`: on when the packet rate is above 0 (it runs continuously; this is its report period).
    pub qd: Duration,
    /// Only this `RegionCode` when not empty.
    pub region_code: String,
}

fn region_label(r: &DerpRegion) -> String {
    if r.region_code.is_empty() {
        r.region_id.to_string()
    } else {
        r.region_code.clone()
    }
}

/// Whether the node can be reached over `family` (fixed address, or DNS for a non-literal name).
pub fn has_family(node: &DerpNode, family: Family) -> bool {
    let literal = node.host_name.parse::<IpAddr>().ok();
    match family {
        Family::V4 => match node.ipv4_usage() {
            AddrUsage::Fixed(_) => true,
            AddrUsage::Disabled => false,
            AddrUsage::Dns => literal.is_none_or(|ip| ip.is_ipv4()),
        },
        Family::V6 => match node.ipv6_usage() {
            AddrUsage::Fixed(_) => true,
            AddrUsage::Disabled => false,
            AddrUsage::Dns => literal.is_none_or(|ip| ip.is_ipv6()),
        },
    }
}

/// Every probe `map` calls for under `cfg`, sorted by name.
pub fn plan(map: &DerpMap, cfg: &PlanConfig) -> Vec<ProbeSpec> {
    let mut out = Vec::new();
    for region in map.regions.values() {
        if !cfg.region_code.is_empty() && region.region_code != cfg.region_code {
            continue;
        }
        let code = region_label(region);
        let spec =
            |class, node: &DerpNode, peer: Option<&DerpNode>, family, what: &str, interval| ProbeSpec {
                name: match peer {
                    Some(p) => format!("derp/{code}/{}/{}/{what}", node.name, p.name),
                    None => format!("derp/{code}/{}/{what}", node.name),
                },
                class,
                region_id: region.region_id,
                region: code.clone(),
                node: node.clone(),
                peer: peer.cloned(),
                family,
                interval,
            };
        let derp_nodes: Vec<&DerpNode> = region.nodes.iter().filter(|n| !n.stun_only).collect();
        for node in &region.nodes {
            if !node.stun_only {
                if !cfg.derp.is_zero() {
                    out.push(spec(Class::Derp, node, None, None, "derp", cfg.derp));
                }
                if !cfg.tls.is_zero() {
                    out.push(spec(Class::Tls, node, None, None, "tls", cfg.tls));
                }
                if !cfg.bw.is_zero() {
                    out.push(spec(Class::Bw, node, None, None, "bw", cfg.bw));
                }
                if !cfg.qd.is_zero() {
                    out.push(spec(Class::Qd, node, None, None, "qd", cfg.qd));
                }
            }
            if !cfg.stun.is_zero() && node.stun_port().is_some() {
                for (family, what) in [(Family::V4, "stun"), (Family::V6, "stun6")] {
                    if has_family(node, family) {
                        out.push(spec(Class::Stun, node, None, Some(family), what, cfg.stun));
                    }
                }
            }
        }
        if !cfg.mesh.is_zero() {
            for from in &derp_nodes {
                for to in &derp_nodes {
                    if from.name != to.name {
                        out.push(spec(Class::Mesh, from, Some(to), None, "mesh", cfg.mesh));
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PlanConfig {
        let s = Duration::from_secs(15);
        PlanConfig {
            derp: s,
            tls: s,
            stun: s,
            mesh: s,
            bw: Duration::ZERO,
            qd: Duration::ZERO,
            region_code: "".into(),
        }
    }

    fn map() -> DerpMap {
        DerpMap::from_json(
            br#"{"Regions":{"1":{"RegionID":1,"RegionCode":"aa","Nodes":[
                {"Name":"1a","RegionID":1,"HostName":"127.0.0.1","STUNPort":3478},
                {"Name":"1b","RegionID":1,"HostName":"derp1b.example","IPv6":"none"},
                {"Name":"1s","RegionID":1,"HostName":"stun.example","STUNOnly":true,"IPv4":"192.0.2.1"}]},
              "2":{"RegionID":2,"RegionCode":"bb","Nodes":[
                {"Name":"2a","RegionID":2,"HostName":"::1","STUNPort":-1}]}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn every_class_per_node_and_mesh_for_ordered_pairs() {
        let names: Vec<String> = plan(&map(), &cfg()).into_iter().map(|p| p.name).collect();
        let want = [
            "derp/aa/1a/1b/mesh",
            "derp/aa/1a/derp",
            "derp/aa/1a/stun",
            "derp/aa/1a/tls",
            "derp/aa/1b/1a/mesh",
            "derp/aa/1b/derp",
            "derp/aa/1b/stun",
            "derp/aa/1b/tls",
            "derp/aa/1s/stun",
            "derp/aa/1s/stun6",
            "derp/bb/2a/derp",
            "derp/bb/2a/tls",
        ];
        assert_eq!(names, want);
    }

    #[test]
    fn region_filter_and_disabled_classes() {
        let mut c = cfg();
        c.region_code = "bb".into();
        c.tls = Duration::ZERO;
        let names: Vec<String> = plan(&map(), &c).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["derp/bb/2a/derp"]);
    }
}
