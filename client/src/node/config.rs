//! The `up` configuration file (TOML). There is no control plane, so the file carries what
//! Tailscale's control server would: our keys, the DERP map, and every peer's keys, home region,
//! allowed IPs and (for plain WireGuard peers) a static endpoint.
//!
//! ```toml
//! private_key = "privkey:<hex>"            # or private_key_file = "/path/with/privkey-text"
//! disco_key = "discoprivkey:<hex>"         # optional; random when absent (peers then stay on DERP)
//! listen_port = 41641                      # 0 = any
//! derp_map = "/etc/derpfleet/derpmap.json" # Tailscale derpMap JSON
//! home_region = 900                        # optional starting home; netcheck picks it when absent
//! pin_home = false                         # true: never move away from home_region
//! control = "/run/derpfleet-client/df0.sock" # optional; default /run/derpfleet-client/<tun>.sock
//!
//! portmap = ["nat-pmp", "pcp", "upnp"]     # port mapping protocols to try, in order; [] = off
//!
//! [netcheck]                               # optional
//! interval_secs = 20                       # re-netcheck every interval + up to 30 % jitter
//! history_secs = 305                       # how long latencies count for the home choice
//!
//! [tun]
//! name = "df0"
//! addresses = ["100.64.0.1/24"]
//! mtu = 1280
//! userspace = false                        # true: no TUN; only [[forward]] ports carry traffic
//!
//! [[forward]]                              # userspace mode: local UDP port -> inner ip:port
//! listen = "127.0.0.1:5000"
//! to = "100.64.0.2:7"
//!
//! [[peer]]
//! public_key = "nodekey:<hex>"
//! disco_key = "discokey:<hex>"             # absent: no disco (needs `endpoint` for a direct path)
//! home_region = 900
//! allowed_ips = ["100.64.0.2/32"]
//! endpoint = "192.0.2.7:51820"             # optional static UDP endpoint (e.g. a wireguard-go peer)
//! keepalive = 25                           # optional persistent keepalive, seconds
//! ```

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use derpfleet_proto::derpmap::DerpMap;
use derpfleet_proto::key::{NodePrivate, NodePublic};
use serde::Deserialize;

use super::disco::{DiscoPrivate, DiscoPublic};
use super::userspace::Forward;

/// Why the configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// which file
        path: PathBuf,
        /// why
        source: std::io::Error,
    },
    /// TOML syntax or a missing/unknown field.
    #[error("config syntax: {0}")]
    Toml(#[from] toml::de::Error),
    /// The DERP map JSON did not parse.
    #[error("DERP map {path}: {msg}")]
    DerpMap {
        /// which file
        path: PathBuf,
        /// why
        msg: String,
    },
    /// A field has a bad value.
    #[error("{field}: {msg}")]
    Invalid {
        /// which field
        field: String,
        /// why
        msg: String,
    },
}

fn invalid(field: impl Into<String>, msg: impl ToString) -> ConfigError {
    ConfigError::Invalid { field: field.into(), msg: msg.to_string() }
}

/// An IP prefix such as `100.64.0.0/10`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    /// network address (host bits may be set; they are ignored when matching)
    pub addr: IpAddr,
    /// prefix length
    pub len: u8,
}

impl IpNet {
    /// Parses `a.b.c.d/n`, `x::y/n`, or a bare address (a host route).
    pub fn parse(s: &str) -> Option<Self> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.trim().parse::<u8>().ok().filter(|&l| l <= max)?,
            None => max,
        };
        Some(Self { addr, len })
    }

    /// Whether `ip` is inside this prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) };
                (u32::from(n) & mask) == (u32::from(i) & mask)
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - u32::from(self.len)) };
                (u128::from(n) & mask) == (u128::from(i) & mask)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    disco_key: Option<String>,
    #[serde(default)]
    listen_port: u16,
    derp_map: PathBuf,
    home_region: Option<i64>,
    #[serde(default)]
    pin_home: bool,
    portmap: Option<Vec<String>>,
    control: Option<PathBuf>,
    #[serde(default)]
    netcheck: RawNetcheck,
    tun: RawTun,
    #[serde(default)]
    peer: Vec<RawPeer>,
    #[serde(default)]
    forward: Vec<RawForward>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNetcheck {
    interval_secs: Option<u64>,
    history_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    listen: String,
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTun {
    name: String,
    #[serde(default)]
    addresses: Vec<String>,
    mtu: Option<u16>,
    #[serde(default)]
    userspace: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    public_key: String,
    disco_key: Option<String>,
    home_region: Option<i64>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    endpoint: Option<String>,
    keepalive: Option<u16>,
}

/// One configured peer.
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// node (= WireGuard) public key
    pub public_key: NodePublic,
    /// disco public key; `None` disables disco for this peer
    pub disco_key: Option<DiscoPublic>,
    /// DERP region the peer lives on (our home when absent)
    pub home_region: Option<i64>,
    /// inner addresses routed to this peer
    pub allowed_ips: Vec<IpNet>,
    /// static UDP endpoint (always trusted)
    pub endpoint: Option<SocketAddr>,
    /// persistent keepalive, seconds
    pub keepalive: Option<u16>,
}

