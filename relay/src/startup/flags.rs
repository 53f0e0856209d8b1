//! derper-compatible flag definitions (spec §4), in Go flag syntax: names, defaults, parse-time
//! checks (a bad value exits 2 naming the flag as typed). `startup::cli` turns them into a
//! running configuration.
//!
//! Flag names, defaults and meanings follow derper so an existing derper command line or systemd
//! unit works unchanged. Decisions where derper leaves room:
//! - `-c` defaults to `/var/lib/derper/derper.key` for root (as derper) and to
//!   `$XDG_CONFIG_HOME/derper/derper.key` (or `$HOME/.config/derper/derper.key`) otherwise
//!   (derper refuses to start without `-c` when not root).
//! - `-dev` listens on `127.0.0.1:3340` (loopback only, unlike derper's `:3340`), uses an
//!   ephemeral key and ignores `-a` and `-c`.
//! - `-hostname` defaults to `derp.tailscale.com`, as derper.
//! - `-tcp-keepalive-time 0` turns keepalive off; `-tcp-user-timeout 0` leaves the kernel default.
//! - `-stun` (default true) serves STUN from the `derpfleet-stun` responder on `-stun-port`
//!   at the IP of `-a` (with `-dev`: 127.0.0.1); `-stun-strict` answers only Tailscale-style
//!   requests; `-stun-rate-limit`/`-stun-rate-burst` limit requests per source IP (0 = off).
//! - Admission: `-verify-clients` (tailscaled's LocalAPI over `-socket`), `-verify-client-url`
//!   (derper's protocol) and `-allowlist FILE`.
//! - Every other derper v1.102.3 flag is accepted: `-bootstrap-dns-names` and
//!   `-unpublished-bootstrap-dns-names` ([`crate::ops::bootstrap_dns`]), `-secrets-*` (the mesh key
//!   from setec, [`crate::ops::secrets`]), the ACME ones (`-certmode gcp`, `-acme-email`,
//!   `-acme-eab-kid`/`-acme-eab-key`, `-acme-ip-certs`, checked as derper does by
//!   [`crate::ops::acme`]; read only when TLS is served, as derper). `-ace=true` stops the start.
//! - `-accept-connection-limit-per-ip`/`-burst-per-ip` add a per-source-IP accept limit next to
//!   derper's global one; both apply to the main listener, TLS or not.
//! - Graceful restart: `-drain-timeout`, `-restart-reconnect-in` (+ `-restart-reconnect-jitter`),
//!   `-restart-try-for` (see [`crate::server::Server::drain`]).
//! - Behind proxies: `-proxy-protocol-trusted` (PROXY v1/v2 from L4 balancers, see
//!   [`crate::http::proxy_protocol`]) and `-forwarded-trusted` with `-forwarded-header` (one of
//!   `X-Forwarded-For`/`Forwarded` from L7 proxies, [`crate::http::forwarded`]). The second is named after the header it believes,
//!   parallel to the first, rather than a vague "trusted proxies", since the two mechanisms trust
//!   different hops (a balancer in front of nginx is in the first list, nginx in the second).
//! - `-config FILE`: a TOML file with any flag as a key (the `config` module beside this one); flags win over it.

use std::path::PathBuf;

use clap::{ArgAction, Parser};
use derpfleet_gocompat::{parse_listen_addr, GoDuration};

use crate::defaults;
use crate::http::forwarded::ForwardedHeader;
use crate::http::proxy_protocol::TrustedNets;
use crate::http::HomePage;
use crate::ops::admission::VerifyUrl;

/// The relay's command-line flags (derper's names; write them as `-name value`, `-name=value`
/// or `--name value`; booleans as `-name` or `-name=false`).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "derpfleet-relay",
    version,
    about = "A Tailscale DERP v2 relay server, wire-compatible with tailscaled and Go derper.",
    disable_help_flag = true,
    disable_version_flag = true,
    args_override_self = true,
    mut_args = derpfleet_gocompat::go_arg
)]
pub struct Flags {
    /// server HTTP/HTTPS listen address, in form ":port", "ip:port", or for IPv6 "[ip]:port". If the IP is
    /// omitted, it defaults to all interfaces. Serves HTTPS if the port is 443 and/or -certmode is manual,
    /// otherwise HTTP.
    #[arg(long = "a", default_value = defaults::ADDR, value_parser = check_listen_addr, value_name = "addr")]
    pub addr: String,

