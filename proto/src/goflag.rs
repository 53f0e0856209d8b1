//! Go `flag`-package command-line syntax on top of clap.
//!
//! derper is configured with Go flags: `-name value`, `-name=value`, `--name`, and booleans as a bare
//! `-name` or `-name=false`. So that an existing derper command line or systemd unit works
//! unchanged, our binaries rewrite every single-dash argument to the double-dash form before clap
//! sees it, and declare every flag as a clap `long` (one-letter names such as `a` included).
//! Boolean flags must be declared with [`go_bool`] so that `-name=false` works and a following
//! positional word is never swallowed as the value.

use std::ffi::OsString;

/// Rewrites `-name…` to `--name…` for every argument before a lone `--` terminator.
///
/// The program name (first element) is kept as is. A lone `-` (stdin convention) is kept.
pub fn normalize_args<I, T>(args: I) -> Vec<OsString>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut out = Vec::new();
    let mut terminated = false;
    for (i, arg) in args.into_iter().enumerate() {
        let arg: OsString = arg.into();
        if i == 0 || terminated {
            out.push(arg);
            continue;
        }
        match arg.to_str() {
            Some("--") => {
                terminated = true;
                out.push(arg);
            }
            Some(s) if s.starts_with('-') && !s.starts_with("--") && s.len() > 1 => {
                // A negative number given as a value (`-http-port -1`) must stay as is.
                if s[1..].parse::<f64>().is_ok() {
                    out.push(arg);
                } else {
                    out.push(format!("-{s}").into());
                }
            }
            _ => out.push(arg),
        }
    }
    out
}

/// Parses a Go boolean flag value (`1`, `t`, `T`, `TRUE`, `true`, `True`, and the false forms).
pub fn parse_go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("invalid boolean value {s:?}")),
    }
}

/// Configures a clap arg as a Go boolean flag: `--name` means true, `--name=false` sets the value,
/// and a separate following word is never taken as the value.
pub fn go_bool(arg: clap::Arg) -> clap::Arg {
    arg.num_args(0..=1)
        .require_equals(true)
        .default_missing_value("true")
        .value_parser(parse_go_bool)
        .action(clap::ArgAction::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_single_dash() {
        let v = normalize_args(["prog", "-a", ":443", "-dev", "--c", "x", "-http-port", "-1", "--", "-z"]);
        let v: Vec<_> = v.iter().map(|s| s.to_str().unwrap()).collect();
        assert_eq!(v, ["prog", "--a", ":443", "--dev", "--c", "x", "--http-port", "-1", "--", "-z"]);
    }

    #[test]
    fn go_bool_values() {
        assert_eq!(parse_go_bool("F"), Ok(false));
        assert_eq!(parse_go_bool("1"), Ok(true));
        assert!(parse_go_bool("yes").is_err());
    }
}
