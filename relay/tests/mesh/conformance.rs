//! Spec §11 items 21–24: what one server does for mesh peers (watchers, PeerPresent flags,
//! ClosePeer, ForwardPacket) and duplicates, over loopback TCP. Item 28 (duplicates as a
//! watcher sees them) is c28 in `core::relay`.

use crate::mesh_common;

use std::sync::Arc;

use anyhow::{bail, Result};
use bytes::Bytes;
use derpfleet_client::ConnectOptions;
use derpfleet_proto::frame::FrameType;
use derpfleet_proto::msg::{ClientToServer, PeerGoneReason, ServerToClient};
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use derpfleet_relay::core::registry::PacketForwarder;
use derpfleet_relay::testing::{mesh_info, spawn_mesh_relay, tailscaled_info, TestClient};
use mesh_common::{relay, Client, T};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads one raw PeerPresent; returns (key, v4-mapped ip bytes, port, flags) after checking the
/// 51-byte layout.
async fn raw_present(w: &mut TestClient) -> Result<(NodePublic, [u8; 16], u16, u8)> {
    loop {
        let f = w.recv_raw(T).await?;
        if f.ty == FrameType::KeepAlive as u8 {
            continue;
        }
        if f.ty != FrameType::PeerPresent as u8 {
            bail!("expected PeerPresent, got type {:#04x}", f.ty);
        }
        assert_eq!(f.payload.len(), 51, "PeerPresent is 51 bytes");
        let key = NodePublic(f.payload[..32].try_into().unwrap());
        let ip: [u8; 16] = f.payload[32..48].try_into().unwrap();
        let port = u16::from_be_bytes([f.payload[48], f.payload[49]]);
        return Ok((key, ip, port, f.payload[50]));
    }
}

#[tokio::test]
async fn c21_watcher_gets_present_for_every_client_then_present_and_gone() -> Result<()> {
    let (relay, mesh) = spawn_mesh_relay().await;
    let a = relay.client().await?;
    let b = relay.client().await?;
    let mut w = relay.watcher(mesh).await?;
    let mut flood = Vec::new();
    for _ in 0..3 {
        flood.push(raw_present(&mut w).await?);
    }
    let mapped_loopback = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1];
    for c in [&a, &b] {
        let port = c.stream().local_addr()?.port();
        let (_, ip, p, flags) = *flood.iter().find(|e| e.0 == c.public()).expect("flood has every client");
        assert_eq!((ip, p), (mapped_loopback, port), "v4-mapped IP and the client's port");
        assert_eq!(flags, 0x01);
    }
    assert!(flood.iter().any(|e| e.0 == w.public() && e.3 == 0x02), "the watcher itself, as mesh peer");

    let c = relay.client().await?;
    let (k, ip, port, flags) = raw_present(&mut w).await?;
    assert_eq!((k, ip, port, flags), (c.public(), mapped_loopback, c.stream().local_addr()?.port(), 0x01));
    let ck = c.public();
    c.close().await;
    assert_eq!(w.want_peer_gone(T).await?, (ck, PeerGoneReason::Disconnected));
    Ok(())
}

/// A raw-HTTP DERP client that sends `Ideal-Node` (the client library only sends it for a
/// region's non-first node over TLS).
async fn ideal_node_client(addr: std::net::SocketAddr) -> Result<(TestClient, NodePublic)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        b"GET /derp HTTP/1.1\r\nHost: r\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nIdeal-Node: n1\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tokio::time::timeout(T, s.read_u8()).await??);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let key = NodePrivate::generate();
    let mut c = TestClient::new(s, key.clone());
    c.handshake(tailscaled_info()).await?;
    Ok((c, key.public()))
}

