//! `-certmode letsencrypt` and `-certmode gcp`: certificates from an ACME CA, as derper v1.102.3
//! gets them (autocert for `-hostname`, its ipCertManager for `-acme-ip-certs`), with the
//! `instant-acme` client.
//!
//! - Validation: TLS-ALPN-01 on the main port and HTTP-01 on the `-http-port` listener (tried in
//!   that order, as autocert; see [`order`]). IP certificates: HTTP-01.
//! - CA: Let's Encrypt, or with `gcp` Google's public CA, which needs External Account Binding
//!   (`-acme-eab-kid` + `-acme-eab-key`) and `-acme-email`, as derper requires.
//!   `-acme-directory-url` (ours) overrides either, `-acme-ca-file` trusts a private CA's API.
//!   derper reads the EAB flags only for `gcp`; here they are also used with `letsencrypt` when
//!   given (a CA behind `-acme-directory-url` may require EAB), and setting only one is refused.
//! - `-acme-ip-certs`: certificates for the server's IP addresses (RFC 8738), with the
//!   "shortlived" profile when the CA offers it; `-hostname` may then be an IP address (an
//!   IP-only server). See [`resolver`] for which connection gets which certificate.
//! - Cache in `-certdir` in derper's layout ([`cache`]); renewal at two thirds of the lifetime,
//!   in the background; a failure is retried after 1 min, doubling up to 30 min (derper's backoff).
//! - Every served chain gets the `derpkey` meta-certificate appended, as in manual mode, so fast
//!   start keeps working; the SNI must be `-hostname` for the DNS certificate.

mod cache;
mod challenge;
mod client;
mod order;
mod resolver;

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use instant_acme::{Account, ChallengeType};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::http::tls::{meta_cert, server_config, TlsError};

pub use challenge::HTTP01_PREFIX;
pub use resolver::with_local_ip;
use resolver::{AcmeResolver, Store, ACME_TLS_ALPN};

/// Let's Encrypt's production directory (derper's default CA).
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Google Trust Services' public ACME directory (derper's `-certmode gcp`).
pub const GOOGLE_PUBLIC_CA_DIRECTORY: &str = "https://dv.acme-v02.api.pki.goog/directory";
/// The ACME profile derper orders IP certificates with (Let's Encrypt: about six days).
pub const SHORTLIVED_PROFILE: &str = "shortlived";

/// First retry delay after a failed issuance, and its cap (doubling in between), as derper.
const RETRY_FIRST: Duration = Duration::from_secs(60);
const RETRY_MAX: Duration = Duration::from_secs(30 * 60);
/// The RFC 8555 problem type for an account the CA does not know.
const ACCOUNT_DOES_NOT_EXIST: &str = "urn:ietf:params:acme:error:accountDoesNotExist";
/// Longest sleep between looks at the certificates.
const CHECK_EVERY: Duration = Duration::from_secs(60 * 60);

