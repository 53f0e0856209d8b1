//! `derpfleet-probe -once -json` against real relays: two live regions (one with two meshed nodes)
//! and a dead one; and a hanging node that must not delay anyone else's probes.

mod common;

use std::collections::BTreeSet;
use std::net::{TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use common::Fleet;
use serde_json::Value;

fn probes(doc: &Value) -> &Vec<Value> {
    doc["probes"].as_array().expect("probes array")
}

#[test]
fn once_json_dead_region_bad_live_regions_good_and_mesh_both_ways() {
    let fleet = Fleet::start("once");
    let (out, doc) = fleet.probe_once_json(&[
        "-interval",
        "4s",
        "-mesh-interval",
        "4s",
        "-stun-interval",
        "3s",
        "-tls-interval",
        "3s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit 1 with a dead region; stderr:\n{stderr}");
    let probes = probes(&doc);
    let names: BTreeSet<&str> = probes.iter().map(|p| p["name"].as_str().unwrap()).collect();
    let want = [
        "derp/one/1a/derp",
        "derp/one/1a/tls",
        "derp/one/1a/stun",
        "derp/one/1b/derp",
        "derp/one/1b/tls",
        "derp/one/1b/stun",
        "derp/one/1a/1b/mesh",
        "derp/one/1b/1a/mesh",
        "derp/two/2a/derp",
        "derp/two/2a/tls",
        "derp/two/2a/stun",
        "derp/dead/3a/derp",
        "derp/dead/3a/tls",
        "derp/dead/3a/stun",
    ];
    assert_eq!(names, want.into_iter().collect(), "exactly the planned probes");
    for p in probes {
        for field in ["name", "class", "region", "node", "ok", "latency_ms", "error", "at"] {
            assert!(p.get(field).is_some(), "{field} missing in {p}");
        }
        let name = p["name"].as_str().unwrap();
        let at = p["at"].as_str().unwrap();
        assert!(at.ends_with('Z') && at.len() == 24, "RFC 3339 time: {at}");
        if p["region"] == "dead" {
            assert_eq!(p["ok"], false, "{name} must be bad: {p}");
            let err = p["error"].as_str().unwrap_or_default();
            assert!(!err.is_empty(), "{name} carries its error");
            assert!(p["latency_ms"].is_null(), "{name}: no latency when bad");
        } else {
            assert_eq!(p["ok"], true, "{name} must be good: {p}\nstderr:\n{stderr}");
            assert!(p["error"].is_null(), "{name}: {p}");
            let ms = p["latency_ms"].as_f64().unwrap();
            assert!(ms > 0.0, "{name} latency {ms}");
        }
    }
    let by_name = |n: &str| probes.iter().find(|p| p["name"] == n).unwrap();
    for (name, from, to) in [("derp/one/1a/1b/mesh", "1a", "1b"), ("derp/one/1b/1a/mesh", "1b", "1a")] {
        let p = by_name(name);
        assert_eq!(
            (p["class"].as_str(), p["node"].as_str(), p["peer"].as_str()),
            (Some("mesh"), Some(from), Some(to))
        );
        assert_eq!(p["ok"], true);
    }
    let tls = by_name("derp/one/1a/tls");
    assert!(tls["cert_days_left"].as_f64().unwrap() > 300.0, "rcgen leaf valid for years: {tls}");
    let dead_derp = by_name("derp/dead/3a/derp")["error"].as_str().unwrap().to_string();
    assert!(dead_derp.contains("refused") || dead_derp.contains("reach"), "{dead_derp}");
    let dead_stun = by_name("derp/dead/3a/stun")["error"].as_str().unwrap().to_string();
    assert!(dead_stun.contains("no STUN answer") || dead_stun.contains("timed out"), "{dead_stun}");

    // The region filter: only region two, all good, exit 0; the text output names each probe.
    let out = fleet
        .prober()
        .args(["-derp-map", &fleet.map_url(), "-once", "-region-code", "two"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines.iter().all(|l| l.starts_with("good: derp/two/2a/")), "{text}");

    // Bandwidth and queuing-delay probes through the single-node region.
    let (out, doc) = fleet.probe_once_json(&[
        "-region-code",
        "two",
        "-interval",
        "3s",
        "-bw-interval",
        "3s",
        "-bw-probe-size-bytes",
        "300000",
        "-qd-packets-per-second",
        "20",
        "-qd-packet-timeout",
        "500ms",
    ]);
    assert_eq!(out.status.code(), Some(0), "{doc}");
    let two = doc["probes"].as_array().unwrap();
    let bw = two.iter().find(|p| p["name"] == "derp/two/2a/bw").expect("bw probe");
    assert_eq!(bw["class"], "bw");
    assert!(bw["bytes_per_second"].as_f64().unwrap() > 0.0, "{bw}");
    let qd = two.iter().find(|p| p["name"] == "derp/two/2a/qd").expect("qd probe");
    assert_eq!((qd["class"].as_str(), qd["ok"].as_bool()), (Some("qd"), Some(true)), "{qd}");
}

#[test]
fn hanging_node_costs_only_its_own_probes_their_timeout() {
    let fleet = Fleet::start("hang");
    // A node that accepts TCP (the kernel completes the handshake) but never speaks TLS, and a
    // STUN port that swallows requests: every probe of it can only end by its timeout.
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (tp, up) = (tcp.local_addr().unwrap().port(), udp.local_addr().unwrap().port());
    let map: Value = serde_json::from_slice(&std::fs::read(&fleet.map_path).unwrap()).unwrap();
    let mut map = map;
    map["Regions"]["4"] = serde_json::json!({"RegionID":4,"RegionCode":"hang","Nodes":[
        {"Name":"4a","RegionID":4,"HostName":"127.0.0.1","IPv4":"127.0.0.1","IPv6":"none","DERPPort":tp,"STUNPort":up},
        {"Name":"4b","RegionID":4,"HostName":"127.0.0.1","IPv4":"127.0.0.1","IPv6":"none","DERPPort":tp,"STUNPort":up}]});
    map["Regions"].as_object_mut().unwrap().remove("3");
    std::fs::write(&fleet.map_path, serde_json::to_vec(&map).unwrap()).unwrap();

    // Interval 10s: each probe's timeout is 8 s.
    let started = Instant::now();
    let (out, doc) = fleet.probe_once_json(&[
        "-interval",
        "10s",
        "-mesh-interval",
        "10s",
        "-stun-interval",
        "10s",
        "-tls-interval",
        "10s",
    ]);
    let wall = started.elapsed();
    assert_eq!(out.status.code(), Some(1));
    let probes = probes(&doc);
    let hung: Vec<&Value> = probes.iter().filter(|p| p["region"] == "hang").collect();
    assert_eq!(hung.len(), 8, "derp, tls, stun per node and two mesh probes: {hung:?}");
    for p in &hung {
        assert_eq!(p["ok"], false, "{p}");
        assert!(
            p["error"].as_str().unwrap().contains("timed out after 8s")
                || p["error"].as_str().unwrap().contains("no STUN answer within 8s"),
            "{p}"
        );
    }
    let good: Vec<&Value> = probes.iter().filter(|p| p["region"] != "hang").collect();
    assert_eq!(good.len(), 11);
    // Every live probe finished long before the hanging node's first timeout ran out: they ran
    // beside the hung ones, not after them.
    let first_hung_end = hung.iter().map(|p| p["at"].as_str().unwrap().to_string()).min().unwrap();
    for p in &good {
        assert_eq!(p["ok"], true, "{p}");
        assert!(
            p["at"].as_str().unwrap() < first_hung_end.as_str(),
            "{} ended after the hung probes: {p}",
            p["name"]
        );
    }
    // All eight hung probes together cost one timeout, not eight.
    assert!(wall < Duration::from_secs(8 * 2), "a -once run took {wall:?}");
    assert!(wall >= Duration::from_secs(8), "the hung probes did wait for their timeout ({wall:?})");
    drop((tcp, udp));
}

#[test]
fn tls_probe_reports_days_left_and_fails_within_seven_days_of_expiry() {
    let fleet = Fleet::start_with_cert_days("certs", [Some(3), Some(20), None]);
    let (out, doc) =
        fleet.probe_once_json(&["-region-code", "one", "-interval", "4s", "-tls-interval", "3s"]);
    assert_eq!(out.status.code(), Some(1), "{doc}");
    let probes = probes(&doc);
    let by_name = |n: &str| probes.iter().find(|p| p["name"] == n).unwrap_or_else(|| panic!("{n} in {doc}"));
    let soon = by_name("derp/one/1a/tls");
    assert_eq!(soon["ok"], false, "{soon}");
    let err = soon["error"].as_str().unwrap();
    assert!(err.contains("certificate expires in 3.0 days") || err.contains("expires in 2.9 days"), "{err}");
    let later = by_name("derp/one/1b/tls");
    assert_eq!(later["ok"], true, "{later}");
    let days = later["cert_days_left"].as_f64().unwrap();
    assert!((19.9..=20.01).contains(&days), "{days}");
    // The certificate still verifies, so DERP itself works on both nodes.
    assert_eq!(by_name("derp/one/1a/derp")["ok"], true);
    assert_eq!(by_name("derp/one/1b/derp")["ok"], true);
}

#[test]
fn bad_flags_exit_2_and_a_bad_map_names_the_file_and_field() {
    let bin = common::bin("derpfleet-probe");
    let out = std::process::Command::new(&bin).args(["-once", "-interval", "soon"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("-interval") && !err.contains("--interval") && err.contains("invalid duration"),
        "{err}"
    );
    let out = std::process::Command::new(&bin).arg("-no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-no-such-flag"));

    let dir = common::temp_dir("badmap");
    let map = dir.path().join("map.json");
    std::fs::write(
        &map,
        r#"{"Regions":{"1":{"RegionID":1,"Nodes":[{"Name":"1a","RegionID":1,"HostName":""}]}}}"#,
    )
    .unwrap();
    let out = std::process::Command::new(&bin)
        .args(["-once", "-json", "-derp-map", &format!("file://{}", map.display())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&map.display().to_string()) && err.contains("HostName is empty"), "{err}");
    assert!(out.stdout.is_empty(), "no JSON for a map that cannot be read");
}

#[test]
fn mesh_psk_file_gets_the_prober_past_an_allowlist() {
    // Every relay admits nobody but mesh-key holders.
    let fleet = Fleet::start_custom("allow", [None; 3], true);
    let flags = [
        "-region-code",
        "one",
        "-interval",
        "4s",
        "-mesh-interval",
        "4s",
        "-stun-interval",
        "0",
        "-tls-interval",
        "0",
    ];
    let (out, doc) = fleet.probe_once_json(&flags);
    assert_eq!(out.status.code(), Some(1), "{doc}");
    for p in probes(&doc) {
        assert_eq!(p["ok"], false, "refused without the key: {p}");
    }
    let key = fleet.mesh_key_path();
    let mut with_key = flags.to_vec();
    with_key.extend(["-mesh-psk-file", key.to_str().unwrap()]);
    let (out, doc) = fleet.probe_once_json(&with_key);
    assert_eq!(out.status.code(), Some(0), "{doc}");
    let names: BTreeSet<&str> = probes(&doc).iter().map(|p| p["name"].as_str().unwrap()).collect();
    let want = ["derp/one/1a/1b/mesh", "derp/one/1a/derp", "derp/one/1b/1a/mesh", "derp/one/1b/derp"];
    assert_eq!(names, want.into_iter().collect());
}

#[test]
fn stun_probes_each_family_the_node_has() {
    // A STUN-only node on IPv6 loopback (the standalone responder) with IPv4 disabled in the map:
    // one stun6 probe, no IPv4 probe, no DERP probes. (The IPv4-only nodes of the other tests get
    // no stun6 probe.)
    let port6 = derpfleet_e2e::ports::unused_port_on(&[std::net::Ipv6Addr::LOCALHOST.into()]);
    let responder = std::process::Command::new(common::bin("derpfleet-stun"))
        .args(["-a", &format!("[::1]:{port6}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _responder = common::Proc { child: responder, what: "derpfleet-stun".into() };
    let dir = common::temp_dir("stun6");
    let map = dir.path().join("map.json");
    let json = serde_json::json!({"Regions":{"7":{"RegionID":7,"RegionCode":"six","Nodes":[
        {"Name":"7s","RegionID":7,"HostName":"::1","IPv4":"none","STUNPort":port6,"STUNOnly":true}]}}});
    std::fs::write(&map, serde_json::to_vec(&json).unwrap()).unwrap();
    let started = Instant::now();
    loop {
        let out = std::process::Command::new(common::bin("derpfleet-probe"))
            .args([
                "-derp-map",
                &format!("file://{}", map.display()),
                "-once",
                "-json",
                "-stun-interval",
                "2s",
            ])
            .output()
            .unwrap();
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = probes(&doc).iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["derp/six/7s/stun6"], "IPv6 only, no DERP probes for a STUN-only node");
        if out.status.code() == Some(0) {
            let p = &probes(&doc)[0];
            assert_eq!((p["class"].as_str(), p["ok"].as_bool()), (Some("stun"), Some(true)));
            break;
        }
        // The responder may still be starting.
        assert!(started.elapsed() < Duration::from_secs(15), "stun6 never good: {doc}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
