//! Relay integration tests, the binary and derper's flags.
//!
//! One test binary per area rather than per file: each binary links the whole relay (build time,
//! disk).

#[path = "../http_common/mod.rs"]
mod http_common;
#[path = "../ops_common/mod.rs"]
mod ops_common;

mod binary;
mod derper_flags;
