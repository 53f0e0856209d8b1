//! Interop with a DERP client nobody here wrote: Tailscale's Rust `ts_derp` 0.6.1.
//!
//! Note: `ts_derp` 0.6.1 does not implement `TlsValidationConfig::SelfSigned` (its dialer filters
//! such servers out, and `Client::connect` then panics on `None`). So the `sha256-raw` path is
//! exercised by dialing TLS ourselves with a pinning verifier (the Tailscale rule) and handing the
//! upgraded stream to `ts_derp::Client::handshake`; `Client::connect` is exercised end to end with
//! `InsecureForTests` (its own TLS, HTTP upgrade via hyper, and handshake).

use crate::http_common;

use std::net::Ipv4Addr;
use std::time::Duration;

use http_common::*;
use ts_derp::{Client, IpUsage, ServerConnInfo, TlsValidationConfig};
use ts_keys::NodeKeyPair;

const STEP: Duration = Duration::from_secs(10);

/// Two clients exchange packets both ways.
async fn exchange<A, B>(a: &Client<A>, a_key: &NodeKeyPair, b: &Client<B>, b_key: &NodeKeyPair)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    for i in 0..3u8 {
        let msg = [b"hello from a ".as_slice(), &[b'0' + i]].concat();
        a.send_one(b_key.public, &msg).await.unwrap();
        let (src, pkt) = tokio::time::timeout(STEP, b.recv_one()).await.unwrap().unwrap();
        assert_eq!(src, a_key.public);
        assert_eq!(pkt.as_ref(), msg.as_slice());

        let reply = [b"reply from b ".as_slice(), &[b'0' + i]].concat();
        b.send_one(a_key.public, &reply).await.unwrap();
        let (src, pkt) = tokio::time::timeout(STEP, a.recv_one()).await.unwrap().unwrap();
        assert_eq!(src, b_key.public);
        assert_eq!(pkt.as_ref(), reply.as_slice());
    }
}

#[tokio::test]
async fn ts_derp_clients_exchange_packets_over_plain_http() {
    let (relay, _) = plain_relay().await;
    let (a_key, b_key) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = Client::handshake(derp_upgrade(relay.local_addr()).await, &a_key).await.unwrap();
    let b = Client::handshake(derp_upgrade(relay.local_addr()).await, &b_key).await.unwrap();
    exchange(&a, &a_key, &b, &b_key).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn ts_derp_clients_exchange_packets_over_tls_pinned_by_sha256_raw() {
    let dir = temp_dir("interop-tls");
    let (relay, _, setup) = tls_relay(&dir).await;
    let pin = pin_of(setup.cert_name.as_deref().unwrap());
    let upgraded = || async {
        let mut cfg = pinned_client(pin, rustls::DEFAULT_VERSIONS);
        cfg.alpn_protocols.clear();
        let mut s = tls_connect(relay.local_addr(), cfg).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_head(&mut s).await.status, 101);
        s
    };
    let (a_key, b_key) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = Client::handshake(upgraded().await, &a_key).await.unwrap();
    let b = Client::handshake(upgraded().await, &b_key).await.unwrap();
    exchange(&a, &a_key, &b, &b_key).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn ts_derp_client_connect_over_tls_end_to_end() {
    let dir = temp_dir("interop-connect");
    let (relay, _, _) = tls_relay(&dir).await;
    // ts_derp's own TLS dialer uses the process-default provider, and its dependencies enable both
    // ring and aws-lc-rs, so the client side must pick one. (Our server never relies on it.)
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server = ServerConnInfo {
        hostname: "127.0.0.1".into(),
        ipv4: IpUsage::FixedAddr(Ipv4Addr::LOCALHOST),
        ipv6: IpUsage::Disable,
        tls_validation_config: TlsValidationConfig::InsecureForTests,
        https_port: relay.local_addr().port(),
        stun_port: None,
        stun_only: false,
        supports_port_80: false,
    };
    let (a_key, b_key) = (NodeKeyPair::random(), NodeKeyPair::random());
    let a = tokio::time::timeout(STEP, Client::connect([&server], &a_key)).await.unwrap().unwrap();
    let b = tokio::time::timeout(STEP, Client::connect([&server], &b_key)).await.unwrap().unwrap();
    exchange(&a, &a_key, &b, &b_key).await;
    relay.shutdown().await;
}