/// The validated configuration.
#[derive(Debug)]
pub struct NodeConfig {
    /// node private key (also the WireGuard static key)
    pub private_key: NodePrivate,
    /// disco private key
    pub disco_key: DiscoPrivate,
    /// whether the disco key was generated because the file had none
    pub disco_key_generated: bool,
    /// UDP port for WireGuard, disco and STUN
    pub listen_port: u16,
    /// the DERP map
    pub derp_map: DerpMap,
    /// starting home region (a preference that netcheck's hysteresis favours, unless pinned)
    pub home_region: Option<i64>,
    /// never move away from `home_region`
    pub pin_home: bool,
    /// port mapping protocols to try, in order (empty: no port mapping)
    pub portmap: Vec<crate::portmap::Protocol>,
    /// base period of the re-netcheck (jittered up by to 30 %)
    pub netcheck_interval: std::time::Duration,
    /// how long a report's latencies count for the home choice
    pub netcheck_history: std::time::Duration,
    /// control socket path
    pub control: PathBuf,
    /// TUN interface name
    pub tun_name: String,
    /// addresses set on the TUN interface
    pub tun_addresses: Vec<IpNet>,
    /// TUN MTU
    pub mtu: u16,
    /// peers
    pub peers: Vec<PeerConfig>,
    /// no TUN: forward `forwards` through the tunnel instead
    pub userspace: bool,
    /// forwarded UDP ports (userspace mode)
    pub forwards: Vec<Forward>,
}

/// Default re-netcheck period: Tailscale re-STUNs (and re-netchecks) every 20–26 s while active;
/// the node waits this plus a uniform 0–30 % jitter, i.e. 20–26 s.
pub const DEFAULT_NETCHECK_INTERVAL_SECS: u64 = 20;

/// Default control socket for an interface.
pub fn default_control_path(iface: &str) -> PathBuf {
    PathBuf::from(format!("/run/derpfleet-client/{iface}.sock"))
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })
}

