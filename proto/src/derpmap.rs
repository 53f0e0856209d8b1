//! Tailscale's DERP map JSON (`tailcfg.DERPMap`, spec §6) and its validation.
//!
//! Field names are Tailscale's. Go's `encoding/json` matches object keys case-insensitively, and
//! operators write both `omitDefaultRegions` and `OmitDefaultRegions`, so [`DerpMap`] decoding
//! first folds every known key to its canonical spelling, then decodes strictly. Unknown keys are
//! ignored, as Go does. [`DerpMap::validate`] checks what Go leaves to runtime surprises and names
//! the region, node and field at fault.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Largest region ID (2^53 − 1: it must survive a JSON number in JavaScript).
pub const MAX_REGION_ID: i64 = (1 << 53) - 1;
/// STUN port used when `STUNPort` is 0.
pub const DEFAULT_STUN_PORT: u16 = 3478;
/// DERP (HTTPS) port used when `DERPPort` is 0.
pub const DEFAULT_DERP_PORT: u16 = 443;
/// `CertName` prefix pinning a self-signed certificate by the SHA-256 of its DER.
pub const SHA256_RAW_PREFIX: &str = "sha256-raw:";

/// The whole map: regions by ID plus home-selection parameters.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DerpMap {
    /// Home-selection tuning (`RegionScore`).
    #[serde(rename = "HomeParams", skip_serializing_if = "Option::is_none")]
    pub home_params: Option<HomeParams>,
    /// Regions keyed by region ID (decimal-string keys in JSON).
    #[serde(rename = "Regions")]
    pub regions: BTreeMap<i64, DerpRegion>,
    /// Drop Tailscale's own regions when merging with the default map.
    #[serde(rename = "omitDefaultRegions", skip_serializing_if = "is_false")]
    pub omit_default_regions: bool,
}

/// `HomeParams`: per-region multipliers applied to measured latency when choosing a home.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HomeParams {
    /// (0,1) favours a region, > 1 penalizes it, ≤ 0 is ignored.
    #[serde(rename = "RegionScore", default, deserialize_with = "null_default")]
    pub region_score: BTreeMap<i64, f64>,
}

/// One region: a set of equivalent nodes, in priority order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DerpRegion {
    /// Must equal the key under which the region is listed.
    #[serde(rename = "RegionID")]
    pub region_id: i64,
    /// Short code, e.g. `"nyc"`.
    #[serde(rename = "RegionCode", default, deserialize_with = "null_default")]
    pub region_code: String,
    /// Human name, e.g. `"New York City"`.
    #[serde(rename = "RegionName", default, deserialize_with = "null_default")]
    pub region_name: String,
    /// Latitude (informational).
    #[serde(rename = "Latitude", default, skip_serializing_if = "is_zero_f64")]
    pub latitude: f64,
    /// Longitude (informational).
    #[serde(rename = "Longitude", default, skip_serializing_if = "is_zero_f64")]
    pub longitude: f64,
    /// Deprecated: not measured and not chosen as home, unless it already is the home.
    #[serde(rename = "Avoid", default, skip_serializing_if = "is_false")]
    pub avoid: bool,
    /// Never measured, never chosen as home; still used to reach peers homed there.
    #[serde(rename = "NoMeasureNoHome", default, skip_serializing_if = "is_false")]
    pub no_measure_no_home: bool,
    /// Nodes in priority order (TLS goes to the first that connects).
    #[serde(rename = "Nodes", default, deserialize_with = "null_default")]
    pub nodes: Vec<DerpNode>,
}

