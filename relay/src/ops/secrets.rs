//! `-secrets-url`: the mesh key from setec (Tailscale's secrets service), as derper gets it.
//!
//! derper declares one secret, `<-secrets-path-prefix>/meshkey` (default `prod/derp/meshkey`),
//! in a setec store with a file cache at `-secrets-cache-dir`, reads its value once at start and
//! uses it as the mesh key (64 hex characters, as a `-mesh-psk-file`). This follows setec's
//! public client protocol and store behaviour:
//! - the cache is read first: if it holds the secret, that value is used and the server is not
//!   asked (so a relay restarts while setec is down);
//! - otherwise `POST <url>/api/get` with `Content-Type: application/json`,
//!   `Sec-X-Tailscale-No-Browsers: setec` and `{"Name":…,"Version":0,"UpdateIfChanged":false}`;
//!   200 carries `{"Value":"<base64>","Version":N}`; 403 is "access denied", 404 "not found". A
//!   failure is logged and retried with setec's gentle backoff (1 ms doubling to 4 s) until it
//!   works, as setec's `NewStore` does (the start blocks meanwhile; SIGTERM still ends it);
//! - the fetched value is written back to the cache in setec's format
//!   (`{"<name>":{"secret":{"Value":…,"Version":N},"lastAccess":"<unix>"}}`, mode 0600).
//!
//! Decision: despite the flag's name, derper hands `-secrets-cache-dir` to setec's `FileCache`,
//! which keeps the cache in *one file at that path*; so does this relay, so an existing derper
//! cache is reused. `https://` servers are verified against the Web PKI roots.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};

/// The secret name under the prefix (derper's `setecMeshKeyName`).
pub(crate) const MESH_KEY_NAME: &str = "meshkey";
/// setec's backoff ceiling between retries.
const MAX_RETRY_WAIT: Duration = Duration::from_millis(4096);
/// One request's bound.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of an answer read.
const BODY_LIMIT: usize = 1 << 20;

/// Where and what to fetch.
#[derive(Clone, Debug)]
pub(crate) struct SecretsConfig {
    /// `-secrets-url`.
    pub url: String,
    /// `-secrets-path-prefix`.
    pub path_prefix: String,
    /// `-secrets-cache-dir` (a file, see the module docs).
    pub cache_path: PathBuf,
}

impl SecretsConfig {
    /// The mesh key's secret name, `<prefix>/meshkey` (Go's `path.Join`).
    pub(crate) fn mesh_key_name(&self) -> String {
        let prefix = self.path_prefix.trim_end_matches('/');
        if prefix.is_empty() {
            MESH_KEY_NAME.to_owned()
        } else {
            format!("{prefix}/{MESH_KEY_NAME}")
        }
    }
}

/// derper's default cache location, `$HOME/.cache/derper-secrets`.
pub(crate) fn default_cache_path() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("derper-secrets")
}

/// Why the secret could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("-secrets-url {0:?}: not an http:// or https:// URL")]
    Url(String),
    #[error("-secrets-cache-dir {path}: {reason}")]
    Cache { path: PathBuf, reason: String },
    #[error("setec secret {name:?} is not valid UTF-8 text")]
    NotText { name: String },
}

/// One failed fetch (retried).
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("access denied")]
    AccessDenied,
    #[error("secret not found")]
    NotFound,
    #[error("request returned status {0}: {1:?}")]
    Status(u16, String),
    #[error("{0}")]
    Transport(String),
    #[error("unmarshaling response: {0}")]
    Json(String),
}

/// A secret value and its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SecretValue {
    /// The bytes.
    pub value: Vec<u8>,
    /// setec's version number.
    pub version: u64,
}

/// Gets the mesh key text from the cache or setec, blocking until it has it (see the module
/// docs). Runs on its own thread so it can be called from inside the relay's runtime.
pub(crate) fn mesh_key_blocking(settings: &SecretsConfig) -> Result<String, SecretsError> {
    let settings = settings.clone();
    let worker = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SecretsError::Cache { path: settings.cache_path.clone(), reason: e.to_string() })?;
        rt.block_on(mesh_key(&settings))
    });
    worker.join().unwrap_or_else(|_| Err(SecretsError::Url("the setec fetch thread failed".to_owned())))
}

/// [`mesh_key_blocking`], async.
pub(crate) async fn mesh_key(settings: &SecretsConfig) -> Result<String, SecretsError> {
    let uri: Uri = settings.url.parse().map_err(|_| SecretsError::Url(settings.url.clone()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(SecretsError::Url(settings.url.clone()));
    }
    let name = settings.mesh_key_name();
    prepare_cache(&settings.cache_path)?;
    let secret = match read_cache(&settings.cache_path, &name) {
        Some(s) => {
            tracing::info!("setec: {name:?} from the cache {}", settings.cache_path.display());
            s
        }
        None => {
            let mut wait = Duration::from_millis(1);
            let s = loop {
                match get(&settings.url, &name).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::warn!("setec: fetching {name:?} from {}: {e} (retrying)", settings.url)
                    }
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(MAX_RETRY_WAIT);
            };
            if let Err(e) = write_cache(&settings.cache_path, &name, &s) {
                tracing::warn!("setec: writing the cache {}: {e}", settings.cache_path.display());
            }
            s
        }
    };
    String::from_utf8(secret.value).map_err(|_| SecretsError::NotText { name })
}

