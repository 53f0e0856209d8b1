//! Where the DERP map comes from: `file://PATH` (or a bare path) or `https://URL`, as derpprobe's
//! `-derp-map`. The map is parsed and validated with [`derpfleet_proto::derpmap`], so a bad map
//! names the region, node and field at fault.
//!
//! HTTPS uses the workspace's TLS client configuration (system trust store plus the bundled roots,
//! `SSL_CERT_FILE` honoured), HTTP/1.1 over hyper; the body is capped so a wrong URL cannot make the
//! prober buffer without bound.

use std::time::Duration;

use derpfleet_proto::derpmap::{CertCheck, DerpMap};
use http_body_util::{BodyExt, Empty, Limited};
use rustls::pki_types::ServerName;

/// Largest DERP map accepted (Tailscale's default map is ~20 KiB).
const MAX_MAP_BYTES: usize = 4 << 20;
/// Budget for fetching the map over HTTPS.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads and validates the map named by `source`.
pub async fn load(source: &str) -> anyhow::Result<DerpMap> {
    let bytes = if let Some(rest) = source.strip_prefix("https://") {
        tokio::time::timeout(FETCH_TIMEOUT, fetch_https(rest))
            .await
            .map_err(|_| anyhow::anyhow!("fetching DERP map {source}: timed out after {FETCH_TIMEOUT:?}"))?
            .map_err(|e| anyhow::anyhow!("fetching DERP map {source}: {e}"))?
    } else if source.starts_with("http://") {
        anyhow::bail!("DERP map {source}: only file:// and https:// URLs are accepted");
    } else {
        let path = source.strip_prefix("file://").unwrap_or(source);
        tokio::fs::read(path).await.map_err(|e| anyhow::anyhow!("reading DERP map {path}: {e}"))?
    };
    let map = DerpMap::from_json(&bytes).map_err(|e| anyhow::anyhow!("DERP map {source}: {e}"))?;
    map.validate().map_err(|e| anyhow::anyhow!("DERP map {source}: {e}"))?;
    Ok(map)
}

async fn fetch_https(rest: &str) -> anyhow::Result<Vec<u8>> {
    let uri: http::Uri = format!("https://{rest}").parse()?;
    let host = uri.host().ok_or_else(|| anyhow::anyhow!("no host"))?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let cfg = derpfleet_client::tls::client_config(&CertCheck::HostName, &[]);
    let tls = tokio_rustls::TlsConnector::from(cfg).connect(ServerName::try_from(host.clone())?, tcp).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .header(http::header::USER_AGENT, concat!("derpfleet-probe/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        anyhow::bail!("HTTP {}", resp.status());
    }
    let body = Limited::new(resp.into_body(), MAX_MAP_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading body: {e}"))?;
    Ok(body.to_bytes().to_vec())
}
