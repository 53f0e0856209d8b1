//! The reference node re-deciding its home region, end to end: two `derpfleet-client up`
//! processes behind symmetric NATs (so their traffic is relayed and depends on the home), two
//! DERP regions (real `derpfleet-relay` processes, each also answering STUN, as derper does).
//!
//! Topology: `homeA` 192.168.1.2 ↔ `natA` ↔ `pub` ↔ `natB` ↔ `homeB` 192.168.2.2
//! ([`derpfleet_e2e::natlab`] routers, symmetric); region `n` is at 172.30.0.n in `pub`. In the delay
//! lab, each region's address is a delaying UDP + TCP forwarder ([`derpfleet_e2e::delay`]: `tc netem`
//! is missing in this kernel) in front of a relay on loopback, so a region can be made slower while the
//! nodes run.
//!
//! Namespaces are named `dfh<pid><suffix>...` and removed on drop with every process inside.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use derpfleet_e2e::delay::{spawn_delayers, Delay, DelayedRoute};
use derpfleet_e2e::natlab::{router_rules, Nat, NatHome};
use derpfleet_e2e::netns::{unique_tag, Netns};
use derpfleet_e2e::node::{start_connected_pair, LabNode, TUN_IPS};
use derpfleet_e2e::nsthread::NsThread;
use derpfleet_e2e::relay::{wait_listening, RelayCmd};
use derpfleet_e2e::scratch::ScratchDir;
use derpfleet_e2e::{traffic, Child};
use serde_json::Value;

const REGIONS: [i64; 2] = [1, 2];

fn region_ip(id: i64) -> String {
    format!("172.30.0.{id}")
}

struct Lab {
    sites: [NatHome; 2],
    _public: Netns,
    relays: HashMap<i64, Child>,
    nodes: Vec<LabNode>,
    delays: HashMap<i64, Delay>,
    _forwarders: Option<NsThread>,
    dir: ScratchDir,
}

impl Lab {
    /// Namespaces, NATs and one relay per region; with `delayed`, each region sits behind a
    /// delaying forwarder (delay 0 until [`Lab::set_rtt`]).
    fn new(suffix: &str, delayed: bool) -> Result<Self> {
        let tag = format!("{}{suffix}", unique_tag());
        let dir = ScratchDir::new(&format!("derpfleet-home-{tag}"))?;
        let rules = router_rules(Nat::Symmetric, "");
        let (public, sites) = NatHome::pair(&format!("dfh{tag}"), "172.30", &rules)?;
        let mut relays = HashMap::new();
        let mut regions = serde_json::Map::new();
        let mut routes = Vec::new();
        let mut delays = HashMap::new();
        for id in REGIONS {
            let ip = region_ip(id);
            public.ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
            // Behind a forwarder the relay (DERP and STUN) listens on loopback.
            let (listen_ip, https, stun) = if delayed {
                ("127.0.0.1".to_string(), 4430 + id as u16, 3480 + id as u16)
            } else {
                (ip.clone(), 443, 3478)
            };
            let relay = RelayCmd::new(Some(&public), dir.path(), &format!("relay{id}"))
                .args(["-a", &format!("{listen_ip}:{https}"), "-stun-port", &stun.to_string()])
                .self_signed_tls(&ip)
                .spawn()?;
            relays.insert(id, relay);
            if delayed {
                let d: Delay = Arc::new(AtomicU64::new(0));
                delays.insert(id, d.clone());
                routes.push(DelayedRoute {
                    udp: (format!("{ip}:3478").parse()?, format!("127.0.0.1:{stun}").parse()?),
                    tcp: (format!("{ip}:443").parse()?, format!("127.0.0.1:{https}").parse()?),
                    one_way: d,
                });
            }
            regions.insert(
                id.to_string(),
                serde_json::json!({"RegionID": id, "RegionCode": format!("r{id}"), "RegionName": format!("Region {id}"),
                    "Nodes": [{"Name": format!("{id}a"), "RegionID": id, "HostName": ip, "IPv4": ip, "IPv6": "none",
                               "InsecureForTests": true}]}),
            );
        }
        for id in REGIONS {
            wait_listening(dir.path(), &format!("relay{id}"), Duration::from_secs(20))?;
        }
        let forwarders = if delayed { Some(spawn_delayers(public.name(), routes)?) } else { None };
        std::fs::write(dir.join("derpmap.json"), serde_json::json!({ "Regions": regions }).to_string())?;
        Ok(Self { sites, _public: public, relays, nodes: Vec::new(), delays, _forwarders: forwarders, dir })
    }