#[tokio::test]
async fn c22_present_flags_prober_mesh_peer_ideal_node_regular() -> Result<()> {
    let mesh = MeshKey::generate();
    let server = relay(mesh).await;
    let addr = server.local_addr();
    let watch_opts = ConnectOptions { mesh_key: Some(mesh), ..ConnectOptions::new(NodePrivate::generate()) };
    let mut w = Client::connect_with(addr, watch_opts).await?;
    w.tx.watch_conns().await?;
    let prober = Client::connect_with(
        addr,
        ConnectOptions { is_prober: true, ..ConnectOptions::new(NodePrivate::generate()) },
    )
    .await?;
    let peer = Client::connect_with(
        addr,
        ConnectOptions { mesh_key: Some(mesh), ..ConnectOptions::new(NodePrivate::generate()) },
    )
    .await?;
    let regular = Client::connect(addr).await?;
    let (_ideal_stream, ideal) = ideal_node_client(addr).await?;
    let want = [(prober.public(), 0x04), (peer.public(), 0x02), (ideal, 0x08), (regular.public(), 0x01)];
    let mut seen = std::collections::HashMap::new();
    while want.iter().any(|(k, _)| !seen.contains_key(k)) {
        if let ServerToClient::PeerPresent { key, flags, .. } = w.next(T).await? {
            seen.insert(key, flags);
        }
    }
    for (k, flags) in want {
        assert_eq!(seen[&k], flags, "flags of {k}");
    }
    assert_eq!(gauge_notideal(&server), 1.0);
    Ok(())
}

fn gauge_notideal(s: &derpfleet_relay::server::Server) -> f64 {
    mesh_common::gauge(s, "derp_current_notideal_connections")
}

#[tokio::test]
async fn c23_close_peer_closes_every_connection_of_the_key() -> Result<()> {
    let (relay, mesh) = spawn_mesh_relay().await;
    let k = NodePrivate::generate();
    let mut d1 = TestClient::connect_with(relay.addr, k.clone(), tailscaled_info()).await?;
    let mut d2 = TestClient::connect_with(relay.addr, k.clone(), tailscaled_info()).await?;
    let mut bystander = relay.client().await?;
    let mut m = TestClient::connect_with(relay.addr, NodePrivate::generate(), mesh_info(mesh)).await?;
    m.send(&ClientToServer::ClosePeer(k.public())).await?;
    d1.want_closed(T).await?;
    d2.want_closed(T).await?;
    bystander.ping_pong(*b"still ok", T).await?;
    m.ping_pong(*b"mesh  ok", T).await?;
    assert!(relay.server.registry().conns_of(&k.public()).is_empty());
    Ok(())
}

/// Records what it was asked to forward.
struct Recorder {
    got: Mutex<Vec<(NodePublic, NodePublic)>>,
}

impl PacketForwarder for Recorder {
    fn forward_packet(&self, src: NodePublic, dst: NodePublic, _data: Bytes) {
        self.got.lock().push((src, dst));
    }
    fn forwarder_id(&self) -> u64 {
        u64::MAX - 7
    }
}

#[tokio::test]
async fn c24_forward_packet_delivered_locally_and_never_forwarded_again() -> Result<()> {
    let (relay, mesh) = spawn_mesh_relay().await;
    let elsewhere = NodePrivate::generate().public();
    let rec = Arc::new(Recorder { got: Mutex::new(Vec::new()) });
    relay.server.registry().add_packet_forwarder(elsewhere, rec.clone());
    let mut b = relay.client().await?;
    let mut m = TestClient::connect_with(relay.addr, NodePrivate::generate(), mesh_info(mesh)).await?;
    let src = NodePrivate::generate().public();
    m.send(&ClientToServer::ForwardPacket { src, dst: b.public(), data: Bytes::from_static(b"via mesh") })
        .await?;
    assert_eq!(b.want_packet(T).await?, (src, b"via mesh".to_vec()), "delivered with src = src");
    m.send(&ClientToServer::ForwardPacket { src, dst: elsewhere, data: Bytes::from_static(b"no 2nd hop") })
        .await?;
    relay
        .wait_metric("derp_packets_dropped", &[("reason", "unknown_dest_on_fwd"), ("kind", "other")], 1.0)
        .await?;
    assert!(rec.got.lock().is_empty(), "a ForwardPacket is never forwarded again");
    // The forwarder itself works: a local SendPacket to the same key uses it.
    b.send_packet(elsewhere, b"one hop").await?;
    mesh_common::eventually("SendPacket forwarded", || rec.got.lock().len() == 1).await?;
    assert_eq!(rec.got.lock()[0], (b.public(), elsewhere));
    relay.wait_metric("derp_packets_forwarded_in", &[], 2.0).await?;
    Ok(())
}
