//! `/bootstrap-dns`, as derper's `bootstrap_dns.go`: DNS answers for clients that cannot resolve
//! yet (tailscaled asks a DERP server for the control plane's addresses when its own DNS fails).
//!
//! - `-bootstrap-dns-names a,b`: resolved at start and every [`REFRESH_EVERY`] (each round within
//!   [`REFRESH_TIMEOUT`]); each name's addresses are shuffled once per round (so clients do not
//!   all prefer the same family) and the whole map is served as tab-indented JSON
//!   `{"name":["ip",…]}`, keys sorted, as Go's `json.MarshalIndent`. A name that fails to resolve
//!   is logged and left out; with no name configured the body is empty, as derper's.
//! - `-unpublished-bootstrap-dns-names`: resolved the same way but only answered to `?q=NAME`,
//!   then with just that name. An entry `name/txtname` is rolled out to a share of clients given by
//!   txtname's TXT record (`0`..`100`). Decision: TXT records are not looked up here (the relay
//!   resolves through the system resolver, which has no TXT query), so such entries count as 0 %,
//!   exactly what derper does when the TXT record is missing; entries without a slash are 100 %.
//!   A client's share is a stable function of its IP (derper seeds Go's PCG with it; here a
//!   SHA-256 of it), loopback clients get a coin toss, as derper's.
//! - Every answer has `Connection: close` and `Content-Type: application/json` plus derper's
//!   browser headers; the counters keep derper's names (`counter_bootstrap_dns_*`), in `/metrics`
//!   and in `/debug/vars`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::Full;
use metrics::{Counter, Key, Level, Metadata, Recorder};
use parking_lot::{Mutex, RwLock};
use rand::seq::SliceRandom;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// derper refreshes every 10 minutes.
pub const REFRESH_EVERY: Duration = Duration::from_secs(600);
/// derper's bound on one refresh round.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(60);
/// derper forgets the set of queried names when it grows past this.
const QUERIED_NAMES_CAP: usize = 500;

const META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// One list entry: a name, and optionally the TXT record holding its rollout percentage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The name resolved and served.
    pub name: String,
    /// `name/txtname`: the TXT record with the rollout percentage.
    pub txt_name: Option<String>,
}

/// The two name lists (`-bootstrap-dns-names`, `-unpublished-bootstrap-dns-names`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootstrapDnsConfig {
    /// Served to everyone.
    pub published: Vec<Entry>,
    /// Served only to `?q=NAME`.
    pub unpublished: Vec<Entry>,
}

impl BootstrapDnsConfig {
    /// Parses derper's comma-separated lists (empty parts are skipped).
    pub fn parse(published: &str, unpublished: &str) -> Self {
        Self { published: parse_list(published), unpublished: parse_list(unpublished) }
    }

    /// True when neither list names anything.
    pub fn is_empty(&self) -> bool {
        self.published.is_empty() && self.unpublished.is_empty()
    }
}

fn parse_list(list: &str) -> Vec<Entry> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('/') {
            Some((name, txt)) => Entry { name: name.to_owned(), txt_name: Some(txt.to_owned()) },
            None => Entry { name: e.to_owned(), txt_name: None },
        })
        .collect()
}

/// Resolved names with their rollout share (0.0..=1.0).
#[derive(Clone, Debug, Default)]
struct Resolved {
    ips: BTreeMap<String, Vec<IpAddr>>,
    percent: HashMap<String, f64>,
}

/// derper's `counter_bootstrap_dns_*` counters.
#[derive(Clone)]
struct Counters {
    requests: Counter,
    published_hits: Counter,
    published_misses: Counter,
    unpublished_hits: Counter,
    unpublished_misses: Counter,
    unpublished_percent_misses: Counter,
}

/// The `/bootstrap-dns` state of one relay.
pub struct BootstrapDns {
    config: BootstrapDnsConfig,
    published: RwLock<Option<(Resolved, Bytes)>>,
    unpublished: RwLock<Option<Resolved>>,
    queried: Mutex<HashSet<String>>,
    counters: Counters,
}

impl std::fmt::Debug for BootstrapDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapDns").field("config", &self.config).finish_non_exhaustive()
    }
}

