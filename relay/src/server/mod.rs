//! `Server::spawn`: binds the listeners, owns every task, shuts down cleanly.
//!
//! Structured concurrency: every accept loop and connection task is tracked by one
//! [`TaskTracker`] and stopped by one [`CancellationToken`]; [`Server::shutdown`] cancels and waits.
//! Dropping a [`Server`] cancels too, so a forgotten handle leaks nothing but a brief wind-down.
//!
//! Around the core it runs the operations parts ([`OpsConfig`]): accept limits, the
//! admission policy, the per-client receive rate, the metrics listener, the embedded STUN
//! responder, certificate reloading and the drop log; [`Server::reload`] is SIGHUP.
//!
//! The settings are in `config`, the listeners and accept loops in `listen`; this file starts,
//! reloads, drains and stops.

mod config;
mod listen;

pub use config::{DrainConfig, OpsConfig, ServerConfig, StunListenConfig, TcpConfig};

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use derpfleet_stun::{StunMetrics, StunServer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::derp_server::{jitter, CoreConfig, DerpServer};
use crate::core::outbox::Control;
use crate::http::proxy_protocol::ProxyProtocol;
use crate::http::tls::CertReloader;
use crate::http::HttpContext;
use crate::ops::admission::Admitter;
use crate::ops::metrics_http::{self, Status};
use crate::ops::ops_metrics::OpsMetrics;
use crate::ops::ratelimit::{load_rate_config, AcceptLimiter, RecvRate, SharedRecvRate};
use crate::server::listen::{accept_loop, bind, AcceptLoop, Listener};

/// How often a drain looks for connections still open (or newly handshaken).
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How often per-IP accept buckets that refilled are forgotten.
const ACCEPT_LIMITER_PRUNE: Duration = Duration::from_secs(10);

/// Why the server could not start.
#[allow(missing_docs)] // each variant is described by its #[error] message
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("listening on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("metrics listener on {addr}: {source}")]
    MetricsBind { addr: SocketAddr, source: io::Error },
    #[error("STUN on {addr}: {source}")]
    StunBind { addr: SocketAddr, source: io::Error },
}

/// What [`Server::drain`] did.
#[derive(Debug, Default, Clone, Copy)]
pub struct DrainReport {
    /// Connections sent `Restarting`.
    pub notified: usize,
    /// Of those, closed before the deadline.
    pub left: usize,
    /// Connections still open at the deadline, closed then.
    pub closed: usize,
}

/// What [`Server::reload`] did.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Keys now on the allowlist (None: no allowlist).
    pub allowlist_keys: Option<usize>,
    /// The receive rate now in force (None: off).
    pub recv_rate: Option<RecvRate>,
    /// Problems; the affected setting kept its previous value.
    pub errors: Vec<String>,
}