    /// config file path (JSON {"PrivateKey":"privkey:<hex>"}; created with a new key if missing)
    #[arg(long = "c", value_name = "path")]
    pub config_path: Option<PathBuf>,

    /// run in localhost development mode (127.0.0.1:3340, ephemeral key, plain HTTP; overrides -a)
    #[arg(long = "dev", default_value_t = false, value_name = "bool")]
    pub dev: bool,

    /// print version and exit
    #[arg(long = "version", default_value_t = false, value_name = "bool")]
    pub version: bool,

    /// The port on which to serve HTTP. Set to -1 to disable. The listener is bound to the same IP (if any)
    /// as specified in the -a flag. Only used when HTTPS is served.
    #[arg(long = "http-port", default_value_t = defaults::HTTP_PORT, allow_negative_numbers = true, value_name = "int")]
    pub http_port: i32,

    /// whether to run a STUN server. It will bind to the same IP (if any) as the -a flag.
    #[arg(long = "stun", default_value_t = true, value_name = "bool")]
    pub stun: bool,

    /// The UDP port on which to serve STUN. The listener is bound to the same IP (if any) as the -a flag.
    #[arg(long = "stun-port", default_value_t = defaults::STUN_PORT, value_name = "int")]
    pub stun_port: u16,

    /// whether to run a DERP server. The only reason to set this false is if you're decommissioning a
    /// server but want to keep its bootstrap DNS functionality still running.
    #[arg(long = "derp", default_value_t = true, value_name = "bool")]
    pub derp: bool,

