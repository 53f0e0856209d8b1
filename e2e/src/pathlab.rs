//! A NAT lab for the reference node's path tests (direct-path speed, roaming, IPv6 underlay):
//! two homes, each behind its own NAT router, a "public" namespace with a `derpfleet-relay` (TLS,
//! self-signed, `InsecureForTests` in the DERP map) and a `derpfleet-stun`, and optionally a third
//! NAT router that home 0 can move behind (roaming).
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
//! (`masquerade fully-random`). Namespaces are named `dfp<pid><suffix>…` and removed on drop with
//! every process inside (test-lab.md §3 is the recipe this follows).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::{run, unique_tag, veth, Netns};
use crate::{bin_path, Child};

/// The relay's and STUN server's IPv4 address (in `pub`).
pub const RELAY_IP: &str = "172.30.0.1";
/// The relay's and STUN server's IPv6 address (in `pub`).
pub const RELAY_IP6: &str = "fd00:30::1";
/// The nodes' tunnel addresses.
pub const TUN_IPS: [&str; 2] = ["100.64.0.1", "100.64.0.2"];

/// How the IPv4 NAT routers map ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: one mapping per internal socket (hole punching works).
    EndpointIndependent,
    /// `masquerade fully-random`: a new mapping per destination (hole punching fails).
    Symmetric,
}

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

