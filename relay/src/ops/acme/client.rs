//! The HTTPS client `instant-acme` talks to the CA with: one connection per request (an
//! issuance makes a dozen requests, days apart), the relay's ring provider, the web PKI roots plus
//! `-acme-ca-file`, and a timeout per request so a stuck CA cannot stall renewal forever.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Uri};
use hyper_util::rt::TokioIo;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::AcmeError;
use crate::http::tls::{provider, TlsError};

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
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(path) = extra_roots {
            for cert in crate::mesh::load_ca_file(path).map_err(AcmeError::CaFile)? {
                roots
                    .add(cert)
                    .map_err(|e| AcmeError::CaFile(crate::mesh::CaFileError::new(path, e.to_string())))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::from)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { tls: Arc::new(tls) })
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
    mut req: Request<BodyWrapper<Bytes>>,
) -> Result<BytesResponse, String> {
    let uri = req.uri().clone();
    if uri.scheme_str() != Some("https") {
        return Err("the ACME directory must be an https:// URL".to_owned());
    }
    let host =
        uri.host().ok_or("no host in the URL")?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connecting: {e}"))?;
    let name = ServerName::try_from(host.clone()).map_err(|e| format!("bad TLS name {host:?}: {e}"))?;
    let stream =
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    // A connection-level hyper client sends the request target as given: make it origin-form
    // and name the host, as HTTP/1.1 requires.
    let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or(host);
    let host_value = HeaderValue::from_str(&authority).map_err(|e| format!("bad host: {e}"))?;
    req.headers_mut().insert(header::HOST, host_value);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    *req.uri_mut() = path.parse::<Uri>().map_err(|e| format!("bad path: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
    Ok(BytesResponse::from(response))
}
