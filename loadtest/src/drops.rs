//! The relay's own drop counters, read from its Prometheus text before and after a run, so a
//! report with loss says where the relay dropped (`derp_packets_dropped{reason=...}`: queue
//! head/tail, unknown destination, write errors, ...). Works with derpfleet-relay's
//! `/debug/varz` and `/metrics` and with Go derper's `/debug/varz` (same metric name).
//!
//! Plain `http://` only (the metrics listeners are loopback HTTP); a minimal HTTP/1.1 GET with
//! `Connection: close`, accepting a `Content-Length` or chunked body.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let mut s = tokio::net::TcpStream::connect(&u.host_port).await.context("connecting")?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: derpfleet-loadtest\r\nConnection: close\r\n\r\n",
        u.path, u.host_port
    );
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    (&mut s).take(MAX_PAGE as u64).read_to_end(&mut raw).await?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(&raw).context("bad HTTP response")? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => bail!("truncated HTTP response"),
    };
    if resp.code != Some(200) {
        bail!("HTTP {}", resp.code.unwrap_or(0));
    }
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value).to_ascii_lowercase().contains("chunked")
    });
    let body = &raw[head..];
    let body = if chunked { dechunk(body)? } else { body.to_vec() };
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").context("bad chunked body")?;
        let size_text = std::str::from_utf8(&b[..line_end])?.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).context("bad chunk size")?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
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
    fn urls_and_chunks() {
        assert!("https://x:1/m".parse::<MetricsUrl>().is_err());
        assert!("http://nohost/m".parse::<MetricsUrl>().is_err());
        let u: MetricsUrl = "http://127.0.0.1:9090".parse().unwrap();
        assert_eq!(u.path, "/metrics");
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x\r\nde\r\n0\r\n\r\n").unwrap(), b"abcde");
        assert!(dechunk(b"5\r\nab").is_err());
    }
}