/// Why ACME could not be set up.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error(
        "-hostname {0:?} is an IP address: use -certmode manual for a self-signed certificate, or set \
         -acme-ip-certs to get ACME certificates for IP addresses"
    )]
    IpHostname(String),
    #[error("-certmode gcp requires -hostname to be a DNS name, not an IP address ({0:?})")]
    GcpIpHostname(String),
    #[error("-acme-ip-certs requires -certmode letsencrypt")]
    IpCertsNeedLetsEncrypt,
    #[error("-acme-ip-certs needs the -http-port listener (IP certificates are validated with HTTP-01)")]
    IpCertsNeedHttpPort,
    #[error("-certmode gcp requires -acme-eab-kid and -acme-eab-key")]
    GcpNeedsEab,
    #[error("-certmode gcp requires -acme-email")]
    GcpNeedsEmail,
    #[error("-acme-eab-kid and -acme-eab-key must be set together")]
    EabHalf,
    #[error(
        "-acme-eab-key: invalid base64 encoding for EAB key (base64url without padding, or standard base64)"
    )]
    EabKey,
    #[error("-acme-ca-file: {0}")]
    CaFile(crate::mesh::CaFileError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Which CA family `-certmode` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcmeMode {
    /// `letsencrypt`.
    LetsEncrypt,
    /// `gcp`: Google's public CA, with EAB.
    Gcp,
}

/// What to ask the CA for (the flags, unchecked; [`setup`] checks them as derper does).
#[derive(Clone, Debug)]
pub struct AcmeConfig {
    /// `-certmode`: which CA family.
    pub mode: AcmeMode,
    /// `-hostname`: a DNS name, or with `-acme-ip-certs` possibly an IP address.
    pub hostname: String,
    /// Cache of the account and the certificates (`-certdir`).
    pub certdir: PathBuf,
    /// `-acme-directory-url`; `None` = the mode's CA.
    pub directory_url: Option<String>,
    /// Contact e-mail (`-acme-email`), optional except for `gcp`.
    pub email: Option<String>,
    /// Extra PEM roots trusted for the CA's API, besides the web PKI roots (`-acme-ca-file`).
    pub extra_roots: Option<PathBuf>,
    /// `-acme-eab-kid` as typed (empty = unset).
    pub eab_kid: String,
    /// `-acme-eab-key` as typed (empty = unset).
    pub eab_key: String,
    /// `-acme-ip-certs`.
    pub ip_certs: bool,
    /// Whether the `-http-port` listener runs (HTTP-01 possible).
    pub http01: bool,
}

impl AcmeConfig {
    /// The directory URL used: `-acme-directory-url`, else the mode's CA.
    pub fn directory(&self) -> &str {
        match (&self.directory_url, self.mode) {
            (Some(url), _) => url,
            (None, AcmeMode::LetsEncrypt) => LETS_ENCRYPT_DIRECTORY,
            (None, AcmeMode::Gcp) => GOOGLE_PUBLIC_CA_DIRECTORY,
        }
    }
}

/// A decoded External Account Binding.
#[derive(Clone)]
pub struct Eab {
    /// The CA's key identifier.
    pub kid: String,
    /// The decoded HMAC key.
    pub key: Vec<u8>,
}

/// derper's decoding of `-acme-eab-key`: base64url without padding (the ACME form), else standard
/// base64 with padding (what `gcloud` prints).
pub fn decode_eab_key(s: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    URL_SAFE_NO_PAD.decode(s).or_else(|_| STANDARD.decode(s)).ok()
}

/// What a certificate is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A DNS name (`-hostname`).
    Dns(String),
    /// An IP address (`-acme-ip-certs`).
    Ip(IpAddr),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dns(n) => f.write_str(n),
            Self::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// The issuing side, run by the server's task ([`run`]); also answers HTTP-01 on `-http-port`.
pub struct AcmeTask {
    store: Arc<Store>,
    http: client::CaClient,
    directory_url: String,
    certdir: PathBuf,
    email: Option<String>,
    eab: Option<Eab>,
    http01: bool,
    /// Identities ordered from the start (the hostname, or the IP hostname).
    initial: Vec<Identity>,
    wanted: Mutex<Option<mpsc::Receiver<IpAddr>>>,
}

impl fmt::Debug for AcmeTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcmeTask")
            .field("directory_url", &self.directory_url)
            .field("initial", &self.initial)
            .finish()
    }
}

impl AcmeTask {
    /// The HTTP-01 body for a `/.well-known/acme-challenge/…` path, if that challenge is open.
    pub fn http01_response(&self, path: &str) -> Option<String> {
        self.store.challenges.http01_response(path)
    }

    /// The CA's directory URL in use.
    pub fn directory_url(&self) -> &str {
        &self.directory_url
    }
}

