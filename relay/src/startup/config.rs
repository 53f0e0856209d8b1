//! The TOML configuration file (`-config FILE`): every command-line flag, by the same name.
//!
//! Keys are the flag names without the dash (`a`, `stun-port`, `verify-client-url`…); `_` may be
//! written for `-` (`stun_port`). Each value must have the TOML type of its flag: integers for
//! `int` flags (`stun-port = 3478`, not `"3478"`), booleans for `bool` flags, numbers for `float`
//! flags (or the string `"+Inf"` that `--help` shows), strings for everything else (durations in
//! Go syntax, `"10m"`); list flags (`mesh-with`) also take an array of strings, joined with
//! commas. A value of the wrong type is an error, not a conversion. Flags on the command line
//! override the file.
//!
//! How: each key/value becomes `--key=value` in front of the real command line, and the whole is
//! parsed by the same clap definition as the flags (so the file cannot drift from `--help`, and
//! the last occurrence wins). Each pair is first parsed on its own, so an unknown key or a bad
//! value is reported with the file, its line, the key and clap's reason.

use std::fs;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use toml::Spanned;

use crate::startup::flags::Flags;

/// Flags that make no sense in the file.
const NOT_IN_FILE: &[&str] = &["help", "version", "config"];

/// Flags whose value is a comma-separated list (an array of strings is accepted for them).
const LIST_FLAGS: &[&str] = &[
    "mesh-with",
    "proxy-protocol-trusted",
    "forwarded-trusted",
    "bootstrap-dns-names",
    "unpublished-bootstrap-dns-names",
];

/// Why the configuration file is unusable.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}, line {line}, key {key:?}: {reason}")]
    Key { path: PathBuf, line: usize, key: String, reason: String },
}

/// Parses a command line that may name a `-config` TOML file: the file's settings come first,
/// the command line overrides them.
pub fn parse_with_config<I, T>(args: I) -> Result<Flags, FlagsError>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString>,
{
    let typed: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let normalized = derpfleet_gocompat::normalize_args(typed.iter().cloned());
    let from_file = match config_arg(&normalized) {
        Some(path) => load_args(&path)?,
        None => Vec::new(),
    };
    Ok(Flags::parse_go_after(from_file, typed)?)
}

/// Why the command line (with its config file) could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum FlagsError {
    /// A bad flag (clap prints it with usage; `--help` and `--version` land here too).
    #[error(transparent)]
    Flags(#[from] clap::Error),
    /// A bad config file.
    #[error(transparent)]
    Config(#[from] ConfigError),
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
        let arg = command.get_arguments().find(|a| a.get_long() == Some(name.as_str()));
        let Some(arg) = arg.filter(|_| !NOT_IN_FILE.contains(&name.as_str())) else {
            return Err(err("unknown key (the keys are the flag names shown by --help)".to_owned()));
        };
        let kind = arg.get_value_names().and_then(|v| v.first()).map(|n| n.as_str()).unwrap_or("");
        check_type(kind, LIST_FLAGS.contains(&name.as_str()), value.get_ref()).map_err(err)?;
        let value = value_text(value.get_ref()).map_err(err)?;
        let arg = format!("--{name}={value}");
        if let Err(e) = Flags::try_parse_from(["derpfleet-relay", arg.as_str()]) {
            return Err(err(clap_reason(&e)));
        }
        args.push(arg);
    }
    Ok(args)
}

/// Checks that `v` has the TOML type of a flag whose clap value name is `kind`.
fn check_type(kind: &str, list: bool, v: &toml::Value) -> Result<(), String> {
    use toml::Value::{Array, Boolean, Float, Integer, String as Str};
    let ok = match (kind, v) {
        (_, Array(_)) => list,
        ("int", Integer(_)) | ("bool", Boolean(_)) => true,
        ("float", Integer(_) | Float(_)) => true,
        ("float", Str(s)) => s.trim_start_matches('+').eq_ignore_ascii_case("inf"),
        ("int" | "bool" | "float", _) => false,
        (_, Str(_)) => true,
        // Flags without a declared kind take any scalar, as on the command line.
        ("", Integer(_) | Float(_) | Boolean(_)) => true,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let want = match kind {
        "int" => "an integer",
        "bool" => "a boolean (true or false)",
        "float" => "a number (or \"+Inf\")",
        _ if list => "a string or an array of strings",
        _ => "a string",
    };
    let found = match v {
        Str(s) => format!("the string {s:?}"),
        Integer(i) => format!("the integer {i}"),
        Float(f) => format!("the number {f}"),
        Boolean(b) => format!("the boolean {b}"),
        Array(_) => "an array".to_owned(),
        toml::Value::Datetime(d) => format!("the date {d}"),
        toml::Value::Table(_) => "a table (use top-level keys)".to_owned(),
    };
    Err(format!("expected {want}, found {found}"))
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
    fn wrong_types_are_rejected_with_file_line_key_and_reason() {
        for (text, line, key, reason) in [
            ("stun-port = \"3478\"\n", 1, "stun-port", "expected an integer, found the string \"3478\""),
            ("a = \":1\"\nhostname = 123\n", 2, "hostname", "expected a string, found the integer 123"),
            ("hostname = [\"a\", \"b\"]\n", 1, "hostname", "expected a string, found an array"),
            ("stun = \"false\"\n", 1, "stun", "expected a boolean"),
            ("dev = 1\n", 1, "dev", "expected a boolean"),
            ("tcp-write-timeout = 2\n", 1, "tcp-write-timeout", "expected a string, found the integer 2"),
            ("accept-connection-limit = true\n", 1, "accept-connection-limit", "expected a number"),
            ("stun-port = [3478]\n", 1, "stun-port", "found an array"),
            ("mesh-with = [1]\n", 1, "mesh-with", "list items must be strings"),
        ] {
            let s = args_from_toml(Path::new("t.toml"), text).unwrap_err().to_string();
            for needle in ["t.toml", &format!("line {line}"), key, reason] {
                assert!(s.contains(needle), "{text:?}: {needle:?} missing from {s}");
            }
        }
        let ok = "mesh-with = [\"a.example\", \"b.example\"]\naccept-connection-limit = \"+Inf\"\n\
                  accept-connection-limit-per-ip = 5\n";
        let args = args_from_toml(Path::new("t.toml"), ok).unwrap();
        assert_eq!(
            args,
            [
                "--mesh-with=a.example,b.example",
                "--accept-connection-limit=+Inf",
                "--accept-connection-limit-per-ip=5"
            ]
        );
    }

    #[test]
    fn config_flag_is_found() {
        let a = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(config_arg(&a(&["x", "--config=/a.toml"])), Some(PathBuf::from("/a.toml")));
        assert_eq!(config_arg(&a(&["x", "--dev", "--config", "b.toml"])), Some(PathBuf::from("b.toml")));
        assert_eq!(config_arg(&a(&["x", "--dev"])), None);
    }
}
