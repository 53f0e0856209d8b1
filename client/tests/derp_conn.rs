//! DerpConn against a real DERP server on loopback (plain and TLS).

mod support;

use std::time::Duration;

use derpfleet_client::derpmap::{CertCheck, DerpNode, DerpRegion};
use derpfleet_client::{ConnectError, ConnectOptions, DerpConn, DerpTarget, DerpUrl};
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::NodePrivate;
use sha2::Digest;
use support::{TestServer, Tls};

const T: Duration = Duration::from_secs(10);

fn url(s: &TestServer, https: bool, check: CertCheck) -> DerpTarget {
    let scheme = if https { "https" } else { "http" };
    let mut u: DerpUrl = format!("{scheme}://{}/derp", s.addr).parse().unwrap();
    u.cert_check = check;
    DerpTarget::Url(u)
}

fn pin(s: &TestServer) -> CertCheck {
    CertCheck::Sha256Raw(sha2::Sha256::digest(s.leaf_der.as_ref().unwrap()).into())
}

async fn recv_packet(r: &mut derpfleet_client::DerpReceiver) -> ServerToClient {
    loop {
        let m = tokio::time::timeout(T, r.recv()).await.expect("recv timed out").expect("recv");
        if matches!(m, ServerToClient::RecvPacket { .. }) {
            return m;
        }
    }
}

/// A ping on `tx` is answered by the pong on `rx`.
async fn ping_pong(
    tx: &derpfleet_client::DerpSender,
    rx: &mut derpfleet_client::DerpReceiver,
    data: [u8; 8],
) {
    tx.send_ping(data).await.unwrap();
    assert_eq!(tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap(), ServerToClient::Pong(data));
}

#[tokio::test]
async fn plain_http_relays_between_two_clients_and_pings() {
    let s = TestServer::start(Tls::default()).await;
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let a = DerpConn::connect(&url(&s, false, CertCheck::HostName), &ConnectOptions::new(ka.clone()))
        .await
        .unwrap();
    let b = DerpConn::connect(&url(&s, false, CertCheck::HostName), &ConnectOptions::new(kb.clone()))
        .await
        .unwrap();
    assert_eq!(a.info().server_key, s.key.public());
    assert_eq!(a.info().server_info.version, 2);
    assert!(!a.info().fast_start);
    let (sa, mut ra) = a.split();
    let (_sb, mut rb) = b.split();
    sa.send_packet(kb.public(), &b"hello"[..]).await.unwrap();
    match recv_packet(&mut rb).await {
        ServerToClient::RecvPacket { src, data } => {
            assert_eq!(src, ka.public());
            assert_eq!(&data[..], b"hello");
        }
        _ => unreachable!(),
    }
    ping_pong(&sa, &mut ra, *b"12345678").await;
    let head = s.requests.lock().unwrap()[0].clone();
    assert!(head.starts_with("GET /derp HTTP/1.1\r\n"), "{head}");
    assert!(head.contains("Upgrade: DERP\r\n") && head.contains("Connection: Upgrade\r\n"), "{head}");
    assert!(!head.contains("Derp-Fast-Start") && !head.contains("Ideal-Node"), "{head}");
}

#[tokio::test]
async fn many_packets_arrive_in_order_and_writes_are_batched() {
    let s = TestServer::start(Tls::default()).await;
    let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
    let (sa, _ra) = DerpConn::connect(&url(&s, false, CertCheck::HostName), &ConnectOptions::new(ka))
        .await
        .unwrap()
        .split();
    let (_sb, mut rb) =
        DerpConn::connect(&url(&s, false, CertCheck::HostName), &ConnectOptions::new(kb.clone()))
            .await
            .unwrap()
            .split();
    const N: u32 = 20_000;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            sa.send_packet(kb.public(), i.to_be_bytes().to_vec()).await.unwrap();
        }
        sa
    });
    for i in 0..N {
        match recv_packet(&mut rb).await {
            ServerToClient::RecvPacket { data, .. } => assert_eq!(&data[..], &i.to_be_bytes()),
            _ => unreachable!(),
        }
    }
    let sa = sender.await.unwrap();
    let (frames, writes) = sa.write_stats();
    assert!(frames >= N as u64, "{frames}");
    assert!(writes < frames, "frames were coalesced: {frames} frames in {writes} writes");
}

