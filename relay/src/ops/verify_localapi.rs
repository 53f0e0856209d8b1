//! `-verify-clients`: admission through the local tailscaled's LocalAPI, as derper does it.
//!
//! For each new non-mesh client the relay asks tailscaled, over its unix socket (`-socket`,
//! default [`DEFAULT_SOCKET`]), `GET /localapi/v0/whois?addr=nodekey%3A<hex>` with the host
//! `local-tailscaled.sock` (what tailscale's `client/local` sends). The answer decides:
//! - 200 (a WhoIsResponse): the key is a node of this tailnet, admitted;
//! - 404: refused, "not found in local tailscaled";
//! - anything else (socket missing, 403 access denied, 500, a timeout) refuses, and the reason
//!   is logged; an answer naming `invalid 'addr' parameter` means tailscaled predates node-key
//!   lookups, reported as "tailscaled version is too old", as derper does.
//!
//! Decisions where derper is silent (it asks on every connection and caches nothing):
//! - Definite answers (200, 404) are cached for [`CACHE_TTL`] per key, so a reconnect storm does
//!   not queue thousands of requests on tailscaled; errors are never cached. Hits and misses are
//!   counted (`derp_verify_clients_cache{result}`), decisions too (`derp_verify_clients{result}`).
//! - The most recent result of up to [`RESULT_TABLE_CAP`] keys is published in `/metrics` as
//!   `derp_verify_clients_key_result{key,result} 1` (bounded; the oldest entry is dropped first).
//! - Each question has [`LOCALAPI_TIMEOUT`] (derper bounds it only by the handshake).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use derpfleet_proto::NodePublic;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use metrics::Counter;
use parking_lot::Mutex;
use tokio::net::UnixStream;

/// tailscaled's socket on Linux (`paths.DefaultTailscaledSocket`).
pub(crate) const DEFAULT_SOCKET: &str = "/var/run/tailscale/tailscaled.sock";
/// The host name tailscale's LocalAPI client puts in every request.
pub(crate) const LOCALAPI_HOST: &str = "local-tailscaled.sock";
/// How long one whois question may take (connect, request, answer).
pub(crate) const LOCALAPI_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a definite answer (known / unknown key) is reused.
pub(crate) const CACHE_TTL: Duration = Duration::from_secs(10);
/// How many keys' last results are remembered (cache and `/metrics` table).
pub(crate) const RESULT_TABLE_CAP: usize = 1024;
/// The most of an answer body read (a WhoIsResponse is a few KiB).
const BODY_LIMIT: usize = 256 << 10;

/// What tailscaled said about one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum WhoIs {
    /// 200: a node of the tailnet.
    Known,
    /// 404: not a node tailscaled knows.
    NotFound,
    /// No usable answer (the reason, worded like tailscale's client).
    Failed(String),
}

/// What a whois question turned into, for the admission decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Admit.
    Allow,
    /// Refuse, with the sentence to log.
    Deny(String),
}

/// Counters of `-verify-clients`.
#[derive(Clone)]
pub struct LocalApiMetrics {
    /// Answers taken from the cache.
    pub cache_hit: Counter,
    /// Questions sent to tailscaled.
    pub cache_miss: Counter,
    /// Keys tailscaled knows (admitted).
    pub allowed: Counter,
    /// Keys tailscaled does not know (refused).
    pub not_found: Counter,
    /// No usable answer (refused).
    pub error: Counter,
}

impl LocalApiMetrics {
    /// Handles that count nothing.
    pub fn noop() -> Self {
        Self {
            cache_hit: Counter::noop(),
            cache_miss: Counter::noop(),
            allowed: Counter::noop(),
            not_found: Counter::noop(),
            error: Counter::noop(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Allowed,
    NotFound,
    Error,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::NotFound => "not_found",
            Self::Error => "error",
        }
    }
}

/// The `-verify-clients` check: a LocalAPI client with a short cache.
pub struct LocalApiVerifier {
    socket: PathBuf,
    metrics: LocalApiMetrics,
    results: Mutex<HashMap<NodePublic, (Outcome, Instant)>>,
}

impl std::fmt::Debug for LocalApiVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalApiVerifier").field("socket", &self.socket).finish_non_exhaustive()
    }
}

