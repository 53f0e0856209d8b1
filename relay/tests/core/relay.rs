//! Spec §11 items 9–20 and 27–29: relaying, limits, PeerGone, Ping, NotePreferred, unknown
//! frames, mesh-only frames, duplicate connections and KeepAlive, over loopback TCP.

use std::time::Duration;

use anyhow::Result;
use derpfleet_proto::disco;
use derpfleet_proto::frame::FrameType;
use derpfleet_proto::msg::{ClientToServer, PeerGoneReason};
use derpfleet_proto::{NodePrivate, NodePublic};
use derpfleet_relay::core::derp_server::{jitter, CoreConfig, DerpServerConfig};
use derpfleet_relay::core::metrics::{DropReason, PacketKind};
use derpfleet_relay::testing::{
    mesh_info, spawn_core_relay, spawn_core_relay_with, spawn_mesh_relay, TestClient,
};

const T: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

fn disco_packet() -> Vec<u8> {
    let mut p = disco::MAGIC.to_vec();
    p.extend_from_slice(&[0xd1; 56]);
    assert!(disco::looks_like_disco(&p));
    p
}

#[tokio::test]
async fn c09_send_packet_relayed_with_source_key() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut a = relay.client().await?;
    let mut b = relay.client().await?;
    let data: Vec<u8> = (0..1200u32).map(|i| (i * 7) as u8).collect();
    a.send_packet(b.public(), &data).await?;
    assert_eq!(b.want_packet(T).await?, (a.public(), data.clone()));
    b.send_packet(a.public(), b"reply").await?;
    assert_eq!(a.want_packet(T).await?, (b.public(), b"reply".to_vec()));
    relay.wait_metric("derp_packets_received", &[], 2.0).await?;
    relay.wait_metric("derp_packets_received_kind", &[("kind", "other")], 2.0).await?;
    relay.wait_metric("derp_packets_sent", &[], 2.0).await?;
    relay.wait_metric("derp_bytes_sent", &[], 1205.0).await?;
    Ok(())
}

#[tokio::test]
async fn c10_max_packet_relayed_and_one_more_byte_closes() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut a = relay.client().await?;
    let mut b = relay.client().await?;
    let data = vec![0x5a; 65536];
    a.send_packet(b.public(), &data).await?;
    let (src, got) = b.want_packet(T).await?;
    assert_eq!((src, got.len()), (a.public(), 65536));
    assert!(got == data);
    a.send_packet(b.public(), &vec![1u8; 65537]).await?;
    a.want_closed(T).await?;
    // B was sent packets from A, so it hears that A left; B itself is unaffected.
    assert_eq!(b.want_peer_gone(T).await?, (a.public(), PeerGoneReason::Disconnected));
    b.ping_pong(*b"b-alive!", T).await?;
    Ok(())
}

#[tokio::test]
async fn c11_send_packet_shorter_than_key_closes() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut a = relay.client().await?;
    let mut b = relay.client().await?;
    a.send_frame(FrameType::SendPacket as u8, &[0u8; 31]).await?;
    a.want_closed(T).await?;
    b.ping_pong(*b"b-alive!", T).await?;
    Ok(())
}

#[tokio::test]
async fn c12_unknown_key_non_disco_silently_dropped() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut a = relay.client().await?;
    let nobody = NodePrivate::generate().public();
    a.send_packet(nobody, b"not disco").await?;
    a.send_packet(nobody, &[0u8; 100]).await?;
    a.want_silence(QUIET).await?;
    a.ping_pong(*b"12345678", T).await?;
    let s = relay.server.metrics().snapshot();
    assert_eq!(s.dropped(DropReason::UnknownDest, PacketKind::Other), 2.0);
    assert_eq!(s.get("derp_peer_gone_not_here_frames", &[]), 0.0);
    Ok(())
}

#[tokio::test]
async fn c13_disco_to_unknown_key_peer_gone_rate_limited() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut a = relay.client().await?;
    let nobody = NodePrivate::generate().public();
    let d = disco_packet();
    for _ in 0..4 {
        a.send_packet(nobody, &d).await?;
    }
    for _ in 0..3 {
        assert_eq!(a.want_peer_gone(T).await?, (nobody, PeerGoneReason::NotHere));
    }
    // The 4th, within the same second, produces nothing.
    a.want_silence(Duration::from_millis(500)).await?;
    let s = relay.server.metrics().snapshot();
    assert_eq!(s.get("derp_peer_gone_not_here_frames", &[]), 3.0);
    assert_eq!(s.dropped(DropReason::UnknownDest, PacketKind::Disco), 4.0);
    Ok(())
}

