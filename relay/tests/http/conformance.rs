//! Spec §11 items 31–33 and 35–38 (the HTTP layer), over real loopback TCP.

use crate::http_common;

use bytes::{Bytes, BytesMut};
use derpfleet_proto::codec::ClientCodec;
use derpfleet_proto::msg::{ClientToServer, ServerToClient};
use derpfleet_proto::NodePrivate;
use futures_util::{SinkExt, StreamExt};
use http_common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::codec::Decoder;

type WsStream = tokio_tungstenite::WebSocketStream<TcpStream>;

/// The server's DERP byte stream read out of WebSocket messages, however they split it.
#[derive(Default)]
struct WsInbound {
    bytes: BytesMut,
    codec: ClientCodec,
}

impl WsInbound {
    async fn next(&mut self, ws: &mut WsStream) -> ServerToClient {
        loop {
            if let Some(m) = self.codec.decode(&mut self.bytes).unwrap() {
                return m;
            }
            match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
                Some(Ok(Message::Binary(b))) => self.bytes.extend_from_slice(&b),
                Some(Ok(_)) => {}
                other => panic!("websocket ended: {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn c31_derp_without_upgrade_is_426() {
    let (relay, _) = plain_relay().await;
    let r = http(relay.local_addr(), "GET", "/derp", "").await;
    assert_eq!(r.status, 426);
    assert_eq!(String::from_utf8_lossy(&r.body).trim(), "DERP requires connection upgrade");
    // An unknown upgrade protocol is no better.
    let r = http(relay.local_addr(), "GET", "/derp", "Upgrade: h2c\r\n").await;
    assert_eq!(r.status, 426);
    relay.shutdown().await;
}

#[tokio::test]
async fn c32_upgrade_derp_is_101_then_server_key() {
    let (relay, key) = plain_relay().await;
    let mut s = TcpStream::connect(relay.local_addr()).await.unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let expect_head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Version: 2\r\n\
         Derp-Public-Key: {}\r\n\r\n",
        key.public().to_hex()
    );
    let server_key = derpfleet_proto::handshake::server_key_frame(&key.public());
    let mut got = vec![0u8; expect_head.len() + server_key.len()];
    tokio::time::timeout(STEP, s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&got[..expect_head.len()]), expect_head);
    assert_eq!(&got[expect_head.len()..], &server_key[..], "ServerKey right after the 101");
    relay.shutdown().await;
}

#[tokio::test]
async fn c33_fast_start_sends_no_response_and_processes_pipelined_client_info() {
    let (relay, server_key) = plain_relay().await;
    let client = NodePrivate::generate();
    let mut one_write = b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nDerp-Fast-Start: 1\r\n\r\n"
        .to_vec();
    one_write.extend(encode(&client_info_frame(&client, &server_key.public())));
    let mut s = TcpStream::connect(relay.local_addr()).await.unwrap();
    s.write_all(&one_write).await.unwrap();
    let mut c = TestClient::new(s, client.clone());
    // No HTTP response: the very first bytes are the ServerKey frame, then ServerInfo.
    match c.next(STEP).await.unwrap() {
        Some(ServerToClient::ServerKey(k)) => assert_eq!(k, server_key.public()),
        other => panic!("expected ServerKey first, got {other:?}"),
    }
    c.server_key = server_key.public();
    assert_eq!(c.want_server_info().await.unwrap().version, 2);
    // And the connection is live: a Ping is answered.
    c.send(&ClientToServer::Ping(*b"fastping")).await.unwrap();
    assert_eq!(c.next_data(STEP).await.unwrap(), Some(ServerToClient::Pong(*b"fastping")));
    relay.shutdown().await;
}

#[tokio::test]
async fn c35_websocket_derp_with_frames_split_and_packed_across_messages() {
    let (relay, server_key) = plain_relay().await;
    let addr = relay.local_addr();
    // Receiver B over plain DERP.
    let (mut b, b_key) = derp_client(addr).await;

    // Sender A over WebSocket with subprotocol derp.
    let mut req = format!("ws://{addr}/derp").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "derp".parse().unwrap());
    // Offer compression: the server must not accept it.
    req.headers_mut()
        .insert("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits".parse().unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, resp) =
        tokio::time::timeout(STEP, tokio_tungstenite::client_async(req, tcp)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 101);
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "derp");
    assert!(resp.headers().get("sec-websocket-extensions").is_none(), "no compression");

    // Read the server's byte stream (ServerKey) from however many messages it takes.
    let mut inbound = WsInbound::default();
    assert_eq!(inbound.next(&mut ws).await, ServerToClient::ServerKey(server_key.public()));

    // ClientInfo split across three messages.
    let a_key = NodePrivate::generate();
    let ci = encode(&client_info_frame(&a_key, &server_key.public()));
    for part in [&ci[..3], &ci[3..40], &ci[40..]] {
        ws.send(Message::Binary(Bytes::copy_from_slice(part))).await.unwrap();
    }
    match inbound.next(&mut ws).await {
        ServerToClient::ServerInfo(_) => {}
        other => panic!("expected ServerInfo, got {other:?}"),
    }

    // Two SendPackets packed into one message, then a third split in the middle of its header.
    let p = |d: &[u8]| {
        encode(&ClientToServer::SendPacket { dst: b_key.public(), data: Bytes::copy_from_slice(d) })
    };
    let packed = [p(b"one"), p(b"two")].concat();
    ws.send(Message::Binary(packed.into())).await.unwrap();
    let third = p(b"three");
    ws.send(Message::Binary(Bytes::copy_from_slice(&third[..2]))).await.unwrap();
    ws.send(Message::Binary(Bytes::copy_from_slice(&third[2..]))).await.unwrap();
    for want in [&b"one"[..], b"two", b"three"] {
        let (src, data) = b.want_packet(STEP).await.unwrap();
        assert_eq!(src, a_key.public());
        assert_eq!(data, want);
    }

    // And the other way: B → A arrives through the WebSocket.
    b.send(&ClientToServer::SendPacket { dst: a_key.public(), data: Bytes::from_static(b"back") })
        .await
        .unwrap();
    loop {
        match inbound.next(&mut ws).await {
            ServerToClient::KeepAlive => continue,
            ServerToClient::RecvPacket { src, data } => {
                assert_eq!((src, &data[..]), (b_key.public(), &b"back"[..]));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn c36_legacy_websocket_upgrade_without_subprotocol_is_raw_derp() {
    let (relay, key) = plain_relay().await;
    let mut s = TcpStream::connect(relay.local_addr()).await.unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(head.status, 101);
    assert_eq!(head.header("upgrade"), Some("DERP"));
    assert_eq!(head.header("derp-public-key"), Some(key.public().to_hex().as_str()));
    let c = TestClient::over(s, NodePrivate::generate()).await.unwrap();
    assert_eq!(c.server_key, key.public());
    relay.shutdown().await;
}

#[tokio::test]
async fn c37_probe_endpoints() {
    let (relay, _) = plain_relay().await;
    let addr = relay.local_addr();
    for path in ["/derp/probe", "/derp/latency-check"] {
        for method in ["GET", "HEAD"] {
            let r = http(addr, method, path, "").await;
            assert_eq!(r.status, 200, "{method} {path}");
            assert_eq!(r.header("access-control-allow-origin"), Some("*"));
            assert!(r.body.is_empty());
        }
        let r = http(addr, "POST", path, "Content-Length: 0\r\n").await;
        assert_eq!(r.status, 405, "POST {path}");
        assert_eq!(String::from_utf8_lossy(&r.body).trim(), "bogus probe method");
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn c38_generate_204_challenge_echo_rules() {
    let (relay, _) = plain_relay().await;
    let addr = relay.local_addr();
    let r = http(addr, "GET", "/generate_204", "X-Tailscale-Challenge: ts_derp1.example.com\r\n").await;
    assert_eq!(r.status, 204);
    assert_eq!(r.header("x-tailscale-response"), Some("response ts_derp1.example.com"));
    assert_eq!(
        r.header("cache-control"),
        Some("no-cache, no-store, must-revalidate, no-transform, max-age=0")
    );
    let long = "a".repeat(65);
    for bad in [long.as_str(), "has space", "bad/slash"] {
        let r = http(addr, "GET", "/generate_204", &format!("X-Tailscale-Challenge: {bad}\r\n")).await;
        assert_eq!(r.status, 204);
        assert_eq!(r.header("x-tailscale-response"), None, "{bad:?}");
    }
    // A NUL byte is not even a valid header value; the server must still not echo it or crash.
    let raw = raw_exchange(
        addr,
        b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Tailscale-Challenge: a\0b\r\n\r\n",
    )
    .await;
    assert!(!String::from_utf8_lossy(&raw).to_ascii_lowercase().contains("x-tailscale-response"));
    let ok64 = "b".repeat(64);
    let r = http(addr, "GET", "/generate_204", &format!("X-Tailscale-Challenge: {ok64}\r\n")).await;
    assert_eq!(r.header("x-tailscale-response"), Some(format!("response {ok64}").as_str()));
    let r = http(addr, "GET", "/generate_204", "").await;
    assert_eq!((r.status, r.header("x-tailscale-response")), (204, None));
    relay.shutdown().await;
}

#[tokio::test]
async fn home_robots_and_404() {
    let (relay, _) = plain_relay().await;
    let addr = relay.local_addr();
    let r = http(addr, "GET", "/", "").await;
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("DERP server"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("strict-transport-security"), Some("max-age=63072000; includeSubDomains"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r.header("content-security-policy").is_some());
    let r = http(addr, "GET", "/robots.txt", "").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"User-agent: *\nDisallow: /\n"[..]));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(http(addr, "GET", "/nope", "").await.status, 404);
    let raw = raw_exchange(
        addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(parse_response(&raw).status, 403);
    relay.shutdown().await;
}

#[tokio::test]
async fn home_blank_and_redirect() {
    for (home, status, location) in [
        (derpfleet_relay::http::HomePage::Blank, 200, None),
        (
            derpfleet_relay::http::HomePage::Redirect("https://example.com/x".into()),
            302,
            Some("https://example.com/x"),
        ),
    ] {
        let mut cfg = config(NodePrivate::generate());
        cfg.home = home;
        let relay = derpfleet_relay::server::Server::spawn(cfg).await.unwrap();
        let r = http(relay.local_addr(), "GET", "/", "").await;
        assert_eq!(r.status, status);
        assert_eq!(r.header("location"), location);
        if status == 200 {
            assert!(r.body.is_empty());
        }
        relay.shutdown().await;
    }
}

#[tokio::test]
async fn derp_upgrade_on_a_later_keepalive_request_works() {
    let (relay, key) = plain_relay().await;
    let mut s = TcpStream::connect(relay.local_addr()).await.unwrap();
    s.write_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("0"));
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(head.status, 101);
    assert_eq!(head.header("derp-public-key"), Some(key.public().to_hex().as_str()));
    let c = TestClient::over(s, NodePrivate::generate()).await.unwrap();
    assert_eq!(c.server_key, key.public());
    relay.shutdown().await;
}

#[tokio::test]
async fn derp_disabled_serves_404() {
    let mut cfg = config(NodePrivate::generate());
    cfg.derp_enabled = false;
    let relay = derpfleet_relay::server::Server::spawn(cfg).await.unwrap();
    let r = http(relay.local_addr(), "GET", "/derp", "Upgrade: DERP\r\n").await;
    assert_eq!(r.status, 404);
    relay.shutdown().await;
}

async fn connect_with(
    addr: std::net::SocketAddr,
    server: derpfleet_proto::NodePublic,
    extra: &str,
) -> TestClient<TcpStream> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.status, 101);
    let mut c = TestClient::over(s, NodePrivate::generate()).await.unwrap();
    assert_eq!(c.server_key, server);
    // A Pong proves the connection is fully set up (its gauges updated).
    c.send(&ClientToServer::Ping(*b"ideal?!!")).await.unwrap();
    assert_eq!(c.next_data(STEP).await.unwrap(), Some(ServerToClient::Pong(*b"ideal?!!")));
    c
}

#[tokio::test]
async fn ideal_node_header_marks_the_connection_not_ideal() {
    let (relay, key) = plain_relay().await;
    let notideal = |relay: &derpfleet_relay::server::Server| {
        relay.derp().metrics().snapshot().get("derp_current_notideal_connections", &[])
    };
    let _plain = connect_with(relay.local_addr(), key.public(), "").await;
    assert_eq!(notideal(&relay), 0.0);
    let _not_ideal = connect_with(relay.local_addr(), key.public(), "Ideal-Node: derp1\r\n").await;
    assert_eq!(notideal(&relay), 1.0);
    relay.shutdown().await;
}

#[tokio::test]
async fn debug_varz_for_loopback_only_without_forwarding_and_counts_websocket_accepts() {
    let (relay, _) = plain_relay().await;
    let addr = relay.local_addr();
    // One WebSocket DERP connection, counted by the HTTP layer.
    let mut req = format!("ws://{addr}/derp").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "derp".parse().unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (_ws, _) =
        tokio::time::timeout(STEP, tokio_tungstenite::client_async(req, tcp)).await.unwrap().unwrap();
    let r = http(addr, "GET", "/debug/varz", "").await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.lines().any(|l| l.starts_with("derp_websocket_accepts") && l.ends_with(" 1")), "{text}");
    assert!(text.contains("derp_accepts"), "{text}");
    let r = http(addr, "GET", "/debug/varz", "X-Forwarded-For: 127.0.0.1\r\n").await;
    assert_eq!(r.status, 403);
    relay.shutdown().await;
}

#[tokio::test]
async fn websocket_upgrade_on_a_later_keepalive_request_works() {
    let (relay, key) = plain_relay().await;
    let addr = relay.local_addr();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_head(&mut s).await.status, 200);
    let mut req = format!("ws://{addr}/derp").into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", "derp".parse().unwrap());
    let (mut ws, resp) =
        tokio::time::timeout(STEP, tokio_tungstenite::client_async(req, s)).await.unwrap().unwrap();
    assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), "derp");
    let frame = WsInbound::default().next(&mut ws).await;
    assert_eq!(frame, ServerToClient::ServerKey(key.public()));
    relay.shutdown().await;
}
