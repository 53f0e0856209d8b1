//! Shared fixtures for the HTTP/TLS/interop tests: an in-process relay on loopback, the upgrade
//! to DERP for the raw test client (`derpfleet_relay::testing::TestClient`), raw HTTP requests,
//! and a `sha256-raw` pinning TLS verifier.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use derpfleet_proto::handshake::seal_client_info;
use derpfleet_proto::msg::ClientToServer;
use derpfleet_proto::{NodePrivate, NodePublic};
use derpfleet_relay::core::derp_server::DerpServerConfig;
use derpfleet_relay::http::HomePage;
use derpfleet_relay::server::{Server, ServerConfig, TcpConfig};
#[allow(unused_imports)] // each test binary uses its own subset
pub use derpfleet_relay::testing::{tailscaled_info, temp_dir, TempDir, TestClient};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every wait in these tests is bounded by this.
pub const STEP: Duration = Duration::from_secs(10);

pub fn config(key: NodePrivate) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        http_port: None,
        home: HomePage::Default,
        derp_enabled: true,
        derp: DerpServerConfig { private_key: key, mesh_key: None, write_timeout: None, queue_depth: 32 },
        tcp: TcpConfig::default(),
    }
}

/// A plain-HTTP relay on an ephemeral loopback port.
pub async fn plain_relay() -> (Server, NodePrivate) {
    let key = NodePrivate::generate();
    (Server::spawn(config(key.clone())).await.unwrap(), key)
}

/// A TLS relay (certmode manual, IP hostname → self-signed) with the plain-HTTP port on.
pub async fn tls_relay(dir: &TempDir) -> (Server, NodePrivate, derpfleet_relay::http::tls::TlsSetup) {
    let key = NodePrivate::generate();
    let setup = derpfleet_relay::http::tls::manual(dir.path(), "127.0.0.1", &key.public()).unwrap();
    let mut cfg = config(key.clone());
    cfg.tls = Some(setup.config.clone());
    cfg.http_port = Some(0);
    (Server::spawn(cfg).await.unwrap(), key, setup)
}

/// Sends raw bytes, half-closes nothing, and reads until the peer closes (bounded).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, s.read_to_end(&mut out)).await.expect("server did not close");
    out
}

/// A parsed HTTP response head (status, lowercased header names) and body.
#[derive(Debug)]
pub struct HttpResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}
impl HttpResp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub fn parse_response(raw: &[u8]) -> HttpResp {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(raw).unwrap() {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => panic!("partial response: {:?}", String::from_utf8_lossy(raw)),
    };
    HttpResp {
        status: resp.code.unwrap(),
        headers: resp
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
        body: raw[n..].to_vec(),
    }
}

/// One request with `Connection: close` on a fresh TCP connection.
pub async fn http(addr: SocketAddr, method: &str, path: &str, extra: &str) -> HttpResp {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n");
    parse_response(&raw_exchange(addr, req.as_bytes()).await)
}

/// The ClientInfo frame tailscaled sends to `server`, for tests that write it by hand.
pub fn client_info_frame(key: &NodePrivate, server: &NodePublic) -> ClientToServer {
    ClientToServer::ClientInfo(seal_client_info(key, server, &tailscaled_info()))
}

pub fn encode(msg: &ClientToServer) -> Vec<u8> {
    let mut b = BytesMut::new();
    msg.encode(&mut b);
    b.to_vec()
}

/// Reads an HTTP response head byte by byte (so nothing after it is consumed).
pub async fn read_head<S: AsyncRead + Unpin>(io: &mut S) -> HttpResp {
    let mut raw = Vec::new();
    tokio::time::timeout(STEP, async {
        while !raw.ends_with(b"\r\n\r\n") {
            let b = io.read_u8().await.expect("EOF inside a response head");
            raw.push(b);
        }
    })
    .await
    .expect("no response head in time");
    parse_response(&raw)
}

/// `GET /derp` with `Upgrade: DERP` on a fresh connection; returns the stream after the 101.
pub async fn derp_upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /derp HTTP/1.1\r\nHost: relay\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert_eq!(head.status, 101);
    s
}

