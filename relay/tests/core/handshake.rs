//! Spec §11 items 1–8: the handshake, against the server core over loopback TCP (no HTTP).

use std::time::Duration;

use anyhow::Result;
use bytes::BytesMut;
use derpfleet_proto::consts::MAGIC;
use derpfleet_proto::frame::FrameType;
use derpfleet_proto::handshake::{open, seal, server_key_frame, ClientInfo};
use derpfleet_proto::{MeshKey, NodePrivate};
use derpfleet_relay::core::derp_server::{CoreConfig, DerpServerConfig};
use derpfleet_relay::testing::{spawn_core_relay, spawn_core_relay_with, tailscaled_info, TestClient};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);

/// A ClientInfo payload sealing arbitrary plaintext: `clientPub ‖ nonce ‖ box(plain)`.
fn client_info_payload(client: &NodePrivate, server: &derpfleet_proto::NodePublic, plain: &[u8]) -> Vec<u8> {
    let mut p = client.public().0.to_vec();
    p.extend(seal(client, server, plain));
    p
}

/// The handshake failed: the server closes without sending a ServerInfo (nothing at all after
/// the ServerKey, which `connect_raw` consumed).
async fn want_closed_without_server_info(c: &mut TestClient) -> Result<()> {
    match c.recv_raw(T).await {
        Ok(f) => anyhow::bail!("expected close, got frame type {:#04x}", f.ty),
        Err(e) => {
            assert!(e.to_string().contains("closed"), "expected close, got: {e}");
            Ok(())
        }
    }
}

#[tokio::test]
async fn c01_server_key_is_first_frame() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut s = TcpStream::connect(relay.addr).await?;
    let mut got = [0u8; 45];
    tokio::time::timeout(T, s.read_exact(&mut got)).await??;
    let mut want = vec![0x01, 0, 0, 0, 0x28];
    want.extend_from_slice(&MAGIC);
    want.extend_from_slice(&relay.key().0);
    assert_eq!(got.to_vec(), want);
    assert_eq!(&got[..], &server_key_frame(&relay.key())[..]);
    Ok(())
}

#[tokio::test]
async fn c02_first_frame_not_client_info_closes_without_server_info() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut c = TestClient::connect_raw(relay.addr).await?;
    c.send_ping(b"12345678").await?;
    want_closed_without_server_info(&mut c).await?;
    // An unknown type as the first frame is not skipped either.
    let mut c = TestClient::connect_raw(relay.addr).await?;
    c.send_frame(0x42, &[0u8; 100]).await?;
    want_closed_without_server_info(&mut c).await?;
    assert_eq!(relay.server.metrics().snapshot().get("derp_handshake_errors", &[]), 2.0);
    assert_eq!(relay.panics(), 0);
    Ok(())
}

#[tokio::test]
async fn c03_client_info_length_out_of_range_closes() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut c = TestClient::connect_raw(relay.addr).await?;
    c.send_frame(FrameType::ClientInfo as u8, &[7u8; 55]).await?;
    want_closed_without_server_info(&mut c).await?;
    // 262145 bytes declared: closed on the header alone, nothing buffered.
    let mut c = TestClient::connect_raw(relay.addr).await?;
    c.write_raw(&[0x02, 0x00, 0x04, 0x00, 0x01]).await?;
    want_closed_without_server_info(&mut c).await?;
    // Exactly 262144 bytes is within the limit (then fails only because the box does not open).
    let mut c = TestClient::connect_raw(relay.addr).await?;
    c.send_frame(FrameType::ClientInfo as u8, &vec![7u8; 262144]).await?;
    want_closed_without_server_info(&mut c).await?;
    Ok(())
}

