//! Admission through `-verify-client-url` (against a real local HTTP
//! server) and the allowlist file (reloaded at SIGHUP), in-process and with the real binary.

use crate::http_common;
use crate::ops_common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use derpfleet_proto::handshake::ClientInfo;
use derpfleet_proto::msg::ClientToServer;
use derpfleet_proto::{MeshKey, NodePrivate, NodePublic};
use derpfleet_relay::ops::admission::{Allowlist, VerifyUrl};
use derpfleet_relay::server::{OpsConfig, Server};
use http_common::{config, derp_upgrade, temp_dir, TestClient, STEP};
use ops_common::*;
use tokio::net::TcpStream;

/// Handshakes with `key` (and `info`); Some(client) when a ServerInfo came, None when the server
/// closed instead.
async fn try_connect(addr: SocketAddr, key: &NodePrivate, info: ClientInfo) -> Option<TestClient<TcpStream>> {
    let mut c = TestClient::new(derp_upgrade(addr).await, key.clone());
    c.try_handshake(info).await.unwrap().map(|_| c)
}

fn info() -> ClientInfo {
    ClientInfo { version: 2, can_ack_pings: true, ..Default::default() }
}

async fn admitted(addr: SocketAddr, key: &NodePrivate) -> bool {
    try_connect(addr, key, info()).await.is_some()
}

async fn relay_with_url(url: &str, fail_open: bool) -> Server {
    let ops = OpsConfig {
        verify_url: Some(VerifyUrl::parse(url).unwrap()),
        verify_fail_open: fail_open,
        ..OpsConfig::default()
    };
    Server::spawn_with(config(NodePrivate::generate()), ops).await.unwrap()
}

fn admission_count(server: &Server, result: &str) -> f64 {
    derpfleet_relay::core::metrics::MetricsSnapshot::parse(&server.status().render_metrics())
        .get("derp_admission", &[("result", result)])
}