impl LocalApiVerifier {
    /// A verifier asking tailscaled on `socket` (empty = [`DEFAULT_SOCKET`]).
    pub fn new(socket: &str, metrics: LocalApiMetrics) -> Self {
        let socket = if socket.is_empty() { DEFAULT_SOCKET } else { socket };
        Self { socket: PathBuf::from(socket), metrics, results: Mutex::new(HashMap::new()) }
    }

    /// The socket asked.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Decides on `key`: from the cache if a definite answer is fresh, else by asking tailscaled.
    pub async fn decide(&self, key: &NodePublic) -> Decision {
        let cached = self.results.lock().get(key).copied();
        let outcome = match cached {
            Some((o, at)) if o != Outcome::Error && at.elapsed() < CACHE_TTL => {
                self.metrics.cache_hit.increment(1);
                return decision(o, key, None);
            }
            _ => {
                self.metrics.cache_miss.increment(1);
                whois_node_key(&self.socket, key).await
            }
        };
        let (o, why) = match outcome {
            WhoIs::Known => (Outcome::Allowed, None),
            WhoIs::NotFound => (Outcome::NotFound, None),
            WhoIs::Failed(e) => (Outcome::Error, Some(e)),
        };
        match o {
            Outcome::Allowed => self.metrics.allowed.increment(1),
            Outcome::NotFound => self.metrics.not_found.increment(1),
            Outcome::Error => self.metrics.error.increment(1),
        }
        self.remember(*key, o);
        decision(o, key, why)
    }

    fn remember(&self, key: NodePublic, outcome: Outcome) {
        let mut results = self.results.lock();
        if results.len() >= RESULT_TABLE_CAP && !results.contains_key(&key) {
            if let Some(oldest) = results.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                results.remove(&oldest);
            }
        }
        results.insert(key, (outcome, Instant::now()));
    }

    /// The per-key table for `/metrics` (Prometheus text).
    pub fn render_key_results(&self) -> String {
        let results = self.results.lock();
        let mut out = String::new();
        if results.is_empty() {
            return out;
        }
        out.push_str(
            "# HELP derp_verify_clients_key_result Last -verify-clients result per node key (recent keys)\n\
             # TYPE derp_verify_clients_key_result gauge\n",
        );
        let mut rows: Vec<_> = results.iter().map(|(k, (o, _))| (k.to_string(), o.label())).collect();
        rows.sort();
        for (key, result) in rows {
            let _ = writeln!(out, "derp_verify_clients_key_result{{key=\"{key}\",result=\"{result}\"}} 1");
        }
        out
    }
}

fn decision(outcome: Outcome, key: &NodePublic, why: Option<String>) -> Decision {
    match outcome {
        Outcome::Allowed => Decision::Allow,
        Outcome::NotFound => {
            Decision::Deny(format!("peer {key} not authorized (not found in local tailscaled)"))
        }
        Outcome::Error => {
            let why = why.unwrap_or_default();
            if why.contains("invalid 'addr' parameter") {
                Decision::Deny("tailscaled version is too old (out of sync with derper binary)".to_owned())
            } else {
                Decision::Deny(format!("failed to query local tailscaled status for {key}: {why}"))
            }
        }
    }
}

/// The request target for a node-key whois (the `:` escaped, as Go's `url.QueryEscape`).
pub(crate) fn whois_target(key: &NodePublic) -> String {
    format!("/localapi/v0/whois?addr=nodekey%3A{}", key.to_hex())
}

