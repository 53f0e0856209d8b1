//! ACME (`-certmode letsencrypt`/`gcp`) against a local CA: Debian's `pebble` (RFC 8555 test
//! server) with `pebble-challtestsrv` as its DNS (every name resolves to the loopback address of
//! that test only). Each test starts its own pebble, with the validation ports
//! (`httpPort`/`tlsPort`) pointed where that test wants them, runs the relay binary on port 443 of
//! its own loopback address, waits for the issued certificate, then connects as a DERP client
//! that verifies the served chain against pebble's root (from its management endpoint
//! `/roots/0`) and completes the DERP handshake.
//!
//! Covered: TLS-ALPN-01 on the main port, HTTP-01 on `-http-port` (pebble cannot reach the TLS
//! port there, so only HTTP-01 can succeed), an EAB-required CA (without EAB a clear error, with
//! `-acme-eab-kid`/`-acme-eab-key` a certificate, and `-certmode gcp` pointed at it), and an IP
//! certificate with `-acme-ip-certs` for an IP `-hostname` (HTTP-01).

use crate::http_common;
use crate::ops_common;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use derpfleet_proto::NodePrivate;
use http_common::{read_head, temp_dir, trusting_client, TempDir, TestClient};
use ops_common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "derp.acme.test";
/// An EAB key as pebble's config takes it (base64url), and its key id.
const EAB_KID: &str = "kid-ops-acme";
const EAB_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
/// How long an issuance may take (order, validation, finalisation; two orders for HTTP-01).
const ISSUE_WAIT: Duration = Duration::from_secs(60);

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

/// A running pebble and its DNS.
struct Pebble {
    dir: TempDir,
    api_port: u16,
    mgmt_port: u16,
    /// The CA of pebble's API certificate (`-acme-ca-file`).
    api_ca: PathBuf,
    _dns: Killed,
    _pebble: Killed,
}

impl Pebble {
    /// Starts pebble validating HTTP-01 on `relay_ip:http_port` and TLS-ALPN-01 on
    /// `relay_ip:tls_port`; with `eab`, accounts need External Account Binding with that key;
    /// `validity` (seconds) shortens the certificates' lifetime.
    async fn start(
        tag: &str,
        relay_ip: &str,
        http_port: u16,
        tls_port: u16,
        eab: bool,
        validity: Option<u64>,
    ) -> Pebble {
        let dir = temp_dir(tag);
        let (ca_pem, cert_pem, key_pem) = api_certificates();
        let api_ca = dir.path().join("api-ca.pem");
        std::fs::write(&api_ca, &ca_pem).unwrap();
        std::fs::write(dir.path().join("api-cert.pem"), &cert_pem).unwrap();
        std::fs::write(dir.path().join("api-key.pem"), &key_pem).unwrap();
        let (dns_port, dns_mgmt, api_port, mgmt_port) =
            (unused_port(), unused_port(), unused_port(), unused_port());
        let mut pebble = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{api_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.path().join("api-cert.pem"),
            "privateKey": dir.path().join("api-key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": eab,
        });
        if let Some(secs) = validity {
            pebble["certificateValidityPeriod"] = secs.into();
        }
        if eab {
            pebble["externalAccountMACKeys"] = serde_json::json!({ EAB_KID: EAB_KEY });
        }
        let config_file = dir.path().join("pebble.json");
        std::fs::write(&config_file, serde_json::json!({ "pebble": pebble }).to_string()).unwrap();
        let dns = spawn(
            Command::new("pebble-challtestsrv").args([
                "-defaultIPv4",
                relay_ip,
                "-defaultIPv6",
                "",
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-management",
                &format!("127.0.0.1:{dns_mgmt}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ]),
            "pebble-challtestsrv",
        );
        let pebble = spawn(
            Command::new("pebble")
                .args([
                    "-config",
                    config_file.to_str().unwrap(),
                    "-dnsserver",
                    &format!("127.0.0.1:{dns_port}"),
                ])
                .env("PEBBLE_VA_NOSLEEP", "1")
                // Really validate, and never reuse an authorization: each order proves its challenge.
                .env("PEBBLE_VA_ALWAYS_VALID", "0")
                .env("PEBBLE_AUTHZREUSE", "0")
                .env("PEBBLE_WFE_NONCEREJECT", "0"),
            "pebble",
        );
        for port in [api_port, mgmt_port] {
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let deadline = Instant::now() + WAIT;
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                assert!(Instant::now() < deadline, "pebble did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Pebble { dir, api_port, mgmt_port, api_ca, _dns: dns, _pebble: pebble }
    }

    fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.api_port)
    }

    /// The relay's flags for this CA: directory, API trust, a fresh cert dir and key file.
    fn relay_args(&self, relay_ip: &str, tag: &str) -> Vec<String> {
        [
            "-a",
            &format!("{relay_ip}:443"),
            "-acme-directory-url",
            &self.directory(),
            "-acme-ca-file",
            self.api_ca.to_str().unwrap(),
            "-certdir",
            self.dir.path().join(format!("certs-{tag}")).to_str().unwrap(),
            "-c",
            self.dir.path().join(format!("derper-{tag}.key")).to_str().unwrap(),
            "-stun=false",
            "-metrics-addr=",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Pebble's root (the issuing chain's trust anchor), from its management endpoint.
    async fn root(&self) -> CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = std::fs::read(&self.api_ca).unwrap();
        roots.add_parsable_certificates(rustls_pemfile::certs(&mut &ca[..]).map(Result::unwrap));
        let config = trusting_client(roots);
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.mgmt_port)).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"GET /roots/0 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut raw = Vec::new();
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "pebble /roots/0: {text}");
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let root = rustls_pemfile::certs(&mut body.as_bytes()).next().expect("a PEM root").unwrap();
        root
    }
}

