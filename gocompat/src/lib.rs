//! What derper-compatible binaries share with Go: command-line syntax, durations, listen addresses.
//!
//! derper is configured with Go's `flag` package and `time.Duration` values, and listens on Go
//! `net.Listen` addresses. The relay and the standalone STUN responder accept the same spellings so
//! that an existing derper command line, systemd unit or config file works unchanged. This crate is
//! the one place those rules live:
//! - [`args`]: `-name value`, `-name=value`, `--name`, Go booleans (`-name`, `-name=false`) on
//!   top of clap ([`args::normalize_args`], [`args::go_arg`], [`args::try_get_matches`]).
//! - [`duration`]: [`GoDuration`], a `time.Duration` that parses and prints (`10m`, `1h30m`,
//!   `500ms`), usable as a clap `default_value_t` and in `Default` impls.
//! - [`listen`]: [`parse_listen_addr`] for `:443`, `ip:port`, `[ipv6]:port`, `host:https`.

#![warn(missing_docs, unreachable_pub)]

pub mod args;
pub mod duration;
pub mod listen;

pub use args::{as_typed, go_arg, go_bool_arg, normalize_args, parse_go_bool, try_get_matches};
pub use duration::GoDuration;
pub use listen::{parse_listen_addr, ListenAddrError};
