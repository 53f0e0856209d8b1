//! HTTP upgrade part: random and truncated bytes thrown at the request
//! sniffer and the upgrade: no panic anywhere in the server, only that connection closes, and an
//! established pair of clients keeps relaying throughout.

use crate::http_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use derpfleet_proto::msg::ClientToServer;
use http_common::*;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

static PANICS: AtomicUsize = AtomicUsize::new(0);

const REQUESTS: &[&[u8]] = &[
    b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
    b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nDerp-Fast-Start: 1\r\n\r\n",
    b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nSec-WebSocket-Protocol: derp\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /generate_204 HTTP/1.1\r\nHost: x\r\nX-Tailscale-Challenge: abc\r\n\r\n",
    b"POST /derp/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n",
];

/// Sends `bytes`, half-closes, and requires the server to close within the bound.
async fn throw(addr: std::net::SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(STEP, s.read_to_end(&mut sink)).await;
    assert!(closed.is_ok(), "server kept a garbage connection open");
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        // A valid request truncated anywhere, or followed by random bytes (garbage DERP frames).
        (0..REQUESTS.len(), any::<prop::sample::Index>(), proptest::collection::vec(any::<u8>(), 0..512))
            .prop_map(|(i, cut, tail)| {
                let req = REQUESTS[i];
                let mut v = req[..cut.index(req.len() + 1)].to_vec();
                if v.len() == req.len() {
                    v.extend(tail);
                }
                v
            }),
    ]
}

#[test]
fn random_and_truncated_requests_only_close_their_connection() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let rt = Arc::new(tokio::runtime::Runtime::new().unwrap());
    let (relay, a, b, b_key) = rt.block_on(async {
        let (relay, _) = plain_relay().await;
        let (a, _) = derp_client(relay.local_addr()).await;
        let (b, b_key) = derp_client(relay.local_addr()).await;
        (relay, a, b, b_key)
    });
    let addr = relay.local_addr();
    let pair = tokio::sync::Mutex::new((a, b, 0u32));
    let config = ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(bytes in input())| {
        rt.block_on(async {
            throw(addr, &bytes).await;
            // The established pair keeps relaying.
            let (a, b, counter) = &mut *pair.lock().await;
            *counter += 1;
            let data = Bytes::from(counter.to_be_bytes().to_vec());
            a.send(&ClientToServer::SendPacket { dst: b_key.public(), data: data.clone() }).await.unwrap();
            let (_, got) = b.want_packet(STEP).await.unwrap();
            assert_eq!(got, data.to_vec());
        });
    });
    rt.block_on(relay.shutdown());
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a panic happened somewhere in the server");
}

#[test]
fn random_bytes_at_the_tls_port_only_close_their_connection() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = temp_dir("fuzz-tls");
    let (relay, pin) = rt.block_on(async {
        let (relay, _, setup) = tls_relay(&dir).await;
        (relay, pin_of(setup.cert_name.as_deref().unwrap()))
    });
    let addr = relay.local_addr();
    let config = ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(bytes in proptest::collection::vec(any::<u8>(), 0..2048))| {
        rt.block_on(throw(addr, &bytes));
    });
    // Still serving TLS afterwards.
    rt.block_on(async {
        let mut s = tls_connect(addr, pinned_client(pin, rustls::DEFAULT_VERSIONS)).await.unwrap();
        s.write_all(b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        assert_eq!(read_head(&mut s).await.status, 200);
        relay.shutdown().await;
    });
}
