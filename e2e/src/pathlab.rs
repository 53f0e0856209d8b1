//! A NAT lab for the reference node's path tests (the node lab, direct-path speed, roaming, IPv6
//! underlay): two homes, each behind its own NAT router, a "public" namespace with a
//! `derpfleet-relay` (TLS, self-signed, `InsecureForTests` in the DERP map) and a `derpfleet-stun`,
//! and optionally a third NAT router that home 0 can move behind (roaming).
//!
//! ```text
//! home0 ─h1─ nat1 ─┐                    IPv4: home i 192.168.i.2/24 behind NAT i (WAN 172.30.i.2),
//!      └─h3─ nat3 ─┼─ pub (relay, STUN)        relay/STUN on 172.30.0.1
//! home1 ─h2─ nat2 ─┘                    IPv6: home i fd00:i::2/64, routed (no NAT) through router i,
//!                                             stateful firewall (only replies come in); relay/STUN
//!                                             on fd00:30::1
//! ```
//! The routers drop unsolicited WAN input in both families, as home routers do, so a direct path
//! needs both sides to punch. IPv4 NAT is endpoint-independent (`masquerade`) or symmetric
//! (`masquerade fully-random`; [`crate::natlab::router_rules`]). Namespaces are named
//! `dfp<pid><suffix>…` and removed on drop with every process inside (test-lab.md §3 is the recipe
//! this follows).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::natlab::router_rules;
pub use crate::natlab::Nat;
use crate::netns::{run, unique_tag, veth, Netns};
pub use crate::node::TUN_IPS;
use crate::node::{pair_configs, LabNode};
use crate::relay::{wait_cert, RelayCmd};
use crate::scratch::ScratchDir;
use crate::wireguard_go::{spawn_wireguard_go, uapi_socket, wg};
use crate::{lab_bin, traffic, Child};

/// The relay's and STUN server's IPv4 address (in `pub`).
pub const RELAY_IP: &str = "172.30.0.1";
/// The relay's and STUN server's IPv6 address (in `pub`).
pub const RELAY_IP6: &str = "fd00:30::1";

/// What the lab looks like.
#[derive(Clone, Copy, Debug)]
pub struct LabOpts {
    /// NAT behaviour of every router.
    pub nat: Nat,
    /// Homes get IPv4 (NATed) addresses and default routes.
    pub ipv4: bool,
    /// Homes get IPv6 (routed) addresses and default routes; the relay gets an IPv6 address.
    pub ipv6: bool,
    /// A third router home 0 can move behind ([`PathLab::roam_home0`]).
    pub roam_router: bool,
}

impl Default for LabOpts {
    fn default() -> Self {
        Self { nat: Nat::EndpointIndependent, ipv4: true, ipv6: false, roam_router: false }
    }
}

/// The lab; see the module docs.
pub struct PathLab {
    /// home namespaces (node 0, node 1)
    pub homes: [Netns; 2],
    /// router namespaces (1, 2 and, with `roam_router`, 3)
    pub routers: Vec<Netns>,
    /// the public namespace (relay, STUN)
    pub public: Netns,
    opts: LabOpts,
    _servers: Vec<Child>,
    nodes: Vec<LabNode>,
    /// working directory (configs, logs, sockets)
    pub dir: ScratchDir,
}

