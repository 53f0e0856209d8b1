//! `-secrets-url`: the mesh key from setec (a stand-in server, `ops_common::setec`), its file
//! cache at `-secrets-cache-dir`, and derper's `-secrets-path-prefix`.

use crate::http_common;
use crate::ops_common;

use derpfleet_proto::handshake::ClientInfo;
use derpfleet_proto::{MeshKey, NodePrivate};
use http_common::{derp_upgrade, temp_dir, TestClient};
use ops_common::setec::SetecServer;
use ops_common::*;

/// Handshakes; true when a ServerInfo came (admitted).
async fn admitted(addr: std::net::SocketAddr, info: ClientInfo) -> bool {
    let mut c = TestClient::new(derp_upgrade(addr).await, NodePrivate::generate());
    c.try_handshake(info).await.unwrap().is_some()
}

fn mesh_info(key: MeshKey) -> ClientInfo {
    ClientInfo { mesh_key: Some(key), version: 2, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_key_comes_from_setec_then_from_its_cache() {
    let hex = "5e".repeat(32);
    let key = MeshKey::parse(&hex).unwrap();
    let setec = SetecServer::start(&[("eu/derp/meshkey", &hex)]).await;
    let dir = temp_dir("setec");
    let cache = dir.path().join("cache").join("derper-secrets");
    // An empty allowlist: only holders of the mesh key get in.
    let allow = dir.path().join("allow.txt");
    std::fs::write(&allow, "# nobody\n").unwrap();
    let args = |url: &str| {
        vec![
            "-secrets-url".to_owned(),
            url.to_owned(),
            "-secrets-path-prefix".to_owned(),
            "eu/derp".to_owned(),
            "-secrets-cache-dir".to_owned(),
            cache.to_str().unwrap().to_owned(),
            "-allowlist".to_owned(),
            allow.to_str().unwrap().to_owned(),
        ]
    };
    let a = args(&setec.url());
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let (p, addr) = start_plain_relay(&dir.path().join("k.key"), &refs);
    assert_eq!(setec.asked.lock().unwrap().as_slice(), ["eu/derp/meshkey"]);
    assert!(admitted(addr, mesh_info(key)).await, "the setec mesh key is the relay's");
    assert!(!admitted(addr, mesh_info(MeshKey::generate())).await, "another key is not");
    // The cache is setec's format, mode 0600.
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert!(v["eu/derp/meshkey"]["secret"]["Value"].is_string(), "{v}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cache).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    drop(p);

    // setec is down now: the cached value is used.
    drop(setec);
    let dead = format!("http://127.0.0.1:{}", unused_port());
    let a = args(&dead);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let (p, addr) = start_plain_relay(&dir.path().join("k.key"), &refs);
    assert!(admitted(addr, mesh_info(key)).await, "from the cache");
    assert!(p.log().contains("from the cache"), "{}", p.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_setec_without_cache_retries_and_says_why() {
    let dir = temp_dir("setec-down");
    let dead = format!("http://127.0.0.1:{}", unused_port());
    let cache = dir.path().join("derper-secrets");
    let key = dir.path().join("k.key");
    let p = Proc::start_without_stun(&[
        "-a",
        &format!("127.0.0.1:{}", unused_port()),
        "-c",
        key.to_str().unwrap(),
        "-metrics-addr=",
        "-secrets-url",
        &dead,
        "-secrets-cache-dir",
        cache.to_str().unwrap(),
    ]);
    let line = p.wait_for_line("retrying");
    assert!(line.contains("prod/derp/meshkey") && line.contains(&dead), "{line}");
    assert!(!p.log().contains("derpfleet-relay running"), "no start without the mesh key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_secret_is_retried_not_guessed() {
    let setec = SetecServer::start(&[("other/meshkey", &"11".repeat(32))]).await;
    let dir = temp_dir("setec-404");
    let key = dir.path().join("k.key");
    let p = Proc::start_without_stun(&[
        "-a",
        &format!("127.0.0.1:{}", unused_port()),
        "-c",
        key.to_str().unwrap(),
        "-metrics-addr=",
        "-secrets-url",
        &setec.url(),
        "-secrets-cache-dir",
        dir.path().join("cache").to_str().unwrap(),
    ]);
    let line = p.wait_for_line("retrying");
    assert!(line.contains("secret not found"), "{line}");
}
