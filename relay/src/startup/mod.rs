//! From a command line to a running configuration: derper's flags, the TOML file that feeds the same
//! flag definitions, and derper's key file.
//!
//! - [`flags`]: derper-compatible flag definitions (Go flag syntax), with their checks.
//! - [`cli`]: the parsed flags turned into a [`crate::server::ServerConfig`] and the rest of a start.
//! - [`config`]: `-config FILE` (TOML keys become flags in front of the real command line).
//! - [`keyfile`]: derper's `-c` JSON key file.

pub mod cli;
pub mod config;
pub mod flags;
pub mod keyfile;