/// One relay server (or STUN-only server) of a region.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DerpNode {
    /// Unique across the whole map, e.g. `"900a"`.
    #[serde(rename = "Name", default, deserialize_with = "null_default")]
    pub name: String,
    /// Must equal the region the node is listed in.
    #[serde(rename = "RegionID", default)]
    pub region_id: i64,
    /// DNS name or IP literal dialed for DERP (TLS SNI unless it is an IP).
    #[serde(rename = "HostName", default, deserialize_with = "null_default")]
    pub host_name: String,
    /// Name to verify the certificate for, or `sha256-raw:<hex>` to pin a self-signed one.
    #[serde(rename = "CertName", default, skip_serializing_if = "String::is_empty")]
    pub cert_name: String,
    /// `""` = resolve HostName; an IPv4 literal forces it; anything else disables IPv4.
    #[serde(rename = "IPv4", default, skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    /// `""` = resolve HostName; an IPv6 literal forces it; anything else disables IPv6.
    #[serde(rename = "IPv6", default, skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// 0 = 3478, -1 = STUN disabled.
    #[serde(rename = "STUNPort", default, skip_serializing_if = "is_zero_i64")]
    pub stun_port: i64,
    /// Never dialed for DERP.
    #[serde(rename = "STUNOnly", default, skip_serializing_if = "is_false")]
    pub stun_only: bool,
    /// 0 = 443.
    #[serde(rename = "DERPPort", default, skip_serializing_if = "is_zero_i64")]
    pub derp_port: i64,
    /// Skip TLS verification (tests only).
    #[serde(rename = "InsecureForTests", default, skip_serializing_if = "is_false")]
    pub insecure_for_tests: bool,
    /// STUN to this IP instead (tests only).
    #[serde(rename = "STUNTestIP", default, skip_serializing_if = "String::is_empty")]
    pub stun_test_ip: String,
    /// The node answers `http://IPv4/generate_204` (captive-portal checks).
    #[serde(rename = "CanPort80", default, skip_serializing_if = "is_false")]
    pub can_port80: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}
fn is_zero_f64(v: &f64) -> bool {
    *v == 0.0
}

/// Go decodes JSON `null` into the zero value; serde would reject it for strings and maps.
fn null_default<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// How a node may be reached over one address family (the `IPv4`/`IPv6` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrUsage<A> {
    /// `""`: resolve `HostName` through DNS.
    Dns,
    /// An IP of the right family: use it.
    Fixed(A),
    /// Any other string (conventionally `"none"`): this family is disabled.
    Disabled,
}

/// How the node's TLS certificate is verified (the `CertName` / `InsecureForTests` fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertCheck {
    /// Web PKI, for `HostName`.
    HostName,
    /// Web PKI, for this other name (SNI stays `HostName`).
    Name(String),
    /// Exactly one self-signed leaf whose DER hashes to this SHA-256.
    Sha256Raw([u8; 32]),
    /// No verification (tests only).
    Insecure,
}

impl DerpNode {
    /// The STUN port, or `None` when STUN is disabled (`STUNPort` -1) or out of range.
    pub fn stun_port(&self) -> Option<u16> {
        match self.stun_port {
            0 => Some(DEFAULT_STUN_PORT),
            p => u16::try_from(p).ok().filter(|p| *p != 0),
        }
    }

    /// The DERP port (`DERPPort`, or 443 when 0).
    pub fn derp_port(&self) -> u16 {
        match self.derp_port {
            0 => DEFAULT_DERP_PORT,
            p => u16::try_from(p).unwrap_or(DEFAULT_DERP_PORT),
        }
    }

    /// How to reach the node over IPv4.
    pub fn ipv4_usage(&self) -> AddrUsage<Ipv4Addr> {
        addr_usage(&self.ipv4)
    }

    /// How to reach the node over IPv6.
    pub fn ipv6_usage(&self) -> AddrUsage<Ipv6Addr> {
        addr_usage(&self.ipv6)
    }

    /// How to verify the node's certificate. Call on a validated map (a malformed pin falls back
    /// to verifying `HostName`, which then fails for a self-signed certificate).
    pub fn cert_check(&self) -> CertCheck {
        if self.insecure_for_tests {
            return CertCheck::Insecure;
        }
        if self.cert_name.is_empty() {
            return CertCheck::HostName;
        }
        if let Some(hash) = self.cert_name.strip_prefix(SHA256_RAW_PREFIX) {
            let mut out = [0u8; 32];
            if hash.len() == 64 && hex::decode_to_slice(hash, &mut out).is_ok() {
                return CertCheck::Sha256Raw(out);
            }
            return CertCheck::HostName;
        }
        CertCheck::Name(self.cert_name.clone())
    }