impl NodeConfig {
    /// Our inner IPv4 address in userspace mode: the first IPv4 of `tun.addresses`.
    pub fn userspace_address(&self) -> Option<std::net::Ipv4Addr> {
        self.tun_addresses.iter().find_map(|a| match a.addr {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
    }

    /// Reads and validates a config file; relative paths in it are relative to the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses config text; `base` resolves relative file paths.
    pub fn parse(text: &str, base: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)?;
        let key_text = match (raw.private_key, raw.private_key_file) {
            (Some(k), None) => k,
            (None, Some(f)) => read(&base.join(f))?,
            _ => return Err(invalid("private_key", "give exactly one of private_key, private_key_file")),
        };
        let private_key: NodePrivate = key_text.trim().parse().map_err(|e| invalid("private_key", e))?;
        let (disco_key, disco_key_generated) = match raw.disco_key {
            Some(k) => (k.parse().map_err(|e| invalid("disco_key", e))?, false),
            None => (DiscoPrivate::generate(), true),
        };
        let map_path = base.join(&raw.derp_map);
        let map_bytes = std::fs::read(&map_path)
            .map_err(|source| ConfigError::Read { path: map_path.clone(), source })?;
        let derp_map = DerpMap::from_json(&map_bytes)
            .map_err(|e| ConfigError::DerpMap { path: map_path.clone(), msg: e.to_string() })?;
        if derp_map.regions.is_empty() {
            return Err(ConfigError::DerpMap { path: map_path, msg: "no regions".into() });
        }
        if let Some(h) = raw.home_region.filter(|h| !derp_map.regions.contains_key(h)) {
            return Err(invalid("home_region", format!("region {h} is not in the DERP map")));
        }
        if raw.pin_home && raw.home_region.is_none() {
            return Err(invalid("pin_home", "needs home_region (the region to pin)"));
        }
        let secs = |v: Option<u64>, default: u64, key: &str| match v {
            None => Ok(std::time::Duration::from_secs(default)),
            Some(s) if (1..=86_400).contains(&s) => Ok(std::time::Duration::from_secs(s)),
            Some(s) => {
                Err(invalid(format!("netcheck.{key}"), format!("{s} is not within 1..=86400 seconds")))
            }
        };
        let netcheck_interval =
            secs(raw.netcheck.interval_secs, DEFAULT_NETCHECK_INTERVAL_SECS, "interval_secs")?;
        let netcheck_history = secs(raw.netcheck.history_secs, 305, "history_secs")?;
        let portmap = match raw.portmap {
            None => {
                use crate::portmap::Protocol;
                vec![Protocol::NatPmp, Protocol::Pcp, Protocol::Upnp]
            }
            Some(v) => v
                .iter()
                .map(|p| {
                    crate::portmap::Protocol::parse(p).ok_or_else(|| {
                        invalid("portmap", format!("unknown protocol {p:?} (nat-pmp, pcp, upnp)"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        };
        let name = raw.tun.name;
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(invalid("tun.name", "1 to 15 characters, no '/'"));
        }
        let tun_addresses = raw
            .tun
            .addresses
            .iter()
            .map(|a| IpNet::parse(a).ok_or_else(|| invalid("tun.addresses", format!("bad prefix {a:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut peers = Vec::new();
        for (i, p) in raw.peer.into_iter().enumerate() {
            let f = |n: &str| format!("peer[{i}].{n}");
            let public_key: NodePublic = p.public_key.parse().map_err(|e| invalid(f("public_key"), e))?;
            if public_key == private_key.public() {
                return Err(invalid(f("public_key"), "is our own key"));
            }
            if peers.iter().any(|q: &PeerConfig| q.public_key == public_key) {
                return Err(invalid(f("public_key"), "duplicate peer"));
            }
            let disco_key = p
                .disco_key
                .map(|k| k.parse::<DiscoPublic>().map_err(|e| invalid(f("disco_key"), e)))
                .transpose()?;
            if let Some(h) = p.home_region.filter(|h| !derp_map.regions.contains_key(h)) {
                return Err(invalid(f("home_region"), format!("region {h} is not in the DERP map")));
            }
            let allowed_ips = p
                .allowed_ips
                .iter()
                .map(|a| {
                    IpNet::parse(a).ok_or_else(|| invalid(f("allowed_ips"), format!("bad prefix {a:?}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let endpoint = p
                .endpoint
                .map(|e| {
                    e.parse::<SocketAddr>().map_err(|_| invalid(f("endpoint"), format!("bad ip:port {e:?}")))
                })
                .transpose()?;
            peers.push(PeerConfig {
                public_key,
                disco_key,
                home_region: p.home_region,
                allowed_ips,
                endpoint,
                keepalive: p.keepalive.filter(|&k| k > 0),
            });
        }
        let mut forwards = Vec::new();
        for (i, f) in raw.forward.iter().enumerate() {
            let listen = f.listen.parse::<SocketAddr>().map_err(|_| {
                invalid(format!("forward[{i}].listen"), format!("bad ip:port {:?}", f.listen))
            })?;
            let to = f.to.parse::<std::net::SocketAddrV4>().map_err(|_| {
                invalid(format!("forward[{i}].to"), format!("need an IPv4 ip:port, got {:?}", f.to))
            })?;
            forwards.push(Forward { listen, to });
        }
        if !forwards.is_empty() && !raw.tun.userspace {
            return Err(invalid("forward", "only used with tun.userspace = true"));
        }
        if raw.tun.userspace && !tun_addresses.iter().any(|a| a.addr.is_ipv4()) {
            return Err(invalid("tun.addresses", "userspace mode needs an IPv4 address"));
        }
        if peers.len() > (1 << 20) {
            return Err(invalid("peer", "too many peers"));
        }
        Ok(Self {
            private_key,
            disco_key,
            disco_key_generated,
            listen_port: raw.listen_port,
            derp_map,
            home_region: raw.home_region,
            pin_home: raw.pin_home,
            portmap,
            netcheck_interval,
            netcheck_history,
            control: raw.control.unwrap_or_else(|| default_control_path(&name)),
            tun_name: name,
            tun_addresses,
            mtu: raw.tun.mtu.unwrap_or(1280).clamp(576, 65000),
            peers,
            userspace: raw.tun.userspace,
            forwards,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"lab","Nodes":[{"Name":"1","RegionID":900,"HostName":"127.0.0.1","IPv4":"127.0.0.1","DERPPort":3340,"STUNPort":3478,"InsecureForTests":true}]}}}"#;

    fn dir_with_map() -> (PathBuf, String) {
        let d = std::env::temp_dir().join(format!("dfcfg-{}-{}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("map.json"), MAP).unwrap();
        let k = NodePrivate::generate().to_text();
        (d, k)
    }

    #[test]
    fn parses_a_full_config() {
        let (d, k) = dir_with_map();
        let peer = NodePrivate::generate().public();
        let disco = DiscoPrivate::generate().public();
        let text = format!(
            "private_key = \"{k}\"\nderp_map = \"map.json\"\nlisten_port = 41641\n[tun]\nname = \"df0\"\n\
             addresses = [\"100.64.0.1/24\"]\n[[peer]]\npublic_key = \"{peer}\"\ndisco_key = \"{disco}\"\n\
             home_region = 900\nallowed_ips = [\"100.64.0.2/32\"]\nendpoint = \"10.0.0.2:51820\"\n"
        );
        let c = NodeConfig::parse(&text, &d).unwrap();
        assert!(c.disco_key_generated);
        assert_eq!(c.control, PathBuf::from("/run/derpfleet-client/df0.sock"));
        assert_eq!(c.peers[0].disco_key, Some(disco));
        assert_eq!(c.peers[0].endpoint, Some("10.0.0.2:51820".parse().unwrap()));
        assert_eq!(c.mtu, 1280);
        assert!(!c.pin_home && c.home_region.is_none());
        assert_eq!(c.netcheck_interval, std::time::Duration::from_secs(20));
        assert_eq!(c.netcheck_history, std::time::Duration::from_secs(305));
        let pinned = format!(
            "private_key = \"{k}\"\nderp_map = \"map.json\"\nhome_region = 900\npin_home = true\n\
             [netcheck]\ninterval_secs = 3\nhistory_secs = 10\n[tun]\nname = \"df0\"\n"
        );
        let c = NodeConfig::parse(&pinned, &d).unwrap();
        assert!(c.pin_home && c.home_region == Some(900));
        assert_eq!(c.netcheck_interval, std::time::Duration::from_secs(3));
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn rejects_bad_values_with_the_field_name() {
        let (d, k) = dir_with_map();
        let base = format!("private_key = \"{k}\"\nderp_map = \"map.json\"\n[tun]\nname = \"df0\"\n");
        let cases = [
            (format!("{base}[[peer]]\npublic_key = \"nodekey:zz\"\n"), "peer[0].public_key"),
            (
                format!(
                    "{base}[[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"1.2.3.4/33\"]\n",
                    NodePrivate::generate().public()
                ),
                "peer[0].allowed_ips",
            ),
            (base.replace("map.json", "missing.json"), "missing.json"),
            (
                format!("{base}home_region = 1\n").replace("[tun]\nname = \"df0\"\n", "")
                    + "[tun]\nname=\"x\"\n",
                "home_region",
            ),
            (format!("{base}bogus = 1\n"), "bogus"),
            (format!("pin_home = true\n{base}"), "pin_home"),
            (format!("portmap = [\"upnp2\"]\n{base}"), "portmap"),
            (format!("{base}[netcheck]\ninterval_secs = 0\n"), "netcheck.interval_secs"),
            (format!("{base}[netcheck]\nevery = 3\n"), "every"),
        ];
        for (text, want) in cases {
            let e = NodeConfig::parse(&text, &d).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should mention {want}");
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn prefixes_match() {
        let n = IpNet::parse("100.64.0.0/10").unwrap();
        assert!(n.contains("100.100.1.1".parse().unwrap()));
        assert!(!n.contains("100.128.0.1".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        assert!(IpNet::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
        assert!(!IpNet::parse("fd00::/8").unwrap().contains("10.0.0.1".parse().unwrap()));
        assert_eq!(IpNet::parse("10.0.0.1").unwrap().len, 32);
        assert!(IpNet::parse("10.0.0.1/40").is_none());
    }
}
