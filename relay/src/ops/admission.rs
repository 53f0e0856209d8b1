//! Client admission (spec §2.7): a node-key allowlist file and derper's `-verify-client-url`
//! admission controller, plugged into the core as an [`AdmissionCheck`].
//!
//! The core runs the check after a client's ClientInfo opens and before it is registered; a
//! rejected client is closed without a ServerInfo. Mesh-key holders never reach the check (the
//! core skips it for them). Every configured check must admit, asked in this order: the
//! allowlist (no round trip for strangers), `-verify-clients` (tailscaled's LocalAPI,
//! [`crate::ops::verify_localapi`]), then the URL (derper asks tailscaled before the URL too).
//!
//! The URL check speaks derper's exact protocol: `POST` (no Content-Type) of
//! `{"NodePublic":"nodekey:<hex>","Source":"<client IP>"}` with a 5 s timeout; admitted only on
//! HTTP 200 whose JSON body (read up to 4 KiB) has `Allow: true` (key matched case-insensitively,
//! as Go's `encoding/json` does). Only transport errors (connect, TLS, timeout before the response
//! head) fall back to `-verify-client-url-fail-open`; a bad status or body rejects.

use std::collections::HashSet;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use derpfleet_proto::handshake::ClientInfo;
use derpfleet_proto::NodePublic;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use metrics::Counter;
use parking_lot::RwLock;

use crate::core::derp_server::{Admission, AdmissionCheck, AdmissionHook, ConnInfo};
use crate::ops::ratelimit::unmap;

/// derper's admission-controller timeout.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// derper reads at most this much of the controller's answer.
pub const VERIFY_BODY_LIMIT: usize = 4 << 10;

/// Why an allowlist file could not be loaded. The previous list stays in force.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum AllowlistError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
}

/// Parses allowlist text: one `nodekey:<64 hex>` per line; `#` starts a comment; blank lines
/// are skipped. `path` is only for error messages.
pub fn parse_allowlist(path: &Path, text: &str) -> Result<HashSet<NodePublic>, AllowlistError> {
    let mut keys = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if !line.starts_with("nodekey:") {
            return Err(AllowlistError::Line {
                path: path.to_owned(),
                line: i + 1,
                reason: format!("{line:?} is not a node key (want nodekey:<64 hex digits>)"),
            });
        }
        let key: NodePublic = line.parse().map_err(|e| AllowlistError::Line {
            path: path.to_owned(),
            line: i + 1,
            reason: format!("{line:?}: {e}"),
        })?;
        keys.insert(key);
    }
    Ok(keys)
}

/// The node keys allowed to connect, from a file reloaded at SIGHUP.
#[derive(Debug)]
pub struct Allowlist {
    path: PathBuf,
    keys: RwLock<Arc<HashSet<NodePublic>>>,
}

impl Allowlist {
    /// Loads `path`; an unreadable or malformed file is an error.
    pub fn load(path: &Path) -> Result<Self, AllowlistError> {
        let list = Self { path: path.to_owned(), keys: RwLock::new(Arc::default()) };
        list.reload()?;
        Ok(list)
    }

    /// Re-reads the file; on error the previous keys stay in force. Returns how many keys it has.
    pub fn reload(&self) -> Result<usize, AllowlistError> {
        let text = fs::read_to_string(&self.path)
            .map_err(|source| AllowlistError::Read { path: self.path.clone(), source })?;
        let keys = parse_allowlist(&self.path, &text)?;
        let n = keys.len();
        *self.keys.write() = Arc::new(keys);
        Ok(n)
    }

    /// The file it reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many keys are listed.
    pub fn len(&self) -> usize {
        self.keys.read().len()
    }

    /// True when no key is listed (nobody but mesh peers gets in).
    pub fn is_empty(&self) -> bool {
        self.keys.read().is_empty()
    }

    /// Whether `key` is listed.
    pub fn contains(&self, key: &NodePublic) -> bool {
        self.keys.read().contains(key)
    }
}

/// Why a `-verify-client-url` value is unusable.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum VerifyUrlError {
    #[error("-verify-client-url {0:?}: not a valid URL")]
    Invalid(String),
    #[error("-verify-client-url {0:?}: the scheme must be http or https")]
    Scheme(String),
}

/// A parsed admission-controller URL.
#[derive(Clone, Debug)]
pub struct VerifyUrl {
    uri: Uri,
}

