//! Accept-rate limits (global and per source IP) refuse connections beyond
//! the burst while established clients keep relaying; the per-client receive rate holds a
//! sender at the configured rate through TCP back-pressure with zero relay drops; mesh peers are
//! exempt.

use crate::http_common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use derpfleet_proto::frame::{put_header, FrameType};
use derpfleet_proto::handshake::{seal_client_info, ClientInfo};
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use derpfleet_relay::core::metrics::MetricsSnapshot;
use derpfleet_relay::ops::ratelimit::{AcceptRate, RecvRate};
use derpfleet_relay::server::{OpsConfig, Server};
use http_common::{config, derp_client, derp_upgrade, TestClient, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

const UNLIMITED: AcceptRate = AcceptRate { per_second: f64::INFINITY, burst: u64::MAX };

/// Opens a connection (from `source`, if given) and asks for `/derp/probe`: true when served,
/// false when the relay closed it at once.
async fn probe(addr: SocketAddr, source: Option<&str>) -> bool {
    let mut s = match source {
        Some(ip) => {
            let sock = TcpSocket::new_v4().unwrap();
            sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            sock.connect(addr).await.unwrap()
        }
        None => TcpStream::connect(addr).await.unwrap(),
    };
    let _ = s.write_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let mut out = Vec::new();
    match tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => out.starts_with(b"HTTP/1.1 200"),
        Ok(Err(_)) => false, // reset: closed unread
        Err(_) => panic!("probe hung"),
    }
}

fn snap(server: &Server) -> MetricsSnapshot {
    MetricsSnapshot::parse(&server.status().render_metrics())
}

async fn relay_ok(
    a: &mut TestClient<TcpStream>,
    b: &mut TestClient<TcpStream>,
    b_key: NodePublic,
    tag: &[u8],
) {
    a.send(&ClientToServer::SendPacket { dst: b_key, data: bytes::Bytes::copy_from_slice(tag) })
        .await
        .unwrap();
    assert_eq!(b.want_packet(STEP).await.unwrap().1, tag);
}

#[tokio::test]
async fn accept_burst_beyond_limit_is_refused_while_clients_keep_relaying() {
    const BURST: usize = 30;
    let ops = OpsConfig {
        // Practically no refill during the test: exactly BURST connections get in.
        accept_limit: AcceptRate { per_second: 0.001, burst: BURST as u64 },
        ..OpsConfig::default()
    };
    let server = Server::spawn_with(config(NodePrivate::generate()), ops).await.unwrap();
    let addr = server.local_addr();
    let (mut a, _) = derp_client(addr).await;
    let (mut b, b_key) = derp_client(addr).await;
    let b_pub = b_key.public();
    let attempts = BURST - 2 + 50;
    let mut served = 0;
    for i in 0..attempts {
        if probe(addr, None).await {
            served += 1;
        }
        if i % 10 == 0 {
            relay_ok(&mut a, &mut b, b_pub, format!("during {i}").as_bytes()).await;
        }
    }
    assert_eq!(served, BURST - 2, "the burst minus the two established clients");
    relay_ok(&mut a, &mut b, b_pub, b"after the flood").await;
    let m = snap(&server);
    assert_eq!(m.get("tls_listener_rejected_connections", &[]), 50.0);
    assert_eq!(m.get("derp_accept_rejected", &[("reason", "global")]), 50.0);
    assert_eq!(m.get("tls_listener_accepted_connections", &[]), (attempts + 2) as f64);
    server.shutdown().await;
}

#[tokio::test]
async fn per_ip_accept_limit_is_per_source() {
    let ops = OpsConfig {
        accept_limit_per_ip: AcceptRate { per_second: 0.001, burst: 3 },
        accept_limit: UNLIMITED,
        ..OpsConfig::default()
    };
    let server = Server::spawn_with(config(NodePrivate::generate()), ops).await.unwrap();
    let addr = server.local_addr();
    for _ in 0..3 {
        assert!(probe(addr, Some("127.0.0.1")).await);
    }
    assert!(!probe(addr, Some("127.0.0.1")).await, "4th from the same IP refused");
    assert!(probe(addr, Some("127.0.0.2")).await, "another source IP has its own bucket");
    let m = snap(&server);
    assert_eq!(m.get("derp_accept_rejected", &[("reason", "per_ip")]), 1.0);
    server.shutdown().await;
}

