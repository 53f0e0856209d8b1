//! From a command line to a running configuration: derper's flags, the TOML file that feeds the same
//! flag definitions, and derper's key file.
//!
//! - [`cli`]: derper-compatible flags (Go flag syntax) turned into a [`crate::server::ServerConfig`].
//! - [`config`]: `-config FILE` (TOML keys become flags in front of the real command line).
//! - [`keyfile`]: derper's `-c` JSON key file.

pub mod cli;
pub mod config;
pub mod keyfile;
