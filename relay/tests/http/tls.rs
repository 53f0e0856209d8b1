//! TLS serving: spec §11 items 34, 39 and 47, SNI and ALPN rules, DERP over TLS.

use crate::http_common;

use std::sync::Arc;

use derpfleet_proto::NodePrivate;
use derpfleet_relay::http::tls;
use http_common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
static TLS12_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS12];

fn tls13() -> &'static [&'static rustls::SupportedProtocolVersion] {
    &TLS13_ONLY
}

fn tls12() -> &'static [&'static rustls::SupportedProtocolVersion] {
    &TLS12_ONLY
}

#[tokio::test]
async fn c34_tls13_chain_ends_with_derpkey_meta_cert_serial_2() {
    let dir = temp_dir("c34");
    let (relay, key, setup) = tls_relay(&dir).await;
    let pin = pin_of(setup.cert_name.as_deref().unwrap());
    let stream = tls_connect(relay.local_addr(), pinned_client(pin, tls13())).await.unwrap();
    let (_, conn) = stream.get_ref();
    assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let chain = conn.peer_certificates().unwrap();
    assert_eq!(chain.len(), 2, "leaf + meta-cert");
    let (_, meta) = x509_parser::parse_x509_certificate(chain.last().unwrap()).unwrap();
    let cn = meta.subject().iter_common_name().next().unwrap().as_str().unwrap();
    assert_eq!(cn, format!("derpkey{}", key.public().to_hex()));
    assert_eq!(meta.tbs_certificate.raw_serial(), &[2]);
    assert_eq!(meta.public_key().algorithm.algorithm, x509_parser::oid_registry::OID_SIG_ED25519);
    assert!(meta.basic_constraints().unwrap().is_some(), "BasicConstraints present");
    let days = (meta.validity().not_after.timestamp() - meta.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 60, "now ± 30 days");
    // The leaf is the generated self-signed IP certificate.
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    assert_eq!(leaf.subject().iter_common_name().next().unwrap().as_str().unwrap(), "127.0.0.1");
    relay.shutdown().await;
}

#[tokio::test]
async fn c39_port80_redirects_refuses_non_get_and_serves_generate_204() {
    let dir = temp_dir("c39");
    let (relay, _, _) = tls_relay(&dir).await;
    let p80 = relay.http_port_addr().expect("port 80 listener");
    assert_eq!(p80.ip(), relay.local_addr().ip(), "same IP as -a");
    let req = b"GET /anything?q=1 HTTP/1.1\r\nHost: derp.example.com\r\nConnection: close\r\n\r\n";
    let r = parse_response(&raw_exchange(p80, req).await);
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("https://derp.example.com/anything?q=1"));
    let req = b"POST /anything HTTP/1.1\r\nHost: derp.example.com\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
    let r = parse_response(&raw_exchange(p80, req).await);
    assert_eq!(r.status, 400);
    assert_eq!(String::from_utf8_lossy(&r.body).trim(), "Use HTTPS");
    let r = http(p80, "GET", "/generate_204", "X-Tailscale-Challenge: abc\r\n").await;
    assert_eq!((r.status, r.header("x-tailscale-response")), (204, Some("response abc")));
    // DERP is never spoken on port 80.
    let r = http(p80, "GET", "/derp", "Upgrade: DERP\r\n").await;
    assert_eq!(r.status, 302);
    relay.shutdown().await;
}