const RATE: u64 = 1_000_000;
const PAYLOAD: usize = 1200;
/// SendPacket frame bytes per packet: header, destination key, payload.
const FRAME: usize = 5 + 32 + PAYLOAD;

/// Sends packets to `dst` as fast as the socket takes them for `dur`; returns (elapsed since
/// start, bytes written) samples and the packet count.
async fn blast(c: &mut TestClient<TcpStream>, dst: NodePublic, dur: Duration) -> (Vec<(Duration, u64)>, u64) {
    let mut frame = BytesMut::with_capacity(FRAME * 8);
    for _ in 0..8 {
        put_header(&mut frame, FrameType::SendPacket, 32 + PAYLOAD);
        frame.put_slice(&dst.0);
        frame.put_bytes(0x42, PAYLOAD);
    }
    let start = Instant::now();
    let (mut written, mut packets, mut samples) = (0u64, 0u64, Vec::new());
    while start.elapsed() < dur {
        c.stream_mut().write_all(&frame).await.unwrap();
        written += frame.len() as u64;
        packets += 8;
        samples.push((start.elapsed(), written));
    }
    (samples, packets)
}

/// Bytes per second between `from` and the last sample.
fn rate_between(samples: &[(Duration, u64)], from: Duration) -> f64 {
    let first = samples.iter().find(|(t, _)| *t >= from).expect("samples after the warm-up");
    let last = samples.last().unwrap();
    (last.1 - first.1) as f64 / (last.0 - first.0).as_secs_f64()
}

/// Counts RecvPacket frames until `want` arrived (bounded).
async fn receive(c: &mut TestClient<TcpStream>, want: u64) -> u64 {
    let mut got = 0;
    while got < want {
        match c.next(STEP).await.unwrap() {
            Some(ServerToClient::RecvPacket { .. }) => got += 1,
            Some(_) => {}
            None => break,
        }
    }
    got
}

async fn limited_relay(mesh: Option<MeshKey>) -> Server {
    let mut cfg = config(NodePrivate::generate());
    cfg.derp.mesh_key = mesh;
    let ops =
        OpsConfig { recv_rate: RecvRate { bytes_per_sec: RATE, burst_bytes: 0 }, ..OpsConfig::default() };
    Server::spawn_with(cfg, ops).await.unwrap()
}

#[tokio::test]
async fn per_client_rate_holds_the_sender_with_zero_drops() {
    let server = limited_relay(None).await;
    let addr = server.local_addr();
    let (mut a, _) = derp_client(addr).await;
    // A small send buffer so the sender feels back-pressure soon after the relay pauses.
    socket2::SockRef::from(a.stream()).set_send_buffer_size(32 << 10).unwrap();
    let (mut b, b_key) = derp_client(addr).await;
    let dst = b_key.public();
    let receiver = tokio::spawn(async move {
        let got = receive(&mut b, u64::MAX).await;
        (b, got)
    });
    let (samples, packets) = blast(&mut a, dst, Duration::from_millis(4000)).await;
    let sender_rate = rate_between(&samples, Duration::from_millis(1500));
    eprintln!("sender rate after warm-up: {sender_rate:.0} B/s (limit {RATE})");
    assert!(
        (sender_rate - RATE as f64).abs() <= RATE as f64 * 0.10,
        "sender held at {sender_rate:.0} B/s, want {RATE} ± 10 %"
    );
    // Everything sent arrives: nothing was dropped, only delayed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = snap(&server);
        if m.get("derp_packets_sent", &[]) as u64 >= packets {
            break;
        }
        assert!(Instant::now() < deadline, "only {} of {packets} delivered", m.get("derp_packets_sent", &[]));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = snap(&server);
    for reason in derpfleet_relay::core::metrics::DropReason::ALL {
        for kind in derpfleet_relay::core::metrics::PacketKind::ALL {
            assert_eq!(m.dropped(reason, kind), 0.0, "{reason:?}/{kind:?}");
        }
    }
    assert_eq!(m.get("derp_rate_limit_per_client_bytes_per_sec", &[]), RATE as f64);
    receiver.abort();
    server.shutdown().await;
}