impl PathLab {
    /// Builds the namespaces, routers, relay and STUN server; nodes start with [`PathLab::up`].
    pub fn new(suffix: &str, opts: LabOpts) -> Result<Self> {
        let tag = format!("{}{suffix}", unique_tag());
        let dir = ScratchDir::new(&format!("derpfleet-dfp-{tag}"))?;
        let public = Netns::new(&format!("dfp{tag}p"))?;
        public.ip(&["addr", "add", &format!("{RELAY_IP}/32"), "dev", "lo"])?;
        public.ip(&["addr", "add", &format!("{RELAY_IP6}/128"), "dev", "lo"])?;
        public.enable_forwarding()?;
        let n_routers = if opts.roam_router { 3 } else { 2 };
        let mut routers = Vec::new();
        for n in 1..=n_routers {
            let r = Netns::new(&format!("dfp{tag}r{n}"))?;
            veth(
                &r,
                "wan0",
                &format!("172.30.{n}.2/24"),
                &public,
                &format!("p{n}"),
                &format!("172.30.{n}.1/24"),
            )?;
            r.ip(&["-6", "addr", "add", &format!("fd00:30:{n}::2/64"), "dev", "wan0", "nodad"])?;
            public.ip(&[
                "-6",
                "addr",
                "add",
                &format!("fd00:30:{n}::1/64"),
                "dev",
                &format!("p{n}"),
                "nodad",
            ])?;
            public.ip(&[
                "-6",
                "route",
                "add",
                &format!("fd00:{n}::/64"),
                "via",
                &format!("fd00:30:{n}::2"),
            ])?;
            r.ip(&["route", "add", "default", "via", &format!("172.30.{n}.1")])?;
            r.ip(&["-6", "route", "add", "default", "via", &format!("fd00:30:{n}::1")])?;
            r.enable_forwarding()?;
            r.nft(&router_rules(opts.nat, ""))?;
            routers.push(r);
        }
        let home0 = Netns::new(&format!("dfp{tag}h0"))?;
        let home1 = Netns::new(&format!("dfp{tag}h1"))?;
        for (home, n) in [(&home0, 1usize), (&home1, 2)] {
            link_home(home, &routers[n - 1], n)?;
            home.addr_up(n, opts)?;
        }
        if opts.roam_router {
            link_home(&home0, &routers[2], 3)?;
        }
        let mut servers = Vec::new();
        // One STUN server per address: a wildcard-bound one answers from the address of the
        // outgoing route (172.30.n.1 here), which the NATs rightly refuse as a reply.
        for (a, name) in [(format!("{RELAY_IP}:3478"), "stun4"), (format!("[{RELAY_IP6}]:3478"), "stun6")] {
            let mut cmd = public.command(lab_bin("derpfleet-stun"));
            cmd.args(["--a", &a]);
            servers.push(Child::spawn_logged(cmd, &dir.join(format!("{name}.log")), "stun")?);
        }
        servers.push(
            RelayCmd::new(Some(&public), dir.path(), "relay")
                .args(["-a", ":443", "-stun=false"])
                .self_signed_tls(RELAY_IP)
                .spawn()?,
        );
        let v4 = if opts.ipv4 { RELAY_IP } else { "none" };
        let v6 = if opts.ipv6 { RELAY_IP6 } else { "none" };
        let map = serde_json::json!({"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "RegionName": "Lab",
            "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": RELAY_IP, "IPv4": v4, "IPv6": v6,
                       "InsecureForTests": true}]}}});
        std::fs::write(dir.join("derpmap.json"), map.to_string())?;
        wait_cert(dir.path(), "relay", RELAY_IP, Duration::from_secs(15))?;
        Ok(Self { homes: [home0, home1], routers, public, opts, _servers: servers, nodes: Vec::new(), dir })
    }

    /// Starts both nodes, peered with each other, and waits until both are connected to DERP and
    /// have a STUN endpoint (of every family the lab has).
    pub fn up(&mut self) -> Result<()> {
        self.up_with(|_, config| config)
    }

    /// [`PathLab::up`] with `edit(i, config)` applied to node `i`'s config first.
    pub fn up_with(&mut self, edit: impl Fn(usize, String) -> String) -> Result<()> {
        let configs = pair_configs(self.dir.path(), 900, "")?;
        for (i, config) in configs.into_iter().enumerate() {
            self.nodes.push(LabNode::start(&self.homes[i], self.dir.path(), i, &edit(i, config))?);
        }
        let opts = self.opts;
        for node in &self.nodes {
            node.wait_status(Duration::from_secs(15), "connected, with STUN endpoints", |s| {
                let eps: Vec<&str> = s["endpoints"]
                    .as_array()
                    .map(|e| e.iter().filter_map(|e| e.as_str()).collect())
                    .unwrap_or_default();
                let v4 = !opts.ipv4 || eps.iter().any(|e| e.starts_with("172.30."));
                let v6 = !opts.ipv6 || eps.iter().any(|e| e.starts_with("[fd00:"));
                s["home_connected"] == true && v4 && v6
            })?;
        }
        Ok(())
    }

    /// Node `i` (after [`PathLab::up`]).
    pub fn node(&self, i: usize) -> &LabNode {
        &self.nodes[i]
    }

    /// Node `i`'s log (stderr).
    pub fn log(&self, i: usize) -> String {
        self.nodes[i].log()
    }

    /// `derpfleet-client status --json` of node `i`.
    pub fn status(&self, i: usize) -> Result<serde_json::Value> {
        self.nodes[i].status()
    }

    /// The path node `i` uses to its peer (`direct ip:port` or `derp-900`).
    pub fn path(&self, i: usize) -> Result<String> {
        self.nodes[i].path()
    }

    /// Waits until `pred(path of node i)` holds; returns the time it took.
    pub fn wait_path(&self, i: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<Duration> {
        self.nodes[i].wait_path(timeout, pred)
    }

    /// `count` pings from home `i` to the other tunnel address; returns how many were answered.
    pub fn ping(&self, i: usize, count: u32, interval: &str) -> Result<u32> {
        traffic::ping(&self.homes[i], TUN_IPS[1 - i], count, interval)
    }

    /// TCP throughput home 0 → home 1 to `dst` (a tunnel address): `iperf3 -t secs`, Mbit/s received.
    pub fn iperf_to(&self, dst: &str, secs: u32) -> Result<f64> {
        traffic::iperf3_mbps(&self.homes[1], &self.homes[0], dst, secs)
    }

    /// Starts the nodes ([`PathLab::up`]) and measures TCP throughput node 0 → node 1 through the
    /// tunnel: three `iperf3 -t 5` runs, Mbit/s, once the path is direct (`want_direct`) or after
    /// checking it stayed relayed. The figures behind BENCHMARKS.md's node rows.
    pub fn node_throughput_runs(&mut self, want_direct: bool) -> Result<Vec<f64>> {
        self.up()?;
        anyhow::ensure!(self.ping(0, 1, "0.2")? == 1, "first ping failed\nlog0:\n{}", self.log(0));
        if want_direct {
            self.wait_path(0, Duration::from_secs(5), |p| p.starts_with("direct "))?;
            self.wait_path(1, Duration::from_secs(5), |p| p.starts_with("direct "))?;
        }
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(self.iperf_to(TUN_IPS[1], 5)?);
        }
        let path = self.path(0)?;
        anyhow::ensure!(
            path.starts_with("direct ") == want_direct,
            "path {path}, want direct: {want_direct}"
        );
        eprintln!("drops A {} B {}", self.status(0)?["drops"], self.status(1)?["drops"]);
        Ok(runs)
    }

    /// The relay's `derp_packets_sent` counter, scraped on loopback inside `pub`.
    pub fn relay_packets_sent(&self) -> Result<u64> {
        let out =
            self.public.exec("curl", &["-sk", "--max-time", "3", "https://127.0.0.1:443/debug/varz"])?;
        out.lines()
            .find_map(|l| l.strip_prefix("derp_packets_sent ").and_then(|v| v.trim().parse::<f64>().ok()))
            .map(|v| v as u64)
            .with_context(|| format!("no derp_packets_sent in varz:\n{out}"))
    }

    /// Moves home 0 from behind router 1 to behind router 3 (needs `roam_router`): its address on
    /// the old link is removed, the new link addressed, the default routes switched, as when a
    /// laptop moves from one Wi-Fi to another.
    pub fn roam_home0(&self) -> Result<()> {
        let h = &self.homes[0];
        if self.opts.ipv4 {
            h.ip(&["addr", "del", "192.168.1.2/24", "dev", "h1"])?;
        }
        if self.opts.ipv6 {
            h.ip(&["-6", "addr", "del", "fd00:1::2/64", "dev", "h1"])?;
        }
        h.addr_up(3, self.opts)
    }

    /// Starts Debian's `wireguard-go` in both homes, peered with each other across the routers on
    /// the same path the nodes use (endpoints at the routers' WAN addresses, port 51820 kept by the
    /// endpoint-independent NATs; keepalive 1 s on both sides so both punch). Tunnel addresses
    /// 100.65.0.1/.2. Returns the processes (killed on drop).
    pub fn wireguard_go_pair(&mut self) -> Result<Vec<Child>> {
        let tag = unique_tag();
        let mut keys = Vec::new();
        for i in 0..2 {
            let k = wg(&["genkey"], None)?;
            let p = wg(&["pubkey"], Some(&k))?;
            std::fs::write(self.dir.join(format!("wg{i}.key")), &k)?;
            keys.push(p);
        }
        let mut out = Vec::new();
        for i in 0..2 {
            let ifname = format!("dfpw{tag}{i}");
            let home = &self.homes[i];
            out.push(spawn_wireguard_go(home, &ifname, &self.dir.join(format!("wg{i}.log")))?);
            self.dir.also_remove(uapi_socket(&ifname));
            let key = self.dir.join(format!("wg{i}.key"));
            let peer = &keys[1 - i];
            let endpoint = format!("172.30.{}.2:51820", 2 - i);
            home.exec(
                "wg",
                &["set", &ifname, "listen-port", "51820", "private-key", key.to_str().context("path")?],
            )?;
            home.exec(
                "wg",
                &[
                    "set",
                    &ifname,
                    "peer",
                    peer,
                    "allowed-ips",
                    &format!("100.65.0.{}/32", 2 - i),
                    "endpoint",
                    &endpoint,
                    "persistent-keepalive",
                    "1",
                ],
            )?;
            home.ip(&["addr", "add", &format!("100.65.0.{}/24", i + 1), "dev", &ifname])?;
            home.ip(&["link", "set", &ifname, "mtu", "1280", "up"])?;
        }
        Ok(out)
    }
}

