//! The TOML configuration file (`-config FILE`): every command-line flag, by the same name.
//!
//! Keys are the flag names without the dash (`a`, `stun-port`, `verify-client-url`…); `_` may be
//! written for `-` (`stun_port`). Values are TOML strings, integers, floats, booleans, or (for
//! list flags such as `mesh-with`) arrays of strings, joined with commas. Durations are strings in
//! Go syntax (`"10m"`). Flags on the command line override the file.
//!
//! How: each key/value becomes `--key=value` in front of the real command line, and the whole is
//! parsed by the same clap definition as the flags (so the file cannot drift from `--help`, and
//! the last occurrence wins). Each pair is first parsed on its own, so an unknown key or a bad
//! value is reported with the file, its line, the key and clap's reason.

use std::fs;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use toml::Spanned;

use crate::startup::cli::Flags;

/// Flags that make no sense in the file.
const NOT_IN_FILE: &[&str] = &["help", "version", "config"];

/// Why the configuration file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}, line {line}, key {key:?}: {reason}")]
    Key { path: PathBuf, line: usize, key: String, reason: String },
}

/// Reads `path` and turns it into `--key=value` arguments.
pub fn load_args(path: &Path) -> Result<Vec<String>, ConfigError> {
    let text =
        fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    args_from_toml(path, &text)
}

/// Turns TOML text into `--key=value` arguments, checking every key and value against the flags.
pub fn args_from_toml(path: &Path, text: &str) -> Result<Vec<String>, ConfigError> {
    type Entries = Vec<(Spanned<String>, Spanned<toml::Value>)>;
    let table: toml::map::Map<String, toml::Value> = toml::from_str(text).map_err(|e| {
        ConfigError::Syntax { path: path.to_owned(), message: e.to_string().trim().to_owned() }
    })?;
    // Parse again keeping spans (the map above checked the syntax and duplicate keys).
    let spanned: std::collections::BTreeMap<Spanned<String>, Spanned<toml::Value>> = toml::from_str(text)
        .map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim().to_owned(),
        })?;
    let mut entries: Entries = spanned.into_iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    debug_assert_eq!(entries.len(), table.len());
    let command = Flags::command();
    let mut args = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let line = line_of(text, key.span().start);
        let name = key.get_ref().replace('_', "-");
        let err = |reason: String| ConfigError::Key {
            path: path.to_owned(),
            line,
            key: key.get_ref().clone(),
            reason,
        };
        let known = command.get_arguments().any(|a| a.get_long() == Some(name.as_str()));
        if !known || NOT_IN_FILE.contains(&name.as_str()) {
            return Err(err("unknown key (the keys are the flag names shown by --help)".to_owned()));
        }
        let value = value_text(value.get_ref()).map_err(err)?;
        let arg = format!("--{name}={value}");
        if let Err(e) = Flags::try_parse_from(["derpfleet-relay", arg.as_str()]) {
            return Err(err(clap_reason(&e)));
        }
        args.push(arg);
    }
    Ok(args)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(1, |t| t.matches('\n').count() + 1)
}

fn value_text(v: &toml::Value) -> Result<String, String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) if f.is_infinite() && *f > 0.0 => "+Inf".to_owned(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                toml::Value::String(s) => Ok(s.clone()),
                _ => Err("list items must be strings".to_owned()),
            })
            .collect::<Result<Vec<_>, _>>()?
            .join(","),
        toml::Value::Datetime(_) => return Err("a date is not a valid value here".to_owned()),
        toml::Value::Table(_) => {
            return Err("a table is not a valid value here (use top-level keys)".to_owned())
        }
    })
}

/// clap's message without its `error: ` prefix and usage footer.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid value").trim();
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

/// The `-config` value on a command line (after Go-flag normalisation), if any.
pub fn config_arg(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--" {
            return None;
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_become_flags() {
        let text = "a = \":8443\"\nstun_port = 3479\nstun = false\naccept-connection-limit = 2.5\n\
                    tcp-write-timeout = \"0\"\n";
        let args = args_from_toml(Path::new("r.toml"), text).unwrap();
        assert_eq!(
            args,
            [
                "--a=:8443",
                "--stun-port=3479",
                "--stun=false",
                "--accept-connection-limit=2.5",
                "--tcp-write-timeout=0"
            ]
        );
    }

    #[test]
    fn errors_name_file_line_key_and_reason() {
        let e = args_from_toml(Path::new("r.toml"), "a = \":1\"\n\nstun-port = \"many\"\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("r.toml") && s.contains("line 3") && s.contains("stun-port"), "{s}");
        assert!(s.contains("many"), "{s}");
        let s = args_from_toml(Path::new("r.toml"), "nope = 1\n").unwrap_err().to_string();
        assert!(s.contains("line 1") && s.contains("nope") && s.contains("unknown key"), "{s}");
        let s = args_from_toml(Path::new("r.toml"), "help = true\n").unwrap_err().to_string();
        assert!(s.contains("unknown key"), "{s}");
        let s = args_from_toml(Path::new("r.toml"), "a = [\n").unwrap_err().to_string();
        assert!(s.contains("r.toml") && s.contains("line"), "{s}");
        let s = args_from_toml(Path::new("r.toml"), "[table]\nx = 1\n").unwrap_err().to_string();
        assert!(s.contains("table"), "{s}");
    }

    #[test]
    fn config_flag_is_found() {
        let a = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(config_arg(&a(&["x", "--config=/a.toml"])), Some(PathBuf::from("/a.toml")));
        assert_eq!(config_arg(&a(&["x", "--dev", "--config", "b.toml"])), Some(PathBuf::from("b.toml")));
        assert_eq!(config_arg(&a(&["x", "--dev"])), None);
    }
}