#[tokio::test]
async fn mesh_peers_are_exempt_from_the_receive_rate() {
    let mesh = MeshKey::generate();
    let server = limited_relay(Some(mesh)).await;
    let addr = server.local_addr();
    let key = NodePrivate::generate();
    let mut m = TestClient::new(derp_upgrade(addr).await, key.clone());
    let server_key = match m.next(STEP).await.unwrap() {
        Some(ServerToClient::ServerKey(k)) => k,
        other => panic!("{other:?}"),
    };
    let info = ClientInfo { mesh_key: Some(mesh), version: 2, ..Default::default() };
    m.send(&ClientToServer::ClientInfo(seal_client_info(&key, &server_key, &info))).await.unwrap();
    m.server_key = server_key;
    assert_eq!(m.want_server_info().await.unwrap().version, 2);
    let (mut b, b_key) = derp_client(addr).await;
    let dst = b_key.public();
    let receiver = tokio::spawn(async move { receive(&mut b, u64::MAX).await });
    // Four times the limit's worth of data in one second would be impossible if limited.
    let (samples, _) = blast(&mut m, dst, Duration::from_millis(1500)).await;
    let rate = rate_between(&samples, Duration::from_millis(500));
    eprintln!("mesh sender rate: {rate:.0} B/s (client limit {RATE})");
    assert!(rate > 2.0 * RATE as f64, "mesh peer was limited: {rate:.0} B/s");
    receiver.abort();
    server.shutdown().await;
}

#[tokio::test]
async fn rate_config_reload_applies_to_connected_clients() {
    let dir = http_common::temp_dir("ops-rate-reload");
    let file = dir.path().join("rate.json");
    std::fs::write(&file, r#"{"PerClientRateLimitBytesPerSec":0}"#).unwrap();
    let ops = OpsConfig {
        recv_rate: derpfleet_relay::ops::ratelimit::load_rate_config(&file).unwrap(),
        rate_config_path: Some(file.clone()),
        ..OpsConfig::default()
    };
    let server = Server::spawn_with(config(NodePrivate::generate()), ops).await.unwrap();
    let addr = server.local_addr();
    let (mut a, _) = derp_client(addr).await;
    socket2::SockRef::from(a.stream()).set_send_buffer_size(32 << 10).unwrap();
    let (mut b, b_key) = derp_client(addr).await;
    let receiver = tokio::spawn(async move { receive(&mut b, u64::MAX).await });
    let (samples, _) = blast(&mut a, b_key.public(), Duration::from_millis(1000)).await;
    let unlimited = rate_between(&samples, Duration::from_millis(300));
    assert!(unlimited > 2.0 * RATE as f64, "not limited yet: {unlimited:.0} B/s");

    std::fs::write(&file, format!(r#"{{"PerClientRateLimitBytesPerSec":{RATE}}}"#)).unwrap();
    let report = server.reload();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.recv_rate, Some(RecvRate { bytes_per_sec: RATE, burst_bytes: 65_568 }));
    let (samples, _) = blast(&mut a, b_key.public(), Duration::from_millis(3500)).await;
    let limited = rate_between(&samples, Duration::from_millis(1500));
    eprintln!("before reload {unlimited:.0} B/s, after {limited:.0} B/s");
    assert!((limited - RATE as f64).abs() <= RATE as f64 * 0.10, "after reload: {limited:.0} B/s");

    std::fs::write(&file, "{not json").unwrap();
    let report = server.reload();
    assert_eq!(report.errors.len(), 1, "a broken file is reported");
    assert_eq!(report.recv_rate.map(|r| r.bytes_per_sec), Some(RATE), "and the old rate stays");
    receiver.abort();
    server.shutdown().await;
}
