//! netcheck labs in network namespaces.
//!
//! Delay lab: `cli` (the client) ↔ `rtr` ↔ `srv`. `srv` runs, per region, a `derpfleet-stun`
//! responder and a `derpfleet-relay` (manual cert mode, self-signed IP certificate pinned with
//! `sha256-raw`). `rtr` owns one "public" address per region and runs a delaying UDP+TCP
//! forwarder (written below; `tc netem` is missing in this kernel) that holds every packet or
//! byte chunk for half the region's round trip in each direction. So the client sees three regions
//! at true round trips of 10, 40 and 80 ms, by STUN and by HTTPS alike.
//!
//! NAT lab (test-lab.md §3): `home` ↔ `nat` (nftables masquerade, endpoint-independent or
//! `fully-random` = symmetric) ↔ `pub`, where two STUN servers listen on two addresses.
//!
//! Each test builds its own namespaces (names carry the pid and a per-test suffix) and removes them
//! on drop, with every process inside.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use derpfleet_e2e::delay::{tcp_delay, udp_delay, Delay};
use derpfleet_e2e::netns::{unique_tag, veth, Netns};
use derpfleet_e2e::{bin_path, Child};
use serde_json::Value;
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// A delaying UDP + TCP forwarder running in a namespace (its own thread, after setns).

/// Runs `f` on a new thread inside namespace `ns` with a current-thread Tokio runtime, until the
/// returned guard is dropped.
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
// Lab plumbing.

/// Waits until `path` contains `needle` (a server's "listening" log line).
fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut s = String::new();
        if let Ok(mut f) = File::open(path) {
            let _ = f.read_to_string(&mut s);
        }
        if s.contains(needle) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("{} never logged {needle:?}; log:\n{s}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn_logged(ns: &Netns, bin: &str, args: &[&str], log: &Path, what: &str) -> Result<Child> {
    let mut cmd = ns.command(bin_path(bin));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(File::create(log)?)
        .stderr(File::create(log.with_extension("err"))?);
    Child::spawn(cmd, what)
}

/// SHA-256 of the DER certificate in a PEM file, as a `sha256-raw:` CertName.
fn pin_of(pem_path: &Path) -> Result<String> {
    let mut rd =
        std::io::BufReader::new(File::open(pem_path).with_context(|| pem_path.display().to_string())?);
    let der = rustls_pemfile::certs(&mut rd).next().context("no certificate in PEM")??;
    use sha2::Digest;
    Ok(format!("sha256-raw:{}", hex::encode(sha2::Sha256::digest(der.as_ref()))))
}

