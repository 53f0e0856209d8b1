//! netcheck labs in network namespaces.
//!
//! Delay lab: `cli` (the client) ↔ `rtr` ↔ `srv`. `srv` runs, per region, a `derpfleet-stun`
//! responder and a `derpfleet-relay` (manual cert mode, self-signed IP certificate pinned with
//! `sha256-raw`). `rtr` owns one "public" address per region and runs a delaying UDP+TCP
//! forwarder ([`derpfleet_e2e::delay`]; `tc netem` is missing in this kernel) that holds every packet or
//! byte chunk for half the region's round trip in each direction. So the client sees three regions
//! at true round trips of 10, 40 and 80 ms, by STUN and by HTTPS alike.
//!
//! NAT lab (test-lab.md §3): `home` ↔ `nat` ([`derpfleet_e2e::natlab`]: nftables masquerade,
//! endpoint-independent or `fully-random` = symmetric) ↔ `pub`, where two STUN servers listen on two
//! addresses.
//!
//! Each test builds its own namespaces (names carry the pid and a per-test suffix) and removes them
//! on drop, with every process inside.

use std::collections::HashMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use derpfleet_e2e::delay::{spawn_delayers, Delay, DelayedRoute};
use derpfleet_e2e::natlab::{router_rules, Nat, NatHome};
use derpfleet_e2e::netns::{unique_tag, veth, Netns};
use derpfleet_e2e::nsthread::NsThread;
use derpfleet_e2e::relay::{wait_cert, wait_listening, RelayCmd};
use derpfleet_e2e::scratch::ScratchDir;
use derpfleet_e2e::{bin_path, lab_bin, Child};
use serde_json::Value;
use tokio::sync::mpsc;

/// Starts `derpfleet-stun --a addr` in `ns`, logging to `log`.
fn spawn_stun(ns: &Netns, addr: &str, log: &Path) -> Result<Child> {
    let mut cmd = ns.command(lab_bin("derpfleet-stun"));
    cmd.args(["--a", addr]);
    Child::spawn_logged(cmd, log, "stun")
}

/// SHA-256 of the DER certificate in a PEM file, as a `sha256-raw:` CertName.
fn pin_of(pem_path: &Path) -> Result<String> {
    let mut rd =
        std::io::BufReader::new(File::open(pem_path).with_context(|| pem_path.display().to_string())?);
    let der = rustls_pemfile::certs(&mut rd).next().context("no certificate in PEM")??;
    use sha2::Digest;
    Ok(format!("sha256-raw:{}", hex::encode(sha2::Sha256::digest(der.as_ref()))))
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
    _dir: ScratchDir,
}

const REGION_RTTS_MS: [(i64, u64); 3] = [(1, 40), (2, 10), (3, 80)];

