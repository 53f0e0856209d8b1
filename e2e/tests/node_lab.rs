//! The reference node end to end: two `derpfleet-client up` processes behind NATs in
//! network namespaces, a `derpfleet-relay` (TLS, self-signed, `InsecureForTests` in the DERP map)
//! and a `derpfleet-stun` in a "public" namespace.
//!
//! Topology (test-lab.md §3): `homeA` 192.168.1.2 ↔ `natA` (WAN 172.30.1.2) ↔ `pub` ↔ `natB`
//! (WAN 172.30.2.2) ↔ `homeB` 192.168.2.2; the relay and STUN listen on 172.30.0.1 in `pub`. The
//! NATs are endpoint-independent (`masquerade`) or symmetric (`masquerade fully-random`), and drop
//! unsolicited WAN input (avoids the eim-race). Pings run over the TUN devices 100.64.0.1/.2.
//!
//! Each test builds its own namespaces (pid + suffix in the names) and removes them on drop with
//! every process inside.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use derpfleet_e2e::netns::{unique_tag, veth, Netns};
use derpfleet_e2e::{bin_path, Child};

use serde_json::Value;

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
/// directory, so the throughput runs can use optimised builds.
fn bin(name: &str) -> PathBuf {
    match std::env::var_os("NODE_LAB_BIN_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => bin_path(name),
    }
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

/// `derpfleet-client keygen` → (private_key line value, disco_key value, public key, disco public).
fn keygen() -> Result<[String; 4]> {
    let out = std::process::Command::new(bin("derpfleet-client")).arg("keygen").output()?;
    let text = String::from_utf8(out.stdout)?;
    let vals: Vec<String> = text.lines().filter_map(|l| l.split('"').nth(1).map(str::to_string)).collect();
    if vals.len() != 4 {
        bail!(
            "`derpfleet-client keygen` failed ({}): was the binary built without its default `node` \
             feature?\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok([vals[0].clone(), vals[1].clone(), vals[2].clone(), vals[3].clone()])
}

#[derive(Clone, Copy, PartialEq)]
enum Nat {
    EndpointIndependent,
    Symmetric,
}

struct Lab {
    homes: [Netns; 2],
    _nats: [Netns; 2],
    public: Netns,
    children: Vec<Child>,
    dir: PathBuf,
    _tmp: TmpDir,
}

const RELAY_IP: &str = "172.30.0.1";
const TUN_IPS: [&str; 2] = ["100.64.0.1", "100.64.0.2"];

fn nat_rules(symmetric: bool) -> String {
    let masq = if symmetric { "masquerade fully-random" } else { "masquerade" };
    format!(
        "table ip nat {{
  chain post {{ type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" {masq}
  }}
}}
table ip filter {{
  chain forward_chain {{ type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"lan0\" oifname \"wan0\" accept
  }}
  chain input_chain {{ type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname {{ \"lo\", \"lan0\" }} accept
  }}
}}
"
    )
}

impl Lab {
    /// Builds the namespaces, NATs, relay and STUN server; nodes are started with [`Lab::up`].
    fn new(suffix: &str, nat: Nat) -> Result<Self> {
        let tag = format!("{}{suffix}", unique_tag());
        let dir = std::env::temp_dir().join(format!("derpfleet-node-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let tmp = TmpDir(dir.clone());
        let public = Netns::new(&format!("nd{tag}p"))?;
        public.ip(&["addr", "add", &format!("{RELAY_IP}/32"), "dev", "lo"])?;
        public.enable_forwarding()?;
        let mut homes = Vec::new();
        let mut nats = Vec::new();
        for (i, side) in ["a", "b"].iter().enumerate() {
            let n = i + 1;
            let home = Netns::new(&format!("nd{tag}h{side}"))?;
            let natns = Netns::new(&format!("nd{tag}n{side}"))?;
            veth(&home, "h0", &format!("192.168.{n}.2/24"), &natns, "lan0", &format!("192.168.{n}.1/24"))?;
            veth(
                &natns,
                "wan0",
                &format!("172.30.{n}.2/24"),
                &public,
                &format!("p{side}"),
                &format!("172.30.{n}.1/24"),
            )?;
            home.ip(&["route", "add", "default", "via", &format!("192.168.{n}.1")])?;
            natns.ip(&["route", "add", "default", "via", &format!("172.30.{n}.1")])?;
            natns.enable_forwarding()?;
            natns.nft(&nat_rules(nat == Nat::Symmetric))?;
            homes.push(home);
            nats.push(natns);
        }
        let mut children = Vec::new();
        children.push(spawn_logged(
            &public,
            &bin("derpfleet-stun"),
            &["--a", &format!("{RELAY_IP}:3478")],
            &dir.join("stun.log"),
            "stun",
        )?);
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
        let deadline = Instant::now() + Duration::from_secs(15);
        while !certdir.join(format!("{RELAY_IP}.crt")).exists() {
            if Instant::now() > deadline {
                bail!("relay wrote no certificate: {}", read(&dir.join("relay.err")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        let [h0, h1]: [Netns; 2] = homes.try_into().map_err(|_| anyhow::anyhow!("two homes"))?;
        let [n0, n1]: [Netns; 2] = nats.try_into().map_err(|_| anyhow::anyhow!("two nats"))?;
        Ok(Self { homes: [h0, h1], _nats: [n0, n1], public, children, dir, _tmp: tmp })
    }

    /// Starts both nodes, peered with each other, and waits until both are connected to DERP and
    /// have a STUN endpoint.
    fn up(&mut self) -> Result<()> {
        self.up_with(false)
    }

    /// [`Lab::up`]; with `netcheck_home`, node 1's config names no home region, so netcheck
    /// (on the shared socket) picks it.
    fn up_with(&mut self, netcheck_home: bool) -> Result<()> {
        self.up_full(netcheck_home, false)
    }

    /// [`Lab::up_with`]; with `userspace0`, node 0 runs without a TUN and forwards local UDP port
    /// 127.0.0.1:5000 to 100.64.0.2:7000 through the tunnel.
    fn up_full(&mut self, netcheck_home: bool, userspace0: bool) -> Result<()> {
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
            let cfg = if userspace0 && i == 0 {
                cfg.replace("[tun]\n", "[[forward]]\nlisten = \"127.0.0.1:5000\"\nto = \"100.64.0.2:7000\"\n[tun]\nuserspace = true\n")
            } else {
                cfg
            };
            let cfg = if netcheck_home && i == 1 { cfg.replacen("home_region = 900\n", "", 1) } else { cfg };
            let path = self.dir.join(format!("node{i}.toml"));
            std::fs::write(&path, cfg)?;
            let child = spawn_logged(
                &self.homes[i],
                &bin("derpfleet-client"),
                &["up", "--config", path.to_str().unwrap()],
                &self.dir.join(format!("node{i}.log")),
                "node",
            )?;
            self.children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for i in 0..2 {
            loop {
                if let Ok(s) = self.status(i) {
                    if s["home_connected"] == Value::Bool(true)
                        && s["endpoints"].as_array().is_some_and(|e| {
                            e.iter().any(|e| e.as_str().unwrap_or("").starts_with("172.30."))
                        })
                    {
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

    fn control(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{i}.sock"))
    }

    fn log(&self, i: usize) -> String {
        read(&self.dir.join(format!("node{i}.err")))
    }

    fn status(&self, i: usize) -> Result<Value> {
        let out = std::process::Command::new(bin("derpfleet-client"))
            .args(["status", "--json", "--control", self.control(i).to_str().unwrap()])
            .output()?;
        if !out.status.success() {
            bail!("status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The path node `i` uses to its peer (`direct ip:port` or `derp-900`).
    fn path(&self, i: usize) -> Result<String> {
        Ok(self.status(i)?["peers"][0]["path"].as_str().unwrap_or_default().to_string())
    }

    /// `count` pings from home `i` to the other TUN address; returns how many were answered.
    fn ping(&self, i: usize, count: u32, interval: &str) -> Result<u32> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", self.homes[i].name(), "ping", "-n", "-q", "-c", &count.to_string()])
            .args(["-i", interval, "-W", "2", TUN_IPS[1 - i]])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let received = text
            .lines()
            .find_map(|l| {
                l.split(", ")
                    .find(|p| p.ends_with("received"))
                    .and_then(|p| p.split(' ').next()?.parse().ok())
            })
            .unwrap_or(0);
        Ok(received)
    }

    /// The relay's `derp_packets_sent` counter, scraped on loopback inside `pub`.
    fn relay_packets_sent(&self) -> Result<u64> {
        let out =
            self.public.exec("curl", &["-sk", "--max-time", "3", "https://127.0.0.1:443/debug/varz"])?;
        out.lines()
            .find_map(|l| l.strip_prefix("derp_packets_sent ").and_then(|v| v.trim().parse::<f64>().ok()))
            .map(|v| v as u64)
            .with_context(|| format!("no derp_packets_sent in varz:\n{out}"))
    }

    /// Waits until `pred(path of node i)` holds; returns the time it took.
    fn wait_path(&self, i: usize, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<Duration> {
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

    /// TCP throughput A → B through the tunnel: `iperf3 -c 100.64.0.2 -t secs` (Mbit/s received).
    fn iperf(&self, secs: u32) -> Result<f64> {
        let mut cmd = self.homes[1].command("iperf3");
        cmd.args(["-s", "-1", "-B", TUN_IPS[1]]).stdout(Stdio::null()).stderr(Stdio::null());
        let _server = Child::spawn(cmd, "iperf3 server")?;
        std::thread::sleep(Duration::from_millis(300));
        let out = self.homes[0].exec("iperf3", &["-c", TUN_IPS[1], "-t", &secs.to_string(), "-J"])?;
        let v: Value = serde_json::from_str(&out)?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e6)
            .with_context(|| format!("iperf3 output: {out}"))
    }

    /// Blocks the direct path between the NATs (in `pub`), leaving the relay reachable.
    fn cut(&self, on: bool) -> Result<()> {
        if on {
            self.public.nft(
                "table inet cut {\n chain f {\n  type filter hook forward priority filter; policy accept;\n  \
                 iifname \"pa\" oifname \"pb\" drop\n  iifname \"pb\" oifname \"pa\" drop\n }\n}\n",
            )
        } else {
            self.public.nft("delete table inet cut")
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn handshake_age(s: &Value) -> Option<f64> {
    s["peers"][0]["last_handshake_secs"].as_f64()
}

/// Acceptance 1: endpoint-independent NATs. DERP first, direct within 5 s, then the relay is idle
/// for this pair while the ping continues.
#[test]
fn eim_nats_ping_via_derp_then_direct_and_relay_goes_quiet() -> Result<()> {
    let mut lab = Lab::new("e", Nat::EndpointIndependent)?;
    lab.up()?;
    let relayed_before = lab.relay_packets_sent()?;
    let t0 = Instant::now();
    assert_eq!(lab.ping(0, 1, "0.2")?, 1, "first ping (2 s budget) failed\nlog0:\n{}", lab.log(0));
    assert!(t0.elapsed() < Duration::from_secs(2), "first ping took {:?}", t0.elapsed());
    // The handshake and first ping went through the relay (no direct path existed yet).
    let relayed_first = lab.relay_packets_sent()? - relayed_before;
    assert!(
        relayed_first >= 4,
        "relay carried only {relayed_first} packets for the handshake and first ping"
    );
    let first_ping = t0.elapsed();
    lab.wait_path(0, Duration::from_secs(5), |p| p.starts_with("direct 172.30.2.2:"))?;
    let a_direct = t0.elapsed();
    lab.wait_path(1, Duration::from_secs(5), |p| p.starts_with("direct 172.30.1.2:"))?;
    eprintln!("first ping {first_ping:?}; direct A->B after {a_direct:?}, B->A after {:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(5), "direct only after {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_millis(500));
    let before = lab.relay_packets_sent()?;
    assert_eq!(lab.ping(0, 20, "0.2")?, 20);
    std::thread::sleep(Duration::from_millis(500));
    let after = lab.relay_packets_sent()?;
    eprintln!("relay derp_packets_sent {before} -> {after} during 20 direct pings");
    assert_eq!(after, before, "the relay still carried packets for the pair");
    let s = lab.status(0)?;
    assert!(s["peers"][0]["rx_bytes"].as_u64().unwrap() > 0, "{s:#}");

    // Hostile datagrams on the shared socket (random bytes, a disco packet from an unknown key, a
    // STUN answer nobody asked for, WireGuard data for a session index that does not exist) are
    // ignored: the node stays up, on the direct path, and keeps carrying the ping.
    let junk = [
        "\\x01\\x02garbage",
        "TS\\xf0\\x9f\\x92\\xacAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "\\x01\\x01\\x00\\x00\\x21\\x12\\xa4\\x42AAAAAAAAAAAA",
        "\\x04\\x00\\x00\\x00\\xff\\xff\\xff\\x00AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "\\x04\\x00\\x00\\x00\\x01\\x00\\x00\\x00AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ];
    for j in junk {
        lab.homes[0].exec("bash", &["-c", &format!("printf '{j}' > /dev/udp/127.0.0.1/41641")])?;
    }
    assert_eq!(lab.ping(0, 5, "0.2")?, 5, "log0:\n{}", lab.log(0));
    assert!(lab.path(0)?.starts_with("direct "));
    Ok(())
}

/// Acceptance 2: symmetric NATs. Hole punching fails, so the path stays on DERP and ping works.
#[test]
fn symmetric_nats_stay_on_derp_and_ping_keeps_working() -> Result<()> {
    let mut lab = Lab::new("s", Nat::Symmetric)?;
    lab.up_with(true)?;
    assert_eq!(lab.status(1)?["home_region"], 900, "netcheck chose the home region");
    assert_eq!(lab.ping(0, 1, "0.2")?, 1, "log0:\n{}", lab.log(0));
    let before = lab.relay_packets_sent()?;
    assert_eq!(lab.ping(0, 40, "0.2")?, 40);
    assert_eq!(lab.path(0)?, "derp-900");
    assert_eq!(lab.path(1)?, "derp-900");
    let after = lab.relay_packets_sent()?;
    assert!(after >= before + 80, "relay carried {} packets for 40 pings", after - before);
    Ok(())
}

/// Acceptance 3: cut the direct path mid-run: DERP within 7 s without a new WireGuard handshake;
/// direct again after the cut is lifted.
#[test]
fn direct_path_cut_falls_back_to_derp_and_returns() -> Result<()> {
    let mut lab = Lab::new("c", Nat::EndpointIndependent)?;
    lab.up()?;
    assert_eq!(lab.ping(0, 1, "0.2")?, 1, "log0:\n{}", lab.log(0));
    lab.wait_path(0, Duration::from_secs(5), |p| p.starts_with("direct "))?;
    let hs_before = handshake_age(&lab.status(0)?).context("no handshake")?;
    let cut_at = Instant::now();
    lab.cut(true)?;
    // Keep traffic flowing (an active session) while the node notices.
    let mut cmd = lab.homes[0].command("ping");
    cmd.args(["-n", "-q", "-c", "75", "-i", "0.2", "-W", "1", TUN_IPS[1]]).stdout(Stdio::null());
    let mut pinger = Child::spawn(cmd, "ping")?;
    lab.wait_path(0, Duration::from_secs(7), |p| p == "derp-900")?;
    let fell_back = cut_at.elapsed();
    eprintln!("fell back to DERP {fell_back:?} after the cut");
    assert!(fell_back < Duration::from_secs(7), "fallback took {fell_back:?}");
    assert_eq!(lab.ping(0, 5, "0.2")?, 5, "ping over DERP during the cut\nlog0:\n{}", lab.log(0));
    let hs_after = handshake_age(&lab.status(0)?).context("no handshake")?;
    assert!(
        hs_after >= hs_before + cut_at.elapsed().as_secs_f64() - 1.0,
        "a new handshake happened: age {hs_before} -> {hs_after}"
    );
    lab.cut(false)?;
    let back = lab.wait_path(0, Duration::from_secs(12), |p| p.starts_with("direct "))?;
    eprintln!("direct again {back:?} after lifting the cut");
    let _ = pinger.wait_timeout(Duration::from_secs(20));
    Ok(())
}

/// Acceptance 5 (figures for BENCHMARKS.md; ignored by default, run by hand with optimised
/// binaries: `NODE_LAB_BIN_DIR=target/release cargo test -p derpfleet-e2e --test node_lab
/// throughput -- --ignored --nocapture`): iperf3 TCP through the tunnel, relayed (symmetric NATs)
/// and direct (endpoint-independent NATs), three 5 s runs each.
#[test]
#[ignore]
fn throughput_relayed_and_direct() -> Result<()> {
    for (name, nat, want_direct) in
        [("relayed", Nat::Symmetric, false), ("direct", Nat::EndpointIndependent, true)]
    {
        let mut lab = Lab::new(if want_direct { "td" } else { "tr" }, nat)?;
        lab.up()?;
        assert_eq!(lab.ping(0, 1, "0.2")?, 1);
        if want_direct {
            lab.wait_path(0, Duration::from_secs(5), |p| p.starts_with("direct "))?;
            lab.wait_path(1, Duration::from_secs(5), |p| p.starts_with("direct "))?;
        }
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(lab.iperf(5)?);
        }
        let path = lab.path(0)?;
        assert_eq!(path.starts_with("direct "), want_direct, "{path}");
        runs.sort_by(f64::total_cmp);
        eprintln!("BENCH node {name} ({path}): runs {runs:.0?} Mbit/s, median {:.0}", runs[1]);
        eprintln!("drops A {} B {}", lab.status(0)?["drops"], lab.status(1)?["drops"]);
    }
    Ok(())
}

/// Userspace mode: node 0 has no TUN; a local UDP port is forwarded through the tunnel (and the
/// direct path) to a UDP echo server on node 1's tunnel address.
#[test]
fn userspace_node_forwards_a_udp_port_through_the_tunnel() -> Result<()> {
    let mut lab = Lab::new("u", Nat::EndpointIndependent)?;
    lab.up_full(false, true)?;
    let echo =
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('100.64.0.2',7000))\n\
                while True:\n d,a=s.recvfrom(2048)\n s.sendto(d.upper(),a)\n";
    let mut cmd = lab.homes[1].command("python3");
    cmd.args(["-c", echo]).stdout(Stdio::null());
    let _echo = Child::spawn(cmd, "udp echo")?;
    std::thread::sleep(Duration::from_millis(300));
    let client = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(1)\n\
                  for i in range(10):\n s.sendto(b'hello %d'%i,('127.0.0.1',5000))\n try:\n  print(s.recv(2048).decode())\n except Exception:\n  pass\n";
    let out = lab.homes[0].exec("python3", &["-c", client])?;
    let answers = out.lines().filter(|l| l.starts_with("HELLO ")).count();
    assert!(answers >= 9, "{answers}/10 echoes came back: {out}\nlog0:\n{}", lab.log(0));
    lab.wait_path(0, Duration::from_secs(5), |p| p.starts_with("direct "))?;
    assert!(lab.homes[0].ip(&["link", "show", "df0"]).is_err(), "userspace mode made a TUN");
    Ok(())
}
