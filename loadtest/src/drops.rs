//! The relay's own drop counters, read from its Prometheus text before and after a run, so a
//! report with loss says where the relay dropped (`derp_packets_dropped{reason=...}`: queue
//! head/tail, unknown destination, write errors, ...). Works with derpfleet-relay's
//! `/debug/varz` and `/metrics` and with Go derper's `/debug/varz` (same metric name).
//!
//! Plain `http://` only (the metrics listeners are loopback HTTP), one hyper GET per page.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;

/// The counter read.
pub const METRIC: &str = "derp_packets_dropped";
/// Longest we wait for one metrics page.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest metrics page accepted.
const MAX_PAGE: usize = 16 << 20;

/// A metrics address: `http://host:port/path`.
#[derive(Clone, Debug)]
pub struct MetricsUrl {
    host_port: String,
    path: String,
    text: String,
}

impl std::str::FromStr for MetricsUrl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest =
            s.strip_prefix("http://").ok_or("must start with http:// (metrics are read over plain HTTP)")?;
        let (host_port, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/metrics"),
        };
        if host_port.is_empty() || !host_port.contains(':') {
            return Err("needs host:port, e.g. http://127.0.0.1:9090/metrics".into());
        }
        Ok(Self { host_port: host_port.into(), path: path.into(), text: s.into() })
    }
}

impl std::fmt::Display for MetricsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// `derp_packets_dropped` by `reason` (summed over the other labels) on every page together.
pub async fn read_all(urls: &[MetricsUrl]) -> Result<BTreeMap<String, f64>> {
    let mut sum = BTreeMap::new();
    for u in urls {
        let page = tokio::time::timeout(TIMEOUT, fetch(u))
            .await
            .unwrap_or_else(|_| bail!("no answer within {TIMEOUT:?}"))
            .with_context(|| format!("--metrics-url {u}"))?;
        for (reason, v) in parse_drops(&page) {
            *sum.entry(reason).or_default() += v;
        }
    }
    Ok(sum)
}

/// `after - before` by reason, keeping only reasons that grew.
pub fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), (v - before.get(k).copied().unwrap_or(0.0)).max(0.0).round() as u64))
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// The `derp_packets_dropped` samples of a Prometheus text page, summed by `reason`.
pub fn parse_drops(page: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(METRIC) else { continue };
        // `derp_packets_dropped{...} 12` (not `derp_packets_dropped_total_foo`).
        let (labels, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once('}') {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let Some(v) = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        let reason = labels
            .split(',')
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == "reason")
            .map(|(_, v)| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "unlabelled".into());
        *out.entry(reason).or_default() += v;
    }
    out
}

async fn fetch(u: &MetricsUrl) -> Result<String> {
    let tcp = tokio::net::TcpStream::connect(&u.host_port).await.context("connecting")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(u.path.as_str())
        .header(http::header::HOST, u.host_port.as_str())
        .header(http::header::USER_AGENT, "derpfleet-loadtest")
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if resp.status() != http::StatusCode::OK {
        bail!("HTTP {}", resp.status());
    }
    let body = Limited::new(resp.into_body(), MAX_PAGE)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the page: {e}"))?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_by_reason_and_delta() {
        let page = "# TYPE derp_packets_dropped counter\n\
            derp_packets_dropped{reason=\"queue_head\",kind=\"other\"} 3\n\
            derp_packets_dropped{kind=\"disco\",reason=\"queue_head\"} 2\n\
            derp_packets_dropped{reason=\"unknown_dest\",kind=\"other\"} 1\n\
            derp_packets_dropped_foo 99\n";
        let m = parse_drops(page);
        assert_eq!(m["queue_head"], 5.0);
        assert_eq!(m["unknown_dest"], 1.0);
        assert_eq!(m.len(), 2);
        let mut after = m.clone();
        *after.get_mut("queue_head").unwrap() += 4.0;
        let d = delta(&m, &after);
        assert_eq!(d.into_iter().collect::<Vec<_>>(), vec![("queue_head".to_string(), 4)]);
    }

    #[test]
    fn metrics_urls() {
        assert!("https://x:1/m".parse::<MetricsUrl>().is_err());
        assert!("http://nohost/m".parse::<MetricsUrl>().is_err());
        let u: MetricsUrl = "http://127.0.0.1:9090".parse().unwrap();
        assert_eq!(u.path, "/metrics");
    }
}