/// A running relay. Dropping it stops it (without waiting); prefer [`Server::shutdown`].
pub struct Server {
    local_addr: SocketAddr,
    http_port_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    stun_addr: Option<SocketAddr>,
    derp: Arc<DerpServer>,
    status: Arc<Status>,
    ops: OpsConfig,
    recv_rate: Arc<SharedRecvRate>,
    /// Stops the accept loops only (the first step of a drain).
    accept_cancel: CancellationToken,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Server {
    /// Binds the listeners and starts serving. Must be called inside a tokio runtime.
    pub async fn spawn(config: ServerConfig) -> Result<Server, SpawnError> {
        Self::spawn_with(config, OpsConfig::default()).await
    }

    /// [`Server::spawn`] with the operations parts (limits, admission, metrics, STUN...).
    pub async fn spawn_with(config: ServerConfig, ops: OpsConfig) -> Result<Server, SpawnError> {
        let server_public = config.derp.private_key.public();
        let ops_metrics = Arc::new(OpsMetrics::new());
        let admitter = Admitter::new(
            ops.allowlist.clone(),
            ops.verify_url.clone(),
            ops.verify_fail_open,
            ops_metrics.admission(),
        )
        .with_localapi(ops.verify_clients_socket.as_deref().map(|socket| {
            let v = Arc::new(crate::ops::verify_localapi::LocalApiVerifier::new(
                socket,
                ops_metrics.verify_clients(),
            ));
            let table = v.clone();
            ops_metrics.add_text_source(Box::new(move || table.render_key_results()));
            v
        }));
        let recv_rate = SharedRecvRate::new(ops.recv_rate);
        ops_metrics.set_recv_rate(recv_rate.get());
        let options = CoreConfig {
            admission: admitter.is_active().then(|| admitter.into_hook()),
            recv_rate: Some(recv_rate.clone()),
            ..CoreConfig::default()
        };
        let derp = DerpServer::with_options(config.derp.clone(), options);
        let status = Status::new(derp.clone(), ops_metrics.clone());
        let main = bind(config.listen).map_err(|source| SpawnError::Bind { addr: config.listen, source })?;
        let local_addr =
            main.local_addr().map_err(|source| SpawnError::Bind { addr: config.listen, source })?;
        let port80 = match (&config.tls, config.http_port) {
            (Some(_), Some(port)) => {
                let addr = SocketAddr::new(local_addr.ip(), port);
                Some(bind(addr).map_err(|source| SpawnError::Bind { addr, source })?)
            }
            _ => None,
        };
        let http_port_addr = port80.as_ref().and_then(|l| l.local_addr().ok());
        let metrics_listener = match ops.metrics_addr {
            Some(addr) => {
                // `[::]` falls back to `0.0.0.0` on a host without IPv6, as the main listener does.
                match bind(addr) {
                    Ok(l) => Some(l),
                    Err(source) if ops.metrics_addr_required => {
                        return Err(SpawnError::MetricsBind { addr, source })
                    }
                    Err(e) => {
                        tracing::warn!(
                            "metrics listener {addr}: {e}; serving without it (set -metrics-addr to another \
                             address, or -metrics-addr= to turn it off; /debug/varz and /healthz remain on \
                             the main port)"
                        );
                        None
                    }
                }
            }
            None => None,
        };
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let stun_sockets = match &ops.stun {
            Some(st) => {
                // "Same IP as -a": the bound main address, so `[::]` falling back to IPv4 agrees.
                let addr = SocketAddr::new(local_addr.ip(), st.addr.port());
                let socks = derpfleet_stun::bind_sockets(addr, 1)
                    .map_err(|source| SpawnError::StunBind { addr, source })?;
                Some((socks, st.config))
            }
            None => None,
        };
        let stun_addr = stun_sockets.as_ref().and_then(|(s, _)| s.first()).and_then(|s| s.local_addr().ok());

        let cancel = CancellationToken::new();
        let accept_cancel = cancel.child_token();
        let tracker = TaskTracker::new();
        let bootstrap_dns =
            crate::ops::bootstrap_dns::BootstrapDns::new(ops.bootstrap_dns.clone(), ops_metrics.recorder());
        tracker.spawn(bootstrap_dns.clone().run(cancel.clone()));
        let ctx = Arc::new(HttpContext {
            bootstrap_dns,
            derp: derp.clone(),
            server_public,
            home: config.home.clone(),
            derp_enabled: config.derp_enabled,
            tasks: tracker.clone(),
            cancel: cancel.clone(),
            status: status.clone(),
            forwarded: ops.forwarded.clone(),
            acme: ops.acme.clone(),
        });
        let proxy = ProxyProtocol::new(
            ops.proxy_protocol_trusted.clone(),
            ops.proxy_protocol_timeout,
            ops_metrics.proxy_protocol(),
        )
        .map(Arc::new);
        let limiter = Arc::new(AcceptLimiter::new(ops.accept_limit, ops.accept_limit_per_ip));
        if !limiter.is_unlimited() {
            let (limiter, cancel) = (limiter.clone(), cancel.clone());
            tracker.spawn(async move {
                let mut tick = tokio::time::interval(ACCEPT_LIMITER_PRUNE);
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tick.tick() => limiter.prune(),
                    }
                }
            });
        }
        let tls = config.tls.clone().map(TlsAcceptor::from);
        let main_loop = AcceptLoop {
            ctx: ctx.clone(),
            tcp: config.tcp,
            limiter: Some(limiter),
            proxy: proxy.clone(),
            ops: ops_metrics.clone(),
            accept_cancel: accept_cancel.clone(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        };
        tracker.spawn(accept_loop(main, Listener::Main(tls), main_loop));
        if let Some(l) = port80 {
            let port80_loop = AcceptLoop {
                ctx,
                tcp: config.tcp,
                limiter: None,
                proxy,
                ops: ops_metrics.clone(),
                accept_cancel: accept_cancel.clone(),
                cancel: cancel.clone(),
                tracker: tracker.clone(),
            };
            tracker.spawn(accept_loop(l, Listener::Http80, port80_loop));
        }
        if let Some(l) = metrics_listener {
            tracker.spawn(metrics_http::serve(l, status.clone(), cancel.clone(), tracker.clone()));
        }
        if let Some((socks, stun_config)) = stun_sockets {
            let stun = StunServer::new(stun_config, StunMetrics::register(ops_metrics.recorder()));
            let cancel = cancel.clone();
            tracker.spawn(async move {
                if let Err(e) = stun.serve(socks, cancel).await {
                    tracing::error!("STUN responder stopped: {e}");
                }
            });
        }
        if let (Some(reloader), Some(every)) = (ops.cert_reloader.clone(), ops.cert_reload_interval) {
            tracker.spawn(watch_certificates(reloader, every, ops_metrics.clone(), cancel.clone()));
        }
        if let Some(task) = ops.acme.clone() {
            tracker.spawn(crate::ops::acme::run(task, cancel.clone()));
        }
        tracker.spawn(metrics_http::drop_log(derp.clone(), ops.drop_log_interval, cancel.clone()));
        tracing::info!(
            %local_addr, tls = config.tls.is_some(), ?http_port_addr, ?metrics_addr, ?stun_addr,
            "relay listening"
        );
        Ok(Server {
            local_addr,
            http_port_addr,
            metrics_addr,
            stun_addr,
            derp,
            status,
            ops,
            recv_rate,
            accept_cancel,
            cancel,
            tracker,
        })
    }