/// Checks the settings as derper does and returns the main port's TLS configuration and the
/// task that obtains and renews the certificates.
pub fn setup(
    settings: &AcmeConfig,
    server_public: &derpfleet_proto::NodePublic,
) -> Result<(Arc<rustls::ServerConfig>, Arc<AcmeTask>), AcmeError> {
    let hostname = settings.hostname.trim_end_matches('.');
    let hostname_ip = hostname.parse::<IpAddr>().ok();
    if settings.ip_certs && settings.mode != AcmeMode::LetsEncrypt {
        return Err(AcmeError::IpCertsNeedLetsEncrypt);
    }
    if hostname_ip.is_some() {
        match settings.mode {
            AcmeMode::Gcp => return Err(AcmeError::GcpIpHostname(settings.hostname.clone())),
            AcmeMode::LetsEncrypt if !settings.ip_certs => {
                return Err(AcmeError::IpHostname(settings.hostname.clone()))
            }
            AcmeMode::LetsEncrypt => {}
        }
    }
    if settings.ip_certs && !settings.http01 {
        return Err(AcmeError::IpCertsNeedHttpPort);
    }
    let eab = match (settings.eab_kid.is_empty(), settings.eab_key.is_empty()) {
        (true, true) if settings.mode == AcmeMode::Gcp => return Err(AcmeError::GcpNeedsEab),
        (true, true) => None,
        (false, false) => Some(Eab {
            kid: settings.eab_kid.clone(),
            key: decode_eab_key(&settings.eab_key).ok_or(AcmeError::EabKey)?,
        }),
        _ if settings.mode == AcmeMode::Gcp => return Err(AcmeError::GcpNeedsEab),
        _ => return Err(AcmeError::EabHalf),
    };
    if settings.mode == AcmeMode::Gcp && settings.email.is_none() {
        return Err(AcmeError::GcpNeedsEmail);
    }
    let http = client::CaClient::new(settings.extra_roots.as_deref())?;
    let (store, wanted) = Store::new(meta_cert(server_public)?);
    let store = Arc::new(store);
    let initial = vec![match hostname_ip {
        Some(ip) => Identity::Ip(ip.to_canonical()),
        None => Identity::Dns(hostname.to_ascii_lowercase()),
    }];
    let resolver = Arc::new(AcmeResolver {
        store: store.clone(),
        hostname: hostname_ip.is_none().then(|| hostname.to_ascii_lowercase()),
        ip_certs: settings.ip_certs,
    });
    let mut tls = Arc::unwrap_or_clone(server_config(resolver)?);
    tls.alpn_protocols = vec![b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    let task = AcmeTask {
        store,
        http,
        directory_url: settings.directory().to_owned(),
        certdir: settings.certdir.clone(),
        email: settings.email.clone(),
        eab,
        http01: settings.http01,
        initial,
        wanted: Mutex::new(Some(wanted)),
    };
    Ok((Arc::new(tls), Arc::new(task)))
}

/// When each identity is next looked at, and the backoff after failures.
struct Schedule {
    due: Instant,
    retry: Duration,
}

/// Obtains, caches and renews the certificates until `cancel`; logs every outcome.
pub async fn run(task: Arc<AcmeTask>, cancel: CancellationToken) {
    let Some(mut wanted) = task.wanted.lock().take() else { return };
    let now = Instant::now();
    let mut schedule: HashMap<Identity, Schedule> =
        task.initial.iter().map(|id| (id.clone(), Schedule { due: now, retry: RETRY_FIRST })).collect();
    let mut account: Option<Account> = None;
    let mut looked_at = std::collections::HashSet::new();
    loop {
        let now = Instant::now();
        let due = schedule.iter().find(|(_, s)| s.due <= now).map(|(id, _)| id.clone());
        if let Some(id) = due {
            let first = looked_at.insert(id.clone());
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                r = obtain(&task, &id, first, &mut account) => r,
            };
            let s = schedule.get_mut(&id).expect("scheduled");
            match outcome {
                Ok(renew_at) => {
                    let wait = renew_at.duration_since(SystemTime::now()).unwrap_or_default();
                    *s = Schedule { due: Instant::now() + wait, retry: RETRY_FIRST };
                }
                Err(e) => {
                    tracing::warn!("ACME: {id}: {e} (next attempt in {:?})", s.retry);
                    s.due = Instant::now() + s.retry;
                    s.retry = (s.retry * 2).min(RETRY_MAX);
                }
            }
            continue;
        }
        let next = schedule.values().map(|s| s.due).min().unwrap_or(now + CHECK_EVERY).min(now + CHECK_EVERY);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
            Some(ip) = wanted.recv() => {
                schedule.entry(Identity::Ip(ip)).or_insert(Schedule { due: Instant::now(), retry: RETRY_FIRST });
            }
        }
    }
}

/// One look at `id`: the cache first (on the first look), else a new certificate. Returns when
/// to renew.
async fn obtain(
    task: &AcmeTask,
    id: &Identity,
    first: bool,
    account: &mut Option<Account>,
) -> Result<SystemTime, String> {
    if first {
        if let Some(cached) = cache::load(&task.certdir, id) {
            if cached.is_current(SystemTime::now()) {
                task.store.install(id, &cached)?;
                if SystemTime::now() < cached.renew_at() {
                    tracing::info!(
                        "ACME: using the cached certificate for {id} (expires {})",
                        utc(cached.not_after)
                    );
                    return Ok(cached.renew_at());
                }
            }
        }
    }
    let acct = match account {
        Some(a) => a.clone(),
        None => {
            let a = order::account(
                &task.http,
                &task.certdir,
                &task.directory_url,
                task.email.as_deref(),
                task.eab.as_ref(),
            )
            .await?;
            *account = Some(a.clone());
            a
        }
    };
    let kinds: Vec<ChallengeType> = match (id, task.http01) {
        (Identity::Ip(_), _) => vec![ChallengeType::Http01],
        (Identity::Dns(_), true) => vec![ChallengeType::TlsAlpn01, ChallengeType::Http01],
        (Identity::Dns(_), false) => vec![ChallengeType::TlsAlpn01],
    };
    let issued = match order::issue(&acct, id, &kinds, &task.store.challenges).await {
        Ok(issued) => issued,
        Err(e) => {
            if e.contains(ACCOUNT_DOES_NOT_EXIST) {
                // The CA forgot the cached account (e.g. a reset test CA): register anew next time.
                let _ = std::fs::remove_file(cache::account_path(&task.certdir, &task.directory_url));
                *account = None;
            }
            return Err(e);
        }
    };
    if let Err(e) = cache::store(&task.certdir, id, &issued.key_pem, &issued.chain_pem) {
        tracing::warn!("ACME: caching the certificate for {id} in {}: {e}", task.certdir.display());
    }
    task.store.install(id, &issued.bundle)?;
    tracing::info!(
        "ACME: new certificate for {id} (validated with {}, profile {}), expires {}",
        issued.challenge,
        issued.profile.as_deref().unwrap_or("default"),
        utc(issued.bundle.not_after)
    );
    Ok(issued.bundle.renew_at())
}

fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map(|d| d.to_string())
        .unwrap_or_else(|_| format!("{secs} (unix)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AcmeConfig {
        AcmeConfig {
            mode: AcmeMode::LetsEncrypt,
            hostname: "derp.example.test".to_owned(),
            certdir: std::env::temp_dir(),
            directory_url: None,
            email: None,
            extra_roots: None,
            eab_kid: String::new(),
            eab_key: String::new(),
            ip_certs: false,
            http01: true,
        }
    }

    fn err(s: AcmeConfig) -> String {
        setup(&s, &derpfleet_proto::NodePrivate::generate().public()).unwrap_err().to_string()
    }

    #[test]
    fn eab_key_decodes_like_derper() {
        assert_eq!(decode_eab_key("AAEC-_8").unwrap(), vec![0, 1, 2, 0xfb, 0xff]);
        assert_eq!(decode_eab_key("AAEC+/8=").unwrap(), vec![0, 1, 2, 0xfb, 0xff]);
        assert!(decode_eab_key("not base64!").is_none());
    }

    #[test]
    fn directory_follows_the_mode_unless_overridden() {
        let mut s = settings();
        assert_eq!(s.directory(), LETS_ENCRYPT_DIRECTORY);
        s.mode = AcmeMode::Gcp;
        assert_eq!(s.directory(), "https://dv.acme-v02.api.pki.goog/directory");
        s.directory_url = Some("https://127.0.0.1:14000/dir".to_owned());
        assert_eq!(s.directory(), "https://127.0.0.1:14000/dir");
    }

    #[test]
    fn derpers_rules_for_the_flags() {
        let gcp =
            AcmeConfig { mode: AcmeMode::Gcp, email: Some("ops@example.test".to_owned()), ..settings() };
        assert_eq!(err(gcp.clone()), "-certmode gcp requires -acme-eab-kid and -acme-eab-key");
        let half = AcmeConfig { eab_kid: "kid".to_owned(), ..gcp.clone() };
        assert_eq!(err(half), "-certmode gcp requires -acme-eab-kid and -acme-eab-key");
        let with_eab = AcmeConfig { eab_kid: "kid".to_owned(), eab_key: "AAEC".to_owned(), ..gcp.clone() };
        assert!(setup(&with_eab, &derpfleet_proto::NodePrivate::generate().public()).is_ok());
        assert_eq!(err(AcmeConfig { email: None, ..with_eab.clone() }), "-certmode gcp requires -acme-email");
        assert!(err(AcmeConfig { eab_key: "!!".to_owned(), ..with_eab.clone() }).starts_with("-acme-eab-key"));
        assert!(err(AcmeConfig { hostname: "192.0.2.1".to_owned(), ..with_eab.clone() }).contains("DNS name"));
        assert_eq!(
            err(AcmeConfig { ip_certs: true, ..with_eab }),
            "-acme-ip-certs requires -certmode letsencrypt"
        );
        assert_eq!(
            err(AcmeConfig { eab_key: "AAEC".to_owned(), ..settings() }),
            "-acme-eab-kid and -acme-eab-key must be set together"
        );
        assert!(err(AcmeConfig { hostname: "192.0.2.1".to_owned(), ..settings() }).contains("-acme-ip-certs"));
        let ip = AcmeConfig { hostname: "192.0.2.1".to_owned(), ip_certs: true, ..settings() };
        assert!(setup(&ip, &derpfleet_proto::NodePrivate::generate().public()).is_ok());
        assert!(err(AcmeConfig { http01: false, ..ip }).contains("-http-port"));
    }
}