fn start_relay(args: &[String]) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let p = Proc::start(&args);
    p.wait_for_line("derpfleet-relay running");
    p
}

/// Waits for the relay's log to show an issued certificate; returns that line.
async fn wait_issued(p: &Proc) -> String {
    let deadline = Instant::now() + ISSUE_WAIT;
    loop {
        if let Some(line) = p.log().lines().find(|l| l.contains("ACME: new certificate for")) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "no certificate; relay log:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Connects to `addr` as `name` (SNI for a DNS name, none for an IP), verifying the chain
/// against `root` (webpki, with the name check), and completes a DERP handshake. Returns the
/// served chain.
async fn verified_derp_handshake(
    addr: SocketAddr,
    name: &str,
    root: CertificateDer<'static>,
) -> Vec<CertificateDer<'static>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).unwrap();
    let config = trusting_client(roots);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(name.to_owned()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS to {addr} as {name} verified against pebble's root: {e}"));
    let chain = tls.get_ref().1.peer_certificates().unwrap().to_vec();
    tls.write_all(
        format!("GET /derp HTTP/1.1\r\nHost: {name}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(read_head(&mut tls).await.status, 101);
    TestClient::over(tls, NodePrivate::generate()).await.unwrap();
    chain
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

fn assert_chain(chain: &[CertificateDer<'static>], san: &str) {
    let (_, _, sans) = names(&chain[0]);
    assert!(sans.iter().any(|s| s.contains(san)), "leaf SANs {sans:?}, want {san}");
    assert_from_pebble_with_meta(chain);
}

fn assert_from_pebble_with_meta(chain: &[CertificateDer<'static>]) {
    let (_, issuer, _) = names(&chain[0]);
    assert!(issuer.to_ascii_lowercase().contains("pebble"), "issued by {issuer:?}");
    assert!(chain.iter().any(|c| names(c).0.starts_with("derpkey")), "meta-certificate appended");
}

/// TLS-ALPN-01 on the main port (pebble cannot reach any HTTP port; -http-port is off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letsencrypt_mode_gets_a_certificate_with_tls_alpn_01() {
    const IP: &str = "127.0.0.44";
    let pebble = Pebble::start("ops-acme-alpn", IP, unused_port(), 443, false, None).await;
    let mut args = pebble.relay_args(IP, "alpn");
    args.extend(["-hostname", NAME, "-certmode", "letsencrypt", "-http-port", "-1"].map(String::from));
    let p = start_relay(&args);
    let line = wait_issued(&p).await;
    assert!(line.contains("validated with tls-alpn-01"), "{line}");
    let chain =
        verified_derp_handshake(format!("{IP}:443").parse().unwrap(), NAME, pebble.root().await).await;
    assert_chain(&chain, NAME);
    // Cached in derper's (autocert's) layout: key and chain in <certdir>/<hostname>.
    let cached = std::fs::read_to_string(pebble.dir.path().join("certs-alpn").join(NAME)).unwrap();
    assert!(cached.contains("PRIVATE KEY") && cached.contains("BEGIN CERTIFICATE"), "{cached}");
    assert!(!p.log().contains("panicked"), "{}", p.log());
    // A restart serves the cached certificate without a new order.
    drop(p);
    let p = start_relay(&args);
    p.wait_for_line("ACME: using the cached certificate for derp.acme.test");
    let again =
        verified_derp_handshake(format!("{IP}:443").parse().unwrap(), NAME, pebble.root().await).await;
    assert_eq!(again[0], chain[0], "the cached leaf is served");
    assert!(!p.log().contains("ACME: new certificate"), "{}", p.log());
}

/// HTTP-01 on -http-port: pebble's TLS-ALPN-01 port is closed, so TLS-ALPN-01 fails and the
/// relay orders again with HTTP-01 (autocert's fallback); only HTTP-01 can have validated it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn letsencrypt_mode_falls_back_to_http_01_on_the_http_port() {
    const IP: &str = "127.0.0.45";
    let closed_port = unused_port();
    let pebble = Pebble::start("ops-acme-http01", IP, 80, closed_port, false, None).await;
    let mut args = pebble.relay_args(IP, "http01");
    args.extend(["-hostname", NAME, "-http-port", "80"].map(String::from));
    let p = start_relay(&args);
    let line = wait_issued(&p).await;
    assert!(line.contains("validated with http-01"), "{line}\n{}", p.log());
    assert!(p.log().contains("tls-alpn-01 validation failed"), "{}", p.log());
    let chain =
        verified_derp_handshake(format!("{IP}:443").parse().unwrap(), NAME, pebble.root().await).await;
    assert_chain(&chain, NAME);
    // Outside an open challenge, the path is a plain 404 and the rest of port 80 is unchanged.
    let port80: SocketAddr = format!("{IP}:80").parse().unwrap();
    assert_eq!(get(port80, "/.well-known/acme-challenge/nope").await.0, 404);
    assert_eq!(get(port80, "/").await.0, 302);
}

/// An EAB-required CA: without EAB the account cannot be created (a clear log line), with
/// `-acme-eab-kid`/`-acme-eab-key` it can; `-certmode gcp` pointed at it works the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eab_required_ca_needs_the_eab_flags_and_gcp_mode_uses_them() {
    const IP: &str = "127.0.0.46";
    let pebble = Pebble::start("ops-acme-eab", IP, 80, 443, true, None).await;
    let root = pebble.root().await;
    let addr: SocketAddr = format!("{IP}:443").parse().unwrap();

    let mut args = pebble.relay_args(IP, "no-eab");
    args.extend(["-hostname", NAME, "-http-port", "80"].map(String::from));
    let p = start_relay(&args);
    let deadline = Instant::now() + ISSUE_WAIT;
    while !p.log().contains("the CA requires External Account Binding; set -acme-eab-kid and -acme-eab-key") {
        assert!(Instant::now() < deadline, "no EAB error; relay log:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!p.log().contains("ACME: new certificate"), "{}", p.log());
    drop(p);

    let mut args = pebble.relay_args(IP, "eab");
    args.extend(
        ["-hostname", NAME, "-http-port", "80", "-acme-eab-kid", EAB_KID, "-acme-eab-key", EAB_KEY]
            .map(String::from),
    );
    let p = start_relay(&args);
    wait_issued(&p).await;
    assert_chain(&verified_derp_handshake(addr, NAME, root.clone()).await, NAME);
    drop(p);

    let mut args = pebble.relay_args(IP, "gcp");
    args.extend(
        [
            "-hostname",
            NAME,
            "-http-port",
            "80",
            "-certmode",
            "gcp",
            "-acme-email",
            "ops@acme.test",
            "-acme-eab-kid",
            EAB_KID,
            "-acme-eab-key",
            EAB_KEY,
        ]
        .map(String::from),
    );
    let p = start_relay(&args);
    p.wait_for_line(&format!("from {}", pebble.directory()));
    wait_issued(&p).await;
    assert_chain(&verified_derp_handshake(addr, NAME, root).await, NAME);
}

/// `-acme-ip-certs` with an IP `-hostname`: an IP-identifier certificate (SAN IP) validated with
/// HTTP-01 on -http-port, served to a client that connects by IP (no SNI).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_ip_certs_gets_an_ip_certificate_via_http_01() {
    const IP: &str = "127.0.0.47";
    // Short-lived, like Let's Encrypt's IP certificates: 12 s, so renewal (at two thirds) is seen.
    let pebble = Pebble::start("ops-acme-ip", IP, 80, unused_port(), false, Some(12)).await;
    let mut args = pebble.relay_args(IP, "ip");
    args.extend(["-hostname", IP, "-acme-ip-certs", "-http-port", "80"].map(String::from));
    let p = start_relay(&args);
    let line = wait_issued(&p).await;
    assert!(line.contains(&format!("new certificate for {IP} (validated with http-01")), "{line}");
    // pebble 2.4 advertises no profiles: the order goes without "shortlived", and says so.
    assert!(p.log().contains("advertises no \"shortlived\" profile"), "{}", p.log());
    let chain = verified_derp_handshake(format!("{IP}:443").parse().unwrap(), IP, pebble.root().await).await;
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let ip: IpAddr = IP.parse().unwrap();
    let IpAddr::V4(v4) = ip else { unreachable!() };
    let san = cert.subject_alternative_name().unwrap().expect("a SAN extension");
    let has_ip_san = san
        .value
        .general_names
        .iter()
        .any(|g| matches!(g, x509_parser::extensions::GeneralName::IPAddress(b) if *b == v4.octets()));
    assert!(has_ip_san, "no IP SAN {IP} in {:?}", names(&chain[0]).2);
    assert_from_pebble_with_meta(&chain);
    // Cached as derper's ipCertManager does: <certdir>/<ip>.crt and .key.
    assert!(pebble.dir.path().join("certs-ip").join(format!("{IP}.crt")).exists());
    assert!(pebble.dir.path().join("certs-ip").join(format!("{IP}.key")).exists());
    // Renewed in the background at two thirds of the lifetime; new handshakes get the new one.
    let deadline = Instant::now() + ISSUE_WAIT;
    while p.log().matches("ACME: new certificate for").count() < 2 {
        assert!(Instant::now() < deadline, "no renewal; relay log:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed =
        verified_derp_handshake(format!("{IP}:443").parse().unwrap(), IP, pebble.root().await).await;
    assert_ne!(renewed[0], chain[0], "the renewed leaf is served");
}

/// `-acme-ip-certs` next to a DNS `-hostname` (derper's usual setup): SNI = hostname gets the DNS
/// certificate; a client connecting by IP (no SNI) makes the relay order one for the
/// connection's local address: that first handshake fails, later ones get the IP certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acme_ip_certs_orders_on_demand_for_the_local_address_next_to_the_hostname() {
    const IP: &str = "127.0.0.48";
    let pebble = Pebble::start("ops-acme-ip-dns", IP, 80, 443, false, None).await;
    let root = pebble.root().await;
    let addr: SocketAddr = format!("{IP}:443").parse().unwrap();
    let mut args = pebble.relay_args(IP, "ip-dns");
    args.extend(["-hostname", NAME, "-acme-ip-certs", "-http-port", "80"].map(String::from));
    let p = start_relay(&args);
    let line = wait_issued(&p).await;
    assert!(line.contains(&format!("new certificate for {NAME}")), "{line}");
    assert_chain(&verified_derp_handshake(addr, NAME, root.clone()).await, NAME);

    // By IP: no certificate yet, so this handshake is refused and the order starts.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let config = trusting_client(roots);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let first = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(IP).unwrap(), tcp)
        .await;
    assert!(first.is_err(), "no IP certificate can exist before the first IP connection");
    let deadline = Instant::now() + ISSUE_WAIT;
    while !p.log().contains(&format!("ACME: new certificate for {IP} (validated with http-01")) {
        assert!(Instant::now() < deadline, "no IP certificate; relay log:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let chain = verified_derp_handshake(addr, IP, root).await;
    assert_from_pebble_with_meta(&chain);
}