    /// mode for getting a cert. possible options: manual, letsencrypt, gcp (letsencrypt and gcp: ACME
    /// with TLS-ALPN-01 on the main port and HTTP-01 on -http-port; gcp: Google's public CA, needs
    /// -acme-eab-kid, -acme-eab-key and -acme-email)
    #[arg(long = "certmode", default_value = defaults::CERTMODE, value_parser = check_certmode,
          value_name = "string")]
    pub certmode: String,

    /// ACME account contact email address (required for -certmode gcp, optional for letsencrypt)
    #[arg(long = "acme-email", default_value = "", value_name = "string")]
    pub acme_email: String,

    /// ACME directory URL of another CA (e.g. a test CA); empty = Let's Encrypt, or Google's public CA
    /// with -certmode gcp
    #[arg(long = "acme-directory-url", default_value = "", value_name = "url")]
    pub acme_directory_url: String,

    /// -certmode letsencrypt/gcp: extra PEM CA certificates trusted for the ACME server's API
    #[arg(long = "acme-ca-file", value_name = "path")]
    pub acme_ca_file: Option<PathBuf>,

    /// directory to store LetsEncrypt certs, if addr's port is :443, or to find <hostname>.crt/.key with
    /// -certmode manual (default $XDG_CACHE_HOME/tailscale/derper-certs)
    #[arg(long = "certdir", value_name = "dir")]
    pub certdir: Option<PathBuf>,

    /// TLS host name for certs, if addr's port is :443. It can be an IP address with -certmode manual
    /// (a self-signed certificate is generated if <certdir>/<ip>.crt is missing) or with -acme-ip-certs
    /// (an IP-only server).
    #[arg(long = "hostname", default_value = defaults::HOSTNAME, value_name = "string")]
    pub hostname: String,

    /// what to serve at the root path. It may be left empty (the default, for a default homepage), "blank"
    /// for a blank page, or a URL to redirect to
    #[arg(long = "home", default_value = "", value_parser = check_home, value_name = "string")]
    pub home: String,

    /// TCP keepalive time (Go duration, e.g. 10m; 0 disables keepalive)
    #[arg(long = "tcp-keepalive-time", default_value_t = defaults::TCP_KEEPALIVE_TIME, value_name = "duration")]
    pub tcp_keepalive_time: GoDuration,

    /// TCP user timeout (Go duration; 0 leaves the kernel default)
    #[arg(long = "tcp-user-timeout", default_value_t = defaults::TCP_USER_TIMEOUT, value_name = "duration")]
    pub tcp_user_timeout: GoDuration,

    /// TCP write timeout per DERP frame for regular clients (Go duration; 0 means no timeout)
    #[arg(long = "tcp-write-timeout", default_value_t = defaults::TCP_WRITE_TIMEOUT, value_name = "duration")]
    pub tcp_write_timeout: GoDuration,

    /// TOML file whose keys are these flags' names (e.g. stun-port = 3478); command-line flags
    /// override it
    #[arg(long = "config", value_name = "file")]
    pub config_file: Option<PathBuf>,

    /// verify clients to this DERP server through a local tailscaled instance (its LocalAPI whois
    /// of each client's node key; see -socket)
    #[arg(long = "verify-clients", default_value_t = false, value_name = "bool")]
    pub verify_clients: bool,

    /// optional alternate path to tailscaled socket (only relevant when using -verify-clients;
    /// empty = /var/run/tailscale/tailscaled.sock)
    #[arg(long = "socket", default_value = "", value_name = "string")]
    pub socket: String,

    /// if non-empty, an admission controller URL (http or https): each client's key is POSTed as
    /// {"NodePublic":"nodekey:…","Source":"ip"} and admitted only on HTTP 200 with {"Allow":true}
    #[arg(long = "verify-client-url", default_value = "", value_parser = check_verify_url,
          value_name = "string")]
    pub verify_client_url: String,

    /// whether -verify-client-url admits clients when the controller cannot be reached (only
    /// transport errors and timeouts; any answer other than an allow rejects)
    #[arg(long = "verify-client-url-fail-open", default_value_t = true, value_name = "bool")]
    pub verify_client_url_fail_open: bool,

    /// file of node keys allowed to connect (one nodekey:<hex> per line, # comments), reloaded on
    /// SIGHUP; unset = everyone. Mesh peers are always admitted
    #[arg(long = "allowlist", value_name = "file")]
    pub allowlist: Option<PathBuf>,

    /// rate limit (connections per second) for accepting connections on the main port; over it a
    /// connection is accepted and closed at once. +Inf = no limit
    #[arg(long = "accept-connection-limit", default_value = defaults::ACCEPT_CONNECTION_LIMIT, value_parser = parse_rate,
          value_name = "float")]
    pub accept_connection_limit: f64,

    /// burst for -accept-connection-limit
    #[arg(long = "accept-connection-burst", default_value_t = defaults::ACCEPT_CONNECTION_BURST, value_parser = parse_burst,
          value_name = "int")]
    pub accept_connection_burst: i64,

    /// rate limit (connections per second) per source IP for accepting connections; +Inf = no limit
    #[arg(long = "accept-connection-limit-per-ip", default_value = defaults::ACCEPT_CONNECTION_LIMIT, value_parser = parse_rate,
          value_name = "float")]
    pub accept_connection_limit_per_ip: f64,

    /// burst for -accept-connection-limit-per-ip
    #[arg(long = "accept-connection-burst-per-ip", default_value_t = defaults::ACCEPT_CONNECTION_BURST_PER_IP, value_parser = parse_burst,
          value_name = "int")]
    pub accept_connection_burst_per_ip: i64,

    /// JSON file {"PerClientRateLimitBytesPerSec":N,"PerClientRateBurstBytes":M} limiting what each
    /// client may send (reads pause; nothing is dropped); reloaded on SIGHUP; N=0 = off; mesh
    /// peers exempt
    #[arg(long = "rate-config", value_name = "file")]
    pub rate_config: Option<PathBuf>,

    /// listen address of the /metrics (Prometheus) and /healthz endpoints; empty = off
    #[arg(long = "metrics-addr", default_value = defaults::METRICS_ADDR, value_parser = check_metrics_addr,
          value_name = "addr")]
    pub metrics_addr: String,

    /// on SIGTERM/SIGINT: how long to wait for clients to leave after Restarting before closing
    /// the rest (Go duration)
    #[arg(long = "drain-timeout", default_value_t = defaults::DRAIN_TIMEOUT, value_name = "duration")]
    pub drain_timeout: GoDuration,

    /// Restarting frame at shutdown: when clients should reconnect (Go duration; each client gets
    /// a random extra delay up to -restart-reconnect-jitter)
    #[arg(long = "restart-reconnect-in", default_value_t = defaults::RESTART_RECONNECT_IN, value_name = "duration")]
    pub restart_reconnect_in: GoDuration,

    /// upper bound of the random per-client delay added to -restart-reconnect-in
    #[arg(long = "restart-reconnect-jitter", default_value_t = defaults::RESTART_RECONNECT_JITTER, value_name = "duration")]
    pub restart_reconnect_jitter: GoDuration,

    /// Restarting frame at shutdown: how long clients should keep trying to reconnect
    #[arg(long = "restart-try-for", default_value_t = defaults::RESTART_TRY_FOR, value_name = "duration")]
    pub restart_try_for: GoDuration,

    /// how often -certmode manual certificate files are checked for changes (Go duration; 0 = never)
    #[arg(long = "cert-reload-interval", default_value_t = defaults::CERT_RELOAD_INTERVAL, value_name = "duration")]
    pub cert_reload_interval: GoDuration,

    /// answer only Tailscale-style STUN requests (derper's rules); otherwise any RFC 5389 Binding
    /// request is answered too
    #[arg(long = "stun-strict", default_value_t = false, value_name = "bool")]
    pub stun_strict: bool,

    /// STUN requests per second allowed per source IP (0 = no limit)
    #[arg(long = "stun-rate-limit", default_value_t = defaults::STUN_RATE_LIMIT, value_name = "int")]
    pub stun_rate_limit: u32,

    /// STUN requests a source IP may send back to back
    #[arg(long = "stun-rate-burst", default_value_t = defaults::STUN_RATE_BURST, value_name = "int")]
    pub stun_rate_burst: u32,

    /// packet drops are logged at most once per this interval, one line per reason with counts
    #[arg(long = "drop-log-interval", default_value_t = defaults::DROP_LOG_INTERVAL, value_name = "duration")]
    pub drop_log_interval: GoDuration,

    /// file holding the region's mesh key (64 hex chars); default /home/derp/keys/derp-mesh.key or
    /// $HOME/keys/derp-mesh.key if present
    #[arg(long = "mesh-psk-file", value_name = "path")]
    pub mesh_psk_file: Option<PathBuf>,

    /// optional comma-separated list of hostnames to mesh with: host[:port][/dialhost] (https,
    /// verified against the system trust store); an entry starting with http:// is dialed without
    /// TLS. May include this server itself. A name with several addresses meshes with each
    #[arg(long = "mesh-with", default_value = "", value_parser = check_mesh_with, value_name = "string")]
    pub mesh_with: String,

    /// extra PEM CA bundle trusted for -mesh-with TLS, besides the system trust store
    #[arg(long = "mesh-ca-file", value_name = "path")]
    pub mesh_ca_file: Option<PathBuf>,

    // derper v1.102.3 flags beyond the core set (bootstrap DNS, ACME extras, setec, ACE), kept
    // together; what each does here is in docs/operators.md "Migrating from Go derper".
    /// optional comma-separated list of hostnames to make available at /bootstrap-dns
    #[arg(long = "bootstrap-dns-names", default_value = "", value_name = "string")]
    pub bootstrap_dns_names: String,

    /// optional comma-separated list of hostnames to make available at /bootstrap-dns and not
    /// publish in the list (only answered to ?q=NAME). An entry name/txtname reads the rollout
    /// percentage (0 to 100) from the TXT record txtname
    #[arg(long = "unpublished-bootstrap-dns-names", default_value = "", value_name = "string")]
    pub unpublished_bootstrap_dns_names: String,

    /// ACME External Account Binding (EAB) Key ID (required for -certmode gcp; with letsencrypt used
    /// when set, for a CA at -acme-directory-url that requires EAB)
    #[arg(long = "acme-eab-kid", default_value = "", value_name = "string")]
    pub acme_eab_kid: String,

    /// ACME External Account Binding (EAB) HMAC key, base64url (or standard base64) encoded (required
    /// for -certmode gcp)
    #[arg(long = "acme-eab-key", default_value = "", value_name = "string")]
    pub acme_eab_key: String,

    /// whether to get ACME certificates for the server's IP addresses: a client connecting by IP (no SNI)
    /// gets one for the connection's local IP (short-lived profile when the CA offers it, HTTP-01 on
    /// -http-port); requires -certmode letsencrypt
    #[arg(long = "acme-ip-certs", default_value_t = false, value_name = "bool")]
    pub acme_ip_certs: bool,

    /// setec server URL for secrets retrieval of the mesh key
    #[arg(long = "secrets-url", default_value = "", value_name = "string")]
    pub secrets_url: String,

    /// setec path prefix for the "meshkey" secret holding the DERP mesh key
    #[arg(long = "secrets-path-prefix", default_value = "prod/derp", value_name = "string")]
    pub secrets_path_prefix: String,

    /// directory to cache setec secrets in (default $HOME/.cache/derper-secrets)
    #[arg(long = "secrets-cache-dir", value_name = "dir")]
    pub secrets_cache_dir: Option<PathBuf>,

    /// derper's experimental embedded ACE server (not offered here: true stops the start)
    #[arg(long = "ace", default_value_t = false, value_name = "bool")]
    pub ace: bool,
    /// comma-separated CIDRs (or IPs) of L4 load balancers that send a PROXY protocol v1/v2 header
    /// (HAProxy send-proxy-v2, AWS NLB): a connection from them must start with one, and its client
    /// address is used for limits, -verify-client-url, mesh and logs. Others are never parsed.
    /// Applies to -a and -http-port. Empty = off
    #[arg(long = "proxy-protocol-trusted", default_value = "", value_parser = parse_trusted_nets,
          value_name = "CIDR[,CIDR…]")]
    pub proxy_protocol_trusted: TrustedNets,

    /// how long a -proxy-protocol-trusted peer has to send its whole PROXY header (Go duration)
    #[arg(long = "proxy-protocol-timeout", default_value = "5s", value_parser = parse_positive_duration,
          value_name = "duration")]
    pub proxy_protocol_timeout: std::time::Duration,

    /// comma-separated CIDRs (or IPs) of L7 reverse proxies (nginx, Caddy, Traefik) whose Forwarded /
    /// X-Forwarded-For header names the DERP client; from anyone else these headers are ignored.
    /// Empty = off
    #[arg(long = "forwarded-trusted", default_value = "", value_parser = parse_trusted_nets,
          value_name = "CIDR[,CIDR…]")]
    pub forwarded_trusted: TrustedNets,

    /// the one header -forwarded-trusted proxies set: x-forwarded-for (nginx, Caddy, Traefik) or
    /// forwarded (RFC 7239). Only it is read: the other may be the client's own, passed through
    #[arg(long = "forwarded-header", default_value = "x-forwarded-for", value_parser = parse_forwarded_header,
          value_name = "string")]
    pub forwarded_header: ForwardedHeader,

    /// print this help
    #[arg(long = "help", visible_alias = "h", action = ArgAction::Help)]
    pub help: Option<bool>,

    /// `-metrics-addr` was given (flag or config file), not defaulted: failing to bind it is
    /// then fatal; the default address only warns (port 9090 is often Prometheus's own).
    #[arg(skip)]
    pub metrics_addr_explicit: bool,
}

