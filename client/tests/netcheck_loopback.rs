//! netcheck against STUN responders and HTTPS servers on loopback addresses.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use derpfleet_client::derpmap::{DerpMap, DerpNode, DerpRegion};
use derpfleet_client::netcheck::{NetcheckConfig, Netchecker};
use derpfleet_stun::message::{build_response, parse_tailscale_request};
use sha2::Digest;
use support::{TestServer, Tls};
use tokio::net::UdpSocket;

/// A Tailscale-style STUN responder on `ip` that answers after `delay`; returns its address.
async fn stun_responder(ip: &str, delay: Duration) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let sock = std::sync::Arc::new(UdpSocket::bind((ip, 0)).await.unwrap());
    let addr = sock.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else { return };
            let Ok(txid) = parse_tailscale_request(&buf[..n]) else { continue };
            let sock = sock.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = sock.send_to(&build_response(txid, from), from).await;
            });
        }
    });
    (addr, task)
}

fn region(id: i64, nodes: Vec<DerpNode>) -> DerpRegion {
    DerpRegion {
        region_id: id,
        region_code: format!("r{id}"),
        region_name: format!("Region {id}"),
        nodes,
        ..Default::default()
    }
}

fn stun_node(name: &str, region: i64, stun: SocketAddr) -> DerpNode {
    DerpNode {
        name: name.into(),
        region_id: region,
        host_name: stun.ip().to_string(),
        ipv4: stun.ip().to_string(),
        ipv6: "none".into(),
        stun_port: stun.port() as i64,
        ..Default::default()
    }
}

fn v4_only() -> NetcheckConfig {
    NetcheckConfig::default()
}

async fn v4_checker() -> Netchecker {
    let v4 = std::sync::Arc::new(UdpSocket::bind("0.0.0.0:0").await.unwrap());
    Netchecker::with_sockets(Some(v4), None, v4_only())
}

#[tokio::test]
async fn three_regions_latencies_measured_and_fastest_chosen() {
    let delays = [(1, "127.0.0.11", 40u64), (2, "127.0.0.12", 10), (3, "127.0.0.13", 80)];
    let mut map = DerpMap::default();
    let mut tasks = Vec::new();
    for (id, ip, ms) in delays {
        let (addr, t) = stun_responder(ip, Duration::from_millis(ms)).await;
        tasks.push(t);
        map.regions.insert(id, region(id, vec![stun_node(&format!("{id}a"), id, addr)]));
    }
    map.validate().unwrap();
    let mut nc = v4_checker().await;
    let r = nc.run(&map, true, None).await;
    assert!(r.udp && r.ipv4 && !r.ipv6, "{r:?}");
    for (id, _, ms) in delays {
        let got = r.region_latency[&id];
        let want = Duration::from_millis(ms);
        // Lower bound exact; upper bound loose, as tests share 2 busy cores (the netns lab
        // in e2e/tests/netcheck_lab.rs checks the ±5 ms acceptance figure).
        assert!(got >= want && got <= want + Duration::from_millis(15), "region {id}: {got:?} vs {want:?}");
    }
    assert_eq!(r.preferred_derp, 2);
    assert_eq!(r.mapping_varies_by_dest_ip, Some(false), "loopback does not NAT");
    assert!(r.global_v4.unwrap().ip().is_loopback());
    // A second (incremental) report keeps the home.
    let r2 = nc.run(&map, false, None).await;
    assert_eq!(r2.preferred_derp, 2);
}

#[tokio::test]
async fn udp_blocked_falls_back_to_https_latency() {
    let fast = TestServer::start_delayed(Tls::tls13(), Duration::from_millis(5)).await;
    let slow = TestServer::start_delayed(Tls::tls13(), Duration::from_millis(60)).await;
    // STUN "ports" that swallow every datagram, as an nft drop rule would.
    let black_hole = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let hole = black_hole.local_addr().unwrap();
    let mut map = DerpMap::default();
    for (id, s) in [(1, &slow), (2, &fast)] {
        let hash = hex::encode(sha2::Sha256::digest(s.leaf_der.as_ref().unwrap()));
        let n = DerpNode {
            name: format!("{id}a"),
            region_id: id,
            host_name: "127.0.0.1".into(),
            cert_name: format!("sha256-raw:{hash}"),
            ipv4: "127.0.0.1".into(),
            ipv6: "none".into(),
            stun_port: hole.port() as i64,
            derp_port: s.addr.port() as i64,
            ..Default::default()
        };
        map.regions.insert(id, region(id, vec![n]));
    }
    map.validate().unwrap();
    let mut nc = v4_checker().await;
    let r = nc.run(&map, true, None).await;
    assert!(!r.udp && !r.ipv4, "{r:?}");
    assert!(r.ipv4_can_send);
    assert_eq!(r.https_regions.len(), 2, "{r:?}");
    assert!(r.region_latency[&1] >= Duration::from_millis(60), "{r:?}");
    assert!(r.region_latency[&2] < r.region_latency[&1], "{r:?}");
    assert_eq!(r.preferred_derp, 2);
    for s in [&fast, &slow] {
        let reqs = s.requests.lock().unwrap();
        assert!(reqs.iter().any(|h| h.starts_with("GET /derp/latency-check HTTP/1.1")), "{reqs:?}");
    }
}

#[tokio::test]
async fn region_that_never_answers_is_absent_and_report_ends_in_time() {
    let (addr, _t) = stun_responder("127.0.0.21", Duration::ZERO).await;
    let black_hole = UdpSocket::bind("127.0.0.22:0").await.unwrap();
    let mut map = DerpMap::default();
    map.regions.insert(1, region(1, vec![stun_node("1a", 1, addr)]));
    map.regions.insert(2, region(2, vec![stun_node("2a", 2, black_hole.local_addr().unwrap())]));
    let mut nc = v4_checker().await;
    let t0 = std::time::Instant::now();
    let r = nc.run(&map, true, None).await;
    assert!(t0.elapsed() < Duration::from_secs(6), "whole report within its 5 s budget (+slack)");
    assert!(r.region_latency.contains_key(&1) && !r.region_latency.contains_key(&2), "{r:?}");
    assert_eq!(r.preferred_derp, 1);
}

#[tokio::test]
async fn external_reader_feeds_stun_answers_and_keeps_other_datagrams() {
    let (addr, _t) = stun_responder("127.0.0.31", Duration::from_millis(5)).await;
    let mut map = DerpMap::default();
    map.regions.insert(1, region(1, vec![stun_node("1a", 1, addr)]));
    let sock = std::sync::Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let cfg = NetcheckConfig { read_sockets: false, ..v4_only() };
    let mut nc = Netchecker::with_sockets(Some(sock.clone()), None, cfg);
    let handler = nc.stun_handler();
    // The "WireGuard" reader: owns the socket, hands STUN answers to netcheck, keeps the rest.
    let reader = tokio::spawn(async move {
        let mut others = Vec::new();
        let mut buf = [0u8; 1500];
        while let Ok(Ok((n, _))) =
            tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
        {
            if !handler.handle(&buf[..n]) {
                others.push(buf[..n].to_vec());
            }
        }
        others
    });
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let r = nc.run(&map, true, None).await;
    assert!(r.udp && r.region_latency.contains_key(&1), "{r:?}");
    let target = r.global_v4.unwrap();
    peer.send_to(b"wireguard bytes", target).await.unwrap();
    assert_eq!(reader.await.unwrap(), vec![b"wireguard bytes".to_vec()]);
}
