//! The relay's outgoing HTTP: one request on a fresh connection, to the `-verify-client-url`
//! controller ([`crate::ops::admission`]), setec ([`crate::ops::secrets`]) and the ACME CA
//! ([`crate::ops::acme`]). Each of them asks rarely (once per new client at most), so there is no
//! connection pool: connect, optionally TLS, send, and let the connection go with the answer.
//!
//! `https://` trusts the web PKI roots compiled into the binary (`webpki-roots`), as derper's Go
//! binary trusts its built-in pool in a distroless container: a relay image needs no CA bundle, and a
//! private CA is added explicitly (`-acme-ca-file`). The host's trust store is not read.

use std::sync::{Arc, OnceLock};

use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::{Body, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;

use crate::http::tls::provider;

/// The web PKI roots, to add private roots to before [`config_with_roots`].
pub(crate) fn web_pki_roots() -> RootCertStore {
    RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
}

/// A TLS client configuration trusting `roots`, with the relay's crypto provider.
pub(crate) fn config_with_roots(roots: RootCertStore) -> Result<Arc<ClientConfig>, rustls::Error> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The web-PKI-only configuration, built once.
pub(crate) fn web_pki() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| config_with_roots(web_pki_roots()).expect("the relay's provider has TLS 1.2 and 1.3"))
        .clone()
}

/// Sends `request` to `uri` (`http://` or `https://`, trusting `tls`) on a new connection and returns
/// the response head with its body still to read. The request is sent in origin form with a `Host`
/// header naming `uri`'s authority (unless the caller set one), as HTTP/1.1 to a server directly
/// requires. Errors name the step that failed: connecting, TLS or HTTP.
pub(crate) async fn send<B>(
    uri: &Uri,
    tls: Arc<ClientConfig>,
    mut request: Request<B>,
) -> Result<Response<Incoming>, String>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        other => return Err(format!("unsupported URL scheme {:?} in {uri}", other.unwrap_or(""))),
    };
    let host =
        uri.host().ok_or("no host in the URL")?.trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    if !request.headers().contains_key(header::HOST) {
        let authority = uri.authority().map_or(host.as_str(), |a| a.as_str());
        let value = HeaderValue::from_str(authority).map_err(|e| format!("bad host {authority:?}: {e}"))?;
        request.headers_mut().insert(header::HOST, value);
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    *request.uri_mut() = path.parse::<Uri>().map_err(|e| format!("bad path {path:?}: {e}"))?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if https {
        let name = ServerName::try_from(host.clone()).map_err(|e| format!("bad TLS name {host:?}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        exchange(TokioIo::new(stream), request).await
    } else {
        exchange(TokioIo::new(tcp), request).await
    }
}

async fn exchange<S, B>(io: TokioIo<S>, request: Request<B>) -> Result<Response<Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("HTTP handshake: {e}"))?;
    // The connection ends by itself once the answer is read and the sender dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(request).await.map_err(|e| format!("HTTP request: {e}"))
}
