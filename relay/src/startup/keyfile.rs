//! derper's `-c` key file: JSON `{"PrivateKey":"privkey:<64 hex>"}`.
//!
//! Kept byte-compatible with derper so an existing `/var/lib/derper/derper.key` keeps the
//! server's identity (and so the DERP map's pinned key) when switching to derpfleet.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use derpfleet_proto::NodePrivate;
use serde::{Deserialize, Serialize};

/// Failure to load or create a key file. Every variant names the file.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("key file {path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("key file {path}: not valid JSON of the form {{\"PrivateKey\":\"privkey:<hex>\"}}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("key file {path}: field \"PrivateKey\": {reason}")]
    Field { path: PathBuf, reason: String },
    #[error("key file {path}: cannot write: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

#[derive(Serialize, Deserialize)]
struct KeyFileJson {
    #[serde(rename = "PrivateKey", default)]
    private_key: String,
}

/// Loads the key from `path`, or creates the file (mode 0600, parent directories as needed)
/// with a fresh key when it does not exist. Returns the key and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(NodePrivate, bool), KeyFileError> {
    match fs::read(path) {
        Ok(bytes) => Ok((parse(path, &bytes)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = NodePrivate::generate();
            write_atomically(path, &key)?;
            Ok((key, true))
        }
        Err(source) => Err(KeyFileError::Read { path: path.to_owned(), source }),
    }
}

/// Parses the contents of a key file (`path` is only used in error messages).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<NodePrivate, KeyFileError> {
    let json: KeyFileJson = serde_json::from_slice(bytes)
        .map_err(|source| KeyFileError::Json { path: path.to_owned(), source })?;
    if json.private_key.is_empty() {
        return Err(KeyFileError::Field { path: path.to_owned(), reason: "missing or empty".into() });
    }
    json.private_key
        .parse::<NodePrivate>()
        .map_err(|e| KeyFileError::Field { path: path.to_owned(), reason: e.to_string() })
}

/// Writes `key` to `path` via a temporary file in the same directory and a rename, so a crash
/// never leaves a truncated key file behind. The file is created with mode 0600.
pub fn write_atomically(path: &Path, key: &NodePrivate) -> Result<(), KeyFileError> {
    let err = |source| KeyFileError::Write { path: path.to_owned(), source };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(err)?;
    let body = serde_json::to_vec_pretty(&KeyFileJson { private_key: key.to_text() })
        .expect("serializing a string field cannot fail");
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        // The mode above is filtered by the umask; make sure it is exactly 0600.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(&body)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("derpfleet-keyfile-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn creates_then_loads_the_same_key_with_mode_0600() {
        let dir = temp_dir("create");
        let path = dir.join("sub/derper.key");
        let (k1, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"PrivateKey\": \"privkey:"), "{text}");
        let (k2, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(k1.public(), k2.public());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_derper_format() {
        let hex = "11".repeat(32);
        let body = format!("{{\n\t\"PrivateKey\": \"privkey:{hex}\"\n}}");
        let key = parse(Path::new("x.key"), body.as_bytes()).unwrap();
        assert_eq!(key.public().to_hex(), "7b4e909bbe7ffe44c465a220037d608ee35897d31ef972f07f74892cb0f73f13");
    }

    #[test]
    fn bad_files_name_the_file_and_field() {
        let p = Path::new("/etc/derper.key");
        let e = parse(p, b"not json").unwrap_err().to_string();
        assert!(e.contains("/etc/derper.key") && e.contains("JSON"), "{e}");
        let e = parse(p, b"{}").unwrap_err().to_string();
        assert!(e.contains("/etc/derper.key") && e.contains("PrivateKey"), "{e}");
        let e = parse(p, br#"{"PrivateKey":"privkey:zz"}"#).unwrap_err().to_string();
        assert!(e.contains("PrivateKey"), "{e}");
    }
}
