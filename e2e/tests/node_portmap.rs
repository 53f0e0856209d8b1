//! Port mapping end to end: two `derpfleet-client up` nodes behind **symmetric** NATs, each NAT
//! running Debian's real `miniupnpd` (NAT-PMP, PCP and UPnP IGD; its nftables backend, with the tables and
//! chains it expects created in the router namespace). With the mapping, the nodes advertise the
//! mapped address and go direct; without `miniupnpd` they stay relayed.
//!
//! Topology: `homeA` 192.168.1.2 ↔ `natA` (WAN 44.30.1.2) ↔ `pub` ↔ `natB` (WAN 44.30.2.2) ↔
//! `homeB` 192.168.2.2; relay and STUN at 44.30.0.1 in `pub`. The WAN side uses a public-looking
//! prefix because `miniupnpd` refuses to map on a private or documentation external address
//! ("Port forwarding is impossible"); nothing leaves the namespaces. Names: `dfm<pid><suffix>`.
//! The routers are [`derpfleet_e2e::natlab`]'s, symmetric, also forwarding what `miniupnpd` DNATed
//! (`ct status dnat`), as a router with port forwarding does.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use derpfleet_e2e::natlab::{router_rules, Nat, NatHome};
use derpfleet_e2e::netns::{unique_tag, Netns};
use derpfleet_e2e::node::{start_connected_pair, LabNode, TUN_IPS};
use derpfleet_e2e::relay::{wait_listening, RelayCmd};
use derpfleet_e2e::scratch::ScratchDir;
use derpfleet_e2e::{lab_bin, read_text, traffic, Child};
use serde_json::Value;

const RELAY_IP: &str = "44.30.0.1";

/// The table and chains `miniupnpd`'s nftables backend fills (its `nft_init.sh`, defaults).
const MINIUPNPD_TABLES: &str = "table inet filter {
  chain forward { type filter hook forward priority 0; policy accept;
    jump miniupnpd
  }
  chain miniupnpd {
  }
  chain prerouting { type nat hook prerouting priority -100; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting { type nat hook postrouting priority 100; policy accept;
    jump postrouting_miniupnpd
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
}
";

/// Starts `miniupnpd` (NAT-PMP, PCP, UPnP IGD) on router `site` of home `n` (LAN 192.168.n.0/24).
fn start_miniupnpd(router: &Netns, dir: &Path, side: &str, n: usize) -> Result<Child> {
    router.nft(MINIUPNPD_TABLES)?;
    let conf = dir.join(format!("miniupnpd-{side}.conf"));
    std::fs::write(
        &conf,
        format!(
            "ext_ifname=wan0\nlistening_ip=lan0\nhttp_port=0\nenable_natpmp=yes\nenable_upnp=yes\n\
             secure_mode=yes\nsystem_uptime=yes\nlease_file={}\n\
             uuid=3d3cec3a-8cf0-11e0-98ee-00123456780{n}\n\
             allow 1024-65535 192.168.{n}.0/24 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n",
            dir.join(format!("leases-{side}")).display()
        ),
    )?;
    let mut cmd = router.command("miniupnpd");
    cmd.arg("-f").arg(&conf).arg("-P").arg(dir.join(format!("miniupnpd-{side}.pid"))).arg("-d");
    Child::spawn_logged(cmd, &dir.join(format!("miniupnpd-{side}.log")), "miniupnpd")
}

struct Lab {
    sites: [NatHome; 2],
    _public: Netns,
    _servers: Vec<Child>,
    nodes: Vec<LabNode>,
    dir: ScratchDir,
}

impl Lab {
    /// The NAT lab; with `upnpd`, each NAT runs `miniupnpd` (NAT-PMP, PCP, UPnP on its LAN side).
    fn new(suffix: &str, upnpd: bool) -> Result<Self> {
        let tag = format!("{}{suffix}", unique_tag());
        let dir = ScratchDir::new(&format!("derpfleet-portmap-{tag}"))?;
        let rules = router_rules(Nat::Symmetric, "ct status dnat accept");
        let (public, sites) = NatHome::pair(&format!("dfm{tag}"), "44.30", &rules)?;
        public.ip(&["addr", "add", &format!("{RELAY_IP}/32"), "dev", "lo"])?;
        let mut servers = Vec::new();
        if upnpd {
            for (i, side) in ["a", "b"].into_iter().enumerate() {
                servers.push(start_miniupnpd(&sites[i].router, dir.path(), side, i + 1)?);
            }
        }
        let mut stun = public.command(lab_bin("derpfleet-stun"));
        stun.args(["--a", &format!("{RELAY_IP}:3478")]);
        servers.push(Child::spawn_logged(stun, &dir.join("stun.log"), "stun")?);
        servers.push(
            RelayCmd::new(Some(&public), dir.path(), "relay")
                .args(["-a", &format!("{RELAY_IP}:443"), "-stun=false"])
                .self_signed_tls(RELAY_IP)
                .spawn()?,
        );
        let map = serde_json::json!({"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "RegionName": "Lab",
            "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": RELAY_IP, "IPv4": RELAY_IP, "IPv6": "none",
                       "InsecureForTests": true}]}}});
        std::fs::write(dir.join("derpmap.json"), map.to_string())?;
        wait_listening(dir.path(), "relay", Duration::from_secs(20))?;
        Ok(Self { sites, _public: public, _servers: servers, nodes: Vec::new(), dir })
    }

    /// Starts both nodes (`extra` goes into both configs' top level) and waits until both are
    /// on DERP.
    fn up(&mut self, extra: &str) -> Result<()> {
        let homes = [&self.sites[0].home, &self.sites[1].home];
        self.nodes = start_connected_pair(homes, self.dir.path(), 900, extra)?;
        Ok(())
    }

    /// Waits for node `i`'s status to satisfy `pred`; a failure also shows its gateway's log.
    fn wait(&self, i: usize, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        self.nodes[i].wait_status(timeout, what, pred).with_context(|| {
            format!(
                "miniupnpd:\n{}",
                read_text(&self.dir.join(if i == 0 { "miniupnpd-a.err" } else { "miniupnpd-b.err" }))
            )
        })
    }

    /// `count` pings (0.2 s apart) from home `i` to the other node; how many were answered.
    fn ping(&self, i: usize, count: u32) -> Result<u32> {
        traffic::ping(&self.sites[i].home, TUN_IPS[1 - i], count, "0.2")
    }
}