/// Asks tailscaled on `socket` whether it knows `key`, within [`LOCALAPI_TIMEOUT`].
pub(crate) async fn whois_node_key(socket: &Path, key: &NodePublic) -> WhoIs {
    match tokio::time::timeout(LOCALAPI_TIMEOUT, ask(socket, key)).await {
        Ok(answer) => answer,
        Err(_) => WhoIs::Failed(format!("no answer from {} within {LOCALAPI_TIMEOUT:?}", socket.display())),
    }
}

async fn ask(socket: &Path, key: &NodePublic) -> WhoIs {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        Err(e) => {
            return WhoIs::Failed(format!(
                "Failed to connect to local Tailscale daemon for /localapi/v0/whois; is tailscaled \
                 running? Error: dial unix {}: {e}",
                socket.display()
            ))
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => return WhoIs::Failed(format!("LocalAPI HTTP handshake: {e}")),
    };
    let conn = tokio::spawn(conn);
    let request = Request::get(whois_target(key))
        .header(http::header::HOST, LOCALAPI_HOST)
        .body(Empty::<Bytes>::new())
        .expect("static request parts are valid");
    let answer = match sender.send_request(request).await {
        Ok(r) => r,
        Err(e) => return WhoIs::Failed(format!("LocalAPI request: {e}")),
    };
    let status = answer.status();
    let body = match Limited::new(answer.into_body(), BODY_LIMIT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return WhoIs::Failed(format!("reading the LocalAPI answer: {e}")),
    };
    conn.abort();
    classify(status, &body)
}

/// Turns a LocalAPI answer into [`WhoIs`], as tailscale's `client/local` reads it.
pub(crate) fn classify(status: StatusCode, body: &[u8]) -> WhoIs {
    match status {
        StatusCode::OK => match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) if v.is_object() => WhoIs::Known,
            _ => WhoIs::Failed("failed to unmarshal the WhoIsResponse JSON".to_owned()),
        },
        StatusCode::NOT_FOUND => WhoIs::NotFound,
        StatusCode::FORBIDDEN => WhoIs::Failed(format!("Access denied: {}", error_message(body))),
        other => WhoIs::Failed(format!("{other}: {}", error_message(body))),
    }
}

/// `{"error":"…"}` (any case) if the body is that, else its trimmed text.
fn error_message(body: &[u8]) -> String {
    if let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice(body) {
        for (k, v) in obj {
            if k.eq_ignore_ascii_case("error") {
                if let Some(s) = v.as_str().filter(|s| !s.is_empty()) {
                    return s.to_owned();
                }
            }
        }
    }
    String::from_utf8_lossy(body).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_classified_like_tailscales_client() {
        assert_eq!(classify(StatusCode::OK, br#"{"Node":{},"UserProfile":{}}"#), WhoIs::Known);
        assert_eq!(classify(StatusCode::NOT_FOUND, b"no match for IP:port\n"), WhoIs::NotFound);
        assert_eq!(
            classify(StatusCode::FORBIDDEN, b"whois access denied\n"),
            WhoIs::Failed("Access denied: whois access denied".into())
        );
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, b"invalid 'addr' parameter\n"),
            WhoIs::Failed("400 Bad Request: invalid 'addr' parameter".into())
        );
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, br#"{"error":"boom"}"#),
            WhoIs::Failed("500 Internal Server Error: boom".into())
        );
        assert!(matches!(classify(StatusCode::OK, b"not json"), WhoIs::Failed(_)));
    }

    #[test]
    fn old_tailscaled_is_named() {
        let k = derpfleet_proto::NodePrivate::generate().public();
        let d = decision(Outcome::Error, &k, Some("400 Bad Request: invalid 'addr' parameter".into()));
        assert_eq!(
            d,
            Decision::Deny("tailscaled version is too old (out of sync with derper binary)".into())
        );
        assert!(whois_target(&k).starts_with("/localapi/v0/whois?addr=nodekey%3A"));
    }
}
