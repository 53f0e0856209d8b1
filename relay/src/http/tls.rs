//! TLS for the main port (spec §2.4): manual certificates, a generated self-signed certificate
//! for IP-literal hostnames, and the `derpkey` meta-certificate.
//!
//! The meta-certificate is appended after the real chain so TLS 1.3 clients learn the server's
//! DERP key during the handshake and can use fast start (one round trip less). ALPN offers only
//! `http/1.1`: HTTP/2 must never be negotiated with DERP clients.
//!
//! Generated self-signed certificates are written to the cert directory (like derper), so the
//! `sha256-raw:` pin stays valid across restarts. If the directory is not writable the
//! certificate is still served, from memory, and a warning is logged.
//!
//! Certificate files are reloaded without a restart ([`CertReloader`], polled by the server):
//! when the `.crt` or `.key` file changes (mtime or size), the pair is loaded and checked again
//! and swapped into the resolver; new handshakes get it, established connections keep theirs.
//! A bad pair (e.g. caught half-written) is logged and the old certificate stays.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};

use derpfleet_proto::consts::{META_CERT_CN_PREFIX, PROTOCOL_VERSION};
use derpfleet_proto::NodePublic;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use time::{Duration as TimeDuration, OffsetDateTime};

/// Why TLS could not be set up.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no PEM private key found")]
    NoKey { path: PathBuf },
    #[error("{path}: bad PEM: {source}")]
    Pem { path: PathBuf, source: std::io::Error },
    #[error("certificate {path} is not valid for hostname {hostname:?}: {reason}")]
    HostnameMismatch { path: PathBuf, hostname: String, reason: String },
    #[error("private key {path} is unusable: {source}")]
    Key { path: PathBuf, source: rustls::Error },
    #[error(
        "certificate files {crt} / {key} not found (certmode manual needs them unless -hostname is an IP)"
    )]
    Missing { crt: PathBuf, key: PathBuf },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A ready TLS configuration plus what the operator needs to know about it.
pub struct TlsSetup {
    /// The rustls server configuration for the main port.
    pub config: Arc<rustls::ServerConfig>,
    /// `sha256-raw:<hex>` of the leaf when the hostname is an IP literal and the chain is a single
    /// certificate (the DERP map's `CertName` that pins it).
    pub cert_name: Option<String>,
    /// The certificate was generated at this start.
    pub generated: bool,
    /// The certificate file served.
    pub cert_path: PathBuf,
    /// Reloads the certificate files when they change (None when served from memory).
    pub reloader: Option<Arc<CertReloader>>,
}

impl fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSetup")
            .field("cert_name", &self.cert_name)
            .field("generated", &self.generated)
            .field("cert_path", &self.cert_path)
            .finish()
    }
}

/// The ring provider, always explicit (never the process default; see the working agreement).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// derper's file-name rule: the hostname with every character outside `[A-Za-z0-9.-]` removed.
pub fn cert_file_stem(hostname: &str) -> String {
    hostname.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect()
}

/// `-certmode manual`: loads `<certdir>/<hostname>.crt` and `.key`, or, for an IP-literal hostname
/// without them, generates a self-signed certificate (written to `certdir`).
pub fn manual(certdir: &Path, hostname: &str, server_public: &NodePublic) -> Result<TlsSetup, TlsError> {
    let stem = cert_file_stem(hostname);
    let crt_path = certdir.join(format!("{stem}.crt"));
    let key_path = certdir.join(format!("{stem}.key"));
    let ip: Option<IpAddr> = hostname.parse().ok();
    let mut generated = false;
    if !crt_path.exists() || !key_path.exists() {
        let Some(ip) = ip else {
            return Err(TlsError::Missing { crt: crt_path, key: key_path });
        };
        let (crt_pem, key_pem) = self_signed_ip_cert(ip)?;
        let saved = match write_cert_files(certdir, &crt_path, &crt_pem, &key_path, &key_pem) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    "cannot save the generated certificate in {}: {e}; serving it from memory",
                    certdir.display()
                );
                false
            }
        };
        generated = true;
        let chain = parse_certs(&crt_path, crt_pem.as_bytes())?;
        let key = parse_key(&key_path, key_pem.as_bytes())?;
        let mut setup = build(chain, key, Some(ip), hostname, server_public, crt_path, &key_path, generated)?;
        if !saved {
            setup.reloader = None;
        }
        return Ok(setup);
    }
    let crt_pem = fs::read(&crt_path).map_err(|source| TlsError::Read { path: crt_path.clone(), source })?;
    let key_pem = fs::read(&key_path).map_err(|source| TlsError::Read { path: key_path.clone(), source })?;
    let chain = parse_certs(&crt_path, &crt_pem)?;
    let key = parse_key(&key_path, &key_pem)?;
    check_hostname(&crt_path, &chain[0], hostname)?;
    build(chain, key, ip, hostname, server_public, crt_path, &key_path, generated)
}

