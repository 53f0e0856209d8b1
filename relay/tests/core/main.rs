//! Relay integration tests, the relay core over raw TCP: the handshake,
//! relaying, robustness, and the ignored perf check.
//!
//! One test binary per area rather than per file: each binary links the whole relay (build time,
//! disk).

mod handshake;
mod perf;
mod relay;
mod robustness;