/// A connected, handshaken raw DERP client on a plain relay.
pub async fn derp_client(addr: SocketAddr) -> (TestClient, NodePrivate) {
    let key = NodePrivate::generate();
    let c = TestClient::over(derp_upgrade(addr).await, key.clone()).await.unwrap();
    (c, key)
}

// ---------------------------------------------------------------------------------------------
// TLS client side.

pub fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}

/// The one certificate verifier of the relay tests. [`TestVerifier::pinned`] applies Tailscale's
/// `sha256-raw:` rule (spec §2.6): ignore `derpkey*` certificates; exactly one other certificate;
/// its SHA-256 must match; it must be within its validity dates; no chain.
/// [`TestVerifier::accept_any`] accepts whatever is shown. Both keep the chain they were shown
/// ([`TestVerifier::seen`]) and check handshake signatures with the ring provider.
#[derive(Debug, Default)]
pub struct TestVerifier {
    pin: Option<[u8; 32]>,
    seen: std::sync::Mutex<Vec<CertificateDer<'static>>>,
}

impl TestVerifier {
    /// The `sha256-raw:` pin check.
    pub fn pinned(pin: [u8; 32]) -> Arc<Self> {
        Arc::new(Self { pin: Some(pin), ..Default::default() })
    }

    /// No check at all (the test inspects [`TestVerifier::seen`] instead).
    pub fn accept_any() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The chain (end entity first) of the last handshake.
    pub fn seen(&self) -> Vec<CertificateDer<'static>> {
        self.seen.lock().unwrap().clone()
    }

    /// A client config using this verifier, with `versions` and no ALPN (like tailscaled).
    pub fn client_config(
        self: &Arc<Self>,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(ring())
            .with_protocol_versions(versions)
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth()
    }

    fn check_pin(
        pin: &[u8; 32],
        chain: &[CertificateDer<'static>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let others: Vec<&CertificateDer<'_>> =
            chain.iter().filter(|c| !common_name(c).is_some_and(|cn| cn.starts_with("derpkey"))).collect();
        if others.len() != 1 {
            return Err(rustls::Error::General(format!("{} non-meta certificates", others.len())));
        }
        let der = others[0].as_ref();
        if Sha256::digest(der).as_slice() != pin {
            return Err(rustls::Error::General("sha256-raw mismatch".into()));
        }
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| rustls::Error::General(format!("parse: {e}")))?;
        let t = now.as_secs() as i64;
        if t < cert.validity().not_before.timestamp() || t > cert.validity().not_after.timestamp() {
            return Err(rustls::Error::General("certificate outside its validity".into()));
        }
        Ok(())
    }
}

impl ServerCertVerifier for TestVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain: Vec<CertificateDer<'static>> =
            std::iter::once(end_entity).chain(intermediates).map(|c| c.clone().into_owned()).collect();
        *self.seen.lock().unwrap() = chain.clone();
        if let Some(pin) = &self.pin {
            Self::check_pin(pin, &chain, now)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &ring().signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &ring().signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ring().signature_verification_algorithms.supported_schemes()
    }
}

/// Parses `sha256-raw:<hex>`.
pub fn pin_of(cert_name: &str) -> [u8; 32] {
    hex::decode(cert_name.strip_prefix("sha256-raw:").unwrap()).unwrap().try_into().unwrap()
}

/// A client config pinning `pin`, with the given protocol versions and no ALPN (like tailscaled).
pub fn pinned_client(
    pin: [u8; 32],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    TestVerifier::pinned(pin).client_config(versions)
}

/// A client config that verifies the server against `roots` (webpki, with the name check).
pub fn trusting_client(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// TLS-connects to `addr` with no SNI (IP-literal hostname, as tailscaled).
pub async fn tls_connect(
    addr: SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::IpAddress(addr.ip().into());
    tokio::time::timeout(STEP, connector.connect(name, tcp)).await.expect("TLS handshake hung")
}
