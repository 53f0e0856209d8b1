//! The responder over real loopback UDP: answers, silences, strict mode, rate limit, metrics,
//! several SO_REUSEPORT sockets, and shutdown.

mod common;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use common::{recv_within, TestServer};
use derpfleet_stun::message::{build_request, fingerprint, parse_response, TxId, MAGIC_COOKIE};
use derpfleet_stun::{PerIpLimit, StunConfig};
use tokio::net::UdpSocket;

const SILENCE: Duration = Duration::from_millis(300);
const ANSWER: Duration = Duration::from_secs(5);

fn bare_binding(txid: TxId) -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x00, 0x00];
    b.extend_from_slice(&MAGIC_COOKIE);
    b.extend_from_slice(&txid.0);
    b
}

/// Sends `req` from `client` and returns the parsed answer, asserting it came from `server`.
async fn ask(client: &UdpSocket, server: SocketAddr, req: &[u8]) -> (TxId, SocketAddr, Vec<u8>) {
    client.send_to(req, server).await.unwrap();
    let (raw, from) = recv_within(client, ANSWER).await.expect("an answer");
    assert_eq!(from, server);
    let (txid, mapped) = parse_response(&raw).expect("a valid Binding success response");
    (txid, mapped, raw)
}

#[tokio::test]
async fn answers_tailscale_request_over_ipv4_with_family_1() {
    let server = TestServer::start("127.0.0.1:0", 1, StunConfig::default());
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let txid = TxId::random();
    let (got_txid, mapped, raw) = ask(&client, server.addr, &build_request(txid)).await;
    assert_eq!(got_txid, txid);
    assert_eq!(mapped, client.local_addr().unwrap());
    assert_eq!((raw.len(), raw[25]), (32, 1), "IPv4 answer is 32 bytes, family 1");
    server.assert_counter(r#"stun_requests{disposition="success"}"#, 1).await;
    server.assert_counter(r#"stun_addrfamily{family="ipv4"}"#, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn answers_over_ipv6_loopback() {
    let server = TestServer::start("[::1]:0", 1, StunConfig::default());
    let client = UdpSocket::bind("[::1]:0").await.unwrap();
    let txid = TxId::random();
    let (got_txid, mapped, raw) = ask(&client, server.addr, &build_request(txid)).await;
    assert_eq!((got_txid, mapped), (txid, client.local_addr().unwrap()));
    assert_eq!((raw.len(), raw[25]), (44, 2));
    server.assert_counter(r#"stun_addrfamily{family="ipv6"}"#, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn dual_stack_socket_unmaps_ipv4_clients() {
    let server = TestServer::start("[::]:0", 1, StunConfig::default());
    let port = server.addr.port();
    let v4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_, mapped, raw) =
        ask(&v4, SocketAddr::from(([127, 0, 0, 1], port)), &build_request(TxId::random())).await;
    assert_eq!(mapped, v4.local_addr().unwrap());
    assert_eq!(raw[25], 1, "an IPv4 client on a dual-stack socket gets family 1, not ::ffff:");
    let v6 = UdpSocket::bind("[::1]:0").await.unwrap();
    let (_, mapped, _) =
        ask(&v6, format!("[::1]:{port}").parse().unwrap(), &bare_binding(TxId::random())).await;
    assert_eq!(mapped, v6.local_addr().unwrap());
    server.assert_counter(r#"stun_addrfamily{family="ipv4"}"#, 1).await;
    server.assert_counter(r#"stun_addrfamily{family="ipv6"}"#, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_no_reply_and_are_counted() {
    let server = TestServer::start("127.0.0.1:0", 1, StunConfig::default());
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let good = build_request(TxId::random());
    let mut wrong_type = good.to_vec();
    wrong_type[1] = 0x11;
    let mut bad_fp = good.to_vec();
    bad_fp[39] ^= 0xff;
    let mut truncated = good[..38].to_vec();
    truncated[3] = 18;
    let mut fp_not_last = good.to_vec();
    fp_not_last.extend_from_slice(&[0x80, 0x22, 0, 0]);
    fp_not_last[3] += 4;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("wrong type", wrong_type),
        ("bad fingerprint", bad_fp),
        ("truncated attribute", truncated),
        ("fingerprint not last", fp_not_last),
        ("too short", good[..19].to_vec()),
        ("garbage", b"GET / HTTP/1.1\r\n\r\n-padding-".to_vec()),
        ("oversized", vec![0u8; 4000]),
    ];
    for (what, pkt) in &bad {
        client.send_to(pkt, server.addr).await.unwrap();
        assert!(recv_within(&client, SILENCE).await.is_none(), "{what}: expected no reply");
    }
    // The responder is still alive and answers a good request.
    let txid = TxId::random();
    let (got, _, _) = ask(&client, server.addr, &build_request(txid)).await;
    assert_eq!(got, txid);
    server.assert_counter(r#"stun_requests{disposition="not_stun"}"#, bad.len() as u64).await;
    server.assert_counter(r#"stun_requests{disposition="success"}"#, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn strict_mode_answers_only_tailscale_style() {
    let server = TestServer::start("127.0.0.1:0", 1, StunConfig { strict: true, per_ip_limit: None });
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&bare_binding(TxId::random()), server.addr).await.unwrap();
    assert!(recv_within(&client, SILENCE).await.is_none(), "bare RFC 5389 request answered in strict mode");

    // Right layout, wrong SOFTWARE (valid fingerprint): accepted leniently, refused strictly.
    let mut wrong_sw = build_request(TxId::random());
    wrong_sw[24..32].copy_from_slice(b"tailnoda");
    let fp = fingerprint(&wrong_sw[..32]);
    wrong_sw[36..40].copy_from_slice(&fp.to_be_bytes());
    client.send_to(&wrong_sw, server.addr).await.unwrap();
    assert!(recv_within(&client, SILENCE).await.is_none(), "wrong SOFTWARE answered in strict mode");

    let txid = TxId::random();
    assert_eq!(ask(&client, server.addr, &build_request(txid)).await.0, txid);
    server.assert_counter(r#"stun_requests{disposition="not_stun"}"#, 2).await;
    server.stop().await;

    let lenient = TestServer::start("127.0.0.1:0", 1, StunConfig::default());
    let txid = TxId(wrong_sw[8..20].try_into().unwrap());
    assert_eq!(ask(&client, lenient.addr, &wrong_sw).await.0, txid);
    lenient.stop().await;
}

#[tokio::test]
async fn per_ip_rate_limit_drops_and_counts_excess() {
    let limit = PerIpLimit { per_second: NonZeroU32::new(1).unwrap(), burst: NonZeroU32::new(2).unwrap() };
    let server = TestServer::start("127.0.0.1:0", 1, StunConfig { strict: false, per_ip_limit: Some(limit) });
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..5 {
        client.send_to(&build_request(TxId::random()), server.addr).await.unwrap();
    }
    let mut answers = 0;
    while recv_within(&client, SILENCE).await.is_some() {
        answers += 1;
    }
    // The burst of 2 is answered; 3 more within well under a second exceed 1/s. At most one token
    // can have refilled while we waited for silence, and only for requests sent after it, which
    // there are none of.
    assert_eq!(answers, 2);
    server.assert_counter(r#"stun_requests{disposition="rate_limited"}"#, 3).await;
    // A different source IP has its own bucket.
    let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
    let txid = TxId::random();
    assert_eq!(ask(&other, server.addr, &build_request(txid)).await.0, txid);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_over_several_reuseport_sockets() {
    let server = TestServer::start("127.0.0.1:0", 3, StunConfig::default());
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for round in 0..10 {
        for c in &clients {
            let txid = TxId::random();
            let (got, mapped, _) = ask(c, server.addr, &build_request(txid)).await;
            assert_eq!((got, mapped), (txid, c.local_addr().unwrap()), "round {round}");
        }
    }
    server.assert_counter(r#"stun_requests{disposition="success"}"#, 160).await;
    server.stop().await;
}

#[tokio::test]
async fn bursts_larger_than_one_batch_are_all_answered() {
    let server = TestServer::start("127.0.0.1:0", 1, StunConfig::default());
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut want = std::collections::HashSet::new();
    for _ in 0..200 {
        let txid = TxId::random();
        want.insert(txid);
        client.send_to(&build_request(txid), server.addr).await.unwrap();
    }
    while !want.is_empty() {
        let (raw, _) = recv_within(&client, ANSWER).await.expect("every request answered");
        let (txid, _) = parse_response(&raw).unwrap();
        assert!(want.remove(&txid), "unexpected or duplicate answer {txid}");
    }
    server.stop().await;
}