impl VerifyUrl {
    /// Parses an `http://` or `https://` URL.
    pub fn parse(s: &str) -> Result<Self, VerifyUrlError> {
        let uri: Uri = s.parse().map_err(|_| VerifyUrlError::Invalid(s.to_owned()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(VerifyUrlError::Scheme(s.to_owned()));
        }
        if uri.host().is_none() {
            return Err(VerifyUrlError::Invalid(s.to_owned()));
        }
        Ok(Self { uri })
    }
}

/// What one admission-controller call decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// HTTP 200 with `Allow: true`.
    Allow,
    /// Any other answer (the reason is logged).
    Deny(String),
    /// No answer (connect/TLS error or timeout): the fail-open setting decides.
    Unreachable(String),
}

/// Asks the admission controller about `key` arriving from `source`.
pub async fn ask_controller(url: &VerifyUrl, key: &NodePublic, source: std::net::IpAddr) -> Verdict {
    let body = serde_json::json!({ "NodePublic": key.to_string(), "Source": unmap(source).to_string() });
    // http_client sends it in origin form (`POST /verify`) with the URL's Host, as Go's client does.
    let request = match Request::post(url.uri.clone()).body(Full::new(Bytes::from(body.to_string()))) {
        Ok(r) => r,
        Err(e) => return Verdict::Unreachable(format!("building the request: {e}")),
    };
    let response = match tokio::time::timeout(
        VERIFY_TIMEOUT,
        crate::ops::http_client::send(&url.uri, crate::ops::http_client::web_pki(), request),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Verdict::Unreachable(e),
        Err(_) => return Verdict::Unreachable(format!("no answer within {VERIFY_TIMEOUT:?}")),
    };
    if response.status() != StatusCode::OK {
        return Verdict::Deny(format!("admission controller answered HTTP {}", response.status()));
    }
    let mut body = response.into_body();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(VERIFY_TIMEOUT, async {
        while buf.len() < VERIFY_BODY_LIMIT {
            match body.frame().await {
                None => break,
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        let take = d.len().min(VERIFY_BODY_LIMIT - buf.len());
                        buf.extend_from_slice(&d[..take]);
                    }
                }
            }
        }
        Ok(())
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Verdict::Deny(format!("reading the answer: {e}")),
        Err(_) => return Verdict::Deny("reading the answer timed out".to_owned()),
    }
    match allow_field(&buf) {
        Ok(true) => Verdict::Allow,
        Ok(false) => Verdict::Deny(format!("admission controller: {key} not allowed")),
        Err(e) => Verdict::Deny(format!("bad answer: {e}")),
    }
}

/// Reads `Allow` from the first JSON value in `body` (Go decodes one value and ignores the rest;
/// field names match case-insensitively; a missing field is false).
fn allow_field(body: &[u8]) -> Result<bool, String> {
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>();
    let value = match values.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("empty body".to_owned()),
    };
    let obj = value.as_object().ok_or("not a JSON object")?;
    let mut allow = false;
    for (k, v) in obj {
        if k.eq_ignore_ascii_case("allow") {
            allow = v.as_bool().ok_or("Allow is not a boolean")?;
        }
    }
    Ok(allow)
}

/// Counters of admission decisions (`derp_admission{result}`).
#[derive(Clone)]
pub struct AdmissionMetrics {
    /// Admitted by every configured check.
    pub allowed: Counter,
    /// Rejected (not on the allowlist, or the controller said no).
    pub rejected: Counter,
    /// Controller unreachable, admitted because fail-open is on.
    pub fail_open: Counter,
    /// Controller unreachable, rejected because fail-open is off.
    pub fail_closed: Counter,
}

impl AdmissionMetrics {
    /// Handles that count nothing.
    pub fn noop() -> Self {
        Self {
            allowed: Counter::noop(),
            rejected: Counter::noop(),
            fail_open: Counter::noop(),
            fail_closed: Counter::noop(),
        }
    }
}

/// The relay's admission policy.
pub struct Admitter {
    allowlist: Option<Arc<Allowlist>>,
    /// `-verify-clients`: asked after the allowlist, before the URL (derper's order).
    localapi: Option<Arc<crate::ops::verify_localapi::LocalApiVerifier>>,
    verify_url: Option<VerifyUrl>,
    fail_open: bool,
    metrics: AdmissionMetrics,
}

impl Admitter {
    /// A policy; with neither an allowlist nor a URL everyone is admitted.
    pub fn new(
        allowlist: Option<Arc<Allowlist>>,
        verify_url: Option<VerifyUrl>,
        fail_open: bool,
        metrics: AdmissionMetrics,
    ) -> Self {
        Self { allowlist, localapi: None, verify_url, fail_open, metrics }
    }