#[tokio::test]
async fn c47_sha256_raw_pin_accepts_one_leaf_plus_meta_and_rejects_two_leaves() {
    let dir = temp_dir("c47");
    let (relay, key, setup) = tls_relay(&dir).await;
    let cert_name = setup.cert_name.clone().unwrap();
    let pin = pin_of(&cert_name);
    // The derper rule: pinned leaf + meta-cert connects, with TLS 1.3 and 1.2.
    for versions in [tls13(), tls12()] {
        let mut s = tls_connect(relay.local_addr(), pinned_client(pin, versions)).await.unwrap();
        s.write_all(b"GET /derp HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: DERP\r\n\r\n").await.unwrap();
        assert_eq!(read_head(&mut s).await.status, 101);
        assert_eq!(TestClient::over(s, NodePrivate::generate()).await.unwrap().server_key, key.public());
    }
    // A wrong pin fails.
    let mut wrong = pin;
    wrong[0] ^= 1;
    assert!(tls_connect(relay.local_addr(), pinned_client(wrong, tls13())).await.is_err());

    // A server presenting two non-meta certificates (plus the meta-cert) fails the pin check.
    let crt = std::fs::read(dir.path().join("127.0.0.1.crt")).unwrap();
    let keypem = std::fs::read(dir.path().join("127.0.0.1.key")).unwrap();
    let leaf: CertificateDer<'static> = rustls_pemfile::certs(&mut &crt[..]).next().unwrap().unwrap();
    let (other_pem, _) = tls::self_signed_ip_cert("127.0.0.1".parse().unwrap()).unwrap();
    let other: CertificateDer<'static> =
        rustls_pemfile::certs(&mut other_pem.as_bytes()).next().unwrap().unwrap();
    let pkey: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &keypem[..]).unwrap().unwrap();
    let chain = vec![leaf, other, tls::meta_cert(&key.public()).unwrap()];
    let cfg = rustls::ServerConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, pkey)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let err = tls_connect(addr, pinned_client(pin, tls13())).await.unwrap_err();
    assert!(err.to_string().contains("2 non-meta certificates"), "{err}");
    let _ = tokio::time::timeout(STEP, server).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn generated_cert_is_saved_and_reused_across_restarts() {
    let dir = temp_dir("reuse");
    let key = NodePrivate::generate();
    let a = tls::manual(dir.path(), "127.0.0.1", &key.public()).unwrap();
    assert!(a.generated);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("127.0.0.1.key")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let b = tls::manual(dir.path(), "127.0.0.1", &key.public()).unwrap();
    assert!(!b.generated);
    assert_eq!(a.cert_name, b.cert_name, "the sha256-raw pin survives a restart");
}

/// Writes `<dir>/<name>.crt/.key` for a certificate valid for `san`.
fn write_dns_cert(dir: &TempDir, name: &str, san: &str) -> [u8; 32] {
    let ck = rcgen::generate_simple_self_signed(vec![san.to_owned()]).unwrap();
    std::fs::write(dir.path().join(format!("{name}.crt")), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join(format!("{name}.key")), ck.signing_key.serialize_pem()).unwrap();
    use sha2::Digest;
    sha2::Sha256::digest(ck.cert.der()).into()
}

#[tokio::test]
async fn manual_hostname_requires_matching_sni_and_offers_only_http11() {
    let dir = temp_dir("sni");
    let pin = write_dns_cert(&dir, "derp.example.test", "derp.example.test");
    let key = NodePrivate::generate();
    let setup = tls::manual(dir.path(), "derp.example.test", &key.public()).unwrap();
    assert_eq!(setup.cert_name, None, "hostname certs are not pinned by sha256-raw");
    let mut cfg = config(key);
    cfg.tls = Some(setup.config);
    let relay = derpfleet_relay::server::Server::spawn(cfg).await.unwrap();
    let addr = relay.local_addr();
    let connect = |sni: Option<&'static str>, alpn: Vec<Vec<u8>>| async move {
        let mut c = pinned_client(pin, tls13());
        c.alpn_protocols = alpn;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(c));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = match sni {
            Some(n) => ServerName::try_from(n).unwrap(),
            None => ServerName::IpAddress(addr.ip().into()),
        };
        tokio::time::timeout(STEP, connector.connect(name, tcp)).await.unwrap()
    };
    assert!(connect(Some("derp.example.test"), vec![]).await.is_ok());
    assert!(connect(Some("DERP.example.test"), vec![]).await.is_ok(), "SNI is case-insensitive");
    assert!(connect(Some("other.example.test"), vec![]).await.is_err());
    assert!(connect(None, vec![]).await.is_err(), "no SNI with a DNS hostname");
    let s = connect(Some("derp.example.test"), vec![b"h2".to_vec(), b"http/1.1".to_vec()]).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]), "never h2");
    assert!(connect(Some("derp.example.test"), vec![b"h2".to_vec()]).await.is_err(), "h2 alone is refused");
    relay.shutdown().await;
}

#[test]
fn manual_cert_for_another_name_is_refused_at_start() {
    let dir = temp_dir("mismatch");
    write_dns_cert(&dir, "derp.example.test", "elsewhere.example.test");
    let e = tls::manual(dir.path(), "derp.example.test", &NodePrivate::generate().public()).unwrap_err();
    assert!(matches!(e, tls::TlsError::HostnameMismatch { .. }), "{e}");
    let e = tls::manual(dir.path(), "missing.example.test", &NodePrivate::generate().public()).unwrap_err();
    assert!(e.to_string().contains("missing.example.test.crt"), "{e}");
}
