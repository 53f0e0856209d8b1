//! The real HAProxy (TCP mode) in front of the relay binary with `-proxy-protocol-trusted`:
//! `send-proxy-v2` and `send-proxy` (v1), plain and TLS passthrough, and HAProxy's own health
//! checks (v2 `LOCAL`). Clients bind distinct 127.0.0.x source addresses; HAProxy connects to the
//! relay from 127.0.0.9 (`source`), the only trusted address. The relay must see each client's
//! own address in `-verify-client-url`, the per-IP accept limiter and PeerPresent, and must not
//! believe a PROXY line from anyone else.

use crate::ops_common;
use crate::proxy_common;

use derpfleet_relay::testing::temp_dir;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ops_common::{scrape, start_plain_relay, unused_port, CannedHttp};
use proxy_common::*;

/// HAProxy with one TCP frontend per `(listen port, server line)`.
fn haproxy(dir: &Path, routes: &[(u16, String)]) -> Daemon {
    let mut cfg = format!(
        "global\n  stats socket {}/admin.sock mode 600 level admin\n\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n",
        dir.display()
    );
    for (i, (port, server)) in routes.iter().enumerate() {
        cfg.push_str(&format!(
            "frontend f{i}\n  bind 127.0.0.1:{port}\n  default_backend b{i}\n\n\
             backend b{i}\n  server relay {server}\n\n"
        ));
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, &cfg).unwrap();
    let check = std::process::Command::new("haproxy").args(["-c", "-f"]).arg(&path).output().unwrap();
    assert!(check.status.success(), "haproxy -c: {}\n{cfg}", String::from_utf8_lossy(&check.stderr));
    let mut d = Daemon::start("haproxy", "haproxy", &["-db", "-f", path.to_str().unwrap()], dir, &[]);
    for (port, _) in routes {
        d.wait_listening(SocketAddr::from(([127, 0, 0, 1], *port)));
    }
    d
}

