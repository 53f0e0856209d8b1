//! Go `flag`-package command-line syntax on top of clap.
//!
//! Our binaries rewrite every single-dash argument to the double-dash form before clap sees it
//! ([`normalize_args`]) and declare every flag as a clap `long` (one-letter names such as `a`
//! included). Boolean flags get Go's rules from [`go_bool_arg`], applied to a whole command once
//! with `#[command(mut_args = derpfleet_gocompat::go_arg)]` ([`go_arg`]), so `-name=false` works and a
//! following positional word is never swallowed as the value. [`try_get_matches`] parses and
//! reports errors with the flag spelled as the user typed it (`-bogus`, not clap's `--bogus`).

use std::ffi::OsString;

use clap::{Arg, ArgAction};

/// Rewrites `-name…` to `--name…` for every argument before a lone `--` terminator.
///
/// The program name (first element) is kept as is. A lone `-` (stdin convention) is kept, and so
/// is a negative number given as a value (`-http-port -1`).
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

/// Gives every arg Go's value rules; meant for `Command::mut_args`, so each binary applies them
/// once to all its flags (`#[command(mut_args = derpfleet_gocompat::go_arg)]`):
/// - booleans get [`go_bool_arg`];
/// - an arg that takes a value accepts a negative number as that value (`-stun-port -5` is the
///   value `-5`, reported as invalid for `-stun-port`, not as an unknown flag `-5`).
pub fn go_arg(arg: Arg) -> Arg {
    let arg = go_bool_arg(arg);
    let takes_value = matches!(arg.get_action(), ArgAction::Set | ArgAction::Append);
    let is_bool = arg.get_value_names().is_some_and(|v| v.len() == 1 && v[0] == "bool");
    if takes_value && !is_bool && arg.get_long().is_some() {
        arg.allow_negative_numbers(true)
    } else {
        arg
    }
}

/// Gives a boolean clap arg Go's rules: `--name` means true, `--name=VALUE` takes any Go boolean,
/// and a separate following word is never taken as the value. Other args are returned unchanged.
///
/// A boolean arg is one clap derives for a `bool` field (action `SetTrue`), or one already
/// declared with `value_name = "bool"`; its default stays as declared (`false` if none).
pub fn go_bool_arg(arg: Arg) -> Arg {
    let set_true = matches!(arg.get_action(), ArgAction::SetTrue);
    let named_bool = arg.get_value_names().is_some_and(|v| v.len() == 1 && v[0] == "bool");
    if !set_true && !named_bool {
        return arg;
    }
    let has_default = !arg.get_default_values().is_empty();
    let arg = arg
        .num_args(0..=1)
        .require_equals(true)
        .default_missing_value("true")
        .value_parser(parse_go_bool)
        .action(ArgAction::Set)
        .value_name("bool");
    if has_default {
        arg
    } else {
        arg.default_value("false")
    }
}

/// Parses `args` (Go syntax, program name first) with `command`; errors name flags as typed.
///
/// clap only sees the `--name` forms [`normalize_args`] makes, so its messages would echo
/// `--bogus` for a `-bogus` the user typed; [`as_typed`] turns them back.
pub fn try_get_matches<I, T>(command: clap::Command, args: I) -> Result<clap::ArgMatches, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let typed: Vec<OsString> = args.into_iter().map(Into::into).collect();
    command.try_get_matches_from(normalize_args(typed.iter().cloned())).map_err(|e| as_typed(e, &typed))
}

/// Rewrites the flag names in a clap error from the `--name` form back to the `-name` form for
/// every flag the user wrote with one dash in `typed` (the original command line). Help and
/// version output is returned unchanged; the error kind (and so the exit status 2) is kept.
pub fn as_typed(err: clap::Error, typed: &[OsString]) -> clap::Error {
    use clap::error::ErrorKind;
    if matches!(err.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        return err;
    }
    let mut text = err.to_string();
    for arg in typed.iter().skip(1).filter_map(|a| a.to_str()) {
        if arg == "--" {
            break;
        }
        let Some(name) = arg.strip_prefix('-').filter(|n| !n.starts_with('-') && !n.is_empty()) else {
            continue;
        };
        let name = name.split_once('=').map_or(name, |(n, _)| n);
        if name.parse::<f64>().is_ok() {
            continue;
        }
        text = respell(&text, name);
    }
    let text = text.strip_prefix("error: ").unwrap_or(&text).trim_end().to_owned();
    clap::Error::raw(err.kind(), format!("{text}\n"))
}

/// Replaces each quoted `'--name` (followed by anything but more of a flag name) with `'-name`.
fn respell(text: &str, name: &str) -> String {
    let needle = format!("'--{name}");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&needle) {
        let after = &rest[at + needle.len()..];
        let whole = !after.starts_with(|c: char| c.is_alphanumeric() || c == '-' || c == '_');
        out.push_str(&rest[..at]);
        out.push_str(if whole { "'-" } else { "'--" });
        out.push_str(name);
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches, Parser};

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

    #[derive(Parser, Debug)]
    #[command(mut_args = go_arg)]
    struct Demo {
        #[arg(long)]
        off: bool,
        #[arg(long, default_value = "true")]
        on: bool,
        #[arg(long, default_value = "x")]
        word: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        rest: Vec<String>,
    }

    fn demo(args: &[&str]) -> Result<Demo, clap::Error> {
        let m = Demo::command().try_get_matches_from(normalize_args(args.iter().copied()))?;
        Demo::from_arg_matches(&m)
    }

    #[test]
    fn bool_flags_follow_go() {
        let d = demo(&["p"]).unwrap();
        assert!(!d.off && d.on && d.word == "x");
        let d = demo(&["p", "-off", "-on=false", "positional"]).unwrap();
        assert!(d.off && !d.on);
        assert_eq!(d.rest, ["positional"]);
        let d = demo(&["p", "-off=F", "-on=1"]).unwrap();
        assert!(!d.off && d.on);
        assert!(demo(&["p", "-on=maybe"]).is_err());
        let defaults: Vec<_> = Demo::command()
            .get_arguments()
            .filter(|a| a.get_long().is_some())
            .map(|a| {
                a.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(defaults, [vec!["false"], vec!["true"], vec!["x"], vec!["1"]]);
    }

    #[test]
    fn errors_name_flags_as_typed() {
        let e = try_get_matches(Demo::command(), ["p", "-bogus"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let text = e.to_string();
        assert!(text.contains("'-bogus'") && !text.contains("'--bogus'"), "{text}");
        let e = try_get_matches(Demo::command(), ["p", "-on=maybe"]).unwrap_err().to_string();
        assert!(e.contains("'-on") && e.contains("maybe") && !e.contains("'--on"), "{e}");
        let e = try_get_matches(Demo::command(), ["p", "-count", "-5"]).unwrap_err().to_string();
        assert!(e.contains("invalid value '-5' for '-count"), "{e}");
        let e = try_get_matches(Demo::command(), ["p", "--on=maybe"]).unwrap_err().to_string();
        assert!(e.contains("'--on"), "{e}");
    }
}
