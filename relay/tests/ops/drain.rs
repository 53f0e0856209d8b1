//! SIGTERM with 100 connected clients (the real binary): every client gets
//! `Restarting` (reconnect-in with jitter, try-for) before the close, the process exits 0 within
//! the drain deadline, and nothing panics.

use crate::http_common;
use crate::ops_common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::NodePrivate;
use derpfleet_relay::server::{DrainConfig, Server};
use http_common::{config, derp_client, temp_dir, STEP};
use ops_common::*;

const CLIENTS: usize = 100;

/// Reads until EOF; returns the frames after the handshake (KeepAlives dropped).
async fn frames_until_close(mut c: http_common::TestClient<tokio::net::TcpStream>) -> Vec<ServerToClient> {
    let mut frames = Vec::new();
    while let Some(f) = c.next(STEP).await.unwrap() {
        if f != ServerToClient::KeepAlive {
            frames.push(f);
        }
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_100_clients_sends_restarting_then_exits_0() {
    let dir = temp_dir("ops-drain");
    let key = dir.path().join("derper.key");
    let (mut p, addr) = start_plain_relay(
        &key,
        &[
            "-drain-timeout",
            "5s",
            "-restart-reconnect-in",
            "1s",
            "-restart-reconnect-jitter",
            "2s",
            "-restart-try-for",
            "30s",
        ],
    );
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(derp_client(addr).await);
    }
    // Some traffic in flight: each client sends one packet to the next.
    let keys: Vec<_> = clients.iter().map(|(_, k)| k.public()).collect();
    for (i, (c, _)) in clients.iter_mut().enumerate() {
        let dst = keys[(i + 1) % CLIENTS];
        c.send(&ClientToServer::SendPacket { dst, data: Bytes::from_static(b"before the restart") })
            .await
            .unwrap();
    }
    // Every packet delivered before the signal, so the only frame left to come is Restarting.
    for (c, _) in clients.iter_mut() {
        assert_eq!(c.want_packet(STEP).await.unwrap().1, b"before the restart");
    }
    let readers: Vec<_> = clients.into_iter().map(|(c, _)| tokio::spawn(frames_until_close(c))).collect();

    let signalled = Instant::now();
    p.signal("-TERM");
    let status = p.wait_exit(Duration::from_secs(15)).expect("the relay did not exit");
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status:?}; log:\n{}", p.log());
    assert!(took < Duration::from_secs(5) + Duration::from_secs(2), "exit took {took:?} (deadline 5 s)");

    let mut jitters = Vec::new();
    for r in readers {
        // PeerGone for peers that already left (they restart too) may come around it; nothing
        // else may, and Restarting must come exactly once.
        let frames: Vec<_> =
            r.await.unwrap().into_iter().filter(|f| !matches!(f, ServerToClient::PeerGone { .. })).collect();
        match frames.as_slice() {
            [ServerToClient::Restarting { reconnect_in, try_for }] => {
                assert_eq!(*try_for, Duration::from_secs(30));
                assert!(*reconnect_in >= Duration::from_secs(1) && *reconnect_in < Duration::from_secs(3));
                jitters.push(*reconnect_in);
            }
            other => panic!("expected Restarting (then only PeerGone) before the close, got {other:?}"),
        }
    }
    assert_eq!(jitters.len(), CLIENTS);
    jitters.sort();
    jitters.dedup();
    assert!(jitters.len() > CLIENTS / 2, "reconnect-in is jittered per client");
    let log = p.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("drained; exiting"), "{log}");
}

#[tokio::test]
async fn drain_closes_stragglers_at_the_deadline_and_stops_accepting() {
    let server = Server::spawn(config(NodePrivate::generate())).await.unwrap();
    let addr = server.local_addr();
    let (c, _) = derp_client(addr).await;
    let reader = tokio::spawn(frames_until_close(c));
    let opts = DrainConfig {
        reconnect_in: Duration::from_millis(100),
        reconnect_jitter: Duration::ZERO,
        try_for: Duration::from_secs(5),
        deadline: Duration::from_secs(3),
    };
    let report = server.drain(opts).await;
    assert_eq!((report.notified, report.closed), (1, 0));
    let frames = reader.await.unwrap();
    assert_eq!(
        frames,
        [ServerToClient::Restarting {
            reconnect_in: Duration::from_millis(100),
            try_for: Duration::from_secs(5)
        }]
    );
    // The listener is gone: a new connection is refused.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_draining_while_a_stuck_client_holds_the_drain() {
    use derpfleet_relay::server::OpsConfig;
    use tokio::io::AsyncWriteExt;
    let ops = OpsConfig { metrics_addr: Some("127.0.0.1:0".parse().unwrap()), ..OpsConfig::default() };
    // No write deadline: a client that stops reading blocks its send loop until the drain ends.
    let server = Server::spawn_with(config(NodePrivate::generate()), ops).await.unwrap();
    let (addr, metrics) = (server.local_addr(), server.metrics_addr().unwrap());
    assert_eq!(get(metrics, "/healthz").await.0, 200);

    // The stuck client: a tiny receive buffer, and it never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(addr).await.unwrap();
    stream
        .write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(http_common::read_head(&mut stream).await.status, 101);
    let stuck_key = NodePrivate::generate();
    let stuck = http_common::TestClient::over(stream, stuck_key.clone()).await.unwrap();
    let (mut sender, _) = derp_client(addr).await;
    // More than the kernel's socket buffers can absorb (tcp_wmem's maximum is 4 MiB).
    for _ in 0..10_000 {
        sender
            .send(&ClientToServer::SendPacket { dst: stuck_key.public(), data: Bytes::from(vec![0u8; 1000]) })
            .await
            .unwrap();
    }
    let deadline = Instant::now() + WAIT;
    while server.derp().registry().conns_of(&stuck_key.public()).first().map_or(0, |c| c.out.queued_packets())
        == 0
    {
        assert!(Instant::now() < deadline, "the stuck client's queue never filled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let opts = DrainConfig { deadline: Duration::from_millis(1500), ..DrainConfig::default() };
    let drain = tokio::spawn(server.drain(opts));
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(metrics, "/healthz").await;
        if status == 503 {
            assert!(body.contains("\"draining\""), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "never reported draining");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = drain.await.unwrap();
    assert_eq!(report.notified, 2);
    assert_eq!(report.closed, 1, "the stuck client was closed at the deadline: {report:?}");
    drop(stuck);
}