#[tokio::test]
async fn c14_peer_gone_disconnected_to_receivers_when_sender_leaves() -> Result<()> {
    let relay = spawn_core_relay().await;
    let a = relay.client().await?;
    let mut a = a;
    let mut b = relay.client().await?;
    let mut c = relay.client().await?;
    let a_key = a.public();
    a.send_packet(b.public(), b"hi b").await?;
    assert_eq!(b.want_packet(T).await?.0, a_key);
    a.close().await;
    assert_eq!(b.want_peer_gone(T).await?, (a_key, PeerGoneReason::Disconnected));
    // C never received from A: it hears nothing.
    c.want_silence(QUIET).await?;
    assert_eq!(relay.server.metrics().snapshot().get("derp_peer_gone_disconnected_frames", &[]), 1.0);
    Ok(())
}

#[tokio::test]
async fn c15_ping_answered_with_first_eight_bytes() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut a = relay.client().await?;
    a.send_ping(b"abcdefgh").await?;
    assert_eq!(&a.want_pong(T).await?, b"abcdefgh");
    a.send_ping(b"ABCDEFGHijkl").await?;
    assert_eq!(&a.want_pong(T).await?, b"ABCDEFGH");
    a.ping_pong(*b"stillup!", T).await?;
    let s = relay.server.metrics().snapshot();
    assert_eq!(s.get("derp_got_ping", &[]), 3.0);
    assert_eq!(s.get("derp_sent_pong", &[]), 3.0);
    Ok(())
}

#[tokio::test]
async fn c16_ping_too_short_or_too_long_closes() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut a = relay.client().await?;
    a.send_ping(b"1234567").await?;
    a.want_closed(T).await?;
    let mut b = relay.client().await?;
    b.send_ping(&[0u8; 1000]).await?;
    b.want_pong(T).await?;
    b.send_ping(&[0u8; 1001]).await?;
    b.want_closed(T).await?;
    Ok(())
}

