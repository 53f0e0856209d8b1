//! Certificate files replaced on disk are picked up without a restart: a
//! new TLS connection sees the new certificate, connections made before keep working, and a
//! broken replacement keeps the served certificate.

use crate::http_common;
use crate::ops_common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::NodePrivate;
use derpfleet_relay::core::metrics::MetricsSnapshot;
use derpfleet_relay::http::tls::{self_signed_ip_cert, sha256_raw_name};
use derpfleet_relay::server::{OpsConfig, Server};
use http_common::*;
use ops_common::WAIT;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

fn pin_of_pem(pem: &str) -> [u8; 32] {
    let der: CertificateDer<'static> = rustls_pemfile::certs(&mut pem.as_bytes()).next().unwrap().unwrap();
    pin_of(&sha256_raw_name(&der))
}

/// Replaces a file atomically (write elsewhere, rename over), as deployment tools do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A TLS connection pinned to `pin` completes its handshake.
async fn tls_ok(addr: SocketAddr, pin: [u8; 32]) -> bool {
    tls_connect(addr, pinned_client(pin, &[&rustls::version::TLS13])).await.is_ok()
}

#[tokio::test]
async fn replaced_certificate_files_are_served_to_new_connections_only() {
    let dir = temp_dir("ops-certs");
    let key = NodePrivate::generate();
    let setup = derpfleet_relay::http::tls::manual(dir.path(), "127.0.0.1", &key.public()).unwrap();
    let crt_path = setup.cert_path.clone();
    let key_path = crt_path.with_extension("key");
    let pin1 = pin_of_pem(&std::fs::read_to_string(&crt_path).unwrap());
    let mut cfg = config(key.clone());
    cfg.tls = Some(setup.config.clone());
    let ops = OpsConfig {
        cert_reloader: setup.reloader.clone(),
        cert_reload_interval: Some(Duration::from_millis(100)),
        ..OpsConfig::default()
    };
    let server = Server::spawn_with(cfg, ops).await.unwrap();
    let addr = server.local_addr();

    // A DERP client over TLS with the first certificate.
    let mut tls = tls_connect(addr, pinned_client(pin1, &[&rustls::version::TLS13])).await.unwrap();
    tls.write_all(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_head(&mut tls).await.status, 101);
    let mut old = TestClient::over(tls, NodePrivate::generate()).await.unwrap();

    // Replace key and certificate (key first: for a moment the pair does not match).
    let (crt2, key2) = self_signed_ip_cert("127.0.0.1".parse().unwrap()).unwrap();
    let pin2 = pin_of_pem(&crt2);
    replace(&key_path, &key2);
    replace(&crt_path, &crt2);
    let deadline = Instant::now() + WAIT;
    while !tls_ok(addr, pin2).await {
        assert!(Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!tls_ok(addr, pin1).await, "new connections no longer get the old certificate");
    // The connection made with the old certificate lives on.
    old.send(&ClientToServer::Ping(*b"still ok")).await.unwrap();
    assert_eq!(old.next_data(STEP).await.unwrap(), Some(ServerToClient::Pong(*b"still ok")));

    // A broken replacement is refused; the current certificate stays.
    replace(&crt_path, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
    let deadline = Instant::now() + WAIT;
    loop {
        let m = MetricsSnapshot::parse(&server.status().render_metrics());
        if m.get("derp_cert_reloads", &[("result", "error")]) >= 1.0 {
            assert!(m.get("derp_cert_reloads", &[("result", "ok")]) >= 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "the broken file was not noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tls_ok(addr, pin2).await, "still serving the last good certificate");
    server.shutdown().await;
}