#[allow(clippy::too_many_arguments)]
fn build(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ip: Option<IpAddr>,
    hostname: &str,
    server_public: &NodePublic,
    cert_path: PathBuf,
    key_path: &Path,
    generated: bool,
) -> Result<TlsSetup, TlsError> {
    let cert_name = (ip.is_some() && chain.len() == 1).then(|| sha256_raw_name(&chain[0]));
    let required_sni = if ip.is_some() { None } else { Some(hostname.trim_end_matches('.').to_owned()) };
    let meta = meta_cert(server_public)?;
    let certified = certified_key(chain, key, key_path, &meta)?;
    let slot = Arc::new(RwLock::new(certified));
    let resolver = Arc::new(HostnameResolver { required_sni, certified: slot.clone() });
    let config = server_config(resolver)?;
    let reloader = Arc::new(CertReloader {
        crt_path: cert_path.clone(),
        key_path: key_path.to_owned(),
        hostname: hostname.to_owned(),
        check_name: ip.is_none(),
        meta,
        slot,
        stamp: Mutex::new(file_stamp(&cert_path, key_path)),
    });
    Ok(TlsSetup { config, cert_name, generated, cert_path, reloader: Some(reloader) })
}

/// The served chain (the real one plus the meta-certificate) with its signing key.
fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    key_path: &Path,
    meta: &CertificateDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|source| TlsError::Key { path: key_path.to_owned(), source })?;
    let mut served = chain;
    served.push(meta.clone());
    let certified = CertifiedKey::new(served, signing_key);
    // A key that does not belong to the certificate would fail every handshake: refuse it here.
    if let Err(source @ rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) =
        certified.keys_match()
    {
        return Err(TlsError::Key { path: key_path.to_owned(), source });
    }
    Ok(Arc::new(certified))
}

/// (mtime, size, inode) of both files (a rename over the file changes the inode even when the
/// mtime resolution is coarse); None when either cannot be read.
type FileStamp = Option<[(SystemTime, u64, u64); 2]>;

fn file_stamp(crt: &Path, key: &Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let one = |p: &Path| fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())));
    Some([one(crt)?, one(key)?])
}

/// Reloads a manual certificate pair when its files change.
pub struct CertReloader {
    crt_path: PathBuf,
    key_path: PathBuf,
    hostname: String,
    check_name: bool,
    meta: CertificateDer<'static>,
    slot: Arc<RwLock<Arc<CertifiedKey>>>,
    stamp: Mutex<FileStamp>,
}

impl fmt::Debug for CertReloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertReloader").field("crt_path", &self.crt_path).finish_non_exhaustive()
    }
}

impl CertReloader {
    /// Reloads the pair if either file changed since the last look. `Ok(true)`: a new
    /// certificate is now served; `Ok(false)`: nothing changed; `Err`: the files changed but are
    /// unusable (the old certificate stays; the same files are not retried until they change).
    pub fn check(&self) -> Result<bool, TlsError> {
        let now = file_stamp(&self.crt_path, &self.key_path);
        {
            let mut stamp = self.stamp.lock();
            if now.is_none() || *stamp == now {
                return Ok(false);
            }
            *stamp = now;
        }
        self.load().map(|()| true)
    }

    fn load(&self) -> Result<(), TlsError> {
        let read = |p: &Path| fs::read(p).map_err(|source| TlsError::Read { path: p.to_owned(), source });
        let chain = parse_certs(&self.crt_path, &read(&self.crt_path)?)?;
        let key = parse_key(&self.key_path, &read(&self.key_path)?)?;
        if self.check_name {
            check_hostname(&self.crt_path, &chain[0], &self.hostname)?;
        }
        let certified = certified_key(chain, key, &self.key_path, &self.meta)?;
        *self.slot.write() = certified;
        Ok(())
    }

    /// The leaf certificate currently served.
    pub fn current_leaf(&self) -> CertificateDer<'static> {
        self.slot.read().cert[0].clone()
    }
}