    /// True when `HostName` is an IP literal (then no SNI is sent).
    pub fn host_is_ip(&self) -> bool {
        self.host_name.parse::<IpAddr>().is_ok()
    }
}

fn addr_usage<A: std::str::FromStr>(s: &str) -> AddrUsage<A> {
    if s.is_empty() {
        return AddrUsage::Dns;
    }
    s.parse().map(AddrUsage::Fixed).unwrap_or(AddrUsage::Disabled)
}

/// Why a DERP map was rejected; every variant names its culprit.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum DerpMapError {
    /// Not JSON, or a field of the wrong type.
    #[error("DERP map JSON: {0}")]
    Json(String),
    /// Region IDs must be in 1..=2^53−1.
    #[error("region {0}: RegionID must be between 1 and 2^53-1")]
    RegionIdOutOfRange(i64),
    /// The map key and the region's RegionID differ.
    #[error("region {key}: listed under key {key} but its RegionID is {region_id}")]
    RegionKeyMismatch {
        /// the map key
        key: i64,
        /// the RegionID field
        region_id: i64,
    },
    /// A node names another region.
    #[error("region {region}, node {node:?}: RegionID is {node_region}, expected {region}")]
    NodeRegionMismatch {
        /// the region holding the node
        region: i64,
        /// the node name
        node: String,
        /// the node's RegionID
        node_region: i64,
    },
    /// A node without a name.
    #[error("region {region}, node #{index}: Name is empty")]
    EmptyNodeName {
        /// the region
        region: i64,
        /// position in Nodes
        index: usize,
    },
    /// Two nodes share a name (names are unique across regions).
    #[error("node {name:?}: duplicate Name (in region {first_region} and region {second_region})")]
    DuplicateNodeName {
        /// the shared name
        name: String,
        /// where it appeared first
        first_region: i64,
        /// where it appeared again
        second_region: i64,
    },
    /// A node without a host name.
    #[error("region {region}, node {node:?}: HostName is empty")]
    EmptyHostName {
        /// the region
        region: i64,
        /// the node name
        node: String,
    },
    /// `CertName` is neither a DNS name nor `sha256-raw:<64 hex>`.
    #[error(
        "region {region}, node {node:?}: CertName {value:?} is neither a DNS name nor sha256-raw:<64 hex>"
    )]
    BadCertName {
        /// the region
        region: i64,
        /// the node name
        node: String,
        /// the offending value
        value: String,
    },
    /// `IPv4`/`IPv6` holds an IP of the other family, or is otherwise not usable.
    #[error("region {region}, node {node:?}: {field} {value:?} is not an {field} address, \"\" or \"none\"")]
    BadIp {
        /// the region
        region: i64,
        /// the node name
        node: String,
        /// `IPv4` or `IPv6`
        field: &'static str,
        /// the offending value
        value: String,
    },
    /// A port outside its range.
    #[error("region {region}, node {node:?}: {field} {value} is out of range")]
    PortOutOfRange {
        /// the region
        region: i64,
        /// the node name
        node: String,
        /// `STUNPort` or `DERPPort`
        field: &'static str,
        /// the offending value
        value: i64,
    },
}

/// Canonical spellings of the keys at each level, for case-insensitive folding.
const MAP_KEYS: &[&str] = &["HomeParams", "Regions", "omitDefaultRegions"];
const HOME_PARAMS_KEYS: &[&str] = &["RegionScore"];
const REGION_KEYS: &[&str] =
    &["RegionID", "RegionCode", "RegionName", "Latitude", "Longitude", "Avoid", "NoMeasureNoHome", "Nodes"];