/// setec's `NewFileCache`: the parent directory is created (0700); the path must not be anything
/// but a regular file.
fn prepare_cache(path: &Path) -> Result<(), SecretsError> {
    let err = |reason: String| SecretsError::Cache { path: path.to_owned(), reason };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| err(format!("creating {}: {e}", parent.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_file() => {
            Err(err("exists and is not a regular file (setec keeps its cache in one file)".to_owned()))
        }
        _ => Ok(()),
    }
}

/// The cached value of `name`, if the cache file holds a valid one.
fn read_cache(path: &Path, name: &str) -> Option<SecretValue> {
    let text = std::fs::read(path).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| {
            tracing::warn!("setec: the cache {} is not valid JSON ({e}); ignoring it", path.display())
        })
        .ok()?;
    secret_from_json(v.get(name)?.get("secret")?)
}

fn secret_from_json(v: &serde_json::Value) -> Option<SecretValue> {
    let value = base64::engine::general_purpose::STANDARD.decode(v.get("Value")?.as_str()?).ok()?;
    let version = v.get("Version").and_then(|n| n.as_u64()).unwrap_or(0);
    Some(SecretValue { value, version })
}

fn write_cache(path: &Path, name: &str, s: &SecretValue) -> std::io::Result<()> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let body = serde_json::json!({
        name: {
            "secret": {
                "Value": base64::engine::general_purpose::STANDARD.encode(&s.value),
                "Version": s.version,
            },
            "lastAccess": now.to_string(),
        }
    });
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(body.to_string().as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// setec's `Client.Get`: the active version of `name`.
pub(crate) async fn get(server: &str, name: &str) -> Result<SecretValue, FetchError> {
    let url = format!("{}/api/get", server.trim_end_matches('/'));
    let uri: Uri = url.parse().map_err(|e| FetchError::Transport(format!("bad URL {url:?}: {e}")))?;
    let body = serde_json::json!({ "Name": name, "Version": 0, "UpdateIfChanged": false }).to_string();
    let request = Request::post(uri.path_and_query().map_or("/api/get", |p| p.as_str()))
        .header(http::header::HOST, uri.authority().map_or("", |a| a.as_str()))
        .header(http::header::CONTENT_TYPE, "application/json")
        .header("Sec-X-Tailscale-No-Browsers", "setec")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| FetchError::Transport(e.to_string()))?;
    let exchange = async {
        let (status, body) = send(&uri, request).await?;
        match status {
            StatusCode::OK => {}
            StatusCode::FORBIDDEN => return Err(FetchError::AccessDenied),
            StatusCode::NOT_FOUND => return Err(FetchError::NotFound),
            other => {
                return Err(FetchError::Status(
                    other.as_u16(),
                    String::from_utf8_lossy(&body).trim().to_owned(),
                ))
            }
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| FetchError::Json(e.to_string()))?;
        secret_from_json(&v).ok_or_else(|| FetchError::Json("no base64 Value".to_owned()))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(FetchError::Transport(format!("no answer within {REQUEST_TIMEOUT:?}"))))
}

/// One request to setec; the answer's status and body (up to [`BODY_LIMIT`]).
async fn send(uri: &Uri, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes), FetchError> {
    let transport = |e: String| FetchError::Transport(format!("making HTTP request: {e}"));
    let response = crate::ops::http_client::send(uri, crate::ops::http_client::web_pki(), request)
        .await
        .map_err(transport)?;
    let status = response.status();
    let body = Limited::new(response.into_body(), BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| FetchError::Transport(format!("reading the answer: {e}")))?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_join_like_go_path_join() {
        let s =
            |p: &str| SecretsConfig { url: String::new(), path_prefix: p.into(), cache_path: PathBuf::new() };
        assert_eq!(s("prod/derp").mesh_key_name(), "prod/derp/meshkey");
        assert_eq!(s("prod/derp/").mesh_key_name(), "prod/derp/meshkey");
        assert_eq!(s("").mesh_key_name(), "meshkey");
    }

    #[test]
    fn cache_round_trip_in_setecs_format() {
        let dir = std::env::temp_dir().join(format!("derpfleet-setec-{}", std::process::id()));
        let path = dir.join("derper-secrets");
        prepare_cache(&path).unwrap();
        let s = SecretValue { value: b"abc".to_vec(), version: 3 };
        write_cache(&path, "prod/derp/meshkey", &s).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["prod/derp/meshkey"]["secret"]["Value"], "YWJj");
        assert!(v["prod/derp/meshkey"]["lastAccess"].is_string());
        assert_eq!(read_cache(&path, "prod/derp/meshkey"), Some(s));
        assert_eq!(read_cache(&path, "other"), None);
        std::fs::create_dir_all(dir.join("a-dir")).unwrap();
        assert!(prepare_cache(&dir.join("a-dir")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
