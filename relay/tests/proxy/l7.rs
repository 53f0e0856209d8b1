//! The real nginx and Caddy terminating TLS in front of a plain-HTTP relay binary started with
//! `-forwarded-trusted 127.0.0.1` (the proxies connect from there). DERP over `Upgrade: DERP` and
//! over WebSocket (`derp` subprotocol) relays through each; `-verify-client-url` and PeerPresent
//! see each client's own 127.0.0.x address; an `X-Forwarded-For` the client forges is not
//! believed, neither through the proxy nor sent directly from an untrusted address.

use crate::http_common;
use crate::ops_common;
use crate::proxy_common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use derpfleet_proto::NodePrivate;
use http_common::{read_head, temp_dir, TestClient};
use ops_common::{start_plain_relay, unused_port, CannedHttp, Proc};
use proxy_common::*;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// The relay behind the proxy, an allow-all admission controller, and the mesh key.
async fn relay(dir: &Path, trusted: &str) -> (Proc, SocketAddr, CannedHttp, derpfleet_proto::MeshKey) {
    let ctl = CannedHttp::start(200, r#"{"Allow":true}"#, Duration::ZERO).await;
    let (mesh_file, mesh) = mesh_key_file(dir);
    let (p, addr) = start_plain_relay(
        &dir.join("relay.key"),
        &[
            "-forwarded-trusted",
            trusted,
            "-verify-client-url",
            &ctl.url(),
            "-mesh-psk-file",
            mesh_file.to_str().unwrap(),
        ],
    );
    (p, addr, ctl, mesh)
}

/// nginx terminating TLS on `port` and proxying everything (upgrades included) to `relay`.
fn nginx(dir: &Path, port: u16, relay: SocketAddr) -> Daemon {
    let (cert, key) = self_signed(dir);
    let d = dir.display();
    let conf = format!(
        r#"user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log info;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://{relay};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"#,
        cert = cert.display(),
        key = key.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let p = path.to_str().unwrap();
    let check =
        std::process::Command::new("nginx").args(["-t", "-p", &d.to_string(), "-c", p]).output().unwrap();
    assert!(check.status.success(), "nginx -t: {}", String::from_utf8_lossy(&check.stderr));
    let mut n = Daemon::start("nginx", "nginx", &["-p", &d.to_string(), "-c", p], dir, &[]);
    n.wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    n
}

/// Caddy terminating TLS on `port` for `localhost` and reverse-proxying to `relay`.
fn caddy(dir: &Path, port: u16, relay: SocketAddr) -> Daemon {
    let (cert, key) = self_signed(dir);
    let conf = format!(
        "{{\n\tadmin off\n\tauto_https disable_redirects\n\tskip_install_trust\n\tstorage file_system {d}/caddy-data\n}}\n\n\
         https://localhost:{port} {{\n\tbind 127.0.0.1\n\ttls {cert} {key}\n\treverse_proxy {relay} {{\n\t\tflush_interval -1\n\t}}\n}}\n",
        d = dir.display(),
        cert = cert.display(),
        key = key.display(),
    );
    let path = dir.join("Caddyfile");
    std::fs::write(&path, conf).unwrap();
    let env = [("HOME", dir), ("XDG_DATA_HOME", dir), ("XDG_CONFIG_HOME", dir)];
    let args = ["run", "--config", path.to_str().unwrap(), "--adapter", "caddyfile"];
    let mut c = Daemon::start("caddy", "caddy", &args, dir, &env);
    c.wait_listening(SocketAddr::from(([127, 0, 0, 1], port)));
    c
}

/// TLS to the proxy at 127.0.0.1:`port` (SNI `localhost`) from `from`, accepting exactly the
/// proxy's certificate.
async fn tls_from(
    from: &str,
    port: u16,
    dir: &Path,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let pem = std::fs::read(dir.join("proxy.crt")).unwrap();
    let der = rustls_pemfile::certs(&mut &pem[..]).next().unwrap().unwrap();
    let pin: [u8; 32] = Sha256::digest(&der).into();
    let config = http_common::pinned_client(pin, &[&rustls::version::TLS13, &rustls::version::TLS12]);
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let tcp = s.connect(SocketAddr::from(([127, 0, 0, 1], port))).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.unwrap()
}

/// A raw DERP upgrade with a forged `X-Forwarded-For`, handshaken with a fresh key.
async fn forged_upgrade<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    s.write_all(
        b"GET /derp HTTP/1.1\r\nHost: localhost\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\
          X-Forwarded-For: 192.0.2.66\r\nForwarded: for=192.0.2.67\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(read_head(&mut s).await.status, 101);
    TestClient::over(s, NodePrivate::generate()).await.unwrap();
}

/// The common checks for one L7 proxy listening with TLS on `port` for `localhost`.
async fn check_l7_proxy(
    port: u16,
    relay: SocketAddr,
    ctl: &CannedHttp,
    mesh: derpfleet_proto::MeshKey,
    dir: &Path,
) {
    let (_wtx, mut watch) = watcher(&format!("http://{relay}/derp"), mesh).await;
    let url = format!("https://localhost:{port}/derp");
    let a = connect(&url, "127.0.0.2", false).await.expect("Upgrade: DERP through the proxy");
    let mut b = connect(&url, "127.0.0.3", true).await.expect("WebSocket DERP through the proxy");
    relay_one(&a, &mut b, b"derp upgrade to websocket").await;
    let mut a = a;
    relay_one(&b, &mut a, b"websocket to derp upgrade").await;
    assert_eq!(sources(&ctl.seen), ["127.0.0.2", "127.0.0.3"]);
    let ep = peer_present(&mut watch, a.key.public()).await.unwrap().unwrap();
    assert_eq!(ep.ip().to_string(), "127.0.0.2");
    // A forged X-Forwarded-For/Forwarded through the proxy: the proxy's own hop wins.
    forged_upgrade(tls_from("127.0.0.4", port, dir).await).await;
    // Sent straight to the relay from an untrusted address: ignored.
    let s = tokio::net::TcpSocket::new_v4().unwrap();
    s.bind("127.0.0.5:0".parse().unwrap()).unwrap();
    forged_upgrade(s.connect(relay).await.unwrap()).await;
    assert_eq!(sources(&ctl.seen), ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_terminates_tls_and_forwards_derp_and_websocket() {
    let dir = temp_dir("l7-nginx");
    let (_relay, relay, ctl, mesh) = relay(dir.path(), "127.0.0.1").await;
    let port = unused_port();
    let _nginx = nginx(dir.path(), port, relay);
    check_l7_proxy(port, relay, &ctl, mesh, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_terminates_tls_and_forwards_derp_and_websocket() {
    let dir = temp_dir("l7-caddy");
    let (_relay, relay, ctl, mesh) = relay(dir.path(), "127.0.0.1").await;
    let port = unused_port();
    let _caddy = caddy(dir.path(), port, relay);
    check_l7_proxy(port, relay, &ctl, mesh, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_proxy_is_not_believed() {
    // The same nginx, but the relay trusts nobody: every client is the proxy, 127.0.0.1.
    let dir = temp_dir("l7-untrusted");
    let (_relay, relay, ctl, _mesh) = relay(dir.path(), "").await;
    let port = unused_port();
    let _nginx = nginx(dir.path(), port, relay);
    let url = format!("https://localhost:{port}/derp");
    let a = connect(&url, "127.0.0.2", false).await.unwrap();
    let mut b = connect(&url, "127.0.0.3", true).await.unwrap();
    relay_one(&a, &mut b, b"still relays").await;
    assert_eq!(sources(&ctl.seen), ["127.0.0.1", "127.0.0.1"]);
}