impl Flags {
    /// Parses a command line in Go flag syntax (the program name first).
    pub fn parse_go<I, T>(args: I) -> Result<Flags, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        let typed: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        parse_typed(&typed, typed.clone())
    }

    /// Parses a command line in Go flag syntax with `before` (`--key=value` arguments, e.g. from
    /// the config file) in front of its flags, so the command line overrides them. Errors name
    /// flags as written on the command line.
    pub fn parse_go_after<I, T>(before: Vec<String>, args: I) -> Result<Flags, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        let typed: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let mut all: Vec<std::ffi::OsString> = Vec::with_capacity(typed.len() + before.len());
        all.extend(typed.first().cloned());
        all.extend(before.into_iter().map(Into::into));
        all.extend(typed.iter().skip(1).cloned());
        parse_typed(&typed, all)
    }
}

/// The flag and config-key reference of README.md ("## Running the relay"), generated from the
/// same definitions as `--help` (a test keeps the README in step).
pub fn flags_markdown() -> String {
    use clap::CommandFactory;
    let mut out = String::from("| flag | config key | default | meaning |\n|---|---|---|---|\n");
    for arg in Flags::command().get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set() {
            continue;
        }
        let key = if matches!(long, "help" | "version" | "config") {
            "—".to_owned()
        } else {
            format!("`{long}`")
        };
        let default: Vec<String> =
            arg.get_default_values().iter().map(|v| v.to_string_lossy().into_owned()).collect();
        let default = match default.join(",") {
            d if d.is_empty() => "—".to_owned(),
            d => format!("`{d}`"),
        };
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default().replace('|', "\\|");
        out.push_str(&format!("| `-{long}` | {key} | {default} | {help} |\n"));
    }
    out
}

