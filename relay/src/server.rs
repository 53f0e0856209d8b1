//! `Server::spawn`: binds the listeners, owns every task, shuts down cleanly.
//!
//! Structured concurrency: every accept loop and connection task is tracked by one
//! [`TaskTracker`] and stopped by one [`CancellationToken`]; [`Server::shutdown`] cancels and waits.
//! Dropping a [`Server`] cancels too, so a forgotten handle leaks nothing but a brief wind-down.
//!
//! Around the core it runs the operations parts ([`OpsConfig`]): accept limits, the
//! admission policy, the per-client receive rate, the metrics listener, the embedded STUN
//! responder, certificate reloading and the drop log; [`Server::reload`] is SIGHUP.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use derpfleet_proto::consts::HANDSHAKE_TIMEOUT;
use derpfleet_stun::{StunConfig, StunMetrics, StunServer};
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::core::derp_server::{jitter, CoreConfig, DerpServer, DerpServerConfig};
use crate::core::outbox::Control;
use crate::defaults;
use crate::http::forwarded::ForwardedTrust;
use crate::http::proxy_protocol::{self, ProxyProtocol, TrustedNets};
use crate::http::shutdown_watch::ShutdownWatch;
use crate::http::tls::CertReloader;
use crate::http::{self, HomePage, HttpContext};
use crate::ops::admission::{Admitter, Allowlist, VerifyUrl};
use crate::ops::metrics_http::{self, Status};
use crate::ops::ops_metrics::OpsMetrics;
use crate::ops::ratelimit::{load_rate_config, AcceptLimiter, AcceptRate, RecvRate, SharedRecvRate};

/// How often a drain looks for connections still open (or newly handshaken).
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// How often per-IP accept buckets that refilled are forgotten.
const ACCEPT_LIMITER_PRUNE: Duration = Duration::from_secs(10);

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
    /// `-rate-config` file, re-read by [`Server::reload`].
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