fn tmpdir(tag: &str) -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("derpfleet-netcheck-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

struct TmpDir(PathBuf);
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `derpfleet-client netcheck --json` inside `ns` and parses the report.
fn netcheck_in(ns: &Netns, map: &Path) -> Result<Value> {
    let out = ns.exec(
        bin_path("derpfleet-client").to_str().unwrap(),
        &["netcheck", "--derp-map", map.to_str().unwrap(), "--json"],
    )?;
    serde_json::from_str(&out).with_context(|| format!("netcheck output: {out}"))
}

fn latency_ms(report: &Value, region: i64) -> Option<f64> {
    report["RegionLatency"][region.to_string()].as_f64().map(|ns| ns / 1e6)
}

/// The delay lab: three regions at true round trips `rtts_ms`.
struct DelayLab {
    cli: Netns,
    _rtr: Netns,
    _srv: Netns,
    _children: Vec<Child>,
    _forwarders: NsThread,
    delays: HashMap<i64, Delay>,
    map_path: PathBuf,
    _dir: TmpDir,
}

const REGION_RTTS_MS: [(i64, u64); 3] = [(1, 40), (2, 10), (3, 80)];

fn delay_lab(suffix: &str) -> Result<DelayLab> {
    let tag = format!("{}{suffix}", unique_tag());
    let guard = TmpDir(tmpdir(&tag)?);
    let dir = guard.0.clone();
    let cli = Netns::new(&format!("nc{tag}c"))?;
    let rtr = Netns::new(&format!("nc{tag}r"))?;
    let srv = Netns::new(&format!("nc{tag}s"))?;
    veth(&cli, "c0", "10.77.0.2/24", &rtr, "r0", "10.77.0.1/24")?;
    veth(&rtr, "r1", "10.78.0.1/24", &srv, "s0", "10.78.0.2/24")?;
    cli.ip(&["route", "add", "default", "via", "10.77.0.1"])?;
    srv.ip(&["route", "add", "default", "via", "10.78.0.1"])?;
    let mut children = Vec::new();
    let mut regions = serde_json::Map::new();
    let mut routes: Vec<(SocketAddr, SocketAddr, SocketAddr, SocketAddr, Delay)> = Vec::new();
    let mut delays = HashMap::new();
    for (id, rtt) in REGION_RTTS_MS {
        let public_ip = format!("10.77.{id}.1");
        rtr.ip(&["addr", "add", &format!("{public_ip}/32"), "dev", "r0"])?;
        let stun_port = 3480 + id as u16;
        let https_port = 4430 + id as u16;
        let stun_log = dir.join(format!("stun{id}.log"));
        children.push(spawn_logged(
            &srv,
            "derpfleet-stun",
            &["--a", &format!("10.78.0.2:{stun_port}")],
            &stun_log,
            "stun",
        )?);
        let certdir = dir.join(format!("certs{id}"));
        let relay_log = dir.join(format!("relay{id}.log"));
        children.push(spawn_logged(
            &srv,
            "derpfleet-relay",
            &[
                "-a",
                &format!("10.78.0.2:{https_port}"),
                "-certmode",
                "manual",
                "-hostname",
                "10.78.0.2",
                "-certdir",
                certdir.to_str().unwrap(),
                "-c",
                dir.join(format!("relay{id}.key")).to_str().unwrap(),
                "-http-port",
                "-1",
                "-stun=false",
            ],
            &relay_log,
            "relay",
        )?);
        routes.push((
            format!("{public_ip}:3478").parse()?,
            format!("10.78.0.2:{stun_port}").parse()?,
            format!("{public_ip}:443").parse()?,
            format!("10.78.0.2:{https_port}").parse()?,
            {
                let d: Delay = Arc::new((rtt * 1000 / 2).into());
                delays.insert(id, d.clone());
                d
            },
        ));
        // Wait for the relay, then pin its self-signed certificate.
        let deadline = Instant::now() + Duration::from_secs(15);
        let cert = certdir.join("10.78.0.2.crt");
        while !cert.exists() {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(relay_log.with_extension("err")).unwrap_or_default();
                bail!("relay {id} wrote no certificate; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        let pin = pin_of(&cert)?;
        regions.insert(
            id.to_string(),
            serde_json::json!({
                "RegionID": id, "RegionCode": format!("r{rtt}"), "RegionName": format!("Region {rtt}ms"),
                "Nodes": [{"Name": format!("{id}a"), "RegionID": id, "HostName": public_ip, "CertName": pin,
                           "IPv4": public_ip, "IPv6": "none"}]
            }),
        );
    }
    let forwarders = NsThread::spawn(rtr.name(), move || async move {
        let mut set = tokio::task::JoinSet::new();
        for (udp_l, udp_u, tcp_l, tcp_u, d) in routes {
            set.spawn(udp_delay(udp_l, udp_u, d.clone()));
            set.spawn(tcp_delay(tcp_l, tcp_u, d));
        }
        match set.join_next().await {
            Some(Ok(r)) => r,
            _ => Ok(()),
        }
    })?;
    let map_path = dir.join("derpmap.json");
    std::fs::write(&map_path, serde_json::json!({ "Regions": regions }).to_string())?;
    for (id, _) in REGION_RTTS_MS {
        wait_for_log(&dir.join(format!("relay{id}.err")), "relay listening", Duration::from_secs(15))?;
    }
    Ok(DelayLab {
        cli,
        _rtr: rtr,
        _srv: srv,
        _children: children,
        _forwarders: forwarders,
        delays,
        map_path,
        _dir: guard,
    })
}

/// The report's latencies are within ±5 ms of the true round trips (best of up to 3 runs: the test
/// machine's 2 cores are shared, and one scheduling hiccup should not fail the lab).
fn assert_latencies(lab: &DelayLab, want_udp: bool) -> Result<Value> {
    let mut last = Value::Null;
    for _ in 0..3 {
        let r = netcheck_in(&lab.cli, &lab.map_path)?;
        assert_eq!(r["UDP"].as_bool(), Some(want_udp), "{r:#}");
        let ok = REGION_RTTS_MS
            .iter()
            .all(|(id, rtt)| latency_ms(&r, *id).is_some_and(|got| (got - *rtt as f64).abs() <= 5.0));
        last = r;
        if ok {
            assert_eq!(last["PreferredDERP"].as_i64(), Some(2), "the 10 ms region: {last:#}");
            return Ok(last);
        }
    }
    panic!("latencies not within ±5 ms of {REGION_RTTS_MS:?}: {last:#}");
}

#[test]
fn three_regions_by_stun_latency_pick_the_fastest() -> Result<()> {
    let lab = delay_lab("a")?;
    let r = assert_latencies(&lab, true)?;
    assert!(r["HTTPSLatencyRegions"].as_array().unwrap().is_empty(), "{r:#}");
    Ok(())
}

#[test]
fn udp_blocked_measures_by_https_and_picks_the_fastest() -> Result<()> {
    let lab = delay_lab("b")?;
    lab.cli.nft(
        "table inet block {\n chain out {\n  type filter hook output priority 0; policy accept;\n  udp dport 3478 drop\n }\n}\n",
    )?;
    let r = assert_latencies(&lab, false)?;
    assert_eq!(r["HTTPSLatencyRegions"].as_array().unwrap().len(), 3, "{r:#}");
    Ok(())
}

/// Acceptance 3 as a lab run: one long-lived netchecker in the client namespace, region delays
/// changed between reports. A region 5 ms faster than the home does not take over; 30 ms does.
#[test]
fn home_region_hysteresis_across_reports() -> Result<()> {
    use derpfleet_client::derpmap::DerpMap;
    use derpfleet_client::netcheck::{NetcheckConfig, Netchecker, Report};
    let lab = delay_lab("h")?;
    let set_rtt = |id: i64, ms: u64| lab.delays[&id].store(ms * 500, std::sync::atomic::Ordering::Relaxed);
    let map = DerpMap::from_json(&std::fs::read(&lab.map_path)?)?;
    let (run_tx, mut run_rx) = mpsc::unbounded_channel::<()>();
    let (rep_tx, rep_rx) = std::sync::mpsc::channel::<Report>();
    let _checker = NsThread::spawn(lab.cli.name(), move || async move {
        let mut nc = Netchecker::bind(NetcheckConfig { https_fallback: false, ..Default::default() }).await?;
        while run_rx.recv().await.is_some() {
            rep_tx.send(nc.run(&map, true, None).await)?;
        }
        Ok(())
    })?;
    let report = |what: &str| -> Result<Report> {
        run_tx.send(())?;
        let r =
            rep_rx.recv_timeout(Duration::from_secs(20)).with_context(|| format!("no report ({what})"))?;
        eprintln!("{what}: home {} latencies {:?}", r.preferred_derp, r.region_latency);
        Ok(r)
    };
    set_rtt(2, 60);
    assert_eq!(report("r1=40 r2=60 r3=80")?.preferred_derp, 1);
    set_rtt(2, 35);
    let r = report("r2 now 35 ms, 5 ms faster")?;
    assert!(r.region_latency[&2] < r.region_latency[&1], "{r:?}");
    assert_eq!(r.preferred_derp, 1, "5 ms faster must not take over: {r:?}");
    set_rtt(2, 10);
    assert_eq!(report("r2 now 10 ms, 30 ms faster")?.preferred_derp, 2);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// NAT lab.

struct NatLab {
    home: Netns,
    _nat: Netns,
    _pub: Netns,
    _children: Vec<Child>,
    map_path: PathBuf,
    _dir: TmpDir,
}

fn nat_lab(suffix: &str, symmetric: bool) -> Result<NatLab> {
    let tag = format!("{}{suffix}", unique_tag());
    let guard = TmpDir(tmpdir(&tag)?);
    let dir = guard.0.clone();
    let home = Netns::new(&format!("nn{tag}h"))?;
    let nat = Netns::new(&format!("nn{tag}n"))?;
    let public = Netns::new(&format!("nn{tag}p"))?;
    veth(&home, "h0", "192.168.1.2/24", &nat, "lan0", "192.168.1.1/24")?;
    veth(&nat, "wan0", "172.30.1.2/24", &public, "p0", "172.30.1.1/24")?;
    home.ip(&["route", "add", "default", "via", "192.168.1.1"])?;
    nat.ip(&["route", "add", "default", "via", "172.30.1.1"])?;
    nat.enable_forwarding()?;
    public.ip(&["addr", "add", "172.30.0.1/32", "dev", "lo"])?;
    public.ip(&["addr", "add", "172.30.0.2/32", "dev", "lo"])?;
    let masq = if symmetric { "masquerade fully-random" } else { "masquerade" };
    nat.nft(&format!(
        "table ip nat {{
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"wan0\" {masq}
  }}
}}
table ip filter {{
  chain forward_chain {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname \"lan0\" oifname \"wan0\" accept
  }}
  chain input_chain {{
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname {{ \"lo\", \"lan0\" }} accept
  }}
}}
"
    ))?;
    let mut children = Vec::new();
    let mut regions = serde_json::Map::new();
    for (id, ip) in [(1i64, "172.30.0.1"), (2, "172.30.0.2")] {
        let log = dir.join(format!("stun{id}.log"));
        children.push(spawn_logged(
            &public,
            "derpfleet-stun",
            &["--a", &format!("{ip}:3478")],
            &log,
            "stun",
        )?);
        regions.insert(
            id.to_string(),
            serde_json::json!({"RegionID": id, "RegionCode": format!("s{id}"), "RegionName": format!("STUN {id}"),
                "Nodes": [{"Name": format!("{id}a"), "RegionID": id, "HostName": ip, "IPv4": ip, "IPv6": "none",
                           "STUNOnly": true}]}),
        );
    }
    let map_path = dir.join("derpmap.json");
    std::fs::write(&map_path, serde_json::json!({ "Regions": regions }).to_string())?;
    // The STUN servers bind at once; give them a moment to be scheduled.
    std::thread::sleep(Duration::from_millis(300));
    Ok(NatLab { home, _nat: nat, _pub: public, _children: children, map_path, _dir: guard })
}

#[test]
fn symmetric_nat_mapping_varies_by_dest_ip() -> Result<()> {
    let lab = nat_lab("y", true)?;
    let r = netcheck_in(&lab.home, &lab.map_path)?;
    assert_eq!(r["UDP"].as_bool(), Some(true), "{r:#}");
    assert_eq!(r["MappingVariesByDestIP"].as_bool(), Some(true), "{r:#}");
    assert!(r["GlobalV4"].as_str().unwrap().starts_with("172.30.1.2:"), "{r:#}");
    Ok(())
}

#[test]
fn endpoint_independent_nat_mapping_is_stable_and_global_v4_is_the_nat() -> Result<()> {
    let lab = nat_lab("e", false)?;
    let r = netcheck_in(&lab.home, &lab.map_path)?;
    assert_eq!(r["UDP"].as_bool(), Some(true), "{r:#}");
    assert_eq!(r["MappingVariesByDestIP"].as_bool(), Some(false), "{r:#}");
    let g: SocketAddr = r["GlobalV4"].as_str().unwrap().parse()?;
    assert_eq!(g.ip().to_string(), "172.30.1.2", "{r:#}");
    // Both servers saw the same mapping.
    assert_eq!(r["GlobalV4Counters"].as_object().unwrap().len(), 1, "{r:#}");
    Ok(())
}
