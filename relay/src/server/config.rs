//! What a relay is started with: the listener and core settings ([`ServerConfig`], [`TcpConfig`])
//! and the operations side ([`OpsConfig`], [`StunListenConfig`]), plus what a graceful shutdown
//! does ([`DrainConfig`]). Defaults are derper's (`crate::defaults`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use derpfleet_stun::StunConfig;

use crate::core::derp_server::DerpServerConfig;
use crate::defaults;
use crate::http::forwarded::ForwardedTrust;
use crate::http::proxy_protocol::{self, TrustedNets};
use crate::http::tls::CertReloader;
use crate::http::HomePage;
use crate::ops::admission::{Allowlist, VerifyUrl};
use crate::ops::ratelimit::{AcceptRate, RecvRate};

/// Socket options applied to every accepted TCP connection.
#[derive(Clone, Copy, Debug)]
pub struct TcpConfig {
    /// Idle time before TCP keepalive probes (`-tcp-keepalive-time`); None = off.
    pub keepalive_time: Option<Duration>,
    /// `TCP_USER_TIMEOUT` (`-tcp-user-timeout`); None = the kernel default.
    pub user_timeout: Option<Duration>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            keepalive_time: defaults::TCP_KEEPALIVE_TIME.non_zero(),
            user_timeout: defaults::TCP_USER_TIMEOUT.non_zero(),
        }
    }
}

/// Everything needed to run a relay.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Main listen address (`-a`). `[::]` binds dual-stack (falling back to `0.0.0.0`).
    pub listen: SocketAddr,
    /// TLS on the main port, or plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Plain-HTTP port served next to a TLS main port (same IP); ignored without TLS. 0 = ephemeral.
    pub http_port: Option<u16>,
    /// What `/` serves.
    pub home: HomePage,
    /// `-derp=false` serves `/derp` as 404.
    pub derp_enabled: bool,
    /// The DERP core's settings.
    pub derp: DerpServerConfig,
    /// Accepted-socket options.
    pub tcp: TcpConfig,
}

/// The embedded STUN responder (`-stun`).
#[derive(Clone, Debug)]
pub struct StunListenConfig {
    /// UDP address: the IP of `-a` and `-stun-port` (0 = ephemeral).
    pub addr: SocketAddr,
    /// Strictness and per-IP limit.
    pub config: StunConfig,
}

/// The operations side of a relay. `Default` = everything off except nothing: no
/// limits, no admission checks, no metrics listener, no STUN, no certificate reload.
#[derive(Clone, Debug)]
pub struct OpsConfig {
    /// `/metrics` and `/healthz` listener (`-metrics-addr`).
    pub metrics_addr: Option<SocketAddr>,
    /// Failing to bind `metrics_addr` stops the start (else it is logged and skipped).
    pub metrics_addr_required: bool,
    /// Global accept rate (`-accept-connection-limit`/`-burst`).
    pub accept_limit: AcceptRate,
    /// Per-source-IP accept rate.
    pub accept_limit_per_ip: AcceptRate,
    /// Node keys allowed to connect (`-allowlist`).
    pub allowlist: Option<Arc<Allowlist>>,
    /// Admission controller (`-verify-client-url`).
    pub verify_url: Option<VerifyUrl>,
    /// `-verify-client-url-fail-open`.
    pub verify_fail_open: bool,
    /// `-verify-clients`: tailscaled's LocalAPI socket (empty = the default path).
    pub verify_clients_socket: Option<String>,
    /// Per-client receive rate at start.
    pub recv_rate: RecvRate,
    /// `-rate-config` file, re-read by [`Server::reload`](crate::server::Server::reload).
    pub rate_config_path: Option<PathBuf>,
    /// The embedded STUN responder.
    pub stun: Option<StunListenConfig>,
    /// Manual certificate files to watch.
    pub cert_reloader: Option<Arc<CertReloader>>,
    /// How often to look at them.
    pub cert_reload_interval: Option<Duration>,
    /// `-certmode letsencrypt`/`gcp`: the ACME task to run (obtains and renews the certificates,
    /// answers HTTP-01 on the `-http-port` listener).
    pub acme: Option<Arc<crate::ops::acme::AcmeTask>>,
    /// At most one drop-log line per reason per this interval.
    pub drop_log_interval: Duration,
    /// `/bootstrap-dns` names (`-bootstrap-dns-names`, `-unpublished-bootstrap-dns-names`).
    pub bootstrap_dns: crate::ops::bootstrap_dns::BootstrapDnsConfig,
    /// Peers that must start with a PROXY header (`-proxy-protocol-trusted`), on the main and
    /// `-http-port` listeners. Empty = PROXY protocol off.
    pub proxy_protocol_trusted: TrustedNets,
    /// How long such a peer has to send its header (`-proxy-protocol-timeout`).
    pub proxy_protocol_timeout: Duration,
    /// L7 proxies whose forwarding header is believed (`-forwarded-trusted`, `-forwarded-header`).
    pub forwarded: ForwardedTrust,
}

impl Default for OpsConfig {
    fn default() -> Self {
        let unlimited = AcceptRate { per_second: f64::INFINITY, burst: u64::MAX };
        Self {
            metrics_addr: None,
            metrics_addr_required: true,
            accept_limit: unlimited,
            accept_limit_per_ip: unlimited,
            allowlist: None,
            verify_url: None,
            verify_fail_open: defaults::VERIFY_CLIENT_URL_FAIL_OPEN,
            verify_clients_socket: None,
            recv_rate: RecvRate::default(),
            rate_config_path: None,
            stun: None,
            cert_reloader: None,
            cert_reload_interval: None,
            acme: None,
            drop_log_interval: defaults::DROP_LOG_INTERVAL.get(),
            bootstrap_dns: Default::default(),
            proxy_protocol_trusted: TrustedNets::default(),
            proxy_protocol_timeout: proxy_protocol::DEFAULT_HEADER_TIMEOUT,
            forwarded: ForwardedTrust::default(),
        }
    }
}

/// What a graceful shutdown does ([`Server::drain`](crate::server::Server::drain)).
#[derive(Clone, Copy, Debug)]
pub struct DrainConfig {
    /// Restarting's reconnect-in before jitter.
    pub reconnect_in: Duration,
    /// Upper bound of the random per-client extra delay.
    pub reconnect_jitter: Duration,
    /// Restarting's try-for.
    pub try_for: Duration,
    /// Total time allowed; connections still open then are closed.
    pub deadline: Duration,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            reconnect_in: defaults::RESTART_RECONNECT_IN.get(),
            reconnect_jitter: defaults::RESTART_RECONNECT_JITTER.get(),
            try_for: defaults::RESTART_TRY_FOR.get(),
            deadline: defaults::DRAIN_TIMEOUT.get(),
        }
    }
}
