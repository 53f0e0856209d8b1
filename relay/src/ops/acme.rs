//! `-certmode letsencrypt`: certificates from an ACME CA (Let's Encrypt by default) with the
//! `rustls-acme` crate, validated with TLS-ALPN-01 on the main port, cached in `-certdir` and
//! renewed in the background (at two thirds of their lifetime).
//!
//! The served chain gets the `derpkey` meta-certificate appended, as in manual mode, so fast
//! start keeps working; ACME validation handshakes (ALPN `acme-tls/1`) get the challenge
//! certificate instead. As with derper's autocert, the SNI must be `-hostname`.
//! `-acme-directory-url` and `-acme-ca-file` point it at another CA (e.g. a local `pebble`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_acme::caches::DirCache;
use rustls_acme::{AcmeConfig, AcmeState, ResolvesServerCertAcme};
use tokio_util::sync::CancellationToken;

use crate::http::tls::{meta_cert, provider, server_config, TlsError};

/// Let's Encrypt's production directory (derper's default CA).
pub const LETS_ENCRYPT_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// The ALPN protocol of TLS-ALPN-01 validation.
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Why ACME could not be set up.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("-hostname {0:?}: ACME needs a DNS name (use -certmode manual for an IP address)")]
    IpHostname(String),
    #[error("-acme-ca-file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What to ask the CA for.
#[derive(Clone, Debug)]
pub struct AcmeSettings {
    /// The certificate's only name (`-hostname`).
    pub hostname: String,
    /// Cache of the account key and certificates (`-certdir`).
    pub certdir: PathBuf,
    /// The CA's directory URL.
    pub directory_url: String,
    /// Contact e-mail (`-acme-email`), optional.
    pub email: Option<String>,
    /// Extra PEM roots trusted for the CA's API, besides the web PKI roots.
    pub extra_roots: Option<PathBuf>,
}

/// A running ACME state machine, polled by the server's task.
pub struct AcmeTask {
    state: Mutex<Option<AcmeState<std::io::Error>>>,
}

impl fmt::Debug for AcmeTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AcmeTask(..)")
    }
}

/// The TLS configuration for the main port and the task that obtains and renews the certificate.
pub fn setup(
    settings: &AcmeSettings,
    server_public: &derpfleet_proto::NodePublic,
) -> Result<(Arc<rustls::ServerConfig>, Arc<AcmeTask>), AcmeError> {
    if settings.hostname.parse::<std::net::IpAddr>().is_ok() {
        return Err(AcmeError::IpHostname(settings.hostname.clone()));
    }
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = &settings.extra_roots {
        for cert in read_pem_certs(path)? {
            roots.add(cert).map_err(|e| AcmeError::CaFile { path: path.clone(), reason: e.to_string() })?;
        }
    }
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::from)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut config = AcmeConfig::new_with_client_config([settings.hostname.as_str()], Arc::new(client))
        .directory(&settings.directory_url)
        .cache(DirCache::new(settings.certdir.clone()));
    if let Some(email) = &settings.email {
        config = config.contact_push(format!("mailto:{email}"));
    }
    let state = config.state();
    let resolver = Arc::new(MetaAcmeResolver {
        acme: state.resolver(),
        hostname: settings.hostname.trim_end_matches('.').to_owned(),
        meta: meta_cert(server_public)?,
        served: Mutex::new(None),
    });
    let mut tls = Arc::unwrap_or_clone(server_config(resolver)?);
    tls.alpn_protocols = vec![b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Ok((Arc::new(tls), Arc::new(AcmeTask { state: Mutex::new(Some(state)) })))
}

fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, AcmeError> {
    let err = |reason: String| AcmeError::CaFile { path: path.to_owned(), reason };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs: Vec<_> =
        rustls_pemfile::certs(&mut &pem[..]).collect::<Result<_, _>>().map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate found".to_owned()));
    }
    Ok(certs)
}

/// Drives ordering, renewal and caching until `cancel`; logs every event.
pub async fn run(task: Arc<AcmeTask>, cancel: CancellationToken) {
    let Some(mut state) = task.state.lock().take() else { return };
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            e = state.next() => e,
        };
        match event {
            Some(Ok(ok)) => tracing::info!("ACME: {ok:?}"),
            Some(Err(e)) => tracing::warn!("ACME: {e}"),
            None => return,
        }
    }
}

/// The ACME certificate with the meta-certificate appended; challenge handshakes go to the ACME
/// resolver untouched.
struct MetaAcmeResolver {
    acme: Arc<ResolvesServerCertAcme>,
    hostname: String,
    meta: CertificateDer<'static>,
    /// The last ACME certificate seen and its chain with the meta-certificate.
    served: Mutex<Option<(Arc<CertifiedKey>, Arc<CertifiedKey>)>>,
}

impl fmt::Debug for MetaAcmeResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaAcmeResolver").field("hostname", &self.hostname).finish_non_exhaustive()
    }
}

impl ResolvesServerCert for MetaAcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let challenge = hello.alpn().into_iter().flatten().eq([ACME_TLS_ALPN]);
        if challenge {
            return self.acme.resolve(hello);
        }
        let sni_ok =
            hello.server_name().is_some_and(|s| s.trim_end_matches('.').eq_ignore_ascii_case(&self.hostname));
        if !sni_ok {
            return None;
        }
        let cert = self.acme.resolve(hello)?;
        let mut served = self.served.lock();
        if let Some((from, with_meta)) = served.as_ref() {
            if Arc::ptr_eq(from, &cert) {
                return Some(with_meta.clone());
            }
        }
        let mut chain = cert.cert.clone();
        chain.push(self.meta.clone());
        let with_meta = Arc::new(CertifiedKey::new(chain, cert.key.clone()));
        *served = Some((cert, with_meta.clone()));
        Some(with_meta)
    }
}
