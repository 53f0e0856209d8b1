//! The command line turned into a running configuration ([`Startup`]): resolves the listen
//! address, loads or creates the key file, sets up TLS (manual or ACME), the mesh, and the
//! operations around the core. The flags themselves, and the derper decisions they carry, are in
//! [`crate::startup::flags`].

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use derpfleet_gocompat::{parse_listen_addr, ListenAddrError};
use derpfleet_proto::NodePrivate;

use derpfleet_stun::{PerIpLimit, StunConfig};

use crate::core::derp_server::DerpServerConfig;
use crate::defaults;
use crate::http::forwarded::ForwardedTrust;
use crate::http::tls::{self, TlsError};
use crate::http::HomePage;
use crate::ops::admission::{Allowlist, AllowlistError, VerifyUrl, VerifyUrlError};
use crate::ops::ratelimit::{load_rate_config, AcceptRate, RateConfigError, RecvRate};
use crate::server::{DrainConfig, OpsConfig, ServerConfig, StunListenConfig, TcpConfig};
use crate::startup::flags::Flags;
use crate::startup::keyfile::{self, KeyFileError};

/// Why the relay cannot start with the given flags.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("-a: {0}")]
    Addr(ListenAddrError),
    #[error("-home: {0}")]
    Home(String),
    #[error("-certmode {0:?}: unknown mode (use manual, letsencrypt or gcp)")]
    UnknownCertMode(String),
    #[error("no -c given and neither $HOME nor $XDG_CONFIG_HOME is set")]
    NoConfigPath,
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("ACME: {0}")]
    Acme(#[from] crate::ops::acme::AcmeError),
    #[error(
        "-ace=true: derper's experimental embedded ACE server is not offered by derpfleet-relay; \
         remove -ace or set -ace=false"
    )]
    AceUnsupported,
    #[error("-secrets-url: {0}")]
    Secrets(#[from] crate::ops::secrets::SecretsError),
    #[error("-secrets-url: the setec mesh key secret must hold exactly 64 hex characters")]
    SetecMeshKey,
    #[error("-verify-client-url: {0}")]
    VerifyUrl(#[from] VerifyUrlError),
    #[error("-allowlist: {0}")]
    Allowlist(#[from] AllowlistError),
    #[error("-rate-config: {0}")]
    RateConfig(#[from] RateConfigError),
    #[error("-metrics-addr: {0}")]
    MetricsAddr(ListenAddrError),
    #[error("-mesh-psk-file: {0}")]
    MeshKey(#[from] crate::mesh::MeshKeyError),
    #[error(transparent)]
    MeshWith(#[from] crate::mesh::MeshPeerError),
    #[error("-mesh-with requires a mesh key (-mesh-psk-file)")]
    MeshWithoutKey,
    #[error("-mesh-ca-file: {0}")]
    MeshCaFile(#[from] crate::mesh::CaFileError),
}

/// What the binary needs to start and to tell the operator.
#[derive(Debug)]
pub struct Startup {
    /// The server configuration.
    pub config: ServerConfig,
    /// `sha256-raw:<hex>` when the served certificate is pinned that way (IP-literal hostname);
    /// log [`tls::derp_node_json`] with the bound port.
    pub cert_name: Option<String>,
    /// Lines worth logging at start (key file created, certificate generated, dev mode...).
    pub notes: Vec<String>,
    /// Admission, limits, metrics, STUN, certificate reload.
    pub ops: OpsConfig,
    /// What a graceful shutdown does.
    pub drain: DrainConfig,
    /// The mesh to start next to the server (`-mesh-with`), if any.
    pub mesh: Option<crate::mesh::MeshConfig>,
}

/// Turns flags into a server configuration: resolves the address, loads or creates the key file,
/// and sets up TLS.
pub fn build(flags: &Flags) -> Result<Startup, StartupError> {
    let mut notes = Vec::new();
    if flags.ace {
        return Err(StartupError::AceUnsupported);
    }
    let (listen, port_is_https) = if flags.dev {
        notes.push("running in dev mode: 127.0.0.1:3340, ephemeral key, plain HTTP".to_owned());
        (SocketAddr::from(([127, 0, 0, 1], 3340)), false)
    } else {
        let addr = parse_listen_addr(&flags.addr).map_err(StartupError::Addr)?;
        (addr, addr.port() == 443)
    };
    let home = HomePage::parse(&flags.home).map_err(StartupError::Home)?;
    let private_key = if flags.dev {
        NodePrivate::generate()
    } else {
        let path = match &flags.config_path {
            Some(p) => p.clone(),
            None => default_config_path().ok_or(StartupError::NoConfigPath)?,
        };
        let (key, created) = keyfile::load_or_create(&path)?;
        if created {
            notes.push(format!("created new key file {}", path.display()));
        }
        key
    };
    let server_public = private_key.public();
    let manual = match flags.certmode.as_str() {
        "manual" => true,
        "letsencrypt" | "gcp" => false,
        other => return Err(StartupError::UnknownCertMode(other.to_owned())),
    };
    let serve_tls = port_is_https || manual;
    let mut cert_name = None;
    let mut cert_reloader = None;
    let mut acme_task = None;
    let tls = if !serve_tls {
        None
    } else if !manual {
        // Only when ACME really runs (TLS served), as derper reads these flags only then.
        use crate::ops::acme::{AcmeConfig, AcmeMode};
        let nonempty = |s: &String| (!s.is_empty()).then(|| s.clone());
        let settings = AcmeConfig {
            mode: if flags.certmode == "gcp" { AcmeMode::Gcp } else { AcmeMode::LetsEncrypt },
            hostname: flags.hostname.clone(),
            certdir: flags.certdir.clone().unwrap_or_else(default_certdir),
            directory_url: nonempty(&flags.acme_directory_url),
            email: nonempty(&flags.acme_email),
            extra_roots: flags.acme_ca_file.clone(),
            eab_kid: flags.acme_eab_kid.clone(),
            eab_key: flags.acme_eab_key.clone(),
            ip_certs: flags.acme_ip_certs,
            http01: flags.http_port >= 0,
        };
        let (config, task) = crate::ops::acme::setup(&settings, &server_public)?;
        notes.push(format!("ACME certificate for {} from {}", flags.hostname, settings.directory()));
        acme_task = Some(task);
        Some(config)
    } else {
        let certdir = flags.certdir.clone().unwrap_or_else(default_certdir);
        let setup = tls::manual(&certdir, &flags.hostname, &server_public)?;
        if setup.generated {
            notes.push(format!("generated a self-signed certificate {}", setup.cert_path.display()));
        }
        cert_name = setup.cert_name.clone();
        cert_reloader = setup.reloader.clone();
        Some(setup.config)
    };
    let http_port = (flags.http_port >= 0).then_some(flags.http_port as u16);
    let config = ServerConfig {
        listen,
        tls,
        http_port,
        home,
        derp_enabled: flags.derp,
        derp: DerpServerConfig {
            private_key,
            mesh_key: None,
            write_timeout: flags.tcp_write_timeout.non_zero(),
            queue_depth: queue_depth_from_env(),
        },
        tcp: TcpConfig {
            keepalive_time: flags.tcp_keepalive_time.non_zero(),
            user_timeout: flags.tcp_user_timeout.non_zero(),
        },
    };
    let mut ops = ops_config(flags, listen, cert_reloader, &mut notes)?;
    ops.acme = acme_task;
    let drain = DrainConfig {
        reconnect_in: flags.restart_reconnect_in.get(),
        reconnect_jitter: flags.restart_reconnect_jitter.get(),
        try_for: flags.restart_try_for.get(),
        deadline: flags.drain_timeout.get(),
    };
    let (mesh_key, mesh) = mesh_config(flags, &mut notes)?;
    let mut config = config;
    config.derp.mesh_key = mesh_key;
    Ok(Startup { config, cert_name, notes, ops, drain, mesh })
}

/// The mesh key (`-mesh-psk-file` or derper's default file) and the `-mesh-with` links.
fn mesh_config(
    flags: &Flags,
    notes: &mut Vec<String>,
) -> Result<(Option<derpfleet_proto::MeshKey>, Option<crate::mesh::MeshConfig>), StartupError> {
    use crate::mesh;
    let key = if !flags.dev && !flags.secrets_url.is_empty() {
        // derper's order: setec wins over -mesh-psk-file (see crate::ops::secrets).
        let settings = crate::ops::secrets::SecretsConfig {
            url: flags.secrets_url.clone(),
            path_prefix: flags.secrets_path_prefix.clone(),
            cache_path: flags
                .secrets_cache_dir
                .clone()
                .unwrap_or_else(crate::ops::secrets::default_cache_path),
        };
        let text = crate::ops::secrets::mesh_key_blocking(&settings)?;
        let key = derpfleet_proto::MeshKey::parse(text.trim()).map_err(|_| StartupError::SetecMeshKey)?;
        notes.push(format!("mesh key from setec {:?} ({})", settings.url, settings.mesh_key_name()));
        Some(key)
    } else {
        let path = flags.mesh_psk_file.clone().or_else(mesh::default_mesh_psk_file);
        path.as_deref().map(mesh::load_mesh_key).transpose()?
    };
    let peers = mesh::parse_mesh_with(&flags.mesh_with)?;
    if peers.is_empty() {
        return Ok((key, None));
    }
    let key = key.ok_or(StartupError::MeshWithoutKey)?;
    let mut config = mesh::MeshConfig::new(key, peers);
    if let Some(ca) = &flags.mesh_ca_file {
        config.extra_roots.extend(mesh::load_ca_file(ca)?);
    }
    notes.push(format!("meshing with {} -mesh-with entries", config.peers.len()));
    Ok((Some(key), Some(config)))
}

/// The operations part of the flags (admission, limits, metrics, STUN, reload).
fn ops_config(
    flags: &Flags,
    listen: SocketAddr,
    cert_reloader: Option<std::sync::Arc<crate::http::tls::CertReloader>>,
    notes: &mut Vec<String>,
) -> Result<OpsConfig, StartupError> {
    let verify_url = (!flags.verify_client_url.is_empty())
        .then(|| VerifyUrl::parse(&flags.verify_client_url))
        .transpose()?;
    let allowlist = match &flags.allowlist {
        Some(path) => {
            let list = Allowlist::load(path)?;
            notes.push(format!("allowlist {}: {} keys", path.display(), list.len()));
            Some(std::sync::Arc::new(list))
        }
        None => None,
    };
    let recv_rate = match &flags.rate_config {
        Some(path) => load_rate_config(path)?,
        None => RecvRate::default(),
    };
    let metrics_addr = if flags.metrics_addr.is_empty() {
        None
    } else {
        Some(parse_listen_addr(&flags.metrics_addr).map_err(StartupError::MetricsAddr)?)
    };
    let stun = flags.stun.then(|| StunListenConfig {
        addr: SocketAddr::new(listen.ip(), flags.stun_port),
        config: StunConfig {
            strict: flags.stun_strict,
            per_ip_limit: NonZeroU32::new(flags.stun_rate_limit).map(|per_second| PerIpLimit {
                per_second,
                burst: NonZeroU32::new(flags.stun_rate_burst).unwrap_or(per_second),
            }),
        },
    });
    Ok(OpsConfig {
        metrics_addr,
        metrics_addr_required: flags.metrics_addr_explicit,
        accept_limit: AcceptRate {
            per_second: flags.accept_connection_limit,
            burst: flags.accept_connection_burst as u64,
        },
        accept_limit_per_ip: AcceptRate {
            per_second: flags.accept_connection_limit_per_ip,
            burst: flags.accept_connection_burst_per_ip as u64,
        },
        allowlist,
        verify_url,
        verify_fail_open: flags.verify_client_url_fail_open,
        verify_clients_socket: flags.verify_clients.then(|| flags.socket.clone()),
        recv_rate,
        rate_config_path: flags.rate_config.clone(),
        stun,
        cert_reloader,
        cert_reload_interval: flags.cert_reload_interval.non_zero(),
        acme: None,
        drop_log_interval: flags.drop_log_interval.max(defaults::MIN_DROP_LOG_INTERVAL).get(),
        bootstrap_dns: crate::ops::bootstrap_dns::BootstrapDnsConfig::parse(
            &flags.bootstrap_dns_names,
            &flags.unpublished_bootstrap_dns_names,
        ),
        proxy_protocol_trusted: flags.proxy_protocol_trusted.clone(),
        proxy_protocol_timeout: flags.proxy_protocol_timeout,
        forwarded: ForwardedTrust {
            proxies: flags.forwarded_trusted.clone(),
            header: flags.forwarded_header,
        },
    })
}

/// `TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH`, else 32.
fn queue_depth_from_env() -> usize {
    std::env::var("TS_DEBUG_DERP_PER_CLIENT_SEND_QUEUE_DEPTH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or(defaults::SEND_QUEUE_DEPTH)
}

fn is_root() -> bool {
    // /proc/self is owned by our effective uid; this avoids a libc dependency for geteuid().
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// derper's root default, else a per-user path (see [`crate::startup::flags`]).
pub fn default_config_path() -> Option<PathBuf> {
    if is_root() {
        return Some(PathBuf::from("/var/lib/derper/derper.key"));
    }
    let base =
        std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()).map(PathBuf::from).or_else(|| {
            std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| Path::new(&h).join(".config"))
        })?;
    Some(base.join("derper").join("derper.key"))
}

/// `$XDG_CACHE_HOME/tailscale/derper-certs` (or `$HOME/.cache/...`), as derper.
pub fn default_certdir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("tailscale").join("derper-certs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acme_flags_are_checked_when_acme_runs() {
        let dir = std::env::temp_dir().join(format!("derpfleet-cli-le-{}", std::process::id()));
        let key = dir.join("k.key");
        let args = ["x", "-a", "127.0.0.1:443", "-c", key.to_str().unwrap(), "-certmode", "gcp"];
        let e = build(&Flags::parse_go(args).unwrap()).unwrap_err().to_string();
        assert_eq!(e, "ACME: -certmode gcp requires -acme-eab-kid and -acme-eab-key");
        // An IP hostname needs -acme-ip-certs.
        let args = ["x", "-a", "127.0.0.1:443", "-c", key.to_str().unwrap(), "-hostname", "192.0.2.1"];
        let e = build(&Flags::parse_go(args).unwrap()).unwrap_err().to_string();
        assert!(e.contains("-acme-ip-certs"), "{e}");
        // Half an EAB is refused when ACME would run, and only then.
        let args = ["x", "-a", "127.0.0.1:443", "-c", key.to_str().unwrap(), "-acme-eab-kid", "k"];
        let e = build(&Flags::parse_go(args).unwrap()).unwrap_err().to_string();
        assert_eq!(e, "ACME: -acme-eab-kid and -acme-eab-key must be set together");
        let args =
            ["x", "-a", "127.0.0.1:8080", "-c", key.to_str().unwrap(), "-acme-ip-certs", "-acme-eab-kid=k"];
        assert!(build(&Flags::parse_go(args).unwrap()).is_ok());
        // Plain HTTP on another port is fine with the default certmode.
        let args = ["x", "-a", "127.0.0.1:8080", "-c", key.to_str().unwrap()];
        let s = build(&Flags::parse_go(args).unwrap()).unwrap();
        assert!(s.config.tls.is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
