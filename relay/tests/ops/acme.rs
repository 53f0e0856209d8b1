//! `-certmode letsencrypt` against a local ACME CA: Debian's `pebble` (RFC 8555 test server) with
//! `pebble-challtestsrv` as its DNS (so the test name resolves to a loopback address of this
//! test only). The relay binary orders a certificate, pebble validates it with TLS-ALPN-01 on the
//! relay's port 443, and a DERP client over TLS then gets the issued certificate (plus the
//! `derpkey` meta-certificate) and completes the DERP handshake.

use crate::http_common;
use crate::ops_common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use derpfleet_proto::NodePrivate;
use http_common::{read_head, temp_dir, TestClient, TestVerifier};
use ops_common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;

/// A loopback address no other test uses, so the relay can own port 443 on it.
const RELAY_IP: &str = "127.0.0.44";
const NAME: &str = "derp.acme.test";

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, what: &str) -> Killed {
    Killed(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: {e} (Debian package pebble; scripts/apt-packages.txt)")),
    )
}

/// A CA and a certificate for pebble's HTTPS API on 127.0.0.1: (ca pem, cert pem, key pem).
fn api_certificates() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "ops_acme test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

fn names(der: &[u8]) -> (String, String, Vec<String>) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let cn = |n: &x509_parser::x509::X509Name<'_>| {
        n.iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or("").to_owned()
    };
    let sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| s.value.general_names.iter().map(|g| g.to_string()).collect())
        .unwrap_or_default();
    (cn(cert.subject()), cn(cert.issuer()), sans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letsencrypt_mode_gets_a_certificate_from_a_local_acme_ca() {
    let dir = temp_dir("ops-acme");
    let (ca_pem, cert_pem, key_pem) = api_certificates();
    let ca_file = dir.path().join("api-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    std::fs::write(dir.path().join("api-cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.path().join("api-key.pem"), &key_pem).unwrap();
    let (dns_port, mgmt_port, api_port, pebble_mgmt) =
        (free_udp_port(), free_tcp_port(), free_tcp_port(), free_tcp_port());
    let config = serde_json::json!({ "pebble": {
        "listenAddress": format!("127.0.0.1:{api_port}"),
        "managementListenAddress": format!("127.0.0.1:{pebble_mgmt}"),
        "certificate": dir.path().join("api-cert.pem"),
        "privateKey": dir.path().join("api-key.pem"),
        "httpPort": 80,
        "tlsPort": 443,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    }});
    let config_file = dir.path().join("pebble.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let _dns = spawn(
        Command::new("pebble-challtestsrv").args([
            "-defaultIPv4",
            RELAY_IP,
            "-defaultIPv6",
            "",
            "-dns01",
            &format!("127.0.0.1:{dns_port}"),
            "-management",
            &format!("127.0.0.1:{mgmt_port}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
        ]),
        "pebble-challtestsrv",
    );
    let _pebble = spawn(
        Command::new("pebble")
            .args(["-config", config_file.to_str().unwrap(), "-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0"),
        "pebble",
    );
    // Wait for pebble's API.
    let api: SocketAddr = format!("127.0.0.1:{api_port}").parse().unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(api).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "pebble did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let relay_addr = format!("{RELAY_IP}:443");
    let p = Proc::start(&[
        "-a",
        &relay_addr,
        "-hostname",
        NAME,
        "-certmode",
        "letsencrypt",
        "-acme-directory-url",
        &format!("https://127.0.0.1:{api_port}/dir"),
        "-acme-ca-file",
        ca_file.to_str().unwrap(),
        "-certdir",
        dir.path().join("certs").to_str().unwrap(),
        "-c",
        dir.path().join("derper.key").to_str().unwrap(),
        "-http-port",
        "-1",
        "-stun=false",
        "-metrics-addr=",
    ]);
    p.wait_for_line("derpfleet-relay running");
    // Ordering, TLS-ALPN-01 validation by pebble, finalisation, download.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !p.log().contains("DeployedNewCert") {
        assert!(std::time::Instant::now() < deadline, "no certificate; relay log:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A DERP client over TLS with SNI = hostname.
    let capture = TestVerifier::accept_any();
    let client = capture.client_config(rustls::DEFAULT_VERSIONS);
    let tcp = tokio::net::TcpStream::connect(relay_addr.as_str()).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from(NAME).unwrap(), tcp)
        .await
        .unwrap();
    let chain = capture.seen();
    let (_, issuer, sans) = names(&chain[0]);
    assert!(sans.iter().any(|s| s.contains(NAME)), "leaf SANs {sans:?}");
    assert!(issuer.to_ascii_lowercase().contains("pebble"), "issued by {issuer:?}");
    assert!(chain.iter().any(|c| names(c).0.starts_with("derpkey")), "meta-certificate appended");
    tls.write_all(
        format!("GET /derp HTTP/1.1\r\nHost: {NAME}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(read_head(&mut tls).await.status, 101);
    TestClient::over(tls, NodePrivate::generate()).await.unwrap();
    assert!(!p.log().contains("panicked"), "{}", p.log());
}
