//! TLS for dialing DERP nodes (spec §2.6): the four verification modes and the meta-certificate.
//!
//! - [`CertCheck::HostName`] / [`CertCheck::Name`]: Web PKI against the system trust store (so a
//!   private CA installed on the host works, as with the Go client), plus any extra roots the
//!   caller trusts, plus the Mozilla roots bundled by `webpki-roots` (they include ISRG Root X1,
//!   which the Go client bakes in). `Name(X)` verifies for X while the SNI stays `HostName`.
//! - [`CertCheck::Sha256Raw`]: an IP-only server's self-signed leaf, pinned by the SHA-256 of its
//!   DER. `derpkey…` meta-certificates are ignored; exactly one other certificate is allowed.
//! - [`CertCheck::Insecure`]: no verification (tests only).
//!
//! Configs are always built on the `ring` provider (never the process default) and offer no ALPN,
//! as tailscaled does, so no server negotiates HTTP/2.

use std::sync::{Arc, OnceLock};

use derpfleet_proto::consts::META_CERT_CN_PREFIX;
use derpfleet_proto::derpmap::CertCheck;
use derpfleet_proto::NodePublic;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, Error as TlsError, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// The operating system's trust store (read once; honours `SSL_CERT_FILE` / `SSL_CERT_DIR`).
fn system_roots() -> &'static [CertificateDer<'static>] {
    static R: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    R.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!("system trust store: {e}");
        }
        found.certs
    })
}