/// What a graceful shutdown does ([`Server::drain`]).
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
        let main = bind(config.listen)?;
        let local_addr =
            main.local_addr().map_err(|source| SpawnError::Bind { addr: config.listen, source })?;
        let port80 = match (&config.tls, config.http_port) {
            (Some(_), Some(port)) => {
                let l = bind(SocketAddr::new(local_addr.ip(), port))?;
                Some(l)
            }
            _ => None,
        };
        let http_port_addr = port80.as_ref().and_then(|l| l.local_addr().ok());
        let metrics_listener = match ops.metrics_addr {
            Some(addr) => {
                let bound = bind_one(addr).or_else(|e| match addr.ip() {
                    IpAddr::V6(v6) if v6.is_unspecified() => {
                        bind_one(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port()))
                    }
                    _ => Err(e),
                });
                match bound {
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

/// Binds with `SO_REUSEADDR` (fast restarts); `[::]` is made dual-stack, or `0.0.0.0` if the host
/// has no IPv6.
fn bind(addr: SocketAddr) -> Result<TcpListener, SpawnError> {
    let err = |source| SpawnError::Bind { addr, source };
    match bind_one(addr) {
        Ok(l) => Ok(l),
        Err(e) if addr.ip() == IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED) => {
            tracing::debug!("dual-stack bind of {addr} failed ({e}); using IPv4 only");
            bind_one(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port())).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

enum Listener {
    Main(Option<TlsAcceptor>),
    Http80,
}

/// What one accept loop needs.
struct AcceptLoop {
    ctx: Arc<HttpContext>,
    tcp: TcpConfig,
    /// Accept limits (main listener only).
    limiter: Option<Arc<AcceptLimiter>>,
    /// PROXY protocol for trusted peers (read before the limits, which then see the client).
    proxy: Option<Arc<ProxyProtocol>>,
    ops: Arc<OpsMetrics>,
    /// Stops accepting (drain); connections go on.
    accept_cancel: CancellationToken,
    /// Stops everything.
    cancel: CancellationToken,
    tracker: TaskTracker,
}

async fn accept_loop(listener: TcpListener, kind: Listener, l: AcceptLoop) {
    let AcceptLoop { ctx, tcp, limiter, proxy, ops, accept_cancel, cancel, tracker } = l;
    let kind = Arc::new(kind);
    let is_main = matches!(*kind, Listener::Main(_));
    loop {
        let accepted = tokio::select! {
            _ = accept_cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if is_main {
            ops.tls_listener_accepted_connections.increment(1);
        }
        // A trusted proxy's connection is limited by the client address its header gives.
        let proxy = proxy.clone().filter(|p| p.trusts(remote.ip()));
        if proxy.is_none() && !within_limits(limiter.as_deref(), &ops, remote) {
            drop(stream);
            continue;
        }
        if let Err(e) = tune(&stream, tcp) {
            tracing::debug!(%remote, "setting socket options: {e}");
        }
        let (ctx, kind, cancel, limiter, ops) =
            (ctx.clone(), kind.clone(), cancel.clone(), limiter.clone(), ops.clone());
        tracker.spawn(async move {
            // Polled until the DERP core owns the connection (it then closes it at shutdown).
            let watch = ShutdownWatch::new();
            let run = std::pin::pin!(async {
                let mut stream = stream;
                let remote = match &proxy {
                    None => remote,
                    // Boxed: inline, the header reader's room would stay in every connection's task.
                    Some(p) => match Box::pin(p.read(&mut stream, remote)).await {
                        Some(client) if within_limits(limiter.as_deref(), &ops, client) => client,
                        _ => return,
                    },
                };
                serve(stream, remote, &kind, ctx, &watch).await
            });
            watch.run(&cancel, run).await;
        });
    }
}

/// The accept limits for a connection from `remote`; over them it is counted and the caller closes
/// it at once (derper: accept, then close; nothing is read).
fn within_limits(limiter: Option<&AcceptLimiter>, ops: &OpsMetrics, remote: SocketAddr) -> bool {
    let Some(limiter) = limiter else { return true };
    match limiter.check(remote.ip()) {
        Ok(()) => true,
        Err(why) => {
            ops.accept_refused(why);
            tracing::debug!(%remote, ?why, "connection over the accept limit closed");
            false
        }
    }
}

/// Serves one accepted connection by its listener's kind.
///
/// Each path is boxed: a future is as large as its largest state, so without the boxes every
/// connection's task would be sized for the TLS path (the handshake and the TLS stream inline) and a
/// plain-HTTP client would carry that for its whole life. Boxed, an idle connection holds only the
/// state of the path it took.
async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    kind: &Listener,
    ctx: Arc<HttpContext>,
    watch: &ShutdownWatch,
) {
    match kind {
        Listener::Http80 => Box::pin(http::serve_port80_connection(stream, remote, ctx)).await,
        Listener::Main(None) => Box::pin(http::serve_connection(stream, remote, ctx, watch)).await,
        Listener::Main(Some(acceptor)) => Box::pin(serve_tls(stream, remote, acceptor, ctx, watch)).await,
    }
}

/// The TLS handshake (with its deadline), then the connection over TLS.
///
/// The handshake future is boxed, so its room (it holds the TLS connection state inline) is freed
/// when the handshake ends instead of sizing this future for the connection's life. The TLS stream
/// (about 1.2 KB of rustls state) is boxed too and the layers above hold only the pointer: held by
/// value, each layer that takes it (this future, `serve_connection`, the DERP session, the
/// reader/writer split) keeps room for a copy of its own.
async fn serve_tls(
    stream: TcpStream,
    remote: SocketAddr,
    acceptor: &TlsAcceptor,
    ctx: Arc<HttpContext>,
    watch: &ShutdownWatch,
) {
    // The ACME resolver picks an IP certificate by the connection's local address.
    let local_ip = stream.local_addr().ok().map(|a| a.ip());
    let accept = crate::ops::acme::with_local_ip(local_ip, acceptor.accept(stream));
    // The stream is boxed in its own statement, so no temporary of it outlives the handshake.
    let tls = match Box::pin(tokio::time::timeout(HANDSHAKE_TIMEOUT, accept)).await {
        Ok(Ok(tls)) => Box::new(tls),
        Ok(Err(e)) => return tracing::debug!(%remote, "TLS handshake: {e}"),
        Err(_) => return tracing::debug!(%remote, "TLS handshake timed out"),
    };
    http::serve_connection(tls, remote, ctx, watch).await
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

/// TCP keepalive (derper's long idle, to save mobile batteries), `TCP_USER_TIMEOUT` and no Nagle.
fn tune(stream: &TcpStream, tcp: TcpConfig) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    match tcp.keepalive_time {
        Some(idle) => {
            let ka =
                TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(15)).with_retries(9);
            sock.set_tcp_keepalive(&ka)?;
        }
        None => sock.set_keepalive(false)?,
    }
    if let Some(t) = tcp.user_timeout {
        sock.set_tcp_user_timeout(Some(t))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_get_keepalive_user_timeout_and_nodelay() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let tcp = TcpConfig {
            keepalive_time: Some(Duration::from_secs(600)),
            user_timeout: Some(Duration::from_secs(15)),
        };
        tune(&accepted, tcp).unwrap();
        let sock = SockRef::from(&accepted);
        assert!(accepted.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(600));
        assert_eq!(sock.tcp_user_timeout().unwrap(), Some(Duration::from_secs(15)));
        tune(&accepted, TcpConfig { keepalive_time: None, user_timeout: None }).unwrap();
        assert!(!sock.keepalive().unwrap());
    }
}
