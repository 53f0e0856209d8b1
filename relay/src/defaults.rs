//! Every default of the relay's flags, in one place.
//!
//! clap's `default_value_t` (so `--help` and the README table), the TOML config file (through the
//! same clap definitions) and the `Default` impls of the settings structs
//! (`TcpConfig`, `DrainConfig`, `OpsConfig` in `server`,
//! `DerpServerConfig::new` in the core) all read these constants, so a default
//! cannot differ between the command line and an embedding program. Values are derper's unless
//! the flag is ours (see the `startup::flags` module docs).

use derpfleet_gocompat::GoDuration;
use derpfleet_proto::consts;

/// `-a`: all interfaces, HTTPS port.
pub const ADDR: &str = ":443";
/// `-http-port`.
pub const HTTP_PORT: i32 = 80;
/// `-stun-port`.
pub const STUN_PORT: u16 = 3478;
/// `-certmode`.
pub const CERTMODE: &str = "letsencrypt";
/// `-hostname`.
pub const HOSTNAME: &str = "derp.tailscale.com";
/// `-tcp-keepalive-time`.
pub const TCP_KEEPALIVE_TIME: GoDuration = GoDuration::from_secs(600);
/// `-tcp-user-timeout`.
pub const TCP_USER_TIMEOUT: GoDuration = GoDuration::from_secs(15);
/// `-tcp-write-timeout`: derper's per-frame write deadline.
pub const TCP_WRITE_TIMEOUT: GoDuration = GoDuration(consts::DEFAULT_WRITE_TIMEOUT);
/// `-verify-client-url-fail-open`.
pub const VERIFY_CLIENT_URL_FAIL_OPEN: bool = true;
/// `-accept-connection-limit` and `-accept-connection-limit-per-ip`: no limit (Go's spelling of
/// infinity, as derper prints it).
pub const ACCEPT_CONNECTION_LIMIT: &str = "+Inf";
/// `-accept-connection-burst`.
pub const ACCEPT_CONNECTION_BURST: i64 = i64::MAX;
/// `-accept-connection-burst-per-ip`.
pub const ACCEPT_CONNECTION_BURST_PER_IP: i64 = 20;
/// `-metrics-addr`.
pub const METRICS_ADDR: &str = "127.0.0.1:9090";
/// `-drain-timeout`.
pub const DRAIN_TIMEOUT: GoDuration = GoDuration::from_secs(5);
/// `-restart-reconnect-in`.
pub const RESTART_RECONNECT_IN: GoDuration = GoDuration::from_secs(1);
/// `-restart-reconnect-jitter`.
pub const RESTART_RECONNECT_JITTER: GoDuration = GoDuration::from_secs(2);
/// `-restart-try-for`.
pub const RESTART_TRY_FOR: GoDuration = GoDuration::from_secs(30);
/// `-cert-reload-interval`.
pub const CERT_RELOAD_INTERVAL: GoDuration = GoDuration::from_secs(5);
/// `-stun-rate-limit` (requests per second per source IP).
pub const STUN_RATE_LIMIT: u32 = 100;
/// `-stun-rate-burst`.
pub const STUN_RATE_BURST: u32 = 200;
/// `-drop-log-interval`.
pub const DROP_LOG_INTERVAL: GoDuration = GoDuration::from_secs(10);
/// The shortest `-drop-log-interval` honoured (a smaller value is raised to this).
pub const MIN_DROP_LOG_INTERVAL: GoDuration = GoDuration::from_millis(100);
/// Per-client data and disco queue depth, unless `TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH` is set.
pub const SEND_QUEUE_DEPTH: usize = consts::PER_CLIENT_SEND_QUEUE_DEPTH;