#[tokio::test]
async fn c17_note_preferred_gauge_and_bad_length_closes() -> Result<()> {
    let relay = spawn_core_relay().await;
    let home = || relay.server.metrics().snapshot().get("derp_current_home_connections", &[]);
    let mut a = relay.client().await?;
    a.send(&ClientToServer::NotePreferred(true)).await?;
    a.ping_pong(*b"sync0001", T).await?;
    assert_eq!(home(), 1.0);
    a.send_frame(FrameType::NotePreferred as u8, &[0x07]).await?; // any non-zero byte = true
    a.ping_pong(*b"sync0002", T).await?;
    assert_eq!(home(), 1.0);
    a.send(&ClientToServer::NotePreferred(false)).await?;
    a.ping_pong(*b"sync0003", T).await?;
    assert_eq!(home(), 0.0);
    a.send(&ClientToServer::NotePreferred(true)).await?;
    a.ping_pong(*b"sync0004", T).await?;
    assert_eq!(home(), 1.0);
    a.send_frame(FrameType::NotePreferred as u8, &[1, 1]).await?;
    a.want_closed(T).await?;
    // The closed connection no longer counts as home.
    let mut b = relay.client().await?;
    b.ping_pong(*b"sync0005", T).await?;
    tokio::time::timeout(T, async {
        while home() != 0.0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    let mut c = relay.client().await?;
    c.send_frame(FrameType::NotePreferred as u8, &[]).await?;
    c.want_closed(T).await?;
    Ok(())
}

#[tokio::test]
async fn c18_unknown_frame_skipped_and_next_frame_processed() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut a = relay.client().await?;
    let mut b = relay.client().await?;
    a.send_frame(0x42, &[0xee; 100]).await?;
    a.send_frame(FrameType::Pong as u8, b"12345678").await?; // servers ignore Pongs too
    a.send_packet(b.public(), b"after unknown").await?;
    assert_eq!(b.want_packet(T).await?.1, b"after unknown".to_vec());
    a.ping_pong(*b"12345678", T).await?;
    assert_eq!(relay.server.metrics().snapshot().get("derp_unknown_frames", &[]), 2.0);
    Ok(())
}

#[tokio::test]
async fn c19_mesh_frames_without_mesh_key_close() -> Result<()> {
    let (relay, _) = spawn_mesh_relay().await;
    let mut other = relay.client().await?;
    let mut a = relay.client().await?;
    a.send(&ClientToServer::WatchConns).await?;
    a.want_closed(T).await?;
    let mut b = relay.client().await?;
    b.send(&ClientToServer::ClosePeer(other.public())).await?;
    b.want_closed(T).await?;
    let mut c = relay.client().await?;
    c.send(&ClientToServer::ForwardPacket {
        src: NodePrivate::generate().public(),
        dst: other.public(),
        data: bytes::Bytes::from_static(b"sneaky"),
    })
    .await?;
    c.want_closed(T).await?;
    // The target of the ClosePeer is untouched and got nothing forwarded.
    other.ping_pong(*b"untouchd", T).await?;
    Ok(())
}

#[tokio::test]
async fn c20_watch_conns_with_payload_closes_even_mesh_peer() -> Result<()> {
    let (relay, mesh) = spawn_mesh_relay().await;
    let mut m = TestClient::connect_with(relay.addr, NodePrivate::generate(), mesh_info(mesh)).await?;
    m.send_frame(FrameType::WatchConns as u8, &[0]).await?;
    m.want_closed(T).await?;
    Ok(())
}

#[tokio::test]
async fn c27_dup_connection_last_writer_is_receiver_neither_closed() -> Result<()> {
    let relay = spawn_core_relay().await;
    let key = NodePrivate::generate();
    let mut a1 = TestClient::connect_with(relay.addr, key.clone(), Default::default()).await?;
    let mut sender = relay.client().await?;
    sender.send_packet(key.public(), b"to a1").await?;
    assert_eq!(a1.want_packet(T).await?.1, b"to a1".to_vec());
    let mut a2 = TestClient::connect_with(relay.addr, key.clone(), Default::default()).await?;
    sender.send_packet(key.public(), b"to a2").await?;
    assert_eq!(a2.want_packet(T).await?.1, b"to a2".to_vec());
    a1.want_silence(QUIET).await?;
    // Any frame from a1 (a Ping here) makes it the receiver again.
    a1.ping_pong(*b"a1 talks", T).await?;
    sender.send_packet(key.public(), b"back to a1").await?;
    assert_eq!(a1.want_packet(T).await?.1, b"back to a1".to_vec());
    a2.want_silence(QUIET).await?;
    a2.ping_pong(*b"a2 alive", T).await?;
    sender.send_packet(key.public(), b"a2 again").await?;
    assert_eq!(a2.want_packet(T).await?.1, b"a2 again".to_vec());
    a1.ping_pong(*b"a1 alive", T).await?;
    let s = relay.server.metrics().snapshot();
    assert_eq!(s.get("derp_current_dup_client_keys", &[]), 1.0);
    assert_eq!(s.get("derp_current_dup_client_conns", &[]), 2.0);
    assert_eq!(s.get("derp_current_connections", &[]), 3.0);
    Ok(())
}

#[tokio::test]
async fn c28_dup_survivor_receives_and_watchers_see_gone_only_after_last() -> Result<()> {
    let (relay, mesh) = spawn_mesh_relay().await;
    let mut w = relay.watcher(mesh).await?;
    assert_eq!(w.want_present(T).await?.0, w.public());
    let key = NodePrivate::generate();
    let mut a1 = TestClient::connect_with(relay.addr, key.clone(), Default::default()).await?;
    let a2 = TestClient::connect_with(relay.addr, key.clone(), Default::default()).await?;
    // A PeerPresent per duplicate, each with its own endpoint.
    let (k1, ep1, f1) = w.want_present(T).await?;
    let (k2, ep2, f2) = w.want_present(T).await?;
    assert_eq!((k1, k2, f1, f2), (key.public(), key.public(), 0x01, 0x01));
    assert_eq!(ep1, Some(a1.stream().local_addr()?));
    assert_eq!(ep2, Some(a2.stream().local_addr()?));
    let mut sender = relay.client().await?;
    assert_eq!(w.want_present(T).await?.0, sender.public());
    a2.close().await;
    let deadline = tokio::time::Instant::now() + T;
    while relay.server.registry().conns_of(&key.public()).len() != 1 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "a2 never unregistered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The survivor gets the traffic; the watcher hears nothing about the key yet.
    tokio::time::timeout(T, async {
        loop {
            sender.send_packet(key.public(), b"survivor?").await?;
            if let Ok((src, d)) = a1.want_packet(Duration::from_millis(200)).await {
                assert_eq!((src, d), (sender.public(), b"survivor?".to_vec()));
                return anyhow::Ok(());
            }
        }
    })
    .await??;
    w.want_silence(QUIET).await?;
    a1.close().await;
    assert_eq!(w.want_peer_gone(T).await?, (key.public(), PeerGoneReason::Disconnected));
    Ok(())
}

#[tokio::test]
async fn c29_keepalive_sent_periodically_on_idle_connection() -> Result<()> {
    let defaults = CoreConfig::default();
    assert_eq!(defaults.keepalive_interval, Duration::from_secs(60));
    assert_eq!(defaults.keepalive_jitter, Duration::from_secs(5));
    for _ in 0..1000 {
        assert!(jitter(defaults.keepalive_jitter) < Duration::from_secs(5));
    }
    assert!(defaults.keepalive_interval + defaults.keepalive_jitter <= Duration::from_secs(65));
    let options = CoreConfig {
        keepalive_interval: Duration::from_millis(200),
        keepalive_jitter: Duration::from_millis(100),
        ..Default::default()
    };
    let relay = spawn_core_relay_with(DerpServerConfig::new(NodePrivate::generate()), options).await;
    let mut a = relay.client().await?;
    for _ in 0..3 {
        let f = a.recv_raw(Duration::from_secs(2)).await?;
        assert_eq!((f.ty, f.payload.len()), (FrameType::KeepAlive as u8, 0));
    }
    Ok(())
}

#[tokio::test]
async fn close_peer_from_mesh_closes_every_connection_of_key() -> Result<()> {
    let (relay, mesh) = spawn_mesh_relay().await;
    let key = NodePrivate::generate();
    let mut a1 = TestClient::connect_with(relay.addr, key.clone(), Default::default()).await?;
    let mut a2 = TestClient::connect_with(relay.addr, key.clone(), Default::default()).await?;
    let mut bystander = relay.client().await?;
    let mut m = TestClient::connect_with(relay.addr, NodePrivate::generate(), mesh_info(mesh)).await?;
    m.send(&ClientToServer::ClosePeer(key.public())).await?;
    a1.want_closed(T).await?;
    a2.want_closed(T).await?;
    bystander.ping_pong(*b"still ok", T).await?;
    m.ping_pong(*b"mesh  ok", T).await?;
    Ok(())
}

#[tokio::test]
async fn forward_packet_from_mesh_delivered_locally_only() -> Result<()> {
    let (relay, mesh) = spawn_mesh_relay().await;
    let mut b = relay.client().await?;
    let mut m = TestClient::connect_with(relay.addr, NodePrivate::generate(), mesh_info(mesh)).await?;
    let src: NodePublic = NodePrivate::generate().public();
    m.send(&ClientToServer::ForwardPacket { src, dst: b.public(), data: bytes::Bytes::from_static(b"fwd") })
        .await?;
    assert_eq!(b.want_packet(T).await?, (src, b"fwd".to_vec()));
    let nobody = NodePrivate::generate().public();
    m.send(&ClientToServer::ForwardPacket { src, dst: nobody, data: bytes::Bytes::from(disco_packet()) })
        .await?;
    m.ping_pong(*b"sync fwd", T).await?;
    m.want_silence(QUIET).await?;
    let s = relay.server.metrics().snapshot();
    assert_eq!(s.dropped(DropReason::UnknownDestOnFwd, PacketKind::Disco), 1.0);
    Ok(())
}

#[tokio::test]
async fn watcher_flood_and_self_connect() -> Result<()> {
    let (relay, mesh) = spawn_mesh_relay().await;
    let mut a = relay.client().await?;
    let b = relay.client().await?;
    let mut w = TestClient::connect_with(relay.addr, NodePrivate::generate(), mesh_info(mesh)).await?;
    w.send(&ClientToServer::WatchConns).await?;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let (k, ep, flags) = w.want_present(T).await?;
        assert!(flags != 0 && ep.is_some());
        seen.insert(k);
    }
    assert_eq!(seen, [a.public(), b.public(), w.public()].into_iter().collect());
    a.ping_pong(*b"aaaaaaaa", T).await?;
    // A watcher with the server's own key (self-connect) gets nothing at all.
    let own = relay.server.config().private_key.clone();
    let mut me = TestClient::connect_with(relay.addr, own, mesh_info(mesh)).await?;
    me.send(&ClientToServer::WatchConns).await?;
    me.want_silence(QUIET).await?;
    let _c = relay.client().await?;
    me.want_silence(QUIET).await?;
    assert_eq!(relay.server.metrics().snapshot().get("derp_watchers", &[]), 1.0);
    Ok(())
}