#[tokio::test]
async fn c04_client_info_box_not_opening_closes() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut c = TestClient::connect_raw(relay.addr).await?;
    let client = NodePrivate::generate();
    let mut p = client_info_payload(&client, &relay.key(), br#"{"version":2}"#);
    p[0] ^= 1; // claim a different public key than the one that sealed the box
    c.send_frame(FrameType::ClientInfo as u8, &p).await?;
    want_closed_without_server_info(&mut c).await?;
    // Sealed to the wrong server key.
    let mut c = TestClient::connect_raw(relay.addr).await?;
    let p = client_info_payload(&client, &NodePrivate::generate().public(), br#"{"version":2}"#);
    c.send_frame(FrameType::ClientInfo as u8, &p).await?;
    want_closed_without_server_info(&mut c).await?;
    Ok(())
}

#[tokio::test]
async fn c05_client_info_bad_json_or_bad_mesh_key_closes() -> Result<()> {
    let relay = spawn_core_relay().await;
    let client = NodePrivate::generate();
    for plain in [&b"not json"[..], br#"{"version":2,"meshKey":"abcd"}"#, b"[1,2]"] {
        let mut c = TestClient::connect_raw(relay.addr).await?;
        c.send_frame(FrameType::ClientInfo as u8, &client_info_payload(&client, &relay.key(), plain)).await?;
        want_closed_without_server_info(&mut c).await?;
    }
    // Case-insensitive keys and unknown fields are fine.
    let mut c = TestClient::connect_raw(relay.addr).await?;
    let plain = br#"{"Version":2,"canackpings":true,"SomethingNew":[1]}"#;
    c.key = client.clone();
    c.send_frame(FrameType::ClientInfo as u8, &client_info_payload(&client, &relay.key(), plain)).await?;
    assert_eq!(c.want_server_info().await?.version, 2);
    Ok(())
}

#[tokio::test]
async fn c06_no_client_info_within_handshake_timeout_closes() -> Result<()> {
    assert_eq!(CoreConfig::default().handshake_timeout, Duration::from_secs(10), "derper's default");
    let options = CoreConfig { handshake_timeout: Duration::from_millis(400), ..Default::default() };
    let relay = spawn_core_relay_with(DerpServerConfig::new(NodePrivate::generate()), options).await;
    let started = tokio::time::Instant::now();
    let mut c = TestClient::connect_raw(relay.addr).await?;
    // Half a ClientInfo header, then nothing.
    c.write_raw(&[0x02, 0x00]).await?;
    c.want_closed(T).await?;
    assert!(started.elapsed() >= Duration::from_millis(400), "closed before the deadline");
    // A client that completes in time is not affected by the deadline afterwards.
    let mut ok = relay.client().await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    ok.ping_pong(*b"stillok!", T).await?;
    Ok(())
}

#[tokio::test]
async fn c07_server_info_follows_valid_client_info() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut c = TestClient::connect_raw(relay.addr).await?;
    let client = NodePrivate::generate();
    c.key = client.clone();
    let payload = derpfleet_proto::handshake::seal_client_info(&client, &relay.key(), &tailscaled_info());
    c.send_frame(FrameType::ClientInfo as u8, &payload).await?;
    let f = c.recv_raw(T).await?;
    assert_eq!(f.ty, FrameType::ServerInfo as u8);
    let plain =
        open(&client, &relay.key(), &f.payload).expect("ServerInfo opens with (client priv, server pub)");
    let json: serde_json::Value = serde_json::from_slice(&plain)?;
    assert_eq!(json["version"], 2);
    Ok(())
}