const NODE_KEYS: &[&str] = &[
    "Name",
    "RegionID",
    "HostName",
    "CertName",
    "IPv4",
    "IPv6",
    "STUNPort",
    "STUNOnly",
    "DERPPort",
    "InsecureForTests",
    "STUNTestIP",
    "CanPort80",
];

/// Renames keys of `v` (an object) to their canonical spelling when they match case-insensitively.
/// As in Go, an exact match wins over a case-folded one.
fn fold_keys(v: &mut Value, canonical: &[&str]) {
    let Value::Object(m) = v else { return };
    let old = std::mem::take(m);
    let exact: Vec<String> = old.keys().filter(|k| canonical.contains(&k.as_str())).cloned().collect();
    for (k, val) in old {
        let canon = canonical.iter().find(|c| c.eq_ignore_ascii_case(&k)).copied();
        match canon {
            Some(c) if c != k && exact.iter().any(|e| e == c) => {} // exact spelling present: it wins
            Some(c) => {
                m.insert(c.to_string(), val);
            }
            None => {
                m.insert(k, val);
            }
        }
    }
}

fn fold_map(v: &mut Value) {
    fold_keys(v, MAP_KEYS);
    let Value::Object(m) = v else { return };
    if let Some(hp) = m.get_mut("HomeParams") {
        fold_keys(hp, HOME_PARAMS_KEYS);
    }
    if let Some(Value::Object(regions)) = m.get_mut("Regions") {
        for r in regions.values_mut() {
            fold_keys(r, REGION_KEYS);
            if let Some(Value::Array(nodes)) = r.get_mut("Nodes") {
                nodes.iter_mut().for_each(|n| fold_keys(n, NODE_KEYS));
            }
        }
    }
}

/// The map's JSON after key folding, decoded strictly.
#[derive(Deserialize)]
struct FoldedMap {
    #[serde(rename = "HomeParams", default)]
    home_params: Option<HomeParams>,
    #[serde(rename = "Regions", default, deserialize_with = "null_default")]
    regions: BTreeMap<i64, DerpRegion>,
    #[serde(rename = "omitDefaultRegions", default, deserialize_with = "null_default")]
    omit_default_regions: bool,
}

impl<'de> Deserialize<'de> for DerpMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut v = Value::deserialize(d)?;
        // serde would take an array as a struct's fields in order: say what a map looks like instead.
        if !v.is_object() {
            return Err(serde::de::Error::custom(format!(
                "a DERP map is a JSON object ({{\"Regions\": {{\"<id>\": {{…}}}}}}), not {}",
                json_kind(&v)
            )));
        }
        fold_map(&mut v);
        let f = FoldedMap::deserialize(v).map_err(serde::de::Error::custom)?;
        Ok(Self {
            home_params: f.home_params,
            regions: f.regions,
            omit_default_regions: f.omit_default_regions,
        })
    }
}