/// Parses `args` (Go syntax; the config file's `--key=value` pairs may come first); errors name
/// flags as the user wrote them on the command line `typed`.
fn parse_typed(typed: &[std::ffi::OsString], args: Vec<std::ffi::OsString>) -> Result<Flags, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = derpfleet_gocompat::try_get_matches(Flags::command(), args)
        .map_err(|e| derpfleet_gocompat::as_typed(e, typed))?;
    let mut flags = Flags::from_arg_matches(&matches).map_err(|e| derpfleet_gocompat::as_typed(e, typed))?;
    flags.metrics_addr_explicit =
        matches.value_source("metrics_addr").is_some_and(|s| s != clap::parser::ValueSource::DefaultValue);
    Ok(flags)
}

/// `+Inf`/`Inf`/`inf` or a non-negative number (connections per second).
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim_start_matches('+').to_ascii_lowercase().as_str() {
        "inf" | "infinity" => return Ok(f64::INFINITY),
        _ => {}
    }
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number (or +Inf)"))?;
    if v.is_nan() || v < 0.0 {
        return Err(format!("{s:?}: must be >= 0"));
    }
    Ok(v)
}

/// A burst: a positive integer.
pub fn parse_burst(s: &str) -> Result<i64, String> {
    let v: i64 = s.parse().map_err(|_| format!("{s:?} is not an integer"))?;
    if v < 1 {
        return Err(format!("{s:?}: must be at least 1"));
    }
    Ok(v)
}

