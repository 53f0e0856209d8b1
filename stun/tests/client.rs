//! Client helpers against the real responder and against scripted UDP peers over loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestServer;
use derpfleet_stun::client::{binding, ClientError, RetryPlan, StunDemux};
use derpfleet_stun::message::{build_response, parse_tailscale_request};
use derpfleet_stun::StunConfig;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

fn quick_plan() -> RetryPlan {
    RetryPlan { sends: 3, interval: Duration::from_millis(50), timeout: Duration::from_millis(600) }
}

#[tokio::test]
async fn binding_gets_mapped_address_and_rtt() {
    let server = TestServer::start("127.0.0.1:0", 1, StunConfig { strict: true, per_ip_limit: None });
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let answer = binding(&sock, server.addr, RetryPlan::default()).await.unwrap();
    assert_eq!(answer.mapped, sock.local_addr().unwrap());
    assert_eq!(answer.from, server.addr);
    assert!(answer.rtt < Duration::from_secs(3));
    server.stop().await;
}

#[tokio::test]
async fn binding_over_ipv6() {
    let server = TestServer::start("[::1]:0", 1, StunConfig::default());
    let sock = UdpSocket::bind("[::1]:0").await.unwrap();
    let answer = binding(&sock, server.addr, RetryPlan::default()).await.unwrap();
    assert_eq!(answer.mapped, sock.local_addr().unwrap());
    server.stop().await;
}

/// A peer that ignores the first `ignore` requests, sends junk and a foreign-txid reply, then
/// answers properly. Returns how many requests it saw.
async fn scripted_peer(peer: UdpSocket, ignore: usize) -> usize {
    let mut buf = [0u8; 1500];
    let mut seen = 0;
    loop {
        let (n, from) = peer.recv_from(&mut buf).await.unwrap();
        let txid = parse_tailscale_request(&buf[..n]).expect("client sends Tailscale-style requests");
        seen += 1;
        if seen <= ignore {
            continue;
        }
        peer.send_to(b"not stun at all", from).await.unwrap();
        let foreign = derpfleet_stun::TxId::random();
        peer.send_to(&build_response(foreign, "9.9.9.9:9".parse().unwrap()), from).await.unwrap();
        peer.send_to(&build_response(txid, "198.51.100.1:4242".parse().unwrap()), from).await.unwrap();
        return seen;
    }
}

#[tokio::test]
async fn binding_retries_and_matches_txid() {
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let peer_task = tokio::spawn(scripted_peer(peer, 2));
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let answer = binding(&sock, peer_addr, quick_plan()).await.unwrap();
    assert_eq!(answer.mapped, "198.51.100.1:4242".parse().unwrap(), "junk and foreign txids ignored");
    assert_eq!(peer_task.await.unwrap(), 3, "answered on the third send");
}

#[tokio::test]
async fn binding_times_out_against_a_silent_peer() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let err = binding(&sock, silent.local_addr().unwrap(), quick_plan()).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err}");
    // Exactly `sends` requests went out.
    let mut buf = [0u8; 100];
    let mut count = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), silent.recv_from(&mut buf)).await {
        count += 1;
    }
    assert_eq!(count, 3);
}

#[tokio::test]
async fn demux_routes_stun_on_a_shared_socket_and_passes_other_traffic() {
    let server = TestServer::start("127.0.0.1:0", 1, StunConfig::default());
    let sock = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let demux = StunDemux::new();
    let stop = CancellationToken::new();
    let (other_tx, mut other_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    // The socket owner's receive loop (as magicsock would run it).
    let reader = {
        let (sock, demux, stop) = (sock.clone(), demux.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let (n, from) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = sock.recv_from(&mut buf) => r.unwrap(),
                };
                if !demux.handle_packet(&buf[..n], from) {
                    other_tx.send(buf[..n].to_vec()).await.unwrap();
                }
            }
        })
    };
    // Other traffic on the same socket reaches the owner untouched.
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    other.send_to(b"wireguard-ish payload", sock.local_addr().unwrap()).await.unwrap();
    assert_eq!(other_rx.recv().await.unwrap(), b"wireguard-ish payload");

    let (a, b) = tokio::join!(
        demux.binding(&sock, server.addr, RetryPlan::default()),
        demux.binding(&sock, server.addr, RetryPlan::default()),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.mapped, sock.local_addr().unwrap());
    assert_eq!(b.mapped, sock.local_addr().unwrap());
    assert_ne!(a.txid, b.txid);
    assert_eq!(demux.pending(), 0, "finished requests leave no waiters");

    // A timed-out request cleans up too.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let err = demux.binding(&sock, silent.local_addr().unwrap(), quick_plan()).await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)));
    assert_eq!(demux.pending(), 0);

    stop.cancel();
    reader.await.unwrap();
    server.stop().await;
}
