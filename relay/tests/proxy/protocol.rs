//! PROXY protocol on the relay's listeners, in process, with hand-written v1/v2 headers: the
//! header's address reaches `-verify-client-url`, the per-IP accept limiter and PeerPresent;
//! untrusted peers are never parsed; malformed, oversized, truncated and late headers close only
//! their own connection and are counted by reason. (The real HAProxy: `proxy_haproxy.rs`.)

use crate::http_common;
use crate::ops_common;

use std::net::SocketAddr;
use std::time::Duration;

use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::{MeshKey, NodePrivate};
use derpfleet_relay::core::metrics::MetricsSnapshot;
use derpfleet_relay::ops::admission::VerifyUrl;
use derpfleet_relay::ops::ratelimit::AcceptRate;
use derpfleet_relay::server::{OpsConfig, Server};
use http_common::{config, read_head, TestClient, STEP};
use ops_common::CannedHttp;
use ppp::v2;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const UPGRADE: &[u8] = b"GET /derp HTTP/1.1\r\nHost: relay\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n";

fn v2_proxy(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    v2::Builder::with_addresses(0x21, v2::Protocol::Stream, (src, dst)).build().unwrap()
}

fn v2_local() -> Vec<u8> {
    v2::Builder::with_addresses(0x20, v2::Protocol::Unspecified, v2::Addresses::Unspecified).build().unwrap()
}

fn v1_proxy(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    format!("PROXY TCP4 {} {} {} {}\r\n", src.ip(), dst.ip(), src.port(), dst.port()).into_bytes()
}

/// Connects from `from` (a 127.0.0.x address) to `to`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{from}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

/// Sends `prefix` then a DERP upgrade and handshakes with `key`; Some when a ServerInfo came.
async fn derp_via(
    from: &str,
    to: SocketAddr,
    prefix: &[u8],
    key: &NodePrivate,
) -> Option<TestClient<TcpStream>> {
    let mut s = connect_from(from, to).await;
    s.write_all(&[prefix, UPGRADE].concat()).await.unwrap();
    let mut first = [0u8; 1];
    match tokio::time::timeout(STEP, s.peek(&mut first)).await.expect("no answer") {
        Ok(0) | Err(_) => return None,
        Ok(_) => {}
    }
    let head = read_head(&mut s).await;
    if head.status != 101 {
        return None;
    }
    let mut c = TestClient::new(s, key.clone());
    match c.try_handshake(http_common::tailscaled_info()).await {
        Ok(Some(_)) => Some(c),
        _ => None,
    }
}

/// Whether the server closed the connection (EOF or reset) within [`STEP`], having sent `want`.
async fn closed_after(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await.expect("connection left open");
    out
}

fn metric(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    MetricsSnapshot::parse(&server.status().render_metrics()).get(name, labels)
}

async fn relay(ops: OpsConfig) -> Server {
    Server::spawn_with(config(NodePrivate::generate()), ops).await.unwrap()
}

fn trusting(nets: &str) -> OpsConfig {
    OpsConfig { proxy_protocol_trusted: nets.parse().unwrap(), ..OpsConfig::default() }
}