impl BootstrapDns {
    /// State for `config`, its counters registered in `recorder`.
    pub fn new(config: BootstrapDnsConfig, recorder: &dyn Recorder) -> Arc<Self> {
        let c = |name: &'static str| recorder.register_counter(&Key::from_static_name(name), &META);
        Arc::new(Self {
            config,
            published: RwLock::new(None),
            unpublished: RwLock::new(None),
            queried: Mutex::new(HashSet::new()),
            counters: Counters {
                requests: c("counter_bootstrap_dns_requests"),
                published_hits: c("counter_bootstrap_dns_published_hits"),
                published_misses: c("counter_bootstrap_dns_published_misses"),
                unpublished_hits: c("counter_bootstrap_dns_unpublished_hits"),
                unpublished_misses: c("counter_bootstrap_dns_unpublished_misses"),
                unpublished_percent_misses: c("counter_bootstrap_dns_unpublished_percent_misses"),
            },
        })
    }

    /// How many distinct names were asked with `?q=` (derper's `counter_bootstrap_dns_queried_domains`).
    pub fn queried_domains(&self) -> usize {
        self.queried.lock().len()
    }

    /// Resolves both lists once (each within [`REFRESH_TIMEOUT`]); a list that names nothing is
    /// left alone, as derper's.
    pub async fn refresh(&self) {
        if !self.config.published.is_empty() {
            let mut resolved = resolve_list(&self.config.published).await;
            for ips in resolved.ips.values_mut() {
                ips.shuffle(&mut rand::thread_rng());
            }
            let json = go_indent_json(&resolved.ips);
            *self.published.write() = Some((resolved, json));
        }
        if !self.config.unpublished.is_empty() {
            let resolved = resolve_list(&self.config.unpublished).await;
            *self.unpublished.write() = Some(resolved);
        }
    }

    /// Refreshes now and every [`REFRESH_EVERY`] until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if self.config.is_empty() {
            return;
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.refresh() => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
        }
    }

    /// The body for a request from `remote` with query `q` (None or empty: the published map).
    pub fn answer(&self, q: Option<&str>, remote: SocketAddr) -> Bytes {
        self.counters.requests.increment(1);
        if let Some(q) = q.filter(|q| !q.is_empty()) {
            {
                let mut queried = self.queried.lock();
                queried.insert(q.to_owned());
                if queried.len() > QUERIED_NAMES_CAP {
                    queried.clear();
                }
            }
            if let Some(m) = self.unpublished.read().as_ref() {
                if let Some(ips) = m.ips.get(q).filter(|ips| !ips.is_empty()) {
                    self.counters.unpublished_hits.increment(1);
                    let percent = m.percent.get(q).copied().unwrap_or(0.0);
                    if remote_matches_percent(remote.ip(), percent) {
                        let one: BTreeMap<String, Vec<IpAddr>> = [(q.to_owned(), ips.clone())].into();
                        return go_indent_json(&one);
                    }
                    self.counters.unpublished_percent_misses.increment(1);
                }
            }
            match self.published.read().as_ref().and_then(|(m, _)| m.ips.get(q)) {
                Some(ips) if !ips.is_empty() => self.counters.published_hits.increment(1),
                Some(_) => self.counters.published_misses.increment(1),
                None => self.counters.unpublished_misses.increment(1),
            }
        }
        self.published.read().as_ref().map(|(_, json)| json.clone()).unwrap_or_default()
    }

    /// The HTTP response for `/bootstrap-dns?query` from `remote`.
    pub fn response(&self, query: Option<&str>, remote: SocketAddr) -> Response<Full<Bytes>> {
        let q = query.and_then(|qs| url_query_value(qs, "q"));
        let mut r = Response::new(Full::new(self.answer(q.as_deref(), remote)));
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    }
}

