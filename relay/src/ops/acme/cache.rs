//! `-certdir`: the ACME account and the issued certificates, in derper's file layout so a
//! certificate directory of Go derper keeps working (and ours works for derper):
//! - a DNS name's certificate is autocert's file `<certdir>/<hostname>`: the PEM private key
//!   followed by the PEM chain;
//! - an IP address's certificate is derper's `<certdir>/<ip>.crt` + `<ip>.key` (`:` → `.`);
//! - the account is `acme-account-<hash of the directory URL>.json` (instant-acme's credentials;
//!   one per CA, so switching `-certmode` or `-acme-directory-url` never reuses a foreign account).
//!
//! Files are written to a temporary name and renamed; keys and the account are mode 0600.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

use super::Identity;

/// A certificate chain with its key, and what the leaf says about itself.
pub(super) struct CertBundle {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CertBundle {
    /// Parses a PEM key and a PEM chain and checks that the leaf covers `identity`.
    pub(super) fn from_pem(identity: &Identity, key_pem: &[u8], chain_pem: &[u8]) -> Result<Self, String> {
        let key = rustls_pemfile::private_key(&mut &key_pem[..])
            .map_err(|e| format!("reading the key: {e}"))?
            .ok_or("no private key")?;
        let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &chain_pem[..])
            .collect::<Result<_, _>>()
            .map_err(|e| format!("reading the chain: {e}"))?;
        let leaf = chain.first().ok_or("no certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
            .map_err(|e| format!("parsing the leaf: {e}"))?;
        if !covers(&cert, identity) {
            return Err(format!("the certificate does not name {identity}"));
        }
        let time = |t: x509_parser::time::ASN1Time| {
            UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        let (not_before, not_after) = (time(cert.validity().not_before), time(cert.validity().not_after));
        Ok(Self { chain, key, not_before, not_after })
    }

    /// When to order the next one: two thirds into the lifetime (Let's Encrypt's advice,
    /// derper's rule for IP certificates).
    pub(super) fn renew_at(&self) -> SystemTime {
        let life = self.not_after.duration_since(self.not_before).unwrap_or_default();
        self.not_before + life * 2 / 3
    }

    pub(super) fn is_current(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

fn covers(cert: &x509_parser::certificate::X509Certificate<'_>, identity: &Identity) -> bool {
    use x509_parser::extensions::GeneralName;
    let Ok(Some(san)) = cert.subject_alternative_name() else { return false };
    san.value.general_names.iter().any(|name| match (name, identity) {
        (GeneralName::DNSName(n), Identity::Dns(want)) => n.eq_ignore_ascii_case(want),
        (GeneralName::IPAddress(bytes), Identity::Ip(want)) => match want {
            IpAddr::V4(v4) => *bytes == v4.octets(),
            IpAddr::V6(v6) => *bytes == v6.octets(),
        },
        _ => false,
    })
}

/// Reads the cached certificate for `identity`; `None` if there is none or it is unusable (the
/// reason is logged).
pub(super) fn load(certdir: &Path, identity: &Identity) -> Option<CertBundle> {
    let read = |p: &Path| std::fs::read(p).ok();
    let (key_pem, chain_pem) = match identity {
        Identity::Dns(name) => {
            let both = read(&certdir.join(name))?;
            (both.clone(), both)
        }
        Identity::Ip(ip) => {
            let (crt, key) = ip_paths(certdir, *ip);
            (read(&key)?, read(&crt)?)
        }
    };
    match CertBundle::from_pem(identity, &key_pem, &chain_pem) {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::warn!(
                "ACME: ignoring the cached certificate for {identity} in {}: {e}",
                certdir.display()
            );
            None
        }
    }
}

/// Writes a newly issued certificate (key PEM and chain PEM).
pub(super) fn store(
    certdir: &Path,
    identity: &Identity,
    key_pem: &str,
    chain_pem: &str,
) -> std::io::Result<()> {
    std::fs::create_dir_all(certdir)?;
    match identity {
        Identity::Dns(name) => {
            write_atomic(&certdir.join(name), format!("{key_pem}{chain_pem}").as_bytes(), 0o600)
        }
        Identity::Ip(ip) => {
            let (crt, key) = ip_paths(certdir, *ip);
            write_atomic(&key, key_pem.as_bytes(), 0o600)?;
            write_atomic(&crt, chain_pem.as_bytes(), 0o644)
        }
    }
}

fn ip_paths(certdir: &Path, ip: IpAddr) -> (PathBuf, PathBuf) {
    let base = ip.to_string().replace(':', ".");
    (certdir.join(format!("{base}.crt")), certdir.join(format!("{base}.key")))
}

/// The account credentials file for this CA.
pub(super) fn account_path(certdir: &Path, directory_url: &str) -> PathBuf {
    let hash = hex::encode(&Sha256::digest(directory_url.as_bytes())[..8]);
    certdir.join(format!("acme-account-{hash}.json"))
}

/// Writes `bytes` to `path` through a temporary file in the same directory.
pub(super) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