/// A veth `h<n>` (home) ↔ `lan0` (router `n`), router side addressed, both up.
fn link_home(home: &Netns, router: &Netns, n: usize) -> Result<()> {
    run(
        "ip",
        &[
            "link",
            "add",
            &format!("h{n}"),
            "netns",
            home.name(),
            "type",
            "veth",
            "peer",
            "name",
            "lan0",
            "netns",
            router.name(),
        ],
    )?;
    router.ip(&["addr", "add", &format!("192.168.{n}.1/24"), "dev", "lan0"])?;
    router.ip(&["-6", "addr", "add", &format!("fd00:{n}::1/64"), "dev", "lan0", "nodad"])?;
    router.ip(&["link", "set", "lan0", "up"])?;
    home.ip(&["link", "set", &format!("h{n}"), "up"])?;
    Ok(())
}

trait HomeAddr {
    fn addr_up(&self, n: usize, opts: LabOpts) -> Result<()>;
}

impl HomeAddr for Netns {
    /// Addresses link `h<n>` and points the default routes at router `n`.
    fn addr_up(&self, n: usize, opts: LabOpts) -> Result<()> {
        let dev = format!("h{n}");
        if opts.ipv4 {
            self.ip(&["addr", "add", &format!("192.168.{n}.2/24"), "dev", &dev])?;
            self.ip(&["route", "replace", "default", "via", &format!("192.168.{n}.1")])?;
        }
        if opts.ipv6 {
            self.ip(&["-6", "addr", "add", &format!("fd00:{n}::2/64"), "dev", &dev, "nodad"])?;
            self.ip(&["-6", "route", "replace", "default", "via", &format!("fd00:{n}::1")])?;
        }
        Ok(())
    }
}