/// Both nodes get a mapping with `protocol` and go direct to each other's mapped address.
fn mapped_and_direct(suffix: &str, extra: &str, protocol: &str) -> Result<()> {
    let mut lab = Lab::new(suffix, true)?;
    lab.up(extra)?;
    let mut mapped = Vec::new();
    for i in 0..2 {
        let s = lab.wait(i, Duration::from_secs(15), "a port mapping", |s| {
            s["port_mapping"]["external"].as_str().is_some()
        })?;
        assert_eq!(s["port_mapping"]["protocol"], protocol, "{s:#}");
        let ext = s["port_mapping"]["external"].as_str().unwrap().to_string();
        assert!(ext.starts_with(&format!("44.30.{}.2:", i + 1)), "{s:#}");
        assert!(s["endpoints"].as_array().unwrap().iter().any(|e| e == ext.as_str()), "advertised: {s:#}");
        mapped.push(ext);
    }
    assert!(lab.ping(0, 3)? >= 2, "log0:\n{}", lab.nodes[0].log());
    // Between symmetric NATs that drop unsolicited input only a mapped port can take the first
    // packet (without miniupnpd the path stays relayed, see below); its answer opens the sender's
    // NAT for the way back, so each side ends up on the other's mapped address or on its NATed
    // source, whichever disco confirmed first.
    let mut paths = Vec::new();
    for i in 0..2 {
        let want = format!("direct 44.30.{}.2:", 2 - i);
        let s = lab.wait(i, Duration::from_secs(15), &want, |s| {
            s["peers"][0]["path"].as_str().is_some_and(|p| p.starts_with(&want))
        })?;
        paths.push(s["peers"][0]["path"].as_str().unwrap_or_default().to_string());
    }
    eprintln!("mapped {mapped:?}, paths {paths:?}");
    assert!(lab.ping(0, 10)? >= 9, "direct ping\nlog0:\n{}", lab.nodes[0].log());
    let s = lab.nodes[0].status()?;
    assert!(s["peers"][0]["path"].as_str().is_some_and(|p| p.starts_with("direct ")), "{s:#}");
    // Stopping a node deletes its mapping on the gateway (miniupnpd drops the DNAT rule).
    let rules = |lab: &Lab| {
        lab.sites[0].router.exec("nft", &["list", "chain", "inet", "filter", "prerouting_miniupnpd"])
    };
    assert!(rules(&lab)?.contains("41641"), "{}", rules(&lab)?);
    lab.nodes[0].process().signal("TERM");
    assert!(lab.nodes[0].process().wait_timeout(Duration::from_secs(5)).is_some(), "node 0 did not stop");
    let deadline = Instant::now() + Duration::from_secs(5);
    while rules(&lab)?.contains("41641") {
        assert!(Instant::now() < deadline, "mapping not deleted on exit: {}", rules(&lab)?);
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Symmetric NATs with miniupnpd: NAT-PMP (tried first) maps the port and the path goes direct.
#[test]
fn symmetric_nats_with_nat_pmp_go_direct() -> Result<()> {
    mapped_and_direct("n", "", "nat-pmp")
}

/// The same with only PCP enabled in the node.
#[test]
fn symmetric_nats_with_pcp_go_direct() -> Result<()> {
    mapped_and_direct("c", "portmap = [\"pcp\"]\n", "pcp")
}

/// The same with only UPnP IGD enabled in the node (SSDP discovery, SOAP AddPortMapping).
#[test]
fn symmetric_nats_with_upnp_go_direct() -> Result<()> {
    mapped_and_direct("u", "portmap = [\"upnp\"]\n", "upnp")
}

/// Without miniupnpd: no mapping (the reason is in status) and the path stays relayed.
#[test]
fn symmetric_nats_without_port_mapping_stay_relayed() -> Result<()> {
    let mut lab = Lab::new("r", false)?;
    lab.up("")?;
    let s = lab.wait(0, Duration::from_secs(15), "a port mapping error", |s| {
        s["port_mapping"]["error"].as_str().is_some()
    })?;
    assert!(s["port_mapping"]["external"].is_null(), "{s:#}");
    assert_eq!(lab.ping(0, 30)?, 30, "log0:\n{}", lab.nodes[0].log());
    for i in 0..2 {
        let s = lab.nodes[i].status()?;
        assert_eq!(s["peers"][0]["path"], "derp-900", "{s:#}");
    }
    Ok(())
}
