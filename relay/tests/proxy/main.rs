//! Relay integration tests, running behind proxies: HAProxy, L7 proxies,
//! the PROXY protocol.
//!
//! One test binary per area rather than per file: each binary links the whole relay (build time,
//! disk).

#[path = "../http_common/mod.rs"]
mod http_common;
#[path = "../ops_common/mod.rs"]
mod ops_common;
#[path = "../proxy_common/mod.rs"]
mod proxy_common;

mod haproxy;
mod l7;
mod protocol;