    /// Sets region `id`'s round trip (delay lab only).
    fn set_rtt(&self, id: i64, ms: u64) {
        self.delays[&id].store(ms * 500, Relaxed);
    }

    /// Starts both nodes with `home_region = 1` (a preference) and each other as peer on region 1;
    /// `extra` is appended to both configs' top level. Waits until both are on DERP.
    fn up(&mut self, extra: &str) -> Result<()> {
        let homes = [&self.sites[0].home, &self.sites[1].home];
        self.nodes = start_connected_pair(homes, self.dir.path(), 1, extra)?;
        Ok(())
    }

    /// Waits until `pred(status of node i)` holds.
    fn wait_status(
        &self,
        i: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        self.nodes[i].wait_status(timeout, what, pred).map(|_| ())
    }

    /// `count` pings from home `i` to the other TUN address; how many were answered.
    fn ping(&self, i: usize, count: u32) -> Result<u32> {
        traffic::ping(&self.sites[i].home, TUN_IPS[1 - i], count, "0.2")
    }

    fn reports(&self, i: usize) -> Result<u64> {
        Ok(self.nodes[i].status()?["netcheck"]["reports"].as_u64().unwrap_or(0))
    }
}

fn home(s: &Value) -> i64 {
    s["home_region"].as_i64().unwrap_or(0)
}

/// Acceptance 1: the home relay is SIGKILLed. Both nodes move home to the other region within
/// 30 s and are connected there; traffic flows again in both directions although neither config
/// changed (each still names region 1 for its peer); status says when and why.
#[test]
fn killed_home_relay_moves_home_and_traffic_resumes() -> Result<()> {
    let mut lab = Lab::new("k", false)?;
    lab.up("")?;
    for i in 0..2 {
        assert_eq!(home(&lab.nodes[i].status()?), 1, "home_region = 1 is the starting home");
    }
    assert_eq!(lab.ping(0, 3)?, 3, "log0:\n{}", lab.nodes[0].log());
    let s = lab.nodes[0].status()?;
    assert_eq!(s["peers"][0]["path"], "derp-1", "{s:#}");
    let killed_at = Instant::now();
    lab.relays.get_mut(&1).unwrap().signal("KILL");
    for i in 0..2 {
        lab.wait_status(i, Duration::from_secs(30), "home derp-2, connected", |s| {
            home(s) == 2 && s["home_connected"] == true
        })?;
        eprintln!("node {i}: home derp-2 and connected {:?} after the kill", killed_at.elapsed());
    }
    assert!(killed_at.elapsed() < Duration::from_secs(30));
    // B speaks first after the move: it still has region 1 for A, which is dead, so it goes
    // through its own home, where A now is.
    assert!(lab.ping(1, 5)? >= 4, "B -> A after the move\nlog1:\n{}", lab.nodes[1].log());
    assert!(lab.ping(0, 5)? >= 4, "A -> B after the move\nlog0:\n{}", lab.nodes[0].log());
    let s = lab.nodes[0].status()?;
    eprintln!("{}", lab.nodes[0].status_text()?);
    assert_eq!(s["peers"][0]["path"], "derp-2", "{s:#}");
    assert_eq!(s["peers"][0]["derp_region"], 2, "{s:#}");
    let moves = s["home_history"].as_array().context("home_history")?;
    assert_eq!(moves.len(), 1, "{s:#}");
    assert_eq!((moves[0]["from"].as_i64(), moves[0]["to"].as_i64()), (Some(1), Some(2)));
    let why = moves[0]["reason"].as_str().unwrap_or_default();
    assert!(why.contains("derp-1 unreachable"), "{why}");
    assert!(s["netcheck"]["age_secs"].as_f64().is_some(), "{s:#}");
    assert!(s["netcheck"]["region_latency_ms"]["2"].as_f64().is_some(), "{s:#}");
    assert!(
        s["peers"][0]["path_history"].as_array().is_some_and(|h| h.iter().any(|e| e["path"] == "derp-2")),
        "{s:#}"
    );
    Ok(())
}

