//! The metrics endpoint (with the embedded STUN responder's counters): after a scripted scenario, `/metrics` on
//! the metrics listener shows derper's names with the right values, plus the process and STUN
//! series; `/healthz` answers on both listeners.

use crate::http_common;
use crate::ops_common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::NodePrivate;
use derpfleet_relay::server::{OpsConfig, Server, StunListenConfig};
use derpfleet_stun::{build_request, parse_response, StunConfig, TxId};
use http_common::{config, derp_client, STEP};
use ops_common::*;
use tokio::net::UdpSocket;

/// Sends `n` Tailscale STUN requests and checks every answer names our address.
async fn stun_round_trips(stun: SocketAddr, n: usize) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    for _ in 0..n {
        let txid = TxId::random();
        sock.send_to(&build_request(txid), stun).await.unwrap();
        let mut buf = [0u8; 1500];
        let (len, _) =
            tokio::time::timeout(WAIT, sock.recv_from(&mut buf)).await.expect("STUN answer").unwrap();
        let (got_txid, addr) = parse_response(&buf[..len]).unwrap();
        assert_eq!((got_txid, addr), (txid, me));
    }
}

#[tokio::test]
async fn scripted_scenario_shows_the_numbers() {
    let ops = OpsConfig {
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        stun: Some(StunListenConfig { addr: "127.0.0.1:0".parse().unwrap(), config: StunConfig::default() }),
        ..OpsConfig::default()
    };
    let server = Server::spawn_with(config(NodePrivate::generate()), ops).await.unwrap();
    let (addr, metrics) = (server.local_addr(), server.metrics_addr().unwrap());
    let stun = server.stun_addr().unwrap();

    let (mut a, _) = derp_client(addr).await;
    let (mut b, b_key) = derp_client(addr).await;
    let (mut c, _) = derp_client(addr).await;
    a.send(&ClientToServer::NotePreferred(true)).await.unwrap();
    for i in 0..5u8 {
        a.send(&ClientToServer::SendPacket { dst: b_key.public(), data: Bytes::from(vec![i; 100]) })
            .await
            .unwrap();
    }
    for _ in 0..5 {
        assert_eq!(b.want_packet(STEP).await.unwrap().1.len(), 100);
    }
    let nobody = NodePrivate::generate().public();
    for _ in 0..2 {
        a.send(&ClientToServer::SendPacket { dst: nobody, data: Bytes::from(vec![7u8; 50]) }).await.unwrap();
    }
    c.send(&ClientToServer::Ping(*b"pingpong")).await.unwrap();
    assert_eq!(c.next_data(STEP).await.unwrap(), Some(ServerToClient::Pong(*b"pingpong")));
    stun_round_trips(stun, 7).await;
    // One datagram that is not STUN: no answer, counted.
    UdpSocket::bind("127.0.0.1:0").await.unwrap().send_to(b"hello, not stun", stun).await.unwrap();
    drop(c);

    wait_metric(metrics, "derp_current_connections", &[], 2.0).await;
    wait_metric(metrics, "derp_packets_received", &[], 7.0).await;
    let m = wait_metric(metrics, "stun_requests", &[("disposition", "not_stun")], 1.0).await;
    let expect = [
        ("derp_accepts", vec![], 3.0),
        ("derp_current_connections", vec![], 2.0),
        ("derp_current_home_connections", vec![], 1.0),
        ("derp_packets_received", vec![], 7.0),
        ("derp_bytes_received", vec![], 600.0),
        ("derp_packets_received_kind", vec![("kind", "other")], 7.0),
        ("derp_packets_sent", vec![], 5.0),
        ("derp_bytes_sent", vec![], 500.0),
        ("derp_packets_dropped", vec![("reason", "unknown_dest"), ("kind", "other")], 2.0),
        ("derp_bytes_dropped", vec![("reason", "unknown_dest"), ("kind", "other")], 100.0),
        ("derp_packets_dropped", vec![("reason", "queue_head"), ("kind", "other")], 0.0),
        ("derp_got_ping", vec![], 1.0),
        ("derp_sent_pong", vec![], 1.0),
        ("derp_handshake_seconds_count", vec![], 3.0),
        ("derp_handshake_errors", vec![], 0.0),
        ("tls_listener_accepted_connections", vec![], 3.0),
        ("tls_listener_rejected_connections", vec![], 0.0),
        ("stun_requests", vec![("disposition", "success")], 7.0),
        ("stun_requests", vec![("disposition", "not_stun")], 1.0),
        ("stun_addrfamily", vec![("family", "ipv4")], 7.0),
        ("derp_rate_limit_per_client_bytes_per_sec", vec![], 0.0),
    ];
    for (name, labels, want) in expect {
        assert!(m.has(name, &labels), "{name}{labels:?} missing");
        assert_eq!(m.get(name, &labels), want, "{name}{labels:?}");
    }
    // Histograms derper lacks and process gauges.
    assert!(m.get("derp_queue_delay_seconds_count", &[]) >= 1.0);
    assert!(m.get("derp_buffered_write_frames_count", &[]) >= 1.0);
    assert!(m.get("process_start_unix_time", &[]) > 1.7e9);
    assert!(m.has("uptime_sec", &[]));
    assert!(m.get("derp_current_file_descriptors", &[]) > 0.0);

    for at in [metrics, addr] {
        let (status, body) = get(at, "/healthz").await;
        assert_eq!(status, 200, "{body}");
        let j: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(j["status"], "ok");
        assert_eq!(j["connections"], 2);
        assert_eq!(j["version"], env!("CARGO_PKG_VERSION"));
    }
    assert_eq!(get(metrics, "/nope").await.0, 404);
    server.shutdown().await;
}