#[tokio::test]
async fn c08_spec_vectors_accepted_and_produced() -> Result<()> {
    let server_priv = NodePrivate::from_bytes([0x11; 32]);
    let relay = spawn_core_relay_with(DerpServerConfig::new(server_priv), CoreConfig::default()).await;
    let mut s = TcpStream::connect(relay.addr).await?;
    let mut got = [0u8; 45];
    tokio::time::timeout(T, s.read_exact(&mut got)).await??;
    assert_eq!(
        hex::encode(got),
        "010000002844455250f09f94917b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13"
    );
    let client_info = hex::decode("02000000680faa684ed28867b97f4a6a2dee5df8ce974e76b7018e3f22a1c4cf2678570f20000102030405060708090a0b0c0d0e0f1011121314151617a858a062bb55fbd0e565bf952225b5e220ae6ff32ce093a7548f0f9efd7331db8b94711fe4546f1ed0d738121d94abe3")?;
    tokio::io::AsyncWriteExt::write_all(&mut s, &client_info).await?;
    // ServerInfo: header `03 00000035` (24-byte nonce ‖ 16-byte tag ‖ 13 bytes of `{"version":2}`);
    // the server picks its own nonce, so the plaintext is compared byte for byte instead.
    let mut head = [0u8; 5];
    tokio::time::timeout(T, s.read_exact(&mut head)).await??;
    assert_eq!(head, [0x03, 0, 0, 0, 0x35]);
    let mut payload = [0u8; 0x35];
    tokio::time::timeout(T, s.read_exact(&mut payload)).await??;
    let client_priv = NodePrivate::from_bytes([0x22; 32]);
    let plain = open(&client_priv, &relay.key(), &payload).expect("opens");
    assert_eq!(plain, br#"{"version":2}"#);
    Ok(())
}

#[tokio::test]
async fn handshake_bytes_pipelined_after_client_info_are_processed() -> Result<()> {
    // Fast-start clients send ClientInfo and their first frames in one write.
    let relay = spawn_core_relay().await;
    let mut b = relay.client().await?;
    let mut a = TestClient::connect_raw(relay.addr).await?;
    let key = a.key.clone();
    let mut bytes = BytesMut::new();
    let ci = derpfleet_proto::handshake::seal_client_info(&key, &relay.key(), &ClientInfo::default());
    derpfleet_proto::msg::ClientToServer::ClientInfo(ci).encode(&mut bytes);
    derpfleet_proto::msg::ClientToServer::SendPacket {
        dst: b.public(),
        data: bytes::Bytes::from_static(b"early"),
    }
    .encode(&mut bytes);
    a.write_raw(&bytes).await?;
    a.want_server_info().await?;
    assert_eq!(b.want_packet(T).await?, (a.public(), b"early".to_vec()));
    Ok(())
}

#[tokio::test]
async fn mesh_key_holder_is_flagged_and_wrong_mesh_key_is_a_regular_client() -> Result<()> {
    let mesh = MeshKey::generate();
    let config = DerpServerConfig { mesh_key: Some(mesh), ..DerpServerConfig::new(NodePrivate::generate()) };
    let relay = spawn_core_relay_with(config, CoreConfig::default()).await;
    let mut w = TestClient::connect_with(
        relay.addr,
        NodePrivate::generate(),
        derpfleet_relay::testing::mesh_info(mesh),
    )
    .await?;
    w.send(&derpfleet_proto::msg::ClientToServer::WatchConns).await?;
    let (k, _, flags) = w.want_present(T).await?;
    assert_eq!((k, flags), (w.public(), 0x02), "the watcher itself, as a mesh peer");
    let other = TestClient::connect_with(
        relay.addr,
        NodePrivate::generate(),
        derpfleet_relay::testing::mesh_info(MeshKey::generate()),
    )
    .await?;
    let (k, _, flags) = w.want_present(T).await?;
    assert_eq!((k, flags), (other.public(), 0x01), "a wrong mesh key is just a regular client");
    Ok(())
}

/// Rejects every key except one.
struct OnlyKey(derpfleet_proto::NodePublic);

impl derpfleet_relay::core::derp_server::AdmissionCheck for OnlyKey {
    fn check<'a>(
        &'a self,
        key: derpfleet_proto::NodePublic,
        _info: &'a ClientInfo,
        _conn: &'a derpfleet_relay::core::derp_server::ConnInfo,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = derpfleet_relay::core::derp_server::Admission> + Send + 'a>,
    > {
        use derpfleet_relay::core::derp_server::Admission;
        let verdict =
            if key == self.0 { Admission::Allow } else { Admission::Reject("not on the list".into()) };
        Box::pin(async move { verdict })
    }
}

#[tokio::test]
async fn admission_hook_rejects_before_server_info_and_mesh_peers_bypass_it() -> Result<()> {
    use derpfleet_relay::core::derp_server::AdmissionHook;
    let allowed = NodePrivate::generate();
    let mesh = MeshKey::generate();
    let options = CoreConfig {
        admission: Some(AdmissionHook(std::sync::Arc::new(OnlyKey(allowed.public())))),
        ..Default::default()
    };
    let config = DerpServerConfig { mesh_key: Some(mesh), ..DerpServerConfig::new(NodePrivate::generate()) };
    let relay = spawn_core_relay_with(config, options).await;
    let mut ok = TestClient::connect_with(relay.addr, allowed, tailscaled_info()).await?;
    ok.ping_pong(*b"admitted", T).await?;
    let mut c = TestClient::connect_raw(relay.addr).await?;
    let payload = derpfleet_proto::handshake::seal_client_info(&c.key, &relay.key(), &tailscaled_info());
    c.send_frame(FrameType::ClientInfo as u8, &payload).await?;
    want_closed_without_server_info(&mut c).await?;
    let mut m = TestClient::connect_with(
        relay.addr,
        NodePrivate::generate(),
        derpfleet_relay::testing::mesh_info(mesh),
    )
    .await?;
    m.ping_pong(*b"mesh ok!", T).await?;
    Ok(())
}

#[tokio::test]
async fn close_all_closes_connected_and_handshaking_clients() -> Result<()> {
    let relay = spawn_core_relay().await;
    let mut a = relay.client().await?;
    let mut half = TestClient::connect_raw(relay.addr).await?;
    half.write_raw(&[0x02, 0, 0]).await?;
    relay.server.close_all();
    a.want_closed(T).await?;
    half.want_closed(T).await?;
    relay.wait_metric("derp_current_connections", &[], 0.0).await?;
    Ok(())
}