#[tokio::test]
async fn tls13_meta_cert_gives_fast_start_with_pinned_cert() {
    let s = TestServer::start(Tls::tls13()).await;
    let k = NodePrivate::generate();
    let c = DerpConn::connect(&url(&s, true, pin(&s)), &ConnectOptions::new(k)).await.unwrap();
    assert!(c.info().fast_start);
    assert_eq!(c.info().server_key, s.key.public());
    let head = s.requests.lock().unwrap()[0].clone();
    assert!(head.contains("Derp-Fast-Start: 1\r\n"), "{head}");
    // And the connection works.
    let (tx, mut rx) = c.split();
    ping_pong(&tx, &mut rx, *b"fastfast").await;
}

#[tokio::test]
async fn tls12_or_no_meta_cert_means_no_fast_start() {
    for tls in [Tls { tls12_only: true, ..Tls::tls13() }, Tls { meta_cert: false, ..Tls::tls13() }] {
        let s = TestServer::start(tls).await;
        let c = DerpConn::connect(&url(&s, true, pin(&s)), &ConnectOptions::new(NodePrivate::generate()))
            .await
            .unwrap();
        assert!(!c.info().fast_start);
        assert!(!s.requests.lock().unwrap()[0].contains("Derp-Fast-Start"));
    }
}