fn delay_lab(suffix: &str) -> Result<DelayLab> {
    let tag = format!("{}{suffix}", unique_tag());
    let dir = ScratchDir::new(&format!("derpfleet-netcheck-{tag}"))?;
    let cli = Netns::new(&format!("nc{tag}c"))?;
    let rtr = Netns::new(&format!("nc{tag}r"))?;
    let srv = Netns::new(&format!("nc{tag}s"))?;
    veth(&cli, "c0", "10.77.0.2/24", &rtr, "r0", "10.77.0.1/24")?;
    veth(&rtr, "r1", "10.78.0.1/24", &srv, "s0", "10.78.0.2/24")?;
    cli.ip(&["route", "add", "default", "via", "10.77.0.1"])?;
    srv.ip(&["route", "add", "default", "via", "10.78.0.1"])?;
    let mut children = Vec::new();
    let mut regions = serde_json::Map::new();
    let mut routes = Vec::new();
    let mut delays = HashMap::new();
    for (id, rtt) in REGION_RTTS_MS {
        let public_ip = format!("10.77.{id}.1");
        rtr.ip(&["addr", "add", &format!("{public_ip}/32"), "dev", "r0"])?;
        let stun_port = 3480 + id as u16;
        let https_port = 4430 + id as u16;
        children.push(spawn_stun(
            &srv,
            &format!("10.78.0.2:{stun_port}"),
            &dir.join(format!("stun{id}.log")),
        )?);
        let relay = format!("relay{id}");
        children.push(
            RelayCmd::new(Some(&srv), dir.path(), &relay)
                .args(["-a", &format!("10.78.0.2:{https_port}"), "-stun=false"])
                .self_signed_tls("10.78.0.2")
                .spawn()?,
        );
        let one_way: Delay = Arc::new((rtt * 1000 / 2).into());
        delays.insert(id, one_way.clone());
        routes.push(DelayedRoute {
            udp: (format!("{public_ip}:3478").parse()?, format!("10.78.0.2:{stun_port}").parse()?),
            tcp: (format!("{public_ip}:443").parse()?, format!("10.78.0.2:{https_port}").parse()?),
            one_way,
        });
        // Wait for the relay, then pin its self-signed certificate.
        let cert = wait_cert(dir.path(), &relay, "10.78.0.2", Duration::from_secs(15))?;
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
    let forwarders = spawn_delayers(rtr.name(), routes)?;
    let map_path = dir.join("derpmap.json");
    std::fs::write(&map_path, serde_json::json!({ "Regions": regions }).to_string())?;
    for (id, _) in REGION_RTTS_MS {
        wait_listening(dir.path(), &format!("relay{id}"), Duration::from_secs(15))?;
    }
    Ok(DelayLab {
        cli,
        _rtr: rtr,
        _srv: srv,
        _children: children,
        _forwarders: forwarders,
        delays,
        map_path,
        _dir: dir,
    })
}

/// How far above the true round trip a measured latency may be: 8 ms or a quarter of the round trip,
/// whichever is more. The lab's delay is exact, so a latency can never be below it (2 ms slack for
/// timer granularity); above it sits the client's and the relay's own work (the TLS records of an
/// HTTPS probe), which grows when the test machine's 2 cores are busy with other tests. The window
/// still catches a probe that counts two round trips instead of one (20 ms for the 10 ms region).
fn latency_window_ms(rtt: u64) -> (f64, f64) {
    let rtt = rtt as f64;
    (rtt - 2.0, rtt + (rtt / 4.0).max(8.0))
}

/// Each region's best latency over up to 3 reports (netcheck itself keeps the best of recent
/// reports) lies in [`latency_window_ms`] of its true round trip, and the 10 ms region is home.
fn assert_latencies(lab: &DelayLab, want_udp: bool) -> Result<Value> {
    let mut best: HashMap<i64, f64> = HashMap::new();
    let mut last = Value::Null;
    for _ in 0..3 {
        let r = netcheck_in(&lab.cli, &lab.map_path)?;
        assert_eq!(r["UDP"].as_bool(), Some(want_udp), "{r:#}");
        for (id, _) in REGION_RTTS_MS {
            if let Some(got) = latency_ms(&r, id) {
                best.entry(id).and_modify(|b| *b = b.min(got)).or_insert(got);
            }
        }
        last = r;
        let ok = REGION_RTTS_MS.iter().all(|(id, rtt)| {
            let (lo, hi) = latency_window_ms(*rtt);
            best.get(id).is_some_and(|got| (lo..=hi).contains(got))
        });
        if ok {
            assert_eq!(last["PreferredDERP"].as_i64(), Some(2), "the 10 ms region: {last:#}");
            return Ok(last);
        }
    }
    panic!("best latencies {best:?} not within the windows of {REGION_RTTS_MS:?}; last report: {last:#}");
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
    _dir: ScratchDir,
}

fn nat_lab(suffix: &str, symmetric: bool) -> Result<NatLab> {
    let tag = format!("{}{suffix}", unique_tag());
    let dir = ScratchDir::new(&format!("derpfleet-netcheck-{tag}"))?;
    let public = Netns::new(&format!("nn{tag}p"))?;
    public.ip(&["addr", "add", "172.30.0.1/32", "dev", "lo"])?;
    public.ip(&["addr", "add", "172.30.0.2/32", "dev", "lo"])?;
    let nat = if symmetric { Nat::Symmetric } else { Nat::EndpointIndependent };
    let site = NatHome::new(&format!("nn{tag}"), "", 1, "172.30", &public, &router_rules(nat, ""))?;
    let mut children = Vec::new();
    let mut regions = serde_json::Map::new();
    for (id, ip) in [(1i64, "172.30.0.1"), (2, "172.30.0.2")] {
        children.push(spawn_stun(&public, &format!("{ip}:3478"), &dir.join(format!("stun{id}.log")))?);
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
    Ok(NatLab { home: site.home, _nat: site.router, _pub: public, _children: children, map_path, _dir: dir })
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
