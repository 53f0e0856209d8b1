//! Port mapping end to end: two `derpfleet-client up` nodes behind **symmetric** NATs, each NAT
//! running Debian's real `miniupnpd` (NAT-PMP, PCP and UPnP IGD; its nftables backend, with the tables and
//! chains it expects created in the router namespace). With the mapping, the nodes advertise the
//! mapped address and go direct; without `miniupnpd` they stay relayed.
//!
//! Topology: `homeA` 192.168.1.2 ↔ `natA` (WAN 44.30.1.2) ↔ `pub` ↔ `natB` (WAN 44.30.2.2) ↔
//! `homeB` 192.168.2.2; relay and STUN at 44.30.0.1 in `pub`. The WAN side uses a public-looking
//! prefix because `miniupnpd` refuses to map on a private or documentation external address
//! ("Port forwarding is impossible"); nothing leaves the namespaces. Names: `dfm<pid><suffix>`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use derpfleet_e2e::netns::{unique_tag, veth, Netns};
use derpfleet_e2e::{bin_path, Child};
use serde_json::Value;

const RELAY_IP: &str = "44.30.0.1";
const TUN_IPS: [&str; 2] = ["100.64.0.1", "100.64.0.2"];

/// Symmetric NAT, unsolicited WAN input dropped, forwarded traffic allowed when `miniupnpd`
/// DNATed it (`ct status dnat`), as a router with port forwarding does.
const NAT_RULES: &str = "table ip nat {
  chain post { type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" masquerade fully-random
  }
}
table ip filter {
  chain forward_chain { type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct status dnat accept
    iifname \"lan0\" oifname \"wan0\" accept
  }
  chain input_chain { type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname { \"lo\", \"lan0\" } accept
  }
}
";

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

fn keygen() -> Result<[String; 4]> {
    let out = std::process::Command::new(bin_path("derpfleet-client")).arg("keygen").output()?;
    let text = String::from_utf8(out.stdout)?;
    let vals: Vec<String> = text.lines().filter_map(|l| l.split('"').nth(1).map(str::to_string)).collect();
    if vals.len() != 4 {
        bail!("`derpfleet-client keygen` failed ({}): {text}", out.status);
    }
    Ok([vals[0].clone(), vals[1].clone(), vals[2].clone(), vals[3].clone()])
}

struct Lab {
    homes: [Netns; 2],
    _nats: [Netns; 2],
    _public: Netns,
    children: Vec<Child>,
    dir: PathBuf,
    _tmp: TmpDir,
}

impl Lab {
    /// The NAT lab; with `upnpd`, each NAT runs `miniupnpd` (NAT-PMP, PCP, UPnP on its LAN side).
    fn new(suffix: &str, upnpd: bool) -> Result<Self> {
        let tag = format!("{}{suffix}", unique_tag());
        let dir = std::env::temp_dir().join(format!("derpfleet-portmap-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let tmp = TmpDir(dir.clone());
        let public = Netns::new(&format!("dfm{tag}p"))?;
        public.ip(&["addr", "add", &format!("{RELAY_IP}/32"), "dev", "lo"])?;
        public.enable_forwarding()?;
        let mut homes = Vec::new();
        let mut nats = Vec::new();
        let mut children = Vec::new();
        for (i, side) in ["a", "b"].iter().enumerate() {
            let n = i + 1;
            let home = Netns::new(&format!("dfm{tag}h{side}"))?;
            let natns = Netns::new(&format!("dfm{tag}n{side}"))?;
            veth(&home, "h0", &format!("192.168.{n}.2/24"), &natns, "lan0", &format!("192.168.{n}.1/24"))?;
            veth(
                &natns,
                "wan0",
                &format!("44.30.{n}.2/24"),
                &public,
                &format!("p{side}"),
                &format!("44.30.{n}.1/24"),
            )?;
            home.ip(&["route", "add", "default", "via", &format!("192.168.{n}.1")])?;
            natns.ip(&["route", "add", "default", "via", &format!("44.30.{n}.1")])?;
            natns.enable_forwarding()?;
            natns.nft(NAT_RULES)?;
            if upnpd {
                natns.nft(MINIUPNPD_TABLES)?;
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
                let pid = dir.join(format!("miniupnpd-{side}.pid"));
                children.push(spawn_logged(
                    &natns,
                    Path::new("miniupnpd"),
                    &["-f", conf.to_str().unwrap(), "-P", pid.to_str().unwrap(), "-d"],
                    &dir.join(format!("miniupnpd-{side}.log")),
                    "miniupnpd",
                )?);
            }
            homes.push(home);
            nats.push(natns);
        }
        children.push(spawn_logged(
            &public,
            &bin_path("derpfleet-stun"),
            &["--a", &format!("{RELAY_IP}:3478")],
            &dir.join("stun.log"),
            "stun",
        )?);
        let certdir = dir.join("certs");
        children.push(spawn_logged(
            &public,
            &bin_path("derpfleet-relay"),
            &[
                "-a",
                &format!("{RELAY_IP}:443"),
                "-certmode",
                "manual",
                "-hostname",
                RELAY_IP,
                "-certdir",
                certdir.to_str().unwrap(),
                "-c",
                dir.join("relay.key").to_str().unwrap(),
                "-http-port",
                "-1",
                "-stun=false",
            ],
            &dir.join("relay.log"),
            "relay",
        )?);
        let map = serde_json::json!({"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "RegionName": "Lab",
            "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": RELAY_IP, "IPv4": RELAY_IP, "IPv6": "none",
                       "InsecureForTests": true}]}}});
        std::fs::write(dir.join("derpmap.json"), map.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !read(&dir.join("relay.err")).contains("relay listening") {
            if Instant::now() > deadline {
                bail!("relay not listening: {}", read(&dir.join("relay.err")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let [h0, h1]: [Netns; 2] = homes.try_into().map_err(|_| anyhow::anyhow!("two homes"))?;
        let [n0, n1]: [Netns; 2] = nats.try_into().map_err(|_| anyhow::anyhow!("two nats"))?;
        Ok(Self { homes: [h0, h1], _nats: [n0, n1], _public: public, children, dir, _tmp: tmp })
    }

    /// Starts both nodes (`extra` goes into both configs' top level) and waits until both are
    /// on DERP.
    fn up(&mut self, extra: &str) -> Result<()> {
        let keys = [keygen()?, keygen()?];
        for i in 0..2 {
            let (me, peer) = (&keys[i], &keys[1 - i]);
            let cfg = format!(
                "private_key = \"{}\"\ndisco_key = \"{}\"\nlisten_port = 41641\nderp_map = \"derpmap.json\"\n\
                 home_region = 900\ncontrol = \"{}\"\n{extra}\n[tun]\nname = \"df{i}\"\naddresses = [\"{}/24\"]\n\
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
            self.children.push(spawn_logged(
                &self.homes[i],
                &bin_path("derpfleet-client"),
                &["up", "--config", path.to_str().unwrap()],
                &self.dir.join(format!("node{i}.log")),
                "node",
            )?);
        }
        for i in 0..2 {
            self.wait(i, Duration::from_secs(15), "home connected", |s| s["home_connected"] == true)?;
        }
        Ok(())
    }

    fn control(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}.sock"))
    }

    fn log(&self, i: usize) -> String {
        read(&self.dir.join(format!("node{i}.err")))
    }

    fn status(&self, i: usize) -> Result<Value> {
        let out = std::process::Command::new(bin_path("derpfleet-client"))
            .args(["status", "--json", "--control", self.control(i).to_str().unwrap()])
            .output()?;
        if !out.status.success() {
            bail!("status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn wait(&self, i: usize, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let t0 = Instant::now();
        loop {
            let s = self.status(i);
            if let Ok(s) = &s {
                if pred(s) {
                    return Ok(s.clone());
                }
            }
            if t0.elapsed() > timeout {
                bail!(
                    "node {i}: {what} not reached in {timeout:?}\nstatus {s:?}\nlog:\n{}\nminiupnpd:\n{}",
                    self.log(i),
                    read(&self.dir.join(if i == 0 { "miniupnpd-a.err" } else { "miniupnpd-b.err" }))
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `count` pings (0.2 s apart) from home `i` to the other node; how many were answered.
    fn ping(&self, i: usize, count: u32) -> Result<u32> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", self.homes[i].name(), "ping", "-n", "-q", "-c", &count.to_string()])
            .args(["-i", "0.2", "-W", "2", TUN_IPS[1 - i]])
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
    assert!(lab.ping(0, 3)? >= 2, "log0:\n{}", lab.log(0));
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
    assert!(lab.ping(0, 10)? >= 9, "direct ping\nlog0:\n{}", lab.log(0));
    let s = lab.status(0)?;
    assert!(s["peers"][0]["path"].as_str().is_some_and(|p| p.starts_with("direct ")), "{s:#}");
    // Stopping a node deletes its mapping on the gateway (miniupnpd drops the DNAT rule).
    let rules =
        |lab: &Lab| lab._nats[0].exec("nft", &["list", "chain", "inet", "filter", "prerouting_miniupnpd"]);
    assert!(rules(&lab)?.contains("41641"), "{}", rules(&lab)?);
    let node0 = lab.children.len() - 2;
    lab.children[node0].signal("TERM");
    assert!(lab.children[node0].wait_timeout(Duration::from_secs(5)).is_some(), "node 0 did not stop");
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
    assert_eq!(lab.ping(0, 30)?, 30, "log0:\n{}", lab.log(0));
    for i in 0..2 {
        let s = lab.status(i)?;
        assert_eq!(s["peers"][0]["path"], "derp-900", "{s:#}");
    }
    Ok(())
}
