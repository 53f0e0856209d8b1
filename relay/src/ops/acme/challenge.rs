//! Challenge responses while an order is being validated: HTTP-01 bodies for the `-http-port`
//! listener and TLS-ALPN-01 certificates for `acme-tls/1` handshakes on the main port.
//!
//! Entries live only from "set up" to "order validated or failed" (the caller removes them), so
//! the maps hold at most one entry per identifier being ordered.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use crate::http::tls::provider;

/// Where HTTP-01 responses are served (RFC 8555 §8.3).
pub const HTTP01_PREFIX: &str = "/.well-known/acme-challenge/";

/// The open challenges.
#[derive(Default)]
pub(super) struct Challenges {
    /// HTTP-01: token → key authorization.
    http01: RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01: SNI (lowercase DNS name) → the validation certificate (RFC 8737).
    tls_alpn01: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl Challenges {
    /// The body for `GET /.well-known/acme-challenge/<token>`, if that token is open.
    pub(super) fn http01_response(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(HTTP01_PREFIX)?;
        self.http01.read().get(token).cloned()
    }

    pub(super) fn set_http01(&self, token: &str, key_authorization: &str) {
        self.http01.write().insert(token.to_owned(), key_authorization.to_owned());
    }

    pub(super) fn remove_http01(&self, token: &str) {
        self.http01.write().remove(token);
    }

    /// The validation certificate for an `acme-tls/1` handshake with this SNI.
    pub(super) fn tls_alpn01(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.tls_alpn01.read().get(&sni.trim_end_matches('.').to_ascii_lowercase()).cloned()
    }

    /// Builds and installs the RFC 8737 certificate: the name as its only SAN and the
    /// critical `acmeIdentifier` extension holding SHA-256 of the key authorization.
    pub(super) fn set_tls_alpn01(&self, name: &str, key_auth_digest: &[u8]) -> Result<(), String> {
        let key = KeyPair::generate().map_err(|e| format!("challenge key: {e}"))?;
        let mut params = CertificateParams::new(vec![name.to_owned()])
            .map_err(|e| format!("challenge certificate: {e}"))?;
        params.custom_extensions = vec![CustomExtension::new_acme_identifier(key_auth_digest)];
        let cert = params.self_signed(&key).map_err(|e| format!("challenge certificate: {e}"))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing =
            provider().key_provider.load_private_key(der).map_err(|e| format!("challenge key: {e}"))?;
        let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing));
        self.tls_alpn01.write().insert(name.to_ascii_lowercase(), certified);
        Ok(())
    }

    pub(super) fn remove_tls_alpn01(&self, name: &str) {
        self.tls_alpn01.write().remove(&name.to_ascii_lowercase());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http01_answers_only_open_tokens_under_the_prefix() {
        let c = Challenges::default();
        c.set_http01("tok", "tok.thumb");
        assert_eq!(c.http01_response("/.well-known/acme-challenge/tok").as_deref(), Some("tok.thumb"));
        assert_eq!(c.http01_response("/.well-known/acme-challenge/other"), None);
        assert_eq!(c.http01_response("/tok"), None);
        c.remove_http01("tok");
        assert_eq!(c.http01_response("/.well-known/acme-challenge/tok"), None);
    }

    #[test]
    fn tls_alpn01_certificate_is_found_by_sni_case_insensitively() {
        let c = Challenges::default();
        c.set_tls_alpn01("derp.example.test", &[7; 32]).unwrap();
        assert!(c.tls_alpn01("DERP.example.test.").is_some());
        assert!(c.tls_alpn01("other.example.test").is_none());
        c.remove_tls_alpn01("derp.example.test");
        assert!(c.tls_alpn01("derp.example.test").is_none());
    }
}