    /// The bound metrics listener address, if one is served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound STUN address, if STUN is served.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun_addr
    }

    /// What `/metrics` and `/healthz` report.
    pub fn status(&self) -> &Arc<Status> {
        &self.status
    }

    /// The per-client receive rate in force (shared with every connection).
    pub fn recv_rate(&self) -> &Arc<SharedRecvRate> {
        &self.recv_rate
    }

    /// SIGHUP: re-reads the allowlist and the `-rate-config` file. A file that fails to load
    /// keeps the previous setting (reported in `errors` and counted). Connected clients stay.
    pub fn reload(&self) -> ReloadReport {
        let mut report = ReloadReport::default();
        if let Some(list) = &self.ops.allowlist {
            match list.reload() {
                Ok(n) => report.allowlist_keys = Some(n),
                Err(e) => report.errors.push(format!("-allowlist: {e}")),
            }
        }
        if let Some(path) = &self.ops.rate_config_path {
            match load_rate_config(path) {
                Ok(rate) => self.recv_rate.set(rate),
                Err(e) => report.errors.push(format!("-rate-config: {e}")),
            }
        }
        report.recv_rate = self.recv_rate.get();
        self.status.ops.set_recv_rate(report.recv_rate);
        self.status.ops.reload_errors.increment(report.errors.len() as u64);
        report
    }

    /// The bound main address (with the real port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound plain-HTTP port address, if one is served.
    pub fn http_port_addr(&self) -> Option<SocketAddr> {
        self.http_port_addr
    }

    /// The DERP core.
    pub fn derp(&self) -> &Arc<DerpServer> {
        &self.derp
    }

    /// Graceful shutdown (SIGTERM): stop accepting (the listeners close, so a new process can
    /// bind), report `draining` on `/healthz`, queue `Restarting{reconnect_in + jitter, try_for}`
    /// for every client (and for any that finishes its handshake meanwhile). Each connection's
    /// send loop writes what it has queued, then the Restarting frame, flushes and closes.
    /// Whatever is still open at `deadline` is closed; then every task is awaited.
    pub async fn drain(self, opts: DrainConfig) -> DrainReport {
        let deadline = tokio::time::Instant::now() + opts.deadline;
        self.accept_cancel.cancel();
        self.status.draining.store(true, std::sync::atomic::Ordering::Release);
        let mut notified = HashSet::new();
        loop {
            let conns = self.derp.registry().all_conns();
            for conn in &conns {
                if notified.insert(conn.id) {
                    let reconnect_in = opts.reconnect_in + jitter(opts.reconnect_jitter);
                    if conn.out.send_control(Control::Restarting { reconnect_in, try_for: opts.try_for }) {
                        self.status.ops.restarting_sent.increment(1);
                    }
                }
            }
            if conns.is_empty() || tokio::time::Instant::now() >= deadline {
                let closed = conns.len();
                self.cancel.cancel();
                self.derp.close_all();
                self.tracker.close();
                // Closing is prompt; the bound only guards against a wedged task.
                let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
                let notified = notified.len();
                return DrainReport { notified, left: notified.saturating_sub(closed), closed };
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Stops accepting, closes every connection and waits for all tasks to end.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.derp.close_all();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.derp.close_all();
    }
}

/// Polls the certificate files and swaps in a changed pair.
async fn watch_certificates(
    reloader: Arc<CertReloader>,
    every: Duration,
    ops: Arc<OpsMetrics>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let r = reloader.clone();
        match tokio::task::spawn_blocking(move || r.check()).await {
            Ok(Ok(true)) => {
                ops.cert_reloads_ok.increment(1);
                tracing::info!("certificate files changed: new TLS connections get the new certificate");
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => {
                ops.cert_reloads_failed.increment(1);
                tracing::warn!("certificate files changed but cannot be used (keeping the old one): {e}");
            }
            Err(e) => tracing::warn!("certificate reload task: {e}"),
        }
    }
}
