//! `tls`: TCP to the node's DERP port, then a TLS handshake verified exactly as DERP clients verify
//! it (the node's `CertName` / `HostName` / `sha256-raw` pin / `InsecureForTests`, through
//! [`derpfleet_client::tls::client_config`]). The latency is the handshake alone (TCP excluded).
//!
//! The leaf certificate (the first one that is not a `derpkey…` meta-certificate) gives the days
//! to expiry. Like derpprobe's TLS probe, a certificate that expires within [`FAIL_WITHIN_DAYS`]
//! fails the probe; the alert rules warn earlier (14 days) from the exported days.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use derpfleet_client::dial::dial_node;
use derpfleet_proto::consts::META_CERT_CN_PREFIX;
use derpfleet_proto::derpmap::DerpNode;
use rustls::pki_types::ServerName;

use crate::results::Measured;

/// A certificate closer than this to its notAfter fails the probe.
pub const FAIL_WITHIN_DAYS: f64 = 7.0;

fn is_meta(der: &[u8]) -> bool {
    x509_parser::parse_x509_certificate(der).is_ok_and(|(_, c)| {
        c.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .is_some_and(|cn| cn.starts_with(META_CERT_CN_PREFIX))
    })
}

/// Days from now to the leaf's notAfter.
fn days_left(der: &[u8], now: SystemTime) -> Result<f64, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("parsing the certificate: {e}"))?;
    let not_after = cert.validity().not_after.timestamp() as f64;
    let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    Ok((not_after - now) / 86_400.0)
}

/// Runs the probe.
pub async fn probe(node: &DerpNode) -> Result<Measured, String> {
    let (tcp, remote) = dial_node(node, false, None, None)
        .await
        .map_err(|e| format!("TCP to {}:{}: {e}", node.host_name, node.derp_port()))?;
    let _ = tcp.set_nodelay(true);
    let cfg = derpfleet_client::tls::client_config(&node.cert_check(), &[]);
    let name =
        ServerName::try_from(node.host_name.clone()).map_err(|_| "HostName is not a valid TLS name")?;
    let start = Instant::now();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS with {} ({remote}): {e}", node.host_name))?;
    let latency = start.elapsed();
    let (_, session) = tls.get_ref();
    let leaf = session
        .peer_certificates()
        .and_then(|chain| chain.iter().find(|c| !is_meta(c.as_ref())))
        .ok_or("the server sent no certificate")?;
    let days = days_left(leaf.as_ref(), SystemTime::now())?;
    if days < FAIL_WITHIN_DAYS {
        return Err(format!("certificate expires in {days:.1} days (fails below {FAIL_WITHIN_DAYS} days)"));
    }
    Ok(Measured { latency, cert_days_left: Some(days), ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_left_and_meta_detection() {
        let mut p = rcgen::CertificateParams::new(vec!["x.example".to_string()]).unwrap();
        let now = SystemTime::now();
        let in_ten_days = now + std::time::Duration::from_secs(10 * 86_400);
        p.not_after = time_of(in_ten_days);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        let d = days_left(&der, now).unwrap();
        assert!((9.9..=10.01).contains(&d), "{d}");
        assert!(!is_meta(&der));
        let mut m = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        m.distinguished_name.push(rcgen::DnType::CommonName, format!("derpkey{}", "ab".repeat(32)));
        let meta = m.self_signed(&key).unwrap().der().to_vec();
        assert!(is_meta(&meta));
    }

    fn time_of(t: SystemTime) -> time::OffsetDateTime {
        let secs = t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
    }
}