/// `show stat` over HAProxy's admin socket.
fn haproxy_stat(dir: &Path) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(dir.join("admin.sock")).unwrap();
    s.write_all(b"show stat\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v1_and_v2_give_the_relay_each_clients_address() {
    let dir = temp_dir("pp-haproxy");
    let ctl = CannedHttp::start(200, r#"{"Allow":true}"#, Duration::ZERO).await;
    let (mesh_file, mesh) = mesh_key_file(dir.path());
    let metrics = SocketAddr::from(([127, 0, 0, 1], unused_port()));
    let (relay_proc, relay) = start_plain_relay(
        &dir.path().join("relay.key"),
        &[
            "-proxy-protocol-trusted",
            "127.0.0.9",
            "-verify-client-url",
            &ctl.url(),
            "-verify-client-url-fail-open=false",
            // One connection per client address, ever (the bucket refills in 1000 s).
            "-accept-connection-limit-per-ip",
            "0.001",
            "-accept-connection-burst-per-ip",
            "1",
            "-mesh-psk-file",
            mesh_file.to_str().unwrap(),
            "-metrics-addr",
            &metrics.to_string(),
        ],
    );
    let (v2_port, v1_port) = (unused_port(), unused_port());
    let _hap = haproxy(
        dir.path(),
        &[
            (v2_port, format!("{relay} send-proxy-v2 source 127.0.0.9")),
            (v1_port, format!("{relay} send-proxy source 127.0.0.9")),
        ],
    );
    let (v2_url, v1_url) =
        (format!("http://127.0.0.1:{v2_port}/derp"), format!("http://127.0.0.1:{v1_port}/derp"));
    // The mesh watcher dials the relay directly from 127.0.0.1 (not trusted: no header).
    let (_wtx, mut watch) = watcher(&format!("http://{relay}/derp"), mesh).await;

    let a = connect(&v2_url, "127.0.0.2", false).await.expect("client A through send-proxy-v2");
    let mut b = connect(&v1_url, "127.0.0.3", false).await.expect("client B through send-proxy (v1)");
    relay_one(&a, &mut b, b"through haproxy").await;
    assert_eq!(sources(&ctl.seen), ["127.0.0.2", "127.0.0.3"]);
    let present = |r: anyhow::Result<Option<SocketAddr>>| match r {
        Ok(Some(ep)) => ep,
        other => panic!("PeerPresent: {other:?}; relay log:\n{}", relay_proc.log()),
    };
    let ep_a = present(peer_present(&mut watch, a.key.public()).await);
    let ep_b = present(peer_present(&mut watch, b.key.public()).await);
    assert_eq!((ep_a.ip().to_string(), ep_b.ip().to_string()), ("127.0.0.2".into(), "127.0.0.3".into()));
    assert_ne!(ep_a.port(), v2_port, "the client's own port, not HAProxy's");

    // The per-IP limiter sees the clients, not HAProxy: 127.0.0.2 has used its one connection,
    // 127.0.0.4 has not, although both arrive from 127.0.0.9.
    assert!(connect(&v2_url, "127.0.0.2", false).await.is_err(), "second connection of 127.0.0.2");
    // (The client may retry a failed dial; each retry is refused too.)
    let refused = scrape(metrics).await.get("derp_accept_rejected", &[("reason", "per_ip")]);
    assert!(refused >= 1.0, "per-IP refusals: {refused}");
    let c = connect(&v2_url, "127.0.0.4", false).await.expect("client C");
    relay_one(&c, &mut b, b"third").await;

    // Forged headers are not believed. Through HAProxy the client's own PROXY line arrives after
    // HAProxy's real header: it is the HTTP request, a bad one.
    let forged = b"PROXY TCP4 192.0.2.66 127.0.0.1 1234 443\r\nGET /derp HTTP/1.1\r\nUpgrade: DERP\r\n\r\n";
    let answer = raw_from("127.0.0.5", SocketAddr::from(([127, 0, 0, 1], v2_port)), forged).await;
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));
    // Directly from an untrusted address the line is never parsed either.
    let answer = raw_from("127.0.0.6", relay, forged).await;
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));
    let snap = scrape(metrics).await;
    // A, B, C, the forged request through HAProxy and each refused dial of 127.0.0.2 (plus the
    // fixture's port probes that HAProxy forwarded); none was rejected.
    assert!(snap.get("derp_proxy_protocol_headers", &[("result", "proxied")]) >= 4.0 + refused);
    for reason in ["malformed", "oversized", "timeout", "truncated"] {
        assert_eq!(snap.get("derp_proxy_protocol_rejected", &[("reason", reason)]), 0.0, "{reason}");
    }
    assert!(!sources(&ctl.seen).iter().any(|s| s == "192.0.2.66"));
    assert_eq!(sources(&ctl.seen), ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_tls_passthrough_with_local_health_checks() {
    let dir = temp_dir("pp-haproxy-tls");
    let ctl = CannedHttp::start(200, r#"{"Allow":true}"#, Duration::ZERO).await;
    let metrics = SocketAddr::from(([127, 0, 0, 1], unused_port()));
    let (_relay, relay) = start_plain_relay(
        &dir.path().join("relay.key"),
        &[
            "-certmode",
            "manual",
            "-hostname",
            "127.0.0.1",
            "-certdir",
            dir.path().to_str().unwrap(),
            "-http-port",
            "-1",
            "-proxy-protocol-trusted",
            "127.0.0.9",
            "-verify-client-url",
            &ctl.url(),
            "-metrics-addr",
            &metrics.to_string(),
        ],
    );
    let port = unused_port();
    // TCP health checks every 200 ms; with send-proxy-v2 HAProxy opens each with a LOCAL header.
    let _hap =
        haproxy(dir.path(), &[(port, format!("{relay} send-proxy-v2 source 127.0.0.9 check inter 200ms"))]);
    let url = format!("https://127.0.0.1:{port}/derp");
    let mut a = connect(&url, "127.0.0.2", false).await.expect("client A over TLS through HAProxy");
    let mut b = connect(&url, "127.0.0.3", true).await.expect("client B, WebSocket over TLS through HAProxy");
    relay_one(&a, &mut b, b"tls passthrough").await;
    relay_one(&b, &mut a, b"and back").await;
    assert_eq!(sources(&ctl.seen), ["127.0.0.2", "127.0.0.3"]);

    // The health checks were LOCAL (counted, the balancer's address kept) and HAProxy sees the
    // server up.
    let deadline = Instant::now() + WAIT;
    loop {
        let local = scrape(metrics).await.get("derp_proxy_protocol_headers", &[("result", "local")]);
        let stat = haproxy_stat(dir.path());
        let up = stat.lines().any(|l| l.starts_with("b0,relay,") && l.contains(",UP,"));
        if local >= 3.0 && up {
            break;
        }
        assert!(Instant::now() < deadline, "local={local}, stat:\n{stat}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snap = scrape(metrics).await;
    assert_eq!(snap.get("derp_proxy_protocol_rejected", &[("reason", "malformed")]), 0.0);
    assert!(snap.get("derp_proxy_protocol_headers", &[("result", "proxied")]) >= 2.0);
}