/// The first value of `name` in a URL query string, percent-decoded (`+` is a space), as Go's
/// `URL.Query().Get`.
fn url_query_value(query: &str, name: &str) -> Option<String> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k).as_deref() == Some(name) {
            return percent_decode(v);
        }
    }
    None
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// Resolves every entry through the system resolver (A and AAAA, duplicates dropped).
async fn resolve_list(entries: &[Entry]) -> Resolved {
    let mut out = Resolved::default();
    let round = async {
        for e in entries {
            match tokio::net::lookup_host((e.name.as_str(), 0)).await {
                Ok(addrs) => {
                    let mut ips: Vec<IpAddr> = Vec::new();
                    for a in addrs {
                        if !ips.contains(&a.ip()) {
                            ips.push(a.ip());
                        }
                    }
                    out.ips.insert(e.name.clone(), ips);
                    // See the module docs: a TXT-controlled entry is at 0 % (no TXT lookup).
                    out.percent.insert(e.name.clone(), if e.txt_name.is_none() { 1.0 } else { 0.0 });
                }
                Err(err) => tracing::warn!("bootstrap DNS lookup {:?}: {err}", e.name),
            }
        }
    };
    if tokio::time::timeout(REFRESH_TIMEOUT, round).await.is_err() {
        tracing::warn!("bootstrap DNS refresh took longer than {REFRESH_TIMEOUT:?}; keeping what resolved");
    }
    out
}

/// Go's `json.MarshalIndent(m, "", "\t")` of a name → IPs map (`null` when empty, as a nil map).
fn go_indent_json(m: &BTreeMap<String, Vec<IpAddr>>) -> Bytes {
    if m.is_empty() {
        return Bytes::from_static(b"null");
    }
    let mut buf = Vec::new();
    let fmt = serde_json::ser::PrettyFormatter::with_indent(b"\t");
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
    let strings: BTreeMap<&String, Vec<String>> =
        m.iter().map(|(k, v)| (k, v.iter().map(|ip| ip.to_string()).collect())).collect();
    match serde::Serialize::serialize(&strings, &mut ser) {
        Ok(()) => Bytes::from(buf),
        Err(_) => Bytes::from_static(b"null"),
    }
}

/// Whether a client at `ip` is inside the rollout share `percent` (0.0..=1.0).
fn remote_matches_percent(ip: IpAddr, percent: f64) -> bool {
    if percent <= 0.0 {
        return false;
    }
    if percent >= 1.0 {
        return true;
    }
    if ip.is_loopback() {
        return rand::random::<f64>() < 0.5;
    }
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let digest = Sha256::digest(v6.octets());
    let n = u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8])) >> 11;
    percent > n as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_rollout_form() {
        let c = BootstrapDnsConfig::parse("a.example, b.example", "c.example/txt.example,");
        assert_eq!(c.published.len(), 2);
        assert_eq!(c.published[1].name, "b.example");
        assert_eq!(
            c.unpublished,
            vec![Entry { name: "c.example".into(), txt_name: Some("txt.example".into()) }]
        );
        assert!(BootstrapDnsConfig::parse("", "").is_empty());
    }

    #[test]
    fn json_is_gos_indent() {
        let m: BTreeMap<String, Vec<IpAddr>> =
            [("localhost".to_owned(), vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()])].into();
        assert_eq!(
            &go_indent_json(&m)[..],
            b"{\n\t\"localhost\": [\n\t\t\"127.0.0.1\",\n\t\t\"::1\"\n\t]\n}"
        );
        assert_eq!(&go_indent_json(&BTreeMap::new())[..], b"null");
    }

    #[test]
    fn query_values_decode_like_go() {
        assert_eq!(url_query_value("q=a.example&x=1", "q").as_deref(), Some("a.example"));
        assert_eq!(url_query_value("x=1&q=a%2Eb", "q").as_deref(), Some("a.b"));
        assert_eq!(url_query_value("x=1", "q"), None);
    }

    #[test]
    fn rollout_share_is_stable_per_ip() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        assert!(!remote_matches_percent(ip, 0.0));
        assert!(remote_matches_percent(ip, 1.0));
        let first = remote_matches_percent(ip, 0.5);
        assert!((0..20).all(|_| remote_matches_percent(ip, 0.5) == first));
        let admitted = (0..1000u32)
            .filter(|i| remote_matches_percent(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), 0.3))
            .count();
        assert!((200..400).contains(&admitted), "{admitted}");
    }
}
