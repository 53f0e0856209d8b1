//! Interop: `derpfleet-client up` completes a WireGuard handshake with a
//! Debian `wireguard-go` peer on a direct UDP path (static endpoint, no disco) and pings through it
//! in both directions.
//!
//! Two namespaces joined by a veth (10.201.0.1 ↔ 10.201.0.2); tunnel addresses 100.64.0.1/.2.
//! wireguard-go runs in the foreground (`-f`, killed by PID) with an interface name unique to this
//! process, because its UAPI socket directory `/var/run/wireguard` is shared by all namespaces.

use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use derpfleet_e2e::netns::{unique_tag, veth, Netns};
use derpfleet_e2e::node::{keygen, LabNode};
use derpfleet_e2e::scratch::ScratchDir;
use derpfleet_e2e::traffic::{iperf3_mbps, ping};
use derpfleet_e2e::wireguard_go::{spawn_wireguard_go, uapi_socket, wg};
use derpfleet_e2e::{wait_for, Child};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn b64_to_hex(s: &str) -> Result<String> {
    Ok(hex::encode(B64.decode(s.trim())?))
}

fn hex_to_b64(s: &str) -> Result<String> {
    Ok(B64.encode(hex::decode(s)?))
}

#[test]
fn handshakes_and_pings_a_wireguard_go_peer() -> Result<()> {
    let tag = unique_tag();
    let mut dir = ScratchDir::new(&format!("derpfleet-wgi-{tag}"))?;
    let wg_if = format!("wgi{tag}");
    dir.also_remove(uapi_socket(&wg_if));
    let a = Netns::new(&format!("wi{tag}a"))?;
    let b = Netns::new(&format!("wi{tag}b"))?;
    veth(&a, "va", "10.201.0.1/24", &b, "vb", "10.201.0.2/24")?;

    // Keys: ours from keygen (hex), wireguard-go's from wg genkey (base64).
    let [our_priv, _, our_pub, _] = keygen()?;
    let our_pub_b64 = hex_to_b64(our_pub.strip_prefix("nodekey:").context("nodekey prefix")?)?;
    let wg_priv = wg(&["genkey"], None)?;
    let wg_pub = wg(&["pubkey"], Some(&wg_priv))?;
    let wg_key_file = dir.join("wg.key");
    std::fs::write(&wg_key_file, &wg_priv)?;

    // wireguard-go in namespace b.
    let _wg_go = spawn_wireguard_go(&b, &wg_if, &dir.join("wg.log"))?;
    b.exec(
        "wg",
        &[
            "set",
            &wg_if,
            "listen-port",
            "51820",
            "private-key",
            wg_key_file.to_str().context("utf-8 path")?,
            "peer",
            &our_pub_b64,
            "allowed-ips",
            "100.64.0.1/32",
            "endpoint",
            "10.201.0.1:41641",
        ],
    )?;
    b.ip(&["addr", "add", "100.64.0.2/24", "dev", &wg_if])?;
    b.ip(&["link", "set", &wg_if, "up"])?;

    // Our node in namespace a. The DERP map points at a closed port: DERP stays down, which also
    // shows the direct static path does not depend on it.
    let map = r#"{"Regions":{"900":{"RegionID":900,"RegionCode":"none","Nodes":[{"Name":"x","RegionID":900,"HostName":"127.0.0.1","IPv4":"127.0.0.1","IPv6":"none","DERPPort":1,"InsecureForTests":true}]}}}"#;
    std::fs::write(dir.join("derpmap.json"), map)?;
    let control = derpfleet_e2e::node::control_path(dir.path(), 0);
    let cfg = format!(
        "private_key = \"{our_priv}\"\nlisten_port = 41641\nderp_map = \"derpmap.json\"\nhome_region = 900\n\
         control = \"{}\"\n[tun]\nname = \"df{tag}\"\naddresses = [\"100.64.0.1/24\"]\n[[peer]]\n\
         public_key = \"nodekey:{}\"\nallowed_ips = [\"100.64.0.2/32\"]\nendpoint = \"10.201.0.2:51820\"\n",
        control.display(),
        b64_to_hex(&wg_pub)?,
    );
    let node = LabNode::start(&a, dir.path(), 0, &cfg)?;
    wait_for(Duration::from_secs(5), Duration::from_millis(20), || control.exists().then_some(()))
        .with_context(|| format!("node did not start: {}", node.log()))?;

    assert_eq!(ping(&a, "100.64.0.2", 3, "0.2")?, 3, "node -> wireguard-go\nnode log:\n{}", node.log());
    assert_eq!(ping(&b, "100.64.0.1", 3, "0.2")?, 3, "wireguard-go -> node");
    let hs = b.exec("wg", &["show", &wg_if, "latest-handshakes"])?;
    let secs: u64 = hs.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(secs > 0, "wireguard-go saw no handshake: {hs}");
    let st = node.status()?;
    assert_eq!(st["peers"][0]["path"], "direct 10.201.0.2:51820", "{st:#}");
    assert!(st["peers"][0]["last_handshake_secs"].as_f64().is_some(), "{st:#}");
    assert_eq!(st["peers"][0]["derp_tx_packets"], 0, "{st:#}");
    Ok(())
}