fn sources(ctl: &CannedHttp) -> Vec<String> {
    ctl.seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| {
            serde_json::from_slice::<serde_json::Value>(&s.body).unwrap()["Source"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn v1_and_v2_addresses_reach_admission_and_the_per_ip_limiter() {
    let ctl = CannedHttp::start(200, r#"{"Allow":true}"#, Duration::ZERO).await;
    let ops = OpsConfig {
        verify_url: Some(VerifyUrl::parse(&ctl.url()).unwrap()),
        verify_fail_open: false,
        // One connection per source IP (the bucket refills once a thousand seconds).
        accept_limit_per_ip: AcceptRate { per_second: 0.001, burst: 1 },
        ..trusting("127.0.0.9")
    };
    let server = relay(ops).await;
    let addr = server.local_addr();
    let a: SocketAddr = "198.51.100.7:40001".parse().unwrap();
    let b: SocketAddr = "198.51.100.8:40002".parse().unwrap();
    let _ca =
        derp_via("127.0.0.9", addr, &v2_proxy(a, addr), &NodePrivate::generate()).await.expect("v2 client");
    let _cb =
        derp_via("127.0.0.9", addr, &v1_proxy(b, addr), &NodePrivate::generate()).await.expect("v1 client");
    assert_eq!(sources(&ctl), ["198.51.100.7", "198.51.100.8"]);
    // Both came from the balancer 127.0.0.9, yet each client address has its own bucket: a second
    // connection for 198.51.100.7 is refused, one for a third address is not.
    assert!(derp_via("127.0.0.9", addr, &v2_proxy(a, addr), &NodePrivate::generate()).await.is_none());
    assert_eq!(metric(&server, "derp_accept_rejected", &[("reason", "per_ip")]), 1.0);
    let c: SocketAddr = "[2001:db8::3]:40003".parse().unwrap();
    let v6 = v2::Builder::with_addresses(
        0x21,
        v2::Protocol::Stream,
        (c, "[2001:db8::1]:443".parse::<SocketAddr>().unwrap()),
    )
    .build()
    .unwrap();
    assert!(derp_via("127.0.0.9", addr, &v6, &NodePrivate::generate()).await.is_some());
    assert_eq!(sources(&ctl).last().unwrap(), "2001:db8::3");
    assert_eq!(metric(&server, "derp_proxy_protocol_headers", &[("result", "proxied")]), 4.0);
    server.shutdown().await;
}

#[tokio::test]
async fn peer_present_carries_the_proxied_address() {
    let mesh = MeshKey::from_bytes([7; 32]);
    let mut cfg = config(NodePrivate::generate());
    cfg.derp.mesh_key = Some(mesh);
    let server = Server::spawn_with(cfg, trusting("127.0.0.9")).await.unwrap();
    let addr = server.local_addr();
    // A mesh watcher connects directly (untrusted peer: no header expected).
    let watcher_key = NodePrivate::generate();
    let mut w = TestClient::new(http_common::derp_upgrade(addr).await, watcher_key);
    let info =
        derpfleet_proto::handshake::ClientInfo { version: 2, mesh_key: Some(mesh), ..Default::default() };
    w.handshake(info).await.unwrap();
    w.send(&ClientToServer::WatchConns).await.unwrap();
    let client: SocketAddr = "203.0.113.44:5555".parse().unwrap();
    let key = NodePrivate::generate();
    let _c = derp_via("127.0.0.9", addr, &v2_proxy(client, addr), &key).await.expect("proxied client");
    let seen = tokio::time::timeout(STEP, async {
        loop {
            match w.next(STEP).await.unwrap() {
                Some(ServerToClient::PeerPresent { key: k, endpoint, .. }) if k == key.public() => {
                    return endpoint
                }
                Some(_) => continue,
                None => panic!("watcher closed"),
            }
        }
    })
    .await
    .expect("no PeerPresent");
    assert_eq!(seen, Some(client));
    server.shutdown().await;
}

#[tokio::test]
async fn untrusted_peers_are_never_parsed() {
    let ctl = CannedHttp::start(200, r#"{"Allow":true}"#, Duration::ZERO).await;
    let ops = OpsConfig { verify_url: Some(VerifyUrl::parse(&ctl.url()).unwrap()), ..trusting("127.0.0.9") };
    let server = relay(ops).await;
    let addr = server.local_addr();
    // From 127.0.0.5 a PROXY line is just a bad request.
    let forged = v1_proxy("192.0.2.66:1".parse().unwrap(), addr);
    let mut s = connect_from("127.0.0.5", addr).await;
    s.write_all(&[&forged[..], UPGRADE].concat()).await.unwrap();
    let answer = closed_after(&mut s).await;
    assert!(answer.starts_with(b"HTTP/1.1 400"), "{}", String::from_utf8_lossy(&answer));
    let mut s = connect_from("127.0.0.5", addr).await;
    s.write_all(&[&v2_proxy("192.0.2.66:1".parse().unwrap(), addr)[..], UPGRADE].concat()).await.unwrap();
    assert!(closed_after(&mut s).await.starts_with(b"HTTP/1.1 400"));
    // Without a header it is an ordinary client, admitted by its own address.
    assert!(derp_via("127.0.0.5", addr, b"", &NodePrivate::generate()).await.is_some());
    assert_eq!(sources(&ctl), ["127.0.0.5"]);
    assert_eq!(metric(&server, "derp_proxy_protocol_headers", &[("result", "proxied")]), 0.0);
    server.shutdown().await;
}

#[tokio::test]
async fn local_keeps_the_balancer_address_and_serves_health_checks() {
    let server = relay(trusting("127.0.0.0/8")).await;
    let addr = server.local_addr();
    let mut s = connect_from("127.0.0.9", addr).await;
    s.write_all(
        &[&v2_local()[..], b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"].concat(),
    )
    .await
    .unwrap();
    let answer = closed_after(&mut s).await;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    // `UNKNOWN` (v1) likewise.
    let mut s = connect_from("127.0.0.9", addr).await;
    s.write_all(b"PROXY UNKNOWN\r\nGET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_after(&mut s).await.starts_with(b"HTTP/1.1 200"));
    assert_eq!(metric(&server, "derp_proxy_protocol_headers", &[("result", "local")]), 2.0);
    // A trusted peer that sends no header at all is refused (it would look like the balancer).
    let mut s = connect_from("127.0.0.9", addr).await;
    s.write_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(closed_after(&mut s).await, b"");
    assert_eq!(metric(&server, "derp_proxy_protocol_rejected", &[("reason", "malformed")]), 1.0);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_headers_close_only_their_connection_and_are_counted() {
    let ops = OpsConfig { proxy_protocol_timeout: Duration::from_millis(300), ..trusting("127.0.0.9") };
    let server = relay(ops).await;
    let addr = server.local_addr();
    let src: SocketAddr = "198.51.100.20:1000".parse().unwrap();
    // A client relaying through the balancer the whole time.
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let mut a = derp_via("127.0.0.9", addr, &v2_proxy(src, addr), &ka).await.unwrap();
    let mut b = derp_via("127.0.0.9", addr, &v2_proxy(src, addr), &kb).await.unwrap();

    let mut oversized = v2_proxy(src, addr);
    oversized[14..16].copy_from_slice(&20000u16.to_be_bytes());
    let long_v1 = [b"PROXY TCP4 198.51.100.20 ".as_slice(), &[b'9'; 120], b"\r\n"].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", b"PROXY TCP4 nope nope 1 2\r\n".to_vec()),
        ("malformed", b"\r\n\r\n\x00\r\nQUIT\n\x99\x11\x00\x0c".to_vec()),
        ("oversized", oversized),
        ("oversized", long_v1),
    ];
    for (reason, bytes) in &cases {
        let mut s = connect_from("127.0.0.9", addr).await;
        s.write_all(bytes).await.unwrap();
        assert_eq!(closed_after(&mut s).await, b"", "{reason}: nothing is answered");
    }
    // Truncated: the peer closes inside the header.
    let mut s = connect_from("127.0.0.9", addr).await;
    s.write_all(&v2_proxy(src, addr)[..20]).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(closed_after(&mut s).await, b"");
    // Late: half a header, then silence past -proxy-protocol-timeout.
    let mut s = connect_from("127.0.0.9", addr).await;
    s.write_all(b"PROXY TCP4 198.51").await.unwrap();
    assert_eq!(closed_after(&mut s).await, b"");

    assert_eq!(metric(&server, "derp_proxy_protocol_rejected", &[("reason", "malformed")]), 2.0);
    assert_eq!(metric(&server, "derp_proxy_protocol_rejected", &[("reason", "oversized")]), 2.0);
    assert_eq!(metric(&server, "derp_proxy_protocol_rejected", &[("reason", "truncated")]), 1.0);
    assert_eq!(metric(&server, "derp_proxy_protocol_rejected", &[("reason", "timeout")]), 1.0);
    // The established clients never noticed.
    a.send(&ClientToServer::SendPacket { dst: kb.public(), data: b"still here".to_vec().into() })
        .await
        .unwrap();
    let (from, data) = b.want_packet(STEP).await.unwrap();
    assert_eq!((from, data.as_slice()), (ka.public(), b"still here".as_slice()));
    server.shutdown().await;
}

#[tokio::test]
async fn the_http_port_listener_reads_headers_too() {
    let dir = http_common::temp_dir("pp-http-port");
    let key = NodePrivate::generate();
    let setup = derpfleet_relay::http::tls::manual(dir.path(), "127.0.0.1", &key.public()).unwrap();
    let mut cfg = config(key);
    cfg.tls = Some(setup.config.clone());
    cfg.http_port = Some(0);
    let server = Server::spawn_with(cfg, trusting("127.0.0.9")).await.unwrap();
    let port80 = server.http_port_addr().unwrap();
    let mut s = connect_from("127.0.0.9", port80).await;
    let req = b"GET /x HTTP/1.1\r\nHost: relay.example\r\nConnection: close\r\n\r\n";
    s.write_all(&[&v2_proxy("198.51.100.1:1".parse().unwrap(), port80)[..], req].concat()).await.unwrap();
    let answer = String::from_utf8_lossy(&closed_after(&mut s).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 302") && answer.contains("https://relay.example/x"), "{answer}");
    let mut s = connect_from("127.0.0.9", port80).await;
    s.write_all(req).await.unwrap();
    assert_eq!(closed_after(&mut s).await, b"", "a trusted peer without a header is closed");
    assert_eq!(metric(&server, "derp_proxy_protocol_headers", &[("result", "proxied")]), 1.0);
    server.shutdown().await;
}

#[test]
fn config_keys_and_bad_values() {
    use derpfleet_relay::startup::cli::build;
    let dir = http_common::temp_dir("pp-config");
    let toml = dir.path().join("relay.toml");
    std::fs::write(
        &toml,
        "a = \"127.0.0.1:0\"\nstun = false\nproxy-protocol-trusted = [\"10.0.0.0/8\", \"192.0.2.7\"]\n\
         proxy-protocol-timeout = \"2s\"\nforwarded-trusted = \"127.0.0.1\"\nforwarded-header = \"forwarded\"\n",
    )
    .unwrap();
    let key = dir.path().join("k.key");
    let flags = derpfleet_relay::startup::config::parse_with_config([
        "relay",
        "-config",
        toml.to_str().unwrap(),
        "-c",
        key.to_str().unwrap(),
    ])
    .unwrap();
    let ops = build(&flags).unwrap().ops;
    assert!(ops.proxy_protocol_trusted.contains("10.20.30.40".parse().unwrap()));
    assert!(ops.proxy_protocol_trusted.contains("192.0.2.7".parse().unwrap()));
    assert!(!ops.proxy_protocol_trusted.contains("192.0.2.8".parse().unwrap()));
    assert_eq!(ops.proxy_protocol_timeout, Duration::from_secs(2));
    assert!(ops.forwarded.proxies.contains("127.0.0.1".parse().unwrap()));
    assert_eq!(ops.forwarded.header, derpfleet_relay::http::forwarded::ForwardedHeader::Forwarded);

    // A bad CIDR in the file names file, line, key and value; on the command line, the flag.
    std::fs::write(&toml, "stun = false\n\nproxy-protocol-trusted = \"10.0.0.0/33\"\n").unwrap();
    let out = std::process::Command::new(ops_common::BIN)
        .args(["-config", toml.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [toml.to_str().unwrap(), "line 3", "proxy-protocol-trusted", "10.0.0.0/33"] {
        assert!(err.contains(needle), "{needle:?} missing from: {err}");
    }
    for (flag, value) in
        [("-proxy-protocol-trusted", "nope"), ("-forwarded-header", "via"), ("-proxy-protocol-timeout", "0")]
    {
        let out = std::process::Command::new(ops_common::BIN).args([flag, value]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&flag[1..]) && err.contains(value), "{err}");
    }
}