struct TmpDir(PathBuf);
impl Drop for TmpDir {
    fn drop(&mut self) {
        if std::env::var_os("NODE_LAB_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A workspace binary; `NODE_LAB_BIN_DIR` (e.g. `target/release`) overrides the test's profile
/// directory, so throughput runs can use optimised builds.
pub fn bin(name: &str) -> PathBuf {
    match std::env::var_os("NODE_LAB_BIN_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => bin_path(name),
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn spawn_logged(ns: &Netns, bin: &Path, args: &[&str], log: &Path, what: &str) -> Result<Child> {
    let mut cmd = ns.command(bin);
    cmd.args(args)
        .env("RUST_LOG", std::env::var("NODE_LAB_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stdout(File::create(log)?)
        .stderr(File::create(log.with_extension("err"))?);
    Child::spawn(cmd, what)
}

/// `derpfleet-client keygen` → [private key, disco key, public key, disco public].
pub fn keygen() -> Result<[String; 4]> {
    let out = Command::new(bin("derpfleet-client")).arg("keygen").output()?;
    let text = String::from_utf8(out.stdout)?;
    let vals: Vec<String> = text.lines().filter_map(|l| l.split('"').nth(1).map(str::to_string)).collect();
    match <[String; 4]>::try_from(vals) {
        Ok(v) => Ok(v),
        Err(_) => bail!("`derpfleet-client keygen` failed ({}): {text}", out.status),
    }
}

fn router_rules(symmetric: bool) -> String {
    let masq = if symmetric { "masquerade fully-random" } else { "masquerade" };
    format!(
        "table ip nat {{
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" {masq}
  }}
}}
table inet filter {{
  chain forward_chain {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"lan0\" oifname \"wan0\" accept
  }}
  chain input_chain {{ type filter hook input priority filter; policy drop;
    ct state established,related accept
    meta l4proto ipv6-icmp accept
    iifname {{ \"lo\", \"lan0\" }} accept
  }}
}}
"
    )
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
    children: Vec<Child>,
    /// working directory (configs, logs, sockets)
    pub dir: PathBuf,
    _tmp: TmpDir,
}

impl PathLab {
    /// Builds the namespaces, routers, relay and STUN server; nodes start with [`PathLab::up`].
    pub fn new(suffix: &str, opts: LabOpts) -> Result<Self> {
        let tag = format!("{}{suffix}", unique_tag());
        let dir = std::env::temp_dir().join(format!("derpfleet-dfp-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let tmp = TmpDir(dir.clone());
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
            r.nft(&router_rules(opts.nat == Nat::Symmetric))?;
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
        let mut children = Vec::new();
        // One STUN server per address: a wildcard-bound one answers from the address of the
        // outgoing route (172.30.n.1 here), which the NATs rightly refuse as a reply.
        for (a, name) in [(format!("{RELAY_IP}:3478"), "stun4"), (format!("[{RELAY_IP6}]:3478"), "stun6")] {
            let log = dir.join(format!("{name}.log"));
            children.push(spawn_logged(&public, &bin("derpfleet-stun"), &["--a", &a], &log, "stun")?);
        }
        let certdir = dir.join("certs");
        children.push(spawn_logged(
            &public,
            &bin("derpfleet-relay"),
            &[
                "-a",
                ":443",
                "-certmode",
                "manual",
                "-hostname",
                RELAY_IP,
                "-certdir",
                certdir.to_str().context("utf-8 path")?,
                "-c",
                dir.join("relay.key").to_str().context("utf-8 path")?,
                "-http-port",
                "-1",
                "-stun=false",
            ],
            &dir.join("relay.log"),
            "relay",
        )?);
        let v4 = if opts.ipv4 { RELAY_IP } else { "none" };
        let v6 = if opts.ipv6 { RELAY_IP6 } else { "none" };
        let map = serde_json::json!({"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "RegionName": "Lab",
            "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": RELAY_IP, "IPv4": v4, "IPv6": v6,
                       "InsecureForTests": true}]}}});
        std::fs::write(dir.join("derpmap.json"), map.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while !certdir.join(format!("{RELAY_IP}.crt")).exists() {
            if Instant::now() > deadline {
                bail!("relay wrote no certificate: {}", read(&dir.join("relay.err")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        Ok(Self { homes: [home0, home1], routers, public, opts, children, dir, _tmp: tmp })
    }

    /// Starts both nodes, peered with each other, and waits until both are connected to DERP and
    /// have a STUN endpoint (of every family the lab has).
    pub fn up(&mut self) -> Result<()> {
        let keys = [keygen()?, keygen()?];
        for i in 0..2 {
            let (me, peer) = (&keys[i], &keys[1 - i]);
            let cfg = format!(
                "private_key = \"{}\"\ndisco_key = \"{}\"\nlisten_port = 41641\nderp_map = \"derpmap.json\"\n\
                 home_region = 900\ncontrol = \"{}\"\n[tun]\nname = \"df{i}\"\naddresses = [\"{}/24\"]\n\
                 [[peer]]\npublic_key = \"{}\"\ndisco_key = \"{}\"\nhome_region = 900\nallowed_ips = [\"{}/32\"]\n",
                me[0],
                me[1],
                self.control(i).display(),
                TUN_IPS[i],
                peer[2],
                peer[3],
                TUN_IPS[1 - i],
            );
            let path = self.dir.join(format!("node{i}.toml"));
            std::fs::write(&path, cfg)?;
            let child = spawn_logged(
                &self.homes[i],
                &bin("derpfleet-client"),
                &["up", "--config", path.to_str().context("utf-8 path")?],
                &self.dir.join(format!("node{i}.log")),
                "node",
            )?;
            self.children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for i in 0..2 {
            loop {
                if let Ok(s) = self.status(i) {
                    let eps: Vec<&str> = s["endpoints"]
                        .as_array()
                        .map(|e| e.iter().filter_map(|e| e.as_str()).collect())
                        .unwrap_or_default();
                    let v4 = !self.opts.ipv4 || eps.iter().any(|e| e.starts_with("172.30."));
                    let v6 = !self.opts.ipv6 || eps.iter().any(|e| e.starts_with("[fd00:"));
                    if s["home_connected"] == serde_json::Value::Bool(true) && v4 && v6 {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!("node {i} not ready: {:?}\nlog:\n{}", self.status(i), self.log(i));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// Node `i`'s control socket.
    pub fn control(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}.sock"))
    }

    /// Node `i`'s log (stderr).
    pub fn log(&self, i: usize) -> String {
        read(&self.dir.join(format!("node{i}.err")))
    }

    /// `derpfleet-client status --json` of node `i`.
    pub fn status(&self, i: usize) -> Result<serde_json::Value> {
        let out = Command::new(bin("derpfleet-client"))
            .args(["status", "--json", "--control", self.control(i).to_str().context("utf-8 path")?])
            .output()?;
        if !out.status.success() {
            bail!("status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The path node `i` uses to its peer (`direct ip:port` or `derp-900`).
    pub fn path(&self, i: usize) -> Result<String> {
        Ok(self.status(i)?["peers"][0]["path"].as_str().unwrap_or_default().to_string())
    }

    /// Waits until `pred(path of node i)` holds; returns the time it took.
    pub fn wait_path(&self, i: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let p = self.path(i)?;
            if pred(&p) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "node {i} path still {p:?} after {timeout:?}\nstatus {:#}\nlog:\n{}",
                    self.status(i)?,
                    self.log(i)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `count` pings from home `i` to the other tunnel address; returns how many were answered.
    pub fn ping(&self, i: usize, count: u32, interval: &str) -> Result<u32> {
        let out = Command::new("ip")
            .args(["netns", "exec", self.homes[i].name(), "ping", "-n", "-q", "-c", &count.to_string()])
            .args(["-i", interval, "-W", "2", TUN_IPS[1 - i]])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .find_map(|l| {
                l.split(", ")
                    .find(|p| p.ends_with("received"))
                    .and_then(|p| p.split(' ').next()?.parse().ok())
            })
            .unwrap_or(0))
    }

    /// TCP throughput home 0 → home 1 to `dst` (a tunnel address): `iperf3 -t secs`, Mbit/s received.
    pub fn iperf_to(&self, dst: &str, secs: u32) -> Result<f64> {
        let mut cmd = self.homes[1].command("iperf3");
        cmd.args(["-s", "-1", "-B", dst]).stdout(Stdio::null()).stderr(Stdio::null());
        let _server = Child::spawn(cmd, "iperf3 server")?;
        std::thread::sleep(Duration::from_millis(300));
        let out = self.homes[0].exec("iperf3", &["-c", dst, "-t", &secs.to_string(), "-J"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e6)
            .with_context(|| format!("iperf3 output: {out}"))
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
    pub fn wireguard_go_pair(&self) -> Result<Vec<Child>> {
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
            let mut cmd = home.command("wireguard-go");
            cmd.arg("-f").arg(&ifname).stdout(File::create(self.dir.join(format!("wg{i}.log")))?);
            cmd.stderr(Stdio::null());
            out.push(Child::spawn(cmd, "wireguard-go")?);
            let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
            let deadline = Instant::now() + Duration::from_secs(5);
            while !sock.exists() {
                if Instant::now() > deadline {
                    bail!("wireguard-go made no UAPI socket");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
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

/// `wg` (wireguard-tools) with optional stdin, output trimmed.
fn wg(args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut c = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running wg (apt wireguard-tools)")?;
    if let Some(s) = stdin {
        c.stdin.take().context("piped")?.write_all(s.as_bytes())?;
    }
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!("wg {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
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
