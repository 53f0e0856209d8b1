//! The HTTPS client `instant-acme` talks to the CA with: one connection per request (an
//! issuance makes a dozen requests, days apart), the relay's ring provider, the web PKI roots plus
//! `-acme-ca-file`, and a timeout per request so a stuck CA cannot stall renewal forever.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};

use super::AcmeError;
use crate::http::tls::TlsError;
use crate::ops::http_client;

/// Longest wait for one request (connect, TLS, answer).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// HTTPS to the CA's API.
#[derive(Clone)]
pub(super) struct CaClient {
    tls: Arc<rustls::ClientConfig>,
}

impl CaClient {
    /// Trusts the web PKI roots and, when given, the PEM certificates of `extra_roots`.
    pub(super) fn new(extra_roots: Option<&Path>) -> Result<Self, AcmeError> {
        let mut roots = http_client::web_pki_roots();
        if let Some(path) = extra_roots {
            for cert in crate::mesh::load_ca_file(path).map_err(AcmeError::CaFile)? {
                roots
                    .add(cert)
                    .map_err(|e| AcmeError::CaFile(crate::mesh::CaFileError::new(path, e.to_string())))?;
            }
        }
        let tls = http_client::config_with_roots(roots).map_err(TlsError::from)?;
        Ok(Self { tls })
    }
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            let uri = req.uri().to_string();
            match tokio::time::timeout(REQUEST_TIMEOUT, send(tls, req)).await {
                Ok(r) => r.map_err(|e| instant_acme::Error::Other(format!("{uri}: {e}").into())),
                Err(_) => Err(instant_acme::Error::Other(
                    format!("{uri}: no answer within {REQUEST_TIMEOUT:?}").into(),
                )),
            }
        })
    }
}

async fn send(
    tls: Arc<rustls::ClientConfig>,
    req: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, String> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err("the ACME directory must be an https:// URL".to_owned());
    }
    let response = http_client::send(&uri, tls, req).await?;
    Ok(BytesResponse::from(response))
}