#[tokio::test]
async fn wrong_pin_and_web_pki_reject_self_signed() {
    let s = TestServer::start(Tls::tls13()).await;
    let opts = ConnectOptions::new(NodePrivate::generate());
    let e = DerpConn::connect(&url(&s, true, CertCheck::Sha256Raw([0; 32])), &opts).await.err().unwrap();
    assert!(matches!(e, ConnectError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("does not match"), "{e}");
    let e = DerpConn::connect(&url(&s, true, CertCheck::HostName), &opts).await.err().unwrap();
    assert!(matches!(e, ConnectError::Tls { .. }), "{e}");
    DerpConn::connect(&url(&s, true, CertCheck::Insecure), &opts).await.unwrap();
}

#[tokio::test]
async fn region_target_falls_over_to_second_node_and_sends_ideal_node() {
    let s = TestServer::start(Tls { meta_cert: false, ..Tls::tls13() }).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let hash = hex::encode(sha2::Sha256::digest(s.leaf_der.as_ref().unwrap()));
    let node = |name: &str, port: u16| DerpNode {
        name: name.into(),
        region_id: 900,
        host_name: "127.0.0.1".into(),
        cert_name: format!("sha256-raw:{hash}"),
        ipv4: "127.0.0.1".into(),
        ipv6: "none".into(),
        derp_port: port as i64,
        ..Default::default()
    };
    let region = DerpRegion {
        region_id: 900,
        nodes: vec![node("900a", dead_port), node("900b", s.addr.port())],
        ..Default::default()
    };
    let c = DerpConn::connect(&DerpTarget::Region(region), &ConnectOptions::new(NodePrivate::generate()))
        .await
        .unwrap();
    assert_eq!(c.info().node_name.as_deref(), Some("900b"));
    let head = s.requests.lock().unwrap()[0].clone();
    assert!(head.contains("Ideal-Node: 900a\r\n"), "{head}");
    assert!(head.contains(&format!("Host: 127.0.0.1:{}\r\n", s.addr.port())), "{head}");
}

#[tokio::test]
async fn server_ping_is_answered_with_pong() {
    let s = TestServer::start(Tls::default()).await;
    let (_tx, mut rx) = DerpConn::connect(
        &url(&s, false, CertCheck::HostName),
        &ConnectOptions::new(NodePrivate::generate()),
    )
    .await
    .unwrap()
    .split();
    s.push(ServerToClient::Ping(*b"pingping"));
    assert_eq!(
        tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap(),
        ServerToClient::Ping(*b"pingping")
    );
    let deadline = tokio::time::Instant::now() + T;
    loop {
        // The server-side decoder skips Pong frames (servers ignore them) and reports the type.
        if s.received.lock().unwrap().contains(&ClientToServer::Ignored(0x13)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no Pong reached the server");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn non_101_answer_is_an_error_with_the_body() {
    // A server that is not DERP at all answers 403 with a body.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut c, _) = l.accept().await.unwrap();
        let mut b = [0u8; 1024];
        let _ = c.read(&mut b).await;
        let _ = c.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nnot today").await;
    });
    let t = DerpTarget::Url(format!("http://{addr}/derp").parse().unwrap());
    let e = DerpConn::connect(&t, &ConnectOptions::new(NodePrivate::generate())).await.err().unwrap();
    match e {
        ConnectError::HttpStatus { status, body } => assert_eq!((status, body.as_str()), (403, "not today")),
        e => panic!("{e}"),
    }
}

#[tokio::test]
async fn silent_server_is_declared_dead() {
    let s = TestServer::start(Tls::default()).await;
    let mut opts = ConnectOptions::new(NodePrivate::generate());
    opts.read_timeout = Duration::from_millis(300);
    let (tx, mut rx) = DerpConn::connect(&url(&s, false, CertCheck::HostName), &opts).await.unwrap().split();
    let e = tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap_err();
    assert!(matches!(e, derpfleet_client::conn::ConnError::Silent(_)), "{e}");
    // The connection is closed for the sender too.
    let deadline = tokio::time::Instant::now() + T;
    while !tx.is_closed() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn connect_to_nothing_fails_fast_with_a_clear_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let t = DerpTarget::Url(format!("http://{addr}/derp").parse().unwrap());
    let e = DerpConn::connect(&t, &ConnectOptions::new(NodePrivate::generate())).await.err().unwrap();
    assert!(matches!(e, ConnectError::Tcp(..)), "{e}");
}

#[tokio::test]
async fn websocket_transport_relays_and_pings() {
    for tls in [Tls::default(), Tls::tls13()] {
        let s = TestServer::start(tls).await;
        let (ka, kb) = (NodePrivate::generate(), NodePrivate::generate());
        let check = if tls.enabled { pin(&s) } else { CertCheck::HostName };
        let opts = |k: &NodePrivate| ConnectOptions { websocket: true, ..ConnectOptions::new(k.clone()) };
        let a = DerpConn::connect(&url(&s, tls.enabled, check.clone()), &opts(&ka)).await.unwrap();
        let b = DerpConn::connect(&url(&s, tls.enabled, check), &opts(&kb)).await.unwrap();
        assert!(!a.info().fast_start, "no fast start over WebSocket");
        let head = s.requests.lock().unwrap()[0].clone();
        assert!(
            head.contains("Upgrade: websocket\r\n") && head.contains("Sec-WebSocket-Protocol: derp\r\n"),
            "{head}"
        );
        let (sa, mut ra) = a.split();
        let (_sb, mut rb) = b.split();
        for i in 0..100u32 {
            sa.send_packet(kb.public(), i.to_be_bytes().to_vec()).await.unwrap();
        }
        for i in 0..100u32 {
            match recv_packet(&mut rb).await {
                ServerToClient::RecvPacket { src, data } => {
                    assert_eq!(src, ka.public());
                    assert_eq!(&data[..], &i.to_be_bytes());
                }
                _ => unreachable!(),
            }
        }
        ping_pong(&sa, &mut ra, *b"wsping!!").await;
    }
}

#[tokio::test]
async fn mesh_peer_frames_and_watcher_messages() {
    let s = TestServer::start(Tls::default()).await;
    let mesh = derpfleet_proto::MeshKey::from_bytes([0x5a; 32]);
    let opts = ConnectOptions { mesh_key: Some(mesh), ..ConnectOptions::new(NodePrivate::generate()) };
    let (tx, mut rx) = DerpConn::connect(&url(&s, false, CertCheck::HostName), &opts).await.unwrap().split();
    let (a, b) = (NodePrivate::generate().public(), NodePrivate::generate().public());
    tx.watch_conns().await.unwrap();
    tx.forward_packet(a, b, bytes::Bytes::from_static(b"fwd")).await.unwrap();
    tx.close_peer(b).await.unwrap();
    let want = [
        ClientToServer::WatchConns,
        ClientToServer::ForwardPacket { src: a, dst: b, data: bytes::Bytes::from_static(b"fwd") },
        ClientToServer::ClosePeer(b),
    ];
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let got = s.received.lock().unwrap().clone();
        if want.iter().all(|w| got.contains(w)) {
            let info = got.iter().find_map(|m| match m {
                ClientToServer::ClientInfo(j) => Some(String::from_utf8_lossy(j).to_string()),
                _ => None,
            });
            assert_eq!(
                info.unwrap(),
                format!(r#"{{"meshKey":"{}","version":2,"CanAckPings":true}}"#, "5a".repeat(32))
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "server got {got:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let present =
        ServerToClient::PeerPresent { key: a, endpoint: Some("10.1.2.3:41641".parse().unwrap()), flags: 1 };
    let gone =
        ServerToClient::PeerGone { key: a, reason: derpfleet_proto::msg::PeerGoneReason::Disconnected };
    s.push(present.clone());
    s.push(gone.clone());
    assert_eq!(tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap(), present);
    assert_eq!(tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap(), gone);
}

#[tokio::test]
async fn fast_start_tolerates_a_server_that_still_sends_101() {
    let tls = Tls { ignore_fast_start: true, ..Tls::tls13() };
    let s = TestServer::start(tls).await;
    let c = DerpConn::connect(&url(&s, true, pin(&s)), &ConnectOptions::new(NodePrivate::generate()))
        .await
        .unwrap();
    assert!(c.info().fast_start);
    let (tx, mut rx) = c.split();
    ping_pong(&tx, &mut rx, *b"after101").await;
}

#[tokio::test]
async fn web_pki_with_extra_root_checks_host_and_cert_name() {
    let s = TestServer::start(Tls::tls13()).await;
    let root = rustls::pki_types::CertificateDer::from(s.leaf_der.clone().unwrap());
    let opts = ConnectOptions { extra_roots: vec![root], ..ConnectOptions::new(NodePrivate::generate()) };
    // The leaf carries SANs 127.0.0.1 and localhost.
    DerpConn::connect(&url(&s, true, CertCheck::HostName), &opts).await.unwrap();
    DerpConn::connect(&url(&s, true, CertCheck::Name("localhost".into())), &opts).await.unwrap();
    let e = DerpConn::connect(&url(&s, true, CertCheck::Name("other.example".into())), &opts)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, ConnectError::Tls { .. }), "{e}");
}

/// A minimal HTTP CONNECT proxy on loopback; returns its address and the request heads it saw.
async fn connect_proxy() -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match c.read_u8().await {
                        Ok(b) => head.push(b),
                        Err(_) => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                seen.lock().unwrap().push(head.clone());
                let target = head.split_whitespace().nth(1).unwrap_or_default().to_string();
                let Ok(mut up) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = c.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
                let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn https_through_a_connect_proxy() {
    let s = TestServer::start(Tls::tls13()).await;
    let (paddr, seen) = connect_proxy().await;
    let mut proxy = derpfleet_client::dial::HttpProxy::parse(&format!("http://u:p@{paddr}")).unwrap();
    let opts = ConnectOptions { proxy: Some(proxy.clone()), ..ConnectOptions::new(NodePrivate::generate()) };
    let c = DerpConn::connect(&url(&s, true, pin(&s)), &opts).await.unwrap();
    assert!(c.info().fast_start);
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(heads[0].starts_with(&format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n", s.addr.port())), "{heads:?}");
    assert!(heads[0].contains("Proxy-Authorization: Basic dTpw\r\n"), "{heads:?}");
    // NO_PROXY-style bypass: reached directly, the proxy sees nothing new.
    proxy.no_proxy = vec!["127.0.0.1".into()];
    let opts = ConnectOptions { proxy: Some(proxy), ..ConnectOptions::new(NodePrivate::generate()) };
    DerpConn::connect(&url(&s, true, pin(&s)), &opts).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
    // A proxy that refuses: a clear error.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let bad = derpfleet_client::dial::HttpProxy::parse(&format!("http://{paddr}")).unwrap();
    let t = DerpTarget::Url(format!("http://{dead_addr}/derp").parse().unwrap());
    let opts = ConnectOptions { proxy: Some(bad), ..ConnectOptions::new(NodePrivate::generate()) };
    let e = DerpConn::connect(&t, &opts).await.err().unwrap();
    assert!(e.to_string().contains("502"), "{e}");
}