/// System roots first, then the caller's extra roots, then the bundled Mozilla set (which holds
/// ISRG Root X1, the root the Go client bakes in for hosts with a broken trust store).
fn roots(extra: &[CertificateDer<'static>]) -> Arc<RootCertStore> {
    let mut r = RootCertStore::empty();
    // Unparsable certificates in a trust store are skipped, as Go does.
    let _ = r.add_parsable_certificates(system_roots().iter().cloned());
    let _ = r.add_parsable_certificates(extra.iter().cloned());
    r.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Arc::new(r)
}

/// Builds the client config for one verification mode.
pub fn client_config(check: &CertCheck, extra_roots: &[CertificateDer<'static>]) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let verifier: Arc<dyn ServerCertVerifier> = match check {
        CertCheck::HostName => webpki(extra_roots),
        CertCheck::Name(name) => Arc::new(CustomCheck::OtherName {
            inner: webpki(extra_roots),
            name: ServerName::try_from(name.clone()).ok(),
        }),
        CertCheck::Sha256Raw(hash) => Arc::new(CustomCheck::Pinned(*hash)),
        CertCheck::Insecure => Arc::new(CustomCheck::Insecure),
    };
    let cfg = builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
    Arc::new(cfg)
}

fn webpki(extra_roots: &[CertificateDer<'static>]) -> Arc<WebPkiServerVerifier> {
    WebPkiServerVerifier::builder_with_provider(roots(extra_roots), provider())
        .build()
        .expect("the bundled root store is not empty")
}

/// The certificate's subject CN, if it parses.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

fn is_meta_cert(der: &[u8]) -> bool {
    common_name(der).is_some_and(|cn| cn.starts_with(META_CERT_CN_PREFIX))
}

/// Checks the pinned leaf: hash, dates and (when an SNI name is dialed) the name.
pub(crate) fn check_pinned(
    hash: &[u8; 32],
    chain: &[&[u8]],
    server_name: &ServerName<'_>,
    now: UnixTime,
) -> Result<(), String> {
    let others: Vec<&[u8]> = chain.iter().copied().filter(|c| !is_meta_cert(c)).collect();
    let [leaf] = others.as_slice() else {
        return Err(format!("sha256-raw: expected exactly one certificate, got {}", others.len()));
    };
    let got: [u8; 32] = Sha256::digest(leaf).into();
    if &got != hash {
        return Err(format!("sha256-raw: certificate hash {} does not match the pin", hex::encode(got)));
    }
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("sha256-raw: {e}"))?;
    let t = x509_parser::time::ASN1Time::from_timestamp(now.as_secs() as i64).map_err(|e| e.to_string())?;
    if !cert.validity().is_valid_at(t) {
        return Err("sha256-raw: certificate is outside its validity dates".into());
    }
    if let ServerName::DnsName(_) = server_name {
        let der = CertificateDer::from(leaf.to_vec());
        let ee = webpki::EndEntityCert::try_from(&der).map_err(|e| format!("sha256-raw: {e}"))?;
        ee.verify_is_valid_for_subject_name(server_name)
            .map_err(|e| format!("sha256-raw: certificate not valid for {server_name:?}: {e}"))?;
    }
    Ok(())
}

/// The verifications rustls's Web PKI verifier does not cover by itself (spec §2.6). They differ
/// only in how the certificate is judged; the handshake signatures are checked the same way.
#[derive(Debug)]
enum CustomCheck {
    /// `CertName` = DNS name: Web PKI verification for that name while the SNI stays HostName.
    OtherName { inner: Arc<WebPkiServerVerifier>, name: Option<ServerName<'static>> },
    /// `CertName = "sha256-raw:<hex>"`: one self-signed leaf, pinned by hash, within its dates.
    Pinned([u8; 32]),
    /// `InsecureForTests`: any certificate (signatures are still checked for consistency).
    Insecure,
}

impl ServerCertVerifier for CustomCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self {
            Self::OtherName { inner, name } => {
                let name =
                    name.as_ref().ok_or_else(|| TlsError::General("CertName is not a valid name".into()))?;
                inner.verify_server_cert(end_entity, intermediates, name, ocsp, now)
            }
            Self::Pinned(hash) => {
                let chain: Vec<&[u8]> = std::iter::once(end_entity.as_ref())
                    .chain(intermediates.iter().map(|c| c.as_ref()))
                    .collect();
                check_pinned(hash, &chain, server_name, now).map_err(TlsError::General)?;
                Ok(ServerCertVerified::assertion())
            }
            Self::Insecure => Ok(ServerCertVerified::assertion()),
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls12_signature(m, c, d, &provider().signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        verify_tls13_signature(m, c, d, &provider().signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// The server key from a `derpkey<hex>` meta-certificate in `chain` (spec §2.1): the first cert
/// whose CN starts with `derpkey`, whose serial fits in 8 bits and whose CN carries 64 hex chars.
pub fn meta_cert_key(chain: &[CertificateDer<'_>]) -> Option<NodePublic> {
    for der in chain {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else { continue };
        let Some(cn) = cert.subject().iter_common_name().next().and_then(|c| c.as_str().ok()) else {
            continue;
        };
        let Some(hex_key) = cn.strip_prefix(META_CERT_CN_PREFIX) else { continue };
        let serial = cert.raw_serial();
        let significant = serial.iter().skip_while(|b| **b == 0).count();
        if significant > 1 {
            return None;
        }
        return NodePublic::from_hex(hex_key).ok();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> rcgen::CertifiedKey<rcgen::KeyPair> {
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn meta(key: &NodePublic, serial: u64) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, format!("derpkey{}", key.to_hex()));
        p.serial_number = Some(rcgen::SerialNumber::from(serial));
        let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        p.self_signed(&k).unwrap().der().to_vec()
    }

    fn now() -> UnixTime {
        UnixTime::now()
    }

    #[test]
    fn pinned_accepts_exact_leaf_and_ignores_meta_cert() {
        let leaf = self_signed(&["10.1.2.3"]);
        let der = leaf.cert.der().to_vec();
        let hash: [u8; 32] = Sha256::digest(&der).into();
        let m = meta(&NodePublic([5; 32]), 2);
        let ip = ServerName::IpAddress("10.1.2.3".parse::<std::net::IpAddr>().unwrap().into());
        assert_eq!(check_pinned(&hash, &[&der, &m], &ip, now()), Ok(()));
        let other = self_signed(&["10.1.2.3"]).cert.der().to_vec();
        assert!(check_pinned(&hash, &[&other], &ip, now()).unwrap_err().contains("does not match"));
        assert!(check_pinned(&hash, &[&der, &other], &ip, now()).unwrap_err().contains("exactly one"));
    }

    #[test]
    fn pinned_checks_dns_name_and_dates() {
        let leaf = self_signed(&["derp.example"]);
        let der = leaf.cert.der().to_vec();
        let hash: [u8; 32] = Sha256::digest(&der).into();
        let good = ServerName::try_from("derp.example").unwrap();
        let bad = ServerName::try_from("other.example").unwrap();
        assert_eq!(check_pinned(&hash, &[&der], &good, now()), Ok(()));
        assert!(check_pinned(&hash, &[&der], &bad, now()).unwrap_err().contains("not valid for"));
        // rcgen's default validity ends in 4096; year ~4188 is outside the dates.
        let far = UnixTime::since_unix_epoch(std::time::Duration::from_secs(70_000_000_000));
        assert!(check_pinned(&hash, &[&der], &good, far).unwrap_err().contains("validity"));
    }

    #[test]
    fn meta_cert_key_found_only_with_small_serial() {
        let key = NodePublic([9; 32]);
        let leaf = self_signed(&["x.example"]).cert.der().clone();
        let good = CertificateDer::from(meta(&key, 2));
        assert_eq!(meta_cert_key(&[leaf.clone(), good]), Some(key));
        let big = CertificateDer::from(meta(&key, 300));
        assert_eq!(meta_cert_key(&[leaf.clone(), big]), None);
        assert_eq!(meta_cert_key(&[leaf]), None);
    }
}