#[tokio::test]
async fn verify_url_allow_sends_derpers_request() {
    let ctl = CannedHttp::start(200, r#"{"Allow":true}"#, Duration::ZERO).await;
    let server = relay_with_url(&ctl.url(), false).await;
    let key = NodePrivate::generate();
    assert!(admitted(server.local_addr(), &key).await);
    let seen = ctl.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].head.starts_with("POST /verify HTTP/1.1"), "{}", seen[0].head);
    assert!(!seen[0].head.to_ascii_lowercase().contains("content-type"), "derper sets none");
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(body["NodePublic"], key.public().to_string());
    assert!(body["NodePublic"].as_str().unwrap().starts_with("nodekey:"));
    assert_eq!(body["Source"], "127.0.0.1");
    assert_eq!(admission_count(&server, "allowed"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn verify_url_deny_gets_no_server_info() {
    let ctl = CannedHttp::start(200, r#"{"Allow":false}"#, Duration::ZERO).await;
    let server = relay_with_url(&ctl.url(), true).await;
    assert!(!admitted(server.local_addr(), &NodePrivate::generate()).await);
    assert_eq!(admission_count(&server, "rejected"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn verify_url_non_200_or_bad_json_rejects_even_with_fail_open() {
    for (status, body) in [(403, r#"{"Allow":true}"#), (500, ""), (200, "not json"), (200, r#"{"Allow":1}"#)]
    {
        let ctl = CannedHttp::start(status, body, Duration::ZERO).await;
        let server = relay_with_url(&ctl.url(), true).await;
        assert!(!admitted(server.local_addr(), &NodePrivate::generate()).await, "{status} {body}");
        assert_eq!(admission_count(&server, "fail_open"), 0.0);
        server.shutdown().await;
    }
}

#[tokio::test]
async fn verify_url_unreachable_fails_open_or_closed() {
    // A port with nothing listening: connection refused (a transport error).
    let dead = format!("http://127.0.0.1:{}/verify", unused_port());
    let open = relay_with_url(&dead, true).await;
    assert!(admitted(open.local_addr(), &NodePrivate::generate()).await);
    assert_eq!(admission_count(&open, "fail_open"), 1.0);
    open.shutdown().await;
    let closed = relay_with_url(&dead, false).await;
    assert!(!admitted(closed.local_addr(), &NodePrivate::generate()).await);
    assert_eq!(admission_count(&closed, "fail_closed"), 1.0);
    closed.shutdown().await;
}

#[tokio::test]
async fn verify_url_timeout_is_a_transport_error() {
    // The controller answers after derper's 5 s timeout: treated as unreachable (fail open here).
    let slow = CannedHttp::start(200, r#"{"Allow":false}"#, Duration::from_secs(7)).await;
    let server = relay_with_url(&slow.url(), true).await;
    let t = tokio::time::Instant::now();
    assert!(admitted(server.local_addr(), &NodePrivate::generate()).await);
    assert!(t.elapsed() >= Duration::from_secs(5));
    assert_eq!(admission_count(&server, "fail_open"), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn mesh_key_holders_bypass_admission() {
    let ctl = CannedHttp::start(200, r#"{"Allow":false}"#, Duration::ZERO).await;
    let mesh = MeshKey::generate();
    let mut cfg = config(NodePrivate::generate());
    cfg.derp.mesh_key = Some(mesh);
    let dir = temp_dir("ops-allow-mesh");
    let list = dir.path().join("allow.txt");
    std::fs::write(&list, "# nobody\n").unwrap();
    let ops = OpsConfig {
        verify_url: Some(VerifyUrl::parse(&ctl.url()).unwrap()),
        verify_fail_open: false,
        allowlist: Some(Arc::new(Allowlist::load(&list).unwrap())),
        ..OpsConfig::default()
    };
    let server = Server::spawn_with(cfg, ops).await.unwrap();
    let mesh_info = ClientInfo { mesh_key: Some(mesh), version: 2, ..Default::default() };
    assert!(try_connect(server.local_addr(), &NodePrivate::generate(), mesh_info).await.is_some());
    assert!(!admitted(server.local_addr(), &NodePrivate::generate()).await);
    assert!(ctl.seen.lock().unwrap().is_empty(), "the allowlist refused before asking the URL");
    server.shutdown().await;
}

fn write_allowlist(path: &std::path::Path, keys: &[NodePublic]) {
    let mut text = String::from("# allowed node keys\n");
    for k in keys {
        text.push_str(&format!("{k}  # a node\n"));
    }
    // Replace atomically so a reload never sees half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Sends a packet a → b and expects it at b.
async fn relays(a: &mut TestClient<TcpStream>, b: &mut TestClient<TcpStream>, b_key: NodePublic) {
    a.send(&ClientToServer::SendPacket { dst: b_key, data: bytes::Bytes::from_static(b"hello") })
        .await
        .unwrap();
    assert_eq!(b.want_packet(STEP).await.unwrap().1, b"hello");
}

#[tokio::test]
async fn allowlist_reload_changes_admission_without_dropping_clients() {
    let dir = temp_dir("ops-allow");
    let list = dir.path().join("allow.txt");
    let (k1, k2, k3) = (NodePrivate::generate(), NodePrivate::generate(), NodePrivate::generate());
    write_allowlist(&list, &[k1.public(), k2.public()]);
    let ops =
        OpsConfig { allowlist: Some(Arc::new(Allowlist::load(&list).unwrap())), ..OpsConfig::default() };
    let server = Server::spawn_with(config(NodePrivate::generate()), ops).await.unwrap();
    let addr = server.local_addr();
    let mut c1 = try_connect(addr, &k1, info()).await.expect("k1 listed");
    let mut c2 = try_connect(addr, &k2, info()).await.expect("k2 listed");
    assert!(!admitted(addr, &k3).await, "k3 not listed yet");

    // Swap k2 for k3 and reload (what SIGHUP does).
    write_allowlist(&list, &[k1.public(), k3.public()]);
    let report = server.reload();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.allowlist_keys, Some(2));
    let mut c3 = try_connect(addr, &k3, info()).await.expect("k3 listed now");
    assert!(!admitted(addr, &k2).await, "k2 no longer listed");
    // Clients already connected, including the delisted k2, keep relaying.
    relays(&mut c1, &mut c2, k2.public()).await;
    relays(&mut c2, &mut c3, k3.public()).await;

    // A broken file keeps the previous list and reports the line.
    std::fs::write(&list, "nodekey:1234\n").unwrap();
    let report = server.reload();
    assert_eq!(report.errors.len(), 1);
    assert!(report.errors[0].contains("allow.txt:1"), "{:?}", report.errors);
    assert!(admitted(addr, &k3).await, "old list still in force");
    server.shutdown().await;
}

#[tokio::test]
async fn allowlist_reloads_on_sighup_in_the_binary() {
    let dir = temp_dir("ops-allow-bin");
    let list = dir.path().join("allow.txt");
    let (k1, k2) = (NodePrivate::generate(), NodePrivate::generate());
    write_allowlist(&list, &[k1.public()]);
    let key = dir.path().join("derper.key");
    let (p, addr) = start_plain_relay(&key, &["-allowlist", list.to_str().unwrap()]);
    let mut c1 = try_connect(addr, &k1, info()).await.expect("k1 listed");
    assert!(!admitted(addr, &k2).await);
    write_allowlist(&list, &[k1.public(), k2.public()]);
    p.signal("-HUP");
    p.wait_for_line("SIGHUP: reloaded");
    let mut c2 = try_connect(addr, &k2, info()).await.expect("k2 listed after SIGHUP");
    relays(&mut c1, &mut c2, k2.public()).await;
    relays(&mut c2, &mut c1, k1.public()).await;
    assert!(!p.log().contains("panicked"), "{}", p.log());
}