/// A server config with safe versions (TLS 1.2 and 1.3), no client auth, ALPN `http/1.1` and no
/// TLS 1.3 session tickets.
pub fn server_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // No TLS 1.3 session tickets: Tailscale's client (`tlsdial.Config`, as derphttp uses it) sets no
    // client session cache, so it never resumes; each ticket would only cost a sealing, a record
    // written after the handshake, and an entry in the session cache.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Serves one certificate, but only to clients whose SNI is the hostname (when one is required).
#[derive(Debug)]
struct HostnameResolver {
    required_sni: Option<String>,
    certified: Arc<RwLock<Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for HostnameResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = || self.certified.read().clone();
        match &self.required_sni {
            None => Some(current()),
            Some(want) => {
                let sni = hello.server_name()?;
                sni.trim_end_matches('.').eq_ignore_ascii_case(want).then(current)
            }
        }
    }
}

/// `sha256-raw:<hex of SHA-256 over the DER>`, the DERP map `CertName` pinning this certificate.
pub fn sha256_raw_name(cert: &CertificateDer<'_>) -> String {
    format!("sha256-raw:{}", hex::encode(Sha256::digest(cert.as_ref())))
}

/// The meta-certificate: self-signed Ed25519, CN `derpkey<hex>`, serial 2, valid now ± 30 days.
pub fn meta_cert(server_public: &NodePublic) -> Result<CertificateDer<'static>, TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{META_CERT_CN_PREFIX}{}", server_public.to_hex()));
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from(vec![PROTOCOL_VERSION as u8]));
    let now = OffsetDateTime::now_utc();
    params.not_before = now - TimeDuration::days(30);
    params.not_after = now + TimeDuration::days(30);
    params.is_ca = IsCa::ExplicitNoCa;
    Ok(params.self_signed(&key)?.der().clone())
}

/// A self-signed P-256 certificate for an IP address (IP SAN, CN = the IP, one year), as PEM.
pub fn self_signed_ip_cert(ip: IpAddr) -> Result<(String, String), TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ip.to_string());
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::IpAddress(ip)];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - TimeDuration::minutes(5);
    params.not_after = now + TimeDuration::days(365);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_cert_files(dir: &Path, crt: &Path, crt_pem: &str, key: &Path, key_pem: &str) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let write = |path: &Path, body: &str, mode: u32| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()
    };
    write(key, key_pem, 0o600)?;
    write(crt, crt_pem, 0o644)
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

fn parse_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?
        .ok_or_else(|| TlsError::NoKey { path: path.to_owned() })
}

/// derper refuses a manual certificate that is not valid for `-hostname`.
fn check_hostname(path: &Path, leaf: &CertificateDer<'_>, hostname: &str) -> Result<(), TlsError> {
    let err = |reason: String| TlsError::HostnameMismatch {
        path: path.to_owned(),
        hostname: hostname.to_owned(),
        reason,
    };
    let name = ServerName::try_from(hostname.trim_end_matches('.')).map_err(|e| err(e.to_string()))?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| err(e.to_string()))?;
    cert.verify_is_valid_for_subject_name(&name).map_err(|e| err(e.to_string()))
}

/// The DERP node JSON an operator pastes into a DERP map to use this server (logged at start when
/// the certificate is pinned by `sha256-raw`).
pub fn derp_node_json(hostname: &str, port: u16, cert_name: &str) -> String {
    let mut node = serde_json::json!({
        "Name": "custom",
        "RegionID": 900,
        "HostName": hostname,
        "CertName": cert_name,
    });
    match hostname.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => node["IPv4"] = v4.to_string().into(),
        Ok(IpAddr::V6(v6)) => node["IPv6"] = v6.to_string().into(),
        Err(_) => {}
    }
    if port != 443 {
        node["DERPPort"] = port.into();
    }
    node.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_stem_drops_unsafe_chars() {
        assert_eq!(cert_file_stem("derp.example.com"), "derp.example.com");
        assert_eq!(cert_file_stem("../x/y"), "..xy");
        assert_eq!(cert_file_stem("::1"), "1");
    }

    #[test]
    fn node_json_has_pin_and_address() {
        let j: serde_json::Value =
            serde_json::from_str(&derp_node_json("127.0.0.1", 3443, "sha256-raw:ab")).unwrap();
        assert_eq!(j["CertName"], "sha256-raw:ab");
        assert_eq!(j["IPv4"], "127.0.0.1");
        assert_eq!(j["DERPPort"], 3443);
    }
}
