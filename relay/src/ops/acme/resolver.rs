//! Which certificate a handshake on the main port gets:
//! - ALPN `acme-tls/1` (a CA validating TLS-ALPN-01): the challenge certificate for the SNI;
//! - an SNI equal to `-hostname`: the DNS certificate;
//! - no SNI (clients connecting by IP address send none; rustls drops IP-literal SNI) with
//!   `-acme-ip-certs`: the certificate for the connection's local IP address, as derper's
//!   ipCertManager, so any number of addresses work without configuration and a client can never
//!   make the relay order a certificate for an address that is not its own. When that address
//!   has none yet, its issuance is requested and this handshake fails (rustls resolves
//!   certificates synchronously; derper's would wait for the order), later ones succeed.
//!
//! The local address reaches the resolver through a task-local set around the TLS accept
//! ([`with_local_ip`]).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::RwLock;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::mpsc;

use super::cache::CertBundle;
use super::challenge::Challenges;
use super::Identity;
use crate::http::tls::provider;

/// The ALPN protocol of TLS-ALPN-01 validation.
pub(super) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

tokio::task_local! {
    static LOCAL_IP: Option<IpAddr>;
}

/// Runs a TLS accept with the connection's local address visible to the ACME resolver.
pub async fn with_local_ip<F: Future>(ip: Option<IpAddr>, accept: F) -> F::Output {
    LOCAL_IP.scope(ip.map(|ip| ip.to_canonical()), accept).await
}

/// A certificate being served.
struct Served {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

/// State shared by the resolver (handshakes) and the issuing task.
pub(super) struct Store {
    certs: RwLock<HashMap<Identity, Served>>,
    pub challenges: Challenges,
    /// The `derpkey` meta-certificate appended to every served chain.
    meta: CertificateDer<'static>,
    /// Local IPs that were asked for and have no certificate yet (bounded; extra asks are
    /// dropped and come again with the next handshake).
    wanted: mpsc::Sender<IpAddr>,
}

impl Store {
    pub(super) fn new(meta: CertificateDer<'static>) -> (Self, mpsc::Receiver<IpAddr>) {
        let (wanted, rx) = mpsc::channel(16);
        (Self { certs: RwLock::default(), challenges: Challenges::default(), meta, wanted }, rx)
    }

    /// Serves `bundle` for `identity` from now on, with the meta-certificate appended.
    pub(super) fn install(&self, identity: &Identity, bundle: &CertBundle) -> Result<(), String> {
        let signing =
            provider().key_provider.load_private_key(bundle.key.clone_key()).map_err(|e| e.to_string())?;
        let mut chain = bundle.chain.clone();
        chain.push(self.meta.clone());
        let served = Served { key: Arc::new(CertifiedKey::new(chain, signing)), not_after: bundle.not_after };
        self.certs.write().insert(identity.clone(), served);
        Ok(())
    }

    fn current(&self, identity: &Identity) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.read();
        let served = certs.get(identity)?;
        (SystemTime::now() < served.not_after).then(|| served.key.clone())
    }
}

/// The main port's certificate resolver in ACME modes.
pub(super) struct AcmeResolver {
    pub store: Arc<Store>,
    /// `-hostname` when it is a DNS name.
    pub hostname: Option<String>,
    /// `-acme-ip-certs`.
    pub ip_certs: bool,
}

impl fmt::Debug for AcmeResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcmeResolver")
            .field("hostname", &self.hostname)
            .field("ip_certs", &self.ip_certs)
            .finish()
    }
}

impl ResolvesServerCert for AcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if hello.alpn().into_iter().flatten().eq([ACME_TLS_ALPN]) {
            return self.store.challenges.tls_alpn01(hello.server_name()?);
        }
        match hello.server_name() {
            Some(sni) => {
                let want = self.hostname.as_deref()?;
                let sni_ok = sni.trim_end_matches('.').eq_ignore_ascii_case(want);
                sni_ok.then(|| self.store.current(&Identity::Dns(want.to_owned()))).flatten()
            }
            None if self.ip_certs => {
                let ip = LOCAL_IP.try_with(|ip| *ip).ok().flatten()?;
                let cert = self.store.current(&Identity::Ip(ip));
                if cert.is_none() {
                    let _ = self.store.wanted.try_send(ip);
                }
                cert
            }
            None => None,
        }
    }
}