#[tokio::test]
async fn relay_binary_serves_stun_and_counts_it() {
    let dir = http_common::temp_dir("ops-stun-bin");
    let key = dir.path().join("derper.key");
    let (port, stun_port, metrics_port) = (unused_port(), unused_port(), unused_port());
    let a = format!("127.0.0.1:{port}");
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut p = Proc::start(&[
        "-a",
        &a,
        "-c",
        key.to_str().unwrap(),
        "-stun",
        "-stun-port",
        &stun_port.to_string(),
        "-metrics-addr",
        &metrics_addr,
    ]);
    p.wait_for_line("STUN listening");
    let stun: SocketAddr = format!("127.0.0.1:{stun_port}").parse().unwrap();
    stun_round_trips(stun, 12).await;
    let metrics: SocketAddr = metrics_addr.parse().unwrap();
    wait_metric(metrics, "stun_requests", &[("disposition", "success")], 12.0).await;
    p.signal("-TERM");
    assert!(p.wait_exit(Duration::from_secs(10)).expect("exits").success(), "{}", p.log());
}

#[tokio::test]
async fn drop_logs_are_rate_limited_with_counts() {
    let dir = http_common::temp_dir("ops-droplog");
    let key = dir.path().join("derper.key");
    let (p, addr) = start_plain_relay(&key, &["-drop-log-interval", "300ms"]);
    let (mut c, _) = derp_client(addr).await;
    let nobody = NodePrivate::generate().public();
    for _ in 0..200 {
        c.send(&ClientToServer::SendPacket { dst: nobody, data: Bytes::from_static(b"to nobody") })
            .await
            .unwrap();
    }
    // A ping round trip: every SendPacket before it has been handled.
    c.send(&ClientToServer::Ping(*b"barrier!")).await.unwrap();
    assert_eq!(c.next_data(STEP).await.unwrap(), Some(ServerToClient::Pong(*b"barrier!")));
    p.wait_for_line("packets dropped");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let log = p.log();
    let lines: Vec<_> = log.lines().filter(|l| l.contains("packets dropped")).collect();
    // One line per interval at most (two if a tick fell inside the burst), counts adding up.
    assert!(!lines.is_empty() && lines.len() <= 2, "{lines:#?}");
    let total: u64 = lines
        .iter()
        .map(|l| {
            assert!(l.contains("unknown_dest"), "{l}");
            let before = &l[..l.find(" packets dropped").unwrap()];
            before.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
        })
        .sum();
    assert_eq!(total, 200, "{lines:#?}");
}
