//! The reference node end to end: two `derpfleet-client up` processes behind NATs in
//! network namespaces, a `derpfleet-relay` (TLS, self-signed, `InsecureForTests` in the DERP map)
//! and a `derpfleet-stun` in a "public" namespace: the IPv4 lab of [`derpfleet_e2e::pathlab`].
//!
//! Topology (test-lab.md §3): `home0` 192.168.1.2 ↔ router 1 (WAN 172.30.1.2) ↔ `pub` ↔ router 2
//! (WAN 172.30.2.2) ↔ `home1` 192.168.2.2; the relay and STUN listen on 172.30.0.1 in `pub`. The
//! NATs are endpoint-independent (`masquerade`) or symmetric (`masquerade fully-random`), and drop
//! unsolicited WAN input (avoids the eim-race). Pings run over the TUN devices 100.64.0.1/.2.
//!
//! Each test builds its own namespaces (pid + suffix in the names) and removes them on drop with
//! every process inside.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use derpfleet_e2e::pathlab::{LabOpts, Nat, PathLab, TUN_IPS};
use derpfleet_e2e::Child;
use serde_json::Value;

/// The IPv4 path lab with routers that map ports as `nat` does.
fn ipv4_lab(suffix: &str, nat: Nat) -> Result<PathLab> {
    PathLab::new(suffix, LabOpts { nat, ..LabOpts::default() })
}

/// A config edit for [`PathLab::up_with`]: node 1 names no home region, so netcheck (on the shared
/// socket) picks it.
fn netcheck_home(i: usize, config: String) -> String {
    if i == 1 {
        config.replacen("home_region = 900\n", "", 1)
    } else {
        config
    }
}

/// A config edit for [`PathLab::up_with`]: node 0 runs without a TUN and forwards local UDP port
/// 127.0.0.1:5000 to 100.64.0.2:7000 through the tunnel.
fn userspace0(i: usize, config: String) -> String {
    if i == 0 {
        config.replace(
            "[tun]\n",
            "[[forward]]\nlisten = \"127.0.0.1:5000\"\nto = \"100.64.0.2:7000\"\n[tun]\nuserspace = true\n",
        )
    } else {
        config
    }
}

/// Blocks the direct path between the routers (in `pub`), leaving the relay reachable.
fn cut(lab: &PathLab, on: bool) -> Result<()> {
    if on {
        lab.public.nft(
            "table inet cut {\n chain f {\n  type filter hook forward priority filter; policy accept;\n  \
             iifname \"p1\" oifname \"p2\" drop\n  iifname \"p2\" oifname \"p1\" drop\n }\n}\n",
        )
    } else {
        lab.public.nft("delete table inet cut")
    }
}

fn handshake_age(s: &Value) -> Option<f64> {
    s["peers"][0]["last_handshake_secs"].as_f64()
}

/// Acceptance 1: endpoint-independent NATs. DERP first, direct within 5 s, then the relay is idle
/// for this pair while the ping continues.
#[test]
fn eim_nats_ping_via_derp_then_direct_and_relay_goes_quiet() -> Result<()> {
    let mut lab = ipv4_lab("e", Nat::EndpointIndependent)?;
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
    let mut lab = ipv4_lab("s", Nat::Symmetric)?;
    lab.up_with(netcheck_home)?;
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
    let mut lab = ipv4_lab("c", Nat::EndpointIndependent)?;
    lab.up()?;
    assert_eq!(lab.ping(0, 1, "0.2")?, 1, "log0:\n{}", lab.log(0));
    lab.wait_path(0, Duration::from_secs(5), |p| p.starts_with("direct "))?;
    let hs_before = handshake_age(&lab.status(0)?).context("no handshake")?;
    let cut_at = Instant::now();
    cut(&lab, true)?;
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
    cut(&lab, false)?;
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
        let mut lab = ipv4_lab(if want_direct { "td" } else { "tr" }, nat)?;
        let mut runs = lab.node_throughput_runs(want_direct)?;
        let path = lab.path(0)?;
        runs.sort_by(f64::total_cmp);
        eprintln!("BENCH node {name} ({path}): runs {runs:.0?} Mbit/s, median {:.0}", runs[1]);
    }
    Ok(())
}

/// Userspace mode: node 0 has no TUN; a local UDP port is forwarded through the tunnel (and the
/// direct path) to a UDP echo server on node 1's tunnel address.
#[test]
fn userspace_node_forwards_a_udp_port_through_the_tunnel() -> Result<()> {
    let mut lab = ipv4_lab("u", Nat::EndpointIndependent)?;
    lab.up_with(userspace0)?;
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