/// Starts wireguard-go as `ifname` in `ns` with `key_file`, peer `peer_pub` at `endpoint`.
fn start_wg_go(
    ns: &Netns,
    ifname: &str,
    key_file: &std::path::Path,
    port: &str,
    peer: (&str, &str, &str),
    addr: &str,
    log: &std::path::Path,
) -> Result<Child> {
    let child = spawn_wireguard_go(ns, ifname, log)?;
    let (peer_pub, allowed, endpoint) = peer;
    let key = key_file.to_str().context("utf-8 path")?;
    ns.exec("wg", &["set", ifname, "listen-port", port, "private-key", key, "peer", peer_pub])?;
    ns.exec("wg", &["set", ifname, "peer", peer_pub, "allowed-ips", allowed, "endpoint", endpoint])?;
    ns.ip(&["addr", "add", addr, "dev", ifname])?;
    ns.ip(&["link", "set", ifname, "up"])?;
    Ok(child)
}

/// The wireguard-go baseline for BENCHMARKS.md (ignored by default): two wireguard-go peers on a
/// veth, iperf3 TCP through the tunnel, three 5 s runs.
#[test]
#[ignore]
fn throughput_wireguard_go_baseline() -> Result<()> {
    let tag = unique_tag();
    let mut dir = ScratchDir::new(&format!("derpfleet-wgb-{tag}"))?;
    let a = Netns::new(&format!("wb{tag}a"))?;
    let b = Netns::new(&format!("wb{tag}b"))?;
    veth(&a, "va", "10.201.0.1/24", &b, "vb", "10.201.0.2/24")?;
    let keys = [wg(&["genkey"], None)?, wg(&["genkey"], None)?];
    let pubs = [wg(&["pubkey"], Some(&keys[0]))?, wg(&["pubkey"], Some(&keys[1]))?];
    // Peer `a` is 10.201.0.1 / 100.64.0.1, `b` .2; each points at the other.
    let mut _wg_go = Vec::new();
    for (i, (ns, side)) in [(&a, "a"), (&b, "b")].into_iter().enumerate() {
        let (me, other) = (i + 1, 2 - i);
        let ifname = format!("wg{side}{tag}");
        dir.also_remove(uapi_socket(&ifname));
        let key = dir.join(format!("{side}.key"));
        std::fs::write(&key, &keys[i])?;
        let (allowed, endpoint) = (format!("100.64.0.{other}/32"), format!("10.201.0.{other}:51820"));
        _wg_go.push(start_wg_go(
            ns,
            &ifname,
            &key,
            "51820",
            (&pubs[1 - i], &allowed, &endpoint),
            &format!("100.64.0.{me}/24"),
            &dir.join(format!("{side}.log")),
        )?);
    }
    assert_eq!(ping(&a, "100.64.0.2", 2, "0.2")?, 2);
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(iperf3_mbps(&b, &a, "100.64.0.2", 5)?);
    }
    runs.sort_by(f64::total_cmp);
    eprintln!("BENCH wireguard-go direct: runs {runs:.0?} Mbit/s, median {:.0}", runs[1]);
    Ok(())
}