/// "an array", "the number 5", … for error messages.
fn json_kind(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// serde's messages in the JSON's own words: `expected struct DerpNode` names a Rust type the user never
/// wrote, so the types become the JSON shapes (and the field the user did write, where there is one).
fn plain_words(serde_msg: &str) -> String {
    const SHAPES: [(&str, &str); 5] = [
        ("struct HomeParams", "an object for \"HomeParams\""),
        ("struct DerpRegion", "a region object"),
        ("struct DerpNode", "a node object"),
        ("struct FoldedMap", "a DERP map object"),
        ("a map", "an object"),
    ];
    let mut out = serde_msg.replace("invalid type: sequence", "invalid type: array");
    out = out.replace("invalid type: map", "invalid type: object");
    for (rust, json) in SHAPES {
        out = out.replace(rust, json);
    }
    out
}

/// True for a syntactically valid DNS name (LDH labels, underscores tolerated, optional final dot).
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn valid_cert_name(s: &str) -> bool {
    if s.is_empty() {
        return true;
    }
    if let Some(h) = s.strip_prefix(SHA256_RAW_PREFIX) {
        return h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
    }
    is_dns_name(s) || s.parse::<IpAddr>().is_ok()
}

/// `""`, an IP of family `A`, or a non-IP word that disables the family; an IP of the other family
/// is a mistake (it would silently disable the family).
fn valid_family<A: std::str::FromStr>(s: &str) -> bool {
    s.is_empty() || s.parse::<A>().is_ok() || s.parse::<IpAddr>().is_err()
}

impl DerpMap {
    /// Parses and validates a DERP map.
    pub fn from_json(json: &[u8]) -> Result<Self, DerpMapError> {
        let m: Self =
            serde_json::from_slice(json).map_err(|e| DerpMapError::Json(plain_words(&e.to_string())))?;
        m.validate()?;
        Ok(m)
    }

    /// Checks the rules of spec §6 that Go would only trip over at runtime; the first problem found
    /// (regions in ID order, nodes in list order) is returned.
    pub fn validate(&self) -> Result<(), DerpMapError> {
        let mut names: HashMap<&str, i64> = HashMap::new();
        for (&key, r) in &self.regions {
            if key <= 0 || key > MAX_REGION_ID {
                return Err(DerpMapError::RegionIdOutOfRange(key));
            }
            if r.region_id != key {
                return Err(DerpMapError::RegionKeyMismatch { key, region_id: r.region_id });
            }
            for (index, n) in r.nodes.iter().enumerate() {
                let node = || n.name.clone();
                if n.name.is_empty() {
                    return Err(DerpMapError::EmptyNodeName { region: key, index });
                }
                if let Some(&first) = names.get(n.name.as_str()) {
                    return Err(DerpMapError::DuplicateNodeName {
                        name: node(),
                        first_region: first,
                        second_region: key,
                    });
                }
                names.insert(&n.name, key);
                if n.region_id != key {
                    return Err(DerpMapError::NodeRegionMismatch {
                        region: key,
                        node: node(),
                        node_region: n.region_id,
                    });
                }
                if n.host_name.is_empty() {
                    return Err(DerpMapError::EmptyHostName { region: key, node: node() });
                }
                if !valid_cert_name(&n.cert_name) {
                    return Err(DerpMapError::BadCertName {
                        region: key,
                        node: node(),
                        value: n.cert_name.clone(),
                    });
                }
                for (field, value, ok) in [
                    ("IPv4", &n.ipv4, valid_family::<Ipv4Addr>(&n.ipv4)),
                    ("IPv6", &n.ipv6, valid_family::<Ipv6Addr>(&n.ipv6)),
                ] {
                    if !ok {
                        return Err(DerpMapError::BadIp {
                            region: key,
                            node: node(),
                            field,
                            value: value.clone(),
                        });
                    }
                }
                if !(-1..=65535).contains(&n.stun_port) {
                    return Err(DerpMapError::PortOutOfRange {
                        region: key,
                        node: node(),
                        field: "STUNPort",
                        value: n.stun_port,
                    });
                }
                if !(0..=65535).contains(&n.derp_port) {
                    return Err(DerpMapError::PortOutOfRange {
                        region: key,
                        node: node(),
                        field: "DERPPort",
                        value: n.derp_port,
                    });
                }
            }
        }
        Ok(())
    }

    /// The region score for `region` (1.0 when unset or ≤ 0).
    pub fn region_score(&self, region: i64) -> f64 {
        self.home_params
            .as_ref()
            .and_then(|h| h.region_score.get(&region).copied())
            .filter(|s| *s > 0.0)
            .unwrap_or(1.0)
    }

    /// Serializes to Tailscale's JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("DERP map serialization cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{"OmitDefaultRegions":true,"Regions":{"900":{"RegionID":900,"RegionCode":"home","RegionName":"Home DERP",
 "Nodes":[{"Name":"900a","RegionID":900,"HostName":"derp.example.com","IPv4":"203.0.113.7","IPv6":"2001:db8::7"}]}}}"#;

    fn node(name: &str, region: i64) -> DerpNode {
        DerpNode { name: name.into(), region_id: region, host_name: "h.example".into(), ..Default::default() }
    }

    fn map_with(nodes: Vec<(i64, DerpNode)>) -> DerpMap {
        let mut m = DerpMap::default();
        for (r, n) in nodes {
            m.regions
                .entry(r)
                .or_insert_with(|| DerpRegion { region_id: r, ..Default::default() })
                .nodes
                .push(n);
        }
        m
    }

    #[test]
    fn spec_example_parses() {
        let m = DerpMap::from_json(EXAMPLE.as_bytes()).unwrap();
        assert!(m.omit_default_regions);
        let n = &m.regions[&900].nodes[0];
        assert_eq!(n.name, "900a");
        assert_eq!(n.ipv4_usage(), AddrUsage::Fixed("203.0.113.7".parse().unwrap()));
        assert_eq!(n.ipv6_usage(), AddrUsage::Fixed("2001:db8::7".parse().unwrap()));
        assert_eq!(n.derp_port(), 443);
        assert_eq!(n.stun_port(), Some(3478));
        assert_eq!(n.cert_check(), CertCheck::HostName);
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_keys_ignored() {
        let j = r#"{"omitdefaultregions":true,"regions":{"1":{"regionid":1,"nodes":[
            {"name":"1a","regionID":1,"hostname":"10.0.0.1","certname":"sha256-raw:ABab000000000000000000000000000000000000000000000000000000000000","stunport":-1,"derpport":8443,"insecurefortests":false,"Future":7}]}},
            "homeParams":{"regionscore":{"1":0.5}}}"#;
        let m = DerpMap::from_json(j.as_bytes()).unwrap();
        assert!(m.omit_default_regions);
        let n = &m.regions[&1].nodes[0];
        assert_eq!(n.stun_port(), None);
        assert_eq!(n.derp_port(), 8443);
        assert!(n.host_is_ip());
        assert!(
            matches!(n.cert_check(), CertCheck::Sha256Raw(h) if h[0] == 0xab && h[1] == 0xab && h[2] == 0)
        );
        assert_eq!(m.region_score(1), 0.5);
        assert_eq!(m.region_score(2), 1.0);
        let lower = DerpMap::from_json(br#"{"omitDefaultRegions":true,"Regions":{}}"#).unwrap();
        assert!(lower.omit_default_regions);
    }

    #[test]
    fn exact_key_wins_over_folded_one() {
        let m = DerpMap::from_json(br#"{"omitdefaultregions":false,"omitDefaultRegions":true}"#).unwrap();
        assert!(m.omit_default_regions);
    }

    #[test]
    fn round_trips_through_json_with_go_names() {
        let m = DerpMap::from_json(EXAMPLE.as_bytes()).unwrap();
        let s = m.to_json();
        assert!(s.contains(r#""omitDefaultRegions":true"#), "{s}");
        assert!(s.contains(r#""HostName":"derp.example.com""#), "{s}");
        assert!(!s.contains("STUNPort"), "zero fields omitted: {s}");
        assert_eq!(DerpMap::from_json(s.as_bytes()).unwrap(), m);
    }

    #[test]
    fn nulls_decode_as_zero_values() {
        let m = DerpMap::from_json(
            br#"{"Regions":{"5":{"RegionID":5,"RegionCode":null,"Nodes":null}},"HomeParams":null}"#,
        )
        .unwrap();
        assert!(m.regions[&5].nodes.is_empty());
    }

    /// Found by the `derp_map_json` fuzz target: serde_json's default float parser misread
    /// `2.222222222222222e44` by one unit in the last place, so a map did not survive its own JSON. Go's
    /// parser is exact, and so is ours with `float_roundtrip`.
    #[test]
    fn coordinates_round_trip_exactly() {
        for lat in
            ["2.222222222222222e44", "222222222222222222222222222222222222222222250.11", "50.11", "-33.8688"]
        {
            let json = format!(
                r#"{{"Regions":{{"1":{{"RegionID":1,"Latitude":{lat},"Nodes":[{{"Name":"1a","RegionID":1,"HostName":"h.example"}}]}}}}}}"#
            );
            let m = DerpMap::from_json(json.as_bytes()).unwrap();
            assert_eq!(m.regions[&1].latitude, lat.parse::<f64>().unwrap(), "{lat}");
            assert_eq!(DerpMap::from_json(m.to_json().as_bytes()).unwrap(), m, "{lat}");
        }
    }

    #[test]
    fn bad_json_is_an_error_not_a_panic() {
        assert!(matches!(DerpMap::from_json(b"{"), Err(DerpMapError::Json(_))));
        // Wrong shapes are described in JSON terms, never by Rust type names.
        for (json, says) in [
            (&br#"[]"#[..], "not an array"),
            (br#"5"#, "not the number 5"),
            (br#"{"HomeParams":5}"#, "expected an object for \"HomeParams\""),
            (br#"{"Regions":[1]}"#, "invalid type: array, expected an object"),
            (br#"{"Regions":{"1":[]}}"#, "expected a region object"),
        ] {
            let err = DerpMap::from_json(json).unwrap_err().to_string();
            assert!(err.contains(says), "{}: {err}", String::from_utf8_lossy(json));
            assert!(!err.contains("struct"), "{}: {err}", String::from_utf8_lossy(json));
        }
        assert!(matches!(DerpMap::from_json(br#"{"Regions":{"x":{}}}"#), Err(DerpMapError::Json(_))));
        assert!(matches!(
            DerpMap::from_json(br#"{"Regions":{"1":{"RegionID":"1"}}}"#),
            Err(DerpMapError::Json(_))
        ));
    }

    #[test]
    fn region_id_zero_rejected() {
        let j = br#"{"Regions":{"0":{"RegionID":0,"Nodes":[]}}}"#;
        let e = DerpMap::from_json(j).unwrap_err();
        assert_eq!(e, DerpMapError::RegionIdOutOfRange(0));
        assert!(e.to_string().contains("region 0"), "{e}");
    }

    #[test]
    fn region_id_too_large_rejected() {
        let big = MAX_REGION_ID + 1;
        let m = map_with(vec![(big, node("a", big))]);
        assert_eq!(m.validate(), Err(DerpMapError::RegionIdOutOfRange(big)));
        let ok = map_with(vec![(MAX_REGION_ID, node("a", MAX_REGION_ID))]);
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn region_key_mismatch_rejected() {
        let mut m = map_with(vec![(1, node("a", 1))]);
        m.regions.get_mut(&1).unwrap().region_id = 2;
        assert_eq!(m.validate(), Err(DerpMapError::RegionKeyMismatch { key: 1, region_id: 2 }));
    }

    #[test]
    fn node_region_mismatch_rejected() {
        let m = map_with(vec![(1, node("a", 7))]);
        let e = m.validate().unwrap_err();
        assert_eq!(e, DerpMapError::NodeRegionMismatch { region: 1, node: "a".into(), node_region: 7 });
        assert!(e.to_string().contains("\"a\""), "{e}");
    }

    #[test]
    fn duplicate_node_name_across_regions_rejected() {
        let m = map_with(vec![(1, node("x", 1)), (2, node("y", 2)), (2, node("x", 2))]);
        let e = m.validate().unwrap_err();
        assert_eq!(
            e,
            DerpMapError::DuplicateNodeName { name: "x".into(), first_region: 1, second_region: 2 }
        );
        assert!(e.to_string().contains("duplicate Name"), "{e}");
    }

    #[test]
    fn empty_names_rejected() {
        let mut n = node("a", 1);
        n.host_name.clear();
        assert_eq!(
            map_with(vec![(1, n)]).validate(),
            Err(DerpMapError::EmptyHostName { region: 1, node: "a".into() })
        );
        assert_eq!(
            map_with(vec![(1, node("", 1))]).validate(),
            Err(DerpMapError::EmptyNodeName { region: 1, index: 0 })
        );
    }

    #[test]
    fn cert_names() {
        let with = |c: &str| {
            let mut n = node("a", 1);
            n.cert_name = c.into();
            map_with(vec![(1, n)]).validate()
        };
        for ok in [
            "",
            "derp.example.com",
            "derp.example.com.",
            "x",
            "203.0.113.7",
            &format!("sha256-raw:{}", "0f".repeat(32)),
        ] {
            assert_eq!(with(ok), Ok(()), "{ok}");
        }
        for bad in [
            "sha256-raw:abc",
            &format!("sha256-raw:{}", "zz".repeat(32)),
            "has space.example",
            "-lead.example",
            "a..b",
            "https://derp.example.com",
        ] {
            let e = with(bad).unwrap_err();
            assert!(matches!(&e, DerpMapError::BadCertName { value, .. } if value == bad), "{bad}: {e}");
            assert!(e.to_string().contains("CertName"));
        }
    }

    #[test]
    fn ip_fields() {
        let with = |v4: &str, v6: &str| {
            let mut n = node("a", 1);
            n.ipv4 = v4.into();
            n.ipv6 = v6.into();
            map_with(vec![(1, n)]).validate()
        };
        assert_eq!(with("", ""), Ok(()));
        assert_eq!(with("1.2.3.4", "::1"), Ok(()));
        assert_eq!(with("none", "none"), Ok(()));
        assert!(matches!(with("::1", ""), Err(DerpMapError::BadIp { field: "IPv4", .. })));
        assert!(matches!(with("", "1.2.3.4"), Err(DerpMapError::BadIp { field: "IPv6", .. })));
        let n = DerpNode { ipv4: "none".into(), ..node("a", 1) };
        assert_eq!(n.ipv4_usage(), AddrUsage::Disabled);
        assert_eq!(n.ipv6_usage(), AddrUsage::Dns);
    }

    #[test]
    fn ports() {
        let with = |stun: i64, derp: i64| {
            let n = DerpNode { stun_port: stun, derp_port: derp, ..node("a", 1) };
            map_with(vec![(1, n)]).validate()
        };
        assert_eq!(with(-1, 0), Ok(()));
        assert_eq!(with(65535, 65535), Ok(()));
        assert!(matches!(
            with(-2, 0),
            Err(DerpMapError::PortOutOfRange { field: "STUNPort", value: -2, .. })
        ));
        assert!(matches!(with(70000, 0), Err(DerpMapError::PortOutOfRange { field: "STUNPort", .. })));
        assert!(matches!(with(0, -1), Err(DerpMapError::PortOutOfRange { field: "DERPPort", .. })));
        assert!(matches!(with(0, 65536), Err(DerpMapError::PortOutOfRange { field: "DERPPort", .. })));
    }

    #[test]
    fn insecure_overrides_cert_name() {
        let n = DerpNode { insecure_for_tests: true, cert_name: "x.example".into(), ..node("a", 1) };
        assert_eq!(n.cert_check(), CertCheck::Insecure);
        let n = DerpNode { cert_name: "x.example".into(), ..node("a", 1) };
        assert_eq!(n.cert_check(), CertCheck::Name("x.example".into()));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = DerpMap::from_json(&bytes);
        }

        #[test]
        fn arbitrary_nodes_validate_without_panicking(
            id in proptest::prelude::any::<i64>(),
            node_region in proptest::prelude::any::<i64>(),
            stun in proptest::prelude::any::<i64>(),
            derp in proptest::prelude::any::<i64>(),
            cert in "\\PC{0,80}",
            v4 in "\\PC{0,20}",
            v6 in "\\PC{0,40}",
        ) {
            let n = DerpNode { stun_port: stun, derp_port: derp, cert_name: cert, ipv4: v4, ipv6: v6, ..node("a", node_region) };
            let m = map_with(vec![(id, n.clone())]);
            let _ = m.validate();
            let _ = (n.stun_port(), n.derp_port(), n.cert_check(), n.ipv4_usage(), n.ipv6_usage());
        }
    }
}
