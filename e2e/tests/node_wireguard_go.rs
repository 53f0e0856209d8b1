//! Interop: `derpfleet-client up` completes a WireGuard handshake with a
//! Debian `wireguard-go` peer on a direct UDP path (static endpoint, no disco) and pings through it
//! in both directions.
//!
//! Two namespaces joined by a veth (10.201.0.1 ↔ 10.201.0.2); tunnel addresses 100.64.0.1/.2.
//! wireguard-go runs in the foreground (`-f`, killed by PID) with an interface name unique to this
//! process, because its UAPI socket directory `/var/run/wireguard` is shared by all namespaces.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use derpfleet_e2e::netns::{unique_tag, veth, Netns};
use derpfleet_e2e::{bin_path, Child};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

struct Cleanup(Vec<PathBuf>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A workspace binary; `NODE_LAB_BIN_DIR` overrides the test's profile directory.
fn bin(name: &str) -> PathBuf {
    match std::env::var_os("NODE_LAB_BIN_DIR") {
        Some(d) => PathBuf::from(d).join(name),
        None => bin_path(name),
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// `wg genkey` / `wg pubkey` via the CLI (base64 text).
fn wg(args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut c = std::process::Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running wg (apt wireguard-tools)")?;
    if let Some(s) = stdin {
        c.stdin.take().expect("piped").write_all(s.as_bytes())?;
    }
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!("wg {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn b64_to_hex(s: &str) -> Result<String> {
    Ok(hex::encode(B64.decode(s.trim())?))
}

fn hex_to_b64(s: &str) -> Result<String> {
    Ok(B64.encode(hex::decode(s)?))
}

fn ping(ns: &Netns, dst: &str, count: u32) -> Result<u32> {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "ping",
            "-n",
            "-q",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            dst,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find_map(|l| {
            l.split(", ").find(|p| p.ends_with("received")).and_then(|p| p.split(' ').next()?.parse().ok())
        })
        .unwrap_or(0))
}

#[test]
fn handshakes_and_pings_a_wireguard_go_peer() -> Result<()> {
    let tag = unique_tag();
    let dir = std::env::temp_dir().join(format!("derpfleet-wgi-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let wg_if = format!("wgi{tag}");
    let mut cleanup = Cleanup(vec![dir.clone()]);
    cleanup.0.push(PathBuf::from(format!("/var/run/wireguard/{wg_if}.sock")));
    let a = Netns::new(&format!("wi{tag}a"))?;
    let b = Netns::new(&format!("wi{tag}b"))?;
    veth(&a, "va", "10.201.0.1/24", &b, "vb", "10.201.0.2/24")?;

    // Keys: ours from keygen (hex), wireguard-go's from wg genkey (base64).
    let out = std::process::Command::new(bin("derpfleet-client")).arg("keygen").output()?;
    let text = String::from_utf8(out.stdout)?;
    let vals: Vec<&str> = text.lines().filter_map(|l| l.split('"').nth(1)).collect();
    if vals.len() != 4 {
        bail!("`derpfleet-client keygen` failed (built without the `node` feature?): {text}");
    }
    let (our_priv, our_pub) = (vals[0], vals[2]);
    let our_pub_b64 = hex_to_b64(our_pub.strip_prefix("nodekey:").context("nodekey prefix")?)?;
    let wg_priv = wg(&["genkey"], None)?;
    let wg_pub = wg(&["pubkey"], Some(&wg_priv))?;
    let wg_key_file = dir.join("wg.key");
    std::fs::write(&wg_key_file, &wg_priv)?;

    // wireguard-go in namespace b.
    let mut cmd = b.command("wireguard-go");
    cmd.arg("-f").arg(&wg_if).stdout(File::create(dir.join("wg.log"))?).stderr(Stdio::null());
    let _wg_go = Child::spawn(cmd, "wireguard-go")?;
    let sock = PathBuf::from(format!("/var/run/wireguard/{wg_if}.sock"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("wireguard-go made no UAPI socket: {}", read(&dir.join("wg.log")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    b.exec(
        "wg",
        &[
            "set",
            &wg_if,
            "listen-port",
            "51820",
            "private-key",
            wg_key_file.to_str().unwrap(),
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
    let control = dir.join("node.sock");
    let cfg = format!(
        "private_key = \"{our_priv}\"\nlisten_port = 41641\nderp_map = \"derpmap.json\"\nhome_region = 900\n\
         control = \"{}\"\n[tun]\nname = \"df{tag}\"\naddresses = [\"100.64.0.1/24\"]\n[[peer]]\n\
         public_key = \"nodekey:{}\"\nallowed_ips = [\"100.64.0.2/32\"]\nendpoint = \"10.201.0.2:51820\"\n",
        control.display(),
        b64_to_hex(&wg_pub)?,
    );
    std::fs::write(dir.join("node.toml"), cfg)?;
    let mut cmd = a.command(bin("derpfleet-client"));
    cmd.args(["up", "--config", dir.join("node.toml").to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(File::create(dir.join("node.log"))?)
        .stderr(File::create(dir.join("node.err"))?);
    let _node = Child::spawn(cmd, "node")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !control.exists() {
        if Instant::now() > deadline {
            bail!("node did not start: {}", read(&dir.join("node.err")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    assert_eq!(
        ping(&a, "100.64.0.2", 3)?,
        3,
        "node -> wireguard-go\nnode log:\n{}",
        read(&dir.join("node.err"))
    );
    assert_eq!(ping(&b, "100.64.0.1", 3)?, 3, "wireguard-go -> node");
    let hs = b.exec("wg", &["show", &wg_if, "latest-handshakes"])?;
    let secs: u64 = hs.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(secs > 0, "wireguard-go saw no handshake: {hs}");
    let st = std::process::Command::new(bin("derpfleet-client"))
        .args(["status", "--json", "--control", control.to_str().unwrap()])
        .output()?;
    let st: serde_json::Value = serde_json::from_slice(&st.stdout)?;
    assert_eq!(st["peers"][0]["path"], "direct 10.201.0.2:51820", "{st:#}");
    assert!(st["peers"][0]["last_handshake_secs"].as_f64().is_some(), "{st:#}");
    assert_eq!(st["peers"][0]["derp_tx_packets"], 0, "{st:#}");
    Ok(())
}

/// Starts wireguard-go as `ifname` in `ns` with `key_file`, peer `peer_pub` at `endpoint`.
fn start_wg_go(
    ns: &Netns,
    ifname: &str,
    key_file: &Path,
    port: &str,
    peer: (&str, &str, &str),
    addr: &str,
    log: &Path,
) -> Result<Child> {
    let mut cmd = ns.command("wireguard-go");
    cmd.arg("-f").arg(ifname).stdout(File::create(log)?).stderr(Stdio::null());
    let child = Child::spawn(cmd, "wireguard-go")?;
    let sock = PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("wireguard-go made no UAPI socket: {}", read(log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (peer_pub, allowed, endpoint) = peer;
    let key = key_file.to_str().unwrap();
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
    let dir = std::env::temp_dir().join(format!("derpfleet-wgb-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (if_a, if_b) = (format!("wga{tag}"), format!("wgb{tag}"));
    let _cleanup = Cleanup(vec![
        dir.clone(),
        PathBuf::from(format!("/var/run/wireguard/{if_a}.sock")),
        PathBuf::from(format!("/var/run/wireguard/{if_b}.sock")),
    ]);
    let a = Netns::new(&format!("wb{tag}a"))?;
    let b = Netns::new(&format!("wb{tag}b"))?;
    veth(&a, "va", "10.201.0.1/24", &b, "vb", "10.201.0.2/24")?;
    let (ka, kb) = (wg(&["genkey"], None)?, wg(&["genkey"], None)?);
    let (pa, pb) = (wg(&["pubkey"], Some(&ka))?, wg(&["pubkey"], Some(&kb))?);
    std::fs::write(dir.join("a.key"), &ka)?;
    std::fs::write(dir.join("b.key"), &kb)?;
    let _wa = start_wg_go(
        &a,
        &if_a,
        &dir.join("a.key"),
        "51820",
        (&pb, "100.64.0.2/32", "10.201.0.2:51820"),
        "100.64.0.1/24",
        &dir.join("a.log"),
    )?;
    let _wb = start_wg_go(
        &b,
        &if_b,
        &dir.join("b.key"),
        "51820",
        (&pa, "100.64.0.1/32", "10.201.0.1:51820"),
        "100.64.0.2/24",
        &dir.join("b.log"),
    )?;
    assert_eq!(ping(&a, "100.64.0.2", 2)?, 2);
    let mut runs = Vec::new();
    for _ in 0..3 {
        let mut cmd = b.command("iperf3");
        cmd.args(["-s", "-1", "-B", "100.64.0.2"]).stdout(Stdio::null()).stderr(Stdio::null());
        let _server = Child::spawn(cmd, "iperf3 server")?;
        std::thread::sleep(Duration::from_millis(300));
        let out = a.exec("iperf3", &["-c", "100.64.0.2", "-t", "5", "-J"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        runs.push(v["end"]["sum_received"]["bits_per_second"].as_f64().context("iperf3 json")? / 1e6);
    }
    runs.sort_by(f64::total_cmp);
    eprintln!("BENCH wireguard-go direct: runs {runs:.0?} Mbit/s, median {:.0}", runs[1]);
    Ok(())
}