fn parse_forwarded_header(s: &str) -> Result<ForwardedHeader, String> {
    s.parse()
}

fn parse_trusted_nets(s: &str) -> Result<TrustedNets, String> {
    s.parse()
}

fn parse_positive_duration(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<GoDuration>().map_err(|e| e.to_string())?.get() {
        d if d.is_zero() => Err(format!("{s:?}: must be more than 0")),
        d => Ok(d),
    }
}

fn check_verify_url(s: &str) -> Result<String, String> {
    if !s.is_empty() {
        VerifyUrl::parse(s).map_err(|e| e.to_string())?;
    }
    Ok(s.to_owned())
}

fn check_metrics_addr(s: &str) -> Result<String, String> {
    if !s.is_empty() {
        check_listen_addr(s)?;
    }
    Ok(s.to_owned())
}

/// `-a`: a listen address (checked at parse time so a bad one exits 2 like every bad flag).
fn check_listen_addr(s: &str) -> Result<String, String> {
    parse_listen_addr(s).map_err(|e| e.reason)?;
    Ok(s.to_owned())
}

/// `-certmode`: `manual`, `letsencrypt`, or `gcp` (known, refused later with a hint).
fn check_certmode(s: &str) -> Result<String, String> {
    match s {
        "manual" | "letsencrypt" | "gcp" => Ok(s.to_owned()),
        _ => Err(format!("unknown mode {s:?} (use manual, letsencrypt or gcp)")),
    }
}

/// `-home`: empty, `blank` or an http(s) URL.
fn check_home(s: &str) -> Result<String, String> {
    HomePage::parse(s)?;
    Ok(s.to_owned())
}

/// `-mesh-with`: a list of `host[:port][/dialhost]` entries.
fn check_mesh_with(s: &str) -> Result<String, String> {
    crate::mesh::parse_mesh_with(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derper_command_lines_parse() {
        let f =
            Flags::parse_go(["x", "-a=127.0.0.1:3340", "-stun=false", "-dev", "--home", "blank"]).unwrap();
        assert_eq!(f.addr, "127.0.0.1:3340");
        assert!(!f.stun && f.dev);
        assert_eq!(f.home, "blank");
        let f = Flags::parse_go(["x", "--a", ":8443", "-http-port", "-1", "-tcp-write-timeout=0"]).unwrap();
        assert_eq!((f.addr.as_str(), f.http_port), (":8443", -1));
        assert_eq!(f.tcp_write_timeout, GoDuration::ZERO);
        let f = Flags::parse_go(["x"]).unwrap();
        assert_eq!((f.addr.as_str(), f.http_port, f.stun, f.derp), (":443", 80, true, true));
        assert_eq!(f.certmode, "letsencrypt");
        assert_eq!(f.tcp_keepalive_time, GoDuration::from_secs(600));
        assert!(Flags::parse_go(["x", "-tcp-user-timeout", "soon"]).is_err());
        assert!(Flags::parse_go(["x", "-stun=maybe"]).is_err());
    }
}