/// Acceptance 2: region latencies within the margin do not move the home (over several
/// reports); a home made much slower loses to the faster region once its fast samples have aged
/// out of the history, and the home does not flap back. The nodes run with `[netcheck]
/// interval_secs = 2, history_secs = 8` so this takes seconds, not Tailscale's 5 minutes.
#[test]
fn slower_home_loses_to_a_faster_region_without_flapping() -> Result<()> {
    let mut lab = Lab::new("d", true)?;
    lab.set_rtt(1, 20);
    lab.set_rtt(2, 14);
    lab.up("[netcheck]\ninterval_secs = 2\nhistory_secs = 8\n")?;
    // 6 ms faster (and more than ⅔ of the home's latency): within the margin.
    let r0 = lab.reports(0)?;
    lab.wait_status(0, Duration::from_secs(30), "5 more netcheck reports", |s| {
        s["netcheck"]["reports"].as_u64().unwrap_or(0) >= r0 + 5
    })?;
    for i in 0..2 {
        let s = lab.nodes[i].status()?;
        assert_eq!(home(&s), 1, "within the margin the home must stay: {s:#}");
        assert!(s["home_history"].as_array().is_some_and(|h| h.is_empty()), "{s:#}");
        let lat = &s["netcheck"]["region_latency_ms"];
        let (l1, l2) = (lat["1"].as_f64().unwrap_or(0.0), lat["2"].as_f64().unwrap_or(0.0));
        assert!(l2 < l1 && l1 >= 15.0, "region 2 measured faster but within the margin: {s:#}");
    }
    assert!(lab.ping(0, 2)? >= 1, "log0:\n{}", lab.nodes[0].log());
    // Region 1 becomes slow (60 ms): once its old samples age out, region 2 wins by the margin.
    let slowed = Instant::now();
    lab.set_rtt(1, 60);
    for i in 0..2 {
        lab.wait_status(i, Duration::from_secs(40), "home derp-2, connected", |s| {
            home(s) == 2 && s["home_connected"] == true
        })?;
        eprintln!("node {i}: home moved to derp-2 {:?} after region 1 was slowed", slowed.elapsed());
    }
    let s = lab.nodes[0].status()?;
    eprintln!("{}", lab.nodes[0].status_text()?);
    let why = s["home_history"][0]["reason"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("faster than derp-1"), "{s:#}");
    assert!(lab.ping(0, 5)? >= 4, "A -> B via the new home\nlog0:\n{}", lab.nodes[0].log());
    assert!(lab.ping(1, 5)? >= 4, "B -> A via the new home\nlog1:\n{}", lab.nodes[1].log());
    // Stays: several more reports, still one move.
    let r = lab.reports(0)?;
    lab.wait_status(0, Duration::from_secs(30), "4 more reports", |s| {
        s["netcheck"]["reports"].as_u64().unwrap_or(0) >= r + 4
    })?;
    let s = lab.nodes[0].status()?;
    assert_eq!(home(&s), 2, "{s:#}");
    assert_eq!(s["home_history"].as_array().map(|h| h.len()), Some(1), "no flapping: {s:#}");
    Ok(())
}

/// `pin_home = true`: the home stays on region 1 even when it is much slower.
#[test]
fn pinned_home_stays_on_a_slow_region() -> Result<()> {
    let mut lab = Lab::new("p", true)?;
    lab.set_rtt(1, 80);
    lab.up("pin_home = true\n[netcheck]\ninterval_secs = 2\nhistory_secs = 4\n")?;
    let r0 = lab.reports(0)?;
    lab.wait_status(0, Duration::from_secs(30), "4 more reports", |s| {
        s["netcheck"]["reports"].as_u64().unwrap_or(0) >= r0 + 4
    })?;
    let s = lab.nodes[0].status()?;
    assert_eq!(home(&s), 1, "{s:#}");
    assert_eq!(s["pin_home"], true);
    assert_eq!(s["netcheck"]["preferred_derp"], 2, "netcheck would move (so the pin did the work): {s:#}");
    assert!(s["home_history"].as_array().is_some_and(|h| h.is_empty()), "{s:#}");
    assert!(s["netcheck"]["region_latency_ms"]["1"].as_f64().unwrap_or(0.0) >= 60.0, "{s:#}");
    assert!(lab.ping(0, 3)? >= 2, "log0:\n{}", lab.nodes[0].log());
    Ok(())
}
