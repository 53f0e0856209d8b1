//! The reference node re-deciding its home region, end to end: two `derpfleet-client up`
//! processes behind symmetric NATs (so their traffic is relayed and depends on the home), two
//! DERP regions (real `derpfleet-relay` processes, each also answering STUN, as derper does).
//!
//! Topology (as `node_lab`): `homeA` 192.168.1.2 ↔ `natA` ↔ `pub` ↔ `natB` ↔ `homeB` 192.168.2.2;
//! region `n` is at 172.30.0.n in `pub`. In the delay lab, each region's address is a delaying
//! UDP + TCP forwarder (the netcheck lab's forwarder: `tc netem` is missing in this kernel) in
//! front of a relay on loopback, so a region can be made slower while the nodes run.
//!
//! Namespaces are named `dfh<pid><suffix>...` and removed on drop with every process inside.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use derpfleet_e2e::delay::{tcp_delay, udp_delay, Delay};
use derpfleet_e2e::netns::{unique_tag, veth, Netns};
use derpfleet_e2e::{bin_path, Child};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// The netcheck lab's delaying forwarder (same design: one thread in the router namespace, one
// upstream socket per client source, adjustable one-way delay).

struct NsThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsThread {
    fn spawn<F, Fut>(ns: &str, f: F) -> Result<Self>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let path = format!("/var/run/netns/{ns}");
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::spawn(move || {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) => return ready_tx.send(Err(format!("{path}: {e}"))).unwrap_or(()),
            };
            // SAFETY: setns on this thread only; the fd is valid for the call.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                return ready_tx.send(Err(format!("setns {path}: {e}"))).unwrap_or(());
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let work = f();
                tokio::pin!(work);
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    r = &mut work => if let Err(e) = r { eprintln!("forwarder failed: {e:#}") },
                    _ = stop_rx => {}
                }
            });
        });
        ready_rx.recv().context("forwarder thread died")?.map_err(anyhow::Error::msg)?;
        Ok(Self { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for NsThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lab.

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
    let mut s = String::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
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

fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !read(path).contains(needle) {
        if Instant::now() > deadline {
            bail!("{} never logged {needle:?}; log:\n{}", path.display(), read(path));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
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

/// Symmetric NAT (`fully-random`), dropping unsolicited WAN input (as `node_lab`).
const NAT_RULES: &str = "table ip nat {
  chain post { type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" masquerade fully-random
  }
}
table ip filter {
  chain forward_chain { type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"lan0\" oifname \"wan0\" accept
  }
  chain input_chain { type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname { \"lo\", \"lan0\" } accept
  }
}
";

const TUN_IPS: [&str; 2] = ["100.64.0.1", "100.64.0.2"];
const REGIONS: [i64; 2] = [1, 2];

fn region_ip(id: i64) -> String {
    format!("172.30.0.{id}")
}

struct Lab {
    homes: [Netns; 2],
    _nats: [Netns; 2],
    _public: Netns,
    relays: HashMap<i64, Child>,
    nodes: Vec<Child>,
    delays: HashMap<i64, Delay>,
    _forwarders: Option<NsThread>,
    dir: PathBuf,
    _tmp: TmpDir,
}

impl Lab {
    /// Namespaces, NATs and one relay per region; with `delayed`, each region sits behind a
    /// delaying forwarder (delay 0 until [`Lab::set_rtt`]).
    fn new(suffix: &str, delayed: bool) -> Result<Self> {
        let tag = format!("{}{suffix}", unique_tag());
        let dir = std::env::temp_dir().join(format!("derpfleet-home-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let tmp = TmpDir(dir.clone());
        let public = Netns::new(&format!("dfh{tag}p"))?;
        public.enable_forwarding()?;
        let mut homes = Vec::new();
        let mut nats = Vec::new();
        for (i, side) in ["a", "b"].iter().enumerate() {
            let n = i + 1;
            let home = Netns::new(&format!("dfh{tag}h{side}"))?;
            let natns = Netns::new(&format!("dfh{tag}n{side}"))?;
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
            natns.nft(NAT_RULES)?;
            homes.push(home);
            nats.push(natns);
        }
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
            let certdir = dir.join(format!("certs{id}"));
            let log = dir.join(format!("relay{id}.log"));
            relays.insert(
                id,
                spawn_logged(
                    &public,
                    &bin_path("derpfleet-relay"),
                    &[
                        "-a",
                        &format!("{listen_ip}:{https}"),
                        "-certmode",
                        "manual",
                        "-hostname",
                        &ip,
                        "-certdir",
                        certdir.to_str().unwrap(),
                        "-c",
                        dir.join(format!("relay{id}.key")).to_str().unwrap(),
                        "-http-port",
                        "-1",
                        "-stun-port",
                        &stun.to_string(),
                    ],
                    &log,
                    "relay",
                )?,
            );
            if delayed {
                let d: Delay = Arc::new(AtomicU64::new(0));
                delays.insert(id, d.clone());
                routes.push((
                    format!("{ip}:3478").parse::<SocketAddr>()?,
                    format!("127.0.0.1:{stun}").parse::<SocketAddr>()?,
                    format!("{ip}:443").parse::<SocketAddr>()?,
                    format!("127.0.0.1:{https}").parse::<SocketAddr>()?,
                    d,
                ));
            }
            regions.insert(
                id.to_string(),
                serde_json::json!({"RegionID": id, "RegionCode": format!("r{id}"), "RegionName": format!("Region {id}"),
                    "Nodes": [{"Name": format!("{id}a"), "RegionID": id, "HostName": ip, "IPv4": ip, "IPv6": "none",
                               "InsecureForTests": true}]}),
            );
        }
        for id in REGIONS {
            wait_for_log(&dir.join(format!("relay{id}.err")), "relay listening", Duration::from_secs(20))?;
        }
        let forwarders = if delayed {
            Some(NsThread::spawn(public.name(), move || async move {
                let mut set = tokio::task::JoinSet::new();
                for (udp_l, udp_u, tcp_l, tcp_u, d) in routes {
                    set.spawn(udp_delay(udp_l, udp_u, d.clone()));
                    set.spawn(tcp_delay(tcp_l, tcp_u, d));
                }
                match set.join_next().await {
                    Some(Ok(r)) => r,
                    _ => Ok(()),
                }
            })?)
        } else {
            None
        };
        std::fs::write(dir.join("derpmap.json"), serde_json::json!({ "Regions": regions }).to_string())?;
        let [h0, h1]: [Netns; 2] = homes.try_into().map_err(|_| anyhow::anyhow!("two homes"))?;
        let [n0, n1]: [Netns; 2] = nats.try_into().map_err(|_| anyhow::anyhow!("two nats"))?;
        Ok(Self {
            homes: [h0, h1],
            _nats: [n0, n1],
            _public: public,
            relays,
            nodes: Vec::new(),
            delays,
            _forwarders: forwarders,
            dir,
            _tmp: tmp,
        })
    }

    /// Sets region `id`'s round trip (delay lab only).
    fn set_rtt(&self, id: i64, ms: u64) {
        self.delays[&id].store(ms * 500, Relaxed);
    }

    /// Starts both nodes with `home_region = 1` (a preference) and each other as peer on region 1;
    /// `extra` is appended to both configs' top level. Waits until both are on DERP.
    fn up(&mut self, extra: &str) -> Result<()> {
        let keys = [keygen()?, keygen()?];
        for i in 0..2 {
            let (me, peer) = (&keys[i], &keys[1 - i]);
            let cfg = format!(
                "private_key = \"{}\"\ndisco_key = \"{}\"\nlisten_port = 41641\nderp_map = \"derpmap.json\"\n\
                 home_region = 1\ncontrol = \"{}\"\n{extra}\n[tun]\nname = \"df{i}\"\naddresses = [\"{}/24\"]\n\
                 [[peer]]\npublic_key = \"{}\"\ndisco_key = \"{}\"\nhome_region = 1\nallowed_ips = [\"{}/32\"]\n",
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
            self.nodes.push(spawn_logged(
                &self.homes[i],
                &bin_path("derpfleet-client"),
                &["up", "--config", path.to_str().unwrap()],
                &self.dir.join(format!("node{i}.log")),
                "node",
            )?);
        }
        for i in 0..2 {
            self.wait_status(i, Duration::from_secs(15), "home_connected", |s| s["home_connected"] == true)?;
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

    fn text_status(&self, i: usize) -> Result<String> {
        let out = std::process::Command::new(bin_path("derpfleet-client"))
            .args(["status", "--control", self.control(i).to_str().unwrap()])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until `pred(status of node i)` holds; returns the time it took.
    fn wait_status(
        &self,
        i: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            if let Ok(s) = self.status(i) {
                if pred(&s) {
                    return Ok(t0.elapsed());
                }
                if t0.elapsed() > timeout {
                    bail!("node {i}: {what} not reached in {timeout:?}\nstatus {s:#}\nlog:\n{}", self.log(i));
                }
            } else if t0.elapsed() > timeout {
                bail!("node {i}: no status\nlog:\n{}", self.log(i));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `count` pings from home `i` to the other TUN address; how many were answered.
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

    fn reports(&self, i: usize) -> Result<u64> {
        Ok(self.status(i)?["netcheck"]["reports"].as_u64().unwrap_or(0))
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
        assert_eq!(home(&lab.status(i)?), 1, "home_region = 1 is the starting home");
    }
    assert_eq!(lab.ping(0, 3)?, 3, "log0:\n{}", lab.log(0));
    let s = lab.status(0)?;
    assert_eq!(s["peers"][0]["path"], "derp-1", "{s:#}");
    let killed_at = Instant::now();
    lab.relays.get_mut(&1).unwrap().signal("KILL");
    for i in 0..2 {
        let took = lab.wait_status(i, Duration::from_secs(30), "home derp-2, connected", |s| {
            home(s) == 2 && s["home_connected"] == true
        })?;
        eprintln!("node {i}: home derp-2 and connected {:?} after the kill", killed_at.elapsed());
        let _ = took;
    }
    assert!(killed_at.elapsed() < Duration::from_secs(30));
    // B speaks first after the move: it still has region 1 for A, which is dead, so it goes
    // through its own home, where A now is.
    assert!(lab.ping(1, 5)? >= 4, "B -> A after the move\nlog1:\n{}", lab.log(1));
    assert!(lab.ping(0, 5)? >= 4, "A -> B after the move\nlog0:\n{}", lab.log(0));
    let s = lab.status(0)?;
    eprintln!("{}", lab.text_status(0)?);
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
        let s = lab.status(i)?;
        assert_eq!(home(&s), 1, "within the margin the home must stay: {s:#}");
        assert!(s["home_history"].as_array().is_some_and(|h| h.is_empty()), "{s:#}");
        let lat = &s["netcheck"]["region_latency_ms"];
        let (l1, l2) = (lat["1"].as_f64().unwrap_or(0.0), lat["2"].as_f64().unwrap_or(0.0));
        assert!(l2 < l1 && l1 >= 15.0, "region 2 measured faster but within the margin: {s:#}");
    }
    assert!(lab.ping(0, 2)? >= 1, "log0:\n{}", lab.log(0));
    // Region 1 becomes slow (60 ms): once its old samples age out, region 2 wins by the margin.
    let slowed = Instant::now();
    lab.set_rtt(1, 60);
    for i in 0..2 {
        lab.wait_status(i, Duration::from_secs(40), "home derp-2, connected", |s| {
            home(s) == 2 && s["home_connected"] == true
        })?;
        eprintln!("node {i}: home moved to derp-2 {:?} after region 1 was slowed", slowed.elapsed());
    }
    let s = lab.status(0)?;
    eprintln!("{}", lab.text_status(0)?);
    let why = s["home_history"][0]["reason"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("faster than derp-1"), "{s:#}");
    assert!(lab.ping(0, 5)? >= 4, "A -> B via the new home\nlog0:\n{}", lab.log(0));
    assert!(lab.ping(1, 5)? >= 4, "B -> A via the new home\nlog1:\n{}", lab.log(1));
    // Stays: several more reports, still one move.
    let r = lab.reports(0)?;
    lab.wait_status(0, Duration::from_secs(30), "4 more reports", |s| {
        s["netcheck"]["reports"].as_u64().unwrap_or(0) >= r + 4
    })?;
    let s = lab.status(0)?;
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
    let s = lab.status(0)?;
    assert_eq!(home(&s), 1, "{s:#}");
    assert_eq!(s["pin_home"], true);
    assert_eq!(s["netcheck"]["preferred_derp"], 2, "netcheck would move (so the pin did the work): {s:#}");
    assert!(s["home_history"].as_array().is_some_and(|h| h.is_empty()), "{s:#}");
    assert!(s["netcheck"]["region_latency_ms"]["1"].as_f64().unwrap_or(0.0) >= 60.0, "{s:#}");
    assert!(lab.ping(0, 3)? >= 2, "log0:\n{}", lab.log(0));
    Ok(())
}