    /// Adds the `-verify-clients` check (tailscaled's LocalAPI).
    pub fn with_localapi(mut self, v: Option<Arc<crate::ops::verify_localapi::LocalApiVerifier>>) -> Self {
        self.localapi = v;
        self
    }

    /// True when some check is configured.
    pub fn is_active(&self) -> bool {
        self.allowlist.is_some() || self.localapi.is_some() || self.verify_url.is_some()
    }

    /// The core hook for this policy.
    pub fn into_hook(self) -> AdmissionHook {
        AdmissionHook(Arc::new(self))
    }

    /// Decides on `key` from `source`.
    pub async fn decide(&self, key: NodePublic, source: std::net::IpAddr) -> Admission {
        if let Some(list) = &self.allowlist {
            if !list.contains(&key) {
                self.metrics.rejected.increment(1);
                return Admission::Reject(format!("{key} is not in {}", list.path().display()));
            }
        }
        if let Some(localapi) = &self.localapi {
            if let crate::ops::verify_localapi::Decision::Deny(why) = localapi.decide(&key).await {
                self.metrics.rejected.increment(1);
                return Admission::Reject(why);
            }
        }
        if let Some(url) = &self.verify_url {
            match ask_controller(url, &key, source).await {
                Verdict::Allow => {}
                Verdict::Deny(why) => {
                    self.metrics.rejected.increment(1);
                    return Admission::Reject(why);
                }
                Verdict::Unreachable(why) if self.fail_open => {
                    self.metrics.fail_open.increment(1);
                    tracing::warn!(key = %key.short(), "admission controller unreachable ({why}); failing open");
                }
                Verdict::Unreachable(why) => {
                    self.metrics.fail_closed.increment(1);
                    return Admission::Reject(format!("admission controller unreachable: {why}"));
                }
            }
        }
        self.metrics.allowed.increment(1);
        Admission::Allow
    }
}

impl AdmissionCheck for Admitter {
    fn check<'a>(
        &'a self,
        key: NodePublic,
        _info: &'a ClientInfo,
        conn: &'a ConnInfo,
    ) -> Pin<Box<dyn Future<Output = Admission> + Send + 'a>> {
        Box::pin(async move {
            let verdict = self.decide(key, conn.remote.ip()).await;
            if let Admission::Reject(why) = &verdict {
                tracing::info!(key = %key.short(), remote = %conn.remote, "client rejected: {why}");
            }
            verdict
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowlist_parsing() {
        let k = derpfleet_proto::NodePrivate::generate().public();
        let text = format!("# friends\n\n{k}  # laptop\n  {k}\n");
        let keys = parse_allowlist(Path::new("a.txt"), &text).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys.contains(&k));
        let e = parse_allowlist(Path::new("a.txt"), "# x\nnodekey:zz\n").unwrap_err().to_string();
        assert!(e.starts_with("a.txt:2:"), "{e}");
        let e = parse_allowlist(Path::new("a.txt"), &k.to_hex()).unwrap_err().to_string();
        assert!(e.contains("a.txt:1") && e.contains("nodekey:"), "{e}");
    }

    #[test]
    fn allow_field_like_go() {
        assert_eq!(allow_field(br#"{"Allow":true}"#), Ok(true));
        assert_eq!(allow_field(br#"{"allow":true} trailing"#), Ok(true));
        assert_eq!(allow_field(br#"{"Allow":false}"#), Ok(false));
        assert_eq!(allow_field(br#"{}"#), Ok(false));
        assert!(allow_field(br#"{"Allow":"yes"}"#).is_err());
        assert!(allow_field(b"").is_err());
        assert!(allow_field(b"[1]").is_err());
    }

    #[test]
    fn verify_urls() {
        let u = VerifyUrl::parse("http://127.0.0.1:8080/verify").unwrap();
        assert_eq!(
            (u.uri.host(), u.uri.port_u16(), u.uri.scheme_str()),
            (Some("127.0.0.1"), Some(8080), Some("http"))
        );
        let u = VerifyUrl::parse("https://[::1]/verify").unwrap();
        assert_eq!((u.uri.host(), u.uri.scheme_str()), (Some("[::1]"), Some("https")));
        assert!(VerifyUrl::parse("http:///verify").is_err());
        assert!(VerifyUrl::parse("ftp://x/").is_err());
        assert!(VerifyUrl::parse("not a url").is_err());
    }
}
